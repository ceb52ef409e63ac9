"""Read the history and metric records of an offline W&B run (``run-*.wandb``).

The file is a LevelDB-style log (32 KiB blocks of records with a 7-byte header: CRC32,
length, type) after a 7-byte ``:W&B`` file header; each record is a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import glob
import json
import struct
import time
from pathlib import Path
from typing import Any

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    pos, out, buf = 7, [], b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # block trailer padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record the W&B service is still writing
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            out.append(chunk)
        elif kind == _FIRST:
            buf = chunk
        elif kind == _MIDDLE:
            buf += chunk
        elif kind == _LAST:
            out.append(buf + chunk)
            buf = b""
    return out


def _parsed(path: Path, timeout: float) -> list[Any]:
    """The file's records, waiting until the run's exit record is on disk: under load the
    W&B service may still be writing when ``run.finish()`` has returned."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        records = []
        try:
            for raw in _records(path):
                record = pb.Record()
                record.ParseFromString(raw)
                records.append(record)
        except DecodeError:  # read while the service was writing: read again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def read_run(run_dir: str | Path, timeout: float = 60.0) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """``(history rows, [(metric name or glob, step_metric), ...])`` of the offline run files
    under ``run_dir``."""
    files = glob.glob(str(Path(run_dir) / "**" / "offline-run-*" / "run-*.wandb"), recursive=True)
    assert len(files) == 1, files
    rows, metrics = [], []
    for record in _parsed(Path(files[0]), timeout):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {("/".join(i.nested_key) or i.key): json.loads(i.value_json) for i in record.history.item}
            rows.append({k: v for k, v in row.items() if k not in ("_timestamp", "_runtime")})
        elif kind == "metric":
            metrics.append((record.metric.name or record.metric.glob_name, record.metric.step_metric))
    return rows, metrics
