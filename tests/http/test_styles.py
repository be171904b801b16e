"""A1111 prompt styles from <data>/styles.csv (pipelines/styles.py): merging, the listing, and a request."""

from __future__ import annotations

import json

import pytest

from tests.conftest import close_apps, linked_data_root, make_settings

SMALL = {"prompt": "a red house", "steps": 2, "width": 64, "height": 64, "seed": 4, "sampler_name": "Euler"}
CSV = ('name,prompt,negative_prompt,description\n'
       'Cinematic,"cinematic still of {prompt}, film grain","cartoon, drawing",a film look\n'
       'Sharp,"sharp focus","blurry"\n'
       '"Empty",,\n')


def test_merge_is_a1111s():
    from pipelines.styles import merge

    assert merge("photo of {prompt}, 4k", "a cat") == "photo of a cat, 4k"
    assert merge("sharp focus", "a cat") == "a cat, sharp focus"
    assert merge("sharp focus", "  ") == "sharp focus"
    assert merge("", "a cat") == "a cat"


def test_store_applies_in_order_and_rereads_the_file(tmp_path):
    from pipelines.errors import InvalidParameter
    from pipelines.styles import StyleStore

    path = tmp_path / "styles.csv"
    store = StyleStore(path)
    assert store.styles() == [] and store.apply("a", "b", []) == ("a", "b")
    with pytest.raises(InvalidParameter) as err:
        store.apply("a", "b", ["Sharp"])
    assert err.value.field == "styles.0"
    path.write_text(CSV, encoding="utf-8")
    assert [s.name for s in store.styles()] == ["Cinematic", "Sharp", "Empty"]
    assert store.apply("a cat", "ugly", ["Cinematic", "Sharp"]) == (
        "cinematic still of a cat, film grain, sharp focus", "ugly, cartoon, drawing, blurry")
    assert store.apply("a cat", "", ["Empty"]) == ("a cat", "")
    with pytest.raises(InvalidParameter) as err:
        store.apply("a", "b", ["Sharp", "Nope"])
    assert err.value.field == "styles.1" and "Cinematic" in str(err.value)
    path.write_text("name,prompt,negative_prompt\nOnly,only {prompt},\n", encoding="utf-8")
    assert [s.name for s in store.styles()] == ["Only"]


@pytest.fixture(scope="module")
def client(data_dir, tmp_path_factory):
    from handler.app import create_app

    root = linked_data_root(data_dir, tmp_path_factory.mktemp("styles"))
    (root / "styles.csv").write_text(CSV, encoding="utf-8")
    app = create_app(make_settings(root))
    yield app.test_client()
    close_apps([app])


def test_prompt_styles_route_lists_the_file(client):
    r = client.get("/sdapi/v1/prompt-styles")
    assert r.status_code == 200
    assert r.json[0] == {"name": "Cinematic", "prompt": "cinematic still of {prompt}, film grain",
                         "negative_prompt": "cartoon, drawing"}


def test_styles_apply_to_the_generation_and_its_infotext(client):
    plain = client.post("/sdapi/v1/txt2img", json=SMALL)
    written = client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "cinematic still of a red house, film grain",
                                                      "negative_prompt": "cartoon, drawing"})
    styled = client.post("/sdapi/v1/txt2img", json={**SMALL, "styles": ["Cinematic"]})
    assert styled.status_code == 200, styled.json
    assert styled.json["images"][0] == written.json["images"][0] != plain.json["images"][0]
    info = json.loads(styled.json["info"])
    assert info["infotexts"][0].startswith("cinematic still of a red house, film grain\nNegative prompt: cartoon, drawing\n")
    assert info["all_prompts"] == ["cinematic still of a red house, film grain"]
    # A1111's Processed: prompt is all_prompts[0], styled
    assert info["prompt"] == "cinematic still of a red house, film grain" and info["styles"] == ["Cinematic"]
    assert styled.json["parameters"]["prompt"] == "a red house"  # the echo is the request as sent


def test_unknown_style_is_a_422_naming_it(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "styles": ["Sharp", "Nope"]})
    assert r.status_code == 422 and r.json["error"]["field"] == "styles.1"
