"""KronyPT (seed 004): training comparisons of Kronecker-factored MLPs, distilled from the teacher.

Each run replaces MLP matrices W: [out, in] by ``KroneckerLinear`` (W ≈ Σₖ Aₖ ⊗ Bₖ, criterion
``vanloan``) with ``hfcompress.compress_model``, trains the whole model for a few steps with
``DistillationTrainer`` and scores held-out perplexity before and after. Shapes follow the paper's
GPT-2 scheme (§4.1–4.2): an expanding matrix (``gate/up_proj``, ``c_fc``) gets A = (out/f, in),
B = (f, 1), a contracting one (``down_proj``, ``c_proj``) the transpose; every term keeps rank
min(out, in). Comparisons (``--comparisons``): ``init`` Van Loan vs random factors; ``terms`` 1 term
vs k terms with B = (f·k, 1) (A's are the same size; the totals differ by f·(k² − 1) per matrix,
since k·(m1·n1 + m2·n2) has no exactly equal pair for these shapes); ``kd`` alpha 0.5 vs 1.0
(plain CE); ``layers`` the first half of the selected layers vs the second half.

    python examples/kronypt_training.py                            # offline: SmolLM2, Shakespeare
    python examples/kronypt_training.py --comparisons init kd       # a subset
    python examples/kronypt_training.py --model distilgpt2 --dataset wikitext --layers all \\
        --factor 4 --max-steps 2000 --batch-size 16 --block-size 512 --bf16   # online, GPU

Offline: SmolLM2-135M-Instruct (Llama; gate/up_proj [1536, 576], down_proj [576, 1536]) from
``offline_data.smollm2_dir()``, trained on 35 Shakespeare plays, scored on Hamlet and Macbeth.
Online: any hub id (``gpt2``/``distilgpt2``: Conv1D ``c_fc`` [3072, 768] / ``c_proj``, where
``--factor 4`` is the paper's 81M model) and ``--dataset wikitext`` (wikitext-2-raw-v1 through
``datasets``). Writes ``<output>/results.md`` and ``<output>/loss_curves.png``.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from datasets import Dataset
from rich.console import Console
from rich.table import Table
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfcompress
from hfcompress.evaluation import count_parameters, perplexity
from hfcompress.layers import KroneckerLinear, dense_weight_of
from hfcompress.training import DistillationArguments, DistillationTrainer, causal_lm_blocks

# Llama/Mistral/Qwen (model.layers.N.mlp.*) and GPT-2 (transformer.h.N.mlp.c_fc / c_proj)
MLP = re.compile(r"(?:.*\.)?(?:layers|h)\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj|c_fc|c_proj)")
COLUMNS = (
    "comparison",
    "variant",
    "parameters",
    "ppl before training",
    "ppl after",
    "final train loss",
)
COMPARISONS = ("init", "terms", "kd", "layers")


@dataclass(frozen=True)
class Variant:
    """One training run: which layers, factor shapes, initialization and loss."""

    layers: tuple[int, ...]
    factor: int = 2  # f: each compressed matrix keeps ~1/f of its parameters
    terms: int = 1
    init: str = "vanloan"  # or "random"
    alpha: float = 0.5  # hard-label weight; 1.0 is plain cross-entropy


@dataclass
class Settings:
    """Training and evaluation settings shared by every run."""

    max_steps: int = 30
    batch_size: int = 4
    learning_rate: float = 2e-4
    temperature: float = 2.0
    eval_window: int = 256
    bf16: bool = False
    seed: int = 0
    output_dir: Path = field(default_factory=lambda: Path("out/kronypt_training"))


def mlp_matrices(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """MLP matrix name -> (layer index, out, in), W in ``nn.Linear`` layout."""
    found = {}
    for name, module in model.named_modules():
        match = MLP.fullmatch(name)
        if match and not isinstance(module, KroneckerLinear):
            out_f, in_f = dense_weight_of(module).shape
            found[name] = (int(match.group(1)), out_f, in_f)
    return found


def a_shape_for(out_f: int, in_f: int, factor: int, terms: int) -> tuple[int, int]:
    """A's shape: split the long side by f·k, so B is (f·k, 1) or (1, f·k) (paper §4.1–4.2)."""
    split = factor * terms
    if out_f >= in_f:
        if out_f % split:
            raise ValueError(f"factor·terms={split} does not divide out_features={out_f}")
        return (out_f // split, in_f)
    if in_f % split:
        raise ValueError(f"factor·terms={split} does not divide in_features={in_f}")
    return (out_f, in_f // split)


def kronecker_recipe(model: nn.Module, variant: Variant) -> dict:
    """An hfcompress recipe: one ``kronecker`` stage per A shape, over the variant's layers."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, (layer, out_f, in_f) in mlp_matrices(model).items():
        if layer in variant.layers:
            a_shape = a_shape_for(out_f, in_f, variant.factor, variant.terms)
            groups.setdefault(a_shape, []).append(re.escape(name))
    return {
        "stages": [
            {
                "method": "kronecker",
                "targets": "|".join(names),
                "a_shape": list(a_shape),
                "terms": variant.terms,
                "criterion": "vanloan",
            }
            for a_shape, names in groups.items()
        ]
    }


def random_init_(student: nn.Module, teacher: nn.Module, seed: int = 0) -> None:
    """Redraw every KroneckerLinear's A and B from N(0, σ²), keeping the dense bias.

    With Aₖ entries of variance σ_A² and Bₖ of σ_B², E‖Σₖ Aₖ ⊗ Bₖ‖²_F = k·m·n·σ_A²·σ_B². The
    scales are chosen so that E‖Aₖ‖²_F = E‖Bₖ‖²_F = ‖W‖_F / √k: the product then has the dense
    weight's Frobenius norm (so, for roughly isotropic inputs, its output variance), and the
    norm is split evenly between A and B as in the Van Loan factors (Aₖ = √σₖ·uₖ, Bₖ = √σₖ·vₖ).
    Both inits thus start at the same scale and get the same optimizer steps; only the
    direction differs.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, module in student.named_modules():
        if not isinstance(module, KroneckerLinear):
            continue
        norm = float(dense_weight_of(teacher.get_submodule(name)).detach().float().norm())
        per_factor = norm / math.sqrt(module.terms)
        with torch.no_grad():
            for factor in (module.A, module.B):
                size = factor.shape[1] * factor.shape[2]
                draw = torch.randn(factor.shape, generator=generator) * math.sqrt(per_factor / size)
                factor.copy_(draw.to(factor.dtype))


def held_out_ppl(model: nn.Module, ids: torch.Tensor, window: int) -> float:
    stride = max(1, window // 2)
    return perplexity(model, ids, max_length=window, stride=stride, progress=False).perplexity


def comparison_variants(
    layers: tuple[int, ...], factor: int, multi_terms: int, comparisons: tuple[str, ...]
) -> list[tuple[str, str, Variant]]:
    """(comparison, label, Variant) per requested comparison. The baseline (Van Loan, 1 term,
    KD, all selected layers) appears in three comparisons and is trained once."""
    base = Variant(layers=layers, factor=factor)
    half = len(layers) // 2
    early, late = layers[:half], layers[half : 2 * half]
    every = {
        "init": [("Van Loan", base), ("random", replace(base, init="random"))],
        "terms": [
            ("1 term", base),
            (f"{multi_terms} terms", replace(base, terms=multi_terms)),
        ],
        "kd": [("KD (alpha 0.5)", base), ("CE (alpha 1.0)", replace(base, alpha=1.0))],
        "layers": [
            (f"early half (layers {_names(early)})", replace(base, layers=early)),
            (f"late half (layers {_names(late)})", replace(base, layers=late)),
        ],
    }
    return [(c, label, v) for c in comparisons for label, v in every[c]]


def _names(layers: tuple[int, ...]) -> str:
    if layers == tuple(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}–{layers[-1]}"
    return ",".join(map(str, layers))


def final_ce(log_history: list[dict]) -> float:
    """The hard-label CE of the last logging window (comparable between KD and CE runs)."""
    values = [entry["loss_ce"] for entry in log_history if "loss_ce" in entry]
    return values[-1] if values else float("nan")


def train_variant(
    teacher: nn.Module,
    blocks: Dataset,
    eval_ids: torch.Tensor,
    variant: Variant,
    settings: Settings,
) -> tuple[dict, list[dict]]:
    """Compress a copy of the teacher, score it, train it, score it again.

    Returns:
        ``({"parameters", "ppl before training", "ppl after", "final train loss"}, log_history)``.
    """
    torch.manual_seed(settings.seed)
    student = copy.deepcopy(teacher)
    hfcompress.compress_model(student, kronecker_recipe(student, variant), progress=False)
    if variant.init == "random":
        random_init_(student, teacher, settings.seed)
    before = held_out_ppl(student, eval_ids, settings.eval_window)
    args = DistillationArguments(
        output_dir=str(settings.output_dir / "run"),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, settings.max_steps // 10),
        weight_decay=0.0,
        alpha=variant.alpha,
        temperature=settings.temperature,
        logging_steps=max(1, settings.max_steps // 15),
        save_strategy="no",
        report_to=[],
        bf16=settings.bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=settings.seed,  # the same batches in the same order for every run
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=blocks)
    trainer.train()
    student.eval()
    row = {
        "parameters": count_parameters(student).total,
        "ppl before training": before,
        "ppl after": held_out_ppl(student, eval_ids, settings.eval_window),
        "final train loss": final_ce(trainer.state.log_history),
    }
    return row, trainer.state.log_history


def run_comparisons(
    teacher: nn.Module,
    blocks: Dataset,
    eval_ids: torch.Tensor,
    settings: Settings,
    *,
    layers: tuple[int, ...] | None = None,
    factor: int = 2,
    multi_terms: int = 2,
    comparisons: tuple[str, ...] = COMPARISONS,
) -> tuple[list[dict], dict[str, dict[str, list[dict]]]]:
    """All requested comparisons; ``layers`` defaults to every layer with an MLP.

    Returns:
        The table rows (keys :data:`COLUMNS`; first a ``reference`` row for the dense teacher)
        and, per comparison, each variant's ``log_history``.
    """
    if layers is None:
        layers = tuple(sorted({layer for layer, _, _ in mlp_matrices(teacher).values()}))
    dense = held_out_ppl(teacher, eval_ids, settings.eval_window)
    rows = [
        dict(
            zip(
                COLUMNS,
                ("reference", "dense teacher", count_parameters(teacher).total, dense, dense, None),
                strict=True,
            )
        )
    ]
    done: dict[Variant, tuple[dict, list[dict]]] = {}
    histories: dict[str, dict[str, list[dict]]] = {}
    for comparison, label, variant in comparison_variants(layers, factor, multi_terms, comparisons):
        if variant not in done:
            start = time.perf_counter()
            done[variant] = train_variant(teacher, blocks, eval_ids, variant, settings)
            print(f"[{comparison} / {label}] {time.perf_counter() - start:.0f} s", flush=True)
        result, history = done[variant]
        rows.append({"comparison": comparison, "variant": label, **result})
        histories.setdefault(comparison, {})[label] = history
    return rows, histories


def load_texts(dataset: str, train_tokens: int) -> tuple[Dataset, str]:
    """Training texts (about ``train_tokens`` tokens) and one held-out text."""
    if dataset == "wikitext":
        from datasets import load_dataset

        data = load_dataset("wikitext", "wikitext-2-raw-v1")
        train, chars = [], 0
        for text in data["train"]["text"]:
            train.append(text)
            chars += len(text)
            if chars >= train_tokens * 4:  # ~4 characters per token
                break
        return Dataset.from_dict({"text": train}), "\n\n".join(data["test"]["text"])
    from offline_data import shakespeare_train_and_heldout

    train, heldout = shakespeare_train_and_heldout(train_tokens * 4)  # ~4 characters per token
    return Dataset.from_dict({"text": train}), heldout


def write_results(rows: list[dict], output: Path, title: str) -> str:
    """The rich table on the console and the markdown table in ``<output>/results.md``."""

    def cells(row: dict) -> list[str]:
        loss = row["final train loss"]
        return [
            row["comparison"],
            row["variant"],
            f"{row['parameters']:,}",
            f"{row['ppl before training']:.2f}",
            f"{row['ppl after']:.2f}",
            "-" if loss is None else f"{loss:.3f}",
        ]

    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in COLUMNS[:2] else "right")
    for row in rows:
        table.add_row(*cells(row))
    Console(width=140).print(table)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n"
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.md").write_text(markdown, encoding="utf-8")
    return markdown


def plot_curves(histories: dict[str, dict[str, list[dict]]], path: Path) -> None:
    """One subplot per comparison: training CE (``loss_ce``) against the step, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = max(1, len(histories))
    cols = min(2, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax, (comparison, variants) in zip(axes.flat, histories.items(), strict=False):
        for label, history in variants.items():
            points = [(e["step"], e["loss_ce"]) for e in history if "loss_ce" in e]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=label)
        ax.set_title(comparison)
        ax.set_xlabel("step")
        ax.set_ylabel("train cross-entropy")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="folder or hub id (default: SmolLM2-135M)")
    parser.add_argument("--dataset", choices=("shakespeare", "wikitext"), default="shakespeare")
    parser.add_argument("--comparisons", nargs="+", choices=COMPARISONS, default=COMPARISONS)
    parser.add_argument("--factor", type=int, default=2, help="f: B is (f, 1) for 1 term")
    parser.add_argument("--multi-terms", type=int, default=2, help="k of the multi-term run")
    parser.add_argument(
        "--layers",
        default=None,
        help="layers to compress: 'all', '0-11' or '0,4,8' (default: "
        "every --layer-step-th layer from 0)",
    )
    parser.add_argument("--layer-step", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens scored")
    parser.add_argument("--eval-window", type=int, default=256)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("out/kronypt_training"))
    return parser.parse_args()


def parse_layers(text: str | None, num_layers: int, step: int) -> tuple[int, ...]:
    if text is None:
        return tuple(range(0, num_layers, step))
    if text == "all":
        return tuple(range(num_layers))
    layers: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        layers += range(int(first), int(last or first) + 1)
    return tuple(sorted(set(layers)))


def main() -> None:
    args = parse_args()
    model_path = args.model
    if model_path is None:
        from offline_data import smollm2_dir

        model_path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # fp32 weights; --bf16 is the Trainer's autocast (factors and optimizer states stay fp32)
    teacher = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    if torch.cuda.is_available():
        teacher.to("cuda")
    # one pass over fresh text: no block is seen twice
    train_tokens = int(1.2 * args.max_steps * args.batch_size * args.block_size)
    train_text, heldout = load_texts(args.dataset, train_tokens)
    blocks = causal_lm_blocks(train_text, tokenizer, block_size=args.block_size)
    eval_ids = tokenizer(heldout, return_tensors="pt").input_ids[:, : args.eval_tokens]
    settings = Settings(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        temperature=args.temperature,
        eval_window=args.eval_window,
        bf16=args.bf16,
        seed=args.seed,
        output_dir=args.output,
    )
    rows, histories = run_comparisons(
        teacher,
        blocks,
        eval_ids,
        settings,
        layers=parse_layers(args.layers, teacher.config.num_hidden_layers, args.layer_step),
        factor=args.factor,
        multi_terms=args.multi_terms,
        comparisons=tuple(args.comparisons),
    )
    name = Path(str(model_path)).name
    title = (
        f"KronyPT training comparisons: {name}, MLP Kronecker f={args.factor}, "
        f"{args.max_steps} steps, held-out ppl ({args.dataset})"
    )
    write_results(rows, args.output, title)
    plot_curves(histories, args.output / "loss_curves.png")


if __name__ == "__main__":
    main()
