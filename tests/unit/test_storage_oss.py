"""OSS storage (handler/storage/backends.py): signed URLs checked offline, uploads and reads through oss2 against a local
stand-in for OSS, and a txt2img through the app configured for OSS.

`FakeOss` below is a STAND-IN FOR OSS, not OSS: a small HTTP server on 127.0.0.1 (port 0) that speaks the part
of the OSS REST API oss2 uses here (PutObject, GetObject, InitiateMultipartUpload, ListParts, UploadPart,
CompleteMultipartUpload) with path-style addressing, which oss2 uses for an IP endpoint. It records every
request (method, path, query, headers incl. Authorization, body), checks each V1 signature (header or URL
query) with HMAC-SHA1 computed here independently of oss2, and returns the CRC-64 header oss2 verifies. No test
here touches the network.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit
from xml.etree import ElementTree

import pytest

from tests.conftest import TINY, close_apps, make_settings

AKID, SECRET, TOKEN = "LTAItestkey", "test-secret-0123456789", "sts-token-abc"
BUCKET = "sdfunc-test"


# CRC-64/XZ (ECMA-182, reflected), what OSS returns in x-oss-hash-crc64ecma ------------------------------
def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0xC96C5795D7870F42 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc_table()


def crc64(data: bytes) -> int:
    crc = 0xFFFFFFFFFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFFFFFFFFFF


def test_crc64_check_value():
    assert crc64(b"123456789") == 0x995DC9BBDF1939FA  # the catalogue's check value of CRC-64/XZ


# OSS V1 signatures, computed here from the documented string-to-sign ---------------------------------------
SUBRESOURCES = {"uploads", "uploadId", "partNumber", "security-token", "acl", "append", "position", "x-oss-process"}


def v1_signature(secret: str, verb: str, content_md5: str, content_type: str, date_or_expires: str,
                 oss_headers: dict[str, str], resource: str) -> str:
    canonical_headers = "".join(f"{k}:{v}\n" for k, v in sorted(oss_headers.items()))
    to_sign = f"{verb}\n{content_md5}\n{content_type}\n{date_or_expires}\n{canonical_headers}{resource}"
    return base64.b64encode(hmac.new(secret.encode(), to_sign.encode(), hashlib.sha1).digest()).decode()


def etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest().upper()}"'


def canonical_resource(bucket: str, key: str, query: dict[str, str]) -> str:
    subs = sorted((k, v) for k, v in query.items() if k in SUBRESOURCES)
    tail = "&".join(k if v == "" else f"{k}={v}" for k, v in subs)
    return f"/{bucket}/{key}" + (f"?{tail}" if tail else "")


# The stand-in ------------------------------------------------------------------------------------------------
@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    body: bytes
    status: int = 0


@dataclass
class FakeOss:
    """A stand-in for OSS (see the module docstring). `objects` maps (bucket, key) to bytes."""

    secret: str = SECRET
    requests: list[Recorded] = field(default_factory=list)
    objects: dict[tuple[str, str], bytes] = field(default_factory=dict)
    uploads: dict[str, dict[int, bytes]] = field(default_factory=dict)
    port: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def handler(self) -> type[BaseHTTPRequestHandler]:
        oss = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the test output quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                oss.requests[-1].status = status
                self.send_response(status)
                self.send_header("x-oss-request-id", uuid.uuid4().hex.upper()[:24])
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status: int, code: str) -> None:
                xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{code}"
                       f"</Message><RequestId>0</RequestId><HostId>127.0.0.1</HostId></Error>").encode()
                self._send(status, xml, {"Content-Type": "application/xml"})

            def _authorized(self, rec: Recorded, bucket: str, key: str) -> bool:
                headers = rec.headers
                oss_headers = {k: v for k, v in headers.items() if k.startswith("x-oss-")}
                resource = canonical_resource(bucket, key, rec.query)
                if "Signature" in rec.query:  # a signed URL: Expires takes the place of Date
                    if int(rec.query["Expires"]) < time.time() or rec.query.get("OSSAccessKeyId") != AKID:
                        return False
                    want = v1_signature(oss.secret, rec.method, "", "", rec.query["Expires"], {}, resource)
                    return hmac.compare_digest(want, rec.query["Signature"])
                scheme, _, credential = headers.get("authorization", "").partition(" ")
                akid, _, signature = credential.partition(":")
                want = v1_signature(oss.secret, rec.method, headers.get("content-md5", ""),
                                    headers.get("content-type", ""), headers.get("date", ""), oss_headers, resource)
                return scheme == "OSS" and akid == AKID and hmac.compare_digest(want, signature)

            def _handle(self) -> None:
                parts = urlsplit(self.path)
                query = dict(parse_qsl(parts.query, keep_blank_values=True))
                rec = Recorded(self.command, unquote(parts.path), query, {k.lower(): v for k, v in self.headers.items()},
                               self._body())
                oss.requests.append(rec)
                bucket, _, key = rec.path.lstrip("/").partition("/")
                if not self._authorized(rec, bucket, key):
                    return self._error(403, "SignatureDoesNotMatch")
                if rec.method == "PUT" and "uploadId" in query:
                    oss.uploads[query["uploadId"]][int(query["partNumber"])] = rec.body
                    return self._send(200, headers={"ETag": etag(rec.body),
                                                    "x-oss-hash-crc64ecma": str(crc64(rec.body))})
                if rec.method == "PUT":
                    oss.objects[(bucket, key)] = rec.body
                    return self._send(200, headers={"ETag": etag(rec.body),
                                                    "x-oss-hash-crc64ecma": str(crc64(rec.body))})
                if rec.method == "POST" and "uploads" in query:
                    upload_id = uuid.uuid4().hex.upper()
                    oss.uploads[upload_id] = {}
                    xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><InitiateMultipartUploadResult>"
                           f"<Bucket>{bucket}</Bucket><Key>{key}</Key><UploadId>{upload_id}</UploadId>"
                           f"</InitiateMultipartUploadResult>").encode()
                    return self._send(200, xml, {"Content-Type": "application/xml"})
                if rec.method == "GET" and "uploadId" in query:
                    stored = oss.uploads.get(query["uploadId"])
                    if stored is None:
                        return self._error(404, "NoSuchUpload")
                    listed = "".join(f"<Part><PartNumber>{n}</PartNumber><LastModified>2024-01-01T00:00:00.000Z"
                                     f"</LastModified><ETag>{etag(data)}</ETag><Size>{len(data)}</Size></Part>"
                                     for n, data in sorted(stored.items()))
                    xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListPartsResult><Bucket>{bucket}</Bucket>"
                           f"<Key>{key}</Key><UploadId>{query['uploadId']}</UploadId><NextPartNumberMarker>"
                           f"{max(stored, default=0)}</NextPartNumberMarker><MaxParts>1000</MaxParts>"
                           f"<IsTruncated>false</IsTruncated>{listed}</ListPartsResult>").encode()
                    return self._send(200, xml, {"Content-Type": "application/xml"})
                if rec.method == "POST" and "uploadId" in query:
                    stored = oss.uploads.pop(query["uploadId"], None)
                    if stored is None:
                        return self._error(404, "NoSuchUpload")
                    numbers = [int(p.findtext("PartNumber")) for p in ElementTree.fromstring(rec.body).iter("Part")]
                    if numbers != sorted(stored) or not numbers:
                        return self._error(400, "InvalidPart")
                    data = b"".join(stored[n] for n in numbers)
                    oss.objects[(bucket, key)] = data
                    xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><CompleteMultipartUploadResult><Location>"
                           f"{oss.endpoint}/{bucket}/{key}</Location><Bucket>{bucket}</Bucket><Key>{key}</Key>"
                           f"<ETag>{etag(data)}</ETag></CompleteMultipartUploadResult>").encode()
                    return self._send(200, xml, {"Content-Type": "application/xml", "ETag": etag(data),
                                                 "x-oss-hash-crc64ecma": str(crc64(data))})
                if rec.method == "GET":
                    data = oss.objects.get((bucket, key))
                    if data is None:
                        return self._error(404, "NoSuchKey")
                    return self._send(200, data, {"Content-Type": "image/png", "ETag": etag(data),
                                                  "Last-Modified": formatdate(usegmt=True),
                                                  "x-oss-hash-crc64ecma": str(crc64(data))})
                if rec.method == "DELETE":  # OSS answers 204 whether or not the object was there
                    oss.objects.pop((bucket, key), None)
                    return self._send(204)
                return self._error(405, "MethodNotAllowed")

            do_GET = do_PUT = do_POST = do_DELETE = _handle

        return Handler

    def of(self, method: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method]


@pytest.fixture
def oss_env(monkeypatch):
    """Credentials as oss2's EnvironmentVariableCredentialsProvider reads them; no proxy for 127.0.0.1."""
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", AKID)
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", SECRET)
    monkeypatch.delenv("OSS_SESSION_TOKEN", raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def fake_oss(oss_env) -> Iterator[FakeOss]:
    oss = FakeOss()
    server = ThreadingHTTPServer(("127.0.0.1", 0), oss.handler())
    oss.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield oss
    server.shutdown()
    server.server_close()


def oss_settings(**values):
    from handler.settings import OssSettings

    return OssSettings(**values)


def oss_storage(fake: FakeOss, style: str = "oss", prefix: str = "outputs", **values):
    from handler.settings import Settings
    from handler.storage.backends import make_storage

    settings = Settings(data_dir=Path("/nonexistent-data"), storage={
        "kind": "oss", "url": style, "oss": {"endpoint": fake.endpoint, "bucket": BUCKET, "prefix": prefix, **values}})
    return make_storage(settings)


# Signed URLs, offline ---------------------------------------------------------------------------------------
def test_signed_url_is_oss_v1_signed(oss_env):
    from handler.storage.backends import OssUrls, oss_bucket

    bucket = oss_bucket(oss_settings(endpoint="https://oss-cn-hangzhou.aliyuncs.com", bucket="my-bkt"))
    urls = OssUrls("my-bkt", "sd/outputs", "signed", bucket=bucket, sign_expiry_seconds=600)
    key = "txt2img-images/2024-05-01/101010-ab12cd34-7.png"
    before = int(time.time())
    url = urls.url(key)
    after = int(time.time())
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    assert parts.scheme == "https" and parts.netloc == "my-bkt.oss-cn-hangzhou.aliyuncs.com"
    assert parts.path == "/sd/outputs/" + key
    assert set(query) == {"OSSAccessKeyId", "Expires", "Signature"} and query["OSSAccessKeyId"] == AKID
    assert before + 600 <= int(query["Expires"]) <= after + 600
    resource = f"/my-bkt/sd/outputs/{key}"
    assert query["Signature"] == v1_signature(SECRET, "GET", "", "", query["Expires"], {}, resource)
    assert urls.key_of(url) == key  # read back: the URL maps to its key
    # Another bucket, another prefix or another host is not this storage's URL.
    assert urls.key_of(url.replace("my-bkt.", "other.")) is None
    assert urls.key_of(url.replace("/sd/outputs/", "/sd/elsewhere/")) is None
    assert urls.key_of(f"oss://my-bkt/sd/outputs/{key}") == key and urls.key_of(f"oss://x/sd/outputs/{key}") is None
    assert urls.key_of("oss://my-bkt/sd/outputs/a/../../secret") is None


def test_signed_url_with_sts_token_signs_the_token(oss_env, monkeypatch):
    from handler.storage.backends import OssUrls, oss_bucket

    monkeypatch.setenv("OSS_SESSION_TOKEN", TOKEN)
    bucket = oss_bucket(oss_settings(endpoint="https://oss-cn-shanghai.aliyuncs.com", bucket="my-bkt"))
    url = OssUrls("my-bkt", "", "signed", bucket=bucket, sign_expiry_seconds=60).url("a/b.png")
    query = dict(parse_qsl(urlsplit(url).query))
    assert query["security-token"] == TOKEN
    resource = f"/my-bkt/a/b.png?security-token={TOKEN}"
    assert query["Signature"] == v1_signature(SECRET, "GET", "", "", query["Expires"], {}, resource)


def test_oss_url_form_and_settings_validation(oss_env):
    from pydantic import ValidationError

    from handler.settings import Settings
    from handler.storage.backends import LocalStorage, make_storage

    settings = Settings(data_dir=Path("/nonexistent-data"), storage={"url": "oss", "oss": {"bucket": BUCKET,
                                                                                            "prefix": "/a/b/"}})
    storage = make_storage(settings)  # a mount named by its bucket: no endpoint needed for oss:// URLs
    assert isinstance(storage, LocalStorage) and storage.urls.url("k/x.png") == f"oss://{BUCKET}/a/b/k/x.png"
    for bad in ({"kind": "oss"}, {"kind": "oss", "oss": {"bucket": BUCKET}}, {"url": "signed", "oss": {"bucket": BUCKET}},
                {"kind": "oss", "url": "path", "oss": {"endpoint": "http://x", "bucket": BUCKET}},
                {"oss": {"prefix": "a/../b"}}, {"oss": {"bucket": "Bad_Name"}},
                {"oss": {"multipart_part_size_bytes": 1024}}):
        with pytest.raises(ValidationError):
            Settings(data_dir=Path("/nonexistent-data"), storage=bad)


def test_missing_credentials_fail_at_start(monkeypatch):
    from handler.settings import Settings
    from handler.storage.backends import make_storage

    monkeypatch.delenv("OSS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("OSS_ACCESS_KEY_SECRET", raising=False)
    settings = Settings(data_dir=Path("/nonexistent-data"), storage={
        "kind": "oss", "oss": {"endpoint": "https://oss-cn-hangzhou.aliyuncs.com", "bucket": BUCKET}})
    with pytest.raises(ValueError, match="OSS_ACCESS_KEY_ID"):
        make_storage(settings)


# Uploads against the stand-in -------------------------------------------------------------------------------
def test_put_object_below_the_threshold(fake_oss):
    storage = oss_storage(fake_oss)
    data = b"\x89PNG small object"
    url = storage.put("txt2img-images/2024-05-01/101010-ab12cd34-7.png", data)
    assert url == f"oss://{BUCKET}/outputs/txt2img-images/2024-05-01/101010-ab12cd34-7.png"
    [put] = fake_oss.requests
    assert (put.method, put.path, put.query, put.status) == (
        "PUT", f"/{BUCKET}/outputs/txt2img-images/2024-05-01/101010-ab12cd34-7.png", {}, 200)
    assert put.body == data and put.headers["content-type"] == "image/png"
    assert put.headers["authorization"].startswith(f"OSS {AKID}:")  # and the stand-in checked the signature
    assert storage.read(url) == data
    assert storage.read(f"oss://{BUCKET}/outputs/txt2img-images/none.png") is None  # NoSuchKey
    assert storage.read(f"oss://{BUCKET}/elsewhere/x.png") is None  # not under the prefix: never fetched
    assert [r.method for r in fake_oss.requests] == ["PUT", "GET", "GET"]


def test_delete_removes_the_object(fake_oss):
    """What a failed save wrote is deleted again (handler/storage/outputs.py); deleting what is gone succeeds."""
    storage = oss_storage(fake_oss)
    url = storage.put("txt2img-images/2024-05-01/101010-ab12cd34-8.png", b"\x89PNG doomed")
    storage.delete("txt2img-images/2024-05-01/101010-ab12cd34-8.png")
    storage.delete("txt2img-images/2024-05-01/101010-ab12cd34-8.png")
    assert storage.read(url) is None
    deletes = fake_oss.of("DELETE")
    assert [(r.path, r.status) for r in deletes] == [
        (f"/{BUCKET}/outputs/txt2img-images/2024-05-01/101010-ab12cd34-8.png", 204)] * 2
    assert all(r.headers["authorization"].startswith(f"OSS {AKID}:") for r in deletes)


def test_multipart_upload_from_the_threshold_on(fake_oss, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # resumable_upload must keep nothing in $HOME
    storage = oss_storage(fake_oss, style="signed", multipart_threshold_bytes=1000,
                          multipart_part_size_bytes=100 * 1024)
    data = bytes(range(256)) * 1000  # 256000 bytes: parts of 102400, 102400, 51200
    url = storage.put("img2img-images/2024-05-01/big.png", data)
    name = f"/{BUCKET}/outputs/img2img-images/2024-05-01/big.png"
    assert fake_oss.objects[(BUCKET, name.split("/", 2)[2])] == data
    methods = [(r.method, sorted(set(r.query) & SUBRESOURCES)) for r in fake_oss.requests]
    assert methods == [("POST", ["uploads"]), ("GET", ["uploadId"]), ("PUT", ["partNumber", "uploadId"]),
                       ("PUT", ["partNumber", "uploadId"]), ("PUT", ["partNumber", "uploadId"]),
                       ("POST", ["uploadId"])]
    parts = [r for r in fake_oss.requests if "partNumber" in r.query]
    assert [len(p.body) for p in parts] == [102400, 102400, 51200]
    assert all(r.path == name and r.status == 200 for r in fake_oss.requests)
    assert all(r.headers["authorization"].startswith(f"OSS {AKID}:") for r in fake_oss.requests)
    assert not any(tmp_path.iterdir())
    # The signed URL is a plain HTTP GET away (no oss2 on this side), and reads back through the bucket.
    parsed = urlsplit(url)
    assert parsed.netloc == f"127.0.0.1:{fake_oss.port}" and unquote(parsed.path) == name
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == data
    assert storage.read(url) == data


def test_a_refused_upload_is_a_storage_error(fake_oss):
    from handler.storage.backends import StorageError

    fake_oss.secret = "not-the-secret"  # every signature now fails: 403 SignatureDoesNotMatch
    storage = oss_storage(fake_oss)
    with pytest.raises(StorageError, match="403 SignatureDoesNotMatch") as caught:
        storage.put("txt2img-images/x.png", b"data")
    assert isinstance(caught.value, OSError) and SECRET not in str(caught.value)


# Through the app --------------------------------------------------------------------------------------------
@pytest.fixture
def oss_app(data_dir, tmp_path, fake_oss):
    """Apps on the demo models whose images go to the stand-in; records in a private SQLite file."""
    from handler.app import create_app

    apps = []

    def build(style: str, **oss_values):
        storage = {"kind": "oss", "url": style,
                   "oss": {"endpoint": fake_oss.endpoint, "bucket": BUCKET, "prefix": "sd/outputs", **oss_values}}
        app = create_app(make_settings(data_dir, database_url=f"sqlite:///{tmp_path / f'r{len(apps)}.sqlite3'}",
                                       storage=storage))
        apps.append(app)
        return app

    yield build
    close_apps(apps)


def test_txt2img_saves_to_oss_with_oss_urls(oss_app, fake_oss):
    client = oss_app("oss").test_client()
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "seed": 41, "batch_size": 2, "send_images": True,
                                                "save_images": True, "alwayson_scripts": {"id_task": "t-1"}})
    assert r.status_code == 200, r.json
    grid_url, *urls = r.json["parameters"]["image_url"].split(",")
    assert len(urls) == 2 and grid_url.startswith(f"oss://{BUCKET}/sd/outputs/txt2img-grids/")
    images = r.json["images"][1:]  # a grid comes first (save_images with two images), as in A1111
    for url, seed, image in zip(urls, (41, 42), images):
        assert url.startswith(f"oss://{BUCKET}/sd/outputs/txt2img-images/") and url.endswith(f"-{seed}.png")
        key = url.removeprefix(f"oss://{BUCKET}/")
        assert fake_oss.objects[(BUCKET, key)] == base64.b64decode(image)
    grids = [k for b, k in fake_oss.objects if k.startswith("sd/outputs/txt2img-grids/")]
    assert grids == [grid_url.removeprefix(f"oss://{BUCKET}/")]  # two images: A1111 saves a grid too
    # The image records read the PNG back through the bucket.
    listed = client.get("/images").json["images"]
    one = next(i for i in listed if i["image_url"] == urls[0])
    png = client.get(f"/images/{one['id']}")
    assert png.status_code == 200 and png.data == base64.b64decode(images[0])


def test_txt2img_with_signed_urls_and_multipart(oss_app, fake_oss):
    client = oss_app("signed", multipart_threshold_bytes=1, sign_expiry_seconds=120).test_client()
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "seed": 51, "send_images": False,
                                                "alwayson_scripts": {"save_dir": "team-a", "id_task": "t-2"}})
    assert r.status_code == 200, r.json
    assert r.json["images"] == []
    [url] = r.json["parameters"]["image_url"].split(",")
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    assert parts.netloc == f"127.0.0.1:{fake_oss.port}"
    assert unquote(parts.path).startswith(f"/{BUCKET}/sd/outputs/team-a/") and parts.path.endswith("-51.png")
    assert 0 < int(query["Expires"]) - time.time() <= 121
    assert [r.method for r in fake_oss.requests] == ["POST", "GET", "PUT", "POST"]  # a multipart upload
    with urllib.request.urlopen(url, timeout=10) as response:
        data = response.read()
    assert data.startswith(b"\x89PNG")
    rid = r.json["parameters"]["billing"]["request_id"]
    [record] = client.get(f"/images?request_id={rid}").json["images"]
    assert record["image_url"] == url
    assert client.get(f"/images/{record['id']}").data == data


def test_upload_failure_is_503_and_not_charged(oss_app, fake_oss):
    app = oss_app("oss")
    client = app.test_client()
    fake_oss.secret = "rotated"  # OSS refuses every request
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "save_images": True})
    assert r.status_code == 503 and r.json["error"]["code"] == "storage_unavailable", r.json
    assert r.headers["X-Charge"] == "0" and "rotated" not in r.json["error"]["message"]
    assert client.get("/images").json["total"] == 0
    totals = client.get("/billing/usage").json["totals"]
    assert (totals["succeeded"], totals["failed"], totals["billed_ms"]) == (0, 1, 0)


def test_mounted_outputs_with_oss_urls(data_dir, tmp_path, oss_env):
    """The outputs folder is the bucket, mounted: files are written locally and named by their OSS URL."""
    from handler.app import create_app

    root = tmp_path / "data"
    root.mkdir()
    (root / "models").symlink_to(data_dir / "models")
    app = create_app(make_settings(root, database_url=f"sqlite:///{tmp_path / 'r.sqlite3'}",
                                   storage={"url": "oss", "oss": {"bucket": BUCKET, "prefix": "mnt/outputs"}}))
    try:
        client = app.test_client()
        r = client.post("/sdapi/v1/txt2img", json={**TINY, "seed": 61, "save_images": True,
                                                    "alwayson_scripts": {"id_task": "t"}})
        assert r.status_code == 200, r.json
        url = r.json["parameters"]["image_url"]
        assert url.startswith(f"oss://{BUCKET}/mnt/outputs/txt2img-images/") and url.endswith("-61.png")
        local = root / "outputs" / url.removeprefix(f"oss://{BUCKET}/mnt/outputs/")
        assert local.read_bytes() == base64.b64decode(r.json["images"][0])
        [record] = client.get("/images").json["images"]
        assert client.get(f"/images/{record['id']}").data == local.read_bytes()
    finally:
        app.extensions["sdfunc"].db.dispose()


def test_mounted_outputs_with_signed_urls(tmp_path, fake_oss):
    """Kind local with url signed: the file is written into the (mounted) folder and named by a signed URL of
    the bucket, which the stand-in serves once the object is there, and which reads back from the folder."""
    from handler.settings import Settings
    from handler.storage.backends import LocalStorage, make_storage

    storage = make_storage(Settings(data_dir=tmp_path, storage={"url": "signed", "oss": {
        "endpoint": fake_oss.endpoint, "bucket": BUCKET, "prefix": "mnt", "sign_expiry_seconds": 30}}))
    assert isinstance(storage, LocalStorage)
    url = storage.put("txt2img-images/2024-05-01/x-1.png", b"png bytes")
    assert (tmp_path / "outputs" / "txt2img-images" / "2024-05-01" / "x-1.png").read_bytes() == b"png bytes"
    assert unquote(urlsplit(url).path) == f"/{BUCKET}/mnt/txt2img-images/2024-05-01/x-1.png"
    assert fake_oss.requests == []  # signing is offline
    assert storage.read(url) == b"png bytes"
    assert storage.read(url.replace(f"/{BUCKET}/", "/other-bucket/")) is None
    assert storage.read("/etc/passwd") is None and storage.read("../../etc/passwd") is None
    fake_oss.objects[(BUCKET, "mnt/txt2img-images/2024-05-01/x-1.png")] = b"png bytes"  # what the mount syncs
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"png bytes"


def test_credentials_come_from_oss_variables_else_from_fc_role_variables(monkeypatch):
    """On FC the function role's temporary credentials are in ALIBABA_CLOUD_*; oss2's own OSS_* names win."""
    from handler.settings import OssSettings
    from handler.storage.backends import oss_bucket

    for name in ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", "STS.role-id")
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "role-secret")
    monkeypatch.setenv("ALIBABA_CLOUD_SECURITY_TOKEN", "role-token")
    provider = oss_bucket(OssSettings(endpoint="http://127.0.0.1:1", bucket="sdfunc-test")).auth.credentials_provider
    creds = provider.get_credentials()
    assert (creds.access_key_id, creds.access_key_secret, creds.security_token) == (
        "STS.role-id", "role-secret", "role-token")
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", "own-id")
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", "own-secret")
    creds = provider.get_credentials()  # read at each request
    assert (creds.access_key_id, creds.security_token) == ("own-id", None)
    for name in ("OSS_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_ID"):
        monkeypatch.delenv(name)
    import oss2

    with pytest.raises(oss2.exceptions.ClientError):
        provider.get_credentials()
