"""The web page at `/`: one static page (handler/api/static) over the function's own API; `GET /web/config`
tells it how to log in. Both are open: the page holds no data, every call it makes is authenticated."""

from __future__ import annotations

from flask import current_app, jsonify, send_from_directory
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field

from handler import __version__

bp = APIBlueprint("web", __name__, abp_tags=[Tag(name="web", description="The web page")])


class WebConfig(BaseModel):
    auth_mode: str = Field(..., description="none | basic | token: what the login form asks for")
    currency: str
    version: str


@bp.get("/", responses={200: {"description": "The web page (HTML)", "content": {"text/html": {}}}})
def index():
    """The web page: generate, browse images, usage."""
    response = send_from_directory(current_app.static_folder, "index.html", max_age=0)
    response.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data: blob:; "
                                                   "style-src 'self'; script-src 'self'; frame-ancestors 'none'; "
                                                   "form-action 'self'; base-uri 'none'")
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@bp.get("/web/config", responses={200: WebConfig})
def config():
    """How the page logs in, and the billing currency."""
    settings = current_app.extensions["sdfunc"].settings
    return jsonify({"auth_mode": settings.auth.mode, "currency": settings.billing.currency, "version": __version__})
