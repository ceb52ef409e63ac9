"""The background logger: a log's metrics computed on a worker thread while training goes on.

At most one log is in flight. The windows are synced and handed over on schedule; the
worker computes their report (the eigendecompositions) and the monitor publishes it from a
later ``step()``, or from ``flush()``/``close()``. For CUDA windows the worker runs on the
windows' device, on one side stream per device, after an event that marks the synced
windows complete, and it synchronises that stream before it lets go of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from gsam_monitor.monitor.report import LogResult

__all__ = ["BackgroundLogger"]


class BackgroundLogger:
    """One worker thread (created at the first log) and the log it is computing."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[LogResult] | None = None
        self._streams: dict[int, Any] = {}  # CUDA device index -> the background logs' stream

    def submit(self, compute: Callable[[], LogResult], devices: Iterable[torch.device], step: int) -> None:
        """Start computing a log (the caller has drained the previous one).

        Args:
            compute: Computes the report of windows that nothing else modifies any more.
            devices: Where those windows live.
            step: The log's step (for the result of a failed computation).
        """
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gsam-monitor")
        ready = None
        cuda = next((d for d in devices if d.type == "cuda"), None)
        if cuda is not None:  # the worker's stream must see the synced windows complete
            if cuda.index is None:
                cuda = torch.device("cuda", torch.cuda.current_device())
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(cuda))

        def job() -> LogResult:
            try:
                if cuda is None:
                    return compute()
                # The worker thread's current device is the statistics' one: a thread starts on
                # device 0, where it would create a stray context on every other rank's GPU.
                torch.cuda.set_device(cuda)
                stream = self._stream(cuda)
                with torch.cuda.stream(stream):
                    stream.wait_event(ready)
                    result = compute()
                # The windows' memory returns to the training stream's allocator when the job
                # drops them: the side stream must be done with them first.
                stream.synchronize()
                return result
            except Exception as err:
                return LogResult(step, errors=[(err, "log", f"step {step}")])

        self._pending = self._executor.submit(job)

    def _stream(self, device: torch.device) -> Any:
        """One CUDA stream per device for this logger's logs (created once)."""
        stream = self._streams.get(device.index)
        if stream is None:
            stream = self._streams[device.index] = torch.cuda.Stream(device)
        return stream

    def drain(self, *, wait: bool) -> LogResult | None:
        """The log in flight once it is done (``wait``: wait for it), else ``None``."""
        pending = self._pending
        if pending is None or (not wait and not pending.done()):
            return None
        self._pending = None
        return pending.result()

    def shutdown(self) -> None:
        """Stop the worker thread (after the log in flight) and drop the streams."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._streams.clear()
