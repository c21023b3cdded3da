"""AUTOMATIC1111's names for samplers, noise schedules and upscalers, and atelier's for the same things.

A1111 clients name a sampler ("DPM++ 2M"), a schedule ("Karras", or both at once in the names from
before A1111 1.9: "DPM++ 2M Karras") and an upscaler ("Lanczos", "R-ESRGAN 4x+") by A1111's labels.
Each maps onto atelier's own (``JobSpec.sampler``, ``JobSpec.schedule``, a catalog upscaler model or
a Pillow resize), and a name with no counterpart is refused by name, never replaced by a default as
A1111 does.
"""

from __future__ import annotations

from dataclasses import dataclass

from atelier.samplers import TABLES

# atelier sampler -> (A1111's label, A1111's aliases). DPMSolverSinglestep is not ancestral, so it is
# not A1111's "DPM++ 2S a": it keeps a name of its own. PNDM with PRK steps skipped is PLMS.
SAMPLERS: dict[str, tuple[str, list[str]]] = {
    "dpm++2m": ("DPM++ 2M", ["k_dpmpp_2m"]),
    "dpm++sde": ("DPM++ SDE", ["k_dpmpp_sde"]),
    "dpm++2m_sde": ("DPM++ 2M SDE", ["k_dpmpp_2m_sde"]),
    "dpm++2s": ("DPM++ 2S", []),
    "euler_a": ("Euler a", ["k_euler_a", "k_euler_ancestral"]),
    "euler": ("Euler", ["k_euler"]),
    "lms": ("LMS", ["k_lms"]),
    "heun": ("Heun", ["k_heun"]),
    "dpm2": ("DPM2", ["k_dpm_2"]),
    "dpm2_a": ("DPM2 a", ["k_dpm_2_a"]),
    "ddim": ("DDIM", []),
    "pndm": ("PLMS", []),
    "unipc": ("UniPC", []),
    "lcm": ("LCM", ["k_lcm"]),
    "deis": ("DEIS", []),
}


@dataclass(frozen=True)
class Schedule:
    name: str  # A1111's scheduler name
    label: str
    aliases: tuple[str, ...] = ()
    default_rho: float = -1.0
    need_inner_model: bool = False


# atelier schedule -> A1111's scheduler (A1111's own rho and inner-model flags). "trailing" spacing is
# what A1111 calls SGM Uniform.
SCHEDULES: dict[str, Schedule] = {
    # A1111's "Normal" is the model's own noise levels, as "Automatic" is for most samplers.
    "default": Schedule("automatic", "Automatic", ("Normal",)),
    "karras": Schedule("karras", "Karras", default_rho=7.0),
    "exponential": Schedule("exponential", "Exponential"),
    "trailing": Schedule("sgm_uniform", "SGM Uniform", ("SGMUniform",), need_inner_model=True),
    "beta": Schedule("beta", "Beta"),
}

# A1111's latent upscalers resize the latents inside its sampler: atelier's passes go through images.
LATENT_UPSCALERS = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                    "Latent (nearest)", "Latent (nearest-exact)")
# Pillow's resizes, by A1111's names ("None" is a Lanczos resize in A1111 too).
RESIZERS = ("None", "Lanczos", "Nearest")


class UnknownName(ValueError):
    """A name with no counterpart in atelier: the message names it and says what there is."""


def label(sampler: str | None) -> str:
    return SAMPLERS[sampler][0] if sampler else "Automatic"


def schedule_label(schedule: str | None) -> str:
    return SCHEDULES[schedule or "default"].label


def _sampler_names(sampler: str) -> list[str]:
    return [name.lower() for name in (SAMPLERS[sampler][0], *SAMPLERS[sampler][1], sampler)]


def _schedule(name: str) -> str | None:
    wanted = name.strip().lower()
    for schedule, item in SCHEDULES.items():
        if wanted in (schedule, item.name, item.label.lower(), *(a.lower() for a in item.aliases)):
            return schedule
    return None


def choose(sampler_name: str | None, scheduler: str | None, field: str = "sampler_name") \
        -> tuple[str | None, str | None]:
    """(JobSpec.sampler, JobSpec.schedule) for an A1111 request's names; None: the model's own. The
    old combined names ("DPM++ 2M Karras") carry the schedule in the sampler's name, and it wins over
    ``scheduler``, as in A1111."""
    schedule: str | None = None
    if scheduler not in (None, ""):
        schedule = _schedule(scheduler)
        if schedule is None:
            raise UnknownName(f"{field.replace('sampler_name', 'scheduler')} {scheduler!r}: atelier has "
                              f"{', '.join(s.label for s in SCHEDULES.values())}")
    if sampler_name in (None, ""):
        return None, None if schedule == "default" else schedule
    name = sampler_name.strip()
    for candidate, item in SCHEDULES.items():
        for suffix in (item.label, *item.aliases):
            if candidate != "default" and name.lower().endswith(" " + suffix.lower()):
                name, schedule = name[: -len(suffix) - 1], candidate
    found = next((s for s in SAMPLERS if name.lower() in _sampler_names(s)), None)
    if found is None:
        raise UnknownName(f"{field} {sampler_name!r}: no such sampler in atelier; see /sdapi/v1/samplers")
    return found, None if schedule == "default" else schedule


def samplers_for(kinds: set[str]) -> list[str]:
    """atelier's samplers that some family of ``kinds`` ("discrete", "flow") runs, in A1111's order."""
    return [s for s in SAMPLERS if any(s in TABLES[kind] for kind in kinds)]


def upscaler(name: str | None, models: list[str], field: str) -> str:
    """A resize ("None", "Lanczos", "Nearest") or a catalog upscaler model, by an A1111 upscaler name."""
    wanted = (name or "").strip()
    for known in (*RESIZERS, *models):
        if wanted.lower() == known.lower():
            return known
    choices = ", ".join((*RESIZERS, *models))
    if wanted.lower().startswith("latent"):
        raise UnknownName(f"{field} {name!r}: latent upscalers have no equivalent in atelier (they resize the "
                          f"latents inside A1111's sampler); choose one of {choices}")
    raise UnknownName(f"{field} {name!r}: no such upscaler in atelier; choose one of {choices}")
