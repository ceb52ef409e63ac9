"""GSAMMonitor's option groups: the previous release's flat names still build the same monitor,
with a DeprecationWarning that points at the caller and names the new place; groups are taken as
objects or dicts; the constructor stays within 14 parameters."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import pytest
import torch

from gsam_monitor import CollectOptions, ComputeOptions, GSAMMonitor, WindowOptions
from gsam_monitor.monitor.options import GROUPS, LEGACY_NAMES
from tests.tiny_models import Stack

D = 8

# A value other than the default for each old name, and what the monitor reports for it.
LEGACY_VALUES = {
    "collect_steps": (5, "collect_steps", 5),
    "max_tokens_per_layer": (7, "max_tokens_per_layer", 7),
    "phases": ("eval", "phases", ("eval",)),
    "seed": (3, "seed", 3),
    "reservoir_size": (50, "reservoir_size", 50),
    "window": ("cumulative", "window", "cumulative"),
    "reference": ("first", "reference", "first"),
    "background": (True, "background", True),
    "state_dtype": (torch.float32, "state_dtype", torch.float32),
    "product_dtype": (torch.float32, "product_dtype", torch.float32),
    "max_state_bytes": (2**30, "max_state_bytes", 2**30),
    "spectrum_every_n_logs": (3, "spectrum_every_n_logs", 3),
}


def _quiet(**kwargs) -> GSAMMonitor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return GSAMMonitor(Stack(dim=D, depth=1), every_n_steps=50, sinks=[], **kwargs)


def test_every_old_name_has_a_field_in_its_group() -> None:
    assert set(LEGACY_VALUES) | {"ema_half_life", "attention_entropy"} == set(LEGACY_NAMES)
    for old, (group, field) in LEGACY_NAMES.items():
        assert field in {f.name for f in dataclasses.fields(GROUPS[group])}, old


@pytest.mark.parametrize("old", sorted(LEGACY_VALUES))
def test_an_old_name_builds_the_same_monitor_with_a_warning_at_the_caller(old: str) -> None:
    value, attribute, expected = LEGACY_VALUES[old]
    group, field = LEGACY_NAMES[old]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = GSAMMonitor(Stack(dim=D, depth=1), every_n_steps=50, sinks=[], **{old: value})
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(deprecations) == 1
    message = str(deprecations[0].message)
    assert f"GSAMMonitor({old}=) is deprecated" in message
    assert f"{group}={GROUPS[group].__name__}({field}=...)" in message
    assert deprecations[0].filename == __file__  # the user's line, not the library's
    assert getattr(monitor, attribute) == expected
    grouped = _quiet(**{group: GROUPS[group](**{field: value})})
    assert grouped.config == monitor.config


def test_old_names_join_an_explicit_group_and_the_ema_half_life() -> None:
    with pytest.warns(DeprecationWarning) as record:
        monitor = GSAMMonitor(
            Stack(dim=D, depth=1), every_n_steps=50, sinks=[], collection=CollectOptions(phases="train"),
            max_tokens_per_layer=5, window="ema", ema_half_life=4,
        )
    assert len([w for w in record if issubclass(w.category, DeprecationWarning)]) == 3
    assert monitor.phases == ("train",) and monitor.max_tokens_per_layer == 5
    assert monitor.window == "ema" and monitor.ema_half_life == 4.0
    assert monitor.config.ema_factor == pytest.approx(0.5**0.25, rel=1e-15)


def test_groups_as_dicts_equal_groups_as_objects() -> None:
    as_dicts = _quiet(
        collection={"steps": None, "phases": ["train"]},
        windows={"kind": "ema", "ema_half_life": 2},
        compute={"state_dtype": torch.float32, "spectrum_every_n_logs": 0},
    )
    as_objects = _quiet(
        collection=CollectOptions(steps=None, phases="train"),
        windows=WindowOptions(kind="ema", ema_half_life=2.0),
        compute=ComputeOptions(state_dtype=torch.float32, spectrum_every_n_logs=None),
    )
    assert as_dicts.config == as_objects.config
    assert as_dicts.collect_steps is None and as_dicts.phases == ("train",) and as_dicts.ema_half_life == 2.0
    assert as_dicts.spectrum_every_n_logs is None  # 0 means never, stored as None


def test_groups_resolve_against_the_interval() -> None:
    assert _quiet().collect_steps == 10  # "auto": the last 10 of 50 steps
    assert _quiet(windows=WindowOptions(kind="ema")).ema_half_life == 50.0  # default: the interval
    with pytest.raises(ValueError, match=r"CollectOptions\(steps=60\) exceeds every_n_steps=50"):
        _quiet(collection=CollectOptions(steps=60))


def test_option_groups_are_frozen_and_normalised() -> None:
    options = CollectOptions(phases=["eval", "train"])
    assert options.phases == ("eval", "train")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.phases = ("train",)  # type: ignore[misc]
    assert ComputeOptions(spectrum_every_n_logs=0).spectrum_every_n_logs is None


def test_the_constructor_takes_at_most_14_parameters() -> None:
    params = [p for p in inspect.signature(GSAMMonitor.__init__).parameters if p != "self"]
    assert len(params) <= 14, params


def test_callbacks_move_old_names_into_groups_when_they_are_built() -> None:
    pytest.importorskip("transformers")
    from gsam_monitor.callbacks import GSAMTrainerCallback

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback = GSAMTrainerCallback(window="ema", attention_entropy=True, phases="train")
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(deprecations) == 3 and all(w.filename == __file__ for w in deprecations)
    assert "GSAMTrainerCallback(window=) is deprecated" in str(deprecations[0].message)
    kwargs = callback.monitor_kwargs
    assert kwargs["windows"] == WindowOptions(kind="ema")
    assert kwargs["collection"] == CollectOptions(attention_entropy=True, phases=("train",))
    with pytest.raises(ValueError, match=r"CollectOptions\(phases=\) must be a non-empty selection"):
        GSAMTrainerCallback(collection={"phases": []})  # a group is checked when the callback is built
