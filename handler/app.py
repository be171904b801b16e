"""The app factory: `create_app(settings=None)`. gunicorn runs `handler.app:create_app()`.

Nothing heavy happens here: no torch import, no model load. The worker warms up after start (gunicorn's
`post_worker_init`) or when FC calls `POST /initialize`.
"""

from __future__ import annotations

import logging
import re
import threading
import time

from flask import Response, g, request
from flask_openapi3 import Info, OpenAPI

from handler import __version__
from handler.api import account, document, downloads, eas_queue, web
from handler.api import controlnet as controlnet_api
from handler.api import internal as a1111_internal
from handler.api import lifecycle as fc
from handler.api import sdapi as routes
from handler.contract.schemas import MAX_JSON_DEPTH, nested_deeper
from handler.errors import (
    ErrorModel,
    InvalidRequest,
    PayloadTooLarge,
    register_error_handlers,
    validation_error_response,
)
from handler.logs import REQUEST_ID_HEADER, configure_logging, set_request_id
from handler.records import metering
from handler.records.billing import decimal_text
from handler.records.metering import IDEMPOTENCY_HEADER
from handler.runtime.service import Service
from handler.security.lifecycle_key import HEADER as LIFECYCLE_HEADER
from handler.settings import Settings

log = logging.getLogger(__name__)

AUTHENTICATED_BLUEPRINTS = ("sdapi", "internal", "controlnet", "account", "downloads", "eas_queue")  # health, metrics, docs stay open; the lifecycle hooks check their own key (handler/security/lifecycle_key.py)
GENERATION_ROUTES = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/extra-single-image",
                     "/sdapi/v1/extra-batch-images")
LIFECYCLE_HOOKS = ("/initialize", "/pre-stop")
UNDOCUMENTED_BLUEPRINTS = ("eas_queue",)  # PAI-EAS's queue protocol: its query parameters are tags
LIFECYCLE_SCHEME = "lifecycleKey"
# Answered by gunicorn before the app sees the request (an HTML body): documented so clients expect them.
GUNICORN_REFUSALS = {
    400: "A malformed request line or header, or headers over gunicorn's limits (gunicorn's answer)",
    414: "A request line (path and query) over 4094 bytes (gunicorn's answer)",
}


def create_app(settings: Settings | None = None) -> OpenAPI:
    """Build the Flask app with its one `Service` (in `app.extensions["sdfunc"]`)."""
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_json)
    app = OpenAPI(
        __name__,
        static_folder="api/static",  # the web page (handler/api/web.py) at /static
        info=Info(title="sdfunc", version=__version__,
                  description="Serverless Stable Diffusion: the AUTOMATIC1111 API on diffusers."),
        security_schemes={},
        validation_error_status=422,
        validation_error_model=ErrorModel,
        validation_error_callback=validation_error_response,
        responses={422: ErrorModel},
        doc_prefix="/openapi",
    )
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # A1111 key order (info, options) is part of the contract
    service = Service(settings)
    app.extensions["sdfunc"] = service

    @app.before_request
    def _bind_request() -> None:
        g.request_id = set_request_id(request.headers.get(REQUEST_ID_HEADER))
        rule = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        g.meter = metering.begin(metering.RequestMeter(
            request_id=g.request_id, instance_id=service.instance_id, method=request.method, route=rule,
            cold_start=not service.coldstart.done,
        ))
        service.metrics.request_started()
        length = request.content_length
        if length is not None and length > settings.max_body_bytes:
            raise PayloadTooLarge(f"request body of {length} bytes exceeds {settings.max_body_bytes}")
        if request.blueprint not in UNDOCUMENTED_BLUEPRINTS:
            repeated = next((name for name, values in request.args.lists() if len(values) > 1), None)
            if repeated is not None:  # every documented query parameter takes one value: none is silently dropped
                raise InvalidRequest(f"{repeated}: given more than once", field=repeated)
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None:
            if not 0 < len(key) <= 128 or not key.isascii() or not key.isprintable():
                raise InvalidRequest(f"{IDEMPOTENCY_HEADER}: 1-128 printable ASCII characters",
                                     field=IDEMPOTENCY_HEADER)
            g.meter.idempotency_key = key
        if request.blueprint in AUTHENTICATED_BLUEPRINTS:
            g.caller = service.auth.authenticate(request.headers.get("Authorization"),
                                                 script=request.headers.get("X-Requested-With") == "XMLHttpRequest")
            g.meter.consumer = g.caller.consumer
        if request.is_json:
            if length is None and len(request.get_data(cache=True)) >= settings.max_body_bytes:
                # chunked: werkzeug stops reading at MAX_CONTENT_LENGTH, and a cut body is no JSON
                raise PayloadTooLarge(f"request body reaches the limit of {settings.max_body_bytes} bytes")
            try:
                body = request.get_json(silent=True)  # parsed once here; the routes get Flask's cached result
                too_deep = nested_deeper(body, MAX_JSON_DEPTH)
            except RecursionError:
                too_deep = True
            if too_deep:
                raise InvalidRequest(f"body: JSON nested more than {MAX_JSON_DEPTH} deep", field="body")

    @app.after_request
    def _tag_response(response: Response) -> Response:
        response.headers[REQUEST_ID_HEADER] = g.get("request_id", "-")
        response.headers["X-Instance-Id"] = service.instance_id
        meter: metering.RequestMeter | None = g.pop("meter", None)
        if meter is not None:
            meter.error = g.pop("error_code", meter.error)
            response.headers["X-Cold-Start"] = "true" if meter.cold_start else "false"
            meter.status = response.status_code
            if meter.route in GENERATION_ROUTES:
                _bill(meter, response)
            meter.total_seconds = time.perf_counter() - meter.started
            if meter.route in GENERATION_ROUTES:
                response.headers["Server-Timing"] = metering.server_timing(meter)
            service.metrics.observe(meter)
            if settings.request_log:
                metering.log_request(meter, with_prompts=settings.log_prompts)
        return response

    def _bill(meter: metering.RequestMeter, response: Response) -> None:
        """The charge headers of a generation ("unknown" when its charge's commit could not be confirmed: 503
        `charge_unknown`); a failed one is recorded in the ledger with a zero charge."""
        charge = meter.charge if meter.succeeded else None
        response.headers["X-Billed-Duration-Ms"] = str(charge.billed_ms if charge else 0)
        response.headers["X-Charge"] = decimal_text(charge.amount) if charge else "0"
        response.headers["X-Charge-Currency"] = settings.billing.currency
        if meter.charge_unknown:  # the ledger may hold its charge: nothing is written, the retry settles it
            response.headers["X-Billed-Duration-Ms"] = response.headers["X-Charge"] = "unknown"
            return
        if meter.succeeded or meter.recorded or meter.consumer is None or service.ledger is None:
            return
        if response.status_code == 409 and meter.error == "duplicate_request":
            return  # the id belongs to an earlier request: its row stays as it is
        try:
            service.ledger.record_failure(meter)
        except Exception:
            log.exception("could not record the failed request in the ledger")

    @app.teardown_request
    def _unbind_request(_exc: BaseException | None) -> None:
        if g.pop("meter", None) is not None:  # no response was made (the client went away): still count it
            service.metrics.observe_aborted()
        metering.end()

    register_error_handlers(app)
    app.register_api(routes.bp)
    app.register_api(a1111_internal.bp)
    app.register_api(controlnet_api.bp)
    app.register_api(fc.bp)
    app.register_api(account.bp)
    app.register_api(downloads.bp)
    app.register_api(web.bp)
    app.register_blueprint(eas_queue.bp)  # PAI-EAS's queue protocol: protobuf and a WebSocket, outside the document
    _finish_document(app, settings.auth.mode)
    generate, generating = app.generate_spec_json, threading.Lock()

    def _complete_document() -> None:
        """On the first GET of the document (its sampler names import torch): built aside and completed, then
        published at once (flask-openapi3 serves `spec_json` as soon as it is set); a failure publishes nothing."""
        with generating:
            if app.spec_json:
                return
            generate()
            built, app.spec_json = app.spec_json, {}
            document.complete(built, settings)
            app.spec_json = built

    app.generate_spec_json = _complete_document
    service.coldstart.app_ready()
    return app


def _finish_document(app: OpenAPI, mode: str) -> None:
    """Complete the OpenAPI document: gunicorn's own refusals on every operation, and what auth `mode` asks
    of the routes that need credentials (the AUTHENTICATED_BLUEPRINTS; nothing when auth is off): HTTP basic,
    or the `Authorization` header's token."""
    from flask_openapi3.models import Response as DocResponse

    guarded: set[str] = set()
    app.security_schemes = {LIFECYCLE_SCHEME: {
        "type": "apiKey", "in": "header", "name": LIFECYCLE_HEADER,
        "description": "The instance's lifecycle key (`sdfunc hook` reads it from a file only the container's user "
                       "can read): the lifecycle hooks need it in every auth mode, or an admin's credentials."}}
    if mode != "none":
        app.security_schemes[mode] = ({"type": "http", "scheme": "basic"} if mode == "basic" else
                                      {"type": "apiKey", "in": "header", "name": "Authorization",
                                       "description": "A service token or a consumer's key, bare or after `Bearer `."})
        guarded = {re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule.rule) for rule in app.url_map.iter_rules()
                   if rule.endpoint.split(".")[0] in AUTHENTICATED_BLUEPRINTS}
    for path, shared in app.paths.items():
        item = app.paths[path] = shared.model_copy(deep=True)  # the blueprints' objects serve every app
        for method in ("get", "post", "put", "delete", "patch", "head", "options"):
            operation = getattr(item, method, None)
            if operation is None:
                continue
            for status, description in GUNICORN_REFUSALS.items():
                operation.responses.setdefault(str(status), DocResponse(description=description))
            if path in guarded:
                operation.security = [{mode: []}]
            elif path in LIFECYCLE_HOOKS:
                operation.security = [{LIFECYCLE_SCHEME: []}] + ([{mode: []}] if mode != "none" else [])
