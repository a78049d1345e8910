"""KronyPT (seed 004), Table 2: GPT-2 small sizes with Kronecker-factored MLP weights.

Only ``c_fc`` [3072, 768] and ``c_proj`` [768, 3072] of the 12 blocks are factored (attention and
embeddings stay dense), as in the paper. For ``c_fc`` the factor A has shape ``a_shape`` and B is
(3072/m1, 768/n1); ``c_proj`` uses the transposed shapes. Parameter counts are exact: the model
is built from ``GPT2Config()`` on the meta device (no weights, no download) and the layers are
hfcompress ``KroneckerLinear`` modules, so the count is the library's, not a formula.

    python examples/kronypt_gpt2.py                  # the table, written to out/kronypt/table2.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import GPT2Config, GPT2LMHeadModel

from hfcompress.decompose import kronecker_shapes
from hfcompress.layers import KroneckerLinear

# KronyPT Table 2 (a selection): A's shape for c_fc -> GPT-2 size in the paper.
PAPER = {
    (64, 32): 67_893_504,
    (128, 64): 68_020_224,
    (1024, 256): 74_108_376,
    (768, 384): 74_894_784,
    (768, 768): 81_972_576,
    (1536, 384): 81_972_576,
    (1024, 768): 86_691_144,
    (1536, 768): 96_128_304,
}


def model_size(a_shape: tuple[int, int], terms: int = 1) -> int:
    """Parameters of GPT-2 small with Kronecker c_fc / c_proj (tied lm_head counted once)."""
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    for block in model.transformer.h:
        block.mlp.c_fc = KroneckerLinear(768, 3072, a_shape, terms, source="conv1d", device="meta")
        transposed = (a_shape[1], a_shape[0])
        block.mlp.c_proj = KroneckerLinear(
            3072, 768, transposed, terms, source="conv1d", device="meta"
        )
    return sum(p.numel() for p in model.parameters())


def table2() -> list[dict[str, object]]:
    """One row per a_shape of the paper's table, with our count beside the paper's."""
    shapes = {s.a_shape: s for s in kronecker_shapes(3072, 768)}
    return [
        {
            "a_shape": a_shape,
            "b_shape": shapes[a_shape].b_shape,
            "params_per_term": shapes[a_shape].params,
            "max_rank": shapes[a_shape].max_rank,
            "model_size": model_size(a_shape),
            "paper": paper,
        }
        for a_shape, paper in PAPER.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=Path("out/kronypt"))
    args = parser.parse_args()
    rows = table2()
    table = Table(title="KronyPT Table 2: GPT-2 small with Kronecker c_fc / c_proj")
    for column in ("A (c_fc)", "B", "params / layer", "max rank", "model size", "paper", "match"):
        table.add_column(column, justify="right")
    lines = [
        "| A (c_fc) | B | params / layer | max rank | model size | paper | match |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            str(r["a_shape"]),
            str(r["b_shape"]),
            f"{r['params_per_term']:,}",
            str(r["max_rank"]),
            f"{r['model_size']:,}",
            f"{r['paper']:,}",
            "yes" if r["model_size"] == r["paper"] else "NO",
        ]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    Console(width=120).print(table)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "table2.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
