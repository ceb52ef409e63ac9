"""A test module's own defaults for ``GSAMMonitor``'s option groups, under a caller's options.

``with_defaults(kwargs, collection={"max_tokens_per_layer": None})`` gives ``kwargs`` whose
``collection`` holds the module's defaults overlaid with every field the caller's
``CollectOptions`` sets away from the class default: a helper that sees every token keeps doing
so when a test passes ``collection=CollectOptions(phases="train")``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from gsam_monitor.monitor.options import GROUPS


def with_defaults(kwargs: Mapping[str, Any], **groups: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with each named group built from ``groups[group]`` and the caller's changed fields."""
    out = dict(kwargs)
    for group, defaults in groups.items():
        cls = GROUPS[group]
        given, plain = out.get(group) or cls(), cls()
        changed = {
            f.name: getattr(given, f.name)
            for f in dataclasses.fields(cls)
            if getattr(given, f.name) != getattr(plain, f.name)
        }
        out[group] = cls(**{**defaults, **changed})
    return out
