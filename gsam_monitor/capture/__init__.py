"""Capture: from the model's forward to rows of activations, without disturbing the model.

Modules: ``layers`` (resolving ``layers=`` / ``ignore=`` to modules), ``hooks`` (registering
hooks, the forward context: mask and phase), ``compiled`` (the ``observe`` operator that
carries traced hooks out of torch.compile graphs, and dropping stale compiled code),
``rows`` (feature rows, mask alignment, token sampling) and ``activations``
(``ActivationCapture``: the hooks of one monitor and their row pipeline).
"""

from gsam_monitor.capture.activations import ActivationCapture
from gsam_monitor.capture.layers import LayerSpec, LayerTarget, resolve_layers

__all__ = ["ActivationCapture", "LayerSpec", "LayerTarget", "resolve_layers"]
