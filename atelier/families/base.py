"""The interface every model family adapter implements.

Torch-free on purpose: the scheduler imports this package for limits and
types, and must not pay for (or depend on) importing torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy
    import PIL.Image
    import torch


class JobCancelled(Exception):
    """Raised by a step callback to abandon a generation between steps."""


# (steps done, 1-based; total steps; current latents, or None where a family
# has none). The callback may raise JobCancelled; generate lets it propagate.
StepCallback = Callable[[int, int, "torch.Tensor | None"], None]


@dataclass(frozen=True)
class FamilyLimits:
    max_width: int
    max_height: int
    default_width: int
    default_height: int
    default_steps: int
    default_guidance: float
    max_count: int


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance: float
    # Image i of the batch uses seed + i, so a retried or repeated job gives
    # the same images, and each image can be reproduced on its own.
    seed: int
    count: int


class Family(ABC):
    """Builds, runs and previews one family of models.

    Adapters hold no per-model state (that lives in the object ``load``
    returns), so one instance can serve every model of its family.
    """

    name: str

    @abstractmethod
    def load(
        self,
        path: Path | None,
        *,
        device: str,
        dtype_name: str = "float32",
        options: dict[str, Any] | None = None,
        weights: dict[str, dict[str, Any]] | None = None,
        config: Path | None = None,
    ) -> Any:
        """Load the model at ``path`` onto ``device``; returns the pipeline object.

        ``weights`` (component -> state dict, e.g. views of a staged segment) replaces
        reading the weight files; configs, tokenizers and schedulers still come from ``path``.
        With ``config``, ``path`` is a single-file checkpoint (staged as the one component
        ``staging.CHECKPOINT``) and ``config`` the diffusers folder its pipeline's configs,
        tokenizers and schedulers come from.
        """

    @abstractmethod
    def generate(self, pipe: Any, req: GenerateRequest, on_step: StepCallback) -> list[PIL.Image.Image]:
        """Run one request, calling ``on_step`` after every denoising step."""

    @abstractmethod
    def preview(self, latents: torch.Tensor) -> numpy.ndarray:
        """Cheap RGB preview (no VAE) of the first image: uint8 HxWx3, longest side <= 256."""
