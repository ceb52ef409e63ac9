"""A griffe extension for the API reference: the monitor's read-only views.

``GSAMMonitor`` declares attributes such as ``last_metrics = _view("_logs", "last_metrics",
"What the last log wrote ...")``: properties made by a helper, whose docstring is the helper's
last argument. Griffe reads the source without running it, so it sees a bare assignment; this
extension gives such attributes their docstring and the ``property`` label
(``mkdocs.yml``: ``extensions: [scripts/griffe_views.py]``).
"""

from __future__ import annotations

import ast
from typing import Any

import griffe

HELPERS = {"_view": -1, "_setting": None}  # the docstring argument's index (None: made from the name)


class ViewDocs(griffe.Extension):
    def on_attribute_instance(
        self, *, node: ast.AST | griffe.ObjectNode, attr: griffe.Attribute, **kwargs: Any
    ) -> None:
        value = getattr(node, "value", None)
        if not (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in HELPERS):
            return
        index = HELPERS[value.func.id]
        if index is None:
            text = f"``config.{attr.name}`` (read-only): see ``MonitorConfig``."
        else:
            parts = [a.value for a in value.args[index:] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if not parts:
                return
            text = "".join(parts)
        attr.docstring = griffe.Docstring(text, parent=attr)
        attr.labels |= {"property", "read-only"}
