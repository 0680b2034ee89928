"""The OpenAI Batch API's wire format: limits, input line checks, and the objects clients read.

Input lines are `{custom_id, method, url, body}`; output lines `{id, custom_id, response:
{status_code, request_id, body}, error}` (openai-python `types/batch.py`, `file_object.py`). Limits
are OpenAI's: 50,000 requests and 200 MB per file, `custom_id` unique within the file.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import orjson

MAX_FILE_BYTES = 200 * 1024 * 1024
UPLOAD_PATH = "/v1/files"  # its multipart body streams to disk (FrontDoor), up to the file limit and the form
UPLOAD_BODY_BYTES = MAX_FILE_BYTES + 1024 * 1024
MAX_REQUESTS = 50_000
MAX_LINE_ERRORS = 100  # errors.data keeps the first ones
MAX_METADATA_KEYS = 16
COMPLETION_WINDOWS = {"24h": 24 * 3600}
DEFAULT_FILE_EXPIRY_S = 30 * 24 * 3600  # OpenAI's default for purpose=batch
FILE_EXPIRY_RANGE_S = (3600, 30 * 24 * 3600)
# The routes a batch line may name: a line's body and its output body are exactly that route's.
ENDPOINTS = ("/v1/embeddings", "/embed", "/v2/embed", "/rerank", "/v1/rerank", "/v2/rerank", "/classify")
PURPOSE = "batch"
OUTPUT_PURPOSE = "batch_output"

# Batch statuses, in OpenAI's words; each has its `<status>_at` timestamp except `validating`.
VALIDATING, IN_PROGRESS, FINALIZING, COMPLETED = "validating", "in_progress", "finalizing", "completed"
FAILED, EXPIRED, CANCELLING, CANCELLED = "failed", "expired", "cancelling", "cancelled"
FINAL = (COMPLETED, FAILED, EXPIRED, CANCELLED)
STAMPED = (IN_PROGRESS, FINALIZING, COMPLETED, FAILED, EXPIRED, CANCELLING, CANCELLED)


def now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    """Ids that sort by creation time (milliseconds, then random): lists page in creation order."""
    return f"{prefix}{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


@dataclass(frozen=True)
class LineError:
    line: int  # 1-based, as OpenAI counts
    code: str
    message: str
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "line": self.line, "message": self.message, "param": self.param}


@dataclass
class FileScan:
    """What a pass over an input file found: its requests, the routes they name, the first errors."""

    lines: int = 0
    urls: set[str] = field(default_factory=set)
    errors: list[LineError] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)

    def add(self, number: int, raw: bytes) -> None:
        error = check_line(number, raw, self.ids)
        if isinstance(error, LineError):
            if len(self.errors) < MAX_LINE_ERRORS:
                self.errors.append(error)
            return
        self.urls.add(error)


def check_line(number: int, raw: bytes, seen: set[str]) -> LineError | str:
    """The line's url when it is a well-formed request with a new custom_id (added to `seen`), else
    what is wrong with it. The body is the route's to judge, when the line runs."""
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return LineError(number, "invalid_json_line", f"line {number} is not valid JSON ({exc}): each line of a "
                                                      "batch file is one JSON object {custom_id, method, url, body}")
    if not isinstance(line, dict):
        return LineError(number, "invalid_request", f"line {number} is a JSON {type(line).__name__}, not an object "
                                                    "{custom_id, method, url, body}")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(number, "missing_required_parameter",
                         f"line {number} has no custom_id: give each request a unique string custom_id", "custom_id")
    if custom_id in seen:
        return LineError(number, "duplicate_custom_id",
                         f"line {number} repeats custom_id {custom_id[:100]!r}: each custom_id must be unique "
                         "within the file", "custom_id")
    seen.add(custom_id)
    if line.get("method") != "POST":
        return LineError(number, "invalid_request", f"line {number} has method {line.get('method')!r}: batch "
                                                    "requests are POST", "method")
    url = line.get("url")
    if url not in ENDPOINTS:
        return LineError(number, "invalid_url", f"line {number} has url {str(url)[:100]!r}, which a batch cannot "
                                                f"run: use one of {', '.join(ENDPOINTS)}", "url")
    if not isinstance(line.get("body"), dict):
        return LineError(number, "invalid_request", f"line {number} has no JSON object body: give the body of "
                                                    f"the {url} request", "body")
    return url


def lines_of(stream: BinaryIO, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """(byte offset after the line, line without its newline) from `start`; blank lines are skipped
    by the callers, as they count toward no request."""
    stream.seek(start)
    offset = start
    for raw in stream:
        offset += len(raw)
        yield offset, raw.rstrip(b"\r\n")


def scan(stream: BinaryIO) -> FileScan:
    found = FileScan()
    number = 0
    for _, raw in lines_of(stream):
        number += 1
        if not raw.strip():
            continue
        found.lines += 1
        if found.lines > MAX_REQUESTS:
            found.errors.insert(0, LineError(number, "too_many_requests", f"the file has more than {MAX_REQUESTS} "
                                                                          "requests: split it into several batches"))
            break
        found.add(number, raw)
    found.ids.clear()
    return found


# ---- the objects clients read ----


def file_object(meta: dict[str, Any]) -> dict[str, Any]:
    return {"id": meta["id"], "object": "file", "bytes": meta["bytes"], "created_at": meta["created_at"],
            "expires_at": meta.get("expires_at"), "filename": meta["filename"], "purpose": meta["purpose"],
            "status": "processed", "status_details": None}


BATCH_FIELDS = ("id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status",
                "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at",
                "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at", "request_counts",
                "metadata", "model")


def batch_object(state: dict[str, Any], cancel_requested_at: int | None = None) -> dict[str, Any]:
    """The batch as OpenAI answers it. A cancel asked for but not yet seen by the runner reads as
    `cancelling` (the runner alone writes the state)."""
    body = {name: state.get(name) for name in BATCH_FIELDS}
    body["object"] = "batch"
    if cancel_requested_at is not None and state["status"] not in FINAL and state["status"] != CANCELLING:
        body["status"], body["cancelling_at"] = CANCELLING, cancel_requested_at
    return body


def page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """A list page in OpenAI's shape: `after` is the last id of the previous page."""
    if after:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    data = items[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(items) > limit}


def output_line(custom_id: str, status: int, body: bytes, request_id: str) -> bytes:
    """One output (or error) line; `body` is the route's answer, already JSON."""
    head = orjson.dumps({"id": new_id("batch_req_"), "custom_id": custom_id})[:-1]
    return (head + b',"response":{"status_code":' + str(status).encode() + b',"request_id":'
            + orjson.dumps(request_id) + b',"body":' + body + b'},"error":null}\n')


def error_only_line(custom_id: str, code: str, message: str) -> bytes:
    """A line that never reached its route (the batch expired or was cancelled before it ran)."""
    return orjson.dumps({"id": new_id("batch_req_"), "custom_id": custom_id, "response": None,
                         "error": {"code": code, "message": message}}) + b"\n"


def metadata_problem(metadata: Any) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return "metadata must be an object of string keys and values"
    if len(metadata) > MAX_METADATA_KEYS:
        return f"metadata has {len(metadata)} keys; at most {MAX_METADATA_KEYS} are allowed"
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
            return (f"metadata[{key[:64]!r}] is not allowed: keys are strings of at most 64 characters and values "
                    "strings of at most 512")
    return None


def sorted_by_id(items: Iterable[dict[str, Any]], newest_first: bool) -> list[dict[str, Any]]:
    return sorted(items, key=lambda item: (item["created_at"], item["id"]), reverse=newest_first)
