"""The files behind the catalog of the session's shared atelier (tests/conftest.py ``shared_cluster``):
each test module that runs jobs on it, and needs more than the built-in models, has its entries here,
and reads the same files when it tests the adapters alone."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

# A cost-model model sleeps its steps instead of computing them (atelier/families/costmodel.py): jobs of a
# known length however busy the CPU is. It makes no previews; tiny-sd does, for the tests that need them.
CM_PROFILE = {"bytes": 1_000_000, "disk_load_s": 0.05, "staged_load_s": 0.01, "stage_s": 0.01,
              "default_resolution": 64, "step_s": {"64": [0.02, 0.02, 0.02, 0.02]}, "vae_decode_s": 0.0}

SMALL = "default_width = 64\ndefault_height = 64\n"


def guided_sd_files(home: Path) -> dict[str, Path]:
    """The tiny SD 1.5, two ControlNets (canny, depth) and an IP-Adapter, built once per home."""
    from atelier import tiny_models
    from atelier.tiny.conditioning import build_tiny_controlnet, build_tiny_ip_adapter

    sd = tiny_models.ensure_builtin("tiny-sd", home / "models")
    folder = home / "guided-sd"
    files = {"sd": sd, "canny": folder / "canny", "depth": folder / "depth",
             "ip": folder / "ip-adapter" / "ip-adapter.safetensors"}
    if not (folder / "built").is_file():
        build_tiny_controlnet(sd, files["canny"], seed=1)
        build_tiny_controlnet(sd, files["depth"], seed=2)
        files["ip"] = build_tiny_ip_adapter(sd, folder / "ip-adapter", seed=3)
        (folder / "built").touch()
    return files


def guided_sd(home: Path) -> str:
    """The catalog entry (TOML) of "guided-sd", the one model with ControlNets and an IP-Adapter, and
    prompt weighting: the shared atelier's, and test_web's own atelier's."""
    files = guided_sd_files(home)
    return (f'[models.guided-sd]\nfamily = "sd1"\nsource = "{files["sd"]}"\n{SMALL}default_steps = 3\n'
            f'controlnets = {{ canny = "{files["canny"]}", depth = "{files["depth"]}" }}\n'
            f'ip_adapter = "{files["ip"]}"\n'
            'options = { prompt_weighting = true }\n')


def lora_files(home: Path, folder: Path) -> dict[str, Path]:
    from atelier import tiny_models

    model = tiny_models.ensure_builtin("tiny-sd", home / "models")
    return {"model": model,
            "ink": tiny_models.build_tiny_lora(model, folder / "ink", seed=1),
            "moss": tiny_models.build_tiny_lora(model, folder / "moss", seed=2)}


def _other_vae(model: Path, folder: Path, *, seed: int, **changes: Any) -> Path:
    """An AutoencoderKL shaped like ``model``'s (or changed), with other random weights: a different decoder."""
    import torch
    from diffusers import AutoencoderKL

    config = {**AutoencoderKL.load_config(model / "vae"), **changes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        AutoencoderKL.from_config(config).save_pretrained(folder, safe_serialization=True)
    return folder


def vae_files(home: Path, folder: Path) -> dict[str, Path]:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from atelier import tiny_models
    from atelier.tiny.previews import build_tiny_taesd

    model = tiny_models.ensure_builtin("tiny-sd", home / "models")
    other = _other_vae(model, folder / "other-vae", seed=1)
    # A folder as hub repos hold them: the plain files and an fp16 variant. Its fp16 files are those of
    # another model (the other VAE), so that reading the wrong files shows in the image, not in a rounding.
    variant = folder / "variant-sd"
    shutil.copytree(model, variant)
    fp16 = StableDiffusionPipeline.from_pretrained(variant, vae=AutoencoderKL.from_pretrained(other),
                                                   local_files_only=True).to(torch.float16)
    fp16.save_pretrained(variant, safe_serialization=True, variant="fp16")
    return {"model": model, "other-vae": other, "variant": variant,
            "wide-vae": _other_vae(model, folder / "wide-vae", seed=2, latent_channels=16),
            "taesd": build_tiny_taesd(folder / "taesd"),
            "taesd16": build_tiny_taesd(folder / "taesd16", latent_channels=16)}


def single_file(folder: Path, model: Path, name: str) -> tuple[Path, Path, Path]:
    """(the diffusers folder, the same model as one file, a folder of its configs without weights)."""
    from atelier.tiny_models import save_single_file

    configs = folder / f"{name}-configs"
    shutil.copytree(model, configs, ignore=shutil.ignore_patterns("*.safetensors"))
    return model, save_single_file(model, folder / f"{name}.safetensors"), configs


def shared_catalog(home: Path, folder: Path, *, loras: dict[str, Path], vaes: dict[str, Path],
                   single_sd: tuple[Path, Path, Path]) -> str:
    """The catalog (TOML) that the shared atelier serves beside the built-in models. Names are unique
    across modules; the frontends' tests count on guided-sd being the only model with ControlNets, and
    their /models listings on missing-sd and guided-sd coming first (Discord shows 2000 characters)."""
    from atelier.families.costmodel import write_model

    models = home / "models"
    _, single, configs = single_sd
    noise = folder / "noise.safetensors"
    noise.write_bytes(b"\xff" * 4096)
    steps2, steps3, steps4 = (f"{SMALL}default_steps = {n}\n" for n in (2, 3, 4))
    return (
        "builtin_models = true\n"  # beside a catalog of its own, the built-ins are in only when asked for
        # test_discord's, test_frontends_conditioning's and test_conditioning's
        f'[models.missing-sd]\nfamily = "sd1"\nsource = "{folder / "nowhere"}"\n{steps2}'
        + guided_sd(home)
        + f'[models.cm]\nfamily = "costmodel"\nsource = "{write_model(folder / "cm", CM_PROFILE)}"\n'
        f"{SMALL}default_steps = 10\nmax_width = 256\nmax_height = 256\n"
        # test_accel's
        f'[models.quick-sd]\nfamily = "sd1"\nsource = "{models / "tiny-sd"}"\n{steps4}'
        'quantize = "int8"\ncache = "deepcache"\ncache_interval = 2\n'
        f'[models.wrong-cache]\nfamily = "pixart-alpha"\nsource = "{models / "tiny-pixart-alpha"}"\n'
        f'{steps4}cache = "deepcache"\n'
        f'[models.offloaded]\nfamily = "sd1"\nsource = "{models / "tiny-sd"}"\n{steps4}offload = "model"\n'
        # test_loras's
        f'[models.lora-sd]\nfamily = "sd1"\nsource = "{loras["model"]}"\n{steps3}'
        f'loras = {{ ink = "{loras["ink"]}", moss = "{loras["moss"]}" }}\n'
        # test_a1111's and test_comfy's: the same, under a name of their own (test_loras counts lora-sd's loads)
        f'[models.compat-lora-sd]\nfamily = "sd1"\nsource = "{loras["model"]}"\n{steps3}'
        f'loras = {{ ink = "{loras["ink"]}", moss = "{loras["moss"]}" }}\n'
        # test_vae_previews's
        f'[models.styled-sd]\nfamily = "sd1"\nsource = "{vaes["model"]}"\n{steps3}'
        f'vae = "{vaes["other-vae"]}"\npreview_decoder = "{vaes["taesd"]}"\n'
        f'[models.fp16-sd]\nfamily = "sd1"\nsource = "{vaes["variant"]}"\nvariant = "fp16"\n{steps3}'
        f'[models.no-fp16-sd]\nfamily = "sd1"\nsource = "{vaes["model"]}"\nvariant = "fp16"\n{steps3}'
        f'[models.misfit-sd]\nfamily = "sd1"\nsource = "{vaes["model"]}"\nvae = "{vaes["wide-vae"]}"\n{steps3}'
        # test_single_file's
        f'[models.single-sd]\nfamily = "sd1"\nsource = "{single}"\nconfig = "{configs}"\n{steps2}'
        f'[models.noise-sd]\nfamily = "sd1"\nsource = "{noise}"\nconfig = "{configs}"\n{steps2}')
