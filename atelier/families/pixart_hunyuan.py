"""PixArt-α ("pixart-alpha"), PixArt-Σ ("pixart-sigma") and HunyuanDiT ("hunyuan-dit") adapters.

Diffusion transformers over an SD-style 4-channel VAE, text to image. A transformer works on 2x2
patches of the 8x smaller latents, so it makes sizes in steps of 16 px; atelier's sizes come in
steps of 8, so a size between two steps is generated at the next one and centre-cropped to the size
asked for (PixArt's resolution binning, where a model has it, resizes to the size asked itself).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, HunyuanDiTPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline

from atelier.families.base import Family, GenerateRequest, StepCallback
from atelier.families.loaded import LoadedModel, LoadRequest
from atelier.families.loading import load_folder, seeded_generators
from atelier.preview import SD15_LATENT_RGB, SDXL_LATENT_RGB, LatentRGB, latents_to_rgb

# The VAE's 8x times the transformers' 2x2 patches.
_SIZE_STEP = 16
_COMMON_OPTIONS = frozenset({"vae_tiling", "vae_slicing"})
# Schedulers whose step returns its x0 prediction second, which PixArt-α's pipeline takes for a
# one-step generation (meant for its distilled DMD model); with any other, one step is an IndexError.
_ONE_STEP_SCHEDULERS = frozenset({"LCMScheduler", "TCDScheduler", "SCMScheduler"})


@dataclass(frozen=True)
class _Settings:
    """A loaded model's settings from its options."""

    binning: bool = False
    clean_caption: bool = False


class _DiTFamily(Family):
    pipeline_class: type[DiffusionPipeline]
    latent_rgb: LatentRGB
    options: frozenset[str] = _COMMON_OPTIONS

    def build(self, request: LoadRequest) -> LoadedModel:
        options = dict(request.options)
        unknown = set(options) - self.options
        if unknown:
            raise ValueError(f"unknown options for family {self.name!r}: {sorted(unknown)}; "
                             f"known: {sorted(self.options)}")
        for name, value in options.items():
            if not isinstance(value, bool):
                raise ValueError(f"option {name!r} of family {self.name!r} is true or false, not {value!r}")

        pipe = load_folder(self.name, self.pipeline_class, request.path, device=request.load_device,
                           dtype_name=request.dtype_name, weights=request.weights, config=request.config,
                           variant=request.variant)
        if options.get("vae_tiling"):
            pipe.vae.enable_tiling()
        if options.get("vae_slicing"):
            pipe.vae.enable_slicing()
        return LoadedModel(pipe, self, settings=self._settings(pipe, options))

    def _settings(self, pipe: DiffusionPipeline, options: dict[str, Any]) -> _Settings:
        return _Settings()

    def generate(self, model: LoadedModel, req: GenerateRequest, on_step: StepCallback) -> list[PIL.Image.Image]:
        if req.kind != "txt2img" or req.images:
            raise ValueError(f"family {self.name!r} does txt2img only, not {req.kind}")
        pipe, settings = model.pipe, model.settings or _Settings()  # a model of a pipeline alone has none
        # Binning makes its own sizes and resizes back to the one asked for; otherwise the latents must
        # be whole patches.
        width, height = (req.width, req.height) if settings.binning else (_up(req.width), _up(req.height))
        # One generator per image: an image's noise depends on its own seed, not on its batch.
        generators = seeded_generators(pipe, req.seeds)
        # One prompt per image (a batch mixes jobs); "" is the pipelines' own "no negative prompt".
        images = self._run(pipe, req, settings, on_step, prompt=list(req.prompts),
                           negative_prompt=[n or "" for n in req.negative_prompts], width=width, height=height,
                           num_inference_steps=req.steps, guidance_scale=req.guidance, num_images_per_prompt=1,
                           generator=generators, output_type="pil")
        return [_center_crop(image, req.width, req.height) for image in images]

    def _run(self, pipe: DiffusionPipeline, req: GenerateRequest, settings: _Settings, on_step: StepCallback,
             **call: Any) -> list[PIL.Image.Image]:
        raise NotImplementedError

    def preview(self, latents: torch.Tensor, index: int = 0) -> np.ndarray:
        return latents_to_rgb(latents[index], self.latent_rgb)


class _PixArtFamily(_DiTFamily):
    options = _COMMON_OPTIONS | {"resolution_binning", "clean_caption"}
    # Transformer sample sizes the pipeline has a resolution-binning table for.
    binned_sample_sizes: frozenset[int] = frozenset({32, 64, 128})

    def _settings(self, pipe: DiffusionPipeline, options: dict[str, Any]) -> _Settings:
        clean_caption = options.get("clean_caption", False)
        missing = [m for m in ("bs4", "ftfy") if importlib.util.find_spec(m) is None]
        if clean_caption and missing:
            # Without them the pipeline quietly skips the cleaning, and says so at every call.
            raise ValueError(f"option 'clean_caption' of family {self.name!r} needs the packages "
                             f"{', '.join('beautifulsoup4' if m == 'bs4' else m for m in missing)}")
        # PixArt was trained on a fixed set of sizes per aspect ratio: binning generates at the nearest one
        # and resizes the image to the size asked for. A model of another sample size (a tiny one) has no
        # table, so its sizes are generated as asked.
        has_table = pipe.transformer.config.sample_size in self.binned_sample_sizes
        return _Settings(binning=options.get("resolution_binning", True) and has_table, clean_caption=clean_caption)

    def _run(self, pipe: DiffusionPipeline, req: GenerateRequest, settings: _Settings, on_step: StepCallback,
             **call: Any) -> list[PIL.Image.Image]:
        self._check_steps(pipe, req.steps)

        # PixArt's pipelines take only the older per-step callback: (step index, timestep, latents).
        def callback(i: int, t: Any, latents: torch.Tensor) -> None:
            on_step(i + 1, len(pipe.scheduler.timesteps) // pipe.scheduler.order, latents)

        # Exceptions from on_step (JobCancelled) propagate: the pipeline does not catch around the callback.
        result = pipe(callback=callback, callback_steps=1, clean_caption=settings.clean_caption,
                      use_resolution_binning=settings.binning, **call)
        return list(result.images)

    def _check_steps(self, pipe: DiffusionPipeline, steps: int) -> None:
        pass


class PixArtAlphaFamily(_PixArtFamily):
    name = "pixart-alpha"
    pipeline_class = PixArtAlphaPipeline
    latent_rgb = SD15_LATENT_RGB  # PixArt-α decodes with SD's VAE (sd-vae-ft-ema)

    def _check_steps(self, pipe: DiffusionPipeline, steps: int) -> None:
        scheduler = type(pipe.scheduler).__name__
        if steps == 1 and scheduler not in _ONE_STEP_SCHEDULERS:
            raise ValueError(f"steps: PixArt-α runs a single step only with a consistency-style scheduler "
                             f"({', '.join(sorted(_ONE_STEP_SCHEDULERS))}); this model's {scheduler} needs 2 or more")


class PixArtSigmaFamily(_PixArtFamily):
    name = "pixart-sigma"
    pipeline_class = PixArtSigmaPipeline
    latent_rgb = SDXL_LATENT_RGB  # PixArt-Σ decodes with SDXL's VAE
    binned_sample_sizes = frozenset({32, 64, 128, 256})


class HunyuanDiTFamily(_DiTFamily):
    name = "hunyuan-dit"
    pipeline_class = HunyuanDiTPipeline
    latent_rgb = SDXL_LATENT_RGB  # HunyuanDiT decodes with SDXL's VAE (sdxl-vae-fp16-fix)

    def _run(self, pipe: DiffusionPipeline, req: GenerateRequest, settings: _Settings, on_step: StepCallback,
             **call: Any) -> list[PIL.Image.Image]:
        def on_step_end(p: DiffusionPipeline, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step(i + 1, p.num_timesteps, tensors["latents"])
            return {}  # leaves the pipeline's tensors as they are

        # No resolution binning: HunyuanDiT's replaces a size outside its short list (768 to 1280 px) with
        # one from the list and returns the image at that size, not the one asked for.
        result = pipe(callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"],
                      use_resolution_binning=False, **call)
        return list(result.images)


def _up(size: int) -> int:
    return -(-size // _SIZE_STEP) * _SIZE_STEP


def _center_crop(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    if image.size == (width, height):
        return image
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))
