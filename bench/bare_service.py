"""The floor under any BentoML embedding service: one route that returns a fixed vector, no model.

    bentoml serve bench.bare_service:BareService --port 3100                       # tracing skipped for the route
    BARE_SERVICE_TRACING=1 bentoml serve bench.bare_service:BareService --port 3100 # BentoML's default: traced

bench.run's zero-cost rows post the same OpenAI body to it as to the service. BentoML 1.4 wraps every
route in OpenTelemetry's ASGI middleware; `tracing={"excluded_urls": [...]}` skips it for the routes named
(FIELD_NOTES, "Serving under stress"), so the two variants show what that middleware costs.
"""

from __future__ import annotations

import os

import bentoml

ROUTE = "/v1/embeddings"
DIMENSIONS = 32
TRACED = os.environ.get("BARE_SERVICE_TRACING", "") not in ("", "0")
RESPONSE = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.125] * DIMENSIONS}],
    "model": "zero-cost",
    "usage": {"prompt_tokens": 1, "total_tokens": 1},
}


@bentoml.service(
    name="bench-bare",
    workers=1,
    logging={"access": {"enabled": False}},
    traffic={"max_concurrency": 512},
    **({} if TRACED else {"tracing": {"excluded_urls": [ROUTE]}}),
)
class BareService:
    @bentoml.api(route=ROUTE)
    async def embeddings(self, input: list[str], model: str = "") -> dict:
        return RESPONSE
