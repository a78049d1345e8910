"""Compression during distributed training: torchrun with 2 CPU processes (gloo), DDP and FSDP2.

The workers are tests/scripts/ddp_gradual_pruning.py and tests/scripts/distributed_compression.py;
each torchrun launch runs several scenarios and the tests below share its results.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from hfcompress.errors import HfCompressError
from hfcompress.layers import KroneckerLinear, LowRankLinear, PrunedLinear
from hfcompress.training.distributed import (
    check_supported,
    drop_zero_directions_,
    effective_rank,
    truncate_in_place_,
)

SCRIPTS = Path(__file__).parent / "scripts"
SCRIPT = SCRIPTS / "ddp_gradual_pruning.py"
WORKER = SCRIPTS / "distributed_compression.py"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed unavailable"
)


def torchrun(script: Path, *args: str, port: str | None = None) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    rendezvous = [f"--master_port={port}"] if port else ["--standalone"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        *rendezvous,
        str(script),
        *args,
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]


def load_worker():
    spec = importlib.util.spec_from_file_location("distributed_compression", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def results(out: Path, scenario: str) -> list[dict]:
    return [torch.load(out / f"{scenario}.rank{r}.pt") for r in (0, 1)]


def assert_ranks_identical(ranks: list[dict]) -> None:
    layers0, layers1 = ranks[0]["layers"], ranks[1]["layers"]
    assert layers0.keys() == layers1.keys() and layers0
    for name, tensors in layers0.items():
        for key, value in tensors.items():
            assert torch.equal(value, layers1[name][key]), (name, key)


# ---- DDP: gradual pruning ---------------------------------------------------------------------


def test_torchrun_two_processes_identical_masks_and_target_sparsity(tmp_path):
    torchrun(SCRIPT, str(tmp_path), port="29533")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    layers0, layers1 = ranks[0]["layers"], ranks[1]["layers"]
    assert layers0.keys() == layers1.keys() and layers0
    for name in layers0:
        assert torch.equal(layers0[name]["mask"], layers1[name]["mask"]), name
        assert torch.equal(layers0[name]["weight"], layers1[name]["weight"]), name
        mask = layers0[name]["mask"]
        assert int((~mask).sum()) == round(0.5 * mask.numel())
        assert torch.all(layers0[name]["weight"][~mask] == 0)


# ---- FSDP2 and DDP: one torchrun launch, several scenarios ------------------------------------


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    torchrun(WORKER, str(out), "fsdp_prune", "fsdp_rank", "ddp_rank")
    return out


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> dict:
    """The gradual-pruning run in this process: batches of 4 where the ranks take 2 each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return load_worker().run_prune(str(tmp_path_factory.mktemp("single")), distributed=False)
    finally:
        torch.set_num_threads(threads)


def test_fsdp_gradual_pruning_matches_the_single_process_run(launched, single_process):
    ranks = results(launched, "fsdp_prune")
    assert ranks[0]["world_size"] == 2
    assert_ranks_identical(ranks)
    sharded, reference = ranks[0]["layers"], single_process["layers"]
    assert sharded.keys() == reference.keys()
    pruned = [n for n in reference if "mask" in reference[n]]
    assert pruned and len(pruned) < len(reference)  # low-rank and Kronecker layers trained too
    for name, tensors in reference.items():
        for key, value in tensors.items():
            if key == "mask":
                # thresholds over the whole weight: exactly the unsharded masks
                assert torch.equal(sharded[name]["mask"], value), name
            else:
                torch.testing.assert_close(sharded[name][key], value, atol=1e-5, rtol=0)
    for name in pruned:
        mask, weight = sharded[name]["mask"], sharded[name]["weight"]
        assert int((~mask).sum()) == round(0.5 * mask.numel())
        assert torch.all(weight[~mask] == 0), name  # AdamW + weight decay revived nothing
    logged = ranks[0]["metrics"]  # CompressionLoggingCallback on the sharded model
    assert logged["compression/sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert logged["compression/params"] == single_process["metrics"]["compression/params"]


def test_fsdp_checkpoint_reloads_in_one_process_with_identical_logits(launched):
    sharded = results(launched, "fsdp_prune")[0]
    model = AutoModelForCausalLM.from_pretrained(launched / "prune_final")
    block = model.transformer.h[0]
    assert isinstance(block.attn.c_attn, PrunedLinear)
    assert isinstance(block.mlp.c_fc, LowRankLinear)
    assert isinstance(block.mlp.c_proj, KroneckerLinear)
    for name, tensors in sharded["layers"].items():
        layer = model.get_submodule(name)
        if "mask" in tensors:
            assert torch.equal(layer.mask, tensors["mask"]), name
    probe = load_worker().PROBE
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    assert torch.equal(logits, sharded["logits"])


@pytest.mark.parametrize("scenario", ["fsdp_rank", "ddp_rank"])
def test_progressive_rank_ends_at_the_scheduled_ranks(launched, scenario):
    ranks = results(launched, scenario)
    assert_ranks_identical(ranks)
    result = ranks[0]
    assert set(result["ranks"].values()) == {4}  # 16 → 8 (step 3) → 4 (step 6)
    for name, shape in result["shapes"].items():
        tensors = result["layers"][name]
        live = (tensors["u.weight"] != 0).any(0) & (tensors["v.weight"] != 0).any(1)
        assert int(live.sum()) == 4, name
        # FSDP: the factors keep their training shapes with zero directions; DDP: cut at the end
        assert shape[1] == (16 if scenario == "fsdp_rank" else 4), name
    assert result["metrics"]["compression/mean_rank"] == 4  # the zeroed directions not counted
    if scenario == "fsdp_rank":
        assert set(result["gathered_ranks"].values()) == {4}
    model = AutoModelForCausalLM.from_pretrained(launched / f"{scenario}_final")
    saved = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert saved.keys() == result["ranks"].keys()
    assert all(m.rank == 4 and m.u.weight.shape[1] == 4 for m in saved.values())
    with torch.no_grad():
        logits = model(input_ids=load_worker().PROBE).logits
    # the same product; the zero directions change only the summation order
    torch.testing.assert_close(logits, result["logits"], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_resume_restores_masks_ranks_and_optimizer_exactly(tmp_path):
    torchrun(WORKER, str(tmp_path), "fsdp_resume", "ddp_resume")
    for scenario, runs in (("fsdp_resume", ("prune", "rank")), ("ddp_resume", ("rank",))):
        result = results(tmp_path, scenario)[0]
        reference_ranks, resumed_ranks = result["ranks"]
        assert reference_ranks == resumed_ranks and set(resumed_ranks.values()) == {4}
        for run in runs:
            reference, resumed = result[run]
            for name, tensors in reference.items():
                for key, value in tensors.items():
                    assert torch.equal(resumed[name][key], value), (scenario, run, name, key)


# ---- the in-place operations, single process ----------------------------------------------------


def test_truncate_in_place_keeps_shapes_and_matches_truncate(one_thread):
    layer = LowRankLinear.from_module(nn.Linear(24, 16), rank=8)
    expected = LowRankLinear.from_factors(layer.u.weight, layer.v.weight, layer.u.bias)
    expected.truncate(3)
    params = [layer.u.weight, layer.v.weight]
    truncate_in_place_(layer, 3)
    assert [layer.u.weight, layer.v.weight] == params and layer.rank == 8
    assert effective_rank(layer) == 3
    assert torch.all(layer.u.weight[:, 3:] == 0) and torch.all(layer.v.weight[3:] == 0)
    torch.testing.assert_close(layer.dense_weight(), expected.dense_weight(), atol=1e-6, rtol=0)
    x = torch.randn(5, 24)
    before = layer(x)
    drop_zero_directions_(layer)
    assert layer.rank == 3 and layer.u.weight.shape == (16, 3)
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=0)


def test_fsdp1_and_deepspeed_are_refused_with_what_to_use():
    model = nn.Linear(2, 2)
    for args, words in (
        (SimpleNamespace(deepspeed="ds.json", fsdp=None), "DeepSpeed"),
        (SimpleNamespace(deepspeed=None, fsdp="full_shard", fsdp_config={"version": 1}), "version"),
    ):
        with pytest.raises(HfCompressError, match=words):
            check_supported(args, model, "GradualPruningCallback")
    check_supported(SimpleNamespace(deepspeed=None, fsdp="full_shard", fsdp_config={}), model, "x")
