"""One-shot structured compression of SmolLM2-135M: held-out perplexity, time, parameters.

Every row removes the same parameters, those of 50% of every MLP's intermediate channels
(≈ 94.7M parameters left), or spends the same budget another way: low rank (the planner) and
unstructured 50% SparseGPT of the MLP Linears. Torch-Pruning 1.6.1 runs with its LLM example's
settings (``bench/tp_baseline.py``) on the same split. Calibration on Shakespeare plays,
perplexity on held-out plays (Hamlet, Macbeth), as in bench_oneshot.py; every method in a fresh
subprocess so that its time and peak memory are its own.

Usage:
    python bench/bench_structured.py                         # every method, 32 x 512 tokens
    python bench/bench_structured.py --methods width-activation-refit torch-pruning
    python bench/bench_structured.py --markdown docs/benchmarks.md
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
sys.path.insert(0, str(ROOT / "bench"))

MLP_MODULES = r"model\.layers\.\d+\.mlp"
MLP_LINEARS = r"model\.layers\.\d+\.mlp\.\w+_proj"


def _width(criterion: str, refit: bool, **extra: object) -> dict:
    return {
        "method": "width",
        "targets": MLP_MODULES,
        "keep": 0.5,
        "criterion": criterion,
        "refit": refit,
        **extra,
    }


METHODS: dict[str, dict | None] = {
    "dense": None,
    "width-magnitude": _width("magnitude", False),
    "width-activation": _width("activation", False),
    "width-activation-refit": _width("activation", True),
    "width-taylor-refit": _width("taylor", True),
    "width-reconstruction": _width("reconstruction", True),
    "torch-pruning": {"torch_pruning": 0.5},
    "lowrank-planner": {"planner": "lowrank", "targets": MLP_LINEARS, "keep": 0.5},
    "sparsegpt-mlp50": {
        "method": "prune",
        "targets": MLP_LINEARS,
        "sparsity": 0.5,
        "criterion": "sparsegpt",
    },
}


def run_one(args: argparse.Namespace) -> None:
    """Child process: compress with one method and print a JSON line."""
    from bench_oneshot import token_data
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfcompress
    from hfcompress.evaluation import count_parameters, perplexity
    from offline_data import smollm2_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    calibration, eval_ids = token_data(tokenizer, args.n_calib, args.seq_len, args.eval_tokens)
    stage = METHODS[args.one]
    start = time.perf_counter()
    if stage is None:
        pass
    elif "torch_pruning" in stage:
        from tp_baseline import prune_mlp_width_torch_pruning

        prune_mlp_width_torch_pruning(model, stage["torch_pruning"], calibration)
    elif "planner" in stage:
        from hfcompress.planner import plan_recipe

        plan = plan_recipe(
            model,
            calibration,
            keep=stage["keep"],
            targets=stage["targets"],
            method=stage["planner"],
            progress=False,
        )
        hfcompress.compress_model(model, plan.recipe, calibration=calibration, progress=False)
    else:
        data_free = stage.get("criterion") == "magnitude" and not stage.get("refit")
        hfcompress.compress_model(
            model,
            {"stages": [stage]},
            calibration=None if data_free else calibration,
            progress=False,
        )
    seconds = time.perf_counter() - start
    ppl = perplexity(model, eval_ids, max_length=512, stride=256, progress=False).perplexity
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "method": args.one,
                "ppl": ppl,
                "seconds": seconds,
                "peak_mb": peak_mb,
                "params": count_parameters(model).nonzero,
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
    for method in ["dense", *[m for m in args.methods if m != "dense"]]:
        command = [sys.executable, __file__, "--one", method]
        for flag in ("n_calib", "seq_len", "eval_tokens", "threads"):
            value = getattr(args, flag)
            if value is not None:
                command += ["--" + flag.replace("_", "-"), str(value)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(f"{method}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    dense = next(r for r in rows if r["method"] == "dense")["ppl"]
    lines = [
        "| method | params | held-out ppl | × dense | compress time (s) | peak RSS (MB) |",
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
        command = "python bench/bench_structured.py " + " ".join(sys.argv[1:])
        title = (
            f"one-shot structured SmolLM2-135M (50% MLP width), {args.n_calib}x{args.seq_len} "
            "calibration tokens"
        )
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(f"\n### {title}\n\n`{command}` ({env})\n\n{table}\n")


if __name__ == "__main__":
    main()
