"""The planner: per-layer ranks / sparsities that meet a global budget, as an ordinary recipe."""

from __future__ import annotations

import itertools

import pytest
import torch
import yaml

from conftest import tiny_model
from hfcompress import compress_model
from hfcompress.errors import InvalidParameterError
from hfcompress.planner import (
    _allocate_ranks,
    _allocate_sparsity,
    _pruning_errors,
    _tail_errors,
    plan_recipe,
)
from hfcompress.recipe import Recipe

CALIBRATION = torch.randint(1, 128, (12, 24), generator=torch.Generator().manual_seed(5))
MLP = r"model\.layers\.\d+\.mlp\.\w+_proj"


def test_lowrank_plan_meets_budget_and_compress_model_agrees():
    model = tiny_model("llama")
    plan = plan_recipe(model, CALIBRATION, keep=0.5, targets=MLP, progress=False)
    assert plan.dense == 6 * 128 * 64
    assert plan.planned <= plan.budget == int(0.5 * plan.dense)
    # the modules are factorized for the objective their ranks were allocated with
    assert plan.recipe.stages[0].criterion == "fisher_whitened"
    output = plan_recipe(
        model, CALIBRATION, keep=0.5, targets=MLP, weighting="output", progress=False
    )
    assert output.recipe.stages[0].criterion == "whitened"
    cheapest = min(sum(r.shape) for r in plan.rows)
    assert plan.budget - plan.planned < cheapest  # nothing else fits
    recipe = Recipe.load(yaml.safe_load(plan.recipe.to_yaml()))  # YAML round trip
    report = compress_model(model, recipe, calibration=CALIBRATION, progress=False)
    ranks = {r.name: r.setting for r in plan.rows if r.setting != "dense"}
    assert {m.name: m.settings["rank"] for m in report.modules} == ranks
    dense_kept = sum(r.params for r in plan.rows if r.setting == "dense")
    # no biases in Llama MLPs: the plan's count is exactly what compress_model leaves
    assert sum(m.params_after for m in report.modules) + dense_kept == plan.planned


def test_allocation_is_optimal_on_a_small_case():
    """Brute force over every rank / keep-dense choice within the budget: the allocation (with
    its keep-dense option) reaches the least total error."""
    spectra = {
        "a": torch.tensor([0.5, 0.3, 0.1, 0.1]),
        "b": torch.tensor([0.7, 0.1, 0.1, 0.1]),
        "c": torch.tensor([0.4, 0.4, 0.1, 0.05, 0.05]),
    }
    shapes = {"a": (4, 4), "b": (6, 4), "c": (5, 8)}  # rank costs 8, 10, 13; dense 16, 24, 40
    errors = {n: _tail_errors(s) for n, s in spectra.items()}

    def options(n):
        o, i = shapes[n]
        caps = (o * i) // (o + i)
        return [(r, r * (o + i), float(errors[n][r])) for r in range(1, caps + 1)] + [
            (None, o * i, 0.0)
        ]

    for budget in range(31, 81):
        choice = _allocate_ranks(errors, shapes, budget)
        cost = sum(
            o * i if choice[n] is None else choice[n] * (o + i) for n, (o, i) in shapes.items()
        )
        error = sum(0.0 if choice[n] is None else float(errors[n][choice[n]]) for n in shapes)
        best = min(
            ea + eb + ec
            for (_, ca, ea), (_, cb, eb), (_, cc, ec) in itertools.product(
                options("a"), options("b"), options("c")
            )
            if ca + cb + cc <= budget
        )
        assert cost <= budget
        assert error == pytest.approx(best), budget


def test_planned_ranks_beat_uniform_ranks_at_the_same_budget():
    model = tiny_model("llama")
    inputs = {"input_ids": CALIBRATION}
    reference = model(**inputs).logits.detach()

    def logit_error(recipe):
        m = tiny_model("llama")
        compress_model(m, recipe, calibration=CALIBRATION, progress=False)
        return float((m(**inputs).logits.detach() - reference).norm() / reference.norm())

    plan = plan_recipe(model, CALIBRATION, keep=0.3, targets=r".*_proj", progress=False)
    uniform_rank = max(
        r for r in range(1, 33) if sum(r * sum(row.shape) for row in plan.rows) <= plan.budget
    )
    uniform = {
        "stages": [
            {
                "method": "lowrank",
                "targets": r".*_proj",
                "rank": uniform_rank,
                "criterion": "whitened",
            }
        ]
    }
    assert logit_error(plan.recipe) <= logit_error(uniform)


def test_pruning_errors_are_sorted_obs_saliencies():
    g = torch.Generator().manual_seed(3)
    W, X = torch.randn(3, 5, generator=g), torch.randn(5, 40, generator=g)
    H, G = X @ X.T, torch.tensor([1.0, 2.0, 0.5])
    errors = _pruning_errors(W, H, G)
    damped = H.double() + 0.01 * H.double().diagonal().mean() * torch.eye(5, dtype=torch.float64)
    hinv = torch.linalg.inv(damped).diagonal()
    for k in range(6):
        # every row drops its k smallest w²/[H⁻¹]_ii, weighted by its G
        expected = sum(
            float(G[j]) * sorted((W[j].double() ** 2 / hinv).tolist())[:k][i]
            for j in range(3)
            for i in range(k)
        )
        assert float(errors[k]) == pytest.approx(expected, rel=1e-7, abs=1e-12), k


def test_sparsity_allocation_is_optimal_on_a_small_case():
    """Brute force over every per-row prune count: no allocation pruning at least as many weights
    has less error (the Lagrangian guarantee), and it overshoots the target by less than a row."""
    g = torch.Generator().manual_seed(4)
    shapes = {"a": (2, 4), "b": (3, 3), "c": (1, 5)}
    errors = {}
    for n, (out, inp) in shapes.items():
        steps = (torch.rand(inp, generator=g, dtype=torch.float64) * 3).sort().values * out
        errors[n] = torch.cat([steps.new_zeros(1), steps.cumsum(0)])
    for prune in range(1, 17):
        chosen = _allocate_sparsity(errors, shapes, prune)
        pruned = sum(shapes[n][0] * k for n, k in chosen.items())
        error = sum(float(errors[n][k]) for n, k in chosen.items())
        best = min(
            sum(float(errors[n][k]) for n, k in zip(shapes, ks, strict=True))
            for ks in itertools.product(*(range(i) for _, i in shapes.values()))
            if sum(shapes[n][0] * k for n, k in zip(shapes, ks, strict=True)) >= pruned
        )
        assert prune <= pruned < prune + max(out for out, _ in shapes.values())
        assert error == pytest.approx(best), prune


@pytest.mark.parametrize("weighting", ["loss", "output"])
def test_saliency_prune_plan_meets_budget_and_compress_model_agrees(weighting):
    model = tiny_model("llama")
    plan = plan_recipe(
        model,
        CALIBRATION,
        keep=0.5,
        targets=MLP,
        method="prune",
        weighting=weighting,
        progress=False,
    )
    stage = plan.recipe.stages[0]
    assert stage.criterion == "sparsegpt"
    assert plan.planned <= plan.budget
    assert plan.budget - plan.planned < max(r.shape[0] for r in plan.rows)  # within one step
    assert len({r.setting for r in plan.rows}) > 1  # not uniform
    report = compress_model(model, plan.recipe, calibration=CALIBRATION, progress=False)
    kept = {m.name: m.params_after for m in report.modules}
    assert kept == {r.name: r.params for r in plan.rows}


def test_prune_plan_is_owl_style_and_meets_the_count():
    model = tiny_model("llama")
    plan = plan_recipe(
        model,
        CALIBRATION,
        keep=0.5,
        targets=r".*_proj",
        method="prune",
        allocation="owl",
        progress=False,
    )
    stage = plan.recipe.stages[0]
    assert stage.criterion == "wanda" and len(stage.overrides) == 2  # one sparsity per block
    per_block = [s["sparsity"] for s in stage.overrides.values()]
    assert per_block[0] != per_block[1]
    assert abs(plan.planned - plan.budget) <= len(plan.rows)  # per-module rounding only
    report = compress_model(model, plan.recipe, calibration=CALIBRATION, progress=False)
    kept = sum(m.params_after for m in report.modules)
    assert kept == plan.planned


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep": 1.5}, "keep=1.5"),
        ({"keep": 0.5, "targets": "nothing"}, "targets='nothing'"),
        ({"keep": 0.5, "method": "quantize"}, "method='quantize'"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"targets": MLP, **kwargs}
    with pytest.raises(InvalidParameterError, match=match):
        plan_recipe(tiny_model("llama"), CALIBRATION, progress=False, **kwargs)
