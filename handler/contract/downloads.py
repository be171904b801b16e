"""The model-download schemas (`POST /models/download` and its status), shared by the API layer (which
parses requests and documents them in the OpenAPI document) and the download manager (handler.runtime.downloads).

Contract:
- The type names the folder (CHECKPOINT, LORA, VAE, EMBEDDING, CONTROLNET, or OTHER with `folder`).
- Checkpoints, LoRAs, VAEs and embeddings must be `.safetensors` files (the stores refuse pickles).
- A file name is a plain name: no `/`, `\\`, `..`, NUL, control characters, leading dot or spaces around; a
  folder (OTHER only) is relative, without `..`, `\\` or hidden parts. That it stays inside the models root once
  symbolic links are resolved is the manager's check.
- A source is an http(s) URL with a host or `oss://bucket/key`; which schemes are allowed is the manager's check.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator

from handler.contract.schemas import HOST

ModelType = Literal["CHECKPOINT", "LORA", "VAE", "EMBEDDING", "CONTROLNET", "OTHER"]
SAFETENSORS_ONLY = ("CHECKPOINT", "LORA", "VAE", "EMBEDDING")  # what the stores load refuse pickles
# https:// (or http://, with downloads.allow_http) and a host, or oss://bucket/key; printable ASCII after that
SOURCE = (rf"^(?:[Hh][Tt][Tt][Pp][Ss]?://{HOST}(?::[0-9]{{1,5}})?(?:[/?#][!-~]*)?"
          rf"|[Oo][Ss][Ss]://[a-z0-9][a-z0-9-]{{1,61}}[a-z0-9]/[!-~]*[^/\s][!-~]*)$")


class DownloadRequest(BaseModel):
    """POST /models/download."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(..., min_length=1, max_length=4096, pattern=SOURCE,
                        description="https:// URL (http:// with downloads.allow_http) or oss://bucket/key.")
    type: ModelType = Field(..., description="What the file is; it names the folder.")
    folder: str | None = Field(None, max_length=512, validate_default=True,
                               description="type OTHER only: a folder relative to <data>/models (created if missing).")
    file_name: str = Field(..., min_length=1, max_length=255,
                           description="Name of the file to write; .safetensors except for CONTROLNET and OTHER.")
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="Expected SHA-256 (hex); checked.")
    overwrite: StrictBool = Field(False, description="Replace an existing file of that name (else 409).")

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme.lower() == "oss":
            if not re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", parts.netloc) or not parts.path.strip("/"):
                raise ValueError("oss://bucket/key with a valid bucket name and a key")
        elif parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError("an https:// URL or oss://bucket/key is required")
        return value

    @field_validator("file_name")
    @classmethod
    def _file_name(cls, value: str, info: ValidationInfo) -> str:
        kind = info.data.get("type")
        if kind in SAFETENSORS_ONLY and not value.endswith(".safetensors"):
            raise ValueError(f"a {kind} must be a .safetensors file (pickles are not accepted)")
        if ("/" in value or "\\" in value or ".." in value or value.startswith(".") or value != value.strip()
                or any(ord(c) < 32 or ord(c) == 127 for c in value) or len(value.encode("utf-8")) > 255):
            raise ValueError("a plain file name: no / \\ .. NUL, control characters, leading dot or spaces around")
        return value

    @field_validator("folder")
    @classmethod
    def _folder(cls, value: str | None, info: ValidationInfo) -> str | None:
        if (info.data.get("type") == "OTHER") != (value is not None):
            raise ValueError("required for type OTHER and only for it")
        if value is None:
            return None
        parts = value.replace("\\", "/").split("/")
        if ("\\" in value or "\x00" in value or value.startswith("/") or re.match(r"^[A-Za-z]:", value)
                or any(p in ("", ".", "..") or p.startswith(".") for p in parts)):
            raise ValueError("a relative folder inside <data>/models: no absolute path, .., \\ or hidden parts")
        return value


class DownloadView(BaseModel):
    """A download's state."""

    id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    type: ModelType
    source: str = Field(..., description="The source without its query (signed URLs carry credentials there).")
    path: str = Field(..., description="Where the file goes, relative to the data folder.")
    bytes_done: int
    bytes_total: int | None = Field(None, description="From Content-Length or the object size, when known.")
    sha256: str | None = Field(None, description="SHA-256 of what was downloaded, once complete.")
    error: str | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
