"""The monitor: ``GSAMMonitor`` and the units it is a facade over.

Modules, in the order a log flows: ``options`` (the option groups, each checked where it is
made), ``config`` (the settings resolved together, and the budgets), ``memory`` (the plan: what
the device and the host hold), ``schedule`` (which steps log, which steps collect), ``window``
(one layer and phase: its accumulation buffer where the activations are, its host totals, its
reference), ``windows`` (every window: created within the budget, flushed, advanced), ``sync``
(the windows summed over ranks), ``reference`` (what a log compares each window with),
``report`` (a log's metrics and warnings, as data: pure), ``logger`` (the log cycle: sync,
report, publish, advance) with ``background`` (the worker thread and its CUDA stream),
``faults`` (counted, warned-once problems), ``ranks`` (the process's place in
``torch.distributed``, and which rank owns which layer when they are sharded), ``checkpoint``
(the state dict), and ``facade`` (``GSAMMonitor``, ``memory_report``).
"""

from gsam_monitor.monitor.config import DEFAULT_MAX_STATE_BYTES, state_bytes_per_layer
from gsam_monitor.monitor.facade import GSAMMonitor, memory_report

__all__ = ["DEFAULT_MAX_STATE_BYTES", "GSAMMonitor", "memory_report", "state_bytes_per_layer"]
