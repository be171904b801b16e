"""Textual-inversion embeddings through the HTTP API: listed by GET /embeddings, used by name in prompts,
reported as `TI hashes` in the infotext. The embedding files are random vectors of the demo text encoders'
widths (32 for demo-sd15; 32 + 64 for demo-sdxl), in the A1111 safetensors layouts."""

import base64
import hashlib
import io
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.conftest import linked_data_root, make_settings

BASE = {"prompt": "a red house", "steps": 2, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def ti_app(data_dir, tmp_path_factory):
    from handler.app import create_app

    root = linked_data_root(data_dir, tmp_path_factory.mktemp("ti-data"))
    emb = root / "embeddings"
    emb.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"emb_params": torch.randn(2, 32, generator=g) * 5}, str(emb / "shiny.safetensors"),
              metadata={"step": "500", "sd_checkpoint_name": "demo-sd15"})
    save_file({"clip_l": torch.randn(1, 32, generator=g) * 5, "clip_g": torch.randn(1, 64, generator=g) * 5},
              str(emb / "xlstyle.safetensors"))
    save_file({"emb_params": torch.randn(1, 1024, generator=g)}, str(emb / "sd2thing.safetensors"))
    (emb / "evil.pt").write_bytes(b"pickle")
    app = create_app(make_settings(root, default_checkpoint="demo-sd15"))
    yield app
    app.extensions["sdfunc"].stop()


def png(body) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB").tobytes()


def gen(client, **changes):
    r = client.post("/sdapi/v1/txt2img", json={**BASE, **changes})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def test_embedding_in_prompt_changes_the_image_and_is_hashed(ti_app):
    client = ti_app.test_client()
    base = gen(client)
    used = gen(client, prompt="a red house, shiny")
    plain_word = gen(client, prompt="a red house, shinyness")  # not the embedding: a different word
    assert png(used) != png(base)
    info = json.loads(used["info"])
    sha = hashlib.sha256((ti_app.extensions["sdfunc"].settings.data_dir / "embeddings" / "shiny.safetensors")
                         .read_bytes()).hexdigest()
    assert info["extra_generation_params"]["TI hashes"] == f"shiny: {sha[:12]}"
    assert "TI hashes" not in json.loads(plain_word["info"])["extra_generation_params"]
    assert png(gen(client)) == png(base)  # the next plain prompt is unaffected
    neg = gen(client, negative_prompt="shiny")
    assert png(neg) != png(base)
    assert "TI hashes" in json.loads(neg["info"])["extra_generation_params"]


def test_an_embedding_past_a_chunk_end_starts_the_next_chunk(ti_app):
    """74 tokens (a comma 13 back), then `shiny`'s 2 vectors: as in A1111 the first chunk ends before the
    embedding, as a BREAK there would end it, rather than one vector on each side (or a comma backtrack)."""
    client = ti_app.test_client()
    head = "red " * 60 + ", " + "red " * 13  # 74 tokens
    used = gen(client, prompt=head + "shiny")
    assert png(used) == png(gen(client, prompt=head + "BREAK shiny"))
    assert png(used) != png(gen(client, prompt=head + "BREAK red shiny"))  # the placement shows in the image
    assert json.loads(used["info"])["extra_generation_params"]["TI hashes"].startswith("shiny: ")


def test_sdxl_embedding_on_sdxl(ti_app):
    client = ti_app.test_client()
    xl = {"override_settings": {"sd_model_checkpoint": "demo-sdxl"}}
    base = gen(client, **xl)
    used = gen(client, prompt="a red house xlstyle", **xl)
    assert png(used) != png(base)
    assert json.loads(used["info"])["extra_generation_params"]["TI hashes"].startswith("xlstyle: ")
    # an SD 1.x embedding is plain text to SDXL: no TI hash
    assert "TI hashes" not in json.loads(gen(client, prompt="shiny", **xl)["info"])["extra_generation_params"]


def test_listing_and_refresh(ti_app):
    client = ti_app.test_client()
    gen(client)  # the caller's checkpoint (demo-sd15) is warm: loaded = what fits it
    body = client.get("/sdapi/v1/embeddings").get_json()
    assert set(body["loaded"]) == {"shiny"}
    assert body["loaded"]["shiny"] == {"step": 500, "sd_checkpoint": None, "sd_checkpoint_name": "demo-sd15",
                                       "shape": 32, "vectors": 2}
    assert set(body["skipped"]) == {"xlstyle", "sd2thing"}  # evil.pt is a pickle: listed nowhere
    emb = ti_app.extensions["sdfunc"].settings.data_dir / "embeddings"
    save_file({"emb_params": torch.ones(1, 32)}, str(emb / "late.safetensors"))
    try:
        assert client.post("/sdapi/v1/refresh-embeddings").get_json() is None
        assert "late" in client.get("/sdapi/v1/embeddings").get_json()["loaded"]
    finally:
        (emb / "late.safetensors").unlink()
        client.post("/sdapi/v1/refresh-embeddings")
