"""The job store: files and batches as plain files in DATA_DIR (a volume in production).

    files/<id>.json            a file's metadata; its bytes in files/<id>.jsonl (an output file's
                               metadata names its batch's output.jsonl instead)
    batches/<id>/state.json    a batch: its status, timestamps, counts, and how far it has committed
    batches/<id>/output.jsonl  answered lines; errors.jsonl: failed lines
    batches/<id>/cancel        a cancel asked for (any worker writes it; the runner acts on it)
    runner.lock                the runner's lease: an exclusive flock, and who holds it
    uploads/                   uploads being written

Every JSON file is written whole to a temporary name, fsynced, renamed over the old one, and the folder
fsynced: a reader sees the old state or the new, never half of one. Only the runner writes a running
batch's state.json. A chunk is committed by appending its lines to the output files, fsyncing them,
then writing the state with the new line count and file sizes; on resume the output files are cut back
to the sizes the state names, so a crash anywhere loses no committed line and repeats none.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from runners.errors import BadRequest, ModelNotFound, PayloadTooLarge, ServiceError, StorageFull
from runners.jobs import wire

COPY_CHUNK = 1024 * 1024


def storage_error(exc: OSError, doing: str) -> ServiceError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"DATA_DIR is full while {doing}: free space on the data volume (or give it a larger "
                           "one), then retry; committed work is kept")
    return StorageFull(f"DATA_DIR could not be written while {doing} ({exc.strerror or exc}): check that the data "
                       "volume is mounted and writable, then retry", code="data_dir_unwritable")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, content: dict[str, Any]) -> None:
    """Atomically: the old content or the new, also across a crash."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(content))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def _checked_id(value: str, prefix: str, what: str) -> str:
    if not value.startswith(prefix) or not value[len(prefix):].isalnum():
        raise ModelNotFound(f"no {what} with id {value[:80]!r}: use an id that POST /v1/{what}s answered",
                            code="not_found", param=f"{what}_id")
    return value


class JobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.files_dir = root / "files"
        self.batches_dir = root / "batches"
        self.uploads_dir = root / "uploads"

    def prepare(self) -> None:
        """Create the folders (a clear error when DATA_DIR cannot be written)."""
        try:
            for path in (self.files_dir, self.batches_dir, self.uploads_dir):
                path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, f"creating {self.root}") from None

    # ---- files ----

    def save_upload(self, source: BinaryIO, filename: str, purpose: str, expires_after_s: int) -> dict[str, Any]:
        """Copy an uploaded file in, check it as a batch input file, and list it; a 400 naming the first
        problem otherwise (nothing is kept)."""
        self.prepare()
        file_id = wire.new_id("file-")
        tmp = self.uploads_dir / f"{file_id}.jsonl"
        try:
            size = 0
            with open(tmp, "wb") as out:
                while chunk := source.read(COPY_CHUNK):
                    size += len(chunk)
                    if size > wire.MAX_FILE_BYTES:
                        raise PayloadTooLarge(f"the file is over {wire.MAX_FILE_BYTES // (1024 * 1024)} MB, the limit "
                                              "of a batch input file: split it into several batches",
                                              code="file_too_large", param="file")
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            with open(tmp, "rb") as f:
                found = wire.scan(f)
            if found.lines == 0:
                raise BadRequest("the file has no requests: send JSONL, one {custom_id, method, url, body} per line",
                                 code="empty_file", param="file")
            if found.errors:
                first = found.errors[0]
                more = f" ({len(found.errors) - 1} more problem(s) after it)" if len(found.errors) > 1 else ""
                raise BadRequest(first.message + more, code=first.code, param=f"file line {first.line}")
            created = wire.now()
            meta = {"id": file_id, "bytes": size, "created_at": created, "expires_at": created + expires_after_s,
                    "filename": filename, "purpose": purpose, "requests": found.lines, "urls": sorted(found.urls)}
            os.replace(tmp, self.files_dir / f"{file_id}.jsonl")
            write_json(self.files_dir / f"{file_id}.json", meta)
            return meta
        except OSError as exc:
            raise storage_error(exc, "storing the upload") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def add_file(self, file_id: str, source: Path, filename: str, purpose: str, expires_at: int | None,
                 requests: int | None = None) -> dict[str, Any]:
        """List a file already in DATA_DIR (a batch's output) under `file_id`."""
        meta = {"id": file_id, "bytes": source.stat().st_size, "created_at": wire.now(), "expires_at": expires_at,
                "filename": filename, "purpose": purpose, "path": str(source.relative_to(self.root))}
        if requests is not None:
            meta["requests"] = requests
        write_json(self.files_dir / f"{file_id}.json", meta)
        return meta

    def file(self, file_id: str) -> dict[str, Any]:
        _checked_id(file_id, "file-", "file")
        meta = read_json(self.files_dir / f"{file_id}.json")
        if meta is None or (meta.get("expires_at") and meta["expires_at"] <= wire.now()):
            raise ModelNotFound(f"no file with id {file_id!r} (it may have expired or been deleted): upload it again "
                                "with POST /v1/files", code="not_found", param="file_id")
        return meta

    def file_path(self, meta: dict[str, Any]) -> Path:
        return self.root / meta["path"] if meta.get("path") else self.files_dir / f"{meta['id']}.jsonl"

    def files(self) -> list[dict[str, Any]]:
        found = []
        now = wire.now()
        with contextlib.suppress(OSError):
            for path in self.files_dir.glob("file-*.json"):
                meta = read_json(path)
                if meta is not None and not (meta.get("expires_at") and meta["expires_at"] <= now):
                    found.append(meta)
        return found

    def remove_expired(self) -> int:
        """Files past their `expires_at`, gone for good (they answer 404 from the moment they expire)."""
        removed = 0
        now = wire.now()
        with contextlib.suppress(OSError):
            for path in self.files_dir.glob("file-*.json"):
                meta = read_json(path)
                if meta is not None and meta.get("expires_at") and meta["expires_at"] <= now:
                    with contextlib.suppress(OSError):
                        path.unlink()
                        self.file_path(meta).unlink(missing_ok=True)
                        removed += 1
        return removed

    def delete_file(self, file_id: str) -> None:
        meta = self.file(file_id)
        with contextlib.suppress(FileNotFoundError):
            (self.files_dir / f"{file_id}.json").unlink()
        with contextlib.suppress(FileNotFoundError):
            self.file_path(meta).unlink()

    # ---- batches ----

    def batch_dir(self, batch_id: str) -> Path:
        return self.batches_dir / _checked_id(batch_id, "batch_", "batch")

    def create_batch(self, state: dict[str, Any]) -> None:
        self.prepare()
        folder = self.batch_dir(state["id"])
        try:
            folder.mkdir()
            write_json(folder / "state.json", state)
        except OSError as exc:
            raise storage_error(exc, "creating the batch") from None

    def batch(self, batch_id: str) -> dict[str, Any]:
        state = read_json(self.batch_dir(batch_id) / "state.json")
        if state is None:
            raise ModelNotFound(f"no batch with id {batch_id!r}: use an id that POST /v1/batches answered",
                                code="not_found", param="batch_id")
        return state

    def batch_ids(self) -> list[str]:
        with contextlib.suppress(OSError):
            return sorted(p.name for p in self.batches_dir.iterdir() if p.name.startswith("batch_"))
        return []

    def batches(self) -> list[dict[str, Any]]:
        found = []
        for batch_id in self.batch_ids():
            state = read_json(self.batches_dir / batch_id / "state.json")
            if state is not None:
                found.append(state)
        return found

    def save_state(self, state: dict[str, Any]) -> None:
        write_json(self.batch_dir(state["id"]) / "state.json", state)

    def request_cancel(self, batch_id: str) -> int:
        """Ask the runner to cancel; the time it was asked (the first time, when asked again)."""
        marker = self.batch_dir(batch_id) / "cancel"
        asked = self.cancel_requested(batch_id)
        if asked is not None:
            return asked
        asked = wire.now()
        try:
            write_json(marker, {"at": asked})
        except OSError as exc:
            raise storage_error(exc, "recording the cancel") from None
        return asked

    def cancel_requested(self, batch_id: str) -> int | None:
        marker = read_json(self.batch_dir(batch_id) / "cancel")
        return None if marker is None else int(marker["at"])

    def public_batch(self, batch_id: str) -> dict[str, Any]:
        return wire.batch_object(self.batch(batch_id), self.cancel_requested(batch_id))


class Outputs:
    """A running batch's output and error files, cut back to what its state committed."""

    def __init__(self, folder: Path, state: dict[str, Any]) -> None:
        self.files = {}
        for key, name in (("output_bytes", "output.jsonl"), ("error_bytes", "errors.jsonl")):
            f = open(folder / name, "ab+")
            f.truncate(state[key])  # lines written after the last commit (a crash) are dropped
            f.seek(0, os.SEEK_END)
            self.files[key] = f

    def commit(self, store: JobStore, state: dict[str, Any], output: bytes, errors: bytes) -> None:
        """Append a chunk's lines, make them durable, then record them in the state (the commit)."""
        for key, data in (("output_bytes", output), ("error_bytes", errors)):
            f = self.files[key]
            if data:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
            state[key] = f.tell()
        store.save_state(state)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


class RunnerLease:
    """One runner per DATA_DIR: an exclusive flock on runner.lock (the kernel lets it go when the holder
    dies, SIGKILL included), and in the file who holds it and its last heartbeat, for people."""

    def __init__(self, root: Path) -> None:
        self.path = root / "runner.lock"
        self._fd: int | None = None
        self.since = 0

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        self.since = wire.now()
        self.heartbeat()
        return True

    def heartbeat(self, batch_id: str | None = None) -> None:
        if self._fd is None:
            return
        info = orjson.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": self.since,
                             "heartbeat": wire.now(), "batch": batch_id})
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, info, 0)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder(self) -> dict[str, Any] | None:
        return read_json(self.path)


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                yield orjson.loads(raw)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
