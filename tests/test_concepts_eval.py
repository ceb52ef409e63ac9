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

from gsam_monitor.analysis.concepts import LayerCapture, build_blocks, math_documents
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
                        threshold=0.5, min_blocks=2, n_null=10, n_random=2, heldout_every=3, seed=0)


def _documents():
    prose = load_corpus("sst2_dev").sentences[:120]  # the default takes sst2_train: slower to load
    code = (Document("code", f"f{i}.py", f"def f{i}(x, y):\n    return x * {i} + y  # step {i}\n" * 12)
            for i in range(20))
    return {"prose": [Document("prose", "sst2", " ".join(prose))], "code": code, "math": math_documents(0)}


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
    results, plots = run_concepts(loaded, CONFIG, documents=_documents())
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
        assert set(c) == {"sae", "lobes", "crystals", "powerlaw_alpha"}
        assert {"n_features", "l0", "explained_variance", "dead_fraction"} <= set(c["sae"])
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
    assert set(document["models"][0]["layers"][1]["concepts"]) == {"sae", "lobes", "crystals", "powerlaw_alpha"}
    table = format_table("token", corpus, results)
    assert "concepts: tiny:bert" in table and "lobe x source" in table
    written = {p.name for p in write_plots("token", results, tmp_path)}
    assert {"concepts_lobes_tiny_bert_layer_1.png", "concepts_crystals_tiny_bert_layer_1.png",
            "concepts_powerlaw_tiny_bert.png"} <= written


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
        main(["--model", "tiny:bert", "--layers", "3"])
    assert "--layers: applies to --analyses concepts only" in capsys.readouterr().err


def test_short_context_models_get_shorter_blocks(loaded):
    config = ConceptsConfig(**{**CONFIG.__dict__, "block_size": 256, "layers": (2,), "epochs": 1,
                               "blocks_per_source": 2})
    shorter = "takes at most 128 tokens; blocks of 128 tokens are used instead of 256"
    with pytest.warns(UserWarning, match=shorter), pytest.warns(UserWarning, match="the lobes are skipped"):
        results, plots = run_concepts(loaded, config, documents=_documents())
    assert plots[2].block_max.shape[0] == 6  # 2 blocks per source
    lobes = results[2]["concepts"]["lobes"]
    assert math.isnan(lobes["ami"]) and lobes["lobe_by_source"] == {}
