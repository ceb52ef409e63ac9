"""Smoke runs of the callback examples at a tiny size: they train, log GSAM curves into
TensorBoard event files, and the plot script turns those into a PNG."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytorch_lightning")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_pretrain_example_and_plot(tmp_path: Path, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: True)  # keep the process-wide mode as it is
    example = load_example("lightning_pretrain_tiny_gpt")
    argv = "--max-steps 20 --every-n-steps 10 --val-every 20 --vocab 512".split()
    summary = example.main(["--logdir", str(tmp_path / "run"), *argv])
    assert summary["last_steps"] == {"train": 20, "eval": 20}
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    for layer in ("embeddings", "gpt_neox.layers.0", "gpt_neox.layers.3", "final_norm"):
        assert [e.step for e in acc.Scalars(f"gsam/{layer}")] == [9, 19]
        assert [e.step for e in acc.Scalars(f"effective_rank/{layer}/eval")] == [19]
    plot = load_example("plot_tensorboard")
    out = plot.plot(plot.load_scalars(tmp_path / "run"), tmp_path / "curves.png")
    assert out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="no scalars for metrics"):
        plot.plot({"other/tag": [(1, 0.0)]}, tmp_path / "empty.png", loss=None)


@pytest.mark.slow
def test_finetune_example(tmp_path: Path, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: True)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "")  # the example sets it; restored after the test
    example = load_example("hf_finetune_minilm")
    argv = "--max-steps 2 --batch-size 4 --max-length 16 --every-n-steps 2 --eval-steps 2 --n-eval 8".split()
    with pytest.warns(UserWarning, match="more often than every 10 steps"):
        summary = example.main(["--logdir", str(tmp_path / "run"), "--attention-entropy", *argv])
    assert summary["last_steps"] == {"train": 2, "eval": 2}
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "eval/accuracy" in tags  # the Trainer's run holds both
    assert [e.step for e in acc.Scalars("rank/bert.encoder.layer.5")] == [2]
    assert [e.step for e in acc.Scalars("gsam/bert.encoder.layer.0/eval")] == [0, 2]  # eval_on_start: the base model
    # The base model's evaluation is the reference: drift from step 2 on, none at step 0.
    assert [e.step for e in acc.Scalars("drift_w2_relative/bert.encoder.layer.5/eval")] == [2]
    history = summary["eval_history"]
    for layer in (f"bert.encoder.layer.{i}" for i in range(6)):
        assert 0 < history[2][f"drift_w2_relative/{layer}/eval"] < 1
        assert 0 < history[0][f"attn_entropy/{layer}/eval"] < math.log(16)
    assert "drift_w2_relative/bert.encoder.layer.0/eval" not in history[0]
