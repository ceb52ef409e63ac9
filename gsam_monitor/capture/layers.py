"""Layer selection: resolving ``layers=`` and ``ignore=`` specs to the modules to watch.

A spec is any of

* a module name (``"encoder.layer.3"``), in the model's *canonical* names: the wrappers of
  DDP / DataParallel (``module.``), ``torch.compile`` (``_orig_mod.``), FSDP
  (``_fsdp_wrapped_module.``) and activation checkpointing (``_checkpoint_wrapped_module.``)
  are transparent, so a wrapped and an unwrapped model give the same names;
* a glob (``"encoder.layer.*"``, ``fnmatch`` on the dotted names). A glob selects the
  outermost matching modules: ``"encoder.layer.*"`` is the six blocks, not their children;
* a compiled regex (``re.compile(r"h\\.\\d+")``), which must match the whole name;
* a module type (``BertLayer``) or a module object of the model;
* ``"auto"``: every block of the model's repeated stack, i.e. the children of the longest
  ``nn.ModuleList`` (or ``nn.Sequential`` of two or more) of same-typed blocks (outermost lists win, so an
  MoE layer's list of experts never beats the list of layers; equally long stacks such as
  an encoder's and a decoder's are all taken);
* ``"embeddings"``: the input of the stack's first block, i.e. the embedding output that
  Hugging Face returns as ``hidden_states[0]``;
* ``"final_norm"``: the norm module registered after the stack beside it (``ln_f``,
  ``norm``, ``final_layer_norm``, ...).

Misconfiguration fails here, at construction: unknown names (with close matches), an empty
selection, a module selected twice, and nested selections (a block and its own child, whose
statistics would describe overlapping computations under two names).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Union

from torch import nn

from gsam_monitor._validate import suggestions

__all__ = [
    "AUTO",
    "EMBEDDINGS",
    "FINAL_NORM",
    "LayerSpec",
    "LayerTarget",
    "canonical_named_modules",
    "estimate_dim",
    "find_block_stacks",
    "find_final_norm",
    "resolve_layers",
    "unwrap_model",
]

AUTO = "auto"
EMBEDDINGS = "embeddings"
FINAL_NORM = "final_norm"

LayerSpec = Union[str, re.Pattern, type, nn.Module]  # noqa: UP007 (a runtime alias)

# Child attributes through which wrappers hold the real model; they add no name segment.
_ALWAYS_TRANSPARENT = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_fpw_module"})
# ``module`` is transparent only below these wrappers: a user's model may have a child that
# is really called "module".
_MODULE_WRAPPERS = frozenset({"DistributedDataParallel", "DataParallel", "DeepSpeedEngine"})
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class LayerTarget:
    """One monitored point of the model.

    Attributes:
        name: The key under which its metrics are logged (a canonical module name, or
            ``"embeddings"`` / ``"final_norm"``).
        module: The module whose hook captures it.
        kind: ``"output"`` (a forward hook on the module's output) or ``"input"`` (a
            forward pre-hook on its first input: how ``"embeddings"`` is captured).
        module_name: The canonical name of ``module``.
        dim: The estimated feature size (for the memory budget), ``None`` if unknown; the
            activations' real last dimension is what the statistics use.
    """

    name: str
    module: nn.Module
    kind: Literal["output", "input"]
    module_name: str
    dim: int | None


def _is_transparent(parent: nn.Module, child_name: str) -> bool:
    if child_name in _ALWAYS_TRANSPARENT:
        return True
    return child_name == "module" and type(parent).__name__ in _MODULE_WRAPPERS


def canonical_named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` by canonical name, the root as ``""``.

    Wrapper links add no name segment, and the innermost (real) module takes the name, so
    ``DDP(model).module.encoder`` and ``torch.compile(model)._orig_mod.encoder`` are both
    ``"encoder"``. A module reachable under several names (shared weights) keeps the first.
    """
    out: dict[str, nn.Module] = {}
    seen: set[int] = set()

    def visit(module: nn.Module, name: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        out[name] = module  # an inner module overwrites its wrapper under the same name
        for child_name, child in module._modules.items():
            if child is None:
                continue
            if _is_transparent(module, child_name):
                visit(child, name)
            else:
                visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The real model inside DDP / DataParallel / ``torch.compile`` / FSDP wrappers."""
    return canonical_named_modules(model)[""]


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def find_block_stacks(model: nn.Module) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    """The model's repeated block stacks: ``[(list_name, [(block_name, block), ...]), ...]``.

    Candidates are ``nn.ModuleList`` containers (or ``nn.Sequential`` ones of at least two
    blocks) of blocks of one type that hold parameters. Candidates inside another candidate (an MoE layer's
    experts inside the list of layers) are dropped; of the rest, the longest win.
    """
    named = canonical_named_modules(model)
    candidates: list[tuple[str, list[tuple[str, nn.Module]]]] = []
    for name, module in named.items():
        # A one-block ModuleList is a one-layer model's stack; a one-module Sequential is
        # usually just a wrapper.
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < (
            1 if isinstance(module, nn.ModuleList) else 2
        ):
            continue
        blocks = []
        for key in module._modules:
            child_name = f"{name}.{key}" if name else key
            if child_name in named:
                blocks.append((child_name, named[child_name]))
        if not blocks:
            continue
        types = {type(b) for _, b in blocks}
        if len(types) != 1 or not all(_has_parameters(b) for _, b in blocks):
            continue
        candidates.append((name, blocks))
    outer = [
        (name, blocks)
        for name, blocks in candidates
        if not any(other != name and (other == "" or name.startswith(other + ".")) for other, _ in candidates)
    ]
    if not outer:
        return []
    longest = max(len(blocks) for _, blocks in outer)
    return [(name, blocks) for name, blocks in outer if len(blocks) == longest]


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    return "norm" in type(module).__name__.lower() and _has_parameters(module)


def find_final_norm(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The norm applied after the (last) block stack: a norm-type sibling registered after it.

    Returns ``None`` when there is none (BERT-style models normalise inside each block).
    """
    stacks = find_block_stacks(model)
    if not stacks:
        return None
    named = canonical_named_modules(model)
    stack_name = stacks[-1][0]
    parent_name, _, stack_key = stack_name.rpartition(".")
    parent = named[parent_name]
    # Walk the parent's children in registration order; wrappers are looked through.
    children = list(named_children_canonical(parent, parent_name, named))
    keys = [k for k, _ in children]
    if stack_key not in keys:
        return None
    for child_name, child in children[keys.index(stack_key) + 1 :]:
        if _is_norm(child):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            return full, child
    return None


def named_children_canonical(
    parent: nn.Module, parent_name: str, named: dict[str, nn.Module]
) -> Iterable[tuple[str, nn.Module]]:
    """Direct children of ``parent`` under their canonical (wrapper-free) short names."""
    prefix = f"{parent_name}." if parent_name else ""
    for name, module in named.items():
        if name.startswith(prefix) and name != parent_name and "." not in name[len(prefix) :]:
            yield name[len(prefix) :], module


def _leaf_dim(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1]) if module.normalized_shape else None
    nf = getattr(module, "nf", None)  # transformers' GPT-2 style Conv1D
    if isinstance(nf, int):
        return nf
    if _is_norm(module):
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 1:
            return int(weight.shape[0])
    return None


def estimate_dim(model: nn.Module, module: nn.Module, *, is_block: bool = False) -> int | None:
    """Best guess of a module's output feature size, for the state budget.

    Blocks of the stack and the extras use the model config's ``hidden_size`` when there is
    one; other modules use the last sub-module (in registration order) whose output size is
    known (a Linear's ``out_features``, a norm's size, a conv's ``out_channels``).
    """
    if is_block:
        config = getattr(unwrap_model(model), "config", None)
        size = getattr(config, "hidden_size", None)
        if isinstance(size, int) and size > 0:
            return size
    found = None
    for sub in module.modules():
        dim = _leaf_dim(sub)
        if dim is not None:
            found = dim
    return found


def _spec_repr(spec: object) -> str:
    if isinstance(spec, re.Pattern):
        return f"re.compile({spec.pattern!r})"
    if isinstance(spec, type):
        return spec.__name__
    if isinstance(spec, nn.Module):
        return f"<{type(spec).__name__} object>"
    return repr(spec)


def _as_spec_list(specs: object, arg: str) -> list[object]:
    if specs is None:
        return []
    if isinstance(specs, (str, re.Pattern, type, nn.Module)):
        return [specs]
    if isinstance(specs, Iterable):
        return list(specs)
    raise TypeError(
        f"{arg}= must be a name, glob, compiled regex, module type, module, 'auto', or a list of "
        f"these; got {type(specs).__name__}."
    )


def _unknown_name_error(arg: str, spec: str, names: Sequence[str]) -> ValueError:
    close = suggestions(spec, names, n=5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    examples = ", ".join(list(names)[:6])
    return ValueError(
        f"{arg}=: no module named {spec!r} in the model.{hint} Names look like: {examples}, ...; "
        f"use a glob such as 'encoder.layer.*', 'auto' (every block), 'embeddings' or 'final_norm'."
    )


class _Resolver:
    """Turns one spec into ``(key, module, kind, module_name, is_block)`` tuples."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.named = canonical_named_modules(model)
        self.names = [n for n in self.named if n]  # the root itself is never a layer
        self._by_id = {id(m): n for n, m in self.named.items()}

    def stacks(self, arg: str, spec: str) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
        stacks = find_block_stacks(self.model)
        if not stacks:
            top = ", ".join(n for n in self.names if "." not in n)
            fix = (
                f"pass module names or globs instead. Top-level modules: {top}." if top
                else "the model has no submodules (build its layers before the monitor)."
            )
            raise ValueError(
                f"{arg}={spec!r}: found no repeated block stack (an nn.ModuleList, or nn.Sequential of "
                f"two or more, of same-typed blocks) in {type(unwrap_model(self.model)).__name__}; {fix}"
            )
        return stacks

    def resolve(self, spec: object, arg: str) -> list[tuple[str, nn.Module, str, str, bool]]:
        if isinstance(spec, str):
            return self._resolve_str(spec, arg)
        if isinstance(spec, re.Pattern):
            hits = [n for n in self.names if spec.fullmatch(n)]
            if not hits:
                raise ValueError(
                    f"{arg}={_spec_repr(spec)} matches no module name (the regex must match the whole "
                    f"dotted name). Names look like: {', '.join(self.names[:6])}, ..."
                )
            return [(n, self.named[n], "output", n, False) for n in hits]
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            hits = [n for n in self.names if isinstance(self.named[n], spec)]
            if not hits:
                raise ValueError(f"{arg}={spec.__name__}: the model has no module of this type.")
            return [(n, self.named[n], "output", n, False) for n in hits]
        if isinstance(spec, nn.Module):
            name = self._by_id.get(id(spec))
            if name is None:
                raise ValueError(
                    f"{arg}= got a {type(spec).__name__} object that is not a sub-module of the model; "
                    f"pass a module of this model or its name."
                )
            if name == "":
                raise ValueError(f"{arg}= got the model itself; pass its sub-modules (e.g. 'auto' for every block).")
            return [(name, spec, "output", name, False)]
        raise TypeError(
            f"{arg}= entries must be str, compiled regex, nn.Module type or nn.Module; got "
            f"{type(spec).__name__} ({spec!r})."
        )

    def _resolve_str(self, spec: str, arg: str) -> list[tuple[str, nn.Module, str, str, bool]]:
        if spec == AUTO:
            return [(n, m, "output", n, True) for _, blocks in self.stacks(arg, spec) for n, m in blocks]
        if spec == EMBEDDINGS and (find_block_stacks(self.model) or EMBEDDINGS not in self.named):
            first_name, first = self.stacks(arg, spec)[0][1][0]
            return [(EMBEDDINGS, first, "input", first_name, True)]
        if spec == FINAL_NORM and FINAL_NORM not in self.named:
            self.stacks(arg, spec)
            found = find_final_norm(self.model)
            if found is None:
                raise ValueError(
                    f"{arg}={FINAL_NORM!r}: {type(unwrap_model(self.model)).__name__} has no norm module "
                    f"after its block stack (BERT-style models normalise inside every block, so the last "
                    f"block's output is already normalised); drop {FINAL_NORM!r}."
                )
            name, module = found
            return [(FINAL_NORM, module, "output", name, True)]
        if spec in self.named and spec:
            return [(spec, self.named[spec], "output", spec, False)]
        if _GLOB_CHARS & set(spec):
            hits = [n for n in self.names if fnmatch.fnmatchcase(n, spec)]
            # Outermost matches only: "encoder.layer.*" means the blocks, not their children.
            outer = [n for n in hits if not any(n != h and n.startswith(h + ".") for h in hits)]
            if not outer:
                raise _unknown_name_error(arg, spec, self.names)
            return [(n, self.named[n], "output", n, False) for n in outer]
        raise _unknown_name_error(arg, spec, self.names)


def resolve_layers(
    model: nn.Module,
    layers: LayerSpec | Iterable[LayerSpec] = AUTO,
    ignore: LayerSpec | Iterable[LayerSpec] | None = None,
) -> list[LayerTarget]:
    """Resolve ``layers=`` minus ``ignore=`` to the monitored targets, in selection order.

    Args:
        model: The (possibly wrapped) model.
        layers: One spec or a list of specs (see the module docstring).
        ignore: Specs to remove from the selection; the same kinds as ``layers``.

    Returns:
        The targets, each with its logging key, hooked module and estimated feature size.

    Raises:
        ValueError: an unknown name (listing close matches), a spec that matches nothing, an
            empty selection, a module selected twice, or nested selections.
        TypeError: a spec of an unsupported type.
    """
    resolver = _Resolver(model)
    specs = _as_spec_list(layers, "layers")
    if not specs:
        raise ValueError("layers= is empty; pass 'auto' (every block), module names or globs.")
    selected: dict[tuple[int, str], tuple[str, nn.Module, str, str, bool, str]] = {}
    keys: dict[str, str] = {}
    for spec in specs:
        for key, module, kind, module_name, is_block in resolver.resolve(spec, "layers"):
            ident = (id(module), kind)
            if ident in selected or key in keys:
                first = selected[ident][5] if ident in selected else keys[key]
                raise ValueError(
                    f"layers=: {key!r} is selected twice (by {first} and by {_spec_repr(spec)}); "
                    f"each layer may be selected once, so drop one of the two specs."
                )
            selected[ident] = (key, module, kind, module_name, is_block, _spec_repr(spec))
            keys[key] = _spec_repr(spec)

    ignored_keys: set[str] = set()
    ignored_ids: set[tuple[int, str]] = set()
    for spec in _as_spec_list(ignore, "ignore"):
        for key, module, kind, _, _ in resolver.resolve(spec, "ignore"):
            ignored_keys.add(key)
            ignored_ids.add((id(module), kind))
    chosen = [v for ident, v in selected.items() if ident not in ignored_ids and v[0] not in ignored_keys]
    if not chosen:
        ignored = ", ".join(_spec_repr(s) for s in _as_spec_list(ignore, "ignore"))
        raise ValueError(
            f"layers=[{', '.join(_spec_repr(s) for s in specs)}] with ignore=[{ignored}] selects no module; "
            f"narrow ignore= or widen layers=."
        )

    outputs = [(v[3], v[5]) for v in chosen if v[2] == "output"]
    for name, spec_a in outputs:
        for other, spec_b in outputs:
            if other.startswith(name + "."):
                raise ValueError(
                    f"layers=: {other!r} (from {spec_b}) is inside {name!r} (from {spec_a}); nested layers "
                    f"would count overlapping computations twice. Select one of them (use ignore= to drop "
                    f"the other)."
                )
    return [
        LayerTarget(
            name=key,
            module=module,
            kind=kind,  # type: ignore[arg-type]
            module_name=module_name,
            dim=estimate_dim(model, module, is_block=is_block),
        )
        for key, module, kind, module_name, is_block, _ in chosen
    ]
