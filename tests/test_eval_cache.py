"""The token protocol's kept hidden states (``gsam_monitor.eval.cache``) and ``--max-memory``.

The second pass (Mardia's kurtosis, the observers) replays the first pass's rows from memory,
from a spill file, or re-runs the model beyond the budget. Whichever way, the results must
equal those of an independent numpy/scipy computation on the same batches' hidden states,
obtained here with plain ``transformers`` calls.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable

import numpy as np
import pytest
import scipy.stats
import torch

from gsam_monitor.eval import cache
from gsam_monitor.eval.__main__ import main
from gsam_monitor.eval.cache import HiddenStateStore, parse_bytes
from gsam_monitor.eval.corpus import load_corpus
from gsam_monitor.eval.models import load_model
from gsam_monitor.eval.protocols import run_token_protocol

pytest.importorskip("transformers")

N_SENTENCES = 24  # ~500 tokens against d = 64
BATCH = 4  # 6 batches, so a budget can split them


# ---------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), (123, 123), ("0", 0), ("4096", 4096), ("2GB", 2 * 10**9), ("2gb", 2 * 10**9),
     ("512MiB", 512 * 2**20), ("1.5GiB", 3 * 2**29), (" 64 KiB ", 64 * 1024), ("10b", 10)],
)
def test_parse_bytes(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("value", [-1, True, 1.5, "", "-1", "2 gigabytes", "GB", "1e9", "2XB", None])
def test_parse_bytes_rejects(value):
    with pytest.raises(ValueError, match=r"--max-memory: expected a size in bytes, e\.g\. 2GiB, 512MiB or 0, got"):
        parse_bytes(value)


# ---------------------------------------------------------------------------- the store
def _batches(sizes: list[int], d: int = 8, dtype: torch.dtype = torch.float32, layers: int = 3):
    """Random batches: ``sizes`` non-padding tokens each, in (B=2, T) masks."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in sizes:
        t = (n + 1) // 2
        mask = torch.zeros(2, t, dtype=torch.bool)
        mask.view(-1)[:n] = True
        rows = [torch.randn(n, d, generator=gen).to(dtype) for _ in range(layers)]
        out.append((rows, mask, torch.tensor([0, 1])))
    return out


def _same(replayed, added) -> None:
    assert len(replayed) == len(added)
    for got, (rows, mask, labels) in zip(replayed, added, strict=True):
        # Stored bytes, not arithmetic: equal bit for bit.
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got.rows, rows, strict=True))
        assert torch.equal(got.mask, mask) and torch.equal(got.labels, labels)


def test_store_keeps_everything_in_memory_when_it_fits():
    batches = _batches([5, 7, 3])
    bytes_per_token = 3 * 8 * 4
    with HiddenStateStore(15 * bytes_per_token, expected_tokens=15) as store:
        assert all(store.add(*b) for b in batches)
        assert store.where == "memory" and not store.spilling and store.bytes_in_memory == 15 * bytes_per_token
        assert store.bytes_per_token == bytes_per_token and store.bytes_spilled == 0
        _same(list(store.replay()), batches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_store_spills_every_batch_when_the_corpus_does_not_fit(tmp_path, dtype):
    batches = _batches([5, 7, 0, 3], dtype=dtype)
    with HiddenStateStore("100B", expected_tokens=15, spill_dir=tmp_path) as store:
        assert all(store.add(*b) for b in batches)
        assert store.where == "spill" and store.spilling and store.bytes_in_memory == 0
        assert store.bytes_spilled == 15 * 3 * 8 * dtype.itemsize
        _same(list(store.replay()), batches)
        _same(list(store.replay()), batches)  # replayable more than once


def test_store_without_spill_keeps_a_prefix_within_the_budget():
    batches = _batches([5, 7, 3, 1])
    bytes_per_token = 3 * 8 * 4
    with HiddenStateStore(13 * bytes_per_token, expected_tokens=16) as store:
        kept = [store.add(*b) for b in batches]
        # 5 + 7 fit 13 tokens; the third does not; the fourth would, but the kept batches
        # must stay a prefix for the re-run to start where they end.
        assert kept == [True, True, False, False]
        assert len(store) == 2 and store.where == "memory"
        _same(list(store.replay()), batches[:2])


def test_store_moves_on_to_the_spill_file_when_the_estimate_was_short(tmp_path):
    batches = _batches([5, 7, 3, 1])
    bytes_per_token = 3 * 8 * 4
    # Told 10 tokens (fits), gets 16: memory first, then the file, and no batch after the
    # first spilled one goes back to memory (the replay reads memory first).
    with HiddenStateStore(13 * bytes_per_token, expected_tokens=10, spill_dir=tmp_path) as store:
        assert all(store.add(*b) for b in batches)
        assert store.where == "memory+spill"
        assert (store.bytes_in_memory, store.bytes_spilled) == (12 * bytes_per_token, 4 * bytes_per_token)
        _same(list(store.replay()), batches)


def test_store_falls_back_to_memory_then_rerun_without_disk_space(tmp_path, monkeypatch, caplog):
    usage = type("Usage", (), {"free": 10})
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: usage)
    batches = _batches([5, 7, 3])
    bytes_per_token = 3 * 8 * 4
    with caplog.at_level(logging.WARNING, logger="gsam_monitor.eval.cache"), \
            HiddenStateStore(6 * bytes_per_token, expected_tokens=15, spill_dir=tmp_path) as store:
        assert [store.add(*b) for b in batches] == [True, False, False]
        assert store.where == "memory" and store.bytes_spilled == 0
    assert "not spilling hidden states" in caplog.text and "GB free" in caplog.text


def test_store_rejects_a_missing_spill_dir(tmp_path):
    with pytest.raises(ValueError, match=r"--spill-dir: .*no_such.* is not an existing folder; create it, or pass "
                                         r"'none'"):
        HiddenStateStore(0, expected_tokens=1, spill_dir=tmp_path / "no_such")
    with pytest.raises(ValueError, match=r"expected_tokens: expected a count >= 0, got -1"):
        HiddenStateStore(0, expected_tokens=-1)
    with pytest.raises(ValueError, match=r"--max-memory: expected a size in bytes"):
        HiddenStateStore("lots", expected_tokens=1)


# ---------------------------------------------------------------------------- the protocol
@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny:bert", device="cpu")


@pytest.fixture(scope="module")
def corpus():
    full = load_corpus("sst2_300_filtered")
    return dataclasses.replace(full, sentences=full.sentences[:N_SENTENCES], labels=full.labels[:N_SENTENCES])


@pytest.fixture(scope="module")
def reference(tiny, corpus) -> list[np.ndarray]:
    """The non-padding hidden states of the protocol's batches, from plain model calls, fp64."""
    per_layer: list[list[np.ndarray]] = []
    with torch.no_grad():
        for start in range(0, len(corpus), BATCH):
            enc = tiny.tokenizer(list(corpus.sentences[start : start + BATCH]), padding=True, return_tensors="pt")
            keep = enc["attention_mask"].bool()
            hidden = tiny.model(**enc, output_hidden_states=True).hidden_states
            if not per_layer:
                per_layer = [[] for _ in hidden]
            for store, h in zip(per_layer, hidden, strict=True):
                store.append(h[keep].double().numpy())
    return [np.concatenate(parts) for parts in per_layer]


def _scipy_gsam(h: np.ndarray) -> float:
    cov = np.cov(h, rowvar=False, bias=True)
    return float(scipy.stats.multivariate_normal(h.mean(0), cov, allow_singular=True).logpdf(h).mean()
                 + math.log(len(h)))


def _numpy_mardia(h: np.ndarray) -> float:
    """(b2 - r(r+2))/r with the pseudo-inverse on the covariance's support (Mardia 1970)."""
    lam, vec = np.linalg.eigh(np.cov(h, rowvar=False, bias=True))
    keep = lam > 1e6 * np.finfo(np.float64).eps * lam.max()
    z = (h - h.mean(0)) @ (vec[:, keep] / np.sqrt(lam[keep]))
    r = int(keep.sum())
    return (float(np.mean(np.sum(z * z, axis=1) ** 2)) - r * (r + 2)) / r


class _RowSums:
    """Observer: per layer, the fp64 sum of the rows under the mask, and the sum of the rest."""

    def __init__(self) -> None:
        self.masked: dict[int, np.ndarray] = {}
        self.padding: dict[int, float] = {}

    def update(self, layer, hidden, mask, labels) -> None:
        h = hidden.double()
        self.masked[layer] = self.masked.get(layer, 0) + h[mask].sum(0).numpy()
        self.padding[layer] = self.padding.get(layer, 0.0) + float(h[~mask].abs().sum())

    def results(self, stats) -> dict[int, dict]:
        return {}


_BYTES_PER_TOKEN = 3 * 64 * 4  # tiny:bert: 3 hidden states of width 64 in float32

# Where the second pass gets its rows: (keyword arguments, expected replayed batches of 6,
# where they were kept). 700 tokens' worth is more than the corpus; 260 tokens' worth holds
# a prefix of its batches (each has fewer than 130 tokens).
MODES: dict[str, tuple[Callable, int | None, str]] = {
    "memory": (lambda tmp: {"max_memory": 700 * _BYTES_PER_TOKEN}, 6, "memory"),
    "spill": (lambda tmp: {"max_memory": 0, "spill_dir": tmp}, 6, "spill"),
    "budget-then-rerun": (lambda tmp: {"max_memory": 260 * _BYTES_PER_TOKEN, "spill": False}, None, "memory"),
    "rerun-all": (lambda tmp: {"max_memory": "0", "spill": False}, 0, "none"),
}


@pytest.fixture(scope="module")
def runs(tiny, corpus, tmp_path_factory):
    out = {}
    for mode, (kwargs, _, _) in MODES.items():
        observer = _RowSums()
        result = run_token_protocol(tiny, corpus, batch_size=BATCH, observers=[observer],
                                    **kwargs(tmp_path_factory.mktemp(mode)))
        out[mode] = (result, observer)
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_second_pass_source_and_budget(runs, reference, mode):
    result, _ = runs[mode]
    _, replayed, where = MODES[mode]
    info = result.second_pass
    assert info["replayed"] + info["rerun"] == 6 and info["where"] == where
    assert info["bytes_per_token"] == _BYTES_PER_TOKEN
    tokens = len(reference[0])
    if replayed is None:  # the budget: some batches kept, the rest re-run, within the bytes allowed
        assert 0 < info["replayed"] < 6
        assert 0 < info["bytes_in_memory"] <= 260 * _BYTES_PER_TOKEN
    else:
        assert info["replayed"] == replayed
    if where == "memory" and replayed == 6:
        assert info["bytes_in_memory"] == tokens * _BYTES_PER_TOKEN
    if where == "spill":
        assert (info["bytes_in_memory"], info["bytes_spilled"]) == (0, tokens * _BYTES_PER_TOKEN)


@pytest.mark.parametrize("mode", list(MODES))
def test_second_pass_results_equal_numpy_whatever_the_source(runs, reference, mode):
    result, observer = runs[mode]
    assert len(result.layers) == len(reference) == 3
    for layer, h in zip(result.layers, reference, strict=True):
        assert layer["n"] == len(h) > 64
        assert layer["gsam"] == pytest.approx(_scipy_gsam(h), rel=1e-9)
        assert layer["mardia_kurtosis"] == pytest.approx(_numpy_mardia(h), rel=1e-7)
        # The observers see every non-padding row once, and zeros elsewhere.
        np.testing.assert_allclose(observer.masked[layer["index"]], h.sum(0), rtol=1e-9, atol=1e-9)
        assert observer.padding[layer["index"]] == 0.0
    # And the sources agree with one another far below the model's own rounding.
    base, _ = runs["rerun-all"]
    for layer, other in zip(result.layers, base.layers, strict=True):
        for key in ("gsam", "mardia_kurtosis", "heldout_loglik", "mean_kurtosis"):
            if key in layer:
                assert layer[key] == pytest.approx(other[key], rel=1e-12, nan_ok=True)


def test_no_second_pass_without_mardia_or_observers(tiny, corpus, reference):
    result = run_token_protocol(tiny, corpus, batch_size=BATCH, metric_names=["gsam", "rank"])
    assert result.second_pass == {}
    assert "mardia_kurtosis" not in result.layers[-1]
    assert result.score == pytest.approx(_scipy_gsam(reference[-1]), rel=1e-9)


# ---------------------------------------------------------------------------- the CLI
def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("value", ["2 gigabytes", "-1", "GB", "lots"])
def test_cli_rejects_a_bad_max_memory(value, capsys):
    err = _cli_error(["--model", "tiny:bert", "--quiet", "--max-memory", value], capsys)
    assert f"--max-memory: expected a size in bytes, e.g. 2GiB, 512MiB or 0, got {value!r}" in err


def test_cli_rejects_a_missing_spill_dir(tmp_path, capsys):
    err = _cli_error(["--model", "tiny:bert", "--quiet", "--spill-dir", str(tmp_path / "gone")], capsys)
    assert "--spill-dir:" in err and "is not an existing folder; create it, or pass 'none'" in err


def test_cli_store_flags_need_the_token_protocol(capsys):
    err = _cli_error(["--protocol", "paper", "--model", "tiny:bert", "--quiet", "--max-memory", "1GB"], capsys)
    assert "--max-memory: applies to --protocol token only" in err
    both = ["--protocol", "paper", "--model", "tiny:bert", "--quiet", "--max-memory", "1GB", "--spill-dir", "none"]
    assert "--max-memory, --spill-dir: apply to --protocol token only" in _cli_error(both, capsys)


@pytest.mark.parametrize("argv", [["--max-memory", "0", "--spill-dir", "none"], ["--max-memory", "1KiB"]])
def test_cli_budget_gives_the_same_numbers(argv, tmp_path, monkeypatch, corpus, reference, caplog):

    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(corpus.sentences) + "\n", encoding="utf-8")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the default spill folder
    monkeypatch.setattr(cache.tempfile, "tempdir", None)
    out = tmp_path / "out.json"
    with caplog.at_level(logging.INFO, logger="gsam_monitor.eval"):
        assert main(["--model", "tiny:bert", "--corpus", str(path), "--batch-size", str(BATCH), "--quiet",
                     "--output", str(out), *argv]) == 0
    spilled = "go to a temporary file in " + str(tmp_path) in caplog.text
    assert spilled == (argv[-1] == "1KiB")
    layers = json.loads(out.read_text())["models"][0]["layers"]
    for layer, h in zip(layers, reference, strict=True):
        assert layer["gsam"] == pytest.approx(_scipy_gsam(h), rel=1e-9)
        assert layer["mardia_kurtosis"] == pytest.approx(_numpy_mardia(h), rel=1e-7)
