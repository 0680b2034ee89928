"""Answers and errors: a service method's result as a JSON response, and every failure as its status
with the OpenAI envelope, or TEI's `{"error", "error_type"}` under /tei. Framework error bodies
(BentoML's, Starlette's) are translated here too, so every error a client sees says what to do."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pydantic_core
from starlette.responses import JSONResponse, Response
from starlette.types import Send

from runners import metrics
from runners.errors import (
    BadRequest,
    InternalError,
    ModelNotFound,
    OutOfMemory,
    Overloaded,
    PayloadTooLarge,
    SchemaError,
    ServiceError,
    Timeout,
    Unauthorized,
    Unavailable,
    from_validation_errors,
)
from runners.vocabulary import TEI_PREFIX

log = logging.getLogger("embed_rerank.service")
HEALTH_PATHS = ("/livez", "/readyz", "/healthz")
METRICS_PATHS = ("/metrics", TEI_PREFIX + "/metrics")  # Prometheus: public unless METRICS_PUBLIC=false
TEI_OPENAI_EMBEDDINGS = TEI_PREFIX + "/v1/embeddings"  # TEI's OpenAI route: errors in its own body (FrontDoor)


class JSONBody(JSONResponse):
    """Responses encoded by orjson: vectors are most of every response, and the standard
    library's encoder took 5-12 % of the request thread at 32 clients."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


TRUNCATED_HEADER = "X-Truncated-Inputs"  # how many inputs the model read only the first tokens of


def with_truncation(content: Any, truncated: int) -> Any:
    """An embedding answer; when truncation cut some inputs, a response that says how many in its header."""
    return JSONBody(content, headers={TRUNCATED_HEADER: str(truncated)}) if truncated else content


def envelope_for(status: int, body: bytes) -> ServiceError:
    """BentoML's own error body → our error type with a message that says what to do."""
    try:
        data = json.loads(body or b"null")
    except ValueError:
        data = None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    detail = data.get("error") if isinstance(data, dict) else None
    if isinstance(data, dict) and isinstance(data.get("detail"), list):
        return from_validation_errors(data["detail"])
    text = detail if isinstance(detail, str) else (body.decode("utf-8", "replace")[:300] if body else "")
    if status == 400:
        if "validation error" in text.lower() or "json" in text.lower():
            return SchemaError(f"the request body is not valid: {text}")
        return BadRequest(text or "bad request")
    if status == 404:
        return ModelNotFound(f"no such route: {text or 'not found'}", code="not_found")
    if status == 413:
        return PayloadTooLarge(text or "request body too large")
    if status == 429:
        return Overloaded("the server is at its concurrency limit: retry after a short wait", headers={"Retry-After": "1"})
    if status == 503:
        return Unavailable(text or "the service is not ready: retry when GET /readyz answers 200")
    if status == 504:
        return Timeout(text or "the request timed out")
    if status == 507:
        return OutOfMemory(text or "the model ran out of memory on this request")
    if status in (401, 403):
        return Unauthorized(text or "unauthorized")
    if status < 500:
        return client_status_error(status, text)
    err = InternalError(text or "the server failed on this request; the log has the traceback")
    err.status = status
    return err


def client_status_error(status: int, text: str) -> ServiceError:
    """Framework statuses (405, 415, 411, ...) are the client's doing: invalid_request_error, with a
    code that names the status and a message that says what to send instead."""
    code, hint = _CLIENT_STATUS_HINTS.get(status, (f"http_{status}", "check the method, path and headers"))
    err = BadRequest(f"{text or 'the request was refused'}: {hint}", code=code)
    err.status = status
    return err


_CLIENT_STATUS_HINTS = {
    405: ("method_not_allowed", "this route takes another HTTP method (POST for the model routes, GET for "
                                "/v1/models, /livez, /readyz, /metrics)"),
    415: ("unsupported_media_type", "send the body as JSON with 'Content-Type: application/json'"),
    406: ("not_acceptable", "accept application/json"),
    411: ("length_required", "send a Content-Length header"),
}


def error_response(exc: ServiceError, tei: bool = False) -> JSONResponse:
    """The error's status and body: the OpenAI envelope, or TEI's body (`tei`, routes under /tei)."""
    metrics.record_error(exc.type, exc.status)
    status, body = exc.tei() if tei else (exc.status, exc.envelope())
    return JSONResponse(body, status_code=status, headers=exc.headers)


async def answer(call: Callable[[], Awaitable[Any]], tei: bool = False) -> Response:
    """Run a service method; its result becomes a JSON response (a Response passes as it is), any
    failure its status and error body."""
    try:
        result = await call()
        return result if isinstance(result, Response) else JSONBody(result)
    except ServiceError as exc:
        return error_response(exc, tei)
    except Exception:
        log.exception("request failed")
        return error_response(InternalError("the server failed on this request; the log has the traceback"), tei)


def is_tei(path: str) -> bool:
    return path == TEI_PREFIX or path.startswith(TEI_PREFIX + "/")


async def send_error(send: Send, err: ServiceError, extra_headers: list[tuple[bytes, bytes]] | None = None,
                      tei: bool = False) -> None:
    """The error in the OpenAI envelope, or in TEI's body under `/tei`."""
    metrics.record_error(err.type, err.status)
    status, content = err.tei() if tei else (err.status, err.envelope())
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    headers += extra_headers or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def unauthorized() -> Unauthorized:
    return Unauthorized("missing or wrong API key: send the header 'Authorization: Bearer <key>' with a key from API_KEY")


# Where FrontDoor leaves a body it parsed for the route below (scope["state"]), so that route need not
# parse it again.
PARSED_JSON = "embed_rerank.parsed_json"


def parse_json(body: bytes) -> Any:
    """The one JSON parser of every route: UTF-8 only, at most 200 levels deep, no lone surrogates, no NaN;
    whatever it refuses is the same 400 whichever route the body was for. It is pydantic's (jiter), the
    parser BentoML's own routes use, so a body it accepts parses again below it (FastAPI's stdlib parse
    included: 200 levels stay far from Python's recursion limit)."""
    try:
        return pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON ({exc}): send one UTF-8 encoded JSON object",
                         code="invalid_json") from None
