"""Data parallelism of the eval: ``torchrun --nproc-per-node N -m gsam_monitor.eval ...``.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every rank loads the model and runs
its share of the corpus; the ranks then combine what they found so that the result equals a
one-process run of the same command:

- **Shards.** The corpus's batches (``--batch-size`` sentences each, in file order) are cut
  into ``N`` contiguous runs of whole batches, as equal as the count allows
  (``split_batches``): a sentence's hidden states depend on its batch partners through padding,
  so every rank keeps the one-process batch boundaries, and every batch runs exactly once.
- **Statistics.** The token protocol's ``LayerStats`` are summed over the ranks with their own
  reduction (``LayerStats.all_reduce_``: the ranks agree on a common shift, then add exact fp64
  sums), so Mardia's second pass runs under the global mean and covariance; its sums are added
  the same way (``MardiaAccumulator.all_reduce_``). The per-class statistics of ``--analyses
  classes`` are summed like the layers'.
- **Samples.** ``--analyses distributions`` keeps a bounded uniform sample per rank; the ranks'
  samples are merged on every rank into one uniform sample of the union (``merge_uniform``: a
  multivariate hypergeometric draw of how many values each rank contributes). It is a sample of
  the same distribution as a one-process run's, not the same values, so its fits agree with a
  one-process run's within sampling error, not to rounding.
- **Sentence vectors.** The paper protocol gathers every rank's sentence vectors in corpus order
  and scores them once: the same vectors, the same score.
- **Failures.** Each stage of local work (loading, each pass, the concepts analysis) ends in an
  exchange of errors (``DataParallel.together``): when one rank fails, it raises its own error
  and every other rank raises ``RankFailed`` naming the rank and the error, at the same point, so
  no rank waits in a collective for a peer that has gone.

Rank zero writes every output (table, JSON, plots, report); the JSON records the world size and
each rank's share (``"parallel"``). The backend is NCCL when the ranks run on CUDA, else gloo.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from gsam_monitor.eval.corpus import Corpus

__all__ = ["DIST_TIMEOUT", "DataParallel", "MergedSample", "RankFailed", "Shard", "from_env", "merge_uniform",
           "rank_device", "split_batches", "together"]

#: Longest wait in a collective. Rank zero alone runs ``--analyses concepts`` (minutes per
#: layer) while the others wait for it; torch's default (30 minutes for gloo) would cut
#: ``--layers all`` on a large model short.
DIST_TIMEOUT = timedelta(hours=3)


class RankFailed(RuntimeError):
    """Raised on every rank but the failing one when a rank fails during a stage."""


def split_batches(n_sentences: int, batch_size: int, world_size: int) -> list[range]:
    """Each rank's batch indices: ``world_size`` contiguous runs of the corpus's
    ``ceil(n_sentences / batch_size)`` batches, the first ``n_batches % world_size`` ranks
    taking one batch more.

    Raises:
        ValueError: when there are fewer batches than ranks (a rank would have nothing to run),
            naming ``--batch-size`` and the number of processes.
    """
    n_batches = -(-n_sentences // batch_size)
    if n_batches < world_size:
        raise ValueError(
            f"--batch-size: {n_sentences} sentences make {n_batches} batch(es) of {batch_size}, fewer "
            f"than the {world_size} processes; use a smaller --batch-size or fewer processes "
            f"(torchrun --nproc-per-node)"
        )
    base, extra = divmod(n_batches, world_size)
    bounds = [0]
    for rank in range(world_size):
        bounds.append(bounds[-1] + base + (rank < extra))
    return [range(bounds[r], bounds[r + 1]) for r in range(world_size)]


@dataclass(frozen=True)
class Shard:
    """One rank's share of the corpus.

    Attributes:
        corpus: the rank's sentences (and labels), a contiguous slice of the corpus.
        first_sentence: index of its first sentence in the whole corpus.
        batches: its batch indices in the whole corpus.
        sentences_per_rank: every rank's number of sentences, in rank order.
    """

    corpus: Corpus
    first_sentence: int
    batches: range
    sentences_per_rank: tuple[int, ...]


@dataclass(frozen=True)
class DataParallel:
    """The eval's process group: this rank, the world size and where collectives run.

    Attributes:
        rank: this process's rank in ``group``.
        world_size: the number of ranks.
        device: where tensors are reduced (CUDA under NCCL, the CPU under gloo).
        group: the process group (``None``: the default group).
    """

    rank: int
    world_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: Any = None

    def shard(self, corpus: Corpus, batch_size: int) -> Shard:
        """This rank's share of ``corpus`` in batches of ``batch_size`` (``split_batches``)."""
        runs = split_batches(len(corpus), batch_size, self.world_size)
        sizes = tuple(min(len(corpus), r.stop * batch_size) - r.start * batch_size for r in runs)
        mine = runs[self.rank]
        start, stop = mine.start * batch_size, min(len(corpus), mine.stop * batch_size)
        labels = None if corpus.labels is None else corpus.labels[start:stop]
        return Shard(replace(corpus, sentences=corpus.sentences[start:stop], labels=labels), start, mine, sizes)

    @contextlib.contextmanager
    def together(self, stage: str) -> Iterator[None]:
        """Run a stage of local work, then exchange errors: if any rank failed, the failing rank
        raises its own error and every other rank ``RankFailed`` (nothing waits on a rank that
        has gone). The stage must hold no collective."""
        error: Exception | None = None
        try:
            yield
        except Exception as err:  # exchanged below, then raised again
            error = err
        messages = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if error is not None:
            raise error
        if failed:
            rank, message = failed[0]
            raise RankFailed(f"rank {rank} of {self.world_size} failed during {stage}: {message}")

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def sum_stats(self, stats: Sequence[Any]) -> None:
        """Sum each ``LayerStats`` over the ranks, in place (``LayerStats.all_reduce_``), moving it
        to ``device`` when it lives elsewhere."""
        for layer_stats in stats:
            if layer_stats.device != self.device:
                layer_stats.to(self.device)
            layer_stats.all_reduce_(self.group)

    def sum_int(self, value: int) -> int:
        """The sum of an integer over the ranks."""
        return int(sum(self.gather(int(value))))


def from_env(device: torch.device) -> DataParallel | None:
    """The process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1), joined
    with NCCL when ``device`` is CUDA and gloo otherwise; ``None`` for a single process. A group
    that already exists (a caller's own ``init_process_group``) is used as it is."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if not dist.is_initialized():
        if world <= 1:
            return None
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)
    if dist.get_world_size() <= 1:
        return None
    backend = dist.get_backend()
    comm = device if backend == "nccl" else torch.device("cpu")
    return DataParallel(rank=dist.get_rank(), world_size=dist.get_world_size(), device=comm)


def rank_device(device: str | None) -> str | None:
    """Under ``torchrun``, ``--device cuda`` (or no ``--device`` on a CUDA machine) names this
    rank's own GPU, ``cuda:LOCAL_RANK``; anything else is returned as given."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return device
    if device == "cuda" or (device is None and torch.cuda.is_available()):
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def together(parallel: DataParallel | None, stage: str) -> contextlib.AbstractContextManager[None]:
    """``parallel.together(stage)``, or nothing for a single process."""
    return contextlib.nullcontext() if parallel is None else parallel.together(stage)


# ---------------------------------------------------------------------------- samples
def merge_uniform(samples: Sequence[np.ndarray], counts: Sequence[int], capacity: int,
                  rng: np.random.Generator) -> np.ndarray:
    """A uniform sample without replacement of ``min(capacity, sum(counts))`` values of the
    union of several streams, from a uniform sample of each (``samples[i]``: at least
    ``min(capacity, counts[i])`` values of stream ``i``, which held ``counts[i]``).

    How many values each stream contributes is one multivariate hypergeometric draw (the counts
    a uniform sample of the union would hold), then each contributes that many of its own sample
    at random. Streams in rank order, values in sample order.
    """
    counts_arr = np.asarray(counts, dtype=np.int64)
    size = int(min(capacity, int(counts_arr.sum())))
    take = rng.multivariate_hypergeometric(counts_arr, size) if size else np.zeros(len(counts), np.int64)
    parts = [np.asarray(s)[np.sort(rng.choice(len(s), int(k), replace=False))]
             for s, k in zip(samples, take, strict=True)]
    return np.concatenate(parts) if parts else np.zeros(0)


@dataclass
class MergedSample:
    """The ranks' reservoir samples of one layer merged into one (``merge_uniform``); read
    like ``gsam_monitor.stats.ReservoirSample`` (``values``, ``count``, ``nonfinite``,
    ``dims``, ``capacity``, ``dim_capacity``, ``seed``) by the analyses.

    Attributes:
        ranks: how many ranks' samples were merged.
    """

    capacity: int
    dim_capacity: int
    seed: int
    dims: tuple[int, ...]
    count: int
    nonfinite: int
    pooled: np.ndarray
    per_dim: dict[int, np.ndarray]
    ranks: int

    def values(self, dim: int | None = None) -> np.ndarray:
        """The merged values (fp64), pooled or of one sampled dimension."""
        return self.pooled if dim is None else self.per_dim[dim]

    @classmethod
    def merge(cls, parallel: DataParallel, sample: Any) -> MergedSample:
        """Merge every rank's ``ReservoirSample`` of one layer (a collective: every rank calls
        it, in the same order, and gets the same merged sample)."""
        mine = {"count": sample.count, "nonfinite": sample.nonfinite, "pooled": sample.values(),
                "dims": {d: (sample.dim_count(d), sample.values(dim=d)) for d in sample.dims}}
        parts = parallel.gather(mine)
        rng = np.random.default_rng(sample.seed)
        pooled = merge_uniform([p["pooled"] for p in parts], [p["count"] for p in parts], sample.capacity, rng)
        per_dim = {d: merge_uniform([p["dims"][d][1] for p in parts], [p["dims"][d][0] for p in parts],
                                    sample.dim_capacity, rng) for d in sample.dims}
        return cls(capacity=sample.capacity, dim_capacity=sample.dim_capacity, seed=sample.seed, dims=sample.dims,
                   count=sum(p["count"] for p in parts), nonfinite=sum(p["nonfinite"] for p in parts),
                   pooled=pooled, per_dim=per_dim, ranks=len(parts))
