"""Stable Diffusion 1.x ("sd1"), 2.x ("sd2") and SDXL ("sdxl") adapters over diffusers' pipelines."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import SingleFileComponentError
from diffusers.utils import logging as diffusers_logging

from atelier.families import options as unet_options
from atelier.families.base import Family, GenerateRequest, StepCallback
from atelier.families.loading import torch_dtype, upload
from atelier.preview import SD15_LATENT_RGB, SDXL_LATENT_RGB, LatentRGB, latents_to_rgb
from atelier.sources import ModelSourceError
from atelier.staging import CHECKPOINT, build_from_checkpoint, build_pipeline

# A server loads models all day; diffusers' per-load progress bars would bury its logs.
diffusers_logging.disable_progress_bar()

class _StableDiffusionFamily(Family):
    pipeline_class: type[DiffusionPipeline]
    latent_rgb: LatentRGB

    def load(
        self,
        path: Path | None,
        *,
        device: str,
        dtype_name: str = "float32",
        options: dict[str, Any] | None = None,
        weights: dict[str, dict[str, Any]] | None = None,
        config: Path | None = None,
    ) -> DiffusionPipeline:
        if path is None:
            raise ValueError(f"family {self.name!r} needs a model path")
        dtype = torch_dtype(dtype_name)  # an unknown name fails before any reading
        options = options or {}
        unet_options.check(self.name, options, unet_options.UNET_OPTIONS)

        # local_files_only: a path that is not a local folder must fail here,
        # never be mistaken for a hub repo id and trigger a download.
        if config is not None:
            pipe = self._from_single_file(path, config, dtype, weights)
        elif weights is not None:
            pipe = build_pipeline(path, weights, dtype=dtype)
        else:
            pipe = self.pipeline_class.from_pretrained(path, dtype=dtype, local_files_only=True)
        if device != "cpu":
            upload(pipe, device)
        pipe.set_progress_bar_config(disable=True)
        unet_options.apply(pipe, options)
        return pipe

    def _from_single_file(self, path: Path, config: Path, dtype: torch.dtype,
                          weights: dict[str, dict[str, Any]] | None) -> DiffusionPipeline:
        """The pipeline of a single-file checkpoint: its tensors (staged, or read from ``path``) converted
        by diffusers, everything else from the diffusers folder ``config``."""
        # Given anything but a local folder of configs, diffusers goes looking for them on the hub.
        if not (config / "model_index.json").is_file():
            raise ModelSourceError(f"config {config} is not a diffusers folder (no model_index.json)")
        try:
            if weights is not None:
                return build_from_checkpoint(self.pipeline_class, config, weights[CHECKPOINT], dtype=dtype)
            return self.pipeline_class.from_single_file(str(path), config=str(config), dtype=dtype,
                                                        local_files_only=True)
        except (SingleFileComponentError, KeyError, ValueError) as exc:
            # What diffusers says of a file that does not fit the configs rarely names either.
            raise ModelSourceError(f"{path.name} does not fit the configs in {config}: "
                                   f"{type(exc).__name__}: {exc}") from exc

    def generate(self, pipe: DiffusionPipeline, req: GenerateRequest, on_step: StepCallback) -> list[PIL.Image.Image]:
        # One generator per image: an image's noise depends on its own seed, not on its batch.
        generators = [torch.Generator(device=pipe.device).manual_seed(seed) for seed in req.seeds]

        def on_step_end(p: DiffusionPipeline, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            # num_timesteps is what the scheduler actually runs: fewer than the steps asked for
            # when img2img starts part of the way in, and for some schedulers otherwise.
            on_step(i + 1, p.num_timesteps, tensors["latents"])
            # An empty dict leaves the pipeline's tensors untouched.
            return {}

        # One prompt per image (a batch mixes jobs); diffusers itself uses "" for no negative prompt.
        # Exceptions from on_step (JobCancelled) propagate: diffusers does not catch around the callback.
        common = dict(prompt=list(req.prompts), negative_prompt=[n or "" for n in req.negative_prompts],
                      num_inference_steps=req.steps, guidance_scale=req.guidance, num_images_per_prompt=1,
                      generator=generators, output_type="pil", callback_on_step_end=on_step_end,
                      callback_on_step_end_tensor_inputs=["latents"])
        if req.images and int(req.steps * (req.strength or 1.0)) < 1:
            # Starting from an image runs int(steps * strength) steps; with none (a 1-step turbo model
            # at strength 0.75, say) diffusers fails on an empty tensor deep inside.
            raise ValueError(f"strength {req.strength} of {req.steps} steps leaves no step to run: "
                             "ask for more steps or a higher strength (steps x strength >= 1)")
        if req.masks:  # inpainting: the image, repainted where the mask is white
            result = _variant(pipe, AutoPipelineForInpainting)(
                image=list(req.images), mask_image=list(req.masks), strength=req.strength, width=req.width,
                height=req.height, **common)
        elif req.images:  # img2img: the image's size is the output's (the runner resized it to the job's)
            result = _variant(pipe, AutoPipelineForImage2Image)(image=list(req.images), strength=req.strength,
                                                                 **common)
        else:
            result = pipe(width=req.width, height=req.height, **common)
        return list(result.images)

    def preview(self, latents: torch.Tensor, index: int = 0) -> np.ndarray:
        return latents_to_rgb(latents[index], self.latent_rgb)


class SD15Family(_StableDiffusionFamily):
    name = "sd1"
    pipeline_class = StableDiffusionPipeline
    latent_rgb = SD15_LATENT_RGB


class SD2Family(SD15Family):
    """SD 2.x: SD 1.5's pipeline class and VAE (so its latent space); what differs (v-prediction,
    the OpenCLIP text encoder, 768 px) comes with the checkpoint's own configs."""

    name = "sd2"


class SDXLFamily(_StableDiffusionFamily):
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    latent_rgb = SDXL_LATENT_RGB


# A loaded model's img2img and inpainting pipelines: the same modules in another pipeline class,
# made once per model (from_pipe shares the weights, it copies none).
_VARIANTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _variant(pipe: DiffusionPipeline, auto: Any) -> DiffusionPipeline:
    variants = _VARIANTS.setdefault(pipe, {})
    if auto not in variants:
        variants[auto] = auto.from_pipe(pipe)
        variants[auto].set_progress_bar_config(disable=True)
    return variants[auto]
