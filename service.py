"""The BentoML service: resources, traffic and lifecycle; its routes come from one table.

Every model route (native, OpenAI, Jina/Cohere v1, Cohere v2, TEI) is a row of
`runners.api.routes.ROUTES`: the native paths become BentoML APIs, the others FastAPI apps mounted
at `/v1`, `/v2` and `/tei`, and FrontDoor (one ASGI middleware) answers the hot ones directly. Each
handler turns its body into the one internal query of its capability and calls `InferenceService`,
as the RunPod adapter does. Heavy imports (torch, infinity) happen in the worker's startup hook, not
here: the serving process imports this module too. They are not started in a thread at this import
either: beside BentoML's own start in the same process they took longer, not less (the GIL;
docs/performance.md, Cold start).
"""

from __future__ import annotations

import logging
import os

import bentoml

from runners import metrics, workers
from runners.api import batches, context, routes
from runners.api.front_door import FrontDoor
from runners.api.process import prepare_process
from runners.engine.health import HEALTH
from runners.lifecycle import install_in_arbiter, stop_server

SETTINGS = prepare_process()
# In `bentoml serve`'s serving process (it imports this module too): answer the workers' stop_server,
# and give the workers a run directory of this server (all workers' metrics, readiness and failure).
if install_in_arbiter():
    workers.prepare_serving(workers.worker_count(SETTINGS))
# In a worker of several: its own GPU and its share of the CPU threads, before torch loads.
WORKER = workers.enter_worker(SETTINGS)
HEALTH.share(workers.failure_path())

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
    # WORKERS: one per GPU the service is given, 1 on a CPU (runners/workers.py); the serving process
    # decides and names the number in the environment of the workers, which import this module too.
    workers=int(os.environ.get(workers.WORKERS_ENV) or workers.worker_count(SETTINGS)),
    # OpenTelemetry's ASGI middleware on every request halved a bare route's req/s
    # (docs/performance.md); the API routes skip it, health and metrics keep it.
    tracing={"excluded_urls": routes.untraced_paths()},
    # FrontDoor writes one access line per request, with its request id.
    logging={"access": {"enabled": False}},
)
@routes.native_apis  # /embed, /rerank, /classify, /tokenize as BentoML APIs, from the route table
class EmbeddingService:
    def __init__(self) -> None:
        # Imported here: the serving process imports this module too, and never serves a model.
        from runners.capabilities.service import InferenceService

        self.inference = InferenceService(SETTINGS)
        context.bind(self.inference)
        # Batch files and state in DATA_DIR (any worker answers); the runner starts once the models serve.
        self.batch_runner = batches.open_store(SETTINGS, routes.line_routes())
        # A model the watchdog cannot bring back: health says 503, then the whole server exits.
        self.inference.registry.on_fatal = self._cannot_serve

    @staticmethod
    def _cannot_serve(reason: str) -> None:
        workers.mark_ready(False)
        stop_server(reason)

    async def start_engines(self) -> None:
        """Load, start and warm every model (the RunPod adapter calls this too)."""
        await self.inference.start()

    @bentoml.on_startup
    async def _startup(self) -> None:
        if WORKER:
            logging.getLogger("embed_rerank.workers").info("%s", WORKER)
        workers.forget_dead_workers()
        try:
            await self.start_engines()
        except Exception as exc:
            # BentoML restarts a worker whose startup failed, forever; a model that cannot load
            # won't load next time either, so the whole server exits with EXIT_CANNOT_SERVE.
            stop_server(f"startup failed: {exc}")
            raise
        workers.mark_ready()
        self.batch_runner.start()  # the worker holding DATA_DIR's lease runs the batches

    @bentoml.on_shutdown
    async def stop_engines(self) -> None:
        workers.mark_ready(False)
        await self.batch_runner.stop()  # before the engines: its lines would fail, not wait
        await self.inference.stop()

    def __is_ready__(self) -> bool:
        # Every worker, not only the one this request reached (runners/workers.py: ready markers).
        return self.inference.ready and workers.all_ready()

    def __metrics__(self, content: str) -> str:
        return content + metrics.appended_to_bentoml()


EmbeddingService.add_asgi_middleware(FrontDoor, api_keys=SETTINGS.api_keys, metrics_public=SETTINGS.metrics_public,
                                     max_body_bytes=SETTINGS.max_body_bytes, fast_routes=routes.fast_routes())
