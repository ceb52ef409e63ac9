"""Read the history rows of an offline W&B run back from its ``run-*.wandb`` file.

The file is W&B's record log (the LevelDB log format): a 7-byte header (``:W&B``, a 2-byte
magic, a version byte), then 32 KiB blocks of records, each ``crc32 (4) | length (2, little
endian) | type (1) | payload``, where type 1 is a whole record and 2/3/4 the first, middle
and last pieces of a record split across blocks. Each record is a ``wandb_internal_pb2.Record``
protobuf; ``history`` records hold one logged row as JSON-encoded items. ``wandb.Api`` needs
a server, so offline tests read the file directly.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (no ':W&B' header)")
    pos, pieces = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        pos += _HEADER
        if kind == 0 and length == 0:  # zero-filled rest of a block
            pos += left - _HEADER
            continue
        pieces += data[pos : pos + length]
        pos += length
        if kind in (_FULL, _LAST):
            yield pieces
            pieces = b""


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every history row of the offline run in ``run_dir`` (an ``offline-run-*`` folder, or any
    folder holding exactly one ``run-*.wandb`` file below it), in logging order."""
    from wandb.proto import wandb_internal_pb2

    (path,) = sorted(Path(run_dir).rglob("run-*.wandb"))
    rows = []
    for payload in _payloads(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows
