"""Model family adapters, loaded lazily.

Importing this package must not import torch or diffusers: the scheduler
reads FAMILY_LIMITS from it, and only workers load an adapter (get_family),
which is when the heavy imports happen.
"""

from __future__ import annotations

import importlib
from functools import cache

from atelier.families.base import Family, FamilyLimits, GenerateRequest, JobCancelled, StepCallback

__all__ = [
    "FAMILY_LIMITS",
    "Family",
    "FamilyLimits",
    "GenerateRequest",
    "JobCancelled",
    "StepCallback",
    "get_family",
]

FAMILY_LIMITS: dict[str, FamilyLimits] = {
    "sd1": FamilyLimits(
        max_width=1024,
        max_height=1024,
        default_width=512,
        default_height=512,
        default_steps=30,
        default_guidance=7.5,
        max_count=8,
        max_batch=8,
        max_batch_cpu=4,
        kinds=frozenset({"txt2img", "img2img"}),
        inpaint=True,
    ),
    "sdxl": FamilyLimits(
        max_width=2048,
        max_height=2048,
        default_width=1024,
        default_height=1024,
        default_steps=30,
        default_guidance=5.0,
        max_count=4,
        max_batch=4,
        max_batch_cpu=2,
        kinds=frozenset({"txt2img", "img2img"}),
        inpaint=True,
    ),
    "noop": FamilyLimits(
        max_width=4096,
        max_height=4096,
        default_width=64,
        default_height=64,
        default_steps=4,
        default_guidance=0.0,
        max_count=64,
        max_batch=64,
        max_batch_cpu=64,
    ),
    # A GPU's costs without the GPU (benchmarks of the scheduling): sizes as a real model's.
    "costmodel": FamilyLimits(
        max_width=2048,
        max_height=2048,
        default_width=1024,
        default_height=1024,
        default_steps=30,
        default_guidance=5.0,
        max_count=8,
        max_batch=8,
        max_batch_cpu=8,  # it stands in for a GPU wherever its runner is
    ),
}

# family name -> (module in this package, adapter class)
_ADAPTERS: dict[str, tuple[str, str]] = {
    "sd1": ("sd", "SD15Family"),
    "sdxl": ("sd", "SDXLFamily"),
    "noop": ("noop", "NoopFamily"),
    "costmodel": ("costmodel", "CostModelFamily"),
}


@cache
def get_family(name: str) -> Family:
    """The adapter for family ``name``; imports its module on first use."""
    try:
        module_name, class_name = _ADAPTERS[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {sorted(_ADAPTERS)}") from None
    module = importlib.import_module(f"{__name__}.{module_name}")
    family: Family = getattr(module, class_name)()
    return family
