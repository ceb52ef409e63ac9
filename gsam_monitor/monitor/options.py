"""``GSAMMonitor``'s option groups: what it collects, how its windows run, how it computes.

Each group is a frozen dataclass that states its defaults once and checks its fields where it
is made, so that a bad value fails at ``CollectOptions(...)``, naming the field and the fix::

    GSAMMonitor(
        model, every_n_steps=100, log_dir="runs/gsam",
        collection=CollectOptions(phases="train", max_tokens_per_layer=1024),
        windows=WindowOptions(kind="ema", reference="first"),
        compute=ComputeOptions(state_dtype=torch.float32),
    )

A plain dict is taken for a group too (``collection={"phases": "train"}``: configuration files).
What depends on other settings (``steps`` against ``every_n_steps``, an EMA half-life's default,
the metrics a reference needs, ``background=None`` against the model's device) is resolved by
``gsam_monitor.monitor.config.MonitorConfig``.

The monitor's flat keyword names of the previous release (``window=``, ``phases=``,
``state_dtype=``, ...: ``LEGACY_NAMES``) still work with a ``DeprecationWarning`` naming the
group and field to use; ``group_legacy`` moves them into their groups.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

from gsam_monitor._validate import closest, positive_int, with_suggestion
from gsam_monitor.stats.precision import resolve_product_dtype

__all__ = [
    "DEFAULT_MAX_STATE_BYTES",
    "GROUPS",
    "LEGACY_NAMES",
    "PHASES",
    "REFERENCES",
    "WINDOWS",
    "CollectOptions",
    "ComputeOptions",
    "WindowOptions",
    "as_options",
    "group_legacy",
]

PHASES = ("train", "eval")
WINDOWS = ("interval", "cumulative", "ema")
REFERENCES = ("previous", "first", "pinned")
"""What each window is compared with (``heldout_loglik``, the drift metrics): the previous
logged window, the first one, or the one ``pin_reference()`` pinned."""

DEFAULT_MAX_STATE_BYTES = 8 * 2**30
"""8 GiB of accumulation buffers on the device: e.g. 15 layers of d = 8192 in fp64, or 61 of
d = 4096 (a Llama-2-7B's 32 blocks take 4.0 GiB)."""


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # a frozen dataclass normalising its own field


@dataclass(frozen=True)
class CollectOptions:
    """What the hooks collect: which forwards, how many rows, which extra signals.

    Args:
        steps: Collect training forwards only during the last ``steps`` optimizer steps before
            each log; the hooks are removed on the other steps, so they cost nothing (under
            ``torch.compile``, once traced, they stay and a flag switches them). ``"auto"``:
            ``min(every_n_steps, max(10, every_n_steps // 10))``, the last 10 of every 100 steps
            (every step when ``every_n_steps <= 10``), and every forward before the first
            ``step()`` (inference, the first forward of training). ``None``: every step.
            Evaluation forwards are always collected.
        max_tokens_per_layer: At most this many tokens per layer per forward, sampled uniformly
            without replacement among the non-padding ones; ``None``: every token.
        phases: ``"train"`` (grad enabled and ``model.training``) and/or ``"eval"``
            (``torch.no_grad()`` or eval mode, e.g. plain inference).
        seed: Seed of the token subsampling (offset by the distributed rank).
        reservoir_size: Also keep a bounded uniform sample of this many activation values per
            (layer, phase) for the distribution analyses (``GSAMMonitor.sample``); ``None``: none.
        attention_entropy: Also log, for the attention module of each monitored block of a
            Hugging Face model, the mean attention entropy per head, ``attn_entropy/{layer}/h{i}``,
            and the max attention logit per head, ``attn_logit_max/{layer}/h{i}``, from q·k on at
            most 64 query rows per sequence, read where the attention function receives them
            (any ``attn_implementation``: eager, sdpa, flash); where the attention does not go
            through transformers' registry, the entropy from eager attention's probabilities.
        logit_partition: Also log the output logits' log-partition (what z-loss penalises), the
            mean and the max of logsumexp over the vocabulary on at most 256 non-padding tokens
            per forward, ``logit_lse_mean/{head}`` and ``logit_lse_max/{head}``, from a hook on the
            language-model head: ``True`` finds it with ``model.get_output_embeddings()`` (Hugging
            Face models), a string names its module (e.g. ``"lm_head"``); ``False``: off.

    Raises:
        ValueError: a non-positive count, an unknown or repeated phase.
        TypeError: a seed or flag of the wrong type.
    """

    steps: int | Literal["auto"] | None = "auto"
    max_tokens_per_layer: int | None = 2048
    phases: str | Sequence[str] = PHASES
    seed: int = 0
    reservoir_size: int | None = None
    attention_entropy: bool = False
    logit_partition: bool | str = False

    def __post_init__(self) -> None:
        if self.steps not in ("auto", None):
            _set(
                self,
                "steps",
                positive_int(self.steps, "CollectOptions(steps=)", " (or 'auto', or None for every step)"),
            )
        if self.max_tokens_per_layer is not None:
            _set(self, "max_tokens_per_layer", positive_int(
                self.max_tokens_per_layer, "CollectOptions(max_tokens_per_layer=)", " (or None for every token)"
            ))
        phases = (self.phases,) if isinstance(self.phases, str) else tuple(self.phases)
        if not phases or any(p not in PHASES for p in phases) or len(set(phases)) != len(phases):
            raise ValueError(
                f"CollectOptions(phases=) must be a non-empty selection of {PHASES} without repeats; "
                f"got {self.phases!r}."
            )
        _set(self, "phases", phases)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"CollectOptions(seed=) must be an int; got {type(self.seed).__name__}.")
        if self.reservoir_size is not None:
            _set(self, "reservoir_size", positive_int(
                self.reservoir_size, "CollectOptions(reservoir_size=)", " (or None for no sample)"
            ))
        if not isinstance(self.attention_entropy, bool):
            raise TypeError(
                f"CollectOptions(attention_entropy=) must be True or False; got {self.attention_entropy!r}."
            )
        if not isinstance(self.logit_partition, (bool, str)) or self.logit_partition == "":
            raise TypeError(
                f"CollectOptions(logit_partition=) must be True, False or the head's module name; "
                f"got {self.logit_partition!r}."
            )


@dataclass(frozen=True)
class WindowOptions:
    """How each layer's statistics are windowed, and what a window is compared with.

    Args:
        kind: ``"interval"`` (restart after each log), ``"cumulative"`` (never restart) or
            ``"ema"`` (the moments decay by ``0.5 ** (1 / ema_half_life)`` at every ``step()``).
        ema_half_life: The EMA window's half-life in ``step()`` calls (``kind="ema"`` only);
            ``None``: ``every_n_steps``.
        reference: What ``heldout_loglik`` and the ``drift_*`` metrics compare each window with:
            ``"previous"`` (the previous logged window), ``"first"`` (the first logged window:
            drift from the model as it started) or ``"pinned"`` (``GSAMMonitor.pin_reference()``).
            With ``"first"``/``"pinned"``, ``metrics="default"`` adds the drift metrics.

    Raises:
        ValueError: an unknown kind or reference, a half-life that is not positive or is given
            for a window that does not decay.
    """

    kind: Literal["interval", "cumulative", "ema"] = "interval"
    ema_half_life: float | None = None
    reference: Literal["previous", "first", "pinned"] = "previous"

    def __post_init__(self) -> None:
        if self.kind not in WINDOWS:
            raise ValueError(f"WindowOptions(kind=) must be one of {WINDOWS}; got {self.kind!r}.")
        if self.reference not in REFERENCES:
            raise ValueError(f"WindowOptions(reference=) must be one of {REFERENCES}; got {self.reference!r}.")
        half_life = self.ema_half_life
        if half_life is None:
            return
        if self.kind != "ema":
            raise ValueError(
                f"WindowOptions(ema_half_life=) only applies to kind='ema'; got kind={self.kind!r}. "
                f"Drop ema_half_life or use kind='ema'."
            )
        if isinstance(half_life, bool) or not isinstance(half_life, (int, float)) or not half_life > 0:
            raise ValueError(f"WindowOptions(ema_half_life=) must be a positive number of steps; got {half_life!r}.")
        _set(self, "ema_half_life", float(half_life))


@dataclass(frozen=True)
class ComputeOptions:
    """How the statistics are kept and the metrics computed: precision, budget, thread.

    Args:
        background: Compute the scheduled logs' metrics (the eigendecompositions) on a
            background thread, so that the training step does not wait for them: the windows
            are synced and snapshotted on schedule, and the metrics reach the sinks, at the
            step they belong to, from a later ``step()`` (or ``flush()``/``close()``). At most
            one log is in flight. ``None``: in the background when the model is on an
            accelerator, inline on CPU (where a thread would compete with training for the
            same cores). ``GSAMMonitor.log()`` is always inline.
        state_dtype: Dtype of the accumulation buffers on the device (fp64; fp32 halves their
            memory); the totals on the host are fp64 whatever it is.
        product_dtype: Dtype of the per-batch Gram products (``None``: the precision policy's
            choice for the device, ``"native"``: the activations' own; see ``LayerStats``).
        max_state_bytes: The device budget: refuse configurations whose accumulation buffers
            (one per monitored layer, ``LayerStats.state_bytes(d)`` each) and update workspace
            would exceed this many bytes on the accelerator (``GSAMMonitor.memory_report()``);
            ``None`` for no limit.
        shard_layers: Under ``torch.distributed``, each rank of the process group collects only
            the layers it owns (``ranks.layer_owners``: balanced by bytes, layer ``i`` on group
            rank ``i % world`` when the layers are equal), from its own rows, and computes their
            metrics; the writer gathers the scalars. Each rank then holds about layers / world
            buffers and totals, and a log moves no d x d tensor between ranks. A layer's
            statistics describe its owner rank's share of each batch (a uniform subsample, like
            the token cap), not the union. The group must be the data-parallel one (under tensor
            or pipeline parallelism pass it as ``process_group=``). Background logs are computed
            by each owner on its own worker thread and reach the writer at the next log step
            (or ``log()``/``close()``), gathered on the training thread. Default False: every
            rank collects every layer and each log sums the windows over the ranks (the exact
            union).
        max_host_bytes: The host budget: refuse configurations whose totals, references and
            log copies (``gsam_monitor.monitor.state_bytes_per_layer`` per layer) would exceed
            this many bytes of host memory per rank; ``None`` (default) for no limit.
        spectrum_every_n_logs: Send each layer's log10 eigenvalue histogram to the sinks that
            support it every this many logs; ``None`` or 0: never.

    Raises:
        ValueError: a non-positive budget or interval, a product dtype that is not floating.
        TypeError: a state dtype that is not a floating torch dtype, a flag of the wrong type.
    """

    background: bool | None = None
    state_dtype: torch.dtype = torch.float64
    product_dtype: torch.dtype | str | None = None
    max_state_bytes: int | None = DEFAULT_MAX_STATE_BYTES
    spectrum_every_n_logs: int | None = 10
    max_host_bytes: int | None = None
    shard_layers: bool = False

    def __post_init__(self) -> None:
        if self.background is not None and not isinstance(self.background, bool):
            raise TypeError(
                f"ComputeOptions(background=) must be True, False or None (automatic); got {self.background!r}."
            )
        if not isinstance(self.state_dtype, torch.dtype) or not self.state_dtype.is_floating_point:
            raise TypeError(
                f"ComputeOptions(state_dtype=) must be a floating torch dtype (torch.float64 or float32); "
                f"got {self.state_dtype!r}."
            )
        try:
            resolve_product_dtype(self.product_dtype, torch.device("cpu"), self.state_dtype)
        except ValueError as err:
            raise ValueError(f"ComputeOptions: {err}") from None
        if self.max_state_bytes is not None:
            _set(self, "max_state_bytes", positive_int(
                self.max_state_bytes, "ComputeOptions(max_state_bytes=)", " (or None for no limit)"
            ))
        if not isinstance(self.shard_layers, bool):
            raise TypeError(f"ComputeOptions(shard_layers=) must be True or False; got {self.shard_layers!r}.")
        if self.max_host_bytes is not None:
            _set(self, "max_host_bytes", positive_int(
                self.max_host_bytes, "ComputeOptions(max_host_bytes=)", " (or None for no limit)"
            ))
        every = self.spectrum_every_n_logs
        if every is not None and every != 0:
            every = positive_int(every, "ComputeOptions(spectrum_every_n_logs=)", " (or None to disable)")
        _set(self, "spectrum_every_n_logs", every or None)


GROUPS: dict[str, type] = {"collection": CollectOptions, "windows": WindowOptions, "compute": ComputeOptions}
"""``GSAMMonitor``'s keyword for each option group, and the group's class."""

LEGACY_NAMES: dict[str, tuple[str, str]] = {
    "collect_steps": ("collection", "steps"),
    "max_tokens_per_layer": ("collection", "max_tokens_per_layer"),
    "phases": ("collection", "phases"),
    "seed": ("collection", "seed"),
    "reservoir_size": ("collection", "reservoir_size"),
    "attention_entropy": ("collection", "attention_entropy"),
    "window": ("windows", "kind"),
    "ema_half_life": ("windows", "ema_half_life"),
    "reference": ("windows", "reference"),
    "background": ("compute", "background"),
    "state_dtype": ("compute", "state_dtype"),
    "product_dtype": ("compute", "product_dtype"),
    "max_state_bytes": ("compute", "max_state_bytes"),
    "spectrum_every_n_logs": ("compute", "spectrum_every_n_logs"),
}
"""The previous release's flat keyword names: ``{old name: (group keyword, field)}``."""

_Options = TypeVar("_Options", CollectOptions, WindowOptions, ComputeOptions)


def as_options(value: _Options | Mapping[str, Any] | None, cls: type[_Options], name: str) -> _Options:
    """``value`` as a ``cls``: itself, built from a mapping of its fields, or the defaults for ``None``.

    Raises:
        TypeError: another type, or a mapping with a field ``cls`` does not have (with a suggestion).
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in value if k not in fields]
        if unknown:
            raise TypeError(
                f"{name}: {cls.__name__} has no field {with_suggestion(str(unknown[0]), fields)}; "
                f"its fields: {', '.join(fields)}."
            )
        return cls(**value)
    raise TypeError(f"{name} must be a {cls.__name__} (or a dict of its fields, or None); got {type(value).__name__}.")


def _with_place(word: str, valid: Collection[str]) -> str:
    """``'word'`` and the keyword it may be a misspelling of: a current one, or an old name's new place."""
    match = closest(word, valid) or closest(word, LEGACY_NAMES)
    if match in LEGACY_NAMES:
        group, field = LEGACY_NAMES[match]
        return f"{word!r} (did you mean {group}={GROUPS[group].__name__}({field}=...)?)"
    return f"{word!r}" + (f" (did you mean {match!r}?)" if match else "")


def group_legacy(
    kwargs: Mapping[str, Any], owner: str, *, valid: Collection[str], stacklevel: int
) -> dict[str, Any]:
    """``kwargs`` with the previous release's flat names moved into their option groups.

    Each old name warns once per call with a ``DeprecationWarning`` naming its new place
    (``stacklevel`` as the caller's, so that the warning points at the user's code). A group
    given explicitly is kept and the old names replace its fields.

    Raises:
        TypeError: a name that is neither in ``valid`` nor an old one (with a suggestion).
    """
    unknown = sorted(k for k in kwargs if k not in valid and k not in LEGACY_NAMES)
    if unknown:
        raise TypeError(
            f"{owner}: unknown keyword argument(s) {', '.join(_with_place(k, valid) for k in unknown)}; "
            f"it takes {', '.join(sorted(valid))}."
        )
    out = dict(kwargs)
    moved: dict[str, dict[str, Any]] = {}
    for old in [k for k in out if k in LEGACY_NAMES]:
        group, field = LEGACY_NAMES[old]
        moved.setdefault(group, {})[field] = out.pop(old)
        warnings.warn(
            f"{owner}({old}=) is deprecated and will be removed in the next release; pass "
            f"{group}={GROUPS[group].__name__}({field}=...) instead.",
            DeprecationWarning,
            stacklevel=stacklevel + 1,
        )
    for group, fields in moved.items():
        base = as_options(out.get(group), GROUPS[group], f"{owner}({group}=)")  # type: ignore[type-var]
        out[group] = dataclasses.replace(base, **fields)
    return out
