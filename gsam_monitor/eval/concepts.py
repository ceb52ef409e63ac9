"""``--analyses concepts``: the "Geometry of Concepts" study's crystals, lobes and galaxy on a model we run.

For each selected layer (``--layers``; default the middle block) of each model:

1. **SAE** -- a ``gsam_monitor.analysis.concepts.TopKSAE`` trained on the layer's
   hidden states, streamed through the library's hooks (``LayerCapture``: the root
   pre-hook's attention mask, special tokens dropped as well) from a corpus of prose, code
   and math cut into 256-token blocks (``default_documents``); one
   block in ``heldout_every`` is held out. Quality on the held-out blocks: explained
   variance and L0; dead fraction: features that never fire on any block.
2. **Lobes** -- features fire in a block when their activation exceeds ``threshold`` on one
   of its tokens; features that fire in at least ``min_blocks`` blocks and not in all of
   them are clustered into ``n_lobes`` lobes by spectral clustering of each of the five
   co-occurrence affinities; the ``affinity`` one (phi, the study's choice) is the headline
   (``lobe_by_source``, the plot). Each lobe labeling is compared with k-means clusters of
   the same features' decoder directions (AMI against a shuffled null) and predicted from
   the directions by logistic regression.
3. **Crystals** -- the bundled word pairs, each word run alone through the model; difference
   vectors in activation space and in SAE feature space (the features active on any of the
   words), their parallelism before and after projecting out the LDA directions of word
   length and token count, and after projecting out as many random directions.
4. **Galaxy** -- the power law of the decoder point cloud's covariance spectrum, beside the
   power law of the layer's activation covariance on the same corpus.

Per layer, the JSON gets ``"concepts": {"sae": ..., "lobes": ..., "crystals": ...,
"powerlaw_alpha": ...}`` (see ``run_concepts``); the plots are the lobes on a 2-D
spectral embedding of the affinity (coloured by lobe and by the source each feature fires
most on), the crystals' pairs on their first two principal components before and after the
LDA projection, and the two eigen-spectra with their power-law fits.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from gsam_monitor import metrics
from gsam_monitor._jsonable import plain
from gsam_monitor._validate import is_positive_int
from gsam_monitor.analysis.concepts import (
    AFFINITIES,
    SOURCES,
    Block,
    BlockFiring,
    LayerCapture,
    SAEEvaluator,
    SAETrainer,
    TopKSAE,
    affinity,
    ami_with_null,
    build_blocks,
    code_documents,
    cooccurrence_counts,
    distractor_labels,
    geometry_clusters,
    lda_directions,
    load_word_pairs,
    lobe_by_source,
    lobe_from_geometry,
    math_documents,
    parallelogram_quality,
    point_cloud_powerlaw,
    point_cloud_spectrum,
    prose_documents,
    remove_directions,
    spectral_embedding_2d,
    spectral_lobes,
)
from gsam_monitor.analysis.spectrum import powerlaw_fit
from gsam_monitor.eval.corpus import load_corpus
from gsam_monitor.eval.models import LoadedModel
from gsam_monitor.metrics.scores import POWERLAW_RANGE
from gsam_monitor.stats import LayerStats

__all__ = [
    "CONCEPTS",
    "ConceptsConfig",
    "default_documents",
    "default_layers",
    "has_concepts",
    "parse_layers",
    "run_concepts",
]

logger = logging.getLogger(__name__)

#: The ``--analyses`` name of this analysis.
CONCEPTS = "concepts"


@dataclass(frozen=True)
class ConceptsConfig:
    """Settings of ``--analyses concepts`` (defaults: the run docs/guides/analyses.md reports).

    Attributes:
        layers: hidden-state indices (0 = embeddings, i = block i); ``None`` = the middle block.
        blocks_per_source: blocks of each source (prose, code, math).
        block_size: tokens per block, special tokens included (the study's 256; capped at the
            model's limit).
        code_blocks_per_file: at most this many blocks from one standard-library file.
        expansion: SAE features per activation dimension (n_features = expansion * d).
        k: active SAE features per token.
        epochs: passes of the model over the training blocks (each re-streams the activations).
        batch_blocks: blocks per forward pass.
        sae_batch: rows per SAE step.
        lr: Adam learning rate of the SAE.
        heldout_every: every n-th block (after a seeded shuffle) is held out of training.
        threshold: a feature fires in a block when its activation on one of the block's tokens
            exceeds this. The study's value is 1 on its SAE's scale; here activations are in
            units where a token's centred norm is about sqrt(d), so a token's k active values
            have a root mean square of about sqrt(d / k), and ``None`` (the default) takes that:
            sqrt(384 / 32) = 3.46 for MiniLM. At 1, half of all (feature, block) cells fire
            and the lobes mix the sources (see docs/guides/analyses.md).
        min_blocks: features firing in fewer blocks are left out of the lobes.
        n_lobes: number of lobes (and of geometry clusters).
        affinity: the headline affinity (one of ``AFFINITIES``).
        n_null: shuffles in the AMI null.
        lda_shrinkage: shrinkage of the distractor LDA.
        n_random: random-direction controls of the crystals.
        seed: seed of everything (math generator, shuffles, SAE, clustering).
    """

    layers: tuple[int, ...] | None = None
    blocks_per_source: int = 128
    block_size: int = 256
    code_blocks_per_file: int = 2
    expansion: int = 8
    k: int = 32
    epochs: int = 3
    batch_blocks: int = 8
    sae_batch: int = 1024
    lr: float = 1e-3
    heldout_every: int = 10
    threshold: float | None = None
    min_blocks: int = 3
    n_lobes: int = 3
    affinity: str = "phi"
    n_null: int = 200
    lda_shrinkage: float = 0.5
    n_random: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if not is_positive_int(self.blocks_per_source):
            raise ValueError(f"--concept-blocks: expected a positive number of blocks, got {self.blocks_per_source!r}")
        positive = {"block_size": self.block_size, "code_blocks_per_file": self.code_blocks_per_file,
                    "expansion": self.expansion, "k": self.k, "epochs": self.epochs, "batch_blocks": self.batch_blocks,
                    "sae_batch": self.sae_batch, "heldout_every": self.heldout_every, "min_blocks": self.min_blocks}
        for name, value in positive.items():
            if not is_positive_int(value):
                raise ValueError(f"concepts {name}: expected a positive integer, got {value!r}")
        if self.heldout_every < 2:
            raise ValueError(f"concepts heldout_every: expected at least 2 (one block in n held out), got "
                             f"{self.heldout_every}")
        if not 2 <= self.n_lobes:
            raise ValueError(f"concepts n_lobes: expected at least 2 lobes, got {self.n_lobes}")
        if self.affinity not in AFFINITIES:
            raise ValueError(f"concepts affinity: expected one of {', '.join(AFFINITIES)}, got {self.affinity!r}")


def default_documents(seed: int = 0) -> dict[str, Iterable[Any]]:
    """The three sources: the first 2,500 SST-2 train sentences of at least 10 words (the
    bundled ``sst2_train`` corpus), the interpreter's standard library, seeded math."""
    return {"prose": prose_documents(load_corpus("sst2_train").sentences, name="sst2_train"),
            "code": code_documents(), "math": math_documents(seed)}


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


@dataclass
class LayerConcepts:
    """What one layer's analysis keeps beside the JSON: plot data, the trained SAE, the firing.

    Attributes:
        name: the layer's module name.
        embedding: (m', 2) spectral embedding of the clustered features.
        lobes: (m',) their lobe labels.
        dominant_source: per clustered feature, the source whose blocks it fires in most often.
        crystals: word vectors before and after the LDA projection, pair indices, relations.
        feature_spectrum: eigenvalues of the decoder point cloud, descending.
        activation_spectrum: eigenvalues of the activation covariance on the concept corpus.
        sae: the trained ``gsam_monitor.analysis.concepts.TopKSAE``.
        block_max: (blocks, m) largest activation of each feature in each block.
        block_sources: source of each block.
    """

    name: str
    embedding: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    lobes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    dominant_source: list[str] = field(default_factory=list)
    crystals: dict[str, Any] = field(default_factory=dict)
    feature_spectrum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    activation_spectrum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sae: TopKSAE | None = None
    block_max: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    block_sources: list[str] = field(default_factory=list)


def run_concepts(
    loaded: LoadedModel,
    config: ConceptsConfig | None = None,
    *,
    progress: bool = False,
    documents: dict[str, Iterable[Any]] | None = None,
) -> tuple[dict[int, dict[str, Any]], dict[int, LayerConcepts]]:
    """Train an SAE per selected layer on streamed activations and measure lobes, crystals, galaxy.

    Args:
        loaded: the model.
        config: settings (default ``ConceptsConfig``).
        progress: tqdm bars on stderr.
        documents: source -> documents, replacing the default corpus (tests use small ones).

    Returns:
        ``(results, plots)``: per hidden-state index, ``{"concepts": {...}}`` for the layer's
        JSON entry, and the ``LayerConcepts`` the plots need. ``concepts`` holds
        ``sae`` (``n_features``, ``k``, ``l0``, ``explained_variance``, ``dead_fraction``,
        ``train_rows``, ``heldout_rows``), ``lobes`` (``k``, ``affinity``, ``ami``,
        ``ami_null_mean``, ``ami_null_sd``, ``ami_z``, ``logreg_accuracy``, ``chance``,
        ``lobe_by_source``, ``n_features``, ``threshold``, ``firing_density``, ``by_affinity``),
        ``crystals`` and ``powerlaw_alpha`` (``features`` and ``activations``, each alpha with
        its 95% CI).

    Raises:
        ValueError: a bad layer index, or a source with too few blocks.
    """
    config = config or ConceptsConfig()
    layers = _resolve_layers(config, loaded)
    if config.threshold is None:
        config = replace(config, threshold=math.sqrt(loaded.hidden_size / config.k))
    block_size = config.block_size
    if loaded.max_length is not None and block_size > loaded.max_length:
        warnings.warn(f"concepts: {loaded.name} takes at most {loaded.max_length} tokens; blocks of "
                      f"{loaded.max_length} tokens are used instead of {block_size}", stacklevel=2)
        block_size = loaded.max_length
    sources = documents if documents is not None else default_documents(config.seed)
    blocks = build_blocks(loaded.tokenizer, sources, config.blocks_per_source, block_size=block_size,
                          blocks_per_document={"code": config.code_blocks_per_file})
    random.Random(config.seed).shuffle(blocks)
    started = time.perf_counter()
    heldout = blocks[:: config.heldout_every]
    train = [b for i, b in enumerate(blocks) if i % config.heldout_every]
    d = loaded.hidden_size
    saes = {layer: TopKSAE(d, config.expansion * d, config.k, seed=config.seed + layer).to(loaded.device)
            for layer in layers}
    trainers = {layer: SAETrainer(sae, lr=config.lr, batch_size=config.sae_batch,
                                  buffer_rows=max(16 * config.sae_batch, 16_384), seed=config.seed)
                for layer, sae in saes.items()}
    n_batches = math.ceil(len(train) / config.batch_blocks)
    with LayerCapture(loaded.model, layers) as capture, torch.no_grad():
        epochs = range(config.epochs)
        for epoch in epochs:
            order = list(train)
            random.Random(config.seed + 1 + epoch).shuffle(order)
            for _, ids, special in _progress(_batches(order, config.batch_blocks, loaded.device), total=n_batches,
                                             desc=f"{loaded.name} SAE epoch {epoch + 1}/{config.epochs}",
                                             enabled=progress):
                hidden, keep = capture(ids, special=special)
                with torch.enable_grad():
                    for layer, trainer in trainers.items():
                        trainer.feed(hidden[layer][keep].float())
        with torch.enable_grad():
            for trainer in trainers.values():
                trainer.flush()
        logger.info("concepts: SAE training %.1f s (%d blocks, %d epochs)", time.perf_counter() - started,
                    len(train), config.epochs)
        started = time.perf_counter()
        analysis = _analysis_pass(loaded, capture, saes, blocks, heldout, config, progress)
        words = _word_vectors(loaded, capture, saes)
        logger.info("concepts: firing pass %.1f s (%d blocks)", time.perf_counter() - started, len(blocks))
    results: dict[int, dict[str, Any]] = {}
    plots: dict[int, LayerConcepts] = {}
    for layer in layers:
        started = time.perf_counter()
        # The protocol's names: hidden_states[i] is "layer_i" (the output of block i).
        name = "embeddings" if layer == 0 else f"layer_{layer}"
        entry, plot = _layer_results(layer, name, saes[layer], trainers[layer], analysis[layer], words, config)
        results[layer] = {"concepts": plain(entry)}
        logger.info("concepts: layer %d analyses %.1f s", layer, time.perf_counter() - started)
        plots[layer] = plot
    return results, plots


@dataclass
class _LayerPass:
    firing: BlockFiring
    heldout: SAEEvaluator
    fired: torch.Tensor  # (m,) tokens of every block on which each feature is non-zero
    stats: LayerStats


def _analysis_pass(loaded: LoadedModel, capture: LayerCapture, saes: dict[int, TopKSAE], blocks: Sequence[Block],
                   heldout: Sequence[Block], config: ConceptsConfig, progress: bool) -> dict[int, _LayerPass]:
    """One more pass over every block: firing per block, held-out quality, activation moments."""
    held = {id(b) for b in heldout}
    threshold = float(config.threshold) if config.threshold is not None else math.nan
    passes = {layer: _LayerPass(BlockFiring(sae.n_features, threshold), SAEEvaluator(sae),
                                torch.zeros(sae.n_features, dtype=torch.int64),
                                LayerStats(loaded.hidden_size, device=loaded.device, higher_moments=False))
              for layer, sae in saes.items()}
    n_batches = math.ceil(len(blocks) / config.batch_blocks)
    for chunk, ids, special in _progress(_batches(blocks, config.batch_blocks, loaded.device), total=n_batches,
                                         desc=f"{loaded.name} firing", enabled=progress):
        hidden, keep = capture(ids, special=special)
        block = torch.arange(len(chunk), device=keep.device)[:, None].expand_as(keep)[keep]  # (N,)
        held_rows = torch.tensor([id(b) in held for b in chunk], device=keep.device)[block]
        for layer, sae in saes.items():
            h = hidden[layer].float()
            rows = h[keep]  # (N, d)
            state = passes[layer]
            state.stats.update(rows)
            values, indices = sae.encode_topk(rows)
            codes = torch.zeros(rows.shape[0], sae.n_features, dtype=values.dtype,
                                device=values.device).scatter_(-1, indices, values)
            state.firing.update_rows(codes, block, [b.source for b in chunk])
            state.fired += (codes > 0).sum(dim=0).cpu()
            state.heldout.update(rows[held_rows], (values[held_rows], indices[held_rows]))
    return passes


@dataclass
class _Words:
    pairs: list[Any]
    index: dict[str, int]
    tokens: np.ndarray
    activations: dict[int, np.ndarray]
    features: dict[int, np.ndarray]


def _word_vectors(loaded: LoadedModel, capture: LayerCapture, saes: dict[int, TopKSAE]) -> _Words:
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
    return _Words(pairs, {w: i for i, w in enumerate(words)}, keep.sum(1).cpu().numpy(), acts, feats)


def _layer_results(layer: int, name: str, sae: TopKSAE, trainer: SAETrainer, state: _LayerPass, words: _Words,
                   config: ConceptsConfig) -> tuple[dict[str, Any], LayerConcepts]:
    held = state.heldout.result()
    sae_entry = {
        "n_features": sae.n_features,
        "k": sae.k,
        "l0": held.l0,
        "explained_variance": held.explained_variance,
        "dead_fraction": float((state.fired == 0).double().mean()),
        "train_rows": trainer.rows_seen,
        "heldout_rows": held.n_rows,
    }
    plot = LayerConcepts(name=name, sae=sae, block_max=state.firing.block_max(),
                         block_sources=list(state.firing.sources))
    directions = sae.W_dec.detach().double().cpu().numpy()
    lobes_entry = _lobes(state.firing, directions, config, plot)
    crystals_entry = _crystals(words, layer, config, plot)
    features_alpha = point_cloud_powerlaw(directions, POWERLAW_RANGE)
    plot.feature_spectrum = point_cloud_spectrum(directions)
    values = metrics.compute(state.stats, names=["powerlaw_alpha", "rank"], with_spectrum=True)
    evals = values.spectrum
    rank = int(values.get("rank", 0))
    spectrum = evals.numpy()[:rank] if evals is not None else np.zeros(0)
    plot.activation_spectrum = spectrum
    entry = {
        "sae": sae_entry,
        "lobes": lobes_entry,
        "crystals": crystals_entry,
        "powerlaw_alpha": {
            "features": features_alpha,
            "activations": powerlaw_fit(spectrum, POWERLAW_RANGE) if spectrum.size else None,
        },
    }
    return entry, plot


def _lobes(firing: BlockFiring, directions: np.ndarray, config: ConceptsConfig, plot: LayerConcepts) -> dict[str, Any]:
    matrix = firing.matrix()
    counts = cooccurrence_counts(matrix)
    usable = (counts.fires >= config.min_blocks) & (counts.fires < counts.n)
    idx = np.flatnonzero(usable)
    entry: dict[str, Any] = {
        "k": config.n_lobes,
        "affinity": config.affinity,
        "threshold": config.threshold,
        "n_blocks": counts.n,
        "n_features": int(idx.size),
        "firing_density": float(matrix.mean()) if matrix.size else math.nan,
        # Filled below unless too few features fire to form lobes.
        "ami": math.nan, "ami_null_mean": math.nan, "ami_null_sd": math.nan, "ami_z": math.nan,
        "logreg_accuracy": math.nan, "chance": math.nan, "lobe_by_source": {}, "by_affinity": {},
    }
    if idx.size < max(2 * config.n_lobes, 10):
        warnings.warn(f"concepts: only {idx.size} features fire in at least {config.min_blocks} blocks (and not in "
                      f"all); the lobes are skipped", stacklevel=3)
        return entry
    geometry = geometry_clusters(directions[idx], config.n_lobes, seed=config.seed)
    sub = type(counts)(n=counts.n, fires=counts.fires[idx], both=counts.both[np.ix_(idx, idx)])
    by_affinity: dict[str, dict[str, Any]] = {}
    headline_lobes = None
    for name in AFFINITIES:
        a = affinity(sub, name)
        lobes = spectral_lobes(a, config.n_lobes, seed=config.seed)
        ami = ami_with_null(lobes, geometry, n_null=config.n_null, seed=config.seed)
        by_affinity[name] = {"ami": ami["ami"], "ami_null_mean": ami["null_mean"], "ami_null_sd": ami["null_sd"],
                             "ami_z": ami["z"], "lobe_sizes": np.bincount(lobes, minlength=config.n_lobes).tolist()}
        if name == config.affinity:
            headline_lobes = lobes
            plot.embedding = spectral_embedding_2d(a, seed=config.seed)
    assert headline_lobes is not None
    block_sources = firing.sources
    entry.update({key: by_affinity[config.affinity][key] for key in ("ami", "ami_null_mean", "ami_null_sd", "ami_z")})
    try:  # logistic regression for the headline lobes only: it is the slow step
        logreg = lobe_from_geometry(directions[idx], headline_lobes, seed=config.seed)
    except ValueError as err:  # a lobe smaller than the folds
        logger.info("logistic regression skipped: %s", err)
        logreg = {"accuracy": math.nan, "chance": math.nan}
    entry["logreg_accuracy"], entry["chance"] = logreg["accuracy"], logreg["chance"]
    entry["lobe_by_source"] = lobe_by_source(matrix[:, idx], block_sources, headline_lobes, SOURCES)
    entry["by_affinity"] = by_affinity
    plot.lobes = headline_lobes
    src = np.asarray(block_sources)
    rates = np.stack([matrix[src == s][:, idx].mean(axis=0) for s in SOURCES])  # (sources, m')
    plot.dominant_source = [SOURCES[i] for i in rates.argmax(axis=0)]
    return entry


def _crystals(words: _Words, layer: int, config: ConceptsConfig, plot: LayerConcepts) -> dict[str, Any]:
    pairs = words.pairs
    ia = np.array([words.index[p.a] for p in pairs])
    ib = np.array([words.index[p.b] for p in pairs])
    relations = [p.relation for p in pairs]
    vocabulary = list(words.index)
    labels = distractor_labels(vocabulary, words.tokens.tolist())
    entry: dict[str, Any] = {
        "n_pairs": len(pairs),
        "relations": {r: relations.count(r) for r in dict.fromkeys(relations)},
        "distractors": list(labels),
        "lda_shrinkage": config.lda_shrinkage,
    }
    rng = np.random.default_rng(config.seed)
    for space, vectors in (("activations", words.activations[layer]), ("features", words.features[layer])):
        if space == "features":
            active = np.flatnonzero(np.abs(vectors).sum(axis=0) > 0)
            vectors = vectors[:, active]
        directions, fisher = [], {}
        for distractor, classes in labels.items():
            if np.unique(classes).size < 2:  # e.g. every word is one token for this tokenizer
                continue
            per_class = []
            for c in np.unique(classes):
                stats = LayerStats(vectors.shape[1], higher_moments=False)
                stats.update(torch.from_numpy(vectors[classes == c]))
                per_class.append(stats)
            found, evals = lda_directions(per_class, config.lda_shrinkage)
            directions.append(found)
            fisher[distractor] = float(evals[0])
        removed = np.concatenate(directions, axis=1) if directions else np.zeros((vectors.shape[1], 0))
        after = remove_directions(vectors, removed)
        random_within = []
        for _ in range(config.n_random):
            control = remove_directions(vectors, rng.standard_normal((vectors.shape[1], removed.shape[1])))
            random_within.append(parallelogram_quality(control[ia], control[ib], relations)["within"])
        entry[space] = {
            "dim": int(vectors.shape[1]),
            "removed_directions": int(removed.shape[1]),
            "distractor_fisher": fisher,
            "before": parallelogram_quality(vectors[ia], vectors[ib], relations),
            "after_lda": parallelogram_quality(after[ia], after[ib], relations),
            "after_random_within": float(np.mean(random_within)),
        }
        if space == "activations":
            plot.crystals = {"before": vectors, "after": after, "a": ia, "b": ib, "relations": relations,
                             "words": vocabulary}
    return entry


def has_concepts(results: Sequence[Any]) -> bool:
    """Whether any layer of any ``gsam_monitor.eval.protocols.ModelResult`` has ``concepts``."""
    return any(layer.get("concepts") for r in results for layer in r.layers)
