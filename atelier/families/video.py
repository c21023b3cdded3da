"""Video adapters: Stable Video Diffusion ("svd", image to video) and AnimateDiff ("animatediff", text to
video), over diffusers' pipelines.

A video comes back as one ``media.Video`` per seed: its frames, and the rate the job asked for.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AnimateDiffPipeline, DiffusionPipeline, MotionAdapter, StableVideoDiffusionPipeline

from atelier.families.base import Family, GenerateRequest, StepCallback
from atelier.families.loaded import LoadedModel, LoadRequest
from atelier.families.loading import (
    Check,
    call_cleanup,
    checked_options,
    folder,
    load_folder,
    number,
    seeded_generators,
    torch_dtype,
    whole,
)
from atelier.media import Video
from atelier.preview import SD15_LATENT_RGB, latents_to_rgb


def _generators(pipe: DiffusionPipeline, req: GenerateRequest) -> list[torch.Generator]:
    # One generator per video: its noise depends on its own seed, not on its batch.
    return seeded_generators(pipe, req.seeds)


def _reporter(on_step: StepCallback) -> Callable[..., dict[str, Any]]:
    def on_step_end(p: DiffusionPipeline, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        on_step(i + 1, p.num_timesteps, tensors["latents"])
        return {}  # leaves the pipeline's tensors as they are

    return on_step_end


def _class_name(path: Path) -> str | None:
    try:
        return json.loads((path / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


class _VideoFamily(Family):
    def _frames_and_fps(self, req: GenerateRequest) -> tuple[int, int]:
        from atelier.registry import FAMILY_LIMITS

        limits = FAMILY_LIMITS[self.name]
        return req.frames or limits.default_frames or 1, req.fps or limits.default_fps or 8


class SVDFamily(_VideoFamily):
    """Stable Video Diffusion: a clip that starts from the job's image. It takes no prompt; the job's
    guidance is the last frame's (SVD's guidance grows along the clip, from ``min_guidance_scale``)."""

    name = "svd"
    checks: Mapping[str, Check] = {
        "decode_chunk_size": whole(1),  # frames the VAE decodes at once: fewer, less memory
        "motion_bucket_id": whole(0, 255),  # how much motion: SVD's conditioning, 127 by default
        "noise_aug_strength": number(0.0, 1.0),  # noise added to the image: more, less like it
        "min_guidance_scale": number(0.0, 50.0),
    }

    def build(self, request: LoadRequest) -> LoadedModel:
        settings = checked_options(self.name, request.options, self.checks)
        pipe = load_folder(self.name, StableVideoDiffusionPipeline, request.path, device=request.load_device,
                           dtype_name=request.dtype_name, weights=request.weights, config=request.config,
                           variant=request.variant)
        return LoadedModel(pipe, self, settings=settings)  # the pipeline call's extra arguments

    def generate(self, model: LoadedModel, req: GenerateRequest, on_step: StepCallback) -> list[Video]:
        if not req.images:
            raise ValueError("svd makes a video from an image, and the request has none")
        pipe = model.pipe
        frames, fps = self._frames_and_fps(req)
        settings = dict(model.settings)
        # Below 1 on both ends, no guidance at all; above the last frame's, the ramp would run backwards.
        low = min(settings.pop("min_guidance_scale", 1.0), req.guidance)
        with call_cleanup(pipe):  # SVD upcasts its VAE to encode the image
            result = pipe(image=list(req.images), height=req.height, width=req.width, num_frames=frames,
                          num_inference_steps=req.steps, min_guidance_scale=low, max_guidance_scale=req.guidance,
                          fps=fps, generator=_generators(pipe, req), output_type="pil",
                          callback_on_step_end=_reporter(on_step), callback_on_step_end_tensor_inputs=["latents"],
                          **settings)
        return [Video(frames=list(video), fps=fps) for video in result.frames]

    def preview_latents(self, latents: torch.Tensor, index: int = 0) -> torch.Tensor:
        # (videos, frames, channels, h, w), in SD's latent space (SVD keeps SD's VAE encoder): the first frame
        return latents[index, 0]

    def preview(self, latents: torch.Tensor, index: int = 0) -> np.ndarray:
        return latents_to_rgb(self.preview_latents(latents, index), SD15_LATENT_RGB)


class AnimateDiffFamily(_VideoFamily):
    """AnimateDiff: an SD 1.5 model with a motion adapter, text to video.

    ``source`` is either a folder AnimateDiffPipeline saved (the adapter merged into its UNet), or an
    SD 1.5 folder with ``options.motion_adapter``: the folder of a MotionAdapter to merge on load.
    """

    name = "animatediff"
    checks: Mapping[str, Check] = {
        "decode_chunk_size": whole(1),  # frames the VAE decodes at once
        "motion_adapter": folder,
    }

    def build(self, request: LoadRequest) -> LoadedModel:
        path = request.path
        settings = checked_options(self.name, request.options, self.checks)
        adapter_folder = settings.pop("motion_adapter", None)
        if adapter_folder is not None:
            adapter = MotionAdapter.from_pretrained(adapter_folder, dtype=torch_dtype(request.dtype_name),
                                                    use_safetensors=True, local_files_only=True)
        elif path is not None and _class_name(path) not in (None, AnimateDiffPipeline.__name__):
            raise ValueError(f"{path} holds a {_class_name(path)}, not an AnimateDiff model: give the folder of "
                             "its motion adapter as options.motion_adapter")
        else:
            adapter = None
        pipe = load_folder(self.name, AnimateDiffPipeline, path, device=request.load_device,
                           dtype_name=request.dtype_name, weights=request.weights, config=request.config,
                           variant=request.variant, motion_adapter=adapter)
        # Merged, the UNet holds the motion modules: the adapter on its own would be the weights twice over.
        pipe.register_modules(motion_adapter=None)
        return LoadedModel(pipe, self, settings=settings)  # the pipeline call's extra arguments

    def generate(self, model: LoadedModel, req: GenerateRequest, on_step: StepCallback) -> list[Video]:
        pipe = model.pipe
        frames, fps = self._frames_and_fps(req)
        result = pipe(prompt=list(req.prompts), negative_prompt=[n or "" for n in req.negative_prompts],
                      num_frames=frames, height=req.height, width=req.width, num_inference_steps=req.steps,
                      guidance_scale=req.guidance, generator=_generators(pipe, req), output_type="pil",
                      callback_on_step_end=_reporter(on_step), callback_on_step_end_tensor_inputs=["latents"],
                      **model.settings)
        return [Video(frames=list(video), fps=fps) for video in result.frames]

    def preview_latents(self, latents: torch.Tensor, index: int = 0) -> torch.Tensor:
        # (videos, channels, frames, h, w), in SD 1.5's latent space: the first frame
        return latents[index, :, 0]

    def preview(self, latents: torch.Tensor, index: int = 0) -> np.ndarray:
        return latents_to_rgb(self.preview_latents(latents, index), SD15_LATENT_RGB)
