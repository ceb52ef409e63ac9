"""examples/instability.py: its loss-event definitions on hand-made series, the replay of the
new-outlier-dimension rule from recorded lists, and a tiny end-to-end run (slow)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tests.test_callbacks_examples import load_example


def test_loss_events_follow_their_definitions() -> None:
    ex = load_example("instability")
    flat = [5.0] * 30
    assert ex.first_spike([*flat, 7.4, 7.6], 1.5, 20) == 31  # 7.6 > 1.5 x 5; 7.4 is not
    assert ex.first_spike([*flat, math.nan], 1.5, 20) == 30
    assert ex.first_spike(flat, 1.5, 20) is None
    # A climb without one jump: the 5-step running median passes 1.2 x its lowest earlier value.
    climb = [5.0] * 10 + [5.0 + 0.1 * k for k in range(1, 30)]
    medians = [sorted(climb[t - 4 : t + 1])[2] for t in range(4, len(climb))]
    want = next(t for t, m in zip(range(4, len(climb)), medians, strict=True) if m > 1.2 * 5.0)
    assert ex.first_rise(climb, 1.2, 5) == want
    assert ex.first_spike(climb, 1.5, 20) is None  # the spike rule misses it
    args = argparse.Namespace(spike_factor=1.5, spike_history=20, rise_factor=1.2, rise_window=5)
    assert ex.loss_events(climb, args) == (None, want, want)


def test_replay_counts_new_outlier_dimensions_from_the_recorded_lists() -> None:
    ex = load_example("instability")
    logs = [{"step": s, "effective_rank/L": 10.0, "anisotropy/L": 0.1} for s in range(4, 64, 4)]
    outliers = [{"step": s, "L": [3] if s < 48 else [3, 9]} for s in range(4, 64, 4)]
    run = {"logs": logs, "outliers": outliers}
    values = dict(ex.series(run)["L"])
    assert values[4]["new_outlier_dims"] == 1 and values[8]["new_outlier_dims"] == 0
    assert values[48]["new_outlier_dims"] == 1 and values[52]["new_outlier_dims"] == 0
    alerts = ex.replay(run, "default")
    assert [(a["step"], a["kind"]) for a in alerts] == [(48, "new_outlier_dim")]  # 4 is in the warm-up


@pytest.mark.slow
def test_instability_example_end_to_end(tmp_path: Path, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: True)  # keep the process-wide modes
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    ex = load_example("instability")
    argv = (f"--out {tmp_path} --seeds 1 --conditions stable,jump --steps 16 --jump-step 8 --every 2 --tokens 64 "
            f"--batch-size 4 --block 16 --vocab 256 --corpus sst2_dev --spike-history 5 --workers 1 "
            f"--plot {tmp_path / 'p.png'}")
    summary = ex.main(argv.split())
    stored = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["condition"], r["onset"]) for r in stored["runs"]] == [("stable", None), ("jump", 8)]
    default = summary["assessment"]["default rules (replayed)"]
    assert default["stable_steps"] == stored["runs"][0]["steps"] == 16
    assert default["false_alerts"] == len(ex.replay(stored["runs"][0], "default"))
    assert (tmp_path / "p.png").stat().st_size > 10_000
    again = ex.main([*argv.split(), "--reassess"])
    assert again["assessment"]["default rules (replayed)"] == json.loads(json.dumps(default))
