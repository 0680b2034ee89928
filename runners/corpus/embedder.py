"""The engine behind the corpus command and the Ray Data stage: the service's own embedding path
(`InferenceService.dense`: prompts, dimensions, normalization, truncation; `quantize` with the model's
calibration) run in this process, or the texts sent to running servers (runners.corpus.client).

`LocalEmbedder` is synchronous from the outside: the service runs on an event loop of its own thread,
and `submit(texts)` returns a future, so a caller keeps several shards in flight while it reads and
writes others. Inside, a shard's texts go to the model's scheduler as concurrent slices; the scheduler
packs batches by length from every slice that is ready (runners.engine.batching), which is where the
throughput comes from.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import threading
from collections.abc import Coroutine, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from runners.corpus.io import CorpusError

SLICE_TEXTS = 256  # texts per request to the scheduler: under MAX_ITEMS_PER_REQUEST, many in flight
SLICE_CHARS = 4 * 1024 * 1024  # and under MAX_CHARS_PER_REQUEST
DTYPES = {"float": np.float32, "int8": np.int8, "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}


@dataclass(frozen=True)
class EmbedOptions:
    """What the vectors are: the same fields, with the same meaning, as the embeddings routes'."""

    model: str | None = None  # in-process: a hub id, a folder or a bento: tag; against servers: a served name
    input_type: str | None = None  # query or document: the model's prompt
    prompt_name: str | None = None
    dimensions: int | None = None
    normalize: bool = True
    embedding_type: str = "float"  # float, int8, uint8, binary, ubinary
    output: str = "dense"  # dense, or sparse ({indices, values} per text: SPLADE, BGE-M3)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def slices(texts: list[str], size: int = SLICE_TEXTS, chars: int = SLICE_CHARS) -> list[tuple[int, int]]:
    """[start, end) ranges of at most `size` texts and about `chars` characters."""
    out, start, total = [], 0, 0
    for i, text in enumerate(texts):
        if i > start and (i - start >= size or total + len(text) > chars):
            out.append((start, i))
            start, total = i, 0
        total += len(text)
    if start < len(texts):
        out.append((start, len(texts)))
    return out


def name_rows(message: str, offset: int) -> str:
    """A service error names `input[i]` of its slice: say which text of the shard it was."""
    return re.sub(r"'input\[(\d+)\]'", lambda m: f"text {offset + int(m.group(1))} of the shard", message)


class SparseRows(list):
    """Per text its sparse vector, (indices ascending, weights) as int32 and float32 arrays."""


class LoopThread:
    """An asyncio event loop on a daemon thread, for synchronous callers."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.submit(coro).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        if not self.thread.is_alive():
            self.loop.close()


def prepare_environment(options: EmbedOptions, env: Mapping[str, str] | None = None) -> Any:
    """The settings of a serving process (runners.api.process) for the options' model, from `env` (default: this
    process's environment, which is not changed): read and checked, the hub offline where the model is local.
    The cache of repeated inputs is off unless CACHE_MB says otherwise: a corpus rarely repeats a text."""
    from runners.models.remote_code import check_local_models
    from runners.settings import SettingsError, apply_offline_defaults, load_settings

    merged = dict(os.environ if env is None else env)
    if options.model:
        merged["MODEL_NAMES"] = options.model
        merged.pop("SERVED_MODEL_NAMES", None)
    merged.setdefault("CACHE_MB", "0")
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # read by libgomp when torch loads (runners.api.process)
    try:
        settings = load_settings(merged)
        check_local_models(settings)
    except SettingsError as exc:
        raise CorpusError(f"configuration error: {exc}") from None
    apply_offline_defaults(settings)
    return settings


class LocalEmbedder:
    """The model in this process; `submit(texts)` → a future of the (len(texts), D) matrix, `close()` stops
    the engine (always: its threads would otherwise keep the process alive)."""

    def __init__(self, options: EmbedOptions | None = None, env: Mapping[str, str] | None = None) -> None:
        from runners.capabilities.service import InferenceService
        from runners.vocabulary import EMBED, EMBEDDING_TYPES, SPARSE

        self.options = options or EmbedOptions()
        if self.options.embedding_type not in EMBEDDING_TYPES:
            raise CorpusError(f"embedding type {self.options.embedding_type!r} is not one of {', '.join(EMBEDDING_TYPES)}")
        if self.options.output not in ("dense", SPARSE):
            raise CorpusError(f"output {self.options.output!r}: the corpus command writes dense or sparse vectors")
        if self.options.output == SPARSE and self.options.embedding_type != "float":
            raise CorpusError("sparse vectors are not quantized: leave --embedding-type float with --output sparse")
        settings = prepare_environment(self.options, env)
        self._loop = LoopThread("corpus-engine")
        self.service = InferenceService(settings)
        try:
            self._loop.call(self.service.start())
            # the service's own choice of model for the output (a multi-output checkpoint first for sparse)
            self.model = self.service._model_with(None, (SPARSE,)) if self.options.output == SPARSE \
                else self.service.registry.resolve(None, EMBED)
        except BaseException as exc:
            self.close()
            if isinstance(exc, Exception):
                raise CorpusError(f"the model did not load: {exc}") from exc
            raise
        self.model_name: str = self.model.name
        self.dimensions: int | None = self.options.dimensions or self.model.dimensions

    def metadata(self) -> dict[str, Any]:
        o = self.options
        return {"model": self.model_name, "dimensions": self.dimensions, "output": o.output,
                "embedding_type": o.embedding_type,
                "normalize": o.normalize, "input_type": o.input_type or "", "prompt_name": o.prompt_name or ""}

    async def _slice(self, texts: list[str], offset: int) -> np.ndarray:
        from runners.capabilities.queries import EmbedQuery
        from runners.errors import ServiceError

        o = self.options
        query = EmbedQuery(texts=texts, token_ids=None, model=self.model_name, input_type=o.input_type,
                           prompt_name=o.prompt_name, dimensions=o.dimensions, normalize=o.normalize,
                           outputs=(o.output,))
        try:
            if o.output == "sparse":
                _, rows, _ = await self.service.multi_outputs(query)
                return SparseRows((np.asarray(r["sparse"]["indices"], dtype=np.int32),
                                   np.asarray(r["sparse"]["values"], dtype=np.float32)) for r in rows)
            dense = await self.service.dense(query)
        except ServiceError as exc:
            raise CorpusError(name_rows(str(exc), offset)) from None
        return dense.vectors

    async def embed_async(self, texts: list[str]) -> np.ndarray:
        from runners.capabilities import quantize

        parts = await asyncio.gather(*(self._slice(texts[a:b], a) for a, b in slices(texts)))
        o = self.options
        if o.output == "sparse":
            return SparseRows(row for part in parts for row in part)
        vectors = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if o.embedding_type == "float":
            return np.ascontiguousarray(vectors, dtype=np.float32)
        calibration = await self.service.calibration(self.model) if o.embedding_type in ("int8", "uint8") else None
        return quantize.quantize(vectors, o.embedding_type, calibration, dimensions=o.dimensions, normalize=o.normalize)

    def submit(self, texts: list[str]) -> concurrent.futures.Future:
        return self._loop.submit(self.embed_async(texts))

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.submit(texts).result()

    def close(self) -> None:
        service = getattr(self, "service", None)
        if service is not None and not self._loop.loop.is_closed():
            try:
                self._loop.call(service.stop())
            finally:
                self.service = None
        self._loop.close()

    def __enter__(self) -> LocalEmbedder:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
