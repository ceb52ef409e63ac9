"""``--device-map``: a model larger than one device, its layers placed over several.

The map goes to ``from_pretrained(device_map=..., max_memory=...)`` (accelerate's big-model
loading): ``auto``, ``balanced``, ``balanced_low_0`` or ``sequential`` let accelerate place the
layers within ``--device-max-memory``; a JSON object (inline, or the path of a ``.json`` file)
places them explicitly, module name to device (``"cpu"``, ``"disk"``, a GPU index or
``"cuda:1"``; the empty name ``""`` stands for the whole model). The hidden states then stay on
their layer's device: each layer's ``LayerStats`` is created where its rows are, and nothing is
gathered on one device (``gsam_monitor.eval.protocols``). ``"disk"`` offloads weights to a
temporary folder deleted at exit.

Everything is checked before any weight is read: the map's syntax and devices
(``parse_device_map``), and, on the model's skeleton built on the meta device from its config,
that every parameter and buffer falls under an entry of the map (``check_coverage``).
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["STRATEGIES", "available_devices", "check_coverage", "input_device", "parse_device_map", "parse_max_memory"]

#: accelerate's placement strategies accepted by ``--device-map``.
STRATEGIES: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")

DeviceMap = str | dict[str, Any]


def available_devices() -> list[str]:
    """The torch devices this machine can run on: ``cpu``, then ``cuda`` and each ``cuda:i``,
    ``mps``, ``xpu`` and its indices where present."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        devices += ["xpu", *(f"xpu:{i}" for i in range(xpu.device_count()))]
    return devices


def _device_value(value: Any, present: Iterable[str], flag: str, where: str) -> Any:
    """One device of a map: ``"disk"``, ``"cpu"``, a GPU index or a torch device name present here."""
    present = list(present)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{flag}: {where}: expected a device name or GPU index, got {value!r}")
    if value == "disk":
        return value
    name = f"cuda:{value}" if isinstance(value, int) else str(value)
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or (dev.type != "cpu" and str(dev) not in present):
        raise ValueError(f"{flag}: {where}: device {value!r} is not on this machine; devices here: "
                         f"{', '.join([*present, 'disk'])}")
    return value


def parse_device_map(value: str | dict[str, Any] | None) -> DeviceMap | None:
    """``--device-map``: a strategy of :data:`STRATEGIES`, a JSON object (inline or a file path)
    or a dict, checked against this machine's devices.

    Raises:
        ValueError: for an unknown strategy, a file that does not exist or is not JSON, a map
            that is not an object of module name to device, or a device this machine does not
            have; each naming ``--device-map``.
    """
    if value is None or isinstance(value, dict):
        mapping = value
    elif value in STRATEGIES:
        return value
    else:
        text = value
        if not value.lstrip().startswith("{"):
            path = Path(value).expanduser()
            if not path.is_file():
                raise ValueError(f"--device-map: expected one of {', '.join(STRATEGIES)}, a JSON object or "
                                 f"the path of a JSON file, got {value!r} (no such file)")
            text = path.read_text(encoding="utf-8")
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--device-map: {value!r} is not valid JSON ({err})") from None
    if mapping is None:
        return None
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"--device-map: expected an object of module name to device, e.g. "
                         f'{{"embeddings": 0, "encoder": "cpu"}}, got {mapping!r}')
    present = available_devices()
    return {str(k): _device_value(v, present, "--device-map", f"module {k!r}") for k, v in mapping.items()}


def parse_max_memory(value: str | dict[str, Any] | None) -> dict[Any, str] | None:
    """``--device-max-memory``: ``DEVICE=SIZE`` pairs, comma-separated (``0=20GiB,cpu=64GiB``),
    for accelerate's placement strategies; a GPU is named by its index.

    Raises:
        ValueError: for a pair without ``=``, a size that is not a size, or a device this
            machine does not have, naming ``--device-max-memory``.
    """
    from gsam_monitor.eval.cache import parse_bytes

    if value is None or isinstance(value, dict):
        return value
    out: dict[Any, str] = {}
    present = available_devices()
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, size = item.partition("=")
        if not sep:
            raise ValueError(f"--device-max-memory: expected DEVICE=SIZE pairs such as 0=20GiB,cpu=64GiB, "
                             f"got {item!r}")
        parse_bytes(size.strip(), "--device-max-memory")
        device: Any = int(key) if key.strip().isdigit() else key.strip()
        _device_value(device, present, "--device-max-memory", f"{item!r}")
        out[device] = size.strip()
    return out or None


def check_coverage(device_map: dict[str, Any], skeleton: torch.nn.Module, spec: str) -> None:
    """Every parameter and buffer of ``skeleton`` (the model built on the meta device) falls
    under a module name of ``device_map`` (itself or a parent; ``""`` covers everything), and
    every name of the map is a module of the model.

    Raises:
        ValueError: naming ``--device-map``, the model and the first uncovered or unknown names.
    """
    modules = {name for name, _ in skeleton.named_modules()}
    unknown = [k for k in device_map if k not in modules]
    if unknown:
        raise ValueError(f"--device-map: {spec}: {', '.join(map(repr, unknown[:5]))} "
                         f"{'is not a module' if len(unknown) == 1 else 'are not modules'} of the model; its "
                         f"top-level modules: {', '.join(n for n, _ in skeleton.named_children())}")
    if "" in device_map:
        return
    tensors = [n for n, _ in skeleton.named_parameters()] + [n for n, _ in skeleton.named_buffers()]
    missing = [n for n in tensors if not any(n == k or n.startswith(k + ".") for k in device_map)]
    if missing:
        raise ValueError(f"--device-map: {spec}: the map does not place {len(missing)} of the model's "
                         f"{len(tensors)} weights, e.g. {', '.join(map(repr, missing[:5]))}; add their modules "
                         f"(or a parent such as {missing[0].split('.')[0]!r}) to the map")


def input_device(model: Any) -> torch.device:
    """Where a dispatched model takes its inputs: the device of its first placed module
    (the CPU for modules offloaded to disk, which run on the host)."""
    placed = getattr(model, "hf_device_map", None) or {"": "cpu"}
    first = next(iter(placed.values()))
    if first == "disk":
        return torch.device("cpu")
    return torch.device(f"cuda:{first}" if isinstance(first, int) else first)


def offload_folder(device_map: DeviceMap) -> str | None:
    """A temporary folder for weights offloaded to disk (deleted at exit), when the map can use one."""
    if isinstance(device_map, dict) and "disk" not in device_map.values():
        return None
    folder = tempfile.mkdtemp(prefix="gsam_offload_")
    atexit.register(shutil.rmtree, folder, True)
    return folder
