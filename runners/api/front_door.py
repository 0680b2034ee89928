"""The HTTP front door around the routes: one ASGI middleware, `FrontDoor` (see its docstring)."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import orjson
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runners.api import pages
from runners.api.logs import access_log, new_request_id
from runners.api.openapi import openapi_with_envelopes
from runners.api.responses import (
    HEALTH_PATHS,
    METRICS_PATHS,
    PARSED_JSON,
    TEI_OPENAI_EMBEDDINGS,
    answer,
    envelope_for,
    is_tei,
    parse_json,
    send_error,
    unauthorized,
)
from runners.engine.health import HEALTH
from runners.errors import BadRequest, PayloadTooLarge
from runners.jobs.wire import MAX_FILE_BYTES, UPLOAD_BODY_BYTES, UPLOAD_PATH
from runners.vocabulary import TEI_PREFIX

_BODY_METHODS = ("POST", "PUT", "PATCH")


class _BodyTooLarge(Exception):
    pass


def _file_too_large() -> PayloadTooLarge:
    return PayloadTooLarge(f"the upload is over {MAX_FILE_BYTES // (1024 * 1024)} MB, the limit of a batch input "
                           "file: split it into several files and batches", code="file_too_large", param="file")


class FastRoute(Protocol):
    """A model route that FrontDoor answers itself when the request is well-formed (runners.api.routes.Route)."""

    schema: type[BaseModel] | None
    handle: Callable[[Any], Awaitable[Any]]  # the validated body -> the response's content


def _json_content(headers: dict[bytes, bytes]) -> bool:
    """A body the routes read as JSON: anything but a form (BentoML reads a body of any other type, or of
    none, as JSON; FastAPI those of no type and `application/*json`)."""
    kind = headers.get(b"content-type", b"").partition(b";")[0].strip().lower()
    return kind not in (b"multipart/form-data", b"application/x-www-form-urlencoded")


def _strictly_json(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"content-type", b"").partition(b";")[0].strip().lower() == b"application/json"


def _multipart_content(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"content-type", b"").partition(b";")[0].strip().lower() == b"multipart/form-data"


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` that gives `body` once, then what the client sends next (a disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


ErrorAnswer = Callable[[Message, bytes, Any], Awaitable[None]]


def _catch_errors(send: Send, answer_error: ErrorAnswer, on_success: Callable[[Message], None] | None = None) -> Send:
    """`send` that passes a success through (after `on_success` saw its start) and hands an error
    response, whole, to `answer_error(start, body, the body's JSON or None)` to answer instead."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def wrapped(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            if message["status"] < 400:
                if on_success is not None:
                    on_success(message)
                await send(message)
            else:
                start = message
            return
        if start is None or message["type"] != "http.response.body":
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
        await answer_error(start, body, data)

    return wrapped


def _tei_openai_errors(send: Send) -> Send:
    """`send` for TEI's OpenAI-compatible route (`/tei/v1/embeddings`): TEI answers errors there as
    `{"message", "code", "type"}` (`code` the status, `type` TEI's error type) and its OpenAPI document
    names the type `error_type`; TEI's error body `{"error", "error_type"}`, which the routes and
    FrontDoor answer under /tei, becomes that, with both names."""

    async def reshape(start: Message, body: bytes, data: Any) -> None:
        headers = start.get("headers", [])
        if isinstance(data, dict) and isinstance(data.get("error"), str) and "error_type" in data:
            body = json.dumps({"message": data["error"], "code": start["status"], "type": data["error_type"],
                               "error_type": data["error_type"]}).encode()
            headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return _catch_errors(send, reshape)


class FrontDoor:
    """Everything the service does around a request, in one ASGI pass (one layer instead of five,
    measured in docs/performance.md):

    - `/livez` and `/readyz` answer 503 with the reason once a model is out of service (the
      process exits soon after; BentoML's own `/livez` would say 200);
    - `API_KEY`: a Bearer token from it is needed on every route but health (and metrics);
    - bodies over MAX_BODY_BYTES get a 413, by Content-Length or while they stream in; a batch file
      upload (`POST /v1/files`, multipart) has the batch file limit instead, and streams through to
      the route, which spools it to disk (runners.api.batches), never whole in memory;
    - a request id (taken from `X-Request-ID` or made here, returned in that header) and one access
      log line per request (JSON when LOG_FORMAT=json);
    - error bodies that BentoML, Starlette or FastAPI answer by themselves (schema validation,
      traffic limits, unknown paths) are rewritten into the OpenAI envelope;
    - `/docs.json` documents the error responses this service really sends;
    - the service's own pages, `/` and the API viewer `/docs`, are answered here (runners.api.pages):
      public, without the models when API_KEY is set and the request has no key; BentoML's page at
      `/` loaded Google Tag Manager;
    - the model routes in `fast_routes` are answered here when the request is well-formed (a JSON
      body that the route's schema accepts): the body is parsed by `parse_json`, validated by the route's
      schema and handed to the function the route itself calls, without the layers below this one
      (BentoML's request context, Starlette's and FastAPI's apps, routers, dependency resolution:
      most of the event loop's time per request, docs/performance.md). BentoML's timeout, traffic
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
        if path in METRICS_PATHS:
            if self.metrics_public or self._authorized(headers):
                await self.app(scope, receive, send)
            else:
                await send_error(send, unauthorized())
            return
        tei = is_tei(path)
        if path == TEI_OPENAI_EMBEDDINGS:
            send = _tei_openai_errors(send)
        if path == TEI_PREFIX:
            # TEI's root route: `InferenceClient(base_url=".../tei")` posts to the prefix itself, which
            # the mounted app sees as "/" (without this, Starlette would answer a redirect).
            scope = dict(scope, path=TEI_PREFIX + "/", raw_path=(TEI_PREFIX + "/").encode())
        given = headers.get(b"x-request-id", b"").decode("latin-1")[:128]
        request_id = given if given.isprintable() and given else new_request_id()
        id_header = (b"x-request-id", request_id.encode("latin-1"))
        started = time.perf_counter()
        status = 500
        try:
            if scope["method"] in ("GET", "HEAD") and pages.serves(path):
                response = await pages.page(path, authorized=self._authorized(headers), key_set=bool(self.keys))
                response.raw_headers.append(id_header)
                await response(scope, receive, send)
                status = response.status_code
                return
            if not self._authorized(headers):
                status = 401
                await send_error(send, unauthorized(), [id_header], tei)
                return
            length = headers.get(b"content-length")
            upload = scope["method"] == "POST" and path == UPLOAD_PATH and _multipart_content(headers)
            if upload:
                if length is not None and length.isdigit() and int(length) > UPLOAD_BODY_BYTES:
                    status = 413
                    await send_error(send, _file_too_large(), [id_header])
                    return
                status = await self._forward(scope, receive, send, id_header, limit=UPLOAD_BODY_BYTES)
                return
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                status = 413
                await send_error(send, PayloadTooLarge(
                    f"the body has {int(length)} bytes; the limit is MAX_BODY_BYTES={self.max_body_bytes}: "
                    "split the request", code="body_too_large"), [id_header], tei)
                return
            if path == "/docs.json":
                status = await self._openapi(scope, receive, send, id_header)
                return
            if _multipart_content(headers):
                status = await self._multipart(scope, receive, send, id_header, tei)
                return
            if scope["method"] in _BODY_METHODS and _json_content(headers):
                fast = self.fast_routes.get(path) if scope["method"] == "POST" and _strictly_json(headers) else None
                status = await self._json(fast, scope, receive, send, id_header, tei)
                return
            status = await self._forward(scope, receive, send, id_header, tei)
        finally:
            access_log.info(
                "%s %s %d", scope["method"], path, status,
                extra={"request_id": request_id, "method": scope["method"], "path": path, "status": status,
                       "duration_ms": round((time.perf_counter() - started) * 1000, 2)},
            )

    async def _forward(self, scope: Scope, receive: Receive, send: Send, id_header: tuple[bytes, bytes],
                       tei: bool = False, limit: int | None = None) -> int:
        """Run the app; pass successes through, put error bodies that are not envelopes (TEI's error body
        under `/tei`) into one."""
        status = 500

        def success(start: Message) -> None:
            nonlocal status
            status = start["status"]
            start["headers"] = [*start.get("headers", []), id_header]

        async def envelope(start: Message, body: bytes, data: Any) -> None:
            nonlocal status
            status = start["status"]
            if isinstance(data, dict) and (isinstance(data.get("error"), dict) or (tei and "error_type" in data)):
                await send({**start, "headers": [*start.get("headers", []), id_header]})
                await send({"type": "http.response.body", "body": body})
                return
            # The framework's `Allow` on a 405 stays (RFC 9110 requires it); its other headers describe its body.
            allow = [(k, v) for k, v in start.get("headers", []) if k.lower() == b"allow"]
            await send_error(send, envelope_for(status, body), [*allow, id_header], tei)

        try:
            await self.app(scope, self._limited(receive, limit), _catch_errors(send, envelope, success))
        except _BodyTooLarge:
            if limit is not None:
                await send_error(send, _file_too_large(), [id_header])
                return 413
            status = await self._too_large(send, id_header, tei)
        return status

    def _limited(self, receive: Receive, limit: int | None = None) -> Receive:
        """`receive` that raises _BodyTooLarge once the body streamed in is over `limit` (MAX_BODY_BYTES)."""
        received = 0
        most = self.max_body_bytes if limit is None else limit

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > most:
                    raise _BodyTooLarge()
            return message

        return limited_receive

    async def _too_large(self, send: Send, id_header: tuple[bytes, bytes], tei: bool) -> int:
        await send_error(send, PayloadTooLarge(
            f"the body is over MAX_BODY_BYTES={self.max_body_bytes} bytes: split the request", code="body_too_large"
        ), [id_header], tei)
        return 413

    async def _body(self, receive: Receive) -> bytes | None:
        """The whole body, within MAX_BODY_BYTES (raises _BodyTooLarge); None when the client went away."""
        chunks: list[bytes] = []
        limited = self._limited(receive)
        while True:
            message = await limited()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _whole_body(self, receive: Receive, send: Send, id_header: tuple[bytes, bytes], tei: bool) -> bytes | int:
        """The body, or the status when there is none to go on with: 413 (answered here) or 499."""
        try:
            body = await self._body(receive)
        except _BodyTooLarge:
            return await self._too_large(send, id_header, tei)
        return 499 if body is None else body

    async def _json(self, route: FastRoute | None, scope: Scope, receive: Receive, send: Send,
                    id_header: tuple[bytes, bytes], tei: bool) -> int:
        """A JSON body, on any route, is parsed here by `parse_json`, and a body it refuses is answered here
        (the frameworks' own parsers answered a deep one with a RecursionError's 500, or TEI's 424). A fast
        route answers from the parsed body when its schema accepts it; anything else goes on, replayed."""
        body = await self._whole_body(receive, send, id_header, tei)
        if isinstance(body, int):  # answered already (413), or the client went away (499)
            return body
        if not body:  # nothing to parse: the route says what it needs
            return await self._forward(scope, _replay(body, receive), send, id_header, tei)
        try:
            data = parse_json(body)
        except BadRequest as exc:
            await send_error(send, exc, [id_header], tei)
            return exc.status
        if route is not None:
            try:
                request = route.schema.model_validate(data)
            except Exception:  # noqa: BLE001 - not the schema: the route answers, in its words
                route = None
        if route is None:  # the body goes on, and so does what it parsed to (for the routes that read it raw)
            scope = dict(scope, state={**scope.get("state", {}), PARSED_JSON: data})
            return await self._forward(scope, _replay(body, receive), send, id_header, tei)
        response = await answer(lambda: route.handle(request), tei)
        response.raw_headers.append(id_header)
        await response(scope, receive, send)
        return response.status_code

    async def _multipart(self, scope: Scope, receive: Receive, send: Send, id_header: tuple[bytes, bytes],
                         tei: bool) -> int:
        """A multipart/form-data body is read as a form here before the routes see it: BentoML's native
        routes read such a body as their fields and answer a 500 when it is not a form (Starlette's
        parser raises a 400 that BentoML turns into its own 500). A malformed one is the client's 400;
        a well-formed one goes on, replayed."""
        body = await self._whole_body(receive, send, id_header, tei)
        if isinstance(body, int):  # answered already (413), or the client went away (499)
            return body
        try:
            form = await Request({k: v for k, v in scope.items() if k != "app"}, _replay(body, receive)).form()
            await form.close()
        except (MultiPartException, HTTPException) as exc:
            detail = exc.message if isinstance(exc, MultiPartException) else exc.detail
            await send_error(send, BadRequest(
                f"the multipart/form-data body cannot be read ({detail}): send the body as JSON with "
                "'Content-Type: application/json'", code="invalid_multipart"), [id_header], tei)
            return 400
        return await self._forward(scope, _replay(body, receive), send, id_header, tei)

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        reason = HEALTH.current()  # this worker's, or another worker's of this server
        if reason is None:
            await self.app(scope, receive, send)
            return
        body = orjson.dumps({"status": "unavailable", "reason": reason})
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
