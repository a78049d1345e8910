"""The ``hfcompress`` command line: a thin wrapper over the library.

Subcommands:
    demo          compress a small config-built GPT-2 with a default recipe (no network)
    shapes OUT IN list the Kronecker factor shapes of an [OUT, IN] weight
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from hfcompress._version import __version__
from hfcompress.decompose import kronecker_shapes
from hfcompress.errors import HfCompressError
from hfcompress.layers import (
    CompressedLayer,
    KroneckerLinear,
    LowRankLinear,
    PrunedLinear,
    dense_weight_of,
)

# The demo's default recipe, per module-name suffix in each GPT-2 block.
DEMO_RECIPE: dict[str, tuple[type[CompressedLayer], dict[str, object]]] = {
    "attn.c_attn": (PrunedLinear, {"sparsity": 0.5}),
    "attn.c_proj": (PrunedLinear, {"pattern": "2:4"}),
    "mlp.c_fc": (LowRankLinear, {"ratio": 0.5}),
    "mlp.c_proj": (KroneckerLinear, {"a_shape": (64, 256), "terms": 2}),
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


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def run_demo(console: Console, seed: int = 0) -> Table:
    """Compress the demo model in place and return the per-module summary table."""
    model = demo_model(seed)
    tokens = torch.randint(
        0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        dense_logits = model(tokens).logits
    table = Table(title="hfcompress demo: GPT-2 (4 layers, width 256) from a config")
    for col, justify in [
        ("module", "left"),
        ("method", "left"),
        ("W [out, in]", "left"),
        ("params before", "right"),
        ("params after", "right"),
        ("setting", "left"),
        ("rel. error ‖W−Ŵ‖/‖W‖", "right"),
    ]:
        table.add_column(col, justify=justify)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if any(name.endswith(suffix) for suffix in DEMO_RECIPE)
    ]
    total_before = sum(p.numel() for p in model.parameters())
    with console.status("decomposing layers"):
        for name, module in targets:
            suffix = next(s for s in DEMO_RECIPE if name.endswith(s))
            cls, params = DEMO_RECIPE[suffix]
            W = dense_weight_of(module).detach()
            layer = cls.from_module(module, **params)
            _replace(model, name, layer)
            error = (
                torch.linalg.matrix_norm(W - layer.dense_weight().detach())
                / torch.linalg.matrix_norm(W)
            ).item()
            before = module.weight.numel() + module.bias.numel()
            table.add_row(
                name,
                cls.__name__,
                f"[{W.shape[0]}, {W.shape[1]}]",
                f"{before:,}",
                f"{layer.nonzero_param_count():,}",
                ", ".join(f"{k}={v}" for k, v in layer.compression_params().items()),
                f"{error:.3f}",
            )
    total_after = sum(
        m.nonzero_param_count() for m in model.modules() if isinstance(m, CompressedLayer)
    )
    total_after += sum(
        p.numel()
        for n, p in model.named_parameters()
        if not any(n.startswith(t + ".") for t, _ in targets)
    )
    with torch.no_grad():
        logits = model(tokens).logits
    drift = ((logits - dense_logits).norm() / dense_logits.norm()).item()
    table.caption = (
        f"model parameters (non-zero): {total_before:,} → {total_after:,} "
        f"({total_before / total_after:.2f}x); relative logit change {drift:.3f} "
        "(untrained, random weights)"
    )
    return table


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    console.print(run_demo(console, seed=args.seed))
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


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfcompress", description="Compress HuggingFace transformers models."
    )
    parser.add_argument("--version", action="version", version=f"hfcompress {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Logs and CI are not terminals; rich would wrap tables at 80 columns there.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    func: Callable[[argparse.Namespace, Console], int] = args.func
    try:
        return func(args, console)
    except HfCompressError as error:
        if args.debug:
            raise
        print(f"hfcompress {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
