"""Request types of the native, OpenAI, Jina/Cohere v1 and Cohere v2 routes (field by field as those
APIs send them), each converting itself into the internal query of its capability (`to_query()`).

Responses are built as plain dicts by the capabilities: a list of 1,000 vectors of 384 floats is
384,000 numbers, and pydantic would copy each of them once more on the way out.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from runners.capabilities.queries import Chunking, ClassifyQuery, EmbedQuery, Part, RerankQuery
from runners.vocabulary import DENSE, EMBEDDING_TYPES, IMAGE, MODALITIES, OUTPUTS, TEXT

Modality = Literal[MODALITIES]  # type: ignore[valid-type]

EmbeddingType = Literal[EMBEDDING_TYPES]  # type: ignore[valid-type]
OutputName = Literal[OUTPUTS]  # type: ignore[valid-type]

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


class JsonRequest(BaseModel):
    # Unknown fields are ignored: SDKs and frameworks send fields of their own (`user`, headers
    # folded into the body by proxies); rejecting them would break clients that work elsewhere.
    # Known fields take their JSON type as it is (strict): `"normalize": "false"`, `"truncate": 0` or
    # `"dimensions": true` is a 422 that names the field, as OpenAI's and TEI's servers answer, not a
    # value converted behind the client's back. (BentoML's form bodies still work: it reads each
    # form field as JSON first.)
    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)


class InputObject(JsonRequest):
    """Jina's embedding input item: `{"text": ...}` or `{"image": data URI, base64 or URL}`."""

    text: StrictStr | None = None
    image: StrictStr | None = None

    @model_validator(mode="after")
    def _one(self) -> InputObject:
        if (self.text is None) == (self.image is None):
            raise ValueError('an input object has "text" or "image" (one of them)')
        return self


# `str` for text; `[int]` / `[[int]]` for token ids, as the OpenAI API and its SDK (tiktoken) send;
# Jina's objects for texts and images side by side.
TokenIds = list[StrictInt]
EmbeddingInput = Union[StrictStr, list[StrictStr], TokenIds, list[TokenIds], list[InputObject]]


class ChunkingOptions(JsonRequest):
    """`chunking`: embed a text longer than the window in windows (docs/api.md, long inputs)."""

    size: Annotated[int, Field(ge=1)] | None = Field(
        None, description="tokens per chunk, the model's special tokens included (default: the model's window)")
    overlap: Annotated[int, Field(ge=0)] = Field(0, description="text tokens shared by neighbouring chunks")
    pooling: Literal["mean", "none"] = Field(
        "mean", description="mean: one vector per input, the chunks' token-weighted mean; none: every chunk's "
                            "vector with its token and character spans")


def chunking_of(value: ChunkingOptions | bool | None) -> Chunking | None:
    """`chunking: true` means the defaults; false or null: none."""
    if value is None or value is False:
        return None
    if value is True:
        return Chunking()
    return Chunking(size=value.size, overlap=value.overlap, pooling=value.pooling)


class EmbeddingRequest(JsonRequest):
    """`POST /embed`, `POST /v1/embeddings` and the RunPod embed job."""

    input: EmbeddingInput = Field(description="a text, a list of texts, token ids, a list of token-id lists, or "
                                              "Jina's [{text} or {image}] objects")
    modality: Modality = Field("text", description="image: each input is an image, a data:image/...;base64 URI "
                                                     "(or a URL where IMAGE_URLS=allow)")
    model: str | None = None
    input_type: str | None = Field(None, description="query or document: applies the model's prompt "
                                                     "(or picks the route of a routed model; its route names too)")
    instruction: str | None = Field(None, description="task text for instruction models (implies a query)")
    dimensions: Annotated[int, Field(ge=0)] | None = Field(None, description="0 or null: every dimension")
    normalize: bool = True
    encoding_format: Literal["float", "base64"] = "float"
    embedding_type: EmbeddingType = Field(
        "float", description="float, or quantized: int8, uint8, binary, ubinary (docs/api.md, quantized embeddings)")
    output: Union[OutputName, list[OutputName]] = Field(
        DENSE, description="dense, sparse ({indices, values}) or tokens (one vector per token), or several: "
                             "the first is `embedding`, the others `sparse_embedding` / `token_embeddings` / `dense_embedding`")
    sparse_top_k: Annotated[int, Field(ge=1)] | None = Field(None, description="keep the k largest sparse weights")
    truncate: bool = True
    chunking: ChunkingOptions | bool | None = Field(
        None, description="{size?, overlap?: 0, pooling?: mean/none}: a text longer than the window is embedded in "
                          "windows; true: the defaults")
    late_chunking: bool = Field(False, description="the inputs are consecutive pieces of one document: each piece's "
                                                   "vector is pooled from one pass over the whole document")
    user: str | None = None

    @field_validator("input_type")
    @classmethod
    def _input_type(cls, value: str | None) -> str | None:
        return input_type_of(value)

    @field_validator("dimensions")
    @classmethod
    def _dimensions(cls, value: int | None) -> int | None:
        return value or None  # Infinity's client sends 0 for "not set", as Infinity's server reads it

    @model_validator(mode="after")
    def _images_as_strings(self) -> EmbeddingRequest:
        if self.modality == IMAGE and not (isinstance(self.input, str) or all(isinstance(x, str) for x in self.input)):
            raise ValueError("modality image takes `input` as an image or a list of images: "
                             "data:image/png;base64,... URIs (or jpeg, webp, gif)")
        return self

    def to_query(self) -> EmbedQuery:
        contents = input_contents(self.input, self.modality)
        texts, ids = texts_or_ids(self.input) if contents is None else (None, None)
        return EmbedQuery(
            contents=contents,
            texts=texts,
            token_ids=ids,
            model=self.model,
            input_type=self.input_type,
            instruction=self.instruction,
            dimensions=self.dimensions,
            normalize=self.normalize,
            encoding_format=self.encoding_format,
            truncate=self.truncate,
            embedding_types=(self.embedding_type,),
            outputs=(self.output,) if isinstance(self.output, str) else tuple(dict.fromkeys(self.output)) or (DENSE,),
            sparse_top_k=self.sparse_top_k,
            chunking=chunking_of(self.chunking),
            late_chunking=self.late_chunking,
        )


def input_type_of(value: str | None) -> str | None:
    if value is None:
        return None
    key = value.strip().lower()
    if key not in INPUT_TYPE_ALIASES:
        return value.strip()  # a route name of a routed model; any other model refuses it (capabilities.base)
    return INPUT_TYPE_ALIASES[key]


class CohereImageUrl(JsonRequest):
    url: StrictStr


class CohereContent(JsonRequest):
    """One part of a Cohere input: `{"type": "text", "text"}` or `{"type": "image_url", "image_url": {"url"}}`."""

    type: Literal["text", "image_url"]
    text: StrictStr | None = None
    image_url: CohereImageUrl | StrictStr | None = None

    @model_validator(mode="after")
    def _filled(self) -> CohereContent:
        if self.type == "text" and self.text is None:
            raise ValueError('a "text" part needs "text"')
        if self.type == "image_url" and self.image_url is None:
            raise ValueError('an "image_url" part needs "image_url": {"url": "data:image/...;base64,..."}')
        return self

    def part(self, where: str) -> Part:
        if self.type == "text":
            return Part(TEXT, self.text or "", where)
        url = self.image_url if isinstance(self.image_url, str) else self.image_url.url  # type: ignore[union-attr]
        return Part(IMAGE, url, where)


class CohereInput(JsonRequest):
    content: list[CohereContent]


class CohereEmbedRequest(JsonRequest):
    """`POST /v2/embed`: Cohere's embed v2: `texts`, `images` (data URIs) or `inputs` (texts and images,
    one vector per input)."""

    model: str | None = None
    texts: list[StrictStr] | None = None
    images: list[StrictStr] | None = Field(None, description="data:image/...;base64 URIs (input_type image)")
    inputs: list[CohereInput] | None = Field(None, description="[{content: [{type: text, text} or "
                                                               "{type: image_url, image_url: {url}}]}]")
    input_type: str | None = Field(None, description="search_query, search_document, classification, clustering "
                                                     "or image")
    embedding_types: list[EmbeddingType] = Field(default_factory=lambda: ["float"])
    output_dimension: Annotated[int, Field(ge=1)] | None = None
    truncate: Literal["NONE", "START", "END"] = "END"
    chunking: ChunkingOptions | bool | None = Field(None, description="not in Cohere: as on /embed (pooling mean)")
    late_chunking: bool = Field(False, description="not in Cohere: as on /embed")

    @field_validator("input_type")
    @classmethod
    def _input_type(cls, value: str | None) -> str | None:
        if value is not None and value.strip().lower() == IMAGE:
            return IMAGE
        return input_type_of(value)

    @model_validator(mode="after")
    def _one_kind(self) -> CohereEmbedRequest:
        given = [name for name in ("texts", "images", "inputs") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("send one of texts, images (with input_type image) or inputs")
        return self

    def to_query(self) -> EmbedQuery:
        contents = None
        if self.images is not None:
            contents = tuple((Part(IMAGE, v, f"images[{i}]"),) for i, v in enumerate(self.images))
        elif self.inputs is not None:
            contents = tuple(tuple(c.part(f"inputs[{i}].content[{j}]") for j, c in enumerate(item.content))
                             for i, item in enumerate(self.inputs))
        return EmbedQuery(
            contents=contents,
            texts=list(self.texts) if self.texts is not None else None,
            token_ids=None,
            model=self.model,
            input_type=None if self.input_type == IMAGE else self.input_type,
            dimensions=self.output_dimension,
            truncate=self.truncate != "NONE",
            truncate_left=self.truncate == "START",
            embedding_types=tuple(dict.fromkeys(self.embedding_types)) or ("float",),
            chunking=chunking_of(self.chunking),
            late_chunking=self.late_chunking,
        )


class TokenizeRequest(JsonRequest):
    """`POST /tokenize`: token ids and counts per text, for clients that budget tokens."""

    input: Union[StrictStr, list[StrictStr]]
    model: str | None = None
    add_special_tokens: bool = True


class _DocumentObject(JsonRequest):
    text: StrictStr


Document = Union[StrictStr, _DocumentObject]


class _RerankBase(JsonRequest):
    model: str | None = None
    query: StrictStr
    top_n: Annotated[int, Field(ge=1)] | None = None
    raw_scores: bool = False
    instruction: str | None = None
    max_tokens_per_doc: Annotated[int, Field(ge=1)] | None = None

    def to_query(self) -> RerankQuery:
        return RerankQuery(
            query=self.query,
            documents=[doc if isinstance(doc, str) else doc.text for doc in self.documents or []],
            model=self.model,
            top_n=self.top_n,
            return_documents=getattr(self, "return_documents", False),
            raw_scores=self.raw_scores,
            instruction=self.instruction,
            max_tokens_per_doc=self.max_tokens_per_doc,
        )


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


class ClassifyRequest(JsonRequest):
    """`POST /classify`."""

    input: Union[StrictStr, list[StrictStr]]
    model: str | None = None
    raw_scores: bool = False

    def to_query(self) -> ClassifyQuery:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        return ClassifyQuery(texts=texts, model=self.model, raw_scores=self.raw_scores)


def input_contents(data: EmbeddingInput, modality: str) -> tuple[tuple[Part, ...], ...] | None:
    """The inputs as parts when they hold images (`modality: image`, Jina's objects); None for texts and ids."""
    if modality == IMAGE:
        values = [data] if isinstance(data, str) else list(data)
        return tuple((Part(IMAGE, v, f"input[{i}]"),) for i, v in enumerate(values))  # type: ignore[arg-type]
    if isinstance(data, list) and data and isinstance(data[0], InputObject):
        return tuple((Part(TEXT, x.text, f"input[{i}]") if x.text is not None else Part(IMAGE, x.image or "", f"input[{i}]"),)
                     for i, x in enumerate(data))  # type: ignore[union-attr]
    return None


def texts_or_ids(data: EmbeddingInput) -> tuple[list[str] | None, list[list[int]] | None]:
    """A text, texts, token ids or rows of token ids: (texts, None) or (None, rows of ids)."""
    if isinstance(data, str):
        return [data], None
    if data and isinstance(data[0], int):
        return None, [list(data)]  # type: ignore[arg-type]
    if data and isinstance(data[0], list):
        return None, [list(x) for x in data]  # type: ignore[union-attr]
    return list(data), None  # type: ignore[arg-type]
