"""Reranking, by the model's rerank mode: a cross-encoder's (or Qwen3's yes/no) logits, ColBERT's late
interaction, or an embedding model's cosine; answered in the native, Jina/Cohere v1 or v2 shape."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import numpy as np

from runners.capabilities.embed import Embedding
from runners.capabilities.queries import RerankQuery
from runners.engine.loaded import LoadedModel
from runners.errors import BadRequest, PayloadTooLarge
from runners.models.qwen3 import rerank_body_start
from runners.vocabulary import COLBERT_MAXSIM, EMBEDDING_COSINE, LOGIT_SCORE, QWEN3_YES_NO, RERANK, TOKENS

MAXSIM_CHUNK = 128  # documents whose ColBERT token vectors are held at once while reranking


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-logits))


class Reranking(Embedding):
    async def _cut_documents(self, model: LoadedModel, docs: list[str], max_tokens: int) -> list[str]:
        def cut() -> list[str]:
            ids = model.tokenize(docs, special=False)
            if all(len(row) <= max_tokens for row in ids):
                return docs
            return [d if len(row) <= max_tokens else model.decode([row[:max_tokens]])[0] for d, row in zip(docs, ids)]

        return await asyncio.to_thread(cut)

    async def _maxsim_scores(self, model: LoadedModel, q: RerankQuery, docs: list[str]) -> tuple[list[float], int]:
        """ColBERT late interaction: per document, the mean over the query's token vectors of their best
        cosine with the document's token vectors (ColBERT's MaxSim sum divided by the query length, so
        scores lie in [-1, 1]). Documents go in chunks: their token vectors are dropped once scored."""
        from runners.models.multi_output import MultiInput

        (query,), usage = await self.registry.run(model, RERANK, [MultiInput(q.query, (TOKENS,), True)])
        query_vectors = np.asarray(query[TOKENS], dtype=np.float32)
        scores: list[float] = []
        for start in range(0, len(docs), MAXSIM_CHUNK):
            chunk = [MultiInput(d, (TOKENS,), False) for d in docs[start:start + MAXSIM_CHUNK]]
            results, used = await self.registry.run(model, RERANK, chunk)
            usage += used
            for r in results:
                doc = np.asarray(r[TOKENS], dtype=np.float32)
                scores.append(float((query_vectors @ doc.T).max(axis=1).mean()) if len(doc) else 0.0)
        return scores, int(usage)

    async def _scores(self, model: LoadedModel, q: RerankQuery, docs: list[str]) -> tuple[list[float], int]:
        if model.rerank_via == COLBERT_MAXSIM:
            return await self._maxsim_scores(model, q, docs)
        if model.rerank_via == EMBEDDING_COSINE:
            query_text = self._prompt(model, "query", q.instruction) + q.query
            doc_prompt = self._prompt(model, "document", None)
            tasks = [self._task(model, "query")] + [self._task(model, "document")] * len(docs) if model.route_tasks else None
            vectors, usage = await self.embed_vectors(model, [query_text] + [doc_prompt + d for d in docs], tasks)
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            return (vectors[1:] @ vectors[0]).tolist(), usage
        if model.rerank_via == LOGIT_SCORE:
            # The instruction is the model's prompt (its template places it); none: the model's default prompt.
            pairs: list[tuple[str, ...]] = [(q.query, d, q.instruction or "") for d in docs]
        else:
            query = rerank_body_start(q.query, q.instruction) if model.rerank_via == QWEN3_YES_NO else q.query
            pairs = [(query, d) for d in docs]
        logits, usage = await self.registry.run(model, RERANK, pairs)
        values = np.asarray(logits, dtype=np.float64).reshape(len(docs))
        if not q.raw_scores and model.rerank_activation == "sigmoid":
            values = sigmoid(values)
        return values.tolist(), int(usage)

    def _check_rerank_cost(self, model: LoadedModel, q: RerankQuery) -> None:
        """What the model reads: a cross-encoder (or Qwen3) reads the query, with its instruction, once per
        document; an embedding model or ColBERT reads it once. Bounded before any pair is built."""
        docs = sum(map(len, q.documents))
        if model.rerank_via == EMBEDDING_COSINE:
            query = len(self._prompt(model, "query", q.instruction)) + len(q.query)
            docs += len(self._prompt(model, "document", None)) * len(q.documents)
            copies = 1
        elif model.rerank_via == COLBERT_MAXSIM:
            query, copies = len(q.query), 1
        else:
            query = len(rerank_body_start(q.query, q.instruction)) if model.rerank_via == QWEN3_YES_NO else len(q.query)
            if model.rerank_via == LOGIT_SCORE:
                query += len(q.instruction or model.prompts.get(model.default_prompt_name or "", ""))
            copies = len(q.documents)
        if query > self.settings.max_chars:
            raise PayloadTooLarge(
                f"'query' with its instruction and template has {query} characters; the limit is MAX_CHARS_PER_TEXT="
                f"{self.settings.max_chars}: send a shorter query or instruction", param="query", code="text_too_long")
        self._check_read_chars(query * copies + docs, f"a query of {query} read with each of {len(q.documents)} documents"
                               if copies > 1 else f"a query of {query} and {len(q.documents)} documents", "query")

    async def rerank(self, q: RerankQuery, shape: str = "native") -> dict[str, Any]:
        """`shape`: "native" (documents as strings), "v1" (Jina/Cohere v1, documents as {text}) or "v2"."""
        model = self.registry.resolve(q.model, RERANK)
        if not q.query:
            raise BadRequest("'query' is an empty string: send the text to rank the documents against", param="query")
        self._check_texts([q.query], "query")
        self._check_texts(q.documents, "documents")
        self._check_rerank_cost(model, q)
        docs = q.documents
        if q.max_tokens_per_doc is not None:
            docs = await self._cut_documents(model, docs, q.max_tokens_per_doc)
        scores, usage = await self._scores(model, q, docs)
        self._account(model, RERANK, len(docs), usage)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        if q.top_n is not None:
            order = order[: q.top_n]
        return self._rerank_body(model, q, order, scores, usage, shape)

    @staticmethod
    def _rerank_body(
        model: LoadedModel, q: RerankQuery, order: list[int], scores: list[float], usage: int, shape: str
    ) -> dict[str, Any]:
        request_id = str(uuid.uuid4())
        if shape == "v2":
            return {
                "id": request_id,
                "results": [{"index": i, "relevance_score": scores[i]} for i in order],
                "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
            }
        results = []
        for i in order:
            item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if q.return_documents:
                item["document"] = {"text": q.documents[i]} if shape == "v1" else q.documents[i]
            results.append(item)
        body: dict[str, Any] = {
            "id": request_id,
            "object": "rerank",
            "model": model.name,
            "results": results,
            "usage": {"prompt_tokens": usage, "total_tokens": usage},
            "created": int(time.time()),
        }
        if shape == "v1":
            body["meta"] = {"api_version": {"version": "1"}, "billed_units": {"search_units": 1}}
        return body
