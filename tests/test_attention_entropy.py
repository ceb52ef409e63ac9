"""GSAMMonitor(attention_entropy=True): mean attention entropy per layer and head against numpy on
the ``output_attentions`` of the same forwards (padding keys and queries masked), on a tiny BERT
and tiny decoders; where it cannot work, it says so."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from gsam_monitor import CollectOptions, GSAMMonitor, _compat
from gsam_monitor.capture.attention import entropy_sums
from tests.tiny_models import Stack, attention_monitor, sharp_attention_model

_model = sharp_attention_model


_monitor = attention_monitor


def _numpy_entropy(attentions: list[list[torch.Tensor]], masks: list[torch.Tensor]) -> list[np.ndarray]:
    """Per layer, the mean entropy per head over the non-padding query rows of every forward,
    the sum over the non-padding keys only (fp64 numpy)."""
    out = []
    for layer in range(len(attentions[0])):
        sums, rows = 0.0, 0.0
        for per_layer, mask in zip(attentions, masks, strict=True):
            p = per_layer[layer].detach().double().numpy()  # (B, H, Tq, Tk)
            keys = mask.bool().numpy()
            q = keys[:, keys.shape[1] - p.shape[2] :]
            terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0) * keys[:, None, None, :]
            ent = terms.sum(-1)  # (B, H, Tq)
            sums = sums + (ent * q[:, None, :]).sum((0, 2))
            rows = rows + q.sum()
        out.append(sums / rows)
    return out


def _batches(right_padded: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for lengths in ([9, 5, 2], [7, 9, 3, 6]):
        ids = torch.randint(1, 64, (len(lengths), 9), generator=g)
        mask = torch.zeros(len(lengths), 9, dtype=torch.long)
        for i, n in enumerate(lengths):
            if right_padded:
                mask[i, :n] = 1
            else:
                mask[i, 9 - n :] = 1
        out.append((ids, mask))
    return out


def _blocks(arch: str) -> list[str]:
    return {"bert": [f"encoder.layer.{i}" for i in range(2)], "gpt2": [f"h.{i}" for i in range(2)],
            "llama": [f"layers.{i}" for i in range(2)], "gptneox": [f"layers.{i}" for i in range(2)]}[arch]


@pytest.mark.parametrize(
    ("arch", "right_padded"), [("bert", True), ("llama", False), ("gpt2", True), ("gptneox", True)]
)
def test_entropy_per_head_equals_numpy_on_output_attentions(arch: str, right_padded: bool) -> None:
    model = _model(arch)
    monitor = _monitor(model)
    attentions, masks = [], []
    with monitor, torch.no_grad():
        for ids, mask in _batches(right_padded):
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
            attentions.append(list(out.attentions))
            masks.append(mask)
        logged = monitor.log()
    expected = _numpy_entropy(attentions, masks)
    for layer, ent in zip(_blocks(arch), expected, strict=True):
        heads = [logged[f"attn_entropy/{layer}/h{h}/eval"] for h in range(len(ent))]
        np.testing.assert_allclose(heads, ent, rtol=2e-6)  # fp32 probabilities, fp64 sums
        assert logged[f"attn_entropy/{layer}/eval"] == pytest.approx(float(np.mean(ent)), rel=2e-6)
        assert logged[f"attn_entropy_min/{layer}/eval"] == pytest.approx(float(np.min(ent)), rel=2e-6)
        assert 0 < min(heads) and max(heads) < math.log(9)
    assert not any(k.startswith("attn_entropy") and "/h2" in k for k in logged)  # 2 heads
    # Padding matters: unmasked, every padded query row would count too.
    unmasked = _numpy_entropy(attentions, [torch.ones_like(m) for m in masks])
    assert not np.allclose(unmasked[0], expected[0], rtol=1e-3)


def test_kv_cache_steps_use_the_last_mask_columns_as_queries() -> None:
    model = _model("llama")
    monitor = _monitor(model)
    ids, mask = _batches(right_padded=False)[1]
    attentions, masks = [], []
    with monitor, torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, output_attentions=True)
        attentions.append(list(out.attentions))
        masks.append(mask)
        cache = out.past_key_values
        for _ in range(2):  # two generated tokens, one query each
            mask = torch.cat([mask, torch.ones(len(mask), 1, dtype=mask.dtype)], 1)
            out = model(input_ids=torch.randint(1, 64, (len(mask), 1)), attention_mask=mask,
                        cache=cache, use_cache=True, output_attentions=True)
            attentions.append(list(out.attentions))
            masks.append(mask)
            cache = out.past_key_values
        logged = monitor.log()
    for layer, ent in zip(_blocks("llama"), _numpy_entropy(attentions, masks), strict=True):
        np.testing.assert_allclose([logged[f"attn_entropy/{layer}/h{h}/eval"] for h in range(2)], ent, rtol=2e-6)


@pytest.fixture
def no_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention modules that do not look their function up in transformers' registry: only the
    eager probabilities remain."""
    monkeypatch.setattr(_compat, "calls_attention_registry", lambda cls: False)


def test_training_forwards_with_attention_dropout_count_from_the_logits_taken_before_the_dropout() -> None:
    ids, mask = _batches()[0]
    logged = {}
    for dropout in (0.0, 0.1):
        model = _model("bert", attention_probs_dropout_prob=dropout, hidden_dropout_prob=0.0).train()
        monitor = _monitor(model, collection=CollectOptions(phases="train"))
        with monitor, warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
            logged[dropout] = monitor.log()
        assert not any("applies dropout" in str(w.message) for w in seen)
        if dropout == 0:
            expected = _numpy_entropy([list(out.attentions)], [mask])[0]
            np.testing.assert_allclose([logged[0.0][f"attn_entropy/encoder.layer.0/h{h}"] for h in range(2)], expected,
                                       rtol=2e-6)
    # The first block's logits see the same input with and without attention dropout.
    for key in ("attn_entropy/encoder.layer.0/h1", "attn_logit_max/encoder.layer.0/h1"):
        assert logged[0.1][key] == pytest.approx(logged[0.0][key], rel=1e-6)


@pytest.mark.usefixtures("no_registry")
def test_without_the_registry_training_forwards_with_attention_dropout_are_skipped() -> None:
    ids, mask = _batches()[0]
    for dropout in (0.0, 0.1):
        model = _model("bert", attention_probs_dropout_prob=dropout).train()
        with pytest.warns(UserWarning, match="its logits cannot be sampled: attention entropy comes from its eager"):
            monitor = GSAMMonitor(model, collection=CollectOptions(phases="train", attention_entropy=True,
                                                                   max_tokens_per_layer=None))
        with monitor, warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
            logged = monitor.log()
        assert not any(k.startswith("attn_logit_max") for k in logged)
        if dropout == 0:
            expected = _numpy_entropy([list(out.attentions)], [mask])[0]
            np.testing.assert_allclose([logged[f"attn_entropy/encoder.layer.0/h{h}"] for h in range(2)], expected,
                                       rtol=2e-6)
        else:
            assert not any(k.startswith("attn_entropy") for k in logged)
            # One warning for the monitor, not one per block.
            assert sum("applies dropout (p = 0.1)" in str(w.message) for w in seen) == 1


def test_fused_kernels_are_measured_and_other_models_are_refused() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        monitor = GSAMMonitor(_model("bert", impl="sdpa"), sinks=[],
                              collection=CollectOptions(attention_entropy=True, max_tokens_per_layer=None))
    ids, mask = _batches()[0]
    with monitor, torch.no_grad():
        monitor.model(input_ids=ids, attention_mask=mask)
        logged = monitor.log()
    assert {"attn_entropy/encoder.layer.0/eval", "attn_logit_max/encoder.layer.1/eval"} <= set(logged)
    with pytest.raises(ValueError, match="none of the monitored layers holds an attention module"):
        GSAMMonitor(Stack(), collection=CollectOptions(attention_entropy=True))
    with pytest.raises(TypeError, match=r"CollectOptions\(attention_entropy=\) must be True or False"):
        GSAMMonitor(Stack(), collection=CollectOptions(attention_entropy="yes"))


@pytest.mark.usefixtures("no_registry")
def test_without_the_registry_fused_kernels_warn_at_setup_and_at_the_first_forward() -> None:
    with pytest.warns(UserWarning, match=r"attn_implementation='sdpa'.*attn_implementation='eager'"):
        GSAMMonitor(_model("bert", impl="sdpa"), collection=CollectOptions(attention_entropy=True))
    # A forward that returns no probabilities (the kernel switched after setup): one warning, nothing logged.
    model = _model("bert")
    with pytest.warns(UserWarning, match="no attn_logit_max is logged"):
        monitor = _monitor_warned(model)
    model.set_attn_implementation("sdpa")
    ids, mask = _batches()[0]
    with monitor, torch.no_grad(), pytest.warns(RuntimeWarning, match="returned no attention probabilities") as seen:
        model(input_ids=ids, attention_mask=mask)
        assert not any(k.startswith("attn_") for k in monitor.log())
    (warned,) = [w for w in seen if "returned no attention probabilities" in str(w.message)]  # once, for both blocks
    assert "nor for any other monitored attention layer that returns none (not warned again)" in str(warned.message)


def _monitor_warned(model: torch.nn.Module) -> GSAMMonitor:
    return GSAMMonitor(model, every_n_steps=1000, metrics=["n"],
                       collection=CollectOptions(max_tokens_per_layer=None, attention_entropy=True))


def test_entropy_sums_mask_and_drop_rows_that_are_not_distributions() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 4, 4)) * 3
    keys = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=bool)
    logits = np.where(keys[:, None, None, :], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[1, 2, 0] *= 1.1  # not a distribution (a rescaled, dropped-out row)
    got = entropy_sums(torch.from_numpy(p), torch.from_numpy(keys)).numpy()
    ent = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)  # (B, H, Tq)
    counted = keys[:, None, :].repeat(3, 1)
    counted[1, 2, 0] = False
    np.testing.assert_allclose(got[:3], (ent * counted).sum((0, 2)), rtol=1e-12)
    np.testing.assert_allclose(got[3:6], counted.sum((0, 2)))
    assert got[6] == 1
    # 16-bit probabilities: their own rounding is tolerated, dropout's rescaling is not.
    half = torch.from_numpy(p).to(torch.bfloat16)
    assert entropy_sums(half, torch.from_numpy(keys)).numpy()[6] == 1


def test_attention_windows_resume_mid_window(tmp_path) -> None:
    batches = _batches()
    model = _model("gpt2")
    straight = _monitor(model).attach()
    with torch.no_grad():
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)
    expected = straight.log()
    straight.detach()
    first = _monitor(model).attach()
    with torch.no_grad():
        model(input_ids=batches[0][0], attention_mask=batches[0][1])
    torch.save(first.state_dict(), tmp_path / "m.pt")
    first.detach()
    resumed = _monitor(model)
    resumed.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    with resumed, torch.no_grad():
        model(input_ids=batches[1][0], attention_mask=batches[1][1])
        got = resumed.log()
    keys = [k for k in expected if k.startswith(("attn_entropy", "attn_logit_max"))]
    assert len(keys) == 14  # per head, the mean and the lowest head; per head and the top head; for 2 layers
    for key in keys:
        assert got[key] == pytest.approx(expected[key], rel=1e-12)


def test_a_gradual_attention_collapse_alerts_on_the_lowest_head_and_nothing_before_it() -> None:
    """Queries scaled up by 20 % per step from step 31 (attention logits grow, the softmax
    sharpens): the default rules alert ``attention_collapse`` on the lowest head's entropy, and
    no rule alerts before the scaling starts."""
    model = _model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10 in tests
        monitor = GSAMMonitor(
            model,
            every_n_steps=1,
            sinks=[],
            collection=CollectOptions(max_tokens_per_layer=None, attention_entropy=True, phases="eval"),
        )
    ids, mask = _batches()[1]
    entropy = []
    with monitor, torch.no_grad():
        for step in range(1, 61):
            if step > 30:
                for layer in model.layers:
                    layer.self_attn.q_proj.weight.mul_(1.2)
            model(input_ids=ids, attention_mask=mask)
            logged = monitor.step()
            entropy.append(logged["attn_entropy_min/layers.0/eval"])
    fired = monitor.fired_alerts
    assert fired and min(a["step"] for a in fired) > 30
    collapse = [a for a in fired if a["kind"] == "attention_collapse"]
    assert collapse and collapse[0]["metric"] == "attn_entropy_min"
    assert collapse[0]["value"] < 0.75 * collapse[0]["baseline"]
    assert entropy[-1] < 0.5 * entropy[29]  # the collapse is real: the lowest head's entropy halved
