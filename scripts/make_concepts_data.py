"""Make the prose file of the concept-geometry corpus (``--analyses concepts``).

Reads the GLUE SST-2 ``train.tsv`` (columns ``sentence`` and ``label``) and writes
``gsam_monitor/data/concepts_prose.tsv``: the first 2,500 train rows, in GLUE order, with at
least 10 whitespace tokens (``len(sentence.split()) >= 10``: whole review sentences, not the
short phrases that fill SST-2 train), copied byte for byte with their labels. The concept
analysis joins them into one running text and cuts it into 256-token blocks. The provenance
(source, license, rule, sha256) is the "Concept-geometry corpus" section of
``gsam_monitor/data/PROVENANCE.md``; a test re-derives the file whenever the source folder is
present.

Usage::

    python scripts/make_concepts_data.py [--source ../shared/data/sst2] [--out gsam_monitor/data]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from make_corpus import DEFAULT_SOURCE, read_rows, to_tsv  # noqa: E402

DEFAULT_OUT = REPO / "gsam_monitor" / "data"
FILE_NAME = "concepts_prose.tsv"
N_ROWS = 2_500
MIN_WORDS = 10


def derive(source: Path) -> bytes:
    """The bytes of ``concepts_prose.tsv`` from the SST-2 source folder."""
    rows = [row for row in read_rows(source / "train.tsv") if len(row[0].split()) >= MIN_WORDS]
    return to_tsv(rows[:N_ROWS])


def main(argv: list[str] | None = None) -> None:
    """Write ``concepts_prose.tsv`` and print its row count and sha256."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    data = derive(args.source)
    (args.out / FILE_NAME).write_bytes(data)
    n_rows = data.count(b"\n") - 1
    print(f"wrote {args.out / FILE_NAME}: {n_rows} rows, sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
