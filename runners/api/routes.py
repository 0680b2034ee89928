"""The route table: every model route of the service, in every dialect, once. Each row names its
method, path, request type and handler; from the table come the framework's routes (BentoML APIs
for the native paths, one FastAPI app per mounted prefix) and FrontDoor's fast path (`fast=True`:
a well-formed body is answered without the framework's layers, runners.api.front_door).

Health (`/livez`, `/readyz`), `/metrics` and `/docs.json` are BentoML's own, shaped by FrontDoor; the
pages `/` and `/docs` are the service's own (runners.api.pages), answered by FrontDoor.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response

from runners.api import batches, handlers, tei
from runners.api.responses import PARSED_JSON, answer, client_status_error, error_response, is_tei, parse_json
from runners.api.schemas import (
    ClassifyRequest,
    CohereEmbedRequest,
    EmbeddingRequest,
    RerankRequest,
    TokenizeRequest,
    V1RerankRequest,
    V2RerankRequest,
)
from runners.api.tei_schemas import (
    TeiDecodeRequest,
    TeiEmbedRequest,
    TeiPredictRequest,
    TeiRerankRequest,
    TeiSimilarityRequest,
    TeiTokenizeRequest,
)
from runners.errors import BadRequest, ModelNotFound, ServiceError, from_validation_errors
from runners.vocabulary import TEI_PREFIX


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    # POST with a schema: the validated body -> the response's content; POST without one: the parsed
    # JSON; GET: the query parameters. A ServiceError raised is answered in the route's dialect.
    handle: Callable[[Any], Awaitable[Any]]
    schema: type[BaseModel] | None = None
    fast: bool = False  # FrontDoor answers a well-formed body itself
    plain_text: bool = False  # the answer is text (documented so in the OpenAPI document), not JSON
    raw: bool = False  # the handler takes the request itself (path parameters, a multipart upload)

    @property
    def tei(self) -> bool:
        return is_tei(self.path)


ROUTES: tuple[Route, ...] = (
    # native: BentoML APIs
    Route("POST", "/embed", handlers.embed, EmbeddingRequest, fast=True),
    Route("POST", "/rerank", handlers.rerank, RerankRequest, fast=True),
    Route("POST", "/classify", handlers.classify, ClassifyRequest, fast=True),
    Route("POST", "/tokenize", handlers.tokenize, TokenizeRequest),
    # OpenAI, Jina and Cohere v1
    Route("GET", "/v1/models", handlers.models),
    Route("POST", "/v1/embeddings", handlers.embed, EmbeddingRequest, fast=True),
    Route("POST", "/v1/rerank", handlers.v1_rerank, V1RerankRequest, fast=True),
    # OpenAI Batch API: files and batches in DATA_DIR (runners.api.batches, runners.jobs)
    Route("POST", "/v1/files", batches.upload_file, raw=True),
    Route("GET", "/v1/files", batches.list_files, raw=True),
    Route("GET", "/v1/files/{file_id}", batches.get_file, raw=True),
    Route("DELETE", "/v1/files/{file_id}", batches.delete_file, raw=True),
    Route("GET", "/v1/files/{file_id}/content", batches.file_content, raw=True),
    Route("POST", "/v1/batches", batches.create_batch),
    Route("GET", "/v1/batches", batches.list_batches, raw=True),
    Route("GET", "/v1/batches/{batch_id}", batches.get_batch, raw=True),
    Route("POST", "/v1/batches/{batch_id}/cancel", batches.cancel_batch, raw=True),
    # Cohere v2
    Route("POST", "/v2/embed", handlers.v2_embed, CohereEmbedRequest, fast=True),
    Route("POST", "/v2/rerank", handlers.v2_rerank, V2RerankRequest, fast=True),
    # Hugging Face Text Embeddings Inference (FrontDoor rewrites `POST /tei` to `/tei/`)
    Route("POST", "/tei/", tei.root),
    Route("POST", "/tei/embed", tei.embed, TeiEmbedRequest, fast=True),
    Route("POST", "/tei/rerank", tei.rerank, TeiRerankRequest, fast=True),
    Route("POST", "/tei/predict", tei.predict, TeiPredictRequest),
    Route("POST", "/tei/similarity", tei.similarity, TeiSimilarityRequest),
    Route("POST", "/tei/embed_all", tei.embed_all, TeiEmbedRequest),
    Route("POST", "/tei/embed_sparse", tei.embed_sparse, TeiEmbedRequest),
    Route("POST", "/tei/tokenize", tei.tokenize, TeiTokenizeRequest),
    Route("POST", "/tei/decode", tei.decode, TeiDecodeRequest),
    Route("GET", "/tei/info", tei.info),
    Route("GET", "/tei/health", tei.health),
    Route("GET", "/tei/metrics", tei.prometheus, plain_text=True),  # FrontDoor: public unless METRICS_PUBLIC=false
    # TEI's OpenAI route: /v1/embeddings' body and answer; errors in TEI's OpenAI shape (FrontDoor)
    Route("POST", "/tei/v1/embeddings", handlers.embed, EmbeddingRequest, fast=True),
)

def line_routes() -> dict[str, tuple[Callable[[Any], Any], Callable[[Any], Awaitable[Any]]]]:
    """How each route a batch line may name (runners.jobs.wire.ENDPOINTS) validates a parsed body, and its
    handler. Validation as the route's framework does it, so errors read the same: BentoML (the native
    routes) validates the JSON text, FastAPI (the mounted ones) the parsed body."""
    from runners.jobs.wire import ENDPOINTS

    table = {route.path: route for route in ROUTES if route.method == "POST" and route.schema is not None}
    rows = {}
    for path in ENDPOINTS:
        route = table[path]
        schema: Any = route.schema
        if mount_of(path) is None:
            def validate(body: Any, schema: Any = schema) -> Any:
                return schema.model_validate_json(orjson.dumps(body))
        else:
            validate = schema.model_validate
        rows[path] = (validate, route.handle)
    return rows


# Prefixes served by a FastAPI app each (mounted by service.py); other paths are BentoML APIs.
MOUNTS = {
    "/v1": "OpenAI, Jina and Cohere v1 compatible routes",
    "/v2": "Cohere v2 compatible routes",
    TEI_PREFIX: "Text Embeddings Inference compatible routes",
}


def mount_of(path: str) -> str | None:
    return next((prefix for prefix in MOUNTS if path.startswith(prefix + "/")), None)


def fast_routes() -> dict[str, Route]:
    return {route.path: route for route in ROUTES if route.fast}


def untraced_paths() -> list[str]:
    """Paths OpenTelemetry's middleware skips (it halved a bare route's req/s): every model route."""
    return [route.path for route in ROUTES if not route.tei and not route.raw] + [TEI_PREFIX]


# ---- the framework's routes, made from the table ----


def mounted_apps() -> dict[str, FastAPI]:
    """One FastAPI app per prefix of MOUNTS, with its routes and its dialect's error handlers."""
    apps = {}
    for prefix, title in MOUNTS.items():
        tei_app = prefix == TEI_PREFIX
        # TEI's OpenAPI document is TEI's own; the other apps keep FastAPI's at <prefix>/openapi.json.
        # No FastAPI docs pages: they load Swagger UI and ReDoc from a CDN (the service's own viewer is
        # /docs, runners.api.pages).
        app = FastAPI(title=title, docs_url=None, redoc_url=None, **({"openapi_url": None} if tei_app else {}))
        _install_error_handlers(app, tei_app)
        rows = [route for route in ROUTES if mount_of(route.path) == prefix]
        for path in dict.fromkeys(route.path for route in rows):
            # One framework route per path, whatever its methods: a 405 then names them all in `Allow`.
            same = [route for route in rows if route.path == path]
            endpoint = _endpoint(same[0]) if len(same) == 1 else _by_method(same)
            app.add_api_route(path[len(prefix):], endpoint, methods=[route.method for route in same],
                              name="_or_".join(route.handle.__name__ for route in same),
                              **({"response_class": PlainTextResponse} if same[0].plain_text else {}))
        apps[prefix] = app
    return apps


def _path_signature(path: str) -> inspect.Signature:
    """`(request, <each path parameter>: str)`: FastAPI documents the path's parameters in OpenAPI."""
    names = re.findall(r"{(\w+)}", path)
    return inspect.Signature(
        [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request)]
        + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=str) for name in names],
        return_annotation=Response)


def _by_method(routes: list[Route]) -> Callable[..., Awaitable[Response]]:
    """One endpoint for the routes of one path (none with a schema), each answering its method."""
    assert all(route.schema is None for route in routes), "a path with several methods takes no schema body"
    endpoints = {route.method: _endpoint(route) for route in routes}

    async def endpoint(request: Request, **_: str) -> Response:
        return await endpoints[request.method](request)

    endpoint.__signature__ = _path_signature(routes[0].path)  # type: ignore[attr-defined]
    return endpoint


def _endpoint(route: Route) -> Callable[..., Awaitable[Response]]:
    """A FastAPI endpoint for a route: FastAPI validates a schema's body (its errors go to the app's
    handlers); the handler's result or error is answered in the route's dialect."""
    tei_dialect = route.tei
    if route.schema is not None:
        async def endpoint(body: Any) -> Response:
            return await answer(lambda: route.handle(body), tei_dialect)

        endpoint.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter("body", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=route.schema)],
            return_annotation=Response)
        return endpoint

    async def raw_endpoint(request: Request, **_: str) -> Response:  # path parameters: request.path_params
        async def call() -> Any:
            if route.raw:
                return await route.handle(request)
            if route.method == "GET":
                return await route.handle(dict(request.query_params))
            state = request.scope.get("state") or {}
            return await route.handle(state[PARSED_JSON] if PARSED_JSON in state else parse_json(await request.body()))

        return await answer(call, tei_dialect)

    raw_endpoint.__signature__ = _path_signature(route.path)  # type: ignore[attr-defined]
    return raw_endpoint


def _install_error_handlers(app: FastAPI, tei_dialect: bool) -> None:
    @app.exception_handler(RequestValidationError)
    async def _schema(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation_errors(list(exc.errors())), tei_dialect)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err: ServiceError
        if tei_dialect:
            err = BadRequest(f"{exc.detail}: see the TEI routes in docs/api.md (TEI under /tei)",
                             code=f"http_{exc.status_code}")
        elif exc.status_code == 404:
            err = ModelNotFound(f"no such route: {exc.detail}", code="not_found")
        elif "parsing the body" in str(exc.detail):
            err = BadRequest("the request body is not valid JSON: send one UTF-8 encoded JSON object", code="invalid_json")
        else:
            err = client_status_error(exc.status_code, str(exc.detail))
        err.status = exc.status_code
        err.headers = {**err.headers, **(exc.headers or {})}  # a 405's `Allow` (RFC 9110)
        return error_response(err, tei_dialect)


def native_apis(cls: type) -> type:
    """Class decorator for the BentoML service: one `@bentoml.api` method per native route of the table."""
    import bentoml

    for route in ROUTES:
        if mount_of(route.path) is None:
            name = route.path.strip("/")
            setattr(cls, name, bentoml.api(route=route.path, input_spec=route.schema)(_bento_method(route, name)))
    return cls


def _bento_method(route: Route, name: str) -> Callable[..., Awaitable[Any]]:
    schema = route.schema
    assert schema is not None, f"native route {route.path} needs a request schema"

    async def method(self: Any, **params: Any) -> Any:
        body = schema.model_construct(**params)  # BentoML validated it already
        return await answer(lambda: route.handle(body))

    method.__name__ = method.__qualname__ = name
    method.__annotations__ = {"params": Any, "return": dict}
    return method

