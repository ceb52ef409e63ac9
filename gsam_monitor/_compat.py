"""Every private or version-specific framework API the package uses, in one place.

Each function wraps one such use. ``tests/test_compat.py`` checks each against the installed
frameworks, so that a release that moves one fails there, loudly, instead of leaving a
monitor that silently logs nothing:

* ``autograd_running``: ``torch._C._current_graph_task_id`` (gradient-checkpointing
  recomputations run layer hooks again during the backward pass);
* ``drop_compiled_code``, ``has_compiled_code``: Dynamo's code cache (compiled code never
  re-checks an empty hook dict, so hooks attached after a compiled warm-up need it dropped);
* ``find_caller_self``: a frame walk, the fallback that finds the ``transformers.Trainer``
  calling a callback (its hooks receive no reference to it);
* ``trainer_default_logdir``: ``transformers``' default TensorBoard run folder name.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

__all__ = [
    "autograd_running",
    "drop_compiled_code",
    "find_caller_self",
    "has_compiled_code",
    "trainer_default_logdir",
]


def autograd_running() -> bool:
    """Whether the autograd engine is executing a backward pass on this thread."""
    return torch._C._current_graph_task_id() != -1


def drop_compiled_code() -> int:
    """Drop the code torch.compile has compiled so far, so that its next call traces hooks
    registered since (compiled code never re-checks an empty hook dict).

    Returns:
        How many functions' compiled code was dropped.

    Raises:
        Exception: whatever Dynamo's internals raise if they moved (the caller warns).
    """
    from torch._dynamo import convert_frame
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list, remove_from_cache

    seen = [*convert_frame.input_codes.seen, *convert_frame.output_codes.seen]
    codes = {id(c): c for c in (ref() for ref in seen) if c is not None and _debug_get_cache_entry_list(c)}
    for code in codes.values():
        remove_from_cache(code)
    return len(codes)


def has_compiled_code(function: Any) -> bool:
    """Whether torch.compile holds compiled code for ``function`` (``False`` when Dynamo's
    cache cannot be read)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return bool(_debug_get_cache_entry_list(function.__code__))
    except Exception:
        return False


def find_caller_self(kind: type, max_depth: int, local: str | None = None) -> tuple[Any | None, Any, bool]:
    """The nearest ``self`` of type ``kind`` among the callers' frames, at most ``max_depth``
    up from the caller of this function's caller.

    Returns:
        ``(obj, value, found)``: the object (``None`` if none), and the value of its frame's
        local variable ``local`` with whether that frame has such a variable.
    """
    frame = sys._getframe(2)
    try:
        for _ in range(max_depth):
            if frame is None:
                break
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, kind):
                found = local is not None and local in frame.f_code.co_varnames
                return candidate, frame.f_locals.get(local) if found else None, found
            frame = frame.f_back
        return None, None, False
    finally:
        del frame


def trainer_default_logdir() -> str:
    """The run folder name the ``transformers`` TensorBoardCallback uses under ``output_dir``."""
    from transformers.integrations.integration_utils import default_logdir

    return default_logdir()
