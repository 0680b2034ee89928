"""The service methods: one per capability, called by the HTTP routes and the RunPod adapter alike.

Each takes the internal query of its capability (`runners.schemas`), checks it against the limits
and the model, runs it on the model's engine and returns the response body as a dict.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any

import numpy as np

from runners import metrics, quantize
from runners.calibration_corpus import CALIBRATION_TEXTS
from runners.engines import CLASSIFY, EMBED, RERANK, SPARSE_EMBED, TOKEN_EMBED, EngineRegistry, LoadedModel
from runners.errors import BadRequest, PayloadTooLarge
from runners.qwen3 import embedding_instruction, rerank_body_start
from runners.schemas import UNSPECIFIED_MODELS, ClassifyQuery, EmbedQuery, RerankQuery
from runners.settings import Settings

DENSE, SPARSE, TOKENS = "dense", "sparse", "tokens"  # the outputs a request may ask for (runners.sparse)
OUTPUT_CAPABILITY = {DENSE: EMBED, SPARSE: SPARSE_EMBED, TOKENS: TOKEN_EMBED}
OUTPUT_KEYS = {DENSE: "dense_embedding", SPARSE: "sparse_embedding", TOKENS: "token_embeddings"}
MAXSIM_CHUNK = 128  # documents whose ColBERT token vectors are held at once while reranking


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-logits))


class InferenceService:
    def __init__(self, settings: Settings, registry: EngineRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or EngineRegistry(settings)
        self._calibrations: dict[str, quantize.Calibration] = {}
        self._calibration_lock = asyncio.Lock()
        metrics.watch_queues(lambda: [(m.name, m.in_flight) for m in self.registry.models])

    async def start(self) -> None:
        await self.registry.start(warmup=self._warmup)

    async def stop(self) -> None:
        await self.registry.stop()

    @property
    def ready(self) -> bool:
        return self.registry.serving

    @staticmethod
    def _account(model: LoadedModel, capability: str, items: int, tokens: int) -> None:
        model.stats.requests += 1
        model.stats.items += items
        model.stats.tokens += tokens
        counters = metrics.of(model.name, capability)
        counters.requests.inc()
        counters.items.inc(items)
        counters.tokens.inc(tokens)
        counters.request_items.observe(items)

    # ---- limits ----

    def _check_count(self, count: int, param: str) -> None:
        if not count:
            raise BadRequest(f"'{param}' is empty: send at least one text", param=param, code="empty_input")
        if count > self.settings.max_items:
            raise PayloadTooLarge(
                f"'{param}' has {count} items; the limit is MAX_ITEMS_PER_REQUEST={self.settings.max_items}: "
                "split the request",
                param=param,
                code="too_many_items",
            )

    def _check_texts(self, texts: list[str], param: str) -> None:
        self._check_count(len(texts), param)
        for i, text in enumerate(texts):
            if not text:
                raise BadRequest(f"'{param}[{i}]' is an empty string: send non-empty text", param=param,
                                 code="empty_input")
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise BadRequest(
                        f"'{param}[{i}]' holds a lone UTF-16 surrogate ({text[exc.start]!r}) at character {exc.start}: "
                        "send valid Unicode (escape pairs like \\ud83d\\ude00 must come in pairs)",
                        param=param, code="invalid_text",
                    ) from None
            if len(text) > self.settings.max_chars:
                raise PayloadTooLarge(
                    f"'{param}[{i}]' has {len(text)} characters; the limit is "
                    f"MAX_CHARS_PER_TEXT={self.settings.max_chars}",
                    param=param,
                    code="text_too_long",
                )

    async def _reject_long(self, model: LoadedModel, texts: list[str], param: str) -> None:
        """`truncate: false`: a text longer than the model's window is an error, not silently cut."""
        lengths = [len(ids) for ids in await asyncio.to_thread(model.tokenize, texts)]
        for i, n in enumerate(lengths):
            if n > model.max_tokens:
                raise PayloadTooLarge(
                    f"'{param}[{i}]' has {n} tokens; model {model.name!r} reads at most {model.max_tokens}: "
                    "shorten it or send truncate: true",
                    param=param,
                    code="text_too_long",
                )

    # ---- embed ----

    def _prompt(self, model: LoadedModel, input_type: str | None, instruction: str | None,
                prompt_name: str | None = None) -> str:
        if prompt_name is not None:
            if prompt_name not in model.prompts:
                known = ", ".join(sorted(model.prompts)) or "none"
                raise BadRequest(f"prompt_name {prompt_name!r} is not a prompt of model {model.name!r} (its prompts: {known})",
                                 param="prompt_name", code="unknown_prompt")
            return model.prompts[prompt_name]
        if instruction is not None:
            # Instruction models (Qwen3, gte-Qwen, e5-mistral) take the task inside their template;
            # for any other model the instruction is the prefix itself.
            if model.prompts.get("query", "").startswith("Instruct:"):
                return embedding_instruction(instruction)
            return instruction
        if input_type == "query":
            return model.prompts.get("query", "")
        if input_type == "document":
            return model.prompts.get("document", model.prompts.get("passage", ""))
        return ""

    @staticmethod
    def _check_vocabulary(model: LoadedModel, ids: list[list[int]], param: str, allow_empty: bool = False) -> None:
        """Every id inside the model's vocabulary (and, for inputs, no empty row), named by its row."""
        vocab = model.vocab_size
        for i, row in enumerate(ids):
            if not row and not allow_empty:
                raise BadRequest(f"'{param}[{i}]' is an empty token list", param=param)
            bad = next((t for t in row if t < 0 or t >= vocab), None)
            if bad is not None:
                raise BadRequest(
                    f"'{param}[{i}]' has token id {bad}, outside the vocabulary of {model.name!r} (0..{vocab - 1})",
                    param=param,
                )

    async def _texts_from_ids(self, model: LoadedModel, ids: list[list[int]]) -> list[str]:
        self._check_vocabulary(model, ids, "input")
        return await asyncio.to_thread(model.decode, ids)

    async def embed_vectors(self, model: LoadedModel, texts: list[str]) -> tuple[np.ndarray, int]:
        embeddings, usage = await self.registry.run(model, EMBED, texts)
        return np.asarray(np.stack(embeddings), dtype=np.float32), int(usage)

    async def _cut_start(self, model: LoadedModel, texts: list[str], prompt: str = "") -> list[str]:
        """Truncation from the left (TEI `truncation_direction: left`, Cohere `truncate: START`): a text
        longer than the model's window keeps its last tokens, so the model reads its end (and the prompt
        that goes before it)."""

        def cut() -> list[str]:
            reserved = len(model.tokenize([prompt], special=True)[0]) if prompt else len(model.tokenize([""])[0])
            room = model.max_tokens - reserved
            rows = model.tokenize(texts, special=False)
            if all(len(row) <= room for row in rows):
                return texts
            return [t if len(row) <= room else model.decode([row[len(row) - room:]])[0] for t, row in zip(texts, rows)]

        return await asyncio.to_thread(cut)

    async def _texts(self, model: LoadedModel, q: EmbedQuery) -> list[str]:
        """The request's texts as the model reads them: ids decoded, checked, prompted, truncated."""
        if q.token_ids is not None:
            self._check_count(len(q.token_ids), "input")  # before decoding thousands of rows
            texts = await self._texts_from_ids(model, q.token_ids)
        else:
            texts = q.texts or []
        self._check_texts(texts, "input")
        if q.dimensions is not None and model.dimensions is not None and q.dimensions > model.dimensions:
            raise BadRequest(
                f"dimensions={q.dimensions} is larger than the {model.dimensions} dimensions of {model.name!r}",
                param="dimensions",
            )
        prompt = self._prompt(model, q.input_type, q.instruction, q.prompt_name)
        if q.truncate and q.truncate_left:
            texts = await self._cut_start(model, texts, prompt)
        if prompt:
            texts = [prompt + t for t in texts]
        if not q.truncate:
            await self._reject_long(model, texts, "input")
        return texts

    @staticmethod
    def _shape(vectors: np.ndarray, q: EmbedQuery) -> np.ndarray:
        """`dimensions` (first d components) and normalization, as the request asks."""
        if q.dimensions is not None:
            vectors = vectors[:, : q.dimensions]
        if q.normalize or q.dimensions is not None:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return vectors

    async def embed_matrix(self, q: EmbedQuery) -> tuple[LoadedModel, np.ndarray, int]:
        """The request's vectors (after `dimensions` and normalization) and the tokens the model read."""
        model = self.registry.resolve(q.model, EMBED)
        texts = await self._texts(model, q)
        vectors, usage = await self.embed_vectors(model, texts)
        vectors = self._shape(vectors, q)
        self._account(model, EMBED, len(texts), usage)
        return model, vectors, usage

    async def encoded(self, model: LoadedModel, vectors: np.ndarray, q: EmbedQuery, embedding_type: str,
                      base64_out: bool = False) -> list[Any]:
        """Rows as the response carries them: floats or quantized integers, as lists or base64 strings."""
        if embedding_type == "float":
            if base64_out:
                return [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
            return vectors.tolist()
        calibration = await self.calibration(model) if embedding_type in ("int8", "uint8") else None
        rows = quantize.quantize(vectors, embedding_type, calibration, dimensions=q.dimensions, normalize=q.normalize)
        return quantize.to_base64(rows) if base64_out else quantize.to_json(rows)

    async def calibration(self, model: LoadedModel) -> quantize.Calibration:
        """Per-dimension ranges for int8/uint8, learnt once per model from a built-in corpus (on first use,
        so a server that never quantizes never pays for it)."""
        found = self._calibrations.get(model.name)
        if found is not None:
            return found
        async with self._calibration_lock:
            if model.name not in self._calibrations:
                vectors, _ = await self.embed_vectors(model, list(CALIBRATION_TEXTS))
                self._calibrations[model.name] = quantize.Calibration(vectors)
        return self._calibrations[model.name]

    async def embed(self, q: EmbedQuery) -> dict[str, Any]:
        if q.outputs != (DENSE,):
            return await self.embed_outputs(q)
        model, vectors, usage = await self.embed_matrix(q)
        data = await self.encoded(model, vectors, q, q.embedding_types[0], q.encoding_format == "base64")
        return {
            "object": "list",
            "model": model.name,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": usage, "total_tokens": usage},
        }

    # ---- sparse and token outputs (runners.sparse) ----

    def _model_with(self, name: str | None, outputs: tuple[str, ...]) -> LoadedModel:
        """The named model if it gives every asked output, else the first model that does."""
        def gives(m: LoadedModel) -> bool:
            return all(o in m.outputs or (o == DENSE and EMBED in m.capabilities) for o in outputs)

        if name and name not in UNSPECIFIED_MODELS:
            model = self.registry.find(name)
            if not gives(model):
                has = ", ".join(model.outputs or ((DENSE,) if EMBED in model.capabilities else ())) or "none"
                raise BadRequest(f"model {model.name!r} cannot give {'+'.join(outputs)} outputs (its outputs: {has})",
                                 param="output", code="unsupported_capability")
            return model
        for model in self.registry.models:
            if gives(model):
                return model
        self.registry.resolve(None, OUTPUT_CAPABILITY[outputs[-1]])  # raises "still loading" or "none can"
        raise BadRequest(f"no served model gives {'+'.join(outputs)} outputs together: serve a model that has them all "
                         "(BGE-M3 has dense, sparse and tokens)", param="output", code="unsupported_capability")

    async def multi_outputs(self, q: EmbedQuery) -> tuple[LoadedModel, list[dict[str, Any]], int]:
        """Per text a dict of the asked outputs: dense (shaped as the request asks), sparse
        (indices ascending, values; `sparse_top_k` keeps the largest) and tokens, one forward pass."""
        from runners.sparse import MultiInput

        model = self._model_with(q.model, q.outputs)
        texts = await self._texts(model, q)
        if TOKENS in q.outputs:
            await self._check_token_vector_size(model, texts)
        query = q.input_type == "query" or q.instruction is not None
        results, usage = await self.registry.run(model, OUTPUT_CAPABILITY[q.outputs[0]],
                                                 [MultiInput(t, q.outputs, query) for t in texts])
        rows: list[dict[str, Any]] = []
        dense = self._shape(np.stack([r[DENSE] for r in results]).astype(np.float32), q) if DENSE in q.outputs else None
        for i, r in enumerate(results):
            row: dict[str, Any] = {}
            if dense is not None:
                row[DENSE] = dense[i]
            if SPARSE in q.outputs:
                ids, values = r[SPARSE]
                if q.sparse_top_k is not None and len(ids) > q.sparse_top_k:
                    keep = np.sort(np.argpartition(-values, q.sparse_top_k - 1)[: q.sparse_top_k])
                    ids, values = ids[keep], values[keep]
                row[SPARSE] = {"indices": ids.tolist(), "values": values.tolist()}
            if TOKENS in q.outputs:
                row[TOKENS] = r[TOKENS]
            rows.append(row)
        self._account(model, OUTPUT_CAPABILITY[q.outputs[0]], len(texts), int(usage))
        return model, rows, int(usage)

    async def _check_token_vector_size(self, model: LoadedModel, texts: list[str]) -> None:
        """Token vectors are tokens × dims floats per text, all held until the request is answered:
        a request whose vectors would pass MAX_TOKEN_VECTORS_MB is refused before the model runs."""
        lengths = [min(len(ids), model.max_tokens) for ids in await asyncio.to_thread(model.tokenize, texts)]
        size = sum(lengths) * (model.token_dimensions or model.dimensions or 1) * 4
        limit = self.settings.max_token_vector_mb << 20
        if size > limit:
            raise PayloadTooLarge(
                f"the token vectors of these {len(texts)} texts ({sum(lengths)} tokens) would take {size / 2**20:.1f} MiB; "
                f"the limit is MAX_TOKEN_VECTORS_MB={self.settings.max_token_vector_mb}: split the request",
                param="input", code="too_many_tokens")

    async def embed_outputs(self, q: EmbedQuery) -> dict[str, Any]:
        """`output` other than dense: the first asked output under `embedding`, the others under their keys."""
        model, rows, usage = await self.multi_outputs(q)
        first = q.outputs[0]
        dense = np.stack([r[DENSE] for r in rows]) if DENSE in q.outputs else None
        encoded = await self.encoded(model, dense, q, q.embedding_types[0], q.encoding_format == "base64") \
            if dense is not None else None
        data = []
        for i, row in enumerate(rows):
            item: dict[str, Any] = {"object": "embedding", "index": i}
            for name in q.outputs:
                value = encoded[i] if name == DENSE else row[name]
                if name == TOKENS:
                    vectors = np.asarray(value, dtype=np.float32)
                    # base64: the [tokens, token_dimensions] float32 matrix, little-endian, row after row
                    value = base64.b64encode(vectors.astype("<f4").tobytes()).decode("ascii") \
                        if q.encoding_format == "base64" else vectors.tolist()
                item["embedding" if name == first else OUTPUT_KEYS[name]] = value
            data.append(item)
        return {"object": "list", "model": model.name, "data": data,
                "usage": {"prompt_tokens": usage, "total_tokens": usage}}

    async def cohere_embed(self, q: EmbedQuery) -> dict[str, Any]:
        """Cohere's embed v2 response: one list of rows per asked type."""
        model, vectors, usage = await self.embed_matrix(q)
        embeddings = {t: await self.encoded(model, vectors, q, t) for t in q.embedding_types}
        return {
            "id": str(uuid.uuid4()),
            "response_type": "embeddings_by_type",
            "embeddings": embeddings,
            "texts": list(q.texts or []),
            "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": usage}},
        }

    # ---- tokenize ----

    async def tokenize(self, texts: list[str], model_name: str | None, special: bool = True) -> dict[str, Any]:
        """Token ids and counts per text (`POST /tokenize`): what a client needs to budget tokens."""
        model = self.any_model(model_name)
        self._check_texts(texts, "input")
        with_special, without = await asyncio.to_thread(
            lambda: (model.tokenize(texts, special=True), model.tokenize(texts, special=False)))
        rows = with_special if special else without
        return {
            "object": "list",
            "model": model.name,
            "max_tokens": model.max_tokens,
            "data": [
                {"index": i, "ids": ids, "count": len(ids), "count_with_special": len(full),
                 "count_without_special": len(body), "truncated": len(full) > model.max_tokens}
                for i, (ids, full, body) in enumerate(zip(rows, with_special, without))
            ],
        }

    async def token_details(self, texts: list[str], model_name: str | None, special: bool = True,
                            prompt_name: str | None = None) -> list[list[dict[str, Any]]]:
        """TEI's `/tokenize`: per token its id, text, whether it is special, and its character span."""
        model = self.any_model(model_name)
        self._check_texts(texts, "inputs")
        prompt = self._prompt(model, None, None, prompt_name) if prompt_name else ""
        texts = [prompt + t for t in texts]
        return await asyncio.to_thread(model.token_details, texts, special)

    async def decode(self, ids: list[list[int]], model_name: str | None, skip_special: bool = True) -> list[str]:
        model = self.any_model(model_name)
        self._check_count(len(ids), "ids")
        self._check_vocabulary(model, ids, "ids", allow_empty=True)
        return await asyncio.to_thread(model.decode, ids, skip_special)

    def any_model(self, name: str | None) -> LoadedModel:
        """The named model, else the first embedding model, else the first model (tokenizer routes)."""
        if name and name not in UNSPECIFIED_MODELS:
            return self.registry.find(name)
        models = [m for m in self.registry.models if EMBED in m.capabilities] or self.registry.models
        return models[0] if models else self.registry.resolve(None, EMBED)  # the latter raises "still loading"

    # ---- rerank ----

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
        from runners.sparse import MultiInput

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
        if model.rerank_via == "colbert-maxsim":
            return await self._maxsim_scores(model, q, docs)
        if model.rerank_via == "embedding-cosine":
            query_text = self._prompt(model, "query", q.instruction) + q.query
            doc_prompt = self._prompt(model, "document", None)
            vectors, usage = await self.embed_vectors(model, [query_text] + [doc_prompt + d for d in docs])
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            return (vectors[1:] @ vectors[0]).tolist(), usage
        query = rerank_body_start(q.query, q.instruction) if model.rerank_via == "qwen3-yes-no" else q.query
        logits, usage = await self.registry.run(model, RERANK, [(query, d) for d in docs])
        values = np.asarray(logits, dtype=np.float64).reshape(len(docs))
        if not q.raw_scores:
            values = _sigmoid(values)
        return values.tolist(), int(usage)

    async def rerank(self, q: RerankQuery, shape: str = "native") -> dict[str, Any]:
        """`shape`: "native" (documents as strings), "v1" (Jina/Cohere v1, documents as {text}) or "v2"."""
        model = self.registry.resolve(q.model, RERANK)
        if not q.query:
            raise BadRequest("'query' is an empty string: send the text to rank the documents against", param="query")
        self._check_texts([q.query], "query")
        self._check_texts(q.documents, "documents")
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

    # ---- classify ----

    async def classify(self, q: ClassifyQuery) -> dict[str, Any]:
        model = self.registry.resolve(q.model, CLASSIFY)
        self._check_texts(q.texts, "input")
        logits, usage = await self.registry.run(model, CLASSIFY, q.texts)
        rows = np.asarray(np.stack(logits), dtype=np.float64)
        if not q.raw_scores:
            if model.multi_label:
                rows = _sigmoid(rows)
            else:
                rows = np.exp(rows - rows.max(axis=1, keepdims=True))
                rows /= rows.sum(axis=1, keepdims=True)
        self._account(model, CLASSIFY, len(q.texts), int(usage))
        data = [
            sorted(({"label": label, "score": float(s)} for label, s in zip(model.labels, row)),
                   key=lambda x: -x["score"])
            for row in rows
        ]
        return {
            "object": "classify",
            "id": str(uuid.uuid4()),
            "model": model.name,
            "data": data,
            "usage": {"prompt_tokens": int(usage), "total_tokens": int(usage)},
            "created": int(time.time()),
        }

    # ---- models ----

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [m.describe() for m in self.registry.models]}

    async def _warmup(self, model: LoadedModel) -> None:
        """One real request per capability, so the first user request meets a warm model."""
        if EMBED in model.capabilities:
            await self.embed(EmbedQuery(texts=["warm up"], token_ids=None, model=model.name))
        elif RERANK in model.capabilities:
            await self.rerank(RerankQuery(query="warm up", documents=["a warm-up document"], model=model.name))
        elif CLASSIFY in model.capabilities:
            await self.classify(ClassifyQuery(texts=["warm up"], model=model.name))
        model.stats = type(model.stats)()
