"""Seed 000 (Kolev et al., "Combining Improvements in the Compression of LLMs"), Table 2.

Three compressions of one causal LM, each trained back by knowledge distillation from the dense
teacher (α·CE + (1 − α)·T²·KL), at the same number of non-zero parameters in the targeted weights:

* **pruning**: 50% unstructured magnitude pruning reached on Zhu & Gupta's cubic schedule, then the
  mask is locked (Prune Once For All's pattern lock, paper §4) for the rest of training;
* **low rank**: progressive low-rank decomposition (Hajimolahoseini et al., paper §4): an exact
  full-rank SVD W = U·V (U: [out, r], V: [r, in], r = min(out, in)), whose rank is cut by 0.8×
  every few steps down to r = ⌊0.5·out·in/(out + in)⌋ (half the parameters), with KD in between;
* **pruning + low rank**: progressive low rank down to 0.8 of the parameters in the first half of
  the steps, then the factors U and V pruned gradually to 37.5% with pattern lock in the second
  half (a second KD run): 0.8 × 0.625 = 0.5 of the parameters.

Sparsity and rank schedules end at 70% of a run; the rest trains the final structure. Parameters
are counted non-zero (masked weights excluded, tied embeddings once), for the whole model.

Targets: by default the MLP linears of every decoder block (Llama ``gate/up/down_proj``, GPT-2
``c_fc/c_proj`` Conv1D, OPT ``fc1/fc2``; see ``TARGETS``), where most parameters are; ``--targets``
takes any regex (re.fullmatch on module names), e.g. all decoder linears. Embeddings and lm_head
stay dense.

    python examples/kolev_combined.py     # offline: SmolLM2-135M, Shakespeare, 40 steps per row
    python examples/kolev_combined.py --model distilgpt2 --dataset wikitext \\
        --max-steps 2000 --batch-size 16 --block-size 512 --bf16   # the paper's setting, on a GPU

The offline default needs about 3 × 40 steps × ~5 s on 2 idle CPU cores (≈ 12–15 min with the
evaluations); on a shared machine ``OMP_NUM_THREADS=1`` avoids oversubscription. ``--bf16``
trains fp32 weights under bf16 autocast. Held-out perplexity is on plays never trained on (Hamlet,
Macbeth) offline, and on the WikiText-103 test split with ``--dataset wikitext`` (needs the hub).
Writes ``<output>/results.md`` (the table) and ``<output>/loss_curves.png`` (training loss of the
three runs, from ``trainer.state.log_history``).
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import hfcompress
from hfcompress.decompose import rank_for_ratio
from hfcompress.evaluation import count_parameters, perplexity
from hfcompress.layers import LowRankLinear, PrunedLinear, dense_weight_of
from hfcompress.surgery import compressible_modules, record_compression
from hfcompress.training import (
    CompressionLoggingCallback,
    DistillationArguments,
    DistillationTrainer,
    GradualPruningCallback,
    ProgressiveRankCallback,
    causal_lm_blocks,
)

COLUMNS = ("method", "parameters (non-zero)", "compression ratio", "held-out perplexity")
COLUMNS += ("training time (s)",)
# MLP linears by model_type; Conv1D (GPT-2) weights are [in, out] but hfcompress handles both.
_LLAMA_MLP = r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj"
TARGETS = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"), _LLAMA_MLP),
    "gpt2": r"transformer\.h\.\d+\.mlp\.(c_fc|c_proj)",
    "opt": r"model\.decoder\.layers\.\d+\.(fc1|fc2)",
}
LOCK_AT = 0.7  # sparsity / rank schedules end at 70% of a run; the rest trains the final structure


@dataclass
class Settings:
    """The run's knobs; the defaults are the 2-core CPU setting (see ``main``)."""

    targets: str
    max_steps: int = 40
    batch_size: int = 4
    block_size: int = 128
    learning_rate: float = 2e-4
    alpha: float = 0.5  # weight of the hard-label CE; 1 − α goes to the teacher's KL
    temperature: float = 2.0
    sparsity: float = 0.5  # pruning row
    lowrank_ratio: float = 0.5  # low-rank row: fraction of the targets' parameters kept
    combo_ratio: float = 0.8  # combined row: low rank first, then factor sparsity 1 − 0.5/0.8
    rank_factor: float = 0.8  # progressive low rank: r ← ⌊0.8·r⌋ per reduction
    eval_window: int = 512
    logging_steps: int = 2
    bf16: bool = False
    output: Path = field(default_factory=lambda: Path("out/kolev_combined"))

    @property
    def combo_sparsity(self) -> float:
        return 1.0 - (1.0 - self.sparsity) / self.combo_ratio


def default_targets(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in TARGETS:
        raise SystemExit(f"no default targets for model_type={model_type!r}; pass --targets REGEX")
    return TARGETS[model_type]


class RatioRankCallback(ProgressiveRankCallback):
    """Progressive low rank whose floor is each layer's rank at a *parameter* ratio.

    ``ProgressiveRankCallback`` floors all layers at one rank or one fraction of full rank;
    the recipes' ``ratio`` (r = ⌊ratio·out·in/(out + in)⌋) differs between shapes, so the floor
    is overridden per layer.
    """

    def __init__(self, ratio: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ratio = ratio

    def floor(self, layer: LowRankLinear) -> int:
        return rank_for_ratio(layer.out_features, layer.in_features, self.ratio)


def full_rank_recipe(model: nn.Module, targets: str) -> dict[str, Any]:
    """SVD at full rank min(out, in) on every target: exact, so training starts at the teacher."""
    ranks = {
        name: min(dense_weight_of(model.get_submodule(name)).shape)
        for name in compressible_modules(model)
        if re.fullmatch(targets, name)
    }
    top = max(ranks.values(), default=1)
    overrides = {re.escape(n): {"rank": r} for n, r in ranks.items() if r != top}
    stage = {"method": "lowrank", "targets": targets, "rank": top, "overrides": overrides}
    return {"stages": [stage]}


def rank_schedule(model: nn.Module, ratio: float, factor: float, steps: int) -> RatioRankCallback:
    """Reductions spaced so that the deepest layer reaches its floor by ``LOCK_AT`` of ``steps``."""
    needed = max(
        math.ceil(
            math.log(rank_for_ratio(m.out_features, m.in_features, ratio) / m.rank)
            / math.log(factor)
        )
        for m in model.modules()
        if isinstance(m, LowRankLinear)
    )
    every = max(1, int(LOCK_AT * steps) // max(needed, 1))
    return RatioRankCallback(ratio, every=every, factor=factor)


def finish_ranks(model: nn.Module, ratio: float, console: Console) -> None:
    """If a short run ended above the floor, truncate there, so the row has its stated size."""
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            floor = rank_for_ratio(m.out_features, m.in_features, ratio)
            if m.rank > floor:
                console.print(f"[yellow]{name}: rank {m.rank} → {floor} after training")
                m.truncate(floor)


def pruning_schedule(final: float, steps: int) -> GradualPruningCallback:
    end = max(1, int(LOCK_AT * steps))
    return GradualPruningCallback(
        0.0, final, start_step=0, end_step=end, update_every=max(1, end // 5)
    )


def distill(
    student: nn.Module,
    teacher: nn.Module,
    blocks: Any,
    settings: Settings,
    callback: Any,
    steps: int,
    seed: int,
) -> list[dict[str, float]]:
    """KD training of ``student`` for ``steps`` steps; returns the Trainer's log history."""
    args = DistillationArguments(
        output_dir=str(settings.output / "run"),
        max_steps=steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        alpha=settings.alpha,
        temperature=settings.temperature,
        logging_steps=settings.logging_steps,
        save_strategy="no",
        report_to=[],
        bf16=settings.bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=blocks,
        callbacks=[callback, CompressionLoggingCallback()],
    )
    trainer.train()
    student.eval()
    return trainer.state.log_history


def compress_and_train(
    method: str, teacher: nn.Module, blocks: Any, settings: Settings, console: Console
) -> tuple[nn.Module, list[dict[str, float]], float]:
    """One row's student, its log history (steps continue across phases) and wall-clock seconds
    (surgery + KD training)."""
    start = time.perf_counter()
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    targets, steps = settings.targets, settings.max_steps

    def train(callback: Any, n: int, seed: int = 0) -> list[dict[str, float]]:
        return distill(student, teacher, blocks, settings, callback, n, seed)

    if method == "pruning":
        prune = {"method": "prune", "targets": targets, "sparsity": 0.0}
        hfcompress.compress_model(student, {"stages": [prune]}, progress=False)
        return student, train(pruning_schedule(settings.sparsity, steps), steps), _since(start)
    recipe = full_rank_recipe(student, targets)
    hfcompress.compress_model(student, recipe, progress=False)
    if method == "low rank":
        ratio = settings.lowrank_ratio
        history = train(rank_schedule(student, ratio, settings.rank_factor, steps), steps)
        finish_ranks(student, ratio, console)
        return student, history, _since(start)
    # ProgressiveRankCallback cannot lower the rank of PrunedLinear factors (truncate refuses)
    # and GradualPruningCallback needs PrunedLinear layers when training starts: so two KD
    # phases, low rank to combo_ratio, then the factors pruned to combo_sparsity and locked.
    first, second = steps // 2, steps - steps // 2
    ratio = settings.combo_ratio
    history = train(rank_schedule(student, ratio, settings.rank_factor, first), first)
    finish_ranks(student, ratio, console)
    wrap_factors(student)
    later = train(pruning_schedule(settings.combo_sparsity, second), second, seed=1)
    history += [{**e, "step": e["step"] + first} for e in later]
    return student, history, _since(start)


def _since(start: float) -> float:
    return time.perf_counter() - start


def wrap_factors(model: nn.Module) -> None:
    """Make every low-rank factor a ``PrunedLinear`` at sparsity 0, as a prune stage would.

    Not through ``compress_model``: its tied-weight check keys on ``id(module.weight)``, which
    for a ``LowRankLinear`` is a fresh U·V per access whose id Python may reuse, so distinct
    layers can look tied and be skipped at random (reported as a library bug).
    """
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            m.u = PrunedLinear.from_module(m.u, sparsity=0.0)
            m.v = PrunedLinear.from_module(m.v, sparsity=0.0)
    record_compression(model)


def targeted_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros in the pruned weights, counted from the weights (0 if none)."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, PrunedLinear)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / max(1, sum(w.numel() for w in weights))


def run_experiment(
    teacher: nn.Module,
    train_blocks: Any,
    eval_ids: torch.Tensor,
    settings: Settings,
    console: Console | None = None,
    keep_students: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, float]]]]:
    """Table 2's rows (dense teacher, then the three methods) and each run's log history.

    Args:
        teacher: the dense causal LM (left unchanged; each student is a deep copy).
        train_blocks: causal-LM blocks (``causal_lm_blocks``) for distillation.
        eval_ids: held-out token ids [1, T] for sliding-window perplexity.
        keep_students: put each compressed model in its row under ``"student"``.
    """
    console = console or Console()
    teacher.eval()
    window = min(settings.eval_window, eval_ids.shape[-1])

    def ppl(model: nn.Module) -> float:
        return perplexity(model, eval_ids, window, max(1, window // 2), progress=False).perplexity

    dense = count_parameters(teacher).nonzero
    rows = [dict(zip(COLUMNS, ("dense teacher", dense, 1.0, ppl(teacher), 0.0), strict=True))]
    histories: dict[str, list[dict[str, float]]] = {}
    for method in ("pruning", "low rank", "pruning + low rank"):
        console.print(f"[bold]{method}[/]: compress, distill {settings.max_steps} steps")
        student, histories[method], seconds = compress_and_train(
            method, teacher, train_blocks, settings, console
        )
        params = count_parameters(student).nonzero
        values = (method, params, dense / params, ppl(student), seconds)
        rows.append(dict(zip(COLUMNS, values, strict=True)))
        rows[-1]["ranks"] = sorted({m.rank for m in student.modules() if hasattr(m, "rank")})
        rows[-1]["targeted sparsity"] = targeted_sparsity(student)
        if keep_students:
            rows[-1]["student"] = student
    return rows, histories


def formatted(row: dict[str, Any]) -> list[str]:
    """A row's cells, as printed and written."""
    name, params, ratio, ppl, seconds = (row[c] for c in COLUMNS)
    return [name, f"{params:,}", f"{ratio:.2f}x", f"{ppl:.2f}", f"{seconds:.0f}"]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(formatted(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_losses(histories: dict[str, list[dict[str, float]]], path: Path, switch: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7, 4))
    for method, history in histories.items():
        points = [(e["step"], e["loss"]) for e in history if "loss" in e]
        ax.plot(*zip(*points, strict=True), marker=".", label=method)
    ax.axvline(switch, color="grey", linestyle=":", label="combined: low rank → prune factors")
    ax.set(
        xlabel="step",
        ylabel="training loss (α·CE + (1−α)·T²·KL)",
        title="Seed 000: KD after compression",
    )
    ax.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def load_data(tokenizer: Any, dataset: str, train_tokens: int, eval_tokens: int) -> tuple:
    """(training text Dataset, held-out ids [1, eval_tokens]); ~4 characters per token."""
    from datasets import Dataset, load_dataset

    budget = train_tokens * 4
    if dataset == "wikitext":
        wiki = load_dataset("Salesforce/wikitext", "wikitext-103-raw-v1")
        train, heldout = [], "".join(wiki["test"][:20000]["text"])
        for row in wiki["train"]:
            train.append(row["text"])
            budget -= len(row["text"])
            if budget <= 0:
                break
    else:
        from offline_data import shakespeare_train_and_heldout

        train, heldout = shakespeare_train_and_heldout(budget)
    ids = tokenizer(heldout[: eval_tokens * 8], return_tensors="pt").input_ids[:, :eval_tokens]
    return Dataset.from_dict({"text": train}), ids


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="folder or hub id (default: SmolLM2-135M)")
    parser.add_argument("--dataset", choices=("shakespeare", "wikitext"), default="shakespeare")
    parser.add_argument("--targets", default=None, help="regex of modules (default: MLP linears)")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--train-tokens", type=int, default=100_000)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output", type=Path, default=Path("out/kolev_combined"))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model is None:
        from offline_data import smollm2_dir

        args.model = smollm2_dir()
    console = Console(width=120)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # fp32 weights; --bf16 trains under bf16 autocast (the teacher's forward too)
    teacher = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    if torch.cuda.is_available():
        teacher.to("cuda")
    text, eval_ids = load_data(tokenizer, args.dataset, args.train_tokens, args.eval_tokens)
    settings = Settings(
        targets=args.targets or default_targets(teacher),
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        learning_rate=args.learning_rate,
        bf16=args.bf16,
        output=args.output,
    )
    blocks = causal_lm_blocks(text, tokenizer, block_size=args.block_size)
    console.print(f"targets: {settings.targets!r}; {len(blocks)} training blocks")
    rows, histories = run_experiment(
        teacher, blocks, eval_ids.to(teacher.device), settings, console
    )

    table = Table(title=f"Seed 000 Table 2 on {Path(str(args.model)).name}, {args.max_steps} steps")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in rows:
        table.add_row(*formatted(r))
    console.print(table)
    for r in rows[1:]:
        console.print(
            f"{r['method']}: pruned-weight sparsity {r['targeted sparsity']:.4f}, "
            f"ranks {r['ranks'] or '-'}"
        )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.md").write_text(markdown_table(rows), encoding="utf-8")
    plot_losses(histories, args.output / "loss_curves.png", args.max_steps // 2)
    console.print(f"wrote {args.output / 'results.md'} and {args.output / 'loss_curves.png'}")


if __name__ == "__main__":
    main()
