"""Tiny random-weight sound models: Stable Audio Open ("stable-audio") and AudioLDM 2 ("audioldm2").

Each is the real diffusers pipeline class with every width shrunk, saved with ``save_pretrained``;
the rates and layouts a user sees (44.1 kHz stereo, the VAE's hop, the scheduler) are the real
model's, so durations and sample rates behave as with the real checkpoint, only shorter.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from atelier.tiny_models import _MAX_LENGTH, _SEED, _byte_level_chars, _t5_tokenizer

# Stable Audio Open 1.0 makes 1024 latents of 2048 samples at 44.1 kHz (47.55 s); the tiny one keeps
# the rate and channels, with a hop of 256 and 345 latents: 2.003 s at most.
STABLE_AUDIO_RATE = 44_100
STABLE_AUDIO_HOP = (2, 4, 4, 8)
STABLE_AUDIO_LATENTS = 345
_T5_MAX_LENGTH = 128  # the real model's tokenizer
_T5_WIDTH = 32
_CONDITIONING = 16
_LATENT_CHANNELS = 8


def build_tiny_stable_audio(path: Path) -> Path:
    """Write a tiny Stable Audio Open pipeline (T5, the seconds projection, a DiT, the Oobleck VAE) to ``path``."""
    import torch
    from diffusers import (
        AutoencoderOobleck,
        CosineDPMSolverMultistepScheduler,
        StableAudioDiTModel,
        StableAudioPipeline,
        StableAudioProjectionModel,
    )
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        tokenizer = _t5_tokenizer(_T5_MAX_LENGTH)
        text_encoder = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer), d_model=_T5_WIDTH, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id)).eval()
        # The seconds conditioners span 0..512 s, as the real model's do: they only scale its input.
        projection = StableAudioProjectionModel(text_encoder_dim=_T5_WIDTH, conditioning_dim=_CONDITIONING,
                                                min_value=0, max_value=512)
        transformer = StableAudioDiTModel(
            sample_size=STABLE_AUDIO_LATENTS, in_channels=_LATENT_CHANNELS, out_channels=_LATENT_CHANNELS,
            num_layers=2, attention_head_dim=8, num_attention_heads=2, num_key_value_attention_heads=1,
            cross_attention_dim=16, time_proj_dim=16,
            # the start and end seconds' embeddings side by side, and the text's width
            global_states_input_dim=2 * _CONDITIONING, cross_attention_input_dim=_CONDITIONING)
        vae = AutoencoderOobleck(
            encoder_hidden_size=4, downsampling_ratios=list(STABLE_AUDIO_HOP), channel_multiples=[1, 2, 2, 2],
            decoder_channels=4, decoder_input_channels=_LATENT_CHANNELS, audio_channels=2,
            sampling_rate=STABLE_AUDIO_RATE)
        # Stable Audio Open's own scheduler settings.
        scheduler = CosineDPMSolverMultistepScheduler(
            sigma_min=0.3, sigma_max=500, solver_order=2, prediction_type="v_prediction", sigma_data=1.0,
            sigma_schedule="exponential")
        pipe = StableAudioPipeline(vae=vae, text_encoder=text_encoder, projection_model=projection,
                                   tokenizer=tokenizer, transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


# AudioLDM 2 makes 16 kHz mono through a HiFi-GAN vocoder from 64-bin mel frames, 100 a second; its
# VAE halves the frames twice. The tiny one keeps those, with every network narrowed.
AUDIOLDM2_RATE = 16_000
AUDIOLDM2_MEL_BINS = 64
_CLAP_WIDTH = 16
_GPT2_WIDTH = 16
_AUDIOLDM2_LATENT_CHANNELS = 8


def build_tiny_audioldm2(path: Path) -> Path:
    """Write a tiny AudioLDM 2 pipeline (CLAP and T5 text encoders, the GPT-2 that joins them, a UNet,
    a mel VAE and a HiFi-GAN vocoder) to ``path``."""
    import torch
    from diffusers import (
        AudioLDM2Pipeline,
        AudioLDM2ProjectionModel,
        AudioLDM2UNet2DConditionModel,
        AutoencoderKL,
        DDIMScheduler,
    )
    from transformers import (
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        GPT2Config,
        GPT2LMHeadModel,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
        T5Config,
        T5EncoderModel,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        tokenizer = _roberta_tokenizer()
        # CLAP's audio half only ranks several sounds of one prompt, which atelier never asks for;
        # it is there, tiny, because the pipeline's model has one.
        clap = ClapModel(ClapConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=_CLAP_WIDTH, intermediate_size=37,
                             num_attention_heads=2, num_hidden_layers=2, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             max_position_embeddings=_MAX_LENGTH + 3),  # RoBERTa's positions start after padding
            audio_config=dict(spec_size=64, window_size=4, num_mel_bins=64, intermediate_size=37, depths=[1, 1],
                              num_attention_heads=[2, 2], num_hidden_layers=2, hidden_size=32, patch_size=2,
                              patch_stride=2, patch_embed_input_channels=4),
            projection_dim=_CLAP_WIDTH)).eval()
        tokenizer_2 = _t5_tokenizer(_MAX_LENGTH)
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=_T5_WIDTH, d_ff=37, d_kv=8, num_heads=2, num_layers=2,
            pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id)).eval()
        # GPT2LMHeadModel, not GPT2Model: the pipeline drives it with transformers' generation helpers.
        language_model = GPT2LMHeadModel(GPT2Config(n_embd=_GPT2_WIDTH, n_head=2, n_layer=2, vocab_size=8,
                                                    n_positions=128)).eval()
        language_model.config.max_new_tokens = 8  # AudioLDM 2's own
        projection = AudioLDM2ProjectionModel(text_encoder_dim=_CLAP_WIDTH, text_encoder_1_dim=_T5_WIDTH,
                                              langauge_model_dim=_GPT2_WIDTH)
        unet = AudioLDM2UNet2DConditionModel(
            sample_size=64, in_channels=_AUDIOLDM2_LATENT_CHANNELS, out_channels=_AUDIOLDM2_LATENT_CHANNELS,
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            # per block: self-attention, then attention to GPT-2's and to T5's states
            cross_attention_dim=([None, _GPT2_WIDTH, _T5_WIDTH], [None, _GPT2_WIDTH, _T5_WIDTH]))
        vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=_AUDIOLDM2_LATENT_CHANNELS,
                            block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                            up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8)
        # 160 samples a frame, as AudioLDM 2's; the wider initialisation makes audible noise, not silence.
        vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
            model_in_dim=AUDIOLDM2_MEL_BINS, sampling_rate=AUDIOLDM2_RATE, upsample_initial_channel=32,
            upsample_rates=[5, 4, 2, 2, 2], upsample_kernel_sizes=[10, 8, 4, 4, 4], resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3]], normalize_before=False, initializer_range=0.2)).eval()
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                                  beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                  steps_offset=1)
        pipe = AudioLDM2Pipeline(vae=vae, text_encoder=clap, text_encoder_2=t5, projection_model=projection,
                                 language_model=language_model, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                 feature_extractor=ClapFeatureExtractor(), unet=unet, scheduler=scheduler,
                                 vocoder=vocoder)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def _roberta_tokenizer() -> Any:
    """A RoBERTa (CLAP) tokenizer over single bytes: GPT-2's byte-level BPE without merges, built from
    vocab.json and merges.txt as a real one is."""
    from transformers import RobertaTokenizer

    tokens = ["<s>", "<pad>", "</s>", "<unk>", *_byte_level_chars(), "<mask>"]
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "vocab.json").write_text(
            json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
        (Path(scratch) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return RobertaTokenizer.from_pretrained(scratch, model_max_length=_MAX_LENGTH)
