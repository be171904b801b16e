"""The billing ledger and the image records, on SQLite and on a real MariaDB (the `db_url` fixture).

Every charge the client sees (headers, `parameters.billing`) is the ledger's row; a retried id is charged
once; failures are rows with a zero charge; usage totals are sums of rows; records are per consumer."""

import base64
import json
import threading
from decimal import Decimal

from sqlalchemy import create_engine, func, select

from handler.records.db import generated_images, ledger, metadata
from tests.conftest import TINY, basic, decode_png

PRICE = {"prices": {"cpu": "0.0025"}, "currency": "CNY"}


def rows(app, **where):
    """Ledger rows read straight from the database (not through the code under test's queries)."""
    db = app.extensions["sdfunc"].db
    query = select(ledger).where(*(getattr(ledger.c, k) == v for k, v in where.items())).order_by(ledger.c.id)
    with db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def image_rows(app, **where):
    db = app.extensions["sdfunc"].db
    query = select(generated_images).where(*(getattr(generated_images.c, k) == v for k, v in where.items()))
    with db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query.order_by(generated_images.c.id))]


def test_charge_is_in_headers_body_and_ledger(make_app):
    app = make_app(billing=PRICE)
    client = app.test_client()
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "batch_size": 2, "negative_prompt": "blurry"},
                    headers={"x-fc-request-id": "req-charge-1"})
    assert r.status_code == 200, r.json
    billing = r.json["parameters"]["billing"]
    [row] = rows(app, request_id="req-charge-1")
    assert row["status"] == "succeeded" and row["consumer"] == "anonymous" and row["attempts"] == 1
    # Billed time is the generation time only, rounded up to the ms: the first request also loaded the model.
    assert row["model_load_ms"] > 0
    # generation_ms is kept to 1 us: billed_ms is it rounded up to a whole ms.
    assert row["generation_ms"] - 0.001 <= row["billed_ms"] < row["generation_ms"] + 1.001
    assert row["billed_ms"] < row["total_ms"] - row["model_load_ms"] + 1
    amount = Decimal("0.0025") * Decimal(row["billed_ms"]) / 1000
    assert int(r.headers["X-Billed-Duration-Ms"]) == billing["billed_ms"] == row["billed_ms"]
    assert Decimal(r.headers["X-Charge"]) == Decimal(billing["amount"]) == amount
    assert row["amount_nanos"] == int(amount * 10**9)
    assert r.headers["X-Charge-Currency"] == billing["currency"] == row["currency"] == "CNY"
    assert billing["request_id"] == "req-charge-1" and billing["consumer"] == "anonymous" and billing["images"] == 2
    assert row["images"] == 2 and row["checkpoint"] and (row["width"], row["height"], row["steps"]) == (64, 64, 1)

    info = json.loads(r.json["info"])
    images = image_rows(app, request_id="req-charge-1")
    assert [i["seed"] for i in images] == info["all_seeds"]
    first = images[0]
    assert (first["prompt"], first["negative_prompt"], first["steps"], first["size"]) == ("a red house", "blurry", 1, "64x64")
    assert first["sampler"] == info["sampler_name"] and first["cfg_scale"] == info["cfg_scale"]
    assert first["model"] == "demo-sd15" and first["model_hash"] == info["sd_model_hash"]
    assert first["image_base64"] is None  # "Save to DataBase" is off by default


def test_retried_request_id_is_charged_once(make_app):
    app = make_app(billing=PRICE)
    client = app.test_client()
    first = client.post("/sdapi/v1/txt2img", json=TINY, headers={"Idempotency-Key": "order-42"})
    assert first.status_code == 200
    again = client.post("/sdapi/v1/txt2img", json=TINY, headers={"Idempotency-Key": "order-42"})
    assert again.status_code == 409 and again.json["error"]["code"] == "duplicate_request"
    assert again.json["error"]["details"][0]["billed_ms"] == first.json["parameters"]["billing"]["billed_ms"]
    assert again.headers["X-Charge"] == "0" and again.headers["X-Billed-Duration-Ms"] == "0"
    # FC's request id is the key when there is no Idempotency-Key.
    assert client.post("/sdapi/v1/txt2img", json=TINY, headers={"x-fc-request-id": "fc-1"}).status_code == 200
    assert client.post("/sdapi/v1/txt2img", json=TINY, headers={"x-fc-request-id": "fc-1"}).status_code == 409
    assert [(r["request_id"], r["status"]) for r in rows(app)] == [("order-42", "succeeded"), ("fc-1", "succeeded")]
    usage = client.get("/billing/usage").json["totals"]
    assert usage["requests"] == 2 and usage["succeeded"] == 2
    assert len(image_rows(app, request_id="order-42")) == 1


def test_failed_generation_is_recorded_with_zero_charge_and_a_retry_replaces_it(make_app):
    app = make_app(billing=PRICE)
    client = app.test_client()
    bad = client.post("/sdapi/v1/txt2img", json={**TINY, "sampler_name": "No Such Sampler"},
                      headers={"Idempotency-Key": "retry-me"})
    assert bad.status_code == 422 and bad.headers["X-Charge"] == "0"
    missing = client.post("/sdapi/v1/txt2img", json={**TINY, "override_settings": {"sd_model_checkpoint": "nope"}},
                          headers={"Idempotency-Key": "missing-model"})
    assert missing.status_code == 404
    [failed] = rows(app, request_id="retry-me")
    assert failed["status"] == "failed" and failed["http_status"] == 422 and failed["error"] == "unknown_sampler"
    assert failed["billed_ms"] == 0 and failed["amount_nanos"] == 0 and failed["images"] == 0
    assert rows(app, request_id="missing-model")[0]["http_status"] == 404
    assert image_rows(app, request_id="retry-me") == []

    ok = client.post("/sdapi/v1/txt2img", json=TINY, headers={"Idempotency-Key": "retry-me"})
    assert ok.status_code == 200
    [row] = rows(app, request_id="retry-me")
    assert row["status"] == "succeeded" and row["attempts"] == 2 and row["billed_ms"] > 0 and row["error"] is None
    assert len(image_rows(app, request_id="retry-me")) == 1
    # A later failure with the same id never overwrites the charged success.
    dup = client.post("/sdapi/v1/txt2img", json={**TINY, "steps": 0}, headers={"Idempotency-Key": "retry-me"})
    assert dup.status_code == 422
    assert rows(app, request_id="retry-me")[0]["status"] == "succeeded"


def test_concurrent_consumers_sum_to_their_usage(make_app):
    users = ["alice:a-pass", "bob:b-pass", "carol:c-pass", "root:r-pass"]
    app = make_app(billing={"prices": {"cpu": "0.0013"}, "minimum_ms_per_image": 5},
                   auth={"mode": "basic", "users": users, "admins": ["root"]}, threads=4)
    client = app.test_client()
    per_consumer, errors = 3, []

    def work(user: str, password: str) -> None:
        try:
            for i in range(per_consumer):
                body = {**TINY, "batch_size": 1 + i % 2, "seed": i}
                r = client.post("/sdapi/v1/txt2img", json=body, headers=basic(user, password))
                assert r.status_code == 200, r.json
            r = client.post("/sdapi/v1/txt2img", json={**TINY, "width": 99999}, headers=basic(user, password))
            assert r.status_code == 422
        except AssertionError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=u.split(":")) for u in users[:3]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors

    everyone = rows(app)
    assert len(everyone) == 3 * (per_consumer + 1)
    for user, password in (u.split(":") for u in users[:3]):
        mine = [r for r in everyone if r["consumer"] == user]
        usage = client.get("/billing/usage?group=day", headers=basic(user, password)).json
        totals = usage["totals"]
        assert usage["consumer"] == user
        assert totals["requests"] == len(mine) == per_consumer + 1
        assert totals["failed"] == 1 and totals["images"] == sum(r["images"] for r in mine) == 4
        assert totals["billed_ms"] == sum(r["billed_ms"] for r in mine)
        assert Decimal(totals["amount"]["CNY"]) == sum(Decimal(r["amount_nanos"]) for r in mine) / 10**9
        assert all(r["billed_ms"] >= 5 * r["images"] for r in mine)
        by_model = client.get("/billing/usage?group=model", headers=basic(user, password)).json
        assert [row["key"] for row in by_model["rows"]] == ["-", "demo-sd15.safetensors"]  # the 422 never chose a model
    # Admins read anyone (or everyone); others only themselves.
    root = basic("root", "r-pass")
    all_usage = client.get("/billing/usage?consumer=*", headers=root).json["totals"]
    assert all_usage["requests"] == len(everyone)
    assert all_usage["billed_ms"] == sum(r["billed_ms"] for r in everyone)
    assert client.get("/billing/usage?consumer=alice", headers=root).json["totals"]["requests"] == per_consumer + 1
    refused = client.get("/billing/usage?consumer=alice", headers=basic("bob", "b-pass"))
    assert refused.status_code == 403 and refused.json["error"]["field"] == "consumer"


def test_usage_time_range_and_validation(make_app):
    app = make_app()
    client = app.test_client()
    assert client.post("/sdapi/v1/txt2img", json=TINY).status_code == 200
    day = rows(app)[0]["finished_at"].date().isoformat()
    assert client.get(f"/billing/usage?since={day}").json["totals"]["requests"] == 1
    assert client.get(f"/billing/usage?until={day}").json["totals"]["requests"] == 0
    assert client.get("/billing/usage?since=2000-01-01T00:00:00%2B08:00&until=2000-01-02").json["rows"] == []
    # the document's formats, exactly: an RFC 3339 date-time (with its offset) or a date; an empty range is empty
    assert client.get(f"/billing/usage?since={day}&until=2000-01-01").json["totals"]["requests"] == 0
    assert client.get("/billing/usage?since=0001-01-01T00:00:00%2B05:00").json["totals"]["requests"] == 1
    for query, field in (("group=week", "group"), ("since=yesterday", "since"), ("until=0.5", "until"),
                         ("since=1700000000", "since"), ("since=2026-01-02T10:00", "since"),
                         ("since=2026-02-30", "since"), ("colour=red", "colour")):
        r = client.get(f"/billing/usage?{query}")
        assert r.status_code == 422, query
        assert r.json["error"]["field"] == field, r.json


def test_image_records_listing_and_png(make_app, tmp_path):
    app = make_app(auth={"mode": "basic", "users": ["alice:pw", "bob:pw"]})
    client = app.test_client()
    alice, bob = basic("alice", "pw"), basic("bob", "pw")
    kept = client.post("/sdapi/v1/txt2img", headers=alice,
                       json={**TINY, "batch_size": 2, "alwayson_scripts": {"save_to_db": {"args": [True]}}})
    saved = client.post("/sdapi/v1/txt2img", headers=alice, json={**TINY, "save_images": True})
    neither = client.post("/sdapi/v1/txt2img", headers=bob, json=TINY)
    assert kept.status_code == saved.status_code == neither.status_code == 200

    listing = client.get("/images?per_page=2", headers=alice).json
    assert listing["total"] == 3 and len(listing["images"]) == 2 and listing["page"] == 1
    assert {i["consumer"] for i in listing["images"]} == {"alice"}
    page2 = client.get("/images?per_page=2&page=2", headers=alice).json["images"]
    ids = [i["id"] for i in listing["images"] + page2]
    assert ids == sorted(ids, reverse=True)
    stored = [i for i in listing["images"] + page2 if i["stored"]]
    assert len(stored) == 2
    png = client.get(f"/images/{stored[-1]['id']}", headers=alice)
    assert png.status_code == 200 and png.mimetype == "image/png"
    assert png.data == base64.b64decode(kept.json["images"][0])
    on_disk = next(i for i in listing["images"] + page2 if i["image_url"])
    assert client.get(f"/images/{on_disk['id']}", headers=alice).data == base64.b64decode(saved.json["images"][0])

    bobs = client.get("/images", headers=bob).json["images"]
    assert len(bobs) == 1 and not bobs[0]["stored"] and bobs[0]["image_url"] is None
    gone = client.get(f"/images/{bobs[0]['id']}", headers=bob)
    assert gone.status_code == 404 and "neither kept" in gone.json["error"]["message"]
    # Another consumer's image does not exist for you; nor does listing it.
    assert client.get(f"/images/{stored[0]['id']}", headers=bob).status_code == 404
    assert client.get("/images?consumer=alice", headers=bob).status_code == 403
    rid = kept.json["parameters"]["billing"]["request_id"]
    assert len(client.get(f"/images?request_id={rid}", headers=alice).json["images"]) == 2
    assert client.get("/images?per_page=0", headers=alice).status_code == 422
    assert client.get("/images/0", headers=alice).status_code == 422
    decode_png(kept.json["images"][1])


def test_save_to_db_setting_and_bad_switch(make_app):
    app = make_app(save_images_to_db=True)
    client = app.test_client()
    assert client.post("/sdapi/v1/txt2img", json=TINY).status_code == 200
    assert client.post("/sdapi/v1/txt2img", json={**TINY, "alwayson_scripts": {"save_to_db": "false"}}).status_code == 200
    assert [r["image_base64"] is not None for r in image_rows(app)] == [True, False]
    bad = client.post("/sdapi/v1/txt2img", json={**TINY, "alwayson_scripts": {"save_to_db": "maybe"}})
    assert bad.status_code == 422 and bad.json["error"]["field"] == "alwayson_scripts.save_to_db"


def test_schema_comes_from_the_migrations(make_app, db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from handler.records.db import current_revision, migrate

    app = make_app()
    client = app.test_client()
    assert client.post("/sdapi/v1/txt2img", json=TINY).status_code == 200
    engine = app.extensions["sdfunc"].db.engine
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        assert current_revision(conn) == "0004"
    migrate(engine)  # again: a no-op that keeps every row
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ledger)).scalar_one() == 1


def test_records_off(data_dir, tmp_path):
    from handler.app import create_app
    from tests.conftest import make_settings

    app = create_app(make_settings(data_dir, record_requests=False, database_url=f"sqlite:///{tmp_path}/x.db"))
    client = app.test_client()
    r = client.post("/sdapi/v1/txt2img", json=TINY)
    assert r.status_code == 200 and int(r.headers["X-Billed-Duration-Ms"]) >= 1
    assert client.get("/images").status_code == 404
    assert client.get("/billing/usage").status_code == 404
    assert not (tmp_path / "x.db").exists()


def test_unreachable_database_fails_with_503_and_no_charge(data_dir, tmp_path):
    import socket

    from handler.app import create_app
    from tests.conftest import make_settings

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(make_settings(data_dir, database_url=f"mysql+pymysql://u:secret@127.0.0.1:{port}/db"))
    client = app.test_client()
    r = client.post("/sdapi/v1/txt2img", json=TINY)
    assert r.status_code == 503 and r.json["error"]["code"] == "database_unavailable"
    assert r.headers["Retry-After"] and r.headers["X-Charge"] == "0"
    assert "secret" not in r.get_data(as_text=True)


def test_database_lost_mid_request_keeps_the_saved_image(data_dir, mariadb, tmp_path):
    """The database goes away while the image is being generated: 503, nothing charged, and the PNG saved to
    storage is still there; once the database is back, the ledger has no row for that request."""
    from bench.harness.mariadb import MariaDB
    from handler.app import create_app
    from tests.conftest import make_settings
    from tests.support.waiting import wait_for

    server = MariaDB(base_dir=tmp_path / "db").start()
    try:
        app = create_app(make_settings(data_dir, database_url=server.url))
        service = app.extensions["sdfunc"]
        client = app.test_client()
        assert client.post("/sdapi/v1/txt2img", json=TINY).status_code == 200  # schema made, pool warm
        before = set(service.settings.outputs_dir.rglob("*.png"))
        result = {}

        def slow() -> None:
            result["r"] = client.post("/sdapi/v1/txt2img", headers={"Idempotency-Key": "lost"},
                                      json={**TINY, "steps": 40, "width": 256, "height": 256, "save_images": True})

        t = threading.Thread(target=slow)
        t.start()
        wait_for(lambda: service.progress.snapshot()["state"]["sampling_step"] >= 2, what="sampling")
        server.stop()
        t.join(120)
        r = result["r"]
        assert r.status_code == 503 and r.json["error"]["code"] == "database_unavailable", r.json
        assert r.headers["X-Charge"] == "0"
        assert len(set(service.settings.outputs_dir.rglob("*.png")) - before) == 1, "the saved PNG is kept"
        server.start()  # the same data directory: what was committed before is still there
        engine = create_engine(server.url)
        with engine.connect() as conn:
            keys = [row.request_id for row in conn.execute(select(ledger.c.request_id))]
        engine.dispose()
        assert len(keys) == 1 and "lost" not in keys
    finally:
        server.stop()


def test_one_id_in_flight_twice_and_across_two_instances(make_app):
    """In one process a second request with a running id is refused at once; across instances sharing the
    database both generate and the later commit gets 409, uncharged. The same key from two consumers is two
    requests."""
    from tests.conftest import device_held
    from tests.support.waiting import wait_for

    first, second = make_app(billing=PRICE), make_app(billing=PRICE)
    service = first.extensions["sdfunc"]
    result = {}
    with device_held(service):
        t = threading.Thread(target=lambda: result.update(
            r=first.test_client().post("/sdapi/v1/txt2img", json=TINY, headers={"Idempotency-Key": "race"})))
        t.start()
        wait_for(lambda: service.device.queued >= 1, what="the first request waiting for the device")
        again = first.test_client().post("/sdapi/v1/txt2img", json=TINY, headers={"Idempotency-Key": "race"})
        assert again.status_code == 409 and "being generated" in again.json["error"]["message"]
        other = second.test_client().post("/sdapi/v1/txt2img", json=TINY, headers={"Idempotency-Key": "race"})
        assert other.status_code == 200
    t.join(60)
    late = result["r"]
    assert late.status_code == 409 and late.headers["X-Charge"] == "0"
    details = late.json["error"]["details"][0]
    assert details["billed_ms"] == other.json["parameters"]["billing"]["billed_ms"]
    assert details["images"] == 1 and details["images_kept"] == 1  # an Idempotency-Key keeps the PNGs
    [row] = rows(first, request_id="race")
    assert row["status"] == "succeeded" and row["attempts"] == 1
    assert len(image_rows(first, request_id="race")) == 1

    shared = {**TINY, "alwayson_scripts": {"uid": "tenant-a"}}
    assert first.test_client().post("/sdapi/v1/txt2img", json=shared, headers={"Idempotency-Key": "k"}).status_code == 200
    shared["alwayson_scripts"]["uid"] = "tenant-b"
    assert first.test_client().post("/sdapi/v1/txt2img", json=shared, headers={"Idempotency-Key": "k"}).status_code == 200
    assert sorted(r["consumer"] for r in rows(first, request_id="k")) == ["tenant-a", "tenant-b"]


def test_a_duplicate_says_when_its_images_were_not_kept(make_app):
    client = make_app().test_client()
    assert client.post("/sdapi/v1/txt2img", json=TINY, headers={"x-fc-request-id": "plain"}).status_code == 200
    r = client.post("/sdapi/v1/txt2img", json=TINY, headers={"x-fc-request-id": "plain"})
    assert r.status_code == 409 and "were not kept" in r.json["error"]["message"]
    assert r.json["error"]["details"][0]["images_kept"] == 0


def test_an_upgrade_keeps_the_rows_written_before_it(db_url):
    """A database made by revision 0001 (with a charge in it) upgrades to the latest without losing it."""
    from sqlalchemy import insert

    from handler.records.db import Database, current_revision, migrate, utcnow

    db = Database(db_url)
    try:
        migrate(db.engine, "0001")
        now = utcnow()
        with db.engine.begin() as conn:
            conn.execute(insert(ledger).values(request_id="old", consumer="c", status="succeeded", images=1,
                                               billed_ms=5, price_per_second="1", currency="CNY", amount_nanos=5000000,
                                               attempts=1, started_at=now, finished_at=now))
        db.ready()  # what a newer instance does on first use
        with db.engine.connect() as conn:
            assert current_revision(conn) == "0004"
            assert conn.execute(select(ledger.c.amount_nanos).where(ledger.c.request_id == "old")).scalar_one() == 5000000
    finally:
        db.dispose()
