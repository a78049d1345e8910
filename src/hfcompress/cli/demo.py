"""``hfcompress demo`` and ``hfcompress shapes``: nothing to load, nothing to write."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from hfcompress import HfCompressError, compress_model
from hfcompress.cli._common import positive_int
from hfcompress.decompose import kronecker_shapes

# The demo's default recipe: one stage per method, and a composed one (prune the low-rank factors).
DEMO_RECIPE: dict[str, object] = {
    "stages": [
        {"method": "lowrank", "targets": r"transformer\.h\.\d+\.mlp\.c_fc", "ratio": 0.5},
        {"method": "prune", "targets": r"transformer\.h\.\d+\.mlp\.c_fc", "sparsity": 0.3},
        {
            "method": "kronecker",
            "targets": r"transformer\.h\.\d+\.mlp\.c_proj",
            "a_shape": [64, 256],
            "terms": 2,
        },
        {"method": "prune", "targets": r"transformer\.h\.\d+\.attn\.c_attn", "sparsity": 0.5},
        {"method": "prune", "targets": r"transformer\.h\.\d+\.attn\.c_proj", "pattern": "2:4"},
    ],
    "exclude": "lm_head",
}


def demo_model(seed: int = 0) -> GPT2LMHeadModel:
    """A small GPT-2 (4 layers, width 256) built from a config with a fixed seed."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=4,
        n_embd=256,
        n_head=4,
        n_positions=128,
        vocab_size=1000,
        bos_token_id=999,
        eos_token_id=999,
    )
    return GPT2LMHeadModel(config).eval()


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6


def run_demo(console: Console, seed: int = 0) -> None:
    """Compress the demo model with ``DEMO_RECIPE``, print the report, check a round trip."""
    model = demo_model(seed)
    tokens = torch.randint(
        0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        dense_logits = model(tokens).logits
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "dense")
        dense_mb = _folder_mb(Path(tmp) / "dense")
        report = compress_model(model, DEMO_RECIPE)
        table = report.table()
        table.title = (
            "hfcompress demo: GPT-2 (4 layers, width 256) built from a config, random weights"
        )
        console.print(table)
        with torch.no_grad():
            logits = model(tokens).logits
        with console.status("saving and reloading"):
            model.save_pretrained(Path(tmp) / "compressed")
            reloaded = AutoModelForCausalLM.from_pretrained(Path(tmp) / "compressed").eval()
            with torch.no_grad():
                same = torch.equal(reloaded(tokens).logits, logits)
        compressed_mb = _folder_mb(Path(tmp) / "compressed")
    drift = ((logits - dense_logits).norm() / dense_logits.norm()).item()
    console.print(
        f"checkpoint: {dense_mb:.2f} MB dense → {compressed_mb:.2f} MB compressed "
        f"({compressed_mb / dense_mb:.2f}x); reloaded with AutoModelForCausalLM.from_pretrained: "
        f"{'identical logits' if same else 'LOGITS DIFFER'}"
    )
    console.print(
        f"relative logit change from compression: {drift:.3f} (random weights, no training)"
    )
    if not same:
        raise HfCompressError("demo: the reloaded model's logits differ from the saved model's")


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    run_demo(console, seed=args.seed)
    return 0


def cmd_shapes(args: argparse.Namespace, console: Console) -> int:
    shapes = kronecker_shapes(args.out_features, args.in_features)
    if args.min_rank:
        shapes = [s for s in shapes if s.max_rank >= args.min_rank]
    table = Table(title=f"Kronecker factor shapes for W [{args.out_features}, {args.in_features}]")
    for col in ["A (m1, n1)", "B (m2, n2)", "params / term", "max rank / term", "kept"]:
        table.add_column(col, justify="right")
    dense = args.out_features * args.in_features
    for s in shapes[: args.limit]:
        table.add_row(
            str(s.a_shape),
            str(s.b_shape),
            f"{s.params:,}",
            f"{s.max_rank:,}",
            f"{s.params / dense:.4%}",
        )
    console.print(table)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="compress a small config-built GPT-2 (no network needed)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    shapes = sub.add_parser("shapes", help="list Kronecker factor shapes of an [OUT, IN] weight")
    shapes.add_argument("out_features", type=positive_int, metavar="OUT")
    shapes.add_argument("in_features", type=positive_int, metavar="IN")
    shapes.add_argument(
        "--min-rank", type=positive_int, default=None, help="only shapes reaching this rank"
    )
    shapes.add_argument("--limit", type=positive_int, default=40, help="rows to show (default 40)")
    shapes.set_defaults(func=cmd_shapes)
