"""The token protocol's first-pass hidden states, kept for its second pass.

Mardia's kurtosis (and the ``--analyses`` observers) need every row a second time, under the fit
of the first pass. Re-running the model for it doubled the protocol's model time; keeping the
rows costs ``n_layers × d × itemsize`` bytes per token (MiniLM in fp32: 7 × 384 × 4 = 10,752 B;
a 7B model in fp16: 33 × 4096 × 2 = 270,336 B). ``HiddenStateStore`` keeps them, non-padding
rows only, in the model's dtype, in one of three places:

- **memory**, when every batch's rows fit ``max_memory`` (known before the first pass from the
  corpus's token count): nothing is written anywhere;
- **a spill file**, when they do not and ``spill_dir`` is given: an unnamed temporary file
  (deleted when closed, and by the OS if the process dies), written once and read back in order.
  The operating system's page cache serves it about as fast as memory while the process's own
  memory stays flat; only what it evicts is read from the disk;
- **nowhere**, beyond ``max_memory`` without a spill file (or after a failed write, e.g. a
  full disk): the protocol re-runs the model for those batches.

When the rows do not fit, a spill file takes every batch, not only the overflow: its reads cost
little, and a memory part would only raise the peak. Without one, the first batches fill
``max_memory`` and the rest are re-run. Either way the batches kept are a prefix of the corpus's,
so the second pass replays them and re-runs the model from the first batch not kept.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

__all__ = ["DEFAULT_MAX_MEMORY", "HiddenStateStore", "StoredBatch", "check_spill_dir", "default_spill_dir",
           "parse_bytes"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY = 2 * 2**30
"""2 GiB: the default corpus (``sst2_300_filtered``, ~6,500 tokens) of the largest models the
benchmark report scored (7B, 33 hidden states of width 4096-4544 in fp16: 1.7-1.9 GB) stays in
memory; MiniLM's takes 69 MB. Larger runs spill to a file, which the page cache serves at about
the speed of memory."""

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: str | int, flag: str = "--max-memory") -> int:
    """A size in bytes: an int, or a number with a unit (``"512MiB"``, ``"2GiB"``, ``"1.5GB"``).

    Args:
        value: the size.
        flag: the option's name, for the message.

    Returns:
        The number of bytes (0 or more).

    Raises:
        ValueError: for a negative size, a bool or a string that is not a number with a unit.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 0:
            return value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).lower() in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ValueError(f"{flag}: expected a size in bytes, e.g. 2GiB, 512MiB or 0, got {value!r}")


def check_spill_dir(spill_dir: str | Path | None) -> Path | None:
    """``spill_dir`` as a ``Path`` (``None`` stays ``None``).

    Raises:
        ValueError: when it is not an existing folder.
    """
    if spill_dir is None:
        return None
    if not Path(spill_dir).is_dir():
        raise ValueError(f"--spill-dir: {str(spill_dir)!r} is not an existing folder; create it, or pass "
                         f"'none' to re-run the model instead of spilling")
    return Path(spill_dir)


def default_spill_dir() -> Path:
    """Where spill files go by default: the system's temporary folder (``TMPDIR`` first)."""
    return Path(tempfile.gettempdir())


@dataclass
class StoredBatch:
    """One batch as the first pass saw it.

    Attributes:
        rows: per hidden state, its non-padding rows ``(n_kept, d)`` in the model's dtype.
        mask: the batch's attention mask ``(B, T)``, bool, on the CPU.
        labels: the batch's labels ``(B,)`` or ``None``.
    """

    rows: list[torch.Tensor]
    mask: torch.Tensor
    labels: torch.Tensor | None


@dataclass
class _Spilled:
    offset: int
    shapes: list[tuple[int, int]]
    dtypes: list[torch.dtype]
    mask: torch.Tensor
    labels: torch.Tensor | None


class HiddenStateStore:
    """The first pass's hidden states, in memory, in a spill file, or not kept (see the module).

    Args:
        max_memory: bytes of memory the rows may take.
        expected_tokens: non-padding tokens the corpus will produce (decides, with the first
            batch's bytes per token, whether every batch fits ``max_memory``).
        spill_dir: folder for the spill file; ``None``: re-run the model beyond ``max_memory``.

    Raises:
        ValueError: for a negative ``max_memory`` or ``expected_tokens``, or a ``spill_dir`` that
            is not an existing folder.
    """

    def __init__(self, max_memory: int, expected_tokens: int, spill_dir: str | Path | None = None) -> None:
        self.max_memory = parse_bytes(max_memory)
        if isinstance(expected_tokens, bool) or not isinstance(expected_tokens, int) or expected_tokens < 0:
            raise ValueError(f"expected_tokens: expected a count >= 0, got {expected_tokens!r}")
        self.expected_tokens = expected_tokens
        self.spill_dir = check_spill_dir(spill_dir)
        self.bytes_in_memory = 0
        self.bytes_spilled = 0
        self.bytes_per_token = 0
        self._memory: list[StoredBatch] = []
        self._spilled: list[_Spilled] = []
        self._file: IO[bytes] | None = None
        self._to_file = False
        self._closed = False  # no batch is kept after the first one that is not

    def __len__(self) -> int:
        """Batches kept."""
        return len(self._memory) + len(self._spilled)

    @property
    def spilling(self) -> bool:
        """Whether the rows go to a spill file (a corpus larger than ``max_memory``)."""
        return self._file is not None

    @property
    def where(self) -> str:
        """``"memory"``, ``"spill"``, ``"memory+spill"`` or ``"none"``: where the kept rows are."""
        return "+".join(name for name, used in (("memory", self._memory), ("spill", self._spilled)) if used) or "none"

    def add(self, rows: Sequence[torch.Tensor], mask: torch.Tensor, labels: torch.Tensor | None) -> bool:
        """Keep one batch, if it may be kept (see the module for where).

        Args:
            rows: per hidden state, its non-padding rows ``(n, d)``, any device.
            mask: the batch's attention mask ``(B, T)``.
            labels: the batch's labels, or ``None``.

        Returns:
            Whether the batch was kept. After the first ``False`` every later call returns ``False``
            (the kept batches stay a prefix).
        """
        if self._closed:
            return False
        size = sum(r.numel() * r.element_size() for r in rows)
        if not self.bytes_per_token:
            tokens = rows[0].shape[0] if rows else 0
            self.bytes_per_token = size // tokens if tokens else 0
            self._to_file = (self.spill_dir is not None
                             and self.bytes_per_token * self.expected_tokens > self.max_memory)
            if self._to_file and not self._open_file():
                self._to_file = False
        mask, labels = mask.detach().to("cpu", torch.bool), None if labels is None else labels.cpu()
        # Not after a spilled batch: the replay reads memory first, so memory must hold a prefix.
        if not self._to_file and not self._spilled and self.bytes_in_memory + size <= self.max_memory:
            self._memory.append(StoredBatch([r.detach().to("cpu") for r in rows], mask, labels))
            self.bytes_in_memory += size
            return True
        if self._file is not None or (self.spill_dir is not None and self._open_file()):
            if self._write(rows, mask, labels):
                return True
        self._closed = True
        return False

    def replay(self) -> Iterator[StoredBatch]:
        """The kept batches, in the order they were added (memory first, then the spill file)."""
        yield from self._memory
        if self._file is None:
            return
        self._file.flush()
        for entry in self._spilled:
            self._file.seek(entry.offset)
            rows = []
            for (n, d), dtype in zip(entry.shapes, entry.dtypes, strict=True):
                out = torch.empty((n, d), dtype=dtype)
                view = out.view(-1).view(torch.uint8).numpy() if out.numel() else bytearray()
                got = self._file.readinto(view)
                if got != len(view):
                    raise OSError(f"spill file: read {got} of {len(view)} bytes; the file was changed "
                                  f"or truncated during the run")
                rows.append(out)
            yield StoredBatch(rows, entry.mask, entry.labels)

    def close(self) -> None:
        """Drop the kept rows and delete the spill file."""
        self._memory.clear()
        self._spilled.clear()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> HiddenStateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the spill file
    def _open_file(self) -> bool:
        assert self.spill_dir is not None
        need = self.bytes_per_token * self.expected_tokens
        try:
            free = shutil.disk_usage(self.spill_dir).free
            if need > free:
                logger.warning("not spilling hidden states to %s: %.2f GB needed, %.2f GB free; the model is "
                               "re-run for the second pass beyond --max-memory", self.spill_dir, need / 1e9,
                               free / 1e9)
                self.spill_dir = None
                return False
            self._file = tempfile.TemporaryFile(dir=self.spill_dir)
        except OSError as err:
            logger.warning("cannot open a spill file in %s (%s); the model is re-run for the second pass "
                           "beyond --max-memory", self.spill_dir, err)
            self.spill_dir = None
            return False
        logger.info("hidden states (%.2f GB) go to a temporary file in %s", need / 1e9, self.spill_dir)
        return True

    def _write(self, rows: Sequence[torch.Tensor], mask: torch.Tensor, labels: torch.Tensor | None) -> bool:
        assert self._file is not None
        offset = self._file.seek(0, 2)
        try:
            for r in rows:
                if r.numel():
                    self._file.write(r.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())
        except OSError as err:  # e.g. a full disk: keep what was written, re-run the rest
            logger.warning("spill file in %s: %s; the model is re-run for the remaining batches",
                           self.spill_dir, err)
            self._file.truncate(offset)
            return False
        shapes = [(int(r.shape[0]), int(r.shape[1])) for r in rows]
        self._spilled.append(_Spilled(offset, shapes, [r.dtype for r in rows], mask, labels))
        self.bytes_spilled += self._file.tell() - offset
        return True
