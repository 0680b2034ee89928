"""This worker process's service methods, as the route handlers reach them. Plain module state rather
than the service class's `self`: BentoML gives a FastAPI route method its `self` through a
synchronous dependency, which costs every request a trip through a thread pool."""

from __future__ import annotations

from typing import TYPE_CHECKING

from runners.errors import Unavailable

if TYPE_CHECKING:  # BentoML's serving process imports the routes too, and never serves a model
    from runners.capabilities.service import InferenceService

_service: InferenceService | None = None


def bind(service: InferenceService) -> None:
    global _service
    _service = service


def inference() -> InferenceService:
    if _service is None:
        raise Unavailable("the service is still starting: retry when GET /readyz answers 200")
    return _service
