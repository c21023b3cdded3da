"""LoRAs, the same way for every family whose diffusers pipeline takes them.

A catalog entry's ``loras`` (name -> file) are all loaded into the pipeline with the model, as
named adapters, and turned off; a job chooses some with their scales (``JobSpec.loras``) and the
model only switches adapters before the call (``LoadedModel.before_call``), so changing LoRAs never
reloads the base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atelier.families.loaded import LoadedModel


def load_loras(model: LoadedModel, loras: dict[str, str]) -> None:
    """Loads every LoRA of the model's catalog entry as a named adapter, all off until a job asks."""
    pipe = model.pipe
    if loras and not hasattr(pipe, "load_lora_weights"):
        raise ValueError(f"{type(pipe).__name__} takes no LoRAs: remove loras from the model's catalog entry")
    for name, source in loras.items():
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"LoRA {name}: {source} does not exist on this host")
        # safetensors only: a .ckpt, .pt or .bin LoRA is a pickle, which can run code when read.
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ValueError(f"LoRA {name}: {path.name} is not a .safetensors file (pickled LoRAs are refused)")
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name, use_safetensors=True)
        else:
            pipe.load_lora_weights(str(path), adapter_name=name, use_safetensors=True)
        model.loras += (name,)
    if loras:
        pipe.disable_lora()


MAX_USER_LORAS = 16  # users' trained LoRAs kept loaded in one model at once (the oldest goes first)


def add_user_lora(model: LoadedModel, ref: str, data: bytes) -> None:
    """Loads a user's trained LoRA (a diffusers-format .safetensors file's bytes) into the resident pipeline
    as the adapter ``ref`` (its unique reference, "@<version>"), off until a call asks: the base model is
    not reloaded. Beyond MAX_USER_LORAS, the oldest user adapter is deleted."""
    from safetensors.torch import load

    pipe = model.pipe
    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(f"{type(pipe).__name__} takes no LoRAs")
    users = [name for name in model.loras if name.startswith("@")]
    if len(users) >= MAX_USER_LORAS:
        pipe.delete_adapters(users[0])
        model.loras = tuple(name for name in model.loras if name != users[0])
    pipe.load_lora_weights(load(bytes(data)), adapter_name=ref)
    model.loras += (ref,)
    # Off again (the load turns the new adapter on) until a call chooses it.
    use_loras(model, model.active_loras)


def use_loras(model: LoadedModel, chosen: tuple[tuple[str, float], ...]) -> None:
    """Switches the model's adapters for one call: the chosen ones at their scales, the others off."""
    if not model.loras:
        return
    model.active_loras = chosen
    if not chosen:
        model.pipe.disable_lora()  # not merely at weight 0: their layers then cost nothing
        return
    model.pipe.enable_lora()
    model.pipe.set_adapters([name for name, _ in chosen], [float(scale) for _, scale in chosen])
