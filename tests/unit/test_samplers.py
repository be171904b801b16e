"""pipelines.samplers: A1111's sampler/scheduler lists, resolution, and per-request diffusers schedulers."""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import pytest
import torch

from pipelines.errors import UnknownSampler
from pipelines.samplers import (
    SAMPLERS,
    SCHEDULERS,
    build_scheduler,
    resolve_sampler,
    sampler_list,
    scheduler_list,
    set_noise_seeds,
)

# diffusers' schedulers trip numpy 2 deprecation warnings by the tens of thousands; they are not ours.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Should have t[ab]:UserWarning")]  # torchsde float rounding

CONFIG_DIR = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
CONFIGS = {name: json.loads((CONFIG_DIR / name / "scheduler" / "scheduler_config.json").read_text())
           for name in ("sd15", "sdxl")}

SAMPLER_NAMES = [
    "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a",
    "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++",
    "PLMS", "UniPC", "LCM",
]


# ------------------------------------------------------------------------------------------------------
# GET /samplers and /schedulers


def test_sampler_list_is_a1111s_20_in_order():
    body = sampler_list()
    assert [s["name"] for s in body] == SAMPLER_NAMES
    assert all(set(s) == {"name", "aliases", "options"} for s in body)
    assert all(isinstance(v, str) for s in body for v in s["options"].values())
    by_name = {s["name"]: s for s in body}
    assert by_name["DPM++ 2M"] == {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}}
    assert list(by_name["DPM++ 3M SDE"]["options"].items()) == [
        ("scheduler", "exponential"), ("discard_next_to_last_sigma", "True"), ("brownian_noise", "True")]
    assert by_name["DPM++ 2M SDE Heun"]["options"] == {"scheduler": "exponential", "brownian_noise": "True",
                                                       "solver_type": "heun"}
    assert list(by_name["DPM2 a"]["options"]) == ["scheduler", "discard_next_to_last_sigma", "uses_ensd",
                                                  "second_order"]
    assert by_name["Euler a"]["aliases"] == ["k_euler_a", "k_euler_ancestral"]
    assert by_name["Euler"]["options"] == {}
    assert by_name["LCM"]["aliases"] == ["k_lcm"]
    json.dumps(body)


def test_sampler_list_returns_fresh_copies():
    body = sampler_list()
    body[0]["options"]["scheduler"] = "mutated"
    body[0]["aliases"].append("x")
    assert sampler_list()[0] == {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}}


def test_scheduler_list_is_a1111s_12():
    assert scheduler_list() == [
        {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0, "need_inner_model": False},
        {"name": "uniform", "label": "Uniform", "aliases": None, "default_rho": -1.0, "need_inner_model": True},
        {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
        {"name": "exponential", "label": "Exponential", "aliases": None, "default_rho": -1.0,
         "need_inner_model": False},
        {"name": "polyexponential", "label": "Polyexponential", "aliases": None, "default_rho": 1.0,
         "need_inner_model": False},
        {"name": "sgm_uniform", "label": "SGM Uniform", "aliases": ["SGMUniform"], "default_rho": -1.0,
         "need_inner_model": True},
        {"name": "kl_optimal", "label": "KL Optimal", "aliases": None, "default_rho": -1.0,
         "need_inner_model": False},
        {"name": "align_your_steps", "label": "Align Your Steps", "aliases": None, "default_rho": -1.0,
         "need_inner_model": False},
        {"name": "simple", "label": "Simple", "aliases": None, "default_rho": -1.0, "need_inner_model": True},
        {"name": "normal", "label": "Normal", "aliases": None, "default_rho": -1.0, "need_inner_model": True},
        {"name": "ddim", "label": "DDIM", "aliases": None, "default_rho": -1.0, "need_inner_model": True},
        {"name": "beta", "label": "Beta", "aliases": None, "default_rho": -1.0, "need_inner_model": True},
    ]
    assert all(isinstance(s["default_rho"], float) for s in scheduler_list())


def test_dataclasses_are_frozen_and_hashable():
    with pytest.raises(AttributeError):
        SAMPLERS[0].name = "x"  # type: ignore[misc]
    assert len({*SAMPLERS}) == 20 and len({*SCHEDULERS}) == 12
    assert hash(resolve_sampler("DPM++ 2M Karras")) == hash(resolve_sampler("DPM++ 2M", scheduler="karras"))


# ------------------------------------------------------------------------------------------------------
# Resolution: A1111 v1.10.1's rules, plus the aliases and the 422 for an unknown name


@pytest.mark.parametrize("name, sampler, label", [
    ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
    ("DPM++ 2M", "DPM++ 2M", "Karras"),  # its default
    ("DPM++ SDE Karras", "DPM++ SDE", "Karras"),
    ("DPM2 a Karras", "DPM2 a", "Karras"),
    ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"),
    ("DPM++ 2M SDE Karras", "DPM++ 2M SDE", "Karras"),
    ("DPM++ 2M sgm_uniform", "DPM++ 2M", "SGM Uniform"),  # suffix by name
    ("DPM++ 2M SGMUniform", "DPM++ 2M", "SGM Uniform"),  # suffix by alias
    ("Euler a", "Euler a", "Automatic"),
    ("Euler", "Euler", "Automatic"),
    ("Euler Karras", "Euler", "Karras"),
    ("k_euler_a", "Euler a", "Automatic"),  # alias: our deliberate difference
    ("k_euler_ancestral", "Euler a", "Automatic"),
    ("k_dpmpp_2m", "DPM++ 2M", "Karras"),
    ("k_dpmpp_2m karras", "DPM++ 2M", "Karras"),
    ("ddim", "DDIM", "Automatic"),
    ("DDIM", "DDIM", "Automatic"),
    ("DDIM CFG++", "DDIM CFG++", "Automatic"),
    ("UniPC", "UniPC", "Automatic"),
    ("LCM", "LCM", "Automatic"),
])
def test_resolve_names(name, sampler, label):
    r = resolve_sampler(name)
    assert r.sampler.name == sampler
    assert r.schedule_label == label
    assert r.scheduler.label == label


def test_default_scheduler_is_recorded_as_automatic_but_labelled_as_used():
    r = resolve_sampler("DPM++ 2M", scheduler="karras")
    assert r.requested_scheduler.name == "automatic"  # A1111 step 4
    assert r.scheduler.name == "karras" and r.schedule_label == "Karras"  # section 5: the label used
    r = resolve_sampler("DPM++ 2M", scheduler="Exponential")
    assert r.requested_scheduler.name == "exponential" and r.schedule_label == "Exponential"


def test_sampler_index_and_default():
    assert resolve_sampler(None).sampler.name == "Euler"
    assert resolve_sampler("", "").sampler.name == "Euler"
    assert resolve_sampler(None, "Euler a").sampler.name == "Euler a"
    assert resolve_sampler("", "DPM++ 2M Karras").sampler.name == "DPM++ 2M"
    assert resolve_sampler("LMS", "Euler a").sampler.name == "LMS"  # sampler_name wins


def test_webuiapi_defaults():
    r = resolve_sampler("Euler a", "Euler a", "automatic")
    assert (r.sampler.name, r.schedule_label) == ("Euler a", "Automatic")


@pytest.mark.parametrize("scheduler", [None, "", "automatic", "Automatic", "no-such-schedule", "KARRAS"])
def test_unknown_or_empty_scheduler_is_automatic(scheduler):
    r = resolve_sampler("Euler", scheduler=scheduler)
    assert r.requested_scheduler.name == "automatic" and r.schedule_label == "Automatic"


def test_scheduler_by_name_label_alias():
    for value in ("sgm_uniform", "SGM Uniform", "SGMUniform"):
        assert resolve_sampler("Euler", scheduler=value).scheduler.name == "sgm_uniform"


def test_suffix_wins_over_scheduler_field():
    r = resolve_sampler("DPM++ 2M Exponential", scheduler="karras")
    assert r.schedule_label == "Exponential"


@pytest.mark.parametrize("name", ["euler a", "Euler A", "k_euler_a_", "Nope", "DPM++ 2M Kerras", " Karras", "K_EULER"])
def test_unknown_sampler_raises(name):
    with pytest.raises(UnknownSampler) as err:
        resolve_sampler(name)
    assert err.value.field == "sampler_name"
    assert err.value.code == "unknown_sampler"


def test_unknown_sampler_message_is_bounded():
    with pytest.raises(UnknownSampler) as err:
        resolve_sampler("x" * 10_000)
    assert len(err.value.message) < 200


def test_schedule_the_class_cannot_apply_is_dropped_and_reported():
    r = resolve_sampler("Euler a", scheduler="karras")  # EulerAncestral has no use_karras_sigmas
    assert r.requested_scheduler.name == "karras"
    assert r.schedule_label == "Automatic"
    assert "use_karras_sigmas" not in dict(r.overrides)
    r = resolve_sampler("DPM++ 2S a", scheduler="sgm_uniform")  # singlestep has no timestep_spacing
    assert r.schedule_label == "Karras"  # falls back to the sampler's own default


def test_fixed_schedule_samplers_ignore_schedule_like_a1111():
    for name in ("DDIM", "PLMS", "UniPC", "DDIM CFG++", "DPM fast", "DPM adaptive", "LCM"):
        r = resolve_sampler(name, scheduler="karras")
        assert r.schedule_label == "Automatic", name
        assert dict(r.overrides).get("use_karras_sigmas") in (None, False), name


# ------------------------------------------------------------------------------------------------------
# build_scheduler


EXPECTED_CLASS = {
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "DPM++ SDE": "DPMSolverSDEScheduler",
    "DPM++ 2M SDE": "DPMSolverMultistepScheduler",
    "DPM++ 2M SDE Heun": "DPMSolverMultistepScheduler",
    "DPM++ 2S a": "DPMSolverSinglestepScheduler",
    "DPM++ 3M SDE": "DPMSolverMultistepScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "Euler": "EulerDiscreteScheduler",
    "LMS": "LMSDiscreteScheduler",
    "Heun": "HeunDiscreteScheduler",
    "DPM2": "KDPM2DiscreteScheduler",
    "DPM2 a": "KDPM2AncestralDiscreteScheduler",
    "DPM fast": "DPMSolverSinglestepScheduler",
    "DPM adaptive": "DPMSolverSinglestepScheduler",
    "Restart": "HeunDiscreteScheduler",
    "DDIM": "DDIMScheduler",
    "DDIM CFG++": "DDIMScheduler",
    "PLMS": "PNDMScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "LCM": "LCMScheduler",
}

SCHEDULES = ["automatic", "karras", "exponential", "sgm_uniform", "beta", "ddim", "align_your_steps"]


def _run(scheduler, steps: int = 8, batch: int = 2) -> torch.Tensor:
    """Every step of an 8-step run with a fake eps model (the last step is where solvers break)."""
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, 8, 8, generator=gen) * scheduler.init_noise_sigma
    kwargs = {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        model_output = 0.5 * torch.randn(model_input.shape, generator=gen)
        sample = scheduler.step(model_output, t, sample, **kwargs).prev_sample
        assert torch.isfinite(sample).all(), f"non-finite at t={t}"
    assert sample.shape == (batch, 4, 8, 8)
    return sample


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sampler_name", SAMPLER_NAMES)
def test_every_sampler_builds_and_steps(config_name, schedule, sampler_name):
    base = CONFIGS[config_name]
    before = copy.deepcopy(base)
    r = resolve_sampler(sampler_name, scheduler=schedule)
    scheduler = build_scheduler(r, base, seeds=[1, 2])
    assert type(scheduler).__name__ == EXPECTED_CLASS[sampler_name] == r.scheduler_class
    for key, value in r.overrides:
        assert scheduler.config[key] == value, key
    _run(scheduler)
    assert base == before


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_base_config_untouched_and_instances_distinct(config_name):
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    cls = PNDMScheduler if config_name == "sd15" else EulerDiscreteScheduler
    shared = cls.from_config(CONFIGS[config_name])
    frozen = shared.config  # a FrozenDict, as pipe.scheduler.config is
    snapshot = dict(frozen)
    r = resolve_sampler("DPM++ 2M Karras")
    a = build_scheduler(r, frozen)
    b = build_scheduler(r, frozen)
    assert a is not b and a is not shared
    assert a.config is not b.config
    a.set_timesteps(5)
    assert dict(frozen) == snapshot
    assert type(shared) is cls and shared.config["timestep_spacing"] == snapshot.get("timestep_spacing")
    # model properties travel from the base config
    assert a.config.beta_schedule == "scaled_linear" and a.config.beta_end == 0.012


def test_prediction_type_from_model_config_is_kept():
    base = dict(CONFIGS["sd15"], prediction_type="v_prediction")
    for name in ("Euler", "DPM++ 2M", "DDIM", "UniPC", "DPM++ SDE"):
        assert build_scheduler(resolve_sampler(name), base).config.prediction_type == "v_prediction"


def test_base_config_sigma_flags_do_not_leak():
    base = dict(CONFIGS["sdxl"], use_karras_sigmas=True)
    s = build_scheduler(resolve_sampler("Euler"), base)
    assert s.config.use_karras_sigmas is False and s.config.timestep_spacing == "linspace"


def test_key_settings():
    sd15 = CONFIGS["sd15"]
    s = build_scheduler(resolve_sampler("DPM++ 2M"), sd15)
    assert (s.config.algorithm_type, s.config.solver_order, s.config.use_karras_sigmas) == ("dpmsolver++", 2, True)
    s = build_scheduler(resolve_sampler("DPM++ 2M SDE"), sd15)
    assert (s.config.algorithm_type, s.config.use_exponential_sigmas) == ("sde-dpmsolver++", True)
    s = build_scheduler(resolve_sampler("DPM++ 2M SDE Heun"), sd15)
    assert s.config.solver_type == "heun"
    s = build_scheduler(resolve_sampler("DPM++ 3M SDE"), sd15)
    assert (s.config.algorithm_type, s.config.solver_order) == ("sde-dpmsolver++", 3)
    s = build_scheduler(resolve_sampler("PLMS"), sd15)
    assert s.config.skip_prk_steps is True
    s = build_scheduler(resolve_sampler("DDIM"), CONFIGS["sdxl"])
    assert (s.config.timestep_spacing, s.config.steps_offset, s.config.set_alpha_to_one) == ("leading", 1, False)
    s = build_scheduler(resolve_sampler("UniPC"), sd15)
    assert (s.config.solver_order, s.config.solver_type, s.config.final_sigmas_type) == (3, "bh1", "sigma_min")


@pytest.mark.parametrize("steps", [1, 2, 3, 20])
def test_unipc_bh1_finite_at_any_step_count(steps):
    """diffusers' bh1 variant stepping to sigma 0 gives NaN; we end at sigma_min like A1111's UniPC."""
    _run(build_scheduler(resolve_sampler("UniPC"), CONFIGS["sd15"]), steps=steps)


def test_unipc_grid_matches_a1111_time_uniform():
    s = build_scheduler(resolve_sampler("UniPC"), CONFIGS["sd15"])
    s.set_timesteps(20)
    model = _model_sigmas(CONFIGS["sd15"])
    assert s.sigmas[0].item() == pytest.approx(model[-1].item(), rel=1e-4)
    assert s.sigmas[-1].item() == pytest.approx(model[0].item(), rel=1e-4)  # t=0, not 0
    assert len(s.sigmas) == 21


def _model_sigmas(config: dict) -> torch.Tensor:
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("name", ["Euler", "Euler Karras", "Heun Exponential", "LMS Karras", "DPM++ SDE",
                                  "DPM2", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 3M SDE"])
def test_k_diffusion_sigma_range(config_name, name):
    """Like A1111's k-diffusion: the schedule starts at sigma(t=999) and ends at sigma(t=0), then 0."""
    config = CONFIGS[config_name]
    s = build_scheduler(resolve_sampler(name), config)
    s.set_timesteps(20)
    model = _model_sigmas(config)
    sigmas = s.sigmas.double()  # second-order classes interleave/duplicate sigmas: compare the range
    assert sigmas[0].item() == pytest.approx(model[-1].item(), rel=1e-4)
    assert sigmas[sigmas > 0].min().item() == pytest.approx(model[0].item(), rel=1e-3)
    assert sigmas[-1].item() == 0.0


def test_karras_matches_k_diffusion_formula():
    config = CONFIGS["sd15"]
    s = build_scheduler(resolve_sampler("DPM++ 2M Karras"), config)
    s.set_timesteps(10)
    model = _model_sigmas(config)
    rho, lo, hi = 7.0, model[0].item(), model[-1].item()
    ramp = torch.linspace(0, 1, 10, dtype=torch.float64)
    expected = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    assert torch.allclose(s.sigmas[:-1].double(), expected, rtol=1e-4)


def test_ddim_timesteps_match_a1111():
    s = build_scheduler(resolve_sampler("DDIM"), CONFIGS["sd15"])
    s.set_timesteps(20)
    assert s.timesteps.tolist() == [t + 1 for t in range(0, 1000, 50)][::-1]


def test_dpmpp_sde_deterministic_per_image_seed():
    r = resolve_sampler("DPM++ SDE")

    def run(seeds):
        s = build_scheduler(r, CONFIGS["sd15"], seeds=seeds)
        s.set_timesteps(6)
        x = torch.ones(len(seeds), 4, 8, 8) * s.init_noise_sigma
        for t in s.timesteps[:4]:
            x = s.step(torch.zeros_like(x), t, x).prev_sample
        return x

    both = run([11, 12])
    assert torch.equal(both, run([11, 12]))
    assert torch.allclose(both[0], run([11])[0]) and torch.allclose(both[1], run([12])[0])
    assert not torch.allclose(both[0], both[1])


def test_set_noise_seeds_per_batch_and_noop_elsewhere():
    s = build_scheduler(resolve_sampler("DPM++ SDE"), CONFIGS["sd15"])
    assert set_noise_seeds(s, [5, 6]) is True and s.noise_sampler_seed == [5, 6]
    assert s.config.noise_sampler_seed is None  # config stays seed-free
    e = build_scheduler(resolve_sampler("Euler a"), CONFIGS["sd15"])
    assert set_noise_seeds(e, [5]) is False


def test_exact_flag():
    assert resolve_sampler("Euler").exact and resolve_sampler("DPM++ 2M").exact
    assert resolve_sampler("Euler a").exact and resolve_sampler("DPM++ SDE").exact
    assert not resolve_sampler("DPM++ 2M", scheduler="uniform").exact  # multistep linspace ends at t~999/n
    assert not resolve_sampler("Restart").exact and not resolve_sampler("DPM fast").exact
    assert not resolve_sampler("Euler", scheduler="kl_optimal").exact
    assert all(r.note for r in (resolve_sampler(s.name) for s in SAMPLERS))
