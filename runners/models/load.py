"""Loading a model: its kind decides the loader (`LOADERS`, one row per kind), which builds the
replica and says what it can do (a `ModelCard`). Blocking: the engine runs it in a thread.

Replicas are Infinity's own (embedding models and cross-encoders: the class its model selection would
choose, imported alone, `runners.models.imports`) or this project's (Qwen3 rerankers, logit
classifiers, ONNX, multi-output models, CLIP-like models with a replica per tower); Infinity's batch
handler is never started: runners.engine.scheduler batches every replica. Each card carries its load
phases (imports, weights read, moved to device) for the start-up log.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from typing import Any

from runners.models.card import ModelCard
from runners.models.checkpoint import read_config
from runners.models.detect import resolve_kind
from runners.models.imports import import_model_stack, infinity_replica_class
from runners.models.phases import timing_device_moves
from runners.models.remote_code import check_model
from runners.models.st_format import check_modules, st_config
from runners.settings import ModelSpec, Settings
from runners.vocabulary import (
    CLASSIFY,
    CLASSIFY_KIND,
    CLIP_KIND,
    COLBERT_MAXSIM,
    CROSS_ENCODER,
    DENSE,
    EMBED,
    EMBED_KIND,
    EMBEDDING_COSINE,
    IMAGE_EMBED,
    LLM_RERANKER_KIND,
    LOGIT_SCORE,
    MULTI_OUTPUT_KINDS,
    QWEN3_RERANKER_KIND,
    QWEN3_YES_NO,
    RERANK,
    RERANK_KIND,
    ROUTED_KIND,
    SPARSE,
    SPARSE_EMBED,
    STATIC_KIND,
    TOKEN_EMBED,
    TOKENS,
)


def engine_args(spec: ModelSpec, settings: Settings) -> Any:
    from infinity_emb.args import EngineArgs

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
    """All cores of this worker's share (cores // workers, runners.workers). Measured on 2 cores over
    HTTP (all-MiniLM-L6-v2 int8 with signed weights, wrk, 2 rounds), 1 thread / 2 threads: mixed
    lengths at 16 connections 91-101 / 130 texts/s, one sentence at 32 connections 358-404 / 396-510
    req/s, one connection p50 6.0-6.2 / 3.8-4.4 ms. (With unsigned weights and the old U8U8 kernels
    one thread had won at 32 connections, 156-163 against 144.)"""
    from runners.workers import workers_now

    return max(1, (os.cpu_count() or 2) // workers_now())


def leave_normalization_to_the_service(replica: Any) -> None:
    """The service normalizes per request (`normalize`, TEI's too); a model that normalizes inside its
    forward pass (sentence-transformers' Normalize module, Infinity's flag, our ONNX and multi-output
    replicas) would make `normalize: false` a silent no-op."""
    if hasattr(replica, "normalize_embeddings"):
        replica.normalize_embeddings = False
    for flag in ("normalize", "normalize_dense"):  # OnnxEmbedder, MultiEncoder
        if isinstance(getattr(replica, flag, None), bool):
            setattr(replica, flag, False)
    modules = list(replica) if hasattr(replica, "__getitem__") and hasattr(replica, "__len__") else []
    if modules and type(modules[-1]).__name__ == "Normalize":
        del replica[len(modules) - 1]


def _infinity_replica(spec: ModelSpec, args: Any, role: str) -> Any:
    """Infinity's own replica for the role, as its model selection builds it (one replica, on the first
    device of its loading strategy); its batch handler is never started."""
    # What infinity's select_model reads in config.json besides the role this project detected.
    config = read_config(spec)
    if role == "embed" and config.get("vision_config"):
        role = "image"
    elif role == "embed" and config.get("audio_config") and "clap" in str(config.get("model_type", "")).lower():
        role = "audio"
    replica_class = infinity_replica_class(role, args.engine.value)
    replica_args = args.copy()
    replica_args._loading_strategy.device_placement = args._loading_strategy.device_mapping[0]
    return replica_class(engine_args=replica_args)


def _qwen3_reranker(spec: ModelSpec, settings: Settings, args: Any, kind: str) -> ModelCard:
    from runners.models.qwen3 import Qwen3Reranker

    replica = Qwen3Reranker(engine_args=args)
    return ModelCard(spec=spec, replica=replica, pairs=True, capabilities=frozenset({RERANK}), rerank_via=QWEN3_YES_NO,
                     tokenizer=copy.deepcopy(replica.tokenizer), max_tokens=replica.max_length)


def _llm_reranker(spec: ModelSpec, settings: Settings, args: Any, kind: str) -> ModelCard:
    """sentence-transformers' LLM reranker: the folder's template, tokens and activation (runners.models.llm_reranker)."""
    from runners.models.llm_reranker import LogitScoreReranker

    replica = LogitScoreReranker(engine_args=args)
    return ModelCard(spec=spec, replica=replica, pairs=True, capabilities=frozenset({RERANK}), rerank_via=LOGIT_SCORE,
                     rerank_activation=replica.folder.activation, tokenizer=copy.deepcopy(replica.tokenizer),
                     max_tokens=replica.max_length, prompts=dict(replica.folder.prompts),
                     default_prompt_name=replica.folder.default_prompt_name)


def _classifier(spec: ModelSpec, settings: Settings, args: Any, kind: str) -> ModelCard:
    from runners.models.classifier import LogitClassifier

    replica = LogitClassifier(engine_args=args)
    model_config = replica.model_config
    return ModelCard(
        spec=spec, replica=replica, capabilities=frozenset({CLASSIFY}), tokenizer=copy.deepcopy(replica.tokenizer),
        max_tokens=replica.max_length, labels=[model_config.id2label[i] for i in sorted(model_config.id2label)],
        multi_label=model_config.problem_type == "multi_label_classification",
    )


def _cross_encoder(spec: ModelSpec, settings: Settings, args: Any, kind: str) -> ModelCard:
    replica = _infinity_replica(spec, args, "rerank")
    tokenizer = getattr(replica, "tokenizer", None)
    max_len = getattr(replica, "max_length", None) or getattr(tokenizer, "model_max_length", 512)
    return ModelCard(spec=spec, replica=replica, pairs=True, capabilities=frozenset({RERANK}), rerank_via=CROSS_ENCODER,
                     tokenizer=copy.deepcopy(tokenizer), max_tokens=int(min(max_len, 1 << 20)))


def _embedder(spec: ModelSpec, settings: Settings, args: Any, kind: str) -> ModelCard:
    if spec.backend == "optimum":
        from runners.models.onnx import OnnxEmbedder

        replica = OnnxEmbedder(engine_args=args, quantization=onnx_quantization(settings),
                               cache_dir=settings.onnx_cache_dir, threads=settings.onnx_threads or onnx_default_threads())
    else:
        replica = _infinity_replica(spec, args, "embed")
    # The service normalizes (or not) per request, so the replica must not.
    leave_normalization_to_the_service(replica)
    from runners.models.token_inputs import token_pooling, with_token_inputs

    config = st_config(spec.name_or_path)
    if config.truncate_dim:
        truncate_outputs(replica, config.truncate_dim)
    # Chunking and late chunking pool token vectors of the full width: not offered with truncate_dim.
    token_inputs = not config.truncate_dim and with_token_inputs(replica)
    tokenizer = getattr(replica, "_infinity_tokenizer", None) or getattr(replica, "tokenizer", None)
    dims = embedding_dimension(replica)
    if config.truncate_dim and dims:
        dims = min(dims, config.truncate_dim)
    max_tokens = getattr(replica, "max_seq_length", None) or getattr(tokenizer, "model_max_length", 512)
    return ModelCard(
        spec=spec, replica=replica, capabilities=frozenset({EMBED, RERANK}), rerank_via=EMBEDDING_COSINE,
        tokenizer=copy.deepcopy(tokenizer), max_tokens=int(min(max_tokens, 1 << 20)), dimensions=dims,
        prompts={**config.prompts, **dict(getattr(replica, "prompts", None) or {})}, token_inputs=token_inputs,
        pooling=token_pooling(replica) if token_inputs else None, default_prompt_name=config.default_prompt_name,
        similarity_fn_name=config.similarity_fn_name,
    )


def truncate_outputs(replica: Any, dims: int) -> None:
    """`truncate_dim` of config_sentence_transformers.json: sentence-transformers' `encode` keeps the
    first `dims` values (Matryoshka), after the model's modules; the service normalizes after that."""
    post = replica.encode_post

    def encode_post(out: Any) -> Any:
        vectors = post(out)
        return vectors[:, :dims] if getattr(vectors, "ndim", 0) == 2 else [v[:dims] for v in vectors]

    replica.encode_post = encode_post


def _static(spec: ModelSpec, settings: Settings, args: Any, kind: str) -> ModelCard:
    """A StaticEmbedding model: a lookup table, served inline by the scheduler (runners.models.static)."""
    from runners.models.static import StaticEmbedder

    config = st_config(spec.name_or_path)
    replica = StaticEmbedder(engine_args=args, truncate_dim=config.truncate_dim)
    return ModelCard(
        spec=spec, replica=replica, capabilities=frozenset({EMBED, RERANK}), rerank_via=EMBEDDING_COSINE,
        tokenizer=copy.deepcopy(replica.tokenizer), max_tokens=replica.max_seq_length,
        dimensions=replica.get_embedding_dimension(), prompts=dict(config.prompts),
        default_prompt_name=config.default_prompt_name, similarity_fn_name=config.similarity_fn_name,
    )


def _routed(spec: ModelSpec, settings: Settings, args: Any, kind: str) -> ModelCard:
    """A Router model: each task's route, the library's modules (runners.models.routed)."""
    from runners.models.routed import RoutedEncoder

    config = st_config(spec.name_or_path)
    replica = RoutedEncoder(engine_args=args)
    if replica.sparse:
        capabilities, rerank_via, outputs = frozenset({SPARSE_EMBED}), None, (SPARSE,)
    else:
        capabilities, rerank_via, outputs = frozenset({EMBED, RERANK}), EMBEDDING_COSINE, ()
    return ModelCard(
        spec=spec, replica=replica, capabilities=capabilities, rerank_via=rerank_via, outputs=outputs,
        tokenizer=copy.deepcopy(replica.tokenizer), max_tokens=replica.max_seq_length,
        dimensions=None if replica.sparse else replica.get_embedding_dimension(), prompts=dict(config.prompts),
        default_prompt_name=config.default_prompt_name, similarity_fn_name=config.similarity_fn_name,
        route_tasks=tuple(t for t in replica.tasks if t is not None),
    )


def embedding_dimension(replica: Any) -> int | None:
    """The replica's output width (sentence-transformers 5+ renamed the method; ours keep the old name)."""
    for method in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
        if hasattr(replica, method):
            return getattr(replica, method)()
    return None


def _multi_output(spec: ModelSpec, settings: Settings, args: Any, kind: str) -> ModelCard:
    """SPLADE, ColBERT, BGE-M3 or token vectors: one MultiEncoder replica, every output from one pass."""
    from runners.models.multi_output import MultiEncoder

    replica = MultiEncoder(engine_args=args, kind=kind)
    leave_normalization_to_the_service(replica)
    capabilities = {SPARSE_EMBED} if SPARSE in replica.outputs else set()
    if TOKENS in replica.outputs:
        capabilities.add(TOKEN_EMBED)
    rerank_via = None
    if DENSE in replica.outputs:
        # A plain text gets the bare dense vector, as from any embedding replica: embed and the
        # cosine rerank work on these models unchanged.
        capabilities |= {EMBED, RERANK}
        rerank_via = EMBEDDING_COSINE
    elif replica.colbert is not None:
        capabilities.add(RERANK)  # late interaction: runners.capabilities.rerank
        rerank_via = COLBERT_MAXSIM
    return ModelCard(
        spec=spec, replica=replica, capabilities=frozenset(capabilities), rerank_via=rerank_via,
        tokenizer=copy.deepcopy(replica.tokenizer), max_tokens=replica.max_length, dimensions=replica.dimensions,
        prompts=dict(replica.prompts), outputs=replica.outputs, token_dimensions=replica.token_dimensions,
        tokens_normalized=replica.tokens_normalized, query_aware=replica.colbert is not None,
    )


def _dual_encoder(spec: ModelSpec, settings: Settings, args: Any, kind: str) -> ModelCard:
    """CLIP, SigLIP, SigLIP2: texts and images into one space, one replica per tower (runners.models.image)."""
    from runners.models.image import DualEncoder

    encoder = DualEncoder(engine_args=args)
    return ModelCard(
        spec=spec, replica=encoder.text, capabilities=frozenset({EMBED, IMAGE_EMBED}),
        tokenizer=copy.deepcopy(encoder.tokenizer), max_tokens=encoder.max_length, dimensions=encoder.dimensions,
        images=encoder.images, image_tokens=encoder.image_tokens,
    )


Loader = Callable[[ModelSpec, Settings, Any, str], ModelCard]
LOADERS: dict[str, Loader] = {
    QWEN3_RERANKER_KIND: _qwen3_reranker,
    LLM_RERANKER_KIND: _llm_reranker,
    CLASSIFY_KIND: _classifier,
    RERANK_KIND: _cross_encoder,
    EMBED_KIND: _embedder,
    **dict.fromkeys(MULTI_OUTPUT_KINDS, _multi_output),
    CLIP_KIND: _dual_encoder,
    STATIC_KIND: _static,
    ROUTED_KIND: _routed,
}
# Kinds that BACKEND=optimum cannot serve (Qwen3 and LLM rerankers and classifiers load with torch whatever it says).
_TORCH_ONLY = (RERANK_KIND, *MULTI_OUTPUT_KINDS, CLIP_KIND, STATIC_KIND, ROUTED_KIND)


def load_card(spec: ModelSpec, settings: Settings) -> ModelCard:
    """Load one model's replica and describe it (blocking: run it in a thread); its phases on the card."""
    waited = time.perf_counter()
    import_model_stack()  # once per process; a second model waits here for the first one's imports
    imports_s = time.perf_counter() - waited
    config = read_config(spec)
    check_model(spec, settings)  # before transformers could run any of the checkpoint's code
    check_modules(spec.name_or_path, settings.trust_remote_code)
    kind = resolve_kind(spec, config)
    if spec.backend == "optimum" and kind in _TORCH_ONLY:
        raise ValueError(
            f"BACKEND=optimum serves embedding models; {spec.served_name} is a {kind} model: "
            "give it BACKEND=torch (BACKEND takes one value per model, e.g. 'optimum;torch')"
        )
    with timing_device_moves() as phases:
        card = LOADERS[kind](spec, settings, engine_args(spec, settings), kind)
    phases.imports_s = imports_s
    card.kind = kind
    card.phases = phases
    card.load_seconds = phases.weights_read_s + phases.to_device_s
    return card
