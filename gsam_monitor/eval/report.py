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
     "settings": {"batch_size", "max_length", "dtype", "analyses", ...},  # what --resume compares
     "parallel": {"world_size": int, "sentences_per_rank": [int, ...]},  # torchrun (eval.parallel)
     "versions": {"python", "torch", "transformers", "gsam_monitor", "numpy", "scipy"}}

``write_json`` writes it atomically; the CLI rewrites it after each model, and ``--resume``
reads it back (``read_for_resume``).

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

__all__ = ["build_results", "markdown_report", "read_for_resume", "run_settings", "versions", "write_json"]


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
    settings: dict[str, Any] | None = None,
    parallel: dict[str, Any] | None = None,
    previous: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The results document (see the module docstring for the schema).

    Args:
        protocol: ``token`` or ``paper``.
        corpus: the corpus the models ran on.
        results: one ``ModelResult`` per model.
        include_text: add the corpus sentences (off by default: results are shareable
            without redistributing the text).
        settings: the command's settings that shape the results (``run_settings``), which
            ``--resume`` compares.
        parallel: ``{"world_size", "sentences_per_rank"}`` of the run.
        previous: model entries of an earlier run (``--resume``), placed first.

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
    document: dict[str, Any] = {
        "protocol": protocol,
        "corpus": corpus_entry,
        "models": [*previous, *models],
    }
    if settings is not None:
        document["settings"] = settings
    if parallel is not None:
        document["parallel"] = parallel
    document["versions"] = versions()
    return finite_or_none(document)


def run_settings(args: Any, concepts: Any = None) -> dict[str, Any]:
    """The command-line settings that shape a result (not where or how fast it ran): what
    ``--resume`` requires to match. ``args`` is the parsed command line; ``concepts`` the
    ``ConceptsConfig`` when ``--analyses concepts`` runs."""
    import dataclasses

    from gsam_monitor._jsonable import plain

    keys = ("batch_size", "max_length", "dtype", "analyses", "with_log_n", "reservoir_size", "fit_criterion",
            "analysis_dims")
    out = {key: getattr(args, key, None) for key in keys}
    if concepts is not None:
        out["concepts"] = plain({k: v for k, v in dataclasses.asdict(concepts).items() if _jsonable(v)})
    return out


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, tuple, dict))


def read_for_resume(path: str | os.PathLike[str], protocol: str, corpus: Corpus,
                    settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The model entries of a results file that ``--resume`` keeps: none when the file does not
    exist yet.

    Raises:
        ValueError: naming ``--resume`` when the file is not a results document, or was written
            with another protocol, corpus or settings (its entries would not be comparable).
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        models = list(document["models"])
        written = (document["protocol"], document["corpus"]["sha256"], document.get("settings"))
        for model in models:
            model["model"]  # every entry names its model
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--resume: {path} is not a results file of python -m gsam_monitor.eval "
                         f"({type(err).__name__}: {err}); pass another --output") from None
    now = (protocol, corpus.sha256, json.loads(json.dumps(settings)))
    labels = ("--protocol", "the corpus (sha256)", "the settings")
    for label, old, new in zip(labels, written, now, strict=True):
        if old != new:
            both = isinstance(old, dict) and isinstance(new, dict)
            detail = _differences(old, new) if both else f"{old!r} then, {new!r} now"
            raise ValueError(f"--resume: {path} was written with other {label}: {detail}; rerun with the same "
                             f"flags, or pass another --output")
    return models


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k} {old.get(k)!r} then, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k))


def write_json(document: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the results document as strict JSON, atomically: a temporary file in the same
    folder renamed over ``path``, so that a reader (or a run stopped mid-write) sees the old
    document or the new one, never part of one. Returns the path."""
    path = Path(path)
    if path.parent != Path():
        path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
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
