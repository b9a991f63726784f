"""Shared fixtures: small models that stress slicing, and both device backends."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from torch import nn

BACKENDS = ["inline", "emulated"]


class TinyNet(nn.Module):
    """An embedding, linear layers and a norm: the shapes real fine-tuning has, in miniature."""

    def __init__(self, vocab: int = 64, dim: int = 24, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, 48)
        self.norm = nn.LayerNorm(48)
        self.head = nn.Linear(48, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).mean(dim=1)
        return self.head(self.norm(torch.relu(self.proj(h))))


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().to(dtype).to(device)


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 64, (8, 6), generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def loss_of(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    x, y = batch
    return nn.functional.cross_entropy(model(x.to(device)).float(), y.to(device))


def assert_positive(section: dict, *keys: str) -> None:
    """Each of ``keys`` in ``section`` is a finite number > 0 (benchmark results)."""
    for key in keys:
        value = section[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


# The same tests run on CUDA where it exists; nothing in CI needs a GPU.
COMPUTE_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.fixture(params=COMPUTE_DEVICES)
def compute_device(request: pytest.FixtureRequest) -> str:
    return request.param


def process_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (any process's, not only our children)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit; whether it did."""
    deadline = time.monotonic() + timeout
    while process_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
