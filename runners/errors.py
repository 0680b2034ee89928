"""One error tree: every failure a request can meet, with its HTTP status and OpenAI envelope.

Both front doors use it: the HTTP routes answer `status` with `envelope()`, the RunPod adapter
fails the job with `job_error()`.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def tei(self) -> tuple[int, dict[str, Any]]:
        """Status and body under `/tei`, as Text Embeddings Inference answers: `{"error", "error_type"}`
        with TEI's statuses (validation 422, empty 400, overloaded 429, unhealthy 503, backend 424)."""
        status = self.status
        if self.code == "empty_input":
            error_type, status = "Empty", 400
        elif status == 429:
            error_type = "Overloaded"
        elif status == 503:
            error_type = "Unhealthy"
        elif status < 500:
            error_type = "Validation"
            # TEI's one model is never "not found": a request it cannot serve is its 422 (its OpenAPI
            # document lists no 404 on any route).
            status = 422 if status == 400 or self.code == ModelNotFound.code else status
        else:
            error_type = "Backend"
            status = 424 if status in (500, 507) else status
        return status, {"error": self.message, "error_type": error_type}

    def job_error(self) -> dict[str, Any]:
        """The RunPod job output: FAILED, with the same type, status and message as HTTP."""
        return {"error": f"{self.status} {self.type}: {self.message}", "status_code": self.status,
                "type": self.type, "param": self.param, "code": self.code}


class BadRequest(ServiceError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ServiceError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(ServiceError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLarge(ServiceError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class SchemaError(ServiceError):
    status = 422
    type = "invalid_request_error"
    code = "invalid_schema"


class Overloaded(ServiceError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class Unavailable(ServiceError):
    status = 503
    type = "server_error"
    code = "not_ready"


class Timeout(ServiceError):
    status = 504
    type = "server_error"
    code = "timeout"


class ModelError(ServiceError):
    """The model raised on this request's batch; the model keeps serving other requests."""

    status = 500
    type = "server_error"
    code = "model_error"


class OutOfMemory(ServiceError):
    """One input alone does not fit the device's memory."""

    status = 507
    type = "server_error"
    code = "out_of_memory"


class StorageFull(ServiceError):
    """DATA_DIR has no room (or cannot be written): what was committed before stays."""

    status = 507
    type = "server_error"
    code = "data_dir_full"


class InternalError(ServiceError):
    status = 500
    type = "server_error"
    code = "internal_error"


def from_validation_errors(errors: list[dict[str, Any]]) -> SchemaError:
    """A pydantic/FastAPI error list → one 422 that names the first bad field and says what is wrong."""
    if not errors:
        return SchemaError("the request body does not match the schema")
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",))
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    first = errors[0].get("loc", ())
    param = ".".join(str(p) for p in first if p != "body") or None
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return SchemaError("invalid request: " + "; ".join(parts) + more, param=param)
