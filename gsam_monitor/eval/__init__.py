"""The GSAM benchmark: ``python -m gsam_monitor.eval``.

Runs language models over a fixed corpus and reports the geometry of their hidden states,
with the same ``LayerStats`` and ``metrics.compute`` as the training-time monitor (one code
path). Two protocols: ``token`` (default; every layer's token-level hidden states, all
metrics) and ``paper`` (the original benchmark code's exact recipe, kept for comparison).

Modules: ``corpus`` (bundled SST-2 files and user files), ``models`` (``minilm``,
``tiny:<arch>``, local folders and hub ids), ``placement`` (``--device-map``), ``protocols``
(the two recipes), ``paper`` (the pure ``paper_score``), ``parallel`` (``torchrun``: shards and
exact sums over the ranks), ``analyses`` (``--analyses``: distributions, spectrum, classes) and
``concepts`` (``--analyses concepts``), ``tables`` (text and Markdown), ``plots`` (PNG),
``report`` (JSON and Markdown), ``__main__`` (the CLI).
"""

from gsam_monitor.eval.corpus import BUNDLED_CORPORA, Corpus, load_corpus
from gsam_monitor.eval.models import LoadedModel, load_model
from gsam_monitor.eval.protocols import (
    LayerObserver,
    ModelResult,
    paper_score,
    run_paper_protocol,
    run_token_protocol,
)

__all__ = [
    "BUNDLED_CORPORA",
    "Corpus",
    "LayerObserver",
    "LoadedModel",
    "ModelResult",
    "load_corpus",
    "load_model",
    "paper_score",
    "run_paper_protocol",
    "run_token_protocol",
]
