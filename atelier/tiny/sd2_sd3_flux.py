"""Tiny SD 2.x, SD 3.x and FLUX.1 pipelines: the real diffusers classes with shrunken configs.

Each keeps what tells its family apart from SD 1.5 (SD 2's v-prediction and OpenCLIP-style text
encoder; SD3's three text encoders and 16-channel latents under an MMDiT; FLUX's CLIP + T5,
guidance embedding and 2x2-packed latents) so that the adapters meet the same shapes and code
paths as with a real checkpoint. Seeded like every builtin model: every build is identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atelier.tiny_models import _SCHEDULER_CONFIG, _SEED, _TEXT_HIDDEN, _t5_tokenizer, _text_encoder, _tokenizer, _unet

# SD3's CLIP-G is wider than its CLIP-L (1280 and 768), and their hidden states side by side must
# fit in T5's width (4096), which is the transformer's context width.
_CLIP_G_HIDDEN = 48
_T5_HIDDEN = 96


def build_tiny_sd2(path: Path) -> Path:
    """A tiny SD 2.x-shaped pipeline: v-prediction, an OpenCLIP-style text encoder (GELU, as
    SD 2's OpenCLIP ViT-H), linear projections in the UNet's transformer blocks."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    width = 48  # another width than tiny-sd's, as SD 2's 1024 is not SD 1's 768
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        tokenizer = _tokenizer()
        pipe = StableDiffusionPipeline(
            vae=_vae(latent_channels=4),
            text_encoder=_clip_text_encoder(tokenizer, width=width, hidden_act="gelu"),
            tokenizer=tokenizer,
            unet=_unet(cross_attention_dim=width, use_linear_projection=True, upcast_attention=True),
            scheduler=EulerDiscreteScheduler(**{**_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def build_tiny_sd3(path: Path) -> Path:
    """A tiny SD 3.x pipeline: CLIP-L and CLIP-G (with projections: their pooled outputs condition
    the transformer) and T5, an SD3 transformer with patch size 2, a 16-channel VAE."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    heads, head_dim = 4, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        tokenizer, tokenizer_2, tokenizer_3 = _tokenizer(), _tokenizer(), _t5_tokenizer()
        transformer = SD3Transformer2DModel(
            sample_size=8,  # the default size: 64 px
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=_T5_HIDDEN,
            caption_projection_dim=heads * head_dim,
            pooled_projection_dim=_TEXT_HIDDEN + _CLIP_G_HIDDEN,
            pos_embed_max_size=32,  # positions for 512 px: 512 / 8 / 2
        )
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            vae=_vae(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
            text_encoder=_text_encoder(tokenizer, projection_dim=_TEXT_HIDDEN),
            tokenizer=tokenizer,
            text_encoder_2=_text_encoder(tokenizer_2, width=_CLIP_G_HIDDEN, projection_dim=_CLIP_G_HIDDEN),
            tokenizer_2=tokenizer_2,
            text_encoder_3=_t5_encoder(tokenizer_3, width=_T5_HIDDEN),
            tokenizer_3=tokenizer_3,
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def build_tiny_flux(path: Path) -> Path:
    """A tiny FLUX.1-dev-shaped pipeline: CLIP (pooled) and T5, a FLUX transformer with the
    distilled guidance embedding (dev; schnell has none), a 16-channel VAE, dynamic shifting."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    t5_width = 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        tokenizer, tokenizer_2 = _tokenizer(), _t5_tokenizer()
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels, packed 2x2
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5_width,
            pooled_projection_dim=_TEXT_HIDDEN,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )
        pipe = FluxPipeline(
            transformer=transformer,
            # FLUX.1-dev's: the shift grows with the image's token count
            scheduler=FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15),
            vae=_vae(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
            text_encoder=_text_encoder(tokenizer),
            tokenizer=tokenizer,
            text_encoder_2=_t5_encoder(tokenizer_2, width=t5_width),
            tokenizer_2=tokenizer_2,
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def _vae(*, latent_channels: int, **extra: Any) -> Any:
    from diffusers import AutoencoderKL

    # As tiny_models' VAE (the real 8x factor), with SD3's and FLUX's 16 channels, and without
    # the 1x1 quant convolutions, which their VAEs do not have.
    sixteen = {"use_quant_conv": False, "use_post_quant_conv": False} if latent_channels == 16 else {}
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        **sixteen,
        **extra,
    )


def _clip_text_encoder(tokenizer: Any, *, width: int, hidden_act: str) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()


def _t5_encoder(tokenizer: Any, *, width: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1 (what SD3 and FLUX use): gated GELU feed-forward, untied output.
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id)).eval()
