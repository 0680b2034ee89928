"""Embedding: the request's texts as the model reads them (ids decoded, prompted, truncated, checked),
dense vectors shaped as asked (dimensions, normalization, quantized types, base64), and the
sparse and token outputs of multi-output models, from one forward pass."""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Any

import numpy as np

from runners.capabilities import quantize
from runners.capabilities.base import Capability
from runners.capabilities.calibration_corpus import CALIBRATION_TEXTS
from runners.capabilities.queries import EmbedQuery
from runners.engine.registry import LoadedModel
from runners.errors import BadRequest, PayloadTooLarge
from runners.vocabulary import DENSE, EMBED, OUTPUT_CAPABILITY, OUTPUT_KEYS, SPARSE, TOKENS, UNSPECIFIED_MODELS


class Embedding(Capability):
    _calibrations: dict[str, quantize.Calibration]
    _calibration_lock: asyncio.Lock

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

    # ---- sparse and token outputs (runners.models.multi_output) ----

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
        from runners.models.multi_output import MultiInput

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
