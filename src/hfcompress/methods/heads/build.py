"""Head pruning of attention: score heads, keep the best, refit the output projection.

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation") scores each attention head by its activations on calibration data and removes
the weakest, leaving an ordinary attention module with fewer heads. With d = head_dim, query
head h is rows [h·d, (h+1)·d) of ``q_proj`` and the same input columns of ``o_proj``; KV head g
is those rows of ``k_proj`` and ``v_proj``. Under grouped-query attention (GQA) KV head g serves
query heads [g·s, (g+1)·s), s = num_heads / num_kv_heads, so a head can only go in one of two
ways that leave a valid GQA module:

* ``groups: kv``: whole groups (KV head g, its rows of k/v, and its s query heads); s stays.
* ``groups: query``: the same number m of query heads in every group; every KV head stays and
  the group size becomes m (``num_key_value_groups``).

FLAP (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning for Large Language
Models") then compensates in the consumer: o_proj is refit by least squares on the kept heads'
calibration activations (``hfcompress.structured.refit.refit_consumer``, shared with ``width``).

Only ``num_key_value_groups`` (and, where a module has them, ``num_heads`` /
``num_key_value_heads``) is read by the attention's forward, which reshapes q/k/v with
``view(..., -1, head_dim)``; the config's head counts are updated only when every attention
module of the model ends equal, with ``head_dim`` written explicitly (its default,
hidden_size // num_attention_heads, would change with the head count).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hfcompress.errors import HfCompressError, InvalidParameterError
from hfcompress.methods.heads.config import HeadsStage
from hfcompress.registry import ModelContext, StructuredChange
from hfcompress.runner import capture_inputs, collect_stats, next_inputs
from hfcompress.stats import InputStats
from hfcompress.structured import (
    AttentionParts,
    Journal,
    attention_parts,
    dense_weight,
    select_outputs,
)
from hfcompress.structured.model import has_lm_head, model_batches, outer_stack, stacks
from hfcompress.structured.refit import loss_gradients, shrink_consumer
from hfcompress.structured.targets import grouped_errors, no_match_message, select_modules

DATA_CRITERIA = frozenset({"activation", "taylor"})
# Module attributes holding head counts, as the attention classes name them (transformers 5
# Llama/Qwen2 keep only num_key_value_groups; older and other classes keep the counts too).
QUERY_COUNT_ATTRS = ("num_heads",)
KV_COUNT_ATTRS = ("num_key_value_heads",)


# --- what the stage acts on -------------------------------------------------------------------


def _targets(model: nn.Module, stage: HeadsStage, context: ModelContext) -> list[str]:
    return select_modules(model, stage.targets, (context.exclude, stage.exclude), context.where)


def find_attention(model: nn.Module) -> list[str]:
    """Every module with q/k/v/o projections and a ``head_dim`` (what ``heads`` can act on)."""
    found = []
    for name, module in model.named_modules():
        children = ("q_proj", "k_proj", "v_proj", "o_proj")
        if all(hasattr(module, c) for c in children) and isinstance(
            getattr(module, "head_dim", None), int
        ):
            found.append(name)
    return found


def _use_refit(settings: HeadsStage, context: ModelContext) -> bool:
    return settings.refit if settings.refit is not None else context.batches is not None


def _units(settings: HeadsStage, parts: AttentionParts) -> tuple[int, str]:
    """How many of what ``keep`` is a fraction of: KV groups, or query heads per group."""
    if settings.groups == "kv":
        return parts.num_kv_heads, "KV groups"
    return parts.group_size, "query heads per KV group"


def kept_count(settings: HeadsStage, parts: AttentionParts) -> int:
    """KV groups (``groups: kv``) or query heads per group (``groups: query``) kept:
    ``keep`` × their number, rounded half up (0.5 → 1, so small keeps are not all lost)."""
    units, _ = _units(settings, parts)
    return min(units, math.floor(settings.keep * units + 0.5))


def _check_module(model: nn.Module, name: str, settings: HeadsStage) -> AttentionParts:
    """The attention's parts, or an error naming the field whose setting does not fit it."""
    parts = attention_parts(model, name)
    units, what = _units(settings, parts)
    if settings.groups == "query" and parts.group_size == 1 and settings.keep < 1:
        raise InvalidParameterError(
            f"groups: 'query' removes query heads within KV groups, but {name!r} has one query "
            f"head per KV head ({parts.num_heads} heads, no GQA); use groups: 'kv'"
        )
    count = kept_count(settings, parts)
    if count == 0:
        raise InvalidParameterError(
            f"keep: {settings.keep} keeps none of the {units} {what} of {name!r} "
            f"({settings.keep} × {units} rounds to 0); keep ≥ "
            f"{math.ceil(500 / units) / 1000:g} keeps one"
        )
    if count == units and settings.keep < 1:
        raise InvalidParameterError(
            f"keep: {settings.keep} removes none of the {units} {what} of {name!r} "
            f"({settings.keep} × {units} rounds to {units}); heads go one "
            f"{'group' if settings.groups == 'kv' else 'per group'} at a time, so keep ≤ "
            f"{math.ceil(1000 * (units - 0.5) / units - 1) / 1000:g} removes one"
        )
    return parts


def check_heads(model: nn.Module, stage: HeadsStage, context: ModelContext) -> list[str]:
    """Every problem of the stage on ``model``, each naming the field; changes nothing."""
    where = context.where
    calibrated = context.batches is not None
    names = _targets(model, stage, context)
    if not names:
        return [no_match_message(where, stage.targets, find_attention(model), "attention modules")]
    errors: list[str] = []
    settings = {n: stage.settings_for(n) for n in names}
    criteria = {s.criterion for s in settings.values()}
    needy = sorted(criteria & DATA_CRITERIA)
    if needy and not calibrated:
        errors.append(
            f"{where}.criterion: {needy[0]!r} needs calibration data; pass "
            "compress_model(model, recipe, calibration=...) or use 'magnitude'"
        )
    if not calibrated and any(s.refit for s in settings.values()):
        errors.append(
            f"{where}.refit: the least-squares refit needs calibration data; pass "
            "calibration=... or set refit: false"
        )
    if "taylor" in criteria and not has_lm_head(model):
        errors.append(
            f"{where}.criterion: 'taylor' needs the loss gradients of a language model "
            f"(labels = input_ids); {type(model).__name__} has no language-model head; use "
            "'activation' or 'magnitude'"
        )
    parts, problems = grouped_errors(where, names, lambda n: _check_module(model, n, settings[n]))
    errors += problems
    if calibrated and parts:
        try:
            stacks(model, list(parts))
        except InvalidParameterError as error:
            errors.append(f"{where}.targets: {error}")
    return errors


# --- importance: one score per query head, [num_heads] ---------------------------------------


def _weights(model: nn.Module, parts: AttentionParts) -> dict[str, torch.Tensor]:
    """The logical weights [out, in] of q/k/v/o in float32, detached."""
    attention = model.get_submodule(parts.name)
    return {
        key: dense_weight(getattr(attention, child)).detach().float()
        for key, child in (("q", parts.q), ("k", parts.k), ("v", parts.v), ("o", parts.o))
    }


def _per_head_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Σ of squares of each head's rows of a [heads·d, in] producer, [heads]."""
    return weight.reshape(heads, -1).square().sum(1)


def _per_head_columns(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """‖W[:, c]‖² of o_proj [out, heads·d] per input channel, as [heads, d]."""
    return weight.square().sum(0).reshape(heads, -1)


def _spread(per_group: torch.Tensor, parts: AttentionParts) -> torch.Tensor:
    """A per-KV-head value [num_kv] repeated for each query head of its group, [num_heads]."""
    return per_group.repeat_interleave(parts.group_size)


def magnitude_scores(
    model: nn.Module, parts: AttentionParts, stats: InputStats | None
) -> torch.Tensor:
    """‖W_o[:, h]‖ · ‖(W_q[h], W_k[g], W_v[g])‖ per query head h of KV group g, [num_heads]
    (data-free; the Frobenius norms of the head's o_proj columns and q/k/v rows)."""
    w = _weights(model, parts)
    kv = _per_head_rows(w["k"], parts.num_kv_heads) + _per_head_rows(w["v"], parts.num_kv_heads)
    producers = _per_head_rows(w["q"], parts.num_heads) + _spread(kv, parts)
    return _per_head_columns(w["o"], parts.num_heads).sum(1).sqrt() * producers.sqrt()


def activation_scores(
    model: nn.Module, parts: AttentionParts, stats: InputStats | None
) -> torch.Tensor:
    """Σ_{c ∈ head h} E[x_c²] · ‖W_o[:, c]‖² per query head h, [num_heads].

    x [tokens, num_heads·d] is o_proj's input, the heads' attention outputs side by side, so
    this is the energy head h adds to the attention's output (exact for uncorrelated
    channels), Minitron's per-head activation norm weighted by what o_proj makes of it.
    """
    if stats is None or stats.sq_sum is None:
        raise InvalidParameterError("criterion: 'activation' needs calibration statistics")
    o = _weights(model, parts)["o"]
    energy = (stats.sq_sum.to(o.device) / max(stats.count, 1)).reshape(parts.num_heads, -1)
    return (energy * _per_head_columns(o, parts.num_heads)).sum(1)


def taylor_scores(
    model: nn.Module, parts: AttentionParts, grads: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Σ |w · ∂L/∂w| over head h's weights (q rows and bias, o columns), plus its KV head's
    (k/v rows and biases) shared equally by the group's query heads, [num_heads] (LLM-Pruner).
    A KV group's sum then counts its k/v weights once."""
    attention = model.get_submodule(parts.name)
    heads, kv_heads = parts.num_heads, parts.num_kv_heads

    def saliency(child: str, count: int) -> torch.Tensor:
        name = f"{parts.name}.{child}"
        module = getattr(attention, child)
        score = (dense_weight(module).detach().float() * grads[name]).abs().reshape(count, -1)
        score = score.sum(1)
        if module.bias is not None and f"{name}.bias" in grads:
            bias = (module.bias.detach().float() * grads[f"{name}.bias"]).abs()
            score = score + bias.reshape(count, -1).sum(1)
        return score

    o_name = f"{parts.name}.{parts.o}"
    o = dense_weight(getattr(attention, parts.o)).detach().float()
    columns = (o * grads[o_name]).abs().sum(0).reshape(heads, -1).sum(1)
    kv = saliency(parts.k, kv_heads) + saliency(parts.v, kv_heads)
    return saliency(parts.q, heads) + columns + _spread(kv, parts) / parts.group_size


# --- which heads stay -------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadChoice:
    """The heads one attention module keeps, sorted (so group g's query heads stay together).

    Attributes:
        query: kept query heads, [num_heads'] indices into the old heads.
        kv: kept KV heads, [num_kv_heads'] indices into the old KV heads.
    """

    query: torch.Tensor
    kv: torch.Tensor


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores along the last dim, sorted (ties by index)."""
    order = torch.argsort(scores.double().cpu(), dim=-1, descending=True, stable=True)
    return torch.sort(order[..., :count], dim=-1).values


def choose_heads(
    scores: torch.Tensor, parts: AttentionParts, settings: HeadsStage, count: int
) -> HeadChoice:
    """The heads to keep: the ``count`` best KV groups (a group scores the sum of its query
    heads), or the ``count`` best query heads of every group."""
    size = parts.group_size
    by_group = scores.reshape(parts.num_kv_heads, size)
    if settings.groups == "kv":
        kv = _top(by_group.sum(1), count)
        query = (kv[:, None] * size + torch.arange(size)).flatten()
    else:
        kv = torch.arange(parts.num_kv_heads)
        query = (kv[:, None] * size + _top(by_group, count)).flatten()
    return HeadChoice(query=query, kv=kv)


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The rows (or o_proj columns) of ``heads``: h·d … (h+1)·d − 1 for each, in order."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


# --- applying ---------------------------------------------------------------------------------


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _set_counts(attention: nn.Module, heads: int, kv_heads: int, journal: Journal) -> None:
    """The attention's head-count attributes (those it has) for ``heads`` query heads in
    ``kv_heads`` groups: its forward repeats each KV head ``num_key_value_groups`` times."""
    values = {"num_key_value_groups": heads // kv_heads}
    values |= {key: heads for key in QUERY_COUNT_ATTRS}
    values |= {key: kv_heads for key in KV_COUNT_ATTRS}
    for key, value in values.items():
        old = getattr(attention, key, None)
        if isinstance(old, int) and not isinstance(old, bool) and old != value:
            journal.setattr(attention, key, value)


def prune_heads(
    model: nn.Module,
    parts: AttentionParts,
    choice: HeadChoice,
    journal: Journal,
    refit: tuple[InputStats, float] | None = None,
) -> float | None:
    """Keep the heads ``choice`` of the attention ``parts`` (through ``journal``); optionally
    refit o_proj on the kept heads' inputs.

    Args:
        refit: (statistics of o_proj's input with the Gram matrix, ridge damping), or None.

    Returns:
        o_proj's relative output error on the calibration inputs (with a refit), else None.
    """
    attention = model.get_submodule(parts.name)
    q_rows = head_rows(choice.query, parts.head_dim)
    kv_rows = head_rows(choice.kv, parts.head_dim)
    for child, rows in ((parts.q, q_rows), (parts.k, kv_rows), (parts.v, kv_rows)):
        journal.setattr(attention, child, select_outputs(getattr(attention, child), rows))
    new, error = shrink_consumer(getattr(attention, parts.o), q_rows, refit)
    journal.setattr(attention, parts.o, new)
    _set_counts(attention, len(choice.query), len(choice.kv), journal)
    return error


def transform_heads(
    model: nn.Module, stage: HeadsStage, context: ModelContext
) -> list[StructuredChange]:
    """Apply the stage: every targeted attention keeps its best ``keep`` fraction of heads.

    An attention whose ``keep`` is 1 (an override) is left as it is and not reported.
    """
    targeted = {n: stage.settings_for(n) for n in _targets(model, stage, context)}
    settings = {n: s for n, s in targeted.items() if s.keep < 1}
    names = list(settings)
    all_parts = {n: attention_parts(model, n) for n in names}
    before = {n: _params(model.get_submodule(n)) for n in names}
    errors: dict[str, float | None] = {}
    grads = None
    taylor = [all_parts[n] for n, s in settings.items() if s.criterion == "taylor"]
    if taylor:
        modules = [f"{p.name}.{c}" for p in taylor for c in (p.q, p.k, p.v, p.o)]
        grads = loss_gradients(model, modules, context.batches)

    def prune_one(name: str, stats: InputStats | None) -> None:
        parts, chosen = all_parts[name], settings[name]
        if chosen.criterion == "taylor":
            scores = taylor_scores(model, parts, grads)
        elif chosen.criterion == "activation":
            scores = activation_scores(model, parts, stats)
        else:
            scores = magnitude_scores(model, parts, stats)
        choice = choose_heads(scores, parts, chosen, kept_count(chosen, parts))
        refit = _use_refit(chosen, context) and stats is not None
        errors[name] = prune_heads(
            model, parts, choice, context.journal, (stats, chosen.refit_damping) if refit else None
        )

    # o_proj's input statistics: the Gram matrix only where that module is refit
    wanted = {
        n: _use_refit(s, context)
        for n, s in settings.items()
        if s.criterion == "activation" or _use_refit(s, context)
    }
    if context.batches is not None and wanted:
        for prefix, group in stacks(model, names).items():
            _calibrated_pass(model, prefix, group, all_parts, wanted, context, prune_one)
    else:
        for name in names:
            prune_one(name, None)
    _record_uniform_heads(model, context.journal)
    return [
        StructuredChange(
            name=n,
            method="heads",
            shape_before=(all_parts[n].num_heads, all_parts[n].num_kv_heads),
            shape_after=_counts(attention_parts(model, n)),
            params_before=before[n],
            params_after=_params(model.get_submodule(n)),
            settings={
                "criterion": settings[n].criterion,
                "groups": settings[n].groups,
                "refit": errors[n] is not None,
            },
            output_error=errors[n],
        )
        for n in names
    ]


def _counts(parts: AttentionParts) -> tuple[int, int]:
    return parts.num_heads, parts.num_kv_heads


def _calibrated_pass(
    model: nn.Module,
    prefix: str,
    group: list[str],
    all_parts: dict[str, AttentionParts],
    wanted: dict[str, bool],
    context: ModelContext,
    prune_one: Callable[[str, InputStats | None], None],
) -> None:
    """Block by block: statistics of each attention's o_proj input on the outputs of the
    already pruned blocks, then prune it (SparseGPT's sequential scheme). Attentions not in
    ``wanted`` (name -> Gram needed) are pruned in their turn without statistics.

    A pruned block is run again for the next block's inputs (two passes per pruned block):
    attention is a small part of a block's cost, and this holds for every block layout. The
    pass stops after the last block that holds a target.
    """
    _, stack = outer_stack(model, group[0])
    by_block: dict[int, list[str]] = {}
    for name in group:
        by_block.setdefault(int(name[len(prefix) + 1 :].split(".")[0]), []).append(name)
    last = max(by_block)
    was_training = model.training
    model.eval()
    try:
        inputs = capture_inputs(model, stack[0], model_batches(model, context.batches))
        for index, block in enumerate(_blocks(stack, last, context)):
            names = by_block.get(index, [])
            if names:
                base = f"{prefix}.{index}."
                relative = {n: _relative(n, base, all_parts[n].o) for n in names if n in wanted}
                recorded = {r: wanted[n] for n, r in relative.items()}
                stats = collect_stats(block, inputs, recorded) if recorded else {}
                for name in names:
                    prune_one(name, stats[relative[name]] if name in relative else None)
            if index < last:
                inputs = next_inputs(block, inputs)
    finally:
        model.train(was_training)


def _relative(name: str, base: str, child: str) -> str:
    """``child`` of attention ``name`` relative to its block ``base`` ("" if it is the block)."""
    inner = "" if name + "." == base else name.removeprefix(base)
    return f"{inner}.{child}" if inner else child


def _blocks(stack: nn.ModuleList, last: int, context: ModelContext) -> Iterator[nn.Module]:
    from tqdm.auto import tqdm

    blocks = list(stack)[: last + 1]
    return iter(tqdm(blocks, desc="hfcompress: heads", unit="block", disable=not context.progress))


def _record_uniform_heads(model: nn.Module, journal: Journal) -> None:
    """Where every attention module of the model now has the same head counts, say so in the
    config (``num_attention_heads``, ``num_key_value_heads``, an explicit ``head_dim``).

    The config then describes the model, and it saves as a plain checkpoint that loads without
    hfcompress. Where counts differ, the config keeps its values and the checkpoint records
    each attention's shapes and ``num_key_value_groups``.
    """
    config = getattr(model, "config", None)
    if config is None or not isinstance(getattr(config, "num_attention_heads", None), int):
        return
    try:
        found = {
            (p.num_heads, p.num_kv_heads, p.head_dim)
            for p in (attention_parts(model, n) for n in find_attention(model))
        }
    except HfCompressError:  # an attention hfcompress cannot read: leave the config as it is
        return
    if len(found) != 1:
        return
    ((heads, kv_heads, head_dim),) = found
    # head_dim first: its default, hidden_size // num_attention_heads, follows the head count
    for key, value in (
        ("head_dim", head_dim),
        ("num_attention_heads", heads),
        ("num_key_value_heads", kv_heads),
    ):
        if getattr(config, key, None) != value:
            journal.setattr(config, key, value)
