"""The monitor: ``GSAMMonitor`` and the units it is a facade over.

Modules, in the order a log flows: ``config`` (the settings, checked once, and the memory
budget), ``schedule`` (which steps log, which steps collect), ``windows`` (the statistics of
each layer and phase: created within the budget, synced, advanced), ``report`` (a log's
metrics and warnings, as data: pure), ``logger`` (the log cycle: sync, report, publish,
advance) with ``background`` (the worker thread and its CUDA stream), ``faults`` (counted,
warned-once problems), ``ranks`` (the process's place in ``torch.distributed``),
``checkpoint`` (the state dict), and ``facade`` (``GSAMMonitor``).
"""

from gsam_monitor.monitor.config import DEFAULT_MAX_STATE_BYTES, state_bytes_per_layer
from gsam_monitor.monitor.facade import GSAMMonitor, memory_report

__all__ = ["DEFAULT_MAX_STATE_BYTES", "GSAMMonitor", "memory_report", "state_bytes_per_layer"]
