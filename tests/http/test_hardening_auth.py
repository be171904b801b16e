"""Authentication hardening: every route but health, metrics and the page's own files asks for credentials;
a consumer reads only its own records; keys are stored hashed and compared in constant time; failed attempts
are limited per client address (429 `too_many_auth_failures` with Retry-After)."""

from __future__ import annotations

import hmac
import threading
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import TINY, basic, png_b64

USERS = {"mode": "basic", "users": ["alice:wonder", "bob:builder", "root:r00t"], "admins": ["root"]}
TOKENS = {"mode": "token", "tokens": ["gateway-token"]}

# Open whatever the auth mode: liveness, readiness and metrics (the operator may expose them). And, by design,
# what the web page needs before it can log in (the page, its static files, how to log in) and the OpenAPI
# document with its docs pages: none of them holds or reveals a consumer's data (asserted below).
OPEN = {"/health", "/healthz", "/metrics"}
OPEN_BY_DESIGN = {"/", "/web/config", "/static/<path:filename>"}
DOCS_PREFIX = "/openapi"

PATH_VALUES = {"image_id": 1, "task_id": "0123456789abcdef", "download_id": "0" * 32, "filename": "app.js"}


def _path(app, rule) -> str:
    """The rule's URL with a plausible value for each of its arguments."""
    values = {arg: PATH_VALUES.get(arg, "x") for arg in rule.arguments}
    return app.url_map.bind("localhost").build(rule.endpoint, values)


def _body(path: str) -> dict | None:
    """A body each POST route would accept: an open route would answer it with a 2xx, not a 401."""
    image = png_b64(Image.new("RGB", (64, 64), (200, 10, 10)))
    return {
        "/sdapi/v1/txt2img": TINY,
        "/sdapi/v1/img2img": {**TINY, "init_images": [image]},
        "/sdapi/v1/png-info": {"image": image},
        "/sdapi/v1/options": {"sd_model_checkpoint": "demo-sdxl"},
        "/models/download": {"source": "https://example.com/x.safetensors", "type": "LORA",
                             "file_name": "x.safetensors"},
    }.get(path, {})


def _is_open(rule) -> bool:
    return rule.rule in OPEN or rule.rule in OPEN_BY_DESIGN or rule.rule.startswith(DOCS_PREFIX)


def _walk(app, headers: dict[str, str]) -> tuple[list[str], list[str]]:
    """Call every route with every method it takes: (protected routes checked, open routes checked)."""
    client = app.test_client()
    protected, opened = [], []
    for rule in app.url_map.iter_rules():
        path = _path(app, rule)
        for method in sorted(rule.methods):
            kwargs = {"json": _body(path)} if method == "POST" else {}
            r = client.open(path, method=method, headers=headers, **kwargs)
            what = f"{method} {path}"
            assert r.status_code != 500, what
            if _is_open(rule):
                opened.append(what)
                continue
            if method == "OPTIONS" and rule.endpoint.startswith("fc."):
                # The lifecycle hooks check their key in the view, which Flask's own OPTIONS answer never runs:
                # it says which methods the route takes, and does nothing else.
                assert r.status_code == 200 and not r.data and set(r.headers["Allow"].split(", ")) & {"GET", "POST"}
                continue
            assert r.status_code == 401, f"{what}: {r.status_code} {r.get_data(as_text=True)[:200]}"
            assert "WWW-Authenticate" in r.headers, what
            assert r.headers.get("X-Charge", "0") == "0", what
            protected.append(what)
    return protected, opened


@pytest.mark.parametrize("auth", [USERS, TOKENS], ids=["basic", "token"])
def test_every_route_but_the_open_ones_needs_credentials(make_app, auth):
    app = make_app(auth={**auth, "max_failures": 0})
    service = app.extensions["sdfunc"]
    options_before = service.options("alice")
    wrong = basic("alice", "nope") if auth["mode"] == "basic" else {"Authorization": "Bearer nope"}
    for headers in ({}, wrong):
        protected, opened = _walk(app, headers)
        # Not vacuous: the A1111 routes, records, tasks, downloads and the lifecycle hooks were all refused.
        for expected in ("POST /sdapi/v1/txt2img", "GET /images/1", "GET /tasks/0123456789abcdef",
                         "POST /models/download", "GET /billing/usage", "POST /initialize", "GET /pre-stop",
                         "OPTIONS /sdapi/v1/options", "HEAD /account"):
            assert expected in protected, expected
        assert len(protected) >= 60 and {"GET /health", "GET /healthz", "GET /metrics"} <= set(opened)
    # Nothing the refused calls asked for happened.
    assert service.state == "READY" and not service.loaded_models()  # not stopped, nothing warmed
    assert service.options("alice") == options_before
    assert service.ledger.ledger_rows() == []
    assert app.extensions["sdfunc.downloads"].all() == []


@pytest.mark.parametrize("auth", [USERS, TOKENS], ids=["basic", "token"])
def test_the_document_declares_the_credentials_each_route_needs(make_app, auth):
    """With auth on, the OpenAPI document names the scheme on every route that needs credentials, and on
    no other; 401 and 429 (too many failures) are documented answers there. The lifecycle hooks take the
    lifecycle key or the scheme; with auth off, only the key."""
    app = make_app(auth=auth)
    doc = app.test_client().get("/openapi/openapi.json").json
    mode = auth["mode"]
    assert set(doc["components"]["securitySchemes"]) == {mode, "lifecycleKey"}
    secured, hooks, open_ = set(), set(), set()
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            security = operation.get("security")
            group = secured if security == [{mode: []}] else hooks if security == [{"lifecycleKey": []},
                                                                                   {mode: []}] else open_
            group.add(f"{method.upper()} {path}")
            if "security" in operation:
                assert {"401", "429"} <= set(operation["responses"]), (method, path)
    assert {"POST /sdapi/v1/txt2img", "GET /images/{image_id}", "GET /tasks/{task_id}", "GET /billing/usage",
            "POST /models/download", "GET /account"} <= secured
    assert hooks == {"POST /initialize", "GET /pre-stop"}  # the lifecycle key or an admin
    assert {"GET /health", "GET /healthz", "GET /metrics"} <= open_
    off = make_app().test_client().get("/openapi/openapi.json").json
    assert set(off["components"]["securitySchemes"]) == {"lifecycleKey"}  # the hooks need the key even so
    assert {f"{method.upper()} {path}" for path, item in off["paths"].items() for method, op in item.items()
            if "security" in op} == {"POST /initialize", "GET /pre-stop"}


def test_the_open_routes_reveal_no_consumer_data(make_app):
    app = make_app(auth=USERS)
    client = app.test_client()
    secret_prompt = "a teal walrus reading a newspaper"
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "prompt": secret_prompt}, headers=basic("alice", "wonder"))
    assert r.status_code == 200
    assert set(client.get("/web/config").json) == {"auth_mode", "currency", "version"}
    for path in ("/health", "/healthz", "/metrics", "/web/config", "/", "/openapi/openapi.json"):
        text = client.get(path).get_data(as_text=True)
        assert "alice" not in text and "walrus" not in text, path


# A consumer reads only its own records ------------------------------------------------------------------------
def test_a_consumer_cannot_read_another_consumers_images_usage_or_tasks(make_app):
    from tests.support.waiting import wait_for

    app = make_app(auth=TOKENS, save_images_to_db=True)
    keys = {name: app.extensions["sdfunc"].consumers.add(name) for name in ("alice", "bob")}
    alice, bob = ({"Authorization": f"Bearer {keys[n]}"} for n in ("alice", "bob"))
    client = app.test_client()
    made = client.post("/sdapi/v1/txt2img", json={**TINY, "save_images": True}, headers=alice)
    assert made.status_code == 200
    rid = made.json["parameters"]["billing"]["request_id"]
    task = client.post("/sdapi/v1/txt2img?async=true", json=TINY, headers=alice).json["task_id"]
    wait_for(lambda: client.get(f"/tasks/{task}", headers=alice).json["status"] == "succeeded", what="the task")
    image_ids = [i["id"] for i in client.get("/images", headers=alice).json["images"]]
    assert len(image_ids) == 2

    assert client.get("/images", headers=bob).json["images"] == []
    assert client.get(f"/images?request_id={rid}", headers=bob).json["images"] == []
    for image_id in image_ids:
        assert client.get(f"/images/{image_id}", headers=bob).status_code == 404
    assert client.get(f"/tasks/{task}", headers=bob).status_code == 404
    for path in ("/images?consumer=alice", "/images?consumer=*", "/billing/usage?consumer=alice",
                 "/billing/usage?consumer=*"):
        r = client.get(path, headers=bob)
        assert r.status_code == 403 and r.json["error"]["field"] == "consumer", path
    assert client.get("/billing/usage", headers=bob).json["totals"]["requests"] == 0
    # uid names another consumer only for admins and gateways: bob cannot charge (or read) as alice.
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "alwayson_scripts": {"uid": "alice"}}, headers=bob)
    assert r.status_code == 403
    # The gateway (an admin) sees them all.
    gateway = {"Authorization": "gateway-token"}
    assert len(client.get("/images?consumer=*", headers=gateway).json["images"]) == 2
    assert client.get(f"/images/{image_ids[0]}", headers=gateway).status_code == 200
    assert client.get(f"/tasks/{task}", headers=gateway).status_code == 200


# Keys at rest and their comparison ----------------------------------------------------------------------------
def test_the_database_holds_no_plaintext_key(make_app, db_url):
    from sqlalchemy import MetaData, select

    from handler.records.consumers import hash_secret

    app = make_app(auth=TOKENS)
    service = app.extensions["sdfunc"]
    old = service.consumers.add("carol")
    new = service.consumers.rotate("carol")
    dave = service.consumers.add("dave", admin=True)
    client = app.test_client()
    for key in (new, dave):  # used once, so that nothing written on use holds it either
        assert client.get("/account", headers={"Authorization": key}).status_code == 200
    assert client.get("/account", headers={"Authorization": old}).status_code == 401

    cells: list[str] = []
    meta = MetaData()
    meta.reflect(bind=service.db.engine)
    with service.db.connect() as conn:
        for table in meta.sorted_tables:
            for row in conn.execute(select(table)):
                cells.extend(str(value) for value in row)
    text = "\n".join(cells)
    for key in (old, new, dave):
        assert key not in text and key[12:] not in text  # the listed prefix is the first 12 characters only
    assert hash_secret(new) in text and hash_secret(dave) in text and hash_secret(old) not in text
    if db_url.startswith("sqlite:///"):
        raw = Path(db_url.removeprefix("sqlite:///")).read_bytes()
        for key in (old, new, dave):
            assert key[12:].encode() not in raw


def test_secrets_are_compared_in_constant_time(make_app, monkeypatch):
    """Every user, token and key check goes through hmac.compare_digest, and every configured entry is
    compared (the time does not tell which one matched)."""
    from handler.security import auth

    calls: list[tuple] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    users = make_app(auth={"mode": "basic", "users": ["a:1", "b:2", "c:3"]})
    client = users.test_client()
    assert client.get("/account", headers=basic("b", "2")).status_code == 200
    assert len(calls) >= 3  # all three users were compared, not only up to the match
    calls.clear()
    key = users.extensions["sdfunc"].consumers.add("keyed")
    assert client.get("/account", headers=basic("keyed", key)).status_code == 200
    assert any(auth.hash_secret(key) in pair for pair in calls)  # the key's hash
    assert any(b"keyed" in pair for pair in calls)  # and the user name against the key's consumer

    calls.clear()
    tokens = make_app(auth={"mode": "token", "tokens": ["t1", "t2"]})
    assert tokens.test_client().get("/account", headers={"Authorization": "t1"}).status_code == 200
    assert sum(auth.hash_secret("t1") in pair for pair in calls) == 2  # both tokens compared


# Failed attempts are limited per client address ---------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limited_app(make_app, **auth):
    app = make_app(auth={**USERS, **auth})
    clock = Clock()
    app.extensions["sdfunc"].auth.failures.clock = clock
    return app, clock


def from_(address: str) -> dict:
    return {"environ_base": {"REMOTE_ADDR": address}}


def test_too_many_failures_from_one_address_get_429_until_the_window_passes(make_app):
    app, clock = limited_app(make_app)  # defaults: 10 failures in 60 s
    client = app.test_client()
    for _ in range(10):
        r = client.get("/account", headers=basic("alice", "guess"), **from_("198.51.100.7"))
        assert r.status_code == 401
        clock.now += 1
    blocked = client.get("/account", headers=basic("alice", "wonder"), **from_("198.51.100.7"))
    assert blocked.status_code == 429, blocked.json  # right credentials, but they are not even checked
    assert blocked.json["error"]["code"] == "too_many_auth_failures"
    assert blocked.headers["Retry-After"] == "50"  # the first failure (t=0) leaves the window at t=60; now t=10
    assert "WWW-Authenticate" not in blocked.headers and "wonder" not in blocked.get_data(as_text=True)
    # Another address is not affected, and its success resets nothing for the blocked one.
    assert client.get("/account", headers=basic("alice", "wonder"), **from_("198.51.100.8")).status_code == 200
    # Refused attempts do not count: knocking on does not lengthen the block.
    for _ in range(20):
        assert client.get("/account", headers=basic("alice", "guess"), **from_("198.51.100.7")).status_code == 429
    clock.now += 49
    assert client.get("/account", **from_("198.51.100.7")).headers["Retry-After"] == "1"
    clock.now += 1  # t=60: the oldest failure has left the window
    assert client.get("/account", headers=basic("alice", "wonder"), **from_("198.51.100.7")).status_code == 200
    # Sliding: nine failures are still in the window, so one more blocks again until the next leaves it.
    assert client.get("/account", headers=basic("alice", "guess"), **from_("198.51.100.7")).status_code == 401
    again = client.get("/account", headers=basic("alice", "wonder"), **from_("198.51.100.7"))
    assert again.status_code == 429 and again.headers["Retry-After"] == "1"


def test_a_success_does_not_reset_the_count(make_app):
    app, _ = limited_app(make_app, max_failures=3)
    client = app.test_client()
    for password in ("x", "y", "wonder", "z"):  # a valid login in between guesses changes nothing
        client.get("/account", headers=basic("alice", password), **from_("203.0.113.5"))
    assert client.get("/account", headers=basic("alice", "wonder"), **from_("203.0.113.5")).status_code == 429


def test_requests_without_credentials_and_other_refusals_do_not_count(make_app):
    app, _ = limited_app(make_app, max_failures=2)
    client = app.test_client()
    for _ in range(5):
        assert client.get("/account", **from_("203.0.113.6")).status_code == 401  # guesses nothing
        assert client.get("/images?consumer=bob", headers=basic("alice", "wonder"),
                          **from_("203.0.113.6")).status_code == 403
    assert client.get("/account", headers=basic("alice", "wonder"), **from_("203.0.113.6")).status_code == 200


def test_the_limit_covers_token_mode_the_lifecycle_hooks_and_generation(make_app, monkeypatch):
    app = make_app(auth={**TOKENS, "max_failures": 2})
    service = app.extensions["sdfunc"]

    def never(*args, **kwargs):
        raise AssertionError("generation ran")

    monkeypatch.setattr(service.flow, "device_generate", never)
    client = app.test_client()
    r = client.post("/sdapi/v1/txt2img", json=TINY, headers={"Authorization": "Bearer guess-1"})
    assert r.status_code == 401 and r.headers["X-Charge"] == "0"
    assert client.get("/pre-stop", headers={"Authorization": "guess-2"}).status_code == 401
    for path, method in (("/sdapi/v1/txt2img", "POST"), ("/initialize", "POST"), ("/pre-stop", "GET"),
                         ("/account", "GET")):
        r = client.open(path, method=method, json=TINY if path.endswith("txt2img") else None,
                        headers={"Authorization": "gateway-token"})
        assert r.status_code == 429 and r.json["error"]["code"] == "too_many_auth_failures", path
        assert int(r.headers["Retry-After"]) >= 59
    assert client.post("/sdapi/v1/txt2img", json=TINY).headers["X-Charge"] == "0"
    assert service.state not in ("STOPPING", "STOPPED")
    assert service.ledger.ledger_rows() == []  # neither the failures nor the refusals were billed


def test_forwarded_for_is_used_only_when_trusted(make_app):
    spoofed = [{"X-Forwarded-For": f"192.0.2.{i}, 10.0.0.1"} for i in range(4)]
    app, _ = limited_app(make_app, max_failures=2)
    client = app.test_client()
    for headers in spoofed[:2]:  # distinct X-Forwarded-For, same peer: counted together
        client.get("/account", headers={**basic("alice", "guess"), **headers})
    assert client.get("/account", headers={**basic("alice", "wonder"), **spoofed[3]}).status_code == 429

    app, _ = limited_app(make_app, max_failures=2, trust_forwarded_for=True)
    client = app.test_client()
    for _ in range(2):
        client.get("/account", headers={**basic("alice", "guess"), **spoofed[0]})
    assert client.get("/account", headers={**basic("alice", "wonder"), **spoofed[0]}).status_code == 429
    assert client.get("/account", headers={**basic("alice", "wonder"), **spoofed[1]}).status_code == 200
    assert client.get("/account", headers=basic("alice", "wonder")).status_code == 200  # the peer itself


def test_client_address():
    from handler.security.auth import client_address

    assert client_address("10.1.2.3", "198.51.100.1", trust_forwarded_for=False) == "10.1.2.3"
    assert client_address("10.1.2.3", " 198.51.100.1 , 10.0.0.9", trust_forwarded_for=True) == "198.51.100.1"
    assert client_address("10.1.2.3", "", trust_forwarded_for=True) == "10.1.2.3"
    # One client holds a whole IPv6 /64: its addresses count together.
    a = client_address("2001:db8:1:2::1", None, trust_forwarded_for=False)
    assert a == client_address("2001:db8:1:2:ffff::9", None, trust_forwarded_for=False) == "2001:db8:1:2::/64"
    assert a != client_address("2001:db8:1:3::1", None, trust_forwarded_for=False)
    assert client_address("::ffff:192.0.2.1", None, trust_forwarded_for=False) == "192.0.2.1"
    assert client_address("10.1.2.3", "x" * 500, trust_forwarded_for=True) == "x" * 64
    assert client_address(None, None, trust_forwarded_for=False) == "unknown"


def test_the_limiter_is_bounded_and_thread_safe():
    from handler.errors import TooManyAuthFailures
    from handler.security.auth import FailureLimiter

    clock = Clock()
    limiter = FailureLimiter(3, 60, max_clients=100, clock=clock)
    for i in range(1000):
        limiter.record(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 100  # the least recently failed were dropped
    limiter.record("10.0.0.0")  # dropped long ago: starts again at one failure
    limiter.check("10.0.0.0")

    limiter = FailureLimiter(50, 60, max_clients=10_000, clock=clock)
    barrier = threading.Barrier(8)

    def hammer(n: int) -> None:
        barrier.wait()
        for i in range(2000):
            limiter.record(f"c{i % 200}")
            limiter.retry_after(f"c{(i + n) % 200}")

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(limiter) == 200
    for i in range(200):  # 80 failures each, within the window: every one is refused
        with pytest.raises(TooManyAuthFailures):
            limiter.check(f"c{i}")
    assert FailureLimiter(0, 60).retry_after("anyone") == 0  # max_failures 0: off


def test_settings_document_the_limit():
    from handler.settings import AuthSettings

    fields = AuthSettings.model_fields
    assert AuthSettings().max_failures == 10 and AuthSettings().failure_window_seconds == 60
    assert AuthSettings().trust_forwarded_for is False
    for name in ("max_failures", "failure_window_seconds", "trust_forwarded_for"):
        assert len(fields[name].description) > 40, name
    with pytest.raises(ValueError):
        AuthSettings(max_failures=-1)
    with pytest.raises(ValueError):
        AuthSettings(failure_window_seconds=0)
