"""The ``heads`` stage of a recipe: whole attention heads. No torch here."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hfcompress.stage import StageBase


class HeadsStage(StageBase):
    """Remove whole attention heads (Minitron's head pruning, Muralidharan et al. 2024).

    Query head h is rows h·d … (h+1)·d − 1 of ``q_proj`` and the same columns of ``o_proj``
    (d = head_dim); KV head g is those rows of ``k_proj`` and ``v_proj``, shared by its group of
    query heads. Targets are attention modules with separate q/k/v/o projections (Llama, Qwen2,
    Mistral, Gemma): ``model.layers.3.self_attn``. With grouped-query attention, ``groups``
    says what goes: whole KV groups (a KV head and its query heads) or query heads, as many in
    every group.

    Example:
        .. code-block:: yaml

            - method: heads
              targets: 'model\\.layers\\.\\d+\\.self_attn'
              keep: 0.67
              criterion: activation     # magnitude | activation | taylor
    """

    method: Literal["heads"] = "heads"
    keep: float = Field(
        gt=0.0,
        le=1.0,
        strict=True,
        allow_inf_nan=False,
        description="Fraction of each attention module's heads kept: of its KV groups with "
        "groups: kv, of the query heads in every group with groups: query (rounded half up; "
        "a keep that rounds to none, or to all while below 1, is refused).",
    )
    criterion: Literal["magnitude", "activation", "taylor"] = Field(
        default="activation",
        description="Head importance: 'magnitude' (‖W_o[:, h]‖ · ‖(W_q[h], W_k[g], W_v[g])‖, "
        "data-free), 'activation' (Σ over the head's channels c of E[x_c²]·‖W_o[:, c]‖², the "
        "energy head h adds to the attention output on calibration data; x is o_proj's input) "
        "or 'taylor' (Σ|w·∂L/∂w| over the head's weights, LLM-Pruner). A KV group scores the "
        "sum of its query heads.",
    )
    groups: Literal["kv", "query"] = Field(
        default="kv",
        description="With grouped-query attention: 'kv' removes whole KV groups (one KV head "
        "and its query heads; the group size stays), 'query' removes query heads, the same "
        "number in every group, and keeps every KV head (the KV cache stays as large). "
        "Without GQA (one query head per KV head) only 'kv' removes anything.",
    )
    refit: bool | None = Field(
        default=None,
        description="Refit o_proj by least squares on the kept heads' calibration "
        "activations (FLAP-style compensation). Default: on when calibration data is given.",
    )
    refit_damping: float = Field(
        default=1e-3,
        ge=0.0,
        strict=True,
        allow_inf_nan=False,
        description="Ridge term of the refit, relative to the mean diagonal of the kept "
        "heads' Gram matrix.",
    )
