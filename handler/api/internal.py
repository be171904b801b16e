"""A1111's `/internal/...` routes, thin: a task's progress (`POST /internal/progress`)."""

from __future__ import annotations

from typing import Any

from flask import current_app, g, jsonify
from flask_openapi3 import APIBlueprint, Tag

from handler.contract.schemas import InternalProgressRequest, InternalProgressResponse
from handler.errors import ErrorModel
from handler.runtime.service import Service

_tag = Tag(name="internal", description="AUTOMATIC1111 web UI internal API (v1.10.1): a task's progress")
_errors: dict[Any, Any] = {401: ErrorModel, 403: ErrorModel, 422: ErrorModel, 429: ErrorModel, 503: ErrorModel}

bp = APIBlueprint("internal", __name__, url_prefix="/internal", abp_tags=[_tag], abp_responses=_errors)


def _service() -> Service:
    return current_app.extensions["sdfunc"]


@bp.post("/progress", responses={200: InternalProgressResponse})
def progress(body: InternalProgressRequest):
    """Where a task is, as A1111 answers: queued ("In queue: i/n"), active (progress 0..1 and ETA in seconds) or
    completed. A task is an asynchronous task's id or a request's `force_task_id`, answered by this instance
    or, for a task, from the records database (queued or running anywhere). Only the task's consumer and
    admins see it: for anyone else, as for an unknown id, all three are false and textinfo is "Waiting..."."""
    caller = g.caller
    return jsonify(_service().task_progress.internal_progress(
        body.id_task, None if caller.admin else caller.consumer, body.id_live_preview))
