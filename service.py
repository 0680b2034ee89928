"""The BentoML service: resources, traffic and typed routes, translated into the service methods.

Native routes (`/embed`, `/rerank`, `/classify`, `/tokenize`) are BentoML APIs; the OpenAI,
Jina/Cohere v1, Cohere v2 and TEI routes are FastAPI apps mounted at `/v1`, `/v2` and `/tei`. Every route turns its body into the
one internal query of its capability and calls `InferenceService`, as the RunPod adapter does.
Heavy imports (torch, infinity) happen in the worker's startup hook, not here: the serving
process imports this module too.
"""

from __future__ import annotations

import os
from typing import Any

import bentoml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from runners import allocator, metrics
from runners.errors import BadRequest, ModelNotFound, ServiceError, Unavailable, from_validation_errors
from runners.http import FastRoute, FrontDoor, answer, client_status_error, configure_logging, error_response
from runners.inference import InferenceService
from runners.lifecycle import install_in_arbiter, stop_server
from runners.schemas import (
    ClassifyRequest,
    CohereEmbedRequest,
    EmbeddingRequest,
    RerankRequest,
    TeiRerankRequest,
    TokenizeRequest,
    V1RerankRequest,
    V2RerankRequest,
    cohere_to_embed_query,
    to_classify_query,
    to_embed_query,
    to_rerank_query,
)
from runners.settings import SettingsError, apply_offline_defaults, load_settings
from runners.tei import build_tei_app, rerank_rows, tei_fast_routes

try:
    SETTINGS = load_settings()
except SettingsError as exc:
    raise SystemExit(f"configuration error: {exc}") from None
apply_offline_defaults(SETTINGS)
# torch's OpenMP runtime (libgomp) lets an idle worker thread spin 300,000 rounds before it sleeps;
# beside the event loop on a few cores that spinning takes CPU the requests need (README, Performance,
# Threads and OpenMP). libgomp reads this when torch loads: in the worker's startup hook, after this.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
configure_logging(SETTINGS.log_format)
try:
    # In `bentoml serve` this runs in the serving process before it spawns the workers, which
    # inherit the environment: they start with the allocator preloaded.
    allocator.activate(SETTINGS.allocator)
except SettingsError as exc:
    raise SystemExit(f"configuration error: {exc}") from None


def _install_error_handlers(app: FastAPI) -> FastAPI:
    @app.exception_handler(RequestValidationError)
    async def _schema(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err: ServiceError = ModelNotFound(f"no such route: {exc.detail}", code="not_found")
        elif "parsing the body" in str(exc.detail):
            err = BadRequest("the request body is not valid JSON: send one UTF-8 encoded JSON object", code="invalid_json")
        else:
            err = client_status_error(exc.status_code, str(exc.detail))
        err.status = exc.status_code
        return error_response(err)

    return app


API_ROUTES = ("/embed", "/rerank", "/classify", "/tokenize", "/v1/embeddings", "/v1/rerank", "/v1/models", "/v2/rerank",
              "/v2/embed", "/tei")
openai_app = _install_error_handlers(FastAPI(title="OpenAI, Jina and Cohere v1 compatible routes"))
cohere_v2_app = _install_error_handlers(FastAPI(title="Cohere v2 compatible routes"))

# In `bentoml serve`'s serving process (it imports this module too): answer the workers' stop_server.
install_in_arbiter()


class _Worker:
    """The service methods of this worker process, for the FastAPI routes below. They are plain
    functions rather than methods of the service class: BentoML gives a method its `self` through a
    synchronous FastAPI dependency, which costs every request a trip through a thread pool."""

    inference: InferenceService | None = None


def inference() -> InferenceService:
    if _Worker.inference is None:
        raise Unavailable("the service is still starting: retry when GET /readyz answers 200")
    return _Worker.inference


@openai_app.get("/models")
async def openai_models() -> Response:
    async def listing() -> dict[str, Any]:
        return inference().models()

    return await answer(listing)


# What each model route does with its validated body. The routes below call these, and so does
# FrontDoor, which answers a well-formed request to these paths without the framework's layers.
async def embed_body(body: EmbeddingRequest) -> dict[str, Any]:
    return await inference().embed(to_embed_query(body))


async def native_rerank_body(body: RerankRequest) -> Any:
    if body.documents is None:  # TEI's body: answered in TEI's shape (RerankRequest says why)
        tei_body = TeiRerankRequest(query=body.query, texts=body.texts or [], raw_scores=body.raw_scores,
                                    return_text=body.return_text, model=body.model)
        return await rerank_rows(inference(), tei_body)  # errors: this route's envelope
    return await inference().rerank(to_rerank_query(body), "native")


async def v1_rerank_body(body: V1RerankRequest) -> dict[str, Any]:
    return await inference().rerank(to_rerank_query(body), "v1")


async def v2_rerank_body(body: V2RerankRequest) -> dict[str, Any]:
    return await inference().rerank(to_rerank_query(body), "v2")


async def v2_embed_body(body: CohereEmbedRequest) -> dict[str, Any]:
    return await inference().cohere_embed(cohere_to_embed_query(body))


async def classify_body(body: ClassifyRequest) -> dict[str, Any]:
    return await inference().classify(to_classify_query(body))


@openai_app.post("/embeddings")
async def openai_embeddings(body: EmbeddingRequest) -> Response:
    return await answer(lambda: embed_body(body))


@openai_app.post("/rerank")
async def v1_rerank(body: V1RerankRequest) -> Response:
    return await answer(lambda: v1_rerank_body(body))


@cohere_v2_app.post("/rerank")
async def v2_rerank(body: V2RerankRequest) -> Response:
    return await answer(lambda: v2_rerank_body(body))


@cohere_v2_app.post("/embed")
async def v2_embed(body: CohereEmbedRequest) -> Response:
    return await answer(lambda: v2_embed_body(body))


tei_app = build_tei_app(inference)
FAST_ROUTES = {
    "/embed": FastRoute(EmbeddingRequest, embed_body),
    "/rerank": FastRoute(RerankRequest, native_rerank_body),
    "/classify": FastRoute(ClassifyRequest, classify_body),
    "/v1/embeddings": FastRoute(EmbeddingRequest, embed_body),
    "/v1/rerank": FastRoute(V1RerankRequest, v1_rerank_body),
    "/v2/embed": FastRoute(CohereEmbedRequest, v2_embed_body),
    "/v2/rerank": FastRoute(V2RerankRequest, v2_rerank_body),
    **tei_fast_routes(inference),
}


@bentoml.asgi_app(tei_app, path="/tei")
@bentoml.asgi_app(openai_app, path="/v1")
@bentoml.asgi_app(cohere_v2_app, path="/v2")
@bentoml.service(
    name="embed-rerank",
    # One GPU by default; on a host without one the service still starts and runs on the CPU.
    resources={"gpu": SETTINGS.gpu_count, "memory": SETTINGS.memory}
    | ({"gpu_type": SETTINGS.gpu_type} if SETTINGS.gpu_type else {}),
    traffic={"timeout": int(SETTINGS.request_timeout_s) + 5, "max_concurrency": SETTINGS.max_concurrency},
    workers=1,
    # OpenTelemetry's ASGI middleware on every request halved a bare route's req/s (FIELD_NOTES);
    # the API routes skip it, health and metrics keep it.
    tracing={"excluded_urls": list(API_ROUTES)},
    # runners.http.FrontDoor writes one access line per request, with its request id.
    logging={"access": {"enabled": False}},
)
class EmbeddingService:
    def __init__(self) -> None:
        self.inference = InferenceService(SETTINGS)
        _Worker.inference = self.inference
        # A model the watchdog cannot bring back: health says 503, then the whole server exits.
        self.inference.registry.on_fatal = stop_server

    async def start_engines(self) -> None:
        """Load, start and warm every model (the RunPod adapter calls this too)."""
        await self.inference.start()

    @bentoml.on_startup
    async def _startup(self) -> None:
        try:
            await self.start_engines()
        except Exception as exc:
            # BentoML restarts a worker whose startup failed, forever; a model that cannot load
            # won't load next time either, so the whole server exits with EXIT_CANNOT_SERVE.
            stop_server(f"startup failed: {exc}")
            raise

    @bentoml.on_shutdown
    async def stop_engines(self) -> None:
        await self.inference.stop()

    def __is_ready__(self) -> bool:
        return self.inference.ready

    def __metrics__(self, content: str) -> str:
        return content + metrics.exposition()

    # ---- native routes (they call the functions FAST_ROUTES maps) ----

    @bentoml.api(route="/embed", input_spec=EmbeddingRequest)
    async def embed(self, **params: Any) -> dict:
        body = EmbeddingRequest.model_construct(**params)
        return await answer(lambda: embed_body(body))

    @bentoml.api(route="/rerank", input_spec=RerankRequest)
    async def rerank(self, **params: Any) -> dict:
        body = RerankRequest.model_construct(**params)
        return await answer(lambda: native_rerank_body(body))

    @bentoml.api(route="/classify", input_spec=ClassifyRequest)
    async def classify(self, **params: Any) -> dict:
        body = ClassifyRequest.model_construct(**params)
        return await answer(lambda: classify_body(body))

    @bentoml.api(route="/tokenize", input_spec=TokenizeRequest)
    async def tokenize(self, **params: Any) -> dict:
        req = TokenizeRequest.model_construct(**params)
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        return await answer(lambda: self.inference.tokenize(texts, req.model, req.add_special_tokens))



EmbeddingService.add_asgi_middleware(FrontDoor, api_keys=SETTINGS.api_keys, metrics_public=SETTINGS.metrics_public,
                                     max_body_bytes=SETTINGS.max_body_bytes, fast_routes=FAST_ROUTES)
