"""The SD x4 upscaler ("sd-upscaler") over diffusers' StableDiffusionUpscalePipeline.

An upscale job's width and height are its input's (the runner hands the image over at that size);
the image that comes back is four times as wide and as high.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionUpscalePipeline

from atelier.families.base import Family, GenerateRequest, StepCallback
from atelier.families.loaded import LoadedModel, LoadRequest
from atelier.families.loading import Check, call_cleanup, checked_options, load_folder, seeded_generators, switch, whole
from atelier.preview import MAX_PREVIEW_SIDE, SD15_LATENT_RGB, latents_to_rgb

SCALE = 4
DEFAULT_NOISE_LEVEL = 20  # diffusers' default: a little noise on the input, so detail can be invented


class SDUpscalerFamily(Family):
    name = "sd-upscaler"
    checks: Mapping[str, Check] = {
        # Noise added to the input before upscaling (0 to the model's max_noise_level, 350): more
        # departs further from it.
        "noise_level": whole(0),
        "attention_slicing": switch,
        "vae_tiling": switch,  # decode the big output in tiles: far less memory at 2048 px
    }

    def build(self, request: LoadRequest) -> LoadedModel:
        settings = checked_options(self.name, request.options, self.checks)
        pipe = load_folder(self.name, StableDiffusionUpscalePipeline, request.path, device=request.load_device,
                           dtype_name=request.dtype_name, weights=request.weights, config=request.config,
                           variant=request.variant)
        noise_level = settings.get("noise_level", DEFAULT_NOISE_LEVEL)
        if noise_level > pipe.config.max_noise_level:
            raise ValueError(f"option 'noise_level' of family {self.name!r}: {noise_level} is above this model's "
                             f"max_noise_level of {pipe.config.max_noise_level}")
        if settings.get("attention_slicing"):
            pipe.enable_attention_slicing()
        if settings.get("vae_tiling"):
            pipe.vae.enable_tiling()
        return LoadedModel(pipe, self, settings=noise_level)

    def generate(self, model: LoadedModel, req: GenerateRequest, on_step: StepCallback) -> list[PIL.Image.Image]:
        if not req.images:
            raise ValueError("sd-upscaler upscales an image, and the request has none")
        pipe: StableDiffusionUpscalePipeline = model.pipe
        # One generator per image: an image's noise depends on its own seed, not on its batch.
        generators = seeded_generators(pipe, req.seeds)

        def on_progress(step: int, t: Any, latents: torch.Tensor) -> None:
            # This pipeline predates callback_on_step_end; its callback counts updates of the
            # progress bar, one per scheduler.order timesteps.
            on_step(step + 1, len(pipe.scheduler.timesteps) // pipe.scheduler.order, latents)

        with call_cleanup(pipe):  # the pipeline upcasts a float16 VAE for the decode
            result = pipe(prompt=list(req.prompts), negative_prompt=[n or "" for n in req.negative_prompts],
                          image=list(req.images), num_inference_steps=req.steps, guidance_scale=req.guidance,
                          noise_level=model.settings, generator=generators, output_type="pil",
                          callback=on_progress, callback_steps=1)
        return list(result.images)

    def preview(self, latents: torch.Tensor, index: int = 0) -> np.ndarray:
        # The latents are at the input's size: a preview at most the output's. No colour fit is published
        # for this VAE's latents, so SD's stands in: the preview shows the shapes, its colours are approximate.
        longest = max(latents.shape[-2:])
        return latents_to_rgb(latents[index], SD15_LATENT_RGB, max_side=min(MAX_PREVIEW_SIDE, SCALE * longest))
