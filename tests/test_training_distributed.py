"""Gradual pruning under torchrun: 2 CPU processes (gloo) end with identical masks and weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_gradual_pruning.py"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_two_processes_identical_masks_and_target_sparsity(tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        str(SCRIPT),
        str(tmp_path),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
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
