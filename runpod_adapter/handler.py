"""The RunPod job handler: every job shape of API.md, answered by the service methods.

The `InferenceService` that the HTTP routes call does the work here too, built after the same process
preamble as `service.py` (`runners.api.process`) but without BentoML, which this worker never
serves; this module only tells the job shapes apart, validates them with the same request models,
and turns failures into FAILED jobs. The model stack is imported and the models start loading
(`begin_loading`) before runpod is imported and its API starts; the first job waits for them.

| job `input`                                   | answered by                                  |
|-----------------------------------------------|----------------------------------------------|
| `{openai_route: "/v1/models"}`                | `inference.models()`                         |
| `{openai_route: "/v1/embeddings", openai_input}` | `EmbeddingRequest` -> `inference.embed`   |
| `{openai_route: "/v1/rerank", openai_input}`  | `V1RerankRequest` -> `inference.rerank(.., "v1")` |
| `{query, docs or documents, ...}`             | `RerankRequest` -> `inference.rerank(.., "native")` |
| `{input, ...}`                                | `EmbeddingRequest` -> `inference.embed`      |
| `{batch: {input_url, output_url, endpoint}}`  | `runpod_adapter.batch_job` (the Batch API's runner) |

Output of the OpenAI routes (`RUNPOD_OPENAI_OUTPUT`): RunPod's OpenAI proxy
(`https://api.runpod.ai/v2/<id>/openai/v1/...`) turns a request into an `openai_route` job and
answers with the job's output. The workers it was built for return the OpenAI body wrapped in a
one-element list: worker-vllm yields it from a generator with `return_aggregate_stream`, and
worker-infinity-embedding (the worker this project replaces) returns `[body]` for
`/v1/embeddings` and the bare body for `/v1/models`. `auto` (the default) does exactly what that
worker did, so its clients and the proxy see no change; `/v1/rerank`, new here, is wrapped like
`/v1/embeddings`. `list` wraps every OpenAI route, `object` none. Native jobs (`input`, `query`)
always return the bare body, the same JSON as `POST /embed` and `POST /rerank`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from runners import metrics
from runners.api.schemas import (
    EmbeddingRequest,
    RerankRequest,
    V1RerankRequest,
)
from runners.errors import BadRequest, InternalError, ServiceError, Unavailable, from_validation_errors

log = logging.getLogger("embed_rerank.runpod")

OPENAI_ROUTES = ("/v1/models", "/v1/embeddings", "/v1/rerank")
OPENAI_OUTPUT_MODES = ("auto", "list", "object")
JOB_SHAPES = (
    "{input, model?, ...} to embed, {query, docs, model?, return_docs?, top_n?} to rerank, or "
    "{openai_route: " + " | ".join(OPENAI_ROUTES) + ", openai_input: {...}}, or "
    "{batch: {input_url, output_url, error_url?, endpoint}}"
)

_service: Any = None
_aliases: dict[str, str] = {}
_openai_output = "auto"
_start_lock: asyncio.Lock | None = None
_start_lock_loop: asyncio.AbstractEventLoop | None = None
_start_error: ServiceError | None = None


class ConfigError(ValueError):
    """A setting of the adapter has a value it cannot start with."""


def openai_output_mode(env: dict[str, str] | None = None) -> str:
    raw = (env if env is not None else os.environ).get("RUNPOD_OPENAI_OUTPUT", "").strip().lower() or "auto"
    if raw not in OPENAI_OUTPUT_MODES:
        raise ConfigError(f"RUNPOD_OPENAI_OUTPUT={raw!r} is not one of: {', '.join(OPENAI_OUTPUT_MODES)}")
    return raw


def configure(aliases: dict[str, str] | None = None, openai_output: str | None = None) -> None:
    """Names that reach a served model (from the volume plan) and the OpenAI output mode."""
    global _aliases, _openai_output
    _aliases = dict(aliases or {})
    _openai_output = openai_output or openai_output_mode()


class WorkerService:
    """This worker's service methods: the InferenceService of the HTTP routes, started by the first job."""

    def __init__(self, settings: Any) -> None:
        from runners.capabilities.service import InferenceService

        self.inference = InferenceService(settings)

    async def start_engines(self) -> None:
        await self.inference.start()


def get_service() -> Any:
    """This process's service (reads the settings the first time: a bad value ends the process)."""
    global _service
    if _service is None:
        from runners.api.process import prepare_process

        _service = WorkerService(prepare_process())
    return _service


def begin_loading() -> None:
    """Import the model stack here, then load the models' weights in threads while runpod is imported
    and starts its API. The imports stay in this thread: beside runpod's import in another thread they
    took longer, not less (one GIL; docs/performance.md, Cold start)."""
    from runners.models.imports import import_model_stack

    import_model_stack()
    get_service().inference.registry.begin_loading()


async def ensure_started(svc: Any) -> None:
    """Start the engines once, on the loop of the first job (each runpod mode has its own loop)."""
    global _start_lock, _start_lock_loop, _start_error
    if svc.inference.ready:
        return
    if _start_error is not None:
        raise _start_error
    loop = asyncio.get_running_loop()
    if _start_lock is None or _start_lock_loop is not loop:
        _start_lock, _start_lock_loop = asyncio.Lock(), loop
    async with _start_lock:
        if svc.inference.ready:
            return
        if _start_error is not None:
            raise _start_error
        try:
            await svc.start_engines()
        except Exception as exc:
            log.exception("the models failed to load")
            # Every later job fails at once with the same message: loading again would fail again.
            _start_error = Unavailable(f"this worker cannot serve: {exc}; see the worker log", code="startup_failed")
            raise _start_error from exc


# ---- job shapes ----

Call = Callable[[Any], Awaitable[Any]]


def _model_alias(req: Any) -> Any:
    if req.model and req.model in _aliases and _aliases[req.model] != req.model:
        return req.model_copy(update={"model": _aliases[req.model]})
    return req


def _wrap(route: str, body: Any) -> Any:
    if _openai_output == "list" or (_openai_output == "auto" and route != "/v1/models"):
        return [body]
    return body


def _openai_call(job_input: dict[str, Any]) -> Call:
    route = job_input.get("openai_route")
    if not isinstance(route, str) or route.strip().rstrip("/") not in OPENAI_ROUTES:
        raise BadRequest(
            f"openai_route {route!r} is not served here: use one of {', '.join(OPENAI_ROUTES)}",
            param="openai_route",
            code="unknown_route",
        )
    route = route.strip().rstrip("/")
    if route == "/v1/models":

        async def models(svc: Any) -> Any:
            return _wrap(route, svc.inference.models())

        return models
    body = job_input.get("openai_input")
    if body is None:
        raise BadRequest(f"openai_input is missing: send the body of the {route} request", param="openai_input")
    if not isinstance(body, dict):
        raise BadRequest(
            f"openai_input must be a JSON object (the body of the {route} request), not {type(body).__name__}",
            param="openai_input",
        )
    if route == "/v1/embeddings":
        embed_query = _model_alias(EmbeddingRequest.model_validate(body)).to_query()

        async def embeddings(svc: Any) -> Any:
            return _wrap(route, await svc.inference.embed(embed_query))

        return embeddings
    rerank_query = _model_alias(V1RerankRequest.model_validate(body)).to_query()

    async def rerank_v1(svc: Any) -> Any:
        return _wrap(route, await svc.inference.rerank(rerank_query, "v1"))

    return rerank_v1


def parse_job(job_input: Any) -> Call:
    """Validate a job's input and return the service call that answers it."""
    if not isinstance(job_input, dict):
        raise BadRequest(
            f"the job input must be a JSON object, not {type(job_input).__name__}: send {JOB_SHAPES}", param="input"
        )
    if "openai_route" in job_input:
        return _openai_call(job_input)
    if "query" in job_input:
        rerank_query = _model_alias(RerankRequest.model_validate(job_input)).to_query()

        async def rerank(svc: Any) -> Any:
            return await svc.inference.rerank(rerank_query, "native")

        return rerank
    if "input" in job_input:
        embed_query = _model_alias(EmbeddingRequest.model_validate(job_input)).to_query()

        async def embed(svc: Any) -> Any:
            return await svc.inference.embed(embed_query)

        return embed
    keys = ", ".join(sorted(map(str, job_input))) or "none"
    raise BadRequest(f"the job input has no known shape (its keys: {keys}): send {JOB_SHAPES}", code="unknown_shape")


def job_error(err: ServiceError) -> dict[str, Any]:
    """The FAILED job output: `error` is one line with the HTTP status, error type and message."""
    metrics.record_error(err.type, err.status)
    return err.job_error()


async def handler(job: dict[str, Any]) -> Any:
    """`runpod.serverless.start` handler: one job in, the route's JSON or `{"error": ...}` out."""
    try:
        job_input = job.get("input") if isinstance(job, dict) else None
        if isinstance(job_input, dict) and "batch" in job_input:
            return await _batch(job, job_input["batch"])
        call = parse_job(job_input)
        svc = get_service()
        await ensure_started(svc)
        return await call(svc)
    except ServiceError as err:
        if err.status >= 500:
            log.warning("job %s failed: %s", _job_id(job), err.message)
        output = job_error(err)
        from runners.engine.health import HEALTH

        if HEALTH.reason is not None:
            # A model is out of service for good: RunPod replaces this worker after the job.
            log.error("asking RunPod for a fresh worker: %s", HEALTH.reason)
            output["refresh_worker"] = True
        return output
    except ValidationError as exc:
        return job_error(from_validation_errors(list(exc.errors(include_url=False))))
    except Exception:
        log.exception("job %s failed", _job_id(job))
        return job_error(InternalError("the worker failed on this job; the worker log has the traceback"))


async def _batch(job: dict[str, Any], spec: Any) -> Any:
    """A batch job (runpod_adapter.batch_job): its lines go through the routes' own handlers."""
    from runners.api import context
    from runpod_adapter.batch_job import check_job, run_batch_job

    svc = get_service()
    check_job(spec, svc.inference.settings)  # a job that cannot run fails before the models start
    await ensure_started(svc)
    context.bind(svc.inference)
    return await run_batch_job(job, spec, svc.inference.settings)


def _job_id(job: Any) -> str:
    return str(job.get("id", "?")) if isinstance(job, dict) else "?"


# ---- concurrency ----


def next_concurrency(current: int, queue_depth: int, queue_size: int, max_concurrency: int) -> int:
    """How many jobs RunPod may hand this worker at once, from the engines' queue.

    Room in the queue (at most half full): the full `RUNPOD_MAX_CONCURRENCY`, so Infinity batches
    as many jobs as it is given. Full queue: half as many as now. In between: unchanged. RunPod's
    job scaler resizes only once the jobs in flight are done, so the value moves in few, large steps.
    """
    cap = max(1, max_concurrency)
    if queue_depth >= queue_size:
        target = current // 2
    elif queue_depth * 2 <= queue_size:
        target = cap
    else:
        target = current
    return max(1, min(cap, target))


def concurrency_modifier(current: int) -> int:
    try:
        inference = get_service().inference
        return next_concurrency(
            current,
            inference.registry.queue_depth(),
            inference.settings.queue_size,
            inference.settings.runpod_max_concurrency,
        )
    except Exception:  # noqa: BLE001 - the scaler must keep running; one job at a time is always safe
        log.exception("concurrency_modifier failed")
        return 1
