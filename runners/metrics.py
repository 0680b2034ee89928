"""Prometheus metrics of the service, beyond BentoML's own request metrics.

A private registry, appended to BentoML's `/metrics` text by the service's `__metrics__` hook.
`embed_rerank_queue_depth` (items accepted and not yet answered, per model) is the signal the
Kubernetes HorizontalPodAutoscaler scales on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

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


class QueueDepthCollector:
    """Reads the queue depth per model at scrape time."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self.read = read

    def collect(self) -> Iterable[Metric]:
        gauge = GaugeMetricFamily("embed_rerank_queue_depth", "Items queued or running in the engine", labels=["model"])
        for model, depth in self.read():
            gauge.add_metric([model], depth)
        yield gauge


_queue_collector: QueueDepthCollector | None = None


def watch_queues(read: Callable[[], Iterable[tuple[str, int]]]) -> None:
    """Report the queues that `read` lists (one service per process; a new one replaces the old)."""
    global _queue_collector
    if _queue_collector is not None:
        REGISTRY.unregister(_queue_collector)
    _queue_collector = QueueDepthCollector(read)
    REGISTRY.register(_queue_collector)


def record_error(error_type: str, status: int) -> None:
    ERRORS.labels(error_type, str(status)).inc()


def exposition() -> str:
    return generate_latest(REGISTRY).decode("utf-8")
