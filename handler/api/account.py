"""What a consumer can read back: its image records (`GET /images`, `GET /images/<id>`) and its usage
(`GET /billing/usage`). A consumer sees only its own; admins may name any consumer or `*` for all."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from flask import Response, current_app, g, jsonify
from flask_openapi3 import APIBlueprint, Tag

from handler.contract.schemas import (
    AccountInfo,
    ImageList,
    ImagePath,
    ImagesQuery,
    TaskPath,
    TaskView,
    UsageQuery,
    UsageResponse,
)
from handler.errors import ErrorModel, Forbidden, NotFound, StorageUnavailable
from handler.records.ledger import Ledger
from handler.runtime.service import Service

bp = APIBlueprint("account", __name__, abp_tags=[Tag(name="records", description="Image records and usage")],
                  abp_responses={401: ErrorModel, 403: ErrorModel, 404: ErrorModel, 422: ErrorModel,
                                 429: ErrorModel, 503: ErrorModel})


def _service() -> Service:
    return current_app.extensions["sdfunc"]


def _ledger() -> Ledger:
    ledger = _service().ledger
    if ledger is None:
        raise NotFound("records are turned off (SDFUNC_RECORD_REQUESTS=false)")
    return ledger


def _whose(named: str | None) -> str | None:
    """The consumer to read: the caller's own, or (admins) the one named; `*` = all (None)."""
    caller = g.caller
    if named is None or named == caller.consumer:
        return caller.consumer
    if not caller.admin:
        raise Forbidden("consumer: only admins may read another consumer's records", field="consumer")
    return None if named == "*" else named


@bp.get("/account", responses={200: AccountInfo})
def account():
    """Who the credentials belong to (the web page's login check)."""
    caller = g.caller
    return jsonify({"consumer": caller.consumer, "admin": caller.admin,
                    "auth_mode": _service().settings.auth.mode, "records": _service().ledger is not None})


@bp.get("/images", responses={200: ImageList})
def list_images(query: ImagesQuery):
    """Image records, newest first, paged; filter by consumer (admins), request id and time."""
    return jsonify(_ledger().images(consumer=_whose(query.consumer), request_id=query.request_id,
                                    since=query.since, until=query.until, page=query.page, per_page=query.per_page))


@bp.get("/images/<int:image_id>", responses={200: {"description": "The PNG",
                                                   "content": {"image/png": {"schema": {"type": "string",
                                                                                        "format": "binary"}}}}})
def get_image(path: ImagePath):
    """One image as PNG: from the database when it was kept there, else from where it was saved. Another
    consumer's image is a 404, as if it did not exist (admins see every image)."""
    caller = g.caller
    record = _ledger().image(path.image_id, consumer=None if caller.admin else caller.consumer)
    if record is None:
        raise NotFound(f"no image {path.image_id}")
    data = _image_bytes(record)
    if data is None:
        raise NotFound(f"image {path.image_id} was neither kept in the database nor saved to storage")
    return Response(data, mimetype="image/png")


def _image_bytes(record: dict[str, Any]) -> bytes | None:
    if record["image_base64"]:
        try:
            return base64.b64decode(record["image_base64"], validate=True)
        except binascii.Error:
            return None
    url = record["image_url"]
    if not url:
        return None
    try:
        return _service().storage.read(url)  # None for a URL outside this storage: never served
    except OSError:
        raise StorageUnavailable("the saved image could not be read back from storage") from None


@bp.get("/tasks/<task_id>", responses={200: TaskView})
def get_task(path: TaskPath):
    """An asynchronous task: its status, its `progress` (queue place, step and ETA, completed) and, when done,
    its result. Another consumer's task is a 404."""
    if _service().tasks is None:
        raise NotFound("records are turned off (SDFUNC_RECORD_REQUESTS=false)")
    caller = g.caller
    view = _service().task_view(path.task_id, None if caller.admin else caller.consumer)
    if view is None:
        raise NotFound(f"no task {path.task_id}")
    return jsonify(view)


@bp.get("/billing/usage", responses={200: UsageResponse})
def usage(query: UsageQuery):
    """The caller's usage (admins: any consumer, `*` = all) between `since` and `until`, grouped by day or
    model. Totals equal the sum of the ledger rows."""
    return jsonify(_ledger().usage(consumer=_whose(query.consumer), since=query.since, until=query.until,
                                   group=query.group))
