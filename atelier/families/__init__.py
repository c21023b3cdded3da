"""Model family adapters, loaded lazily.

Importing this package must not import torch or diffusers: only workers load an adapter
(get_family), which is when the heavy imports happen. What each family is (its limits, media,
which adapter is its) is the table in atelier/registry.py, which everyone else reads it from.
"""

from __future__ import annotations

import importlib
from functools import cache

from atelier.families.base import Family, GenerateRequest, JobCancelled, StepCallback
from atelier.registry import FAMILIES

__all__ = [
    "Family",
    "GenerateRequest",
    "JobCancelled",
    "StepCallback",
    "get_family",
]


@cache
def get_family(name: str) -> Family:
    """The adapter for family ``name``; imports its module on first use."""
    try:
        module_name, _, class_name = FAMILIES[name].adapter.partition(":")
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None
    module = importlib.import_module(module_name)
    family: Family = getattr(module, class_name)()
    return family
