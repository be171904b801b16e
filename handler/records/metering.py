"""What one request cost: where its time went, what it generated, and the one log line that says so.

The app opens a `RequestMeter` for every request (`begin`), the service fills in what it knows (checkpoint,
size, timings), and the app closes it when the response is ready (`finish`), which writes the request log
line and feeds the metrics. Billable time is device generation time only: never queueing, loading,
encoding, or any part of a failed request.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any

from handler.errors import ChargeUnknown
from handler.records.billing import Charge, decimal_text

request_log = logging.getLogger("sdfunc.request")

_current: contextvars.ContextVar[RequestMeter | None] = contextvars.ContextVar("sdfunc_meter", default=None)


IDEMPOTENCY_HEADER = "Idempotency-Key"  # the request id a client sends to make retries safe


@dataclass
class RequestMeter:
    """One request's facts. Timings are seconds; None means the phase did not happen."""

    request_id: str
    instance_id: str
    method: str
    route: str
    cold_start: bool
    started: float = field(default_factory=time.perf_counter)
    consumer: str | None = None
    status: int | None = None
    error: str | None = None
    mode: str | None = None  # txt2img | img2img
    checkpoint: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    images: int = 0
    queue_wait_seconds: float | None = None
    model_load_seconds: float | None = None
    generation_seconds: float | None = None
    encode_seconds: float | None = None
    total_seconds: float | None = None
    prompt: str | None = None  # only kept when the operator turned prompt logging on
    negative_prompt: str | None = None
    idempotency_key: str | None = None  # the client's Idempotency-Key header, when sent
    charge: Charge | None = None  # set when a generation succeeded
    recorded: bool = False  # the ledger has this request's outcome (or must not get one: a duplicate)
    attempt_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # this attempt's own id, in its ledger row

    @property
    def request_key(self) -> str:
        """The ledger's id for this request: the Idempotency-Key header, else the request id."""
        return self.idempotency_key or self.request_id

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def succeeded(self) -> bool:
        return self.status is not None and self.status < 400

    @property
    def charge_unknown(self) -> bool:
        """The charge was committed without an acknowledgement and could not be read back (`ChargeUnknown`)."""
        return self.error == ChargeUnknown.code

    @property
    def billed_ms(self) -> int:
        """The billed time of a successful generation (handler.records.billing); 0 otherwise."""
        if not self.succeeded or self.charge is None:
            return 0
        return self.charge.billed_ms

    def fields(self, *, with_prompts: bool) -> dict[str, Any]:
        """The request log's fields (prompts only `with_prompts`). A charge that is unknown is `charged` "unknown",
        `billed_ms` null."""
        out = {f.name: getattr(self, f.name) for f in dataclass_fields(self)
               if f.name not in ("started", "charge", "recorded", "idempotency_key", "attempt_id")}
        if not with_prompts:
            out.pop("prompt")
            out.pop("negative_prompt")
        if self.charge_unknown:
            out["billed_ms"], out["charged"] = None, "unknown"
        else:
            out["billed_ms"] = self.billed_ms
            out["charged"] = decimal_text(self.charge.amount) if self.charge is not None and self.succeeded else "0"
        if self.idempotency_key is not None:
            out["idempotency_key"] = self.idempotency_key
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = round(value, 4)
        return out


def begin(meter: RequestMeter) -> RequestMeter:
    """Make `meter` the current request's meter (context-local: each HTTP thread has its own)."""
    _current.set(meter)
    return meter


def current() -> RequestMeter | None:
    """The meter of the request being served in this context, or None outside a request."""
    return _current.get()


def end() -> None:
    _current.set(None)


def log_request(meter: RequestMeter, *, with_prompts: bool) -> None:
    """Write the request's one log line (JSON fields under the JSON formatter)."""
    if not request_log.isEnabledFor(logging.INFO):
        return
    request_log.info(
        "%s %s -> %s in %.1f ms", meter.method, meter.route, meter.status, (meter.total_seconds or 0.0) * 1000,
        extra={"fields": meter.fields(with_prompts=with_prompts)},
    )


SERVER_TIMING = (("queue", "queue_wait_seconds"), ("load", "model_load_seconds"), ("gen", "generation_seconds"),
                 ("encode", "encode_seconds"), ("total", "total_seconds"))


def server_timing(meter: RequestMeter) -> str:
    """The W3C `Server-Timing` value of a generation response: `queue` (waiting for the device), `load` (model
    loads it waited for), `gen` (device time), `encode` (PNG, saving, base64) and `total` (from the request's
    arrival to the response), in milliseconds; phases that did not happen are left out. bench/ reads it to
    split a client's latency."""
    parts = []
    for name, attr in SERVER_TIMING:
        seconds = getattr(meter, attr)
        if seconds is not None:
            parts.append(f"{name};dur={seconds * 1000:.1f}")
    return ", ".join(parts)

