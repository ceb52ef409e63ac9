"""``--analyses concepts``: the "Geometry of Concepts" study's crystals, lobes and galaxy on a model we run.

For each selected layer (``--layers``; default the middle block) of each model:

1. **SAE** -- a ``gsam_monitor.analysis.concepts.TopKSAE`` (``--sae-seeds`` of them, each with
   its own seed) trained on the layer's hidden states, streamed through the library's hooks
   (``LayerCapture``: the root pre-hook's attention mask, special tokens dropped as well) from
   a corpus of prose, code and math cut into 256-token blocks (``default_documents``); one
   block in ``heldout_every`` is held out. Quality on the held-out blocks, overall and per
   source, on blocks of text never seen in training (``fresh_documents``), and of a PCA with as
   many components as the SAE has active features; dead fraction: features that never fire.
2. **Lobes** -- features fire in a block when their activation exceeds the threshold on one
   of its tokens (default: matched to the study's activation rate, ``threshold_for_rate``);
   the library's recipe and the study's are both run (``gsam_monitor.eval.concepts_lobes``),
   with a sweep of the lobe count, several clustering seeds, blocks that mix the sources, and
   a sweep of the threshold.
3. **Crystals** -- the bundled word pairs, each word run alone through the model; difference
   vectors in activation space and in SAE feature space, scored by distractor removal and by
   the study's supervised LDA (``gsam_monitor.eval.concepts_crystals``).
4. **Galaxy** -- the power law of the decoder point cloud's covariance spectrum, beside the
   power law of the layer's activation covariance on the same corpus.

Per layer, the JSON gets ``"concepts": {"sae": ..., "lobes": ..., "crystals": ...,
"firing_threshold": ..., "threshold_sweep": ..., "powerlaw_alpha": ...}`` (see
``run_concepts``); ``--save-artifacts DIR`` writes the arrays behind them
(``write_artifacts``); the plots are the lobes on a 2-D spectral embedding of the affinity,
the AMI against the lobe count and the threshold, the crystals' pairs on their first two
principal components before and after the LDA projection, and the two eigen-spectra.
"""

from __future__ import annotations

import logging
import math
import random
import re
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gsam_monitor import metrics
from gsam_monitor._jsonable import plain
from gsam_monitor.analysis.concepts import (
    SOURCES,
    STUDY_ACTIVATION_RATE,
    ActivationHistogram,
    Block,
    BlockFiring,
    LayerCapture,
    SAEEvaluator,
    SAETrainer,
    TopKSAE,
    build_blocks,
    code_documents,
    load_word_pairs,
    math_documents,
    pca_explained_variance,
    point_cloud_powerlaw,
    point_cloud_spectrum,
    prose_documents,
    threshold_for_rate,
)
from gsam_monitor.analysis.spectrum import powerlaw_fit
from gsam_monitor.eval.concepts_config import ConceptsConfig, LayerConcepts
from gsam_monitor.eval.concepts_crystals import WordVectors, crystal_results
from gsam_monitor.eval.concepts_lobes import lobe_results, single_threaded, study_summary, summarise, threshold_sweep
from gsam_monitor.eval.corpus import load_corpus
from gsam_monitor.eval.models import LoadedModel
from gsam_monitor.metrics.scores import POWERLAW_RANGE
from gsam_monitor.stats import LayerStats

__all__ = [
    "CONCEPTS",
    "ConceptsConfig",
    "LayerConcepts",
    "default_documents",
    "default_layers",
    "fresh_documents",
    "has_concepts",
    "parse_layers",
    "run_concepts",
    "write_artifacts",
]

logger = logging.getLogger(__name__)

#: The ``--analyses`` name of this analysis.
CONCEPTS = "concepts"

#: Long SST-2 train sentences the training prose may take from; fresh prose starts after them.
_PROSE_SENTENCES = 2_500


def default_documents(seed: int = 0) -> dict[str, Iterable[Any]]:
    """The three sources: the first 2,500 SST-2 train sentences of at least 10 words (the
    bundled ``sst2_train`` corpus), the interpreter's standard library, seeded math."""
    return {"prose": prose_documents(load_corpus("sst2_train").sentences, n_sentences=_PROSE_SENTENCES,
                                     name="sst2_train"),
            "code": code_documents(), "math": math_documents(seed)}


def fresh_documents(used_code: Iterable[str], seed: int = 0) -> dict[str, Iterable[Any]]:
    """Text the SAE never saw: the next 1,000 long SST-2 train sentences after the first 2,500, the
    standard-library files not in ``used_code`` (from the end of the sorted list), and math
    from the seed ``seed + 1``."""
    long = [s for s in load_corpus("sst2_train").sentences if len(s.split()) >= 10][_PROSE_SENTENCES:]
    used = set(used_code)
    code = [d for d in code_documents() if d.name not in used][::-1]
    return {"prose": prose_documents(long, n_sentences=1_000, name="sst2_train_fresh"), "code": code,
            "math": math_documents(seed + 1)}


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The middle block: hidden-state index ``max(1, num_layers // 2)`` (3 of MiniLM's 6)."""
    return (max(1, num_layers // 2),)


def parse_layers(value: str | None) -> tuple[int, ...] | None:
    """``--layers``: comma-separated hidden-state indices, ``all``, or None (the middle block).

    Returns:
        The indices, or ``None`` for the default; ``all`` is returned as ``(-1,)`` and resolved
        per model.

    Raises:
        ValueError: for anything but non-negative integers or ``all``.
    """
    if value is None or not value.strip():
        return None
    if value.strip().lower() == "all":
        return (-1,)
    try:
        layers = tuple(sorted({int(item) for item in value.split(",") if item.strip()}))
    except ValueError:
        layers = (-2,)
    if not layers or min(layers) < 0:
        raise ValueError(f"--layers: expected comma-separated hidden-state indices (0 = embeddings, i = block i) "
                         f"or 'all', got {value!r}; e.g. --layers 1,3,5")
    return layers


def _resolve_layers(config: ConceptsConfig, loaded: LoadedModel) -> tuple[int, ...]:
    if config.layers is None:
        return default_layers(loaded.num_layers)
    if config.layers == (-1,):
        return tuple(range(loaded.num_layers + 1))
    bad = [i for i in config.layers if i > loaded.num_layers]
    if bad:
        raise ValueError(f"--layers: {loaded.name} has hidden states 0..{loaded.num_layers}, got {bad}")
    return tuple(config.layers)


# ---------------------------------------------------------------------------- streaming
def _progress(iterable: Iterable[Any], *, total: int, desc: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr, unit="batch")


def _batches(blocks: Sequence[Block], size: int, device: torch.device) -> Iterator[tuple[list[Block], torch.Tensor,
                                                                                           torch.Tensor]]:
    for start in range(0, len(blocks), size):
        chunk = list(blocks[start : start + size])
        ids = torch.tensor([b.input_ids for b in chunk], device=device)
        special = torch.tensor([b.special for b in chunk], device=device)
        yield chunk, ids, special


#: An SAE of the run: (hidden-state index, replicate); replicate 0 gives every number but the seed spread.
_Unit = tuple[int, int]


def run_concepts(
    loaded: LoadedModel,
    config: ConceptsConfig | None = None,
    *,
    progress: bool = False,
    documents: dict[str, Iterable[Any]] | None = None,
    fresh: dict[str, Iterable[Any]] | None = None,
) -> tuple[dict[int, dict[str, Any]], dict[int, LayerConcepts]]:
    """Train SAEs per selected layer on streamed activations and measure lobes, crystals, galaxy.

    Args:
        loaded: the model.
        config: settings (default ``ConceptsConfig``).
        progress: tqdm bars on stderr.
        documents: source -> documents, replacing the default corpus (tests use small ones).
        fresh: source -> documents never trained on, for ``sae.explained_variance_fresh``
            (default: ``fresh_documents`` with the default corpus, none with ``documents``).

    Returns:
        ``(results, plots)``: per hidden-state index, ``{"concepts": {...}}`` for the layer's
        JSON entry, and the ``LayerConcepts`` the plots need. ``concepts`` holds ``sae``
        (``n_features``, ``k``, ``l0``, ``explained_variance``, ``explained_variance_by_source``,
        ``explained_variance_fresh``, ``pca_explained_variance``, ``dead_fraction``,
        ``train_rows``, ``heldout_rows``), ``lobes`` (the library's headline under the flat keys
        ``k``, ``affinity``, ``ami``, ``ami_null_mean``, ``ami_null_sd``, ``ami_z``,
        ``logreg_accuracy``, ``chance``, ``lobe_by_source``, ``n_features``, ``threshold``,
        ``firing_density``, ``by_affinity``; and ``library``, ``study``, ``k_sweep``,
        ``over_seeds``, ``mixed_blocks``), ``crystals`` (``activations`` and ``features``:
        distractor removal; ``supervised``), ``firing_threshold``, ``threshold_sweep`` and
        ``powerlaw_alpha`` (``features`` and ``activations``, each alpha with its 95% CI).

    Raises:
        ValueError: a bad layer index, or a source with too few blocks.
    """
    config = config or ConceptsConfig()
    layers = _resolve_layers(config, loaded)
    block_size = config.block_size
    if loaded.max_length is not None and block_size > loaded.max_length:
        warnings.warn(f"concepts: {loaded.name} takes at most {loaded.max_length} tokens; blocks of "
                      f"{loaded.max_length} tokens are used instead of {block_size}", stacklevel=2)
        block_size = loaded.max_length
        config = replace(config, block_size=block_size)
    sources = documents if documents is not None else default_documents(config.seed)
    blocks = build_blocks(loaded.tokenizer, sources, config.blocks_per_source, block_size=block_size,
                          blocks_per_document={"code": config.code_blocks_per_file})
    if fresh is None and documents is None:
        fresh = fresh_documents({b.document for b in blocks if b.source == "code"}, config.seed)
    fresh_blocks = build_blocks(loaded.tokenizer, fresh, config.fresh_blocks, block_size=block_size,
                                blocks_per_document={"code": config.code_blocks_per_file}) if fresh else []
    random.Random(config.seed).shuffle(blocks)
    started = time.perf_counter()
    heldout = blocks[:: config.heldout_every]
    train = [b for i, b in enumerate(blocks) if i % config.heldout_every]
    d = loaded.hidden_size
    units: list[_Unit] = [(layer, r) for layer in layers for r in range(config.sae_seeds)]
    saes = {(layer, r): TopKSAE(d, config.expansion * d, config.k, seed=config.seed + layer + 1000 * r).to(
        loaded.device) for layer, r in units}
    trainers = {unit: SAETrainer(sae, lr=config.lr, batch_size=config.sae_batch,
                                 buffer_rows=max(16 * config.sae_batch, 16_384), seed=config.seed + unit[1])
                for unit, sae in saes.items()}
    n_batches = math.ceil(len(train) / config.batch_blocks)
    with LayerCapture(loaded.model, layers) as capture, torch.no_grad():
        for epoch in range(config.epochs):
            order = list(train)
            random.Random(config.seed + 1 + epoch).shuffle(order)
            for _, ids, special in _progress(_batches(order, config.batch_blocks, loaded.device), total=n_batches,
                                             desc=f"{loaded.name} SAE epoch {epoch + 1}/{config.epochs}",
                                             enabled=progress):
                hidden, keep = capture(ids, special=special)
                with torch.enable_grad():
                    for (layer, _), trainer in trainers.items():
                        trainer.feed(hidden[layer][keep].float())
        with torch.enable_grad():
            for trainer in trainers.values():
                trainer.flush()
        logger.info("concepts: SAE training %.1f s (%d blocks, %d epochs, %d SAEs)", time.perf_counter() - started,
                    len(train), config.epochs, len(saes))
        started = time.perf_counter()
        analysis = _analysis_pass(loaded, capture, saes, blocks, heldout, config, progress)
        fresh_eval = _fresh_pass(loaded, capture, saes, fresh_blocks, config)
        words = _word_vectors(loaded, capture, {layer: saes[(layer, 0)] for layer in layers})
        logger.info("concepts: firing pass %.1f s (%d blocks, %d fresh)", time.perf_counter() - started, len(blocks),
                    len(fresh_blocks))
    results: dict[int, dict[str, Any]] = {}
    plots: dict[int, LayerConcepts] = {}
    for layer in layers:
        started = time.perf_counter()
        # The protocol's names: hidden_states[i] is "layer_i" (the output of block i).
        name = "embeddings" if layer == 0 else f"layer_{layer}"
        unit_passes = {r: analysis[(layer, r)] for r in range(config.sae_seeds)}
        entry, plot = _layer_results(layer, name, saes, trainers[(layer, 0)], unit_passes, fresh_eval, words, config)
        results[layer] = {"concepts": plain(entry)}
        if config.save_artifacts is not None:
            write_artifacts(Path(config.save_artifacts), loaded.name, layer, plot, words,
                            [saes[(layer, r)] for r in range(config.sae_seeds)])
        logger.info("concepts: layer %d analyses %.1f s", layer, time.perf_counter() - started)
        plots[layer] = plot
    return results, plots


@dataclass
class _LayerPass:
    segments: BlockFiring  # pseudo-blocks: segment s of block b is b * S + s
    heldout: SAEEvaluator
    heldout_by_source: dict[str, SAEEvaluator]
    fired: torch.Tensor  # (m,) tokens of every block on which each feature is non-zero
    histogram: ActivationHistogram
    n_tokens: int
    train_stats: LayerStats | None  # replicate 0 only
    heldout_stats: dict[str, LayerStats]

    def segment_max(self, n_segments: int) -> np.ndarray:
        seg = self.segments.block_max()
        return seg.reshape(-1, n_segments, seg.shape[1])


def _segments(keep: torch.Tensor, n_segments: int) -> torch.Tensor:
    """(B, T) -> per kept token, its segment: the block's kept tokens cut into ``n_segments`` equal runs."""
    rank = keep.long().cumsum(1) - 1
    n_kept = keep.long().sum(1, keepdim=True).clamp_min(1)
    return (rank * n_segments // n_kept)[keep]


def _analysis_pass(loaded: LoadedModel, capture: LayerCapture, saes: dict[_Unit, TopKSAE], blocks: Sequence[Block],
                   heldout: Sequence[Block], config: ConceptsConfig, progress: bool) -> dict[_Unit, _LayerPass]:
    """One more pass over every block: firing per segment, held-out quality, activation moments."""
    held = {id(b) for b in heldout}
    n_seg = len(SOURCES)
    d = loaded.hidden_size
    passes = {unit: _LayerPass(BlockFiring(sae.n_features, math.inf), SAEEvaluator(sae),
                               {s: SAEEvaluator(sae) for s in SOURCES},
                               torch.zeros(sae.n_features, dtype=torch.int64), ActivationHistogram(), 0,
                               LayerStats(d, device=loaded.device, higher_moments=False) if unit[1] == 0 else None,
                               {s: LayerStats(d, device=loaded.device, higher_moments=False) for s in SOURCES})
              for unit, sae in saes.items()}
    n_batches = math.ceil(len(blocks) / config.batch_blocks)
    for chunk, ids, special in _progress(_batches(blocks, config.batch_blocks, loaded.device), total=n_batches,
                                         desc=f"{loaded.name} firing", enabled=progress):
        hidden, keep = capture(ids, special=special)
        block = torch.arange(len(chunk), device=keep.device)[:, None].expand_as(keep)[keep]  # (N,)
        pseudo = block * n_seg + _segments(keep, n_seg).to(block.device)
        held_rows = torch.tensor([id(b) in held for b in chunk], device=keep.device)[block]
        source_rows = {s: torch.tensor([b.source == s for b in chunk], device=keep.device)[block] & held_rows
                       for s in SOURCES}
        for (layer, r), sae in saes.items():
            rows = hidden[layer].float()[keep]  # (N, d)
            state = passes[(layer, r)]
            values, indices = sae.encode_topk(rows)
            codes = torch.zeros(rows.shape[0], sae.n_features, dtype=values.dtype,
                                device=values.device).scatter_(-1, indices, values)
            state.segments.update_rows(codes, pseudo, [b.source for b in chunk for _ in range(n_seg)])
            state.fired += (codes > 0).sum(dim=0).cpu()
            state.histogram.update(values)
            state.n_tokens += rows.shape[0]
            state.heldout.update(rows[held_rows], (values[held_rows], indices[held_rows]))
            if state.train_stats is not None:
                state.train_stats.update(rows[~held_rows])
            for s, sel in source_rows.items():
                if bool(sel.any()):
                    state.heldout_by_source[s].update(rows[sel], (values[sel], indices[sel]))
                    state.heldout_stats[s].update(rows[sel])
    return passes


@dataclass
class _Fresh:
    overall: dict[_Unit, SAEEvaluator]
    by_source: dict[_Unit, dict[str, SAEEvaluator]]
    stats: dict[int, LayerStats]
    n_blocks: int


def _fresh_pass(loaded: LoadedModel, capture: LayerCapture, saes: dict[_Unit, TopKSAE], blocks: Sequence[Block],
                config: ConceptsConfig) -> _Fresh:
    """Quality on blocks of text never seen in training: overall, per source, and their moments."""
    out = _Fresh({u: SAEEvaluator(sae) for u, sae in saes.items()},
                 {u: {s: SAEEvaluator(sae) for s in SOURCES} for u, sae in saes.items()},
                 {layer: LayerStats(loaded.hidden_size, device=loaded.device, higher_moments=False)
                  for layer, r in saes if r == 0}, len(blocks))
    for chunk, ids, special in _batches(blocks, config.batch_blocks, loaded.device):
        hidden, keep = capture(ids, special=special)
        block = torch.arange(len(chunk), device=keep.device)[:, None].expand_as(keep)[keep]
        for (layer, r), sae in saes.items():
            rows = hidden[layer].float()[keep]
            encoded = sae.encode_topk(rows)
            out.overall[(layer, r)].update(rows, encoded)
            if r == 0:
                out.stats[layer].update(rows)
            for s in SOURCES:
                sel = torch.tensor([b.source == s for b in chunk], device=keep.device)[block]
                if bool(sel.any()):
                    out.by_source[(layer, r)][s].update(rows[sel], (encoded[0][sel], encoded[1][sel]))
    return out


def _word_vectors(loaded: LoadedModel, capture: LayerCapture, saes: dict[int, TopKSAE]) -> WordVectors:
    """Each word of the pair list run alone; mean over its tokens of the activations and SAE codes."""
    pairs = load_word_pairs()
    words = list(dict.fromkeys(w for p in pairs for w in (p.a, p.b)))
    enc = loaded.tokenizer(words, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    ids = enc["input_ids"].to(loaded.device)
    hidden, keep = capture(ids, enc["attention_mask"].to(loaded.device),
                           enc["special_tokens_mask"].to(loaded.device).bool())
    weights = keep.float()[..., None]
    count = weights.sum(1).clamp_min(1.0)
    acts, feats = {}, {}
    for layer, sae in saes.items():
        h = hidden[layer].float()
        acts[layer] = ((h * weights).sum(1) / count).double().cpu().numpy()
        feats[layer] = ((sae.encode(h) * weights).sum(1) / count).double().cpu().numpy()
    return WordVectors(pairs, {w: i for i, w in enumerate(words)}, keep.sum(1).cpu().numpy(), acts, feats)


def _ev(evaluator: SAEEvaluator) -> float:
    return evaluator.result().explained_variance if evaluator.n else math.nan


def _threshold(state: _LayerPass, sae: TopKSAE, config: ConceptsConfig) -> tuple[float, Any]:
    """The firing threshold (given, or matched to the study's activation rate) and the rate function."""
    hist = state.histogram
    n_cells = max(state.n_tokens, 1) * sae.n_features
    above = hist.above()

    def rate_at(t: float) -> float:
        return float(np.interp(t, hist.edges, above)) / n_cells

    if config.threshold is not None:
        return float(config.threshold), rate_at
    return threshold_for_rate(hist.edges, above, n_cells, STUDY_ACTIVATION_RATE), rate_at


def _sae_entry(sae: TopKSAE, trainer: SAETrainer, state: _LayerPass, fresh: _Fresh, unit: _Unit,
               config: ConceptsConfig) -> dict[str, Any]:
    held = state.heldout.result()
    layer = unit[0]
    heldout_all = LayerStats(sae.d_in, higher_moments=False)
    for stats in state.heldout_stats.values():
        heldout_all.merge(stats)
    train = state.train_stats
    pca: dict[str, Any] = {"n_components": sae.k}
    if train is not None:
        pca["heldout"] = pca_explained_variance(train, heldout_all, sae.k)
        pca["by_source"] = {s: pca_explained_variance(train, st, sae.k) if float(st.count) else math.nan
                            for s, st in state.heldout_stats.items()}
        pca["fresh"] = (pca_explained_variance(train, fresh.stats[layer], sae.k) if fresh.n_blocks else math.nan)
    return {
        "n_features": sae.n_features,
        "k": sae.k,
        "seed": config.seed + layer + 1000 * unit[1],
        "l0": held.l0,
        "explained_variance": held.explained_variance,
        "explained_variance_by_source": {s: _ev(e) for s, e in state.heldout_by_source.items()},
        "explained_variance_fresh": {
            "explained_variance": _ev(fresh.overall[unit]) if fresh.n_blocks else math.nan,
            "by_source": {s: _ev(e) for s, e in fresh.by_source[unit].items()},
            "n_rows": fresh.overall[unit].n, "n_blocks": fresh.n_blocks},
        "pca_explained_variance": pca,
        "dead_fraction": float((state.fired == 0).double().mean()),
        "train_rows": trainer.rows_seen,
        "heldout_rows": held.n_rows,
    }


def _layer_results(layer: int, name: str, saes: dict[_Unit, TopKSAE], trainer: SAETrainer,
                   passes: dict[int, _LayerPass], fresh: _Fresh, words: WordVectors,
                   config: ConceptsConfig) -> tuple[dict[str, Any], LayerConcepts]:
    sae, state = saes[(layer, 0)], passes[0]
    n_seg = len(SOURCES)
    segment_max = state.segment_max(n_seg)
    block_max = segment_max.max(axis=1)
    block_sources = list(state.segments.sources[::n_seg])
    plot = LayerConcepts(name=name, sae=sae, block_max=block_max, block_sources=block_sources)
    plot.labels["segment_max"] = segment_max
    directions = sae.W_dec.detach().double().cpu().numpy()
    threshold, rate_at = _threshold(state, sae, config)
    plot.sweeps["threshold"] = threshold
    sqrt_rule = math.sqrt(sae.d_in / sae.k)
    with single_threaded():
        lobes_entry = lobe_results(segment_max, block_sources, directions, threshold, config, plot)
        sweep = threshold_sweep(block_max, directions, sorted({*config.thresholds, threshold, sqrt_rule}), rate_at,
                                config)
        if config.sae_seeds > 1:
            lobes_entry["over_seeds"]["sae_seeds"] = _sae_seed_spread(layer, saes, passes, config)
    plot.sweeps["threshold_sweep"] = sweep
    crystals_entry = crystal_results(words, layer, config, plot)
    features_alpha = point_cloud_powerlaw(directions, POWERLAW_RANGE)
    plot.feature_spectrum = point_cloud_spectrum(directions)
    all_stats = LayerStats(sae.d_in, higher_moments=False)
    for stats in (state.train_stats, *state.heldout_stats.values()):
        if stats is not None:
            all_stats.merge(stats)
    values = metrics.compute(all_stats, names=["powerlaw_alpha", "rank"], with_spectrum=True)
    evals = values.spectrum
    rank = int(values.get("rank", 0))
    spectrum = evals.numpy()[:rank] if evals is not None else np.zeros(0)
    plot.activation_spectrum = spectrum
    entry = {
        "sae": _sae_entry(sae, trainer, state, fresh, (layer, 0), config),
        "lobes": lobes_entry,
        "crystals": crystals_entry,
        "firing_threshold": {
            "value": threshold,
            "rule": "--concept-threshold" if config.threshold is not None else "study activation rate",
            "activation_rate": rate_at(threshold), "study_activation_rate": STUDY_ACTIVATION_RATE,
            "firing_density": lobes_entry["firing_density"], "sqrt_d_over_k": sqrt_rule,
        },
        "threshold_sweep": sweep,
        "powerlaw_alpha": {
            "features": features_alpha,
            "activations": powerlaw_fit(spectrum, POWERLAW_RANGE) if spectrum.size else None,
        },
    }
    return entry, plot


def _sae_seed_spread(layer: int, saes: dict[_Unit, TopKSAE], passes: dict[int, _LayerPass],
                     config: ConceptsConfig) -> dict[str, Any]:
    """The study's AMI and balanced accuracy, and the held-out explained variance, per SAE seed."""
    rows = []
    for r, state in passes.items():
        sae = saes[(layer, r)]
        threshold, _ = _threshold(state, sae, config)
        directions = sae.W_dec.detach().double().cpu().numpy()
        summary = study_summary(state.segment_max(len(SOURCES)).max(axis=1), directions, threshold, config)
        rows.append({**summary, "explained_variance": state.heldout.result().explained_variance,
                     "threshold": threshold})
    return {"n": len(rows), "seeds": [config.seed + layer + 1000 * r for r in passes],
            **{key: summarise([row[key] for row in rows])
               for key in ("ami", "balanced_accuracy", "explained_variance", "threshold")}}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def write_artifacts(directory: Path, model: str, layer: int, plot: LayerConcepts, words: WordVectors,
                    saes: Sequence[TopKSAE]) -> Path:
    """Write ``concepts_<model>_<layer>.npz``: what the layer's numbers can be recomputed from.

    Arrays: ``sae<r>_W_enc``, ``sae<r>_W_dec``, ``sae<r>_b_enc``, ``sae<r>_b_dec``,
    ``sae<r>_scale`` per SAE (r = 0 for the one every number but the seed spread comes from;
    rows of ``W_dec`` are the unit feature directions), ``k``; ``segment_max`` (blocks, S, m)
    and ``block_max`` (blocks, m) largest activation per feature, ``block_sources``,
    ``threshold``; the labelings (``study_features`` and the ``study_lobes`` /
    ``study_geometry`` labels of those features, the same for ``library_``); the word pairs
    (``words``, ``pair_a`` and ``pair_b`` indices into them, ``relations``, ``word_activations``
    (words, d), ``word_features`` (words, m)).

    Returns:
        The file written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"k": np.int64(saes[0].k), "block_max": plot.block_max.astype(np.float32),
                              "block_sources": np.array(plot.block_sources),
                              "threshold": np.float64(plot.sweeps.get("threshold", math.nan))}
    for r, sae in enumerate(saes):
        for key in ("W_enc", "W_dec", "b_enc", "b_dec", "scale"):
            arrays[f"sae{r}_{key}"] = getattr(sae, key).detach().cpu().numpy()
    arrays.update({key: np.asarray(value) for key, value in plot.labels.items()})
    arrays["segment_max"] = np.asarray(arrays["segment_max"], dtype=np.float32)
    arrays.update({"words": np.array(list(words.index)),
                   "pair_a": np.array([words.index[p.a] for p in words.pairs]),
                   "pair_b": np.array([words.index[p.b] for p in words.pairs]),
                   "relations": np.array([p.relation for p in words.pairs]),
                   "word_activations": words.activations[layer], "word_features": words.features[layer]})
    path = directory / f"concepts_{_slug(model)}_{plot.name}.npz"
    np.savez_compressed(path, **arrays)
    return path


def has_concepts(results: Sequence[Any]) -> bool:
    """Whether any layer of any ``gsam_monitor.eval.protocols.ModelResult`` has ``concepts``."""
    return any(layer.get("concepts") for r in results for layer in r.layers)
