"""The scheduler's tokenizer side: each request is tokenized once, by the replica's own `encode_pre`,
in the tokenizer thread (many small requests per call, bulk requests in chunks), or on the
caller's thread when a small request finds the model idle. Tokenized items wait unpadded, with
their lengths, in their request's `ready` queue for the forward thread (runners.engine.scheduler)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from runners.engine.batching import SMALL_REQUEST_ITEMS, QueuedRequest, chars
from runners.engine.codec import FeatureCodec
from runners.errors import ModelError, ServiceError

log = logging.getLogger("embed_rerank.scheduler")

TOKENIZE_CHUNK = 64  # texts per encode_pre call: a bulk request does not hold the tokenizer for long
INLINE_TOKENIZE_CHARS = 2048  # an idle scheduler tokenizes a small request this long on the caller's thread


class TokenizerStage:
    """Mixed into ModelScheduler, whose __init__ sets these."""

    name: str
    replica: Any
    codec: FeatureCodec
    _inbox: queue.SimpleQueue
    _backlog: list[QueuedRequest]
    _cond: threading.Condition
    _active: list[QueuedRequest]
    _pending: int
    _pending_tokens: int
    _tokenizer_busy: bool
    _tokenizer_lock: threading.Lock
    _stopping: bool
    _busy_since: float | None
    _fail: Callable[[QueuedRequest, ServiceError], None]  # answer a request with an error, once

    def _tokenize_here(self, request: QueuedRequest) -> bool:
        """A small request that finds the scheduler idle is tokenized right here (a fraction of a
        millisecond) and goes straight to the forward thread: one thread hand-off less for a lone
        query. Under load the tokenizer thread does it, many requests per call, off the event loop."""
        if (self._pending or self._busy_since is not None or self._tokenizer_busy or not self._inbox.empty()
                or self._stopping or len(request.inputs) > SMALL_REQUEST_ITEMS):
            return False
        size = chars(request.inputs)
        if size is None or size > INLINE_TOKENIZE_CHARS:
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
        parts: list[tuple[QueuedRequest, int, int]] = []
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

    def _next_chunk(self) -> list[tuple[QueuedRequest, int, int]]:
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

    def _tokenize(self, parts: list[tuple[QueuedRequest, int, int]]) -> None:
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
                if request.lengths is not None:
                    request.lengths[start:start + count] = [n for _, n in mine]
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
