"""The one settings object.

Sources, highest priority first: keyword arguments (tests), `SDFUNC_*` environment variables (s.yaml sets
these), the YAML file named by `SDFUNC_CONFIG` (or `./sdfunc.yaml` when present), then the defaults below.
"""

from __future__ import annotations

import json
import os
import re
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

CONSUMER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"  # consumer ids: users, API-key consumers, uid


def _yaml_file() -> Path | None:
    named = os.environ.get("SDFUNC_CONFIG")
    if named:
        return Path(named)
    local = Path("sdfunc.yaml")
    return local if local.is_file() else None


class WarmupShape(BaseModel):
    """One warm-up generation: a size and a step count, for one architecture or (arch None) for all."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(512, ge=64, le=4096, description="Width in pixels (a multiple of 8).")
    height: int = Field(512, ge=64, le=4096, description="Height in pixels (a multiple of 8).")
    steps: int = Field(2, ge=1, le=50, description="Sampling steps (Euler); a few are enough to warm the kernels.")
    arch: Literal["sd1", "sdxl"] | None = Field(None, description="Only for checkpoints of this architecture.")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: object) -> object:
        """Accept `"512x512"`, `"512x512@4"` and `"sdxl:1024x1024@2"` as well as a mapping."""
        if not isinstance(value, str):
            return value
        text = value.strip().lower()
        arch, _, text = text.rpartition(":")
        size, _, steps = text.partition("@")
        width, sep, height = size.partition("x")
        out: dict[str, object] = {"width": width, "height": height if sep else width}  # "512" = 512x512
        if steps:
            out["steps"] = steps
        if arch:
            out["arch"] = arch
        return out

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError("must be a multiple of 8")
        return value


class WarmupSettings(BaseModel):
    """What the initializer (`POST /initialize`, or worker start) loads and runs before real traffic."""

    model_config = ConfigDict(extra="forbid")

    on_start: bool = Field(True, description="Warm up when the worker starts (platforms without an initializer).")
    checkpoints: list[str] = Field(
        default_factory=list, description="Checkpoints to preload, any A1111 name form. Empty = the default checkpoint."
    )
    shapes: list[WarmupShape] = Field(
        default_factory=lambda: [WarmupShape(width=512, height=512, arch="sd1"),
                                 WarmupShape(width=1024, height=1024, arch="sdxl")],
        description="One small generation per shape and matching checkpoint, at the sizes real traffic uses.",
    )
    requests_wait: bool = Field(
        True, description="A generation request that arrives during warm-up waits for it (true) or gets 503 "
                          "with Retry-After (false).",
    )
    retry_after: int = Field(5, ge=1, description="Retry-After (s) on a 503 during warm-up or stopping.")
    prefetch: bool = Field(
        True, description="From the server's start, read the warm-up checkpoints' bytes (and hash them) in a "
                          "background process while the heavy imports run, so that loading reads memory.",
    )
    preimport: bool = Field(
        True, description="The gunicorn master imports torch, diffusers and the app's modules before it forks "
                          "the worker, so a replaced worker starts in about a second plus the model load.",
    )
    compile: bool = Field(False, description="torch.compile the UNet of every loaded pipeline (costs ~1 min on CPU).")
    compile_cache_dir: Path | None = Field(
        None, description="Inductor cache for torch.compile; default <data>/cache/inductor (on the mount, so "
                          "later instances reuse it).",
    )


class QueueSettings(BaseModel):
    """How many generation requests one instance takes at once, and how long one may take
    (handler/runtime/admission.py, handler/runtime/flow.py)."""

    model_config = ConfigDict(extra="forbid")

    max_waiting: int = Field(
        4, ge=0, le=256, description="Generation requests that may wait behind the running one; one more gets "
                                     "429 with a Retry-After from the measured service time.",
    )
    timeout_seconds: float = Field(
        600.0, gt=0, description="Longest a generation request may wait and run; later it fails with 503 "
                                 "`timeout` and is not charged (a running job is stopped after its current step).",
    )


class BatchSettings(BaseModel):
    """Dynamic batching (handler/runtime/batching.py): compatible txt2img requests that wait together run as one batch."""

    model_config = ConfigDict(extra="forbid")

    max_size: int = Field(
        1, ge=1, le=64, description="Most images in one batched pipeline call; 1 turns batching off.",
    )
    max_wait_ms: float = Field(
        20.0, ge=0, le=5000, description="How long the first request of a batch waits for compatible ones.",
    )


_BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
               "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def _parse_bytes(value: object) -> object:
    """`12GiB`, `500 MB`, `1.5e9` or a number -> int bytes; `auto` / `none` / empty -> None; else unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower().replace("_", "")
    if text in ("", "auto", "none", "null"):
        return None
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)", text)
    if not match or match.group(2) not in _BYTE_UNITS:
        return value  # pydantic reports it
    return int(float(match.group(1)) * _BYTE_UNITS[match.group(2)])


class CacheSettings(BaseModel):
    """The warm pipeline cache and how checkpoints are read (pipelines/cache.py, pipelines/loading.py). Byte
    sizes take a number or a unit: `12GiB`, `500MB`. `max_loaded_models` still caps the number of checkpoints
    on the device on top of `device_bytes`."""

    model_config = ConfigDict(extra="forbid")

    device_bytes: int | None = Field(
        None, ge=0, description="Weights kept on the device (least recently used evicted beyond it). None/`auto`: "
                                "`device_fraction` of the GPU's memory, or of the machine's RAM on CPU.",
    )
    device_fraction: float = Field(
        0.6, gt=0, le=1, description="Share of the device's memory `device_bytes: auto` gives to weights (the rest "
                                     "is for activations: SDXL at 1024x1024 needs several GiB).",
    )
    host_bytes: int = Field(
        0, ge=0, description="Host RAM for pipelines evicted from the GPU (PAI-EAS --sd-dynamic-cache): their "
                             "modules move to RAM and back on the next request, without reading the disk. 0: off "
                             "(evicted pipelines are dropped). No effect on a CPU-only machine.",
    )
    copy_to_local: bool = Field(
        False, description="Copy a single-file checkpoint to `local_dir` with large sequential reads before "
                           "loading it (mmap on a network mount reads page by page), reusing the copy while the "
                           "source's size and mtime match.",
    )
    local_dir: Path | None = Field(
        None, description="Local-disk folder for those copies; default <system temp>/sdfunc-model-copies.",
    )
    local_max_bytes: int | None = Field(
        10 * 2**30, ge=0, description="Disk budget of the local copies; least recently used ones are deleted "
                                      "beyond it (the copy being loaded is always kept). None/`auto`: no limit.",
    )
    direct_to_device: bool = Field(
        True, description="Load UNet and VAE weights from the file straight onto the device (no full CPU copy).",
    )

    @field_validator("device_bytes", "host_bytes", "local_max_bytes", mode="before")
    @classmethod
    def _bytes(cls, value: object) -> object:
        return _parse_bytes(value)

    @property
    def resolved_local_dir(self) -> Path:
        import tempfile

        return self.local_dir or Path(tempfile.gettempdir()) / "sdfunc-model-copies"


class TaskSettings(BaseModel):
    """Asynchronous generation tasks (handler/runtime/tasks.py): `?async=true` or `Prefer: respond-async` answer 202
    with a task id; `GET /tasks/<id>` gives the result. PAI-EAS's queue service (`/api/predict/<service>/...`,
    handler/api/eas_queue.py) puts tasks on input queues and delivers their results from `<service>/sink`.
    (FC's own async invocations run to the end: FC queues them and delivers the response to its destinations.)
    While the instance is full of synchronous requests (429 `busy`), a task waits and tries again for at most
    `queue.timeout_seconds`, then fails with `timeout` (not charged)."""

    model_config = ConfigDict(extra="forbid")

    runners: int = Field(
        2, ge=1, le=16, description="Threads per worker that take queued tasks and run them (two let a task's "
                                    "encoding and saving overlap the next one's generation, and tasks batch).",
    )
    poll_seconds: float = Field(
        1.0, gt=0, le=60, description="How often an idle worker looks for tasks queued on other instances.",
    )
    max_watchers: int = Field(
        2, ge=0, le=64, description="PAI-EAS sink watchers (WebSockets) a worker serves at once; each holds one "
                                    "HTTP thread (never the device or a queue place). More are refused with 503.",
    )
    watch_poll_seconds: float = Field(
        0.25, gt=0, le=10, description="How often a sink watcher looks for results finished on other instances "
                                       "(those finished on its own instance are sent at once).",
    )

    max_delivery: int = Field(
        1, ge=1, le=10, description="Runs a task may get: a task whose worker died is run again until it has had "
                                    "this many, then marked failed (1: never re-run, as PAI-EAS).",
    )
    heartbeat_seconds: float = Field(2.0, gt=0, le=60, description="How often a worker marks its tasks alive.")
    stale_seconds: float = Field(
        10.0, gt=0, description="A task not marked alive for this long belongs to a dead worker: it is re-run or "
                                "failed by any instance sharing the database.",
    )
    callback_timeout_seconds: float = Field(10.0, gt=0, le=120, description="Timeout of one callback POST.")
    callback_attempts: int = Field(3, ge=1, le=10, description="Callback tries, with 1 s, 2 s, 4 s... between them.")
    callback_allow_private: bool = Field(
        False, description="Allow callbacks to loopback, private and link-local addresses (tests, a private "
                           "network you trust). Off: such callback URLs are refused with 422. Cloud metadata "
                           "addresses stay refused unless a network.allow_hosts CIDR names them.",
    )


class NetworkSettings(BaseModel):
    """Outbound HTTP(S) the function makes for clients: img2img `image_link`, model downloads, task callbacks
    (handler/security/netguard.py). Hosts that resolve to loopback, private, link-local, CGNAT, multicast, reserved or
    metadata addresses are refused unless allow-listed here."""

    model_config = ConfigDict(extra="forbid")

    allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Host names (`files.internal`, `*.corp.example`) and CIDRs "
                                          "(`10.0.0.0/8`, `127.0.0.1/32`) that may be reached although not "
                                          "public; a JSON list or a comma-separated string. A cloud metadata "
                                          "address is reachable only through a CIDR that contains it.",
    )
    timeout_seconds: float = Field(10.0, gt=0, le=300, description="Connect timeout, and longest wait for each read.")
    fetch_deadline_seconds: float = Field(
        60.0, gt=0, le=3600, description="Longest a whole image fetch (image_link) may take, redirects included.",
    )
    max_redirects: int = Field(3, ge=0, le=10, description="Redirects followed; each hop is checked again.")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest image fetched by URL (bytes).")
    ca_bundle: Path | None = Field(
        None, description="PEM file of the CAs trusted for https (a private CA); default: certifi's bundle.",
    )

    @field_validator("allow_hosts", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("allow_hosts")
    @classmethod
    def _host_or_cidr(cls, value: list[str]) -> list[str]:
        import ipaddress

        out = []
        for item in value:
            entry = item.strip().lower()
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                if not re.fullmatch(r"(\*\.)?[a-z0-9_]([a-z0-9_-]{0,62}\.?)*", entry.rstrip(".")):
                    raise ValueError(f"{item!r}: a host name, *.domain or a CIDR") from None
            out.append(entry.rstrip("."))
        return out


class DownloadSettings(BaseModel):
    """`POST /models/download` (handler/runtime/downloads.py): model files fetched into the models folder."""

    model_config = ConfigDict(extra="forbid")

    max_bytes: int = Field(20 * 1024**3, ge=1024, description="Largest file downloaded (bytes).")
    timeout_seconds: float = Field(3 * 3600.0, gt=0, description="Longest one download may take, start to end.")
    workers: int = Field(1, ge=1, le=4, description="Downloads that run at once.")
    max_queued: int = Field(8, ge=1, le=256, description="Downloads that may wait; one more answers 429.")
    allow_http: bool = Field(False, description="Accept http:// sources (off: https:// and oss:// only).")
    oss_endpoint: str | None = Field(
        None, description="OSS endpoint for oss://bucket/key sources (`https://oss-cn-hangzhou-internal."
                          "aliyuncs.com`); default storage.oss.endpoint. Credentials as for storage.oss: OSS_ACCESS_KEY_ID"
                          " / OSS_ACCESS_KEY_SECRET (/ OSS_SESSION_TOKEN), else FC's role credentials.",
    )


class AuthSettings(BaseModel):
    """Who may call the function and as which consumer (handler/security/auth.py)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["none", "basic", "token"] = Field(
        "none", description="none: every caller is the anonymous consumer (local default); basic: HTTP Basic "
                            "with `users` or a consumer's API key as password; token: the Authorization header "
                            "carries a service token (EAS style) or a consumer's API key.",
    )
    users: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="basic mode: `user:password` pairs, as A1111's --api-auth (a comma-"
                                          "separated string works too); the user name is the consumer id.",
    )
    tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="token mode: service tokens (EAS). A holder is a trusted gateway: an "
                                          "admin that may name the consumer with alwayson_scripts.uid.",
    )
    admins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Consumer ids that may read every consumer's usage and images.",
    )
    allow_uid: bool = Field(
        True, description="Let `alwayson_scripts.uid` name the consumer: in mode none for anyone, otherwise for "
                          "service tokens and admins only. Off: uid is ignored.",
    )
    realm: str = Field("sdfunc", description="Realm in WWW-Authenticate.")
    max_failures: int = Field(
        10, ge=0, le=100_000, description="Failed authentication attempts (credentials sent and wrong) one client "
                                          "address may make within `failure_window_seconds`; after that its "
                                          "requests get 429 `too_many_auth_failures` with Retry-After, without "
                                          "their credentials being checked, until the oldest of those failures "
                                          "leaves the window. A success resets nothing. 0 turns the limit off.",
    )
    failure_window_seconds: float = Field(
        60.0, gt=0, le=86_400, description="The sliding window (s) in which `max_failures` failed attempts block "
                                           "a client address.",
    )
    trust_forwarded_for: bool = Field(
        False, description="Count failures by the first X-Forwarded-For address instead of the connection's peer "
                           "address. Only behind a proxy that sets that header itself (FC's HTTP trigger puts the "
                           "client's address there): otherwise every client picks its own address. IPv6 clients "
                           "are counted by their /64.",
    )

    @field_validator("users", "tokens", "admins", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        """A JSON list, or A1111's comma-separated `user:pw,user2:pw2` (what an environment variable holds)."""
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                try:
                    return json.loads(value)
                except json.JSONDecodeError:
                    pass  # not JSON after all (a token may start with "["): the comma form
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("users")
    @classmethod
    def _user_pass(cls, value: list[str]) -> list[str]:
        for item in value:
            user, sep, password = item.partition(":")
            if not sep or not user or not password:
                raise ValueError("each entry must be user:password")
            if not re.match(CONSUMER_ID_PATTERN, user):
                raise ValueError(f"user {user!r}: 1-64 letters, digits and . _ @ -, starting with a letter or digit")
        return value


class BillingSettings(BaseModel):
    """How generation time becomes a charge (handler/records/billing.py)."""

    model_config = ConfigDict(extra="forbid")

    prices: dict[str, Decimal] = Field(
        default_factory=lambda: {"cpu": Decimal(0)},
        description="Price per second of device generation time, by device type: `cpu`, or a GPU model name "
                    "or part of it (`H100`, `A10`, `NVIDIA L20`); the longest key found in the device name wins, "
                    "then `default`. An unpriced device is charged 0 (logged).",
    )
    currency: str = Field("CNY", min_length=1, max_length=8, description="Currency of prices and charges.")
    rounding_ms: int = Field(
        1, ge=1, le=3_600_000, description="Billing unit: 1 bills per millisecond, 1000 per second (billed time "
                                           "is rounded up to a whole unit).",
    )
    minimum_ms_per_image: int = Field(0, ge=0, description="Least billed time per image (ms), before rounding.")
    floor_per_image: Decimal = Field(Decimal(0), ge=0, description="Least charge per image, in the currency.")

    @field_validator("prices")
    @classmethod
    def _non_negative(cls, value: dict[str, Decimal]) -> dict[str, Decimal]:
        for key, price in value.items():
            if not price.is_finite() or price < 0 or price >= 10**9 or price != price.quantize(Decimal("1e-12")):
                raise ValueError(f"{key}: a price is a number from 0 to 1e9 with at most 12 decimal places")
        return value


class OssSettings(BaseModel):
    """The OSS bucket of `storage`: where images are uploaded (kind oss), or the bucket the outputs folder is
    mounted from (kind local with url oss / signed). Credentials never live here: they come from the
    environment, OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET (/ OSS_SESSION_TOKEN), else the function role's
    ALIBABA_CLOUD_ACCESS_KEY_ID / ALIBABA_CLOUD_ACCESS_KEY_SECRET / ALIBABA_CLOUD_SECURITY_TOKEN (FC)."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str | None = Field(
        None, description="OSS endpoint, e.g. `https://oss-cn-hangzhou-internal.aliyuncs.com` (needed to upload "
                          "and to sign URLs).",
    )
    bucket: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$", description="Bucket name.")
    prefix: str = Field(
        "", max_length=512, description="Object-name prefix that stands for the outputs folder, e.g. "
                                        "`sdfunc/outputs` (for a mount: the bucket path mounted at <data>/outputs).",
    )
    sign_expiry_seconds: int = Field(3600, ge=1, description="How long a signed URL (url: signed) stays valid.")
    multipart_threshold_bytes: int = Field(
        10 * 1024 * 1024, ge=1, description="Uploads of this size and larger use multipart (oss2.resumable_upload).",
    )
    multipart_part_size_bytes: int = Field(
        10 * 1024 * 1024, ge=100 * 1024, description="Part size of multipart uploads (OSS needs 100 KiB or more).",
    )

    @field_validator("prefix")
    @classmethod
    def _clean_prefix(cls, value: str) -> str:
        value = value.strip("/")
        if value and ("\x00" in value or any(part in ("", ".", "..") for part in value.split("/"))):
            raise ValueError("a /-separated object-name prefix without empty, . or .. parts")
        return value


class StorageSettings(BaseModel):
    """Where saved images go and which URL `parameters.image_url` gives for them (handler/storage/backends.py)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "oss"] = Field(
        "local", description="local: files under <data>/outputs (a local disk, NAS or OSS mount); oss: objects "
                             "uploaded to storage.oss through the OSS API.",
    )
    url: Literal["path", "oss", "signed"] | None = Field(
        None, description="path: the file path (kind local only); oss: `oss://bucket/prefix/key`; signed: a "
                          "signed HTTPS GET URL. Default: path for local, oss for oss.",
    )
    oss: OssSettings = Field(default_factory=OssSettings, description="The bucket (kind oss, or url oss / signed).")

    @property
    def url_style(self) -> str:
        return self.url or ("oss" if self.kind == "oss" else "path")

    @model_validator(mode="after")
    def _complete(self) -> StorageSettings:
        style = self.url_style
        if self.kind == "oss" and style == "path":
            raise ValueError("url: path needs kind local (objects uploaded to OSS have no local path)")
        if style != "path" and not self.oss.bucket:
            raise ValueError(f"oss.bucket: required with url {style}")
        if (self.kind == "oss" or style == "signed") and not self.oss.endpoint:
            raise ValueError("oss.endpoint: required to upload to OSS or sign URLs")
        return self


class Settings(BaseSettings):
    """Everything the function can be configured with. Paths are resolved to absolute paths."""

    model_config = SettingsConfigDict(env_prefix="SDFUNC_", env_nested_delimiter="__", extra="forbid",
                                      validate_default=True, populate_by_name=True)

    data_dir: Path = Field(Path("data"), description="Data root: models/, outputs/, cache/ (the NAS/OSS mount in FC).")
    host: str = Field("0.0.0.0", description="Address gunicorn binds.")
    port: int = Field(9000, ge=1, le=65535, description="Port gunicorn binds (FC's default CAPort is 9000).")
    threads: int | None = Field(
        None, ge=1, le=300, description="HTTP threads in the one gunicorn worker. Default: queue.max_waiting + 5, "
                                        "so that a full queue answers 429 instead of leaving requests in gunicorn's "
                                        "own backlog, with threads to spare for health, progress and listings.",
    )
    queue: QueueSettings = Field(default_factory=QueueSettings, description="Bounded queue and request timeout.")
    batch: BatchSettings = Field(default_factory=BatchSettings, description="Dynamic batching of compatible requests.")
    tasks: TaskSettings = Field(default_factory=TaskSettings, description="Asynchronous generation tasks.")
    timeout: int = Field(900, ge=30, description="gunicorn worker timeout (s); long enough for a cold SDXL load.")
    default_checkpoint: str | None = Field(
        None, description="Checkpoint served when a request names none; any A1111 name form. None = first found."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when present, else cpu.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field("auto", description="auto = float16 on GPU, float32 on CPU.")
    max_loaded_loras: int = Field(8, ge=1, le=256, description="LoRA adapters kept loaded per checkpoint (least "
                                  "recently used unloaded).")
    max_loaded_models: int = Field(
        2, ge=1, description="Checkpoints kept on the device at most (least recently used evicted); `cache.device_bytes` "
                             "limits their bytes too.",
    )
    cache: CacheSettings = Field(default_factory=CacheSettings, description="Warm cache budgets and checkpoint reading.")
    warmup: WarmupSettings = Field(default_factory=WarmupSettings, description="Warm-up (FC initializer) settings.")
    prestop_grace_seconds: float = Field(
        60.0, ge=0, description="How long `GET /pre-stop` waits for in-flight generations before answering."
    )
    build_demo_models: bool = Field(True, description="Write the tiny demo checkpoints when the models folder has none.")

    max_width: int = Field(2048, ge=64, description="Largest width accepted (pixels).")
    max_height: int = Field(2048, ge=64, description="Largest height accepted (pixels).")
    max_steps: int = Field(150, ge=1, description="Most sampling steps accepted.")
    max_images: int = Field(16, ge=1, description="Most images per request (batch_size x n_iter).")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest request body (bytes); larger -> 413.")
    max_input_pixels: int = Field(4096 * 4096, ge=64 * 64, description="Largest decoded input image (pixels).")
    max_prompt_chars: int = Field(20_000, ge=100, description="Longest prompt or negative prompt (characters).")
    max_loras_per_prompt: int = Field(
        8, ge=1, le=256, description="Most `<lora:...>` tags in one prompt (a LoRA named twice counts twice); more "
                                     "-> 422 naming `prompt`.",
    )

    auth: AuthSettings = Field(default_factory=AuthSettings, description="Authentication and consumers.")
    billing: BillingSettings = Field(default_factory=BillingSettings, description="Prices and billing units.")
    network: NetworkSettings = Field(default_factory=NetworkSettings, description="Outbound fetches and their guard.")
    downloads: DownloadSettings = Field(default_factory=DownloadSettings, description="Model downloads.")
    database_url: str | None = Field(
        None, description="Records database (ledger, image records, consumers), an SQLAlchemy URL: "
                          "mysql+pymysql://user:pw@host/db (RDS), postgresql+psycopg://... Default: SQLite "
                          "file <data>/sdfunc.sqlite3 (one instance only; use MySQL when several instances share it).",
    )
    record_requests: bool = Field(
        True, description="Write the billing ledger and image records; off: nothing is written and "
                          "/images and /billing/usage answer 404.",
    )
    save_images_to_db: bool = Field(
        False, description="Keep each PNG (base64) in generated_images (the RDS plugin's 'Save to DataBase'); "
                           "per request: alwayson_scripts.save_to_db.",
    )
    storage: StorageSettings = Field(
        default_factory=StorageSettings, description="Where saved images go (folder or OSS) and their URLs.",
    )

    log_level: str = Field("INFO", description="Python logging level name.")
    log_json: bool = Field(True, description="JSON log lines (one object per line) carrying the request id.")
    request_log: bool = Field(True, description="One log line per request with its timings (replaces the access log).")
    log_prompts: bool = Field(False, description="Put prompts in the request log (off: prompts never reach logs).")
    metrics: bool = Field(True, description="Serve Prometheus metrics at GET /metrics and record them.")
    instance_id: str | None = Field(
        None, validation_alias=AliasChoices("SDFUNC_INSTANCE_ID", "FC_INSTANCE_ID"),
        description="This instance's id in logs and the X-Instance-Id header; default FC_INSTANCE_ID, else "
                    "host-pid-random.",
    )

    @property
    def http_threads(self) -> int:
        return self.threads or self.queue.max_waiting + 5

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _warmup_within_limits(self) -> Settings:
        """A warm-up shape the request limits would refuse can only fail the warm-up: refuse it at start."""
        for i, shape in enumerate(self.warmup.shapes):
            if shape.width > self.max_width or shape.height > self.max_height or shape.steps > self.max_steps:
                raise ValueError(f"warmup.shapes.{i}: {shape.width}x{shape.height}@{shape.steps} exceeds "
                                 f"max_width / max_height / max_steps")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = _yaml_file()
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    # Derived paths: the A1111 / PAI-EAS layout of the mount.
    @cached_property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @cached_property
    def checkpoints_dir(self) -> Path:
        return self.models_dir / "Stable-diffusion"

    @cached_property
    def vae_dir(self) -> Path:
        return self.models_dir / "VAE"

    @cached_property
    def lora_dir(self) -> Path:
        return self.models_dir / "Lora"

    @cached_property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @cached_property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @cached_property
    def compile_cache_dir(self) -> Path:
        return self.warmup.compile_cache_dir or self.cache_dir / "inductor"

    @cached_property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'sdfunc.sqlite3'}"

    def ensure_layout(self) -> None:
        """Create the A1111 folders under the data root if missing (first start on an empty mount)."""
        for path in (
            self.checkpoints_dir,
            self.vae_dir,
            self.lora_dir,
            self.models_dir / "ControlNet",
            self.data_dir / "embeddings",
            self.outputs_dir,
            self.cache_dir,
        ):
            path.mkdir(parents=True, exist_ok=True)

    def resolved_device(self) -> str:
        """`cuda` or `cpu`; imports torch, so call it in the worker, not at import time."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self, device: str) -> str:
        """The torch dtype name for `device`: float16 on GPU and float32 on CPU unless set."""
        if self.dtype != "auto":
            return self.dtype
        return "float16" if device == "cuda" else "float32"
