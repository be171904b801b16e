"""Auth modes, consumers and their keys, and who a generation is charged to (`alwayson_scripts.uid`).
Consumers live in the records database, so these run on SQLite and MariaDB too."""

import pytest

from handler.errors import InvalidRequest
from handler.records.consumers import Consumers
from tests.conftest import TINY, basic


def consumers(app) -> Consumers:
    return app.extensions["sdfunc"].consumers


def charged_to(response) -> str:
    assert response.status_code == 200, response.json
    return response.json["parameters"]["billing"]["consumer"]


def test_none_mode_is_anonymous_and_uid_names_the_consumer(make_app):
    client = make_app().test_client()
    assert charged_to(client.post("/sdapi/v1/txt2img", json=TINY)) == "anonymous"
    named = client.post("/sdapi/v1/txt2img", json={**TINY, "alwayson_scripts": {"uid": "shop-17"}})
    assert charged_to(named) == "shop-17"
    bad = client.post("/sdapi/v1/txt2img", json={**TINY, "alwayson_scripts": {"uid": "../etc"}})
    assert bad.status_code == 422 and bad.json["error"]["field"] == "alwayson_scripts.uid"
    assert client.get("/billing/usage?consumer=shop-17").json["totals"]["requests"] == 1

    ignoring = make_app(auth={"allow_uid": False}).test_client()
    assert charged_to(ignoring.post("/sdapi/v1/txt2img", json={**TINY, "alwayson_scripts": {"uid": "x"}})) == "anonymous"


def test_basic_mode(make_app):
    app = make_app(auth={"mode": "basic", "users": "alice:wonder,admin:s3cret", "admins": ["admin"]})
    client = app.test_client()
    missing = client.get("/sdapi/v1/sd-models")
    assert missing.status_code == 401 and missing.json["error"]["code"] == "unauthorized"
    assert missing.headers["WWW-Authenticate"].startswith('Basic realm="sdfunc"')
    for headers in (basic("alice", "wrong"), basic("nobody", "wonder"), {"Authorization": "Basic !!!"},
                    {"Authorization": "Bearer wonder"}):
        r = client.get("/sdapi/v1/sd-models", headers=headers)
        assert r.status_code == 401 and "WWW-Authenticate" in r.headers, headers
    assert client.get("/sdapi/v1/sd-models", headers=basic("alice", "wonder")).status_code == 200
    assert charged_to(client.post("/sdapi/v1/txt2img", json=TINY, headers=basic("alice", "wonder"))) == "alice"

    # A consumer's API key is its password; the user name must be its id.
    key = consumers(app).add("bob")
    assert charged_to(client.post("/sdapi/v1/txt2img", json=TINY, headers=basic("bob", key))) == "bob"
    assert client.get("/sdapi/v1/options", headers=basic("alice", key)).status_code == 401

    # Only admins may charge another consumer by uid.
    as_other = {**TINY, "alwayson_scripts": {"uid": "alice"}}
    refused = client.post("/sdapi/v1/txt2img", json=as_other, headers=basic("bob", key))
    assert refused.status_code == 403 and refused.json["error"]["field"] == "alwayson_scripts.uid"
    assert charged_to(client.post("/sdapi/v1/txt2img", json=as_other, headers=basic("admin", "s3cret"))) == "alice"

    # Disabling works for key consumers and settings users alike (the row can be added just to disable).
    consumers(app).set_disabled("bob", True)
    disabled = client.get("/sdapi/v1/options", headers=basic("bob", key))
    assert disabled.status_code == 403 and disabled.json["error"]["code"] == "forbidden"
    consumers(app).add("alice")
    consumers(app).set_disabled("alice", True)
    assert client.get("/sdapi/v1/options", headers=basic("alice", "wonder")).status_code == 403
    refused = client.post("/sdapi/v1/txt2img", json=as_other, headers=basic("admin", "s3cret"))
    assert refused.status_code == 403  # an admin cannot charge a disabled consumer either


def test_token_mode(make_app):
    app = make_app(auth={"mode": "token", "tokens": ["eas-service-token"]})
    client = app.test_client()
    r = client.post("/sdapi/v1/txt2img", json=TINY)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert r.headers["X-Charge"] == "0"
    # EAS sends the token bare; Bearer works too. A service token is a gateway: it may name consumers by uid.
    assert charged_to(client.post("/sdapi/v1/txt2img", json=TINY,
                                  headers={"Authorization": "eas-service-token"})) == "service"
    named = client.post("/sdapi/v1/txt2img", json={**TINY, "alwayson_scripts": {"uid": "user-9"}},
                        headers={"Authorization": "Bearer eas-service-token"})
    assert charged_to(named) == "user-9"

    key = consumers(app).add("carol")
    assert charged_to(client.post("/sdapi/v1/txt2img", json=TINY, headers={"Authorization": f"Bearer {key}"})) == "carol"
    assert client.get("/sdapi/v1/options", headers={"Authorization": key + "x"}).status_code == 401
    new = consumers(app).rotate("carol")
    assert client.get("/sdapi/v1/options", headers={"Authorization": key}).status_code == 401
    assert client.get("/sdapi/v1/options", headers={"Authorization": new}).status_code == 200
    assert consumers(app).get("carol").key_prefix == new[:12]


def test_lifecycle_health_and_docs_stay_open(make_app):
    client = make_app(auth={"mode": "token", "tokens": ["t"]}).test_client()
    for path in ("/health", "/metrics", "/openapi/openapi.json"):
        assert client.get(path).status_code == 200, path
    assert client.get("/healthz").status_code in (200, 503)
    for path in ("/sdapi/v1/sd-models", "/images", "/billing/usage", "/sdapi/v1/progress"):
        assert client.get(path).status_code == 401, path


def test_options_are_per_consumer(make_app):
    app = make_app(auth={"mode": "basic", "users": ["a:1", "b:2"]})
    client = app.test_client()
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "demo-sdxl"}, headers=basic("a", "1"))
    assert r.status_code == 200
    mine = client.get("/sdapi/v1/options", headers=basic("a", "1")).json["sd_model_checkpoint"]
    theirs = client.get("/sdapi/v1/options", headers=basic("b", "2")).json["sd_model_checkpoint"]
    assert mine.startswith("demo-sdxl") and not theirs.startswith("demo-sdxl")


def test_webuiapi_client_with_api_auth(make_app):
    """A1111's --api-auth clients (webuiapi's set_auth) work unchanged against basic mode."""
    import threading

    import webuiapi
    from werkzeug.serving import make_server

    app = make_app(auth={"mode": "basic", "users": ["webui:pw"]})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.server_port)
        api.set_auth("webui", "pw")
        result = api.txt2img(prompt="a cat", steps=1, width=64, height=64, seed=3)
        assert result.image.size == (64, 64) and result.info["seed"] == 3
        assert result.parameters["billing"]["consumer"] == "webui"
        api.set_auth("webui", "nope")
        with pytest.raises(RuntimeError) as refused:  # webuiapi raises RuntimeError(status, body)
            api.txt2img(prompt="a cat", steps=1, width=64, height=64)
        assert refused.value.args[0] == 401
    finally:
        server.shutdown()


def test_consumer_ids_and_duplicate_add(make_app):
    app = make_app()
    c = consumers(app)
    key = c.add("shop.one@example")
    assert key.startswith("sdf_") and len(key) > 40
    with pytest.raises(ValueError):
        c.add("shop.one@example")
    with pytest.raises(InvalidRequest):
        c.add("bad id")
    for reserved in ("anonymous", "service", "cli"):
        with pytest.raises(ValueError, match="reserved"):
            c.add(reserved)
    with pytest.raises(KeyError):
        c.set_disabled("ghost", True)
    assert [x.id for x in c.list()] == ["shop.one@example"]
    assert c.by_key(key).id == "shop.one@example" and c.by_key(key + "x") is None


def test_only_the_jobs_consumer_or_an_admin_interrupts_it(make_app):
    import threading

    from tests.support.waiting import wait_for

    app = make_app(auth={"mode": "basic", "users": ["a:1", "b:2", "root:3"], "admins": ["root"]})
    service = app.extensions["sdfunc"]
    client = app.test_client()
    results = {}
    job = {**TINY, "steps": 40, "n_iter": 4}

    def run(user: str, password: str) -> None:
        results[user] = client.post("/sdapi/v1/txt2img", json=job, headers=basic(user, password))

    for owner, password, stopper in (("a", "1", ("a", "1")), ("b", "2", ("root", "3"))):
        t = threading.Thread(target=run, args=(owner, password))
        t.start()
        wait_for(lambda: service.progress.snapshot()["state"]["job_count"]
                 and service.progress.snapshot()["state"]["sampling_step"] >= 1, what="sampling")
        other = "b" if owner == "a" else "a"
        refused = client.post("/sdapi/v1/interrupt", headers=basic(other, "2" if other == "b" else "1"))
        assert refused.status_code == 403 and refused.json["error"]["code"] == "forbidden"
        assert service.progress.snapshot()["state"]["interrupted"] is False
        assert client.post("/sdapi/v1/interrupt", headers=basic(*stopper)).status_code == 200
        t.join(120)
        assert results[owner].status_code == 200 and 1 <= len(results[owner].json["images"]) < 4
    assert client.post("/sdapi/v1/interrupt", headers=basic("b", "2")).status_code == 200  # nothing is running


def test_the_web_pages_requests_get_no_browser_dialog(make_app):
    """A script's request (X-Requested-With: XMLHttpRequest) gets `xBasic`, which opens no browser dialog."""
    client = make_app(auth={"mode": "basic", "users": ["a:1"]}).test_client()
    page = client.get("/account", headers={"X-Requested-With": "XMLHttpRequest", **basic("a", "2")})
    assert page.status_code == 401 and page.headers["WWW-Authenticate"].startswith("xBasic ")
    assert client.get("/account", headers=basic("a", "2")).headers["WWW-Authenticate"].startswith("Basic ")
    assert client.get("/account", headers=basic("a", "1")).json == {"consumer": "a", "admin": False,
                                                                     "auth_mode": "basic", "records": True}
