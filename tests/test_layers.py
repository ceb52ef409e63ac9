"""Layer selection: "auto" on seven architectures, the extras, patterns, wrappers and errors."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gsam_monitor import CollectOptions, GSAMMonitor
from gsam_monitor.capture.layers import (
    canonical_named_modules,
    estimate_dim,
    find_block_stacks,
    resolve_layers,
    unwrap_model,
)
from tests.tiny_models import ARCHS, EXPECTED, Stack, minilm, tiny_model


@pytest.fixture(scope="module")
def bert():
    model, tokenizer = minilm()
    return model, tokenizer


def _names(targets) -> list[str]:
    return [t.name for t in targets]


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_embeddings_and_final_norm_on_every_architecture(arch: str) -> None:
    """ "auto" = every block; "embeddings" = hidden_states[0]; "final_norm" = the last hidden state."""
    model = tiny_model(arch)
    stack, norm = EXPECTED[arch]
    targets = resolve_layers(model, "auto")
    assert _names(targets) == [f"{stack}.0", f"{stack}.1"]
    assert all(t.dim == 16 for t in targets)

    extras = ["embeddings", "auto"] + (["final_norm"] if norm else [])
    if norm is None:
        with pytest.raises(ValueError, match="has no norm module after its block stack"):
            resolve_layers(model, ["auto", "final_norm"])
    else:
        assert resolve_layers(model, "final_norm")[0].module_name == norm

    ids = torch.randint(1, 64, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0  # right padding
    mask[1, :2] = 0  # left padding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor = GSAMMonitor(model, extras, collection=CollectOptions(max_tokens_per_layer=None))
    with monitor, torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    keep = mask.bool().numpy()
    hidden = [h.double().numpy()[keep] for h in out.hidden_states]
    # The monitor's embedding output is HF's hidden_states[0]; its block i output is
    # hidden_states[i + 1] (before the final norm, which HF folds into the last entry).
    expected = {"embeddings": hidden[0], f"{stack}.0": hidden[1]}
    if norm is not None:
        expected["final_norm"] = out.last_hidden_state.double().numpy()[keep]
    for name, rows in expected.items():
        stats = monitor.stats(name, "eval")
        assert float(stats.count) == keep.sum()
        np.testing.assert_allclose(stats.mean.numpy(), rows.mean(0), rtol=1e-5, atol=1e-6)


def test_auto_on_minilm(bert) -> None:
    model, _ = bert
    assert _names(resolve_layers(model)) == [f"encoder.layer.{i}" for i in range(6)]
    assert [t.dim for t in resolve_layers(model, ["embeddings", "auto"])] == [384] * 7


def test_patterns_types_objects_and_ignore(bert) -> None:
    model, _ = bert
    blocks = [f"encoder.layer.{i}" for i in range(6)]
    # A glob takes the outermost matches: the blocks, not their children.
    assert _names(resolve_layers(model, "encoder.layer.*")) == blocks
    assert _names(resolve_layers(model, re.compile(r"encoder\.layer\.[0-2]"))) == blocks[:3]
    layer_type = type(model.encoder.layer[0])
    assert _names(resolve_layers(model, layer_type)) == blocks
    assert _names(resolve_layers(model, [model.encoder.layer[4], "encoder.layer.1"])) == blocks[4:5] + blocks[1:2]
    assert _names(resolve_layers(model, "auto", ignore=["encoder.layer.0", re.compile(r".*\.5")])) == blocks[1:5]
    assert _names(resolve_layers(model, ["embeddings", "auto"], ignore="embeddings")) == blocks
    # fnmatch's "*" crosses dots; "?" and [...] do not need to.
    assert len(resolve_layers(model, "*.output.LayerNorm")) == 12  # attention.output too
    leaves = _names(resolve_layers(model, "encoder.layer.?.output.LayerNorm"))
    assert leaves == [f"{b}.output.LayerNorm" for b in blocks]


def test_unknown_names_list_close_matches(bert) -> None:
    model, _ = bert
    with pytest.raises(ValueError, match=r"no module named 'encoder.layers.1'.*Close matches: encoder\.layer\.1"):
        GSAMMonitor(model, "encoder.layers.1")
    with pytest.raises(ValueError, match=r"ignore=: no module named 'encoder.layr.0'"):
        resolve_layers(model, "auto", ignore="encoder.layr.0")
    with pytest.raises(ValueError, match=r"no module named 'decoder.block.\*'"):
        resolve_layers(model, "decoder.block.*")
    with pytest.raises(ValueError, match="matches no module name"):
        resolve_layers(model, re.compile(r"decoder\.\d+"))
    with pytest.raises(ValueError, match="the model has no module of this type"):
        resolve_layers(model, nn.Conv2d)


def test_selection_errors(bert) -> None:
    model, _ = bert
    with pytest.raises(ValueError, match="selects no module; narrow ignore=") as info:
        resolve_layers(model, "encoder.layer.0", ignore="encoder.layer.*")
    assert str(info.value).startswith("layers=['encoder.layer.0'] with ignore=['encoder.layer.*'] selects no module")
    specs = [re.compile(r"encoder\.layer\.0"), "encoder.layer.1"]
    with pytest.raises(ValueError, match="selects no module") as info:
        resolve_layers(model, specs, ignore=type(model.encoder.layer[0]))
    assert str(info.value).startswith(
        r"layers=[re.compile('encoder\\.layer\\.0'), 'encoder.layer.1'] with ignore=[BertLayer] selects no module"
    )  # each spec as written, not the repr of its repr
    with pytest.raises(ValueError, match="layers= is empty"):
        resolve_layers(model, [])
    with pytest.raises(ValueError, match=r"'encoder\.layer\.2' is selected twice"):
        resolve_layers(model, ["auto", "encoder.layer.2"])
    with pytest.raises(ValueError, match=r"'encoder.layer.0.attention' .* is inside 'encoder.layer.0'"):
        resolve_layers(model, ["encoder.layer.0", "encoder.layer.0.attention"])
    with pytest.raises(TypeError, match="entries must be str, compiled regex"):
        resolve_layers(model, [3])
    with pytest.raises(TypeError, match="layers= must be a name, glob"):
        resolve_layers(model, 3)
    with pytest.raises(ValueError, match="not a sub-module of the model"):
        resolve_layers(model, nn.Linear(2, 2))
    with pytest.raises(ValueError, match="got the model itself"):
        resolve_layers(model, model)


def test_auto_without_a_stack_fails_with_the_top_level_names() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"found no repeated block stack.*Top-level modules: 0, 1, 2"):
        resolve_layers(model, "auto")
    with pytest.raises(ValueError, match="'embeddings': found no repeated block stack"):
        resolve_layers(model, "embeddings")
    with pytest.raises(ValueError, match=r"in Identity; the model has no submodules \(build its layers before"):
        resolve_layers(nn.Identity(), "auto")


def test_auto_prefers_the_outer_stack_over_longer_inner_lists() -> None:
    """An MoE layer's eight experts do not beat the two layers holding them."""

    class MoELayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(8))
            self.norm = nn.LayerNorm(4)

    class MoE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dropouts = nn.ModuleList(nn.Dropout() for _ in range(5))  # no parameters: not blocks
            self.layers = nn.ModuleList(MoELayer() for _ in range(2))
            self.final = nn.LayerNorm(4)

    model = MoE()
    assert [name for name, _ in find_block_stacks(model)] == ["layers"]
    assert _names(resolve_layers(model, ["auto", "final_norm"])) == ["layers.0", "layers.1", "final_norm"]
    assert estimate_dim(model, model.layers[0]) == 4


class _FakeFSDP(nn.Module):
    """Holds the real module as FSDP (v1) does."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._fsdp_wrapped_module = module

    def forward(self, *args, **kwargs):
        return self._fsdp_wrapped_module(*args, **kwargs)


class DataParallel(nn.Module):  # the class name is what marks ``module`` as a wrapper link
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_wrapped_models_resolve_to_the_same_names() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = Stack(dim=3, depth=3)
    plain = _names(resolve_layers(model, "auto"))
    assert plain == ["blocks.0", "blocks.1", "blocks.2"]
    real_dp = nn.DataParallel(model)  # no GPU: a transparent wrapper
    compiled = torch.compile(model, backend="eager")
    fsdp = _FakeFSDP(model)
    for wrapped in (real_dp, DataParallel(model), compiled, fsdp, DataParallel(compiled)):
        assert _names(resolve_layers(wrapped, "auto")) == plain
        assert _names(resolve_layers(wrapped, "blocks.1")) == ["blocks.1"]
        assert unwrap_model(wrapped) is model

    inner = Stack(dim=3, depth=2)
    inner.blocks[0] = checkpoint_wrapper(inner.blocks[0])
    inner.blocks[1] = checkpoint_wrapper(inner.blocks[1])
    names = canonical_named_modules(inner)
    assert "blocks.0" in names and isinstance(names["blocks.0"], nn.Linear)
    assert _names(resolve_layers(inner, "auto")) == ["blocks.0", "blocks.1"]

    class Holder(nn.Module):  # a child really called "module" keeps its name
        def __init__(self) -> None:
            super().__init__()
            self.module = Stack(dim=3, depth=2)

    assert _names(resolve_layers(Holder(), "auto")) == ["module.blocks.0", "module.blocks.1"]


def test_wrapped_model_is_monitored_with_the_mask() -> None:
    model = Stack(dim=3, depth=2)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    for wrapped in (DataParallel(model), torch.compile(model, backend="eager"), _FakeFSDP(model)):
        monitor = GSAMMonitor(wrapped, "auto", collection=CollectOptions(max_tokens_per_layer=None))
        with monitor, torch.no_grad():
            wrapped(x, mask)  # positional attention_mask
        stats = monitor.stats("blocks.1", "eval")
        assert float(stats.count) == 5
        np.testing.assert_allclose(stats.mean.numpy(), x[mask.bool()].mean(0).numpy(), rtol=1e-12)


def test_estimate_dim_of_modules() -> None:
    model = nn.Sequential(nn.Conv2d(3, 7, 3), nn.Linear(7, 5), nn.Embedding(3, 9), nn.ReLU())
    assert estimate_dim(model, model[0]) == 7
    assert estimate_dim(model, model[2]) == 9
    assert estimate_dim(model, model) == 9
    assert estimate_dim(model, model[3]) is None
