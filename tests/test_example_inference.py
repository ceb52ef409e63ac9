"""examples/inference_minilm.py runs at a small size and writes TensorBoard events."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "inference_minilm.py"


@pytest.fixture
def one_thread():
    # Two OpenMP threads on a busy 2-core machine made each 384x384 eigvalsh take seconds
    # (barrier spinning while the other core is taken); one thread takes milliseconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_inference_example_writes_tensorboard_events(tmp_path, monkeypatch, capsys, one_thread) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = [str(EXAMPLE), "--logdir", str(tmp_path / "tb"), "--n", "24", "--log-every", "2", "--check"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.warns(UserWarning, match="every_n_steps=2"):
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    printed = capsys.readouterr().out
    assert "encoder.layer.5" in printed and "scipy gsam" in printed
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"gsam/embeddings/eval", "gsam/encoder.layer.5/eval", "rank/encoder.layer.0/eval"} <= set(tags)
    assert [e.step for e in acc.Scalars("gsam/encoder.layer.5/eval")] == [2, 3]
    # The printed relative differences to scipy are all tiny.
    diffs = [float(line.split()[-1]) for line in printed.splitlines() if line.startswith(("embeddings", "encoder"))]
    assert len(diffs) == 7 and max(diffs) < 1e-9
