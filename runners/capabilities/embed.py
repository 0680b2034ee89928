"""Embedding: the request's texts as the model reads them (ids decoded, prompted, truncated, checked),
dense vectors shaped as asked (dimensions, normalization, quantized types, base64), the sparse and
token outputs of multi-output models from one forward pass (token vectors of ordinary embedding
models too), and inputs longer than the window (chunking, late chunking: runners.capabilities.long_inputs)."""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Any, NamedTuple

import numpy as np

from runners.capabilities import quantize
from runners.capabilities.calibration_corpus import CALIBRATION_TEXTS
from runners.capabilities.long_inputs import LongInputs
from runners.capabilities.queries import EmbedQuery
from runners.engine.loaded import LoadedModel
from runners.errors import BadRequest, PayloadTooLarge
from runners.models.token_inputs import TokenRequest
from runners.vocabulary import DENSE, EMBED, OUTPUT_CAPABILITY, OUTPUT_KEYS, SPARSE, TOKENS, UNSPECIFIED_MODELS


class Dense(NamedTuple):
    model: LoadedModel
    vectors: np.ndarray  # one row per input, shaped as the request asks
    usage: int  # tokens the model read
    truncated: int = 0  # inputs longer than the window, of which the model read the first tokens only


def usage_of(tokens: int, truncated: int = 0) -> dict[str, int]:
    """The OpenAI `usage`, with `truncated` (inputs cut to the window) when there were any."""
    return {"prompt_tokens": tokens, "total_tokens": tokens, **({"truncated": truncated} if truncated else {})}


def outputs_of(model: LoadedModel) -> tuple[str, ...]:
    """What `output` may ask of a model: a multi-output model's own outputs; dense for an embedding model,
    and its token vectors when its replica takes token inputs (runners.models.token_inputs)."""
    if model.outputs:
        return model.outputs
    if EMBED not in model.capabilities:
        return ()
    return (DENSE, TOKENS) if model.token_inputs else (DENSE,)


class Embedding(LongInputs):
    _calibrations: dict[str, quantize.Calibration]
    _calibration_lock: asyncio.Lock

    async def _texts_from_ids(self, model: LoadedModel, ids: list[list[int]]) -> list[str]:
        self._check_vocabulary(model, ids, "input")
        return await asyncio.to_thread(model.decode, ids)

    async def embed_vectors(self, model: LoadedModel, texts: list[str],
                            task: str | None | list[str | None] = None) -> tuple[np.ndarray, int]:
        """`task`: a routed model's task (one for all texts, or one per text; `self._task`)."""
        inputs: list[Any] = texts
        if model.route_tasks:
            from runners.models.routed import RoutedText

            tasks = task if isinstance(task, list) else [task] * len(texts)
            inputs = [RoutedText(t, k) for t, k in zip(texts, tasks)]
        embeddings, usage = await self.registry.run(model, EMBED, inputs)
        return np.asarray(np.stack(embeddings), dtype=np.float32), int(usage)

    async def _cut_start(self, model: LoadedModel, texts: list[str], prompt: str = "") -> tuple[list[str], int]:
        """Truncation from the left (TEI `truncation_direction: left`, Cohere `truncate: START`): a text
        longer than the model's window keeps its last tokens, so the model reads its end (and the prompt
        that goes before it)."""

        def cut() -> tuple[list[str], int]:
            reserved = len(model.tokenize([prompt], special=True)[0]) if prompt else len(model.tokenize([""])[0])
            room = model.max_tokens - reserved
            rows = model.tokenize(texts, special=False)
            long = sum(len(row) > room for row in rows)
            if not long:
                return texts, 0
            return [t if len(row) <= room else model.decode([row[len(row) - room:]])[0]
                    for t, row in zip(texts, rows)], long

        return await asyncio.to_thread(cut)

    async def _inputs(self, model: LoadedModel, q: EmbedQuery) -> tuple[list[str], str]:
        """The request's texts (ids decoded, checked) and the model's prompt for them."""
        if q.token_ids is not None:
            self._check_token_rows(q.token_ids, "input")  # before decoding thousands of rows
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
        self._check_prompted(texts, prompt, "input")
        return texts, prompt

    async def _texts(self, model: LoadedModel, q: EmbedQuery) -> tuple[list[str], int]:
        """The request's texts as the model reads them (ids decoded, checked, prompted, truncated), and how
        many of them truncation cuts."""
        texts, prompt = await self._inputs(model, q)
        truncated = 0
        if q.truncate and q.truncate_left:
            texts, truncated = await self._cut_start(model, texts, prompt)
        if prompt:
            texts = [prompt + t for t in texts]
        if not q.truncate:
            await self._reject_long(model, texts, "input")
        elif not q.truncate_left:
            truncated = await self.count_long(model, texts)
        return texts, truncated

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
        dense = await self.dense(q)
        return dense.model, dense.vectors, dense.usage

    async def dense(self, q: EmbedQuery) -> Dense:
        """One vector per input (chunking "mean" and late chunking too), shaped as the request asks."""
        model = self.registry.resolve(q.model, EMBED)
        truncated = 0
        if q.late_chunking or q.chunking is not None:
            self._check_long_query(model, q)
            texts, prompt = await self._inputs(model, q)
            if q.late_chunking:
                vectors, usage = await self.late_chunk_vectors(model, texts, prompt)
            else:
                if q.chunking.pooling == "none":
                    raise BadRequest("chunking.pooling none answers every chunk's vector, which this route's answer "
                                     "cannot carry: use /embed or /v1/embeddings, or pooling mean",
                                     param="chunking.pooling", code="invalid_chunking")
                chunks, vectors, usage = await self.chunk_vectors(model, texts, prompt, q.chunking)
                vectors = self._mean_of_chunks(chunks, self._shape(vectors, q), len(texts))
        else:
            texts, truncated = await self._texts(model, q)
            vectors, usage = await self.embed_vectors(model, texts, self._task(model, q.input_type, q.prompt_name))
        vectors = self._shape(vectors, q)
        self._account(model, EMBED, len(texts), usage)
        return Dense(model, vectors, usage, truncated)

    @staticmethod
    def _mean_of_chunks(chunks: list[Any], vectors: np.ndarray, inputs: int) -> np.ndarray:
        """Per input, its chunks' vectors averaged with weights = their text tokens."""
        weights = np.asarray([max(c.end_token - c.start_token, 1) for c in chunks], dtype=np.float64)
        owner = np.asarray([c.input for c in chunks])
        sums = np.zeros((inputs, vectors.shape[1]), dtype=np.float64)
        np.add.at(sums, owner, vectors * weights[:, None])
        return (sums / np.bincount(owner, weights=weights, minlength=inputs)[:, None]).astype(np.float32)

    async def embed_chunks(self, q: EmbedQuery) -> dict[str, Any]:
        """`chunking.pooling: none`: per input, every chunk's vector (shaped and encoded as asked) and spans."""
        model = self.registry.resolve(q.model, EMBED)
        self._check_long_query(model, q)
        texts, prompt = await self._inputs(model, q)
        chunks, vectors, usage = await self.chunk_vectors(model, texts, prompt, q.chunking)
        encoded = await self.encoded(model, self._shape(vectors, q), q, q.embedding_types[0],
                                     q.encoding_format == "base64")
        self._account(model, EMBED, len(texts), usage)
        data: list[dict[str, Any]] = [{"object": "embedding", "index": i, "chunks": []} for i in range(len(texts))]
        for chunk, embedding in zip(chunks, encoded):
            data[chunk.input]["chunks"].append({"embedding": embedding, **chunk.spans()})
        return {"object": "list", "model": model.name, "data": data, "usage": usage_of(usage)}

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
        if q.chunking is not None and q.chunking.pooling == "none":
            return await self.embed_chunks(q)
        if q.outputs != (DENSE,) and q.chunking is None and not q.late_chunking:
            return await self.embed_outputs(q)
        dense = await self.dense(q)
        data = await self.encoded(dense.model, dense.vectors, q, q.embedding_types[0], q.encoding_format == "base64")
        return {
            "object": "list",
            "model": dense.model.name,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": usage_of(dense.usage, dense.truncated),
        }

    # ---- sparse and token outputs (runners.models.multi_output) ----

    def _model_with(self, name: str | None, outputs: tuple[str, ...]) -> LoadedModel:
        """The named model if it gives every asked output, else the first model that does."""
        def gives(m: LoadedModel, ordinary: bool = True) -> bool:
            has = outputs_of(m) if ordinary or m.outputs else outputs_of(m)[:1]
            return all(o in has for o in outputs)

        if name and name not in UNSPECIFIED_MODELS:
            model = self.registry.find(name)
            if not gives(model):
                has = ", ".join(outputs_of(model)) or "none"
                raise BadRequest(f"model {model.name!r} cannot give {'+'.join(outputs)} outputs (its outputs: {has})",
                                 param="output", code="unsupported_capability")
            return model
        # Unnamed: a model whose checkpoint has the outputs first (BGE-M3, ColBERT), then an ordinary one.
        for ordinary in (False, True):
            for model in self.registry.models:
                if gives(model, ordinary):
                    return model
        self.registry.resolve(None, OUTPUT_CAPABILITY[outputs[-1]])  # raises "still loading" or "none can"
        raise BadRequest(f"no served model gives {'+'.join(outputs)} outputs together: serve a model that has them all "
                         "(BGE-M3 has dense, sparse and tokens)", param="output", code="unsupported_capability")

    async def multi_outputs(self, q: EmbedQuery) -> tuple[LoadedModel, list[dict[str, Any]], int]:
        """Per text a dict of the asked outputs: dense (shaped as the request asks), sparse
        (indices ascending, values; `sparse_top_k` keeps the largest) and tokens, one forward pass."""
        from runners.models.multi_output import MultiInput

        model = self._model_with(q.model, q.outputs)
        texts, _ = await self._texts(model, q)
        if TOKENS in q.outputs:
            await self._check_token_vector_size(model, texts)
        if model.route_tasks:  # a routed sparse model (runners.models.routed)
            from runners.models.routed import RoutedText

            task = self._task(model, q.input_type, q.prompt_name)
            inputs: list[Any] = [RoutedText(t, task) for t in texts]
        elif model.outputs:
            query = q.input_type == "query" or q.instruction is not None
            inputs = [MultiInput(t, q.outputs, query) for t in texts]
        else:  # an ordinary embedding model: its last-layer token vectors (runners.models.token_inputs)
            inputs = [TokenRequest(text=t, tokens=True) for t in texts]
        results, usage = await self.registry.run(model, OUTPUT_CAPABILITY[q.outputs[0]], inputs)
        if not model.outputs:
            results = [{DENSE: r.pooled, TOKENS: r.sums} for r in results]
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
        """Cohere's embed v2 response: one list of rows per asked type (`meta.warnings` says what truncation
        cut)."""
        return (await self.cohere_embed_counted(q))[0]

    async def cohere_embed_counted(self, q: EmbedQuery) -> tuple[dict[str, Any], int]:
        """Cohere's embed v2 response, and how many texts truncation cut (the route's header)."""
        dense = await self.dense(q)
        embeddings = {t: await self.encoded(dense.model, dense.vectors, q, t) for t in q.embedding_types}
        meta: dict[str, Any] = {"api_version": {"version": "2"}, "billed_units": {"input_tokens": dense.usage}}
        if dense.truncated:
            meta["warnings"] = [f"{dense.truncated} of {len(dense.vectors)} texts were longer than the "
                                f"{dense.model.max_tokens} tokens model {dense.model.name!r} reads and were cut "
                                "(truncate: NONE refuses them; the chunking field embeds them whole)"]
        return {
            "id": str(uuid.uuid4()),
            "response_type": "embeddings_by_type",
            "embeddings": embeddings,
            "texts": list(q.texts or []),
            "meta": meta,
        }, dense.truncated
