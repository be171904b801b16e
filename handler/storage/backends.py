"""Where generated images go: `put(key, bytes) -> url`, and `read(url) -> bytes` for what `put` returned.

Keys are relative (`txt2img-images/2024-05-01/101010-ab12cd34-7.png`), unique per request, and never leave
the outputs root. Two implementations (`make_storage` picks one from `settings.storage`):

- `LocalStorage` writes files under the outputs folder: a local disk, a NAS, or an OSS bucket mounted there.
  Files appear atomically (temp file + rename). It returns the file's path, or, when the operator names the
  bucket behind a mount, its `oss://bucket/prefix/key` or a signed HTTPS URL.
- `OssStorage` uploads through the OSS API (oss2): `put_object`, or `resumable_upload` (multipart) from
  `multipart_threshold_bytes` on, and returns `oss://` or signed URLs.

A backend that refuses a write or a read (disk full, read-only mount, OSS error) raises `StorageError`, an
`OSError`. oss2 is imported only when a bucket is used. Credentials come from the environment, never from
settings files: `OSS_ACCESS_KEY_ID`, `OSS_ACCESS_KEY_SECRET`, `OSS_SESSION_TOKEN` (oss2's names), else the
function role's temporary credentials that FC puts in `ALIBABA_CLOUD_ACCESS_KEY_ID`,
`ALIBABA_CLOUD_ACCESS_KEY_SECRET`, `ALIBABA_CLOUD_SECURITY_TOKEN`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    import oss2

    from handler.settings import OssSettings, Settings


class StorageError(OSError):
    """The storage backend refused a write or a read; the message is safe to show (no keys, no secrets)."""


class Storage(Protocol):
    def put(self, key: str, data: bytes) -> str:
        """Store `data` under `key` and return its URL (what `parameters.image_url` lists)."""
        ...

    def read(self, url: str) -> bytes | None:
        """The bytes behind a URL this storage returned; None when the URL is not its own or the object is
        gone. StorageError when the backend cannot be read."""
        ...

    def delete(self, key: str) -> None:
        """Remove what `put` stored under `key` (gone already is fine). OSError/StorageError when it cannot."""
        ...


def check_key(key: str) -> str:
    """A storage key as given, or ValueError: relative, `/`-separated, no `.`/`..` parts, no NUL."""
    parts = key.split("/")
    if not key or "\x00" in key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key: {key!r}")
    return key


def oss_bucket(oss: OssSettings, bucket_name: str | None = None) -> oss2.Bucket:
    """An oss2 bucket on `oss.endpoint` (`oss.bucket` unless named), signing with V1 and the credentials of
    the environment (read at each request, so rotated STS tokens are picked up)."""
    import oss2

    name = bucket_name or oss.bucket
    if not oss.endpoint or not name:
        raise ValueError("storage.oss: endpoint and bucket are required to reach OSS")
    auth = oss2.ProviderAuth(_environment_credentials())
    return oss2.Bucket(auth, oss.endpoint, name)


class OssUrls:
    """The URL forms of the objects under one bucket prefix: `oss://bucket/prefix/key`, or a V1 signed GET URL
    valid for `sign_expiry_seconds` (needs `bucket`). `key_of` maps either form back to the key."""

    def __init__(self, bucket_name: str, prefix: str, style: str, *, bucket: oss2.Bucket | None = None,
                 sign_expiry_seconds: int = 3600) -> None:
        if style not in ("oss", "signed") or (style == "signed" and bucket is None):
            raise ValueError(f"OSS URL style {style!r}: oss, or signed with a bucket to sign with")
        self.bucket_name, self.prefix, self.style = bucket_name, prefix.strip("/"), style
        self.bucket, self.sign_expiry_seconds = bucket, sign_expiry_seconds

    def object_name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        name = self.object_name(key)
        if self.style == "oss":
            return f"oss://{self.bucket_name}/{name}"
        assert self.bucket is not None
        return self.bucket.sign_url("GET", name, self.sign_expiry_seconds, slash_safe=True)

    def key_of(self, url: str) -> str | None:
        """The key of an `oss://` or signed URL of this bucket and prefix; None for anything else."""
        parts = urlsplit(url)
        path = unquote(parts.path).lstrip("/")
        if parts.scheme == "oss":
            name = path if parts.netloc == self.bucket_name else None
        elif parts.scheme in ("http", "https") and self.bucket is not None:
            endpoint = urlsplit(self.bucket.endpoint).netloc
            if parts.netloc == f"{self.bucket_name}.{endpoint}":
                name = path  # virtual-hosted style: bucket.endpoint/object
            elif parts.netloc == endpoint and path.startswith(f"{self.bucket_name}/"):
                name = path[len(self.bucket_name) + 1:]  # path style (IP endpoints)
            else:
                name = None
        else:
            name = None
        if name is None:
            return None
        if self.prefix:
            if not name.startswith(f"{self.prefix}/"):
                return None
            name = name[len(self.prefix) + 1:]
        try:
            return check_key(name)
        except ValueError:
            return None


class LocalStorage:
    """A folder (local disk, NAS or OSS mount). `put` returns the file's absolute path, or its OSS URL when
    `urls` is given (the folder is that bucket prefix, mounted)."""

    def __init__(self, root: Path, urls: OssUrls | None = None) -> None:
        self.root = root.resolve()
        self.urls = urls

    def path_for(self, key: str) -> Path:
        """The file a key maps to; ValueError when it would escape the root (`..`, a symlink)."""
        target = (self.root / key).resolve()
        if target == self.root or self.root not in target.parents:
            raise ValueError(f"storage key escapes the root: {key!r}")
        return target

    def put(self, key: str, data: bytes) -> str:
        target = self.path_for(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".put-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.urls.url(key) if self.urls is not None else str(target)

    def delete(self, key: str) -> None:
        self.path_for(key).unlink(missing_ok=True)

    def key_of(self, url: str) -> str | None:
        """The key behind a URL `put` returned (or an older path form): a path inside the root, a relative
        key, or this bucket's `oss://` / signed URL. None for anything else."""
        if "://" in url:
            return self.urls.key_of(url) if self.urls is not None else None
        path = Path(url)
        if path.is_absolute():
            try:
                return str(path.relative_to(self.root))
            except ValueError:
                return None
        return url

    def read(self, url: str) -> bytes | None:
        key = self.key_of(url)
        if key is None:
            return None
        try:
            path = self.path_for(key)
        except ValueError:
            return None  # outside the outputs root: never served
        return path.read_bytes() if path.is_file() else None


class OssStorage:
    """Objects in an OSS bucket under `prefix`, uploaded through the API: `put_object` below
    `multipart_threshold_bytes`, `oss2.resumable_upload` (multipart, parts of `multipart_part_size_bytes`)
    from there on. Returns `oss://` or signed URLs (`urls.style`)."""

    def __init__(self, bucket: oss2.Bucket, urls: OssUrls, *, multipart_threshold_bytes: int,
                 multipart_part_size_bytes: int) -> None:
        self.bucket, self.urls = bucket, urls
        self.multipart_threshold_bytes = multipart_threshold_bytes
        self.multipart_part_size_bytes = multipart_part_size_bytes

    def put(self, key: str, data: bytes) -> str:
        import oss2

        name = self.urls.object_name(check_key(key))
        try:
            if len(data) >= self.multipart_threshold_bytes:
                self._multipart(name, data)
            else:
                self.bucket.put_object(name, data)
        except oss2.exceptions.OssError as exc:
            raise StorageError(_oss_failure("upload", exc)) from exc
        return self.urls.url(key)

    def delete(self, key: str) -> None:
        import oss2

        try:
            self.bucket.delete_object(self.urls.object_name(check_key(key)))  # OSS: deleting nothing succeeds
        except oss2.exceptions.OssError as exc:
            raise StorageError(_oss_failure("delete", exc)) from exc

    def _multipart(self, name: str, data: bytes) -> None:
        """resumable_upload works from a file and keeps its checkpoint beside it: both live in a private
        temporary folder for this one upload (no fixed names, nothing left in $HOME)."""
        import oss2

        with tempfile.TemporaryDirectory(prefix="sdfunc-upload-") as scratch:
            source = Path(scratch) / "object"
            source.write_bytes(data)
            oss2.resumable_upload(self.bucket, name, str(source), store=oss2.ResumableStore(root=scratch),
                                  multipart_threshold=self.multipart_threshold_bytes,
                                  part_size=self.multipart_part_size_bytes)

    def read(self, url: str) -> bytes | None:
        import oss2

        key = self.urls.key_of(url)
        if key is None:
            return None
        try:
            return self.bucket.get_object(self.urls.object_name(key)).read()
        except oss2.exceptions.NoSuchKey:
            return None
        except oss2.exceptions.OssError as exc:
            raise StorageError(_oss_failure("download", exc)) from exc


def _oss_failure(what: str, exc: Any) -> str:
    status, code = getattr(exc, "status", None), getattr(exc, "code", None) or type(exc).__name__
    return f"OSS {what} failed ({status} {code})" if status and status > 0 else f"OSS {what} failed ({code})"


def make_storage(settings: Settings) -> Storage:
    """The storage `settings.storage` describes. Needing a bucket without OSS credentials in the environment
    is a ValueError here, at start, rather than a failed request later."""
    cfg = settings.storage
    oss = cfg.oss
    style = cfg.url_style
    bucket = oss_bucket(oss) if cfg.kind == "oss" or style == "signed" else None
    if bucket is not None:
        _check_credentials(bucket)
    urls = (OssUrls(oss.bucket or "", oss.prefix, style, bucket=bucket, sign_expiry_seconds=oss.sign_expiry_seconds)
            if style != "path" else None)
    if cfg.kind == "oss":
        assert bucket is not None and urls is not None
        return OssStorage(bucket, urls, multipart_threshold_bytes=oss.multipart_threshold_bytes,
                          multipart_part_size_bytes=oss.multipart_part_size_bytes)
    return LocalStorage(settings.outputs_dir, urls=urls)


CREDENTIAL_VARIABLES = (
    ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN"),  # oss2's own names
    ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "ALIBABA_CLOUD_SECURITY_TOKEN"),  # FC role
)


def _environment_credentials() -> Any:
    """An oss2 credentials provider over CREDENTIAL_VARIABLES, the first complete pair winning, read at each
    request (FC's role credentials are temporary)."""
    from oss2.credentials import Credentials, CredentialsProvider
    from oss2.exceptions import ClientError

    class Provider(CredentialsProvider):
        def get_credentials(self) -> Credentials:
            for key_id, secret, token in CREDENTIAL_VARIABLES:
                if os.environ.get(key_id) and os.environ.get(secret):
                    return Credentials(os.environ[key_id], os.environ[secret], os.environ.get(token) or None)
            raise ClientError("no OSS credentials in the environment")

    return Provider()


def _check_credentials(bucket: oss2.Bucket) -> None:
    import oss2

    try:
        bucket.auth.credentials_provider.get_credentials()
    except oss2.exceptions.ClientError:
        raise ValueError("storage: OSS needs credentials in OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET (and "
                         "OSS_SESSION_TOKEN for STS), or FC's ALIBABA_CLOUD_ACCESS_KEY_ID / _SECRET / "
                         "ALIBABA_CLOUD_SECURITY_TOKEN") from None

