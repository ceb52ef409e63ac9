"""Concept-geometry building blocks (``gsam_monitor.analysis.concepts``) against independent computations.

Affinities against hand-computed counts, co-occurrence against a brute-force loop, AMI and
its null against ``sklearn.metrics``, LDA against ``sklearn.discriminant_analysis``, the SAE's
explained variance against a direct fp64 numpy computation, the power law against
``scipy.stats.linregress``; all on small synthetic data.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from gsam_monitor.analysis.concepts import (
    AFFINITIES,
    BlockFiring,
    SAETrainer,
    TopKSAE,
    affinity,
    ami_with_null,
    build_blocks,
    code_documents,
    cooccurrence_counts,
    distractor_labels,
    evaluate_sae,
    geometry_clusters,
    lda_directions,
    load_word_pairs,
    lobe_by_source,
    lobe_from_geometry,
    math_documents,
    parallelogram_quality,
    point_cloud_powerlaw,
    prose_documents,
    remove_directions,
    spectral_lobes,
)
from gsam_monitor.analysis.concepts.sources import Document
from gsam_monitor.stats import LayerStats

sklearn = pytest.importorskip("sklearn")

DATA = Path(__file__).resolve().parents[1] / "gsam_monitor" / "data"


# ------------------------------------------------------------------------ affinities
def test_affinities_match_hand_computed_counts():
    # 6 blocks x 3 features. Feature 0 and 1: n11 = 2, n10 = 1, n01 = 1, n00 = 2.
    firing = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=bool)
    counts = cooccurrence_counts(firing)
    assert counts.n == 6
    np.testing.assert_array_equal(counts.fires, [3, 3, 2])
    np.testing.assert_array_equal(counts.both[0], [3, 2, 1])
    expected = {  # pair (0, 1): n11 2, n10 1, n01 1, n00 2; pair (0, 2): n11 1, n10 2, n01 1, n00 2
        "simple_matching": (4 / 6, 3 / 6),
        "jaccard": (2 / 4, 1 / 4),
        "dice": (4 / 6, 2 / 5),
        "overlap": (2 / 3, 1 / 2),
        "phi": ((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3), (1 * 2 - 2 * 1) / math.sqrt(3 * 3 * 2 * 4)),
    }
    for name, (a01, a02) in expected.items():
        a = affinity(counts, name)
        assert a[0, 1] == pytest.approx(a01, abs=1e-12) and a[1, 0] == pytest.approx(a01, abs=1e-12)
        assert a[0, 2] == pytest.approx(a02, abs=1e-12)


def test_phi_equals_the_pearson_correlation_of_the_firing_columns(rng):
    firing = rng.random((40, 7)) < 0.4
    phi = affinity(cooccurrence_counts(firing), "phi")
    np.testing.assert_allclose(phi, np.corrcoef(firing.T.astype(float)), atol=1e-12)


def test_undefined_affinities_are_zero():
    firing = np.array([[1, 0], [1, 0], [1, 1]], dtype=bool)  # feature 0 fires everywhere: phi 0/0
    counts = cooccurrence_counts(firing)
    assert affinity(counts, "phi")[0, 1] == 0.0
    never = cooccurrence_counts(np.zeros((4, 2), dtype=bool))
    for name in ("jaccard", "dice", "overlap", "phi"):
        assert np.all(affinity(never, name) == 0.0)


def test_unknown_affinity_is_refused():
    with pytest.raises(ValueError, match="affinity: expected one of simple_matching"):
        affinity(cooccurrence_counts(np.zeros((2, 2), dtype=bool)), "cosine")


def test_cooccurrence_counts_match_a_brute_force_count_on_a_toy_corpus(rng):
    m, threshold = 9, 0.7
    firing = BlockFiring(m, threshold)
    blocks = []  # (kept token activations, source) per block, for the brute force
    for batch in range(3):
        b, t = 4, 5 + batch
        codes = torch.from_numpy(rng.random((b, t, m)) * rng.integers(0, 2, (b, t, m)))
        keep = torch.from_numpy(rng.random((b, t)) < 0.7)
        keep[0, 0] = True
        keep[1] = False  # a block of padding only: nothing fires there
        sources = [f"s{(batch + i) % 2}" for i in range(b)]
        firing.update(codes, keep, sources)
        for i in range(b):
            blocks.append(([codes[i, j].numpy() for j in range(t) if keep[i, j]], sources[i]))
    counts = cooccurrence_counts(firing.matrix())
    both = np.zeros((m, m), dtype=int)
    for tokens, _ in blocks:
        fired = [f for f in range(m) if any(tok[f] > threshold for tok in tokens)]
        for f in fired:
            for g in fired:
                both[f, g] += 1
    np.testing.assert_array_equal(counts.both, both)
    np.testing.assert_array_equal(counts.fires, np.diag(both))
    assert counts.n == len(blocks) and firing.sources == [s for _, s in blocks]
    with pytest.raises(ValueError, match="expected 4 sources, one per block"):
        firing.update(torch.zeros(4, 2, m), torch.ones(4, 2, dtype=torch.bool), ["a"])
    with pytest.raises(ValueError, match=r"expected codes \(B, T, 9\)"):
        firing.update(torch.zeros(4, 2, 3), torch.ones(4, 2, dtype=torch.bool), ["a"] * 4)
    with pytest.raises(ValueError, match=r"block indices must lie in 0\.\.1"):
        firing.update_rows(torch.zeros(3, m), torch.tensor([0, 1, 2]), ["a", "b"])
    with pytest.raises(ValueError, match="n_features: expected a positive number"):
        BlockFiring(0, 1.0)


# ------------------------------------------------------------------------ lobes
def test_ami_and_null_match_sklearn(rng):
    from sklearn.metrics import adjusted_mutual_info_score

    a = rng.integers(0, 3, 120)
    b = np.where(rng.random(120) < 0.6, a, rng.integers(0, 3, 120))
    out = ami_with_null(a, b, n_null=30, seed=5)
    assert out["ami"] == pytest.approx(adjusted_mutual_info_score(a, b), abs=1e-12)
    shuffles = np.random.default_rng(5)
    null = np.array([adjusted_mutual_info_score(a, shuffles.permutation(b)) for _ in range(30)])
    assert out["null_mean"] == pytest.approx(null.mean(), abs=1e-12)
    assert out["null_sd"] == pytest.approx(null.std(ddof=1), abs=1e-12)
    assert out["z"] == pytest.approx((out["ami"] - null.mean()) / null.std(ddof=1), rel=1e-9)
    assert out["z"] > 5  # b copies 60% of a: far outside the shuffled null
    with pytest.raises(ValueError, match="two 1-d labelings of one length"):
        ami_with_null(a, b[:-1])
    with pytest.raises(ValueError, match="at least 2 shuffles"):
        ami_with_null(a, b, n_null=1)


def test_spectral_lobes_recover_planted_blocks_and_geometry_predicts_them(rng):
    lobes_true = np.repeat([0, 1, 2], 20)
    same = lobes_true[:, None] == lobes_true[None, :]
    aff = np.where(same, 0.6, 0.05) + 0.05 * rng.random((60, 60))
    aff = (aff + aff.T) / 2
    aff[0, 59] = aff[59, 0] = -0.5  # negative entries (as phi has) are clipped to 0
    found = spectral_lobes(aff, 3, seed=0)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(lobes_true, found) == pytest.approx(1.0)
    centres = rng.standard_normal((3, 16)) * 3
    directions = centres[lobes_true] + rng.standard_normal((60, 16))
    assert adjusted_rand_score(lobes_true, geometry_clusters(directions, 3, seed=0)) == pytest.approx(1.0)
    fit = lobe_from_geometry(directions, found, seed=0)
    assert fit["chance"] == pytest.approx(20 / 60)
    assert fit["accuracy"] > 0.9
    with pytest.raises(ValueError, match="at least 5 features for 5-fold"):
        lobe_from_geometry(directions[:12], np.r_[np.zeros(9), np.ones(3)].astype(int))
    with pytest.raises(ValueError, match="k: expected 2 <= k < number of features"):
        spectral_lobes(aff, 1)


def test_lobe_by_source_is_the_mean_firing_rate_per_source():
    firing = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=bool)
    sources = ["code", "code", "math", "prose"]
    table = lobe_by_source(firing, sources, np.array([0, 1, 0]), ("prose", "code", "math"))
    assert table["0"] == {"n_features": 2, "prose": 0.5, "code": 0.75, "math": 0.0}
    assert table["1"] == {"n_features": 1, "prose": 0.0, "code": 0.5, "math": 1.0}


# ------------------------------------------------------------------------ crystals
@pytest.mark.parametrize("shrinkage", [0.2, 0.7])
def test_lda_from_streamed_moments_matches_sklearn(rng, shrinkage):
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    d, classes = 12, 4
    y = rng.integers(0, classes, 300)
    x = rng.standard_normal((300, d)) @ rng.standard_normal((d, d)) + 2.0 * rng.standard_normal((classes, d))[y]
    per_class = []
    for c in range(classes):
        s = LayerStats(d, higher_moments=False)
        for chunk in np.array_split(x[y == c], 3):  # streamed in pieces
            s.update(torch.from_numpy(chunk))
        per_class.append(s)
    directions, evals = lda_directions(per_class, shrinkage)
    ref = LinearDiscriminantAnalysis(solver="eigen", shrinkage=shrinkage).fit(x, y)
    expected = ref.scalings_[:, : classes - 1]
    assert directions.shape == expected.shape == (d, classes - 1)
    signs = np.sign(np.sum(directions * expected, axis=0))  # eigenvectors are defined up to sign
    np.testing.assert_allclose(directions * signs, expected, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(x @ directions * signs, ref.transform(x), rtol=1e-7, atol=1e-8)
    assert np.all(np.diff(evals) <= 0)
    with pytest.raises(ValueError, match=r"shrinkage: expected a value in \(0, 1\]"):
        lda_directions(per_class, 0.0)
    with pytest.raises(ValueError, match="at least 2 classes with rows"):
        lda_directions(per_class[:1], 0.5)


def test_remove_directions_is_the_orthogonal_projection(rng):
    x = rng.standard_normal((10, 6))
    directions = rng.standard_normal((6, 2))
    out = remove_directions(x, directions)
    np.testing.assert_allclose(out @ directions, 0.0, atol=1e-12)
    q = scipy_orth(directions)
    np.testing.assert_allclose(out, x @ (np.eye(6) - q @ q.T), atol=1e-12)


def scipy_orth(a: np.ndarray) -> np.ndarray:
    import scipy.linalg

    return scipy.linalg.orth(a)


def test_parallelogram_quality_of_perfect_and_noisy_crystals(rng):
    offsets = {"r0": np.array([1.0, 0, 0, 0]), "r1": np.array([0, 1.0, 0, 0])}
    relations = ["r0"] * 4 + ["r1"] * 4
    a = rng.standard_normal((8, 4))
    b = a + np.stack([offsets[r] for r in relations])
    q = parallelogram_quality(a, b, relations)
    assert q["per_relation"] == {"r0": pytest.approx(1.0), "r1": pytest.approx(1.0)}
    assert q["within"] == pytest.approx(1.0) and q["across"] == pytest.approx(0.0, abs=1e-12)
    noisy_b = a + rng.standard_normal((8, 4))
    q2 = parallelogram_quality(a, noisy_b, relations)
    d = noisy_b - a
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    expected_r0 = np.mean([d[i] @ d[j] for i in range(4) for j in range(i + 1, 4)])
    assert q2["per_relation"]["r0"] == pytest.approx(expected_r0, abs=1e-12)


def test_analogy_accuracy_counts_nearest_words():
    # Each relation adds its own unit offset; a + mean offset lands exactly on b.
    a = np.eye(6)[:4] * 5
    b = a + np.array([0, 0, 0, 0, 1.0, 0])
    assert parallelogram_quality(a, b, ["r"] * 4)["analogy_accuracy"] == 1.0


def test_distractor_labels_bin_length_and_token_count():
    labels = distractor_labels(["ox", "paris", "cactus", "headmistress"], [1, 1, 3, 4])
    np.testing.assert_array_equal(labels["word_length"], [0, 1, 1, 3])
    np.testing.assert_array_equal(labels["token_count"], [1, 1, 3, 3])


# ------------------------------------------------------------------------ SAE
def _sparse_stream(rng, dictionary, n, k=3, offset=4.0):
    codes = np.zeros((n, dictionary.shape[0]))
    for row in codes:
        row[rng.choice(dictionary.shape[0], k, replace=False)] = rng.random(k) * 3
    return torch.from_numpy(codes @ dictionary + offset + 0.01 * rng.standard_normal((n, dictionary.shape[1]))).float()


def test_sae_learns_a_sparse_dictionary_and_reports_its_explained_variance(rng):
    d, m = 16, 48
    dictionary = rng.standard_normal((m, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    torch.manual_seed(0)
    sae = TopKSAE(d, 64, 6, seed=0)
    trainer = SAETrainer(sae, lr=3e-3, batch_size=256, buffer_rows=2048, dead_after=4096, seed=0)
    trainer.fit(_sparse_stream(rng, dictionary, 512) for _ in range(40))
    heldout = [_sparse_stream(rng, dictionary, 300) for _ in range(3)]
    quality = evaluate_sae(sae, heldout)
    # Direct fp64 computation with the SAE's weights, independent of its code paths.
    w_enc = sae.W_enc.detach().double().numpy()
    w_dec = sae.W_dec.detach().double().numpy()
    b_enc = sae.b_enc.detach().double().numpy()
    b_dec = sae.b_dec.detach().double().numpy()
    scale = float(sae.scale)
    x = torch.cat(heldout).double().numpy()
    pre = (x * scale - b_dec) @ w_enc.T + b_enc
    top = np.argsort(-pre, axis=1)[:, :6]
    z = np.zeros_like(pre)
    np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, axis=1), 0.0), axis=1)
    x_hat = (z @ w_dec + b_dec) / scale
    ev = 1.0 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert quality.explained_variance == pytest.approx(ev, abs=1e-4)
    assert quality.l0 == pytest.approx((z > 0).sum(1).mean(), abs=1e-9)
    assert quality.n_rows == 900
    np.testing.assert_array_equal(quality.fired.numpy(), (z > 0).sum(0))
    assert quality.dead_fraction == pytest.approx(((z > 0).sum(0) == 0).mean())
    untrained = TopKSAE(d, 64, 6, seed=0)
    untrained.init_from(heldout[0])
    assert ev > 0.6 and ev > evaluate_sae(untrained, heldout).explained_variance + 0.3
    np.testing.assert_allclose(np.linalg.norm(w_dec, axis=1), 1.0, atol=1e-6)


def test_sae_rejects_bad_sizes_and_empty_evaluation():
    with pytest.raises(ValueError, match="1 <= k <= n_features"):
        TopKSAE(8, 4, 5)
    with pytest.raises(ValueError, match="buffer_rows >= batch_size"):
        SAETrainer(TopKSAE(8, 16, 2), batch_size=64, buffer_rows=32)
    with pytest.raises(ValueError, match="no rows to evaluate"):
        evaluate_sae(TopKSAE(8, 16, 2), [torch.zeros(0, 8)])


def test_auxk_revives_features_that_never_fire(rng):
    d = 8
    x = torch.from_numpy(rng.standard_normal((2048, d))).float()
    dead = {}
    for coef in (0.0, 1.0 / 32.0):
        sae = TopKSAE(d, 32, 2, seed=1)
        with torch.no_grad():
            sae.b_enc[16:] = -2.0  # half the features start too low to win the top k
        trainer = SAETrainer(sae, lr=1e-2, batch_size=256, buffer_rows=2048, dead_after=512, aux_coef=coef)
        for _ in range(6):
            trainer.fit([x])
        dead[coef] = evaluate_sae(sae, [x]).dead_fraction
    assert dead[0.0] > 0.2 and dead[1.0 / 32.0] < dead[0.0] / 2


# ------------------------------------------------------------------------ galaxy
def test_point_cloud_powerlaw_matches_linregress_on_eigvalsh(rng):
    d, alpha = 200, 0.8
    points = rng.standard_normal((3000, d)) * np.arange(1, d + 1) ** (-alpha / 2)
    fit = point_cloud_powerlaw(points, (10, 150))
    lam = np.sort(np.linalg.eigvalsh(np.cov(points.T, bias=True)))[::-1]
    ranks = np.arange(10, 151)
    ref = stats.linregress(np.log(ranks), np.log(lam[ranks - 1]))
    assert fit["alpha"] == pytest.approx(-ref.slope, rel=1e-8)
    assert fit["alpha"] == pytest.approx(alpha, abs=0.15)


# ------------------------------------------------------------------------ corpus
class _CharTokenizer:
    """One token per character, [CLS]=1 and [SEP]=2 around a text, as a BERT tokenizer does."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = [10 + (ord(c) % 50) for c in text]
        return {"input_ids": [1, *ids, 2] if add_special_tokens else ids}


def test_build_blocks_cuts_full_blocks_with_special_tokens():
    docs = {"a": [Document("a", "x", "abcdefghij" * 3)], "b": [Document("b", "y", "0123456789" * 5)]}
    blocks = build_blocks(_CharTokenizer(), docs, 2, block_size=10, blocks_per_document={"b": 5})
    assert [b.source for b in blocks] == ["a", "a", "b", "b"]
    for block in blocks:
        assert len(block.input_ids) == 10 and block.input_ids[0] == 1 and block.input_ids[-1] == 2
        assert block.special == (True,) + (False,) * 8 + (True,)
    assert blocks[1].input_ids[1:-1] == tuple(10 + (ord(c) % 50) for c in "ijabcdef")
    with pytest.raises(ValueError, match="source 'a': its documents give 3 blocks of 10 tokens, 4 were asked"):
        build_blocks(_CharTokenizer(), docs, 4, block_size=10)
    with pytest.raises(ValueError, match="more than the 2 special tokens"):
        build_blocks(_CharTokenizer(), docs, 1, block_size=2)
    limited = build_blocks(_CharTokenizer(), {"b": [Document("b", "y", "0" * 40), Document("b", "z", "1" * 40)]}, 2,
                           block_size=10, blocks_per_document={"b": 1})
    assert [b.document for b in limited] == ["y", "z"]


def test_math_documents_are_seeded_and_correct():
    first = next(math_documents(3)).text
    assert first == next(math_documents(3)).text and first != next(math_documents(4)).text
    checked = 0
    for doc in [next(math_documents(seed)) for seed in range(5)]:
        for line in doc.text.splitlines():
            if re.fullmatch(r"[\d()+\-* /]+ = -?\d+", line):  # arithmetic: evaluate it
                left, right = line.split(" = ")
                assert eval(left.replace("/", "//")) == int(right), line  # integers only
                checked += 1
            elif line.startswith("solve "):
                m = re.fullmatch(r"solve (-?\d*)([xyznt]) ([+-]) (\d+) = (-?\d+) ; [xyznt] = (-?\d+)", line)
                if m:
                    a = int(m.group(1)) if m.group(1) not in ("", "-") else int(m.group(1) + "1")
                    b = int(m.group(4)) * (1 if m.group(3) == "+" else -1)
                    assert a * int(m.group(6)) + b == int(m.group(5)), line
                    checked += 1
    assert checked > 50


def test_code_documents_are_sorted_public_stdlib_files_without_docstrings(tmp_path):
    (tmp_path / "b.py").write_text('"""Module docstring."""\nimport os\nx = 1\n')
    (tmp_path / "a.py").write_text("y = 2\n")
    (tmp_path / "_private.py").write_text("z = 3\n")
    docs = list(code_documents(tmp_path))
    assert [d.name for d in docs] == ["a.py", "b.py"]
    assert docs[1].text == "import os\nx = 1\n"
    stdlib = list(code_documents())
    names = [d.name for d in stdlib]
    assert names == sorted(names) and not any(n.startswith("_") for n in names) and "argparse.py" in names
    with pytest.raises(ValueError, match="no Python files"):
        list(code_documents(tmp_path / "missing"))


def test_word_pairs_have_provenance():
    text = (DATA / "PROVENANCE.md").read_text(encoding="utf-8")
    hashes = dict(re.findall(r"\| `(concepts_\w+\.tsv)` \|.*\| `([0-9a-f]{64})` \|", text))
    assert hashes == {"concepts_word_pairs.tsv": hashlib.sha256((DATA / "concepts_word_pairs.tsv").read_bytes())
                      .hexdigest()}
    pairs = load_word_pairs()
    assert len(pairs) == 72
    assert {p.relation for p in pairs} == {"country_capital", "male_female", "singular_plural"}
    assert ("france", "paris") in {(p.a, p.b) for p in pairs if p.relation == "country_capital"}


def test_prose_is_the_first_long_sst2_train_sentences():
    from gsam_monitor.eval.corpus import load_corpus

    train = load_corpus("sst2_train").sentences
    (doc,) = prose_documents(train)
    expected = [s.strip() for s in train if len(s.split()) >= 10][:2500]
    assert doc.source == "prose" and doc.text == " ".join(expected)
    assert prose_documents(["one two", "a b c d"], min_words=3, n_sentences=5)[0].text == "a b c d"
    with pytest.raises(ValueError, match="no sentence of at least 10 words"):
        prose_documents(["too short"])


def test_word_pair_files_are_checked(tmp_path):
    bad = tmp_path / "pairs.tsv"
    bad.write_text("relation\tleft\tright\nr\ta\tb\n")
    with pytest.raises(ValueError, match="expected columns relation, a, b"):
        load_word_pairs(bad)
    empty = tmp_path / "empty.tsv"
    empty.write_text("relation\ta\tb\n")
    with pytest.raises(ValueError, match="no pairs"):
        load_word_pairs(empty)


def test_every_affinity_name_is_computable():
    counts = cooccurrence_counts(np.eye(4, dtype=bool)[[0, 1, 2, 3, 0, 1]])
    for name in AFFINITIES:
        a = affinity(counts, name)
        assert a.shape == (4, 4) and np.allclose(a, a.T)
