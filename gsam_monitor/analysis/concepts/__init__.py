"""Concept geometry on a sparse autoencoder: the "Geometry of Concepts" study's three scales.

Li, Michaud, Baek, Engels, Sun and Tegmark, "The Geometry of Concepts: Sparse Autoencoder
Feature Structure", Entropy 27(4), 344 (2025), arXiv:2410.19750: on a sparse autoencoder's
features, "crystals" (parallelograms such as man:woman::king:queen, sharper once LDA
projects out distractors such as word length), functional "lobes" (features that co-occur in
256-token blocks also cluster in space; math and code apart from prose) and a "galaxy"
(a power law of the feature point cloud's eigenvalues).

- ``sources``: a corpus with sources (review prose, standard-library code, seeded
  math), cut into 256-token blocks;
- ``stream``: hidden states of chosen layers through the library's hooks;
- ``sae``: a TopK SAE trained on streamed rows, and its held-out quality;
- ``cooccurrence``: firing per block, pair counts, the five affinities;
- ``lobes``: spectral lobes, geometry clusters, AMI against a shuffled null, logistic
  regression, lobe x source (the library's recipe);
- ``study``: the study's own recipe (phi + 1, spectral clustering of the angular similarity,
  balanced accuracy against random directions), blocks that mix the sources, the firing
  threshold matched to the study's activation rate;
- ``crystals``: word-pair difference vectors, LDA from moments, distractor removal, and the
  study's supervised LDA scored by silhouette (``supervised_crystals``);
- ``galaxy``: the point cloud's eigenvalue power law.

``python -m gsam_monitor.eval --analyses concepts`` runs all of it
(``gsam_monitor.eval.concepts``). Clustering, AMI and logistic regression need
scikit-learn (the ``eval`` extra).
"""

from .cooccurrence import AFFINITIES, BlockFiring, CooccurrenceCounts, affinity, cooccurrence_counts
from .crystals import (
    LENGTH_BINS,
    WordPair,
    distractor_labels,
    lda_directions,
    load_word_pairs,
    parallelogram_quality,
    remove_directions,
    supervised_crystals,
)
from .galaxy import point_cloud_powerlaw, point_cloud_spectrum
from .lobes import (
    ami_with_null,
    geometry_clusters,
    lobe_by_source,
    lobe_from_geometry,
    spectral_embedding_2d,
    spectral_lobes,
)
from .sae import SAEEvaluator, SAEQuality, SAETrainer, TopKSAE, evaluate_sae, pca_explained_variance
from .sources import (
    BLOCK_SIZE,
    SOURCES,
    Block,
    Document,
    build_blocks,
    code_documents,
    math_documents,
    prose_documents,
)
from .stream import LayerCapture, hidden_layer_names
from .study import (
    STUDY_ACTIVATION_RATE,
    STUDY_SEED,
    ActivationHistogram,
    angular_similarity,
    balanced_accuracy_with_null,
    mixed_source_blocks,
    shifted_phi,
    spectral_clusters,
    threshold_for_rate,
)

__all__ = [
    "AFFINITIES",
    "BLOCK_SIZE",
    "LENGTH_BINS",
    "SOURCES",
    "STUDY_ACTIVATION_RATE",
    "STUDY_SEED",
    "ActivationHistogram",
    "Block",
    "BlockFiring",
    "CooccurrenceCounts",
    "Document",
    "LayerCapture",
    "SAEEvaluator",
    "SAEQuality",
    "SAETrainer",
    "TopKSAE",
    "WordPair",
    "affinity",
    "ami_with_null",
    "angular_similarity",
    "balanced_accuracy_with_null",
    "build_blocks",
    "code_documents",
    "cooccurrence_counts",
    "distractor_labels",
    "evaluate_sae",
    "geometry_clusters",
    "hidden_layer_names",
    "lda_directions",
    "load_word_pairs",
    "lobe_by_source",
    "lobe_from_geometry",
    "math_documents",
    "mixed_source_blocks",
    "parallelogram_quality",
    "pca_explained_variance",
    "point_cloud_powerlaw",
    "point_cloud_spectrum",
    "prose_documents",
    "remove_directions",
    "shifted_phi",
    "spectral_clusters",
    "spectral_embedding_2d",
    "spectral_lobes",
    "supervised_crystals",
    "threshold_for_rate",
]
