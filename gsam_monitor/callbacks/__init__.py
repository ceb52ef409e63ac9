"""Framework callbacks: GSAM monitoring in one line of a Trainer or Lightning setup.

* ``GSAMTrainerCallback`` (``gsam_monitor.callbacks.hf``): a ``transformers.TrainerCallback``
  that writes into the Trainer's own TensorBoard run and W&B run, at its global step.
* ``GSAMCallback`` (``gsam_monitor.callbacks.lightning``): a Lightning ``Callback`` that logs
  through ``trainer.loggers`` (TensorBoard, W&B, CSV, ...).

Both wrap a ``GSAMMonitor``; every keyword they do not use themselves goes to it.

The frameworks are optional: this package imports neither until one of the names is used,
so ``import gsam_monitor.callbacks`` always works, and using a callback whose framework is
missing raises an ``ImportError`` with the install command. The package lives at
``gsam_monitor/callbacks/`` rather than a top-level ``callbacks/`` so that installing
gsam-monitor never puts a module named ``callbacks`` on the user's import path.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gsam_monitor._install import install_hint

if TYPE_CHECKING:
    from gsam_monitor.callbacks.hf import GSAMTrainerCallback
    from gsam_monitor.callbacks.lightning import GSAMCallback

__all__ = ["GSAMCallback", "GSAMTrainerCallback"]

# name -> (submodule, top-level packages it needs, pip extra)
_LAZY: dict[str, tuple[str, tuple[str, ...], str]] = {
    "GSAMTrainerCallback": ("hf", ("transformers",), "hf"),
    "GSAMCallback": ("lightning", ("pytorch_lightning", "lightning"), "lightning"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}; it exports {', '.join(_LAZY)}.")
    submodule, packages, extra = _LAZY[name]
    try:
        module = importlib.import_module(f"{__name__}.{submodule}")
    except ImportError as err:
        missing = (err.name or "").split(".")[0]
        if missing not in packages:
            raise  # a real import error inside our module or a framework dependency: show it as is
        raise ImportError(
            f"gsam_monitor.callbacks.{name} needs {packages[0]}, which is not installed. Install it with "
            f"{install_hint(extra, packages[0].replace('_', '-'))}."
        ) from err
    value = getattr(module, name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
