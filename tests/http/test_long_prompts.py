"""Prompts past CLIP's 77-token window: A1111's 75-token chunks (pipelines/prompts.py), on the demo pipelines."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from pipelines.prompts import CHUNK, _chunks, chunked_embeds, needs_chunks

TINY = {"steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler"}
LONG = "a red house " * 30  # 90 tokens


@pytest.fixture(scope="module", params=["demo-sd15", "demo-sdxl"])
def pipe(request):
    from pipelines.builders.demo import build_demo_pipeline

    return build_demo_pipeline(request.param)


def _sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def _id_chunks(ids: list[int], comma: int | None) -> list[list[int]]:
    """`_chunks` on unweighted ids, as ids."""
    return [[token for token, _ in chunk] for chunk in _chunks([(token, 1.0) for token in ids], comma)]


def test_chunks_are_75_tokens_and_break_after_a_nearby_comma():
    comma = 99
    assert _id_chunks([], comma) == [[]]
    assert _id_chunks(list(range(75)), comma) == [list(range(75))]
    assert [len(c) for c in _id_chunks(list(range(160)), None)] == [75, 75, 10]
    # a comma at position 60: the chunk ends after it and the 14 words after it start the next chunk
    ids = list(range(60)) + [comma] + list(range(100, 130))
    chunks = _id_chunks(ids, comma)
    assert chunks[0] == list(range(60)) + [comma]
    assert chunks[1] == list(range(100, 130))
    # a comma further back than 20 tokens is not used
    ids = list(range(40)) + [comma] + list(range(100, 150))
    assert [len(c) for c in _id_chunks(ids, comma)] == [75, 16]


def test_one_chunk_encodes_as_the_pipeline_does(pipe):
    """Within the window, the chunk encoder gives the pipeline's own embeddings: the windows are built right."""
    prompts, negatives = ["a red house on a hill", "a boat"], ["fog", ""]
    ours = chunked_embeds(pipe, prompts, negatives, clip_skip=1, sdxl=_sdxl(pipe))
    if _sdxl(pipe):
        theirs = pipe.encode_prompt(prompts, device=torch.device("cpu"), num_images_per_prompt=1,
                                    do_classifier_free_guidance=True, negative_prompt=negatives)
        names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    else:
        theirs = pipe.encode_prompt(prompts, torch.device("cpu"), 1, True, negatives)
        names = ["prompt_embeds", "negative_prompt_embeds"]
    for name, expected in zip(names, theirs):
        torch.testing.assert_close(ours[name], expected, msg=name)


def test_a_long_prompt_is_encoded_in_chunks_and_the_negative_padded_to_match(pipe):
    assert not needs_chunks(pipe, ["a red house " * 25])  # 75 tokens: one window
    assert needs_chunks(pipe, [LONG])
    args = chunked_embeds(pipe, [LONG], ["fog"], clip_skip=1, sdxl=_sdxl(pipe))
    assert args["prompt_embeds"].shape[1] == args["negative_prompt_embeds"].shape[1] == 2 * (CHUNK + 2)
    # the second chunk holds the tail: it differs from an empty chunk
    head = chunked_embeds(pipe, ["a red house " * 25], ["fog"], clip_skip=1, sdxl=_sdxl(pipe))
    torch.testing.assert_close(args["prompt_embeds"][:, :77], head["prompt_embeds"])
    assert not torch.equal(args["prompt_embeds"][:, 77:], args["negative_prompt_embeds"][:, 77:])
    if _sdxl(pipe):  # the pooled embedding is the first chunk's
        torch.testing.assert_close(args["pooled_prompt_embeds"], head["pooled_prompt_embeds"])


def _pixels(client, body: dict) -> bytes:
    r = client.post("/sdapi/v1/txt2img", json={**TINY, **body})
    assert r.status_code == 200, r.json
    assert len(r.json["images"]) == body.get("batch_size", 1)
    return Image.open(io.BytesIO(base64.b64decode(r.json["images"][0]))).convert("RGB").tobytes()


@pytest.mark.parametrize("checkpoint", ["demo-sd15", "demo-sdxl"])
def test_words_past_the_window_change_the_image(client, checkpoint):
    """As in A1111, the tail of a long prompt counts (diffusers alone would cut it off); a long negative, clip
    skip and a batch mixing long and short prompts work too."""
    body = {"override_settings": {"sd_model_checkpoint": checkpoint}}
    assert _pixels(client, {**body, "prompt": LONG}) != _pixels(client, {**body, "prompt": LONG + "on a green hill"})
    assert _pixels(client, {**body, "prompt": LONG}) == _pixels(client, {**body, "prompt": LONG})  # deterministic
    _pixels(client, {**body, "prompt": "a cat", "negative_prompt": LONG})
    _pixels(client, {"override_settings": {"sd_model_checkpoint": checkpoint, "CLIP_stop_at_last_layers": 2},
                     "prompt": LONG})
    _pixels(client, {**body, "prompt": LONG, "batch_size": 2})
