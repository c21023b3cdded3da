"""Samplers a job may choose, by the names people know, and the diffusers scheduler each one is.

A job's ``sampler`` (the solver) and ``schedule`` (how its noise levels are spaced) are chosen per
job, and a model keeps its own scheduler when a job names neither. The names are atelier's; the
compatibility APIs map their clients' names onto them (A1111's "DPM++ 2M" with "Karras", ComfyUI's
``dpmpp_2m`` with ``karras``) and refuse what has no match, by name.

Torch-free: the scheduler process checks a job's choice against its model's family here, and only
the runner imports diffusers to build the scheduler.
"""

from __future__ import annotations

from typing import Any, get_args

from atelier.jobs import SamplerName, ScheduleName

# Sampler -> (the diffusers class, its settings). For the models that predict noise or velocity
# on a discrete schedule: the UNet families, PixArt, HunyuanDiT.
DISCRETE: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++sde": ("DPMSolverSDEScheduler", {}),
    "dpm++2s": ("DPMSolverSinglestepScheduler", {}),
}
# The flow-matching families (SD3, FLUX) have one solver in diffusers that takes their shifted
# schedules (FLUX's resolution-dependent shift included): Euler.
FLOW: dict[str, tuple[str, dict[str, Any]]] = {"euler": ("FlowMatchEulerDiscreteScheduler", {})}
TABLES = {"discrete": DISCRETE, "flow": FLOW}

# Schedule -> the settings that space the noise levels so; "default" keeps the sampler's own.
SCHEDULES: dict[str, dict[str, Any]] = {
    "default": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "trailing": {"timestep_spacing": "trailing"},  # A1111's "SGM Uniform", ComfyUI's sgm_uniform
}
# The classes whose noise levels are fixed by their algorithm: only "default" and "trailing" apply.
_FIXED_SIGMAS = {"EulerAncestralDiscreteScheduler", "DDIMScheduler", "PNDMScheduler", "LCMScheduler"}
# DPMSolverSinglestepScheduler takes no timestep_spacing; FlowMatchEuler spaces by its shift.
_NO_SPACING = {"DPMSolverSinglestepScheduler", "FlowMatchEulerDiscreteScheduler"}

# JobSpec's field types name them too (the domain records sit below this table).
assert set(get_args(SamplerName)) == set(DISCRETE) | set(FLOW) and set(get_args(ScheduleName)) == set(SCHEDULES)

# The catalog's ``options.scheduler`` names from before schedules were their own choice.
CATALOG_ALIASES = {"dpm++2m_karras": ("dpm++2m", "karras")}


def schedules_of(sampler: str, kind: str = "discrete") -> list[str]:
    """The schedules ``sampler`` takes, for families whose samplers are ``kind``'s."""
    class_name = TABLES[kind][sampler][0]
    return [name for name in SCHEDULES
            if not ((class_name in _FIXED_SIGMAS and name not in ("default", "trailing"))
                    or (class_name in _NO_SPACING and name == "trailing"))]


def problem(sampler: str | None, schedule: str | None, kind: str | None, family: str) -> tuple[str, str] | None:
    """(field, why) when a job's choice is not one ``family`` (whose samplers are ``kind``'s) can run; else None."""
    if sampler is None and schedule is None:
        return None
    if kind is None:
        return ("sampler" if sampler is not None else "schedule",
                f"{family} models sample with their own scheduler only; leave sampler and schedule out")
    table = TABLES[kind]
    if sampler is not None and sampler not in table:
        return "sampler", f"sampler {sampler!r}: {family} models take {', '.join(table)}"
    if schedule is not None and schedule != "default":
        if sampler is None:
            return "schedule", "schedule: name the sampler it spaces the steps of as well"
        if schedule not in schedules_of(sampler, kind):
            return "schedule", (f"schedule {schedule!r}: the sampler {sampler} takes "
                                f"{', '.join(schedules_of(sampler, kind))}")
    return None


def scheduler_settings(sampler: str, schedule: str | None, kind: str = "discrete") -> tuple[str, dict[str, Any]]:
    """The diffusers class name and the settings of ``sampler`` with ``schedule`` (checked by ``problem``)."""
    class_name, settings = TABLES[kind][sampler]
    return class_name, {**settings, **SCHEDULES[schedule or "default"]}


def build(current: Any, sampler: str, schedule: str | None, kind: str = "discrete") -> Any:
    """A new scheduler of the sampler's class from ``current``'s config: the model's training schedule
    (betas, timestep spacing, prediction type, FLUX's shift) stays, the solver changes."""
    import diffusers

    class_name, settings = scheduler_settings(sampler, schedule, kind)
    return getattr(diffusers, class_name).from_config(current.config, **settings)
