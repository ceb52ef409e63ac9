"""Shared test setup: offline hubs, offline W&B, few threads, fixed seeds.

The network switches are forced, not defaulted: a user's environment (``WANDB_MODE=online``,
``HF_HUB_OFFLINE=0``) must never let the suite reach the network or a W&B server.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import numpy as np
import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def eig_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of torch.linalg.eigvalsh / eigh calls made while the test runs."""
    calls = {"eigvalsh": 0, "eigh": 0}
    for name in calls:
        real = getattr(torch.linalg, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, counted)
    return calls
