"""The one internal query per capability that every route, in every dialect, and every RunPod job
translates into (the request types in runners.api convert themselves with `to_query()`)."""

from __future__ import annotations

from dataclasses import dataclass

from runners.vocabulary import DENSE


@dataclass(frozen=True)
class Part:
    """One piece of an input: a text, or an image as sent (data URI, base64, or URL); `where` names it
    in errors (`input[2]`, `images[0]`, `inputs[1].content[0]`)."""

    modality: str  # vocabulary.MODALITIES
    value: str
    where: str


@dataclass(frozen=True)
class Chunking:
    """`chunking`: embed a long text in windows (runners.capabilities.long_inputs)."""

    size: int | None = None  # tokens per chunk, the model's special tokens included; None: the model's window
    overlap: int = 0  # text tokens shared by neighbouring chunks
    pooling: str = "mean"  # "mean": one vector per input; "none": every chunk's vector and spans


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
    outputs: tuple[str, ...] = (DENSE,)  # vocabulary.OUTPUTS; the first is `embedding`
    sparse_top_k: int | None = None
    # Images and mixed inputs (`modality: image`, Cohere's `images` and `inputs`, Jina's objects): each
    # input's parts; `texts` and `token_ids` are None then (runners.capabilities.image_embed).
    contents: tuple[tuple[Part, ...], ...] | None = None
    chunking: Chunking | None = None
    late_chunking: bool = False  # the inputs are consecutive pieces of one document


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
