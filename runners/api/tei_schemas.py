"""Request types of Text Embeddings Inference's routes (under /tei), field by field as TEI's router
declares them, each converting itself into the internal query of its capability."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, StrictInt, StrictStr

from runners.api.schemas import EmbeddingInput, JsonRequest, texts_or_ids
from runners.capabilities.queries import EmbedQuery, RerankQuery


class _TeiTruncation(JsonRequest):
    model: str | None = Field(None, description="not in TEI: which served model (default: the first that can)")
    truncate: bool | None = Field(None, description="null: this server's default, which truncates")
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"

    @property
    def truncate_left(self) -> bool:
        return self.truncation_direction.lower() == "left"


class TeiEmbedRequest(_TeiTruncation):
    inputs: EmbeddingInput
    normalize: bool = True
    prompt_name: str | None = None
    dimensions: Annotated[int, Field(ge=1)] | None = None

    def to_query(self) -> EmbedQuery:
        texts, ids = texts_or_ids(self.inputs)
        return EmbedQuery(texts=texts, token_ids=ids, model=self.model, dimensions=self.dimensions,
                          normalize=self.normalize, truncate=self.truncate is not False,
                          truncate_left=self.truncate_left, prompt_name=self.prompt_name)


class TeiRerankRequest(_TeiTruncation):
    query: StrictStr
    texts: list[StrictStr]
    raw_scores: bool = False
    return_text: bool = False

    def to_query(self) -> RerankQuery:
        return RerankQuery(query=self.query, documents=list(self.texts), model=self.model, raw_scores=self.raw_scores,
                           return_documents=self.return_text)


class TeiPredictRequest(_TeiTruncation):
    inputs: Union[StrictStr, list[StrictStr], list[list[StrictStr]]]
    raw_scores: bool = False


class TeiTokenizeRequest(JsonRequest):
    model: str | None = None
    inputs: Union[StrictStr, list[StrictStr]]
    add_special_tokens: bool = True
    prompt_name: str | None = None


class TeiDecodeRequest(JsonRequest):
    model: str | None = None
    ids: Union[list[StrictInt], list[list[StrictInt]]]
    skip_special_tokens: bool = True


class TeiSimilarityInputs(JsonRequest):
    source_sentence: StrictStr
    sentences: list[StrictStr]


class TeiSimilarityParameters(JsonRequest):
    truncate: bool | None = None
    truncation_direction: Literal["right", "left", "Right", "Left"] = "right"
    prompt_name: str | None = None


class TeiSimilarityRequest(JsonRequest):
    model: str | None = None
    inputs: TeiSimilarityInputs
    parameters: TeiSimilarityParameters | None = None
