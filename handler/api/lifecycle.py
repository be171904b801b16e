"""Function Compute lifecycle and observability routes: `POST /initialize`, `GET /pre-stop`, `GET /health`
(liveness), `GET /healthz` (readiness) and `GET /metrics` (Prometheus)."""

from __future__ import annotations

import hmac
import time

from flask import Response, current_app, jsonify, request
from flask_openapi3 import APIBlueprint, Tag

from handler import __version__
from handler.contract.schemas import HealthResponse, InitializeResponse, PreStopResponse
from handler.errors import ErrorModel, Forbidden, NotFound, NotReady
from handler.runtime.service import Service
from handler.security import lifecycle_key as lifecycle

bp = APIBlueprint("fc", __name__, abp_tags=[Tag(name="lifecycle", description="FC lifecycle hooks, health, metrics")],
                  abp_responses={503: ErrorModel})
_hook_errors = {401: ErrorModel, 403: ErrorModel, 429: ErrorModel}

READY_STATES = ("READY", "BUSY")


def _service() -> Service:
    return current_app.extensions["sdfunc"]


def _hook_caller() -> None:
    """A lifecycle hook needs the instance's lifecycle key (`sdfunc hook`), in every auth mode, or an admin's
    credentials where there are credentials: with auth on, 401 without them and 403 for a non-admin; in auth
    mode `none`, 403 without the key. Nothing is changed by a refused call."""
    service = _service()
    given = request.headers.get(lifecycle.HEADER, "")
    if given and hmac.compare_digest(given.encode(), service.lifecycle_key.encode()):
        return
    if service.settings.auth.mode == "none":
        raise Forbidden(f"the lifecycle hooks need this instance's lifecycle key in {lifecycle.HEADER} "
                        "(`sdfunc hook initialize` and `sdfunc hook pre-stop` send it)")
    caller = service.auth.authenticate(request.headers.get("Authorization"))
    if not caller.admin:
        raise Forbidden("only the instance's lifecycle hook (sdfunc hook) or an admin may call this")


@bp.post("/initialize", responses={200: InitializeResponse, **_hook_errors})
def initialize():
    """FC initializer: preload the warm-up checkpoints and run one small generation per warm-up shape.
    Idempotent: later calls wait for the first and load nothing. Answers with the cold-start breakdown.
    Needs the lifecycle key (`sdfunc hook initialize`) or, with auth on, an admin's credentials."""
    _hook_caller()
    try:
        return jsonify(_service().warmup())
    except NotReady:
        raise
    except Exception as exc:  # any load failure: the instance is not usable
        raise NotReady("initialization failed; see the log for this request id") from exc


@bp.get("/pre-stop", responses={200: PreStopResponse, **_hook_errors})
def pre_stop():
    """FC pre-stop: refuse new work (503), wait for admitted requests up to the grace period, release the
    device memory, flush the logs. Idempotent; afterwards `/healthz` answers 503 with status STOPPING. Needs the
    lifecycle key (`sdfunc hook pre-stop`) or, with auth on, an admin's credentials."""
    _hook_caller()
    return jsonify(_service().stop())


def _health() -> dict:
    service = _service()
    return {
        "status": service.state,
        "version": __version__,
        "instance_id": service.instance_id,
        "device": service.device_name(),
        "uptime_seconds": round(time.time() - service.coldstart.started_at, 3),
        "loaded_models": service.loaded_models(),
        "cache": service.cache_if_loaded.report() if service.cache_if_loaded is not None else None,
        "in_flight": service.in_flight,
        "queued": service.device.queued,
        "cold_start": service.coldstart.report(),
    }


@bp.get("/health", responses={200: HealthResponse})
def health():
    """Liveness: 200 while the process answers, whatever its state (the body says which)."""
    return jsonify(_health())


@bp.get("/healthz", responses={200: HealthResponse, 503: HealthResponse})
def healthz():
    """Readiness: 200 when READY or BUSY, 503 while STARTING, FAILED or STOPPING (same body)."""
    body = _health()
    response = jsonify(body)
    if body["status"] not in READY_STATES:
        response.status_code = 503
        response.headers["Retry-After"] = str(_service().settings.warmup.retry_after)
    return response


@bp.get("/metrics", responses={200: {"description": "Prometheus text exposition format",
                                     "content": {"text/plain": {"schema": {"type": "string"}}}},
                               404: ErrorModel})
def metrics():
    """Prometheus metrics: requests, latencies by phase, images, billed seconds, pipeline cache, cold start,
    queue, GPU memory."""
    service = _service()
    if not service.metrics.enabled:
        raise NotFound("metrics are turned off (SDFUNC_METRICS=false)")
    body, content_type = service.metrics.render()
    return Response(body, content_type=content_type)
