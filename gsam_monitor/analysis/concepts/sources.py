"""A corpus with sources for the concept analysis: prose, code and math, cut into token blocks.

Lobes can only specialise if the corpus mixes kinds of text, so the corpus has three sources
(the study used the Pile's sources; these are what a package can ship or build offline):

- ``prose``: review sentences, joined into one running text (``prose_documents``; the eval
  takes the first 2,500 SST-2 train sentences of at least 10 words from the bundled
  ``sst2_train`` corpus);
- ``code``: Python source read at run time from the standard library of the running
  interpreter: the top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]`` whose names
  do not start with ``_``, in sorted order, each from its first statement after the module
  docstring (the docstring is prose); the eval takes at most 2 blocks per file, so that many
  modules are sampled. The selection depends on the Python version;
- ``math``: a seeded generator of arithmetic and algebra problems with their answers
  (``math_documents``), one per line.

``build_blocks`` tokenizes each document without special tokens and cuts it into full
blocks of ``block_size`` tokens including the tokenizer's special tokens (256 as in the
study: ``[CLS]`` + 254 + ``[SEP]`` for BERT); a document's last, partial block is dropped, so
every block has the same length and co-occurrence counts are comparable across sources.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BLOCK_SIZE",
    "SOURCES",
    "Block",
    "Document",
    "build_blocks",
    "code_documents",
    "math_documents",
    "prose_documents",
]

#: Source names, in the order of every table.
SOURCES: tuple[str, ...] = ("prose", "code", "math")

#: Tokens per block, special tokens included (the study's 256).
BLOCK_SIZE = 256


@dataclass(frozen=True)
class Document:
    """One document of one source.

    Attributes:
        source: one of :data:`SOURCES` (or any name a caller uses).
        name: where it came from (a file name, ``"sst2"``, ``"math-3"``).
        text: the text.
    """

    source: str
    name: str
    text: str


@dataclass(frozen=True)
class Block:
    """One block of token ids, ready for the model.

    Attributes:
        source: the document's source.
        document: the document's name.
        input_ids: ``block_size`` token ids, special tokens included.
        special: per position, whether the token is a special token (dropped from the
            statistics like padding).
    """

    source: str
    document: str
    input_ids: tuple[int, ...]
    special: tuple[bool, ...]


def prose_documents(sentences: Iterable[str], *, n_sentences: int = 2_500, min_words: int = 10,
                    name: str = "sst2") -> list[Document]:
    """The first ``n_sentences`` sentences of at least ``min_words`` whitespace tokens, as one text.

    Whole review sentences, not the short phrases that fill SST-2 train, joined by spaces into
    one running text that ``build_blocks`` cuts into blocks.

    Args:
        sentences: candidate sentences, in order.
        n_sentences: sentences kept.
        min_words: fewest whitespace tokens (``len(sentence.split())``) of a kept sentence.
        name: the document's name.

    Returns:
        A single ``Document`` of source ``prose``.

    Raises:
        ValueError: if no sentence qualifies.
    """
    kept = [s.strip() for s in sentences if len(s.split()) >= min_words][:n_sentences]
    if not kept:
        raise ValueError(f"prose: no sentence of at least {min_words} words")
    return [Document("prose", name, " ".join(kept))]


def _after_docstring(text: str) -> str:
    """The source from the first statement after the module docstring (all of it if none)."""
    try:
        body = ast.parse(text).body
    except SyntaxError:
        return text
    if len(body) >= 2 and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        lines = text.splitlines(keepends=True)
        return "".join(lines[body[1].lineno - 1 :])
    return text


def code_documents(directory: str | Path | None = None) -> Iterator[Document]:
    """Python source files of the running interpreter's standard library, sorted by name.

    Files are read lazily, as ``build_blocks`` asks for more.

    Args:
        directory: a folder of ``.py`` files (default: ``sysconfig.get_paths()["stdlib"]``).

    Yields:
        One ``Document`` (source ``code``) per top-level ``*.py`` file whose name does not
        start with ``_``, in sorted order, each starting after its module docstring.

    Raises:
        ValueError: if the folder holds no such file.
    """
    folder = Path(directory) if directory is not None else Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in folder.glob("*.py") if not p.name.startswith("_"))
    if not files:
        raise ValueError(f"code: no Python files in {str(folder)!r}; pass a folder of .py files")
    for path in files:
        yield Document("code", path.name, _after_docstring(path.read_text(encoding="utf-8", errors="replace")))


def _polynomial(coefficients: Iterable[int], var: str) -> str:
    """Coefficients from the highest power down to the constant, written as a person would:
    ``[2, -1, 0, 7]`` -> ``2x^3 - x^2 + 7`` (no ``1x``, no ``+ -3``; ``0`` if all are zero)."""
    coefs = list(coefficients)
    terms = []
    for position, coef in enumerate(coefs):
        if coef == 0:
            continue
        power = len(coefs) - 1 - position
        size = abs(coef)
        body = ("" if size == 1 and power else str(size)) + (var if power else "") + (f"^{power}" if power > 1 else "")
        sign = "-" if coef < 0 else "+"
        terms.append((sign + body) if not terms and sign == "-" else body if not terms else f"{sign} {body}")
    return " ".join(terms) if terms else "0"


def _math_problem(rng: random.Random) -> str:
    """One problem with its (exact) answer."""
    kind = rng.randrange(8)
    var = rng.choice("xyznt")
    if kind == 0:
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return f"{a} {op} {b} = {value}"
    if kind == 1:
        b, q = rng.randint(2, 40), rng.randint(2, 60)
        return f"{b * q} / {b} = {q}"
    if kind == 2:
        a, b, c = rng.randint(1, 50), rng.randint(1, 50), rng.randint(2, 12)
        return f"({a} + {b}) * {c} = {(a + b) * c}"
    if kind == 3:  # solve a x + b = c for an integer root
        a, root, b = rng.randint(2, 12), rng.randint(-20, 20), rng.randint(-30, 30)
        return f"solve {_polynomial([a, b], var)} = {a * root + b} ; {var} = {root}"
    if kind == 4:  # expand (x + p)(x + q)
        p, q = rng.randint(-9, 9), rng.randint(-9, 9)
        return (f"expand ({_polynomial([1, p], var)})({_polynomial([1, q], var)}) = "
                f"{_polynomial([1, p + q, p * q], var)}")
    if kind == 5:  # evaluate a quadratic
        a, b, c, v = rng.randint(1, 9), rng.randint(-9, 9), rng.randint(-9, 9), rng.randint(-5, 5)
        return f"f({var}) = {_polynomial([a, b, c], var)} ; f({v}) = {a * v * v + b * v + c}"
    if kind == 6:  # derivative of a cubic
        a, b, c = rng.randint(1, 9), rng.randint(-9, 9), rng.randint(-9, 9)
        return f"d/d{var} ({_polynomial([a, b, c, 0], var)}) = {_polynomial([3 * a, 2 * b, c], var)}"
    a, b = rng.randint(-9, 9), rng.randint(-9, 9)  # substitution
    return f"let a = {a} and b = {b} ; a * b + a - b = {a * b + a - b}"


def math_documents(seed: int = 0, lines_per_document: int = 40) -> Iterator[Document]:
    """An endless, seeded stream of math documents (source ``math``), one problem per line.

    Problems: integer arithmetic (+, -, *, exact /, brackets), solving a linear equation,
    expanding (x + p)(x + q), evaluating a quadratic, the derivative of a cubic, substitution;
    every answer is computed exactly.

    Args:
        seed: seed of the ``random.Random`` generator.
        lines_per_document: problems per document.

    Yields:
        Documents ``math-0``, ``math-1``, ...
    """
    rng = random.Random(seed)
    index = 0
    while True:
        yield Document("math", f"math-{index}", "\n".join(_math_problem(rng) for _ in range(lines_per_document)))
        index += 1


def _special_affixes(tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The special tokens the tokenizer puts before and after a text ([CLS] / [SEP] for BERT)."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return tuple(full[:start]), tuple(full[start + len(plain) :])
    raise ValueError("tokenizer: could not find the text's tokens inside its tokens with special tokens")


def build_blocks(
    tokenizer: Any,
    sources: Mapping[str, Iterable[Document]],
    blocks_per_source: int,
    *,
    block_size: int = BLOCK_SIZE,
    blocks_per_document: Mapping[str, int] | None = None,
) -> list[Block]:
    """Cut each source's documents into full blocks of ``block_size`` tokens.

    Args:
        tokenizer: a Hugging Face tokenizer; the special tokens it adds around a text
            (``[CLS]`` and ``[SEP]`` for BERT) are added around every block.
        sources: source name -> documents (read lazily, in order, until enough blocks).
        blocks_per_source: blocks taken from each source.
        block_size: tokens per block, special tokens included.
        blocks_per_document: at most this many blocks from one document, per source (e.g.
            ``{"code": 2}`` to sample many files); no limit for sources not named.

    Returns:
        The blocks, source by source in the mapping's order.

    Raises:
        ValueError: a non-positive count, a block too short for the special tokens, or a
            source whose documents give fewer than ``blocks_per_source`` blocks.
    """
    if blocks_per_source < 1:
        raise ValueError(f"blocks_per_source: expected a positive number of blocks, got {blocks_per_source}")
    prefix, suffix = _special_affixes(tokenizer)
    content = block_size - len(prefix) - len(suffix)
    if content < 1:
        raise ValueError(
            f"block_size: expected more than the {len(prefix) + len(suffix)} special tokens, got {block_size}"
        )
    special = (True,) * len(prefix) + (False,) * content + (True,) * len(suffix)
    limits = dict(blocks_per_document or {})
    blocks: list[Block] = []
    for source, documents in sources.items():
        taken = 0
        for document in documents:
            # verbose=False: a document longer than the model's limit is cut into blocks here.
            ids = tokenizer(document.text, add_special_tokens=False, verbose=False)["input_ids"]
            n_full = len(ids) // content
            for start in range(0, min(n_full, limits.get(source, n_full)) * content, content):
                full = (*prefix, *ids[start : start + content], *suffix)
                blocks.append(Block(source, document.name, full, special))
                taken += 1
                if taken == blocks_per_source:
                    break
            if taken == blocks_per_source:
                break
        if taken < blocks_per_source:
            raise ValueError(
                f"source {source!r}: its documents give {taken} blocks of {block_size} tokens, "
                f"{blocks_per_source} were asked for; ask for fewer blocks per source"
            )
    return blocks
