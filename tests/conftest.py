"""Shared fixtures: tiny config-built models (fixed seed) and the slow/gpu markers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow to run")
    skip_gpu = pytest.mark.skip(reason="gpu: no CUDA device")
    run_slow = config.getoption("--run-slow")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def linear_and_conv1d(
    out_features: int, in_features: int, bias: bool = True
) -> tuple[nn.Linear, Conv1D]:
    """An ``nn.Linear`` and a GPT-2 ``Conv1D`` holding the same logical W: [out, in] and bias."""
    linear = nn.Linear(in_features, out_features, bias=bias)
    conv = Conv1D(nf=out_features, nx=in_features)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        if bias:
            conv.bias.copy_(linear.bias)
        else:
            conv.bias.zero_()
    return linear, conv


def devices() -> list[pytest.param]:
    """CPU always; CUDA as a ``gpu``-marked param."""
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
    ]
