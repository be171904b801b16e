"""Dynamic batching: compatible txt2img requests waiting together run as one pipeline call; each gets the
images it would have got alone (within 1/255 per channel) and is billed a share of the device time by image
count."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from tests.conftest import TINY, decode_png, device_held
from tests.support.waiting import wait_for

BATCH = {"max_size": 8, "max_wait_ms": 300}


def _together(app, bodies: list[dict], headers: list[dict] | None = None) -> list:
    """Send `bodies` at once while the device is held, so that they wait (and group) together."""
    service = app.extensions["sdfunc"]
    client = app.test_client()
    results: list = [None] * len(bodies)
    with device_held(service):
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, client.post(
            "/sdapi/v1/txt2img", json=bodies[i], headers=(headers or [{}] * len(bodies))[i])))
            for i in range(len(bodies))]
        for t in threads:
            t.start()
        wait_for(lambda: service.in_flight == len(bodies), what="every request admitted")
    for t in threads:
        t.join(120)
    return results


def test_batched_requests_get_the_images_they_would_get_alone(make_app):
    alone, batched = make_app(), make_app(batch=BATCH)
    bodies = [{**TINY, "prompt": "a red house", "seed": 11, "steps": 3, "subseed": 5},
              {**TINY, "prompt": "a blue boat", "negative_prompt": "fog", "seed": 22, "steps": 3, "batch_size": 2,
               "subseed": 6},
              {**TINY, "prompt": "a green tree", "seed": 33, "steps": 3, "subseed": 7}]
    assert batched.test_client().post("/sdapi/v1/txt2img", json=TINY).status_code == 200  # warm
    service = batched.extensions["sdfunc"]
    groups = service.batcher.groups_run
    results = _together(batched, bodies)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert service.batcher.groups_run == groups + 1 and service.batcher.members_run >= 3  # one pipeline call
    for body, r in zip(bodies, results):
        single = alone.test_client().post("/sdapi/v1/txt2img", json=body)
        assert len(r.json["images"]) == len(single.json["images"]) == body.get("batch_size", 1)
        ours_info, alone_info = json.loads(r.json["info"]), json.loads(single.json["info"])
        ours_info.pop("job_timestamp"), alone_info.pop("job_timestamp")
        assert ours_info == alone_info  # same seeds, prompts and infotexts
        for ours, theirs in zip(r.json["images"], single.json["images"]):
            a = np.asarray(decode_png(ours), dtype=np.int16)
            b = np.asarray(decode_png(theirs), dtype=np.int16)
            assert np.abs(a - b).max() <= 1, "batched image differs from the one made alone"

    # Billing: each request pays its share of the one call's device time, by image count.
    shares = [r.json["parameters"]["billing"]["generation_ms"] for r in results]
    assert shares[1] == pytest.approx(2 * shares[0], rel=1e-3) and shares[2] == pytest.approx(shares[0], rel=1e-3)
    assert all(r.json["parameters"]["billing"]["billed_ms"] >= 1 for r in results)
    rows = {row["request_id"]: row for row in service.ledger.ledger_rows()}
    for r in results:
        row = rows[r.json["parameters"]["billing"]["request_id"]]
        assert row["billed_ms"] == r.json["parameters"]["billing"]["billed_ms"] and row["images"] == len(r.json["images"])


def test_prompts_that_change_during_sampling_share_the_call(make_app):
    """Prompt editing, alternation and `AND` in a group: one pipeline call, each image with its own conditioning
    per UNet call, each request's image as made alone (within 1/255)."""
    alone, batched = make_app(), make_app(batch=BATCH)
    bodies = [{**TINY, "steps": 3, "seed": 4, "prompt": "a [red:blue:0.5] house"},
              {**TINY, "steps": 3, "seed": 5, "prompt": "a [cat|dog] AND a boat :0.6", "negative_prompt": "[fog::1]"},
              {**TINY, "steps": 3, "seed": 6, "prompt": "a green tree"}]
    assert batched.test_client().post("/sdapi/v1/txt2img", json=TINY).status_code == 200  # warm
    service = batched.extensions["sdfunc"]
    groups = service.batcher.groups_run
    results = _together(batched, bodies)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert service.batcher.groups_run == groups + 1
    for body, r in zip(bodies, results):
        single = alone.test_client().post("/sdapi/v1/txt2img", json=body)
        a = np.asarray(decode_png(r.json["images"][0]), dtype=np.int16)
        b = np.asarray(decode_png(single.json["images"][0]), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, body["prompt"]


def test_incompatible_requests_and_batching_off_run_alone(make_app):
    batched = make_app(batch=BATCH)
    service = batched.extensions["sdfunc"]
    assert batched.test_client().post("/sdapi/v1/txt2img", json=TINY).status_code == 200
    groups = service.batcher.groups_run
    bodies = [{**TINY, "steps": 2}, {**TINY, "steps": 3}, {**TINY, "width": 72}]  # different steps and size
    assert [r.status_code for r in _together(batched, bodies)] == [200, 200, 200]
    assert service.batcher.groups_run == groups + 3
    off = make_app()
    assert not off.extensions["sdfunc"].batcher.enabled
    assert [r.status_code for r in _together(off, [TINY, TINY])] == [200, 200]
    assert off.extensions["sdfunc"].batcher.groups_run == 0


def test_a_shared_batch_is_interrupted_by_an_admin_only(make_app):
    from tests.conftest import basic

    app = make_app(batch=BATCH, auth={"mode": "basic", "users": ["a:1", "b:2", "root:3"], "admins": ["root"]})
    service = app.extensions["sdfunc"]
    client = app.test_client()
    assert client.post("/sdapi/v1/txt2img", json=TINY, headers=basic("a", "1")).status_code == 200
    long = {**TINY, "steps": 60, "width": 128, "height": 128}
    results: list = []
    with device_held(service):
        threads = [threading.Thread(target=lambda u=u: results.append(client.post(
            "/sdapi/v1/txt2img", json={**long, "seed": len(u)}, headers=basic(*u)))) for u in (("a", "1"), ("b", "2"))]
        for t in threads:
            t.start()
        wait_for(lambda: service.in_flight == 2, what="both admitted")
    wait_for(lambda: service.progress.snapshot()["state"]["job_count"]
             and service.progress.snapshot()["state"]["sampling_step"] >= 1, what="the batch sampling")
    assert client.post("/sdapi/v1/interrupt", headers=basic("a", "1")).status_code == 403
    assert client.post("/sdapi/v1/interrupt", headers=basic("root", "3")).status_code == 200
    for t in threads:
        t.join(120)
    assert [r.status_code for r in results] == [200, 200]
