"""2:4 frozen ``PrunedLinear`` on CUDA against the dense matmul: time and bytes (bf16/fp16).

For each shape (SmolLM2-135M and Llama-7B-sized MLP projections) and token count, a dense
``nn.Linear`` and the same layer pruned 2:4 by magnitude and frozen (``hfcompress.freeze``:
on CUDA in half precision, the weight becomes PyTorch's semi-structured sparse tensor,
cuSPARSELt or CUTLASS) are timed alternately with CUDA events, after warm-up; the table
shows the median of ``--repeats`` and the ratio dense time / 2:4 time (> 1: 2:4 faster), plus
the weight bytes of each. Needs a CUDA device of compute capability 8.0 or newer.

Usage:
    python bench/bench_semi_structured.py
    python bench/bench_semi_structured.py --dtype float16 --tokens 4096 16384
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

SHAPES = [(1536, 576), (576, 1536), (11008, 4096), (4096, 11008)]  # (out, in)


def cuda_ms(function, repeats: int) -> float:
    """Median milliseconds of ``function()`` over ``repeats`` calls, CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    import hfcompress
    from hfcompress.layers import PrunedLinear

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_semi_structured: needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}")
    print("| out × in | tokens | dense ms | 2:4 ms | dense / 2:4 | dense MB | 2:4 MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for out_features, in_features in SHAPES:
            dense = nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=dtype)
            pruned = PrunedLinear.from_module(dense, pattern="2:4")
            frozen = hfcompress.freeze(nn.Sequential(pruned))[0]
            sparse_kind = type(frozen.weight).__name__
            dense_mb = hfcompress.model_bytes(dense) / 1e6
            sparse_mb = hfcompress.model_bytes(frozen) / 1e6
            for tokens in args.tokens:
                x = torch.randn(tokens, in_features, device="cuda", dtype=dtype)
                for _ in range(10):
                    dense(x), frozen(x)
                rounds = {"dense": [], "2:4": []}
                for _ in range(3):  # alternate whole blocks of repeats
                    rounds["dense"].append(cuda_ms(lambda d=dense, x=x: d(x), args.repeats))
                    rounds["2:4"].append(cuda_ms(lambda f=frozen, x=x: f(x), args.repeats))
                d, s = statistics.median(rounds["dense"]), statistics.median(rounds["2:4"])
                print(
                    f"| {out_features} × {in_features} | {tokens} | {d:.4f} | {s:.4f} | "
                    f"{d / s:.2f} | {dense_mb:.2f} | {sparse_mb:.2f} |"
                )
            print(f"(weight type after freeze: {sparse_kind})")


if __name__ == "__main__":
    main()
