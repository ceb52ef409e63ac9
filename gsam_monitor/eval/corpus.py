"""Corpus loading for the GSAM benchmark.

A corpus is a list of sentences (optionally labelled) plus a name and the sha256 of the file
it came from, so that every result can say exactly what it was computed on. Four corpora are
bundled under ``gsam_monitor/data/`` (derived from GLUE SST-2 by ``scripts/make_corpus.py``;
see ``gsam_monitor/data/PROVENANCE.md``):

- ``sst2_300_filtered``: the first 300 SST-2 train rows of 10–30 whitespace tokens (default);
- ``sst2_300_first``: the first 300 SST-2 train rows, unfiltered (the original code's corpus);
- ``sst2_dev``: the 872 labelled SST-2 dev rows;
- ``sst2_train``: all 67,349 labelled SST-2 train rows (xz-compressed), the examples' training text.

Users may pass a path instead: a ``.tsv`` file with a header row and a ``label`` column (the
sentence column is ``sentence`` or ``text``, else the first other column), or any other text
file with one sentence per line (blank lines are skipped). Either may be compressed
(``.gz``, ``.xz``: ``data.tsv.gz`` is read as a TSV).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import lzma
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["BUNDLED_CORPORA", "Corpus", "bundled_path", "load_corpus"]

logger = logging.getLogger(__name__)

#: Names accepted by ``load_corpus`` for the files bundled with the package.
BUNDLED_CORPORA: tuple[str, ...] = ("sst2_300_filtered", "sst2_300_first", "sst2_dev", "sst2_train")

# File of each bundled corpus inside gsam_monitor/data (the large one ships compressed).
_BUNDLED_FILES = {name: f"{name}.tsv" for name in BUNDLED_CORPORA} | {"sst2_train": "sst2_train.tsv.xz"}
_DECOMPRESS = {".gz": gzip.decompress, ".xz": lzma.decompress}

_SENTENCE_COLUMNS = ("sentence", "text")


@dataclass(frozen=True)
class Corpus:
    """Sentences to run the benchmark on, with where they came from.

    Attributes:
        name: the bundled name, or the file path as given.
        sentences: the sentences, in file order.
        labels: one label per sentence (ints when every label is an integer), or ``None``.
        sha256: hex sha256 of the file's bytes.
        path: the file the corpus was read from.
    """

    name: str
    sentences: tuple[str, ...]
    labels: tuple[int | str, ...] | None
    sha256: str
    path: str

    def __len__(self) -> int:
        return len(self.sentences)


def bundled_path(name: str) -> Path:
    """Path of a bundled corpus file.

    Args:
        name: one of :data:`BUNDLED_CORPORA`.

    Returns:
        The ``.tsv`` (or ``.tsv.xz``) file inside the installed package.

    Raises:
        ValueError: if ``name`` is not a bundled corpus.
    """
    if name not in BUNDLED_CORPORA:
        raise ValueError(
            f"corpus: expected one of {', '.join(BUNDLED_CORPORA)}, got {name!r}"
        )
    return Path(str(resources.files("gsam_monitor") / "data" / _BUNDLED_FILES[name]))


def load_corpus(name_or_path: str | Path) -> Corpus:
    """Load a bundled corpus by name, or a user's text or TSV file.

    Args:
        name_or_path: a name from :data:`BUNDLED_CORPORA`; a ``.tsv`` file whose header has a
            ``label`` column; or a text file with one sentence per line; either may end in
            ``.gz`` or ``.xz`` (decompressed on reading).

    Returns:
        The ``Corpus``, with the sha256 of the file's bytes (as stored: compressed files
        are hashed compressed).

    Raises:
        FileNotFoundError: if the path does not exist.
        ValueError: if the file cannot be read (or decompressed) as UTF-8 text, is a directory,
            has a malformed TSV header or row, or contains no sentences.
    """
    if isinstance(name_or_path, str) and name_or_path in BUNDLED_CORPORA:
        path, name = bundled_path(name_or_path), name_or_path
    else:
        path, name = Path(name_or_path).expanduser(), str(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"corpus: file {str(path)!r} does not exist; pass one of the bundled corpora "
            f"({', '.join(BUNDLED_CORPORA)}), a text file with one sentence per line, or a "
            f".tsv file with a 'label' column"
        )
    if path.is_dir():
        raise ValueError(
            f"corpus: expected a file, got the directory {str(path)!r}; pass the text or .tsv "
            f"file inside it"
        )
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(
            f"corpus: could not read {str(path)!r} ({err}); check the file's permissions"
        ) from err
    suffix = path.suffix.lower()
    raw = data
    if suffix in _DECOMPRESS:
        try:
            raw = _DECOMPRESS[suffix](data)
        except (OSError, EOFError, lzma.LZMAError) as err:
            raise ValueError(
                f"corpus: could not decompress {str(path)!r} as {suffix[1:]} ({err}); check that the "
                f"file is complete, or drop the {suffix!r} suffix if it is not compressed"
            ) from err
        suffix = Path(path.stem).suffix.lower()  # data.tsv.xz is read as a .tsv
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"corpus: expected UTF-8 text in {str(path)!r}, got undecodable bytes at offset "
            f"{err.start}; convert the file to UTF-8 (e.g. with iconv)"
        ) from err
    if suffix == ".tsv":
        sentences, labels = _parse_tsv(text, path)
    else:
        sentences = [line for line in text.splitlines() if line.strip()]
        labels = None
    if not sentences:
        raise ValueError(
            f"corpus: expected at least one sentence in {str(path)!r}, got none (the file is "
            f"empty or holds only blank lines or a header)"
        )
    digest = hashlib.sha256(data).hexdigest()
    logger.info("corpus %s: %d sentences, sha256 %s", name, len(sentences), digest)
    return Corpus(
        name=name,
        sentences=tuple(sentences),
        labels=None if labels is None else tuple(labels),
        sha256=digest,
        path=str(path),
    )


def _parse_tsv(text: str, path: Path) -> tuple[list[str], list[int | str]]:
    """Split a TSV with a header row into sentences and labels (no quoting, like GLUE)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return [], []
    header = lines[0].split("\t")
    if "label" not in header:
        raise ValueError(
            f"corpus: expected a header row with a 'label' column in {str(path)!r}, got "
            f"{header!r}; add a header such as 'sentence<TAB>label', or rename the file to .txt "
            f"to read it as one sentence per line"
        )
    label_col = header.index("label")
    others = [i for i, col in enumerate(header) if i != label_col]
    if not others:
        raise ValueError(
            f"corpus: expected a sentence column beside 'label' in {str(path)!r}, got {header!r}"
        )
    named = [header.index(col) for col in _SENTENCE_COLUMNS if col in header]
    sentence_col = named[0] if named else others[0]
    sentences: list[str] = []
    raw_labels: list[str] = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(
                f"corpus: expected {len(header)} tab-separated fields in {str(path)!r} line "
                f"{number}, got {len(fields)}; tabs inside sentences are not supported"
            )
        sentences.append(fields[sentence_col])
        raw_labels.append(fields[label_col].strip())
    try:
        labels: list[int | str] = [int(label) for label in raw_labels]
    except ValueError:
        labels = list(raw_labels)
    return sentences, labels
