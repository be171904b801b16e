"""The billing ledger and the image records: what each consumer was charged, and for which images.

Contract:
- `record_success` writes the request's ledger row and all its image rows in one transaction and commits
  before the response is sent. A crash at any point leaves the complete row with its images, or nothing.
- One row per (consumer, request id). A request id that already has a succeeded row, or is being generated
  in this process, is refused before any work (`Conflict`, 409). Two instances racing on one id both
  generate, and the second to commit gets the 409: it is never charged twice. A failed row is replaced by the
  retry's outcome.
- The connection lost during `record_success`'s COMMIT (it may have landed or not): the ledger is read again, on a
  new connection, for the row of this very attempt (its `attempt_id`, unique to the attempt, tells it from another
  instance's row for the same id): there, the request is the success it was; not there, `DatabaseUnavailable` (it
  was not charged); the database unreachable for `ACK_READ_TRIES` reads, `ChargeUnknown` (503 `charge_unknown`).
- `record_failure` writes (or refreshes) a failed row with a zero charge; it never overwrites a success.
- Usage totals are sums of ledger rows computed by the database, amounts in integer nano-units (exact).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, insert, literal, select, update
from sqlalchemy.exc import IntegrityError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_exponential

from handler.errors import ChargeUnknown, CommitUnacknowledged, Conflict, DatabaseUnavailable
from handler.records.billing import Charge, decimal_text, from_nanos
from handler.records.db import Database, generated_images, iso_utc, ledger, unavailable, utcnow
from handler.records.metering import RequestMeter

log = logging.getLogger(__name__)

# A charge committed without an acknowledgement is read back this many times at most, 0.5 s, 1 s, 2 s... apart,
# and for no longer than ACK_READ_SECONDS (a connect may take its whole timeout), before it is called unknown.
ACK_READ_TRIES = 4
ACK_READ_SECONDS = 10.0


@dataclass
class ImageRecord:
    """One generated image as `generated_images` keeps it (the RDS plugin's columns)."""

    prompt: str
    negative_prompt: str
    steps: int
    seed: int
    sampler: str
    cfg_scale: float
    size: str
    model_hash: str | None
    model: str | None
    image_base64: str | None = None
    image_url: str | None = None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _row_values(meter: RequestMeter, status: str, charge: Charge | None, currency: str) -> dict[str, Any]:
    now = utcnow()
    started = now - dt.timedelta(seconds=max(0.0, meter.elapsed()))
    return {
        "status": status, "http_status": meter.status or (200 if status == "succeeded" else None),
        "error": meter.error if status == "failed" else None, "invocation_id": meter.request_id,
        "instance_id": meter.instance_id, "mode": meter.mode, "checkpoint": meter.checkpoint,
        "width": meter.width, "height": meter.height, "steps": meter.steps,
        "images": charge.images if charge else 0, "device": charge.device if charge else None,
        "queue_wait_ms": _ms(meter.queue_wait_seconds), "model_load_ms": _ms(meter.model_load_seconds),
        "generation_ms": _ms(meter.generation_seconds), "encode_ms": _ms(meter.encode_seconds),
        "total_ms": round(meter.elapsed() * 1000, 3),
        "billed_ms": charge.billed_ms if charge else 0,
        "price_per_second": decimal_text(charge.price_per_second) if charge else "0",
        "currency": charge.currency if charge else currency,
        "amount_nanos": charge.amount_nanos if charge else 0,
        "started_at": started, "finished_at": now, "attempt_id": meter.attempt_id,
    }


class Ledger:
    """Reads and writes of the ledger and image records over one `Database`."""

    def __init__(self, db: Database, currency: str) -> None:
        self.db = db
        self.currency = currency
        self._in_flight: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    # writes -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def claim(self, consumer: str, request_id: str) -> Iterator[None]:
        """Refuse (409) a request id that is running here or already succeeded, then hold it until the block
        ends. Across instances the unique key settles a race at commit (`record_success`)."""
        key = (consumer, request_id)
        with self._lock:
            if key in self._in_flight:
                raise Conflict(f"request id {request_id!r} is already being generated; wait for its response")
            self._in_flight.add(key)
        try:
            self._refuse_if_charged(consumer, request_id)
            yield
        finally:
            with self._lock:
                self._in_flight.discard(key)

    def _refuse_if_charged(self, consumer: str, request_id: str) -> None:
        with self.db.connect() as conn:
            row = conn.execute(select(ledger.c.billed_ms, ledger.c.amount_nanos, ledger.c.currency).where(
                ledger.c.consumer == consumer, ledger.c.request_id == request_id,
                ledger.c.status == "succeeded")).first()
        if row is not None:
            raise self._duplicate(consumer, request_id, row)

    def _duplicate(self, consumer: str, request_id: str, row: Any) -> Conflict:
        """The 409 for a charged id: the original charge, and where its images can be fetched (if kept)."""
        t = generated_images
        kept = (t.c.image_base64.is_not(None)) | (t.c.image_url.is_not(None))
        with self.db.connect() as conn:
            images, available = conn.execute(select(func.count(), func.sum(case((kept, 1), else_=0))).where(
                t.c.consumer == consumer, t.c.request_id == request_id)).one()
        images, available = int(images or 0), int(available or 0)
        details = [{"billed_ms": int(row.billed_ms), "currency": row.currency, "images": images,
                    "images_kept": available, "amount": decimal_text(from_nanos(int(row.amount_nanos)))}]
        where = (f"its images: GET /images?request_id={request_id}" if available else
                 "its images were not kept (send save_to_db, save_images or an Idempotency-Key to keep them)")
        return Conflict(f"request id {request_id!r} was already generated and charged; it is not charged again; "
                        f"{where}", details=details)

    def record_success(self, meter: RequestMeter, charge: Charge, images: list[ImageRecord]) -> None:
        """Commit the charged ledger row and its image rows together; when this returns, the request is charged.
        Raises Conflict when another attempt with the same id committed first, DatabaseUnavailable when nothing
        was committed, ChargeUnknown when the COMMIT lost its acknowledgement and the database stayed unreachable
        (then `landed` tells, once it is back)."""
        consumer, request_id = meter.consumer or "", meter.request_key
        values = _row_values(meter, "succeeded", charge, self.currency)
        rows = [{"request_id": request_id, "consumer": consumer, "created_at": values["finished_at"],
                 **vars(image)} for image in images]
        try:
            with self.db.begin() as conn:
                conn.execute(insert(ledger).values(request_id=request_id, consumer=consumer, attempts=1, **values))
                if rows:
                    conn.execute(insert(generated_images), rows)
            return
        except IntegrityError:
            pass  # a row with this id exists: a failed attempt (replace it) or a success (refuse)
        except CommitUnacknowledged:
            self._read_back(meter)
            return
        try:
            with self.db.begin() as conn:
                # Write first, read never: the UPDATE takes the row (or SQLite's write lock) before deciding.
                done = conn.execute(update(ledger).where(
                    ledger.c.consumer == consumer, ledger.c.request_id == request_id, ledger.c.status == "failed",
                ).values(attempts=ledger.c.attempts + 1, **values)).rowcount
                if done == 1:
                    if rows:
                        conn.execute(insert(generated_images), rows)
                    return
        except CommitUnacknowledged:
            self._read_back(meter)
            return
        with self.db.connect() as conn:
            row = conn.execute(select(ledger.c.billed_ms, ledger.c.amount_nanos, ledger.c.currency).where(
                ledger.c.consumer == consumer, ledger.c.request_id == request_id)).one()
        raise self._duplicate(consumer, request_id, row)

    def landed(self, meter: RequestMeter) -> bool:
        """Whether the ledger holds the charged row that `meter`'s own attempt wrote (one read; DatabaseUnavailable
        when it cannot be read). A locking read on the (consumer, request id) key: it waits for a COMMIT of that
        row the server is still carrying out (a dropped client does not stop it), and goes to the primary."""
        with self.db.begin() as conn:
            row = conn.execute(select(ledger.c.attempt_id, ledger.c.status).where(
                ledger.c.consumer == (meter.consumer or ""),
                ledger.c.request_id == meter.request_key).with_for_update()).first()
        return row is not None and row.status == "succeeded" and row.attempt_id == meter.attempt_id

    def _read_back(self, meter: RequestMeter) -> None:
        """After `record_success`'s COMMIT lost its acknowledgement: return when this attempt's row landed (it is
        charged), raise DatabaseUnavailable when it did not, ChargeUnknown when the ledger cannot be read."""
        try:
            landed = Retrying(retry=retry_if_exception_type(DatabaseUnavailable), reraise=True,
                              stop=stop_after_attempt(ACK_READ_TRIES) | stop_after_delay(ACK_READ_SECONDS),
                              wait=wait_exponential(multiplier=0.5, max=2))(self.landed, meter)
        except DatabaseUnavailable:
            log.error("request %s: its charge was committed without an acknowledgement and the records database "
                      "stayed unreachable: whether it was charged is unknown", meter.request_key)
            raise ChargeUnknown(
                "the records database went away while this request's charge was being committed and has not come "
                "back, so whether it was charged is unknown; retry with the header Idempotency-Key: "
                f"{meter.request_key} once it is back: 409 with the charge (and where its images are) if it was "
                "charged, a new generation if not", headers={"Retry-After": "5"}) from None
        if not landed:
            log.warning("request %s: its charge's commit lost its acknowledgement and did not land: not charged",
                        meter.request_key)
            raise unavailable()
        log.warning("request %s: its charge's commit lost its acknowledgement but landed: answered as charged",
                    meter.request_key)

    def record_failure(self, meter: RequestMeter) -> None:
        """Record a failed request with a zero charge; a retry's earlier failure is refreshed, a success is
        left as it is."""
        consumer, request_id = meter.consumer or "", meter.request_key
        values = _row_values(meter, "failed", None, self.currency)
        try:
            with self.db.begin() as conn:
                conn.execute(insert(ledger).values(request_id=request_id, consumer=consumer, attempts=1, **values))
            return
        except IntegrityError:
            pass
        with self.db.begin() as conn:
            conn.execute(update(ledger).where(
                ledger.c.consumer == consumer, ledger.c.request_id == request_id, ledger.c.status == "failed",
            ).values(attempts=ledger.c.attempts + 1, **values))

    # reads ------------------------------------------------------------------------------------------------
    def usage(self, *, consumer: str | None, since: dt.datetime | None, until: dt.datetime | None,
              group: str | None) -> dict[str, Any]:
        """Totals of the ledger rows finished in [since, until) for `consumer` (None: every consumer), grouped
        by `day` (UTC) or `model` (checkpoint), or one row when `group` is None."""
        keys = {"day": [func.date(ledger.c.finished_at)], "model": [func.coalesce(ledger.c.checkpoint, "-")]}
        key = keys.get(group or "", [])
        succeeded = func.sum(case((ledger.c.status == "succeeded", 1), else_=0))
        query = (select((key[0] if key else literal("all")).label("key"), ledger.c.currency,
                        func.count().label("requests"), succeeded.label("succeeded"),
                        func.sum(ledger.c.images).label("images"), func.sum(ledger.c.billed_ms).label("billed_ms"),
                        func.sum(ledger.c.amount_nanos).label("amount_nanos"))
                 .where(*self._filters(ledger, consumer, since, until, ledger.c.finished_at))
                 .group_by(*key, ledger.c.currency).order_by(*key, ledger.c.currency))
        with self.db.connect() as conn:
            result = conn.execute(query).all()
        rows = []
        totals = {"requests": 0, "succeeded": 0, "failed": 0, "images": 0, "billed_ms": 0}
        amounts: dict[str, int] = {}
        for row in result:
            requests, ok = int(row.requests), int(row.succeeded or 0)
            item = {"key": str(row.key), "currency": row.currency, "requests": requests, "succeeded": ok,
                    "failed": requests - ok, "images": int(row.images or 0), "billed_ms": int(row.billed_ms or 0),
                    "amount": decimal_text(from_nanos(int(row.amount_nanos or 0)))}
            rows.append(item)
            for name in totals:
                totals[name] += item[name]
            amounts[row.currency] = amounts.get(row.currency, 0) + int(row.amount_nanos or 0)
        return {"consumer": consumer, "since": iso_utc(since), "until": iso_utc(until), "group": group or "none",
                "rows": rows, "totals": {**totals, "amount": {c: decimal_text(from_nanos(n))
                                                              for c, n in sorted(amounts.items())}}}

    def ledger_rows(self, *, consumer: str | None = None) -> list[dict[str, Any]]:
        """Every ledger row (tests, exports), oldest first."""
        query = select(ledger).where(*self._filters(ledger, consumer, None, None, ledger.c.finished_at))
        with self.db.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query.order_by(ledger.c.id))]

    def images(self, *, consumer: str | None, request_id: str | None, since: dt.datetime | None,
               until: dt.datetime | None, page: int, per_page: int) -> dict[str, Any]:
        """One page of image records, newest first, without the image bytes."""
        t = generated_images
        filters = self._filters(t, consumer, since, until, t.c.created_at)
        if request_id is not None:
            filters.append(t.c.request_id == request_id)
        columns = [c for c in t.c if c.name != "image_base64"]
        has_image = (t.c.image_base64.is_not(None)).label("stored")
        with self.db.connect() as conn:
            total = conn.execute(select(func.count()).select_from(t).where(*filters)).scalar_one()
            result = conn.execute(select(*columns, has_image).where(*filters).order_by(t.c.id.desc())
                                  .limit(per_page).offset((page - 1) * per_page)).all()
        items = []
        for row in result:
            item = dict(row._mapping)
            item["stored"] = bool(item["stored"])
            item["created_at"] = iso_utc(item["created_at"])
            items.append(item)
        return {"images": items, "page": page, "per_page": per_page, "total": int(total)}

    def image(self, image_id: int, *, consumer: str | None) -> dict[str, Any] | None:
        """One image record with its bytes' locations, or None (also when it belongs to another consumer)."""
        t = generated_images
        filters = [t.c.id == image_id]
        if consumer is not None:
            filters.append(t.c.consumer == consumer)
        with self.db.connect() as conn:
            row = conn.execute(select(t.c.image_base64, t.c.image_url).where(*filters)).first()
        return dict(row._mapping) if row is not None else None

    @staticmethod
    def _filters(table: Any, consumer: str | None, since: dt.datetime | None, until: dt.datetime | None,
                 column: Any) -> list[Any]:
        filters = []
        if consumer is not None:
            filters.append(table.c.consumer == consumer)
        if since is not None:
            filters.append(column >= since)
        if until is not None:
            filters.append(column < until)
        return filters



