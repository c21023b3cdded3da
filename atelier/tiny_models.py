"""Tiny random-weight diffusion checkpoints for tests, benchmarks and demos.

The models are written with ``save_pretrained`` in diffusers' normal folder
layout, so they go through exactly the same loading code as a real checkpoint;
only the sizes are shrunk (a few MB, a 64 px image in well under a second on
a CPU). Weights are random but seeded, so every build of a model is identical.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from atelier.registry import FAMILIES

# Builtin model name -> its family, and -> the "module:function" that writes it (atelier/registry.py)
# or, in tests, the function itself.
BUILTIN: dict[str, str] = {spec.tiny_model: name for name, spec in FAMILIES.items() if spec.tiny_model}
_BUILDERS: dict[str, Any] = {spec.tiny_model: spec.tiny_builder for spec in FAMILIES.values() if spec.tiny_model}

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
            _builder(name)(tmp)
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


def build_tiny_sdxl(path: Path, *, second_text_width: int = _TEXT_HIDDEN) -> Path:
    """Write a tiny Stable Diffusion XL pipeline (two text encoders) to ``path``.

    ``second_text_width`` other than the first encoder's (as in the real SDXL: 768 and 1280)
    gives a model that survives a single-file round trip: diffusers' single-file loader tells
    the two encoders apart by their width.
    """
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
            text_encoder_2=_text_encoder(tokenizer_2, width=second_text_width, projection_dim=second_text_width),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            # SDXL concatenates both encoders' hidden states for cross-attention,
            # and conditions on the pooled projection plus six size/crop numbers,
            # each embedded with time_embed_dim channels.
            unet=_unet(
                cross_attention_dim=_TEXT_HIDDEN + second_text_width,
                addition_embed_type="text_time",
                addition_time_embed_dim=time_embed_dim,
                projection_class_embeddings_input_dim=second_text_width + 6 * time_embed_dim,
            ),
            scheduler=_scheduler(),
            add_watermarker=False,
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def _builder(name: str) -> Callable[[Path], Any]:
    builder = _BUILDERS[name]
    if isinstance(builder, str):
        module, _, function = builder.partition(":")
        builder = getattr(importlib.import_module(module), function)
    return builder


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


def _text_encoder(tokenizer: Any, *, width: int = _TEXT_HIDDEN, max_positions: int = _MAX_LENGTH,
                  projection_dim: int | None = None) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
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


def _t5_tokenizer(max_length: int = _MAX_LENGTH) -> Any:
    """A T5 tokenizer (SentencePiece-style unigram) over lower-case letters, digits and a little
    punctuation, each alone or starting a word: what SD3, FLUX, PixArt and Stable Audio's T5
    text encoders read. Built with the tokenizers library, as no model file can be fetched."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = list(string.ascii_lowercase + string.digits + ",.!?'-")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0),
             *((p, -3.0) for p in pieces), *(("\u2581" + p, -2.5) for p in pieces)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


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


# --------------------------------------------------------------------------- #
# Single-file checkpoints in the original ("LDM") layout, for tests only.
#
# Real single-file checkpoints come as single files already, and diffusers converts them on
# load, but it ships nothing that writes one: the tests need a small one. The names below are
# the ones diffusers' single-file loader recognises and converts back, so
# ``from_single_file(file, config=folder)`` must give ``folder``'s pipeline bit for bit; that
# round trip is the test of this mapping.

_LDM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip": "cond_stage_model.transformer.",
    "sdxl_clip": "conditioner.embedders.0.transformer.",
    "sdxl_open_clip": "conditioner.embedders.1.model.",
}
_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_LDM_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_LDM_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                        "self_attn.out_proj": "attn.out_proj"}
_BLOCK = r"(down_blocks|mid_block|up_blocks)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"


def save_single_file(folder: Path, out: Path) -> Path:
    """Writes the tiny sd1 or sdxl pipeline at ``folder`` as one LDM-layout ``.safetensors`` file."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {**_prefixed("unet", _ldm_unet(_weights(folder, "unet"), _config(folder, "unet"))),
               **_prefixed("vae", _ldm_vae(_weights(folder, "vae"), _config(folder, "vae")))}
    if (folder / "text_encoder_2").is_dir():  # SDXL: CLIP ViT-L is embedder 0, OpenCLIP ViT-bigG embedder 1
        first, second = _config(folder, "text_encoder"), _config(folder, "text_encoder_2")
        if first["hidden_size"] == second["hidden_size"]:
            raise ValueError("diffusers tells SDXL's text encoders apart by width; build the model with "
                             "build_tiny_sdxl(..., second_text_width=...) of another width")
        tensors |= _prefixed("sdxl_clip", _ldm_clip(_weights(folder, "text_encoder")))
        tensors |= _prefixed("sdxl_open_clip", _ldm_open_clip(_weights(folder, "text_encoder_2")))
    else:
        tensors |= _prefixed("clip", _ldm_clip(_weights(folder, "text_encoder")))
    save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    return Path(out)


def _ldm_unet(weights: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = DIFFUSERS_TO_LDM_MAPPING["unet"]
    fixed = {**table["layers"], **table["addition_embed_type"]}  # SDXL's add_embedding is LDM's label_emb
    per_block = config["layers_per_block"] + 1  # LDM gives each block's down/up sampler a layer of its own
    last = per_block - 1

    def rename(key: str) -> str:
        if key in fixed:
            return fixed[key]
        part, block, kind, layer, rest = _match(_BLOCK, key).groups()
        if kind == "resnets":
            module, _, param = rest.partition(".")
            rest = f"{_LDM_RESNET[module]}.{param}"
        sub = 0 if kind == "resnets" else 1
        if part == "mid_block":  # resnet, attention, resnet
            return f"middle_block.{2 * int(layer) if kind == 'resnets' else 1}.{rest}"
        b, j = int(block), int(layer)
        if part == "down_blocks":  # input_blocks.0 is conv_in
            if kind == "downsamplers":
                return f"input_blocks.{1 + b * per_block + last}.0.op.{rest.removeprefix('conv.')}"
            return f"input_blocks.{1 + b * per_block + j}.{sub}.{rest}"
        if kind == "upsamplers":  # after the layer's attention, where it has one
            after = 2 if "CrossAttn" in config["up_block_types"][b] else 1
            return f"output_blocks.{b * per_block + last}.{after}.{rest}"
        return f"output_blocks.{b * per_block + j}.{sub}.{rest}"

    return {rename(k): v for k, v in weights.items()}


def _ldm_vae(weights: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    blocks = len(config["up_block_types"])
    out = {}
    for key, tensor in weights.items():
        if key in fixed:
            out[fixed[key]] = tensor
            continue
        coder, _, rest = key.partition(".")
        part, block, kind, layer, rest = _match(_BLOCK, rest).groups()
        rest = rest.replace("conv_shortcut", "nin_shortcut")
        if part == "mid_block" and kind == "attentions":
            module, _, param = rest.rpartition(".")
            # LDM's VAE attention projects with 1x1 convolutions
            out[f"{coder}.mid.attn_1.{_LDM_VAE_ATTENTION[module]}.{param}"] = (
                tensor[:, :, None, None] if tensor.ndim == 2 else tensor)
            continue
        if part == "mid_block":
            name = f"mid.block_{int(layer) + 1}.{rest}"
        elif part == "down_blocks":
            name = f"down.{block}.downsample.{rest}" if kind == "downsamplers" else f"down.{block}.block.{layer}.{rest}"
        else:
            b = blocks - 1 - int(block)  # LDM numbers the decoder's blocks from the bottom up
            name = f"up.{b}.upsample.{rest}" if kind == "upsamplers" else f"up.{b}.block.{layer}.{rest}"
        out[f"{coder}.{name}"] = tensor
    return out


def _ldm_clip(weights: dict[str, Any]) -> dict[str, Any]:
    # transformers 5.6+ saves CLIPTextModel without its text_model level; LDM checkpoints have it
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in weights.items()}


def _ldm_open_clip(weights: dict[str, Any]) -> dict[str, Any]:
    import torch
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    out: dict[str, Any] = {}
    for key, tensor in weights.items():
        if key == "text_projection.weight":
            out[fixed[key]] = tensor.T  # OpenCLIP multiplies by it from the other side
        elif key in fixed:
            out[fixed[key]] = tensor
        else:
            layer, module, param = _match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key).groups()
            if module in _LDM_OPEN_CLIP_LAYER:
                out[f"transformer.resblocks.{layer}.{_LDM_OPEN_CLIP_LAYER[module]}.{param}"] = tensor
            elif module == "self_attn.q_proj":  # OpenCLIP packs q, k and v into one projection
                out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(
                    [weights[f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{param}"] for p in "qkv"])
            elif module not in ("self_attn.k_proj", "self_attn.v_proj"):
                raise ValueError(f"no LDM name for {key!r}")
    return out


def _match(pattern: str, key: str) -> Any:
    found = re.fullmatch(pattern, key)
    if found is None:
        raise ValueError(f"no LDM name for {key!r}")
    return found


def _prefixed(part: str, weights: dict[str, Any]) -> dict[str, Any]:
    return {_LDM_PREFIXES[part] + k: v for k, v in weights.items()}


def _weights(folder: Path, component: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {k: v for f in sorted((folder / component).glob("*.safetensors")) for k, v in load_file(f).items()}


def _config(folder: Path, component: str) -> dict[str, Any]:
    return json.loads((folder / component / "config.json").read_text())


def build_tiny_lora(model: Path, out: Path, *, seed: int = 1, rank: int = 4) -> Path:
    """A random LoRA for a tiny SD-style model's UNet, in diffusers' LoRA format (one safetensors
    file), strong enough to change its images visibly. For tests of LoRAs; real ones come as files."""
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights="gaussian"))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:  # zero after init: the LoRA would change nothing
                parameter.normal_(0.0, 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    out.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
    return out / "pytorch_lora_weights.safetensors"
