"""Cheap in-progress previews: project latents straight to RGB, skipping the VAE.

Each latent channel contributes linearly to R, G and B; the published factor
matrices below are least-squares fits of the VAE decoder's average colour
response. That is blurry and slightly off in colour, but it costs a few small
tensor ops instead of a VAE decode, so it can run after every step.

torch is imported inside the function so that encode_jpeg (and this module)
stay usable from torch-free processes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

# Latents are 1/8 of the image size; previews never exceed that resolution,
# and never this many pixels on the longest side.
MAX_PREVIEW_SIDE = 256
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


def latents_to_rgb(latents: torch.Tensor, proj: LatentRGB, *, max_side: int = MAX_PREVIEW_SIDE) -> np.ndarray:
    """uint8 HxWx3 preview of the first image in a (B, C, h, w) or (C, h, w) latent batch.

    The longest side becomes min(max_side, 8 * longest latent side), i.e. the
    final image size when that fits. Works on the latents' own device, so only
    the small finished preview is copied to the host.
    """
    import torch
    import torch.nn.functional as F

    lat = latents[0] if latents.ndim == 4 else latents
    if lat.ndim != 3 or lat.shape[0] != len(proj.matrix):
        raise ValueError(f"expected {len(proj.matrix)} latent channels, got shape {tuple(latents.shape)}")

    with torch.no_grad():
        lat = lat.detach().float()
        matrix = torch.tensor(proj.matrix, dtype=torch.float32, device=lat.device)
        bias = torch.tensor(proj.bias, dtype=torch.float32, device=lat.device)
        rgb = torch.einsum("chw,cr->rhw", lat, matrix) + bias[:, None, None]

        h, w = rgb.shape[1:]
        longest = max(h, w)
        target = min(max_side, _LATENT_SCALE * longest)
        size = (max(1, round(h * target / longest)), max(1, round(w * target / longest)))
        if size != (h, w):
            # antialias only matters when shrinking (huge latents); harmless otherwise.
            rgb = F.interpolate(rgb[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]

        rgb = ((rgb + 1.0) * 127.5).clamp_(0.0, 255.0).round_().to(torch.uint8)
        return rgb.permute(1, 2, 0).contiguous().cpu().numpy()


def encode_jpeg(rgb: np.ndarray, quality: int = 80) -> bytes:
    """JPEG bytes for a uint8 HxWx3 array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
