"""Seed 001 (P. Sun, "Make Large Language Models More Efficient by Compressing the Low-rank
Matrices"): step 1, structure analysis of the decoder matrices; step 2, LPAF (Ren & Zhu 2023,
prune-then-factorize) against pruning alone, factorizing alone and factorize-then-prune.

1. Per decoder Linear W: [out, in] (q/k/v/o/gate/up/down, or GPT-2's c_attn/c_proj/c_fc):
   numerical rank, stable rank ‖W‖_F²/‖W‖₂², ranks keeping 90% / 99% of Σσᵢ², effective rank
   exp(H(σ/Σσ)) (Roy & Vetterli), and the same for the whitened W·L (H = X·Xᵀ = L·Lᵀ over
   calibration inputs X: [in, N]) — "weights are not low-rank, features are" (Yu & Wu 2023).
   Tables aggregate per matrix type; <output>/structure.csv has every matrix; plots spectra.png,
   energy.png, stable_rank.png.
2. The MLP matrices at EQUAL non-zero parameter counts B per matrix, B = r·(out + in):
   prune alone (sparsity 1 − B/(out·in)), factorize alone (rank r), prune→factorize (LPAF: prune
   to B non-zeros, densify, factor to rank r) and factorize→prune (rank 2r, half of each factor
   pruned). r is the largest rank ≤ ⌊keep·out·in/(out + in)⌋ with B/out an integer, so that
   per-row pruning (Wanda, SparseGPT) also keeps exactly B. Each with data-free criteria
   (magnitude / SVD) and data-aware ones (SparseGPT or Wanda / whitened SVD-LLM, Wanda on the
   factors), optionally followed by a short distillation (--train-steps).

Counting: "MLP params kept" sums the weight entries of the MLP matrices that can be non-zero
(mask entries of pruned weights, all entries of dense factors U, V); biases are left out, every
method keeps them. "total non-zero params" counts the whole model that way (tied weights once).

    python examples/structure_lpaf.py                          # offline SmolLM2-135M, Shakespeare
    python examples/structure_lpaf.py --train-steps 50         # + KD fine-tune of every variant
    python examples/structure_lpaf.py --model gpt2 --dataset wikitext --bf16   # online, GPU
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from transformers.pytorch_utils import Conv1D

import hfcompress
from hfcompress.analysis import analyze_model, analyze_module, plot_energy, plot_spectra
from hfcompress.calibration import calibration_batches, collect_stats, layer_stack, run_layerwise
from hfcompress.decompose import rank_for_energy, rank_for_ratio, wanda_mask
from hfcompress.evaluation import count_parameters, perplexity
from hfcompress.layers import LowRankLinear, PrunedLinear, dense_weight_of

# (decoder Linear layers, MLP matrices) per architecture; Llama-style names are the default.
TARGETS = {
    "gpt2": (r"transformer\.h\.\d+\.(attn|mlp)\.\w+", r"transformer\.h\.\d+\.mlp\.(c_fc|c_proj)"),
    "llama": (
        r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj",
        r"model\.layers\.\d+\.mlp\.\w+_proj",
    ),
}
METHODS = ("prune", "factorize", "prune→factorize (LPAF)", "factorize→prune")
COLUMNS = ["method", "criterion", "MLP params kept", "total non-zero params", "held-out ppl"]
TRAINED = "ppl after training"
COUNTING = (
    "Per MLP matrix [out, in], B = r·(out + in) non-zero weights for every method: prune keeps B "
    "entries, factorize has rank r, LPAF prunes to B then factors to rank r, factorize→prune has "
    "rank 2r with half of each factor pruned. 'MLP params kept' sums those (biases left out); "
    "'total non-zero params' counts the whole model (masked entries out, tied weights once)."
)
MEASURES = {"stable_rank": "stable rank", "r90": "r90%", "r99": "r99%", "erank": "eff. rank"}


def targets_for(model: nn.Module) -> tuple[str, str]:
    return TARGETS.get(getattr(model.config, "model_type", ""), TARGETS["llama"])


def _names(model: nn.Module, pattern: str) -> list[str]:
    kinds = (nn.Linear, Conv1D, LowRankLinear, PrunedLinear)
    return [
        n for n, m in model.named_modules() if isinstance(m, kinds) and re.fullmatch(pattern, n)
    ]


def _type_and_layer(name: str) -> tuple[str, int]:
    """'model.layers.3.mlp.up_proj' -> ('mlp.up_proj', 3)."""
    match = re.match(r"^.*?\.(\d+)\.(.*)$", name)
    return (match.group(2), int(match.group(1))) if match else (name, 0)


def _spectral_stats(s: torch.Tensor) -> dict[str, float]:
    """Energy ranks and effective rank exp(−Σ pᵢ log pᵢ), pᵢ = σᵢ/Σσ, of a spectrum."""
    p = s.double() / s.double().sum()
    p = p[p > 0]
    return {
        "r90": rank_for_energy(s, 0.9),
        "r99": rank_for_energy(s, 0.99),
        "erank": math.exp(float(-(p * p.log()).sum())),
    }


def _cholesky(H: torch.Tensor) -> torch.Tensor:
    """L with H = L·Lᵀ, adding 1e-6·mean(diag H)·10^k to the diagonal only if H is singular."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for k in range(6):
        shift = 0.0 if k == 0 else 1e-6 * 10 ** (k - 1) * float(H.diagonal().mean())
        L, info = torch.linalg.cholesky_ex(H + shift * eye)
        if int(info) == 0:
            return L
    raise RuntimeError("calibration Gram matrix is not positive definite")


def structure_rows(
    model: nn.Module, calibration: torch.Tensor | None, targets: str
) -> tuple[object, list[dict]]:
    """Per-matrix structure (and whitened W·L structure when calibration is given)."""
    analysis = analyze_model(model, targets, kronecker_candidates=0, progress=False)
    rows = []
    for a in analysis.rows:
        kind, layer = _type_and_layer(a.name)
        rows.append(
            {"name": a.name, "type": kind, "layer": layer, "out": a.shape[0], "in": a.shape[1]}
            | {"rank": a.rank, "stable_rank": a.stable_rank}
            | _spectral_stats(a.singular_values)
        )
    if calibration is not None:
        by_name = {r["name"]: r for r in rows}
        prefix, stack = layer_stack(model, list(by_name))

        def whiten_block(index: int, block: nn.Module, inputs: list[tuple]) -> None:
            head = f"{prefix}.{index}."
            rel = [n.removeprefix(head) for n in by_name if n.startswith(head)]
            stats = collect_stats(block, inputs, dict.fromkeys(rel, True))
            for name in rel:
                W = dense_weight_of(block.get_submodule(name)).detach().float()
                whitened = analyze_module(W @ _cholesky(stats[name].gram), kronecker_candidates=0)
                row, spec = by_name[head + name], _spectral_stats(whitened.singular_values)
                row |= {"wl_stable_rank": whitened.stable_rank} | {
                    f"wl_{k}": v for k, v in spec.items()
                }

        run_layerwise(model, calibration_batches(calibration), stack, whiten_block, progress=False)
    return analysis, rows


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per matrix type: numerical rank min–max, the other measures averaged over layers."""
    out = []
    for kind in dict.fromkeys(r["type"] for r in rows):
        group = [r for r in rows if r["type"] == kind]
        ranks = [r["rank"] for r in group]
        agg = {"matrix": kind, "shape [out, in]": f"[{group[0]['out']}, {group[0]['in']}]"}
        agg |= {"layers": len(group), "numerical rank": f"{min(ranks)}–{max(ranks)}"}
        for prefix, suffix in (("", ""), ("wl_", " W·L")):
            for key, label in MEASURES.items():
                if prefix + key in group[0]:
                    agg[label + suffix] = statistics.fmean(r[prefix + key] for r in group)
        out.append(agg)
    return out


def plot_stable_rank(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    whitened = "wl_stable_rank" in rows[0]
    figure = Figure(figsize=(12 if whitened else 6.5, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    keys = [("stable_rank", "stable rank of W")] + (
        [("wl_stable_rank", "stable rank of W·L")] if whitened else []
    )
    for ax, (key, title) in zip(figure.subplots(1, len(keys), squeeze=False)[0], keys, strict=True):
        for kind in dict.fromkeys(r["type"] for r in rows):
            group = sorted((r["layer"], r[key]) for r in rows if r["type"] == kind)
            ax.plot(*zip(*group, strict=True), marker=".", label=kind)
        ax.set(title=title, xlabel="layer", ylabel="‖·‖_F² / ‖·‖₂²", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    figure.savefig(path, dpi=120)


# --- step 2: equal-parameter comparison ---------------------------------------------------------


def mlp_plan(model: nn.Module, pattern: str, keep: float) -> dict[str, tuple[int, int, int]]:
    """{MLP matrix: (out, in, r)}: r ≤ rank_for_ratio(keep) with r·(out + in) divisible by out."""
    plan = {}
    for name in _names(model, pattern):
        out_f, in_f = dense_weight_of(model.get_submodule(name)).shape
        step = out_f // math.gcd(in_f, out_f)  # r·in ≡ 0 (mod out)  ⇔  step | r
        top = rank_for_ratio(out_f, in_f, keep)
        r = top - top % step if top >= step else top  # no aligned rank: per-row counts differ
        if 2 * r > min(out_f, in_f) or in_f % 2:
            raise ValueError(f"{name}: keep={keep} too high for factorize→prune (rank 2r={2 * r})")
        plan[name] = (out_f, in_f, r)
    return plan


def mlp_params(model: nn.Module, names: list[str]) -> int:
    """Weight entries of the MLP matrices that can be non-zero (biases left out)."""

    def entries(m: nn.Module) -> int:
        if isinstance(m, PrunedLinear):
            return int(m.mask.sum())
        if isinstance(m, LowRankLinear):
            return entries(m.u) + entries(m.v)
        return dense_weight_of(m).numel()

    return sum(entries(model.get_submodule(n)) for n in names)


def _stage(method: str, pattern: str, per_module: dict[str, dict], **common: object) -> dict:
    first = next(iter(per_module.values()))
    overrides = {re.escape(n): s for n, s in per_module.items()}
    return {"method": method, "targets": pattern, **common, **first, "overrides": overrides}


def _densify(model: nn.Module, names: list[str]) -> None:
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, model.get_submodule(name).to_dense())


def _wanda_factors(model: nn.Module, names: list[str], calibration: torch.Tensor) -> None:
    """Prune half of every row of U and V by Wanda, layer by layer (inputs: x for V, V·x for U)."""
    prefix, stack = layer_stack(model, names)

    def prune_block(index: int, block: nn.Module, inputs: list[tuple]) -> None:
        head = f"{prefix}.{index}."
        rel = [n.removeprefix(head) for n in names if n.startswith(head)]
        stats = collect_stats(block, inputs, {f"{n}.{f}": False for n in rel for f in "uv"})
        for n in rel:
            layer = block.get_submodule(n)
            for f in "uv":
                lin = getattr(layer, f)
                mask = wanda_mask(lin.weight, stats[f"{n}.{f}"].input_norm, sparsity=0.5)
                setattr(
                    layer, f, PrunedLinear.from_weight(lin.weight, mask, lin.bias, sparsity=0.5)
                )

    run_layerwise(model, calibration_batches(calibration), stack, prune_block, progress=False)
    hfcompress.record_compression(model)


def build_variant(
    dense: nn.Module,
    method: str,
    plan: dict[str, tuple[int, int, int]],
    pattern: str,
    calibration: torch.Tensor | None = None,
    prune_criterion: str = "sparsegpt",
    pruned: nn.Module | None = None,
) -> tuple[nn.Module, str]:
    """A compressed copy of ``dense`` and its criterion label; data-aware iff calibration given.

    LPAF starts from a copy of ``pruned`` (the "prune" variant, same criterion) when given.
    """
    aware, names = calibration is not None, list(plan)
    start = pruned if method == METHODS[2] and pruned is not None else dense
    model = copy.deepcopy(start)
    prune_c, svd_c = (prune_criterion, "whitened") if aware else ("magnitude", "svd")
    sparsity = {n: {"sparsity": 1 - r * (o + i) / (o * i)} for n, (o, i, r) in plan.items()}
    prune = _stage("prune", pattern, sparsity, criterion=prune_c)
    factor = _stage(
        "lowrank", pattern, {n: {"rank": r} for n, (_, _, r) in plan.items()}, criterion=svd_c
    )

    def run(*stages: dict) -> None:
        hfcompress.compress_model(
            model, {"stages": list(stages)}, calibration=calibration, progress=False
        )

    if method == "prune":
        run(prune)
        return model, prune_c
    if method == "factorize":
        run(factor)
        return model, svd_c
    if method == METHODS[2]:
        if pruned is None:
            run(prune)
        _densify(model, names)  # the pruned W as a plain Linear, so the SVD stage sees it
        run(factor)
        return model, f"{prune_c} → {svd_c}"
    double = _stage(
        "lowrank", pattern, {n: {"rank": 2 * r} for n, (_, _, r) in plan.items()}, criterion=svd_c
    )
    if not aware:
        run(double, {"method": "prune", "targets": pattern, "sparsity": 0.5})
        return model, "svd → magnitude"
    run(double)
    _wanda_factors(model, names, calibration)
    return model, "whitened → wanda"


def _distill(student: nn.Module, teacher: nn.Module, blocks: object, steps: int, lr: float) -> None:
    from hfcompress.training import DistillationArguments, DistillationTrainer

    with tempfile.TemporaryDirectory() as tmp:
        arguments = DistillationArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=4, learning_rate=lr,
            lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10), weight_decay=0.0,
            alpha=0.5, temperature=2.0, save_strategy="no", report_to=[], disable_tqdm=True,
            logging_strategy="no", use_cpu=not torch.cuda.is_available(),
        )  # fmt: skip
        DistillationTrainer(
            model=student, teacher=teacher, args=arguments, train_dataset=blocks
        ).train()
    student.eval()


def compare(
    model: nn.Module,
    eval_ids: torch.Tensor,
    calibration: torch.Tensor | None,
    *,
    keep: float = 0.5,
    window: int = 512,
    stride: int | None = None,
    methods: tuple[str, ...] = METHODS,
    prune_criterion: str = "sparsegpt",
    train_blocks: object = None,
    train_steps: int = 0,
    learning_rate: float = 1e-4,
    log: object = print,
    on_variant: object = None,
) -> list[dict]:
    """Rows of COLUMNS (+ TRAINED when train_steps > 0): dense, then each method and criterion."""
    pattern = targets_for(model)[1]
    plan = mlp_plan(model, pattern, keep)

    def ppl(m: nn.Module) -> float:
        size = min(window, eval_ids.shape[1])
        step = min(stride or size // 2, size)
        return perplexity(m, eval_ids, max_length=size, stride=step, progress=False).perplexity

    def row(method: str, criterion: str, m: nn.Module) -> dict:
        values = [method, criterion, mlp_params(m, list(plan)), count_parameters(m).nonzero, ppl(m)]
        return dict(zip(COLUMNS, values, strict=True))

    rows = [row("dense", "-", model) | ({TRAINED: None} if train_steps else {})]
    log(rows[0])
    for calib in [None] + ([calibration] if calibration is not None else []):
        pruned = None  # the "prune" variant before training: LPAF's first step, not redone
        for method in methods:
            start = time.perf_counter()
            variant, criterion = build_variant(
                model, method, plan, pattern, calib, prune_criterion, pruned
            )
            if method == "prune" and METHODS[2] in methods:
                pruned = copy.deepcopy(variant)
            rows.append(row(method, criterion, variant))
            if on_variant is not None:  # e.g. a test counting parameters by hand
                on_variant(rows[-1], variant)
            if train_steps:
                _distill(variant, model, train_blocks, train_steps, learning_rate)
                rows[-1][TRAINED] = ppl(variant)
            log(rows[-1] | {"seconds": round(time.perf_counter() - start)})
            del variant
    return rows


# --- output -------------------------------------------------------------------------------------


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 1e6 else f"{value:.3g}"
    return f"{value:,}" if isinstance(value, int) else ("-" if value is None else str(value))


def write_outputs(
    output: Path, analysis: object, rows: list[dict], results: list[dict], header: str
) -> str:
    output.mkdir(parents=True, exist_ok=True)
    with (output / "structure.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_spectra(analysis, output / "spectra.png")
    plot_energy(analysis, output / "energy.png")
    plot_stable_rank(rows, output / "stable_rank.png")
    console, text = Console(width=160), [header]
    for title, table_rows in (
        ("Structure per matrix type (mean over layers)", aggregate(rows)),
        ("MLP compression at equal parameter counts", results),
    ):
        table = Table(title=title)
        for column in table_rows[0]:
            table.add_column(
                column, justify="left" if column in ("matrix", "method", "criterion") else "right"
            )
        for r in table_rows:
            table.add_row(*map(_fmt, r.values()))
        console.print(table)
        text += [
            f"\n### {title}\n",
            "| " + " | ".join(table_rows[0]) + " |",
            "|" + "---|" * len(table_rows[0]),
        ]
        text += ["| " + " | ".join(map(_fmt, r.values())) + " |" for r in table_rows]
    (output / "results.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    return "\n".join(text)


def load_texts(dataset: str, chars: int) -> tuple[str, str]:
    """(calibration/training text, held-out text)."""
    if dataset == "wikitext":
        from datasets import load_dataset

        data = load_dataset("wikitext", "wikitext-2-raw-v1")
        return "\n\n".join(data["train"]["text"])[:chars], "\n\n".join(data["test"]["text"])
    from offline_data import heldout_and_calibration_split, shakespeare_texts

    texts = shakespeare_texts()
    held_out, plays = heldout_and_calibration_split()
    per_play = chars // len(plays)  # a slice from the middle of every training play
    parts = [
        t[len(t) // 3 : len(t) // 3 + per_play]
        for t in (texts[p].read_text(encoding="utf-8") for p in plays)
    ]
    return "\n\n".join(parts), "\n\n".join(texts[p].read_text(encoding="utf-8") for p in held_out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="folder or hub id (default: offline SmolLM2-135M)"
    )
    parser.add_argument("--dataset", choices=["shakespeare", "wikitext"], default="shakespeare")
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of MLP params kept")
    parser.add_argument("--prune-criterion", choices=["sparsegpt", "wanda"], default="sparsegpt")
    parser.add_argument(
        "--n-calib", type=int, default=32, help="calibration sequences (0: data-free only)"
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--eval-window", type=int, default=512)
    parser.add_argument("--eval-stride", type=int, default=512, help="< window: overlapping")
    parser.add_argument("--train-steps", type=int, default=0, help="KD steps per variant (0: none)")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=Path("out/structure_lpaf"))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = args.model
    if model_path is None:
        from offline_data import smollm2_dir

        model_path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(args.device).eval()
    # ~5 characters per token; the calibration text does not depend on --train-steps
    calib_text, heldout = load_texts(args.dataset, 5 * max(args.n_calib * args.seq_len, 1))
    ids = tokenizer(calib_text, return_tensors="pt").input_ids[0]
    calibration = None
    if args.n_calib:  # n_calib sequences spread evenly over the training text
        starts = torch.linspace(0, len(ids) - args.seq_len, args.n_calib).long()
        calibration = torch.stack([ids[s : s + args.seq_len] for s in starts])
    eval_ids = tokenizer(heldout, return_tensors="pt").input_ids[:, : args.eval_tokens]
    blocks = None
    if args.train_steps:
        from datasets import Dataset

        from hfcompress.training import causal_lm_blocks

        train_text = load_texts(args.dataset, 5 * args.train_steps * 4 * args.block_size)[0]
        blocks = causal_lm_blocks(
            Dataset.from_dict({"text": [train_text]}), tokenizer, args.block_size
        )
    start = time.perf_counter()
    analysis, rows = structure_rows(model, calibration, targets_for(model)[0])
    Console().print(f"structure analysis: {time.perf_counter() - start:.0f} s")
    results = compare(
        model, eval_ids, calibration, keep=args.keep, window=args.eval_window,
        stride=args.eval_stride,
        prune_criterion=args.prune_criterion, train_blocks=blocks, train_steps=args.train_steps,
        learning_rate=args.learning_rate, log=Console().print,
    )  # fmt: skip
    command = " ".join(["python", *sys.argv])
    header = f"`{command}` — model {model_path}, {eval_ids.shape[1]} held-out tokens\n\n{COUNTING}"
    write_outputs(args.output, analysis, rows, results, header)


if __name__ == "__main__":
    main()
