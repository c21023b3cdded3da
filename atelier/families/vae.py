"""A model's other VAEs, from its catalog entry, the same way for every family they fit.

``vae``: an AutoencoderKL folder that replaces the pipeline's own VAE (sdxl-vae-fp16-fix, say, which
decodes in float16 where SDXL's own must upcast to float32). ``preview_decoder``: an AutoencoderTiny
folder (TAESD: taesd for SD 1/2, taesdxl for SDXL, taesd3, taef1) that draws the step previews in
place of the family's linear projection.

Both are read from disk when the model loads, after the family has built the pipeline; they are
not staged with it (a VAE is some 160 MB, a TAESD 5 MB: small beside the model, and read once per
load). Torch and diffusers are imported inside the functions, when a model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from atelier.config import ModelEntry
from atelier.families import get_family
from atelier.registry import FAMILIES, FAMILY_LIMITS

if TYPE_CHECKING:
    from atelier.families.loaded import LoadedModel

# Families whose step latents a TAESD decodes (the registry's preview_decoder).
PREVIEW_DECODER_FAMILIES = frozenset(name for name, spec in FAMILIES.items() if spec.preview_decoder)
# The pipeline's VAE and an override must agree on these, or latents and sizes would not fit.
_VAE_SHAPE = ("in_channels", "out_channels", "latent_channels")


def load_vaes(model: LoadedModel, entry: ModelEntry, device: str) -> None:
    """Applies the entry's ``vae`` and ``preview_decoder`` to a freshly loaded model, for a runner on
    ``device``; a ValueError names what does not fit."""
    if entry.vae is not None:
        replace_vae(model.pipe, Path(entry.vae).expanduser(), family=entry.family)
    if entry.preview_decoder is not None:
        model.preview_decoder = preview_decoder(model.pipe, Path(entry.preview_decoder).expanduser(),
                                                family=entry.family, device=device)


def replace_vae(pipe: Any, folder: Path, *, family: str) -> None:
    from diffusers import AutoencoderKL

    if FAMILY_LIMITS[family].media == "audio":
        raise ValueError(f"vae: family {family!r} makes sound; its autoencoder is not an image VAE to replace")
    current = getattr(pipe, "vae", None)
    if not isinstance(current, AutoencoderKL):
        raise ValueError(f"vae: family {family!r} decodes with {type(current).__name__ if current else 'no VAE'}, "
                         "not an AutoencoderKL an override could replace")
    vae = _load(AutoencoderKL, folder, "vae", dtype=current.dtype)
    old, new = current.config, vae.config
    differs = [k for k in _VAE_SHAPE if old[k] != new[k]]
    if len(old.block_out_channels) != len(new.block_out_channels):
        differs.append(f"scale (2^{len(new.block_out_channels) - 1} against 2^{len(old.block_out_channels) - 1})")
    if differs:
        raise ValueError(f"vae: {folder} does not fit this model's VAE: its {', '.join(differs)} differ")
    # The family's options (vae_tiling, vae_slicing) were applied to the VAE being replaced.
    vae.use_tiling, vae.use_slicing = current.use_tiling, current.use_slicing
    pipe.register_modules(vae=vae.to(current.device).eval())


def preview_decoder(pipe: Any, folder: Path, *, family: str, device: str | None = None) -> Any:
    """The TAESD of a model's previews, on the runner's ``device`` (None: the VAE's). Not the VAE's
    under offload, where that is the CPU: previews would decode there, a GPU beside them; no offload
    hook ever moves the decoder."""
    from diffusers import AutoencoderTiny

    from atelier.preview import CPU_DECODE_SIDE, DecoderPreview

    if family not in PREVIEW_DECODER_FAMILIES:
        raise ValueError(f"preview_decoder: family {family!r} is not previewed through a decoder; "
                         f"it is for {', '.join(sorted(PREVIEW_DECODER_FAMILIES))}")
    vae = pipe.vae
    decoder = _load(AutoencoderTiny, folder, "preview_decoder", dtype=vae.dtype)
    if decoder.config.latent_channels != vae.config.latent_channels:
        raise ValueError(f"preview_decoder: {folder} decodes {decoder.config.latent_channels}-channel latents, "
                         f"this model makes {vae.config.latent_channels} (taesd and taesdxl take 4, taesd3 and "
                         "taef1 16)")
    decoder.encoder = None  # a preview only decodes
    decoder = decoder.to(device or vae.device).eval()
    cpu = decoder.device.type == "cpu"
    return DecoderPreview(decoder, max_latent_side=CPU_DECODE_SIDE // 8 if cpu else None,
                          pick=get_family(family).preview_latents)


def _load(cls: type, folder: Path, field: str, *, dtype: Any) -> Any:
    if not (folder / "config.json").is_file():
        raise ValueError(f"{field}: {folder} is not a diffusers model folder (no config.json)")
    kind = cls.load_config(folder).get("_class_name")
    if kind != cls.__name__:
        raise ValueError(f"{field}: {folder} holds a {kind}, not an {cls.__name__}")
    try:
        # safetensors only: a .bin is a pickle, which can run code when read. local_files_only: never the hub.
        return cls.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True)
    except OSError as exc:
        raise ValueError(f"{field}: {folder} has no readable .safetensors weights ({exc})") from None
