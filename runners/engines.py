"""Models: loading, the registry, capabilities, backpressure, the watchdog and shutdown.

Each model is an Infinity model replica (loaded by Infinity's own selection, or built here for
Qwen3 rerankers, logit classifiers and ONNX) driven by this project's `ModelScheduler`
(`runners.scheduler`), with its own batch size, token budget, backend and dtype. This module
decides which model serves a request, refuses work when a model's queue is full, supervises the
schedulers' loops (restart a loop that died; a model that cannot be brought back makes health
answer 503 and the process exit) and stops every model on shutdown.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runners import metrics
from runners.errors import BadRequest, ModelNotFound, Overloaded, ServiceError, Timeout, Unavailable
from runners.scheduler import ModelScheduler, process_torch_threads
from runners.schemas import UNSPECIFIED_MODELS
from runners.settings import ModelSpec, Settings
from runners.sparse import KINDS as MULTI_KINDS  # sparse, colbert, bge-m3, tokens (no torch import)

log = logging.getLogger("embed_rerank.engines")

EMBED, RERANK, CLASSIFY = "embed", "rerank", "classify"
# Capabilities of the multi-output models (runners.sparse): SPLADE / BGE-M3 sparse vectors and
# ColBERT / BGE-M3 / token vectors. The model kinds that have them: runners.sparse.KINDS.
SPARSE_EMBED, TOKEN_EMBED = "sparse", "tokens"
# Padded tokens per forward pass when MAX_BATCH_TOKENS=auto (README, Performance: the measurement).
DEFAULT_BATCH_TOKENS = {"cpu": 2048, "gpu": 32768}
# Tokens x non-embedding parameters below which a CPU forward pass runs on one thread (single_thread_tokens).
SINGLE_THREAD_WORK = 2.0e7
_HAS_TIMEOUT = hasattr(asyncio, "timeout")  # Python 3.11+
FATAL_EXIT_DELAY_S = 2.0  # health answers 503 with the reason this long before the process exits
_PROBE_TEXTS = ["a", "a b c d e f g h"]  # two lengths: the scheduler learns how the replica pads


class ServiceHealth:
    """Why the process cannot serve any more (None while it can): `/livez` and `/readyz` say it."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def fail(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason


HEALTH = ServiceHealth()


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


@dataclass
class LoadedModel:
    """A started engine and what the service needs to know about its model."""

    spec: ModelSpec
    scheduler: ModelScheduler
    capabilities: frozenset[str]
    rerank_via: str | None  # "cross-encoder", "qwen3-yes-no" or "embedding-cosine"
    tokenizer: Any
    max_tokens: int
    dimensions: int | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    multi_label: bool = False
    # Multi-output models (runners.sparse.MultiEncoder): the outputs each item can ask for with a
    # MultiInput ("dense", "sparse", "tokens"); empty for the classic replicas.
    outputs: tuple[str, ...] = ()
    token_dimensions: int | None = None  # size of each token vector
    tokens_normalized: bool = False  # token vectors are unit length (ColBERT, BGE-M3), or raw hidden states
    query_aware: bool = False  # ColBERT: queries must be sent as MultiInput(..., query=True)
    load_seconds: float = 0.0
    in_flight: int = 0
    stats: ModelStats = field(default_factory=ModelStats)
    created: int = field(default_factory=lambda: int(time.time()))
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.spec.served_name

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def tokenize(self, texts: list[str], *, special: bool = True) -> list[list[int]]:
        # Fast tokenizers are not safe to share between threads; this copy is ours alone.
        with self._tokenizer_lock:
            return self.tokenizer(texts, add_special_tokens=special, truncation=False)["input_ids"]

    def decode(self, ids: list[list[int]], skip_special: bool = True) -> list[str]:
        with self._tokenizer_lock:
            return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special)

    def token_details(self, texts: list[str], special: bool = True) -> list[list[dict[str, Any]]]:
        """Per token: id, text (the input's characters, or the token itself for special tokens),
        special, start and stop (character offsets), as TEI's `/tokenize` answers."""
        with self._tokenizer_lock:
            enc = self.tokenizer(texts, add_special_tokens=special, truncation=False, return_offsets_mapping=True,
                                 return_special_tokens_mask=True)
            pieces = [self.tokenizer.convert_ids_to_tokens(ids) for ids in enc["input_ids"]]
        out = []
        for text, ids, offsets, mask, tokens in zip(texts, enc["input_ids"], enc["offset_mapping"],
                                                    enc["special_tokens_mask"], pieces):
            row = []
            for tid, (start, stop), is_special, token in zip(ids, offsets, mask, tokens):
                spans = bool(stop > start) and not is_special
                row.append({"id": tid, "text": text[start:stop] if spans else token, "special": bool(is_special),
                            "start": start if spans else None, "stop": stop if spans else None})
            out.append(row)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "object": "model",
            # Infinity's generated client accepts only this value (an enum of one); the rest of the entry
            # says what this service is.
            "owned_by": "infinity",
            "created": self.created,
            "capabilities": sorted(self.capabilities),
            "rerank_via": self.rerank_via,
            "path": self.spec.name_or_path,
            "backend": self.spec.backend,
            "dtype": self.spec.dtype,
            "batch_size": self.spec.batch_size,
            "max_batch_tokens": self.scheduler.budget.limit,
            "batch_tokens_now": self.scheduler.budget.current,
            "dimensions": self.dimensions,
            # What /embed's `output` may ask of this model (README, Sparse and multi-vector embeddings).
            "outputs": list(self.outputs) or (["dense"] if EMBED in self.capabilities else []),
            "token_dimensions": self.token_dimensions,
            "max_tokens": self.max_tokens,
            "prompts": self.prompts,
            "labels": self.labels or None,
            "load_seconds": round(self.load_seconds, 2),
            "in_flight": self.in_flight,
            "stats": self.stats.as_dict() | self.scheduler.counters,
        }


def read_config(spec: ModelSpec) -> dict[str, Any]:
    """config.json of a local folder, or from the hub cache for an id."""
    if spec.is_local:
        path = Path(spec.name_or_path) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{spec.name_or_path} has no config.json: it is not a transformers model folder")
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(spec.name_or_path, filename="config.json"))
    return json.loads(path.read_text())


def resolve_kind(spec: ModelSpec, config: dict[str, Any]) -> str:
    """embed, rerank, classify, qwen3-reranker, or a multi-output kind (sparse, colbert, bge-m3;
    `tokens` only when set): the setting if given, else from config.json and the folder's files."""
    from runners.qwen3 import is_qwen3_reranker
    from runners.sparse import detect_kind

    if spec.kind != "auto":
        return spec.kind
    if is_qwen3_reranker(spec.name_or_path, config):
        return "qwen3-reranker"
    multi = detect_kind(spec.name_or_path, config)
    if multi is not None:
        return multi
    archs = config.get("architectures") or []
    if any("SequenceClassification" in a for a in archs):
        return RERANK if len(config.get("id2label") or {"0": 0}) < 2 else CLASSIFY
    return EMBED


def _engine_args(spec: ModelSpec, settings: Settings) -> Any:
    from infinity_emb import EngineArgs

    return EngineArgs(
        model_name_or_path=spec.name_or_path,
        served_model_name=spec.served_name,
        batch_size=spec.batch_size,
        engine=spec.backend,
        dtype=spec.dtype,
        device=settings.device,
        trust_remote_code=settings.trust_remote_code,
        bettertransformer=False,  # breaks on current transformers, and SDPA is built in now
        model_warmup=False,  # the registry warms each model with one real request instead
    )


def onnx_quantization(settings: Settings) -> str:
    """`auto`: int8 on a CPU (1.3-1.4x fp32 ONNX, cosine to fp32 >= 0.994 on MiniLM), fp32 on a GPU."""
    if settings.onnx_quantization != "auto":
        return settings.onnx_quantization
    import torch

    on_gpu = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
    return "fp32" if on_gpu else "int8"


def onnx_default_threads() -> int:
    """All cores but one: the HTTP server and the tokenizers need the other. Measured on 2 cores
    (all-MiniLM-L6-v2 int8, 32 clients): 1 thread 156-163 texts/s, 2 threads 144."""
    return max(1, (os.cpu_count() or 2) - 1)


def _on_gpu(settings: Settings) -> bool:
    if settings.device in ("cuda", "mps"):
        return True
    if settings.device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def _torch_on_cpu(replica: Any, settings: Settings) -> bool:
    import torch

    return not _on_gpu(settings) and isinstance(replica, torch.nn.Module)


def single_thread_tokens(replica: Any, settings: Settings) -> int:
    """Padded tokens up to which a CPU torch forward pass runs on one intra-op thread.

    On a CPU, a batch too small to split gains nothing from OpenMP's second thread and pays for it
    twice: the fork/join, and the worker's spin-wait afterwards, which takes the core the event loop
    and the tokenizer need (the zero-cost model at one connection burned 13-14 ms of CPU per request
    on 2 cores, 5.7 ms on one thread). The threshold scales with the model's size: below about
    SINGLE_THREAD_WORK token x non-embedding-parameter products. For all-MiniLM-L6-v2 that is 1
    token, i.e. never: one-text requests measured in-process against the raw forward pass on the
    same machine (4 interleaved rounds) took +2.1 ms with 2 threads always, +3.1 ms with one thread
    up to 18 tokens (the previous threshold) and +4.7 ms with one thread always.
    """
    # Replicas that are not a torch module (ONNX with its own threads, wrappers) keep their threads.
    if not _torch_on_cpu(replica, settings):
        return 0
    import torch

    embedding = sum(p.numel() for m in replica.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    total = sum(p.numel() for p in replica.parameters())
    return int(SINGLE_THREAD_WORK / max(total - embedding, 1))


def _scheduler(replica: Any, spec: ModelSpec, settings: Settings, pairs: bool) -> ModelScheduler:
    tokens = spec.max_batch_tokens or DEFAULT_BATCH_TOKENS["gpu" if _on_gpu(settings) else "cpu"]
    probe = [(t, t) for t in _PROBE_TEXTS] if pairs else _PROBE_TEXTS
    return ModelScheduler(replica, name=spec.served_name, max_batch_size=spec.batch_size, max_batch_tokens=tokens,
                          probe=probe, single_thread_tokens=single_thread_tokens(replica, settings),
                          cpu_threads=process_torch_threads() if _torch_on_cpu(replica, settings) else 0)


def import_infinity() -> None:
    """Import infinity_emb without letting it take over the root logger.

    On import it replaces the root handlers with a rich console handler at INFO; every access-log
    line then went through rich, measured at 43 % of the request thread's time at 32 clients
    (79 → 96 texts/s once restored). Its own loggers keep working through the restored handlers.
    """
    if "infinity_emb" in sys.modules:
        return
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    import infinity_emb  # noqa: F401

    root.handlers[:] = handlers
    root.setLevel(level)


def _load_multi(spec: ModelSpec, settings: Settings, kind: str, args: Any, started: float) -> LoadedModel:
    """SPLADE, ColBERT, BGE-M3 or token vectors: one MultiEncoder replica, every output from one pass."""
    from runners.sparse import DENSE, SPARSE, TOKENS, MultiEncoder

    replica = MultiEncoder(engine_args=args, kind=kind)
    _leave_normalization_to_the_service(replica)
    capabilities = {SPARSE_EMBED} if SPARSE in replica.outputs else set()
    if TOKENS in replica.outputs:
        capabilities.add(TOKEN_EMBED)
    rerank_via = None
    if DENSE in replica.outputs:
        # A plain text gets the bare dense vector, as from any embedding replica: embed and the
        # cosine rerank work on these models unchanged.
        capabilities |= {EMBED, RERANK}
        rerank_via = "embedding-cosine"
    elif replica.colbert is not None:
        capabilities.add(RERANK)  # late interaction: runners.inference.InferenceService._maxsim_scores
        rerank_via = "colbert-maxsim"
    return LoadedModel(
        spec=spec,
        scheduler=_scheduler(replica, spec, settings, pairs=False),
        capabilities=frozenset(capabilities),
        rerank_via=rerank_via,
        tokenizer=copy.deepcopy(replica.tokenizer),
        max_tokens=replica.max_length,
        dimensions=replica.dimensions,
        prompts=dict(replica.prompts),
        outputs=replica.outputs,
        token_dimensions=replica.token_dimensions,
        tokens_normalized=replica.tokens_normalized,
        query_aware=replica.colbert is not None,
        load_seconds=time.perf_counter() - started,
    )


def load_model(spec: ModelSpec, settings: Settings) -> LoadedModel:
    """Load one model and its scheduler (blocking: run it in a thread)."""
    import_infinity()
    from infinity_emb import AsyncEmbeddingEngine

    started = time.perf_counter()
    config = read_config(spec)
    kind = resolve_kind(spec, config)
    args = _engine_args(spec, settings)
    if kind == "qwen3-reranker":
        from runners.qwen3 import Qwen3Reranker

        replica = Qwen3Reranker(engine_args=args)
        return LoadedModel(
            spec=spec,
            scheduler=_scheduler(replica, spec, settings, pairs=True),
            capabilities=frozenset({RERANK}),
            rerank_via="qwen3-yes-no",
            tokenizer=copy.deepcopy(replica.tokenizer),
            max_tokens=replica.max_length,
            load_seconds=time.perf_counter() - started,
        )
    if kind == CLASSIFY:
        from runners.classifier import LogitClassifier

        replica = LogitClassifier(engine_args=args)
        model_config = replica.model_config
        labels = [model_config.id2label[i] for i in sorted(model_config.id2label)]
        return LoadedModel(
            spec=spec,
            scheduler=_scheduler(replica, spec, settings, pairs=False),
            capabilities=frozenset({CLASSIFY}),
            rerank_via=None,
            tokenizer=copy.deepcopy(replica.tokenizer),
            max_tokens=replica.max_length,
            labels=labels,
            multi_label=model_config.problem_type == "multi_label_classification",
            load_seconds=time.perf_counter() - started,
        )
    if spec.backend == "optimum" and kind != EMBED:
        raise ValueError(
            f"BACKEND=optimum serves embedding models; {spec.served_name} is a {kind} model: "
            "give it BACKEND=torch (BACKEND takes one value per model, e.g. 'optimum;torch')"
        )
    if kind in MULTI_KINDS:
        return _load_multi(spec, settings, kind, args, started)
    if kind == EMBED and spec.backend == "optimum":
        from runners.onnx import OnnxEmbedder

        replica = OnnxEmbedder(
            engine_args=args,
            quantization=onnx_quantization(settings),
            cache_dir=settings.onnx_cache_dir,
            threads=settings.onnx_threads or onnx_default_threads(),
        )
    else:
        # Infinity's own model selection builds the replica; its batch handler is never started.
        replica = AsyncEmbeddingEngine.from_args(args)._model_replicas[0]
    if kind == RERANK:
        tokenizer = getattr(replica, "tokenizer", None)
        max_len = getattr(replica, "max_length", None) or getattr(tokenizer, "model_max_length", 512)
        return LoadedModel(
            spec=spec,
            scheduler=_scheduler(replica, spec, settings, pairs=True),
            capabilities=frozenset({RERANK}),
            rerank_via="cross-encoder",
            tokenizer=copy.deepcopy(tokenizer),
            max_tokens=int(min(max_len, 1 << 20)),
            load_seconds=time.perf_counter() - started,
        )
    # Embedding model: the service normalizes (or not) per request, so the replica must not.
    _leave_normalization_to_the_service(replica)
    tokenizer = getattr(replica, "_infinity_tokenizer", None) or getattr(replica, "tokenizer", None)
    dims = replica.get_sentence_embedding_dimension() if hasattr(replica, "get_sentence_embedding_dimension") else None
    max_tokens = getattr(replica, "max_seq_length", None) or getattr(tokenizer, "model_max_length", 512)
    return LoadedModel(
        spec=spec,
        scheduler=_scheduler(replica, spec, settings, pairs=False),
        capabilities=frozenset({EMBED, RERANK}),
        rerank_via="embedding-cosine",
        tokenizer=copy.deepcopy(tokenizer),
        max_tokens=int(min(max_tokens, 1 << 20)),
        dimensions=dims,
        prompts=dict(getattr(replica, "prompts", None) or {}),
        load_seconds=time.perf_counter() - started,
    )


def _leave_normalization_to_the_service(replica: Any) -> None:
    """The service normalizes per request (`normalize`, TEI's too); a model that normalizes inside its
    forward pass (sentence-transformers' Normalize module, Infinity's flag, our ONNX and multi-output
    replicas) would make `normalize: false` a silent no-op."""
    if hasattr(replica, "normalize_embeddings"):
        replica.normalize_embeddings = False
    for flag in ("normalize", "normalize_dense"):  # runners.onnx.OnnxEmbedder, runners.sparse.MultiEncoder
        if isinstance(getattr(replica, flag, None), bool):
            setattr(replica, flag, False)
    modules = list(replica) if hasattr(replica, "__getitem__") and hasattr(replica, "__len__") else []
    if modules and type(modules[-1]).__name__ == "Normalize":
        del replica[len(modules) - 1]


_RERANK_PREFERENCE = {"colbert-maxsim": 1, "embedding-cosine": 2}


class EngineRegistry:
    """Every served model, found by name or by capability, with bounded queues."""

    def __init__(self, settings: Settings, on_fatal: Callable[[str], Any] | None = None) -> None:
        self.settings = settings
        self.models: list[LoadedModel] = []
        self.ready = False
        self.on_fatal = on_fatal  # called once a model cannot be brought back: the process should exit
        self._start_lock = asyncio.Lock()
        self._watchdog: asyncio.Task | None = None

    async def start(self, warmup: Callable[[LoadedModel], Awaitable[Any]] | None = None) -> None:
        """Load, start and warm every model; ready only after the last one answered."""
        async with self._start_lock:
            if self.ready:
                return
            total = time.perf_counter()
            for i, spec in enumerate(self.settings.models, 1):
                log.info("loading model %d/%d: %s (%s)", i, len(self.settings.models), spec.served_name, spec.name_or_path)
                try:
                    loaded = await asyncio.to_thread(load_model, spec, self.settings)
                except Exception as exc:
                    await self.stop()
                    raise RuntimeError(f"model {spec.name_or_path!r} failed to load: {type(exc).__name__}: {exc}") from exc
                loaded.scheduler.start()
                self.models.append(loaded)
                if warmup is not None and self.settings.model_warmup:
                    await warmup(loaded)
                log.info(
                    "model %s ready in %.1fs: %s", spec.served_name, time.perf_counter() - total,
                    ", ".join(sorted(loaded.capabilities)),
                )
            self.ready = True
            self._watchdog = asyncio.create_task(self._watch(), name="embed-rerank-watchdog")
            log.info("all %d model(s) ready in %.1fs", len(self.models), time.perf_counter() - total)

    async def stop(self) -> None:
        self.ready = False
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for model in self.models:
            try:
                await asyncio.to_thread(model.scheduler.stop)
            except Exception:  # noqa: BLE001 - one model failing to stop must not keep the others running
                log.exception("stopping model %s failed", model.name)
        self.models = []

    @property
    def serving(self) -> bool:
        """Every model loaded and none out of service."""
        return self.ready and HEALTH.reason is None

    async def _watch(self) -> None:
        """Restart a scheduler loop that died; give a model up when it keeps dying or stalls."""
        stall = self.settings.stall_timeout_s
        while True:
            await asyncio.sleep(min(1.0, stall / 4))
            for model in self.models:
                scheduler = model.scheduler
                if scheduler.dead_reason is not None:
                    continue
                roles = scheduler.dead_loops()
                if roles:
                    if scheduler.restart(roles):
                        log.warning("model %s: restarted its %s loop", model.name, " and ".join(roles))
                        continue
                    self._give_up(model, f"its batch loop died more than {scheduler.restarts_allowed} times "
                                         f"within {scheduler.restart_window_s:.0f}s")
                elif (stalled := scheduler.stalled_for()) > stall:
                    self._give_up(model, f"a batch made no progress for {stalled:.0f}s (MODEL_STALL_TIMEOUT={stall:g})")

    def _give_up(self, model: LoadedModel, why: str) -> None:
        reason = f"model {model.name!r} is out of service: {why}"
        log.error("%s; health answers 503 and the process exits", reason)
        HEALTH.fail(reason)
        model.scheduler.kill(why)
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
        capable.sort(key=lambda m: _RERANK_PREFERENCE.get(m.rerank_via, 0) if capability == RERANK else 0)
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
        """The model's results for `inputs` and the tokens it read; refused at once when its queue is full."""
        items = len(inputs)
        limit = self.settings.queue_size
        if model.in_flight + items > limit:
            raise Overloaded(
                f"model {model.name!r} has {model.in_flight} items queued (INFINITY_QUEUE_SIZE={limit}): "
                f"retry after a short wait",
                headers={"Retry-After": "1"},
            )
        model.in_flight += items
        started = time.perf_counter()
        try:
            if _HAS_TIMEOUT:  # no extra task per request, as wait_for makes on 3.11
                async with asyncio.timeout(self.settings.request_timeout_s):
                    return await model.scheduler.run(inputs)
            return await asyncio.wait_for(model.scheduler.run(inputs), timeout=self.settings.request_timeout_s)
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
            elapsed = time.perf_counter() - started
            model.stats.inference_seconds += elapsed
            metrics.of(model.name, capability).inference_seconds.observe(elapsed)
