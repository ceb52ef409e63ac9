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
* ``trainer_default_logdir``: ``transformers``' default TensorBoard run folder name;
* ``route_attention_functions``, ``calls_attention_registry``: the lookup of ``transformers``'
  attention-function registry (``AttentionInterface.get_interface``, which a v5 model calls at
  every forward with ``config._attn_implementation`` and its own eager function as the default),
  wrapped so that the attention-logit sample sees the q, k each kernel receives.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "autograd_running",
    "calls_attention_registry",
    "drop_compiled_code",
    "find_caller_self",
    "has_compiled_code",
    "route_attention_functions",
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


def route_attention_functions(route: Callable[..., Any]) -> Callable[[], None]:
    """Wrap every lookup of ``transformers``' attention-function registry: the function that
    ``AttentionInterface.get_interface(config._attn_implementation, default)`` finds (a fused
    kernel, a registered one, or the model's own eager function) is returned as
    ``functools.partial(route, function, fused)``, so ``route(function, fused, module, query,
    key, value, attention_mask, **kwargs)`` runs in its place and must call ``function`` itself
    (``fused``: the function is a registered kernel, not the model's own eager default). The model's
    config is not touched: mask creation, flash-kernel loading and every check of the
    implementation's name see the name they always saw.

    Returns:
        A function that restores the original lookup (a no-op if something else has replaced
        the lookup since: it is left in place, and ``route`` passes calls through).

    Raises:
        ImportError: without ``transformers``; AttributeError: if the lookup moved.
    """
    from transformers import AttentionInterface

    original = AttentionInterface.__dict__["get_interface"]

    def get_interface(self: Any, attn_implementation: str, default: Callable[..., Any]) -> Callable[..., Any]:
        function = original(self, attn_implementation, default)
        return functools.partial(route, function, function is not default)

    AttentionInterface.get_interface = get_interface

    def restore() -> None:
        if AttentionInterface.__dict__.get("get_interface") is get_interface:
            AttentionInterface.get_interface = original

    return restore


@functools.cache
def calls_attention_registry(module_class: type) -> bool:
    """Whether ``module_class``'s modeling file looks its attention function up in the registry
    (``ALL_ATTENTION_FUNCTIONS.get_interface(``: the test ``transformers`` itself applies before it
    lets an implementation be switched at run time)."""
    module = sys.modules.get(module_class.__module__)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS.get_interface(" in source
