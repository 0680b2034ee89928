"""A loaded model: its card (runners.models), its scheduler(s) with a cost model timed once it serves, its
counters and its /v1/models entry; loading models one after the other in a thread of their own."""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from runners.engine.batching import DEFAULT_COST, DEFAULT_GPU_COST
from runners.engine.calibration import probe_row
from runners.engine.devices import (
    default_batch_tokens,
    on_gpu,
    process_torch_threads,
    single_thread_tokens,
    torch_module,
    torch_on_cpu,
)
from runners.engine.scheduler import ModelScheduler
from runners.models.card import ModelCard
from runners.models.lean_bert import install_all as install_lean_bert
from runners.models.load import load_card
from runners.settings import ModelSpec, Settings
from runners.vocabulary import DENSE, EMBED, IMAGE_EMBED, TOKENS

log = logging.getLogger("embed_rerank.engines")
_PROBE_TEXTS = ["a", "a b c d e f g h"]  # two lengths: the scheduler learns how the replica pads
_LOADS = itertools.count(1)  # numbers each model load: the cache never answers from a model loaded before


@dataclass
class ModelStats:
    requests: int = 0
    items: int = 0
    tokens: int = 0
    errors: int = 0
    inference_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "items": self.items,
            "tokens": self.tokens,
            "errors": self.errors,
            "inference_seconds": round(self.inference_seconds, 3),
        }


@dataclass(kw_only=True)
class LoadedModel(ModelCard):
    """A model card with its running scheduler, queue depth and counters."""

    scheduler: ModelScheduler
    # CLIP-like models: the vision tower's own scheduler (a text and an image never share a batch), made
    # with the text scheduler's limits; images count as their vision tokens in the same token budget.
    image_scheduler: ModelScheduler | None = None
    in_flight: int = 0
    stats: ModelStats = field(default_factory=ModelStats)
    warmup_seconds: float = 0.0
    created: int = field(default_factory=lambda: int(time.time()))
    load_id: int = field(default_factory=lambda: next(_LOADS))

    def __post_init__(self) -> None:
        if self.images is not None and self.image_scheduler is None:
            self.image_scheduler = ModelScheduler(self.images, name=f"{self.name}:image", max_batch_size=self.spec.batch_size,
                                                  max_batch_tokens=self.scheduler.budget.limit, probe=(),
                                                  cpu_threads=self.scheduler.cpu_threads)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "object": "model",
            # Infinity's generated client accepts only this value (an enum of one); the rest of the entry
            # says what this service is.
            "owned_by": "infinity",
            "created": self.created,
            "kind": self.kind,
            "capabilities": sorted(self.capabilities),
            "rerank_via": self.rerank_via,
            "path": self.spec.name_or_path,
            "backend": self.spec.backend,
            "dtype": self.spec.dtype,
            "batch_size": self.spec.batch_size,
            "max_batch_tokens": self.scheduler.budget.limit,
            "batch_tokens_now": self.scheduler.budget.current,
            "dimensions": self.dimensions,
            # What /embed's `output` may ask of this model (docs/api.md, sparse and multi-vector embeddings).
            "outputs": list(self.outputs) or ([DENSE, TOKENS] if self.token_inputs else
                                              [DENSE] if EMBED in self.capabilities else []),
            "pooling": self.pooling,  # "mean": late chunking works (docs/api.md, long inputs)
            "token_dimensions": self.token_dimensions,
            "max_tokens": self.max_tokens,
            "prompts": self.prompts,
            "labels": self.labels or None,
            "load_seconds": round(self.load_seconds, 2),
            "in_flight": self.in_flight,
            "stats": self.stats.as_dict() | self.scheduler.counters | (
                {f"image_{k}": v for k, v in self.image_scheduler.counters.items()} if self.image_scheduler else {}),
            "image_tokens": self.image_tokens,
        }

    @property
    def schedulers(self) -> list[ModelScheduler]:
        return [self.scheduler] + ([self.image_scheduler] if self.image_scheduler is not None else [])

    def scheduler_for(self, capability: str) -> ModelScheduler:
        if capability == IMAGE_EMBED and self.image_scheduler is not None:
            return self.image_scheduler
        return self.scheduler


def load_model(spec: ModelSpec, settings: Settings) -> LoadedModel:
    """Load one model and build its scheduler (blocking: run it in a thread); not started yet."""
    card = load_card(spec, settings)
    replica = card.replica
    if torch_on_cpu(replica, settings):
        install_lean_bert(torch_module(replica))
    probe = [(t, t) for t in _PROBE_TEXTS] if card.pairs else _PROBE_TEXTS
    scheduler = ModelScheduler(
        replica, name=spec.served_name, max_batch_size=spec.batch_size,
        max_batch_tokens=spec.max_batch_tokens or default_batch_tokens(settings), probe=probe,
        single_thread_tokens=single_thread_tokens(replica, settings),
        cpu_threads=process_torch_threads() if torch_on_cpu(replica, settings) else 0,
        cost=DEFAULT_GPU_COST if on_gpu(settings) else DEFAULT_COST,
    )
    try:
        row, length = probe_row(replica, scheduler.codec, probe)
    except Exception as exc:  # noqa: BLE001 - the default cost model stays; batches refit it
        log.warning("model %s: no calibration input (%s: %s); batches cut by the default cost model",
                    spec.served_name, type(exc).__name__, exc)
    else:
        scheduler.calibrate_when_idle(row, length, card.max_tokens)
    return LoadedModel(**card.card_fields(), scheduler=scheduler)


def load_in_order(specs: list[ModelSpec], settings: Settings) -> list[concurrent.futures.Future]:
    """Load the models one after the other in a daemon thread of their own (an exit never waits for a
    load); one future per model, each done as soon as its model is. Never two at once: transformers'
    `from_pretrained` changes process-wide state while it builds a model (the default dtype, meta-device
    parameter creation), and two models built at once failed ("Cannot copy out of meta tensor")."""
    futures: list[concurrent.futures.Future] = [concurrent.futures.Future() for _ in specs]

    def run() -> None:
        for spec, future in zip(specs, futures):
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(load_model(spec, settings))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the load
                future.set_exception(exc)

    threading.Thread(target=run, name="load-models", daemon=True).start()
    return futures


def phase_line(imports_s: float, read_s: float, device_s: float, warmup_s: float) -> str:
    return (f"imports {imports_s:.2f}s, weights read {read_s:.2f}s, moved to device {device_s:.2f}s, "
            f"warm-up {warmup_s:.2f}s")
