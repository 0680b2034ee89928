"""One thread for the forward passes of every CPU torch model of a process.

libgomp, torch's OpenMP runtime, gives each thread that starts a parallel region a team of worker
threads of its own, and counts the threads of all teams together: once they outnumber the CPUs, an
idle worker spins only 100 rounds before it sleeps (its "throttled" spin count, whatever
GOMP_SPINCOUNT says), so each of the ~150 small parallel regions of a short text's forward pass
waits for a futex wake-up. Each model's scheduler has a forward thread of its own; with two CPU torch
models in one process (an embedder beside a reranker, or a CLIP model's text and image schedulers)
there were two teams, and each model's lone query took 1.5 x as long (MiniLM twice, 2 cores: 11 to
17 ms; docs/performance.md, "Two models in one process"). The registry hands every CPU torch
scheduler of a process one `PassThread` when there are two or more: their passes run on it one at a
time (on a CPU they shared the same cores anyway), and the process keeps one team. A lone CPU model
runs its passes on its own forward thread, with no hand-off. A pass cannot be interrupted, so while
another member is in use a scheduler cuts its passes to a quarter of its token budget
(scheduler.SHARED_SHARE), as bulk work does beside queries.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_COUNTS = threading.local()


def use_torch_threads(count: int) -> None:
    """This thread's intra-op thread count (torch.set_num_threads is OpenMP's setting of the calling
    thread), set only when it changes: the count is the thread's, not a scheduler's."""
    if getattr(_COUNTS, "now", 0) != count:
        import torch

        torch.set_num_threads(count)
        _COUNTS.now = count


class _Job:
    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class PassThread:
    """Runs callables one at a time on one daemon thread, started on first use, and hands each caller
    its result or exception (StopIteration included: a calibration generator steps here)."""

    def __init__(self, name: str = "cpu-passes") -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.members: list[Any] = []  # the schedulers whose passes run here

    def others_busy(self, scheduler: Any) -> bool:
        """Whether a member other than `scheduler` has items waiting, a batch on its way, or had a
        request in the last INTERACTIVE_RECENT_S (read without their locks: a stale answer only sizes one pass)."""
        return any(m is not scheduler and (m.queued > 0 or m.running or m.served_recently()) for m in self.members)

    @property
    def ident(self) -> int | None:
        return self._thread.ident if self._thread is not None else None

    def run(self, fn: Callable[[], T]) -> T:
        if self._thread is not None and threading.current_thread() is self._thread:
            return fn()
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                    thread.start()
                    self._thread = thread
        job = _Job(fn)
        self._jobs.put(job)
        job.done.wait()
        if job.error is not None:
            error, job.error = job.error, None
            raise error
        return job.result

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job.result = job.fn()
            except BaseException as exc:  # noqa: BLE001 - the caller's to handle, not this thread's
                job.error = exc
            job.fn = None  # type: ignore[assignment]
            job.done.set()
            del job  # the caller holds the result; this thread keeps nothing while it waits


def share_cpu_passes(schedulers: list[Any]) -> PassThread | None:
    """One PassThread for the CPU torch schedulers among `schedulers` (before they start) when there
    are two or more of them; None, and each keeps its own forward thread, otherwise."""
    cpu = [s for s in schedulers if s.cpu_threads]
    if len(cpu) < 2:
        return None
    shared = PassThread()
    shared.members = cpu
    for scheduler in cpu:
        scheduler.passes = shared
    return shared
