"""A model on its device: what ``Family.load`` is asked for, and what it returns.

``LoadRequest`` says everything a load depends on; ``LoadedModel`` holds the pipeline and every
extra loaded with it (LoRAs, ControlNets, IP-Adapter, cache, preview decoder, the family's own
settings), so that dropping the model drops all of it, and nothing rides on the pipeline object.

Torch-free at import, like ``base``: the libraries load on use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from atelier.config import ModelEntry
    from atelier.families.base import Family, GenerateRequest, StepCallback


@dataclass(frozen=True)
class LoadRequest:
    """One model to load: where its files are, onto which device, and how.

    ``weights`` (component -> state dict, e.g. views of a staged segment) replaces reading the weight
    files; configs, tokenizers and schedulers still come from ``path``. With ``config``, ``path`` is a
    single-file checkpoint (staged as the one component ``staging.CHECKPOINT``) and ``config`` the
    diffusers folder its pipeline's configs, tokenizers and schedulers come from. ``variant`` (e.g.
    "fp16") reads a folder's weight files of that variant, as from_pretrained's ``variant=``; staged
    ``weights`` follow the same rule. ``transformer``: a GGUF file the transformer is read from
    (sd3, flux); staged, its bytes are ``weights["transformer"]``.

    ``entry``, the model's catalog entry, brings what loads beside the pipeline: its VAE override and
    preview decoder, LoRAs, ControlNets, IP-Adapter, and speed settings (quantize, cache, offload,
    compile). Without one, the model is its pipeline alone.
    """

    path: Path | None
    device: str = "cpu"  # the runner's: with offload the pipeline is built on the CPU (``load_device``)
    dtype_name: str = "float32"
    options: Mapping[str, Any] = field(default_factory=dict)
    weights: Mapping[str, Mapping[str, Any]] | None = field(default=None, compare=False, repr=False)
    config: Path | None = None
    variant: str | None = None
    transformer: Path | None = None
    entry: ModelEntry | None = None

    @classmethod
    def for_entry(cls, entry: ModelEntry, path: Path | None, *, device: str, model_cache: Path,
                  weights: Mapping[str, Mapping[str, Any]] | None = None) -> LoadRequest:
        """The request of a catalog entry whose source was resolved to ``path``, for a runner on ``device``."""
        from atelier import sources
        from atelier.registry import auto_dtype

        dtype = entry.dtype
        if dtype == "auto":
            dtype = auto_dtype(entry.family, device, _capability(device))
        return cls(path=path, device=device, dtype_name=dtype, options=entry.options, weights=weights,
                   config=sources.config_folder(entry), variant=entry.variant,
                   transformer=sources.transformer_file(entry, model_cache), entry=entry)

    @property
    def load_device(self) -> str:
        """Where the pipeline is built: with offload, the CPU (accel hands the GPU its parts as they run)."""
        if self.entry is None:
            return self.device
        from atelier.families import accel

        return accel.load_device(self.entry, self.device)


@dataclass(eq=False)  # one model is one object: two loads of the same files are two models
class LoadedModel:
    """A loaded model: its pipeline, and everything loaded with it that a call or the budget needs."""

    pipe: Any
    family: Family
    # What the family read from the catalog's options for its calls (its own type, or None).
    settings: Any = None
    # LoRA adapters loaded into the pipeline (all off until a call asks), and those the last call used.
    loras: tuple[str, ...] = ()
    active_loras: tuple[tuple[str, float], ...] = ()
    controlnets: dict[str, Any] = field(default_factory=dict)  # name -> ControlNet, beside the pipeline
    ip_adapter: Any = None  # the family's IP-Adapter state (the UNet families)
    preview_decoder: Any = None  # an ``atelier.preview.DecoderPreview`` in place of the family's projection
    reset_cache: Callable[[], None] | None = None  # forgets what a step cache kept from the last call
    offload: str | None = None  # "model" or "sequential": the weights stay in RAM
    # Pipelines of other classes over the same modules (img2img, inpainting, with a ControlNet), made once.
    variants: dict[Any, Any] = field(default_factory=dict)
    # The scheduler the model loaded with (its catalog options applied), which a job naming no sampler
    # gets; and the (sampler, schedule) its pipelines hold now. Kept from the first call on.
    own_scheduler: Any = None
    active_sampler: tuple[str | None, str | None] = (None, None)

    @property
    def previewer(self) -> Any:
        """What the preview thread calls ``.preview(latents, index)`` on: the preview decoder, or the family."""
        return self.preview_decoder or self.family

    @property
    def held_modules(self) -> list[Any]:
        """Modules kept on the device beside the pipeline's own: its device budget counts them too."""
        decoder = [self.preview_decoder.decoder] if self.preview_decoder is not None else []
        return [*self.controlnets.values(), *decoder]

    def device_bytes(self) -> int:
        """What the model occupies on its device: with offload, only what is there at once."""
        from atelier.families import accel

        if self.offload:
            return accel.offloaded_bytes(self.pipe, self.offload)
        return accel.module_bytes(self.pipe, self.held_modules)

    def before_call(self, request: GenerateRequest) -> None:
        """What a pipeline call needs first: the request's LoRAs switched on, and a cache started afresh
        (it keeps state between steps, which must never leak into another call)."""
        from atelier.families import loras

        loras.use_loras(self, request.loras)
        self._use_sampler(request.sampler, request.schedule)
        if self.reset_cache is not None:
            self.reset_cache()

    def _use_sampler(self, sampler: str | None, schedule: str | None) -> None:
        """Gives the pipeline, and each variant of it, the scheduler of the call's sampler (a new one is a
        few small tensors from the model's own config); nothing to do for the choice of the last call."""
        if (sampler, schedule) == self.active_sampler or not hasattr(self.pipe, "scheduler"):
            return
        from atelier import samplers
        from atelier.registry import FAMILIES

        if self.own_scheduler is None:
            self.own_scheduler = self.pipe.scheduler
        scheduler = self.own_scheduler
        if sampler is not None:
            scheduler = samplers.build(self.own_scheduler, sampler, schedule, FAMILIES[self.family.name].samplers)
        for pipe in (self.pipe, *self.variants.values()):
            pipe.scheduler = scheduler
        self.active_sampler = (sampler, schedule)

    def unreadable(self, prompts: list[str | None]) -> str | None:
        """Why one of a job's prompts cannot be read by this model (``Family.unreadable_prompt``), or None."""
        for prompt in prompts:
            problem = self.family.unreadable_prompt(self, prompt) if prompt else None
            if problem is not None:
                return problem
        return None

    def generate(self, request: GenerateRequest, on_step: StepCallback) -> list[Any]:
        """One pipeline call (``Family.generate``), prepared by ``before_call``."""
        self.before_call(request)
        return self.family.generate(self, request, on_step)


def _capability(device: str) -> tuple[int, int] | None:
    """A CUDA device's compute capability (major, minor); None for any other device."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_capability(device)
