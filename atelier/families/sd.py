"""Stable Diffusion 1.x ("sd1"), 2.x ("sd2") and SDXL ("sdxl") adapters over diffusers' pipelines."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import SingleFileComponentError
from diffusers.utils import logging as diffusers_logging

from atelier.families import options as unet_options
from atelier.families.base import Family, GenerateRequest, StepCallback
from atelier.families.loaded import LoadedModel, LoadRequest
from atelier.families.loading import call_cleanup, load_folder, ready, seeded_generators, torch_dtype
from atelier.preview import SD15_LATENT_RGB, SDXL_LATENT_RGB, LatentRGB, latents_to_rgb
from atelier.sources import ModelSourceError
from atelier.staging import CHECKPOINT, build_from_checkpoint

# A server loads models all day; diffusers' per-load progress bars would bury its logs.
diffusers_logging.disable_progress_bar()

# diffusers.AutoPipelineFor* and diffusers.ControlNetModel are named through the module where they are used,
# not imported here: diffusers imports them on first use, and the auto pipelines import every pipeline
# they map to (a second or so of a runner's first job, which a plain text-to-image never needs).


class _StableDiffusionFamily(Family):
    pipeline_class: type[DiffusionPipeline]
    latent_rgb: LatentRGB

    def build(self, request: LoadRequest) -> LoadedModel:
        path, config = request.path, request.config
        if path is None:
            raise ValueError(f"family {self.name!r} needs a model path")
        dtype = torch_dtype(request.dtype_name)  # an unknown name fails before any reading
        options = dict(request.options)
        unet_options.check(self.name, options, unet_options.UNET_OPTIONS)

        weights = dict(request.weights) if request.weights is not None else None
        if config is not None:
            pipe = ready(self._from_single_file(path, config, dtype, weights), request.load_device)
        else:
            pipe = load_folder(self.name, self.pipeline_class, path, device=request.load_device,
                               dtype_name=request.dtype_name, weights=weights, config=None, variant=request.variant)
        unet_options.apply(pipe, options)
        # With prompt_weighting, compel (CompelForSD or CompelForSDXL) reads the prompts.
        return LoadedModel(pipe, self, settings=_compel(pipe) if options.get("prompt_weighting") else None)

    def unreadable_prompt(self, model: LoadedModel, prompt: str) -> str | None:
        if model.settings is None:  # no prompt_weighting: a prompt is only text
            return None
        from compel.prompt_parser import PromptParser

        try:
            PromptParser().parse_conjunction(_compel_syntax(prompt))
        except RecursionError:
            return "prompt: its parentheses nest too deep for prompt weighting"
        except Exception as exc:  # pyparsing's ParseException, and what compel raises on a half-made blend
            return f"prompt: not a weighted prompt compel can read ({str(exc)[:200]})"
        return None

    def load_conditioning(self, model: LoadedModel, controlnets: dict[str, str], ip_adapter: str | None,
                          ip_adapter_encoder: str | None) -> None:
        """Loads the catalog entry's ControlNets beside the model and its IP-Adapter into it (turned off
        until a job brings an image), so that jobs choose among them without reloading anything."""
        for name, source in controlnets.items():
            model.controlnets[name] = _load_controlnet(model.pipe, name, Path(source).expanduser())
        if ip_adapter_encoder is not None and ip_adapter is None:
            raise ValueError("ip_adapter_encoder: the model's catalog entry names no ip_adapter to go with it")
        if ip_adapter is not None:
            model.ip_adapter = _load_ip_adapter(model.pipe, Path(ip_adapter).expanduser(),
                                                Path(ip_adapter_encoder).expanduser() if ip_adapter_encoder else None)

    def _from_single_file(self, path: Path, config: Path, dtype: torch.dtype,
                          weights: dict[str, dict[str, Any]] | None) -> DiffusionPipeline:
        """The pipeline of a single-file checkpoint: its tensors (staged, or read from ``path``) converted
        by diffusers, everything else from the diffusers folder ``config``."""
        # Given anything but a local folder of configs, diffusers goes looking for them on the hub.
        if not (config / "model_index.json").is_file():
            raise ModelSourceError(f"config {config} is not a diffusers folder (no model_index.json)")
        try:
            if weights is not None:
                return build_from_checkpoint(self.pipeline_class, config, weights[CHECKPOINT], dtype=dtype)
            return self.pipeline_class.from_single_file(str(path), config=str(config), dtype=dtype,
                                                        local_files_only=True)
        except (SingleFileComponentError, KeyError, ValueError) as exc:
            # What diffusers says of a file that does not fit the configs rarely names either.
            raise ModelSourceError(f"{path.name} does not fit the configs in {config}: "
                                   f"{type(exc).__name__}: {exc}") from exc

    def generate(self, model: LoadedModel, req: GenerateRequest, on_step: StepCallback) -> list[PIL.Image.Image]:
        if req.images and int(req.steps * (req.strength or 1.0)) < 1:
            # Starting from an image runs int(steps * strength) steps; with none (a 1-step turbo model
            # at strength 0.75, say) diffusers fails on an empty tensor deep inside.
            raise ValueError(f"strength {req.strength} of {req.steps} steps leaves no step to run: "
                             "ask for more steps or a higher strength (steps x strength >= 1)")
        if req.controlnet is not None and req.controlnet not in model.controlnets:
            raise ValueError(f"controlnet {req.controlnet!r} is not one of this model's: "
                             f"{', '.join(sorted(model.controlnets)) or 'none'}")
        if req.ip_adapter_images and model.ip_adapter is None:
            raise ValueError("ip_adapter_image: this model has no ip_adapter in its catalog entry")
        parts = _ip_adapter_parts(req)
        if len(parts) == 1:
            return self._call(model, req, on_step)
        # diffusers gives a whole call one IP-Adapter image: jobs of a batch with different ones take a
        # call each, reported to the runner as one call of all their steps.
        outputs: list[PIL.Image.Image] = []
        shared: dict[str, torch.Tensor] = {}
        for k, (start, stop) in enumerate(parts):
            sub = replace(req, **{name: getattr(req, name)[start:stop] for name in _PER_IMAGE if getattr(req, name)})
            outputs += self._call(model, sub, _part_steps(on_step, k, len(parts), start, req.count, shared))
        return outputs

    def _call(self, model: LoadedModel, req: GenerateRequest, on_step: StepCallback) -> list[PIL.Image.Image]:
        pipe = model.pipe
        # One generator per image: an image's noise depends on its own seed, not on its batch.
        generators = seeded_generators(pipe, req.seeds)

        def on_step_end(p: DiffusionPipeline, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            # num_timesteps is what the scheduler actually runs: fewer than the steps asked for
            # when img2img starts part of the way in, and for some schedulers otherwise.
            on_step(i + 1, p.num_timesteps, tensors["latents"])
            # An empty dict leaves the pipeline's tensors untouched.
            return {}

        # One prompt per image (a batch mixes jobs). Exceptions from on_step (JobCancelled) propagate:
        # diffusers does not catch around the callback.
        common = dict(**_prompts(model.settings, req), num_inference_steps=req.steps, guidance_scale=req.guidance,
                      num_images_per_prompt=1, generator=generators, output_type="pil",
                      callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
        # At scale 0 the IP-Adapter is off, not merely weighted 0: exactly the image without, and no cost.
        image_prompt = bool(req.ip_adapter_images) and req.ip_adapter_scale > 0
        _use_ip_adapter(pipe, model.ip_adapter, req.ip_adapter_scale if image_prompt else None)
        if image_prompt:  # one image for the call (generate splits a batch that has several)
            common["ip_adapter_image"] = req.ip_adapter_images[0]
        control: dict[str, Any] = {}
        if req.controlnet is not None:  # the control image per output image, and how much it counts
            control = dict(control_image=list(req.control_images), controlnet_conditioning_scale=req.controlnet_scale)
        if req.masks:  # inpainting: the image, repainted where the mask is white
            call = _variant(model, diffusers.AutoPipelineForInpainting, req.controlnet)
            arguments = dict(image=list(req.images), mask_image=list(req.masks), strength=req.strength,
                             width=req.width, height=req.height, **control)
        elif req.images:  # img2img: the image's size is the output's (the runner resized it to the job's)
            call = _variant(model, diffusers.AutoPipelineForImage2Image, req.controlnet)
            arguments = dict(image=list(req.images), strength=req.strength, **control)
        elif control:  # text to image, its ControlNet pipeline calling the control image its image
            control["image"] = control.pop("control_image")
            call = _variant(model, diffusers.AutoPipelineForText2Image, req.controlnet)
            arguments = dict(width=req.width, height=req.height, **control)
        else:
            call, arguments = pipe, dict(width=req.width, height=req.height)
        with call_cleanup(pipe, variant=call is not pipe):  # SDXL upcasts a float16 VAE for the decode
            result = call(**arguments, **common)
        return list(result.images)

    def preview(self, latents: torch.Tensor, index: int = 0) -> np.ndarray:
        return latents_to_rgb(latents[index], self.latent_rgb)


class SD15Family(_StableDiffusionFamily):
    name = "sd1"
    pipeline_class = StableDiffusionPipeline
    latent_rgb = SD15_LATENT_RGB


class SD2Family(SD15Family):
    """SD 2.x: SD 1.5's pipeline class and VAE (so its latent space); what differs (v-prediction,
    the OpenCLIP text encoder, 768 px) comes with the checkpoint's own configs."""

    name = "sd2"


class SDXLFamily(_StableDiffusionFamily):
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    latent_rgb = SDXL_LATENT_RGB


def _variant(model: LoadedModel, auto: Any, controlnet: str | None = None) -> DiffusionPipeline:
    """The model's img2img or inpainting pipeline, or one with a ControlNet: the same modules in another
    pipeline class, made once per model (from_pipe shares the weights, it copies none)."""
    variants = model.variants
    if (auto, controlnet) not in variants:
        extra = {"controlnet": model.controlnets[controlnet]} if controlnet is not None else {}
        variant = variants[auto, controlnet] = auto.from_pipe(model.pipe, **extra)
        variant.set_progress_bar_config(disable=True)
    return variants[auto, controlnet]


# --------------------------------------------------------------------------- #
# Conditioning: ControlNets, the IP-Adapter, weighted prompts.


@dataclass(frozen=True)
class _IPAdapter:
    """The UNet's attention with the IP-Adapter and without it, and its image projection: a UNet with
    the IP-Adapter in cannot run without an image, so a call without one switches back."""

    ip_processors: dict[str, Any]
    plain_processors: dict[str, Any]
    projection: Any


# GenerateRequest's fields with one entry per image: what a part of a request takes its share of.
_PER_IMAGE = ("prompts", "negative_prompts", "seeds", "images", "masks", "control_images", "ip_adapter_images")


def _load_controlnet(pipe: DiffusionPipeline, name: str, folder: Path) -> diffusers.ControlNetModel:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"controlnet {name}: {folder} is not a ControlNet folder (no config.json)")
    # use_safetensors: a folder of pickled .bin weights is refused, never unpickled.
    controlnet = diffusers.ControlNetModel.from_pretrained(folder, dtype=pipe.unet.dtype, use_safetensors=True,
                                                           local_files_only=True)
    # What tells an SD 1.5, SD 2 and SDXL ControlNet apart; a mismatch would fail deep in the first job.
    for key in ("cross_attention_dim", "addition_embed_type", "block_out_channels"):
        if controlnet.config[key] != pipe.unet.config[key]:
            raise ValueError(f"controlnet {name}: made for a UNet with {key} {controlnet.config[key]}, and this "
                             f"model's has {pipe.unet.config[key]} (a ControlNet of another model family?)")
    return controlnet.to(pipe.device)


def _load_ip_adapter(pipe: DiffusionPipeline, file: Path, encoder: Path | None) -> _IPAdapter:
    from diffusers.models.attention_processor import SlicedAttnProcessor
    from transformers import CLIPVisionModelWithProjection

    if not file.is_file():
        raise FileNotFoundError(f"ip_adapter: {file} does not exist on this host")
    if file.suffix != ".safetensors":
        raise ValueError(f"ip_adapter: {file.name} is not a .safetensors file (pickled weights are refused)")
    encoder = encoder or file.parent / "image_encoder"  # where h94/IP-Adapter keeps it
    if not (encoder / "config.json").is_file():
        raise FileNotFoundError(f"ip_adapter_encoder: {encoder} is not an image encoder folder (no config.json)")
    if any(isinstance(p, SlicedAttnProcessor) for p in pipe.unet.attn_processors.values()):
        # Both replace the UNet's attention processors: the IP-Adapter's would be lost, or break.
        raise ValueError("ip_adapter does not go with the option attention_slicing: drop one of them")
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(encoder, dtype=pipe.unet.dtype,
                                                                  use_safetensors=True, local_files_only=True)
    # Registered before load_ip_adapter, which then reads only the adapter's own weights.
    pipe.register_modules(image_encoder=image_encoder.to(pipe.device))
    plain_processors = dict(pipe.unet.attn_processors)
    try:
        pipe.load_ip_adapter(str(file.parent), subfolder="", weight_name=file.name, image_encoder_folder=None,
                             local_files_only=True)
        adapter = _IPAdapter(ip_processors=dict(pipe.unet.attn_processors), plain_processors=plain_processors,
                             projection=pipe.unet.encoder_hid_proj)
        with torch.no_grad():  # one blank image through encoder and projection: that they fit each other
            embeds = pipe.prepare_ip_adapter_image_embeds(PIL.Image.new("RGB", (64, 64)), None, pipe.device, 1,
                                                          False)
            adapter.projection(embeds)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ValueError(f"ip_adapter: {file.name} does not fit this model or its image encoder {encoder}: "
                         f"{type(exc).__name__}: {exc}") from None
    _use_ip_adapter(pipe, adapter, None)
    return adapter


def _use_ip_adapter(pipe: DiffusionPipeline, adapter: _IPAdapter | None, scale: float | None) -> None:
    """The IP-Adapter on at ``scale`` for a call with an image prompt, or off (None): the UNet as it was."""
    if adapter is None:
        return
    on = scale is not None
    unet = pipe.unet
    # set_attn_processor takes the processors out of the dict it is given: it gets a copy.
    unet.set_attn_processor(dict(adapter.ip_processors if on else adapter.plain_processors))
    unet.encoder_hid_proj = adapter.projection if on else None
    unet.config.encoder_hid_dim_type = "ip_image_proj" if on else None  # as diffusers' own loader sets it
    if on:
        pipe.set_ip_adapter_scale(scale)


def _ip_adapter_parts(req: GenerateRequest) -> list[tuple[int, int]]:
    """(start, stop) of the runs of images with the same IP-Adapter image (the whole request without)."""
    images = req.ip_adapter_images
    starts = [0, *(i for i in range(1, len(images)) if images[i] is not images[i - 1])]
    return list(zip(starts, [*starts[1:], req.count], strict=True))


def _part_steps(on_step: StepCallback, part: int, parts: int, start: int, count: int,
                shared: dict[str, torch.Tensor]) -> StepCallback:
    """A part's step callback, as the runner's for the whole request: steps counted over all the parts,
    and latents of all the images (those of parts not begun yet are zeros, so their previews are blank)."""

    def on_part_step(step: int, total: int, latents: torch.Tensor | None) -> None:
        if latents is not None:
            if "latents" not in shared:
                shared["latents"] = latents.new_zeros((count, *latents.shape[1:]))
            shared["latents"][start:start + len(latents)] = latents
        on_step(part * total + step, parts * total, shared.get("latents"))

    return on_part_step


# A1111's explicit weight, "(red:1.5)", which compel writes "(red)1.5"; inner groups first, so that
# "((red:1.2) cube:1.1)" nests as in A1111. Its bare "(red)" (x1.1) is another thing to compel, left alone.
_A1111_WEIGHT = re.compile(r"\(((?:[^():]|\([^():]*\)-?\d+(?:\.\d+)?)+):\s*(-?\d+(?:\.\d+)?)\s*\)")


def _compel_syntax(prompt: str) -> str:
    while (converted := _A1111_WEIGHT.sub(r"(\1)\2", prompt)) != prompt:
        prompt = converted
    return prompt


def _compel(pipe: DiffusionPipeline) -> Any:
    import pyparsing
    from compel import CompelForSD, CompelForSDXL

    # Without pyparsing's memo (packrat), compel's grammar backtracks exponentially in nested
    # parentheses: "((((((cat))))))" took 20 s, a few more levels hours, inside a batch's call. With
    # it, parsing is linear. It is process-wide, and changes no grammar's result, only its speed.
    pyparsing.ParserElement.enable_packrat(None)

    # CompelForSDXL reads both text encoders (penultimate hidden states, the second one's pooled output),
    # as SDXL's own encode_prompt does; neither truncates a long prompt, they encode it in 77-token chunks.
    return CompelForSDXL(pipe) if isinstance(pipe, StableDiffusionXLPipeline) else CompelForSD(pipe)


def _prompts(compel: Any, req: GenerateRequest) -> dict[str, Any]:
    """The call's prompts (diffusers' own "" for no negative prompt), or with prompt_weighting (a
    ``compel``) their embeddings, weighted by compel."""
    negatives = [n or "" for n in req.negative_prompts]
    if compel is None:
        return {"prompt": list(req.prompts), "negative_prompt": negatives}
    conditioning = compel([_compel_syntax(p) for p in req.prompts],
                                negative_prompt=[_compel_syntax(n) for n in negatives])
    embeds = {"prompt_embeds": conditioning.embeds, "negative_prompt_embeds": conditioning.negative_embeds}
    if conditioning.pooled_embeds is not None:  # SDXL
        embeds |= {"pooled_prompt_embeds": conditioning.pooled_embeds,
                   "negative_pooled_prompt_embeds": conditioning.negative_pooled_embeds}
    return embeds
