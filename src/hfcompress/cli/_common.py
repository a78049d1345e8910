"""What every subcommand shares: the error type, loading models and tokenizers, argument types.

MODEL is a local folder or a hub id, loaded with the class its config.json names (as
transformers does; ``--task`` overrides it), so recipes match the module names the Python API
sees for the same checkpoint.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import transformers
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
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto import modeling_auto

from hfcompress.errors import HfCompressError


class CliError(HfCompressError):
    """Bad command-line input: printed as one line, exit code 2."""


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

# Files any transformers tokenizer is saved as; a folder with none of them has no tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)

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
        raise CliError(f"MODEL {ref!r}: cannot load it ({first_line(error)})") from error


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_tokenizer(ref: str, flag: str = "MODEL") -> PreTrainedTokenizerBase:
    """The tokenizer saved with ``ref`` (a folder or hub id).

    Raises:
        CliError: none is there; the message names the folder searched and ``--tokenizer``.
    """
    path = Path(ref).expanduser()
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CliError(
            f"{flag} {ref!r}: no tokenizer found in the folder {str(path.absolute())!r} (none of "
            f"{', '.join(TOKENIZER_FILES[:2])}, ...); pass --tokenizer PATH (a folder or hub id "
            "holding the model's tokenizer)"
        )
    if not path.exists() and not (_HUB_ID.match(ref) and not ref.startswith(".")):
        raise CliError(f"{flag} {ref!r}: no such folder (and not a hub id)")
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else ref)
    except (OSError, ValueError, TypeError) as error:
        where = f"the folder {str(path.absolute())!r}" if path.exists() else f"hub id {ref!r}"
        raise CliError(
            f"{flag} {ref!r}: cannot load a tokenizer from {where} ({first_line(error)}); "
            "pass --tokenizer PATH (a folder or hub id holding the model's tokenizer)"
        ) from error


def tokenizer_of(args: argparse.Namespace, model_ref: str) -> PreTrainedTokenizerBase:
    """``--tokenizer`` when given, else the tokenizer saved with the model."""
    if args.tokenizer is not None:
        return load_tokenizer(args.tokenizer, "--tokenizer")
    return load_tokenizer(model_ref)


def read_texts(files: Sequence[Path], flag: str = "--text") -> str:
    texts = []
    for file in files:
        try:
            texts.append(Path(file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            raise CliError(f"{flag} {str(file)!r}: cannot read it ({error})") from error
    return "\n\n".join(texts)


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {value}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_model_flags(parser: argparse.ArgumentParser, *task_names: str) -> None:
    """``--dtype`` and the ``--task`` override (``task_names`` renames it, as on ``eval``)."""
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    parser.add_argument(
        *(task_names or ("--task", "--model-task")),
        dest="model_task",
        choices=list(TASKS),
        default=None,
        help="load MODEL with this task's Auto class instead of the class config.json names "
        "in architectures (base: the bare model, no head)",
    )


def add_tokenizer_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="folder or hub id of the tokenizer (default: the one saved with the model)",
    )
