"""Hugging Face Text Embeddings Inference's API under `/tei`, so TEI's clients (huggingface_hub's
`InferenceClient`, LlamaIndex's and LangChain's and Haystack's TEI embedders) work by setting their
base URL to `<server>/tei`.

Each handler takes TEI's validated body (runners.api.tei_schemas), which converts itself into the
one internal query of its capability, and calls the same service methods as every other route;
answers and errors take TEI's shapes (bare lists; `{"error", "error_type"}` with TEI's statuses,
`ServiceError.tei`). TEI serves one model; here a request may name one in an extra `model` field,
else the first served model that can do the task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.responses import PlainTextResponse, Response

from runners import metrics, workers
from runners.api.context import inference
from runners.api.responses import with_truncation
from runners.api.tei_schemas import (
    TeiDecodeRequest,
    TeiEmbedRequest,
    TeiPredictRequest,
    TeiRerankRequest,
    TeiSimilarityRequest,
    TeiTokenizeRequest,
)
from runners.capabilities.queries import ClassifyQuery, EmbedQuery
from runners.engine.health import HEALTH
from runners.errors import BadRequest, ServiceError, Unavailable, from_validation_errors
from runners.models.checkpoint import pooling_config
from runners.vocabulary import CLASSIFY, EMBED, LOGIT_SCORE, QWEN3_YES_NO, RERANK, SPARSE, SPARSE_EMBED, TOKENS

if TYPE_CHECKING:  # BentoML's serving process imports the routes too, and never serves a model
    from runners.capabilities.service import InferenceService
    from runners.engine.loaded import LoadedModel

TEI_VERSION = "1.8.0"  # the TEI API version whose shapes these routes follow


async def embed(body: TeiEmbedRequest) -> Any:
    result = await inference().embed(body.to_query())
    return with_truncation([row["embedding"] for row in result["data"]], result["usage"].get("truncated", 0))


async def rerank(body: TeiRerankRequest) -> list[dict[str, Any]]:
    """TEI's rerank answer: `[{index, score, text?}]`, best first."""
    if not body.texts:
        raise BadRequest("`texts` cannot be empty", param="texts", code="empty_input")
    ranked = await inference().rerank(body.to_query())
    rows = []
    for r in ranked["results"]:
        row: dict[str, Any] = {"index": r["index"], "score": r["relevance_score"]}
        if body.return_text:
            row["text"] = body.texts[r["index"]]
        rows.append(row)
    return rows


async def predict(body: TeiPredictRequest) -> list[Any]:
    """TEI's input forms: a string, one sequence as [text] or [text, pair], or a batch [[text], ...]."""
    data = body.inputs
    pairs = BadRequest("text pairs are scored by a reranker here: send them to /tei/rerank as query and texts",
                       param="inputs", code="pairs_not_supported")
    single = isinstance(data, str) or isinstance(data[0] if data else None, str)
    if isinstance(data, str):
        texts = [data]
    elif single:
        if len(data) == 2:
            raise pairs
        if len(data) != 1:
            raise BadRequest(f"'inputs' is a list of {len(data)} strings; TEI reads a list of strings as one sequence "
                             "(a text or a pair): send a batch as [[text], [text], ...]", param="inputs")
        texts = list(data)  # type: ignore[arg-type]
    else:
        if any(len(item) != 1 for item in data):  # type: ignore[arg-type]
            raise pairs
        texts = [item[0] for item in data]  # type: ignore[index]
    result = await inference().classify(ClassifyQuery(texts=texts, model=body.model, raw_scores=body.raw_scores))
    rows = result["data"]
    return rows[0] if single else rows


async def similarity(body: TeiSimilarityRequest) -> list[float]:
    params = body.parameters
    texts = [body.inputs.source_sentence, *body.inputs.sentences]
    query = EmbedQuery(
        texts=texts, token_ids=None, model=body.model,
        truncate=params is None or params.truncate is not False,
        truncate_left=params is not None and params.truncation_direction.lower() == "left",
        prompt_name=params.prompt_name if params else None,
    )
    _, vectors, _ = await inference().embed_matrix(query)
    return (vectors[1:] @ vectors[0]).astype("float64").tolist()


async def embed_all(body: TeiEmbedRequest) -> list[Any]:
    import numpy as np  # not at import: BentoML's serving process imports the routes too

    _, rows, _ = await inference().multi_outputs(replace(body.to_query(), outputs=(TOKENS,)))
    return [np.asarray(r[TOKENS], dtype=np.float32).tolist() for r in rows]


async def embed_sparse(body: TeiEmbedRequest) -> list[Any]:
    _, rows, _ = await inference().multi_outputs(replace(body.to_query(), outputs=(SPARSE,)))
    return [[{"index": i, "value": v} for i, v in zip(r[SPARSE]["indices"], r[SPARSE]["values"])] for r in rows]


async def tokenize(body: TeiTokenizeRequest) -> list[list[dict[str, Any]]]:
    texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
    return await inference().token_details(texts, body.model, body.add_special_tokens, body.prompt_name)


async def decode(body: TeiDecodeRequest) -> list[str]:
    ids = body.ids
    rows = [list(ids)] if not ids or isinstance(ids[0], int) else [list(r) for r in ids]  # type: ignore[arg-type]
    return await inference().decode(rows, body.model, body.skip_special_tokens)


async def info(query: Mapping[str, str]) -> dict[str, Any]:
    service = inference()
    return tei_info(service.any_model(query.get("model")), service)


async def health(query: Mapping[str, str]) -> dict[str, str]:
    reason = HEALTH.current()
    if reason is not None or not _ready():
        raise Unavailable(reason or "the models are still loading")
    return {"status": "ok"}  # TEI answers an empty 200; clients read only the status


async def prometheus(query: Mapping[str, str]) -> Response:
    """TEI's Prometheus scrape route: this service's metrics (runners.metrics); `/metrics` has
    BentoML's request metrics too."""
    return PlainTextResponse(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _validated(schema: type[BaseModel], data: Any) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise from_validation_errors(list(exc.errors())) from None


async def root(data: Any) -> Any:
    """TEI's root route answers as its one model's kind does; here the body's shape and the served
    models decide: `query` + `texts` → rerank, `inputs` as {source_sentence, sentences} → similarity,
    else embed (or sparse, predict when no model embeds but one gives sparse vectors or classifies)."""
    if not isinstance(data, dict):
        raise BadRequest("send one JSON object", code="invalid_json")
    if "query" in data and "texts" in data:
        return await rerank(_validated(TeiRerankRequest, data))
    if isinstance(data.get("inputs"), dict):
        return await similarity(_validated(TeiSimilarityRequest, data))
    capabilities = {c for m in inference().registry.models for c in m.capabilities}
    if EMBED not in capabilities and SPARSE_EMBED in capabilities:
        return await embed_sparse(_validated(TeiEmbedRequest, _flatten_parameters(data)))
    if EMBED not in capabilities and CLASSIFY in capabilities:
        return await predict(_validated(TeiPredictRequest, data))
    if EMBED not in capabilities and RERANK in capabilities:
        raise BadRequest("this server reranks: send {query, texts}", code="missing_query")
    return await embed(_validated(TeiEmbedRequest, _flatten_parameters(data)))


def _flatten_parameters(data: dict[str, Any]) -> dict[str, Any]:
    """The Inference API's `{"inputs", "parameters": {...}}` form: TEI's fields may come nested."""
    params = data.get("parameters")
    if isinstance(params, dict):
        return {**params, **{k: v for k, v in data.items() if k != "parameters"}}
    return data


def _ready() -> bool:
    try:
        return inference().ready and workers.all_ready()  # every worker of the server (runners/workers.py)
    except ServiceError:
        return False


def _pooling(model: LoadedModel) -> str:
    """TEI's `pooling` name for /info, from the sentence-transformers folder when there is one."""
    if model.rerank_via in (QWEN3_YES_NO, LOGIT_SCORE) or model.prompts.get("query", "").startswith("Instruct:"):
        return "last_token"
    folder = model.spec.name_or_path
    if not Path(folder).is_dir():  # a hub id: no download on a request's path
        return "mean"
    config = pooling_config(folder) or {}
    for key, name in (("pooling_mode_cls_token", "cls"), ("pooling_mode_lasttoken", "last_token"),
                      ("pooling_mode_mean_tokens", "mean")):
        if config.get(key):
            return name
    return "mean"


def tei_info(model: LoadedModel, service: InferenceService) -> dict[str, Any]:
    """TEI's `/info` for one model."""
    if EMBED in model.capabilities or SPARSE_EMBED in model.capabilities:
        pooling = "splade" if EMBED not in model.capabilities else _pooling(model)
        model_type: dict[str, Any] = {"embedding": {"pooling": pooling}}
    else:
        labels = model.labels or ["LABEL_0"]
        kind = "classifier" if CLASSIFY in model.capabilities else "reranker"
        model_type = {kind: {"id2label": {str(i): lab for i, lab in enumerate(labels)},
                             "label2id": {lab: i for i, lab in enumerate(labels)}}}
    settings = service.settings
    return {
        "model_id": model.spec.name_or_path,
        "model_sha": None,
        "model_dtype": model.spec.dtype,
        "served_model_name": model.name,
        "model_type": model_type,
        "max_concurrent_requests": settings.max_concurrency,
        "max_input_length": model.max_tokens,
        "max_batch_tokens": model.scheduler.budget.limit,
        "max_batch_requests": model.spec.batch_size,
        "max_client_batch_size": settings.max_items,
        "auto_truncate": True,
        "tokenization_workers": 1,
        "version": TEI_VERSION,
        "sha": None,
        "docker_label": None,
    }
