"""Classification: label scores per text (softmax, sigmoid for multi-label models, or raw logits)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np

from runners.capabilities.base import Capability
from runners.capabilities.queries import ClassifyQuery
from runners.capabilities.rerank import sigmoid
from runners.vocabulary import CLASSIFY


class Classification(Capability):
    async def classify(self, q: ClassifyQuery) -> dict[str, Any]:
        model = self.registry.resolve(q.model, CLASSIFY)
        self._check_texts(q.texts, "input")
        logits, usage = await self.registry.run(model, CLASSIFY, q.texts)
        rows = np.asarray(np.stack(logits), dtype=np.float64)
        if not q.raw_scores:
            if model.multi_label:
                rows = sigmoid(rows)
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
