"""Fuzz compress_model with generated recipes and tally the outcomes (docs/reliability.md).

Each recipe is drawn from a seeded generator that mixes valid settings with wrong types, NaN/inf,
out-of-range values, unknown fields and methods, bad or pathological regexes and impossible
compositions. Outcomes:

* ``compressed``: the model was compressed and gives finite outputs;
* ``refused cleanly``: an ``HfCompressError`` naming a stage, field or module, model unchanged;
* ``unclear``: an ``HfCompressError`` that names nothing;
* ``crashed``: any other exception;
* ``silently wrong``: compressed but non-finite outputs, or nothing compressed without an error;
* ``model changed``: refused, but the model is not as it was.

    python bench/fuzz_recipes.py --n 1000 --seed 0
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import model_output, tiny_inputs, tiny_model
from hfcompress import HfCompressError, compress_model

TARGETS = [
    r".*",
    r".*\.mlp\..*",
    r".*(q|k|v)_proj",
    r"model\.layers\.0\..*",
    r"transformer\.h\.\d+\.mlp\.c_fc",
    r"transformer\.h\.\d+\.attn\..*",
    r"lm_head",
    r"nothing",
    r"(",
    r"(.*)*x",
]
WRONG = [-1, 0, 1.5, True, "2", None, float("nan"), float("inf"), [2]]
CRITERIA = ["magnitude", "svd", "vanloan", "wanda", "whitened", "bogus"]
OUTCOMES = [
    "compressed",
    "refused cleanly",
    "unclear",
    "crashed",
    "silently wrong",
    "model changed",
]


def _maybe(rng: random.Random, good: object, p_wrong: float = 0.08) -> object:
    return rng.choice(WRONG) if rng.random() < p_wrong else good


def random_stage(rng: random.Random) -> dict:
    method = rng.choice(["prune", "prune", "lowrank", "kronecker", "nonsense"])
    likely = [r".*\.mlp\..*", r".*(attn|mlp)\..*"]
    stage: dict = {"method": method, "targets": rng.choice(TARGETS + likely * 4)}
    if method == "prune":
        pattern = rng.choice(["unstructured", "unstructured", "2:4", "4:8", "3:2", "x"])
        stage["pattern"] = pattern
        if pattern == "unstructured" or rng.random() < 0.2:
            stage["sparsity"] = _maybe(rng, round(rng.random(), 3))
    elif method == "lowrank":
        key = rng.choice(["rank", "ratio", "energy"])
        stage[key] = _maybe(rng, rng.randint(1, 80) if key == "rank" else round(rng.random(), 3))
        if rng.random() < 0.1:
            stage["rank"] = 4  # two of rank/ratio/energy
    elif method == "kronecker":
        stage["a_shape"] = [_maybe(rng, rng.choice([1, 2, 4, 8, 16, 3, 2, 4])) for _ in range(2)]
        stage["terms"] = _maybe(rng, rng.randint(1, 3))
    else:
        stage["strength"] = 1
    if rng.random() < 0.2:
        stage["criterion"] = rng.choice(CRITERIA)
    if rng.random() < 0.15:
        stage["exclude"] = rng.choice([r".*\.0\..*", r"(", r".*"])
    if rng.random() < 0.15:
        field = rng.choice(["sparsity", "rank", "ratio", "terms", "method", "unknown"])
        stage["overrides"] = {r".*\.0\..*": {field: _maybe(rng, 0.5)}}
    if rng.random() < 0.05:
        stage["unknown_field"] = 1
    return stage


def random_recipe(rng: random.Random) -> dict:
    n_stages = rng.choice([0, 1, 1, 1, 1, 2, 3])
    recipe: dict = {"stages": [random_stage(rng) for _ in range(n_stages)]}
    if rng.random() < 0.2:
        recipe["exclude"] = rng.choice(["lm_head", "lm_head", r"(", r".*"])
    if rng.random() < 0.1:
        recipe["version"] = rng.choice([1, 2, -7, True, "1"])
    return recipe


def _unchanged(model: torch.nn.Module, state: dict, types: dict) -> bool:
    now = model.state_dict()
    return (
        {n: type(m) for n, m in model.named_modules()} == types
        and now.keys() == state.keys()
        and all(torch.equal(v, state[k]) for k, v in now.items())
        and getattr(model.config, "quantization_config", None) is None
    )


def classify(arch: str, recipe: dict) -> tuple[str, str]:
    """(outcome, detail) of compressing a fresh tiny ``arch`` model with ``recipe``."""
    model = tiny_model(arch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    try:
        report = compress_model(model, recipe, progress=False)
    except HfCompressError as error:
        message = str(error)
        if not _unchanged(model, state, types):
            return "model changed", message
        named = any(k in message for k in ("stages", "exclude", "version", "targets", "module"))
        return ("refused cleanly" if named else "unclear"), message
    except Exception as error:
        return "crashed", f"{type(error).__name__}: {error}"
    finite = bool(torch.isfinite(model_output(model, tiny_inputs(arch, model))).all())
    if not report.modules or not finite:
        return "silently wrong", "nothing compressed" if not report.modules else "non-finite"
    return "compressed", ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="recipes per architecture")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--archs", nargs="+", default=["gpt2", "llama"])
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tally: Counter[tuple[str, str]] = Counter()
    examples: dict[str, str] = {}
    start = time.perf_counter()
    for arch in args.archs:
        for _ in range(args.n):
            recipe = random_recipe(rng)
            outcome, detail = classify(arch, recipe)
            tally[(arch, outcome)] += 1
            if outcome not in ("compressed", "refused cleanly"):
                examples.setdefault(outcome, f"{arch} {recipe} -> {detail[:300]}")
    print(f"| arch | tried | {' | '.join(OUTCOMES)} |")
    print("|---|---:|" + "---:|" * len(OUTCOMES))
    for arch in args.archs:
        counts = [tally[(arch, o)] for o in OUTCOMES]
        print(f"| {arch} | {sum(counts)} | {' | '.join(map(str, counts))} |")
    print(f"\n{time.perf_counter() - start:.0f} s")
    for outcome, example in examples.items():
        print(f"first {outcome}: {example}")


if __name__ == "__main__":
    main()
