"""The two protocols of the GSAM benchmark: ``token`` (default) and ``paper``.

``token`` is the benchmark report's description done right: the token-level hidden states
of every layer (the embedding output is layer 0), padding masked, streamed through one
``gsam_monitor.LayerStats`` per layer, then a second pass over the same rows for
``gsam_monitor.metrics.MardiaAccumulator``, then ``gsam_monitor.metrics.compute`` per
layer. The second pass replays the first pass's non-padding rows from a
``gsam_monitor.eval.cache.HiddenStateStore``: in memory while the corpus's rows fit
``max_memory``, else from a temporary spill file, else (no spill folder) by re-running the model
for the batches beyond ``max_memory``. The process's memory beyond the model is then
O(layers × d² + max_memory).

``paper`` reproduces the original benchmark code exactly (see docs/guides/eval.md, "What the original code
computed, and why Table 1 ranks hidden sizes"):

1. one vector per sentence = masked mean of the last hidden state + masked mean of the
   embedding output (``hidden_states[-1]`` + ``hidden_states[0]``);
2. z-score each dimension (ddof 0; zero-variance dimensions left unscaled);
3. ``np.cov`` (ddof 1);
4. if Cholesky fails, add eps·I and retry, eps = 1e-6 growing ×10 per retry, accumulating,
   up to 10 retries;
5. score = mean log p of the z-scored vectors under N(mean, regularised cov), with no log N.

With N = 300 sentences and d > N the covariance has rank N - 1, so step 4 always fires and
the score is dominated by the regulariser: ((d - N + 1)/2)·log(1/eps) grows linearly with
the width. ``paper_score`` is the pure scoring function (steps 2–5; ``gsam_monitor.eval.paper``).

Under ``torchrun`` both protocols take a ``DataParallel`` (``gsam_monitor.eval.parallel``): each
rank runs a share of whole batches, and the statistics (token) or sentence vectors (paper) are
combined exactly, so the result equals one process's.

Analyses that need more than moments hook into the token protocol's second pass through
``LayerObserver`` objects; their per-layer results are merged into the layer dicts.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import math
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gsam_monitor import metrics
from gsam_monitor._jsonable import plain
from gsam_monitor._validate import is_positive_int
from gsam_monitor.eval.cache import DEFAULT_MAX_MEMORY, HiddenStateStore, StoredBatch, default_spill_dir
from gsam_monitor.eval.corpus import Corpus
from gsam_monitor.eval.models import LoadedModel
from gsam_monitor.eval.names import monitor_names
from gsam_monitor.eval.paper import PAPER_EPS, PAPER_MAX_RETRIES, PaperFit, paper_fit, paper_score
from gsam_monitor.eval.parallel import DataParallel, together
from gsam_monitor.metrics import MardiaAccumulator
from gsam_monitor.stats import LayerStats

__all__ = [
    "PAPER_EPS",
    "PAPER_MAX_RETRIES",
    "PROTOCOLS",
    "LayerObserver",
    "ModelResult",
    "PaperFit",
    "check_run",
    "paper_fit",
    "paper_score",
    "run_paper_protocol",
    "run_token_protocol",
    "sentence_vectors",
]

logger = logging.getLogger(__name__)

try:  # glibc only: returns freed heap pages to the OS
    _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError, TypeError):
    _MALLOC_TRIM = None

PROTOCOLS: tuple[str, ...] = ("token", "paper")

PAPER_LAYER_NAME = "last+embeddings"


class LayerObserver(Protocol):
    """Hook for analyses that need the hidden states themselves (second pass, token protocol).

    ``update`` sees every batch of every layer after the first pass is complete (so the
    layer's ``LayerStats`` fit is available to it), in the corpus's order, with zeros at the
    padding positions (``mask`` False); ``results`` returns extra keys per layer index, merged
    into that layer's result dict.
    """

    def update(
        self, layer: int, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None
    ) -> None:
        """Observe one batch of one layer: hidden (B, T, d), mask (B, T) bool, labels (B,)."""

    def results(self, stats: Sequence[LayerStats]) -> dict[int, dict[str, Any]]:
        """Per-layer extra results, given the first pass's statistics."""


@dataclass
class ModelResult:
    """What a protocol found for one model.

    Attributes:
        model: the ``--model`` specification.
        d: hidden size.
        score: the headline number (token: last layer's gsam; paper: the paper score).
        layers: one plain dict per layer (``index``, ``name`` and the metrics); analyses may
            add keys.
        spectra: covariance eigenvalues per layer (descending), for plots; not in the JSON.
        n_sentences: sentences run through the model.
        n_truncated: sentences cut at ``max_length`` tokens.
        max_length: the truncation length used (``None``: no limit).
        dtype: the model's dtype, as a string.
        device: where it ran, as a string.
        samples: per layer index, the values sampled by ``--analyses distributions``, for
            the plots; not in the JSON.
        concepts: per layer index, what ``--analyses concepts`` keeps for its plots
            (``gsam_monitor.eval.concepts.LayerConcepts``); not in the JSON.
        second_pass: token protocol: how the second pass got its rows (``replayed`` and
            ``rerun`` batches, ``where`` they were kept, ``bytes_in_memory``,
            ``bytes_spilled``, ``bytes_per_token``); empty when no second pass ran. Not in
            the JSON.
    """

    model: str
    d: int
    score: float
    layers: list[dict[str, Any]]
    spectra: list[np.ndarray] = field(default_factory=list)
    n_sentences: int = 0
    n_truncated: int = 0
    max_length: int | None = None
    dtype: str = ""
    device: str = ""
    samples: dict[int, np.ndarray] = field(default_factory=dict)
    concepts: dict[int, Any] = field(default_factory=dict)
    second_pass: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- batching
def _progress(iterable: Iterable[Any], *, total: int, desc: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr, unit="batch")


def check_run(batch_size: int, max_length: int | None) -> None:
    """Refuse, before any model is loaded, a batch size or truncation length that is not positive.

    Raises:
        ValueError: naming the flag (``--batch-size``, ``--max-length``) and the value.
    """
    if not is_positive_int(batch_size):
        raise ValueError(f"--batch-size: expected a positive integer, got {batch_size}")
    if max_length is not None and not is_positive_int(max_length):
        raise ValueError(f"--max-length: expected a positive number of tokens, got {max_length}")


def _max_length(loaded: LoadedModel, max_length: int | None) -> int | None:
    if max_length is not None:
        return max_length if loaded.max_length is None else min(max_length, loaded.max_length)
    return loaded.max_length


def _count_tokens(loaded: LoadedModel, sentences: Sequence[str], max_length: int | None) -> tuple[int, int]:
    """Non-padding tokens the sentences make (after truncation) and how many sentences are longer
    than ``max_length``; warns once if any are."""
    tokens = n_long = 0
    # Chunks: one call for 30,000 sentences held ~100 MB of token lists at once.
    for start in range(0, len(sentences), _COUNT_CHUNK):
        # verbose=False: the tokenizer would log its own warning for every over-long input.
        ids = loaded.tokenizer(list(sentences[start : start + _COUNT_CHUNK]), truncation=False,
                               verbose=False)["input_ids"]
        lengths = [len(x) for x in ids]
        if max_length is not None:
            n_long += sum(n > max_length for n in lengths)
            lengths = [min(n, max_length) for n in lengths]
        tokens += sum(lengths)
    if n_long:
        warnings.warn(
            f"{n_long} of {len(sentences)} sentences are longer than {max_length} tokens for "
            f"{loaded.name} and were truncated to {max_length} tokens (counted as n_truncated "
            f"in the results)",
            stacklevel=3,
        )
    return tokens, n_long


_COUNT_CHUNK = 1024


def _batches(
    loaded: LoadedModel,
    corpus: Corpus,
    batch_size: int,
    max_length: int | None,
    first: int = 0,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    """Yield (model inputs, labels) per batch from batch index ``first`` on, padded, truncated
    at ``max_length``."""
    labels = corpus.labels
    int_labels = labels is not None and all(isinstance(x, int) for x in labels)
    for start in range(first * batch_size, len(corpus.sentences), batch_size):
        chunk = list(corpus.sentences[start : start + batch_size])
        enc = loaded.tokenizer(
            chunk,
            padding=True,
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
        )
        inputs = {k: enc[k].to(loaded.device) for k in ("input_ids", "attention_mask")}
        batch_labels = (
            torch.tensor(labels[start : start + batch_size]) if int_labels else None
        )
        yield inputs, batch_labels


def _layer_name(index: int) -> str:
    return "embeddings" if index == 0 else f"layer_{index}"


def _json_metrics(metrics_dict: dict[str, Any]) -> dict[str, Any]:
    """Python numbers (JSON-ready); the row count, fp64 in the statistics, as an int."""
    out = plain(metrics_dict)
    out["n"] = round(out["n"])
    return out


def _layer_metrics(
    stats: LayerStats, mardia: MardiaAccumulator | None, names: str | Sequence[str] = "all"
) -> tuple[dict, np.ndarray]:
    values = metrics.compute(stats, names=names, mardia=mardia, with_spectrum=True)
    if "mardia_kurtosis" in metrics.validate_names(names):
        values.setdefault("mardia_kurtosis", math.nan)
    return _json_metrics(values), values.spectrum.numpy() if values.spectrum is not None else np.zeros(0)


def _mardia(stats: LayerStats) -> MardiaAccumulator | None:
    return MardiaAccumulator(stats) if float(stats.count) >= 2 else None


# ---------------------------------------------------------------------------- token
def run_token_protocol(
    loaded: LoadedModel,
    corpus: Corpus,
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    observers: Sequence[LayerObserver] = (),
    metric_names: str | Sequence[str] = "all",
    max_memory: int | str = DEFAULT_MAX_MEMORY,
    spill: bool = True,
    spill_dir: str | Path | None = None,
    progress: bool = False,
    parallel: DataParallel | None = None,
) -> ModelResult:
    """Per-layer metrics of the token-level hidden states (the default protocol).

    The first pass runs the model once per batch and streams every layer's non-padding rows
    into a ``gsam_monitor.LayerStats``. When Mardia's kurtosis or an observer needs a
    second pass under that fit, it replays the rows the first pass kept (see
    ``gsam_monitor.eval.cache``) and re-runs the model only for batches it did not keep.
    The results do not depend on where the rows were kept.

    Args:
        loaded: the model (see ``gsam_monitor.eval.models.load_model``).
        corpus: the sentences.
        batch_size: sentences per forward pass.
        max_length: truncate inputs to this many tokens (default: the model's limit).
        observers: analyses fed in the second pass; their results join the layer dicts.
        metric_names: the metrics of ``gsam_monitor.metrics.compute`` per layer
            (default every one); without ``mardia_kurtosis`` and observers there is no second
            pass.
        max_memory: bytes (or a size such as ``"512MiB"``) of memory for the first pass's rows.
        spill: keep the rows in a temporary file when they do not fit ``max_memory`` (else the
            model is re-run for the batches beyond it).
        spill_dir: the spill file's folder (default: the system's temporary folder).
        progress: show a tqdm bar over batches on stderr.
        parallel: under ``torchrun``, the process group (``gsam_monitor.eval.parallel``): this
            rank runs its share of the batches, the statistics are summed over the ranks, and
            the observers' ``results`` run on rank 0 only (each observer needs a
            ``reduce(parallel)`` method).

    Returns:
        The ``ModelResult``; ``score`` is the last layer's gsam.

    Raises:
        ValueError: for a non-positive ``batch_size`` or ``max_length``, an unknown metric, a
            bad ``max_memory`` or a ``spill_dir`` that is not a folder.
    """
    check_run(batch_size, max_length)
    names = metrics.validate_names(metric_names)
    if "gsam" not in names:  # the headline score
        names = ("gsam", *names)
    max_length = _max_length(loaded, max_length)
    local = corpus if parallel is None else parallel.shard(corpus, batch_size).corpus
    second_pass = bool(observers) or "mardia_kurtosis" in names
    n_batches = math.ceil(len(local) / batch_size)
    stats: list[LayerStats] = []
    accumulators: list[MardiaAccumulator | None] = []
    modules: list[str | None] = []  # the monitor's name of each hidden state
    info: dict[str, Any] = {}
    with together(parallel, f"{loaded.name}: counting tokens"):
        tokens, n_truncated = _count_tokens(loaded, local.sentences, max_length)
        store = HiddenStateStore(max_memory, tokens,
                                 (spill_dir or default_spill_dir()) if spill and second_pass else None)
    # no_grad, not inference_mode: LayerStats reuses workspace buffers across calls, and an
    # inference tensor cached here could not be updated in place by a later call outside it.
    with store, torch.no_grad():
        with together(parallel, f"{loaded.name}: first pass"):
            for batch in _progress(_forward(loaded, local, batch_size, max_length, modules=modules),
                                   total=n_batches, desc=f"{loaded.name} pass 1", enabled=progress):
                if not stats:  # each layer's statistics where its hidden states are (--device-map)
                    stats = [LayerStats(r.shape[-1], device=r.device) for r in batch.rows]
                for layer_stats, rows in zip(stats, batch.rows, strict=True):
                    layer_stats.update(rows)
                if second_pass:
                    store.add(batch.rows, batch.mask, batch.labels)
                del batch
                _release_heap(store)
        if parallel is not None:
            parallel.sum_stats(stats)
            n_truncated = parallel.sum_int(n_truncated)
        if second_pass:
            with together(parallel, f"{loaded.name}: second pass"):
                if "mardia_kurtosis" in names:
                    accumulators = [_mardia(s) for s in stats]
                replayed = len(store)
                batches = itertools.chain(store.replay(),
                                          _forward(loaded, local, batch_size, max_length, first=replayed))
                for batch in _progress(batches, total=n_batches, desc=f"{loaded.name} pass 2", enabled=progress):
                    _second_pass(batch, accumulators, observers, [s.device for s in stats])
                    del batch
                    _release_heap(store)
            if parallel is not None:
                _sum_second_pass(parallel, accumulators, observers)
            info = {"replayed": replayed, "rerun": n_batches - replayed, "where": store.where,
                    "bytes_in_memory": store.bytes_in_memory, "bytes_spilled": store.bytes_spilled,
                    "bytes_per_token": store.bytes_per_token}
            logger.info("%s second pass: %s", loaded.name, info)
    layers, spectra = [], []
    for index, layer_stats in enumerate(stats):
        acc = accumulators[index] if accumulators else None
        values, spectrum = _layer_metrics(layer_stats, acc, names)
        module = modules[index] if index < len(modules) else None
        layers.append({"index": index, "name": _layer_name(index), "module": module, **values})
        spectra.append(spectrum)
    if parallel is None or parallel.rank == 0:  # the analyses' fits: once, where the outputs are written
        for observer in observers:
            for index, extra in observer.results(stats).items():
                layers[index].update(extra)
    return ModelResult(
        model=loaded.name,
        d=loaded.hidden_size,
        score=layers[-1]["gsam"],
        layers=layers,
        spectra=spectra,
        n_sentences=len(corpus),
        n_truncated=n_truncated,
        max_length=max_length,
        dtype=str(loaded.dtype).removeprefix("torch."),
        device=str(loaded.device),
        second_pass=info,
    )


def _sum_second_pass(parallel: DataParallel, accumulators: Sequence[MardiaAccumulator | None],
                     observers: Sequence[LayerObserver]) -> None:
    """Sum the second pass over the ranks: Mardia's sums, then each observer's own state."""
    for acc in accumulators:
        if acc is not None:
            acc.all_reduce_(parallel.group, device=parallel.device)
    for observer in observers:
        observer.reduce(parallel)  # type: ignore[attr-defined]  # checked by check_observers


def _release_heap(store: HiddenStateStore) -> None:
    """Give the freed per-batch buffers back to the OS (glibc's ``malloc_trim``; nothing
    elsewhere), after each batch of a run whose rows spill to a file. Batches of varying size,
    freed in turn, otherwise fragment the heap: at 30,000 sentences the peak resident memory
    doubled. Trimming every 8th batch instead kept a third of that growth; runs whose rows stay
    in memory are not trimmed, since a trim costs ~0.06 s (``benchmarks/RESULTS.md``)."""
    if store.spilling and _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _forward(loaded: LoadedModel, corpus: Corpus, batch_size: int, max_length: int | None, first: int = 0,
             modules: list[str | None] | None = None) -> Iterator[StoredBatch]:
    """Run the model over the batches from index ``first`` on; yield each batch's non-padding
    rows per hidden state (the layout the store keeps, so both passes see the same rows).
    ``modules``: filled, on the first batch, with the monitor's name of each hidden state."""
    for inputs, labels in _batches(loaded, corpus, batch_size, max_length, first):
        with monitor_names(loaded.model, modules) as match:
            hidden_states = loaded.model(**inputs, output_hidden_states=True).hidden_states
            match(hidden_states)
        mask = inputs["attention_mask"].bool()
        # Packed rows: half of a padded SST-2 batch is padding, which the updates would
        # multiply as zero rows. Each layer's rows stay on its device (--device-map).
        rows = [h[mask.to(h.device)] for h in hidden_states]
        del hidden_states  # not held beside the rows while the caller works on them
        yield StoredBatch(rows, mask, labels)


def _second_pass(
    batch: StoredBatch,
    accumulators: Sequence[MardiaAccumulator | None],
    observers: Sequence[LayerObserver],
    devices: Sequence[torch.device],
) -> None:
    """Feed one batch's rows to the Mardia accumulators and, padded back to (B, T, d) on each
    layer's device, to the observers."""
    for index, rows in enumerate(batch.rows):
        if accumulators and accumulators[index] is not None:
            accumulators[index].update(rows)
        if observers:
            device = devices[index]
            mask = batch.mask.to(device)
            hidden = rows.new_zeros((*mask.shape, rows.shape[-1]), device=device)
            hidden[mask] = rows.to(device)
            for observer in observers:
                observer.update(index, hidden, mask, batch.labels)


# ---------------------------------------------------------------------------- paper
def sentence_vectors(
    loaded: LoadedModel,
    corpus: Corpus,
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """The original code's sentence vectors: masked mean of the last hidden state plus masked
    mean of the embedding output, in fp64.

    Args:
        loaded: the model.
        corpus: the sentences.
        batch_size: sentences per forward pass.
        max_length: truncation length (already resolved against the model's limit).
        progress: show a tqdm bar over batches on stderr.

    Returns:
        Array of shape (N sentences, d).
    """
    check_run(batch_size, max_length)
    vectors = []
    n_batches = math.ceil(len(corpus) / batch_size)
    # no_grad, not inference_mode: LayerStats reuses workspace buffers across calls, and an
    # inference tensor cached here could not be updated in place by a later call outside it.
    with torch.no_grad():
        batches = _batches(loaded, corpus, batch_size, max_length)
        for inputs, _ in _progress(batches, total=n_batches, desc=f"{loaded.name} vectors",
                                   enabled=progress):
            hidden_states = loaded.model(**inputs, output_hidden_states=True).hidden_states
            # fp64 means: fp16 sums over 30 tokens of large activations can overflow. Each
            # on its layer's device (--device-map), added on the host.
            weights = inputs["attention_mask"].to(torch.float64)[..., None]  # (B, T, 1)
            last, embedded = (_masked_mean(hidden_states[i], weights) for i in (-1, 0))  # (B, d)
            vectors.append(last + embedded)
    return torch.cat(vectors).numpy()


def _masked_mean(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """fp64 mean over the tokens of ``hidden`` (B, T, d) weighted by ``weights`` (B, T, 1), on the host."""
    weights = weights.to(hidden.device)
    return ((hidden.double() * weights).sum(1) / weights.sum(1)).cpu()


def run_paper_protocol(
    loaded: LoadedModel, corpus: Corpus, *, batch_size: int = 32, max_length: int | None = None,
    with_log_n: bool = False, progress: bool = False, parallel: DataParallel | None = None,
) -> ModelResult:
    """The original benchmark code's recipe, plus the library's metrics on the same vectors.

    The single layer entry (index -1, name ``last+embeddings``) holds ``paper_score`` (the
    original number), ``paper_retries`` and ``paper_ridge``, and the metrics of
    ``gsam_monitor.metrics.compute`` on the raw sentence vectors (so ``gsam`` there is the
    library's GSAM, scored on the support with ``rank`` beside it).

    Args:
        loaded: the model.
        corpus: the sentences.
        batch_size: sentences per forward pass.
        max_length: truncate inputs to this many tokens (default: the model's limit).
        with_log_n: add log N to the paper score.
        progress: show a tqdm bar over batches on stderr.
        parallel: under ``torchrun``, the process group: this rank computes its share's
            sentence vectors, and every rank scores all of them, gathered in corpus order.

    Returns:
        The ``ModelResult``; ``score`` is the paper score.
    """
    check_run(batch_size, max_length)
    max_length = _max_length(loaded, max_length)
    local = corpus if parallel is None else parallel.shard(corpus, batch_size).corpus
    with together(parallel, f"{loaded.name}: sentence vectors"):
        n_truncated = _count_tokens(loaded, local.sentences, max_length)[1]
        vectors = sentence_vectors(loaded, local, batch_size=batch_size, max_length=max_length, progress=progress)
    if parallel is not None:
        vectors = np.concatenate(parallel.gather(vectors))
        n_truncated = parallel.sum_int(n_truncated)
    fit = paper_fit(vectors, with_log_n=with_log_n)
    rows = torch.from_numpy(vectors)
    stats = LayerStats(vectors.shape[1])
    stats.update(rows)
    acc = _mardia(stats)
    if acc is not None:
        acc.update(rows)
    values, spectrum = _layer_metrics(stats, acc)
    layer = {
        "index": -1,
        "name": PAPER_LAYER_NAME,
        **values,
        "paper_score": fit.score,
        "paper_retries": fit.retries,
        "paper_ridge": fit.ridge,
        "with_log_n": with_log_n,
    }
    return ModelResult(
        model=loaded.name,
        d=loaded.hidden_size,
        score=fit.score,
        layers=[layer],
        spectra=[spectrum],
        n_sentences=len(corpus),
        n_truncated=n_truncated,
        max_length=max_length,
        dtype=str(loaded.dtype).removeprefix("torch."),
        device=str(loaded.device),
    )
