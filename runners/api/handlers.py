"""What each route of the native, OpenAI, Jina and Cohere APIs does with its validated body: it
converts itself into its capability's query, and this worker's service methods answer it. The
route table (runners.api.routes) maps every path to one of these or to a TEI handler (runners.api.tei)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runners.api import tei
from runners.api.context import inference
from runners.api.responses import with_truncation
from runners.api.schemas import (
    ClassifyRequest,
    CohereEmbedRequest,
    EmbeddingRequest,
    RerankRequest,
    TokenizeRequest,
    V1RerankRequest,
    V2RerankRequest,
)
from runners.api.tei_schemas import TeiRerankRequest


async def models(query: Mapping[str, str]) -> dict[str, Any]:
    return inference().models()


async def embed(body: EmbeddingRequest) -> Any:
    result = await inference().embed(body.to_query())
    return with_truncation(result, result["usage"].get("truncated", 0))


async def rerank(body: RerankRequest) -> Any:
    if body.documents is None:  # TEI's body: answered in TEI's shape (RerankRequest says why)
        tei_body = TeiRerankRequest(query=body.query, texts=body.texts or [], raw_scores=body.raw_scores,
                                    return_text=body.return_text, model=body.model)
        return await tei.rerank(tei_body)  # errors: this route's envelope
    return await inference().rerank(body.to_query(), "native")


async def v1_rerank(body: V1RerankRequest) -> dict[str, Any]:
    return await inference().rerank(body.to_query(), "v1")


async def v2_rerank(body: V2RerankRequest) -> dict[str, Any]:
    return await inference().rerank(body.to_query(), "v2")


async def v2_embed(body: CohereEmbedRequest) -> Any:
    return with_truncation(*await inference().cohere_embed_counted(body.to_query()))


async def classify(body: ClassifyRequest) -> dict[str, Any]:
    return await inference().classify(body.to_query())


async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    return await inference().tokenize(texts, body.model, body.add_special_tokens)
