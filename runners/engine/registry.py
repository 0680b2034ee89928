"""The served models (runners.engine.loaded loads each with its scheduler): finding one by name or
capability, bounded queues, the cache of repeated inputs, the watchdog (restart a loop that died; a
model that cannot be brought back makes health answer 503 and the process exit) and stopping every
model on shutdown."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from runners import metrics
from runners.engine.batching import is_background
from runners.engine.cache import ResultCache, cacheable
from runners.engine.devices import (
    cache_bytes,
)
from runners.engine.health import HEALTH
from runners.engine.loaded import LoadedModel, load_in_order, phase_line
from runners.engine.passes import share_cpu_passes
from runners.errors import BadRequest, ModelNotFound, Overloaded, ServiceError, Timeout, Unavailable
from runners.lifecycle import process_age_s
from runners.models.imports import stack_import_seconds
from runners.settings import Settings
from runners.vocabulary import RERANK, RERANK_PREFERENCE, UNSPECIFIED_MODELS

log = logging.getLogger("embed_rerank.engines")

_HAS_TIMEOUT = hasattr(asyncio, "timeout")  # Python 3.11+
FATAL_EXIT_DELAY_S = 2.0  # health answers 503 with the reason this long before the process exits


class EngineRegistry:
    """Every served model, found by name or by capability, with bounded queues."""

    def __init__(self, settings: Settings, on_fatal: Callable[[str], Any] | None = None) -> None:
        self.settings = settings
        self.models: list[LoadedModel] = []
        self.ready = False
        self.on_fatal = on_fatal  # called once a model cannot be brought back: the process should exit
        self.start_phases: dict[str, Any] = {}  # the last start's phases (seconds), as logged
        self._start_lock = asyncio.Lock()
        self._watchdog: asyncio.Task | None = None
        self.cache = ResultCache(0)  # repeated inputs (CACHE_MB), sized at start when the device is known
        self._loading: list[concurrent.futures.Future] | None = None
        self._loading_since = 0.0

    def begin_loading(self) -> None:
        """Start loading the models now, in a thread (the imports they share happen once), without
        waiting: `start` waits for them. Safe to call from any thread, once or more; the RunPod worker
        calls it before runpod starts its API, so the weights load meanwhile."""
        if self._loading is not None:
            return
        self._loading_since = time.perf_counter()
        specs = self.settings.models
        for i, spec in enumerate(specs, 1):
            log.info("loading model %d/%d: %s (%s)", i, len(specs), spec.served_name, spec.name_or_path)
        self._loading = load_in_order(list(specs), self.settings)

    async def start(self, warmup: Callable[[LoadedModel], Awaitable[Any]] | None = None) -> None:
        """Load, start and warm every model; ready only after the last one answered."""
        async with self._start_lock:
            if self.ready:
                return
            self.begin_loading()
            loading, self._loading = self._loading or [], None
            total = self._loading_since
            warmups = 0.0
            self.cache = ResultCache(await asyncio.to_thread(cache_bytes, self.settings))
            # Every model is built before the first warm-up: a forward pass must not run while
            # transformers builds another model (it changes the process's default dtype meanwhile).
            built: list[LoadedModel] = []
            for spec, future in zip(self.settings.models, loading):
                try:
                    built.append(await asyncio.wrap_future(future))
                except Exception as exc:
                    for other in loading:
                        other.cancel()  # the ones not started yet
                    await self.stop()
                    raise RuntimeError(f"model {spec.name_or_path!r} failed to load: {type(exc).__name__}: {exc}") from exc
            share_cpu_passes([s for loaded in built for s in loaded.schedulers])
            for spec, loaded in zip(self.settings.models, built):
                for scheduler in loaded.schedulers:
                    scheduler.start()
                metrics.queue_depth(loaded.name).set(0)
                self.models.append(loaded)
                warm = time.perf_counter()
                if warmup is not None and self.settings.model_warmup:
                    await warmup(loaded)
                loaded.warmup_seconds = time.perf_counter() - warm
                warmups += loaded.warmup_seconds
                p = loaded.phases
                log.info(
                    "model %s ready in %.1fs: %s (%s)", spec.served_name, time.perf_counter() - total,
                    ", ".join(sorted(loaded.capabilities)),
                    phase_line(p.imports_s, p.weights_read_s, p.to_device_s, loaded.warmup_seconds),
                )
            self.ready = True
            self._watchdog = asyncio.create_task(self._watch(), name="embed-rerank-watchdog")
            ready_s = time.perf_counter() - total
            phases = [m.phases for m in self.models]
            self.start_phases = {
                "imports_s": round(stack_import_seconds(), 3),
                "weights_read_s": round(sum(p.weights_read_s for p in phases), 3),
                "to_device_s": round(sum(p.to_device_s for p in phases), 3),
                "warmup_s": round(warmups, 3),
                "ready_s": round(ready_s, 3),
                "process_age_s": process_age_s(),
            }
            age = self.start_phases["process_age_s"]
            # With several models the weights and warm-ups are summed; the imports are shared.
            log.info(
                "all %d model(s) ready in %.1fs (%s%s)%s", len(self.models), ready_s,
                phase_line(self.start_phases["imports_s"], self.start_phases["weights_read_s"],
                            self.start_phases["to_device_s"], warmups),
                f", summed over {len(self.models)} models" if len(self.models) > 1 else "",
                f"; {age:.2f}s after the process started" if age is not None else "",
            )

    async def stop(self) -> None:
        self.ready = False
        self._loading = None  # loads still running finish in their threads and are dropped
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for model in self.models:
            for scheduler in model.schedulers:
                try:
                    await asyncio.to_thread(scheduler.stop)
                except Exception:  # noqa: BLE001 - one model failing to stop must not keep the others running
                    log.exception("stopping model %s failed", scheduler.name)
        self.models = []
        self.cache.clear()
        self._cache_gauges()

    def _cache_gauges(self) -> None:
        metrics.CACHE_BYTES.set(self.cache.bytes)
        metrics.CACHE_ENTRIES.set(len(self.cache))

    @property
    def serving(self) -> bool:
        """Every model loaded and none out of service."""
        return self.ready and HEALTH.reason is None

    async def _watch(self) -> None:
        """Restart a scheduler loop that died; give a model up when it keeps dying or stalls."""
        stall = self.settings.stall_timeout_s
        while True:
            await asyncio.sleep(min(1.0, stall / 4))
            for model, scheduler in [(m, s) for m in self.models for s in m.schedulers]:
                if scheduler.dead_reason is not None:
                    continue
                roles = scheduler.dead_loops()
                if roles:
                    if scheduler.restart(roles):
                        log.warning("model %s: restarted its %s loop", scheduler.name, " and ".join(roles))
                        continue
                    self._give_up(model, f"its batch loop died more than {scheduler.restarts_allowed} times "
                                         f"within {scheduler.restart_window_s:.0f}s")
                elif (stalled := scheduler.stalled_for()) > stall:
                    self._give_up(model, f"a batch made no progress for {stalled:.0f}s (MODEL_STALL_TIMEOUT={stall:g})")

    def _give_up(self, model: LoadedModel, why: str) -> None:
        reason = f"model {model.name!r} is out of service: {why}"
        log.error("%s; health answers 503 and the process exits", reason)
        HEALTH.fail(reason)
        for scheduler in model.schedulers:
            scheduler.kill(why)
        if self.on_fatal is not None:
            asyncio.get_running_loop().call_later(FATAL_EXIT_DELAY_S, self.on_fatal, reason)

    def find(self, name: str) -> LoadedModel:
        """A model by any of its names, whatever it serves."""
        for loaded in self.models:
            if name in loaded.spec.names():
                return loaded
        if not self.ready:
            raise Unavailable(f"model {name!r} is not loaded yet: retry when GET /readyz answers 200")
        served = ", ".join(m.name for m in self.models)
        raise ModelNotFound(f"model {name!r} is not served here; served models: {served}", param="model")

    def resolve(self, model: str | None, capability: str) -> LoadedModel:
        if model in UNSPECIFIED_MODELS:
            model = None
        if model:
            for loaded in self.models:
                if model in loaded.spec.names():
                    if capability not in loaded.capabilities:
                        raise BadRequest(
                            f"model {model!r} cannot {capability}: it serves {', '.join(sorted(loaded.capabilities))}",
                            param="model",
                            code="unsupported_capability",
                        )
                    return loaded
            if not self.ready:
                raise Unavailable(f"model {model!r} is not loaded yet: retry when GET /readyz answers 200")
            served = ", ".join(m.name for m in self.models)
            raise ModelNotFound(f"model {model!r} is not served here; served models: {served}", param="model")
        capable = [m for m in self.models if capability in m.capabilities]
        # A real reranker beats ColBERT's late interaction, which beats the cosine fallback of an
        # embedding model listed before them.
        capable.sort(key=lambda m: RERANK_PREFERENCE.get(m.rerank_via, 0) if capability == RERANK else 0)
        if capable:
            return capable[0]
        if not self.ready:
            raise Unavailable("the models are still loading: retry when GET /readyz answers 200")
        raise BadRequest(
            f"no served model can {capability}: add one to MODEL_NAMES", param="model", code="unsupported_capability"
        )

    def queue_depth(self) -> int:
        return sum(m.in_flight for m in self.models)

    async def run(self, model: LoadedModel, capability: str, inputs: list[Any]) -> tuple[list[Any], int]:
        """The model's results for `inputs` and the tokens it read; refused at once when its queue is full.
        Inputs the cache of repeated inputs has are answered from it (runners.engine.cache); only the
        others go to the model."""
        if self.cache.enabled and cacheable(inputs):
            return await self._run_cached(model, capability, inputs)
        return await self._run_model(model, capability, inputs)

    async def _run_cached(self, model: LoadedModel, capability: str, inputs: list[Any]) -> tuple[list[Any], int]:
        cache = self.cache
        results: list[Any] = [None] * len(inputs)
        tokens = [0] * len(inputs)
        misses: dict[Any, list[int]] = {}  # each input the cache lacks, once, with every place it holds
        for i, x in enumerate(inputs):
            found = cache.get((model.load_id, capability, x))
            if found is not None:
                results[i], tokens[i] = found
            else:
                misses.setdefault(x, []).append(i)
        hits, missed = metrics.cache_counters(model.name)
        if len(misses) < len(inputs):
            hits.inc(len(inputs) - len(misses))  # from the cache, or the same text again in this request
        if not misses:
            return results, sum(tokens)
        missed.inc(len(misses))
        todo = list(misses)
        lengths = [0] * len(todo)
        answers, _ = await self._run_model(model, capability, todo, lengths)
        for x, answer, n in zip(todo, answers, lengths):
            cache.put((model.load_id, capability, x), answer, n)
            for i in misses[x]:
                results[i], tokens[i] = answer, n
        self._cache_gauges()
        return results, sum(tokens)

    async def _run_model(self, model: LoadedModel, capability: str, inputs: list[Any],
                         lengths: list[int] | None = None) -> tuple[list[Any], int]:
        items = len(inputs)
        limit = self.settings.queue_size
        if model.in_flight + items > limit:
            raise Overloaded(
                f"model {model.name!r} has {model.in_flight} items queued (INFINITY_QUEUE_SIZE={limit}): "
                f"retry after a short wait",
                headers={"Retry-After": "1"},
            )
        model.in_flight += items
        depth = metrics.background_queue_depth(model.name) if is_background() else metrics.queue_depth(model.name)
        depth.inc(items)
        started = time.perf_counter()
        scheduler = model.scheduler_for(capability)
        try:
            if _HAS_TIMEOUT:  # no extra task per request, as wait_for makes on 3.11
                async with asyncio.timeout(self.settings.request_timeout_s):
                    return await scheduler.run(inputs, lengths)
            return await asyncio.wait_for(scheduler.run(inputs, lengths), timeout=self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            model.stats.errors += 1
            raise Timeout(
                f"model {model.name!r} did not answer within REQUEST_TIMEOUT={self.settings.request_timeout_s}s"
            ) from None
        except ServiceError:
            model.stats.errors += 1
            raise
        finally:
            model.in_flight -= items
            depth.dec(items)
            elapsed = time.perf_counter() - started
            model.stats.inference_seconds += elapsed
            metrics.of(model.name, capability).inference_seconds.observe(elapsed)
