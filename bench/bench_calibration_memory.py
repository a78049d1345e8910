"""Peak resident memory of one-shot calibrated compression, against the model's own bytes.

Each run is a fresh subprocess (peak RSS from ``resource.getrusage`` is per process), so runs
do not inherit each other's allocations. The model is config-built with random weights (no
download): ``--size 135m`` has SmolLM2-135M's shapes, ``--size 1.1b`` TinyLlama-1.1B's (22
layers, hidden 2048, MLP 5632, 32 heads / 4 KV heads). Weights are stored in ``--dtype``;
statistics are accumulated in fp32 by hfcompress. Calibration: ``--n-calib`` random sequences
of ``--seq-len`` tokens. Every decoder Linear is compressed: SparseGPT 50% or whitened low rank
at ratio 0.5, with the replaced originals (kept for an undo) in memory or on disk
(``compress_model(keep_originals=...)``).

The table gives the peak RSS, the model's bytes before compressing (``hfcompress.model_bytes``),
the peak minus those bytes and minus the process's baseline (torch + transformers imported,
nothing built), and the wall time.

Usage:
    python bench/bench_calibration_memory.py --size 135m
    python bench/bench_calibration_memory.py --size 1.1b --n-calib 8 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SIZES = {
    "135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    "1.1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
}
STAGES = {
    "sparsegpt": {"method": "prune", "criterion": "sparsegpt", "sparsity": 0.5},
    "whitened": {"method": "lowrank", "criterion": "whitened", "ratio": 0.5},
}


def child(args: argparse.Namespace) -> dict:
    """One run, in this process: build, compress, report peak RSS (bytes) and times."""
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hfcompress

    torch.set_num_threads(args.threads)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[args.size], max_position_embeddings=4096)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the storage dtype: no fp32 copy first
    try:
        model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    model.requires_grad_(False)
    model_bytes = hfcompress.model_bytes(model)
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ids = torch.randint(0, config.vocab_size, (args.n_calib, args.seq_len))
    stage = {**STAGES[args.method], "targets": r"model\.layers\.\d+\.(self_attn|mlp)\..*"}
    start = time.perf_counter()
    hfcompress.compress_model(
        model,
        {"stages": [stage]},
        calibration=ids,
        progress=False,
        calibration_batch_size=args.batch_size,
        keep_originals=args.keep_originals[0],
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "baseline": baseline,
        "built": built,
        "peak": peak,
        "model_bytes": model_bytes,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="135m")
    parser.add_argument("--methods", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--n-calib", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--keep-originals",
        nargs="+",
        choices=["memory", "disk"],
        default=["memory", "disk"],
        help="compress_model's keep_originals; each is a separate run",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    runs = [(m, k) for m in args.methods for k in args.keep_originals]
    for method, keep in runs:
        command = [sys.executable, __file__, "--child", "--method", method, "--size", args.size]
        command += ["--keep-originals", keep]
        command += ["--dtype", args.dtype, "--n-calib", str(args.n_calib)]
        command += ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
        command += ["--threads", str(args.threads)]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{method}: failed\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((f"{method}, originals in {keep}", result))
        print(f"{method} ({keep}): {result}", flush=True)
    gb = 1e9
    print(
        f"\nLlama {args.size} (random weights), {args.dtype} storage, calibration "
        f"{args.n_calib}×{args.seq_len} tokens, batch {args.batch_size}, {args.threads} threads\n"
    )
    print(
        "| method | model GB | RSS after build GB | peak RSS GB | peak − baseline − model GB "
        "| (peak − baseline) / model | seconds |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, r in rows:
        extra = r["peak"] - r["baseline"] - r["model_bytes"]
        print(
            f"| {method} | {r['model_bytes'] / gb:.2f} | {r['built'] / gb:.2f} "
            f"| {r['peak'] / gb:.2f} | {extra / gb:.2f} "
            f"| {(r['peak'] - r['baseline']) / r['model_bytes']:.2f} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
