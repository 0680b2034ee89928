"""The OpenAPI document at /docs.json: the error responses this service really sends, documented on
every operation (BentoML documents its own error bodies)."""

from __future__ import annotations

from typing import Any

from runners.api.responses import HEALTH_PATHS, METRICS_PATHS, TEI_OPENAI_EMBEDDINGS, is_tei

ERROR_ENVELOPE_SCHEMA = {
    "title": "ErrorEnvelope",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}
TEI_ERROR_SCHEMA = {
    "title": "TeiError",
    "type": "object",
    "required": ["error", "error_type"],
    "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
}
TEI_OPENAI_ERROR_SCHEMA = {
    "title": "TeiOpenAIError",
    "type": "object",
    "required": ["message", "code", "type", "error_type"],
    "properties": {"message": {"type": "string"}, "code": {"type": "integer"}, "type": {"type": "string"},
                   "error_type": {"type": "string"}},
}
TEI_RANKS_SCHEMA = {
    "type": "array",
    "items": {"type": "object", "required": ["index", "score"],
              "properties": {"index": {"type": "integer"}, "score": {"type": "number"}, "text": {"type": "string"}}},
}
_ERROR_STATUSES = {"400": "Bad request", "401": "Missing or wrong API key", "404": "Unknown model or route",
                   "413": "Over a size limit", "422": "Body does not match the schema",
                   "429": "Queue full: retry later", "500": "Server error (model_error: the model raised on this request)",
                   "503": "Not ready, or a model is out of service", "504": "Timed out",
                   "507": "One input alone does not fit the device's memory",
                   "424": "TEI routes: the model failed on this request (TEI's Backend error)"}


DESCRIPTION = ("Text embeddings, reranking and classification: native, OpenAI, Jina, Cohere and Text Embeddings "
               "Inference compatible routes. Errors are answered in the OpenAI envelope (TEI's body under /tei).")


def openapi_with_envelopes(doc: dict[str, Any]) -> dict[str, Any]:
    """BentoML documents its own error bodies; the service answers in the OpenAI envelope. BentoML's
    description of a service served from source is its README with badge images from img.shields.io and
    others, which an API viewer would load: the service describes itself."""
    doc.setdefault("info", {})["description"] = DESCRIPTION
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorEnvelope"] = ERROR_ENVELOPE_SCHEMA
    schemas["TeiError"] = TEI_ERROR_SCHEMA
    schemas["TeiOpenAIError"] = TEI_OPENAI_ERROR_SCHEMA
    envelope = {"$ref": "#/components/schemas/ErrorEnvelope"}
    for path, item in doc.get("paths", {}).items():
        if path in HEALTH_PATHS or path in METRICS_PATHS:
            continue
        ref = {"$ref": "#/components/schemas/TeiError"} if is_tei(path) else envelope
        if path == TEI_OPENAI_EMBEDDINGS:
            ref = {"$ref": "#/components/schemas/TeiOpenAIError"}
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            if path == "/rerank":  # a TEI body there gets TEI's answer (runners.api.schemas.RerankRequest)
                for media in operation["responses"].get("200", {}).get("content", {}).values():
                    media["schema"] = {"anyOf": [media.get("schema", {}), TEI_RANKS_SCHEMA]}
            for status, description in _ERROR_STATUSES.items():
                operation["responses"][status] = {
                    "description": description, "content": {"application/json": {"schema": ref}},
                }
    return doc
