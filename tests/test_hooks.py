"""Hooks: output unpacking, padding masks, token subsampling, gradient checkpointing, phases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gsam_monitor.capture.activations as capture_module
from gsam_monitor import CollectOptions, GSAMMonitor, LayerStats
from gsam_monitor.capture.hooks import HookHandles, extract_hidden
from gsam_monitor.capture.rows import TokenSampler, to_rows
from tests.reference import mle_cov
from tests.tiny_models import SENTENCES, Stack, minilm, tiny_model


def _quiet_monitor(*args, **kwargs) -> GSAMMonitor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GSAMMonitor(*args, **kwargs)


def test_extract_hidden_from_every_output_kind() -> None:
    from transformers.modeling_outputs import BaseModelOutput

    h = torch.randn(2, 3, 4)
    assert extract_hidden(h) is h
    assert extract_hidden((h, torch.randn(2, 2, 3, 3))) is h
    assert extract_hidden([None, torch.ones(2, dtype=torch.long), h]) is h
    assert extract_hidden(BaseModelOutput(last_hidden_state=h)) is h
    assert extract_hidden({"logits": torch.randn(2), "hidden_states": h}) is h
    assert extract_hidden({"a": 1, "b": h}) is h
    assert extract_hidden(torch.ones(3, dtype=torch.long)) is None
    assert extract_hidden(None) is None
    assert extract_hidden((1, "x")) is None


def test_conv_outputs_count_channels_as_features() -> None:
    """(B, C, H, W) -> rows of C features, one per position (Delve's convention)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 5, 3, dtype=torch.float64), nn.ReLU(), nn.Conv1d(5, 3, 1, dtype=torch.float64))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = model[0]
            self.conv1 = model[2]

        def forward(self, x):
            y = self.conv(x)  # (B, 5, H, W)
            return self.conv1(y.flatten(2))  # (B, 3, H*W)

    net = Net()
    x = torch.randn(4, 2, 6, 7, dtype=torch.float64)
    monitor = GSAMMonitor(net, ["conv", "conv1"], collection=CollectOptions(max_tokens_per_layer=None))
    with torch.no_grad():
        y = net.conv(x)
    with monitor, torch.no_grad():
        net(x)
    rows = y.permute(0, 2, 3, 1).reshape(-1, 5).numpy()
    stats = monitor.stats("conv", "eval")
    assert float(stats.count) == 4 * 4 * 5
    np.testing.assert_allclose(stats.covariance().numpy(), mle_cov(rows), rtol=1e-9, atol=1e-12)
    assert monitor.stats("conv1", "eval").dim == 3
    rows, channels_first = to_rows(torch.zeros(2, 3, 4), nn.Linear(4, 4))
    assert rows.shape == (2, 3, 4) and not channels_first


def test_hook_handles_remove_is_idempotent_and_hooks_leave_outputs_alone() -> None:
    model = Stack(dim=3, depth=2)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    before = model(x)
    monitor = GSAMMonitor(model, "auto")
    monitor.attach()
    assert len(model.blocks[0]._forward_hooks) == 1 and len(model._forward_pre_hooks) == 1
    assert torch.equal(model(x), before)
    monitor.detach()
    monitor.detach()
    assert not model.blocks[0]._forward_hooks and not model._forward_pre_hooks and not model._forward_hooks
    handles = HookHandles()
    handles.add(model.register_forward_hook(lambda *a: None))
    handles.remove()
    handles.remove()
    assert len(handles) == 0 and not model._forward_hooks


def test_mask_is_taken_from_kwargs_or_position_and_cleared_after_a_failed_forward() -> None:
    model = Stack(dim=3, depth=1)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    monitor = GSAMMonitor(model, "blocks.0", collection=CollectOptions(max_tokens_per_layer=None))
    with monitor, torch.no_grad():
        model(x, attention_mask=mask)
        model(x, mask)
        assert float(monitor.stats("blocks.0", "eval").count) == 10
        # A forward that raises after the mask was captured must not leave it behind.
        with pytest.raises(RuntimeError, match="boom"):
            model.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
            model(x, mask)
        model._forward_hooks.popitem()
        assert monitor._capture.context.mask is None
        model.blocks[0](x)  # called directly: no mask, every row counts
        assert float(monitor.stats("blocks.0", "eval").count) == 10 + 5 + 8


@pytest.fixture(scope="module")
def bert64():
    return minilm(torch.float64)


def test_padded_and_unpadded_batches_give_identical_statistics(bert64) -> None:
    """Padding never enters: a padded batch equals the sentences run one by one (fp64 model),
    and both equal numpy on the valid rows of the model's own hidden states."""
    model, tokenizer = bert64
    sentences = SENTENCES[:4]
    layers = ["embeddings", "encoder.layer.2", "encoder.layer.5"]
    padded = GSAMMonitor(model, layers, collection=CollectOptions(max_tokens_per_layer=None))
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).sum() > 10
    with padded, torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    one_by_one = GSAMMonitor(model, layers, collection=CollectOptions(max_tokens_per_layer=None))
    with one_by_one, torch.no_grad():
        for sentence in sentences:
            model(**tokenizer([sentence], return_tensors="pt"))
    keep = enc["attention_mask"].bool().numpy()
    for name, index in zip(layers, (0, 3, 6), strict=True):
        a, b = padded.stats(name, "eval"), one_by_one.stats(name, "eval")
        rows = out.hidden_states[index].numpy()[keep]
        assert float(a.count) == float(b.count) == keep.sum()
        np.testing.assert_allclose(a.mean.numpy(), b.mean.numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(a.covariance().numpy(), b.covariance().numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(a.covariance().numpy(), mle_cov(rows), rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(a.mean.numpy(), rows.mean(0), rtol=1e-9, atol=1e-13)


def test_token_sampler_is_uniform_without_replacement_over_valid_rows() -> None:
    rows = torch.arange(10, dtype=torch.float64)[:, None].repeat(1, 2)
    valid = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    sampler = TokenSampler(seed=3)
    picked = np.zeros(10)
    trials = 4000
    for _ in range(trials):
        out, keep = sampler.sample(rows, valid, 2)
        chosen = out[keep][:, 0].long().numpy()
        assert len(chosen) == 2 and len(set(chosen)) == 2 and valid[chosen].all()
        picked[chosen] += 1
    # Each of the 4 valid rows is in a 2-subset with probability 1/2.
    np.testing.assert_allclose(picked[valid.numpy()] / trials, 0.5, atol=0.04)
    assert picked[~valid.numpy()].sum() == 0
    # Fewer valid rows than k: all of them are kept, the rest of the pick is masked out.
    out, keep = sampler.sample(rows, valid, 6)
    assert sorted(out[keep][:, 0].tolist()) == [0.0, 2.0, 3.0, 6.0]
    # Seeded: the same seed gives the same picks, another seed others.
    a = TokenSampler(7).sample(rows, None, 3)[0]
    assert torch.equal(a, TokenSampler(7).sample(rows, None, 3)[0])
    assert not all(torch.equal(a, TokenSampler(s).sample(rows, None, 3)[0]) for s in range(8, 12))
    # No cap, or fewer rows than the cap: rows untouched.
    assert TokenSampler(0).sample(rows, valid, None)[0] is rows


def test_max_tokens_per_layer_caps_each_update() -> None:
    model = Stack(dim=3, depth=1)
    monitor = GSAMMonitor(model, "auto", collection=CollectOptions(max_tokens_per_layer=4))
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    with monitor, torch.no_grad():
        model(x, attention_mask=torch.ones(3, 5))
        model(x, attention_mask=torch.tensor([[1, 1, 0, 0, 0]] + [[0] * 5] * 2))
    assert float(monitor.stats("blocks.0", "eval").count) == 4 + 2


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_counts_tokens_once(reentrant: bool, monkeypatch) -> None:
    model = tiny_model("bert").train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # v5 renames it activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    # A block, a sub-module inside a checkpointed block (re-run in backward), and the embeddings.
    layers = ["embeddings", "encoder.layer.0.output.dense", "encoder.layer.1"]
    ids = torch.randint(1, 64, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    counts = {}
    for skip_recompute in (True, False):
        if not skip_recompute:  # show that the backward pass really re-runs the hooks
            monkeypatch.setattr(capture_module, "in_backward", lambda: False)
        monitor = _quiet_monitor(model, layers, collection=CollectOptions(max_tokens_per_layer=None, phases="train"))
        with monitor, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(input_ids=ids, attention_mask=mask).last_hidden_state.pow(2).sum().backward()
        counts[skip_recompute] = {name: float(monitor.stats(name).count) for name in layers}
    assert counts[True] == dict.fromkeys(layers, 19.0)
    # Without the check the recomputation adds all 21 positions again (the mask is gone by then).
    assert counts[False]["encoder.layer.0.output.dense"] == 19.0 + 21.0


def test_torch_checkpoint_in_a_custom_model_counts_once() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2))

        def forward(self, x):
            for block in self.blocks:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True)
            return x

    net = Net()
    monitor = GSAMMonitor(net, ["blocks.0", "blocks.1.0"], collection=CollectOptions(max_tokens_per_layer=None))
    with monitor:
        net(torch.randn(6, 4, requires_grad=True)).sum().backward()
    # Reentrant checkpointing runs the first forward under no_grad: still the train phase.
    assert float(monitor.stats("blocks.0", "train").count) == 6
    assert float(monitor.stats("blocks.1.0", "train").count) == 6
    assert monitor.stats("blocks.0", "eval") is None


def test_phases_have_separate_statistics_and_keys() -> None:
    model = Stack(dim=3, depth=1)
    x_train = torch.randn(8, 3, dtype=torch.float64)
    x_eval = torch.randn(5, 3, dtype=torch.float64) + 10
    monitor = _quiet_monitor(model, "auto", collection=CollectOptions(max_tokens_per_layer=None), every_n_steps=1)
    with monitor:
        model.train()
        model(x_train)  # grad on, training mode
        model.eval()
        model(x_eval[:2])  # eval mode, grad on
        model.train()
        with torch.no_grad():
            model(x_eval[2:])  # no_grad in training mode
        np.testing.assert_allclose(monitor.stats("blocks.0", "train").mean.numpy(), x_train.mean(0).numpy())
        np.testing.assert_allclose(monitor.stats("blocks.0", "eval").mean.numpy(), x_eval.mean(0).numpy())
        flat = monitor.step()
    assert flat["n/blocks.0"] == 8 and flat["n/blocks.0/eval"] == 5
    only_train = GSAMMonitor(model, "auto", collection=CollectOptions(phases="train"))
    with only_train, torch.no_grad():
        model(x_eval)
    assert only_train.stats("blocks.0", "eval") is None and only_train.stats("blocks.0", "train") is None


def test_a_failing_hook_never_stops_the_model(monkeypatch) -> None:
    model = Stack(dim=3, depth=2)
    monitor = GSAMMonitor(model, "auto")

    def broken(*args, **kwargs):
        raise RuntimeError("monitor bug")

    monkeypatch.setattr(LayerStats, "update", broken)
    x = torch.randn(4, 3, dtype=torch.float64)
    with monitor, pytest.warns(RuntimeWarning, match="the hook of 'blocks.0' raised RuntimeError: monitor bug"):
        for _ in range(3):
            assert torch.equal(model(x), x)
    assert monitor.errors == 6


def test_mask_shape_mismatch_warns_once_and_counts_every_position() -> None:
    class Prefix(nn.Module):  # prepends a token: the mask no longer lines up
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(3, 3) for _ in range(2))

        def forward(self, x, attention_mask=None):
            x = torch.cat([x[:, :1], x], dim=1)
            for block in self.blocks:
                x = block(x)
            return x

    model = Prefix()
    monitor = GSAMMonitor(model, "auto", collection=CollectOptions(max_tokens_per_layer=None))
    with monitor, torch.no_grad(), pytest.warns(RuntimeWarning, match="padding cannot be dropped"):
        model(torch.randn(2, 4, 3), attention_mask=torch.ones(2, 4))
    assert float(monitor.stats("blocks.0", "eval").count) == 10
