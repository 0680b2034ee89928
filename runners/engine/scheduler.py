"""The batch loop around one model replica: token budgets, fairness, fault containment, OOM splits.

Infinity's model replicas stay the runners (`encode_pre` tokenizes, `encode_core` runs the forward
pass, `encode_post` post-processes); this module replaces Infinity's batch handler around them:

- Each request is tokenized once, by the replica's own `encode_pre`, in the tokenizer thread. Its
  items are kept unpadded with their lengths: those give `usage` and each batch's padded size.
- The forward thread forms batches with runners.engine.batching's policy (`take_batch`: items in
  turns, small requests first, within the batch size and the padded-token budget), re-pads them
  (runners.engine.codec) and runs the replica.
- Hand-offs are a queue and a condition variable: nothing sleeps on a timer.
- Background requests (bulk jobs) run only when nothing else is ready, in smaller passes while
  interactive requests have come recently (INTERACTIVE_RECENT_S).
- A batch that raises fails only the request that raises: the batch is bisected by request until
  the failing one is alone. Out of memory splits the batch in halves down to one item, and the
  token budget shrinks below the size that failed (runners.engine.memory).
- The registry's watchdog asks `dead_loops()` (a loop that died is restarted with `restart()`)
  and `stalled_for()` (no progress with work waiting: the model is taken out of service).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from runners import metrics
from runners.engine.batching import (
    BACKGROUND,
    DEFAULT_COST,
    CostModel,
    Item,
    QueuedRequest,
    padded_tokens,
    priority_of,
    take_batch,
)
from runners.engine.calibration import CostSamples, fitted, timed_passes
from runners.engine.codec import FeatureCodec
from runners.engine.devices import process_torch_threads
from runners.engine.memory import TokenBudget, free_device_memory, is_out_of_memory
from runners.engine.passes import PassThread, use_torch_threads
from runners.engine.tokenizing import TokenizerStage
from runners.errors import ModelError, OutOfMemory, ServiceError, Unavailable

INLINE_ITEMS = 64  # an inline replica's request up to this many texts is answered on the event loop itself
log = logging.getLogger("embed_rerank.scheduler")
# Background work (bulk jobs) within this many seconds of an interactive request runs in passes of a
# BACKGROUND_SHARE of the token budget: a query waits for a quarter of a full pass, not a whole one.
INTERACTIVE_RECENT_S = 10.0
BACKGROUND_SHARE = 4
# A model that shares its pass thread with another that has work waiting passes 1 / SHARED_SHARE of its budget.
SHARED_SHARE = 4



def _settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class ModelScheduler(TokenizerStage):
    """Batches, runs and answers the requests of one model replica (see the module docstring)."""

    def __init__(self, replica: Any, *, name: str, max_batch_size: int, max_batch_tokens: int,
                 probe: Sequence[Any], restarts_allowed: int = 3, restart_window_s: float = 60.0,
                 single_thread_tokens: int = 0, cpu_threads: int = 0, cost: CostModel = DEFAULT_COST) -> None:
        self.replica = replica
        self.probe = probe
        # What a forward pass costs by its shape (runners.engine.calibration): the batching policy
        # cuts the ready items into the batches that finish them soonest. The device's default until
        # the passes of `calibrate_when_idle` are timed; every batch's time refits it.
        self.cost = cost
        self.timings = CostSamples()
        self._calibration: Any = None  # the timed passes still to run (a generator), run when idle
        self._calibration_started = 0.0
        # CPU torch models: batches of at most this many padded tokens run on one intra-op thread
        # (runners.engine.devices.single_thread_tokens says why and how much); 0: never.
        self.single_thread_tokens = single_thread_tokens
        # CPU torch models: the forward thread's intra-op threads otherwise (process_torch_threads);
        # 0: leave the thread as torch starts it.
        self.cpu_threads = cpu_threads
        # CPU torch schedulers of a process with two or more: the one thread their passes run on
        # (runners.engine.passes says why); None: this scheduler's own forward thread.
        self.passes: PassThread | None = None
        self._pass_s: float | None = None  # the last pass's own time (a shared thread's wait left out)
        self.name = name
        self.max_batch_size = max_batch_size
        self.budget = TokenBudget(max_batch_tokens)
        # A replica may bring its own codec (split and re-pad, runners.models.image); else one is learnt
        # from the probe.
        self.codec = getattr(replica, "batch_codec", None) or FeatureCodec(replica, probe)
        self.restarts_allowed = restarts_allowed
        self.restart_window_s = restart_window_s
        self.dead_reason: str | None = None
        self.counters = {"batches": 0, "batch_failures": 0, "oom_splits": 0, "restarts": 0}
        self._inbox: queue.SimpleQueue[QueuedRequest | None] = queue.SimpleQueue()
        self._backlog: list[QueuedRequest] = []  # the tokenizer thread's own: requests not fully tokenized
        self._cond = threading.Condition()
        self._active: list[QueuedRequest] = []  # requests with tokenized items waiting for a batch
        self._pending = 0  # items in the active requests' `ready` queues
        self._pending_tokens = 0  # and their tokens
        self._tokenizer_busy = False
        self._tokenizer_lock = threading.Lock()  # one encode_pre at a time: HF tokenizers are not thread-safe
        self._bulk_turn = False
        self._last_interactive = -INTERACTIVE_RECENT_S  # when the last request that is not background came
        self._tick = 0  # batches formed so far (the policy's fairness clock)
        self._seq = itertools.count()
        self._stopping = False
        self._busy_since: float | None = None
        self._running: list[Item] = []  # the batch in the forward pass now
        self._last_progress = time.monotonic()
        self._restart_times: deque[float] = deque()
        self._threads: dict[str, threading.Thread] = {}
        self._batch_histogram = metrics.BATCH_SIZE.labels(name)
        self._tokens_histogram = metrics.BATCH_TOKENS.labels(name)

    # ---- lifecycle ----

    def start(self) -> None:
        self._stopping = False
        for role in ("tokenizer", "forward"):
            self._spawn(role)

    def _spawn(self, role: str) -> None:
        target = self._tokenize_loop if role == "tokenizer" else self._forward_loop
        thread = threading.Thread(target=target, name=f"{role}:{self.name}", daemon=True)
        self._threads[role] = thread
        thread.start()

    def stop(self, reason: str = "the server is shutting down") -> None:
        """Stop both loops and fail every request still waiting (503)."""
        self._stopping = True
        self._inbox.put(None)
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads.values():
            thread.join(timeout=5)
        self._fail_all(Unavailable(f"model {self.name!r} stopped: {reason}"))

    def kill(self, reason: str) -> None:
        """Out of service for good: refuse new requests and fail the waiting ones. Threads that hang
        inside the model cannot be stopped; the process is expected to exit soon after."""
        self.dead_reason = reason
        self._stopping = True
        self._inbox.put(None)
        with self._cond:
            self._cond.notify_all()
        self._fail_all(Unavailable(f"model {self.name!r} is out of service ({reason}); the server is restarting"))

    def _fail_all(self, error: ServiceError) -> None:
        waiting = list(self._backlog)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                waiting.append(item)
        with self._cond:
            waiting += self._active
            waiting += [item.request for item in self._running]
            self._active = []
            self._pending = 0
            self._pending_tokens = 0
        for request in waiting:
            self._fail(request, error)

    def stalled_for(self) -> float:
        """Seconds the forward loop has gone without progress while work waits (0 when idle or moving)."""
        now = time.monotonic()
        if self._busy_since is not None:
            return now - self._busy_since
        if self._pending:
            return now - self._last_progress
        return 0.0

    def dead_loops(self) -> list[str]:
        if self._stopping:
            return []
        return [role for role, thread in self._threads.items() if not thread.is_alive()]

    def restart(self, roles: list[str]) -> bool:
        """Start the loops that died again; False once more than `restarts_allowed` restarts fell in
        the last `restart_window_s` seconds (the model keeps dying: give up)."""
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > self.restart_window_s:
            self._restart_times.popleft()
        if len(self._restart_times) >= self.restarts_allowed:
            return False
        self._restart_times.append(now)
        for role in roles:
            self._spawn(role)
        self.counters["restarts"] += 1
        metrics.LOOP_RESTARTS.labels(self.name).inc()
        return True

    @property
    def queued(self) -> int:
        return self._pending

    @property
    def running(self) -> bool:
        """A batch is in its pass, or on its way to a shared pass thread."""
        return bool(self._running)

    def served_recently(self) -> bool:
        """A request that is not background work came in the last INTERACTIVE_RECENT_S."""
        return time.monotonic() - self._last_interactive < INTERACTIVE_RECENT_S

    def calibrate_when_idle(self, row: dict[str, Any], length: int, max_tokens: int) -> None:
        """Time the calibration passes (runners.engine.calibration.timed_passes) on `row`, one pass
        each time the batch loop has nothing to do: the model serves at once, with the default cost."""
        self._calibration = timed_passes(self.replica, self.codec, row, length, max_tokens, self.budget.limit,
                                         self._set_threads)

    @property
    def calibrating(self) -> bool:
        return self._calibration is not None

    def _calibration_step(self) -> None:
        """One timed pass; after the last, the cost model from them (and any batch timed meanwhile)."""
        if not self._calibration_started:
            self._calibration_started = time.perf_counter()
        try:
            self._on_pass_thread(lambda: next(self._calibration))
            return
        except StopIteration as done:
            timed = done.value
        except Exception as exc:  # noqa: BLE001 - the default cost model stays, the model still serves
            free_device_memory()
            log.warning("model %s: calibration passes failed (%s: %s); batches cut by the default cost model",
                        self.name, type(exc).__name__, exc)
            timed = []
        self._calibration = None
        self.timings.samples.extend(timed)
        if timed:
            self.cost = fitted(self.timings, self.name, self.cost, time.perf_counter() - self._calibration_started)

    # ---- the front: called on the event loop ----

    async def run(self, inputs: Sequence[Any], lengths: list[int] | None = None) -> tuple[list[Any], int]:
        """Results of the replica for `inputs`, in order, and the tokens the model read; `lengths`, when
        given (one slot per input), receives each input's token count (the cache stores it)."""
        if self.dead_reason is not None:
            raise Unavailable(f"model {self.name!r} is out of service ({self.dead_reason}); the server is restarting")
        if getattr(self.replica, "inline", False):
            return await self._run_inline(inputs, lengths)
        loop = asyncio.get_running_loop()
        priority = priority_of(inputs)
        if priority != BACKGROUND:
            self._last_interactive = time.monotonic()
        request = QueuedRequest(
            seq=next(self._seq), priority=priority, inputs=inputs, loop=loop,
            future=loop.create_future(), results=[None] * len(inputs), remaining=len(inputs), lengths=lengths,
        )
        if not self._tokenize_here(request):
            self._inbox.put(request)
        try:
            return await request.future
        except asyncio.CancelledError:
            request.done = True  # its items still queued are dropped when a batch meets them
            raise

    async def _run_inline(self, inputs: Sequence[Any], lengths: list[int] | None) -> tuple[list[Any], int]:
        """A replica with no forward pass (static embeddings: a table lookup, microseconds a text) is
        not queued nor batched: it answers in the request's own call, off the event loop only when
        the request is large."""

        def work() -> tuple[list[Any], list[int]]:
            vectors, counts = self.replica.embed(list(inputs))
            return list(vectors), counts

        try:
            if len(inputs) <= INLINE_ITEMS:
                results, counts = work()
            else:
                results, counts = await asyncio.to_thread(work)
        except Exception as exc:  # noqa: BLE001 - the failure is this request's alone
            raise ModelError(f"model {self.name!r} could not embed this request: {type(exc).__name__}: {exc}") from exc
        if lengths is not None:
            lengths[:] = counts
        self.counters["batches"] += 1
        return results, sum(counts)

    # ---- the forward thread ----

    def _take_batch(self) -> list[Item]:
        """The next batch by the policy (runners.engine.batching.take_batch), and the bookkeeping."""
        live = []
        for request in self._active:
            if request.done:
                self._pending -= len(request.ready)
                self._pending_tokens -= sum(n for _, _, n in request.ready)
                request.ready.clear()
            if request.ready:
                live.append(request)
            else:
                request.active = False
        self._tick += 1
        budget = self.budget.current
        if (live and all(r.priority == BACKGROUND for r in live)
                and time.monotonic() - self._last_interactive < INTERACTIVE_RECENT_S):
            # Background work while queries come and go: smaller passes, so a query that arrives during
            # one waits less (a pass cannot be interrupted). Alone, background work gets full passes.
            budget = max(1, budget // BACKGROUND_SHARE)
        elif self.passes is not None and self.passes.others_busy(self):
            # Another model's passes wait on the same thread (runners.engine.passes): smaller passes,
            # so its lone query waits for a fraction of one of ours, as a query does for bulk work.
            budget = max(1, budget // SHARED_SHARE)
        batch, self._bulk_turn = take_batch(live, self.max_batch_size, budget, self._bulk_turn,
                                            self.cost, self._tick)
        self._pending -= len(batch)
        self._pending_tokens -= sum(item.length for item in batch)
        self._active = [r for r in live if r.ready]
        for request in live:
            request.active = bool(request.ready)
        return batch

    def _batch_ready(self) -> bool:
        """Work is waiting, and either it fills a batch or the tokenizer has nothing more coming
        right now: under load batches fill up, a lone request starts at once, nothing sleeps."""
        if self._pending <= 0:
            return False
        return (not self._tokenizer_busy or self._pending >= self.max_batch_size
                or self._pending_tokens >= self.budget.current)

    def _forward_loop(self) -> None:
        batch: list[Item] = []
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._batch_ready():
                        self._last_progress = time.monotonic()
                        if self._calibration is not None and not self._pending and not self._tokenizer_busy:
                            break
                        self._cond.wait()
                    if self._stopping:
                        return
                    batch = self._take_batch() if self._batch_ready() else []
                if not batch:
                    if self._calibration is not None:
                        self._calibration_step()
                    continue
                self._busy_since = time.monotonic()
                self._running = batch
                self._run(batch)
                self._running = []
                self._busy_since = None
                self._last_progress = time.monotonic()
                batch = []
        except BaseException as exc:
            self._busy_since = None
            self._running = []
            error = ModelError(f"model {self.name!r}: the batch loop died on this batch ({type(exc).__name__}: {exc})")
            for item in batch:
                self._fail(item.request, error)
            log.exception("model %s: batch loop died", self.name)
            raise

    def _set_threads(self, padded: int) -> None:
        """The intra-op threads of a pass of `padded` tokens, on the thread that runs it (a new thread
        starts on the count last set anywhere: runners.engine.devices.process_torch_threads)."""
        if self.single_thread_tokens and padded <= self.single_thread_tokens:
            use_torch_threads(1)
        elif self.cpu_threads or self.single_thread_tokens:
            use_torch_threads(self.cpu_threads or process_torch_threads())

    def _on_pass_thread(self, fn: Callable[[], Any]) -> Any:
        return fn() if self.passes is None else self.passes.run(fn)

    def _forward(self, batch: Sequence[Item]) -> Any:
        def one_pass() -> Any:
            started = time.perf_counter()
            self._set_threads(padded_tokens(batch))
            features = self.codec.collate([item.features for item in batch])
            out = self.replica.encode_post(self.replica.encode_core(features))
            self._pass_s = time.perf_counter() - started
            return out

        return self._on_pass_thread(one_pass)

    def _run(self, batch: list[Item]) -> None:
        batch = [item for item in batch if not item.request.done]
        if not batch:
            return
        padded = padded_tokens(batch)
        started = time.perf_counter()
        self._pass_s = None
        try:
            results = self._forward(batch)
        except Exception as exc:  # noqa: BLE001 - any failure of the model is contained to this batch
            self._recover(batch, padded, exc)
            return
        seconds = self._pass_s if self._pass_s is not None else time.perf_counter() - started
        refit = self.timings.add(len(batch), padded // len(batch), seconds)
        if refit is not None:
            self.cost = refit
        self.counters["batches"] += 1
        self._batch_histogram.observe(len(batch))
        self._tokens_histogram.observe(padded)
        self.budget.succeeded()
        for item, result in zip(batch, results):
            request = item.request
            if request.done:
                continue
            request.results[item.index] = result
            request.remaining -= 1
            if request.remaining == 0:
                request.done = True
                request.loop.call_soon_threadsafe(_settle, request.future, (request.results, request.usage))

    def _recover(self, batch: list[Item], padded: int, exc: Exception) -> None:
        if is_out_of_memory(exc):
            free_device_memory()
            self.budget.shrink(padded)
            self.counters["oom_splits"] += 1
            metrics.OOM_SPLITS.labels(self.name).inc()
            log.warning("model %s: out of memory on %d items (%d padded tokens); token budget now %d",
                        self.name, len(batch), padded, self.budget.current)
            if len(batch) == 1:
                item = batch[0]
                self._fail(item.request, OutOfMemory(
                    f"input {item.index} has {item.length} tokens, and model {self.name!r} ran out of memory on it "
                    f"alone (batches now stay under {self.budget.current} padded tokens): send a shorter text, "
                    "or fewer tokens with max_tokens_per_doc / a smaller truncation window",
                    param="input",
                ))
                return
            batch.sort(key=lambda item: item.length)
            half = len(batch) // 2
            self._run(batch[:half])
            self._run(batch[half:])
            return
        self.counters["batch_failures"] += 1
        metrics.BATCH_FAILURES.labels(self.name).inc()
        requests = list(dict.fromkeys(item.request for item in batch))
        if len(requests) > 1:
            # Find the request that raises: the others of this batch are answered.
            first = set(requests[: len(requests) // 2])
            self._run([item for item in batch if item.request in first])
            self._run([item for item in batch if item.request not in first])
            return
        log.warning("model %s failed on a batch of %d items: %s: %s", self.name, len(batch), type(exc).__name__, exc,
                    exc_info=exc)
        self._fail(requests[0], ModelError(f"model {self.name!r} failed on this request: {type(exc).__name__}: {exc}"))

    def _fail(self, request: QueuedRequest, error: ServiceError) -> None:
        if request.done:
            return
        request.done = True
        request.loop.call_soon_threadsafe(_settle, request.future, None, error)
