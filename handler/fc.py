"""Function Compute lifecycle routes: `POST /initialize`, `GET /pre-stop`, and a health route."""

from __future__ import annotations

from flask import current_app, jsonify
from flask_openapi3 import APIBlueprint, Tag

from handler import __version__
from handler.errors import ErrorModel, NotReady
from handler.schemas import HealthResponse

bp = APIBlueprint("fc", __name__, abp_tags=[Tag(name="lifecycle", description="FC lifecycle hooks and health")],
                  abp_responses={503: ErrorModel})


@bp.post("/initialize", responses={200: {"description": "warmed (idempotent)"}})
def initialize():
    """FC initializer: load the default checkpoint and run one small warm-up generation. Idempotent."""
    service = current_app.extensions["sdfunc"]
    try:
        return jsonify(service.warmup())
    except NotReady:
        raise
    except Exception as exc:  # any load failure: the instance is not usable
        raise NotReady("initialization failed; see the log for this request id") from exc


@bp.get("/pre-stop", responses={200: {"description": "stopped taking work"}})
def pre_stop():
    """FC pre-stop: stop taking new work, wait for the running job. Idempotent."""
    service = current_app.extensions["sdfunc"]
    service.accepting = False
    service.device.drain()  # jobs already queued finish (or are refused, having seen `accepting`)
    return jsonify({"status": "stopped"})


@bp.get("/health", responses={200: HealthResponse})
def health():
    """STARTING | READY | SETUP_FAILED, and what is loaded."""
    service = current_app.extensions["sdfunc"]
    return jsonify({"status": service.state, "version": __version__, "device": service.cache.device,
                    "loaded_models": service.loaded_models()})
