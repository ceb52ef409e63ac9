"""benchmarks/peers.py on a tiny random BERT classifier with the same six layer names as
MiniLM's (``bert.encoder.layer.{i}.output.dense``) and right-padded batches whose masks the test
draws itself: the rows each tool really uses and the exactness claims that RESULTS.md makes,
checked against counts and fp64 covariances taken here; and the timing loop's bookkeeping (one
log per tool per repetition). Timings are not judged; the MiniLM run is the benchmark's."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("delve", reason="the peers benchmark needs the bench extra (delve, pandas)")
pytest.importorskip("transformers")

BATCH, STEPS, SEQ, D = 4, 2, 12, 32


def tiny_batches(batch_size: int, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` right-padded batches: random lengths in [3, SEQ], the longest of each batch SEQ
    (as ``padding=True`` pads to the longest), token 0 for padding."""
    gen = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(n):
        lengths = torch.randint(3, SEQ + 1, (batch_size,), generator=gen)
        lengths[0] = SEQ
        mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
        ids = torch.randint(1, 64, (batch_size, SEQ), generator=gen) * mask
        labels = torch.randint(0, 2, (batch_size,), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def tiny_workload(args) -> tuple[torch.nn.Module, Callable[[], None]]:
    """peers.build's contract on a 6-layer d = 32 BERT: identical weights and batches per call."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(args.seed)
    config = BertConfig(
        vocab_size=64, hidden_size=D, num_hidden_layers=6, num_attention_heads=2, intermediate_size=64, num_labels=2
    )
    model = BertForSequenceClassification(config).train()
    batches = tiny_batches(args.batch_size, args.n_batches, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"i": 0}

    def step() -> None:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


@pytest.fixture
def peers(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import peers

    monkeypatch.setattr(peers, "build", tiny_workload)
    # One thread: on a shared 2-core machine two OpenMP threads spin-wait for each other, which
    # made a d = 32 step take seconds instead of milliseconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield peers
    torch.set_num_threads(threads)
    # peers.main flushes denormals to zero for its run (a process-wide CPU flag); the rest of
    # the suite (hypothesis' subnormal floats) needs the default back.
    torch.set_flush_denormal(False)
    for name in ("peers", "overhead", "_common"):
        sys.modules.pop(name, None)


def test_peers_rows_and_errors(peers, tmp_path: Path) -> None:
    out_path = tmp_path / "peers.json"
    peers.main(f"--no-timing --acc-steps {STEPS} --batch-size {BATCH} --n-batches {STEPS} --json {out_path}".split())
    acc = json.loads(out_path.read_text())["accuracy"]
    masks = [b["attention_mask"].numpy() for b in tiny_batches(BATCH, STEPS, seed=0)]
    rows = acc["rows_per_layer"]
    assert rows["tokens"] == sum(int(m.sum()) for m in masks)
    assert rows["gsam_full"] == rows["tokens"]  # every non-padding token, no padding row
    assert rows["gsam_capped"] == STEPS * BATCH  # max_tokens_per_layer = the batch size per forward
    assert rows["delve"] == BATCH  # Delve keeps only the last forward's batch
    padded_last = np.mean([(m[:, -1] == 0).mean() for m in masks])
    assert padded_last > 0  # the batches put padding where Delve reads
    assert acc["last_position_padding_fraction"] == pytest.approx(padded_last)
    assert len(acc["layers"]) == 6
    for name, layer in acc["layers"].items():
        assert layer["error"]["gsam_full"] < 1e-12, name
        # Delve's matrix is the fp64 covariance of the last positions of the last forward, exactly.
        assert layer["delve_vs_its_rows"] < 1e-12, name
        assert layer["error"]["delve"] > 0.05, name  # ... which is not the tokens' covariance
        assert abs(layer["saturation"]["gsam_full"] - layer["saturation"]["tokens"]) <= 1 / D, name


@pytest.mark.filterwarnings("ignore:GSAMMonitor\\(every_n_steps=2\\)")
def test_peers_timing_logs_once_per_tool_per_repetition(peers, tmp_path: Path) -> None:
    out_path = tmp_path / "peers.json"
    args = f"--acc-steps 1 --batch-size {BATCH} --n-batches 2 --interval 2 --reps 2 --warmup 1 --json {out_path}"
    peers.main([*args.split(), "--settings", "gsam_capped", "delve"])
    timing = json.loads(out_path.read_text())["timing"]
    assert set(timing) == {"baseline_step_ms", "baseline_hook_ms", "gsam_capped", "delve"}
    for setting in ("gsam_capped", "delve"):
        assert timing[setting]["steps_timed"] == [2, 2], setting
        assert timing[setting]["logs"] == [1, 1], setting
        assert len(timing[setting]["ratios"]) == 2, setting
        assert timing[setting]["hook_ms_median"] > 0, setting


def test_hook_timer_brackets_the_tools_hooks_only(peers) -> None:
    """A tool hook that burns 20 ms of thread CPU time is counted; the layer's own forward is not."""
    import time

    model = torch.nn.Sequential(torch.nn.Linear(D, D))

    def busy(*_) -> None:
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.02:
            pass

    handle = model[0].register_forward_hook(busy)  # the tool's hook, attached before the timer
    timer = peers.HookTimer(model, ["0"])
    model(torch.randn(8, D))
    assert 0.02 <= timer.take() < 0.5
    handle.remove()
    model(torch.randn(4096, D))  # a forward of real work, outside the bracket
    assert timer.take() < 0.005
