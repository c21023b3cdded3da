"""The interface every model family adapter implements.

Torch-free on purpose: the scheduler imports this package for limits and
types, and must not pay for (or depend on) importing torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from atelier.families.loaded import LoadedModel, LoadRequest

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
class GenerateRequest:
    """One pipeline call: one entry per image in ``prompts``, ``negative_prompts`` and ``seeds``.

    The images of a batch may come from several jobs; everything that is not per image
    (size, steps, guidance) is what those jobs have in common.
    """

    prompts: tuple[str, ...]
    negative_prompts: tuple[str | None, ...]
    # A job's image i uses its seed + i, so a retried or repeated job gives the same images,
    # and each image can be reproduced on its own.
    seeds: tuple[int, ...]
    width: int
    height: int
    steps: int
    guidance: float
    kind: str = "txt2img"  # a JobKind value
    # The solver and noise schedule for this call (atelier/samplers.py); None: the model's own scheduler.
    sampler: str | None = None
    schedule: str | None = None
    # Per image, like the prompts, when the kind starts from an image: PIL images at width x height.
    images: tuple[PIL.Image.Image, ...] = ()
    masks: tuple[PIL.Image.Image | None, ...] = ()
    strength: float | None = None
    frames: int | None = None  # video
    fps: int | None = None  # video
    duration_s: float | None = None  # audio
    loras: tuple[tuple[str, float], ...] = ()  # (catalog name, scale) of the LoRAs to apply
    # ControlNet (catalog name) and its condition per image, at width x height; and its strength.
    controlnet: str | None = None
    control_images: tuple[PIL.Image.Image, ...] = ()
    controlnet_scale: float = 1.0
    # IP-Adapter: an image prompt per image (jobs of a batch may bring different ones), and its strength.
    ip_adapter_images: tuple[PIL.Image.Image, ...] = ()
    ip_adapter_scale: float = 1.0

    def __post_init__(self) -> None:
        if not (len(self.prompts) == len(self.negative_prompts) == len(self.seeds) >= 1):
            raise ValueError("a request needs one prompt, negative prompt and seed per image")
        if any(inputs and len(inputs) != len(self.seeds)
               for inputs in (self.images, self.masks, self.control_images, self.ip_adapter_images)):
            raise ValueError("input images and masks go one per output image")
        if bool(self.controlnet) != bool(self.control_images):
            raise ValueError("a ControlNet and control images go together")

    @property
    def count(self) -> int:
        return len(self.seeds)

    @classmethod
    def single(cls, *, prompt: str, negative_prompt: str | None, width: int, height: int, steps: int,
               guidance: float, seed: int, count: int = 1, image: Any = None, mask: Any = None,
               control_image: Any = None, ip_adapter_image: Any = None, **rest: Any) -> "GenerateRequest":
        """The request of one job: ``count`` images of one prompt, seeds ``seed`` … ``seed + count - 1``."""
        given = {"images": image, "masks": mask, "control_images": control_image,
                 "ip_adapter_images": ip_adapter_image}
        inputs = {name: (value,) * count if value is not None else () for name, value in given.items()}
        return cls(prompts=(prompt,) * count, negative_prompts=(negative_prompt,) * count,
                   seeds=tuple(seed + i for i in range(count)), width=width, height=height, steps=steps,
                   guidance=guidance, **inputs, **rest)


class Family(ABC):
    """Builds, runs and previews one family of models.

    Adapters hold no per-model state (that lives in the ``LoadedModel``
    ``load`` returns), so one instance can serve every model of its family.
    """

    name: str

    def load(self, request: LoadRequest) -> LoadedModel:
        """The model ``request`` asks for, with everything its catalog entry loads beside the pipeline, in
        the order each needs the one before: the family's pipeline, the entry's VAEs, LoRAs, ControlNets
        and IP-Adapter, then quantize, cache, offload and compile, once all of it is there."""
        from atelier.families import accel, loras, vae  # they import the config, which imports this package

        model = self.build(request)
        entry = request.entry
        if entry is not None:
            vae.load_vaes(model, entry, request.device)  # read from disk, not staged with the model
            loras.load_loras(model, entry.loras)
            self.load_conditioning(model, entry.controlnets, entry.ip_adapter, entry.ip_adapter_encoder)
            accel.apply(model, entry, request.device)
        return model

    @abstractmethod
    def build(self, request: LoadRequest) -> LoadedModel:
        """The family's own part of ``load``: the pipeline at ``request.path`` on ``request.load_device``, and
        the settings its options give (see ``LoadRequest`` for the rest of what it says)."""

    def load_conditioning(self, model: LoadedModel, controlnets: dict[str, str], ip_adapter: str | None,
                          ip_adapter_encoder: str | None) -> None:
        """Loads a catalog entry's ControlNets (name -> folder) and IP-Adapter (file, and its image
        encoder's folder) into a loaded model. Only the UNet families take them."""
        if controlnets or ip_adapter or ip_adapter_encoder:
            raise ValueError(f"family {self.name!r} takes no controlnets or ip_adapter: remove them from "
                             "the model's catalog entry")

    def unreadable_prompt(self, model: LoadedModel, prompt: str) -> str | None:
        """Why ``model`` cannot read ``prompt`` (a syntax it parses, broken), or None. Asked of each
        job before its batch's call, so that such a job fails alone, not every job it shares the call with."""
        return None

    @abstractmethod
    def generate(self, model: LoadedModel, req: GenerateRequest, on_step: StepCallback) -> list[Any]:
        """Run one request, calling ``on_step`` after every denoising step; one item per seed, in order:
        a PIL image, or an ``atelier.media.Video`` or ``Audio``. ``LoadedModel.generate`` prepares the
        model for the call first."""

    def preview_latents(self, latents: torch.Tensor, index: int = 0) -> torch.Tensor:
        """The (channels, h, w) latents of the picture a preview of image ``index`` shows: a video's
        families pick one frame. What a ``preview_decoder`` decodes."""
        return latents[index]

    @abstractmethod
    def preview(self, latents: torch.Tensor, index: int = 0) -> numpy.ndarray:
        """Cheap RGB preview (no VAE) of image ``index`` of the batch: uint8 HxWx3, longest side <= 256."""
