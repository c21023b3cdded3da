"""Tiny PixArt-α, PixArt-Σ and HunyuanDiT pipelines: diffusion transformers over an SD-style 4-channel VAE.

Each is the real diffusers pipeline class with its real component classes, shrunk (a few MB), and
written with ``save_pretrained``, so it loads through the same code as a real checkpoint.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path
from typing import Any

from atelier.tiny_models import _SEED, _t5_tokenizer, _vae

# 64 px images / the VAE's factor 8. No resolution-binning table exists for this sample size (PixArt
# has them for 32, 64, 128 and 256), so the adapter generates a tiny model's sizes as asked.
SAMPLE_SIZE = 8
_T5_WIDTH = 32
_BERT_WIDTH = 32
# The sequence lengths the pipelines pad prompts to: PixArt-α 120 and PixArt-Σ 300 T5 tokens;
# HunyuanDiT 77 BERT tokens and 256 mT5 tokens.
_PIXART_ALPHA_TOKENS = 120
_PIXART_SIGMA_TOKENS = 300
_HUNYUAN_BERT_TOKENS = 77
_HUNYUAN_T5_TOKENS = 256

# PixArt's training noise schedule (DiT's linear betas), with the DPM-Solver++ its checkpoints ship.
_PIXART_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "timestep_spacing": "linspace",
}
# HunyuanDiT's: scaled-linear betas to 0.03, v-prediction, DDPM.
_HUNYUAN_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.03,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def build_tiny_pixart_alpha(path: Path, *, sample_size: int = SAMPLE_SIZE) -> Path:
    """Write a tiny PixArt-α pipeline to ``path``.

    ``sample_size`` 32 (or 64, 128) gives a model with a resolution-binning table (256, 512, 1024 px),
    generating at the table's sizes as the real ones do.
    """
    from diffusers import PixArtAlphaPipeline

    return _build_pixart(PixArtAlphaPipeline, path, sample_size, _PIXART_ALPHA_TOKENS)


def build_tiny_pixart_sigma(path: Path, *, sample_size: int = SAMPLE_SIZE) -> Path:
    """Write a tiny PixArt-Σ pipeline to ``path``: PixArt-α's parts, longer prompts, no size conditioning."""
    from diffusers import PixArtSigmaPipeline

    return _build_pixart(PixArtSigmaPipeline, path, sample_size, _PIXART_SIGMA_TOKENS)


def build_tiny_hunyuan_dit(path: Path) -> Path:
    """Write a tiny HunyuanDiT pipeline (a BERT and an mT5 text encoder) to ``path``."""
    import torch
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

    heads, head_dim = 2, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        tokenizer = _bert_tokenizer(_HUNYUAN_BERT_TOKENS)
        tokenizer_2 = _t5_tokenizer(_HUNYUAN_T5_TOKENS)
        pipe = HunyuanDiTPipeline(
            vae=_vae(),
            text_encoder=_bert_encoder(tokenizer),
            tokenizer=tokenizer,
            text_encoder_2=_t5_encoder(tokenizer_2),
            tokenizer_2=tokenizer_2,
            transformer=HunyuanDiT2DModel(
                sample_size=SAMPLE_SIZE,
                patch_size=2,
                in_channels=4,
                num_layers=2,
                num_attention_heads=heads,
                attention_head_dim=head_dim,
                hidden_size=heads * head_dim,
                cross_attention_dim=_BERT_WIDTH,
                cross_attention_dim_t5=_T5_WIDTH,
                pooled_projection_dim=16,
                text_len=_HUNYUAN_BERT_TOKENS,
                text_len_t5=_HUNYUAN_T5_TOKENS,
                # v1.2's layout: no style or image-size conditioning.
                use_style_cond_and_image_meta_size=False,
            ).eval(),
            scheduler=DDPMScheduler(**_HUNYUAN_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def _build_pixart(pipeline_cls: type, path: Path, sample_size: int, tokens: int) -> Path:
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    heads, head_dim = 2, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        tokenizer = _t5_tokenizer(tokens)
        pipe = pipeline_cls(
            tokenizer=tokenizer,
            text_encoder=_t5_encoder(tokenizer),
            vae=_vae(),
            transformer=PixArtTransformer2DModel(
                sample_size=sample_size,
                patch_size=2,
                in_channels=4,
                out_channels=8,  # learned sigma, as the real ones: the pipeline keeps the first half
                num_layers=2,
                num_attention_heads=heads,
                attention_head_dim=head_dim,
                cross_attention_dim=heads * head_dim,
                caption_channels=_T5_WIDTH,
                # PixArt-α at 1024 px conditions on size and aspect ratio; this keeps a tiny model
                # cheap and the same for both pipelines.
                use_additional_conditions=False,
            ).eval(),
            scheduler=DPMSolverMultistepScheduler(**_PIXART_SCHEDULER),
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def _t5_encoder(tokenizer: Any) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_T5_WIDTH,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1 and mT5, as PixArt and HunyuanDiT use
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def _bert_encoder(tokenizer: Any) -> Any:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=_BERT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=_HUNYUAN_BERT_TOKENS,
        pad_token_id=tokenizer.pad_token_id,
    )
    return BertModel(config).eval()


def _bert_tokenizer(max_length: int) -> Any:
    """A WordPiece (BERT) tokenizer over lower-case letters, digits, a little punctuation and a few
    Chinese characters (HunyuanDiT reads both languages), from a vocab.txt as a real one is."""
    from transformers import BertTokenizer

    pieces = list(string.ascii_lowercase + string.digits)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *",.!?'-", *pieces, *("##" + p for p in pieces),
             *"一个宇航员在骑马猫狗山水花"]
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        return BertTokenizer.from_pretrained(scratch, model_max_length=max_length, do_lower_case=True)
