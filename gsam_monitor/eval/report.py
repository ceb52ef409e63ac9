"""Reporting for the GSAM benchmark: the results JSON and the Markdown report.

The JSON schema (strict JSON: non-finite numbers are written as ``null``)::

    {"protocol": str,
     "corpus": {"name": str, "n_sentences": int, "sha256": str},   # + "sentences" on request
     "models": [{"model": str, "d": int, "score": float,
                 "dtype": str, "max_length": int | null, "n_truncated": int,
                 "layers": [{"index": int, "name": str, "n": int, "d": int, "rank": int,
                             "gsam": float, "gsam_correlation": float, "gsam_oas": float,
                             "effective_rank": float, "powerlaw_alpha": float,
                             "anisotropy": float, "mean_kurtosis": float,
                             "mardia_kurtosis": float, ...,
                             "analyses": {...},      # only with --analyses (eval.analyses)
                             "concepts": {...}}]}],  # only with --analyses concepts (eval.concepts)
     "versions": {"python", "torch", "transformers", "gsam_monitor", "numpy", "scipy"}}

The tables are ``gsam_monitor.eval.tables``' and the plots ``gsam_monitor.eval.plots``'; the
Markdown report embeds both.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gsam_monitor._jsonable import finite_or_none
from gsam_monitor.eval.corpus import Corpus
from gsam_monitor.eval.protocols import ModelResult
from gsam_monitor.eval.tables import format_table

__all__ = ["build_results", "markdown_report", "versions", "write_json"]


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries a result depends on."""
    import scipy
    import torch

    import gsam_monitor

    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = "not installed"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers_version,
        "gsam_monitor": getattr(gsam_monitor, "__version__", "unknown"),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def build_results(
    protocol: str,
    corpus: Corpus,
    results: Sequence[ModelResult],
    *,
    include_text: bool = False,
) -> dict[str, Any]:
    """The results document (see the module docstring for the schema).

    Args:
        protocol: ``token`` or ``paper``.
        corpus: the corpus the models ran on.
        results: one ``ModelResult`` per model.
        include_text: add the corpus sentences (off by default: results are shareable
            without redistributing the text).

    Returns:
        A JSON-ready dict; non-finite numbers become ``None``.
    """
    corpus_entry: dict[str, Any] = {
        "name": corpus.name,
        "n_sentences": len(corpus),
        "sha256": corpus.sha256,
    }
    if include_text:
        corpus_entry["sentences"] = list(corpus.sentences)
    models = [
        {
            "model": r.model,
            "d": r.d,
            "score": r.score,
            "dtype": r.dtype,
            "max_length": r.max_length,
            "n_truncated": r.n_truncated,
            "layers": [dict(layer) for layer in r.layers],
        }
        for r in results
    ]
    document = {
        "protocol": protocol,
        "corpus": corpus_entry,
        "models": models,
        "versions": versions(),
    }
    return finite_or_none(document)


def write_json(document: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the results document as strict JSON; returns the path."""
    path = Path(path)
    if path.parent != Path():
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def markdown_report(
    protocol: str,
    corpus: Corpus,
    results: Sequence[ModelResult],
    path: str | os.PathLike[str],
    plots: Sequence[Path] = (),
) -> Path:
    """Write a Markdown report: settings, versions, the tables and the plots.

    Args:
        protocol: ``token`` or ``paper``.
        corpus: the corpus.
        results: one ``ModelResult`` per model.
        path: the ``.md`` file to write.
        plots: PNG files to embed (linked relative to the report).

    Returns:
        The written path.
    """
    path = Path(path)
    if path.parent != Path():
        path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# GSAM benchmark: {protocol} protocol",
        "",
        f"- corpus: `{corpus.name}`, {len(corpus)} sentences, sha256 `{corpus.sha256}`",
        "- models: " + ", ".join(f"`{r.model}` (d={r.d}, {r.dtype}, {r.device})"
                                 for r in results),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        "",
        "## Results",
        "",
        format_table(protocol, corpus, results, markdown=True),
        "",
    ]
    if plots:
        lines += ["## Plots", ""]
        for plot in plots:
            rel = os.path.relpath(Path(plot).resolve(), path.resolve().parent)
            lines += [f"![{Path(plot).stem}]({Path(rel).as_posix()})", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
