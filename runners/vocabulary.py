"""The words every layer shares, each defined once: what a model can do, what an embedding request
may ask for, what kind a model is, how a model reranks, and the API dialects.

A leaf module (it imports nothing of this project): settings, models, the engine, the capabilities
and the HTTP layer all read their names from here.
"""

from __future__ import annotations

# ---- capabilities: what a served model can do (listed in /v1/models) ----
EMBED, RERANK, CLASSIFY = "embed", "rerank", "classify"
SPARSE_EMBED, TOKEN_EMBED = "sparse", "tokens"  # sparse vectors (SPLADE, BGE-M3), token vectors (ColBERT, BGE-M3)
IMAGE_EMBED = "image_embed"  # images into the model's text space (CLIP, SigLIP): runners.models.image

# ---- modalities: what one embedding input is (`modality`; a part of Cohere's `inputs`) ----
TEXT, IMAGE = "text", "image"
MODALITIES = (TEXT, IMAGE)

# ---- outputs: what one embedding request may ask for (`output`), and where each lands in a row ----
DENSE, SPARSE, TOKENS = "dense", "sparse", "tokens"
OUTPUTS = (DENSE, SPARSE, TOKENS)
OUTPUT_CAPABILITY = {DENSE: EMBED, SPARSE: SPARSE_EMBED, TOKENS: TOKEN_EMBED}
OUTPUT_KEYS = {DENSE: "dense_embedding", SPARSE: "sparse_embedding", TOKENS: "token_embeddings"}

# ---- quantized embedding types (`embedding_type`, Cohere's `embedding_types`) ----
EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary")

# ---- model kinds (MODEL_KINDS, or found by runners.models.detect) ----
AUTO = "auto"
EMBED_KIND, RERANK_KIND, CLASSIFY_KIND, QWEN3_RERANKER_KIND = "embed", "rerank", "classify", "qwen3-reranker"
SPLADE_KIND, COLBERT_KIND, BGE_M3_KIND, TOKENS_KIND = "sparse", "colbert", "bge-m3", "tokens"
MULTI_OUTPUT_KINDS = (SPLADE_KIND, COLBERT_KIND, BGE_M3_KIND, TOKENS_KIND)  # runners.models.multi_output
STATIC_KIND = "static"  # sentence-transformers' StaticEmbedding (model2vec): runners.models.static
CLIP_KIND = "clip"  # a text tower and a vision tower into one space (CLIP, SigLIP, SigLIP2): runners.models.image
# sentence-transformers' CrossEncoder over a causal LM scored by chosen tokens' logits (LogitScore):
# runners.models.llm_reranker
LLM_RERANKER_KIND = "llm-reranker"
ROUTED_KIND = "routed"  # sentence-transformers' Router: a route per task (query, document, ...): runners.models.routed
MODEL_KINDS = (EMBED_KIND, RERANK_KIND, CLASSIFY_KIND, QWEN3_RERANKER_KIND, LLM_RERANKER_KIND, *MULTI_OUTPUT_KINDS,
               CLIP_KIND, STATIC_KIND, ROUTED_KIND)

# ---- rerank modes: how a model that can rerank computes a score (`rerank_via` in /v1/models) ----
CROSS_ENCODER = "cross-encoder"  # a sequence-classification model reads (query, document)
QWEN3_YES_NO = "qwen3-yes-no"  # Qwen3-Reranker: logit(yes) - logit(no) after its prompt
LOGIT_SCORE = "logit-score"  # an LLM reranker: logit(true) [- logit(false)] after the folder's own template
COLBERT_MAXSIM = "colbert-maxsim"  # late interaction over token vectors
EMBEDDING_COSINE = "embedding-cosine"  # an embedding model's cosine, the fallback
# When no model is named, the first capable model in this order reranks (lower first).
RERANK_PREFERENCE = {CROSS_ENCODER: 0, QWEN3_YES_NO: 0, LOGIT_SCORE: 0, COLBERT_MAXSIM: 1, EMBEDDING_COSINE: 2}

# Model names clients send when they mean "whatever the server serves" (Infinity's client's default).
UNSPECIFIED_MODELS = frozenset({"default/not-specified"})

# Hugging Face Text Embeddings Inference's API lives under this prefix (runners.api.tei); errors there
# take TEI's body instead of the OpenAI envelope.
TEI_PREFIX = "/tei"
