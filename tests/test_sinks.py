"""Sinks: TensorBoard events read back, an offline W&B run read back, JSONL, callables,
optional dependencies, rank zero, and failing sinks."""

from __future__ import annotations

import importlib.util
import json
import re
import warnings

import numpy as np
import pytest
import torch

import gsam_monitor.monitor.ranks as ranks_module
from gsam_monitor import ComputeOptions, GSAMMonitor, JsonlSink, TensorBoardSink, WandbSink
from gsam_monitor._install import install_hint
from gsam_monitor.sinks import CallableSink, LoggingSink, make_sink, metric_key
from tests.options import with_defaults
from tests.reference import gsam_pdet
from tests.tiny_models import Stack
from tests.wandb_records import read_run

D = 3


def _run_monitor(sinks, steps: int = 4, every: int = 2, **kwargs) -> tuple[GSAMMonitor, list[np.ndarray], list]:
    model = Stack(dim=D, depth=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        kwargs = with_defaults(kwargs, collection={"max_tokens_per_layer": None})
        monitor = GSAMMonitor(model, every_n_steps=every, sinks=sinks, **kwargs)
    rng = np.random.default_rng(0)
    data, outs = [], []
    with monitor:
        for _ in range(steps):
            x = rng.standard_normal((6, D))
            data.append(x)
            model(torch.from_numpy(x))  # grad on, training mode: the train phase
            out = monitor.step()
            if out is not None:
                outs.append(out)
        with torch.no_grad():
            model(torch.from_numpy(rng.standard_normal((5, D))))
        outs.append(monitor.log(phases=["eval"]))
    return monitor, data, outs


def test_keys() -> None:
    assert metric_key("gsam", "encoder.layer.0") == "gsam/encoder.layer.0"
    assert metric_key("gsam", "encoder.layer.0", "eval") == "gsam/encoder.layer.0/eval"


def test_tensorboard_events_read_back(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, data, _ = _run_monitor(
        [TensorBoardSink(tmp_path / "tb")], steps=6, compute=ComputeOptions(spectrum_every_n_logs=2)
    )
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"gsam/blocks.0", "rank/blocks.1", "gsam/blocks.0/eval", "gsam_monitor/errors"} <= set(scalars)
    events = acc.Scalars("gsam/blocks.1")
    assert [e.step for e in events] == [2, 4, 6]
    expected = [gsam_pdet(np.concatenate(data[i : i + 2]))[0] for i in (0, 2, 4)]
    np.testing.assert_allclose([e.value for e in events], expected, rtol=1e-6)  # stored as fp32
    assert [e.value for e in acc.Scalars("n/blocks.0/eval")] == [5.0]
    # Spectrum histograms on logs 1 and 3 (every 2nd log), and on the eval log (log 5).
    assert [e.step for e in acc.Histograms("spectrum/blocks.0")] == [2, 6]
    hist = acc.Histograms("spectrum/blocks.0")[0].histogram_value
    assert hist.num == D


def test_tensorboard_sink_reuses_a_writer_without_closing_it(tmp_path, monkeypatch) -> None:
    # A closed SummaryWriter reopens silently (a new event file) at its next add_scalar, so
    # what the Trainer writes afterwards proves nothing: check the writer itself.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path / "shared")
    closed: list[object] = []
    monkeypatch.setattr(writer, "close", lambda: closed.append(writer))
    file_writer = writer.file_writer
    sink = TensorBoardSink(writer)
    sink.write({"gsam/a": 1.0}, 3)
    sink.close()
    assert closed == []  # never asked the writer to close
    assert writer.file_writer is file_writer and writer.all_writers is not None  # still the same open writer
    assert not file_writer.event_writer._async_writer._closed
    writer.add_scalar("loss", 0.5, 3)  # the Trainer keeps using it: into the same event file
    writer.flush()
    (events,) = (tmp_path / "shared").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [e.value for e in acc.Scalars("gsam/a")] == [1.0] and [e.value for e in acc.Scalars("loss")] == [0.5]
    SummaryWriter.close(writer)
    with pytest.raises(TypeError, match="must be a directory path or a SummaryWriter"):
        TensorBoardSink(42)


def test_wandb_offline_run_keeps_every_point(tmp_path, monkeypatch) -> None:
    """A loop that logs with step= and two monitor writes between its steps: nothing is
    dropped and every monitor point sits on the gsam_step axis, also two writes of disjoint
    keys with no commit between them."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = wandb.init(project="gsam-test", dir=str(tmp_path))
    try:
        sink = WandbSink()
        run.log({"loss": 1.0}, step=5)
        sink.write({"gsam/a": 1.0, "rank/a": 3.0}, 10)
        run.log({"loss": 0.5}, step=6)
        run.log({"loss": 0.4}, step=7)
        sink.write({"gsam/a": 2.0, "rank/a": 3.0}, 20)
        sink.write({"gsam/a": 3.0, "rank/a": 3.0}, 30)
        sink.write_spectrum({"a": torch.tensor([1.0, 0.1, 0.01])}, 30)
        run.log({"loss": 0.3}, step=8)
        # Two logs with disjoint keys at close steps, nothing committed between them: two rows.
        sink.write({"gsam/b": 4.0}, 10)
        sink.write({"rank/b": 5.0}, 12)
    finally:
        run.finish()
    rows, metrics = read_run(tmp_path)
    assert [(r["gsam_step"], r.get("gsam/b"), r.get("rank/b")) for r in rows if "gsam/b" in r or "rank/b" in r] == [
        (10, 4.0, None),
        (12, None, 5.0),
    ]
    assert ("gsam_step", "") in metrics, (metrics, rows)
    assert {("gsam/*", "gsam_step"), ("rank/*", "gsam_step"), ("spectrum/*", "gsam_step")} <= set(metrics)
    points = [(r["gsam_step"], r["gsam/a"]) for r in rows if "gsam/a" in r]
    assert points == [(10, 1.0), (20, 2.0), (30, 3.0)]
    assert [r["loss"] for r in rows if "loss" in r] == [1.0, 0.5, 0.4, 0.3]
    assert any(r.get("spectrum/a/_type") == "histogram" and r["gsam_step"] == 30 for r in rows)
    steps = [r["_step"] for r in rows]
    assert steps == sorted(steps)


def test_wandb_sink_with_the_monitor_and_without_a_run(tmp_path, monkeypatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb.run is None
    with pytest.warns(RuntimeWarning, match=r"the sink of WandbSink\(run=None\) \(sinks\[0\]\) raised RuntimeError: "
                      r"WandbSink: no active W&B run; call wandb.init"):  # fmt: skip
        monitor, _, _ = _run_monitor([WandbSink()], steps=2)
    assert monitor._fanout.disabled == {0}

    run = wandb.init(project="gsam-test", dir=str(tmp_path))
    try:
        _, _, outs = _run_monitor(["wandb"], steps=4)
    finally:
        run.finish()
    rows, _ = read_run(tmp_path)
    logged = [r for r in rows if "gsam/blocks.0" in r]
    assert [r["gsam_step"] for r in logged] == [2, 4]
    assert logged[1]["gsam/blocks.0"] == pytest.approx(outs[1]["gsam/blocks.0"], rel=1e-12)
    assert any("gsam/blocks.0/eval" in r for r in rows)


class _FakeRun:
    def __init__(self, with_step: bool = True) -> None:
        self.calls: list[tuple[dict, bool | None]] = []
        self.defined: list[tuple[str, str | None]] = []
        self._step = 0
        self.with_step = with_step

    @property
    def step(self) -> int:
        if not self.with_step:
            raise RuntimeError("shared mode")
        return self._step

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.defined.append((name, step_metric))

    def log(self, data: dict, commit: bool | None = None) -> None:
        self.calls.append((data, commit))
        if commit:
            self._step += 1


def test_wandb_sink_commit_rule() -> None:
    run = _FakeRun()
    sink = WandbSink(run)
    sink.write({"gsam/a": 1.0}, 1)
    sink.write({"gsam/a": 2.0}, 2)  # our previous values still pending: commit them first
    assert run.calls == [({"gsam/a": 1.0, "gsam_step": 1}, False), ({}, True), ({"gsam/a": 2.0, "gsam_step": 2}, False)]
    assert run.defined == [("gsam_step", None), ("gsam/*", "gsam_step")]
    forced = _FakeRun()
    WandbSink(forced, commit=True).write({"x/a": 1.0}, 1)
    assert forced.calls == [({"x/a": 1.0, "gsam_step": 1}, True)]
    shared = _FakeRun(with_step=False)
    WandbSink(shared).write({"x/a": 1.0}, 1)
    assert shared.calls == [({"x/a": 1.0, "gsam_step": 1}, True)]


def test_wandb_sink_repr_names_its_run_like_the_other_sinks() -> None:
    named = _FakeRun()
    named.name = "tiny-run"
    assert repr(WandbSink(named)) == "WandbSink(run='tiny-run')"
    assert repr(WandbSink(_FakeRun())) == "WandbSink(run=<_FakeRun>)"  # a run without a name or id
    assert repr(WandbSink()) == "WandbSink(run=None)"  # wandb.run at the first write


def test_jsonl_sink(tmp_path) -> None:
    path = tmp_path / "sub" / "gsam.jsonl"
    _, _, outs = _run_monitor([JsonlSink(path)], steps=4)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    extra = ("alerts", "outliers", "quantization")
    lines = [r for r in records if not any(k in r for k in extra)]
    assert [line["step"] for line in lines] == [2, 4, 4]
    assert lines[1]["gsam/blocks.0"] == outs[1]["gsam/blocks.0"]
    assert "gsam/blocks.0/eval" in lines[2]
    # No outlier dimension in this data: no outlier lines; close() adds the int8 readiness once.
    assert [r["step"] for r in records if "outliers" in r] == []
    (quant,) = [r for r in records if "quantization" in r]
    assert quant["step"] == 4 and {"blocks.0", "blocks.0/eval"} <= set(quant["quantization"])
    assert quant["quantization"]["blocks.0"]["sqnr_db"] > 0
    with pytest.raises(TypeError, match=r"JsonlSink\(path=\) must be a file path"):
        JsonlSink(3)


def test_callable_and_logging_sinks(caplog) -> None:
    got = []
    sink = make_sink(lambda metrics, step: got.append(step))
    assert isinstance(sink, CallableSink)
    sink.write({"a/b": 1.0}, 7)
    assert got == [7]
    with pytest.raises(TypeError, match="CallableSink needs a callable"):
        CallableSink(3)
    with caplog.at_level("INFO", logger="gsam_monitor.sinks"):
        LoggingSink().write({"gsam/a": 1.5}, 3)
    assert "gsam step 3: gsam/a=1.5" in caplog.text
    assert isinstance(make_sink("logging"), LoggingSink)


def test_missing_optional_dependencies_fail_at_setup_with_the_install_command(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "wandb") else real(name, *a)
    )
    tensorboard_hint = re.escape(install_hint("tensorboard", "tensorboard"))
    with pytest.raises(ImportError, match=f"tensorboard is not installed; install it with {tensorboard_hint}"):
        TensorBoardSink("runs/x")
    wandb_hint = re.escape(install_hint("wandb", "wandb"))
    with pytest.raises(ImportError, match=f"wandb is not installed; install it with {wandb_hint}"):
        GSAMMonitor(Stack(), sinks=["wandb"])


def test_unwritable_tensorboard_directory_is_disabled_and_training_goes_on(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(RuntimeWarning, match="TensorBoardSink.* raised .*; it is disabled and training goes on"):
        monitor, _, outs = _run_monitor([TensorBoardSink(blocker / "tb")], steps=4)
    assert len(outs) == 3 and monitor.errors == 1


def test_only_global_rank_zero_writes(monkeypatch) -> None:
    class FakeDist:
        def get_rank(self, group=None):
            return 1

        def get_world_size(self, group=None):
            return 1

    monkeypatch.setattr(ranks_module, "active_dist", lambda: FakeDist())
    calls = []
    _, _, outs = _run_monitor([lambda m, s: calls.append(s)], steps=2)
    # Not rank zero: nothing written, and nothing computed either (the metrics are computed
    # where they are written); the logging step() and log() return {}.
    assert calls == [] and outs == [{}, {}]


def test_format_metrics_table_groups_flat_keys_by_layer() -> None:
    from gsam_monitor.sinks import format_metrics_table, metric_key

    flat = {
        metric_key("gsam", "enc.0"): -1.5,
        metric_key("rank", "enc.0"): 7.0,
        metric_key("gsam", "enc.1", "eval"): 2.25,
        metric_key("n", "enc.0"): 99.0,  # not a requested column
    }
    lines = format_metrics_table(flat, names=("gsam", "rank")).splitlines()
    assert lines[0].split() == ["layer", "gsam", "rank"]
    assert lines[1].split() == ["enc.0", "-1.5000", "7.0000"]
    assert lines[2].split() == ["enc.1", "2.2500", "nan"]
    assert len(lines) == 3
