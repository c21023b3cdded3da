"""A tiny random-weight TAESD (diffusers' AutoencoderTiny), saved as the real ones are, for previews in tests.

Real TAESDs (madebyollin/taesd, taesdxl, taesd3, taef1) have 64 channels per block and three blocks a
stage; this one has the same layout (three 2x upsamplings: the VAE's 8x) at a fraction of the width,
so it decodes a preview in milliseconds on a CPU. Random weights draw noise, not the image: tests
compare a preview with the decoder's own output, not with the picture.
"""

from __future__ import annotations

from pathlib import Path

_SEED = 0


def build_tiny_taesd(path: Path, *, latent_channels: int = 4, seed: int = _SEED, full_size: bool = False) -> Path:
    """Writes a tiny AutoencoderTiny for ``latent_channels``-channel latents (4: SD 1/2/XL, 16: SD3/FLUX).

    ``full_size``: a real TAESD's widths and depths (diffusers' defaults), random weights: what a real
    one costs, for benchmarks.
    """
    import torch
    from diffusers import AutoencoderTiny

    narrow = (8, 8, 8, 8)
    small = {} if full_size else {"encoder_block_out_channels": narrow, "decoder_block_out_channels": narrow,
                                  "num_encoder_blocks": (1, 1, 1, 1), "num_decoder_blocks": (1, 1, 1, 1)}
    with torch.random.fork_rng(devices=[]):  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = AutoencoderTiny(latent_channels=latent_channels, **small)
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)
