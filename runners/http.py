"""The HTTP front door around the routes (one ASGI middleware, `FrontDoor`): health, auth, body
size, request ids and access logs, and the OpenAI error envelope on every error BentoML answers by
itself (schema validation, traffic limits, unknown paths)."""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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

log = logging.getLogger("embed_rerank.service")
HEALTH_PATHS = ("/livez", "/readyz", "/healthz")
TEI_PREFIX = "/tei"  # Text Embeddings Inference's API lives under this prefix (runners.tei)


class JSONBody(JSONResponse):
    """Responses encoded by orjson: vectors are most of every response, and the standard
    library's encoder took 5-12 % of the request thread at 32 clients."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _envelope_for(status: int, body: bytes) -> ServiceError:
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
    """Run a service method; any failure becomes its status and error body."""
    try:
        return JSONBody(await call())
    except ServiceError as exc:
        return error_response(exc, tei)
    except Exception:
        log.exception("request failed")
        return error_response(InternalError("the server failed on this request; the log has the traceback"), tei)


# Request ids: unique per process by a counter behind a random per-process prefix (32 hex characters, as
# uuid4().hex was). uuid4 reads os.urandom per call: 5 % of the event loop's samples at 64 connections.
_ID_PREFIX = os.urandom(10).hex()
_ID_COUNTER = itertools.count()


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


class _BodyTooLarge(Exception):
    pass


@dataclass(frozen=True)
class FastRoute:
    """A model route that FrontDoor answers itself when the request is well-formed (see FrontDoor)."""

    schema: type[BaseModel]
    handle: Callable[[Any], Awaitable[Any]]  # the validated body -> the response's content


def _json_content(headers: dict[bytes, bytes]) -> bool:
    kind = headers.get(b"content-type")
    return kind is not None and kind.partition(b";")[0].strip().lower() == b"application/json"


def is_tei(path: str) -> bool:
    return path == TEI_PREFIX or path.startswith(TEI_PREFIX + "/")


async def _send_error(send: Send, err: ServiceError, extra_headers: list[tuple[bytes, bytes]] | None = None,
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


class FrontDoor:
    """Everything the service does around a request, in one ASGI pass (one layer instead of five,
    measured in README, Performance):

    - `/livez` and `/readyz` answer 503 with the reason once a model is out of service (the
      process exits soon after; BentoML's own `/livez` would say 200);
    - `API_KEY`: a Bearer token from it is needed on every route but health (and metrics);
    - bodies over MAX_BODY_BYTES get a 413, by Content-Length or while they stream in;
    - a request id (taken from `X-Request-ID` or made here, returned in that header) and one access
      log line per request (JSON when LOG_FORMAT=json);
    - error bodies that BentoML, Starlette or FastAPI answer by themselves (schema validation,
      traffic limits, unknown paths) are rewritten into the OpenAI envelope;
    - `/docs.json` documents the error responses this service really sends;
    - the model routes in `fast_routes` are answered here when the request is well-formed (a JSON
      body that the route's schema accepts): the body is parsed by orjson, validated by the route's
      schema and handed to the function the route itself calls, without the layers below this one
      (BentoML's request context, Starlette's and FastAPI's apps, routers, dependency resolution:
      most of the event loop's time per request, README, Performance). BentoML's timeout, traffic
      limit and request metrics sit above FrontDoor and still apply. Anything else, an invalid body
      included, goes down the normal stack with the body replayed, so errors are the routes' own.
    """

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...], metrics_public: bool, max_body_bytes: int,
                 fast_routes: Mapping[str, FastRoute] | None = None) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.metrics_public = metrics_public
        self.max_body_bytes = max_body_bytes
        self.fast_routes = dict(fast_routes or {})

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if not self.keys:
            return True
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        token = token.strip()
        # Compare against every key, always, so timing says nothing about which one nearly matched.
        matches = [hmac.compare_digest(token, key) for key in self.keys]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in HEALTH_PATHS:
            await self._health(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if path == "/metrics":
            if self.metrics_public or self._authorized(headers):
                await self.app(scope, receive, send)
            else:
                await _send_error(send, _unauthorized())
            return
        tei = is_tei(path)
        if path == TEI_PREFIX:
            # TEI's root route: `InferenceClient(base_url=".../tei")` posts to the prefix itself, which
            # the mounted app sees as "/" (without this, Starlette would answer a redirect).
            scope = dict(scope, path=TEI_PREFIX + "/", raw_path=(TEI_PREFIX + "/").encode())
        given = headers.get(b"x-request-id", b"").decode("latin-1")[:128]
        request_id = given if given.isprintable() and given else _new_request_id()
        id_header = (b"x-request-id", request_id.encode("latin-1"))
        started = time.perf_counter()
        status = 500
        try:
            if not self._authorized(headers):
                status = 401
                await _send_error(send, _unauthorized(), [id_header], tei)
                return
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                status = 413
                await _send_error(send, PayloadTooLarge(
                    f"the body has {int(length)} bytes; the limit is MAX_BODY_BYTES={self.max_body_bytes}: "
                    "split the request", code="body_too_large"), [id_header], tei)
                return
            if path == "/docs.json":
                status = await self._openapi(scope, receive, send, id_header)
                return
            route = self.fast_routes.get(path)
            if route is not None and scope["method"] == "POST" and _json_content(headers):
                status = await self._fast(route, scope, receive, send, id_header, tei)
                return
            status = await self._forward(scope, receive, send, id_header, tei)
        finally:
            access_log.info(
                "%s %s %d", scope["method"], path, status,
                extra={"request_id": request_id, "method": scope["method"], "path": path, "status": status,
                       "duration_ms": round((time.perf_counter() - started) * 1000, 2)},
            )

    async def _forward(self, scope: Scope, receive: Receive, send: Send, id_header: tuple[bytes, bytes],
                       tei: bool = False) -> int:
        """Run the app; pass successes through, put error bodies that are not envelopes (TEI's error body
        under `/tei`) into one."""
        status = 500
        error_start: Message | None = None
        chunks: list[bytes] = []

        async def wrapped_send(message: Message) -> None:
            nonlocal status, error_start
            if message["type"] == "http.response.start":
                status = message["status"]
                if status < 400:
                    message["headers"] = [*message.get("headers", []), id_header]
                    await send(message)
                else:
                    error_start = message
                return
            if error_start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            try:
                data = json.loads(body)
            except ValueError:
                data = None
            if isinstance(data, dict) and (isinstance(data.get("error"), dict) or (tei and "error_type" in data)):
                error_start["headers"] = [*error_start.get("headers", []), id_header]
                await send(error_start)
                await send({"type": "http.response.body", "body": body})
                return
            await _send_error(send, _envelope_for(status, body), [id_header], tei)

        try:
            await self.app(scope, self._limited(receive), wrapped_send)
        except _BodyTooLarge:
            status = await self._too_large(send, id_header, tei)
        return status

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that raises _BodyTooLarge once the body streamed in is over MAX_BODY_BYTES."""
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge()
            return message

        return limited_receive

    async def _too_large(self, send: Send, id_header: tuple[bytes, bytes], tei: bool) -> int:
        await _send_error(send, PayloadTooLarge(
            f"the body is over MAX_BODY_BYTES={self.max_body_bytes} bytes: split the request", code="body_too_large"
        ), [id_header], tei)
        return 413

    async def _fast(self, route: FastRoute, scope: Scope, receive: Receive, send: Send,
                    id_header: tuple[bytes, bytes], tei: bool) -> int:
        chunks: list[bytes] = []
        limited = self._limited(receive)
        try:
            while True:
                message = await limited()
                if message["type"] != "http.request":  # the client went away
                    return 499
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
        except _BodyTooLarge:
            return await self._too_large(send, id_header, tei)
        body = b"".join(chunks)
        try:
            request = route.schema.model_validate(orjson.loads(body))
        except Exception:  # noqa: BLE001 - not JSON orjson reads, or not the schema: the route answers, in its words
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            return await self._forward(scope, replay, send, id_header, tei)
        response = await answer(lambda: route.handle(request), tei)
        response.raw_headers.append(id_header)
        await response(scope, receive, send)
        return response.status_code

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        from runners.engines import HEALTH

        if HEALTH.reason is None:
            await self.app(scope, receive, send)
            return
        body = orjson.dumps({"status": "unavailable", "reason": HEALTH.reason})
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _openapi(self, scope: Scope, receive: Receive, send: Send, id_header: tuple[bytes, bytes]) -> int:
        start: Message = {}
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        status = start.get("status", 500)
        if status == 200:
            body = json.dumps(openapi_with_envelopes(json.loads(body))).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers += [(b"content-length", str(len(body)).encode()), id_header]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return status


def _unauthorized() -> Unauthorized:
    return Unauthorized("missing or wrong API key: send the header 'Authorization: Bearer <key>' with a key from API_KEY")


access_log = logging.getLogger("embed_rerank.access")
_EXTRA_FIELDS = ("request_id", "method", "path", "status", "duration_ms")


class JSONLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({k: getattr(record, k) for k in _EXTRA_FIELDS if hasattr(record, k)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(log_format: str) -> None:
    """The service's own loggers: JSON lines or plain text on stderr, INFO and up."""
    handler = logging.StreamHandler()
    handler.setFormatter(JSONLogFormatter() if log_format == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("embed_rerank")
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


ERROR_ENVELOPE_SCHEMA = {
    "title": "ErrorEnvelope",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}
TEI_ERROR_SCHEMA = {
    "title": "TeiError",
    "type": "object",
    "required": ["error", "error_type"],
    "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
}
TEI_RANKS_SCHEMA = {
    "type": "array",
    "items": {"type": "object", "required": ["index", "score"],
              "properties": {"index": {"type": "integer"}, "score": {"type": "number"}, "text": {"type": "string"}}},
}
_ERROR_STATUSES = {"400": "Bad request", "401": "Missing or wrong API key", "404": "Unknown model or route",
                   "413": "Over a size limit", "422": "Body does not match the schema",
                   "429": "Queue full: retry later", "500": "Server error (model_error: the model raised on this request)",
                   "503": "Not ready, or a model is out of service", "504": "Timed out",
                   "507": "One input alone does not fit the device's memory",
                   "424": "TEI routes: the model failed on this request (TEI's Backend error)"}


def openapi_with_envelopes(doc: dict[str, Any]) -> dict[str, Any]:
    """BentoML documents its own error bodies; the service answers in the OpenAI envelope."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorEnvelope"] = ERROR_ENVELOPE_SCHEMA
    schemas["TeiError"] = TEI_ERROR_SCHEMA
    envelope = {"$ref": "#/components/schemas/ErrorEnvelope"}
    for path, item in doc.get("paths", {}).items():
        if path in HEALTH_PATHS or path == "/metrics":
            continue
        ref = {"$ref": "#/components/schemas/TeiError"} if is_tei(path) else envelope
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            if path == "/rerank":  # a TEI body there gets TEI's answer (runners.schemas.RerankRequest)
                for media in operation["responses"].get("200", {}).get("content", {}).values():
                    media["schema"] = {"anyOf": [media.get("schema", {}), TEI_RANKS_SCHEMA]}
            for status, description in _ERROR_STATUSES.items():
                operation["responses"][status] = {
                    "description": description, "content": {"application/json": {"schema": ref}},
                }
    return doc
