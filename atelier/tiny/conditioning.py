"""Tiny random-weight ControlNets and IP-Adapters for a tiny SD-style model, in the real formats.

A ControlNet is a diffusers ``ControlNetModel`` folder (config.json and safetensors weights), as
``lllyasviel/control_v11p_sd15_canny`` comes. An IP-Adapter is what ``h94/IP-Adapter`` ships: one
safetensors file whose keys are ``image_proj.*`` (the image embedding's projection to four text-like
tokens) and ``ip_adapter.<n>.to_k_ip / to_v_ip`` (the extra key and value projections of every
cross-attention layer, numbered as diffusers' ``load_ip_adapter`` reads them), beside an
``image_encoder`` folder holding a ``CLIPVisionModelWithProjection``. For tests: real ones come
as files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# A tiny CLIP ViT: 32 px images in 8 px patches; its projection is the image embedding.
_VISION_HIDDEN = 32
_IMAGE_EMBED = 24
_IMAGE_TOKENS = 4  # what the (non-"plus") IP-Adapter projects one image embedding to


def build_tiny_controlnet(model: Path, out: Path, *, seed: int = 1) -> Path:
    """A ControlNet made from ``model``'s UNet (as ControlNet training starts) with its zero-initialised
    layers drawn at random, so that a control image changes the images; written to the folder ``out``."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", local_files_only=True, use_safetensors=True)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        # Small embedding channels: its input is a full-size image, the rest of the model is tiny too.
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 16))
        # from_unet zeroes the layers that feed the UNet (so training starts from the plain model);
        # zero, they would make every control image give the image without one.
        zeroed = [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
                  controlnet.controlnet_mid_block]
        for layer in zeroed:
            for parameter in layer.parameters():
                parameter.normal_(0.0, 0.3)
    controlnet.save_pretrained(out, safe_serialization=True)
    return Path(out)


def build_tiny_ip_adapter(model: Path, out: Path, *, seed: int = 1) -> Path:
    """An IP-Adapter for ``model``'s UNet and its image encoder, written to the folder ``out`` as
    ``ip-adapter.safetensors`` and ``image_encoder/``; returns the weights file."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet_config = json.loads((Path(model) / "unet" / "config.json").read_text())
    cross = unet_config["cross_attention_dim"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=_VISION_HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, projection_dim=_IMAGE_EMBED)).eval()
        tensors: dict[str, Any] = {
            "image_proj.proj.weight": torch.randn(_IMAGE_TOKENS * cross, _IMAGE_EMBED) * 0.2,
            "image_proj.proj.bias": torch.zeros(_IMAGE_TOKENS * cross),
            "image_proj.norm.weight": torch.ones(cross),
            "image_proj.norm.bias": torch.zeros(cross),
        }
        for key_id, hidden in _cross_attention_layers(unet_config):
            for name in ("to_k_ip", "to_v_ip"):
                tensors[f"ip_adapter.{key_id}.{name}.weight"] = torch.randn(hidden, cross) * 0.3
    encoder.save_pretrained(out / "image_encoder", safe_serialization=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "ip-adapter.safetensors")
    return out / "ip-adapter.safetensors"


def _cross_attention_layers(config: dict[str, Any]) -> list[tuple[int, int]]:
    """(key number, width) of each cross-attention layer, in the order of the UNet's attention processors.

    The number is the layer's place among all attention layers, self and cross alternating (1, 3, 5…),
    which is how the original IP-Adapter files count them and diffusers reads them back.
    """
    from diffusers import UNet2DConditionModel

    with _meta_device():
        unet = UNet2DConditionModel.from_config(config)
    out, key_id = [], 1
    blocks = list(config["block_out_channels"])
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = blocks[::-1][int(name[len("up_blocks.")])]
        else:
            hidden = blocks[int(name[len("down_blocks.")])]
        out.append((key_id, hidden))
        key_id += 2
    return out


def _meta_device() -> Any:
    import torch

    return torch.device("meta")  # a UNet's layout without allocating its weights
