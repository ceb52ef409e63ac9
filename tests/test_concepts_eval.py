"""``--analyses concepts`` end to end on a tiny random BERT: the hook stream, the JSON, tables, plots.

The hidden states the SAE sees come through the library's hooks (:class:`LayerCapture`); here
they are recomputed independently with ``output_hidden_states=True`` and the masks built by
hand, and the reported explained variance and the per-block firing are checked against them.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from gsam_monitor.analysis.concepts import SOURCES, STUDY_ACTIVATION_RATE, LayerCapture, build_blocks, math_documents
from gsam_monitor.analysis.concepts.sources import Document
from gsam_monitor.eval.__main__ import main, run_benchmark
from gsam_monitor.eval.analyses import ANALYSES, parse_analyses
from gsam_monitor.eval.concepts import ConceptsConfig, parse_layers, run_concepts
from gsam_monitor.eval.corpus import Corpus, load_corpus
from gsam_monitor.eval.models import load_model
from gsam_monitor.eval.plots import write_plots
from gsam_monitor.eval.report import build_results
from gsam_monitor.eval.tables import format_table

pytest.importorskip("transformers")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

CONFIG = ConceptsConfig(layers=(1, 2), blocks_per_source=6, block_size=48, expansion=2, k=8, epochs=2, sae_batch=256,
                        threshold=0.5, min_blocks=2, n_null=10, n_random=2, heldout_every=3, seed=0, n_seeds=2,
                        n_feature_null=2, k_sweep=(2, 4), thresholds=(0.25, 1.0), fresh_blocks=2, crystal_shuffles=2)


def _documents():
    prose = load_corpus("sst2_dev").sentences[:120]  # the default takes sst2_train: slower to load
    code = (Document("code", f"f{i}.py", f"def f{i}(x, y):\n    return x * {i} + y  # step {i}\n" * 12)
            for i in range(20))
    return {"prose": [Document("prose", "sst2", " ".join(prose))], "code": code, "math": math_documents(0)}


def _fresh():
    prose = load_corpus("sst2_dev").sentences[200:320]
    body = "class G{i}:\n    size = {i}\n    def area(self):\n        return self.size\n"
    code = (Document("code", f"g{i}.py", body.format(i=i) * 6) for i in range(10))
    return {"prose": [Document("prose", "sst2-later", " ".join(prose))], "code": code, "math": math_documents(9)}


@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny:bert", device="cpu")


def test_layer_capture_equals_hidden_states_and_drops_padding_and_special_tokens(loaded):
    enc = loaded.tokenizer(["a short one", "a somewhat longer sentence with more words in it"], padding=True,
                           return_tensors="pt", return_special_tokens_mask=True)
    special = enc["special_tokens_mask"].bool()

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in loaded.model.modules())

    with torch.no_grad():
        reference = loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 output_hidden_states=True).hidden_states
        before = hooks()  # after the forward: output_hidden_states registers hooks of transformers' own
        for stop_early in (True, False):
            with LayerCapture(loaded.model, [0, 2], stop_early=stop_early) as capture:
                hidden, keep = capture(enc["input_ids"], enc["attention_mask"], special)
            for layer in (0, 2):
                torch.testing.assert_close(hidden[layer], reference[layer])
            torch.testing.assert_close(keep, enc["attention_mask"].bool() & ~special)
            assert hooks() == before
    with pytest.raises(ValueError, match=r"layers: expected indices 0..2 \(0 = embeddings"):
        LayerCapture(loaded.model, [3])


def test_run_concepts_reports_what_an_independent_recomputation_finds(loaded):
    results, plots = run_concepts(loaded, CONFIG, documents=_documents(), fresh=_fresh())
    assert sorted(results) == [1, 2]
    blocks = build_blocks(loaded.tokenizer, _documents(), CONFIG.blocks_per_source, block_size=CONFIG.block_size,
                          blocks_per_document={"code": CONFIG.code_blocks_per_file})
    random.Random(CONFIG.seed).shuffle(blocks)
    ids = torch.tensor([b.input_ids for b in blocks])
    keep = ~torch.tensor([b.special for b in blocks])
    with torch.no_grad():
        reference = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
    held = torch.zeros(len(blocks), dtype=torch.bool)
    held[:: CONFIG.heldout_every] = True
    for layer in (1, 2):
        c = results[layer]["concepts"]
        plot = plots[layer]
        sae = plot.sae
        h = reference[layer].double()
        # Held-out explained variance, in fp64 from the SAE's weights.
        x = h[keep & held[:, None]]
        with torch.no_grad():
            w_enc, b_enc = sae.W_enc.double(), sae.b_enc.double()
            w_dec, b_dec, scale = sae.W_dec.double(), sae.b_dec.double(), float(sae.scale)
            pre = (x * scale - b_dec) @ w_enc.T + b_enc
            top = pre.topk(sae.k, dim=-1)
            z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0))
            x_hat = (z @ w_dec + b_dec) / scale
        ev = 1 - float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        assert c["sae"]["explained_variance"] == pytest.approx(ev, abs=1e-4)
        assert c["sae"]["heldout_rows"] == x.shape[0]
        assert c["sae"]["l0"] == pytest.approx(float((z > 0).sum(1).double().mean()), abs=1e-9)
        # Per-block firing: the largest activation over each block's kept tokens.
        with torch.no_grad():
            codes = torch.zeros(h.shape[0], h.shape[1], sae.n_features, dtype=torch.float64)
            pre_all = (h * scale - b_dec) @ w_enc.T + b_enc
            top_all = pre_all.topk(sae.k, dim=-1)
            codes.scatter_(-1, top_all.indices, top_all.values.clamp_min(0))
            block_max = codes.masked_fill(~keep[..., None], -math.inf).amax(1).numpy()
        np.testing.assert_allclose(plot.block_max, block_max, atol=1e-4)
        assert plot.block_sources == [b.source for b in blocks]
        firing = block_max > CONFIG.threshold
        assert c["lobes"]["firing_density"] == pytest.approx(firing.mean(), abs=1e-3)
        fired = (codes[keep] > 0).sum(0)  # every kept token of every block
        assert c["sae"]["dead_fraction"] == pytest.approx(float((fired == 0).double().mean()), abs=1e-12)
        # Held-out explained variance per source, and the PCA baseline by numpy's SVD of the training rows.
        sources = np.array([b.source for b in blocks])
        for source in SOURCES:
            rows = keep & (held & torch.from_numpy(sources == source))[:, None]
            xs = h[rows]
            with torch.no_grad():
                pre_s = (xs * scale - b_dec) @ w_enc.T + b_enc
                top_s = pre_s.topk(sae.k, dim=-1)
                xs_hat = (torch.zeros_like(pre_s).scatter(-1, top_s.indices, top_s.values.clamp_min(0)) @ w_dec
                          + b_dec) / scale
            ev_s = 1 - float(((xs - xs_hat) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum())
            assert c["sae"]["explained_variance_by_source"][source] == pytest.approx(ev_s, abs=1e-4)
        train_rows = h[keep & ~held[:, None]].numpy()
        mu = train_rows.mean(0)
        p = np.linalg.svd(train_rows - mu, full_matrices=False)[2][: sae.k]
        xn = x.numpy()
        recon = mu + (xn - mu) @ p.T @ p
        pca = 1 - ((xn - recon) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
        assert c["sae"]["pca_explained_variance"]["heldout"] == pytest.approx(pca, abs=1e-6)
        fresh = c["sae"]["explained_variance_fresh"]
        assert fresh["n_blocks"] == 3 * CONFIG.fresh_blocks and math.isfinite(fresh["explained_variance"])
        assert set(fresh["by_source"]) == set(SOURCES)
        assert set(c) == {"sae", "lobes", "crystals", "firing_threshold", "threshold_sweep", "powerlaw_alpha"}
        assert {"n_features", "l0", "explained_variance", "dead_fraction"} <= set(c["sae"])
        lobes = c["lobes"]
        assert {"library", "study", "k_sweep", "over_seeds", "mixed_blocks"} <= set(lobes)
        assert lobes["library"]["ami"] == lobes["ami"]  # the flat keys are the library's recipe
        assert lobes["k_sweep"]["k"] == [2, 4] and len(lobes["k_sweep"]["study"]) == 2
        assert len(lobes["over_seeds"]["study"]["ami"]["values"]) == 2
        assert set(lobes["mixed_blocks"]) == {"segments", "k", "single_source", "mixed"}
        # The study's firing matrix, phi + 1 and angular similarity, recomputed from the block maxima.
        study = lobes["study"]
        fires = firing.any(axis=0)
        np.testing.assert_array_equal(plot.labels["study_features"], np.flatnonzero(fires))
        assert study["n_features"] == int(fires.sum())
        thresholds = [row["threshold"] for row in c["threshold_sweep"]]
        assert thresholds == sorted({0.25, 0.5, 1.0, math.sqrt(sae.d_in / sae.k)})
        for row in c["threshold_sweep"]:
            assert row["firing_density"] == pytest.approx((block_max > row["threshold"]).mean(), abs=1e-3)
        assert {"k", "affinity", "ami", "ami_null_mean", "ami_null_sd", "logreg_accuracy", "chance",
                "lobe_by_source"} <= set(c["lobes"])
        assert c["lobes"]["k"] == 3 and c["lobes"]["affinity"] == "phi" and math.isfinite(c["lobes"]["ami"])
        assert sum(v["n_features"] for v in c["lobes"]["lobe_by_source"].values()) == c["lobes"]["n_features"]
        assert set(c["crystals"]) >= {"activations", "features", "n_pairs"} and c["crystals"]["n_pairs"] == 72
        assert set(c["powerlaw_alpha"]) == {"features", "activations"}


def test_concepts_through_run_benchmark_json_tables_and_plots(loaded, tmp_path, monkeypatch):
    import gsam_monitor.eval.concepts as concepts

    monkeypatch.setattr(concepts, "default_documents", lambda seed=0: _documents())
    dev = load_corpus("sst2_dev")
    corpus = Corpus("dev8", dev.sentences[:8], dev.labels[:8], "", "")
    results = run_benchmark(["tiny:bert"], corpus, device="cpu", analyses="concepts",
                            concepts=ConceptsConfig(**{**CONFIG.__dict__, "layers": None}))
    layers = results[0].layers
    assert [i for i, layer in enumerate(layers) if "concepts" in layer] == [1]  # the middle of 2 blocks
    assert not any("analyses" in layer for layer in layers)
    document = json.loads(json.dumps(build_results("token", corpus, results)))
    assert set(document["models"][0]["layers"][1]["concepts"]) == {"sae", "lobes", "crystals", "firing_threshold",
                                                                   "threshold_sweep", "powerlaw_alpha"}
    table = format_table("token", corpus, results)
    assert "concepts: tiny:bert" in table and "lobe x source" in table
    written = {p.name for p in write_plots("token", results, tmp_path)}
    assert {"concepts_lobes_tiny_bert_layer_1.png", "concepts_crystals_tiny_bert_layer_1.png",
            "concepts_powerlaw_tiny_bert.png", "concepts_sweeps_tiny_bert_layer_1.png"} <= written


def test_concepts_is_named_only_and_layers_parse():
    assert parse_analyses("all") == ANALYSES
    assert parse_analyses("all,concepts") == (*ANALYSES, "concepts")
    assert parse_analyses("concepts") == ("concepts",)
    with pytest.raises(ValueError, match=r"got unknown 'concept'; also concepts \(run only when named\)"):
        parse_analyses("concept")
    assert parse_layers(None) is None and parse_layers("all") == (-1,) and parse_layers("5,1,3") == (1, 3, 5)
    with pytest.raises(ValueError, match="--layers: expected comma-separated hidden-state indices"):
        parse_layers("1,x")
    with pytest.raises(ValueError, match="--layers: expected comma-separated hidden-state indices"):
        parse_layers("-1")


def test_concepts_config_and_cli_errors(loaded, capsys):
    with pytest.raises(ValueError, match="concepts epochs: expected a positive integer"):
        ConceptsConfig(epochs=0)
    with pytest.raises(ValueError, match=r"^concepts n_lobes: expected at least 2 lobes, got 1$"):
        ConceptsConfig(n_lobes=1)
    with pytest.raises(ValueError, match="concepts affinity: expected one of simple_matching"):
        ConceptsConfig(affinity="cosine")
    with pytest.raises(ValueError, match="concepts heldout_every: expected at least 2"):
        ConceptsConfig(heldout_every=1)
    with pytest.raises(ValueError, match=r"--layers: tiny:bert has hidden states 0..2, got \[7\]"):
        run_concepts(loaded, ConceptsConfig(layers=(7,)), documents=_documents())
    errors = (
        (["--layers", "a"], "--layers: expected comma-separated"),
        (["--concept-blocks", "0"], "--concept-blocks: expected a positive"),
        (["--sae-seeds", "0"], "--sae-seeds: expected a positive number of SAEs per layer, got 0; e.g. --sae-seeds 3"),
        (["--concept-threshold", "-1"], "--concept-threshold: expected a non-negative activation"),
        (["--protocol", "paper"], "the analyses run in the token protocol"),
    )
    for argv, message in errors:
        with pytest.raises(SystemExit):
            main(["--model", "tiny:bert", "--analyses", "concepts", *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "tiny:bert", "--layers", "3", "--concept-threshold", "1"])
    assert "--layers, --concept-threshold: apply to --analyses concepts only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "tiny:bert", "--sae-seeds", "3", "--save-artifacts", "out"])
    assert "--sae-seeds, --save-artifacts: apply to --analyses concepts only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "tiny:bert", "--layers", "3"])
    assert "--layers: applies to --analyses concepts only" in capsys.readouterr().err


def test_short_context_models_get_shorter_blocks(loaded):
    config = ConceptsConfig(**{**CONFIG.__dict__, "block_size": 256, "layers": (2,), "epochs": 1,
                               "blocks_per_source": 2})
    shorter = "takes at most 128 tokens; blocks of 128 tokens are used instead of 256"
    skipped = "the library's lobes are skipped"
    with pytest.warns(UserWarning, match=shorter), pytest.warns(UserWarning, match=skipped):
        results, plots = run_concepts(loaded, config, documents=_documents())
    assert plots[2].block_max.shape[0] == 6  # 2 blocks per source
    lobes = results[2]["concepts"]["lobes"]
    assert math.isnan(lobes["ami"]) and lobes["lobe_by_source"] == {}
    assert lobes["study"]["n_features"] >= lobes["n_features"]  # the study's recipe clusters every firing feature


def test_artifacts_recompute_the_reported_numbers_and_the_default_threshold_matches_the_study_rate(loaded, tmp_path):
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.metrics import adjusted_mutual_info_score, silhouette_score

    config = ConceptsConfig(**{**CONFIG.__dict__, "layers": (2,), "threshold": None, "sae_seeds": 2,
                               "save_artifacts": str(tmp_path / "art")})
    results, _ = run_concepts(loaded, config, documents=_documents())
    c = results[2]["concepts"]
    files = sorted((tmp_path / "art").iterdir())
    assert [f.name for f in files] == ["concepts_tiny_bert_layer_2.npz"]
    art = np.load(files[0])
    # 1. The firing density, from the saved block maxima and threshold.
    assert float(art["threshold"]) == c["lobes"]["threshold"] == c["firing_threshold"]["value"]
    firing = art["block_max"] > art["threshold"]
    assert c["lobes"]["firing_density"] == pytest.approx(firing.mean(), abs=1e-12)
    np.testing.assert_array_equal(art["segment_max"].max(axis=1), art["block_max"])
    # The study's recipe clusters every feature that fires in at least one block, and only those.
    np.testing.assert_array_equal(art["study_features"], np.flatnonzero(firing.any(axis=0)))
    assert 0 < c["lobes"]["study"]["n_features"] == art["study_features"].size < firing.shape[1]
    # 2. The study's AMI, from the saved labels.
    ami = adjusted_mutual_info_score(art["study_lobes"], art["study_geometry"])
    assert c["lobes"]["study"]["ami"]["ami"] == pytest.approx(ami, abs=1e-12)
    # 3. The supervised crystals' in-sample silhouette, from the word-pair vectors.
    diffs = art["word_activations"][art["pair_b"]] - art["word_activations"][art["pair_a"]]
    y = np.unique(art["relations"], return_inverse=True)[1]
    projected = LinearDiscriminantAnalysis(n_components=2).fit_transform(diffs, y)
    assert c["crystals"]["supervised"]["activations"]["in_sample"]["2"] == pytest.approx(
        silhouette_score(projected, y), abs=1e-9)
    # The default threshold: activations above it per token and feature are the study's rate, counted
    # here from the saved SAE's codes on every kept token.
    blocks = build_blocks(loaded.tokenizer, _documents(), config.blocks_per_source, block_size=config.block_size,
                          blocks_per_document={"code": config.code_blocks_per_file})
    ids = torch.tensor([b.input_ids for b in blocks])
    keep = ~torch.tensor([b.special for b in blocks])
    with torch.no_grad():
        h = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states[2][keep].double()
    w_enc, b_enc = torch.from_numpy(art["sae0_W_enc"]).double(), torch.from_numpy(art["sae0_b_enc"]).double()
    pre = (h * float(art["sae0_scale"]) - torch.from_numpy(art["sae0_b_dec"]).double()) @ w_enc.T + b_enc
    values = pre.topk(int(art["k"]), dim=-1).values.clamp_min(0).numpy()
    target = STUDY_ACTIVATION_RATE * h.shape[0] * w_enc.shape[0]
    t = float(art["threshold"])
    assert (values > t + 0.02).sum() <= target <= (values > t - 0.02).sum()
    assert c["firing_threshold"]["activation_rate"] == pytest.approx(STUDY_ACTIVATION_RATE, rel=1e-6)
    spread = c["lobes"]["over_seeds"]["sae_seeds"]
    assert spread["n"] == 2 and len(spread["explained_variance"]["values"]) == 2 and "sae1_W_dec" in art
    assert math.isnan(c["sae"]["explained_variance_fresh"]["explained_variance"])  # no fresh text given


def test_a_blocks_kept_tokens_are_cut_into_equal_thirds():
    from gsam_monitor.eval.concepts import _segments

    keep = torch.tensor([[False, True, True, True, True, True, True, False, False],
                         [True, True, True, True, True, True, True, False, False]])
    assert _segments(keep, 3).tolist() == [0, 0, 1, 1, 2, 2, 0, 0, 0, 1, 1, 2, 2]  # 6 kept, then 7
