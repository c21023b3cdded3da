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
    # SD 2.x: 768 px (the v-prediction models; the 512 px base ones set their size in the catalog).
    "sd2": FamilyLimits(
        max_width=1536,
        max_height=1536,
        default_width=768,
        default_height=768,
        default_steps=30,
        default_guidance=7.5,
        max_count=8,
        max_batch=4,
        max_batch_cpu=2,
        kinds=frozenset({"txt2img", "img2img"}),
        inpaint=True,
    ),
    # Defaults are diffusers' own for these pipelines. SD3 medium's position embeddings end at
    # 1536 px (SD 3.5 large's go further: raise it in the catalog).
    "sd3": FamilyLimits(
        max_width=1536,
        max_height=1536,
        default_width=1024,
        default_height=1024,
        default_steps=28,
        default_guidance=7.0,
        max_count=4,
        max_batch=4,
        max_batch_cpu=2,
        kinds=frozenset({"txt2img", "img2img"}),
        inpaint=True,
    ),
    # guidance is FLUX.1-dev's distilled guidance embedding (schnell ignores it), not CFG.
    "flux": FamilyLimits(
        max_width=2048,
        max_height=2048,
        default_width=1024,
        default_height=1024,
        default_steps=28,
        default_guidance=3.5,
        max_count=4,
        max_batch=4,
        max_batch_cpu=2,
        kinds=frozenset({"txt2img", "img2img"}),
        inpaint=True,
    ),
    # Stable Audio Open 1.0: 44.1 kHz stereo, up to 47.55 s (1024 latents of 2048 samples), 100 steps at
    # guidance 7 as in diffusers' pipeline. Every call makes the whole window (a shorter sound is cut
    # from it), so a batch costs the same whatever its duration.
    "stable-audio": FamilyLimits(
        max_width=8,
        max_height=8,
        default_width=8,
        default_height=8,
        default_steps=100,
        default_guidance=7.0,
        max_count=4,
        max_batch=4,
        max_batch_cpu=2,
        kinds=frozenset({"txt2audio"}),
        media="audio",
        default_duration_s=10.0,
        max_duration_s=47.0,
    ),
    # AudioLDM 2: 16 kHz mono from mel frames, trained on 10.24 s (its pipeline's default), 200 steps at
    # guidance 3.5 as its model card runs it. Its UNet is convolutional: any length runs, the cost
    # growing with it, and well past its training window the sound wanders.
    "audioldm2": FamilyLimits(
        max_width=8,
        max_height=8,
        default_width=8,
        default_height=8,
        default_steps=200,
        default_guidance=3.5,
        max_count=4,
        max_batch=4,
        max_batch_cpu=2,
        kinds=frozenset({"txt2audio"}),
        media="audio",
        default_duration_s=10.24,
        max_duration_s=30.0,
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
    # Diffusion transformers over an SD-style VAE, at the pipelines' own defaults (PixArt: DPM-Solver++,
    # 20 steps, guidance 4.5; HunyuanDiT: DDPM, 50 steps, guidance 5). Sizes come in steps of 16 px (2x2
    # patches of the 8x latents): the adapter generates a size between steps at the next one and crops.
    "pixart-alpha": FamilyLimits(
        max_width=2048,
        max_height=2048,
        default_width=1024,
        default_height=1024,
        default_steps=20,
        default_guidance=4.5,
        max_count=4,
        max_batch=4,
        max_batch_cpu=2,
    ),
    "pixart-sigma": FamilyLimits(
        max_width=2048,
        max_height=2048,
        default_width=1024,
        default_height=1024,
        default_steps=20,
        default_guidance=4.5,
        max_count=4,
        max_batch=4,
        max_batch_cpu=2,
    ),
    "hunyuan-dit": FamilyLimits(
        max_width=2048,
        max_height=2048,
        default_width=1024,
        default_height=1024,
        default_steps=50,
        default_guidance=5.0,
        max_count=4,
        max_batch=4,
        max_batch_cpu=2,
    ),
    # The SD x4 upscaler: width and height are the input's (up to 512 px, a 2048 px output); the output
    # is 4x. 75 steps at guidance 9 are diffusers' defaults for it.
    "sd-upscaler": FamilyLimits(
        max_width=512,
        max_height=512,
        default_width=128,
        default_height=128,
        default_steps=75,
        default_guidance=9.0,
        max_count=4,
        max_batch=2,
        max_batch_cpu=1,
        kinds=frozenset({"upscale"}),
    ),
    # Stable Video Diffusion: 1024x576 clips of 14 frames (SVD-XT: 25, set in its catalog entry), 25
    # steps; guidance is the last frame's (it ramps up from 1 over the clip); fps conditions the motion.
    "svd": FamilyLimits(
        max_width=1024,
        max_height=1024,
        default_width=1024,
        default_height=576,
        default_steps=25,
        default_guidance=3.0,
        max_count=2,
        kinds=frozenset({"img2vid"}),
        media="video",
        default_frames=14,
        max_frames=25,
        default_fps=7,
    ),
    # AnimateDiff over SD 1.5: 16 frames at 512 px; its motion modules see at most 32 frames.
    "animatediff": FamilyLimits(
        max_width=1024,
        max_height=1024,
        default_width=512,
        default_height=512,
        default_steps=25,
        default_guidance=7.5,
        max_count=4,
        max_batch=2,
        max_batch_cpu=1,
        kinds=frozenset({"txt2vid"}),
        media="video",
        default_frames=16,
        max_frames=32,
        default_fps=8,
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
    "pixart-alpha": ("pixart_hunyuan", "PixArtAlphaFamily"),
    "pixart-sigma": ("pixart_hunyuan", "PixArtSigmaFamily"),
    "hunyuan-dit": ("pixart_hunyuan", "HunyuanDiTFamily"),
    "sd2": ("sd", "SD2Family"),
    "sd3": ("sd3_flux", "SD3Family"),
    "flux": ("sd3_flux", "FluxFamily"),
    "stable-audio": ("audio", "StableAudioFamily"),
    "audioldm2": ("audio", "AudioLDM2Family"),
    "noop": ("noop", "NoopFamily"),
    "sd-upscaler": ("upscale", "SDUpscalerFamily"),
    "svd": ("video", "SVDFamily"),
    "animatediff": ("video", "AnimateDiffFamily"),
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
