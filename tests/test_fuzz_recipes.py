"""Recipe fuzzing: any recipe either compresses the model or is refused, naming what is wrong,
with the model unchanged. ``max_examples`` is small by default; ``--run-slow`` runs many more.

``bench/fuzz_recipes.py`` runs the same classification over many more recipes and prints the
tally recorded in docs/reliability.md.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import model_output, tiny_inputs, tiny_model
from hfcompress import HfCompressError, compress_model

TARGETS = [
    r".*",
    r".*\.mlp\..*",
    r".*(q|k|v)_proj",
    r"model\.layers\.0\..*",
    r"transformer\.h\.\d+\.mlp\.c_fc",
    r"lm_head",
    r"nothing",
    r"(",
    r"(.*)*x",
    r".*\.layers\.\d+\.self_attn\.o_proj",
]
ANY_NUMBER = st.one_of(
    st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 0.999, 1.0, True, "2", None]),
)
PATTERNS = st.sampled_from(["unstructured", "2:4", "1:4", "4:8", "3:2", "0:4", "x", "2:3"])


def _stage(method: str) -> st.SearchStrategy[dict]:
    base = {"method": st.just(method), "targets": st.sampled_from(TARGETS)}
    fields = {
        "prune": {"sparsity": ANY_NUMBER, "pattern": PATTERNS},
        "lowrank": {"rank": ANY_NUMBER, "ratio": ANY_NUMBER, "energy": ANY_NUMBER},
        "kronecker": {
            "a_shape": st.lists(ANY_NUMBER, min_size=0, max_size=3),
            "terms": ANY_NUMBER,
        },
        "nonsense": {"strength": ANY_NUMBER},
    }[method]
    optional = dict(fields)
    optional["criterion"] = st.sampled_from(
        ["magnitude", "wanda", "svd", "vanloan", "whitened", "bogus"]
    )
    optional["exclude"] = st.sampled_from([r".*\.0\..*", r"(", r".*"])
    optional["overrides"] = st.dictionaries(
        st.sampled_from([r".*\.0\..*", r".*up_proj"]),
        st.dictionaries(st.sampled_from([*fields, "method"]), ANY_NUMBER, max_size=2),
        max_size=1,
    )
    return st.fixed_dictionaries(base, optional=optional)


RECIPES = st.fixed_dictionaries(
    {
        "stages": st.lists(
            st.sampled_from(["prune", "lowrank", "kronecker", "nonsense"]).flatmap(_stage),
            min_size=0,
            max_size=3,
        )
    },
    optional={"exclude": st.sampled_from(["lm_head", r"(", r".*"]), "version": ANY_NUMBER},
)


def _snapshot(model: torch.nn.Module) -> tuple[dict, dict]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, {n: type(m) for n, m in model.named_modules()}


def _unchanged(model: torch.nn.Module, before: tuple[dict, dict]) -> bool:
    state, types = before
    now = model.state_dict()
    return (
        {n: type(m) for n, m in model.named_modules()} == types
        and now.keys() == state.keys()
        and all(torch.equal(v, state[k]) for k, v in now.items())
        and getattr(model.config, "quantization_config", None) is None
    )


def _outcome_is_clean(arch: str, recipe: dict) -> None:
    model = tiny_model(arch)
    before = _snapshot(model)
    try:
        report = compress_model(model, recipe, progress=False)
    except HfCompressError as error:
        message = str(error)
        assert _unchanged(model, before), f"refused but changed the model: {message}"
        # a refusal names where: a stage/field, the recipe's exclude/version, or a module
        assert any(
            key in message for key in ("stages", "exclude", "version", "targets", "module")
        ), message
        return
    assert report.modules, "compressed nothing without an error"
    out = model_output(model, tiny_inputs(arch, model))
    assert torch.isfinite(out).all(), "the compressed model gives non-finite outputs"
    assert math.isfinite(report.params_after)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(recipe=RECIPES)
def test_every_recipe_compresses_or_is_refused_cleanly(arch, recipe):
    _outcome_is_clean(arch, recipe)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(recipe=RECIPES)
def test_many_recipes_compress_or_are_refused_cleanly(arch, recipe):
    _outcome_is_clean(arch, recipe)
