"""Forward and forward+backward time of each compressed layer against dense ``nn.Linear``.

GPT-2 MLP shapes ([3072, 768] and [768, 3072], W: [out, in]) at 4096 tokens. Every ratio is
measured in the same run against the dense layer of the same shape. Also times the
"materialize W then F.linear" baseline for KroneckerLinear, which the factored forward must beat
whatever the factor shapes.

Usage:
    python bench/bench_layers.py                       # CPU, fp32
    python bench/bench_layers.py --device cuda --dtype bfloat16
    python bench/bench_layers.py --markdown docs/benchmarks.md   # append the table
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from hfcompress import KroneckerLinear, LowRankLinear, PrunedLinear
from hfcompress.decompose import kronecker_sum


@dataclass
class Case:
    name: str
    shape: tuple[int, int]  # [out, in]
    build: Callable[[nn.Linear], nn.Module]
    params: str


def cases() -> list[Case]:
    out = []
    for shape in [(3072, 768), (768, 3072)]:
        o, i = shape
        a_square = (768, 768)  # B is (4, 1) for c_fc and (1, 4) for c_proj
        a_small_b = (1536, 384) if o > i else (384, 1536)
        out += [
            Case("dense nn.Linear", shape, lambda m: m, ""),
            Case("PrunedLinear", shape, lambda m: PrunedLinear.from_module(m, sparsity=0.5), "50%"),
            Case("LowRankLinear", shape, lambda m: LowRankLinear.from_module(m, rank=154), "r=154"),
            Case(
                "KroneckerLinear",
                shape,
                lambda m, a=a_square: KroneckerLinear.from_module(m, a_shape=a),
                f"A={a_square}",
            ),
            Case(
                "KroneckerLinear",
                shape,
                lambda m, a=a_small_b: KroneckerLinear.from_module(m, a_shape=a),
                f"A={a_small_b}",
            ),
            Case(
                "materialized W + F.linear",
                shape,
                lambda m, a=a_small_b: MaterializedKronecker(
                    KroneckerLinear.from_module(m, a_shape=a)
                ),
                f"A={a_small_b}",
            ),
        ]
    return out


class MaterializedKronecker(nn.Module):
    """The naive baseline: build W = Σ Aₖ⊗Bₖ every call, then a dense matmul."""

    def __init__(self, layer: KroneckerLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, kronecker_sum(self.layer.A, self.layer.B), self.layer.bias)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int
) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def measure(module: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> tuple[float, float]:
    """Median forward and forward+backward seconds."""
    device = x.device

    def forward() -> None:
        with torch.no_grad():
            module(x)

    def forward_backward() -> None:
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()

    fwd = statistics.median(time_call(forward, device, warmup, repeats))
    fwd_bwd = statistics.median(time_call(forward_backward, device, warmup, repeats))
    return fwd, fwd_bwd


def run(args: argparse.Namespace) -> Table:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    table = Table(title=f"layers, {args.tokens} tokens, {device.type} {args.dtype}")
    for col in [
        "W [out, in]",
        "layer",
        "params",
        "fwd ms",
        "fwd speedup",
        "fwd+bwd ms",
        "fwd+bwd speedup",
    ]:
        table.add_column(col, justify="right" if "ms" in col or "speedup" in col else "left")
    dense_times: dict[tuple[int, int], tuple[float, float]] = {}
    # Warm the BLAS threads and the allocator so the first row is not penalized.
    warm = nn.Linear(768, 3072, device=device, dtype=dtype)
    measure(warm, torch.randn(args.tokens, 768, device=device, dtype=dtype), args.warmup, 3)
    for case in cases():
        o, i = case.shape
        dense = nn.Linear(i, o, device=device, dtype=torch.float32)
        module = case.build(dense).to(dtype=dtype)
        x = torch.randn(args.tokens, i, device=device, dtype=dtype)
        fwd, fwd_bwd = measure(module, x, args.warmup, args.repeats)
        if case.name.startswith("dense"):
            dense_times[case.shape] = (fwd, fwd_bwd)
        ref_fwd, ref_bwd = dense_times[case.shape]
        table.add_row(
            f"[{o}, {i}]",
            case.name,
            case.params,
            f"{fwd * 1e3:.2f}",
            f"{ref_fwd / fwd:.2f}x",
            f"{fwd_bwd * 1e3:.2f}",
            f"{ref_bwd / fwd_bwd:.2f}x",
        )
    return table


def table_markdown(table: Table) -> str:
    headers = [c.header for c in table.columns]
    rows = list(zip(*[c._cells for c in table.columns], strict=True))
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--markdown", default=None, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    table = run(args)
    Console(width=160).print(table)
    if args.markdown:
        command = "python " + " ".join(
            ["bench/bench_layers.py", *(argv if argv is not None else sys.argv[1:])]
        )
        cpu = platform.processor() or platform.machine()
        env = f"torch {torch.__version__}, {cpu}, {torch.get_num_threads()} threads"
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(f"\n### {table.title}\n\n`{command}` ({env})\n\n{table_markdown(table)}\n")


if __name__ == "__main__":
    main()
