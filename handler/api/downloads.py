"""Model downloads over HTTP: `POST /models/download` queues a model file to fetch into the models folder,
`GET /models/download[/<id>]` reports this worker's downloads. Admins only when authentication is on.

The download manager (sources, folders, checks, queue limits) is handler.runtime.downloads; the request and
status schemas are handler.contract.downloads. Status lives in the worker's memory: another instance answers
404 for an id.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from flask import current_app, g, jsonify
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field

from handler.contract.downloads import DownloadRequest, DownloadView
from handler.errors import ErrorModel, Forbidden, NotFound
from handler.runtime.downloads import Downloads

EXTENSION_KEY = "sdfunc.downloads"


class DownloadPath(BaseModel):
    download_id: str = Field(..., pattern=r"^[0-9a-f]{32}$")


class DownloadList(BaseModel):
    downloads: list[DownloadView]


# routes ---------------------------------------------------------------------------------------------------
bp = APIBlueprint("downloads", __name__, abp_tags=[Tag(name="models", description="Model downloads")],
                  abp_responses={401: ErrorModel, 403: ErrorModel, 404: ErrorModel, 409: ErrorModel,
                                 422: ErrorModel, 429: ErrorModel})


@bp.record_once
def _install(state: Any) -> None:
    """One `Downloads` per app, and a background sweep of part files left by dead workers."""
    service = state.app.extensions["sdfunc"]

    def rescan(target: Path) -> None:
        service.store.refresh()
        service.loras.refresh()
        service.embeddings.refresh()
        cache = service.cache_if_loaded
        if cache is not None:
            cache.forget(target)  # an overwritten checkpoint loads afresh next time

    downloads = Downloads(service.settings, rescan)
    state.app.extensions[EXTENSION_KEY] = downloads
    threading.Thread(target=downloads.clean_stale, name="sdfunc-download-sweep", daemon=True).start()


def _downloads() -> Downloads:
    if not g.caller.admin:
        raise Forbidden("only admins may download models")
    return current_app.extensions[EXTENSION_KEY]


@bp.post("/models/download", responses={202: DownloadView})
def start_download(body: DownloadRequest):
    """Download a model file into the models folder in the background (admins): 202 with the download's id.
    409 when the file exists (without `overwrite`), 429 when `downloads.max_queued` downloads wait."""
    downloads = _downloads()
    job = downloads.submit(body)
    response = jsonify(job.view(downloads.settings.data_dir))
    response.status_code = 202
    response.headers["Location"] = f"/models/download/{job.id}"
    return response


@bp.get("/models/download", responses={200: DownloadList})
def list_downloads():
    """This worker's recent downloads, newest first."""
    downloads = _downloads()
    return jsonify({"downloads": [j.view(downloads.settings.data_dir) for j in downloads.all()]})


@bp.get("/models/download/<download_id>", responses={200: DownloadView})
def get_download(path: DownloadPath):
    """A download's status, bytes done and total, and error."""
    downloads = _downloads()
    job = downloads.get(path.download_id)
    if job is None:
        raise NotFound(f"no download {path.download_id} on this instance")
    return jsonify(job.view(downloads.settings.data_dir))
