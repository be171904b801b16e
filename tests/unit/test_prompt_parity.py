"""Prompt details where diffusers alone differs from A1111: SDXL's empty negative prompt, malformed weights."""

from __future__ import annotations

import pytest
import torch

SMALL = {"prompt": "a red house", "steps": 2, "width": 64, "height": 64, "seed": 4, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def sdxl():
    from pipelines.builders.demo import build_demo_pipeline

    return build_demo_pipeline("demo-sdxl")


def _args(pipe, prompts, negatives, clip_skip=1):
    from pipelines.generate import ImageJob, _prompt_args

    job = ImageJob(mode="txt2img", prompt="", negative_prompt="", seeds=[1], subseeds=[1], subseed_strength=0,
                   batch_size=1, steps=1, cfg_scale=7, width=64, height=64, sampler=None, clip_skip=clip_skip)
    args: dict = {}
    _prompt_args(pipe, "sdxl", job, prompts, negatives, args)
    return args


def test_sdxl_empty_negative_is_zeros_as_a1111(sdxl):
    args = _args(sdxl, ["a red house"], [""])
    assert args["negative_prompt"] is None  # diffusers' force_zeros_for_empty_prompt: zero embeddings
    weighted = _args(sdxl, ["a (red:1.3) house"], [""])
    assert not weighted["prompt_embeds"].eq(0).all()
    assert weighted["negative_prompt_embeds"].eq(0).all() and weighted["negative_pooled_prompt_embeds"].eq(0).all()
    # a non-empty negative anywhere in the batch keeps every negative encoded
    kept = _args(sdxl, ["a (red:1.3) house", "b"], ["", "blurry"])
    assert not kept["negative_prompt_embeds"][0].eq(0).all()


def test_sdxl_empty_negative_without_force_zeros_config(sdxl):
    from diffusers import StableDiffusionXLPipeline

    from pipelines.cache import assemble_pipeline

    pipe = assemble_pipeline(StableDiffusionXLPipeline, sdxl.components)
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    args = _args(pipe, ["a red house"], [""])
    assert args["negative_prompt_embeds"].eq(0).all() and args["negative_pooled_prompt_embeds"].eq(0).all()
    assert args["prompt_embeds"].shape == args["negative_prompt_embeds"].shape
    assert torch.isfinite(args["pooled_prompt_embeds"]).all()


@pytest.mark.parametrize("fields,field", [
    ({"prompt": "a (red:1.2.3) house"}, "prompt"),
    ({"negative_prompt": "(ugly:1..5)"}, "negative_prompt"),
    ({"enable_hr": True, "hr_prompt": "a (blue:1..2) boat"}, "hr_prompt"),
])
def test_malformed_weight_is_a_422_naming_the_field(client, fields, field):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, **fields})
    assert r.status_code == 422, r.json
    assert r.json["error"]["field"] == field and "1.2.3" not in r.json["error"]["message"]


def test_weighted_prompts_on_a_near_zero_mean_encoder_stay_finite():
    """The demo SD 1.5 encoder's outputs average ~0: A1111's mean restore would divide by ~0 there."""
    from pipelines.builders.demo import build_demo_pipeline
    from pipelines.prompts import chunked_embeds

    pipe = build_demo_pipeline("demo-sd15")
    args = chunked_embeds(pipe, ["a (red:1.4) house"], ["(ugly:0.5), [blurry]"], 1, sdxl=False)
    assert all(torch.isfinite(v).all() for v in args.values())
