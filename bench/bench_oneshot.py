"""One-shot compression of SmolLM2-135M (no training): held-out perplexity, time, peak memory.

Decoder Linear layers only; calibration on Shakespeare plays, evaluation on held-out plays never
used for calibration (Hamlet, Macbeth). Every method runs in a fresh subprocess, so its wall time
and peak resident memory (ru_maxrss) are its own; all are measured in the same run.

Usage:
    python bench/bench_oneshot.py                       # all methods, 32 x 512 calibration tokens
    python bench/bench_oneshot.py --n-calib 128 --methods sparsegpt-50 whitened-mlp50
    python bench/bench_oneshot.py --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

DECODER = r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"
MLP = r"model\.layers\.\d+\.mlp\.\w+_proj"
METHODS: dict[str, dict | None] = {
    "dense": None,
    "magnitude-50": {"method": "prune", "targets": DECODER, "sparsity": 0.5},
    "wanda-50": {"method": "prune", "targets": DECODER, "sparsity": 0.5, "criterion": "wanda"},
    "sparsegpt-50": {
        "method": "prune",
        "targets": DECODER,
        "sparsity": 0.5,
        "criterion": "sparsegpt",
    },
    # the same, each block's q/k/v, o, gate/up, down calibrated in forward order
    "sparsegpt-50-seq": {
        "method": "prune",
        "targets": DECODER,
        "sparsity": 0.5,
        "criterion": "sparsegpt",
        "true_sequential": True,
    },
    # per-module sparsities (50% overall) from OBS saliencies weighted by loss gradients
    "planner-prune50": {
        "planner": "prune",
        "targets": DECODER,
        "keep": 0.5,
        "allocation": "saliency",
    },
    # OWL block sparsities (λ = 0.08) with SparseGPT
    "owl-sparsegpt-50": {
        "planner": "prune",
        "targets": DECODER,
        "keep": 0.5,
        "allocation": "owl",
        "criterion": "sparsegpt",
    },
    "magnitude-2:4": {"method": "prune", "targets": DECODER, "pattern": "2:4"},
    "wanda-2:4": {"method": "prune", "targets": DECODER, "pattern": "2:4", "criterion": "wanda"},
    "sparsegpt-2:4": {
        "method": "prune",
        "targets": DECODER,
        "pattern": "2:4",
        "criterion": "sparsegpt",
    },
    "svd-mlp50": {"method": "lowrank", "targets": MLP, "ratio": 0.5},
    "activation-mlp50": {
        "method": "lowrank",
        "targets": MLP,
        "ratio": 0.5,
        "criterion": "activation",
    },
    "whitened-mlp50": {"method": "lowrank", "targets": MLP, "ratio": 0.5, "criterion": "whitened"},
    # whitened, each output row weighted by its squared loss gradients (min Σ_j G_j‖(W − Ŵ)_j X‖²)
    "fisherwhitened-mlp50": {
        "method": "lowrank",
        "targets": MLP,
        "ratio": 0.5,
        "criterion": "fisher_whitened",
    },
    # the planner at the same MLP budget: per-matrix ranks from whitened spectra
    "planner-mlp50": {"planner": "lowrank", "targets": MLP, "keep": 0.5},
    # the planner at 50% of all decoder Linear parameters, against the best uniform recipes
    "planner-decoder50": {"planner": "lowrank", "targets": DECODER, "keep": 0.5},
    "whitened-decoder50": {
        "method": "lowrank",
        "targets": DECODER,
        "ratio": 0.5,
        "criterion": "whitened",
    },
    "fisherwhitened-decoder50": {
        "method": "lowrank",
        "targets": DECODER,
        "ratio": 0.5,
        "criterion": "fisher_whitened",
    },
}


def token_data(
    tokenizer, n_calib: int, seq_len: int, eval_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    from offline_data import heldout_and_calibration_split, shakespeare_texts

    texts = shakespeare_texts()
    held_out, calibration = heldout_and_calibration_split()
    needed, chunks = n_calib * seq_len, []
    for name in calibration:
        chunks.append(tokenizer(texts[name].read_text(encoding="utf-8")).input_ids)
        if sum(map(len, chunks)) >= needed:
            break
    flat = torch.tensor([t for chunk in chunks for t in chunk][:needed])
    heldout = "\n\n".join(texts[name].read_text(encoding="utf-8") for name in held_out)
    eval_ids = tokenizer(heldout, return_tensors="pt").input_ids[:, :eval_tokens]
    return flat.view(n_calib, seq_len), eval_ids


def run_one(args: argparse.Namespace) -> None:
    """Child process: compress with one method and print a JSON line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfcompress
    from hfcompress.evaluation import count_parameters, perplexity
    from offline_data import smollm2_dir

    torch.set_num_threads(args.threads) if args.threads else None
    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    calibration, eval_ids = token_data(tokenizer, args.n_calib, args.seq_len, args.eval_tokens)
    stage = METHODS[args.one]
    start = time.perf_counter()
    if stage is not None and "planner" in stage:
        from hfcompress.planner import plan_recipe

        plan = plan_recipe(
            model,
            calibration,
            keep=stage["keep"],
            targets=stage["targets"],
            method=stage["planner"],
            allocation=stage.get("allocation", "owl"),
            criterion=stage.get("criterion"),
            progress=False,
        )
        hfcompress.compress_model(model, plan.recipe, calibration=calibration, progress=False)
    elif stage is not None:
        stage = dict(stage)
        sequential = stage.pop("true_sequential", False)
        needs_data = stage.get("criterion") not in (None, "magnitude", "svd")
        hfcompress.compress_model(
            model,
            {"stages": [stage]},
            calibration=calibration if needs_data else None,
            progress=False,
            true_sequential=sequential,
        )
    seconds = time.perf_counter() - start
    ppl = perplexity(model, eval_ids, max_length=512, stride=256, progress=False).perplexity
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = count_parameters(model).nonzero
    print(
        json.dumps(
            {
                "method": args.one,
                "ppl": ppl,
                "seconds": seconds,
                "peak_mb": peak_mb,
                "params": params,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--n-calib", type=int, default=32, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", default=None, help="append the table to this markdown file")
    parser.add_argument("--one", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return
    rows = []
    methods = ["dense", *[m for m in args.methods if m != "dense"]]
    for method in methods:
        command = [
            sys.executable,
            __file__,
            "--one",
            method,
            "--n-calib",
            str(args.n_calib),
            "--seq-len",
            str(args.seq_len),
            "--eval-tokens",
            str(args.eval_tokens),
        ]
        if args.threads:
            command += ["--threads", str(args.threads)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(f"{method}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    dense = next(r for r in rows if r["method"] == "dense")["ppl"]
    lines = [
        "| method | non-zero params | held-out ppl | × dense | compress time (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['params']:,} | {r['ppl']:.2f} | {r['ppl'] / dense:.2f} | "
            f"{r['seconds']:.0f} | {r['peak_mb']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        env = f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads"
        command = "python bench/bench_oneshot.py " + " ".join(sys.argv[1:])
        title = f"one-shot SmolLM2-135M, {args.n_calib}x{args.seq_len} calibration tokens"
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(f"\n### {title}\n\n`{command}` ({env})\n\n{table}\n")


if __name__ == "__main__":
    main()
