"""CollectOptions(logit_partition=): the output logits' log-partition against ``torch.logsumexp``
in float64 on logits the test keeps from the model's own output, at positions it picks itself
(tiny GPT-NeoX and Llama causal LMs); padding left out; at most 256 tokens per forward; a head
scaled up a little each step alerts and nothing alerts before; the default rule quiet on
stationary maxima; the setup errors; a head that is never called warned about once."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from torch import nn

from gsam_monitor import AlertRule, CollectOptions, GSAMMonitor
from gsam_monitor.monitor.alerts import AlertEngine
from tests.tiny_models import tiny_config

SAMPLE = 256


def _lm(arch: str) -> nn.Module:
    import transformers as tr

    torch.manual_seed(0)
    model = tr.AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    with torch.no_grad():  # logits of a few units, as in a trained model, not a random init's ~0.1
        model.get_output_embeddings().weight.mul_(10.0)
    return model


def _monitor(model: nn.Module, head: bool | str = True, **kwargs) -> GSAMMonitor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # every_n_steps < 10 in tests
        kwargs.setdefault("every_n_steps", 1000)
        kwargs.setdefault("metrics", ["n"])
        return GSAMMonitor(
            model, sinks=[], collection=CollectOptions(logit_partition=head, phases="eval"), **kwargs
        )


def _batch(rows: int, length: int, seed: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (rows, length), generator=g)
    mask = torch.zeros(rows, length, dtype=torch.long)
    for i in range(rows):
        n = 1 + (7 * i + seed) % length
        if left:
            mask[i, length - n :] = 1
        else:
            mask[i, :n] = 1
    return ids, mask


def _expected_rows(logits: torch.Tensor, mask: torch.Tensor | None, limit: int = SAMPLE) -> torch.Tensor:
    """log Z in float64 of the positions the sampling rule names, picked here in plain Python."""
    flat = logits.double().reshape(-1, logits.shape[-1])
    kept = [i for i in range(flat.shape[0]) if mask is None or int(mask.reshape(-1)[i])]
    n = len(kept)
    picked = kept if n <= limit else [kept[round(k * (n - 1) / (limit - 1))] for k in range(limit)]
    return torch.logsumexp(flat[picked], dim=-1)


@pytest.mark.parametrize("arch", ["gptneox", "llama"])
def test_mean_and_max_equal_float64_logsumexp_on_the_sampled_positions(arch: str) -> None:
    model = _lm(arch)
    # 24 x 32 with ~half padding: over 256 tokens (sampled); 3 x 9: fewer (every position).
    batches = [_batch(24, 32, 1, left=arch == "llama"), _batch(3, 9, 2, left=arch == "llama")]
    monitor = _monitor(model)
    head = "lm_head"
    expected, unmasked, counts = [], [], []
    with monitor, torch.no_grad():
        for ids, mask in batches:
            logits = model(input_ids=ids, attention_mask=mask).logits
            expected.append(_expected_rows(logits, mask))
            unmasked.append(_expected_rows(logits, None))
            counts.append(float(monitor._windows.probes.logits.sums[(head, "eval")][1]))
        logged = monitor.log()
    assert int(batches[0][1].sum()) > SAMPLE and counts[0] == SAMPLE  # the bound
    assert counts[1] - counts[0] == int(batches[1][1].sum()) < SAMPLE  # every non-padding token
    rows = torch.cat(expected)
    assert logged[f"logit_lse_mean/{head}/eval"] == pytest.approx(float(rows.mean()), rel=1e-6)
    assert logged[f"logit_lse_max/{head}/eval"] == pytest.approx(float(rows.max()), rel=1e-6)
    # Padding matters: every position counted gives another mean.
    assert float(torch.cat(unmasked).mean()) != pytest.approx(float(rows.mean()), rel=1e-4)
    assert float(rows.std()) > 0.05  # tokens differ: a wrong position would show


def test_the_sample_follows_a_cached_generation_step_and_logits_to_keep() -> None:
    """Logits of the last position only (``logits_to_keep=1``): the root mask's last column."""
    model = _lm("gptneox")
    ids, mask = _batch(4, 10, 3, left=True)
    monitor = _monitor(model)
    with monitor, torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
        logged = monitor.log()
    assert logits.shape[1] == 1
    rows = _expected_rows(logits, mask[:, -1:])
    assert logged["logit_lse_mean/lm_head/eval"] == pytest.approx(float(rows.mean()), rel=1e-6)


def test_a_growing_head_alerts_and_nothing_alerts_before_it() -> None:
    """The head's weight scaled up by 10 % per step from step 31: ``logit_lse_max`` rises and the
    default ``output_logit_growth`` rule alerts; no rule alerts before step 31."""
    model = _lm("llama")
    monitor = _monitor(model, every_n_steps=1, metrics="default")
    g = torch.Generator().manual_seed(3)
    top = []
    with monitor, torch.no_grad():
        for step in range(1, 51):
            if step > 30:
                model.lm_head.weight.mul_(1.1)
            ids = torch.randint(1, 64, (4, 9), generator=g)  # a fresh batch each step: a noisy, stationary start
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            top.append(monitor.step()["logit_lse_max/lm_head/eval"])
    fired = monitor.fired_alerts
    assert fired and min(a["step"] for a in fired) > 30
    growth = [a for a in fired if a["kind"] == "output_logit_growth"]
    assert growth and growth[0]["metric"] == "logit_lse_max" and growth[0]["step"] <= 50
    assert top[-1] > 2 * max(top[:30])


def test_the_default_rules_are_quiet_on_stationary_streams() -> None:
    """The default rules on 2,000 logs of each of 12 stationary streams of log-partition maxima
    (the max over 256 tokens of a log Z with a level from -10 to 30 and a sd from 0.05 to 2) and
    means (the mean over 256 tokens of the same log Z): no alert."""
    rng = random.Random(0)
    engine = AlertEngine("default")
    for stream in range(12):
        level, sd = rng.uniform(-10.0, 30.0), rng.uniform(0.05, 2.0)
        a = math.sqrt(2 * math.log(SAMPLE))
        for step in range(2000):
            gumbel = -math.log(-math.log(rng.random()))  # the max of n Gaussians: the Gumbel limit
            mean = level + sd * rng.gauss(0.0, 1.0) / math.sqrt(SAMPLE)
            engine.observe(step, f"s{stream}", "train", {"logit_lse_max": level + sd * (a + gumbel / a),
                                                         "logit_lse_mean": mean})
    assert engine.alerts == []


@pytest.mark.parametrize(("level", "fires_below"), [(10.8, 0.0), (2.0, -3.0), (-8.0, -16.0)])
def test_a_mean_log_partition_that_drifts_down_alerts_once_past_its_margin(level, fires_below) -> None:
    """``output_logit_drift``: the mean log Z frozen at m after 10 logs (small noise), then falling
    0.35 nats per log: quiet while above m - max(|m|, 5) (``fires_below``), an alert at the first
    log below it, none before; the maximum stays where it was (the growth rule stays quiet)."""
    rng = random.Random(1)
    engine = AlertEngine("default")
    values = []
    for step in range(80):
        value = level + 0.001 * rng.gauss(0.0, 1.0) - 0.35 * max(0, step - 9)  # never within 0.05 of the limit
        values.append(value)
        engine.observe(step, "lm_head", "train", {"logit_lse_mean": value, "logit_lse_max": level + 3.0})
    first_below = next(step for step, value in enumerate(values) if value < fires_below)
    assert [(a["kind"], a["step"]) for a in engine.alerts][:1] == [("output_logit_drift", first_below)]
    assert {a["kind"] for a in engine.alerts} == {"output_logit_drift"}


def test_a_model_without_a_language_model_head_or_a_wrong_name_is_a_setup_error() -> None:
    import transformers as tr

    base = tr.AutoModel.from_config(tiny_config("gptneox"))
    with pytest.raises(ValueError, match=r"logit_partition=True\): GPTNeoXModel has no language-model head"):
        _monitor(base)
    with pytest.raises(ValueError, match=r"logit_partition='head'\): GPTNeoXForCausalLM has no module named 'head'"):
        _monitor(_lm("gptneox"), head="head")
    with pytest.raises(TypeError, match=r"CollectOptions\(logit_partition=\) must be True, False or the head"):
        CollectOptions(logit_partition=1)
    with pytest.raises(ValueError, match=r"rule watches 'logit_lse_max', which is measured only with"):
        GSAMMonitor(base, sinks=[], alerts=[AlertRule("logit_lse_max", "up")])


class FusedLoss(nn.Module):
    """A model whose loss forms no logits (a fused cross-entropy reads the head's weight), or,
    with ``call_head``, an ordinary one with a head named by the user."""

    def __init__(self, call_head: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 16)
        self.head = nn.Linear(16, 64, bias=False)
        self.call_head = call_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        if self.call_head:
            return self.head(hidden)
        return torch.nn.functional.linear(hidden, self.head.weight).logsumexp(-1)


def test_a_named_head_is_read_and_one_never_called_is_warned_about_once() -> None:
    model = FusedLoss(call_head=True)
    monitor = _monitor(model, head="head", layers=["embed"])
    ids = torch.randint(0, 64, (2, 5))
    with monitor, torch.no_grad():
        logits = model(ids)
        logged = monitor.log()
    assert logged["logit_lse_max/head/eval"] == pytest.approx(float(_expected_rows(logits, None).max()), rel=1e-6)

    model = FusedLoss(call_head=False)
    monitor = _monitor(model, head="head", layers=["embed"])
    with monitor, torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(20):
            model(ids)
        logged = monitor.log()
    silent = [w for w in caught if "was not called in 8 collected forwards" in str(w.message)]
    assert len(silent) == 1 and "Liger" in str(silent[0].message)
    assert not any(k.startswith("logit_lse") for k in logged)


def test_the_windows_survive_a_state_dict_round_trip() -> None:
    model = _lm("gptneox")
    ids, mask = _batch(3, 9, 2, left=False)
    first, second = _monitor(model), _monitor(model)
    with first, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        state = first.state_dict()
        expected = first.log()
    second.load_state_dict(state)
    with second:
        logged = second.log()
    for metric in ("logit_lse_mean", "logit_lse_max"):
        assert logged[f"{metric}/lm_head/eval"] == expected[f"{metric}/lm_head/eval"]


@pytest.mark.parametrize(
    ("level", "inside", "outside"),
    [(20.0, 20.0 + 19.0, 20.0 + 21.0), (2.0, 2.0 + 4.5, 2.0 + 5.5), (-8.0, -8.0 + 4.5, -8.0 + 8.5)],
)
def test_the_default_rule_margin_is_the_baseline_itself_and_at_least_5_nats(level, inside, outside) -> None:
    """``output_logit_growth`` against the baseline m frozen after 10 logs (a constant stream:
    no spread): quiet at a value just inside m + max(|m|, 5), an alert just outside. A level of
    20 pins the relative margin (the log-partition doubled), 2 the 5-nat floor, and -8 the
    relative margin taken on |m| for a negative level."""
    for value, alerts in ((inside, False), (outside, True)):
        engine = AlertEngine("default")
        for step in range(10):
            engine.observe(step, "lm_head", "train", {"logit_lse_max": level})
        engine.observe(10, "lm_head", "train", {"logit_lse_max": value})
        kinds = [a["kind"] for a in engine.alerts]
        assert kinds == (["output_logit_growth"] if alerts else []), (level, value, kinds)
