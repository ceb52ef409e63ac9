"""The benchmark's PNG plots: metrics per layer, eigen-spectra, and the analyses' figures.

matplotlib's Agg backend (no display needed), imported only when plots are asked for. Each
metric is one figure with a curve per model (x = layer index, or the relative depth when the
models' depths differ; each model its own colour, line style and marker, the legend beside
the axes); the ``paper`` protocol draws a bar per model. GSAM (all three variants) is a sum
over the hidden dimensions, so models of different width get one panel per width
(``WIDTH_CAVEAT`` in the title). Spectra show only the eigenvalues above the rank tolerance
(``spectrum_support``) and say how many they leave out.

``metric_figure``, ``spectrum_figure`` and ``distribution_figure`` build one figure and
return it unsaved; ``write_plots`` saves them all.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gsam_monitor.analysis import plot_distribution, powerlaw_fit
from gsam_monitor.analysis.concepts import parallelogram_quality
from gsam_monitor.eval.analyses import has_analyses
from gsam_monitor.eval.concepts import LayerConcepts, has_concepts
from gsam_monitor.eval.protocols import ModelResult
from gsam_monitor.eval.tables import analysis_value
from gsam_monitor.metrics import rank_tolerance
from gsam_monitor.metrics.scores import POWERLAW_RANGE

__all__ = [
    "METRIC_LABELS", "PLOT_METRICS", "WIDTH_CAVEAT", "WIDTH_DEPENDENT", "distribution_figure", "metric_figure", "slug",
    "spectrum_figure", "spectrum_support", "write_analysis_plots", "write_concepts_plots", "write_plots",
]

#: Metrics drawn per layer by ``write_plots``, in order.
PLOT_METRICS: tuple[str, ...] = (
    "gsam", "gsam_correlation", "gsam_oas", "rank", "effective_rank", "participation_ratio", "powerlaw_alpha",
    "condition_number", "anisotropy", "outlier_dims", "mean_kurtosis", "mardia_kurtosis",
)

_RANKS = f"ranks {POWERLAW_RANGE[0]}-{POWERLAW_RANGE[1]}"
#: Per metric: what it is (the plot's title) and its y-axis label with the unit.
METRIC_LABELS: dict[str, tuple[str, str]] = {
    "gsam": ("GSAM: log N + mean Gaussian log-likelihood", "GSAM (nats)"),
    "gsam_correlation": ("GSAM of the correlation matrix, scale-invariant", "GSAM of the correlation (nats)"),
    "gsam_oas": ("GSAM under the OAS-shrunk covariance", "GSAM, OAS (nats)"),
    "rank": ("rank of the covariance", "rank (dimensions)"),
    "effective_rank": ("effective rank: exp(entropy of the eigenvalue shares)", "effective rank (dimensions)"),
    "participation_ratio": ("participation ratio (Σλ)² / Σλ²", "participation ratio (dimensions)"),
    "powerlaw_alpha": (f"power-law exponent α of the spectrum, λ_k ∝ k^-α ({_RANKS})", "α (dimensionless)"),
    "condition_number": ("condition number λmax / λmin on the support", "λmax / λmin (ratio, log scale)"),
    "anisotropy": ("anisotropy: mean pairwise cosine similarity of the tokens", "mean cosine (dimensionless)"),
    "outlier_dims": ("outlier dimensions: root mean square > 10× the median", "outlier dimensions (count)"),
    "mean_kurtosis": ("mean excess kurtosis of the dimensions", "excess kurtosis (dimensionless)"),
    "mardia_kurtosis": ("Mardia's kurtosis, normalised excess (b2 - r(r+2)) / r", "normalised excess (dimensionless)"),
}

#: Metrics that scale with the hidden size d (sums over the dimensions): one panel per width.
WIDTH_DEPENDENT: frozenset[str] = frozenset({"gsam", "gsam_correlation", "gsam_oas"})
#: Said in the title of a width-dependent metric's figure when the models' widths differ.
WIDTH_CAVEAT = ("GSAM grows with the hidden size d (a sum over d dimensions; so does gsam_correlation):\n"
                "one panel per width, compare models only within a panel")

_SIZE = (6.4, 4.0)
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def slug(text: str) -> str:
    """``text`` as a file-name part: runs of anything but letters, digits, ``._-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _depth(results: Sequence[ModelResult]) -> tuple[bool, str]:
    """Whether layers go on a relative-depth axis (the models' depths differ), and its label."""
    relative = len({len(r.layers) for r in results}) > 1
    return relative, ("relative depth (layer index / last layer index)" if relative
                      else "layer index (0 = embeddings)")


def _layer_x(r: ModelResult, relative: bool) -> np.ndarray:
    x = np.array([layer["index"] for layer in r.layers], dtype=float)
    return x / max(x.max(), 1.0) if relative else x


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def _style(i: int) -> dict[str, Any]:
    """Model ``i``'s line: its own colour, line style and marker, the same in every figure."""
    return {"color": f"C{i % 10}", "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
            "marker": _MARKERS[i % len(_MARKERS)], "markersize": 5}


def _label(r: ModelResult) -> str:
    return f"{r.model} (d={r.d})"


def _legend_beside(ax: Any, **kwargs: Any) -> None:
    """The legend right of the axes, off the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small", **kwargs)


def _width_groups(results: Sequence[ModelResult]) -> list[list[tuple[int, ModelResult]]]:
    """(model position, result) grouped by hidden size, narrowest first."""
    widths = sorted({r.d for r in results})
    return [[(i, r) for i, r in enumerate(results) if r.d == d] for d in widths]


# ---------------------------------------------------------------------------- metrics
def metric_figure(protocol: str, results: Sequence[ModelResult], metric: str) -> Any:
    """One metric per layer for every model (``paper``: a bar per model), unsaved.

    A ``WIDTH_DEPENDENT`` metric of models of different hidden sizes gets one panel per
    width and ``WIDTH_CAVEAT`` in the title.

    Args:
        protocol: ``token`` or ``paper``.
        results: one ``ModelResult`` per model.
        metric: a key of the layers' dicts (see ``METRIC_LABELS`` for the known ones).

    Returns:
        The matplotlib figure.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    what, ylabel = METRIC_LABELS.get(metric, (metric, metric))
    split = metric in WIDTH_DEPENDENT and len({r.d for r in results}) > 1
    groups = _width_groups(results) if split else [list(enumerate(results))]
    width = 5.0 * len(groups) + (2.6 if protocol != "paper" and not split else 0.6)
    height = 5.2 if split else 4.4
    fig, axes = plt.subplots(1, len(groups), figsize=(width, height), squeeze=False, layout="constrained")
    for ax, group in zip(axes[0], groups, strict=True):
        if protocol == "paper":
            values = [_as_float(r.layers[0].get(metric)) for _, r in group]
            ax.bar(range(len(group)), values, color=[_style(i)["color"] for i, _ in group])
            ax.set_xticks(range(len(group)), [_label(r) for _, r in group], rotation=20, ha="right")
            ax.set_xlabel("model")
        else:
            relative, xlabel = _depth([r for _, r in group])
            for i, r in group:
                y = [_as_float(layer.get(metric)) for layer in r.layers]
                ax.plot(_layer_x(r, relative), y, label=_label(r), **_style(i))
            ax.set_xlabel(xlabel)
            if not relative:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if not split:
                _legend_beside(ax)
        if metric == "condition_number":
            ax.set_yscale("log")
        elif metric in ("rank", "outlier_dims"):
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if split:
            ax.set_title(f"d = {group[0][1].d}", fontsize="medium")
    title = f"{what}\n{protocol} protocol" + (", per layer" if protocol != "paper" else ", last layer + embeddings")
    if split:
        title = f"{what} ({protocol} protocol, {'per layer' if protocol != 'paper' else 'last layer + embeddings'})"
    if split:
        fig.suptitle(f"{title}\n{WIDTH_CAVEAT}", fontsize="medium")
        if protocol != "paper":
            handles = [h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]]
            fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize="small")
    else:
        axes[0][0].set_title(title, fontsize="medium")
    return fig


# ---------------------------------------------------------------------------- spectra
def spectrum_support(spectrum: np.ndarray | Sequence[float], rank: Any = None) -> tuple[np.ndarray, int]:
    """The eigenvalues above the rank tolerance (descending) and how many are left out.

    Kept: those above scipy's rule ``rank_tolerance(λ, float64)`` (1e6·eps64·λmax, the floor
    of every tolerance the metrics use), and only the largest ``rank`` when the layer's
    ``rank`` is given (the metrics' count above ``eigenvalue_tolerance``, which with fp32
    Gram products is the higher, per-eigenvalue bound).

    Args:
        spectrum: covariance eigenvalues (any order).
        rank: the layer's ``rank`` metric, or ``None``/NaN for the floor alone.

    Returns:
        (kept eigenvalues, descending; number left out).
    """
    lam = np.sort(np.asarray(spectrum, dtype=np.float64).ravel())[::-1]
    if lam.size == 0:
        return lam, 0
    floor = rank_tolerance(torch.from_numpy(lam.copy()), torch.float64)
    keep = lam > max(floor, 0.0)
    if isinstance(rank, (int, float)) and math.isfinite(rank):
        keep[max(int(rank), 0):] = False
    return lam[keep], int(lam.size - keep.sum())


def _hidden_note(hidden: Sequence[int], names: Sequence[str]) -> str:
    total = sum(hidden)
    if total == 0:
        return "all eigenvalues are above the rank tolerance"
    note = f"{total} eigenvalue{'s' if total != 1 else ''} below the rank tolerance not shown"
    if len(hidden) > 1:
        deficient = [(n, h) for n, h in zip(names, hidden, strict=True) if h]
        if len(deficient) <= 3:
            note += " (" + ", ".join(f"{n}: {h}" for n, h in deficient) + ")"
        else:
            note += f" ({len(deficient)} of {len(hidden)} layers, at most {max(hidden)} per layer)"
    return note


def spectrum_figure(r: ModelResult) -> Any:
    """The covariance eigenvalues of each layer of one model, log-log, unsaved.

    Only the eigenvalues above the rank tolerance (``spectrum_support``) are drawn; the
    title says how many are left out. Layers are coloured by depth (viridis, with a colour
    bar; a single layer gets a legend).

    Args:
        r: the model's result (``spectra`` and ``layers``).

    Returns:
        The matplotlib figure.
    """
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm

    fig, ax = plt.subplots(figsize=(7.2, 4.6), layout="constrained")
    cmap = plt.get_cmap("viridis")
    n = len(r.layers)
    hidden = []
    for i, (layer, spectrum) in enumerate(zip(r.layers, r.spectra, strict=True)):
        lam, n_hidden = spectrum_support(spectrum, layer.get("rank"))
        hidden.append(n_hidden)
        if lam.size:
            ax.loglog(np.arange(1, lam.size + 1), lam, color=cmap(i / max(n - 1, 1)), lw=1.3, label=str(layer["name"]))
    ax.set_xlabel("rank k (eigenvalues in descending order)")
    ax.set_ylabel("eigenvalue λ_k (activation units²)")
    ax.set_title(f"{r.model} (d={r.d}): covariance eigen-spectrum per layer\n"
                 f"{_hidden_note(hidden, [str(la['name']) for la in r.layers])}", fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    if n > 1:
        mappable = ScalarMappable(norm=BoundaryNorm(np.arange(-0.5, n), cmap.N), cmap=cmap)
        bar = fig.colorbar(mappable, ax=ax, pad=0.02)
        ticks = np.arange(n)[:: max(1, math.ceil(n / 12))]
        bar.set_ticks(ticks, labels=[str(r.layers[t]["index"]) for t in ticks])
        bar.set_label("layer index (0 = embeddings)")
    elif n == 1:
        ax.legend(fontsize="small", loc="lower left")
    return fig


def write_plots(protocol: str, results: Sequence[ModelResult], directory: str | os.PathLike[str]) -> list[Path]:
    """PNG plots: each metric per layer for every model, and eigen-spectra on log-log axes.

    Args:
        protocol: ``token`` or ``paper``.
        results: one ``ModelResult`` per model.
        directory: created if missing.

    Returns:
        The written files, metric plots first, then one spectrum plot per model, then the
        analyses' plots.
    """
    plt = _pyplot()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = [_save(plt, metric_figure(protocol, results, metric), out / f"metric_{metric}.png")
               for metric in PLOT_METRICS]
    written += [_save(plt, spectrum_figure(r), out / f"spectrum_{slug(r.model)}.png") for r in results]
    if has_analyses(results):
        written += write_analysis_plots(results, out)
    if has_concepts(results):
        written += write_concepts_plots(results, out)
    return written


# ---------------------------------------------------------------------------- --analyses
def distribution_figure(model: str, layer: dict[str, Any], values: np.ndarray, dist: dict[str, Any]) -> Any:
    """One layer's sampled activation values: the density with the best fit, the Gaussian
    and the modes (left: the central 99.9% of the values; right: log density over the whole
    range, for the tails), unsaved."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2), layout="constrained")
    for ax in axes:
        plot_distribution(ax, values, dist["fits"], dist["modes"])
        ax.set_xlabel("activation value (activation units)")
        ax.set_ylabel("density (per activation unit)")
    low, high = np.quantile(values, [0.0005, 0.9995])
    pad = 0.05 * (high - low) if high > low else 1.0
    axes[0].set_xlim(low - pad, high + pad)
    axes[0].set_title("central 99.9% of the values", fontsize="medium")
    axes[1].set_yscale("log")
    heights = [p.get_height() for p in axes[1].patches if p.get_height() > 0]
    if heights:
        axes[1].set_ylim(0.3 * min(heights), 3.0 * max(heights))
    axes[1].set_title("log density, whole range (the tails)", fontsize="medium")
    axes[1].get_legend().remove()
    n_modes = len(dist["modes"].get("left", [])) + len(dist["modes"].get("right", []))
    fig.suptitle(f"{model} {layer['name']}: distribution of the activation values, all dimensions pooled "
                 f"({np.asarray(values).size} sampled; {n_modes} secondary KDE modes)", fontsize="medium")
    return fig


def write_analysis_plots(results: Sequence[ModelResult], directory: str | os.PathLike[str]) -> list[Path]:
    """PNG plots of the analyses (matplotlib must already use the Agg backend).

    Writes, when the analyses are present: per model and layer a histogram of the sampled
    values with the best fitted pdf, the Gaussian and the secondary modes
    (``distribution_<model>_<layer>.png``); alpha per layer with 95% error bars
    (``analysis_alpha.png``); the Fisher ratio per layer (``analysis_fisher_ratio.png``).

    Args:
        results: one ``ModelResult`` per model.
        directory: an existing folder.

    Returns:
        The written files.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    out = Path(directory)
    written: list[Path] = []
    for r in results:
        for layer in r.layers:
            dist = analysis_value(layer, "distributions")
            values = r.samples.get(layer["index"])
            if not dist or values is None or values.size < 2:
                continue
            written.append(_save(plt, distribution_figure(r.model, layer, values, dist),
                                 out / f"distribution_{slug(r.model)}_{slug(str(layer['name']))}.png"))
    relative, xlabel = _depth(results)
    for section, key, title, ylabel, filename in (
        ("spectrum", "alpha", f"power-law exponent α of the covariance spectrum ({_RANKS}), 95% CI",
         "α (dimensionless)", "analysis_alpha.png"),
        ("classes", "fisher_ratio", "Fisher ratio between the corpus's label classes (largest LDA eigenvalue)",
         "Fisher ratio (dimensionless)", "analysis_fisher_ratio.png"),
    ):
        if not any(analysis_value(layer, section) for r in results for layer in r.layers):
            continue
        fig, ax = plt.subplots(figsize=(_SIZE[0] + 2.6, 4.4), layout="constrained")
        for i, r in enumerate(results):
            y, low, high = (np.array([_number(analysis_value(layer, section, k)) for layer in r.layers])
                            for k in (key, "ci_low", "ci_high"))
            if key == "alpha":
                ax.errorbar(_layer_x(r, relative), y, yerr=np.vstack([y - low, high - y]), capsize=3,
                            label=_label(r), **_style(i))
            else:
                ax.plot(_layer_x(r, relative), y, label=_label(r), **_style(i))
        ax.set_xlabel(xlabel)
        if not relative:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\nper layer", fontsize="medium")
        ax.grid(alpha=0.3)
        _legend_beside(ax)
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
    on most), ``concepts_crystals_<model>_<layer>.png`` (each relation's pairs on their
    first two principal components, before and after the LDA projection) and
    ``concepts_sweeps_<model>_<layer>.png`` (the AMI of both recipes against the lobe count,
    and against the firing threshold beside the fraction of cells that fire); per model
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
            if plot.sweeps.get("k_sweep") and plot.sweeps.get("threshold_sweep"):
                written.append(_sweeps_plot(plt, r.model, plot, out / f"concepts_sweeps_{name}.png"))
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
        ax.set_xlabel("spectral embedding 1 (dimensionless)")
        ax.set_ylabel("spectral embedding 2 (dimensionless)")
        ax.legend(fontsize="x-small", markerscale=3)
    return _save(plt, fig, path)


def _sweeps_plot(plt: Any, model: str, plot: LayerConcepts, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    ks, thresholds = plot.sweeps["k_sweep"], plot.sweeps["threshold_sweep"]
    recipes = (("study", "study: spectral on phi + 1 and on angular similarity", "tab:red"),
               ("library", "library: spectral on clipped phi, k-means geometry", "tab:blue"))
    for key, label, colour in recipes:
        amis = [row["ami"] if row else math.nan for row in ks[key]]
        axes[0].plot(ks["k"], amis, marker="o", color=colour, label=label)
        axes[1].plot([row["threshold"] for row in thresholds], [row[f"ami_{key}"] for row in thresholds],
                     marker="o", color=colour, label=label)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("lobes k (log scale)")
    axes[0].set_title(f"{model} {plot.name}: lobes vs geometry, by lobe count", fontsize="small")
    axes[1].set_xlabel("firing threshold (SAE activation units)")
    axes[1].set_title("by firing threshold (dotted: default)", fontsize="small")
    density = axes[1].twinx()
    density.plot([row["threshold"] for row in thresholds], [row["firing_density"] for row in thresholds],
                 color="tab:gray", ls="--", label="cells that fire")
    density.set_ylabel("fraction of (feature, block) cells that fire", color="tab:gray")
    if "threshold" in plot.sweeps:
        axes[1].axvline(plot.sweeps["threshold"], color="k", ls=":", lw=0.8)
    for ax in axes:
        ax.set_ylabel("AMI, co-occurrence lobes vs geometry clusters")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
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
            unit = "activation units" if key == "before" else "LDA-projected units"
            ax.set_xlabel(f"PC 1 of the pairs ({unit})", fontsize="small")
            ax.set_ylabel(f"PC 2 ({unit})", fontsize="small")
    fig.suptitle(f"{model} {plot.name}: word pairs on their first two principal components (activations)",
                 fontsize="small")
    return _save(plt, fig, path)


def _powerlaw_plot(plt: Any, model: str, plots: dict[int, LayerConcepts], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    cmap = plt.get_cmap("viridis")
    n = max(len(plots) - 1, 1)
    hidden = [0, 0]
    for i, (_, plot) in enumerate(sorted(plots.items())):
        colour = cmap(i / n)
        for j, (ax, spectrum) in enumerate(zip(axes, (plot.feature_spectrum, plot.activation_spectrum), strict=True)):
            lam, n_hidden = spectrum_support(spectrum)
            hidden[j] += n_hidden
            if lam.size == 0:
                continue
            fit = powerlaw_fit(lam, POWERLAW_RANGE)
            label = plot.name + (f" (α {fit['alpha']:.2f})" if math.isfinite(fit["alpha"]) else "")
            ax.loglog(np.arange(1, lam.size + 1), lam, color=colour, label=label)
            if math.isfinite(fit["alpha"]):
                lo, hi = POWERLAW_RANGE[0], min(POWERLAW_RANGE[1], lam.size)
                k = np.arange(lo, hi + 1)
                intercept = np.mean(np.log(lam[k - 1]) + fit["alpha"] * np.log(k))
                ax.loglog(k, np.exp(intercept) * k ** -fit["alpha"], color=colour, ls="--", lw=0.8)
    panels = (("SAE decoder point cloud (unit-norm feature directions)", "eigenvalue λ_k (dimensionless)"),
              ("activations (same corpus)", "eigenvalue λ_k (activation units²)"))
    for ax, (title, ylabel), n_hidden in zip(axes, panels, hidden, strict=True):
        ax.set_title(f"{title}\n{_hidden_note([n_hidden], [''])}", fontsize="small")
        ax.set_xlabel("rank k (eigenvalues in descending order)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        _legend_beside(ax, title="layer (fitted α; dashed: fit)", title_fontsize="x-small")
    fig.suptitle(f"{model}: covariance eigen-spectra per layer, with power laws fitted over {_RANKS}",
                 fontsize="medium")
    return _save(plt, fig, path)
