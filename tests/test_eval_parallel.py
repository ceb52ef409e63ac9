"""``torchrun -m gsam_monitor.eval``: the corpus sharded by whole batches, the statistics summed
exactly, rank 0 writing a JSON equal to a one-process run's; a failing rank ends every rank.

The one-process eval is itself checked against scipy on stored hidden states
(``test_eval_token.py``); here the union of the ranks must reproduce it: rtol 1e-9 on every
number (an absolute 1e-12 where the exact value is 0 and both are rounding), ``n`` and the
ranks equal. The default corpus (300 sentences, 10 batches of 32, the last of 12) divides
evenly over neither 2 nor 3 ranks' sentences.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gsam_monitor.eval.parallel import merge_uniform, split_batches

REPO = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-9, 1e-12
TOKEN_ARGS = ["--model", "minilm", "--model", "tiny:gpt_neox", "--analyses", "classes,spectrum,distributions",
              "--reservoir-size", "20000"]
PAPER_ARGS = ["--protocol", "paper", "--model", "minilm", "--model", "tiny:llama"]


# ---------------------------------------------------------------------------- shards
@pytest.mark.parametrize(("n", "batch", "world"), [(300, 32, 2), (300, 32, 3), (7, 1, 7), (65, 8, 4), (10, 3, 2)])
def test_shards_are_contiguous_whole_batches_each_run_once_and_balanced(n, batch, world):
    runs = split_batches(n, batch, world)
    n_batches = math.ceil(n / batch)
    assert [b for run in runs for b in run] == list(range(n_batches))  # every batch once, in order
    sizes = [len(run) for run in runs]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger shares first


def test_fewer_batches_than_ranks_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match=r"--batch-size: 10 sentences make 2 batch\(es\) of 8, fewer than the 3"):
        split_batches(10, 8, 3)


def test_shard_slices_sentences_and_labels_at_batch_boundaries():
    from gsam_monitor.eval.corpus import load_corpus
    from gsam_monitor.eval.parallel import DataParallel

    corpus = load_corpus("sst2_300_filtered")
    shards = [DataParallel(rank, 3).shard(corpus, 32) for rank in range(3)]
    assert [s.first_sentence for s in shards] == [0, 128, 224]
    assert shards[0].sentences_per_rank == (128, 96, 76)
    assert sum((s.corpus.sentences for s in shards), ()) == corpus.sentences
    assert sum((s.corpus.labels for s in shards), ()) == corpus.labels


# ---------------------------------------------------------------------------- merged samples
def test_merged_sample_is_the_union_when_it_fits():
    rng = np.random.default_rng(0)
    parts = [np.arange(5.0), np.arange(10.0, 13.0)]
    merged = merge_uniform(parts, [5, 3], capacity=100, rng=rng)
    assert sorted(merged) == sorted(np.concatenate(parts))


def test_merged_sample_draws_each_stream_in_proportion_to_its_length():
    """Streams of 1,000, 3,000 and 6,000 values, each sampled to 500: a uniform sample of 500 of
    the union holds 50, 150 and 300 of them on average (hypergeometric), within 4 standard errors
    over 400 merges, and never repeats a value."""
    rng = np.random.default_rng(1)
    counts = [1000, 3000, 6000]
    capacity, repeats = 500, 400
    taken = np.zeros((repeats, 3))
    for r in range(repeats):
        samples = [rng.choice(n, capacity, replace=False) + 10_000 * i for i, n in enumerate(counts)]
        merged = merge_uniform(samples, counts, capacity, rng)
        assert merged.size == capacity and np.unique(merged).size == capacity
        taken[r] = [np.sum((merged >= 10_000 * i) & (merged < 10_000 * (i + 1))) for i in range(3)]
    total = sum(counts)
    for i, n in enumerate(counts):
        p = n / total
        var = capacity * p * (1 - p) * (total - capacity) / (total - 1)  # hypergeometric
        assert abs(taken[:, i].mean() - capacity * p) < 4 * math.sqrt(var / repeats)


# ---------------------------------------------------------------------------- torchrun runs
def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a test run inside another launcher must not inherit its rendezvous
    return env


def _eval(args: list[str], world: int, cwd: Path, script: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m gsam_monitor.eval`` in one process, or under torchrun (``--standalone``: a free
    port of its own) with ``world`` ranks."""
    target = script or ["-m", "gsam_monitor.eval"]
    if world == 1:
        command = [sys.executable, *target, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                   *(target if script else ["-m", "gsam_monitor.eval"]), *args]
    return subprocess.run(command, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=400, check=False)


def _compare(one, many, path: str = "") -> None:
    """Every number of ``one`` within rtol 1e-9 of ``many``'s; everything else equal."""
    if isinstance(one, dict):
        assert set(one) == set(many), (path, set(one) ^ set(many))
        for key in one:
            _compare(one[key], many[key], f"{path}/{key}")
    elif isinstance(one, list):
        assert len(one) == len(many), path
        for i, (a, b) in enumerate(zip(one, many, strict=True)):
            _compare(a, b, f"{path}[{i}]")
    elif isinstance(one, float) or isinstance(many, float):
        assert math.isclose(one, many, rel_tol=RTOL, abs_tol=ATOL), (path, one, many)
    else:
        assert one == many, (path, one, many)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("one")
    docs = {}
    for name, args in (("token", TOKEN_ARGS), ("paper", PAPER_ARGS)):
        proc = _eval([*args, "--device", "cpu", "--quiet", "--output", f"{name}.json"], 1, out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        docs[name] = json.loads((out / f"{name}.json").read_text())
    return docs


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("protocol", ["token", "paper"])
def test_torchrun_result_equals_one_process(protocol, world, one_process, tmp_path):
    args = TOKEN_ARGS if protocol == "token" else PAPER_ARGS
    proc = _eval([*args, "--device", "cpu", "--quiet", "--output", "out.json"], world, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert list(tmp_path.iterdir()) == [tmp_path / "out.json"]  # rank 0 alone wrote, no temporary left
    assert proc.stdout.count(f"protocol {protocol}, corpus") == 1  # one table, from rank 0
    many, one = json.loads((tmp_path / "out.json").read_text()), copy.deepcopy(one_process[protocol])
    shares = {2: [160, 140], 3: [128, 96, 76]}[world]
    assert many["parallel"] == {"world_size": world, "sentences_per_rank": shares}
    assert one["parallel"] == {"world_size": 1, "sentences_per_rank": [300]}
    samples = []
    for model_one, model_many in zip(one["models"], many["models"], strict=True):
        for layer_one, layer_many in zip(model_one["layers"], model_many["layers"], strict=True):
            assert layer_one["n"] == layer_many["n"] and layer_one["rank"] == layer_many["rank"]
            # The merged sample is a sample of the same values, not the same sample (parallel.py).
            dist_one = layer_one.get("analyses", {}).pop("distributions", None)
            dist_many = layer_many.get("analyses", {}).pop("distributions", None)
            if dist_one is not None:
                samples.append((dist_one["sample"], dist_many["sample"]))
    _compare(one["models"], many["models"])
    _compare(one["settings"], many["settings"])
    assert (protocol == "token") == bool(samples)
    for s_one, s_many in samples:
        assert s_many["seen"] == s_one["seen"] and s_many["size"] == s_one["size"] == 20_000
        assert s_many["nonfinite"] == s_one["nonfinite"]
        assert (s_one["merged_from_ranks"], s_many["merged_from_ranks"]) == (1, world)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["load", "pass"])
def test_a_failing_rank_ends_every_rank_with_its_error_and_keeps_finished_models(stage, tmp_path):
    """The last of 2 ranks fails on the second model (loading it, or in its second pass after
    the first pass was summed): both ranks exit, non-zero, within the timeout; the failing rank
    prints its error, rank 0 names the rank and the error; the first model is in the file."""
    args = ["--model", "tiny:gpt2", "--model", "tiny:bert", "--device", "cpu", "--quiet", "--output", "out.json"]
    proc = _eval(["--", *args], 2, tmp_path, script=[str(REPO / "tests" / "eval_rank_failure.py"), stage,
                                                     "tiny:bert"])
    assert proc.returncode != 0
    injected = "could not load 'tiny:bert' on this rank" if stage == "load" else "second pass failed on this rank"
    assert injected in proc.stderr
    where = "loading tiny:bert" if stage == "load" else "tiny:bert: second pass"
    assert f"error: rank 1 of 2 failed during {where}" in proc.stderr
    assert [m["model"] for m in json.loads((tmp_path / "out.json").read_text())["models"]] == ["tiny:gpt2"]
