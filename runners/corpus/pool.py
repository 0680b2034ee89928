"""Every GPU of the machine for the corpus command: one worker process per GPU (as `WORKERS` shards a
server, runners.workers), each with its own LocalEmbedder, whole shards handed to the least busy one.

The same `submit(texts)` → future as LocalEmbedder; a worker that fails to load or dies ends the run
with its reason. Processes are spawned (not forked): CUDA and the engine's threads do not survive a fork.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
import os
import queue
import signal
import threading
from typing import Any

from runners.corpus.embedder import EmbedOptions
from runners.corpus.io import CorpusError


def _worker(index: int, count: int, options: EmbedOptions, env: dict[str, str], inbox: Any, outbox: Any) -> None:
    from runners.corpus.embedder import LocalEmbedder, prepare_environment
    from runners.workers import WORKERS_ENV, enter_worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops at a shard boundary
    os.environ.update(env)
    os.environ[WORKERS_ENV] = str(count)
    try:
        enter_worker(prepare_environment(options), os.environ, index)  # its GPU and its share of CPU threads
        embedder = LocalEmbedder(options)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which ends the run with it
        outbox.put(("failed", index, f"worker {index + 1}/{count}: {exc}"))
        return
    outbox.put(("ready", index, embedder.metadata()))
    try:
        while (job := inbox.get()) is not None:
            key, texts = job
            try:
                outbox.put(("done", key, embedder.embed(texts)))
            except Exception as exc:  # noqa: BLE001 - this shard fails, the run stops with its message
                outbox.put(("error", key, str(exc)))
    finally:
        embedder.close()


class WorkerPool:
    def __init__(self, options: EmbedOptions, count: int, env: dict[str, str] | None = None) -> None:
        context = multiprocessing.get_context("spawn")
        self.options = options
        self.workers = count
        self._outbox = context.Queue()
        self._inboxes = [context.Queue() for _ in range(count)]
        self._load = [0] * count
        self._futures: dict[int, tuple[int, concurrent.futures.Future]] = {}
        self._keys = itertools.count()
        self._lock = threading.Lock()
        self._processes = [context.Process(target=_worker, name=f"corpus-worker-{i}", daemon=True,
                                           args=(i, count, options, dict(env or os.environ), self._inboxes[i],
                                                 self._outbox)) for i in range(count)]
        for p in self._processes:
            p.start()
        self._metadata: dict[str, Any] = {}
        for _ in range(count):
            kind, index, value = self._next(timeout=None)
            if kind == "failed":
                self.close()
                raise CorpusError(f"the model did not load in {value}")
            self._metadata = self._metadata or value
        self._reader = threading.Thread(target=self._read, name="corpus-pool", daemon=True)
        self._reader.start()

    def _next(self, timeout: float | None) -> tuple[str, int, Any]:
        while True:
            try:
                return self._outbox.get(timeout=5 if timeout is None else timeout)
            except queue.Empty:
                dead = [p.name for p in self._processes if not p.is_alive()]
                if dead:
                    raise CorpusError(f"{', '.join(dead)} died (out of memory?): run again with --resume") from None

    def _read(self) -> None:
        while True:
            try:
                kind, key, value = self._next(timeout=None)
            except CorpusError as exc:
                with self._lock:
                    for _, future in self._futures.values():
                        if not future.done():
                            future.set_exception(exc)
                    self._futures.clear()
                return
            if kind == "stop":
                return
            with self._lock:
                worker, future = self._futures.pop(key, (None, None))
                if worker is not None:
                    self._load[worker] -= 1
            if future is None or future.done():
                continue
            if kind == "done":
                future.set_result(value)
            else:
                future.set_exception(CorpusError(value))

    def metadata(self) -> dict[str, Any]:
        return self._metadata

    def submit(self, texts: list[str]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            worker = min(range(len(self._load)), key=self._load.__getitem__)
            key = next(self._keys)
            self._load[worker] += 1
            self._futures[key] = (worker, future)
        self._inboxes[worker].put((key, texts))
        return future

    def close(self) -> None:
        for inbox in self._inboxes:
            inbox.put(None)
        for p in self._processes:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
        if getattr(self, "_reader", None) is not None:
            self._outbox.put(("stop", -1, None))
            self._reader.join(timeout=5)
