"""A1111 samplers and schedule types, and the diffusers scheduler each one maps to.

Contract (A1111 v1.10.1 behaviour, except where said):

* `SAMPLERS` / `SCHEDULERS` hold A1111 v1.10.1's 20 samplers and 12 schedule types, in its order;
  `sampler_list()` / `scheduler_list()` are exactly the JSON of `GET /sdapi/v1/samplers` and `/schedulers`.
* `resolve_sampler()` follows A1111's resolution (scheduler by name/label/alias, the `" <schedule>"` suffix
  rule, exact sampler name) and, deliberately unlike A1111, also accepts sampler aliases (`k_euler_a`) and
  raises `UnknownSampler` instead of silently using DPM++ 2M.
* `build_scheduler()` makes a NEW diffusers scheduler per request from the pipeline's own scheduler config;
  nothing shared is mutated.

The mapping is documented, with what is an exact twin and what is an approximation, in docs/samplers.md.
Where a diffusers class cannot apply a requested schedule, the schedule is dropped (never a crash) and
`ResolvedSampler.schedule_label` says what actually applies.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import diffusers

from pipelines.errors import UnknownSampler

logger = logging.getLogger(__name__)

__all__ = [
    "SAMPLERS",
    "SCHEDULERS",
    "ResolvedSampler",
    "Sampler",
    "Scheduler",
    "build_scheduler",
    "resolve_sampler",
    "set_noise_seeds",
    "sampler_list",
    "scheduler_list",
]

DEFAULT_SAMPLER = "Euler"
"""What the API uses when both `sampler_name` and `sampler_index` are empty (`sampler_index` defaults to it)."""


@dataclass(frozen=True)
class Sampler:
    """One A1111 sampler as `GET /sdapi/v1/samplers` lists it. Option values are strings (`"True"` for flags)."""

    name: str
    aliases: tuple[str, ...]
    options: dict[str, str]

    def __hash__(self) -> int:  # options is a dict; the name is unique
        return hash(self.name)


@dataclass(frozen=True)
class Scheduler:
    """One A1111 schedule type as `GET /sdapi/v1/schedulers` lists it. The infotext uses `label`."""

    name: str
    label: str
    aliases: tuple[str, ...] | None
    default_rho: float
    need_inner_model: bool


def _sampler(name: str, aliases: tuple[str, ...], *, scheduler: str | None = None, flags: tuple[str, ...] = (),
             **values: str) -> Sampler:
    """Build a Sampler whose options keep A1111's key order: scheduler, then flags and values as listed."""
    options: dict[str, str] = {}
    if scheduler is not None:
        options["scheduler"] = scheduler
    for flag in flags:
        options[flag] = "True"
    options.update(values)
    return Sampler(name, aliases, options)


# A1111 v1.10.1 modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py, sd_samplers_lcm.py, in list order.
# Option order is A1111's (it matters for byte-identical JSON of `GET /sdapi/v1/samplers`).
SAMPLERS: tuple[Sampler, ...] = (
    _sampler("DPM++ 2M", ("k_dpmpp_2m",), scheduler="karras"),
    _sampler("DPM++ SDE", ("k_dpmpp_sde",), scheduler="karras", flags=("second_order", "brownian_noise")),
    _sampler("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), scheduler="exponential", flags=("brownian_noise",)),
    _sampler("DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",), scheduler="exponential", flags=("brownian_noise",),
             solver_type="heun"),
    _sampler("DPM++ 2S a", ("k_dpmpp_2s_a",), scheduler="karras", flags=("uses_ensd", "second_order")),
    _sampler("DPM++ 3M SDE", ("k_dpmpp_3m_sde",), scheduler="exponential",
             flags=("discard_next_to_last_sigma", "brownian_noise")),
    _sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), flags=("uses_ensd",)),
    _sampler("Euler", ("k_euler",)),
    _sampler("LMS", ("k_lms",)),
    _sampler("Heun", ("k_heun",), flags=("second_order",)),
    _sampler("DPM2", ("k_dpm_2",), scheduler="karras", flags=("discard_next_to_last_sigma", "second_order")),
    _sampler("DPM2 a", ("k_dpm_2_a",), scheduler="karras",
             flags=("discard_next_to_last_sigma", "uses_ensd", "second_order")),
    _sampler("DPM fast", ("k_dpm_fast",), flags=("uses_ensd",)),
    _sampler("DPM adaptive", ("k_dpm_ad",), flags=("uses_ensd",)),
    _sampler("Restart", ("restart",), scheduler="karras", flags=("second_order",)),
    _sampler("DDIM", ("ddim",)),
    _sampler("DDIM CFG++", ("ddim_cfgpp",)),
    _sampler("PLMS", ("plms",)),
    _sampler("UniPC", ("unipc",)),
    _sampler("LCM", ("k_lcm",)),
)

# A1111 v1.10.1 modules/sd_schedulers.py, in list order.
SCHEDULERS: tuple[Scheduler, ...] = (
    Scheduler("automatic", "Automatic", None, -1.0, False),
    Scheduler("uniform", "Uniform", None, -1.0, True),
    Scheduler("karras", "Karras", None, 7.0, False),
    Scheduler("exponential", "Exponential", None, -1.0, False),
    Scheduler("polyexponential", "Polyexponential", None, 1.0, False),
    Scheduler("sgm_uniform", "SGM Uniform", ("SGMUniform",), -1.0, True),
    Scheduler("kl_optimal", "KL Optimal", None, -1.0, False),
    Scheduler("align_your_steps", "Align Your Steps", None, -1.0, False),
    Scheduler("simple", "Simple", None, -1.0, True),
    Scheduler("normal", "Normal", None, -1.0, True),
    Scheduler("ddim", "DDIM", None, -1.0, True),
    Scheduler("beta", "Beta", None, -1.0, True),
)

AUTOMATIC: Scheduler = SCHEDULERS[0]

_SAMPLER_BY_NAME: dict[str, Sampler] = {s.name: s for s in SAMPLERS}
_SAMPLER_BY_ALIAS: dict[str, Sampler] = {a: s for s in SAMPLERS for a in s.aliases}
_SCHEDULER_BY_KEY: dict[str, Scheduler] = {}
for _s in SCHEDULERS:  # name and label (A1111's schedulers_map), plus aliases
    for _key in (_s.name, _s.label, *(_s.aliases or ())):
        _SCHEDULER_BY_KEY.setdefault(_key, _s)
_SCHEDULER_BY_NAME: dict[str, Scheduler] = {s.name: s for s in SCHEDULERS}


def sampler_list() -> list[dict]:
    """The JSON body of `GET /sdapi/v1/samplers`: `[{"name", "aliases": [...], "options": {...}}]` (fresh copies)."""
    return [{"name": s.name, "aliases": list(s.aliases), "options": dict(s.options)} for s in SAMPLERS]


def scheduler_list() -> list[dict]:
    """The JSON body of `GET /sdapi/v1/schedulers` (fresh copies; `aliases` is null where A1111 has none)."""
    return [
        {
            "name": s.name,
            "label": s.label,
            "aliases": list(s.aliases) if s.aliases is not None else None,
            "default_rho": float(s.default_rho),
            "need_inner_model": s.need_inner_model,
        }
        for s in SCHEDULERS
    ]


# --------------------------------------------------------------------------------------------------------
# The diffusers side.


@dataclass(frozen=True)
class _Twin:
    """How one A1111 sampler is run in diffusers.

    `fixed_schedule`: the A1111 sampler ignores the schedule type (the DDIM/PLMS/UniPC "timesteps" samplers,
    DPM fast/adaptive), or the diffusers class computes its own (LCM); then `kwargs` alone decide the
    timesteps and the schedule label is Automatic.
    """

    cls_name: str
    kwargs: tuple[tuple[str, Any], ...]
    exact: bool
    note: str
    fixed_schedule: bool = False


def _kw(**kwargs: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(kwargs.items())


_DPMPP_MULTI = _kw(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
                   euler_at_final=False, final_sigmas_type="zero", use_lu_lambdas=False, use_flow_sigmas=False)
_SINGLESTEP = _kw(solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero", use_flow_sigmas=False)
_EXPONENTIAL = _kw(use_karras_sigmas=False, use_exponential_sigmas=True, use_beta_sigmas=False)

_TWINS: dict[str, _Twin] = {
    "DPM++ 2M": _Twin("DPMSolverMultistepScheduler", _DPMPP_MULTI, True,
                      "k-diffusion DPM++ 2M; first-order last step as in k-diffusion"),
    "DPM++ SDE": _Twin("DPMSolverSDEScheduler", (), True,
                       "port of k-diffusion sample_dpmpp_sde with a Brownian-tree noise sampler; pass the "
                       "per-image seeds to build_scheduler for A1111's batch-independent noise"),
    "DPM++ 2M SDE": _Twin("DPMSolverMultistepScheduler",
                          _DPMPP_MULTI + _kw(algorithm_type="sde-dpmsolver++"), False,
                          "same solver (eta 1, midpoint); noise is per-step Gaussian from the pipeline "
                          "generator, not A1111's Brownian tree"),
    "DPM++ 2M SDE Heun": _Twin("DPMSolverMultistepScheduler",
                               _DPMPP_MULTI + _kw(algorithm_type="sde-dpmsolver++", solver_type="heun"), False,
                               "as DPM++ 2M SDE with the heun solver type"),
    "DPM++ 2S a": _Twin("DPMSolverSinglestepScheduler",
                        _SINGLESTEP + _kw(algorithm_type="sde-dpmsolver++", solver_order=2), False,
                        "no ancestral singlestep solver in diffusers: second-order singlestep SDE "
                        "DPM-Solver++ (stochastic like 2S a, different noise injection)"),
    "DPM++ 3M SDE": _Twin("DPMSolverMultistepScheduler",
                          _DPMPP_MULTI + _kw(algorithm_type="sde-dpmsolver++", solver_order=3), False,
                          "same solver; Gaussian instead of Brownian noise; A1111's "
                          "discard-next-to-last-sigma is not applied"),
    "Euler a": _Twin("EulerAncestralDiscreteScheduler", (), True,
                     "same algorithm (eta 1); noise comes from the pipeline generator; the class takes no "
                     "Karras/Exponential/Beta sigmas"),
    "Euler": _Twin("EulerDiscreteScheduler", _kw(interpolation_type="linear", final_sigmas_type="zero"), True,
                   "k-diffusion sample_euler (s_churn 0)"),
    "LMS": _Twin("LMSDiscreteScheduler", (), True, "k-diffusion sample_lms, order 4"),
    "Heun": _Twin("HeunDiscreteScheduler", (), True, "k-diffusion sample_heun"),
    "DPM2": _Twin("KDPM2DiscreteScheduler", (), False,
                  "k-diffusion sample_dpm_2; A1111's discard-next-to-last-sigma is not applied"),
    "DPM2 a": _Twin("KDPM2AncestralDiscreteScheduler", (), False,
                    "k-diffusion sample_dpm_2_ancestral; discard-next-to-last-sigma not applied"),
    "DPM fast": _Twin("DPMSolverSinglestepScheduler",
                      _SINGLESTEP + _EXPONENTIAL + _kw(algorithm_type="dpmsolver++", solver_order=3), False,
                      "no twin: k-diffusion dpm_fast is singlestep order-3 DPM-Solver on log-SNR-uniform steps "
                      "(exponential sigmas) and ignores the schedule type; nearest is singlestep order-3 "
                      "DPM-Solver++ on exponential sigmas, deterministic (A1111 adds eta noise)",
                      fixed_schedule=True),
    "DPM adaptive": _Twin("DPMSolverSinglestepScheduler",
                          _SINGLESTEP + _EXPONENTIAL + _kw(algorithm_type="dpmsolver++", solver_order=3), False,
                          "no twin: adaptive step size ignores `steps` and the schedule type; nearest "
                          "fixed-step solver is singlestep order-3 DPM-Solver++ on exponential sigmas",
                          fixed_schedule=True),
    "Restart": _Twin("HeunDiscreteScheduler", (), False,
                     "no twin: Restart is Heun plus restart (re-noising) segments; plain Heun on the same "
                     "Karras schedule"),
    "DDIM": _Twin("DDIMScheduler",
                  _kw(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False),
                  True, "A1111 timesteps range(0, 1000, 1000 // steps) + 1 == diffusers 'leading' + offset 1 "
                        "(A1111 does one extra step when 1000 % steps != 0)", fixed_schedule=True),
    "DDIM CFG++": _Twin("DDIMScheduler",
                        _kw(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                            clip_sample=False),
                        False, "no twin: CFG++ re-noises with the unconditional prediction (a guidance "
                               "change, not a scheduler); plain DDIM", fixed_schedule=True),
    "PLMS": _Twin("PNDMScheduler",
                  _kw(skip_prk_steps=True, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False),
                  False, "PLMS on the same timesteps; diffusers warms up by repeating a timestep where "
                         "A1111 uses an improved-Euler first step", fixed_schedule=True),
    "UniPC": _Twin("UniPCMultistepScheduler",
                   _kw(solver_order=3, solver_type="bh1", predict_x0=True, lower_order_final=True,
                       timestep_spacing="linspace", use_karras_sigmas=False, use_exponential_sigmas=False,
                       use_beta_sigmas=False, use_flow_sigmas=False, final_sigmas_type="sigma_min"),
                   True, "A1111 defaults: variant bh1, order 3, time-uniform steps from t=999 to t=0, lower "
                         "order final; ends at sigma_min as A1111's UniPC does (bh1 to sigma 0 gives NaN)",
                   fixed_schedule=True),
    "LCM": _Twin("LCMScheduler", (), False,
                 "A1111 runs LCM on k-diffusion sigmas; diffusers' LCMScheduler picks its own timesteps from "
                 "50 original steps and uses its boundary-condition scalings", fixed_schedule=True),
}

_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")

# A1111 schedule name -> diffusers kwargs. "linspace" reproduces k-diffusion's own discrete schedule
# (t from 999 down to 0) and makes Karras/Exponential/Beta span the full sigma range: the Euler-family
# classes take sigma_min/sigma_max from the spaced timesteps, and "leading" (both shipped configs) gives
# 11.03..0.041 instead of 14.61..0.029 at 20 steps.
_SCHEDULE_KWARGS: dict[str, dict[str, Any]] = {
    "automatic": {"timestep_spacing": "linspace"},
    "uniform": {"timestep_spacing": "linspace"},
    "karras": {"timestep_spacing": "linspace", "use_karras_sigmas": True},
    "exponential": {"timestep_spacing": "linspace", "use_exponential_sigmas": True},
    "polyexponential": {"timestep_spacing": "linspace", "use_exponential_sigmas": True},  # rho 1 == exponential
    "sgm_uniform": {"timestep_spacing": "trailing"},
    "kl_optimal": {"timestep_spacing": "linspace"},  # approximation: nearest of the available schedules
    "align_your_steps": {"timestep_spacing": "linspace"},  # approximation: nearest of the available schedules
    "simple": {"timestep_spacing": "trailing"},
    "normal": {"timestep_spacing": "linspace"},
    "ddim": {"timestep_spacing": "leading", "steps_offset": 1},
    "beta": {"timestep_spacing": "linspace", "use_beta_sigmas": True},
}

_EXACT_SCHEDULES = frozenset({"automatic", "uniform", "normal", "karras", "exponential", "polyexponential", "beta"})
# Their plain "linspace" is linspace(0, 999, n + 1)[::-1][:-1] (last t ~ 999/n), not k-diffusion's n points
# from 999 to 0; with Karras/Exponential/Beta flags they span the full range like the Euler family.
_LINSPACE_ENDS_EARLY = frozenset({"DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"})

# Classes without a timestep_spacing argument whose set_timesteps is inherently linspace-like.
_INHERENT_SPACING: dict[str, str] = {"DPMSolverSinglestepScheduler": "linspace"}


@functools.cache
def _scheduler_class(cls_name: str) -> type:
    return getattr(diffusers, cls_name)


@functools.cache
def _init_params(cls_name: str) -> frozenset[str]:
    params = inspect.signature(_scheduler_class(cls_name).__init__).parameters
    return frozenset(k for k in params if k != "self")


def _schedule_applies(schedule: Scheduler, cls_name: str) -> bool:
    """True when `cls_name` can realise every distinguishing kwarg of `schedule`."""
    params = _init_params(cls_name)
    for key, value in _SCHEDULE_KWARGS[schedule.name].items():
        if key in params:
            continue
        if key == "timestep_spacing" and _INHERENT_SPACING.get(cls_name) == value:
            continue
        if key == "steps_offset":  # only meaningful together with "leading", checked above
            continue
        return False
    return True


def _schedule_kwargs(schedule: Scheduler, cls_name: str) -> dict[str, Any]:
    """Kwargs for `schedule`, restricted to what `cls_name.__init__` takes; sigma flags not wanted are False."""
    params = _init_params(cls_name)
    wanted = dict(_SCHEDULE_KWARGS[schedule.name])
    out: dict[str, Any] = {flag: False for flag in _SIGMA_FLAGS if flag in params}
    out.update({k: v for k, v in wanted.items() if k in params})
    return out


@dataclass(frozen=True)
class ResolvedSampler:
    """A request's sampler after A1111's resolution, plus how it will run in diffusers.

    `scheduler` is the schedule actually used (the sampler's default when Automatic was asked, `automatic`
    meaning the model's own k-diffusion schedule); `schedule_label` is its label, as the infotext's
    `Schedule type` writes it. `requested_scheduler` is what the request asked for after suffix handling
    (Automatic when it was the sampler's default). `scheduler_class` and `overrides` are what
    `build_scheduler` passes to diffusers; `exact` says whether the pair is a twin of A1111's sampler.
    """

    sampler: Sampler
    scheduler: Scheduler
    schedule_label: str
    requested_scheduler: Scheduler = AUTOMATIC
    scheduler_class: str = ""
    overrides: tuple[tuple[str, Any], ...] = ()
    exact: bool = False
    note: str = ""

    @property
    def sampler_name(self) -> str:
        """The name the infotext's `Sampler` and `info.sampler_name` carry."""
        return self.sampler.name


def _lookup_scheduler(value: str | None) -> Scheduler:
    """Scheduler by exact name, label or alias; anything else (including None) is Automatic, as in A1111."""
    if not value:
        return AUTOMATIC
    return _SCHEDULER_BY_KEY.get(str(value), AUTOMATIC)


def split_sampler_name(name: str) -> tuple[Sampler | None, Scheduler | None, str]:
    """(the sampler, the schedule type of a suffix, the name without its suffixes) of a sampler string, as A1111
    v1.10.1 reads it: it walks every scheduler in order and strips a matching `" <label, name or alias>"` suffix
    (at most one per scheduler); the sampler is None when the rest is no sampler's name or alias."""
    found = None
    for sched in SCHEDULERS:
        for option in (sched.label, sched.name, *(sched.aliases or ())):
            if name.endswith(" " + option):
                found = sched
                name = name[: -(len(option) + 1)]
                break
    return _SAMPLER_BY_NAME.get(name) or _SAMPLER_BY_ALIAS.get(name), found, name


def resolve_sampler(sampler_name: str | None, sampler_index: str | None = None,
                    scheduler: str | None = None) -> ResolvedSampler:
    """Resolve a request's `sampler_name` / `sampler_index` / `scheduler` as A1111 v1.10.1 does, plus aliases.

    `sampler_name`, else `sampler_index`, else "Euler". The scheduler is looked up by name, label or alias
    (unknown -> Automatic). A `" <schedule label, name or alias>"` suffix on the sampler string is cut off
    and becomes the scheduler ("DPM++ 2M Karras"). The rest must be an exact, case-sensitive sampler name
    or alias (`k_euler_a`), else `UnknownSampler` (field `sampler_name`) is raised.
    """
    name = str(sampler_name or sampler_index or DEFAULT_SAMPLER)
    sampler, suffix, name = split_sampler_name(name)
    found = suffix or _lookup_scheduler(scheduler)
    if sampler is None:
        shown = name if len(name) <= 64 else name[:61] + "..."
        raise UnknownSampler(
            f"sampler_name: unknown sampler {shown!r}; GET /sdapi/v1/samplers lists the names and aliases",
            field="sampler_name",
        )

    default_name = sampler.options.get("scheduler")
    if default_name is not None and found.name == default_name:
        found = AUTOMATIC  # A1111 records the sampler's own default as Automatic
    requested = found

    twin = _TWINS[sampler.name]
    default = _SCHEDULER_BY_NAME[default_name] if default_name else AUTOMATIC
    if twin.fixed_schedule:
        if requested is not AUTOMATIC:
            logger.info("schedule type %s ignored: sampler %s uses its own timesteps", requested.label, sampler.name)
        used = AUTOMATIC
    else:
        used = requested if requested is not AUTOMATIC else default
        if not _schedule_applies(used, twin.cls_name):
            fallback = default if _schedule_applies(default, twin.cls_name) else AUTOMATIC
            logger.info("schedule type %s not supported by %s; using %s", used.label, twin.cls_name, fallback.label)
            used = fallback

    overrides: dict[str, Any] = {}
    if not twin.fixed_schedule:
        overrides.update(_schedule_kwargs(used, twin.cls_name))
    overrides.update({k: v for k, v in twin.kwargs if k in _init_params(twin.cls_name)})

    exact = twin.exact and used.name in _EXACT_SCHEDULES
    if twin.cls_name in _LINSPACE_ENDS_EARLY and not any(overrides.get(f) for f in _SIGMA_FLAGS):
        exact = False  # their "linspace" grid stops at t~999/n instead of k-diffusion's t=0
    return ResolvedSampler(
        sampler=sampler,
        scheduler=used,
        schedule_label=used.label,
        requested_scheduler=requested,
        scheduler_class=twin.cls_name,
        overrides=tuple(overrides.items()),
        exact=exact,
        note=twin.note,
    )


def build_scheduler(resolved: ResolvedSampler, base_config: Mapping[str, Any], *,
                    seeds: Sequence[int] | None = None) -> Any:
    """A new diffusers scheduler for one request: `resolved.scheduler_class.from_config(base_config, **overrides)`.

    `base_config` is the pipeline's own `pipe.scheduler.config` (SD 1.5's PNDM or SDXL's Euler config both
    work); it is copied, never mutated, and keys the target class does not take are dropped (no warnings).
    `seeds`: the per-image seeds of the first batch, passed to `set_noise_seeds` (only DPM++ SDE uses them;
    without them its Brownian noise is seeded from torch's global RNG, so not reproducible).
    """
    cls_name = resolved.scheduler_class or _TWINS[resolved.sampler.name].cls_name
    cls = _scheduler_class(cls_name)
    params = _init_params(cls_name)
    config = {k: copy.deepcopy(v) for k, v in base_config.items() if k in params}
    config.pop("noise_sampler_seed", None)  # a seed never comes from the shared config
    scheduler = cls.from_config(config, **dict(resolved.overrides))
    if seeds is not None:
        set_noise_seeds(scheduler, seeds)
    elif "noise_sampler_seed" in params:
        logger.debug("%s built without seeds: its Brownian noise is not reproducible", cls_name)
    return scheduler


def set_noise_seeds(scheduler: Any, seeds: Sequence[int]) -> bool:
    """Seed a Brownian-tree scheduler (DPM++ SDE) for the next batch: one tree per image, as A1111 does.

    Call it before each pipeline call with that batch's per-image seeds (`len(seeds)` must equal the batch
    size: diffusers asserts it). The pipeline's `set_timesteps` drops the previous tree, so one scheduler
    serves several batches. Returns False (and does nothing) for schedulers that draw their noise from the
    pipeline's `generator` instead.
    """
    if not hasattr(scheduler, "noise_sampler_seed"):
        return False
    scheduler.noise_sampler_seed = [int(s) for s in seeds]
    scheduler.noise_sampler = None
    return True
