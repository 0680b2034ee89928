"""The BentoML service: resources, traffic and lifecycle; its routes come from one table.

Every model route (native, OpenAI, Jina/Cohere v1, Cohere v2, TEI) is a row of
`runners.api.routes.ROUTES`: the native paths become BentoML APIs, the others FastAPI apps mounted
at `/v1`, `/v2` and `/tei`, and FrontDoor (one ASGI middleware) answers the hot ones directly. Each
handler turns its body into the one internal query of its capability and calls `InferenceService`,
as the RunPod adapter does. Heavy imports (torch, infinity) never happen at this module's import: the
serving process imports it too. In a worker they start in a thread as soon as the settings are read,
and the models start loading when the service is created (docs/performance.md, Cold start).
"""

from __future__ import annotations

from runners.api.process import prepare_process
from runners.lifecycle import in_bentoml_worker, install_in_arbiter, stop_server
from runners.models.imports import import_in_background

SETTINGS = prepare_process()
if in_bentoml_worker():
    # The model stack's imports (torch, transformers, infinity's replicas: most of a cold start) run
    # in a thread from here on, while this module, BentoML and uvicorn start; the startup hook waits.
    import_in_background()

import bentoml  # noqa: E402

from runners import metrics  # noqa: E402
from runners.api import context, routes  # noqa: E402
from runners.api.front_door import FrontDoor  # noqa: E402
from runners.capabilities.service import InferenceService  # noqa: E402

# In `bentoml serve`'s serving process (it imports this module too): answer the workers' stop_server.
install_in_arbiter()

APPS = routes.mounted_apps()


@bentoml.asgi_app(APPS["/tei"], path="/tei")
@bentoml.asgi_app(APPS["/v1"], path="/v1")
@bentoml.asgi_app(APPS["/v2"], path="/v2")
@bentoml.service(
    name="embed-rerank",
    # One GPU by default; on a host without one the service still starts and runs on the CPU.
    resources={"gpu": SETTINGS.gpu_count, "memory": SETTINGS.memory}
    | ({"gpu_type": SETTINGS.gpu_type} if SETTINGS.gpu_type else {}),
    traffic={"timeout": int(SETTINGS.request_timeout_s) + 5, "max_concurrency": SETTINGS.max_concurrency},
    workers=1,
    # OpenTelemetry's ASGI middleware on every request halved a bare route's req/s
    # (docs/performance.md); the API routes skip it, health and metrics keep it.
    tracing={"excluded_urls": routes.untraced_paths()},
    # FrontDoor writes one access line per request, with its request id.
    logging={"access": {"enabled": False}},
)
@routes.native_apis  # /embed, /rerank, /classify, /tokenize as BentoML APIs, from the route table
class EmbeddingService:
    def __init__(self) -> None:
        self.inference = InferenceService(SETTINGS)
        context.bind(self.inference)
        # A model the watchdog cannot bring back: health says 503, then the whole server exits.
        self.inference.registry.on_fatal = stop_server
        if in_bentoml_worker():
            self.inference.registry.begin_loading()  # the weights are read while uvicorn starts

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


EmbeddingService.add_asgi_middleware(FrontDoor, api_keys=SETTINGS.api_keys, metrics_public=SETTINGS.metrics_public,
                                     max_body_bytes=SETTINGS.max_body_bytes, fast_routes=routes.fast_routes())
