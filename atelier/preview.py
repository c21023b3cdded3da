"""Cheap in-progress previews: project latents straight to RGB, skipping the VAE.

Each latent channel contributes linearly to R, G and B; the published factor
matrices below are least-squares fits of the VAE decoder's average colour
response. That is blurry and slightly off in colour, but it costs a few small
tensor ops instead of a VAE decode, so it can run after every step.

A model with a ``preview_decoder`` in its catalog entry (a TAESD, diffusers'
AutoencoderTiny) is previewed by ``DecoderPreview`` instead: a real, if tiny,
decoder, sharp and in the right colours, for a few convolutions more.

torch is imported inside the functions so that encode_jpeg (and this module)
stay usable from torch-free processes.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

# Latents are 1/8 of the image size; previews never exceed that resolution,
# and never this many pixels on the longest side.
MAX_PREVIEW_SIDE = 256
# A preview decoder on a CPU decodes at most this many pixels on the longest side (latents are shrunk
# to fit): a decode costs with its area, about 0.2 s at 128 px on one core, 0.8 s at 256 px.
CPU_DECODE_SIDE = 128
_LATENT_SCALE = 8


@dataclass(frozen=True)
class LatentRGB:
    """Latent channel -> RGB projection: rgb = latent @ matrix + bias, in about [-1, 1]."""

    matrix: tuple[tuple[float, float, float], ...]  # one row per latent channel
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)


SD15_LATENT_RGB = LatentRGB(
    matrix=(
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ),
)

SDXL_LATENT_RGB = LatentRGB(
    matrix=(
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    bias=(0.1084, -0.0175, -0.0011),
)


# SD3's and FLUX's 16-channel latent spaces, as ComfyUI publishes them (comfy/latent_formats.py),
# in the same scaled-and-shifted space the pipelines step in.
SD3_LATENT_RGB = LatentRGB(
    matrix=(
        (-0.0922, -0.0175, 0.0749),
        (0.0311, 0.0633, 0.0954),
        (0.1994, 0.0927, 0.0458),
        (0.0856, 0.0339, 0.0902),
        (0.0587, 0.0272, -0.0496),
        (-0.0006, 0.1104, 0.0309),
        (0.0978, 0.0306, 0.0427),
        (-0.0042, 0.1038, 0.1358),
        (-0.0194, 0.0020, 0.0669),
        (-0.0488, 0.0130, -0.0268),
        (0.0922, 0.0988, 0.0951),
        (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895),
        (-0.0069, -0.0030, -0.0810),
        (-0.0596, -0.0465, -0.0293),
        (-0.1448, -0.1463, -0.1189),
    ),
    bias=(0.2394, 0.2135, 0.1925),
)

FLUX_LATENT_RGB = LatentRGB(
    matrix=(
        (-0.0346, 0.0244, 0.0681),
        (0.0034, 0.0210, 0.0687),
        (0.0275, -0.0668, -0.0433),
        (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329),
        (0.0004, 0.0383, 0.0115),
        (0.0405, 0.0861, 0.0915),
        (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180),
        (0.1008, 0.0755, -0.0421),
        (-0.0515, 0.0201, 0.0011),
        (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749),
        (-0.1264, -0.0522, -0.1103),
        (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    ),
    bias=(-0.0329, -0.0718, -0.0851),
)


def latents_to_rgb(latents: torch.Tensor, proj: LatentRGB, *, max_side: int = MAX_PREVIEW_SIDE) -> np.ndarray:
    """uint8 HxWx3 preview of the first image in a (B, C, h, w) or (C, h, w) latent batch.

    The longest side becomes min(max_side, 8 * longest latent side), i.e. the
    final image size when that fits. The projection runs on the latents' own
    device, at their size; only that small picture is copied to the host, where
    PIL scales it (one C call on one core, where torch would spread a 256 px
    interpolation over every core, and contend with the denoiser for them).
    """
    import torch

    lat = latents[0] if latents.ndim == 4 else latents
    if lat.ndim != 3 or lat.shape[0] != len(proj.matrix):
        raise ValueError(f"expected {len(proj.matrix)} latent channels, got shape {tuple(latents.shape)}")

    with torch.no_grad():
        lat = lat.detach().float()
        matrix = torch.tensor(proj.matrix, dtype=torch.float32, device=lat.device)
        bias = torch.tensor(proj.bias, dtype=torch.float32, device=lat.device)
        rgb = torch.einsum("chw,cr->hwr", lat, matrix) + bias
        rgb = _to_uint8(rgb)
    h, w = rgb.shape[:2]
    longest = max(h, w)
    target = min(max_side, _LATENT_SCALE * longest)
    return _resized(rgb, (max(1, round(h * target / longest)), max(1, round(w * target / longest))))


def _to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """HxWx3 in about [-1, 1], on any device -> uint8 on the host."""
    import torch

    return ((rgb + 1.0) * 127.5).clamp_(0.0, 255.0).round_().to(torch.uint8).contiguous().cpu().numpy()


def _resized(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``rgb`` at (height, width) ``size``: bilinear, antialiased when shrinking (PIL's own resampling)."""
    if rgb.shape[:2] == size:
        return rgb
    return np.array(Image.fromarray(rgb).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def use_one_cpu_thread() -> None:
    """Runs torch's CPU work in the calling thread (the runner's preview thread) on that thread alone.

    A preview's small ops spread over every core cost several times more than on one, and an OpenMP
    team of the denoiser's that loses a core to them waits at every barrier. OpenMP's thread count is
    per thread, so the denoising thread keeps its own (torch also starts threads that first use it
    later with this count; a runner has none: its worker loaded a model before any preview).
    Torch-free where torch is not loaded (the noop family).
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


class DecoderPreview:
    """Previews a model's step latents with its tiny decoder (TAESD), in place of its family's projection.

    It stands where the runner's preview thread would call ``family.preview``; the decoder sits on
    the model's device. On a CPU, latents are shrunk (averaged) to ``CPU_DECODE_SIDE`` before decoding:
    a decode costs with its output's area, and a full-size one (1024 px: about 13 s on one core) would
    take the cores from the denoising. A GPU decodes them whole (milliseconds), then shrinks the
    picture to ``MAX_PREVIEW_SIDE``, which keeps the detail.
    """

    def __init__(self, decoder: Any, *, max_latent_side: int | None = None,
                 pick: Callable[[torch.Tensor, int], torch.Tensor] | None = None):
        self.decoder = decoder
        self.max_latent_side = max_latent_side
        # Which (C, h, w) latents show image ``index``: a video's family picks a frame.
        self.pick = pick or (lambda latents, index: latents[index])

    def preview(self, latents: torch.Tensor, index: int = 0) -> np.ndarray:
        return decode_to_rgb(self.decoder, self.pick(latents, index), max_latent_side=self.max_latent_side)


def decode_to_rgb(decoder: Any, latents: torch.Tensor, *, max_latent_side: int | None = None,
                  max_side: int = MAX_PREVIEW_SIDE) -> np.ndarray:
    """uint8 HxWx3: one image's (C, h, w) latents, in the space the pipeline steps in, through ``decoder``
    (an AutoencoderTiny), its longest side at most ``max_side``."""
    import torch
    import torch.nn.functional as F

    config = decoder.config
    if latents.ndim != 3 or latents.shape[0] != config.latent_channels:
        raise ValueError(f"expected {config.latent_channels} latent channels, got shape {tuple(latents.shape)}")
    with torch.no_grad():
        lat = latents.detach()[None].to(decoder.device, torch.float32)
        # What a pipeline hands its VAE: unscaled and unshifted by the VAE's own factors (1 and 0 for
        # TAESD, whose decoders read the diffusion model's latent space as it is).
        lat = lat / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        longest = max(lat.shape[-2:])
        if max_latent_side is not None and longest > max_latent_side:
            size = tuple(max(1, round(n * max_latent_side / longest)) for n in lat.shape[-2:])
            lat = F.interpolate(lat, size=size, mode="area")
        rgb = _to_uint8(decoder.decode(lat.to(decoder.dtype)).sample[0].float().permute(1, 2, 0))
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    return _resized(rgb, (max(1, round(h * scale)), max(1, round(w * scale))))


def encode_jpeg(rgb: np.ndarray, quality: int = 80) -> bytes:
    """JPEG bytes for a uint8 HxWx3 array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
