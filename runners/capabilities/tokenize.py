"""Tokenizer routes: token ids and counts (`/tokenize`), TEI's per-token details, and decoding."""

from __future__ import annotations

import asyncio
from typing import Any

from runners.capabilities.base import Capability
from runners.engine.loaded import LoadedModel
from runners.vocabulary import EMBED, UNSPECIFIED_MODELS


class Tokenization(Capability):
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
        self._check_prompted(texts, prompt, "inputs")
        texts = [prompt + t for t in texts]
        return await asyncio.to_thread(model.token_details, texts, special)

    async def decode(self, ids: list[list[int]], model_name: str | None, skip_special: bool = True) -> list[str]:
        model = self.any_model(model_name)
        self._check_token_rows(ids, "ids")
        self._check_vocabulary(model, ids, "ids", allow_empty=True)
        return await asyncio.to_thread(model.decode, ids, skip_special)

    def any_model(self, name: str | None) -> LoadedModel:
        """The named model, else the first embedding model, else the first model (tokenizer routes)."""
        if name and name not in UNSPECIFIED_MODELS:
            return self.registry.find(name)
        models = [m for m in self.registry.models if EMBED in m.capabilities] or self.registry.models
        return models[0] if models else self.registry.resolve(None, EMBED)  # the latter raises "still loading"
