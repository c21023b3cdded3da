"""Tiny models of the families that start from an image or make video: the SD x4 upscaler, Stable
Video Diffusion and AnimateDiff.

Each is the real diffusers pipeline class with shrunken configs, seeded, and saved with
``save_pretrained``, so it loads exactly as a real checkpoint does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atelier.tiny_models import _SEED, _TEXT_HIDDEN, _text_encoder, _tokenizer, _unet, _vae

# The x4 upscaler's two noise schedules, as in stabilityai/stable-diffusion-x4-upscaler: the one the
# low-resolution image is noised with (its noise level is a class label of the UNet), and the
# v-prediction one it denoises with.
_LOW_RES_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "scaled_linear",
    "clip_sample": False, "variance_type": "fixed_small",
}
_UPSCALER_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}
# stabilityai/stable-video-diffusion-img2vid's: continuous-time Karras sigmas, v-prediction.
_SVD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction", "interpolation_type": "linear", "use_karras_sigmas": True,
    "sigma_min": 0.002, "sigma_max": 700.0, "timestep_type": "continuous", "steps_offset": 1,
    "timestep_spacing": "leading",
}
# What AnimateDiff's model cards recommend with the v1.5 motion adapters.
_ANIMATEDIFF_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear",
    "clip_sample": False, "timestep_spacing": "linspace", "steps_offset": 1,
}
# SVD conditions on fps, a motion bucket and the noise strength, each embedded with this many channels.
_SVD_TIME_EMBED = 8
# Motion modules attend over at most this many frames (as the real v1.5 adapters).
ANIMATEDIFF_MAX_FRAMES = 32


def build_tiny_sd_upscaler(path: Path) -> Path:
    """Write a tiny SD x4 upscaler: a UNet over the latents and the noised low-resolution image
    (4 + 3 channels), and a VAE with the real one's 4x factor, so the output is 4x the input."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        tokenizer = _tokenizer()
        pipe = StableDiffusionUpscalePipeline(
            vae=AutoencoderKL(
                in_channels=3, out_channels=3, block_out_channels=(16, 16, 32),
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=128,
                scaling_factor=0.08333,  # the upscaler's own (the pipeline warns about any other)
            ),
            text_encoder=_text_encoder(tokenizer),
            tokenizer=tokenizer,
            unet=UNet2DConditionModel(
                sample_size=32, in_channels=7, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), norm_num_groups=32,
                cross_attention_dim=_TEXT_HIDDEN,
                num_class_embeds=1000,  # the noise level added to the low-resolution image
            ),
            low_res_scheduler=DDPMScheduler(**_LOW_RES_SCHEDULER_CONFIG),
            scheduler=DDIMScheduler(**_UPSCALER_SCHEDULER_CONFIG),
            max_noise_level=350,
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def build_tiny_svd(path: Path) -> Path:
    """Write a tiny Stable Video Diffusion (image to video) pipeline: a spatio-temporal UNet over the
    noisy frames and the image's latents (4 + 4 channels), conditioned on a CLIP image embedding, and
    a VAE whose decoder mixes frames in time."""
    import torch
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        pipe = StableVideoDiffusionPipeline(
            vae=AutoencoderKLTemporalDecoder(
                block_out_channels=(32, 32, 32, 32),  # four blocks: the real 8x factor
                down_block_types=("DownEncoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                sample_size=64,
            ),
            # The pipeline always shows the encoder the image at 224 px, so its size stays the real one.
            image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=_TEXT_HIDDEN, projection_dim=_TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, image_size=224, patch_size=32)).eval(),
            unet=UNetSpatioTemporalConditionModel(
                sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
                num_attention_heads=(2, 4), cross_attention_dim=_TEXT_HIDDEN,
                addition_time_embed_dim=_SVD_TIME_EMBED, projection_class_embeddings_input_dim=3 * _SVD_TIME_EMBED,
                num_frames=4,
            ),
            scheduler=EulerDiscreteScheduler(**_SVD_SCHEDULER_CONFIG),
            feature_extractor=CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}),
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def build_tiny_animatediff(path: Path) -> Path:
    """Write a tiny AnimateDiff (text to video) pipeline: an SD 1.5-shaped UNet with a motion adapter.

    The pipeline merges the adapter into the UNet (a UNetMotionModel) and saves both: the ``unet``
    folder holds the merged model, ``motion_adapter`` the adapter alone (which, with any SD 1.5
    folder of the same shape, makes another AnimateDiff model).
    """
    import torch
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        tokenizer = _tokenizer()
        pipe = AnimateDiffPipeline(
            vae=_vae(),
            text_encoder=_text_encoder(tokenizer),
            tokenizer=tokenizer,
            unet=_unet(cross_attention_dim=_TEXT_HIDDEN),
            motion_adapter=MotionAdapter(
                block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                motion_norm_num_groups=32, motion_max_seq_length=ANIMATEDIFF_MAX_FRAMES, use_motion_mid_block=False,
            ),
            scheduler=DDIMScheduler(**_ANIMATEDIFF_SCHEDULER_CONFIG),
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)
