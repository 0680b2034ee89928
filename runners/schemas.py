"""Request types of every route (native, OpenAI, Jina/Cohere v1, Cohere v2) and the one internal
query type per capability that each of them translates into.

Responses are built as plain dicts by `runners.handlers`: a list of 1,000 vectors of 384 floats
is 384,000 numbers, and pydantic would copy each of them once more on the way out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

# `str` for text; `[int]` / `[[int]]` for token ids, as the OpenAI API and its SDK (tiktoken) send.
TokenIds = list[StrictInt]
EmbeddingInput = Union[StrictStr, list[StrictStr], TokenIds, list[TokenIds]]

INPUT_TYPE_ALIASES = {
    "query": "query",
    "search_query": "query",
    "document": "document",
    "passage": "document",
    "search_document": "document",
}


class _Request(BaseModel):
    # Unknown fields are ignored: SDKs and frameworks send fields of their own (`user`, headers
    # folded into the body by proxies); rejecting them would break clients that work elsewhere.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class EmbeddingRequest(_Request):
    """`POST /embed`, `POST /v1/embeddings` and the RunPod embed job."""

    input: EmbeddingInput = Field(description="a text, a list of texts, token ids, or a list of token-id lists")
    model: str | None = None
    input_type: str | None = Field(None, description="query or document: applies the model's prompt")
    instruction: str | None = Field(None, description="task text for instruction models (implies a query)")
    dimensions: Annotated[int, Field(ge=1)] | None = None
    normalize: bool = True
    encoding_format: Literal["float", "base64"] = "float"
    truncate: bool = True
    user: str | None = None

    @field_validator("input_type")
    @classmethod
    def _input_type(cls, value: str | None) -> str | None:
        if value is None:
            return None
        key = value.strip().lower()
        if key not in INPUT_TYPE_ALIASES:
            raise ValueError(f"input_type must be one of {sorted(INPUT_TYPE_ALIASES)}, got {value!r}")
        return INPUT_TYPE_ALIASES[key]


class _DocumentObject(_Request):
    text: StrictStr


Document = Union[StrictStr, _DocumentObject]


class _RerankBase(_Request):
    model: str | None = None
    query: StrictStr
    top_n: Annotated[int, Field(ge=1)] | None = None
    raw_scores: bool = False
    instruction: str | None = None
    max_tokens_per_doc: Annotated[int, Field(ge=1)] | None = None


class RerankRequest(_RerankBase):
    """`POST /rerank` and the RunPod rerank job (`docs` and `return_docs` as the seed worker)."""

    documents: list[Document] = Field(validation_alias=AliasChoices("documents", "docs"))
    return_documents: bool = Field(False, validation_alias=AliasChoices("return_documents", "return_docs"))


class V1RerankRequest(RerankRequest):
    """`POST /v1/rerank`: Jina and Cohere v1, which return documents unless told not to."""

    return_documents: bool = Field(True, validation_alias=AliasChoices("return_documents", "return_docs"))


class V2RerankRequest(_RerankBase):
    """`POST /v2/rerank`: Cohere v2 (no `return_documents`; `max_tokens_per_doc`)."""

    documents: list[Document]


class ClassifyRequest(_Request):
    """`POST /classify`."""

    input: Union[StrictStr, list[StrictStr]]
    model: str | None = None
    raw_scores: bool = False


# ---- internal queries: what every route of a capability becomes ----


@dataclass(frozen=True)
class EmbedQuery:
    texts: list[str] | None
    token_ids: list[list[int]] | None
    model: str | None = None
    input_type: str | None = None
    instruction: str | None = None
    dimensions: int | None = None
    normalize: bool = True
    encoding_format: str = "float"
    truncate: bool = True


@dataclass(frozen=True)
class RerankQuery:
    query: str
    documents: list[str]
    model: str | None = None
    top_n: int | None = None
    return_documents: bool = False
    raw_scores: bool = False
    instruction: str | None = None
    max_tokens_per_doc: int | None = None


@dataclass(frozen=True)
class ClassifyQuery:
    texts: list[str]
    model: str | None = None
    raw_scores: bool = False


def _document_text(doc: Document) -> str:
    return doc if isinstance(doc, str) else doc.text


def to_embed_query(req: EmbeddingRequest) -> EmbedQuery:
    data = req.input
    texts: list[str] | None = None
    ids: list[list[int]] | None = None
    if isinstance(data, str):
        texts = [data]
    elif data and isinstance(data[0], int):
        ids = [list(data)]  # type: ignore[arg-type]
    elif data and isinstance(data[0], list):
        ids = [list(x) for x in data]  # type: ignore[union-attr]
    else:
        texts = list(data)  # type: ignore[arg-type]
    return EmbedQuery(
        texts=texts,
        token_ids=ids,
        model=req.model,
        input_type=req.input_type,
        instruction=req.instruction,
        dimensions=req.dimensions,
        normalize=req.normalize,
        encoding_format=req.encoding_format,
        truncate=req.truncate,
    )


def to_rerank_query(req: RerankRequest | V2RerankRequest) -> RerankQuery:
    return RerankQuery(
        query=req.query,
        documents=[_document_text(d) for d in req.documents],
        model=req.model,
        top_n=req.top_n,
        return_documents=getattr(req, "return_documents", False),
        raw_scores=req.raw_scores,
        instruction=req.instruction,
        max_tokens_per_doc=req.max_tokens_per_doc,
    )


def to_classify_query(req: ClassifyRequest) -> ClassifyQuery:
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    return ClassifyQuery(texts=texts, model=req.model, raw_scores=req.raw_scores)
