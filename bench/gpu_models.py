"""Random-weight models at the real shapes, for the GPU check's speed figures (no download).

SDXL (UNet, both text towers and VAE at SDXL's sizes), a FLUX.1-dev-shaped model (the transformer at
its real width, 3072, with 2 double-stream and 4 single-stream blocks instead of 19 and 38; T5 at
its real width, 4096, with 2 layers instead of 24; CLIP-L; FLUX's 16-channel VAE) and an
SD-Turbo-shaped one (SD 2.1's UNet and OpenCLIP-H text tower). ``toy`` shrinks every width and depth
so that ``gpu_check --dry`` runs the same code on a CPU. Built where torch's default device is (the
GPU on the lent machine: random init there takes seconds), in float16, saved once.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from atelier.tiny_models import _SCHEDULER_CONFIG, _scheduler, _t5_tokenizer, _tokenizer

# FLUX.1-dev has 19 double-stream and 38 single-stream blocks; at its width, fewer keep the build and
# the save within the check's minutes while every kind of block still runs.
FLUX_DOUBLE_BLOCKS = 2
FLUX_SINGLE_BLOCKS = 4


@contextlib.contextmanager
def _building(device: str):
    import torch

    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16 if device != "cpu" else torch.float32)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), torch.device(device):
            torch.manual_seed(0)
            yield
    finally:
        torch.set_default_dtype(dtype)


def _clip(tokenizer, *, width: int, layers: int, heads: int, act: str, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 4,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            hidden_act=act, projection_dim=projection or width,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(toy: bool, latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    sixteen = {"use_quant_conv": False, "use_post_quant_conv": False} if latent_channels == 16 else {}
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(16, 16, 32, 32) if toy else (128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1 if toy else 2, norm_num_groups=8 if toy else 32, **sixteen,
                         **extra).eval()


def build_sdxl(path: Path, *, device: str = "cpu", toy: bool = False) -> Path:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    with _building(device):
        tokenizer, tokenizer_2 = _tokenizer(), _tokenizer()
        first, second = (32, 48) if toy else (768, 1280)
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=1 if toy else 2,
            block_out_channels=(32, 64, 64) if toy else (320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 1) if toy else (1, 2, 10),
            attention_head_dim=(2, 4, 4) if toy else (5, 10, 20), cross_attention_dim=first + second,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8 if toy else 256,
            projection_class_embeddings_input_dim=second + 6 * (8 if toy else 256), norm_num_groups=8 if toy else 32)
        pipe = StableDiffusionXLPipeline(
            vae=_vae(toy, scaling_factor=0.13025, force_upcast=True),
            text_encoder=_clip(tokenizer, width=first, layers=2 if toy else 12, heads=4 if toy else 12,
                               act="quick_gelu"),
            text_encoder_2=_clip(tokenizer_2, width=second, layers=2 if toy else 32, heads=4 if toy else 20,
                                 act="gelu", projection=second),
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet.eval(), scheduler=_scheduler(),
            add_watermarker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_flux_shaped(path: Path, *, device: str = "cpu", toy: bool = False) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    with _building(device):
        tokenizer, tokenizer_2 = _tokenizer(), _t5_tokenizer()
        t5_width, clip_width = (64, 32) if toy else (4096, 768)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=FLUX_DOUBLE_BLOCKS, num_single_layers=FLUX_SINGLE_BLOCKS,
            attention_head_dim=16 if toy else 128, num_attention_heads=2 if toy else 24,
            joint_attention_dim=t5_width, pooled_projection_dim=clip_width, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6) if toy else (16, 56, 56))
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=t5_width, d_kv=8 if toy else 64, d_ff=64 if toy else 10240,
            num_layers=2, num_heads=4 if toy else 64, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
            pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id)).eval()
        pipe = FluxPipeline(
            transformer=transformer.eval(),
            scheduler=FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15),
            vae=_vae(toy, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
            text_encoder=_clip(tokenizer, width=clip_width, layers=2 if toy else 12, heads=4 if toy else 12,
                               act="quick_gelu"),
            tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_sd_turbo_shaped(path: Path, *, device: str = "cpu", toy: bool = False) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    with _building(device):
        tokenizer = _tokenizer()
        width = 48 if toy else 1024
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=1 if toy else 2,
            block_out_channels=(32, 64, 64, 64) if toy else (320, 640, 1280, 1280),
            attention_head_dim=(2, 4, 4, 4) if toy else (5, 10, 20, 20), cross_attention_dim=width,
            use_linear_projection=True, norm_num_groups=8 if toy else 32,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
        pipe = StableDiffusionPipeline(
            vae=_vae(toy), text_encoder=_clip(tokenizer, width=width, layers=2 if toy else 23,
                                              heads=4 if toy else 16, act="gelu"),
            tokenizer=tokenizer, unet=unet.eval(),
            scheduler=EulerDiscreteScheduler(**{**_SCHEDULER_CONFIG, "timestep_spacing": "trailing"}),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
