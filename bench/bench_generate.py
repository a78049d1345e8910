"""Inference speed and memory of compressed SmolLM2-135M forms: prefill, decode, bytes, perplexity.

Every form is built once from SmolLM2-135M-Instruct (offline copy, see docs/real-models.md),
kept in memory, and then timed in alternating rounds (for each round, every form is measured
once), so that each ratio against ``dense`` compares measurements taken in the same run under the
same load; the table shows the median over the rounds. Building the forms is not timed.

Forms (decoder layers only; ``lm_head`` is tied to the embeddings and never compressed):

* ``dense``: the model as loaded.
* ``prune50``: 50% unstructured magnitude pruning of every decoder Linear, *not* frozen (dense
  weight + bool mask in memory).
* ``prune50-frozen``: the same after ``hfcompress.freeze`` (mask dropped: the dense bytes).
* ``2:4-frozen``: 2:4 magnitude pruning of every decoder Linear, frozen.
* ``lowrank-mlp50``: truncated SVD of the MLP gate/up/down projections at ratio 0.5, frozen.
* ``FORM+int8``: any frozen form (or dense) followed by ``hfcompress.quantize_int8`` (its
  default mode, weight-only int8 through torchao): every untied ``nn.Linear``, pruned weight and
  low-rank factor in int8; the tied ``lm_head`` and the Kronecker factors stay in floating
  point. ``bench/bench_int8.py`` compares the int8 modes.
* ``kronecker-mlp``: nearest Kronecker product (Van Loan) of the MLP projections, frozen:
  gate/up [1536, 576] with A (768, 288) ⊗ B (2, 2), down [576, 1536] with A (288, 768) ⊗ B (2, 2);
  with one term (``--kronecker-terms``) it keeps 25% of the MLP parameters (half with two).

All criteria are data-free (magnitude, svd, vanloan), so building is fast. Speed and memory do
not depend on *which* weights are kept, only on the form, so the timings hold for data-aware
criteria (Wanda, SparseGPT, whitened SVD, ...) too. The perplexities, however, are those of
data-free one-shot compression without retraining: low-rank and Kronecker perplexities are
poor (see docs/real-models.md and docs/benchmarks.md); distillation is what recovers them.
PyTorch has no sparse speedup for unstructured or 2:4 patterns on CPU: pruned forms run dense
matrix products over their zeros.

Measurements (all under ``torch.inference_mode()``):

* model MB: ``hfcompress.model_bytes`` (parameters + buffers, shared tensors once), 1 MB = 1e6 B.
* params: non-zero parameters (``hfcompress.evaluation.count_parameters``).
* prefill tok/s: one forward of a ``--prompt-tokens`` (512) prompt with ``use_cache=True`` and
  ``logits_to_keep=1`` (as ``generate`` does), batch 1 and 8; tokens/s = batch·prompt / time.
* decode tok/s: greedy ``generate`` of exactly ``--new-tokens`` tokens (EOS ignored) after a
  ``--decode-prompt-tokens`` (16) prompt, batch 1 and 8; tokens/s = batch·new / time (the short
  prompt's prefill is included in the time).
* ppl: sliding-window perplexity (512-token windows, stride 256) on the first ``--eval-tokens``
  tokens of the held-out plays (Hamlet, Macbeth), measured once, outside the timed rounds.

Usage:
    python bench/bench_generate.py                                  # all forms, 2 threads, CPU fp32
    python bench/bench_generate.py --forms dense prune50-frozen --rounds 5 --new-tokens 32
    python bench/bench_generate.py --device cuda --dtype bfloat16 --threads 0
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

DECODER = r"model\.layers\.\d+\..*"
MLP = r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj"
GATE_UP = r"model\.layers\.\d+\.mlp\.(gate|up)_proj"
DOWN = r"model\.layers\.\d+\.mlp\.down_proj"
KRON_A_GATE_UP = [768, 288]  # [1536, 576] = (768, 288) ⊗ (2, 2)
KRON_A_DOWN = [288, 768]  # [576, 1536] = (288, 768) ⊗ (2, 2)

BASE_FORMS = ("dense", "prune50", "prune50-frozen", "2:4-frozen", "lowrank-mlp50", "kronecker-mlp")
INT8 = "+int8"  # suffix: the form, then hfcompress.quantize_int8
FORMS = (*BASE_FORMS, *(f + INT8 for f in BASE_FORMS if f != "prune50"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLUMNS = ("prefill_b1", "prefill_b8", "decode_b1", "decode_b8")


def recipe_for(form: str, kronecker_terms: int) -> tuple[dict[str, Any] | None, bool]:
    """The hfcompress recipe of ``form`` (None for dense) and whether to freeze it."""
    if form == "dense":
        return None, False
    if form in ("prune50", "prune50-frozen"):
        stage: list[dict[str, Any]] = [
            {"method": "prune", "targets": DECODER, "sparsity": 0.5, "criterion": "magnitude"}
        ]
        return {"stages": stage, "exclude": "lm_head"}, form.endswith("-frozen")
    if form == "2:4-frozen":
        stage = [
            {"method": "prune", "targets": DECODER, "pattern": "2:4", "criterion": "magnitude"}
        ]
        return {"stages": stage, "exclude": "lm_head"}, True
    if form == "lowrank-mlp50":
        stage = [{"method": "lowrank", "targets": MLP, "ratio": 0.5, "criterion": "svd"}]
        return {"stages": stage, "exclude": "lm_head"}, True
    if form == "kronecker-mlp":
        common = {"method": "kronecker", "terms": kronecker_terms, "criterion": "vanloan"}
        stage = [
            {**common, "targets": GATE_UP, "a_shape": KRON_A_GATE_UP},
            {**common, "targets": DOWN, "a_shape": KRON_A_DOWN},
        ]
        return {"stages": stage, "exclude": "lm_head"}, True
    raise ValueError(f"unknown form {form!r}")


@dataclass
class Form:
    """One model form and its measurements (one list entry per round)."""

    name: str
    model: nn.Module
    nonzero: int
    bytes: int
    ppl: float = float("nan")
    times: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in COLUMNS})


def build(
    form: str, folder: Path, device: torch.device, dtype: torch.dtype, kronecker_terms: int
) -> Form:
    """Load SmolLM2 in fp32, compress (data-free), freeze if asked, move to device and dtype."""
    from transformers import AutoModelForCausalLM

    import hfcompress
    from hfcompress.evaluation import count_parameters

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    base, int8 = form.removesuffix(INT8), form.endswith(INT8)
    recipe, frozen = recipe_for(base, kronecker_terms)
    if recipe is not None:
        hfcompress.compress_model(model, recipe, progress=False)
    if frozen:
        hfcompress.freeze(model)
    model.requires_grad_(False)
    model.to(device=device, dtype=dtype)
    if int8:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Kronecker factors stay in floating point: known
            hfcompress.quantize_int8(model)
    return Form(form, model, count_parameters(model).nonzero, hfcompress.model_bytes(model))


def token_data(tokenizer: Any, tokens: int) -> torch.Tensor:
    """The first ``tokens`` tokens of the held-out plays (Hamlet, Macbeth), [1, tokens]."""
    from offline_data import heldout_and_calibration_split, shakespeare_texts

    texts = shakespeare_texts()
    held_out, _ = heldout_and_calibration_split()
    text = "\n\n".join(texts[name].read_text(encoding="utf-8") for name in held_out)
    return tokenizer(text, return_tensors="pt").input_ids[:, :tokens]


def batch_of(ids: torch.Tensor, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """``batch`` disjoint ``length``-token slices of ``ids`` ([1, T]), as [batch, length]."""
    if ids.shape[1] < batch * length:
        raise ValueError(f"need {batch * length} held-out tokens, have {ids.shape[1]}")
    return ids[0, : batch * length].view(batch, length).to(device)


def timed(function: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call, synchronizing the accelerator around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def prefill(model: nn.Module, ids: torch.Tensor) -> object:
    """One forward over the prompt with a KV cache, logits of the last position only."""
    return model(
        input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1
    )


def decode(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy generation of exactly ``new_tokens`` tokens (as ``hfcompress eval --speed``)."""
    from hfcompress.evaluation.efficiency import generation_call

    return generation_call(model, ids, new_tokens)()


def measure(form: Form, inputs: dict[str, torch.Tensor], args: argparse.Namespace) -> None:
    """One round for one form: append seconds for every column."""
    device = torch.device(args.device)
    for column in COLUMNS:
        ids = inputs[column]
        if column.startswith("prefill"):
            seconds = timed(lambda ids=ids: prefill(form.model, ids), device)
        else:
            seconds = timed(lambda ids=ids: decode(form.model, ids, args.new_tokens), device)
        form.times[column].append(seconds)


def rate(form: Form, column: str, inputs: dict[str, torch.Tensor], new_tokens: int) -> float:
    """Median tokens/s of ``column``."""
    ids = inputs[column]
    tokens = ids.numel() if column.startswith("prefill") else ids.shape[0] * new_tokens
    return tokens / statistics.median(form.times[column])


def table(forms: list[Form], inputs: dict[str, torch.Tensor], new_tokens: int) -> str:
    """The markdown table; ratios against the dense form (or the first form without one)."""
    reference = next((f for f in forms if f.name == "dense"), forms[0])
    head = (
        "| form | params (non-zero) | model MB | × dense bytes | prefill tok/s b1 | × | "
        "prefill b8 | × | decode tok/s b1 | × | decode b8 | × | ppl |"
    )
    lines = [head, "|---|" + "---:|" * 12]
    for f in forms:
        cells = [
            f.name,
            f"{f.nonzero:,}",
            f"{f.bytes / 1e6:.1f}",
            f"{f.bytes / reference.bytes:.2f}",
        ]
        for column in COLUMNS:
            value = rate(f, column, inputs, new_tokens)
            ratio = value / rate(reference, column, inputs, new_tokens)
            cells += [f"{value:,.1f}", f"{ratio:.2f}"]
        cells.append(f"{f.ppl:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--forms",
        nargs="+",
        default=list(FORMS),
        choices=FORMS,
        help="forms to measure (default: all); dense is always added as the reference",
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument(
        "--new-tokens", type=int, default=128, help="tokens generated per decode run (default 128)"
    )
    parser.add_argument(
        "--prompt-tokens", type=int, default=512, help="prefill prompt length (default 512)"
    )
    parser.add_argument(
        "--decode-prompt-tokens",
        type=int,
        default=16,
        help="prompt length before decoding (default 16)",
    )
    parser.add_argument(
        "--eval-tokens",
        type=int,
        default=4096,
        help="held-out tokens for perplexity (default 4096; 0 skips it)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch.set_num_threads (default 2; 0 keeps torch's default)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="default float32")
    parser.add_argument(
        "--kronecker-terms",
        type=int,
        default=1,
        help="Kronecker terms of kronecker-mlp (default 1: 25%% of the MLP parameters)",
    )
    parser.add_argument("--markdown", default=None, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    for name in ("rounds", "new_tokens", "prompt_tokens", "decode_prompt_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive integer")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from hfcompress.evaluation import perplexity
    from offline_data import smollm2_dir

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = token_data(tokenizer, max(args.eval_tokens, 8 * args.prompt_tokens))
    inputs = {
        "prefill_b1": batch_of(ids, 1, args.prompt_tokens, device),
        "prefill_b8": batch_of(ids, 8, args.prompt_tokens, device),
        "decode_b1": batch_of(ids, 1, args.decode_prompt_tokens, device),
        "decode_b8": batch_of(ids, 8, args.decode_prompt_tokens, device),
    }
    names = ["dense", *[f for f in args.forms if f != "dense"]]
    forms: list[Form] = []
    with torch.inference_mode():
        for name in names:
            start = time.perf_counter()
            form = build(name, folder, device, dtype, args.kronecker_terms)
            built = time.perf_counter() - start
            if args.eval_tokens:
                eval_ids = ids[:, : args.eval_tokens]
                form.ppl = perplexity(form.model, eval_ids, 512, 256, progress=False).perplexity
            # warm-up (not timed): allocator, kernels, generate's first-call setup
            prefill(form.model, inputs["prefill_b1"][:, :64])
            decode(form.model, inputs["decode_b8"], 2)
            forms.append(form)
            print(
                f"built {name}: {form.bytes / 1e6:.1f} MB, {form.nonzero:,} non-zero params, "
                f"ppl {form.ppl:.2f} ({built:.1f} s build, {time.perf_counter() - start:.1f} s "
                "with ppl and warm-up)",
                flush=True,
            )
        for r in range(args.rounds):
            start = time.perf_counter()
            for form in forms:
                measure(form, inputs, args)
            print(f"round {r + 1}/{args.rounds}: {time.perf_counter() - start:.1f} s", flush=True)

    env = (
        f"torch {torch.__version__}, {platform.machine()}, device {args.device}, {args.dtype}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} rounds, prefill "
        f"{args.prompt_tokens} tokens, decode {args.new_tokens} new tokens after "
        f"{args.decode_prompt_tokens}, ppl on {args.eval_tokens} held-out tokens"
    )
    if device.type == "cuda":
        env += f", {torch.cuda.get_device_name(device)}"
    result = table(forms, inputs, args.new_tokens)
    print(f"\n{env}\n\n{result}")
    if args.markdown:
        command = "python bench/bench_generate.py " + " ".join(sys.argv[1:])
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(f"\n### inference forms, SmolLM2-135M\n\n`{command}` ({env})\n\n{result}\n")


if __name__ == "__main__":
    main()
