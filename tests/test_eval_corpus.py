"""Bundled corpus files (provenance, selection rules) and ``load_corpus`` on user files."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import re
from pathlib import Path

import pytest

from gsam_monitor.eval.corpus import BUNDLED_CORPORA, bundled_path, load_corpus

DATA = Path(__file__).resolve().parents[1] / "gsam_monitor" / "data"
# The SST-2 source lives beside the repository in this workspace only; CI has no copy.
SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def _provenance_hashes() -> dict[str, str]:
    text = (DATA / "PROVENANCE.md").read_text(encoding="utf-8")
    return dict(re.findall(r"\| `(sst2_\w+\.tsv(?:\.xz)?)` \|.*\| `([0-9a-f]{64})` \|", text))


def test_provenance_lists_the_sha256_of_every_bundled_file():
    hashes = _provenance_hashes()
    files = {name: bundled_path(name).name for name in BUNDLED_CORPORA}
    assert sorted(hashes) == sorted(files.values())
    assert files["sst2_train"] == "sst2_train.tsv.xz"
    for name, file in files.items():
        assert bundled_path(name).parent == DATA
        data = (DATA / file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == hashes[file]
        assert load_corpus(name).sha256 == hashes[file]


def test_provenance_gives_the_sha256_of_the_uncompressed_train_text():
    text = (DATA / "PROVENANCE.md").read_text(encoding="utf-8")
    (digest,) = re.findall(r"uncompressed text .*?sha256 `([0-9a-f]{64})`", text, flags=re.S)
    assert hashlib.sha256(lzma.decompress((DATA / "sst2_train.tsv.xz").read_bytes())).hexdigest() == digest


def test_provenance_cites_source_and_license():
    text = (DATA / "PROVENANCE.md").read_text(encoding="utf-8")
    for needle in ("Socher", "2013", "GLUE", "Wang", "2018", "License", "10–30"):
        assert needle in text


@pytest.mark.parametrize(
    ("name", "rows"),
    [("sst2_300_filtered", 300), ("sst2_300_first", 300), ("sst2_dev", 872), ("sst2_train", 67_349)],
)
def test_bundled_corpora_sizes_and_labels(name, rows):
    corpus = load_corpus(name)
    assert corpus.name == name
    assert len(corpus) == len(corpus.sentences) == rows
    assert corpus.labels is not None and set(corpus.labels) == {0, 1}
    assert len(corpus.labels) == rows


def test_filtered_corpus_is_10_to_30_whitespace_tokens():
    counts = [len(s.split()) for s in load_corpus("sst2_300_filtered").sentences]
    assert min(counts) >= 10 and max(counts) <= 30


def test_first_corpus_is_unfiltered_and_starts_with_glue_order():
    corpus = load_corpus("sst2_300_first")
    assert corpus.sentences[0].strip() == "hide new secretions from the parental units"
    assert corpus.sentences[1].strip() == "contains no wit , only labored gags"
    # The unfiltered head of SST-2 train is full of short phrases.
    assert min(len(s.split()) for s in corpus.sentences) < 10


@pytest.mark.skipif(not SOURCE.is_dir(), reason=f"SST-2 source folder {SOURCE} is absent")
def test_bundled_files_equal_a_fresh_derivation_from_the_source():
    def rows(path: Path) -> list[str]:
        lines = path.read_text(encoding="utf-8").split("\n")
        assert lines[0] == "sentence\tlabel"
        return [line for line in lines[1:] if line]

    train, dev = rows(SOURCE / "train.tsv"), rows(SOURCE / "dev.tsv")
    header = "sentence\tlabel\n"
    expected = {
        "sst2_300_filtered": [r for r in train if 10 <= len(r.split("\t")[0].split()) <= 30][:300],
        "sst2_300_first": train[:300],
        "sst2_dev": dev,
    }
    for name, selected in expected.items():
        fresh = (header + "".join(line + "\n" for line in selected)).encode("utf-8")
        assert (DATA / f"{name}.tsv").read_bytes() == fresh, name
    # The compressed train split decompresses to the source file byte for byte.
    assert lzma.decompress((DATA / "sst2_train.tsv.xz").read_bytes()) == (SOURCE / "train.tsv").read_bytes()


def test_train_corpus_starts_with_glue_order_and_holds_the_300_first():
    train = load_corpus("sst2_train")
    first = load_corpus("sst2_300_first")
    assert train.sentences[:300] == first.sentences
    assert train.labels[:300] == first.labels
    assert train.sentences[0].strip() == "hide new secretions from the parental units"


@pytest.mark.parametrize(("suffix", "compress"), [(".gz", gzip.compress), (".xz", lzma.compress)])
def test_compressed_user_files_are_read_as_their_inner_type(tmp_path, suffix, compress):
    tsv = tmp_path / f"data.tsv{suffix}"
    tsv.write_bytes(compress(b"sentence\tlabel\ngood film\t1\nbad film\t0\n"))
    corpus = load_corpus(tsv)
    assert corpus.sentences == ("good film", "bad film")
    assert corpus.labels == (1, 0)
    assert corpus.sha256 == hashlib.sha256(tsv.read_bytes()).hexdigest()  # of the bytes as stored
    txt = tmp_path / f"lines.txt{suffix}"
    txt.write_bytes(compress(b"one\n\ntwo\n"))
    assert load_corpus(txt).sentences == ("one", "two")
    assert load_corpus(txt).labels is None


@pytest.mark.parametrize("suffix", [".gz", ".xz"])
def test_corrupt_compressed_file_is_a_clear_error(tmp_path, suffix):
    path = tmp_path / f"data.tsv{suffix}"
    path.write_bytes(b"not compressed at all\n")
    with pytest.raises(ValueError, match=rf"could not decompress .*as {suffix[1:]}.*drop the '\{suffix}' suffix"):
        load_corpus(path)


def test_text_file_one_sentence_per_line_skips_blank_lines(tmp_path):
    path = tmp_path / "sentences.txt"
    path.write_text("first sentence\n\n  \nsecond one\r\nthird\n", encoding="utf-8")
    corpus = load_corpus(path)
    assert corpus.sentences == ("first sentence", "second one", "third")
    assert corpus.labels is None
    assert corpus.name == str(path)
    assert corpus.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_tsv_with_label_column(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("id\ttext\tlabel\n1\tgood film\tpos\n2\tbad film\tneg\n", encoding="utf-8")
    corpus = load_corpus(str(path))
    assert corpus.sentences == ("good film", "bad film")
    assert corpus.labels == ("pos", "neg")


def test_tsv_integer_labels_become_ints(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("label\tsentence\n1\tgood\n0\tbad\n", encoding="utf-8")
    assert load_corpus(path).labels == (1, 0)


def test_missing_corpus_file():
    with pytest.raises(FileNotFoundError, match=r"corpus: file .*nope\.txt' does not exist"):
        load_corpus("/nonexistent/nope.txt")


def test_unknown_bundled_name():
    with pytest.raises(ValueError, match="expected one of sst2_300_filtered"):
        bundled_path("sst2_999")


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_corpus(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=r"expected at least one sentence .* got none"):
        load_corpus(path)


def test_header_only_tsv_is_empty(tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text("sentence\tlabel\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected at least one sentence"):
        load_corpus(path)


def test_unreadable_corpus_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"expected UTF-8 text .* undecodable bytes at offset 3"):
        load_corpus(path)


def test_unreadable_corpus_directory(tmp_path):
    with pytest.raises(ValueError, match="expected a file, got the directory"):
        load_corpus(tmp_path)


def test_unreadable_corpus_os_error(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("a sentence\n", encoding="utf-8")

    def refuse(self):
        raise PermissionError("Permission denied")

    # Tests may run as root, where chmod 000 does not stop reads; simulate the refusal.
    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ValueError, match=r"could not read .*Permission denied"):
        load_corpus(path)


def test_tsv_without_label_column(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("sentence\tscore\na\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected a header row with a 'label' column"):
        load_corpus(path)


def test_tsv_with_only_a_label_column(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("label\n1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected a sentence column beside 'label'"):
        load_corpus(path)


def test_tsv_ragged_row(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("sentence\tlabel\na b\t1\nc\td\t0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"expected 2 tab-separated fields .* line 3, got 3"):
        load_corpus(path)
