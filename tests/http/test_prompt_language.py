"""A1111's prompt language through the API: schedules change the image, the infotext keeps the prompt as written
and png-info reads it back into a request that makes the same image, a malformed schedule is a 422 naming its
field, and the hires pass counts its own steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import decode_png

BASE = {"steps": 4, "width": 64, "height": 64, "seed": 21, "sampler_name": "Euler", "cfg_scale": 7}


def _pixels(r) -> np.ndarray:
    assert r.status_code == 200, r.json
    return np.asarray(decode_png(r.json["images"][0]), dtype=np.int16)


@pytest.mark.parametrize("checkpoint", ["demo-sd15", "demo-sdxl"])
def test_a_schedule_changes_the_image_and_the_infotext_round_trips(client, checkpoint):
    settings = {"override_settings": {"sd_model_checkpoint": checkpoint}}
    prompt = "a [red:blue:0.5] house AND a [tree|boat] :0.7"
    first = client.post("/sdapi/v1/txt2img", json={**BASE, **settings, "prompt": prompt,
                                                    "negative_prompt": "[fog::2]"})
    plain = client.post("/sdapi/v1/txt2img", json={**BASE, **settings, "prompt": "a red house",
                                                    "negative_prompt": "fog"})
    assert not np.array_equal(_pixels(first), _pixels(plain))
    infotext = json.loads(first.json["info"])["infotexts"][0]
    assert infotext.startswith(prompt + "\nNegative prompt: [fog::2]\n")
    parsed = client.post("/sdapi/v1/png-info", json={"image": first.json["images"][0]}).json["parameters"]
    assert parsed["Prompt"] == prompt and parsed["Negative prompt"] == "[fog::2]"
    again = client.post("/sdapi/v1/txt2img", json={
        **settings, "prompt": parsed["Prompt"], "negative_prompt": parsed["Negative prompt"],
        "steps": int(parsed["Steps"]), "sampler_name": parsed["Sampler"], "cfg_scale": float(parsed["CFG scale"]),
        "seed": int(parsed["Seed"]), "width": int(parsed["Size-1"]), "height": int(parsed["Size-2"])})
    assert np.array_equal(_pixels(again), _pixels(first))


@pytest.mark.parametrize(("fields", "field"), [
    ({"prompt": "a [cat|dog house"}, "prompt"),
    ({"prompt": "a [cat:dog:1] | house"}, "prompt"),
    ({"negative_prompt": "[fog|rain"}, "negative_prompt"),
    ({"prompt": "a [cat:dog:1e999] house"}, "prompt"),
    ({"prompt": "a [cat:(dog:1.2.3):2]"}, "prompt"),  # a malformed weight inside a schedule
    ({"enable_hr": True, "hr_prompt": "a [cat|dog"}, "hr_prompt"),
])
def test_a_malformed_schedule_is_a_422_naming_the_field(client, fields, field):
    r = client.post("/sdapi/v1/txt2img", json={**BASE, "prompt": "a house", **fields})
    assert r.status_code == 422, r.json
    assert r.json["error"]["field"] == field
    assert "cat" not in r.json["error"]["message"] and "fog" not in r.json["error"]["message"]  # no prompt echo


@pytest.mark.parametrize("prompt", ["red|blue house", "a [cat:dog:0.5 house", "a [b:c] house"])
def test_what_a1111_reads_as_text_stays_text(client, prompt):
    """A1111 reads as plain text what its grammar cannot read without an edit (a stray `|`), and a stray or
    number-less bracket as text around the rest."""
    assert client.post("/sdapi/v1/txt2img", json={**BASE, "prompt": prompt}).status_code == 200


def test_the_hires_pass_counts_its_own_steps(client, service):
    """`when` above 1 is for the hires pass: `[a:b:1.5]` keeps `a` for the whole first pass and switches half
    way through the hires pass (A1111's hires schedules count from the first pass's end)."""
    hires = {**BASE, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.7,
             "hr_second_pass_steps": 4}
    switching = _pixels(client.post("/sdapi/v1/txt2img", json={**hires, "prompt": "a [red:blue:1.5] house"}))
    red_only = _pixels(client.post("/sdapi/v1/txt2img", json={**hires, "prompt": "a [red:blue:1.5] house",
                                                                  "hr_prompt": "a [red:red:1.5] house"}))
    assert not np.array_equal(switching, red_only)  # the hires pass switched to blue
    first_pass = {**BASE, "prompt": "a [red:blue:1.5] house"}
    assert np.array_equal(_pixels(client.post("/sdapi/v1/txt2img", json=first_pass)),
                          _pixels(client.post("/sdapi/v1/txt2img", json={**BASE, "prompt": "a [red:red:1.5] house"})))
