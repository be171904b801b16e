"""pipelines.generate._variation_noise: the noise diffusers' img2img and inpainting pipelines draw, mixed with
the variation seed's, on a stand-in pipeline (the HTTP tests run the real ones)."""

import torch

from pipelines.generate import _slerp, _variation_noise


class _Scheduler:
    init_noise_sigma = 2.0

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        return original + noise


class _Pipe:
    """diffusers' inpainting `prepare_latents` contract: (latents, noise), latents the noise itself at strength 1."""

    def __init__(self) -> None:
        self.scheduler = _Scheduler()

    def prepare_latents(self, *, is_strength_max: bool, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if is_strength_max:
            return noise * self.scheduler.init_noise_sigma, noise
        return self.scheduler.add_noise(torch.zeros_like(noise), noise, None), noise


def _drawn(seed: int, shape=(4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def test_rows_mix_with_their_own_subseed():
    pipe = _Pipe()
    noise = torch.stack([_drawn(1), _drawn(2)])
    with _variation_noise(pipe, [10, 11], 0.3):
        out = pipe.scheduler.add_noise(torch.zeros_like(noise), noise, None)
        latents, returned = pipe.prepare_latents(is_strength_max=False, noise=noise)
    assert torch.equal(out[0], _slerp(0.3, _drawn(1), _drawn(10)))
    assert torch.equal(out[1], _slerp(0.3, _drawn(2), _drawn(11)))
    assert torch.equal(latents, out) and returned is noise
    assert "add_noise" not in vars(pipe.scheduler) and "prepare_latents" not in vars(pipe)  # unwrapped after
    assert torch.equal(pipe.scheduler.add_noise(0, noise, None), noise)


def test_strength_one_is_the_subseed_noise_and_zero_wraps_nothing():
    pipe = _Pipe()
    noise = _drawn(1).unsqueeze(0)
    with _variation_noise(pipe, [10], 1.0):
        assert torch.equal(pipe.scheduler.add_noise(0, noise, None)[0], _drawn(10))
        latents, returned = pipe.prepare_latents(is_strength_max=True, noise=noise)
    assert torch.equal(latents[0], _drawn(10) * 2.0)
    assert returned is noise  # the raw noise: the inpainting loop's add_noise mixes it once, as the start was
    with _variation_noise(pipe, [10], 0.0):
        assert "prepare_latents" not in vars(pipe) and "add_noise" not in vars(pipe.scheduler)


def test_slerp_is_a1111s_per_column_mix():
    """A1111's slerp on [C, H, W] noise: each (channel, column) vector along the height is interpolated on its own
    sphere; nearly equal noises take its linear fallback with the weights as A1111 has them."""
    low, high = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randn(
        4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(_slerp(0.0, low, high), low, atol=1e-5)
    assert torch.allclose(_slerp(1.0, low, high), high, atol=1e-5)
    mixed = _slerp(0.3, low, high)
    a, b = low[2, :, 5], high[2, :, 5]  # one column, by the textbook formula
    omega = torch.acos(torch.dot(a / a.norm(), b / b.norm()))
    expected = torch.sin(0.7 * omega) / torch.sin(omega) * a + torch.sin(0.3 * omega) / torch.sin(omega) * b
    assert torch.allclose(mixed[2, :, 5], expected, atol=1e-5)
    assert torch.allclose(_slerp(0.3, low, low * 1.0000001), low * 0.3 + low * 1.0000001 * 0.7)
