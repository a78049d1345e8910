"""The README.md (model card) of a compressed checkpoint: how it was compressed, how to load it.

The card is Hugging Face hub style: YAML front matter (``library_name: hfcompress``, tags), then
what the recipe did (read back from ``config.quantization_config``, so it describes the saved
structure even without the report), the parameter counts, the perplexity when it was measured,
and how to load the checkpoint: ``pip install hfcompress`` and ``import hfcompress`` before
``from_pretrained``, with the error transformers prints when that import is missing.

Example:
    >>> report = hfcompress.compress_model(model, recipe)
    >>> model.save_pretrained("out")
    >>> write_model_card(model, "out", report)
"""

from __future__ import annotations

import json
import os
import types
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from hfcompress._version import __version__
from hfcompress.layers import CompressedLayer
from hfcompress.serialization import register_load_hook
from hfcompress.surgery import QUANT_METHOD, register_record_hook

if TYPE_CHECKING:
    from hfcompress.report import CompressionReport

# What transformers (5.x) prints when a checkpoint is loaded without ``import hfcompress``: it
# skips the unknown quantization method, then refuses the compressed tensors' shapes. Measured
# by tests/cli/test_model_card.py, which loads a checkpoint in a fresh interpreter.
LOAD_WARNING = "Unknown quantization type, got hfcompress"
LOAD_ERROR = (
    "RuntimeError: You set `ignore_mismatched_sizes` to `False`, thus raising an error. "
    "For details look at the above report!"
)

# spec fields that describe the module rather than the compression
_SHAPE_FIELDS = frozenset({"method", "in_features", "out_features", "bias", "source", "factors"})


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(stored, non-zero-able) parameters of ``model``, shared ones counted once.

    A compressed layer counts what its ``nonzero_param_count`` says (a pruned weight's kept
    entries); one holding compressed layers (low-rank factors that are pruned) counts them.
    """
    seen: set[int] = set()
    total = nonzero = 0

    def visit(module: nn.Module) -> None:
        nonlocal total, nonzero
        inner = [m for m in module.modules() if m is not module and isinstance(m, CompressedLayer)]
        if isinstance(module, CompressedLayer) and not inner:
            new = [p for p in module.parameters() if id(p) not in seen]
            seen.update(id(p) for p in new)
            total += sum(p.numel() for p in new)
            nonzero += module.nonzero_param_count()
            return
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
                nonzero += p.numel()
        for child in module.children():
            visit(child)

    visit(model)
    return total, nonzero


def _specs(model: nn.Module) -> dict[str, Mapping[str, Any]]:
    config = getattr(model, "config", None)
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return {}
    if not isinstance(quantization, Mapping):
        quantization = quantization.to_dict()
    if quantization.get("quant_method") != QUANT_METHOD:
        return {}
    return dict(sorted((quantization.get("modules") or {}).items()))  # in any source's order


def _describe(spec: Mapping[str, Any]) -> tuple[str, str]:
    """(methods, settings) of one module spec, e.g. ("lowrank + prune (factors)", "rank=8, ...")."""
    settings = [f"{k}={_value(v)}" for k, v in sorted(spec.items()) if k not in _SHAPE_FIELDS]
    method = str(spec.get("method"))
    factors = spec.get("factors") or {}
    inner = {str(f.get("method")) for f in factors.values() if f.get("method") != "dense"}
    for name, factor in sorted(factors.items()):
        settings += [
            f"{name}.{k}={_value(v)}" for k, v in sorted(factor.items()) if k not in _SHAPE_FIELDS
        ]
    if inner:
        method += " + " + "/".join(sorted(inner)) + " (factors)"
    return method, ", ".join(settings)


def _value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)


def _tags(specs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    methods: set[str] = set()
    for spec in specs.values():
        methods.add(str(spec.get("method")))
        methods.update(str(f.get("method")) for f in (spec.get("factors") or {}).values())
    methods.discard("dense")
    return ["hfcompress", "compressed", *sorted(methods)]


def _front_matter(tags: list[str], base_model: str | None) -> list[str]:
    lines = ["---", "library_name: hfcompress", "tags:", *(f"- {tag}" for tag in tags)]
    if base_model:
        lines.append(f"base_model: {base_model}")
    return [*lines, "---", ""]


def _recipe_section(specs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    if not specs:
        return [
            "No compressed modules are recorded in `config.json` (`quantization_config`): the "
            "model is dense.",
            "",
        ]
    methods = Counter(_describe(spec)[0] for spec in specs.values())
    groups: dict[tuple[str, str], list[str]] = {}
    for name, spec in specs.items():
        groups.setdefault(_describe(spec), []).append(name)
    lines = [
        f"{len(specs)} modules were replaced by compressed layers, as recorded in `config.json` "
        "(`quantization_config.modules`):",
        "",
        "| method | modules |",
        "|---|---:|",
        *(f"| {method} | {count} |" for method, count in methods.most_common()),
        "",
        "| method | settings | modules | e.g. |",
        "|---|---|---:|---|",
    ]
    for (method, settings), names in groups.items():
        lines.append(f"| {method} | {settings or '-'} | {len(names)} | `{names[0]}` |")
    return [*lines, ""]


def _counts_section(model: nn.Module, report: CompressionReport | None) -> list[str]:
    total, nonzero = parameter_counts(model)
    lines = [
        "| parameters | count |",
        "|---|---:|",
        f"| stored | {total:,} |",
        f"| non-zero (pruned entries excluded) | {nonzero:,} |",
    ]
    if report is not None and report.model_params_before:
        ratio = report.model_params_before / max(report.model_params_after, 1)
        lines += [
            f"| before compression | {report.model_params_before:,} |",
            f"| after compression (non-zero) | {report.model_params_after:,} ({ratio:.2f}x) |",
        ]
    if report is not None and report.modules:
        errors = [m.rel_error for m in report.modules if m.rel_error is not None]
        lines += [
            "",
            f"The {len(report.modules)} compressed modules went from {report.params_before:,} "
            f"to {report.params_after:,} parameters"
            + (
                f"; relative weight error ‖W − Ŵ‖/‖W‖ mean {sum(errors) / len(errors):.4f}, "
                f"max {max(errors):.4f}."
                if errors
                else "."
            ),
        ]
    return [*lines, ""]


def _perplexity_section(perplexity: Mapping[str, float] | float | None) -> list[str]:
    if perplexity is None:
        return [
            "Perplexity was not measured when this card was written; measure it with "
            "`hfcompress eval PATH --perplexity --text FILE` (and the dense model with the same "
            "command, for comparison).",
            "",
        ]
    if not isinstance(perplexity, Mapping):
        perplexity = {"perplexity": float(perplexity)}
    return [
        "| evaluation | perplexity |",
        "|---|---:|",
        *(f"| {name} | {value:.3f} |" for name, value in perplexity.items()),
        "",
    ]


def _loading_section(model: nn.Module, repo: str) -> list[str]:
    loader = type(model).__name__
    return [
        "```bash",
        "pip install hfcompress",
        "```",
        "",
        "```python",
        "import hfcompress  # registers the 'hfcompress' quantization method with transformers",
        f"from transformers import AutoTokenizer, {loader}",
        "",
        f'model = {loader}.from_pretrained("{repo}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        "hfcompress.freeze(model)  # optional, for inference: pruned layers drop their masks",
        "```",
        "",
        "`import hfcompress` must come before `from_pretrained`. Without it transformers does "
        "not know the checkpoint's compressed layers: it warns",
        "",
        "```",
        f"{LOAD_WARNING} - supported types are: [...]. Hence, we will skip the quantization.",
        "```",
        "",
        "prints a load report listing the compressed tensors as `UNEXPECTED` and the original "
        "weights as `MISMATCH`, and stops with",
        "",
        "```",
        LOAD_ERROR,
        "```",
        "",
        "(it never returns a model with random weights). To get a checkpoint that loads "
        "without hfcompress, load this one with hfcompress and save "
        "`hfcompress.decompress(model)`: dense layers again, with the compressed weights.",
        "",
    ]


def model_card_text(
    model: nn.Module,
    report: CompressionReport | None = None,
    *,
    base_model: str | None = None,
    perplexity: Mapping[str, float] | float | None = None,
    repo: str = "path/to/this/folder",
) -> str:
    """The README.md of a compressed model.

    Args:
        model: the compressed model (its ``config.quantization_config`` says what was done).
        report: ``compress_model``'s report, for the counts before compression and the errors.
        base_model: the hub id of the model it was compressed from (front matter and text).
        perplexity: measured perplexities, ``{"held-out text": 21.3}`` or one number.
        repo: the folder or hub id the loading example names.

    Returns:
        Markdown with YAML front matter.
    """
    specs = _specs(model)
    name = type(model).__name__
    origin = f" from [`{base_model}`](https://huggingface.co/{base_model})" if base_model else ""
    lines = [
        *_front_matter(_tags(specs), base_model),
        f"# {name}, compressed with hfcompress",
        "",
        f"This `{name}` was compressed{origin} by module surgery with "
        f"[hfcompress](https://pypi.org/project/hfcompress/) {__version__}: its Linear layers "
        "were replaced by pruned, low-rank or Kronecker-factored layers that load through "
        "`from_pretrained`.",
        "",
        "## How it was compressed",
        "",
        *_recipe_section(specs),
        "## Parameters",
        "",
        *_counts_section(model, report),
        "## Quality",
        "",
        *_perplexity_section(perplexity),
        "## How to load it",
        "",
        *_loading_section(model, repo),
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(
    model: nn.Module,
    folder: str | os.PathLike[str],
    report: CompressionReport | None = None,
    **options: Any,
) -> Path:
    """Write :func:`model_card_text` to ``folder/README.md`` (replacing one there); returns it.

    ``options`` are :func:`model_card_text`'s keyword arguments.
    """
    path = Path(folder) / "README.md"
    path.write_text(model_card_text(model, report, **options), encoding="utf-8")
    return path


# --- save_pretrained writes the card ---------------------------------------------------------

CARD_MARK = "library_name: hfcompress"  # in the front matter of every card written here


def _is_ours_to_write(path: Path) -> bool:
    """Whether README.md may be (re)written: absent, or a card written here (not the user's)."""
    if not path.exists():
        return True
    with path.open(encoding="utf-8", errors="replace") as file:
        return CARD_MARK in file.read(2048)


def save_pretrained_with_card(
    model: nn.Module, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any
) -> Any:
    """``type(model).save_pretrained``, then the model card beside the weights.

    The card is not written by processes other than the main one, nor over a README.md the user
    wrote. ``push_to_hub`` uploads the card transformers makes (it replaces README.md before the
    upload); save locally and upload the folder to publish this one.
    """
    result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True) and not kwargs.get("push_to_hub", False):
        path = Path(save_directory) / "README.md"
        if _is_ours_to_write(path):
            write_model_card(model, save_directory)
    return result


def install_card_writer(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write the model card too (an hfcompress checkpoint only).

    Installed on the instance, so the model keeps its class (``isinstance``, ``type(model)``
    and transformers' own calls are unaffected); ``copy.deepcopy`` rebinds it to the copy.
    """
    spec = getattr(getattr(model, "config", None), "quantization_config", None)
    method = (
        spec.get("quant_method") if isinstance(spec, dict) else getattr(spec, "quant_method", None)
    )
    if method != QUANT_METHOD or not hasattr(type(model), "save_pretrained"):
        return
    if "save_pretrained" not in vars(model):
        model.save_pretrained = types.MethodType(save_pretrained_with_card, model)
    add_tags = getattr(model, "add_model_tags", None)
    if callable(add_tags):  # the hub card transformers writes on push_to_hub lists it too
        add_tags(["hfcompress"])


register_record_hook(install_card_writer)  # compress_model's models
register_load_hook(install_card_writer)  # from_pretrained's models
