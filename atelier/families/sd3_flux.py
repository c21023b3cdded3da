"""Stable Diffusion 3.x ("sd3") and FLUX.1 ("flux") adapters: flow-matching transformers over
16-channel latents, with T5 beside CLIP for the prompt."""

from __future__ import annotations

from typing import Any

import diffusers
import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline  # the auto pipelines: see sd.py

from atelier.families import gguf
from atelier.families.base import Family, GenerateRequest, StepCallback
from atelier.families.loaded import LoadedModel, LoadRequest
from atelier.families.loading import load_folder, seeded_generators, torch_dtype
from atelier.families.sd import _variant
from atelier.preview import FLUX_LATENT_RGB, SD3_LATENT_RGB, LatentRGB, latents_to_rgb

# vae_tiling: large images in bounded memory. max_sequence_length: T5 tokens a prompt is padded
# (and cut) to; FLUX.1-schnell was trained with 256 where dev has 512, and fewer are cheaper.
_OPTIONS = frozenset({"vae_tiling", "max_sequence_length"})


class _FlowFamily(Family):
    pipeline_class: type[DiffusionPipeline]
    latent_rgb: LatentRGB

    def build(self, request: LoadRequest) -> LoadedModel:
        """``request.transformer``: a GGUF file the transformer is read from (quantized) in place of the
        folder's; staged, its bytes are ``weights["transformer"]``."""
        options = dict(request.options)
        path, weights = request.path, request.weights
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ValueError(f"unknown options for family {self.name!r}: {sorted(unknown)}")
        settings = {}
        if "max_sequence_length" in options:
            settings["max_sequence_length"] = _sequence_length(options["max_sequence_length"])

        parts = {}
        weights = dict(weights) if weights is not None else None
        if request.transformer is not None and path is not None:
            staged = weights.pop("transformer", None) if weights is not None else None
            parts["transformer"] = gguf.load_transformer(self.name, path, request.transformer, staged,
                                                         torch_dtype(request.dtype_name))
        pipe = load_folder(self.name, self.pipeline_class, path, device=request.load_device,
                           dtype_name=request.dtype_name, weights=weights, config=request.config,
                           variant=request.variant, **parts)
        if options.get("vae_tiling"):
            pipe.vae.enable_tiling()
        return LoadedModel(pipe, self, settings=settings)  # the pipeline call's extra arguments

    def generate(self, model: LoadedModel, req: GenerateRequest, on_step: StepCallback) -> list[PIL.Image.Image]:
        pipe = model.pipe
        multiple = self._size_multiple(pipe)
        for name, value in (("width", req.width), ("height", req.height)):
            if value % multiple:
                # diffusers would refuse (SD3) or quietly make another size (FLUX).
                raise ValueError(f"{name} {value}: {self.name} makes sizes in multiples of {multiple}")
        # One generator per image: an image's noise depends on its own seed, not on its batch.
        generators = seeded_generators(pipe, req.seeds)

        def on_step_end(p: DiffusionPipeline, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            # num_timesteps: fewer than the steps asked for when img2img starts part of the way in.
            on_step(i + 1, p.num_timesteps, self._spatial(p, tensors["latents"], req))
            return {}

        # Exceptions from on_step (JobCancelled) propagate: diffusers does not catch around the callback.
        common = dict(prompt=list(req.prompts), num_inference_steps=req.steps, guidance_scale=req.guidance,
                      num_images_per_prompt=1, generator=generators, width=req.width, height=req.height,
                      output_type="pil", callback_on_step_end=on_step_end,
                      callback_on_step_end_tensor_inputs=["latents"], **self._prompt_extras(req),
                      **(model.settings or {}))  # a model of a pipeline alone has none
        if req.masks:  # inpainting: the image, repainted where the mask is white
            result = _variant(model, diffusers.AutoPipelineForInpainting)(
                image=list(req.images), mask_image=list(req.masks), strength=req.strength, **common)
        elif req.images:
            result = _variant(model, diffusers.AutoPipelineForImage2Image)(
                image=list(req.images), strength=req.strength, **common)
        else:
            result = pipe(**common)
        return list(result.images)

    def preview(self, latents: torch.Tensor, index: int = 0) -> np.ndarray:
        return latents_to_rgb(latents[index], self.latent_rgb)

    def _prompt_extras(self, req: GenerateRequest) -> dict[str, Any]:
        return {}

    def _size_multiple(self, pipe: DiffusionPipeline) -> int:
        raise NotImplementedError

    def _spatial(self, pipe: DiffusionPipeline, latents: torch.Tensor, req: GenerateRequest) -> torch.Tensor:
        """The latents as (batch, channels, height, width), the layout previews read."""
        return latents


class SD3Family(_FlowFamily):
    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    latent_rgb = SD3_LATENT_RGB

    def _prompt_extras(self, req: GenerateRequest) -> dict[str, Any]:
        # Classifier-free guidance: diffusers itself uses "" for no negative prompt.
        return {"negative_prompt": [n or "" for n in req.negative_prompts]}

    def _size_multiple(self, pipe: DiffusionPipeline) -> int:
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size


class FluxFamily(_FlowFamily):
    """FLUX.1 is guidance-distilled: ``guidance`` is the guidance embedding of a dev-style model
    (a schnell-style model, without one, ignores it), not classifier-free guidance, so there is
    no negative prompt either."""

    name = "flux"
    pipeline_class = FluxPipeline
    latent_rgb = FLUX_LATENT_RGB

    def _size_multiple(self, pipe: DiffusionPipeline) -> int:
        return pipe.vae_scale_factor * 2  # latents are packed 2x2 into tokens

    def _spatial(self, pipe: DiffusionPipeline, latents: torch.Tensor, req: GenerateRequest) -> torch.Tensor:
        # FLUX steps on a sequence of 2x2 latent patches; undone here because a preview of one image
        # no longer knows the image's shape. A copy of a few hundred KB per step, against a
        # transformer step.
        # Under xDiT's sequence parallelism a rank's step latents are its shard of the sequence, whole rows
        # of patches: unpacked as the rows it holds (all of them elsewhere).
        patch = pipe.vae_scale_factor * 2
        rows = latents.shape[1] // (req.width // patch)
        return FluxPipeline._unpack_latents(latents, rows * patch, req.width, pipe.vae_scale_factor)


def _sequence_length(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 512:
        raise ValueError(f"option max_sequence_length: {value!r} is not a whole number from 1 to 512")
    return value
