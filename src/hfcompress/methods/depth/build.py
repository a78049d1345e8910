"""Depth pruning: score a model's transformer blocks, remove the least important whole.

ShortGPT (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than
You Expect") observes that many blocks of an LLM barely change their input. Its *block
influence* of block i, with x the block's input and y its output at each token t,

    BI_i = 1 − E_t[ cos(x_t, y_t) ],

is small for a block that is nearly the identity; removing the blocks of lowest BI costs
little. The ``loss`` criterion measures instead what removing each block alone costs: the
language-model loss with block i skipped (its output replaced by its input).

Removing blocks keeps the architecture: the layer stack (an ``nn.ModuleList``) holds the kept
blocks in order, the config's block count follows (``num_hidden_layers``, T5's
``num_decoder_layers``, ...), and the attention modules' ``layer_idx`` (their slot in the KV
cache) are renumbered, so the model generates with its cache and saves as a plain checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from hfcompress.errors import InvalidParameterError
from hfcompress.layers.base import CompressedLayer
from hfcompress.matching import fullmatch
from hfcompress.methods.depth.config import DepthStage
from hfcompress.registry import ModelContext, StructuredChange
from hfcompress.structured import Journal
from hfcompress.structured.edit import is_dense
from hfcompress.structured.model import has_lm_head, model_batches
from hfcompress.structured.targets import select_modules

DATA_CRITERIA = frozenset({"block_influence", "loss"})
# Config fields that may count a stack's blocks, tried in this order; the one whose model (built
# on the meta device) has the pruned stack is used. An encoder-decoder counts each stack apart.
DEPTH_CONFIG_KEYS = (
    "num_hidden_layers",
    "num_decoder_layers",
    "num_layers",
    "n_layer",
    "encoder_layers",
    "decoder_layers",
)
# Config lists with one entry per block (Qwen2's, Gemma's sliding/full attention per block).
PER_BLOCK_CONFIG_LISTS = ("layer_types",)
# Config flags that make a block compute something that depends on its index: renumbered, a
# kept block would then compute something else (GPT-2's attention scaled by 1 / (layer_idx + 1)).
INDEX_DEPENDENT_FLAGS = ("scale_attn_by_inverse_layer_idx",)

Batches = list[dict[str, torch.Tensor]]


# --- the stack of blocks ----------------------------------------------------------------------


def _is_block(module: nn.Module) -> bool:
    """A module with weights that is not itself one layer (a Linear, a compressed layer)."""
    if is_dense(module) or isinstance(module, CompressedLayer):
        return False
    return next(module.parameters(), None) is not None


def find_stacks(model: nn.Module) -> list[str]:
    """Names of the model's stacks of blocks: the outermost ``nn.ModuleList`` s of at least two
    modules of one class, each a block (T5's ``encoder.block``, not the list inside a block)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if any(name.startswith(outer + ".") for outer in found):
            continue
        if len({type(b) for b in module}) == 1 and all(_is_block(b) for b in module):
            found.append(name)
    return found


def stack_name(model: nn.Module, stage: DepthStage, context: ModelContext) -> str:
    """The stack the stage prunes: the one ``targets`` names, else the model's only stack.

    Raises:
        InvalidParameterError: none, or more than one; the message starts with the field.
    """
    where = context.where
    stacks = find_stacks(model)
    if stage.targets is None:
        if len(stacks) == 1:
            return stacks[0]
        if not stacks:
            raise InvalidParameterError(
                f"{where}.targets: {type(model).__name__} has no stack of blocks (an "
                "nn.ModuleList of at least two blocks of one class); name one with `targets`"
            )
        raise InvalidParameterError(
            f"{where}.targets: {type(model).__name__} has {len(stacks)} stacks of blocks "
            f"{stacks}; name the one to prune, e.g. targets: {_escaped(stacks[-1])!r}"
        )
    matched = select_modules(model, stage.targets, (context.exclude, stage.exclude), where)
    lists = [n for n in matched if isinstance(model.get_submodule(n), nn.ModuleList)]
    if len(lists) == 1:
        return lists[0]
    if not lists:
        found = (
            f"it matches {matched[:3]}{' ...' if len(matched) > 3 else ''}, no nn.ModuleList"
            if matched
            else "it fully matches no module (or all are excluded)"
        )
        raise InvalidParameterError(
            f"{where}.targets: {stage.targets!r} must name a stack of blocks (an "
            f"nn.ModuleList); {found}; the stacks of {type(model).__name__} are {stacks}"
        )
    raise InvalidParameterError(
        f"{where}.targets: {stage.targets!r} matches {len(lists)} module lists {lists[:4]}; "
        "name one stack"
    )


def _escaped(name: str) -> str:
    return name.replace(".", "\\.")


def _module_names(block: nn.Module) -> frozenset[str]:
    """The block's module names, not counting the factors inside compressed layers."""
    names: list[str] = []
    inside: list[str] = []
    for name, module in block.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        names.append(name)
        if isinstance(module, CompressedLayer):
            inside.append(name)
    return frozenset(names)


def protected_blocks(
    model: nn.Module, stack: str, stage: DepthStage, context: ModelContext
) -> dict[int, str]:
    """Blocks that must stay, each with the reason: excluded by name (``exclude`` fully
    matches ``"<stack>.<i>"``), or holding modules no other block has.

    The second is T5's block 0: it alone holds the relative position bias, which it computes
    and hands to every later block; without it no block would know token positions.
    """
    blocks = model.get_submodule(stack)
    reasons: dict[int, str] = {}
    patterns = [p for p in (context.exclude, stage.exclude) if p is not None]
    names = [_module_names(b) for b in blocks]
    for index in range(len(blocks)):
        block_name = f"{stack}.{index}"
        if any(fullmatch(p, block_name, f"{context.where}.exclude") for p in patterns):
            reasons[index] = "excluded by `exclude`"
            continue
        others = frozenset().union(*(n for i, n in enumerate(names) if i != index))
        own = sorted(names[index] - others)
        if own:
            more = f" (and {len(own) - 1} more)" if len(own) > 1 else ""
            reasons[index] = (
                f"it alone holds {own[0]!r}{more}, which the other blocks rely on or the "
                "config builds there"
            )
    return reasons


# --- the config of the pruned model -----------------------------------------------------------


def _count_keys(config: Any, count: int) -> list[str]:
    """The config fields that hold ``count`` (the stack's block count), in trial order."""
    return [k for k in DEPTH_CONFIG_KEYS if getattr(config, k, None) == count]


def _uncounted(config: Any, stack: str, count: int) -> str:
    return (
        f"no field of {type(config).__name__} counts the {count} blocks of {stack!r} (looked "
        f"for {list(DEPTH_CONFIG_KEYS)}), so a checkpoint could not describe the pruned model"
    )


def _list_edits(config: Any, count: int, kept: list[int]) -> dict[str, Any]:
    """The per-block config lists, cut down to the kept blocks."""
    edits = {}
    for key in PER_BLOCK_CONFIG_LISTS:
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == count:
            edits[key] = [value[i] for i in kept]
    return edits


def _reference(model: nn.Module, edits: dict[str, Any]) -> nn.Module | None:
    """``type(model)(config with edits)`` on the meta device (no memory); None if it fails."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for key, value in edits.items():
        setattr(config, key, value)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return type(model)(config)
    except Exception:  # a model that cannot be rebuilt from its config: nothing to compare
        return None


def _mismatch(model: nn.Module, stack: str, kept: list[int], reference: nn.Module) -> str | None:
    """How the config-built ``reference`` differs from the model pruned to ``kept``, or None.

    Every stack must have the pruned model's length, and each kept block the modules of the
    block the config builds at its new index (a block moved to index 0 of T5 would lack the
    position bias block 0 is built with).
    """
    blocks = model.get_submodule(stack)
    for name in dict.fromkeys([*find_stacks(model), stack]):
        want = len(kept) if name == stack else len(model.get_submodule(name))
        try:
            got = len(reference.get_submodule(name))
        except AttributeError:
            return f"the config's model has no {name!r}"
        if got != want:
            return f"the config's model has {got} blocks in {name!r}, the pruned one {want}"
    theirs = reference.get_submodule(stack)
    for new, old in enumerate(kept):
        ours, built = _module_names(blocks[old]), _module_names(theirs[new])
        if ours != built:
            differ = sorted(ours ^ built)
            return (
                f"block {old} would become block {new}, but the config builds block {new} "
                f"differently ({differ[:2]} differ)"
            )
    return None


def config_edits(model: nn.Module, stack: str, kept: list[int]) -> dict[str, Any]:
    """The config fields to set so that the config describes the model pruned to ``kept``
    (a model without a config: none).

    The field is found by trial: the first of :data:`DEPTH_CONFIG_KEYS` that counts the stack
    now and, set to the kept count, builds a model with the pruned stacks and kept blocks.

    Raises:
        InvalidParameterError: no field does (the message says why, without the field).
    """
    config = getattr(model, "config", None)
    if config is None:
        return {}
    count = len(model.get_submodule(stack))
    keys = _count_keys(config, count)
    if not keys:
        raise InvalidParameterError(_uncounted(config, stack, count))
    problem = ""
    for key in keys:
        edits = {key: len(kept), **_list_edits(config, count, kept)}
        reference = _reference(model, edits)
        if reference is None:
            return edits  # the model cannot be rebuilt from its config: trust the count
        found = _mismatch(model, stack, kept, reference)
        if found is None:
            return edits
        problem = problem or found
    raise InvalidParameterError(
        f"dropping blocks {sorted(set(range(count)) - set(kept))} of {stack!r} leaves a model "
        f"its config cannot describe: {problem}"
    )


# --- what is wrong with a stage ---------------------------------------------------------------


def _stack_problems(
    model: nn.Module, stage: DepthStage, context: ModelContext, stack: str
) -> list[str]:
    """The problems of dropping ``stage``'s blocks from ``stack``, each naming the field."""
    where = context.where
    count = len(model.get_submodule(stack))
    config = getattr(model, "config", None)
    if config is not None and not _count_keys(config, count):
        return [f"{where}.targets: {_uncounted(config, stack, count)}"]
    field = "drop" if stage.drop is not None else "layers"
    flag = _index_dependence(config, stage, count)
    if flag is not None:
        return [
            f"{where}.{field}: {type(config).__name__}.{flag} is set, so a block's output "
            "depends on its index and a renumbered block would compute something else; "
            "drop only the last blocks (`layers`), which renumbers none"
        ]
    protected = protected_blocks(model, stack, stage, context)
    if stage.drop is not None:
        return _drop_problems(where, stage.drop, stack, count, protected)
    return _layers_problems(model, where, stage.layers or [], stack, protected)


def _index_dependence(config: Any, stage: DepthStage, count: int) -> str | None:
    """The config flag making blocks depend on their index, if some kept block would move."""
    flags = [f for f in INDEX_DEPENDENT_FLAGS if getattr(config, f, False) is True]
    layers = stage.layers or []
    # dropping the last k blocks moves none; a criterion may choose any
    moves = stage.drop is not None or any(i < count - len(layers) for i in layers)
    return flags[0] if flags and moves else None


def _drop_problems(
    where: str, drop: int, stack: str, count: int, protected: dict[int, str]
) -> list[str]:
    if drop >= count:
        return [
            f"{where}.drop: {drop} drops every block of {stack!r}, which has {count}; the "
            f"model must keep at least one (drop ≤ {count - 1})"
        ]
    free = count - len(protected)
    if drop > free:
        kept = "; ".join(f"block {i}: {why}" for i, why in sorted(protected.items()))
        return [
            f"{where}.drop: {drop} blocks, but only {free} of the {count} blocks of {stack!r} "
            f"may go ({kept})"
        ]
    return []


def _layers_problems(
    model: nn.Module, where: str, layers: list[int], stack: str, protected: dict[int, str]
) -> list[str]:
    count = len(model.get_submodule(stack))
    outside = [i for i in layers if not 0 <= i < count]
    if outside:
        return [
            f"{where}.layers: {outside} out of range; {stack!r} has {count} blocks (0..{count - 1})"
        ]
    if len(layers) >= count:
        return [
            f"{where}.layers: drops every block of {stack!r} ({count}); the model must keep "
            "at least one"
        ]
    refused = [f"block {i}: {protected[i]}" for i in sorted(layers) if i in protected]
    if refused:
        return [f"{where}.layers: cannot drop {'; '.join(refused)}"]
    try:
        config_edits(model, stack, [i for i in range(count) if i not in layers])
    except InvalidParameterError as error:
        return [f"{where}.layers: {error}"]
    return []


def check_depth(model: nn.Module, stage: DepthStage, context: ModelContext) -> list[str]:
    """Every problem of the stage on ``model``, each naming the field; changes nothing."""
    where = context.where
    criterion = stage.criterion_name
    errors = []
    if criterion in DATA_CRITERIA and context.batches is None:
        default = "" if stage.criterion else " (the default with `drop`)"
        errors.append(
            f"{where}.criterion: {criterion!r}{default} needs calibration data; pass "
            "compress_model(model, recipe, calibration=...) or name the blocks with `layers`"
        )
    if criterion == "loss" and not has_lm_head(model):
        errors.append(
            f"{where}.criterion: 'loss' needs the loss of a language model (labels = "
            f"input_ids); {type(model).__name__} has no language-model head; use "
            "'block_influence'"
        )
    try:
        stack = stack_name(model, stage, context)
    except InvalidParameterError as error:
        return [*errors, str(error)]
    return errors + _stack_problems(model, stage, context, stack)


# --- importance -------------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    """A block's input hidden states [b, seq, d] (positional, or ``hidden_states=``)."""
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output: Any) -> torch.Tensor:
    """A block's output hidden states [b, seq, d] (a tensor, or the first of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def cosine_distance(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """1 − cos(x_t, y_t) per token, [b, seq], in float32."""
    return 1.0 - F.cosine_similarity(inputs.float(), outputs.float(), dim=-1, eps=1e-8)


def _token_weights(batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """1 for every real token of ``hidden`` [b, seq, d], 0 for padding, [b, seq]."""
    mask = batch.get("attention_mask")
    if mask is not None and tuple(mask.shape) == tuple(hidden.shape[:2]):
        return mask.to(device=hidden.device, dtype=torch.float32)
    return torch.ones(hidden.shape[:2], device=hidden.device)


class _StopForward(Exception):  # noqa: N818 (control flow, not an error)
    """Raised after the stack's last block: the rest of the model need not run."""


def _progress(items: list, show: bool, desc: str, unit: str) -> Iterator:
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=desc, unit=unit, disable=not show or len(items) < 2))


class _Scoring:
    """The model in eval mode while scoring; its training flag and hooks restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.handles: list[Any] = []

    def __enter__(self) -> _Scoring:
        self.was_training = self.model.training
        self.model.eval()
        return self

    def hook(self, module: nn.Module, function: Callable[..., Any]) -> None:
        self.handles.append(module.register_forward_hook(function, with_kwargs=True))

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.model.train(self.was_training)


def block_influence_scores(
    model: nn.Module, stack: str, candidates: list[int], batches: Batches, progress: bool
) -> torch.Tensor:
    """ShortGPT's BI_i = mean over calibration tokens of 1 − cos(block input, block output),
    [n_blocks]: one pass measures every block.

    Raises:
        InvalidParameterError: a block of ``candidates`` never ran.
    """
    blocks = model.get_submodule(stack)
    total = torch.zeros(len(blocks), dtype=torch.float64)
    tokens = torch.zeros(len(blocks), dtype=torch.float64)
    current: dict[str, torch.Tensor] = {}

    def measure(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            inputs, outputs = _hidden_in(args, kwargs), _hidden_out(output)
            weights = _token_weights(current, inputs)
            total[index] += float((cosine_distance(inputs, outputs) * weights).sum())
            tokens[index] += float(weights.sum())
            if index == len(blocks) - 1:
                raise _StopForward

        return hook

    device = _device(model)
    with torch.no_grad(), _Scoring(model) as scoring:
        for index, block in enumerate(blocks):
            scoring.hook(block, measure(index))
        for batch in _progress(
            model_batches(model, batches), progress, "hfcompress: depth (block influence)", "batch"
        ):
            current.clear()
            current.update({k: v.to(device) for k, v in batch.items()})
            with contextlib.suppress(_StopForward):
                model(**current, use_cache=False)
    silent = [i for i in candidates if tokens[i] == 0]
    if silent:
        raise InvalidParameterError(
            f"criterion: blocks {silent} of {stack!r} never ran on the calibration data, so "
            "their influence is unknown"
        )
    return (total / tokens.clamp_min(1)).float()


def _skip(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """A forward hook making a block the identity: its input as its output, same structure."""
    inputs = _hidden_in(args, kwargs)
    return (inputs, *output[1:]) if isinstance(output, tuple) else inputs


def _lm_loss(model: nn.Module, batches: Batches, device: torch.device) -> float:
    """The language-model loss (labels = input_ids, padding ignored) over the batches, mean
    per token. An encoder-decoder reads the tokens and predicts them (shifted right)."""
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        output = model(**batch, labels=labels, use_cache=False)
        if getattr(output, "loss", None) is None:
            raise InvalidParameterError(
                f"criterion: 'loss' needs forward(labels=input_ids) to return a loss; "
                f"{type(model).__name__} returned none"
            )
        tokens = int((labels != -100).sum())
        total += float(output.loss) * tokens
        count += tokens
    return total / max(count, 1)


def loss_scores(
    model: nn.Module, stack: str, candidates: list[int], batches: Batches, progress: bool
) -> torch.Tensor:
    """How much the language-model loss rises with block i skipped, [n_blocks] (NaN for the
    blocks not in ``candidates``, which are not measured): one pass per candidate, one more
    for the full model."""
    blocks = model.get_submodule(stack)
    scores = torch.full((len(blocks),), float("nan"))
    device = _device(model)
    with torch.no_grad(), _Scoring(model):
        base = _lm_loss(model, batches, device)
        for index in _progress(candidates, progress, "hfcompress: depth (loss)", "block"):
            handle = blocks[index].register_forward_hook(_skip, with_kwargs=True)
            try:
                scores[index] = _lm_loss(model, batches, device) - base
            finally:
                handle.remove()
    return scores


SCORERS = {"block_influence": block_influence_scores, "loss": loss_scores}


def given_blocks(stage: DepthStage) -> list[int]:
    """The blocks ``layers`` names, in order (the data-free criterion)."""
    return sorted(stage.layers or [])


def choose(scores: torch.Tensor, drop: int, protected: dict[int, str]) -> list[int]:
    """The ``drop`` unprotected blocks of lowest score, in index order (ties broken by index,
    so runs are repeatable)."""
    values = scores.double().tolist()
    candidates = [i for i, v in enumerate(values) if i not in protected and not math.isnan(v)]
    return sorted(sorted(candidates, key=lambda i: (values[i], i))[:drop])


# --- applying ---------------------------------------------------------------------------------


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def renumber(block: nn.Module, index: int, journal: Journal) -> None:
    """Give every ``layer_idx`` inside ``block`` (the attention's slot in the KV cache) the
    block's new index."""
    for module in block.modules():
        value = getattr(module, "layer_idx", None)
        if isinstance(value, int) and not isinstance(value, bool) and value != index:
            journal.setattr(module, "layer_idx", index)


def drop_blocks(
    model: nn.Module, stack: str, kept: list[int], edits: dict[str, Any], journal: Journal
) -> None:
    """Keep blocks ``kept`` of ``stack`` (through ``journal``): a new ``nn.ModuleList`` of
    them, the config ``edits``, the kept blocks renumbered."""
    blocks = model.get_submodule(stack)
    parent_name, _, child = stack.rpartition(".")
    parent = model.get_submodule(parent_name)
    journal.setattr(parent, child, nn.ModuleList([blocks[i] for i in kept]))
    for key, value in edits.items():
        journal.setattr(model.config, key, value)
    for new, old in enumerate(kept):
        renumber(blocks[old], new, journal)


def transform_depth(
    model: nn.Module, stage: DepthStage, context: ModelContext
) -> list[StructuredChange]:
    """Apply the stage: score the blocks (unless ``layers`` names them), drop the weakest."""
    stack = stack_name(model, stage, context)
    problems = _stack_problems(model, stage, context, stack)
    if problems:  # the model changed since the check (an earlier depth stage)
        raise InvalidParameterError("; ".join(problems))
    blocks = model.get_submodule(stack)
    count = len(blocks)
    criterion = stage.criterion_name
    scores = None
    if criterion == "given":
        dropped = given_blocks(stage)
    else:
        protected = protected_blocks(model, stack, stage, context)
        candidates = [i for i in range(count) if i not in protected]
        scores = SCORERS[criterion](model, stack, candidates, context.batches, context.progress)
        dropped = choose(scores, stage.drop, protected)
    kept = [i for i in range(count) if i not in dropped]
    try:
        edits = config_edits(model, stack, kept)
    except InvalidParameterError as error:
        raise InvalidParameterError(f"{context.where}.criterion: {error}") from None
    before = {i: _params(blocks[i]) for i in dropped}
    drop_blocks(model, stack, kept, edits, context.journal)
    return [
        StructuredChange(
            name=f"{stack}.{i}",
            method="depth",
            shape_before=(count,),
            shape_after=(len(kept),),
            params_before=before[i],
            params_after=0,
            settings={
                "criterion": criterion,
                "score": None if scores is None else float(f"{float(scores[i]):.6g}"),
            },
        )
        for i in dropped
    ]
