"""Plot GSAM curves from TensorBoard event files into one PNG.

Reads the scalars of a run folder with tensorboard's ``EventAccumulator`` and draws one panel
per metric (one line per layer, training phase) plus the loss, with matplotlib's ``Agg``
backend (no display needed).

Usage::

    python examples/plot_tensorboard.py runs/tiny_gpt docs/images/pretrain_curves.png
    python examples/plot_tensorboard.py runs/hf_minilm hf.png --metrics gsam effective_rank --loss train/loss
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TITLES = {
    "gsam": "GSAM (log N + mean log-likelihood, nats)",
    "effective_rank": "effective rank (exp entropy of the spectrum)",
    "anisotropy": "anisotropy (mean pairwise cosine)",
    "gsam_correlation": "GSAM on standardized dims (scale-free)",
    "top1_variance_fraction": "top-1 variance fraction",
    "powerlaw_alpha": "power-law exponent of the spectrum",
}


def load_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run in ``logdir``: ``{tag: [(step, value), ...]}``."""
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def plot(
    scalars: dict[str, list[tuple[int, float]]],
    out: str | Path,
    metrics: tuple[str, ...] = ("gsam", "effective_rank", "anisotropy"),
    loss: str | None = "train/loss",
    title: str | None = None,
) -> Path:
    """One panel per metric (a line per layer, train phase) and one for ``loss``; saves ``out``."""
    per_metric: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(dict)
    for tag, points in scalars.items():
        metric, _, layer = tag.partition("/")
        if metric in metrics and layer and not layer.endswith("/eval"):
            per_metric[metric][layer] = points
    panels = [m for m in metrics if per_metric.get(m)]
    has_loss = loss is not None and loss in scalars
    n = len(panels) + has_loss
    if n == 0:
        raise ValueError(
            f"no scalars for metrics {metrics} or loss {loss!r} in the event files; tags: {sorted(scalars)}"
        )
    cols = 2 if n > 1 else 1
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.9 * rows), squeeze=False)
    flat = axes.ravel()
    for ax, metric in zip(flat, panels, strict=False):
        layers = per_metric[metric]
        colours = plt.cm.viridis([i / max(1, len(layers) - 1) for i in range(len(layers))])
        for colour, (layer, points) in zip(colours, layers.items(), strict=True):
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, color=colour, label=layer, linewidth=1.6)
        ax.set_title(TITLES.get(metric, metric), fontsize=11)
        ax.set_xlabel("step (the run's logging step)")
        ax.grid(alpha=0.3)
    if has_loss:
        ax = flat[len(panels)]
        steps, values = zip(*scalars[loss], strict=True)
        ax.plot(steps, values, color="black", linewidth=1.4, label=loss)
        for tag in (loss.replace("train", "val"), loss.replace("train/", "eval/")):
            if tag != loss and tag in scalars:
                s, v = zip(*scalars[tag], strict=True)
                ax.plot(s, v, "o-", color="tab:red", markersize=4, label=tag)
        ax.set_title("loss", fontsize=11)
        ax.set_xlabel("step (the run's logging step)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in flat[n:]:
        ax.axis("off")
    handles, labels = flat[0].get_legend_handles_labels() if panels else ([], [])
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=13)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 0.96 if title else 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", help="folder holding the run's events.out.tfevents.* files")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--metrics", nargs="+", default=["gsam", "effective_rank", "anisotropy"])
    parser.add_argument("--loss", default="train/loss", help="loss tag to plot ('' for none)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    path = plot(load_scalars(args.logdir), args.out, tuple(args.metrics), args.loss or None, args.title)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
