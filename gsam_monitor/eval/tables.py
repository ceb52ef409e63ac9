"""The benchmark's tables, as aligned text (stdout) or Markdown: the protocols' metrics per
layer, and the ``--analyses`` and ``--analyses concepts`` summaries beside them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gsam_monitor.analysis.concepts import SOURCES
from gsam_monitor.eval.corpus import Corpus
from gsam_monitor.eval.protocols import ModelResult

__all__ = [
    "MODES_COLUMN", "analysis_value", "cell", "format_analyses_table", "format_concepts_table", "format_table", "grid",
]

# Each metric's column: header and format.
_COLUMNS: dict[str, tuple[str, str]] = {
    "index": ("layer", "d"),
    "name": ("name", "s"),
    "module": ("module", "s"),
    "n": ("n", "d"),
    "rank": ("rank", "d"),
    "gsam": ("gsam", ".2f"),
    "gsam_correlation": ("gsam_corr", ".2f"),
    "gsam_oas": ("gsam_oas", ".2f"),
    "effective_rank": ("eff_rank", ".1f"),
    "powerlaw_alpha": ("alpha", ".3f"),
    "anisotropy": ("aniso", ".3f"),
    "mean_kurtosis": ("kurt", ".2f"),
    "mardia_kurtosis": ("mardia", ".2f"),
    "paper_score": ("paper_score", ".2f"),
    "paper_retries": ("retries", "d"),
    "paper_ridge": ("ridge", ".0e"),
}
_TOKEN_COLUMNS = ("index", "name", "module", "n", "rank", "gsam", "gsam_correlation", "gsam_oas", "effective_rank",
                  "powerlaw_alpha", "anisotropy", "mean_kurtosis", "mardia_kurtosis")
_PAPER_COLUMNS = ("paper_score", "paper_retries", "paper_ridge", "n", "rank", "gsam", "gsam_correlation",
                  "effective_rank", "anisotropy", "mean_kurtosis")


def cell(value: Any, fmt: str, missing: str = "nan") -> str:
    """One table cell: ``value`` formatted with ``fmt`` (``"s"``: as text, ``"d"``: as an int),
    ``missing`` for ``None`` and non-finite numbers."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    if fmt == "s":
        return str(value)
    if fmt == "d":
        return str(int(value))
    return format(float(value), fmt)


def grid(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    """Rows under a header: a Markdown table, or right-aligned text columns."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), *(fmt.format(*row) for row in rows)])


def _block(title: str, header: list[str], rows: list[list[str]], markdown: bool) -> str:
    return title + "\n" + ("\n" if markdown else "") + grid(header, rows, markdown)


def format_table(protocol: str, corpus: Corpus, results: Sequence[ModelResult], *, markdown: bool = False) -> str:
    """The results as text tables: per layer for ``token``, one row per model for ``paper``,
    followed by the analyses' tables when there are any.

    Args:
        protocol: ``token`` or ``paper``.
        corpus: the corpus.
        results: one ``ModelResult`` per model.
        markdown: Markdown tables instead of aligned text.

    Returns:
        The tables, ready to print.
    """
    # The Markdown report states the corpus in its header already.
    blocks = [] if markdown else [
        f"protocol {protocol}, corpus {corpus.name} ({len(corpus)} sentences, sha256 {corpus.sha256[:12]}…)"
    ]
    if protocol == "paper":
        header = ["model", "d"] + [_COLUMNS[k][0] for k in _PAPER_COLUMNS]
        rows = [[r.model, str(r.d)] + [cell(r.layers[0].get(k), _COLUMNS[k][1]) for k in _PAPER_COLUMNS]
                for r in results]
        blocks.append(grid(header, rows, markdown))
        return "\n\n".join(blocks) + "\n"
    header = [_COLUMNS[k][0] for k in _TOKEN_COLUMNS]
    for r in results:
        extra = f", {r.n_truncated} truncated at {r.max_length} tokens" if r.n_truncated else ""
        title = (f"model {r.model} (d={r.d}, {r.dtype}, {r.device}{extra}): "
                 f"score (last layer's gsam) = {cell(r.score, '.2f')}")
        rows = [[cell(layer.get(k), _COLUMNS[k][1]) for k in _TOKEN_COLUMNS] for layer in r.layers]
        blocks.append(_block(title, header, rows, markdown))
    blocks += [t for t in (format_analyses_table(results, markdown=markdown),
                           format_concepts_table(results, markdown=markdown)) if t]
    return "\n\n".join(blocks) + "\n"


# ---------------------------------------------------------------------------- --analyses
#: The analyses table's column of the secondary KDE modes of a layer's pooled values: their
#: number, then each mode's offset from the main mode in standard deviations, e.g. ``2 (-1.3, +2.1)``.
MODES_COLUMN = "2nd KDE modes: n (offsets, sd)"


def analysis_value(layer: dict[str, Any], *keys: str) -> Any:
    """``layer["analyses"][keys[0]][keys[1]]...``, or ``None`` where a level is missing."""
    value: Any = layer.get("analyses")
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def format_analyses_table(results: Sequence[ModelResult], *, markdown: bool = False) -> str:
    """Per-layer table: best family, secondary modes, alpha with its 95% CI, Fisher ratio.

    Args:
        results: one ``ModelResult`` per model.
        markdown: a Markdown table instead of aligned text.

    Returns:
        One block per model with analyses (empty string if none has any).
    """
    blocks = []
    header = ["layer", "name", "best family", MODES_COLUMN, "alpha [95% CI]", "fisher", "tail>5sd / gauss"]
    for r in results:
        if not any(layer.get("analyses") for layer in r.layers):
            continue
        criterion = next((str(d["criterion"]) for d in _all(r, "distributions") if d), "-")
        with_dims = any(analysis_value(layer, "distributions", "dims") for layer in r.layers)
        rows = [_analyses_row(layer, criterion, with_dims) for layer in r.layers]
        title = (f"analyses: {r.model} (fits ranked by {criterion}; 2nd KDE modes: the peaks of the density of "
                 "all dimensions' values pooled beside the main peak, offset from it in standard deviations)")
        dims_header = ["per dim: top families of n / n with 2nd modes"] if with_dims else []
        blocks.append(_block(title, header + dims_header, rows, markdown))
    return "\n\n".join(blocks)


def _all(r: ModelResult, *keys: str) -> list[Any]:
    return [analysis_value(layer, *keys) for layer in r.layers]


def _analyses_row(layer: dict[str, Any], criterion: str, with_dims: bool) -> list[str]:
    dist = analysis_value(layer, "distributions")
    spec = analysis_value(layer, "spectrum")
    modes, tail_txt, family = "-", "-", "-"
    if dist:
        offsets = [m["offset_sd"] for m in (*dist["modes"]["left"], *dist["modes"]["right"])]
        modes = f"{len(offsets)}" + (" (" + ", ".join(f"{o:+.1f}" for o in offsets) + ")" if offsets else "")
        tail = dist["tails"].get("5")
        tail_txt = "-" if tail is None or tail.get("ratio") is None else f"{tail['ratio']:.3g}"
        family = dist["best_family"]
    alpha = "-"
    if spec and _finite(spec.get("alpha")):
        alpha = f"{spec['alpha']:.3f} [{spec['ci_low']:.3f}, {spec['ci_high']:.3f}]"
    row = [str(layer["index"]), str(layer["name"]), family, modes, alpha,
           cell(analysis_value(layer, "classes", "fisher_ratio"), ".3f", "-"), tail_txt]
    if with_dims:
        row.append(_dims_cell(analysis_value(layer, "distributions", "dims"), criterion))
    return row


def _dims_cell(dims: dict[str, Any] | None, criterion: str) -> str:
    if not dims or not dims.get("n_dims"):
        return "-"
    counts = dims["best_family_counts"].get(criterion) or {}
    top = ", ".join(f"{family} {n}" for family, n in list(counts.items())[:2])
    return f"{top} of {dims['n_dims']} / {dims['dims_with_secondary_modes']}"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ---------------------------------------------------------------------------- --analyses concepts
def format_concepts_table(results: Sequence[Any], *, markdown: bool = False) -> str:
    """Per model and layer: SAE quality, lobes (AMI vs null, logistic regression), crystals, alphas.

    Args:
        results: ``gsam_monitor.eval.protocols.ModelResult`` objects.
        markdown: a Markdown table instead of aligned text.

    Returns:
        One block per model with concepts, plus its lobe x source table (empty if none).
    """
    blocks = []
    header = ["layer", "name", "EV", "L0", "dead", "lobes AMI (null mean±sd, z)", "logreg / chance",
              "crystal cos act before→LDA (random)", "crystal cos SAE before→LDA (random)", "alpha SAE", "alpha act"]
    for r in results:
        concepts = [(layer, layer["concepts"]) for layer in r.layers if layer.get("concepts")]
        if not concepts:
            continue
        rows = [_concepts_row(layer, c) for layer, c in concepts]
        lobe_rows = [[str(layer["index"]), lobe, str(shares["n_features"]), *(_num(shares[s], ".3f") for s in SOURCES)]
                     for layer, c in concepts for lobe, shares in (c["lobes"].get("lobe_by_source") or {}).items()]
        affinity = concepts[0][1]["lobes"].get("affinity")
        text = _block(f"concepts: {r.model} (TopK SAE on streamed activations; lobes by {affinity} affinity)",
                      header, rows, markdown)
        if lobe_rows:
            text += "\n\n" + _block("lobe x source: mean fraction of each source's blocks its features fire in",
                                    ["layer", "lobe", "features", *SOURCES], lobe_rows, markdown)
        blocks.append(text)
    return "\n\n".join(blocks)


def _num(value: Any, spec: str) -> str:
    """A number's cell, ``-`` for anything but a finite number."""
    return cell(value, spec, "-") if isinstance(value, (int, float)) else "-"


def _concepts_row(layer: dict[str, Any], c: dict[str, Any]) -> list[str]:
    sae, lobes, crystals, alpha = c["sae"], c["lobes"], c["crystals"], c["powerlaw_alpha"]
    ami = (f"{_num(lobes.get('ami'), '.3f')} ({_num(lobes.get('ami_null_mean'), '.3f')}±"
           f"{_num(lobes.get('ami_null_sd'), '.3f')}, z {_num(lobes.get('ami_z'), '.1f')})")
    spaces = [crystals[space] for space in ("activations", "features")]
    cells = [f"{_num(s['before']['within'], '.3f')}→{_num(s['after_lda']['within'], '.3f')} "
             f"({_num(s['after_random_within'], '.3f')})" for s in spaces]
    act_alpha = (alpha.get("activations") or {}).get("alpha")
    return [str(layer["index"]), str(layer["name"]), _num(sae["explained_variance"], ".3f"), _num(sae["l0"], ".1f"),
            _num(sae["dead_fraction"], ".3f"), ami,
            f"{_num(lobes.get('logreg_accuracy'), '.3f')} / {_num(lobes.get('chance'), '.3f')}",
            *cells, _num(alpha["features"].get("alpha"), ".3f"), _num(act_alpha, ".3f")]
