"""The benchmark's PNG plots: metrics per layer, eigen-spectra, and the analyses' figures.

matplotlib's Agg backend (no display needed), imported only when plots are asked for. Each
metric is one figure with a curve per model (x = layer index, or the relative depth when the
models' depths differ); the ``paper`` protocol draws a bar per model.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gsam_monitor.analysis import plot_distribution, powerlaw_fit
from gsam_monitor.analysis.concepts import parallelogram_quality
from gsam_monitor.eval.analyses import has_analyses
from gsam_monitor.eval.concepts import LayerConcepts, has_concepts
from gsam_monitor.eval.protocols import ModelResult
from gsam_monitor.eval.tables import analysis_value
from gsam_monitor.metrics.scores import POWERLAW_RANGE

__all__ = ["PLOT_METRICS", "slug", "write_analysis_plots", "write_concepts_plots", "write_plots"]

#: Metrics drawn per layer by :func:`write_plots`, in order.
PLOT_METRICS: tuple[str, ...] = (
    "gsam", "gsam_correlation", "gsam_oas", "rank", "effective_rank", "participation_ratio", "powerlaw_alpha",
    "condition_number", "anisotropy", "outlier_dims", "mean_kurtosis", "mardia_kurtosis",
)

_SIZE = (6.4, 4.0)


def slug(text: str) -> str:
    """``text`` as a file-name part: runs of anything but letters, digits, ``._-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _depth(results: Sequence[ModelResult]) -> tuple[bool, str]:
    """Whether layers go on a relative-depth axis (the models' depths differ), and its label."""
    relative = len({len(r.layers) for r in results}) > 1
    return relative, "relative depth" if relative else "layer (0 = embeddings)"


def _layer_x(r: ModelResult, relative: bool) -> np.ndarray:
    x = np.array([layer["index"] for layer in r.layers], dtype=float)
    return x / max(x.max(), 1.0) if relative else x


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def write_plots(protocol: str, results: Sequence[ModelResult], directory: str | os.PathLike[str]) -> list[Path]:
    """PNG plots: each metric per layer for every model, and eigen-spectra on log-log axes.

    Args:
        protocol: ``token`` or ``paper``.
        results: one :class:`ModelResult` per model.
        directory: created if missing.

    Returns:
        The written files, metric plots first, then one spectrum plot per model, then the
        analyses' plots.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    relative, xlabel = _depth(results)
    for metric in PLOT_METRICS:
        fig, ax = plt.subplots(figsize=_SIZE)
        if protocol == "paper":
            values = [_as_float(r.layers[0].get(metric)) for r in results]
            ax.bar(range(len(results)), values, color="tab:blue")
            ax.set_xticks(range(len(results)), [r.model for r in results], rotation=20, ha="right")
        else:
            for r in results:
                y = [_as_float(layer.get(metric)) for layer in r.layers]
                ax.plot(_layer_x(r, relative), y, marker="o", label=r.model)
            ax.set_xlabel(xlabel)
            ax.legend(fontsize="small")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} ({protocol} protocol)")
        ax.grid(alpha=0.3)
        written.append(_save(plt, fig, out / f"metric_{metric}.png"))
    for r in results:
        fig, ax = plt.subplots(figsize=_SIZE)
        cmap = plt.get_cmap("viridis")
        for i, (layer, spectrum) in enumerate(zip(r.layers, r.spectra, strict=True)):
            lam = np.asarray(spectrum, dtype=float)
            lam = lam[lam > 0]
            if lam.size:
                color = cmap(i / max(len(r.layers) - 1, 1))
                ax.loglog(np.arange(1, lam.size + 1), lam, color=color, label=layer["name"])
        ax.set_xlabel("rank k")
        ax.set_ylabel("eigenvalue λ_k of the covariance")
        ax.set_title(f"eigen-spectra: {r.model}")
        ax.grid(alpha=0.3, which="both")
        if len(r.layers) <= 16:
            ax.legend(fontsize="x-small", ncol=2)
        written.append(_save(plt, fig, out / f"spectrum_{slug(r.model)}.png"))
    if has_analyses(results):
        written += write_analysis_plots(results, out)
    if has_concepts(results):
        written += write_concepts_plots(results, out)
    return written


def write_analysis_plots(results: Sequence[ModelResult], directory: str | os.PathLike[str]) -> list[Path]:
    """PNG plots of the analyses (matplotlib must already use the Agg backend).

    Writes, when the analyses are present: per model and layer a histogram of the sampled
    values with the best fitted pdf, the Gaussian and the secondary modes
    (``distribution_<model>_<layer>.png``); alpha per layer with 95% error bars
    (``analysis_alpha.png``); the Fisher ratio per layer (``analysis_fisher_ratio.png``).

    Args:
        results: one :class:`ModelResult` per model.
        directory: an existing folder.

    Returns:
        The written files.
    """
    import matplotlib.pyplot as plt

    out = Path(directory)
    written: list[Path] = []
    for r in results:
        for layer in r.layers:
            dist = analysis_value(layer, "distributions")
            values = r.samples.get(layer["index"])
            if not dist or values is None or values.size < 2:
                continue
            fig, ax = plt.subplots(figsize=_SIZE)
            plot_distribution(ax, values, dist["fits"], dist["modes"], title=f"{r.model}: {layer['name']}")
            written.append(_save(plt, fig, out / f"distribution_{slug(r.model)}_{slug(str(layer['name']))}.png"))
    relative, xlabel = _depth(results)
    for section, key, ylabel, filename in (
        ("spectrum", "alpha", "power-law alpha (ranks 10-150), 95% CI", "analysis_alpha.png"),
        ("classes", "fisher_ratio", "Fisher ratio (largest LDA eigenvalue)", "analysis_fisher_ratio.png"),
    ):
        if not any(analysis_value(layer, section) for r in results for layer in r.layers):
            continue
        fig, ax = plt.subplots(figsize=_SIZE)
        for r in results:
            y, low, high = (np.array([_number(analysis_value(layer, section, k)) for layer in r.layers])
                            for k in (key, "ci_low", "ci_high"))
            if key == "alpha":
                ax.errorbar(_layer_x(r, relative), y, yerr=np.vstack([y - low, high - y]), marker="o", capsize=3,
                            label=r.model)
            else:
                ax.plot(_layer_x(r, relative), y, marker="o", label=r.model)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        written.append(_save(plt, fig, out / filename))
    return written


# ---------------------------------------------------------------------------- --analyses concepts
_SOURCE_COLOURS = {"prose": "tab:blue", "code": "tab:orange", "math": "tab:green"}
# Lobe colours apart from the source colours, so that the two panels do not blur.
_LOBE_COLOURS = ["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray", "tab:red"]


def write_concepts_plots(results: Sequence[Any], directory: str | os.PathLike[str]) -> list[Path]:
    """PNG plots of ``--analyses concepts`` (matplotlib must already use the Agg backend).

    Per model and layer: ``concepts_lobes_<model>_<layer>.png`` (the features on a 2-D
    spectral embedding of the headline affinity, coloured by lobe and by the source they fire
    on most) and ``concepts_crystals_<model>_<layer>.png`` (each relation's pairs on their
    first two principal components, before and after the LDA projection); per model
    ``concepts_powerlaw_<model>.png`` (the decoder point cloud's and the activations'
    eigenvalues per layer, log-log, with the fitted power laws).

    Returns:
        The written files.
    """
    import matplotlib.pyplot as plt

    out = Path(directory)
    written: list[Path] = []
    for r in results:
        plots: dict[int, LayerConcepts] = getattr(r, "concepts", None) or {}
        for plot in plots.values():
            name = f"{slug(r.model)}_{slug(plot.name)}"
            if plot.embedding.size:
                written.append(_lobes_plot(plt, r.model, plot, out / f"concepts_lobes_{name}.png"))
            if plot.crystals:
                written.append(_crystal_plot(plt, r.model, plot, out / f"concepts_crystals_{name}.png"))
        if plots:
            written.append(_powerlaw_plot(plt, r.model, plots, out / f"concepts_powerlaw_{slug(r.model)}.png"))
    return written


def _lobes_plot(plt: Any, model: str, plot: LayerConcepts, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    emb = plot.embedding
    src = np.asarray(plot.dominant_source)
    for lobe in np.unique(plot.lobes):
        sel = plot.lobes == lobe
        names, counts = np.unique(src[sel], return_counts=True)
        axes[0].scatter(emb[sel, 0], emb[sel, 1], s=4, alpha=0.6, color=_LOBE_COLOURS[int(lobe) % len(_LOBE_COLOURS)],
                        label=f"lobe {lobe} ({sel.sum()}; mostly {names[counts.argmax()]})")
    for s, colour in _SOURCE_COLOURS.items():
        sel = src == s
        axes[1].scatter(emb[sel, 0], emb[sel, 1], s=4, alpha=0.6, color=colour, label=f"{s} ({sel.sum()})")
    for ax, title in zip(axes, ("co-occurrence lobes", "source each feature fires on most"), strict=True):
        ax.set_title(f"{model} {plot.name}: {title}", fontsize="small")
        ax.set_xlabel("spectral embedding 1")
        ax.set_ylabel("spectral embedding 2")
        ax.legend(fontsize="x-small", markerscale=3)
    return _save(plt, fig, path)


def _crystal_plot(plt: Any, model: str, plot: LayerConcepts, path: Path) -> Path:
    c = plot.crystals
    relations = list(dict.fromkeys(c["relations"]))
    rel = np.asarray(c["relations"])
    fig, axes = plt.subplots(2, len(relations), figsize=(4.2 * len(relations), 7.6), squeeze=False)
    for row, key in enumerate(("before", "after")):
        vectors = c[key]
        for col, relation in enumerate(relations):
            sel = rel == relation
            ia, ib = c["a"][sel], c["b"][sel]
            points = np.concatenate([vectors[ia], vectors[ib]])
            centred = points - points.mean(axis=0)
            _, _, vt = np.linalg.svd(centred, full_matrices=False)
            xy = centred @ vt[:2].T
            n = ia.size
            ax = axes[row][col]
            for i in range(n):
                ax.annotate("", xy=xy[n + i], xytext=xy[i], arrowprops={"arrowstyle": "->", "color": "tab:gray",
                                                                        "lw": 0.8})
            ax.scatter(xy[:n, 0], xy[:n, 1], s=10, color="tab:blue")
            ax.scatter(xy[n:, 0], xy[n:, 1], s=10, color="tab:red")
            for i in range(min(n, 6)):
                ax.annotate(c["words"][ia[i]], xy[i], fontsize=6)
                ax.annotate(c["words"][ib[i]], xy[n + i], fontsize=6)
            cosine = parallelogram_quality(vectors[ia], vectors[ib], [relation] * n)["within"]
            ax.set_title(f"{relation}: {key} LDA (mean cos {cosine:.3f})", fontsize="small")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{model} {plot.name}: word pairs on their first two principal components (activations)",
                 fontsize="small")
    return _save(plt, fig, path)


def _powerlaw_plot(plt: Any, model: str, plots: dict[int, LayerConcepts], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("viridis")
    n = max(len(plots) - 1, 1)
    for i, (_, plot) in enumerate(sorted(plots.items())):
        colour = cmap(i / n)
        for ax, lam in zip(axes, (plot.feature_spectrum, plot.activation_spectrum), strict=True):
            lam = np.asarray(lam, dtype=float)
            lam = lam[lam > 0]
            if lam.size == 0:
                continue
            fit = powerlaw_fit(lam, POWERLAW_RANGE)
            label = plot.name + (f" (alpha {fit['alpha']:.2f})" if math.isfinite(fit["alpha"]) else "")
            ax.loglog(np.arange(1, lam.size + 1), lam, color=colour, label=label)
            if math.isfinite(fit["alpha"]):
                lo, hi = POWERLAW_RANGE[0], min(POWERLAW_RANGE[1], lam.size)
                k = np.arange(lo, hi + 1)
                intercept = np.mean(np.log(lam[k - 1]) + fit["alpha"] * np.log(k))
                ax.loglog(k, np.exp(intercept) * k ** -fit["alpha"], color=colour, ls="--", lw=0.8)
    for ax, title in zip(axes, ("SAE decoder point cloud", "activations (same corpus)"), strict=True):
        ax.set_title(f"{model}: {title}", fontsize="small")
        ax.set_xlabel("rank k")
        ax.set_ylabel("covariance eigenvalue")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="x-small")
    return _save(plt, fig, path)
