"""Per-step conditioning (pipelines/conditioning.py): prompt editing, alternation and `AND` reach the UNet on the
model call A1111 switches at, on the demo SD 1.5 and SDXL pipelines, with classifier-free guidance on and off."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipelines import conditioning
from pipelines.cache import LoadedModel
from pipelines.generate import ImageJob, generate
from pipelines.prompts import encode_texts
from pipelines.samplers import resolve_sampler


@pytest.fixture(scope="module", params=["demo-sd15", "demo-sdxl"])
def model(request):
    from pipelines.builders.demo import build_demo_pipeline

    pipe = build_demo_pipeline(request.param)
    arch = "sdxl" if request.param == "demo-sdxl" else "sd1"
    return LoadedModel(entry=SimpleNamespace(path=request.param), sha256=None, arch=arch, pipe=pipe)


def _job(prompt: str, *, steps: int = 4, cfg: float = 7.0, sampler: str = "Euler", negative: str = "",
         batch: int = 1, prompts: list[str] | None = None, seed: int = 3) -> ImageJob:
    seeds = list(range(seed, seed + batch))
    return ImageJob(mode="txt2img", prompt=prompt, negative_prompt=negative, seeds=seeds, subseeds=seeds,
                    subseed_strength=0, batch_size=batch, steps=steps, cfg_scale=cfg, width=64, height=64,
                    sampler=resolve_sampler(sampler), prompts=prompts,
                    negative_prompts=None if prompts is None else [negative] * len(prompts))


class _Probe:
    """Records what the first cross-attention block of the UNet gets on each model call (the conditioning
    after any substitution) and, on SDXL, the pooled text embedding the UNet's `add_embedding` gets."""

    def __init__(self, pipe) -> None:
        self.states: list[torch.Tensor] = []
        self.pooled: list[torch.Tensor] = []
        block = next(m for m in pipe.unet.modules() if type(m).__name__ == "Transformer2DModel")
        self.handles = [block.register_forward_pre_hook(self._states, with_kwargs=True)]
        if getattr(pipe.unet, "add_embedding", None) is not None:
            self.handles.append(pipe.unet.add_embedding.register_forward_pre_hook(self._pooled))

    def _states(self, module, args, kwargs):
        self.states.append(kwargs["encoder_hidden_states"].detach().clone())

    def _pooled(self, module, args):
        self.pooled.append(args[0].detach().clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _encoded(model, text: str) -> torch.Tensor:
    hidden, _, _ = encode_texts(model.pipe, [text], {}, 1, model.arch == "sdxl")
    return hidden[0]


def _which(model, probe: _Probe, texts: list[str], cond_rows: slice) -> list[str]:
    """For each recorded call, which of `texts` the cond rows of the call held."""
    refs = {text: _encoded(model, text) for text in texts}
    seen = []
    for states in probe.states:
        row = states[cond_rows][0]
        names = [t for t, ref in refs.items() if torch.equal(row[: ref.shape[0]], ref.to(row.dtype))]
        assert len(names) == 1, names
        seen.append(names[0])
    return seen


@pytest.mark.parametrize(("prompt", "expected"), [
    # A1111: schedule [[2, 'a cat'], [4, 'a dog']]; call i takes the first entry with i <= end
    ("a [cat:dog:0.5]", ["a cat", "a cat", "a cat", "a dog"]),
    ("a [cat:dog:1]", ["a cat", "a cat", "a dog", "a dog"]),  # an absolute step
    ("a [cat|dog]", ["a cat", "a cat", "a dog", "a cat"]),  # [[1, cat], [2, dog], [3, cat], [4, dog]]
])
def test_the_conditioning_switches_on_a1111s_call(model, prompt, expected):
    with _Probe(model.pipe) as probe:
        generate(model, _job(prompt))
    assert len(probe.states) == 4 and all(s.shape[0] == 2 for s in probe.states)  # uncond + cond
    assert _which(model, probe, ["a cat", "a dog"], slice(1, 2)) == expected


def test_without_guidance_the_cond_alone_switches(model):
    with _Probe(model.pipe) as probe:
        generate(model, _job("a [cat:dog:1]", cfg=1.0))
    assert all(s.shape[0] == 1 for s in probe.states)
    assert _which(model, probe, ["a cat", "a dog"], slice(0, 1)) == ["a cat", "a cat", "a dog", "a dog"]


def test_a_second_order_sampler_lays_the_schedule_over_its_model_calls(model):
    """Heun calls the model twice a step (2 * 3 - 1 calls here); A1111 lays schedules over steps * 2."""
    with _Probe(model.pipe) as probe:
        generate(model, _job("a [cat:dog:0.5]", steps=3, sampler="Heun"))
    # schedule over 6: [[3, cat], [6, dog]]: calls 0..3 cat, 4 dog
    assert _which(model, probe, ["a cat", "a dog"], slice(1, 2)) == ["a cat"] * 4 + ["a dog"]


def test_sdxl_switches_the_pooled_embedding_too(model):
    if model.arch != "sdxl":
        pytest.skip("SD 1.5 has no pooled embedding")
    with _Probe(model.pipe) as probe:
        generate(model, _job("a [cat:dog:1]"))
    _, pooled, _ = encode_texts(model.pipe, ["a cat", "a dog"], {}, 1, True)
    width = pooled.shape[1]
    got = [p[1, :width] for p in probe.pooled]  # add_embedding gets [text_embeds, time embeddings]
    close = [[torch.allclose(g, p, atol=1e-5) for p in pooled] for g in got]  # (encoded in another batch)
    assert close == [[True, False], [True, False], [False, True], [False, True]]


def test_and_runs_each_part_and_the_uncond_in_one_call(model):
    with _Probe(model.pipe) as probe:
        generate(model, _job("a cat AND a dog :0.5", batch=2))
    assert [s.shape[0] for s in probe.states] == [2 + 2 * 2] * 4  # 2 unconds, then cat, dog per image
    refs = [_encoded(model, t) for t in ("a cat", "a dog")]
    for states in probe.states:
        assert torch.equal(states[2][:77], refs[0]) and torch.equal(states[3][:77], refs[1])
        assert torch.equal(states[4], states[2]) and torch.equal(states[5], states[3])


class _Linear:
    """A stand-in UNet forward whose output is a known function of each row's conditioning."""

    def __call__(self, sample, timestep, states, *args, return_dict=True, **kwargs):
        out = sample * 0 + states.float().mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return (out,) if not return_dict else SimpleNamespace(sample=out)


@pytest.mark.parametrize("guided", [True, False])
def test_and_combines_as_a1111(model, guided):
    """uncond + sum(w_i * cfg * (cond_i - uncond)): the pipeline's guidance makes the cfg factor when it runs;
    without guidance (cfg <= 1) the stand-in applies it."""
    cfg = 7.0 if guided else 0.5
    built = conditioning.build(model.pipe, ["a cat AND a dog :0.25"], ["ugly"], steps=4, hires_steps=None,
                               clip_skip=1, sdxl=model.arch == "sdxl", guidance=cfg, expand=lambda t: t)
    mean = {t: _encoded(model, t).float().mean().item() for t in ("a cat", "a dog", "ugly")}
    rows = 2 if guided else 1
    sample = torch.zeros(rows, 4, 8, 8)
    states = torch.zeros(rows, 77, 8)
    out = built._unet(_Linear(), sample, torch.tensor(1), states, return_dict=False)[0]
    u, c, d = mean["ugly"], mean["a cat"], mean["a dog"]
    combined = u + (c - u) + 0.25 * (d - u)
    if guided:  # the pipeline then takes uncond + cfg * (combined - uncond)
        assert out[0].flatten()[0].item() == pytest.approx(u, rel=1e-5)
        assert out[1].flatten()[0].item() == pytest.approx(combined, rel=1e-5)
    else:
        assert out[0].flatten()[0].item() == pytest.approx(u + cfg * (combined - u), rel=1e-5)


def test_a_part_twice_at_half_weight_makes_the_plain_image(model):
    """`x AND x` at 0.5 each sums to `x` at weight 1: the same image, up to float rounding."""
    import numpy as np

    plain = generate(model, _job("a red house :1")).images[0]
    halves = generate(model, _job("a red house :0.5 AND a red house :0.5")).images[0]
    diff = np.abs(np.asarray(plain, dtype=int) - np.asarray(halves, dtype=int))
    assert diff.max() <= 2


def test_rows_of_a_batch_keep_their_own_schedules(model):
    """Two images with different prompts (as the dynamic batcher groups them) share each UNet call, and each
    gets what it would get alone."""
    import numpy as np

    together = generate(model, _job("", batch=2, prompts=["a [cat:dog:1]", "a [red|blue] house"])).images
    alone = [generate(model, _job(p, seed=seed)).images[0] for p, seed in (("a [cat:dog:1]", 3),
                                                                           ("a [red|blue] house", 4))]
    for a, b in zip(together, alone):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_plain_prompts_never_build_step_conditioning(model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a plain prompt went through per-step conditioning")

    monkeypatch.setattr(conditioning, "build", refuse)
    for prompt in ("a red house", "a (red:1.3) house BREAK blue [sky]", "a red house " * 30, "a: b (c)"):
        generate(model, _job(prompt, negative="[ugly]"))


def test_the_shared_unet_is_restored(model):
    before = model.pipe.unet.__dict__.get("forward")
    generate(model, _job("a [cat:dog:1] AND a bird"))
    assert model.pipe.unet.__dict__.get("forward") is before


def test_img2img_lays_the_schedule_over_its_steps_and_counts_the_calls_it_runs(model):
    """img2img at strength 0.5 of 8 steps runs 4 model calls; `[cat:dog:2]` is laid over the 8 steps
    ([[2, cat], [8, dog]]) and read by those calls from 0, as A1111's img2img does."""
    from PIL import Image

    job = _job("a [cat:dog:2]", steps=8)
    job.mode, job.denoising_strength = "img2img", 0.5
    job.init_images = [Image.new("RGB", (64, 64), (120, 40, 200))]
    with _Probe(model.pipe) as probe:
        generate(model, job)
    assert _which(model, probe, ["a cat", "a dog"], slice(1, 2)) == ["a cat", "a cat", "a cat", "a dog"]
