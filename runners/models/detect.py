"""What kind a checkpoint is: the MODEL_KINDS setting when given, else the first rule of `RULES` that
recognizes its config.json and files, else an embedding model. A new kind is one more rule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from runners.models.checkpoint import model_file, st_modules
from runners.models.image import has_feature_methods
from runners.models.llm_reranker import is_llm_reranker
from runners.models.qwen3 import is_qwen3_reranker
from runners.models.st_format import module_classes, st_config
from runners.settings import ModelSpec
from runners.vocabulary import (
    AUTO,
    BGE_M3_KIND,
    CLASSIFY_KIND,
    CLIP_KIND,
    COLBERT_KIND,
    EMBED_KIND,
    LLM_RERANKER_KIND,
    QWEN3_RERANKER_KIND,
    RERANK_KIND,
    ROUTED_KIND,
    SPLADE_KIND,
    STATIC_KIND,
)


def llm_reranker(name_or_path: str, config: dict[str, Any]) -> str | None:
    """sentence-transformers' LLM reranker (a causal LM and LogitScore): served with the folder's own template
    and tokens, before the Qwen3 rule, which would apply Qwen3's built-in prompt."""
    return LLM_RERANKER_KIND if is_llm_reranker(name_or_path) else None


def qwen3_reranker(name_or_path: str, config: dict[str, Any]) -> str | None:
    return QWEN3_RERANKER_KIND if is_qwen3_reranker(name_or_path, config) else None


def sentence_transformers_model(name_or_path: str, config: dict[str, Any]) -> str | None:
    """What the sentence-transformers files alone decide: a StaticEmbedding first module is `static`;
    `model_type` CrossEncoder is a reranker (its head decides below), SparseEncoder sparse. Layouts
    read by sentence-transformers but not served here fail with one line."""
    classes = module_classes(name_or_path)
    if classes and classes[0] == "StaticEmbedding":
        return STATIC_KIND
    if classes and classes[0] == "Router":
        return ROUTED_KIND
    model_type = st_config(name_or_path).model_type
    not_served = [c for c in classes if c in ("Router", "Asym", "SparseStaticEmbedding")]
    if not_served:
        raise ValueError(f"{name_or_path}: a {model_type or 'SentenceTransformer'} with module {not_served[0]} after "
                         f"{classes[0]} is not served (a Router is served as the first module; Asym is the Router of "
                         "sentence-transformers < 3: save the model again with a current release)")
    if model_type == "SparseEncoder" and "SpladePooling" in classes:
        return SPLADE_KIND
    if model_type == "CrossEncoder":
        return sequence_classification(name_or_path, config) or RERANK_KIND
    return None


def multi_output(name_or_path: str, config: dict[str, Any]) -> str | None:
    """bge-m3, colbert or sparse when the checkpoint has the heads or layout; None for any other model.

    A `*ForMaskedLM` architecture alone is not enough when the folder is a sentence-transformers
    model with an ordinary pooling: all-mpnet-base-v2 ships `MPNetForMaskedLM` and is a dense model.
    (`tokens`, token vectors of a plain embedding model, is never detected: MODEL_KINDS opts in.)
    """
    if model_file(name_or_path, "sparse_linear.pt") or model_file(name_or_path, "colbert_linear.pt"):
        return BGE_M3_KIND
    archs = config.get("architectures") or []
    if "HF_ColBERT" in archs:
        return COLBERT_KIND
    types = [m.get("type", "") for m in st_modules(name_or_path)]
    if any(t.startswith("pylate.") for t in types):
        return COLBERT_KIND
    if any(t.endswith("SpladePooling") for t in types):
        return SPLADE_KIND
    if not types and any(a.endswith("ForMaskedLM") for a in archs):
        return SPLADE_KIND
    return None


def sequence_classification(name_or_path: str, config: dict[str, Any]) -> str | None:
    """A one-label sequence classifier is a cross-encoder (rerank); more labels, a classifier."""
    archs = config.get("architectures") or []
    if any("SequenceClassification" in a for a in archs):
        return RERANK_KIND if len(config.get("id2label") or {"0": 0}) < 2 else CLASSIFY_KIND
    return None


def dual_encoder(name_or_path: str, config: dict[str, Any]) -> str | None:
    """A text tower and a vision tower with `get_text_features` / `get_image_features` (CLIP, SigLIP)."""
    return CLIP_KIND if has_feature_methods(config) else None


RULES: tuple[Callable[[str, dict[str, Any]], str | None], ...] = (
    dual_encoder, llm_reranker, qwen3_reranker, sentence_transformers_model, multi_output, sequence_classification)


def resolve_kind(spec: ModelSpec, config: dict[str, Any]) -> str:
    """One of vocabulary.MODEL_KINDS: the setting if given, else from config.json and the folder's files."""
    if spec.kind != AUTO:
        return spec.kind
    for rule in RULES:
        kind = rule(spec.name_or_path, config)
        if kind is not None:
            return kind
    return EMBED_KIND
