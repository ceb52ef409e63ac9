"""GSAMMonitor(reservoir_size=...): a bounded sample of the activation values per layer and phase."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from gsam_monitor import CollectOptions, GSAMMonitor
from tests.options import with_defaults
from tests.tiny_models import Stack

D = 3


def _monitor(model, **kwargs) -> GSAMMonitor:
    kwargs = with_defaults(kwargs, collection={"max_tokens_per_layer": None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10 in tests
        return GSAMMonitor(model, layers="auto", every_n_steps=2, **kwargs)


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(3, 5, D, generator=gen, dtype=torch.float64)
        mask = torch.ones(3, 5, dtype=torch.int64)
        mask[1, 3:] = 0
        mask[2, 1:] = 0
        out.append((x, mask))
    return out


def _run(monitor: GSAMMonitor, model, batches) -> None:
    with monitor, torch.no_grad():
        for x, mask in batches:
            model(x, attention_mask=mask)
            monitor.step()


def test_sample_holds_every_unmasked_value_when_it_fits():
    model = Stack(dim=D, depth=2)
    monitor = _monitor(model, collection=CollectOptions(reservoir_size=1000))
    batches = _batches(4)
    _run(monitor, model, batches)
    expected = np.sort(np.concatenate([x[m.bool()].numpy().ravel() for x, m in batches]))
    for layer in ("blocks.0", "blocks.1"):
        sample = monitor.sample(layer, "eval")
        assert sample.count == expected.size
        np.testing.assert_allclose(np.sort(sample.values()), expected, rtol=1e-6)  # float32 storage
    assert monitor.sample("blocks.0", "train") is None  # no training forward ran


def test_sample_is_bounded_subset_and_survives_state_dict():
    model = Stack(dim=D, depth=1)
    monitor = _monitor(model, collection=CollectOptions(reservoir_size=10))
    batches = _batches(6)
    _run(monitor, model, batches[:3])
    values = monitor.sample("blocks.0", "eval").values()
    fed = np.concatenate([x[m.bool()].numpy().ravel() for x, m in batches[:3]]).astype(np.float32)
    assert values.size == 10 and np.isin(values.astype(np.float32), fed).all()

    buffer = io.BytesIO()
    torch.save(monitor.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = _monitor(Stack(dim=D, depth=1), collection=CollectOptions(reservoir_size=10))
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.sample("blocks.0", "eval").values(), values)
    # The random stream is restored too: the same further data gives the same sample.
    _run(monitor, model, batches[3:])
    _run(restored, restored.model, batches[3:])
    np.testing.assert_array_equal(restored.sample("blocks.0", "eval").values(),
                                  monitor.sample("blocks.0", "eval").values())

    monitor.reset()
    assert monitor.sample("blocks.0", "eval").count == 0


def test_no_sample_by_default_and_errors():
    model = Stack(dim=D, depth=1)
    plain = _monitor(model)
    _run(plain, model, _batches(1))
    assert "samples" in plain.state_dict() and plain.state_dict()["samples"] == {}
    with pytest.raises(ValueError, match="collects no reservoir sample; construct it with"):
        plain.sample("blocks.0", "eval")
    message = r"CollectOptions\(reservoir_size=\) must be a positive int \(or None for no sample\); got 0"
    with pytest.raises(ValueError, match=message):
        _monitor(model, collection=CollectOptions(reservoir_size=0))
    sampled = _monitor(model, collection=CollectOptions(reservoir_size=10))
    _run(sampled, model, _batches(1))
    other = _monitor(model, collection=CollectOptions(reservoir_size=20))
    with pytest.raises(ValueError, match="reservoir samples hold 10 values, this monitor has reservoir_size=20"):
        other.load_state_dict(sampled.state_dict())
