"""Tiny random-weight diffusion checkpoints for tests, benchmarks and demos.

The models are written with ``save_pretrained`` in diffusers' normal folder
layout, so they go through exactly the same loading code as a real checkpoint;
only the sizes are shrunk (a few MB, a 64 px image in well under a second on
a CPU). Weights are random but seeded, so every build of a model is identical.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Builtin model name -> family name (see atelier.families).
BUILTIN: dict[str, str] = {"tiny-sd": "sd1", "tiny-sdxl": "sdxl"}

# Written by save_pretrained; because a finished model is moved into place in a
# single rename, its presence means the folder is complete.
MARKER = "model_index.json"

# Builds seed torch's process-wide RNG, so two threads building at once would
# interleave their draws; processes are kept apart by the rename instead.
_build_lock = threading.Lock()

_SEED = 0
_MAX_LENGTH = 77  # CLIP's context length; the pipelines pad prompts to this
_TEXT_HIDDEN = 32

# SD1.5 / SDXL training noise schedule, so the schedulers behave like the real ones.
_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def ensure_builtin(name: str, cache_dir: Path) -> Path:
    """Return ``cache_dir / name``, building the builtin model there on first use.

    Safe to call from several processes at once: each builds into its own
    temporary folder beside the target and renames it into place; a loser of
    that race discards its copy and uses the winner's.
    """
    if name not in BUILTIN:
        raise KeyError(f"unknown builtin model {name!r}; known: {sorted(BUILTIN)}")
    cache_dir = Path(cache_dir)
    target = cache_dir / name
    if (target / MARKER).is_file():
        return target

    with _build_lock:
        if (target / MARKER).is_file():
            return target
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_dir))
        try:
            _BUILDERS[BUILTIN[name]](tmp)
            # mkdtemp makes the folder private (0o700); the cache may be shared.
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, target)
            except OSError:
                # Another process won the race (the target is a non-empty folder).
                if not (target / MARKER).is_file():
                    raise RuntimeError(
                        f"{target} exists but is not a complete model (no {MARKER}); delete it"
                    ) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_sd(path: Path, *, text_max_positions: int = _MAX_LENGTH) -> Path:
    """Write a tiny Stable Diffusion 1.x pipeline to ``path``.

    ``text_max_positions`` below 77 gives a deliberately broken model: it loads
    fine, but the text encoder fails inside the pipeline call, because the
    tokenizer still pads prompts to 77 tokens.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    # fork_rng: seed for reproducible weights without disturbing the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        tokenizer = _tokenizer()
        pipe = StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=_text_encoder(tokenizer, max_positions=text_max_positions),
            tokenizer=tokenizer,
            unet=_unet(cross_attention_dim=_TEXT_HIDDEN),
            scheduler=_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def build_tiny_sdxl(path: Path) -> Path:
    """Write a tiny Stable Diffusion XL pipeline (two text encoders) to ``path``."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    time_embed_dim = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        tokenizer = _tokenizer()
        tokenizer_2 = _tokenizer()
        pipe = StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=_text_encoder(tokenizer),
            text_encoder_2=_text_encoder(tokenizer_2, projection_dim=_TEXT_HIDDEN),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            # SDXL concatenates both encoders' hidden states for cross-attention,
            # and conditions on the pooled projection plus six size/crop numbers,
            # each embedded with time_embed_dim channels.
            unet=_unet(
                cross_attention_dim=2 * _TEXT_HIDDEN,
                addition_embed_type="text_time",
                addition_time_embed_dim=time_embed_dim,
                projection_class_embeddings_input_dim=_TEXT_HIDDEN + 6 * time_embed_dim,
            ),
            scheduler=_scheduler(),
            add_watermarker=False,
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


_BUILDERS: dict[str, Callable[[Path], Path]] = {"sd1": build_tiny_sd, "sdxl": build_tiny_sdxl}


def _unet(*, cross_attention_dim: int, **extra: Any) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,  # 64 px / VAE factor 8
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        cross_attention_dim=cross_attention_dim,
        **extra,
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    # Four blocks give the real 8x spatial factor (three downsamplings), so
    # latent sizes, previews and size limits behave as with a real checkpoint.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def _scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    # Euler runs exactly num_inference_steps UNet steps (PNDM would run one
    # extra), so step callbacks count 1..steps.
    return EulerDiscreteScheduler(**_SCHEDULER_CONFIG)


def _text_encoder(tokenizer: Any, *, max_positions: int = _MAX_LENGTH, projection_dim: int | None = None) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        # The pooled output is read at the EOS position, so the ids must match
        # this tokenizer rather than CLIP's 49k vocabulary.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **({"projection_dim": projection_dim} if projection_dim else {}),
    )
    model_cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return model_cls(config).eval()


def _tokenizer() -> Any:
    """A CLIP tokenizer over single bytes: no merges, so every byte is a token.

    Built from vocab.json / merges.txt files, as a real CLIP tokenizer is.
    """
    from transformers import CLIPTokenizer

    chars = _byte_level_chars()
    # CLIP's BPE marks the last symbol of each word with "</w>".
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "vocab.json").write_text(
            json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8"
        )
        (Path(scratch) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(scratch, model_max_length=_MAX_LENGTH)


def _byte_level_chars() -> list[str]:
    """The 256 printable characters GPT-2 style byte-level BPE uses for bytes 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = []
    extra = 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars
