"""Prometheus metrics of the service, beyond BentoML's own request metrics.

A private registry. Under `bentoml serve` every worker runs prometheus_client in multiprocess mode
(its directory is the server's run directory, runners.workers): each value is written to a file per
process, and BentoML's `/metrics` adds up the files of all workers, ours among them. Elsewhere (the
RunPod adapter, in-process tests) there is one process, and the service's `__metrics__` hook appends
this registry to BentoML's text. `embed_rerank_queue_depth` (items accepted and not yet answered, per
model, summed over the workers) is the signal the Kubernetes HorizontalPodAutoscaler scales on.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

from runners.workers import METRICS_ENV, use_shared_metrics

use_shared_metrics()  # before prometheus_client is imported: it chooses multiprocess mode at import

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest  # noqa: E402

REGISTRY = CollectorRegistry(auto_describe=True)
LABELS = ("model", "capability")

REQUESTS = Counter("embed_rerank_requests", "Requests answered, by model and capability", LABELS, registry=REGISTRY)
ITEMS = Counter("embed_rerank_items", "Texts (or documents) processed", LABELS, registry=REGISTRY)
TOKENS = Counter("embed_rerank_tokens", "Tokenizer tokens processed", LABELS, registry=REGISTRY)
ERRORS = Counter("embed_rerank_errors", "Requests refused or failed, by error type and status",
                 ("type", "status"), registry=REGISTRY)
INFERENCE_SECONDS = Histogram(
    "embed_rerank_inference_seconds", "Time in the engine per request (queue wait included)", LABELS,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=REGISTRY,
)
REQUEST_ITEMS = Histogram(
    "embed_rerank_request_items", "Items per request (the batch a client sends)", LABELS,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048), registry=REGISTRY,
)


class ModelMetrics(NamedTuple):
    requests: Any
    items: Any
    tokens: Any
    request_items: Any
    inference_seconds: Any


@functools.cache
def of(model: str, capability: str) -> ModelMetrics:
    """The per-request metrics of one model and capability (`labels()` looked up once, not per request)."""
    labels = (model, capability)
    return ModelMetrics(REQUESTS.labels(*labels), ITEMS.labels(*labels), TOKENS.labels(*labels),
                        REQUEST_ITEMS.labels(*labels), INFERENCE_SECONDS.labels(*labels))


BATCH_SIZE = Histogram(
    "embed_rerank_batch_size", "Texts per model forward pass, as the scheduler formed them", ("model",),
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=REGISTRY,
)
BATCH_TOKENS = Histogram(
    "embed_rerank_batch_tokens", "Padded tokens per model forward pass (items x longest item)", ("model",),
    buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536), registry=REGISTRY,
)
BATCH_FAILURES = Counter("embed_rerank_batch_failures", "Forward passes that raised (not out of memory)", ("model",),
                         registry=REGISTRY)
OOM_SPLITS = Counter("embed_rerank_oom_splits", "Forward passes that ran out of memory and were split", ("model",),
                     registry=REGISTRY)
LOOP_RESTARTS = Counter("embed_rerank_loop_restarts", "Batch or tokenizer loops restarted by the watchdog", ("model",),
                        registry=REGISTRY)


# Gauges add up over the live workers ("livesum"; ignored with one process).
QUEUE_DEPTH = Gauge("embed_rerank_queue_depth", "Items queued or running in the engine", ("model",),
                    multiprocess_mode="livesum", registry=REGISTRY)
CACHE_HITS = Counter("embed_rerank_cache_hits", "Inputs answered from the cache of repeated inputs (CACHE_MB)",
                     ("model",), registry=REGISTRY)
CACHE_MISSES = Counter("embed_rerank_cache_misses", "Inputs the cache did not have: they went to the model", ("model",),
                       registry=REGISTRY)
CACHE_BYTES = Gauge("embed_rerank_cache_bytes", "Bytes held by the cache of repeated inputs, all workers",
                    multiprocess_mode="livesum", registry=REGISTRY)
CACHE_ENTRIES = Gauge("embed_rerank_cache_entries", "Results held by the cache of repeated inputs, all workers",
                      multiprocess_mode="livesum", registry=REGISTRY)


# Bulk jobs (runners.jobs): lines answered, and what the runner has left.
BATCH_LINES = Counter("embed_rerank_batch_lines", "Batch lines committed, by outcome (completed, failed)",
                      ("outcome",), registry=REGISTRY)
BATCHES_UNFINISHED = Gauge("embed_rerank_batches_unfinished", "Batches the runner has yet to finish (DATA_DIR)",
                           multiprocess_mode="livesum", registry=REGISTRY)
BATCH_LINES_LEFT = Gauge("embed_rerank_batch_lines_left", "Lines of the running batch not yet committed",
                         multiprocess_mode="livesum", registry=REGISTRY)
BACKGROUND_QUEUE_DEPTH = Gauge("embed_rerank_background_queue_depth",
                               "Items of batch lines queued or running in the engine (lowest priority)", ("model",),
                               multiprocess_mode="livesum", registry=REGISTRY)


@functools.cache
def background_queue_depth(model: str) -> Any:
    return BACKGROUND_QUEUE_DEPTH.labels(model)


@functools.cache
def queue_depth(model: str) -> Any:
    return QUEUE_DEPTH.labels(model)


@functools.cache
def cache_counters(model: str) -> tuple[Any, Any]:
    """(hits, misses) of one model."""
    return CACHE_HITS.labels(model), CACHE_MISSES.labels(model)


def record_error(error_type: str, status: int) -> None:
    ERRORS.labels(error_type, str(status)).inc()


def multiprocess() -> bool:
    """Whether values go to per-process files that BentoML's `/metrics` adds up (under `bentoml serve`)."""
    return bool(os.environ.get(METRICS_ENV))


def exposition() -> str:
    """This service's metrics (not BentoML's), all workers together (`/tei/metrics`)."""
    if not multiprocess():
        return generate_latest(REGISTRY).decode("utf-8")
    from prometheus_client.multiprocess import MultiProcessCollector

    everything = CollectorRegistry()
    MultiProcessCollector(everything)
    ours = CollectorRegistry(auto_describe=True)
    ours.register(_Only(everything, "embed_rerank_"))
    return generate_latest(ours).decode("utf-8")


def appended_to_bentoml() -> str:
    """What `__metrics__` adds to BentoML's `/metrics`: nothing in multiprocess mode, where BentoML's
    own collector already reads this registry's values from the workers' files; else this registry."""
    return "" if multiprocess() else generate_latest(REGISTRY).decode("utf-8")


class _Only:
    """The metric families of a registry whose names start with a prefix."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.registry, self.prefix = registry, prefix

    def collect(self) -> Any:
        return [m for m in self.registry.collect() if m.name.startswith(self.prefix)]

    def describe(self) -> list:
        return []
