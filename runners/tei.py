"""Hugging Face Text Embeddings Inference's API under `/tei`, so TEI's clients (huggingface_hub's
`InferenceClient`, LlamaIndex's and LangChain's and Haystack's TEI embedders) work by setting their
base URL to `<server>/tei`.

Each route translates TEI's body into the one internal query of its capability and calls the same
service methods as every other route; answers and errors take TEI's shapes (bare lists;
`{"error", "error_type"}` with TEI's statuses, `ServiceError.tei`). TEI serves one model; here a
request may name one in an extra `model` field, else the first served model that can do the task.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from runners.engines import CLASSIFY, EMBED, RERANK, SPARSE_EMBED, LoadedModel
from runners.errors import BadRequest, ServiceError, Unavailable, from_validation_errors
from runners.http import TEI_PREFIX, FastRoute, JSONBody, answer, error_response
from runners.inference import SPARSE, TOKENS, InferenceService
from runners.schemas import (
    ClassifyQuery,
    EmbedQuery,
    TeiDecodeRequest,
    TeiEmbedRequest,
    TeiPredictRequest,
    TeiRerankRequest,
    TeiSimilarityRequest,
    TeiTokenizeRequest,
    tei_to_embed_query,
    tei_to_rerank_query,
)
from runners.sparse import pooling_config

TEI_VERSION = "1.8.0"  # the TEI API version whose shapes these routes follow


def tei_error(exc: ServiceError) -> JSONResponse:
    return error_response(exc, tei=True)


async def tei_answer(call: Callable[[], Awaitable[Any]]) -> Response:
    return await answer(call, tei=True)


def _pooling(model: LoadedModel) -> str:
    """TEI's `pooling` name for /info, from the sentence-transformers folder when there is one."""
    if model.rerank_via == "qwen3-yes-no" or model.prompts.get("query", "").startswith("Instruct:"):
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


def build_tei_app(inference: Callable[[], InferenceService]) -> FastAPI:
    """The FastAPI app that service.py mounts at `/tei`; `inference` gives this worker's service methods."""
    app = FastAPI(title="Text Embeddings Inference compatible routes", openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def _schema(_: Request, exc: RequestValidationError) -> JSONResponse:
        return tei_error(from_validation_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = BadRequest(f"{exc.detail}: see the TEI routes in the README (API compatibility)", code=f"http_{exc.status_code}")
        err.status = exc.status_code
        return tei_error(err)

    async def predict_rows(body: TeiPredictRequest) -> list[Any]:
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

    async def similarity_scores(body: TeiSimilarityRequest) -> list[float]:
        params = body.parameters
        texts = [body.inputs.source_sentence, *body.inputs.sentences]
        query = EmbedQuery(
            texts=texts, token_ids=None, model=body.model,
            truncate=params is None or params.truncate is not False,
            truncate_left=params is not None and params.truncation_direction.lower() == "left",
            prompt_name=params.prompt_name if params else None,
        )
        _, vectors, _ = await inference().embed_matrix(query)
        return (vectors[1:] @ vectors[0]).astype(np.float64).tolist()

    @app.post("/embed")
    async def embed(body: TeiEmbedRequest) -> Response:
        return await tei_answer(lambda: embed_rows(inference(), body))

    @app.post("/rerank")
    async def rerank(body: TeiRerankRequest) -> Response:
        return await tei_answer(lambda: rerank_rows(inference(), body))

    @app.post("/predict")
    async def predict(body: TeiPredictRequest) -> Response:
        return await tei_answer(lambda: predict_rows(body))

    @app.post("/similarity")
    async def similarity(body: TeiSimilarityRequest) -> Response:
        return await tei_answer(lambda: similarity_scores(body))

    @app.post("/embed_all")
    async def embed_all(body: TeiEmbedRequest) -> Response:
        async def tokens() -> list[Any]:
            _, rows, _ = await inference().multi_outputs(replace(tei_to_embed_query(body), outputs=(TOKENS,)))
            return [np.asarray(r[TOKENS], dtype=np.float32).tolist() for r in rows]

        return await tei_answer(tokens)

    @app.post("/embed_sparse")
    async def embed_sparse(body: TeiEmbedRequest) -> Response:
        async def sparse() -> list[Any]:
            _, rows, _ = await inference().multi_outputs(replace(tei_to_embed_query(body), outputs=(SPARSE,)))
            return [[{"index": i, "value": v} for i, v in zip(r[SPARSE]["indices"], r[SPARSE]["values"])] for r in rows]

        return await tei_answer(sparse)

    @app.post("/tokenize")
    async def tokenize(body: TeiTokenizeRequest) -> Response:
        texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
        return await tei_answer(lambda: inference().token_details(texts, body.model, body.add_special_tokens,
                                                                  body.prompt_name))

    @app.post("/decode")
    async def decode(body: TeiDecodeRequest) -> Response:
        ids = body.ids
        rows = [list(ids)] if not ids or isinstance(ids[0], int) else [list(r) for r in ids]  # type: ignore[arg-type]
        return await tei_answer(lambda: inference().decode(rows, body.model, body.skip_special_tokens))

    @app.get("/info")
    async def info(model: str | None = None) -> Response:
        async def describe() -> dict[str, Any]:
            service = inference()
            loaded = service.any_model(model)
            return tei_info(loaded, service)

        return await tei_answer(describe)

    @app.get("/health")
    async def health() -> Response:
        from runners.engines import HEALTH

        service_ready = _ready(inference)
        if HEALTH.reason is not None or not service_ready:
            return tei_error(Unavailable(HEALTH.reason or "the models are still loading"))
        return JSONBody({"status": "ok"})  # TEI answers an empty 200; clients read only the status

    @app.post("/")
    async def root(request: Request) -> Response:
        """TEI's root route answers as its one model's kind does; here the body's shape and the
        served models decide: `query` + `texts` → rerank, `inputs` as {source_sentence, sentences} →
        similarity, else embed (or predict when no model embeds but one classifies)."""
        try:
            data = await request.json()
        except ValueError:
            return tei_error(BadRequest("the request body is not valid JSON: send one JSON object", code="invalid_json"))
        if not isinstance(data, dict):
            return tei_error(BadRequest("send one JSON object", code="invalid_json"))
        try:
            if "query" in data and "texts" in data:
                return await rerank(TeiRerankRequest.model_validate(data))
            if isinstance(data.get("inputs"), dict):
                return await similarity(TeiSimilarityRequest.model_validate(data))
            capabilities = _capabilities(inference)
            if EMBED not in capabilities and SPARSE_EMBED in capabilities:
                return await embed_sparse(TeiEmbedRequest.model_validate(_flatten_parameters(data)))
            if EMBED not in capabilities and CLASSIFY in capabilities:
                return await predict(TeiPredictRequest.model_validate(data))
            if EMBED not in capabilities and RERANK in capabilities:
                return tei_error(BadRequest("this server reranks: send {query, texts}", code="missing_query"))
            return await embed(TeiEmbedRequest.model_validate(_flatten_parameters(data)))
        except ValidationError as exc:
            return tei_error(from_validation_errors(list(exc.errors())))

    return app


def tei_fast_routes(inference: Callable[[], InferenceService]) -> dict[str, FastRoute]:
    """The TEI routes that FrontDoor answers itself when their body is valid (runners.http.FastRoute)."""
    return {
        TEI_PREFIX + "/embed": FastRoute(TeiEmbedRequest, lambda body: embed_rows(inference(), body)),
        TEI_PREFIX + "/rerank": FastRoute(TeiRerankRequest, lambda body: rerank_rows(inference(), body)),
    }


async def embed_rows(service: InferenceService, body: TeiEmbedRequest) -> list[list[float]]:
    return [row["embedding"] for row in (await service.embed(tei_to_embed_query(body)))["data"]]


async def rerank_rows(service: InferenceService, body: TeiRerankRequest) -> list[dict[str, Any]]:
    """TEI's rerank answer: `[{index, score, text?}]`, best first."""
    if not body.texts:
        raise BadRequest("`texts` cannot be empty", param="texts", code="empty_input")
    ranked = await service.rerank(tei_to_rerank_query(body))
    rows = []
    for r in ranked["results"]:
        row: dict[str, Any] = {"index": r["index"], "score": r["relevance_score"]}
        if body.return_text:
            row["text"] = body.texts[r["index"]]
        rows.append(row)
    return rows


def _flatten_parameters(data: dict[str, Any]) -> dict[str, Any]:
    """The Inference API's `{"inputs", "parameters": {...}}` form: TEI's fields may come nested."""
    params = data.get("parameters")
    if isinstance(params, dict):
        return {**params, **{k: v for k, v in data.items() if k != "parameters"}}
    return data


def _ready(inference: Callable[[], InferenceService]) -> bool:
    try:
        return inference().ready
    except ServiceError:
        return False


def _capabilities(inference: Callable[[], InferenceService]) -> set[str]:
    return {c for m in inference().registry.models for c in m.capabilities}


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
