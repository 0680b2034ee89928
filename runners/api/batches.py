"""The OpenAI Batch API's routes (`/v1/files`, `/v1/batches`) and what a batch line calls.

A batch line is answered by its route's own row of the route table (runners.api.routes): the body is
validated by the route's schema and handed to the route's handler, so a line's body and answer are
exactly the route's, errors included (`call_line`). The files and batches live in the job store
(runners.jobs.store, DATA_DIR), so every worker answers about every batch; the worker holding the
store's lease runs them (runners.jobs.runner).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response

from runners.errors import BadRequest, InternalError, ModelNotFound, ServiceError, Unavailable, from_validation_errors
from runners.jobs import wire
from runners.jobs.runner import BatchRunner, new_batch_state
from runners.jobs.store import JobStore

log = logging.getLogger("embed_rerank.batches")

_store: JobStore | None = None
_runner: BatchRunner | None = None
LineRoutes = Mapping[str, tuple[Callable[[Any], Any], Callable[[Any], Awaitable[Any]]]]
_line_routes: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Awaitable[Any]]]] = {}


def bind(store: JobStore, runner: BatchRunner | None, line_routes: LineRoutes) -> None:
    """This worker's store and runner, and how each route a line may name validates a body, and its handler."""
    global _store, _runner
    _store, _runner = store, runner
    _line_routes.clear()
    _line_routes.update(line_routes)


def open_store(settings: Any, line_routes: LineRoutes) -> BatchRunner:
    """This worker's store in DATA_DIR and its runner (not started: `runner.start()` once the models serve)."""
    job_store = JobStore(settings.data_dir)
    try:
        job_store.prepare()
    except ServiceError as exc:  # the other routes still serve; the batch routes answer this
        log.warning("batches: %s", exc.message)
    runner = BatchRunner(job_store, call_line)
    bind(job_store, runner, line_routes)
    return runner


def store() -> JobStore:
    if _store is None:
        raise Unavailable("the service is still starting: retry when GET /readyz answers 200")
    return _store


async def call_line(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    """What `POST url` with this JSON body would answer: (status, JSON body)."""
    validate, handle = _line_routes[url]
    try:
        request = validate(body)
        result = await handle(request)
    except ValidationError as exc:
        err: ServiceError = from_validation_errors(list(exc.errors(include_url=False)))
        return err.status, orjson.dumps(err.envelope())
    except ServiceError as exc:
        return exc.status, orjson.dumps(exc.envelope())
    except Exception:
        log.exception("a batch line failed")
        err = InternalError("the server failed on this line; the log has the traceback")
        return err.status, orjson.dumps(err.envelope())
    if isinstance(result, Response):
        return result.status_code, bytes(result.body)
    return 200, orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY)


# ---- /v1/files ----


def _int_field(form: Any, name: str) -> int | None:
    value = form.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be a whole number of seconds, not {str(value)[:40]!r}", param=name) from None


async def upload_file(request: Request) -> dict[str, Any]:
    """`POST /v1/files` (multipart: file, purpose, expires_after[anchor], expires_after[seconds])."""
    if request.headers.get("content-type", "").partition(";")[0].strip().lower() != "multipart/form-data":
        raise BadRequest("send the file as multipart/form-data with the fields file and purpose=batch "
                         "(openai: client.files.create(file=..., purpose='batch'))", code="invalid_multipart")
    try:
        form = await request.form(max_files=1, max_fields=8)
    except ClientDisconnect:
        raise BadRequest("the upload ended before its end: send the whole file again", code="incomplete_upload") from None
    except Exception as exc:  # noqa: BLE001 - a form the parser cannot read (no boundary, a malformed part)
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        raise BadRequest(f"the multipart/form-data body cannot be read ({detail}): send the file as a form with a "
                         "boundary, fields file and purpose=batch", code="invalid_multipart") from None
    try:
        purpose = form.get("purpose")
        if purpose != wire.PURPOSE:
            raise BadRequest(f"purpose {str(purpose)[:40]!r} is not served here: upload batch input files with "
                             "purpose=batch", param="purpose", code="invalid_purpose")
        anchor = form.get("expires_after[anchor]")
        seconds = _int_field(form, "expires_after[seconds]")
        if anchor not in (None, "created_at"):
            raise BadRequest("expires_after[anchor] must be created_at", param="expires_after[anchor]")
        low, high = wire.FILE_EXPIRY_RANGE_S
        if seconds is not None and not low <= seconds <= high:
            raise BadRequest(f"expires_after[seconds] must be between {low} (1 hour) and {high} (30 days)",
                             param="expires_after[seconds]")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise BadRequest("the form has no file field: send the JSONL file as the part named file", param="file")
        filename = (upload.filename or "upload.jsonl")[:256]
        meta = await asyncio.to_thread(store().save_upload, upload.file, filename, wire.PURPOSE,
                                       seconds or wire.DEFAULT_FILE_EXPIRY_S)
    finally:
        await form.close()
    return wire.file_object(meta)


def _limit(query: Mapping[str, str], default: int, most: int) -> int:
    raw = query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise BadRequest(f"limit must be a whole number from 1 to {most}", param="limit")
    return int(raw)


async def list_files(request: Request) -> dict[str, Any]:
    query = request.query_params
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("order must be asc or desc", param="order")
    files = await asyncio.to_thread(store().files)
    purpose = query.get("purpose")
    items = [wire.file_object(m) for m in files if purpose is None or m["purpose"] == purpose]
    return wire.page(wire.sorted_by_id(items, order == "desc"), query.get("after"), _limit(query, 10_000, 10_000))


async def get_file(request: Request) -> dict[str, Any]:
    return wire.file_object(store().file(request.path_params["file_id"]))


async def delete_file(request: Request) -> dict[str, Any]:
    file_id = request.path_params["file_id"]
    await asyncio.to_thread(store().delete_file, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


async def file_content(request: Request) -> Response:
    meta = store().file(request.path_params["file_id"])
    if not store().file_path(meta).is_file():
        raise ModelNotFound(f"the content of file {meta['id']} is gone from DATA_DIR: run the batch again",
                            code="not_found", param="file_id")
    return FileResponse(store().file_path(meta), media_type="application/octet-stream",
                        filename=meta["filename"], content_disposition_type="attachment")


# ---- /v1/batches ----


async def create_batch(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("send a JSON object {input_file_id, endpoint, completion_window, metadata?}")
    input_file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
    window, metadata = body.get("completion_window"), body.get("metadata")
    if not isinstance(input_file_id, str):
        raise BadRequest("input_file_id is missing: upload the JSONL with POST /v1/files (purpose=batch) and give "
                         "its id", param="input_file_id", code="missing_required_parameter")
    if endpoint not in wire.ENDPOINTS:
        raise BadRequest(f"endpoint {str(endpoint)[:80]!r} cannot run as a batch here: use one of "
                         f"{', '.join(wire.ENDPOINTS)}", param="endpoint", code="invalid_endpoint")
    if window not in wire.COMPLETION_WINDOWS:
        raise BadRequest(f"completion_window {str(window)[:20]!r} is not supported: use "
                         f"{', '.join(wire.COMPLETION_WINDOWS)}", param="completion_window")
    problem = wire.metadata_problem(metadata)
    if problem:
        raise BadRequest(problem, param="metadata")
    meta = store().file(input_file_id)
    if meta["purpose"] != wire.PURPOSE:
        raise BadRequest(f"file {input_file_id!r} has purpose {meta['purpose']!r}: a batch's input file is one "
                         "uploaded with purpose=batch", param="input_file_id")
    others = [u for u in meta.get("urls", []) if u != endpoint]
    if others:
        raise BadRequest(f"file {input_file_id!r} has requests for {', '.join(others)}, not only for the batch's "
                         f"endpoint {endpoint}: a batch runs one endpoint; split the file", param="endpoint",
                         code="mismatched_endpoint")
    state = new_batch_state(input_file_id, endpoint, window, metadata)
    await asyncio.to_thread(store().create_batch, state)
    if _runner is not None:
        _runner.wake()
    return wire.batch_object(state)


async def list_batches(request: Request) -> dict[str, Any]:
    query = request.query_params
    states = await asyncio.to_thread(store().batches)
    items = [wire.batch_object(s) for s in states]
    return wire.page(wire.sorted_by_id(items, newest_first=True), query.get("after"), _limit(query, 20, 100))


async def get_batch(request: Request) -> dict[str, Any]:
    return await asyncio.to_thread(store().public_batch, request.path_params["batch_id"])


async def cancel_batch(request: Request) -> dict[str, Any]:
    batch_id = request.path_params["batch_id"]
    state = store().batch(batch_id)
    if state["status"] in wire.FINAL:
        raise BadRequest(f"batch {batch_id} is {state['status']}: only a batch that has not finished can be "
                         "cancelled", param="batch_id", code="batch_not_cancellable")
    await asyncio.to_thread(store().request_cancel, batch_id)
    if _runner is not None:
        _runner.wake()
    return await asyncio.to_thread(store().public_batch, batch_id)
