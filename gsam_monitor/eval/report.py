"""Reporting for the GSAM benchmark: results JSON, the stdout table, plots and a Markdown report.

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

Plots use matplotlib's Agg backend (no display needed), imported only when plots are asked for.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gsam_monitor.eval.analyses import format_analyses_table, has_analyses, write_analysis_plots
from gsam_monitor.eval.concepts import format_concepts_table, has_concepts, write_concepts_plots
from gsam_monitor.eval.corpus import Corpus
from gsam_monitor.eval.protocols import ModelResult

__all__ = [
    "PLOT_METRICS",
    "build_results",
    "format_table",
    "markdown_report",
    "versions",
    "write_json",
    "write_plots",
]

#: Metrics drawn per layer by :func:`write_plots`, in order.
PLOT_METRICS: tuple[str, ...] = (
    "gsam",
    "gsam_correlation",
    "gsam_oas",
    "rank",
    "effective_rank",
    "participation_ratio",
    "powerlaw_alpha",
    "condition_number",
    "anisotropy",
    "outlier_dims",
    "mean_kurtosis",
    "mardia_kurtosis",
)

# Columns of the text and Markdown tables: (result key, header, format).
_TOKEN_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("index", "layer", "d"),
    ("name", "name", "s"),
    ("n", "n", "d"),
    ("rank", "rank", "d"),
    ("gsam", "gsam", ".2f"),
    ("gsam_correlation", "gsam_corr", ".2f"),
    ("gsam_oas", "gsam_oas", ".2f"),
    ("effective_rank", "eff_rank", ".1f"),
    ("powerlaw_alpha", "alpha", ".3f"),
    ("anisotropy", "aniso", ".3f"),
    ("mean_kurtosis", "kurt", ".2f"),
    ("mardia_kurtosis", "mardia", ".2f"),
)
_PAPER_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("paper_score", "paper_score", ".2f"),
    ("paper_retries", "retries", "d"),
    ("paper_ridge", "ridge", ".0e"),
    ("n", "n", "d"),
    ("rank", "rank", "d"),
    ("gsam", "gsam", ".2f"),
    ("gsam_correlation", "gsam_corr", ".2f"),
    ("effective_rank", "eff_rank", ".1f"),
    ("anisotropy", "aniso", ".3f"),
    ("mean_kurtosis", "kurt", ".2f"),
)


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


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


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
        results: one :class:`ModelResult` per model.
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
    return _finite_or_none(document)


def write_json(document: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the results document as strict JSON; returns the path."""
    path = Path(path)
    if path.parent != Path():
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "nan"
    if fmt == "s":
        return str(value)
    if fmt == "d":
        return str(int(value))
    return format(float(value), fmt)


def _grid(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), *(fmt.format(*row) for row in rows)])


def _model_header(protocol: str, r: ModelResult) -> str:
    what = "last layer's gsam" if protocol == "token" else "paper score"
    extra = f", {r.n_truncated} truncated at {r.max_length} tokens" if r.n_truncated else ""
    return (f"model {r.model} (d={r.d}, {r.dtype}, {r.device}{extra}): "
            f"score ({what}) = {_cell(r.score, '.2f')}")


def _corpus_line(protocol: str, corpus: Corpus) -> str:
    return (f"protocol {protocol}, corpus {corpus.name} ({len(corpus)} sentences, "
            f"sha256 {corpus.sha256[:12]}…)")


def format_table(
    protocol: str, corpus: Corpus, results: Sequence[ModelResult], *, markdown: bool = False
) -> str:
    """The results as text tables: per layer for ``token``, one row per model for ``paper``.

    Args:
        protocol: ``token`` or ``paper``.
        corpus: the corpus.
        results: one :class:`ModelResult` per model.
        markdown: Markdown tables instead of aligned text.

    Returns:
        The tables, ready to print.
    """
    # The Markdown report states the corpus in its header already.
    blocks = [] if markdown else [_corpus_line(protocol, corpus)]
    if protocol == "paper":
        header = ["model", "d"] + [h for _, h, _ in _PAPER_COLUMNS]
        rows = [[r.model, str(r.d)] + [_cell(r.layers[0].get(k), f) for k, _, f in _PAPER_COLUMNS]
                for r in results]
        blocks.append(_grid(header, rows, markdown))
        return "\n\n".join(blocks) + "\n"
    for r in results:
        header = [h for _, h, _ in _TOKEN_COLUMNS]
        rows = [[_cell(layer.get(k), f) for k, _, f in _TOKEN_COLUMNS] for layer in r.layers]
        blocks.append(_model_header(protocol, r) + "\n" + ("\n" if markdown else "")
                      + _grid(header, rows, markdown))
    analyses_table = format_analyses_table(results, markdown=markdown)
    if analyses_table:
        blocks.append(analyses_table)
    concepts_table = format_concepts_table(results, markdown=markdown)
    if concepts_table:
        blocks.append(concepts_table)
    return "\n\n".join(blocks) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def write_plots(
    protocol: str, results: Sequence[ModelResult], directory: str | os.PathLike[str]
) -> list[Path]:
    """PNG plots: each metric per layer for every model, and eigen-spectra on log-log axes.

    For ``token`` each metric is one figure with a curve per model (x = layer index, or the
    relative depth when the models' depths differ); for ``paper`` a bar per model.

    Args:
        protocol: ``token`` or ``paper``.
        results: one :class:`ModelResult` per model.
        directory: created if missing.

    Returns:
        The written files, metric plots first, then one spectrum plot per model.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    depths = {len(r.layers) for r in results}
    relative = len(depths) > 1
    for metric in PLOT_METRICS:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        if protocol == "paper":
            values = [_as_float(r.layers[0].get(metric)) for r in results]
            ax.bar(range(len(results)), values, color="tab:blue")
            ax.set_xticks(range(len(results)), [r.model for r in results], rotation=20,
                          ha="right")
        else:
            for r in results:
                x = np.array([layer["index"] for layer in r.layers], dtype=float)
                if relative:
                    x = x / max(x.max(), 1.0)
                y = [_as_float(layer.get(metric)) for layer in r.layers]
                ax.plot(x, y, marker="o", label=r.model)
            ax.set_xlabel("relative depth" if relative else "layer (0 = embeddings)")
            ax.legend(fontsize="small")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} ({protocol} protocol)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"metric_{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    for r in results:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        cmap = plt.get_cmap("viridis")
        for i, (layer, spectrum) in enumerate(zip(r.layers, r.spectra, strict=True)):
            lam = np.asarray(spectrum, dtype=float)
            lam = lam[lam > 0]
            if lam.size == 0:
                continue
            color = cmap(i / max(len(r.layers) - 1, 1))
            ax.loglog(np.arange(1, lam.size + 1), lam, color=color, label=layer["name"])
        ax.set_xlabel("rank k")
        ax.set_ylabel("eigenvalue λ_k of the covariance")
        ax.set_title(f"eigen-spectra: {r.model}")
        ax.grid(alpha=0.3, which="both")
        if len(r.layers) <= 16:
            ax.legend(fontsize="x-small", ncol=2)
        fig.tight_layout()
        path = out / f"spectrum_{_slug(r.model)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if has_analyses(results):
        written += write_analysis_plots(results, out)
    if has_concepts(results):
        written += write_concepts_plots(results, out)
    return written


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


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
        results: one :class:`ModelResult` per model.
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
