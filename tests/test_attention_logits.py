"""GSAMMonitor(attention_entropy=True) through transformers' attention-function registry: the max
attention logit and the entropy per head against numpy on q·k recomputed from the hooked
projections (the model's rotary applied with transformers' own ``apply_rotary_pos_emb``, key
heads repeated with its ``repeat_kv``) and on eager ``output_attentions``, on a tiny Llama (RoPE,
grouped-query attention), GPT-NeoX (partial rotary, fused qkv) and BERT; the same numbers under
sdpa; the model's outputs unchanged; the lookup restored on close; the query sample bounded; a
gradual attention-logit growth alerts, a stationary stream does not."""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import torch

from gsam_monitor import CollectOptions, GSAMMonitor
from gsam_monitor.capture import attention_logits
from gsam_monitor.capture.attention_logits import ROUTER, logit_stats
from gsam_monitor.monitor.alerts import AlertEngine
from tests.tiny_models import attention_monitor, sharp_attention_model

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")  # -inf - -inf
ARCHS = ("llama", "gptneox", "bert")
BLOCKS = {"bert": "encoder.layer", "llama": "layers", "gptneox": "layers"}


def _model(arch: str, impl: str = "eager", **overrides) -> torch.nn.Module:
    if arch == "llama":  # grouped-query attention: 4 query heads over 2 key heads
        overrides = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4, **overrides}
    return sharp_attention_model(arch, impl, **overrides)


_monitor = attention_monitor


def _batches(length: int = 9, right_padded: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for lengths in ([length, 5, 2], [7, length, 3, 6]):
        ids = torch.randint(1, 64, (len(lengths), length), generator=g)
        mask = torch.zeros(len(lengths), length, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1 if right_padded else 0
            if not right_padded:
                mask[i, length - n :] = 1
        out.append((ids, mask))
    return out


def _attention_modules(model: torch.nn.Module, arch: str) -> list[torch.nn.Module]:
    blocks = model.encoder.layer if arch == "bert" else model.layers
    return [b.attention.self if arch == "bert" else (b.self_attn if arch == "llama" else b.attention) for b in blocks]


class QKRecorder:
    """q and k of every attention module, recomputed outside the model from its projections'
    outputs and the rotary (cos, sin) the module is called with (fp64 numpy, key heads repeated)."""

    def __init__(self, model: torch.nn.Module, arch: str) -> None:
        self.arch = arch
        self.q: list[list[np.ndarray]] = []
        self.k: list[list[np.ndarray]] = []
        self._out: dict[str, torch.Tensor] = {}
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = []
        self.modules = _attention_modules(model, arch)
        for i, module in enumerate(self.modules):
            names = {"llama": ("q_proj", "k_proj"), "gptneox": ("query_key_value",), "bert": ("query", "key")}[arch]
            for name in names:
                self.handles.append(getattr(module, name).register_forward_hook(self._keep(f"{i}.{name}")))
            self.handles.append(module.register_forward_pre_hook(self._keep_rope(i), with_kwargs=True))

    def _keep(self, key: str):
        def hook(module, args, output):
            self._out[key] = output.detach()

        return hook

    def _keep_rope(self, i: int):
        def hook(module, args, kwargs):
            if kwargs.get("position_embeddings") is not None:
                self._rope[i] = kwargs["position_embeddings"]

        return hook

    def collect(self) -> None:
        """The q, k (B, H, T, D) of the forward just run, per layer."""
        from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_rotary
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

        qs, ks = [], []
        for i, module in enumerate(self.modules):
            if self.arch == "gptneox":
                qkv = self._out[f"{i}.query_key_value"]
                qkv = qkv.view(*qkv.shape[:2], -1, 3 * module.head_size).transpose(1, 2)
                q, k, _ = qkv.chunk(3, dim=-1)
                q, k = neox_rotary(q, k, *self._rope[i])
            else:
                name_q, name_k = ("q_proj", "k_proj") if self.arch == "llama" else ("query", "key")
                hd = module.head_dim if self.arch == "llama" else module.attention_head_size
                q = self._out[f"{i}.{name_q}"].view(*self._out[f"{i}.{name_q}"].shape[:2], -1, hd).transpose(1, 2)
                k = self._out[f"{i}.{name_k}"].view(*self._out[f"{i}.{name_k}"].shape[:2], -1, hd).transpose(1, 2)
                if self.arch == "llama":
                    q, k = apply_rotary_pos_emb(q, k, *self._rope[i])
                    k = repeat_kv(k, module.num_key_value_groups)
            qs.append(q.double().numpy())
            ks.append(k.double().numpy())
        self.q.append(qs)
        self.k.append(ks)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _keep_masks(mask: np.ndarray, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """(keys kept (B, T, T) per query row, query rows counted (B, T))."""
    keys = mask.astype(bool)
    t = keys.shape[1]
    keep = np.broadcast_to(keys[:, None, :], (keys.shape[0], t, t)).copy()
    if causal:
        keep &= np.tril(np.ones((t, t), dtype=bool))[None]
    return keep, keys


def _numpy_reference(arch, recorder, attentions, masks, positions=None, check=True):
    """Per layer: (max logit per head, mean entropy per head), over the counted query rows of
    every forward (``positions``: only those rows), logits from the recorded q·k (``check``: whose
    softmax is first checked against the model's attention)."""
    out = []
    for layer in range(len(recorder.q[0])):
        top, sums, rows = None, 0.0, 0.0
        for f, mask in enumerate(masks):
            q, k = recorder.q[f][layer], recorder.k[f][layer]
            s = q @ k.transpose(0, 1, 3, 2) * q.shape[-1] ** -0.5  # (B, H, T, T)
            keep, rows_ok = _keep_masks(mask.numpy(), causal=arch != "bert")
            p = attentions[f][layer].detach().double().numpy()
            # The recomputed logits are the model's: their softmax is its attention (real rows).
            z = np.where(keep[:, None], s, -np.inf)
            soft = np.exp(z - z.max(-1, keepdims=True))
            soft /= soft.sum(-1, keepdims=True)
            real = rows_ok[:, None, :, None]
            if check:
                np.testing.assert_allclose(np.where(real, soft, 0), np.where(real, p, 0), atol=2e-6)
            ent = np.where(keep[:, None] & (p > 0), -p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)
            if positions is not None:
                rows_ok = rows_ok & np.isin(np.arange(rows_ok.shape[1]), positions)[None]
            counted = rows_ok[:, None, :]  # (B, 1, T)
            head_top = np.where(counted[..., None] & keep[:, None], s, -np.inf).max((0, 2, 3))
            top = head_top if top is None else np.maximum(top, head_top)
            sums = sums + (ent * counted).sum((0, 2))
            rows = rows + counted.sum()
        out.append((top, sums / rows))
    return out


def _run(model, arch, batches, *, record=True, **monitor_kwargs):
    recorder = QKRecorder(model, arch) if record else None
    monitor = _monitor(model, **monitor_kwargs)
    attentions, outputs = [], []
    with monitor, torch.no_grad():
        for ids, mask in batches:
            out = model(input_ids=ids, attention_mask=mask, output_attentions=record)
            outputs.append(out.last_hidden_state)
            if record:
                attentions.append(list(out.attentions))
                recorder.collect()
        state = monitor.state_dict()["attention"]
        logged = monitor.log()
    if recorder is not None:
        recorder.remove()
    return logged, attentions, recorder, outputs, state


@pytest.mark.parametrize("arch", ARCHS)
def test_max_logit_and_entropy_per_head_equal_numpy_on_recomputed_q_k_and_output_attentions(arch: str) -> None:
    model = _model(arch)
    batches = _batches(right_padded=arch != "llama")  # llama: left padding
    logged, attentions, recorder, _, _ = _run(model, arch, batches)
    expected = _numpy_reference(arch, recorder, attentions, [m for _, m in batches])
    heads = 4 if arch == "llama" else 2
    for i, (top, ent) in enumerate(expected):
        layer = f"{BLOCKS[arch]}.{i}"
        got_top = [logged[f"attn_logit_max/{layer}/h{h}/eval"] for h in range(heads)]
        got_ent = [logged[f"attn_entropy/{layer}/h{h}/eval"] for h in range(heads)]
        np.testing.assert_allclose(got_top, top, rtol=1e-5)  # fp32 logits
        np.testing.assert_allclose(got_ent, ent, rtol=1e-5)
        assert logged[f"attn_logit_max/{layer}/eval"] == pytest.approx(float(top.max()), rel=1e-5)
        assert logged[f"attn_entropy_min/{layer}/eval"] == pytest.approx(float(ent.min()), rel=1e-5)
        assert len(set(np.round(top, 3))) == heads  # heads differ: a head mix-up would show
    assert not any(f"/h{heads}/" in k for k in logged)
    # Padding matters: with every position counted, the maxima differ.
    ones = [torch.ones_like(m) for _, m in batches]
    unmasked = _numpy_reference(arch, recorder, attentions, ones, check=False)
    assert not np.allclose(unmasked[0][1], expected[0][1], rtol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_sdpa_gives_the_numbers_of_eager_and_the_outputs_are_unchanged(arch: str) -> None:
    batches = _batches(right_padded=arch != "llama")
    eager, *_ = _run(_model(arch), arch, batches, record=False)
    sdpa_model = _model(arch, impl="sdpa")
    with torch.no_grad():
        plain = [sdpa_model(input_ids=ids, attention_mask=mask).last_hidden_state for ids, mask in batches]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "cannot be logged" warning at setup
        warnings.filterwarnings("ignore", message=".*every_n_steps.*")
        sdpa, _, _, watched, _ = _run(sdpa_model, arch, batches, record=False)
    keys = [k for k in eager if k.startswith(("attn_logit_max", "attn_entropy"))]
    assert len(keys) == 2 * ((4 if arch == "llama" else 2) * 2 + 3)
    for key in keys:
        assert sdpa[key] == pytest.approx(eager[key], rel=1e-5), key
    for before, after in zip(plain, watched, strict=True):
        assert torch.equal(before, after)  # the kernel ran on the very same inputs


@pytest.mark.filterwarnings("ignore:GSAMMonitor. no activations were captured:RuntimeWarning")  # the closed monitor
def test_the_lookup_is_wrapped_while_collecting_and_restored_on_close() -> None:
    import transformers as tr

    original = tr.AttentionInterface.__dict__["get_interface"]
    model = _model("llama", impl="sdpa")
    first, second = _monitor(model), _monitor(model)
    ids, mask = _batches()[0]
    first.attach()
    second.attach()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert ROUTER.installed and tr.AttentionInterface.__dict__["get_interface"] is not original
    first.close()  # the other monitor still observes
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert "attn_logit_max/layers.0/eval" in second.log()
    assert "attn_logit_max/layers.0/eval" not in first.log()
    second.close()
    assert not ROUTER.installed and tr.AttentionInterface.__dict__["get_interface"] is original


def test_at_most_64_evenly_spaced_query_rows_per_sequence() -> None:
    model = _model("llama")
    batches = [(ids[:2], torch.ones(2, 100, dtype=torch.long)) for ids, _ in _batches(length=100)[:1]]
    logged, attentions, recorder, _, state = _run(model, "llama", batches)
    positions = np.round(np.linspace(0, 99, 64)).astype(int)
    assert len(set(positions)) == 64 and positions[0] == 0 and positions[-1] == 99
    np.testing.assert_array_equal(attention_logits.query_sample(100).numpy(), positions)
    rows = state["sums"]["eval"]["layers.0"][4:8]
    assert rows.tolist() == [2 * 64] * 4  # 64 rows of each of the 2 sequences, per head
    sampled = _numpy_reference("llama", recorder, attentions, [m for _, m in batches], positions)
    every = _numpy_reference("llama", recorder, attentions, [m for _, m in batches])
    for i, (top, ent) in enumerate(sampled):
        got = [logged[f"attn_entropy/layers.{i}/h{h}/eval"] for h in range(4)]
        np.testing.assert_allclose(got, ent, rtol=1e-5)
        np.testing.assert_allclose([logged[f"attn_logit_max/layers.{i}/h{h}/eval"] for h in range(4)], top, rtol=1e-5)
        assert not np.allclose(got, every[i][1], rtol=1e-4)  # the sample, not every row


def _softmax_keep(s: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.where(keep, s, -np.inf)
    top = z.max(-1)
    p = np.exp(z - top[..., None])
    p /= p.sum(-1, keepdims=True)
    return top, np.where(keep & (p > 0), -p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)


@pytest.mark.parametrize("form", ["bool", "additive", "flash", "none"])
def test_logit_stats_apply_each_kernels_mask_form_gqa_and_softcap(form: str) -> None:
    rng = np.random.default_rng(0)
    b, h, groups, t, d = 2, 4, 2, 6, 3
    q, k = rng.standard_normal((b, h, t, d)), rng.standard_normal((b, groups, t, d))
    pad = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=bool)  # left padding
    causal = np.tril(np.ones((t, t), dtype=bool))
    keep = pad[:, None, None, :] & causal[None, None]
    s = np.einsum("bhqd,bhkd->bhqk", q, np.repeat(k, h // groups, axis=1)) * 0.5
    s = np.tanh(s / 2.0) * 2.0  # softcap 2
    mask = {
        "bool": torch.from_numpy(keep),
        "additive": torch.from_numpy(np.where(keep, 0.0, torch.finfo(torch.float32).min)).float(),
        "flash": torch.from_numpy(pad.astype(np.int64)),
        "none": None,
    }[form]
    if form == "none":  # no padding: the fused kernel masks causally itself
        keep = np.broadcast_to(causal, keep.shape)
        pad = np.ones_like(pad)
    sums, maxima = logit_stats(
        torch.from_numpy(q).float(), torch.from_numpy(k).float(), mask, scaling=0.5,
        is_causal=form in ("flash", "none"), query_mask=torch.from_numpy(pad), softcap=2.0,
    )  # fmt: skip
    top, ent = _softmax_keep(s, keep)
    counted = np.broadcast_to(pad[:, None, :] & keep.any(-1), (b, h, t))
    np.testing.assert_allclose(maxima.numpy(), np.where(counted, top, -np.inf).max((0, 2)), rtol=1e-6)
    np.testing.assert_allclose(sums[:h].numpy(), (ent * counted).sum((0, 2)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sums[h : 2 * h].numpy(), counted.sum((0, 2)))
    assert sums[-1] == 0


def test_a_mask_less_call_is_causal_only_in_a_fused_kernel() -> None:
    ids = _batches()[0][0]
    calls = []
    sdpa = _model("llama", impl="sdpa")
    observer = lambda module, fused, args, kwargs: calls.append((fused, args[3]))  # noqa: E731
    ROUTER.add(sdpa.layers[0].self_attn, observer)
    try:  # no padding: sdpa gets no mask and applies is_causal itself
        fused, *_ = _run(sdpa, "llama", [(ids, torch.ones_like(ids))], record=False)
    finally:
        ROUTER.remove(sdpa.layers[0].self_attn, observer)
    assert calls == [(True, None)]
    eager, *_ = _run(_model("llama"), "llama", [(ids, torch.ones_like(ids))], record=False)  # a causal 4D mask
    keys = [k for k in eager if k.startswith("attn_")]
    assert len(keys) == 2 * (2 * 4 + 3)
    for key in keys:
        assert fused[key] == pytest.approx(eager[key], rel=1e-5), key
    q = torch.randn(1, 2, 4, 3)
    k = torch.randn(1, 2, 4, 3)
    _, causal = logit_stats(q, k, None, scaling=1.0, is_causal=True)
    _, full = logit_stats(q, k, None, scaling=1.0, is_causal=False)
    np.testing.assert_allclose(full.numpy(), (q @ k.transpose(-1, -2)).amax((0, 2, 3)).numpy(), rtol=1e-6)
    assert bool((causal <= full).all()) and not torch.equal(causal, full)


def test_a_gradual_logit_growth_alerts_and_nothing_alerts_before_it() -> None:
    """Queries scaled up by 10 % per step from step 31 under sdpa: ``attn_logit_max`` grows
    and the default ``attention_logit_growth`` rule alerts; no rule alerts before step 31."""
    model = _model("llama", impl="sdpa")
    with torch.no_grad():
        for layer in model.layers:  # logits of a few units, as in a trained model, not a random init's ~0.1
            layer.self_attn.q_proj.weight.mul_(5.0)
            layer.self_attn.k_proj.weight.mul_(5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10 in tests
        monitor = GSAMMonitor(
            model, every_n_steps=1, sinks=[],
            collection=CollectOptions(max_tokens_per_layer=None, attention_entropy=True, phases="eval"),
        )  # fmt: skip
    g = torch.Generator().manual_seed(3)
    top = []
    with monitor, torch.no_grad():
        for step in range(1, 51):
            if step > 30:
                for layer in model.layers:
                    layer.self_attn.q_proj.weight.mul_(1.1)
            ids = torch.randint(1, 64, (4, 9), generator=g)  # a fresh batch each step: a noisy, stationary start
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            top.append(monitor.step()["attn_logit_max/layers.0/eval"])
    fired = monitor.fired_alerts
    assert fired and min(a["step"] for a in fired) > 30
    growth = [a for a in fired if a["kind"] == "attention_logit_growth"]
    assert growth and growth[0]["metric"] == "attn_logit_max" and growth[0]["step"] <= 45
    assert growth[0]["value"] > 2 * growth[0]["baseline"]
    assert top[-1] > 3 * max(top[:30])


def test_the_default_logit_rule_is_quiet_on_stationary_maxima() -> None:
    """The default rules on 2,000 logs of each of 12 stationary streams of attention-logit maxima
    (the max of 64 x 512 Gaussian logits per head, with a level from 1 to 40 and a sd from 0.3 to
    3): no alert. A fixed baseline doubled is ~10 noise sds above a stationary max here."""
    rng = random.Random(0)
    engine = AlertEngine("default")
    for stream in range(12):
        level, sd = rng.uniform(1.0, 40.0), rng.uniform(0.3, 3.0)
        for step in range(2000):
            # The max of n Gaussians: the Gumbel limit, sd · (a + b · Gumbel) above the level.
            a = math.sqrt(2 * math.log(64 * 512))
            gumbel = -math.log(-math.log(rng.random()))
            value = level + sd * (a + gumbel / a)
            engine.observe(step, f"s{stream}", "train", {"attn_logit_max": value})
    assert engine.alerts == []
