"""Per-model options of the catalog for the UNet families (SD 1.x, 2.x, XL).

A catalog entry's ``options`` are checked when the model loads: an option its family does not
take is a ``ValueError`` naming it, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from atelier import samplers

# Options a UNet family (SD 1.x, 2.x, XL) takes; what each means is in ``apply`` (prompt_weighting:
# prompts are read with compel's weighting syntax, in the family's generate).
UNET_OPTIONS = frozenset({"scheduler", "vae_tiling", "vae_slicing", "attention_slicing", "prompt_weighting"})


def check(family: str, options: dict[str, Any], allowed: Iterable[str]) -> None:
    allowed = set(allowed)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown options for family {family!r}: {unknown}; it takes {sorted(allowed)}")
    scheduler = options.get("scheduler")
    known = sorted([*samplers.DISCRETE, *samplers.CATALOG_ALIASES])
    if scheduler is not None and scheduler not in known:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose from {known}")
    for name in ("vae_tiling", "vae_slicing", "attention_slicing", "prompt_weighting"):
        if name in options and not isinstance(options[name], bool):
            raise ValueError(f"option {name} is true or false, not {options[name]!r}")


def apply(pipe: Any, options: dict[str, Any]) -> None:
    """Applies checked options to a loaded pipeline."""
    scheduler = options.get("scheduler")
    if scheduler is not None:
        sampler, schedule = samplers.CATALOG_ALIASES.get(scheduler, (scheduler, None))
        pipe.scheduler = samplers.build(pipe.scheduler, sampler, schedule)
    if options.get("attention_slicing"):
        pipe.enable_attention_slicing()  # less memory for attention, a little slower
    if options.get("vae_tiling"):
        pipe.vae.enable_tiling()  # decodes big images tile by tile
    if options.get("vae_slicing"):
        pipe.vae.enable_slicing()  # decodes a batch one image at a time
