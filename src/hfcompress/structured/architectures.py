"""Which Linears of each architecture are coupled: pruned together or not at all.

An MLP's intermediate channel j is row j of every *producer* (gate and up projections, GPT-2's
``c_fc``) and column j of the *consumer* (the down projection); removing it removes those rows
and that column, and the block computes exactly what it did minus channel j's contribution.
Layouts are matched by the names of the module's children, so every architecture that uses
the same names (Llama, Qwen2, Mistral, Gemma, Phi-3's fused ``gate_up_proj``, GPT-2, BERT, OPT,
T5's encoder and decoder) is covered without naming its classes; anything else is refused with
an error naming the module's class and the layouts known.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hfcompress.errors import InvalidParameterError
from hfcompress.structured.edit import dense_weight, is_dense


@dataclass(frozen=True)
class MlpLayout:
    """Children names of one MLP layout.

    Attributes:
        producers: modules whose output features are the intermediate channels.
        consumer: the module reading the channels as its input features.
        fused: the single producer stacks two halves [gate; up] (Phi-3 ``gate_up_proj``):
            channel j is rows j and width + j.
        example: architectures that use it, for messages.
    """

    producers: tuple[str, ...]
    consumer: str
    fused: bool = False
    example: str = ""

    def describe(self) -> str:
        return f"{'+'.join(self.producers)} → {self.consumer} ({self.example})"


MLP_LAYOUTS: tuple[MlpLayout, ...] = (
    MlpLayout(("gate_proj", "up_proj"), "down_proj", example="Llama, Qwen2, Mistral, Gemma"),
    MlpLayout(("gate_up_proj",), "down_proj", fused=True, example="Phi-3"),
    MlpLayout(("c_fc",), "c_proj", example="GPT-2 MLP"),
    MlpLayout(("intermediate.dense",), "output.dense", example="BERT layer"),
    MlpLayout(("fc1",), "fc2", example="OPT decoder layer"),
    MlpLayout(("wi_0", "wi_1"), "wo", example="T5 gated DenseReluDense"),
    MlpLayout(("wi",), "wo", example="T5 DenseReluDense"),
)

# Config fields that hold the (uniform) MLP width, in the order they are tried.
WIDTH_CONFIG_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff")


@dataclass(frozen=True)
class MlpParts:
    """The coupled modules of one MLP, found in the model."""

    name: str  # the MLP (or block) module's qualified name
    layout: MlpLayout
    width: int  # intermediate channels

    def producer_names(self) -> list[str]:
        return [f"{self.name}.{p}" for p in self.layout.producers]

    @property
    def consumer_name(self) -> str:
        return f"{self.name}.{self.layout.consumer}"


def _child(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _match(module: nn.Module, layout: MlpLayout) -> bool:
    children = [_child(module, p) for p in (*layout.producers, layout.consumer)]
    return all(c is not None and isinstance(c, nn.Linear | _conv1d()) for c in children)


def _conv1d() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def mlp_parts(model: nn.Module, name: str) -> MlpParts:
    """The coupled Linears of the MLP module ``name``.

    Raises:
        InvalidParameterError: no known layout fits (naming the class and the layouts), a
            part is already compressed, or the parts' shapes disagree.
    """
    module = model.get_submodule(name)
    layout = next((lay for lay in MLP_LAYOUTS if _match(module, lay)), None)
    if layout is None:
        known = "; ".join(lay.describe() for lay in MLP_LAYOUTS)
        raise InvalidParameterError(
            f"targets: {name!r} is a {type(module).__name__}, whose children match no MLP layout "
            f"hfcompress knows ({known}); target the module that holds them"
        )
    parts = [module.get_submodule(p) for p in (*layout.producers, layout.consumer)]
    compressed = [type(p).__name__ for p in parts if not is_dense(p)]
    if compressed:
        raise InvalidParameterError(
            f"targets: {name!r} holds {compressed}: structured methods act on dense "
            "Linear/Conv1D modules, so put them before any prune/lowrank/kronecker stage"
        )
    rows = [dense_weight(p).shape[0] for p in parts[:-1]]
    width = rows[0] // 2 if layout.fused else rows[0]
    consumer_in = dense_weight(parts[-1]).shape[1]
    if any(r != rows[0] for r in rows) or consumer_in != width or (layout.fused and rows[0] % 2):
        raise InvalidParameterError(
            f"targets: {name!r}: producers {layout.producers} have {rows} output features and "
            f"{layout.consumer} {consumer_in} inputs; they must agree"
        )
    return MlpParts(name, layout, width)


def find_mlps(model: nn.Module) -> list[str]:
    """Every module of ``model`` that matches an MLP layout, outermost first, in order."""
    found: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f + ".") for f in found):
            continue
        if any(_match(module, layout) for layout in MLP_LAYOUTS):
            found.append(name)
    return found


# --- attention -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionParts:
    """The projections of one attention module with separate q/k/v (Llama family).

    Attributes:
        q, k, v, o: the children's names.
        num_heads, num_kv_heads, head_dim: as the module computes with them.
    """

    name: str
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def attention_parts(model: nn.Module, name: str) -> AttentionParts:
    """The projections and head counts of the attention module ``name``.

    Known: modules with ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` children and a
    ``head_dim`` attribute (Llama, Qwen2, Mistral, Gemma, Phi-3 with separate projections).

    Raises:
        InvalidParameterError: any other layout (naming the class), or compressed parts.
    """
    module = model.get_submodule(name)
    children = [_child(module, c) for c in _QKVO]
    head_dim = getattr(module, "head_dim", None)
    if any(c is None for c in children) or not isinstance(head_dim, int):
        raise InvalidParameterError(
            f"targets: {name!r} is a {type(module).__name__}; heads are pruned in attention "
            "modules with q_proj/k_proj/v_proj/o_proj children and a head_dim attribute "
            "(Llama, Qwen2, Mistral, Gemma); fused qkv (GPT-2 c_attn, Phi-3 qkv_proj) is not "
            "supported yet"
        )
    compressed = [type(c).__name__ for c in children if not is_dense(c)]
    if compressed:
        raise InvalidParameterError(
            f"targets: {name!r} holds {compressed}: structured methods act on dense "
            "Linear/Conv1D modules, so put them before any prune/lowrank/kronecker stage"
        )
    q_rows = dense_weight(children[0]).shape[0]
    kv_rows = dense_weight(children[1]).shape[0]
    if q_rows % head_dim or kv_rows % head_dim:
        raise InvalidParameterError(
            f"targets: {name!r}: q/k rows {q_rows}/{kv_rows} are not multiples of head_dim "
            f"{head_dim}"
        )
    num_heads, num_kv = q_rows // head_dim, kv_rows // head_dim
    if num_heads % num_kv:
        raise InvalidParameterError(
            f"targets: {name!r}: {num_heads} query heads do not split into {num_kv} KV groups"
        )
    return AttentionParts(name, *_QKVO, num_heads, num_kv, head_dim)
