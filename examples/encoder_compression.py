"""Seed 003: compress an encoder classifier five ways; compare accuracy, size and CPU speed.

Singh, Kapse & Rane, "An In-depth Assessment of Compression Methods on LLMs" (CSE598, ASU):
BERT / ALBERT / RoBERTa on SST-2, each quantized, pruned and distilled, with accuracy, model size
(MB) and speedup in Table 1, size vs accuracy in a scatter plot (Figure 2) and all three on
parallel coordinates (Figure 3). Here one encoder is fine-tuned, then compressed by 50%
unstructured pruning (gradual, Zhu & Gupta), 2:4 pruning, low rank (ratio 0.5) and Kronecker
factors (2 terms, B: 2×2), each at half the parameters of the encoder's Linear layers and
recovered by a short distillation from the dense model; a half-depth student (every other layer,
initialized from the teacher's, logits + hidden-state KD); and int8 dynamic quantization of every
nn.Linear (CPU, no training) as a reference row.

Offline task: the First Folio (1623) genre of a 40-word passage of Shakespeare: comedy, tragedy or
history (``GENRE``; Pericles, not in the Folio, with the comedies). Passages are spoken text only
(speaker tags, stage directions and act/scene headers removed). Train and test are split BY PLAY:
the six ``TEST_PLAYS`` (two per genre) give no training passage, so names and lines do not leak.
Both splits are balanced over the three genres.

    python examples/encoder_compression.py      # offline: all-MiniLM-L6-v2, ~15 min on 2 idle cores
    python examples/encoder_compression.py --model bert-base-uncased --dataset glue/sst2 \\
        --text-column sentence --dense-steps 2000 --kd-steps 500 --student-steps 1000 \\
        --batch-size 32 --max-length 128 --bf16     # online, the paper's setting, on a GPU

Online, ``--dataset name[/config]`` is read with ``datasets.load_dataset`` (train split for
training, ``--test-split`` for the test). Latency is always measured on the CPU (a batch of
``--latency-batch`` inputs padded to ``--max-length``, median of interleaved repeats), as the int8
row can only run there. Writes ``<output>/results.md``, ``scatter.png`` and
``parallel_coordinates.png``.
"""

from __future__ import annotations

import argparse
import copy
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from rich.console import Console
from rich.table import Table
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

import hfcompress
from hfcompress.evaluation import (
    accuracy,
    checkpoint_size_mb,
    compare_speed,
    count_parameters,
    f1_score,
    measure_latency,
    predict_classes,
)
from hfcompress.training import DistillationArguments, DistillationTrainer, GradualPruningCallback

GENRES = ("comedy", "tragedy", "history")
_FOLIO = {  # the First Folio's catalogue; Pericles (not in the Folio) with the comedies
    "comedy": "tempest two_gentlemen_of_verona merry_wives_of_windsor measure_for_measure "
    "comedy_of_errors much_ado_about_nothing loves_labours_lost midsummer_nights_dream "
    "merchant_of_venice as_you_like_it taming_of_the_shrew alls_well_that_ends_well "
    "twelfth_night winters_tale pericles",
    "tragedy": "troilus_and_cressida coriolanus tragedy_of_titus_andronicus romeo_and_juliet "
    "timon_of_athens julius_caesar macbeth hamlet lear othello antony_and_cleopatra cymbeline",
    "history": "john richard_ii henry_iv_part_1 henry_iv_part_2 henry_v henry_vi_part_1 "
    "henry_vi_part_2 henry_vi_part_3 richard_iii henry_viii",
}
GENRE = {play: genre for genre, plays in _FOLIO.items() for play in plays.split()}
TEST_PLAYS = ("twelfth_night", "as_you_like_it", "hamlet", "macbeth", "john", "henry_viii")
# BERT / RoBERTa encoder Linears: q, k, v, attention output [H, H]; intermediate [I, H];
# output [H, I]
ATTENTION = r".*encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)"
INTERMEDIATE = r".*encoder\.layer\.\d+\.intermediate\.dense"
OUTPUT = r".*encoder\.layer\.\d+\.output\.dense"
ENCODER = f"({ATTENTION}|{INTERMEDIATE}|{OUTPUT})"
METHODS = ("prune50", "prune2:4", "lowrank", "kronecker", "student", "int8")
COLUMNS = {  # table header -> row key
    "method": "method",
    "accuracy": "accuracy",
    "macro-F1": "macro_f1",
    "parameters": "parameters",
    "size MB": "size_mb",
    "latency ms": "latency_ms",
    "speedup": "speedup",
}
_SPEAKER = re.compile(r"[A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3}\.")  # "Ham.", "First Witch."
_HEADER = re.compile(r"(ACT|Act|SCENE|Scene)\b")


def passages(text: str, words: int) -> list[str]:
    """Consecutive ``words``-word passages of a play's spoken text (a trailing rest is dropped)."""
    start = re.search(r"^(ACT|Act)\b", text, flags=re.MULTILINE)  # skip the cast list
    text = re.sub(r"\[[^\]]*\]", " ", text[start.start() :] if start else text)
    spoken: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip().splitlines() if line.strip()]
        if lines and _SPEAKER.fullmatch(lines[0]):
            lines = lines[1:]
        spoken += [line for line in lines if not _HEADER.match(line)]
    tokens = " ".join(spoken).split()
    return [" ".join(tokens[i : i + words]) for i in range(0, len(tokens) - words + 1, words)]


def _spread(items: list, n: int) -> list:
    """``n`` items evenly spaced over the list (all of them if it is shorter)."""
    return items if len(items) <= n else [items[i * len(items) // n] for i in range(n)]


def genre_split(
    texts: dict[str, Path], train_per_class: int, test_per_play: int, words: int = 40
) -> tuple[Dataset, Dataset]:
    """Train / test datasets (columns text, label, play), disjoint by play, genre-balanced.

    Each genre's training passages are spread evenly over all of its training plays' passages
    (so plays count in proportion to their length); each test play gives ``test_per_play``.
    """
    train: list[tuple[str, int, str]] = []
    test: list[tuple[str, int, str]] = []
    for label, genre in enumerate(GENRES):
        pool = []
        for play in (p for p, g in GENRE.items() if g == genre and p in texts):
            found = [(t, label, play) for t in passages(texts[play].read_text("utf-8"), words)]
            if play in TEST_PLAYS:
                test += _spread(found, test_per_play)
            else:
                pool += found
        train += _spread(pool, train_per_class)

    columns = ("text", "label", "play")

    def dataset(rows: list[tuple[str, int, str]]) -> Dataset:
        return Dataset.from_dict({c: [r[i] for r in rows] for i, c in enumerate(columns)})

    return dataset(train).shuffle(seed=0), dataset(test)


@dataclass
class Settings:
    """Training and measurement settings; the defaults are the offline MiniLM run's."""

    dense_steps: int = 100
    kd_steps: int = 40
    student_steps: int = 80
    batch_size: int = 16
    learning_rate: float = 1e-4
    max_length: int = 64
    alpha: float = 0.5  # hard-label weight of the KD runs
    temperature: float = 2.0
    hidden_weight: float = 1.0  # the student's hidden-state MSE (TinyBERT)
    freeze_embeddings: bool = True  # word embeddings: half of MiniLM; frozen for 2-core speed
    latency_batch: int = 8
    latency_repeats: int = 20
    bf16: bool = False
    progress: bool = True
    methods: tuple[str, ...] = METHODS
    workdir: Path | None = None  # checkpoints (for their size) and Trainer runs; temporary if None


NAMES = {
    "dense": "dense (fine-tuned)",
    "prune50": "prune 50% unstructured + KD",
    "prune2:4": "prune 2:4 + KD",
    "lowrank": "low-rank ratio 0.5 + KD",
    "kronecker": "Kronecker 2 terms, B 2×2 + KD",
    "student": "student {kept}/{total} layers + KD",
    "int8": "int8 dynamic (no training)",
}


def recipe(method: str, config, sparsity: float = 0.0) -> dict:
    """Half the parameters of every encoder Linear, each way (H: hidden, I: intermediate)."""
    if method == "prune50":  # from ``sparsity``; GradualPruningCallback raises it to 50%
        return {"stages": [{"method": "prune", "targets": ENCODER, "sparsity": sparsity}]}
    if method == "prune2:4":
        return {"stages": [{"method": "prune", "targets": ENCODER, "pattern": "2:4"}]}
    if method == "lowrank":
        return {"stages": [{"method": "lowrank", "targets": ENCODER, "ratio": 0.5}]}
    H, I = config.hidden_size, config.intermediate_size  # noqa: E741
    # A: [out/2, in/2], B: [2, 2], 2 terms: out·in/2 + 8 parameters per layer
    shapes = {ATTENTION: [H // 2, H // 2], INTERMEDIATE: [I // 2, H // 2], OUTPUT: [H // 2, I // 2]}
    stages = [
        {"method": "kronecker", "targets": t, "a_shape": a, "terms": 2} for t, a in shapes.items()
    ]
    return {"stages": stages}


def half_depth_student(teacher: nn.Module) -> tuple[nn.Module, str]:
    """Every other layer of the teacher, ending with its last; and the hidden-state layer map."""
    student = copy.deepcopy(teacher)
    encoder = student.base_model.encoder
    keep = list(range(len(encoder.layer) - 1, -1, -2))[::-1]  # 6 layers -> 1, 3, 5
    encoder.layer = nn.ModuleList(encoder.layer[i] for i in keep)
    student.config.num_hidden_layers = len(keep)
    # student hidden state j + 1 (after its layer j) <-> teacher's after layer keep[j]
    return student, ",".join(f"{j + 1}:{i + 1}" for j, i in enumerate(keep))


def train(
    model: nn.Module,
    teacher: nn.Module | None,
    data: Dataset,
    tokenizer,
    s: Settings,
    steps: int,
    workdir: Path,
    callbacks: list | None = None,
    **kd: object,
) -> float:
    """Train with DistillationTrainer (labels only when no teacher); returns the seconds taken."""
    model.requires_grad_(True)  # copies of a teacher inherit its frozen flags
    if s.freeze_embeddings:
        model.base_model.embeddings.word_embeddings.requires_grad_(False)
    args = DistillationArguments(
        output_dir=str(workdir / "run"),
        max_steps=steps,
        per_device_train_batch_size=s.batch_size,
        learning_rate=s.learning_rate,
        warmup_steps=max(1, steps // 10),
        logging_steps=max(1, steps // 4),
        save_strategy="no",
        report_to=[],
        disable_tqdm=not s.progress,
        bf16=s.bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        alpha=1.0 if teacher is None else s.alpha,
        temperature=s.temperature,
        **kd,
    )
    trainer = DistillationTrainer(
        model=model,
        teacher=teacher,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.train()
    model.eval()
    return time.perf_counter() - start


def evaluate(model: nn.Module, test: Dataset, tokenizer, s: Settings) -> dict:
    """Predictions on ``test`` with hfcompress.evaluation; accuracy and macro-F1 from them."""
    preds, refs = predict_classes(
        model, test, tokenizer, batch_size=64, max_length=s.max_length, progress=False
    )
    return {
        "predictions": preds,
        "accuracy": accuracy(preds, refs),
        "macro_f1": f1_score(preds, refs, "macro"),
    }


def int8_dynamic(model: nn.Module) -> nn.Module:
    """A CPU copy with every nn.Linear int8 (dynamic activations); torch.ao's deprecated API."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        return quantize_dynamic(copy.deepcopy(model).cpu(), {nn.Linear}, dtype=torch.qint8)


def run_experiment(
    model: nn.Module, tokenizer, train_ds: Dataset, test_ds: Dataset, s: Settings
) -> tuple[list[dict], dict[str, nn.Module]]:
    """Fine-tune ``model`` (in place) as the dense teacher, compress it each way, measure all.

    Args:
        model: a sequence classifier (BERT-like: ``base_model.encoder.layer``), head untrained.
        tokenizer: its tokenizer.
        train_ds, test_ds: columns ``text`` and ``label``.
        s: settings.

    Returns:
        (rows, models): a row per method with the :data:`COLUMNS` keys plus ``predictions``,
        ``accuracy_before`` (one-shot, before KD) and ``train_s``; the models by method key.
    """
    if s.workdir is None:
        with tempfile.TemporaryDirectory(prefix="encoder-compression-") as tmp:
            return _run(model, tokenizer, train_ds, test_ds, s, Path(tmp))
    return _run(model, tokenizer, train_ds, test_ds, s, s.workdir)


def _run(model, tokenizer, train_ds, test_ds, s, workdir):
    data = train_ds.map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=s.max_length),
        batched=True,
        remove_columns=[c for c in train_ds.column_names if c != "label"],
    )
    rows: dict[str, dict] = {}
    models: dict[str, nn.Module] = {}
    seconds = train(model, None, data, tokenizer, s, s.dense_steps, workdir)
    teacher = models["dense"] = model
    rows["dense"] = {**evaluate(teacher, test_ds, tokenizer, s), "accuracy_before": None}
    rows["dense"]["train_s"] = seconds
    for method in (m for m in s.methods if m != "int8"):
        callbacks, kd, steps = None, {}, s.kd_steps
        if method == "student":
            student, layer_map = half_depth_student(teacher)
            kd = {"hidden_weight": s.hidden_weight, "layer_map": layer_map}
            steps, before = s.student_steps, student
        else:
            student = copy.deepcopy(teacher)
            hfcompress.compress_model(student, recipe(method, teacher.config))
            before = student
            if method == "prune50":  # one-shot 50% for the "before KD" number only
                before = copy.deepcopy(teacher)
                hfcompress.compress_model(before, recipe(method, teacher.config, 0.5))
                end = max(1, int(0.6 * steps))  # cubic schedule, then locked masks
                callbacks = [GradualPruningCallback(0.0, 0.5, 0, end, max(1, end // 6))]
        accuracy_before = evaluate(before, test_ds, tokenizer, s)["accuracy"]
        seconds = train(student, teacher, data, tokenizer, s, steps, workdir, callbacks, **kd)
        models[method] = student
        rows[method] = {**evaluate(student, test_ds, tokenizer, s), "train_s": seconds}
        rows[method]["accuracy_before"] = accuracy_before
    for key, m in models.items():  # sizes of the saved checkpoints (safetensors)
        m.save_pretrained(workdir / key.replace(":", "_"))
        rows[key]["size_mb"] = checkpoint_size_mb(workdir / key.replace(":", "_"))
        rows[key]["parameters"] = count_parameters(m).nonzero
    if "int8" in s.methods:
        models["int8"] = int8_dynamic(teacher)
        rows["int8"] = {**evaluate(models["int8"], test_ds, tokenizer, s), "train_s": 0.0}
        torch.save(models["int8"].state_dict(), workdir / "int8.pt")
        rows["int8"]["size_mb"] = (workdir / "int8.pt").stat().st_size / 1e6
        rows["int8"]["parameters"] = rows["dense"]["parameters"]  # the same entries, 8-bit
        rows["int8"]["accuracy_before"] = None
    _measure_speed(models, rows, test_ds, tokenizer, s)
    layers = teacher.config.num_hidden_layers
    for key, row in rows.items():
        kept = getattr(getattr(models[key], "config", None), "num_hidden_layers", layers)
        row["method"] = NAMES[key].format(kept=kept, total=layers)
    return list(rows.values()), models


def _measure_speed(models, rows, test_ds, tokenizer, s) -> None:
    """CPU latency of a fixed batch; each model timed interleaved with the dense one."""
    texts = test_ds[: s.latency_batch]["text"]
    inputs = tokenizer(
        texts, padding="max_length", truncation=True, max_length=s.max_length, return_tensors="pt"
    )
    inputs = {
        k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")
    }
    dense = models["dense"].cpu()
    own = measure_latency(dense, inputs, warmup=2, repeats=s.latency_repeats, progress=False)
    rows["dense"].update(latency_ms=own.median_s * 1e3, speedup=1.0)
    for key, m in models.items():
        if key != "dense":
            result = compare_speed(
                m.cpu(), dense, inputs, warmup=2, repeats=s.latency_repeats, progress=False
            )
            rows[key].update(latency_ms=result.model.median_s * 1e3, speedup=result.speedup)


def _cells(row: dict) -> list[str]:
    return [
        row["method"],
        f"{100 * row['accuracy']:.1f}%",
        f"{row['macro_f1']:.3f}",
        f"{row['parameters']:,}",
        f"{row['size_mb']:.1f}",
        f"{row['latency_ms']:.1f}",
        f"{row['speedup']:.2f}x",
    ]


def markdown_table(rows: list[dict]) -> str:
    """The results as a markdown table with exactly the :data:`COLUMNS` headers."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(_cells(r)) + " |" for r in rows]) + "\n"


def plot(rows: list[dict], output: Path) -> None:
    """Figure 2 (accuracy vs size, vs speedup) and Figure 3 (parallel coordinates) of seed 003."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10")
    figure, panels = plt.subplots(1, 2, figsize=(12, 5))
    axes = {"size_mb": "size (MB)", "speedup": "CPU speedup"}
    for panel, (key, label) in zip(panels, axes.items(), strict=True):
        for i, row in enumerate(rows):
            panel.scatter(row[key], 100 * row["accuracy"], color=colors(i), label=row["method"])
        panel.set(xlabel=label, ylabel="accuracy (%)", title=f"accuracy vs {label}")
        panel.grid(alpha=0.3)
    figure.legend(*panels[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    figure.savefig(output / "scatter.png", dpi=120)
    plt.close(figure)

    axes = [
        ("accuracy", 100),
        ("macro_f1", 1),
        ("size_mb", 1),
        ("speedup", 1),
        ("parameters", 1e-6),
    ]
    titles = ["accuracy (%)", "macro-F1", "size (MB)", "speedup", "parameters (M)"]
    figure, ax = plt.subplots(figsize=(10, 5))
    ranges = [(min(r[k] * f for r in rows), max(r[k] * f for r in rows)) for k, f in axes]
    for i, row in enumerate(rows):
        ys = [
            (row[k] * f - lo) / (hi - lo) if hi > lo else 0.5
            for (k, f), (lo, hi) in zip(axes, ranges, strict=True)
        ]
        ax.plot(range(len(axes)), ys, marker="o", color=colors(i), label=row["method"])
    for x, (lo, hi) in enumerate(ranges):
        ax.axvline(x, color="grey", lw=0.8)
        ax.annotate(f"{hi:.3g}", (x, 1.02), ha="center", fontsize=8)
        ax.annotate(f"{lo:.3g}", (x, -0.06), ha="center", fontsize=8)
    ax.set_xticks(range(len(axes)), titles)
    ax.set(ylim=(-0.1, 1.1), yticks=[], title="methods over min-max normalized axes")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    figure.savefig(output / "parallel_coordinates.png", dpi=120)
    plt.close(figure)


def write_outputs(
    rows: list[dict], output: Path, title: str, console: Console | None = None
) -> None:
    """Rich table on the console; results.md, scatter.png and parallel_coordinates.png."""
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(*_cells(row))
    (console or Console(width=140)).print(table)
    notes = [
        f"- {r['method']}: accuracy before KD {100 * r['accuracy_before']:.1f}%, "
        f"training {r['train_s']:.0f} s"
        for r in rows
        if r.get("accuracy_before") is not None
    ]
    output.mkdir(parents=True, exist_ok=True)
    text = f"{title}\n\n{markdown_table(rows)}\n" + "\n".join(notes) + "\n"
    (output / "results.md").write_text(text, encoding="utf-8")
    plot(rows, output)


def load_data(args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    """Offline: the Shakespeare genre task. Online: ``--dataset`` through ``datasets``."""
    if args.dataset is None:
        from offline_data import shakespeare_texts

        return genre_split(shakespeare_texts(), args.train_per_class, args.test_per_play)
    from datasets import load_dataset

    name, _, config = args.dataset.partition("/")
    splits = load_dataset(name, config or None)
    train_ds, test_ds = splits["train"], splits[args.test_split]
    train_ds = train_ds.shuffle(seed=0).select(range(min(args.train_examples, len(train_ds))))
    test_ds = test_ds.select(range(min(args.test_examples, len(test_ds))))
    if args.text_column != "text":
        train_ds, test_ds = (d.rename_column(args.text_column, "text") for d in (train_ds, test_ds))
    return train_ds, test_ds


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="folder or hub id (default: offline MiniLM-L6)")
    p.add_argument("--dataset", default=None, help="online: name[/config], e.g. glue/sst2")
    p.add_argument("--text-column", default="text")
    p.add_argument("--test-split", default="validation")
    p.add_argument("--train-examples", type=int, default=5000, help="online training subset")
    p.add_argument("--test-examples", type=int, default=1000, help="online test subset")
    p.add_argument("--train-per-class", type=int, default=400, help="offline passages per genre")
    p.add_argument("--test-per-play", type=int, default=50, help="offline passages per test play")
    d = Settings()
    ints = ("dense_steps", "kd_steps", "student_steps", "batch_size", "max_length")
    for name in (*ints, "latency_batch", "latency_repeats"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("learning_rate", "alpha", "temperature", "hidden_weight"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--train-embeddings", action="store_true", help="train the word embeddings too")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast training (GPU)")
    p.add_argument("--output", type=Path, default=Path("out/encoder_compression"))
    args = p.parse_args()
    settings = Settings(
        **{k: getattr(args, k) for k in vars(d) if hasattr(args, k) and k != "methods"},
        methods=tuple(args.methods),
        freeze_embeddings=not args.train_embeddings,
    )
    model_path = args.model
    if model_path is None:
        from offline_data import minilm_dir

        model_path = minilm_dir()
    train_ds, test_ds = load_data(args)
    num_labels = len(set(train_ds["label"]))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    if args.dataset is None:
        model.config.id2label = dict(enumerate(GENRES))
        model.config.label2id = {g: i for i, g in enumerate(GENRES)}
    if torch.cuda.is_available():
        model.to("cuda")
    start = time.perf_counter()
    rows, _ = run_experiment(model, tokenizer, train_ds, test_ds, settings)
    task = args.dataset or "Shakespeare genre (comedy/tragedy/history), split by play"
    title = (
        f"{args.model or 'all-MiniLM-L6-v2'}: {task}; {len(train_ds)} train / {len(test_ds)} test; "
        f"{time.perf_counter() - start:.0f} s"
    )
    write_outputs(rows, args.output, title)


if __name__ == "__main__":
    main()
