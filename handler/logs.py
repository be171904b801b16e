"""Logging: one JSON object per line, each carrying the request id of the request being served.

The request id is FC's `x-fc-request-id` header when present, otherwise a generated one; it is kept in a
context variable so that code deep in `pipelines` logs it without knowing about HTTP.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("sdfunc_request_id", default="-")

REQUEST_ID_HEADER = "x-fc-request-id"


def current_request_id() -> str:
    """The id of the request being served in this context, or "-" outside a request."""
    return _request_id.get()


def set_request_id(value: str | None) -> str:
    """Bind the request id for this context; a missing or unusable id is replaced by a fresh uuid4 hex."""
    rid = (value or "").strip()
    if not rid or len(rid) > 128 or not rid.isprintable():
        rid = uuid.uuid4().hex
    _request_id.set(rid)
    return rid


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "request_id", "msg", "exc"?}` per line, plus the keys of a record's
    `fields` mapping (`extra={"fields": {...}}`) for structured lines such as the request log."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if k not in entry})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def flush_logs() -> None:
    """Flush every handler of the root logger (pre-stop: nothing written is lost when the instance goes)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def configure_logging(level: str = "INFO", as_json: bool = True) -> None:
    """Install one stderr handler on the root logger (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_sdfunc", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._sdfunc = True  # type: ignore[attr-defined]
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines name plugins; handler.records.db logs upgrades
