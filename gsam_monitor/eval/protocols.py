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
the width. ``paper_score`` is the pure scoring function (steps 2–5).

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

#: First ridge of the original code's Cholesky retry loop, its growth and its retry limit.
PAPER_EPS = 1e-6
PAPER_EPS_GROWTH = 10.0
PAPER_MAX_RETRIES = 10

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


@dataclass(frozen=True)
class PaperFit:
    """The paper protocol's score and how it was reached.

    Attributes:
        score: mean log p (plus log N when asked).
        retries: Cholesky retries needed (each adds a ridge).
        ridge: total eps added to the diagonal.
        n: number of vectors.
        d: their dimension.
    """

    score: float
    retries: int
    ridge: float
    n: int
    d: int


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
    tokens, n_truncated = _count_tokens(loaded, corpus.sentences, max_length)
    second_pass = bool(observers) or "mardia_kurtosis" in names
    store = HiddenStateStore(max_memory, tokens,
                             (spill_dir or default_spill_dir()) if spill and second_pass else None)
    n_batches = math.ceil(len(corpus) / batch_size)
    stats: list[LayerStats] = []
    accumulators: list[MardiaAccumulator | None] = []
    modules: list[str | None] = []  # the monitor's name of each hidden state
    info: dict[str, Any] = {}
    # no_grad, not inference_mode: LayerStats reuses workspace buffers across calls, and an
    # inference tensor cached here could not be updated in place by a later call outside it.
    with store, torch.no_grad():
        for batch in _progress(_forward(loaded, corpus, batch_size, max_length, modules=modules), total=n_batches,
                               desc=f"{loaded.name} pass 1", enabled=progress):
            if not stats:
                stats = [LayerStats(r.shape[-1], device=loaded.device) for r in batch.rows]
            for layer_stats, rows in zip(stats, batch.rows, strict=True):
                layer_stats.update(rows)
            if second_pass:
                store.add(batch.rows, batch.mask, batch.labels)
            del batch
            _release_heap(store)
        if second_pass:
            if "mardia_kurtosis" in names:
                accumulators = [_mardia(s) for s in stats]
            replayed = len(store)
            batches = itertools.chain(store.replay(),
                                      _forward(loaded, corpus, batch_size, max_length, first=replayed))
            for batch in _progress(batches, total=n_batches, desc=f"{loaded.name} pass 2", enabled=progress):
                _second_pass(batch, accumulators, observers, loaded.device)
                del batch
                _release_heap(store)
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
        # multiply as zero rows.
        rows = [h[mask] for h in hidden_states]
        del hidden_states  # not held beside the rows while the caller works on them
        yield StoredBatch(rows, mask, labels)


def _second_pass(
    batch: StoredBatch,
    accumulators: Sequence[MardiaAccumulator | None],
    observers: Sequence[LayerObserver],
    device: torch.device,
) -> None:
    """Feed one batch's rows to the Mardia accumulators and, padded back to (B, T, d), to the
    observers."""
    mask = batch.mask.to(device)
    for index, rows in enumerate(batch.rows):
        if accumulators and accumulators[index] is not None:
            accumulators[index].update(rows)
        if observers:
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
            # fp64 means: fp16 sums over 30 tokens of large activations can overflow.
            weights = inputs["attention_mask"].to(torch.float64)[..., None]  # (B, T, 1)
            count = weights.sum(1)  # (B, 1)
            last = (hidden_states[-1].double() * weights).sum(1) / count  # (B, d)
            embedded = (hidden_states[0].double() * weights).sum(1) / count  # (B, d)
            vectors.append((last + embedded).cpu())
    return torch.cat(vectors).numpy()


def paper_fit(vectors: np.ndarray, with_log_n: bool = False) -> PaperFit:
    """Score sentence vectors exactly as the original benchmark code did.

    z-score per dimension (ddof 0, zero-variance dimensions left unscaled); ``np.cov``
    (ddof 1); Cholesky, adding eps·I on failure with eps = 1e-6 ×10 per retry, accumulating,
    up to 10 retries; mean log-density of the z-scored vectors under N(mean, cov) with
    ``torch.distributions.MultivariateNormal`` on the Cholesky factor that succeeded (the
    same density as ``scipy.stats.multivariate_normal(mean, cov).logpdf``, at the cost of
    one Cholesky instead of an eigendecomposition).

    Args:
        vectors: (N, d) array, one row per sentence.
        with_log_n: add log N (the report's formula; the original code omitted it).

    Returns:
        The ``PaperFit``.

    Raises:
        ValueError: if ``vectors`` is not a 2-D array of at least 2 finite rows.
        numpy.linalg.LinAlgError: if Cholesky still fails after 10 retries.
    """
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(
            f"vectors: expected a 2-D array (N sentences, d) with N >= 2, got shape {x.shape}"
        )
    if not np.isfinite(x).all():
        raise ValueError(
            "vectors: expected finite values, got NaN or Inf (run the model in float32: "
            "--dtype float32)"
        )
    n, d = x.shape
    sd = x.std(axis=0)
    sd[sd == 0] = 1.0
    z = (x - x.mean(axis=0)) / sd
    cov = np.cov(z, rowvar=False)
    eps, ridge, retries = PAPER_EPS, 0.0, 0
    while True:
        factor, info = torch.linalg.cholesky_ex(torch.from_numpy(cov))
        if int(info) == 0:
            break
        if retries == PAPER_MAX_RETRIES:
            raise np.linalg.LinAlgError(
                f"paper protocol: the covariance is not positive definite even after "
                f"{PAPER_MAX_RETRIES} ridge retries (total ridge {ridge:g}); the vectors are "
                f"degenerate"
            )
        cov = cov + eps * np.eye(d)
        ridge += eps
        eps *= PAPER_EPS_GROWTH
        retries += 1
    gaussian = torch.distributions.MultivariateNormal(
        torch.from_numpy(z.mean(axis=0)), scale_tril=factor, validate_args=False
    )
    score = float(gaussian.log_prob(torch.from_numpy(z)).mean())
    if with_log_n:
        score += math.log(n)
    return PaperFit(score=score, retries=retries, ridge=ridge, n=n, d=d)


def paper_score(vectors: np.ndarray, with_log_n: bool = False) -> float:
    """The original benchmark code's score of sentence vectors (see ``paper_fit``).

    Args:
        vectors: (N, d) array, one row per sentence.
        with_log_n: add log N, which the original code omitted.

    Returns:
        Mean log p of the z-scored vectors under the ridge-regularised Gaussian fit.
    """
    return paper_fit(vectors, with_log_n).score


def run_paper_protocol(
    loaded: LoadedModel, corpus: Corpus, *, batch_size: int = 32, max_length: int | None = None,
    with_log_n: bool = False, progress: bool = False,
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

    Returns:
        The ``ModelResult``; ``score`` is the paper score.
    """
    check_run(batch_size, max_length)
    max_length = _max_length(loaded, max_length)
    n_truncated = _count_tokens(loaded, corpus.sentences, max_length)[1]
    vectors = sentence_vectors(
        loaded, corpus, batch_size=batch_size, max_length=max_length, progress=progress
    )
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
