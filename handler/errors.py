"""One error tree and one renderer.

Every error reaches the client as `{"error": {"code", "message", "request_id", "field"?, "details"?}}`.
A 500 never carries a traceback or exception text: the log line has the details, the body has the request id.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from flask import Flask, Response, g, jsonify
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException

from handler.logs import current_request_id
from pipelines import errors as pe

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base: an HTTP status, a stable code and a message that is safe to show."""

    status = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details
        self.headers = headers or {}


class InvalidRequest(ServiceError):
    status, code = 422, "invalid_request"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    """A request id that was already charged, or is being generated right now (handler.records.ledger)."""

    status, code = 409, "duplicate_request"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class Busy(ServiceError):
    status, code = 429, "busy"


class TooManyAuthFailures(ServiceError):
    """A client address with too many failed authentication attempts (handler.security.auth.FailureLimiter): refused
    without its credentials being checked until `Retry-After` seconds have passed."""

    status, code = 429, "too_many_auth_failures"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class Timeout(NotReady):
    """A generation request ran past `queue.timeout_seconds`: it fails and is not charged."""

    code = "timeout"


class DatabaseUnavailable(NotReady):
    """The records database cannot be reached (handler.records.db). Raised as such, nothing of the request was
    committed, so it is not charged; a write whose COMMIT was sent but not acknowledged is `CommitUnacknowledged`
    instead, and a generation's charge whose outcome could not be read back is `ChargeUnknown`."""

    code = "database_unavailable"


class CommitUnacknowledged(DatabaseUnavailable):
    """The connection was lost during a COMMIT (handler.records.db): the transaction may have landed or not. The
    ledger reads its outcome back (handler.records.ledger); any other write answers 503 `database_unavailable` with
    a message that does not claim nothing was written."""


class ChargeUnknown(NotReady):
    """A generation's charge was committed without an acknowledgement and the records database stayed unreachable,
    so whether it landed is unknown (handler.records.ledger). A retry with the same Idempotency-Key resolves it: 409
    with the charge (and where its images are) if it was charged, a fresh generation if not. `result` holds the
    response the generation made, for a caller that can wait for the database to tell (handler.runtime.tasks)."""

    code = "charge_unknown"
    result: dict[str, Any] | None = None


class StorageUnavailable(NotReady):
    """Saved images could not be written or read back (disk full, read-only mount, OSS error): a generation
    that fails this way is not charged (handler.storage.outputs)."""

    code = "storage_unavailable"


class ErrorBody(BaseModel):
    """The error object (documented in the OpenAPI document)."""

    code: str
    message: str
    request_id: str
    field: str | None = None
    details: list[dict[str, Any]] | None = None


class ErrorModel(BaseModel):
    """The single error shape of every non-2xx response."""

    error: ErrorBody


_PIPELINE_STATUS: tuple[tuple[type[pe.PipelineError], int], ...] = (
    (pe.ModelNotFound, 404),
    (pe.InvalidParameter, 422),
    (pe.CheckpointError, 422),
)


def error_response(status: int, code: str, message: str, *, field: str | None = None,
                   details: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None) -> Response:
    """Render one error in the single JSON shape."""
    body: dict[str, Any] = {"code": code, "message": message, "request_id": current_request_id()}
    g.error_code = code  # the app's after_request puts it on the request's meter (ledger, request log)
    if field is not None:
        body["field"] = field
    if details:
        body["details"] = details
    response = jsonify({"error": body})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def _field_name(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if part not in ("body", "__root__")) or "body"


def validation_error_response(exc: ValidationError) -> Response:
    """422 naming every invalid field; the first one is `field` and leads the message."""
    details = []
    for err in exc.errors(include_url=False, include_input=False):
        name = _field_name(tuple(err.get("loc", ())))
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        details.append({"field": name, "message": message, "type": err.get("type", "")})
    if not details:
        details = [{"field": "body", "message": "the request body must be a JSON object", "type": "json"}]
    first = details[0]
    message = f"{first['field']}: {first['message']}"
    if first["field"] == "body" and first["type"] in ("model_type", "model_attributes_type"):
        message = "body: the request body must be a JSON object"
    return error_response(422, "invalid_request", message, field=first["field"], details=details)


def register_error_handlers(app: Flask) -> None:
    """Install the one renderer for service, pipeline, validation, HTTP and unexpected errors."""

    @app.errorhandler(ServiceError)
    def _service(exc: ServiceError) -> Response:
        if exc.status >= 500:
            log.error("service error %s: %s", exc.code, exc.message)
        return error_response(exc.status, exc.code, exc.message, field=exc.field, details=exc.details,
                              headers=exc.headers)

    @app.errorhandler(pe.PipelineError)
    def _pipeline(exc: pe.PipelineError) -> Response:
        for cls, status in _PIPELINE_STATUS:
            if isinstance(exc, cls):
                return error_response(status, exc.code, exc.message, field=exc.field)
        log.exception("unmapped pipeline error")
        return error_response(500, "internal_error", "internal error; see the log for this request id")

    @app.errorhandler(ValidationError)
    def _validation(exc: ValidationError) -> Response:
        return validation_error_response(exc)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        if isinstance(exc.response, Response) and exc.code == 422:
            return exc.response  # flask-openapi3's abort() carrying our rendered validation error
        status = exc.code or 500
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(status, "http_error")
        message = exc.description or exc.name
        if status == 413:
            message = "request body too large"
        headers = {k: v for k, v in exc.get_headers() if k.lower() == "allow"}
        return error_response(status, code, message, headers=headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        if out_of_memory(exc):  # the cache was trimmed on the device thread (handler.runtime.engine)
            what = "host" if isinstance(exc, MemoryError) else "device"
            log.error("out of %s memory", what)
            message = "out of memory" if what == "host" else "out of device memory"
            return error_response(503, "out_of_memory", f"{message}; retry with a smaller size or batch",
                                  headers={"Retry-After": "5"})
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; see the log for this request id")


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is torch's out-of-memory error (CUDA or another accelerator) or host RAM running out
    (MemoryError); never imports torch (an error from torch means it is loaded)."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)
