"""The ``hfcompress`` command line: a thin wrapper over the library.

Subcommands:
    demo                   compress a small config-built GPT-2 with a default recipe (offline)
    compress MODEL         apply a recipe and save the compressed checkpoint
    eval MODEL             perplexity, classification accuracy/F1, size, latency and speedup
    analyze MODEL          rank, stable rank, energy and per-method error of every matrix, plots
    plan MODEL             per-layer ranks / sparsities for a global budget, written as a recipe
    distill TEACHER        compress a copy of the teacher and distill it on text
    shapes OUT IN          list the Kronecker factor shapes of an [OUT, IN] weight

MODEL is a local folder or a hub id, loaded with the class its config.json names (as transformers
does; ``--task`` overrides it). Bad input, an output path that cannot be written included, prints
one line and exits with code 2 before any model is loaded (``--debug`` shows the traceback); Ctrl-C
exits with code 130. An output folder or file is written whole or not at all.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import transformers
from datasets import Dataset, load_dataset
from rich.console import Console
from rich.table import Table
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto import modeling_auto

from hfcompress._version import __version__
from hfcompress.analysis import analyze_model, plot_energy, plot_spectra
from hfcompress.decompose import kronecker_shapes
from hfcompress.errors import HfCompressError
from hfcompress.evaluation import (
    checkpoint_size_mb,
    compare_speed,
    count_parameters,
    evaluate_classification,
    measure_latency,
    perplexity_of_text,
)
from hfcompress.planner import plan_recipe
from hfcompress.recipe import Recipe
from hfcompress.surgery import compress_model
from hfcompress.training import (
    CompressionLoggingCallback,
    DistillationArguments,
    DistillationTrainer,
    causal_lm_blocks,
)


class ModelLoader(Protocol):
    """A model class or an Auto class: anything with ``from_pretrained``."""

    def from_pretrained(self, source: str, *args: Any, **kwargs: Any) -> PreTrainedModel: ...


# --task NAME -> the Auto class that loads that head, and the transformers mapping it loads from
# (model_type -> class name), which also places an architecture that transformers lacks.
TASKS: dict[str, tuple[Any, dict[str, str | tuple[str, ...]]]] = {
    "causal-lm": (AutoModelForCausalLM, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    "masked-lm": (AutoModelForMaskedLM, modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
    "seq2seq": (AutoModelForSeq2SeqLM, modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
    "seq-cls": (
        AutoModelForSequenceClassification,
        modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    ),
    "token-cls": (
        AutoModelForTokenClassification,
        modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    ),
    "qa": (AutoModelForQuestionAnswering, modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES),
    "base": (AutoModel, modeling_auto.MODEL_MAPPING_NAMES),
}

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


class CliError(HfCompressError):
    """Bad command-line input: printed as one line, exit code 2."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model(ref: str) -> str:
    """A local model folder, or a hub id (``owner/name``) passed on to transformers."""
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CliError(f"MODEL {ref!r}: not a model folder (no config.json in it)")
        return str(path)
    if _HUB_ID.match(ref) and not ref.startswith("."):
        return ref
    raise CliError(
        f"MODEL {ref!r}: no such folder (and not a hub id such as 'gpt2' or 'owner/name')"
    )


def _transformers_class(architecture: str) -> type[PreTrainedModel] | None:
    """``transformers.<architecture>`` when it is a PyTorch model class, else None."""
    try:
        cls = getattr(transformers, architecture)
    except (AttributeError, ImportError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, PreTrainedModel) else None


def _task_of(architecture: str) -> str | None:
    """The first ``TASKS`` entry whose transformers mapping lists ``architecture``, else None."""
    for task, (_, mapping) in TASKS.items():
        for names in mapping.values():
            if architecture in ((names,) if isinstance(names, str) else names):
                return task
    return None


def model_class(config: PretrainedConfig, task: str | None = None) -> ModelLoader:
    """The class that loads a checkpoint, chosen as transformers does.

    ``task`` (a ``TASKS`` key) picks its Auto class. Otherwise the class is the architecture that
    config.json names, ``transformers.<architectures[0]>`` (``GPT2LMHeadModel``, not
    ``GPT2Model``), or the Auto class of the task whose mapping lists it; a config that names no
    architecture loads with ``AutoModel``, the bare model.
    """
    if task is not None:
        return TASKS[task][0]
    if not config.architectures:
        return AutoModel
    architecture = config.architectures[0]
    own = _transformers_class(architecture)
    if own is not None:
        return own
    listed = _task_of(architecture)
    if listed is None:
        raise CliError(
            f"architecture {architecture!r} (config.json) is not a transformers model class; "
            f"pass --task ({', '.join(TASKS)})"
        )
    return TASKS[listed][0]


def load_model(ref: str, dtype: str = "auto", task: str | None = None) -> PreTrainedModel:
    """Load ``ref`` with ``model_class``: the module names match the Python API's for the same
    checkpoint (``transformer.h.0.mlp.c_fc`` for GPT-2, not ``h.0.mlp.c_fc``)."""
    source = resolve_model(ref)
    try:
        config = AutoConfig.from_pretrained(source)
        loader = model_class(config, task)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        return loader.from_pretrained(source, dtype=torch_dtype).eval()
    except CliError as error:  # from model_class: name the model
        raise CliError(f"MODEL {ref!r}: {error}") from error
    except (OSError, ValueError) as error:
        if isinstance(error, HfCompressError):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CliError(f"MODEL {ref!r}: cannot load it ({first})") from error


def load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(resolve_model(ref))
    except (OSError, ValueError, TypeError) as error:
        raise CliError(f"MODEL {ref!r}: no tokenizer found with it ({error})") from error


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists."""
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _probe_writable(folder: Path) -> str | None:
    """Why nothing can be created in ``folder`` (an OS error's text), or None when it can.

    It creates and removes an empty folder: permission bits alone say nothing when running as
    root, nor about read-only file systems and /proc.
    """
    try:
        Path(tempfile.mkdtemp(prefix=".hfcompress-probe-", dir=folder)).rmdir()
    except OSError as error:
        return error.strerror or type(error).__name__
    return None


def check_output(
    path: Path, flag: str, kind: Literal["folder", "file"] = "folder", overwrite: bool = False
) -> None:
    """Fail fast, before any work, when ``path`` cannot take a new ``kind``.

    Raises ``CliError`` (one line naming ``flag`` and ``path``) when ``path`` is of the other
    kind, when it exists and holds something and ``overwrite`` is off, when an ancestor is a
    file, or when its nearest existing folder is not writable (the output is written into a
    temporary sibling there and moved into place).
    """
    where = f"{flag} {str(path)!r}"
    if path.is_dir() and kind == "file":
        raise CliError(f"{where}: is a folder, expected a file")
    if path.exists() and not path.is_dir() and kind == "folder":
        raise CliError(f"{where}: is a file, expected a folder")
    if path.is_file() and not overwrite:
        raise CliError(f"{where}: exists (pass --overwrite)")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CliError(f"{where}: exists and is not empty (pass --overwrite)")
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise CliError(f"{where}: {str(ancestor)!r} is a file, so nothing can be created under it")
    reason = _probe_writable(ancestor)
    if reason is not None:
        raise CliError(f"{where}: nothing can be created in {str(ancestor)!r} ({reason})")


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, outermost first."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders ``_make_parents`` created, innermost first, where they are still empty."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block has run, then raise ``KeyboardInterrupt``, so a short
    critical step (swapping folders) is never cut in half. Only the main thread gets signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _move_into_place(tmp: Path, output: Path) -> None:
    """Rename the finished ``tmp`` to ``output``. An existing ``output`` is renamed aside first,
    put back if the second rename fails, and removed once the new folder is in place."""
    with _interrupts_deferred():
        if not output.exists():
            os.replace(tmp, output)
            return
        aside = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        aside.rmdir()
        os.replace(output, aside)
        try:
            os.replace(tmp, output)
        except BaseException:
            os.replace(aside, output)
            raise
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_output(output: Path, overwrite: bool = False, flag: str = "--output") -> Iterator[Path]:
    """Write into a temporary sibling folder and move it to ``output`` only on success.

    Any exception in the block, ``KeyboardInterrupt`` included, removes the temporary folder and
    the parent folders made for it, and leaves an existing ``output`` as it was.
    """
    check_output(output, flag, "folder", overwrite)
    created = _make_parents(output.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield tmp
        _move_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling file and rename it to ``path``: whole or not at all,
    Ctrl-C included."""
    created = _make_parents(path.parent)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_empty(created)
        raise


def cmd_compress(args: argparse.Namespace, console: Console) -> int:
    # Fail on a bad output, model path or recipe before loading any weights.
    if not args.dry_run:
        check_output(args.output, "--output", "folder", args.overwrite)
    resolve_model(args.model)
    recipe = Recipe.load(args.recipe)
    model = load_model(args.model, args.dtype, args.model_task)
    report = compress_model(model, recipe, dry_run=args.dry_run)
    console.print(report.table())
    if args.dry_run:
        return 0
    with atomic_output(args.output, args.overwrite) as tmp, console.status("saving"):
        model.save_pretrained(tmp)
        with contextlib.suppress(CliError):
            load_tokenizer(args.model).save_pretrained(tmp)
        (tmp / "compression_report.json").write_text(
            json.dumps(report.to_dict(), indent=1), encoding="utf-8"
        )
    console.print(f"saved to {args.output}")
    return 0


def _read_texts(files: Sequence[Path]) -> str:
    texts = []
    for file in files:
        try:
            texts.append(Path(file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            raise CliError(f"--text {str(file)!r}: cannot read it ({error})") from error
    return "\n\n".join(texts)


def _load_table(path: Path) -> Dataset:
    suffix = path.suffix.lower().lstrip(".")
    builder = {"csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}.get(suffix)
    if builder is None or not path.is_file():
        raise CliError(
            f"--task {str(path)!r}: expected an existing .csv, .json, .jsonl or .parquet file"
        )
    return load_dataset(builder, data_files=str(path), split="train")


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    if not (args.perplexity or args.task or args.speed):
        raise CliError("eval: choose at least one of --perplexity, --task, --speed")
    if args.perplexity and not args.text:
        raise CliError("--perplexity: needs --text FILE (the text to score)")
    model = load_model(args.model, args.dtype, args.model_task)
    table = Table(title=f"hfcompress eval: {args.model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    params = count_parameters(model)
    table.add_row("parameters (stored)", f"{params.total:,}")
    table.add_row("parameters (non-zero)", f"{params.nonzero:,}")
    if Path(args.model).is_dir():
        table.add_row("checkpoint size (MB)", f"{checkpoint_size_mb(Path(args.model)):.2f}")
    if args.perplexity:
        result = perplexity_of_text(
            model, load_tokenizer(args.model), _read_texts(args.text), args.max_length, args.stride
        )
        table.add_row("perplexity", f"{result.perplexity:.3f}")
        table.add_row("tokens scored / windows", f"{result.tokens:,} / {result.windows}")
    if args.task:
        metrics = evaluate_classification(
            model,
            _load_table(args.task),
            load_tokenizer(args.model),
            text_column=args.text_column,
            label_column=args.label_column,
        )
        for name, value in metrics.items():
            table.add_row(name, f"{value:.4f}")
    if args.speed:
        vocab = getattr(model.config, "vocab_size", 1000)
        ids = torch.randint(
            0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0)
        )
        inputs = {"input_ids": ids.to(next(model.parameters()).device)}
        if args.reference:
            reference = load_model(args.reference, args.dtype, args.model_task)
            comparison = compare_speed(model, reference, inputs, repeats=args.repeats)
            latency = comparison.model
            table.add_row(f"speedup vs {args.reference}", f"{comparison.speedup:.2f}x")
        else:
            latency = measure_latency(model, inputs, repeats=args.repeats)
        table.add_row(
            "latency median / p10 / p90 (ms)",
            f"{latency.median_s * 1e3:.1f} / {latency.p10_s * 1e3:.1f} / {latency.p90_s * 1e3:.1f}",
        )
        table.add_row("throughput (tokens/s)", f"{latency.tokens_per_s:,.0f}")
    console.print(table)
    return 0


def cmd_analyze(args: argparse.Namespace, console: Console) -> int:
    if args.plots:
        check_output(args.plots, "--plots", "folder", args.overwrite)
    if args.json:
        check_output(args.json, "--json", "file", overwrite=True)  # --json always replaces
    model = load_model(args.model, args.dtype, args.model_task)
    analysis = analyze_model(
        model,
        targets=args.targets,
        budget=args.budget,
        kronecker_candidates=args.kronecker_candidates,
    )
    console.print(analysis.table())
    if args.json:
        write_text_atomic(args.json, json.dumps(analysis.to_dict(), indent=1))
    if args.plots:
        with (
            atomic_output(args.plots, args.overwrite, "--plots") as tmp,
            console.status("plotting"),
        ):
            plot_spectra(analysis, tmp / "spectra.png")
            plot_energy(analysis, tmp / "energy.png")
        console.print(f"plots written to {args.plots}")
    return 0


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    check_output(args.output, "--output", "file", args.overwrite)
    text = _read_texts(args.calibration_text)
    model = load_model(args.model, args.dtype, args.model_task)
    ids = load_tokenizer(args.model)(text, return_tensors="pt").input_ids[0]
    usable = (ids.numel() // args.seq_len) * args.seq_len
    if usable == 0:
        raise CliError(f"--calibration-text: shorter than one sequence of {args.seq_len} tokens")
    calibration = ids[:usable].view(-1, args.seq_len)[: args.n_calib]
    plan = plan_recipe(
        model,
        calibration,
        keep=args.keep,
        targets=args.targets,
        method=args.method,
        weighting=args.weighting,
        allocation=args.allocation,
    )
    console.print(plan.table())
    write_text_atomic(args.output, plan.recipe.to_yaml())
    console.print(
        f"recipe written to {args.output}; apply it with: hfcompress compress {args.model} "
        f"--recipe {args.output} --output DIR (its criterion needs calibration data in Python)"
    )
    return 0


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {value}")
    return value


def cmd_distill(args: argparse.Namespace, console: Console) -> int:
    check_output(args.output, "--output", "folder", overwrite=True)  # run/ may be there already
    check_output(args.output / "student", "--output", "folder", args.overwrite)
    recipe = Recipe.load(args.recipe)
    text = _read_texts(args.train_text)
    try:
        (training,) = HfArgumentParser(DistillationArguments).parse_args_into_dataclasses(
            args=[*args.training_args, "--output_dir", str(args.output / "run")]
        )
    except SystemExit as error:  # HfArgumentParser exits on unknown or malformed flags
        raise CliError(f"distill: bad training flags {args.training_args} (see --help)") from error
    teacher = load_model(args.teacher, args.dtype, args.model_task)
    tokenizer = load_tokenizer(args.teacher)
    student = copy.deepcopy(teacher)
    console.print(compress_model(student, recipe).table())
    blocks = causal_lm_blocks(Dataset.from_dict({"text": [text]}), tokenizer, args.block_size)
    if len(blocks) == 0:
        raise CliError(f"--train-text: shorter than one block of {args.block_size} tokens")
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=training,
        train_dataset=blocks,
        callbacks=[CompressionLoggingCallback()],
    )
    trainer.train()
    with atomic_output(args.output / "student", args.overwrite) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    console.print(f"distilled student saved to {args.output / 'student'}")
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

    compress = sub.add_parser("compress", help="compress a model with a recipe and save it")
    compress.add_argument("model", metavar="MODEL", help="local folder or hub id")
    compress.add_argument("--recipe", required=True, type=Path, help="recipe .yaml or .json")
    compress.add_argument("--output", type=Path, help="folder for the compressed checkpoint")
    compress.add_argument("--dry-run", action="store_true", help="report only, save nothing")
    compress.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    _dtype_flag(compress)
    _task_flag(compress)
    compress.set_defaults(func=cmd_compress)

    evaluate = sub.add_parser("eval", help="perplexity, task accuracy, size and speed of a model")
    evaluate.add_argument("model", metavar="MODEL", help="local folder or hub id")
    evaluate.add_argument("--perplexity", action="store_true", help="sliding-window perplexity")
    evaluate.add_argument("--text", type=Path, nargs="+", help="text file(s) for --perplexity")
    evaluate.add_argument("--max-length", type=positive_int, default=None, help="window (tokens)")
    evaluate.add_argument("--stride", type=positive_int, default=None, help="window step (tokens)")
    evaluate.add_argument(
        "--task", type=Path, help="classification data: .csv/.json/.jsonl/.parquet"
    )
    evaluate.add_argument("--text-column", default="text")
    evaluate.add_argument("--label-column", default="label")
    evaluate.add_argument("--speed", action="store_true", help="latency and throughput")
    evaluate.add_argument("--reference", help="a model to measure speedup against (with --speed)")
    evaluate.add_argument("--batch-size", type=positive_int, default=1)
    evaluate.add_argument("--seq-len", type=positive_int, default=128)
    evaluate.add_argument("--repeats", type=positive_int, default=10)
    _dtype_flag(evaluate)
    _task_flag(evaluate, "--model-task")  # --task is the classification data
    evaluate.set_defaults(func=cmd_eval)

    analyze = sub.add_parser(
        "analyze", help="ranks, stable ranks, energy and per-method errors of each matrix"
    )
    analyze.add_argument("model", metavar="MODEL", help="local folder or hub id")
    analyze.add_argument("--targets", help="regex (re.fullmatch) of modules to analyze")
    analyze.add_argument(
        "--budget", type=fraction, default=0.5, help="fraction of parameters kept (default 0.5)"
    )
    analyze.add_argument(
        "--kronecker-candidates",
        type=int,
        default=12,
        help="factor shapes tried per matrix (0 skips Kronecker; each costs an SVD)",
    )
    analyze.add_argument("--plots", type=Path, help="folder for spectra.png and energy.png")
    analyze.add_argument("--json", type=Path, help="write the analysis as JSON")
    analyze.add_argument("--overwrite", action="store_true", help="replace a non-empty --plots")
    _dtype_flag(analyze)
    _task_flag(analyze)
    analyze.set_defaults(func=cmd_analyze)

    plan = sub.add_parser(
        "plan", help="allocate per-layer ranks or sparsities for a global budget, as a recipe"
    )
    plan.add_argument("model", metavar="MODEL", help="local folder or hub id")
    plan.add_argument("--keep", type=fraction, required=True, help="fraction of parameters kept")
    plan.add_argument("--targets", required=True, help="regex (re.fullmatch) of modules")
    plan.add_argument("--method", choices=["lowrank", "prune"], default="lowrank")
    plan.add_argument(
        "--weighting",
        choices=["loss", "output"],
        default="loss",
        help="lowrank: compare modules by estimated loss increase, or by relative output error",
    )
    plan.add_argument(
        "--allocation",
        choices=["saliency", "owl"],
        default="saliency",
        help="prune: per-module sparsities from OBS saliencies (sparsegpt), or OWL block "
        "sparsities (wanda)",
    )
    plan.add_argument("--calibration-text", type=Path, nargs="+", required=True)
    plan.add_argument("--n-calib", type=positive_int, default=32, help="calibration sequences")
    plan.add_argument("--seq-len", type=positive_int, default=256)
    plan.add_argument("--output", type=Path, required=True, help="recipe .yaml to write")
    plan.add_argument("--overwrite", action="store_true")
    _dtype_flag(plan)
    _task_flag(plan)
    plan.set_defaults(func=cmd_plan)

    distill = sub.add_parser(
        "distill",
        help="compress a teacher with a recipe and distill the student on text",
        description="Unrecognized --flags are DistillationArguments / TrainingArguments "
        "(e.g. --max_steps 100 --alpha 0.5 --temperature 2 --learning_rate 1e-4).",
    )
    distill.add_argument("teacher", metavar="TEACHER", help="local folder or hub id")
    distill.add_argument("--recipe", required=True, type=Path)
    distill.add_argument("--train-text", required=True, type=Path, nargs="+")
    distill.add_argument("--output", required=True, type=Path)
    distill.add_argument("--block-size", type=positive_int, default=128)
    distill.add_argument("--overwrite", action="store_true")
    _dtype_flag(distill)
    _task_flag(distill)
    distill.set_defaults(func=cmd_distill)
    return parser


def _dtype_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )


def _task_flag(parser: argparse.ArgumentParser, *names: str) -> None:
    parser.add_argument(
        *(names or ("--task", "--model-task")),
        dest="model_task",
        choices=list(TASKS),
        default=None,
        help="load MODEL with this task's Auto class instead of the class config.json names "
        "in architectures (base: the bare model, no head)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "distill":
        args.training_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "compress" and not args.dry_run and args.output is None:
        parser.error("compress: --output is required (or pass --dry-run)")
    # Logs and CI are not terminals; rich would wrap tables at 80 columns there.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    func: Callable[[argparse.Namespace, Console], int] = args.func
    try:
        return func(args, console)
    except HfCompressError as error:
        if args.debug:
            raise
        message = " ".join(str(error).split())  # one line
        print(f"hfcompress {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written whole or not at all: nothing to clean up
        if args.debug:
            raise
        print("hfcompress: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
