"""The service methods: one per capability, called by the HTTP routes and the RunPod adapter alike.

Each takes the internal query of its capability (`runners.capabilities.queries`), checks it against
the limits and the model, runs it on the model's engine (`runners.engine.registry`) and returns the
response body as a dict. `InferenceService` is their composition, one module per capability:
embed (`embed.py`, with sparse and token outputs; `image_embed.py` for images), rerank (`rerank.py`),
classify (`classify.py`), tokenize (`tokenize.py`); what they share is in `base.py`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from runners.capabilities.classify import Classification
from runners.capabilities.image_embed import ImageEmbedding
from runners.capabilities.queries import ClassifyQuery, EmbedQuery, RerankQuery
from runners.capabilities.rerank import Reranking
from runners.capabilities.tokenize import Tokenization
from runners.engine.loaded import LoadedModel
from runners.engine.registry import EngineRegistry
from runners.settings import Settings
from runners.vocabulary import CLASSIFY, EMBED, IMAGE_EMBED, RERANK


class InferenceService(ImageEmbedding, Reranking, Classification, Tokenization):
    def __init__(self, settings: Settings, registry: EngineRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or EngineRegistry(settings)
        self._calibrations = {}
        self._calibration_lock = asyncio.Lock()

    async def start(self) -> None:
        await self.registry.start(warmup=self._warmup)

    async def stop(self) -> None:
        await self.registry.stop()

    @property
    def ready(self) -> bool:
        return self.registry.serving

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
        if IMAGE_EMBED in model.capabilities:
            await self._warmup_images(model)
        model.stats = type(model.stats)()
