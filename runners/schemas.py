"""Request types of every route (native, OpenAI, Jina/Cohere v1, Cohere v2) and the one internal
query type per capability that each of them translates into.

Responses are built as plain dicts by `runners.handlers`: a list of 1,000 vectors of 384 floats
is 384,000 numbers, and pydantic would copy each of them once more on the way out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

# `str` for text; `[int]` / `[[int]]` for token ids, as the OpenAI API and its SDK (tiktoken) send.
TokenIds = list[StrictInt]
EmbeddingInput = Union[StrictStr, list[StrictStr], TokenIds, list[TokenIds]]

EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary"]
OutputName = Literal["dense", "sparse", "tokens"]
# Model names clients send when they mean "whatever the server serves" (Infinity's client's default).
UNSPECIFIED_MODELS = frozenset({"default/not-specified"})

INPUT_TYPE_ALIASES = {
    "query": "query",
    "search_query": "query",
    "document": "document",
    "passage": "document",
    "search_document": "document",
    # Cohere's other input types: no prompt (symmetric tasks).
    "classification": None,
    "clustering": None,
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
    dimensions: Annotated[int, Field(ge=0)] | None = Field(None, description="0 or null: every dimension")
    normalize: bool = True
    encoding_format: Literal["float", "base64"] = "float"
    embedding_type: EmbeddingType = Field(
        "float", description="float, or quantized: int8, uint8, binary, ubinary (README, Quantized embeddings)")
    output: Union[OutputName, list[OutputName]] = Field(
        "dense", description="dense, sparse ({indices, values}) or tokens (one vector per token), or several: "
                             "the first is `embedding`, the others `sparse_embedding` / `token_embeddings` / `dense_embedding`")
    sparse_top_k: Annotated[int, Field(ge=1)] | None = Field(None, description="keep the k largest sparse weights")
    truncate: bool = True
    user: str | None = None

    @field_validator("input_type")
    @classmethod
    def _input_type(cls, value: str | None) -> str | None:
        return input_type_of(value)

    @field_validator("dimensions")
    @classmethod
    def _dimensions(cls, value: int | None) -> int | None:
        return value or None  # Infinity's client sends 0 for "not set", as Infinity's server reads it


def input_type_of(value: str | None) -> str | None:
    if value is None:
        return None
    key = value.strip().lower()
    if key not in INPUT_TYPE_ALIASES:
        raise ValueError(f"input_type must be one of {sorted(INPUT_TYPE_ALIASES)}, got {value!r}")
    return INPUT_TYPE_ALIASES[key]


class CohereEmbedRequest(_Request):
    """`POST /v2/embed`: Cohere's embed v2 (texts only; images are not served)."""

    model: str | None = None
    texts: list[StrictStr]
    input_type: str | None = Field(None, description="search_query, search_document, classification or clustering")
    embedding_types: list[EmbeddingType] = Field(default_factory=lambda: ["float"])
    output_dimension: Annotated[int, Field(ge=1)] | None = None
    truncate: Literal["NONE", "START", "END"] = "END"

    @field_validator("input_type")
    @classmethod
    def _input_type(cls, value: str | None) -> str | None:
        return input_type_of(value)


class TokenizeRequest(_Request):
    """`POST /tokenize`: token ids and counts per text, for clients that budget tokens."""

    input: Union[StrictStr, list[StrictStr]]
    model: str | None = None
    add_special_tokens: bool = True


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
    """`POST /rerank` and the RunPod rerank job (`docs` and `return_docs` as the seed worker).

    TEI's rerank body (`texts`) is taken too, and answered in TEI's shape: Haystack's TEI ranker
    drops any path from its URL and posts it to `/rerank`."""

    documents: list[Document] | None = Field(None, validation_alias=AliasChoices("documents", "docs"))
    return_documents: bool = Field(False, validation_alias=AliasChoices("return_documents", "return_docs"))
    texts: list[StrictStr] | None = Field(None, description="TEI's field: answered as TEI's /rerank")
    return_text: bool = False
    truncate: bool | None = None
    truncation_direction: str | None = None

    @model_validator(mode="after")
    def _documents_or_texts(self) -> RerankRequest:
        if self.documents is None and self.texts is None:
            raise ValueError("send the texts to rank as 'documents' (or 'docs')")
        return self


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
    # Several at once for Cohere's `embedding_types`; every other route asks for one.
    embedding_types: tuple[str, ...] = ("float",)
    truncate_left: bool = False  # cut a long text's start instead of its end (TEI, Cohere)
    prompt_name: str | None = None  # a key of the model's prompts (TEI)
    outputs: tuple[str, ...] = ("dense",)  # dense, sparse, tokens (runners.sparse); the first is `embedding`
    sparse_top_k: int | None = None


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
    texts, ids = _texts_or_ids(req.input)
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
        embedding_types=(req.embedding_type,),
        outputs=(req.output,) if isinstance(req.output, str) else tuple(dict.fromkeys(req.output)) or ("dense",),
        sparse_top_k=req.sparse_top_k,
    )


def cohere_to_embed_query(req: CohereEmbedRequest) -> EmbedQuery:
    return EmbedQuery(
        texts=list(req.texts),
        token_ids=None,
        model=req.model,
        input_type=req.input_type,
        dimensions=req.output_dimension,
        truncate=req.truncate != "NONE",
        truncate_left=req.truncate == "START",
        embedding_types=tuple(dict.fromkeys(req.embedding_types)) or ("float",),
    )


def to_rerank_query(req: RerankRequest | V2RerankRequest) -> RerankQuery:
    return RerankQuery(
        query=req.query,
        documents=[_document_text(d) for d in req.documents or []],
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


# ---- Text Embeddings Inference (under /tei), field by field as TEI's router types ----

TeiInput = Union[StrictStr, list[StrictStr], TokenIds, list[TokenIds]]


class _TeiTruncation(_Request):
    model: str | None = Field(None, description="not in TEI: which served model (default: the first that can)")
    truncate: bool | None = Field(None, description="null: this server's default, which truncates")
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"

    @property
    def truncate_left(self) -> bool:
        return self.truncation_direction.lower() == "left"


class TeiEmbedRequest(_TeiTruncation):
    inputs: TeiInput
    normalize: bool = True
    prompt_name: str | None = None
    dimensions: Annotated[int, Field(ge=1)] | None = None


class TeiRerankRequest(_TeiTruncation):
    query: StrictStr
    texts: list[StrictStr]
    raw_scores: bool = False
    return_text: bool = False


class TeiPredictRequest(_TeiTruncation):
    inputs: Union[StrictStr, list[StrictStr], list[list[StrictStr]]]
    raw_scores: bool = False


class TeiTokenizeRequest(_Request):
    model: str | None = None
    inputs: Union[StrictStr, list[StrictStr]]
    add_special_tokens: bool = True
    prompt_name: str | None = None


class TeiDecodeRequest(_Request):
    model: str | None = None
    ids: Union[list[StrictInt], list[list[StrictInt]]]
    skip_special_tokens: bool = True


class TeiSimilarityInputs(_Request):
    source_sentence: StrictStr
    sentences: list[StrictStr]


class TeiSimilarityParameters(_Request):
    truncate: bool | None = None
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"
    prompt_name: str | None = None


class TeiSimilarityRequest(_Request):
    model: str | None = None
    inputs: TeiSimilarityInputs
    parameters: TeiSimilarityParameters | None = None


def _texts_or_ids(data: TeiInput | EmbeddingInput) -> tuple[list[str] | None, list[list[int]] | None]:
    if isinstance(data, str):
        return [data], None
    if data and isinstance(data[0], int):
        return None, [list(data)]  # type: ignore[arg-type]
    if data and isinstance(data[0], list):
        return None, [list(x) for x in data]  # type: ignore[union-attr]
    return list(data), None  # type: ignore[arg-type]


def tei_to_embed_query(req: TeiEmbedRequest) -> EmbedQuery:
    texts, ids = _texts_or_ids(req.inputs)
    return EmbedQuery(
        texts=texts,
        token_ids=ids,
        model=req.model,
        dimensions=req.dimensions,
        normalize=req.normalize,
        truncate=req.truncate is not False,
        truncate_left=req.truncate_left,
        prompt_name=req.prompt_name,
    )


def tei_to_rerank_query(req: TeiRerankRequest) -> RerankQuery:
    return RerankQuery(query=req.query, documents=list(req.texts), model=req.model, raw_scores=req.raw_scores,
                       return_documents=req.return_text)
