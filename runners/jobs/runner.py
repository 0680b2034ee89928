"""The batch runner: runs a batch's lines through the routes' own handlers, at the scheduler's lowest
priority, and commits them in chunks (runners.jobs.store says how a commit survives a crash).

One runner per DATA_DIR runs batches, one at a time, oldest first: the worker holding the store's
lease (`RunnerLease`); the others try to take it every POLL_S seconds, so when its holder dies (even
by SIGKILL) another worker, or the next server on the same volume, resumes the unfinished batches
from their last commit. Any worker answers a batch's status: it is in the store.

Statuses: validating (the input file is checked again: every line must name the batch's endpoint)
→ in_progress (chunks of lines, two in flight so the device never waits for a commit) → finalizing
(the output and error files are listed) → completed; or failed (the file did not pass, or DATA_DIR
filled up), expired (past the completion window), cancelling → cancelled. Cancelled and expired
batches keep the lines committed before, in their output and error files.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from runners import metrics
from runners.engine.batching import background_work
from runners.errors import ServiceError
from runners.jobs import wire
from runners.jobs.store import JobStore, Outputs, RunnerLease, storage_error

log = logging.getLogger("embed_rerank.batches")

# (route path, body) -> (HTTP status, the route's answer as JSON): what HTTP would have answered
LineCall = Callable[[str, dict[str, Any]], Awaitable[tuple[int, bytes]]]
Progress = Callable[[dict[str, Any]], Any]

CHUNK_LINES = 256  # lines per commit, at most
CHUNK_ITEMS = 512  # texts (or documents) per commit, about
IN_FLIGHT_CHUNKS = 2
POLL_S = 2.0
SWEEP_S = 3600.0  # expired files are removed this often (by the lease holder)
RETRY_STATUSES = (429, 503, 504)  # the server is busy or starting: a batch line waits and tries again
RETRY_DELAYS_S = (0.2, 0.5, 1, 2, 4, 8, 15, 30, 30, 30)


def _items(body: dict[str, Any]) -> int:
    for key in ("input", "texts", "documents", "docs", "inputs", "images"):
        value = body.get(key)
        if isinstance(value, list):
            return max(1, len(value))
    return 1


class BatchRunner:
    def __init__(self, store: JobStore, call_line: LineCall, poll_s: float = POLL_S) -> None:
        self.store = store
        self.call_line = call_line
        self.poll_s = poll_s
        self.lease = RunnerLease(store.root)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._swept = -SWEEP_S

    # ---- the loop of a serving worker ----

    def start(self) -> None:
        self._task = asyncio.create_task(self.serve_forever(), name="embed-rerank-batch-runner")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self.lease.release()

    def wake(self) -> None:
        """A batch was created here: look now, not at the next poll."""
        self._wake.set()

    async def serve_forever(self) -> None:
        while True:
            try:
                if await asyncio.to_thread(self.lease.try_acquire):
                    await self.run_pending()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the runner must outlive one bad batch
                log.exception("the batch runner failed; it tries again in %.0fs", self.poll_s)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)

    async def run_pending(self) -> None:
        if time.monotonic() - self._swept > SWEEP_S:
            self._swept = time.monotonic()
            await asyncio.to_thread(self.store.remove_expired)
        states = await asyncio.to_thread(self.store.batches)
        unfinished = [s["id"] for s in states if s["status"] not in wire.FINAL]
        for left, batch_id in enumerate(unfinished):
            metrics.BATCHES_UNFINISHED.set(len(unfinished) - left)
            self.lease.heartbeat(batch_id)
            try:
                await self.run_batch(batch_id)
            except (asyncio.CancelledError, OSError):
                raise  # shutting down, or DATA_DIR unwritable: the batch resumes later
            except Exception as exc:  # noqa: BLE001 - one broken batch must not hold up the others
                log.exception("batch %s failed", batch_id)
                self._give_up(batch_id, f"the server failed on this batch ({type(exc).__name__}); the log has the "
                                        "traceback: the lines committed before are in its output files")
        metrics.BATCHES_UNFINISHED.set(0)
        metrics.BATCH_LINES_LEFT.set(0)

    # ---- one batch ----

    async def run_batch(self, batch_id: str, progress: Progress | None = None) -> dict[str, Any]:
        """Run (or resume) one batch to a final status; its final state. Two processes never run the same
        batch: a flock on its folder (the second waits for the first to finish or die)."""
        folder = self.store.batch_dir(batch_id)
        fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            with background_work():  # every model request of the batch: the scheduler's lowest priority
                return await self._run(batch_id, progress)
        finally:
            os.close(fd)  # the flock goes with it

    async def _run(self, batch_id: str, progress: Progress | None) -> dict[str, Any]:
        state = self.store.batch(batch_id)
        if state["status"] in wire.FINAL:
            return state
        if self.store.cancel_requested(batch_id) is not None and state["status"] == wire.VALIDATING:
            return self._finish(state, wire.CANCELLED)
        if state["status"] == wire.VALIDATING:
            state = await asyncio.to_thread(self._validate, state)
            if state["status"] == wire.FAILED:
                return state
        if state["status"] in (wire.IN_PROGRESS, wire.CANCELLING):
            state = await self._lines(state, progress)
        if state["status"] == wire.FINALIZING:
            state = self._finish(state, wire.COMPLETED)
        return state

    def _validate(self, state: dict[str, Any]) -> dict[str, Any]:
        try:
            meta = self.store.file(state["input_file_id"])
            with open(self.store.file_path(meta), "rb") as f:
                found = wire.scan(f)
        except ServiceError as exc:
            found = wire.FileScan(errors=[wire.LineError(0, exc.code, exc.message)])
        except OSError as exc:
            found = wire.FileScan(errors=[wire.LineError(0, "file_unreadable", f"the input file cannot be read ({exc})")])
        errors = list(found.errors)
        if not errors and found.urls - {state["endpoint"]}:  # which lines: a second pass
            number = 0
            with open(self.store.file_path(meta), "rb") as f:
                for _, raw in wire.lines_of(f):
                    number += 1
                    if raw.strip() and orjson.loads(raw)["url"] != state["endpoint"]:
                        errors.append(wire.LineError(number, "mismatched_endpoint", (
                            f"line {number} is for {orjson.loads(raw)['url']}, not the batch's endpoint "
                            f"{state['endpoint']}: a batch runs one endpoint; split the file"), "url"))
                        if len(errors) >= wire.MAX_LINE_ERRORS:
                            break
        if errors:
            state["errors"] = {"object": "list", "data": [e.as_dict() for e in errors]}
            return self._finish(state, wire.FAILED)
        state.update(status=wire.IN_PROGRESS, in_progress_at=wire.now(),
                     request_counts={"total": found.lines, "completed": 0, "failed": 0})
        self.store.save_state(state)
        return state

    async def _lines(self, state: dict[str, Any], progress: Progress | None) -> dict[str, Any]:
        batch_id = state["id"]
        folder = self.store.batch_dir(batch_id)
        try:
            meta = self.store.file(state["input_file_id"])
        except ServiceError as exc:
            self._give_up(batch_id, f"its input file is gone: {exc.message}", "input_file_gone")
            return self.store.batch(batch_id)
        state.setdefault("runs", []).append({"at": wire.now(), "from_line": state["next_line"], "pid": os.getpid()})
        try:
            outputs = Outputs(folder, state)
            self.store.save_state(state)
        except OSError as exc:
            return self._fail_storage(state, exc)
        source = open(self.store.file_path(meta), "rb")
        reader = wire.lines_of(source, state["input_offset"])
        in_flight: list[tuple[asyncio.Task, int, int]] = []  # (task, lines, offset after them)
        ending: str | None = None
        try:
            while True:
                if ending is None:
                    ending = self._ending(state)
                while ending is None and len(in_flight) < IN_FLIGHT_CHUNKS:
                    chunk, offset = self._next_chunk(reader)
                    if not chunk:
                        break
                    in_flight.append((asyncio.create_task(self._chunk(chunk)), len(chunk), offset))
                if not in_flight:
                    break
                task, lines, offset = in_flight.pop(0)
                output, errors, done, failed = await task
                counts = state["request_counts"]
                counts["completed"] += done
                counts["failed"] += failed
                state["next_line"] += lines
                state["input_offset"] = offset
                try:
                    await asyncio.to_thread(outputs.commit, self.store, state, output, errors)
                except OSError as exc:
                    for other, _, _ in in_flight:
                        other.cancel()
                    return self._fail_storage(state, exc, outputs)
                metrics.BATCH_LINES.labels("completed").inc(done)
                metrics.BATCH_LINES.labels("failed").inc(failed)
                metrics.BATCH_LINES_LEFT.set(counts["total"] - state["next_line"])
                self.lease.heartbeat(batch_id)
                if progress is not None:
                    progress(wire.batch_object(state))
                if ending is None:
                    ending = self._ending(state)
                if ending is not None:
                    for other, _, _ in in_flight:  # their lines were not committed: they are not answered
                        other.cancel()
                    in_flight = []
        finally:
            for other, _, _ in in_flight:
                other.cancel()
            source.close()
        if ending == wire.EXPIRED:
            await asyncio.to_thread(self._expire_rest, state, outputs)
        outputs.close()
        if ending is not None:
            return self._finish(state, ending)
        state.update(status=wire.FINALIZING, finalizing_at=wire.now())
        self.store.save_state(state)
        return state

    def _give_up(self, batch_id: str, message: str, code: str = "internal_error") -> None:
        try:
            state = self.store.batch(batch_id)
            if state["status"] not in wire.FINAL:
                state["errors"] = {"object": "list", "data": [{"code": code, "line": None, "message": message,
                                                              "param": None}]}
                self._finish(state, wire.FAILED)
        except Exception:  # noqa: BLE001 - it stays unfinished, and is tried again at the next start
            log.exception("batch %s: its failure could not be recorded", batch_id)

    def _ending(self, state: dict[str, Any]) -> str | None:
        if self.store.cancel_requested(state["id"]) is not None:
            return wire.CANCELLED
        if state.get("expires_at") and wire.now() >= state["expires_at"]:
            return wire.EXPIRED
        return None

    def _next_chunk(self, reader: Any) -> tuple[list[tuple[str, str, Any]], int]:
        """The next lines (custom_id, url, body), and the input's byte offset after them."""
        chunk: list[tuple[str, str, Any]] = []
        items = 0
        offset = 0
        for after, raw in reader:
            offset = after
            if not raw.strip():
                continue
            line = orjson.loads(raw)
            body = line.get("body")
            chunk.append((line["custom_id"], line["url"], body))
            items += _items(body) if isinstance(body, dict) else 1
            if len(chunk) >= CHUNK_LINES or items >= CHUNK_ITEMS:
                break
        return chunk, offset

    async def _chunk(self, chunk: list[tuple[str, str, Any]]) -> tuple[bytes, bytes, int, int]:
        answers = await asyncio.gather(*(self._line(url, body) for _, url, body in chunk))
        output, errors = bytearray(), bytearray()
        done = failed = 0
        for (custom_id, _, _), (status, body, request_id) in zip(chunk, answers):
            line = wire.output_line(custom_id, status, body, request_id)
            if status < 400:
                output += line
                done += 1
            else:
                errors += line
                failed += 1
        return bytes(output), bytes(errors), done, failed

    async def _line(self, url: str, body: Any) -> tuple[int, bytes, str]:
        request_id = wire.new_id("req_")
        for delay in (*RETRY_DELAYS_S, None):
            status, answer = await self.call_line(url, body)
            if status not in RETRY_STATUSES or delay is None:
                return status, answer, request_id
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _expire_rest(self, state: dict[str, Any], outputs: Outputs) -> None:
        meta = self.store.file(state["input_file_id"])
        lines = bytearray()
        with open(self.store.file_path(meta), "rb") as f:
            for _, raw in wire.lines_of(f, state["input_offset"]):
                if raw.strip():
                    lines += wire.error_only_line(orjson.loads(raw)["custom_id"], "batch_expired",
                                                  "This request could not be executed before the completion window "
                                                  "expired.")
        outputs.commit(self.store, state, b"", bytes(lines))

    def _fail_storage(self, state: dict[str, Any], exc: OSError, outputs: Outputs | None = None) -> dict[str, Any]:
        err = storage_error(exc, f"committing batch {state['id']}")
        log.error("batch %s failed: %s", state["id"], err.message)
        if outputs is not None:
            outputs.close()
        # The state on disk is still the last commit; the answered lines since are not counted.
        state = self.store.batch(state["id"])
        state["errors"] = {"object": "list", "data": [{"code": err.code, "line": None, "message": err.message,
                                                      "param": None}]}
        try:
            return self._finish(state, wire.FAILED)
        except OSError:
            log.error("batch %s: its failure could not be recorded either; it resumes at the next start", state["id"])
            return state

    def _finish(self, state: dict[str, Any], status: str) -> dict[str, Any]:
        """A final status; the output and error files listed (what was committed, for every status)."""
        folder = self.store.batch_dir(state["id"])
        expires = wire.now() + wire.DEFAULT_FILE_EXPIRY_S
        for key, name, id_key in (("output_bytes", "output.jsonl", "output_file_id"),
                                  ("error_bytes", "errors.jsonl", "error_file_id")):
            if state.get(key) and state.get(f"{id_key}_reserved"):
                self.store.add_file(state[f"{id_key}_reserved"], folder / name, f"{state['id']}_{name}",
                                    wire.OUTPUT_PURPOSE, expires)
                state[id_key] = state[f"{id_key}_reserved"]
        stamp = wire.now()
        if status == wire.CANCELLED:
            state["cancelling_at"] = state.get("cancelling_at") or self.store.cancel_requested(state["id"]) or stamp
        state.update(status=status, **{f"{status}_at": stamp})
        self.store.save_state(state)
        log.info("batch %s %s: %s", state["id"], status, state.get("request_counts"))
        return state


def new_batch_state(input_file_id: str, endpoint: str, completion_window: str,
                    metadata: dict[str, Any] | None) -> dict[str, Any]:
    created = wire.now()
    state: dict[str, Any] = {name: None for name in wire.BATCH_FIELDS}
    state.update(
        id=wire.new_id("batch_"), object="batch", endpoint=endpoint, input_file_id=input_file_id,
        completion_window=completion_window, status=wire.VALIDATING, created_at=created,
        expires_at=created + wire.COMPLETION_WINDOWS[completion_window], metadata=metadata,
        request_counts={"total": 0, "completed": 0, "failed": 0},
        # the runner's own: how far it has committed, and the ids the output files will have
        next_line=0, input_offset=0, output_bytes=0, error_bytes=0,
        output_file_id_reserved=wire.new_id("file-"), error_file_id_reserved=wire.new_id("file-"),
    )
    return state
