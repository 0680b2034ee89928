"""The batch loop around one model replica: token budgets, fairness, fault containment, OOM splits.

Infinity's model replicas stay the runners (`encode_pre` tokenizes, `encode_core` runs the forward
pass, `encode_post` post-processes); this module replaces Infinity's batch handler around them:

- Each request is tokenized once, by the replica's own `encode_pre`, in the tokenizer thread. Its
  items are kept unpadded with their lengths: those give `usage` and each batch's padded size.
- The forward thread forms batches by taking the requests' items in turns (one item of each
  request per round, small requests first), up to the batch size and the token budget (padded
  tokens, as the forward pass pays them), re-pads them and runs the replica. A batch with small
  requests in it leaves out bulk items much longer than theirs; bulk batches take turns with it.
- Hand-offs are a queue and a condition variable: nothing sleeps on a timer.
- A batch that raises fails only the request that raises: the batch is bisected by request until
  the failing one is alone. Out of memory splits the batch in halves down to one item, and the
  token budget shrinks below the size that failed (it grows back after a run of good batches).
- The registry's watchdog asks `dead_loops()` (a loop that died is restarted with `restart()`)
  and `stalled_for()` (no progress with work waiting: the model is taken out of service).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from runners import metrics
from runners.errors import ModelError, OutOfMemory, ServiceError, Unavailable

log = logging.getLogger("embed_rerank.scheduler")

TOKENIZE_CHUNK = 64  # texts per encode_pre call: a bulk request does not hold the tokenizer for long
SMALL_REQUEST_ITEMS = 8  # requests with at most this many items go first in every round
INLINE_TOKENIZE_CHARS = 2048  # an idle scheduler tokenizes a small request this long on the caller's thread
GROW_AFTER_BATCHES = 64  # good batches in a row before a shrunken token budget grows by a quarter
OOM_MEMORY_S = 600.0  # for this long after an OOM the budget stays below the size that failed
_OOM_PHRASES = ("out of memory", "failed to allocate memory", "cannot allocate memory", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, MemoryError, or an allocator error of CUDA, MPS, CPU or ONNX Runtime."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return any(phrase in text for phrase in _OOM_PHRASES)


def _free_device_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is None:
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        mps.empty_cache()


class FeatureCodec:
    """Splits what `encode_pre` returns into unpadded rows and pads chosen rows back into a batch.

    Learned from the replica itself with a probe of two inputs of different lengths: which side it
    pads, and the pad value of every feature (input_ids, attention_mask, token_type_ids, ...). The
    re-padded batch is exactly what `encode_pre` would return for those inputs together.
    """

    def __init__(self, replica: Any, probe: Sequence[Any]) -> None:
        features = replica.encode_pre(list(probe))
        if "attention_mask" not in features:
            raise TypeError(f"{type(replica).__name__}.encode_pre returns no attention_mask: it cannot be batched here")
        mask = features["attention_mask"]
        self.is_torch = type(mask).__module__.startswith("torch")
        lengths = [int(n) for n in mask.sum(1).tolist()]
        width = int(mask.shape[1])
        short = lengths.index(min(lengths))
        if min(lengths) == width:
            raise ValueError(f"{type(replica).__name__}: the probe inputs tokenized to the same length")
        self.pad_left = int(mask[short][0]) == 0
        pad_at = 0 if self.pad_left else width - 1
        self.pad_values: dict[str, Any] = {}
        self.dtypes: dict[str, Any] = {}
        for key, value in features.items():
            if getattr(value, "ndim", None) != 2 or tuple(value.shape) != (len(lengths), width):
                raise TypeError(f"{type(replica).__name__}.encode_pre gives {key!r} of shape "
                                f"{getattr(value, 'shape', '?')}: only [batch, tokens] features can be batched here")
            self.pad_values[key] = value[short][pad_at].item()
            self.dtypes[key] = value.dtype

    def split(self, features: Any) -> list[tuple[dict[str, Any], int]]:
        """One (features, length) per row, without the padding."""
        mask = features["attention_mask"]
        width = int(mask.shape[1])
        keys = list(self.pad_values)
        rows = []
        for i, n in enumerate(int(x) for x in mask.sum(1).tolist()):
            cut = slice(width - n, width) if self.pad_left else slice(0, n)
            rows.append(({k: features[k][i, cut] for k in keys}, n))
        return rows

    def collate(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if len(rows) == 1:
            return {k: v[None] for k, v in rows[0].items()}
        if self.is_torch:
            from torch.nn.utils.rnn import pad_sequence

            side = "left" if self.pad_left else "right"
            return {k: pad_sequence([r[k] for r in rows], batch_first=True, padding_value=pad, padding_side=side)
                    for k, pad in self.pad_values.items()}
        import numpy as np

        width = max(len(r["attention_mask"]) for r in rows)
        out = {}
        for k, pad in self.pad_values.items():
            arr = np.full((len(rows), width), pad, dtype=self.dtypes[k])
            for i, r in enumerate(rows):
                n = len(r[k])
                if self.pad_left:
                    arr[i, width - n:] = r[k]
                else:
                    arr[i, :n] = r[k]
            out[k] = arr
        return out


@dataclass(eq=False)
class _Request:
    seq: int
    priority: int
    inputs: Sequence[Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    results: list[Any]
    remaining: int
    usage: int = 0
    tokenized: int = 0  # inputs handed to encode_pre so far
    ready: deque = field(default_factory=deque)  # (index, features, length), tokenized and not yet batched
    active: bool = False  # listed in the scheduler's active requests
    done: bool = False  # answered, failed or given up by its caller


@dataclass(eq=False)
class _Item:
    request: _Request
    index: int
    features: dict[str, Any]
    length: int


def _chars(inputs: Sequence[Any]) -> int | None:
    """Characters in texts or text pairs; None for any other kind of input."""
    total = 0
    for x in inputs:
        if isinstance(x, str):
            total += len(x)
        elif type(x) is tuple and all(isinstance(part, str) for part in x):
            total += sum(len(part) for part in x)
        else:
            return None
    return total


_process_threads: int | None = None


def process_torch_threads() -> int:
    """torch's intra-op thread count as this process started with it, read once. It has to be kept:
    `torch.set_num_threads(n)` in any thread becomes the count that every thread started later
    begins with, so after one scheduler ran a small batch on one thread, a forward thread started
    afterwards (another model's, a restarted loop) would start on one thread too."""
    global _process_threads
    if _process_threads is None:
        import torch

        _process_threads = torch.get_num_threads()
    return _process_threads


def _settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class TokenBudget:
    """Padded tokens per batch: the configured limit, lowered after an out-of-memory error.

    After an OOM at T padded tokens the budget drops to T/2 and stays below T for OOM_MEMORY_S;
    every GROW_AFTER_BATCHES good batches it grows by a quarter, up to that ceiling or the limit.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.current = limit
        self.last_oom_tokens: int | None = None
        self._ceiling = limit
        self._ceiling_until = 0.0
        self._good = 0

    def shrink(self, failed_tokens: int) -> None:
        self.last_oom_tokens = failed_tokens
        self.current = max(1, min(self.current, failed_tokens // 2))
        self._ceiling = max(1, failed_tokens - 1)
        self._ceiling_until = time.monotonic() + OOM_MEMORY_S
        self._good = 0

    def succeeded(self) -> None:
        if self.current >= self.limit:
            return
        self._good += 1
        if self._good < GROW_AFTER_BATCHES:
            return
        self._good = 0
        ceiling = self._ceiling if time.monotonic() < self._ceiling_until else self.limit
        self.current = max(self.current, min(ceiling, self.limit, int(self.current * 1.25) + 1))


class ModelScheduler:
    """Batches, runs and answers the requests of one model replica (see the module docstring)."""

    def __init__(self, replica: Any, *, name: str, max_batch_size: int, max_batch_tokens: int,
                 probe: Sequence[Any], restarts_allowed: int = 3, restart_window_s: float = 60.0,
                 single_thread_tokens: int = 0, cpu_threads: int = 0) -> None:
        self.replica = replica
        # CPU torch models: batches of at most this many padded tokens run on one intra-op thread
        # (engines.single_thread_tokens says why and how much); 0: never.
        self.single_thread_tokens = single_thread_tokens
        # CPU torch models: the forward thread's intra-op threads otherwise (process_torch_threads);
        # 0: leave the thread as torch starts it.
        self.cpu_threads = cpu_threads
        self._threads_now = 0
        self.name = name
        self.max_batch_size = max_batch_size
        self.budget = TokenBudget(max_batch_tokens)
        self.codec = FeatureCodec(replica, probe)
        self.restarts_allowed = restarts_allowed
        self.restart_window_s = restart_window_s
        self.dead_reason: str | None = None
        self.counters = {"batches": 0, "batch_failures": 0, "oom_splits": 0, "restarts": 0}
        self._inbox: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._backlog: list[_Request] = []  # the tokenizer thread's own: requests not fully tokenized
        self._cond = threading.Condition()
        self._active: list[_Request] = []  # requests with tokenized items waiting for a batch
        self._pending = 0  # items in the active requests' `ready` queues
        self._pending_tokens = 0  # and their tokens
        self._tokenizer_busy = False
        self._tokenizer_lock = threading.Lock()  # one encode_pre at a time: HF tokenizers are not thread-safe
        self._bulk_turn = False
        self._seq = itertools.count()
        self._stopping = False
        self._busy_since: float | None = None
        self._running: list[_Item] = []  # the batch in the forward pass now
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

    # ---- the front: called on the event loop ----

    async def run(self, inputs: Sequence[Any]) -> tuple[list[Any], int]:
        """Results of the replica for `inputs`, in order, and the tokens the model read."""
        if self.dead_reason is not None:
            raise Unavailable(f"model {self.name!r} is out of service ({self.dead_reason}); the server is restarting")
        loop = asyncio.get_running_loop()
        request = _Request(
            seq=next(self._seq), priority=0 if len(inputs) <= SMALL_REQUEST_ITEMS else 1, inputs=inputs, loop=loop,
            future=loop.create_future(), results=[None] * len(inputs), remaining=len(inputs),
        )
        if not self._tokenize_here(request):
            self._inbox.put(request)
        try:
            return await request.future
        except asyncio.CancelledError:
            request.done = True  # its items still queued are dropped when a batch meets them
            raise

    def _tokenize_here(self, request: _Request) -> bool:
        """A small request that finds the scheduler idle is tokenized right here (a fraction of a
        millisecond) and goes straight to the forward thread: one thread hand-off less for a lone
        query. Under load the tokenizer thread does it, many requests per call, off the event loop."""
        if (self._pending or self._busy_since is not None or self._tokenizer_busy or not self._inbox.empty()
                or self._stopping or len(request.inputs) > SMALL_REQUEST_ITEMS):
            return False
        chars = _chars(request.inputs)
        if chars is None or chars > INLINE_TOKENIZE_CHARS:
            return False
        if not self._tokenizer_lock.acquire(blocking=False):
            return False
        try:
            self._tokenize([(request, 0, len(request.inputs))])
        finally:
            self._tokenizer_lock.release()
        return True

    # ---- the tokenizer thread ----

    def _tokenize_loop(self) -> None:
        parts: list[tuple[_Request, int, int]] = []
        try:
            while not self._stopping:
                if not self._backlog:
                    with self._cond:
                        self._tokenizer_busy = False
                        self._cond.notify()
                    incoming = self._inbox.get()
                    if incoming is None:
                        return
                    self._tokenizer_busy = True
                    self._backlog.append(incoming)
                while True:
                    try:
                        incoming = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if incoming is None:
                        return
                    self._backlog.append(incoming)
                self._backlog.sort(key=lambda r: (r.priority, r.seq))
                parts = self._next_chunk()
                with self._tokenizer_lock:
                    self._tokenize(parts)
                self._backlog = [r for r in self._backlog if not r.done and r.tokenized < len(r.inputs)]
                parts = []
        except BaseException as exc:
            for request, _, _ in parts:
                self._fail(request, ModelError(f"model {self.name!r}: the tokenizer loop died on this request "
                                               f"({type(exc).__name__}: {exc})"))
            self._backlog = [r for r in self._backlog if not r.done]
            with self._cond:
                self._tokenizer_busy = False
                self._cond.notify()
            log.exception("model %s: tokenizer loop died", self.name)
            raise

    def _next_chunk(self) -> list[tuple[_Request, int, int]]:
        """(request, start, count) parts of the backlog, in priority order, up to TOKENIZE_CHUNK inputs:
        many small requests are tokenized by one `encode_pre` call."""
        parts, room = [], TOKENIZE_CHUNK
        for request in self._backlog:
            if request.done:
                continue
            count = min(len(request.inputs) - request.tokenized, room)
            parts.append((request, request.tokenized, count))
            room -= count
            if room <= 0:
                break
        return parts

    def _tokenize(self, parts: list[tuple[_Request, int, int]]) -> None:
        inputs = [x for request, start, count in parts for x in request.inputs[start:start + count]]
        try:
            rows = self.codec.split(self.replica.encode_pre(inputs))
        except Exception as exc:
            if len(parts) > 1:  # find the request that cannot be tokenized; the others go on
                for part in parts:
                    self._tokenize([part])
                return
            request = parts[0][0]
            log.warning("model %s: tokenizing a request failed: %s: %s", self.name, type(exc).__name__, exc)
            self._fail(request, ModelError(f"model {self.name!r} could not tokenize this request: "
                                           f"{type(exc).__name__}: {exc}"))
            return
        offset = 0
        with self._cond:
            for request, start, count in parts:
                mine = rows[offset:offset + count]
                offset += count
                if request.done:
                    continue
                request.usage += sum(n for _, n in mine)
                request.tokenized = start + count
                for i in sorted(range(count), key=lambda i: mine[i][1]):
                    request.ready.append((start + i, mine[i][0], mine[i][1]))
                self._pending += count
                self._pending_tokens += sum(n for _, n in mine)
                if not request.active:
                    request.active = True
                    self._active.append(request)
            if self._inbox.empty() and all(r.done or r.tokenized >= len(r.inputs) for r in self._backlog):
                # Nothing more is coming: say so now, so the forward thread starts on this one wake-up
                # rather than waking, finding the tokenizer busy, and waiting for the next notify.
                self._tokenizer_busy = False
            self._cond.notify()

    # ---- the forward thread ----

    def _take_batch(self) -> list[_Item]:
        """Items of the active requests in turns, small requests first, within both limits."""
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
        live.sort(key=lambda r: (r.priority, r.seq))
        batch: list[_Item] = []
        if not live:
            return batch
        width = 0
        budget = self.budget.current
        # While small and bulk requests both wait, batches take turns: a small requests' batch takes
        # no bulk item longer than twice their longest first item (a query does not pay for a batch
        # of long texts), then a bulk batch takes bulk items only (a stream of queries never starves
        # a bulk request, and a query waits for at most that one batch).
        cap = None
        candidates = live
        if live[0].priority == 0 and live[-1].priority > 0:
            if self._bulk_turn:
                candidates = [r for r in live if r.priority > 0]
            else:
                cap = 2 * max(r.ready[0][2] for r in live if r.priority == 0)
            self._bulk_turn = not self._bulk_turn
        else:
            self._bulk_turn = False
        taking = True
        while taking and len(batch) < self.max_batch_size:
            taking = False
            for request in candidates:
                if not request.ready or len(batch) >= self.max_batch_size:
                    continue
                index, features, length = request.ready[0]
                if cap is not None and request.priority > 0 and length > cap:
                    continue
                if batch and max(width, length) * (len(batch) + 1) > budget:
                    continue
                request.ready.popleft()
                batch.append(_Item(request, index, features, length))
                width = max(width, length)
                taking = True
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
        batch: list[_Item] = []
        self._threads_now = 0  # a new thread: torch starts it on the count last set anywhere
        try:
            if self.cpu_threads:
                self._use_threads(self.cpu_threads)
            while True:
                with self._cond:
                    while not self._stopping and not self._batch_ready():
                        self._last_progress = time.monotonic()
                        self._cond.wait()
                    if self._stopping:
                        return
                    batch = self._take_batch()
                if not batch:
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

    def _use_threads(self, count: int) -> None:
        """The forward thread's own intra-op threads (OpenMP's setting is per thread)."""
        if count != self._threads_now:
            import torch

            torch.set_num_threads(count)
            self._threads_now = count

    def _set_threads(self, padded: int) -> None:
        self._use_threads(1 if padded <= self.single_thread_tokens else (self.cpu_threads or process_torch_threads()))

    def _forward(self, batch: Sequence[_Item]) -> Any:
        if self.single_thread_tokens:
            self._set_threads(len(batch) * max(item.length for item in batch))
        features = self.codec.collate([item.features for item in batch])
        return self.replica.encode_post(self.replica.encode_core(features))

    def _run(self, batch: list[_Item]) -> None:
        batch = [item for item in batch if not item.request.done]
        if not batch:
            return
        padded = len(batch) * max(item.length for item in batch)
        try:
            results = self._forward(batch)
        except Exception as exc:  # noqa: BLE001 - any failure of the model is contained to this batch
            self._recover(batch, padded, exc)
            return
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

    def _recover(self, batch: list[_Item], padded: int, exc: Exception) -> None:
        if is_out_of_memory(exc):
            _free_device_memory()
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

    def _fail(self, request: _Request, error: ServiceError) -> None:
        if request.done:
            return
        request.done = True
        request.loop.call_soon_threadsafe(_settle, request.future, None, error)
