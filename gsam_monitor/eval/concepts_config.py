"""Settings of ``--analyses concepts`` and what one layer's run keeps for its plots and artefacts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gsam_monitor._validate import is_positive_int
from gsam_monitor.analysis.concepts import AFFINITIES, TopKSAE

__all__ = ["ConceptsConfig", "LayerConcepts"]


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
            exceeds this. ``None`` (the default): the threshold at which activations above it
            are as frequent per token and feature as in the study's SAE (41 of 16,384,
            ``STUDY_ACTIVATION_RATE``), found from the activations of the run itself.
        min_blocks: features firing in fewer blocks are left out of the library's lobes.
        n_lobes: number of lobes (and of geometry clusters) of both recipes.
        affinity: the library recipe's headline affinity (one of ``AFFINITIES``).
        n_null: shuffles in the AMI nulls.
        n_feature_null: random-direction draws in the balanced-accuracy null.
        n_seeds: clustering seeds of ``lobes.over_seeds``.
        sae_seeds: SAEs trained per layer, each with its own seed (``--sae-seeds``); the first
            gives every other number, all of them ``lobes.over_seeds.sae_seeds``.
        k_sweep: lobe counts of ``lobes.k_sweep``.
        thresholds: firing thresholds of ``threshold_sweep`` (the default threshold and
            sqrt(d / k) are added).
        fresh_blocks: blocks per source of text never seen in training
            (``sae.explained_variance_fresh``).
        lda_shrinkage: shrinkage of the distractor LDA.
        n_random: random-direction controls of the crystals' distractor removal.
        crystal_shuffles: label permutations of the supervised crystals' control.
        save_artifacts: a folder for the SAE weights, firing, lobe labels and word-pair vectors
            (``--save-artifacts``); ``None``: nothing is written.
        seed: seed of everything else (math generator, shuffles, SAE, clustering).
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
    n_feature_null: int = 5
    n_seeds: int = 5
    sae_seeds: int = 1
    k_sweep: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    thresholds: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    fresh_blocks: int = 16
    lda_shrinkage: float = 0.5
    n_random: int = 20
    crystal_shuffles: int = 20
    save_artifacts: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not is_positive_int(self.blocks_per_source):
            raise ValueError(f"--concept-blocks: expected a positive number of blocks, got {self.blocks_per_source!r}")
        if not is_positive_int(self.sae_seeds):
            raise ValueError(f"--sae-seeds: expected a positive number of SAEs per layer, got {self.sae_seeds!r}; "
                             f"e.g. --sae-seeds 3")
        if self.threshold is not None and not self.threshold >= 0:
            raise ValueError(f"--concept-threshold: expected a non-negative activation, got {self.threshold!r}; "
                             f"leave it out for the study-matched default")
        positive = {"block_size": self.block_size, "code_blocks_per_file": self.code_blocks_per_file,
                    "expansion": self.expansion, "k": self.k, "epochs": self.epochs, "batch_blocks": self.batch_blocks,
                    "sae_batch": self.sae_batch, "heldout_every": self.heldout_every, "min_blocks": self.min_blocks,
                    "n_seeds": self.n_seeds, "fresh_blocks": self.fresh_blocks}
        for name, value in positive.items():
            if not is_positive_int(value):
                raise ValueError(f"concepts {name}: expected a positive integer, got {value!r}")
        if self.heldout_every < 2:
            raise ValueError(f"concepts heldout_every: expected at least 2 (one block in n held out), got "
                             f"{self.heldout_every}")
        if not 2 <= self.n_lobes:
            raise ValueError(f"concepts n_lobes: expected at least 2 lobes, got {self.n_lobes}")
        if any(not is_positive_int(k) or k < 2 for k in self.k_sweep):
            raise ValueError(f"concepts k_sweep: expected lobe counts of at least 2, got {self.k_sweep!r}")
        if any(not t >= 0 for t in self.thresholds):
            raise ValueError(f"concepts thresholds: expected non-negative thresholds, got {self.thresholds!r}")
        for name, value in (("n_null", self.n_null), ("n_feature_null", self.n_feature_null),
                            ("crystal_shuffles", self.crystal_shuffles)):
            if not is_positive_int(value) or value < 2:
                raise ValueError(f"concepts {name}: expected at least 2 draws for a standard deviation, got {value!r}")
        if self.affinity not in AFFINITIES:
            raise ValueError(f"concepts affinity: expected one of {', '.join(AFFINITIES)}, got {self.affinity!r}")


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
        labels: named arrays for the artefacts: labelings such as ``study_lobes`` with
            ``study_features`` (the feature indices they label), and ``segment_max`` (blocks, 3,
            m), each feature's largest activation in each third of each block.
        sweeps: ``k_sweep`` and ``threshold_sweep`` as in the JSON, for the plots.
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
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    sweeps: dict[str, Any] = field(default_factory=dict)
