"""ComfyUI's API-format workflows (``{node_id: {class_type, inputs}}``) as atelier jobs: pure, no I/O.

atelier runs one sampling pass per prompt, so a workflow is read backwards from its output nodes
(SaveImage, PreviewImage) through VAEDecode to its one sampler, and from there to the checkpoint,
LoRAs, prompts and latent it names. Every node is checked before anything runs: a class atelier
does not know, an input it cannot honour, or a graph shape it cannot run is refused naming the node
and input, in ComfyUI's own validation-error shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

# ComfyUI's sampler names -> atelier's (atelier/samplers.py). Those without a match are refused.
SAMPLERS = {"euler": "euler", "euler_ancestral": "euler_a", "heun": "heun", "dpm_2": "dpm2",
            "dpm_2_ancestral": "dpm2_a", "lms": "lms", "dpmpp_2s_ancestral": "dpm++2s", "dpmpp_sde": "dpm++sde",
            "dpmpp_sde_gpu": "dpm++sde", "dpmpp_2m": "dpm++2m", "dpmpp_2m_sde": "dpm++2m_sde",
            "dpmpp_2m_sde_gpu": "dpm++2m_sde", "ddim": "ddim", "uni_pc": "unipc", "uni_pc_bh2": "unipc",
            "lcm": "lcm", "deis": "deis", "ipndm": "pndm"}
SCHEDULERS = {"normal": "default", "simple": "default", "karras": "karras", "exponential": "exponential",
              "beta": "beta", "sgm_uniform": "trailing"}
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")
SEED_RANGE = 2**63  # atelier's seeds; ComfyUI's run to 2**64 - 1 and wrap into this range

# class -> (its inputs' types, in order, and its outputs' types); links are checked against these.
LINKS = {"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK"}
NODES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "CheckpointLoaderSimple": ({"ckpt_name": "CHOICE"}, ("MODEL", "CLIP", "VAE")),
    "LoraLoader": ({"model": "MODEL", "clip": "CLIP", "lora_name": "CHOICE", "strength_model": "FLOAT",
                    "strength_clip": "FLOAT"}, ("MODEL", "CLIP")),
    "LoraLoaderModelOnly": ({"model": "MODEL", "lora_name": "CHOICE", "strength_model": "FLOAT"}, ("MODEL",)),
    "CLIPTextEncode": ({"text": "STRING", "clip": "CLIP"}, ("CONDITIONING",)),
    "EmptyLatentImage": ({"width": "INT", "height": "INT", "batch_size": "INT"}, ("LATENT",)),
    "KSampler": ({"model": "MODEL", "seed": "INT", "steps": "INT", "cfg": "FLOAT", "sampler_name": "CHOICE",
                  "scheduler": "CHOICE", "positive": "CONDITIONING", "negative": "CONDITIONING",
                  "latent_image": "LATENT", "denoise": "FLOAT"}, ("LATENT",)),
    "KSamplerAdvanced": ({"model": "MODEL", "add_noise": "CHOICE", "noise_seed": "INT", "steps": "INT",
                          "cfg": "FLOAT", "sampler_name": "CHOICE", "scheduler": "CHOICE",
                          "positive": "CONDITIONING", "negative": "CONDITIONING", "latent_image": "LATENT",
                          "start_at_step": "INT", "end_at_step": "INT", "return_with_leftover_noise": "CHOICE"},
                         ("LATENT",)),
    "VAEDecode": ({"samples": "LATENT", "vae": "VAE"}, ("IMAGE",)),
    "VAEEncode": ({"pixels": "IMAGE", "vae": "VAE"}, ("LATENT",)),
    "VAEEncodeForInpaint": ({"pixels": "IMAGE", "vae": "VAE", "mask": "MASK", "grow_mask_by": "INT"}, ("LATENT",)),
    "SetLatentNoiseMask": ({"samples": "LATENT", "mask": "MASK"}, ("LATENT",)),
    "LoadImage": ({"image": "CHOICE"}, ("IMAGE", "MASK")),
    "SaveImage": ({"images": "IMAGE", "filename_prefix": "STRING"}, ()),
    "PreviewImage": ({"images": "IMAGE"}, ()),
}
OPTIONAL = {"filename_prefix", "grow_mask_by", "strength_clip", "denoise"}  # have a default where left out
OUTPUT_NODES = {"SaveImage": "output", "PreviewImage": "temp"}
SAMPLER_NODES = {"KSampler", "KSamplerAdvanced"}
# ComfyUI's own nodes that atelier knows of and cannot run, with why: said instead of "not found".
CANNOT = {
    "LatentUpscale": "atelier runs one sampling pass per prompt: no latent upscaling between passes",
    "LatentUpscaleBy": "atelier runs one sampling pass per prompt: no latent upscaling between passes",
    "ImageScale": "atelier does not resize images inside a workflow",
    "ImageScaleBy": "atelier does not resize images inside a workflow",
    "VAELoader": "atelier decodes with the checkpoint's own VAE (the catalog entry's vae setting chooses another)",
    "CLIPSetLastLayer": "atelier has no CLIP skip",
    "ConditioningCombine": "atelier takes one positive and one negative prompt",
    "ConditioningSetArea": "atelier has no regional prompts",
    "ControlNetLoader": "atelier's ControlNets are chosen through its native API (controlnet), not a workflow",
    "ControlNetApply": "atelier's ControlNets are chosen through its native API (controlnet), not a workflow",
    "ControlNetApplyAdvanced": "atelier's ControlNets are chosen through its native API (controlnet), not a workflow",
    "UpscaleModelLoader": "atelier upscales with its catalog's upscaler models through its native API",
    "ImageUpscaleWithModel": "atelier upscales with its catalog's upscaler models through its native API",
    "RepeatLatentBatch": "set EmptyLatentImage's batch_size instead",
    "CheckpointLoader": "use CheckpointLoaderSimple",
}


@dataclass
class Catalog:
    """What the translation needs of the server: the image models and their LoRAs, and the caller's uploads."""

    models: dict[str, list[str]]  # image model -> its LoRAs
    default_model: str
    uploads: dict[str, tuple[int, int, bool]] = field(default_factory=dict)  # "sub/name" -> (w, h, has alpha)


@dataclass
class Plan:
    """The job a workflow is, and which of its nodes say what, for ComfyUI's messages and errors."""

    fields: dict[str, Any]  # JobSpec fields
    sampler: str  # node ids
    decoder: str
    outputs: dict[str, str]  # output node -> "output" (SaveImage) or "temp" (PreviewImage)
    image: str | None = None  # the upload LoadImage names
    mask: tuple[str, int] | None = None  # (the upload whose alpha is the mask, pixels to grow it by)
    origin: dict[str, tuple[str, str]] = field(default_factory=dict)  # JobSpec field -> (node, input)
    classes: dict[str, str] = field(default_factory=dict)  # node -> class_type


class WorkflowError(Exception):
    """A workflow refused, as ComfyUI's POST /prompt answers one (status 400)."""

    def __init__(self, error: dict[str, Any], node_errors: dict[str, Any] | None = None):
        super().__init__(error["message"])
        self.error = error
        self.node_errors = node_errors or {}

    @classmethod
    def invalid(cls, message: str, details: str = "") -> "WorkflowError":
        return cls({"type": "invalid_prompt", "message": message, "details": details, "extra_info": {}})

    @classmethod
    def node(cls, node: str, class_type: str, kind: str, message: str, input_name: str | None = None,
             value: Any = None, outputs: list[str] | None = None) -> "WorkflowError":
        details = f"{input_name}: {message}" if input_name else message
        error = {"type": kind, "message": message, "details": details,
                 "extra_info": {"input_name": input_name, "received_value": value} if input_name else {}}
        # ComfyUI's message, then the reason: clients often show only the message.
        return cls({"type": "prompt_outputs_failed_validation",
                    "message": f"Prompt outputs failed validation: {class_type} {node}: {details}",
                    "details": f"{class_type} {node}: {details}", "extra_info": {}},
                   {node: {"errors": [error], "dependent_outputs": outputs or [], "class_type": class_type}})


class _Reader:
    def __init__(self, prompt: Any, catalog: Catalog):
        if not isinstance(prompt, dict) or not prompt:
            raise WorkflowError.invalid("prompt must be an API-format workflow: {node_id: {class_type, inputs}}")
        self.nodes: dict[str, dict[str, Any]] = {}
        self.catalog = catalog
        for node, body in prompt.items():
            if not isinstance(body, dict) or "class_type" not in body:
                raise WorkflowError.invalid("Cannot execute because a node is missing the class_type property.",
                                            f"Node ID '#{node}'")
            class_type = body["class_type"]
            if not isinstance(class_type, str):
                raise WorkflowError.invalid("class_type must be a node's class name", f"Node ID '#{node}'")
            if class_type in CANNOT:
                raise WorkflowError.node(str(node), str(class_type), "unsupported_node",
                                         f"atelier cannot run {class_type}: {CANNOT[class_type]}")
            if class_type not in NODES:
                raise WorkflowError({"type": "invalid_prompt",
                                     "message": f"Cannot execute because node class_type '{class_type}' is not "
                                                f"found: atelier runs ComfyUI's standard nodes "
                                                f"{', '.join(NODES)} (see /object_info)",
                                     "details": f"Node ID '#{node}'", "extra_info": {}},
                                    {str(node): {"errors": [{"type": "unknown_node", "message": "atelier has "
                                                 f"no node {class_type}", "details": "", "extra_info": {}}],
                                                 "dependent_outputs": [], "class_type": str(class_type)}})
            inputs = body.get("inputs", {})
            if not isinstance(inputs, dict):
                raise WorkflowError.node(str(node), class_type, "invalid_input_type", "inputs must be an object")
            self.nodes[str(node)] = {"class_type": class_type, "inputs": inputs}
        self.outputs = [n for n, b in self.nodes.items() if b["class_type"] in OUTPUT_NODES]
        if not self.outputs:
            raise WorkflowError({"type": "prompt_no_outputs", "message": "Prompt has no outputs",
                                 "details": "add a SaveImage or PreviewImage node", "extra_info": {}})

    def fail(self, node: str, message: str, input_name: str | None = None, value: Any = None,
             kind: str = "unsupported_graph") -> WorkflowError:
        return WorkflowError.node(node, self.nodes[node]["class_type"], kind, message, input_name, value,
                                  self.outputs)

    def value(self, node: str, name: str, default: Any = None) -> Any:
        """A node's literal input, of its declared type."""
        inputs, kind = self.nodes[node]["inputs"], NODES[self.nodes[node]["class_type"]][0][name]
        if name not in inputs:
            if name in OPTIONAL:
                return default
            raise self.fail(node, "Required input is missing", name, kind="required_input_missing")
        value = inputs[name]
        if isinstance(value, list):
            raise self.fail(node, "atelier takes this input as a value, not from another node", name, value)
        try:
            if kind == "INT":
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                return int(value)
            if kind == "FLOAT":
                if isinstance(value, bool):
                    raise ValueError
                return float(value)
        except (TypeError, ValueError, OverflowError):
            raise self.fail(node, f"Failed to convert an input value to a {kind} value", name, value,
                            kind="invalid_input_type") from None
        if not isinstance(value, str):
            raise self.fail(node, "Failed to convert an input value to a STRING value", name, value,
                            kind="invalid_input_type")
        return value

    def link(self, node: str, name: str, *classes: str) -> tuple[str, int]:
        """The node (of one of ``classes``) an input is linked to, and the output it takes."""
        inputs = self.nodes[node]["inputs"]
        if name not in inputs:
            raise self.fail(node, "Required input is missing", name, kind="required_input_missing")
        value = inputs[name]
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)
                and not isinstance(value[1], bool) and str(value[0]) in self.nodes):
            raise self.fail(node, "Bad linked input, must be a length-2 list of [node_id, slot_index] naming a node "
                                  "of this prompt", name, value, kind="bad_linked_input")
        source, slot = str(value[0]), value[1]
        class_type = self.nodes[source]["class_type"]
        wanted = NODES[self.nodes[node]["class_type"]][0][name]
        given = NODES[class_type][1]
        if not 0 <= slot < len(given) or given[slot] != wanted:
            raise self.fail(node, f"Return type mismatch between linked nodes: {class_type} {source} output {slot} "
                                  f"is not a {wanted}", name, value, kind="return_type_mismatch")
        if class_type not in classes:
            raise self.fail(node, f"atelier cannot run a {class_type} (node {source}) here: it takes "
                                  f"{' or '.join(classes)}", name, value)
        return source, slot


def translate(prompt: Any, catalog: Catalog) -> Plan:
    """The job a workflow asks for; WorkflowError (naming the node and input) where atelier cannot run it."""
    r = _Reader(prompt, catalog)
    origin: dict[str, tuple[str, str]] = {}
    decoders = {r.link(out, "images", "VAEDecode")[0] for out in r.outputs}
    samplers = {r.link(d, "samples", *SAMPLER_NODES)[0] for d in decoders}
    if len(samplers) > 1:
        first, *rest = sorted(samplers)
        raise r.fail(rest[0], f"atelier runs one sampler per prompt; nodes {', '.join(sorted(samplers))} are "
                              "several: queue them as separate prompts")
    sampler = samplers.pop()
    decoder = sorted(decoders)[0]
    if len(decoders) > 1:
        raise r.fail(sorted(decoders)[1], "atelier decodes a prompt's images once: use one VAEDecode")
    kind = r.nodes[sampler]["class_type"]
    fields: dict[str, Any] = {}

    # The model, through its LoRAs, to the checkpoint.
    loras: dict[str, float] = {}
    node, _ = r.link(sampler, "model", "CheckpointLoaderSimple", "LoraLoader", "LoraLoaderModelOnly")
    while r.nodes[node]["class_type"] != "CheckpointLoaderSimple":
        name = _stem(r.value(node, "lora_name"))
        if name in loras:
            raise r.fail(node, f"LoRA {name!r} is applied twice", "lora_name", name)
        loras[name] = r.value(node, "strength_model")
        if not -4 <= loras[name] <= 4:
            raise r.fail(node, "atelier applies a LoRA at -4 to 4", "strength_model", loras[name],
                         kind="value_bigger_than_max")
        if r.nodes[node]["class_type"] == "LoraLoader":  # checked; atelier applies strength_model to CLIP too
            r.value(node, "strength_clip", 1.0)
        origin["loras"] = (node, "lora_name")
        node, _ = r.link(node, "model", "CheckpointLoaderSimple", "LoraLoader", "LoraLoaderModelOnly")
    checkpoint = node
    model = _model(r, checkpoint)
    known = catalog.models[model]
    for name, _scale in loras.items():
        if name not in known:
            raise r.fail(origin["loras"][0], f"Value not in list: {model} has the LoRAs {', '.join(known) or '(none)'}",
                         "lora_name", name, kind="value_not_in_list")
    decode_vae, _ = r.link(decoder, "vae", "CheckpointLoaderSimple")
    if decode_vae != checkpoint:
        raise r.fail(decoder, f"atelier decodes with the sampler's checkpoint {checkpoint}'s VAE", "vae")
    fields.update(model=model, loras=loras)
    origin["model"] = (checkpoint, "ckpt_name")

    # The prompts: each CLIPTextEncode's clip must come from the same checkpoint (through its LoRAs).
    for name, field_name in (("positive", "prompt"), ("negative", "negative_prompt")):
        encoder, _ = r.link(sampler, name, "CLIPTextEncode")
        text = r.value(encoder, "text")
        clip, _ = r.link(encoder, "clip", "CheckpointLoaderSimple", "LoraLoader")
        passed = set()
        while r.nodes[clip]["class_type"] == "LoraLoader":
            if clip in passed:
                raise r.fail(clip, "the LoRAs' clip inputs go round in a loop", "clip")
            passed.add(clip)
            clip, _ = r.link(clip, "clip", "CheckpointLoaderSimple", "LoraLoader")
        if clip != checkpoint:
            raise r.fail(encoder, f"atelier encodes prompts with the sampler's checkpoint ({checkpoint})", "clip")
        fields[field_name] = text if field_name == "prompt" else (text if text.strip() else None)
        origin[field_name] = (encoder, "text")

    # The sampler's settings.
    seed_name = "seed" if kind == "KSampler" else "noise_seed"
    seed = r.value(sampler, seed_name)
    if not 0 <= seed < 2**64:
        raise r.fail(sampler, "seed must be 0 to 18446744073709551615", seed_name, seed, kind="value_bigger_than_max")
    steps = r.value(sampler, "steps")
    fields.update(seed=seed % SEED_RANGE, steps=steps, guidance=r.value(sampler, "cfg"))
    origin.update(seed=(sampler, seed_name), steps=(sampler, "steps"), guidance=(sampler, "cfg"))
    for name, table, field_name in (("sampler_name", SAMPLERS, "sampler"), ("scheduler", SCHEDULERS, "schedule")):
        chosen = r.value(sampler, name)
        if chosen not in table:
            raise r.fail(sampler, f"Value not in list: atelier takes {', '.join(table)}", name, chosen,
                         kind="value_not_in_list")
        fields[field_name] = table[chosen]
        origin[field_name] = (sampler, name)
    if kind == "KSampler":
        denoise = r.value(sampler, "denoise", 1.0)
        denoise_input = "denoise"
    else:
        for name, allowed in (("add_noise", "enable"), ("return_with_leftover_noise", "disable")):
            if r.value(sampler, name) != allowed:
                raise r.fail(sampler, f"atelier runs a whole sampling pass: {name} must be {allowed!r} (a "
                                      "partial pass, handed on to another sampler, is not something it runs)", name,
                             r.value(sampler, name))
        start, end = r.value(sampler, "start_at_step"), r.value(sampler, "end_at_step")
        if end < steps:
            raise r.fail(sampler, f"atelier runs every step to the end: end_at_step must be at least steps ({steps})",
                         "end_at_step", end)
        if not 0 <= start < steps:
            raise r.fail(sampler, f"start_at_step must be 0 to {steps - 1}", "start_at_step", start)
        denoise = (steps - start) / steps  # starting later on an image is img2img's strength
        denoise_input = "start_at_step"
    origin["strength"] = (sampler, denoise_input)
    origin["count"] = origin["width"] = origin["height"] = (sampler, "latent_image")

    # The latent: empty (txt2img), an encoded upload (img2img), or one with a mask (inpainting).
    latent, _ = r.link(sampler, "latent_image", "EmptyLatentImage", "VAEEncode", "VAEEncodeForInpaint",
                       "SetLatentNoiseMask")
    latent_class = r.nodes[latent]["class_type"]
    plan = Plan(fields=fields, sampler=sampler, decoder=decoder,
                outputs={o: OUTPUT_NODES[r.nodes[o]["class_type"]] for o in r.outputs}, origin=origin,
                classes={n: b["class_type"] for n, b in r.nodes.items()})
    for out in r.outputs:
        if r.nodes[out]["class_type"] == "SaveImage":
            prefix = r.value(out, "filename_prefix", "ComfyUI")
            if len(prefix) > 200:
                raise r.fail(out, "at most 200 characters", "filename_prefix", kind="value_bigger_than_max")
    if latent_class == "EmptyLatentImage":
        if kind == "KSampler" and denoise != 1.0:
            raise r.fail(sampler, "denoise below 1 on an empty latent: atelier's text-to-image denoises fully; use 1 "
                                  "(or VAEEncode a LoadImage for image-to-image)", denoise_input, denoise)
        if kind == "KSamplerAdvanced" and denoise != 1.0:
            raise r.fail(sampler, "start_at_step above 0 on an empty latent: atelier's text-to-image starts at the "
                                  "first step", "start_at_step", r.value(sampler, "start_at_step"))
        for name in ("width", "height"):
            value = r.value(latent, name)
            if value < 8:
                raise r.fail(latent, "atelier makes images of 8 pixels a side at least", name, value,
                             kind="value_not_valid")
            fields[name] = value // 8 * 8  # the latent is an eighth of it: ComfyUI makes it rounded down too
            origin[name] = (latent, name)
        count = r.value(latent, "batch_size")
        if not 1 <= count <= 16:
            raise r.fail(latent, "atelier makes 1 to 16 images a job", "batch_size", count,
                         kind="value_bigger_than_max")
        fields.update(kind="txt2img", count=count)
        origin["count"] = (latent, "batch_size")
        return plan
    if not 0 < denoise <= 1:
        raise r.fail(sampler, "denoise must be above 0 and at most 1 for image-to-image", denoise_input, denoise,
                     kind="value_smaller_than_min")
    fields.update(kind="img2img", strength=denoise)
    encoder = latent
    if latent_class == "SetLatentNoiseMask":
        encoder, _ = r.link(latent, "samples", "VAEEncode")
    pixels, _ = r.link(encoder, "pixels", "LoadImage")
    vae, _ = r.link(encoder, "vae", "CheckpointLoaderSimple")
    if vae != checkpoint:
        raise r.fail(encoder, f"atelier encodes with the sampler's checkpoint {checkpoint}'s VAE", "vae")
    plan.image = _upload(r, pixels)
    width, height, _ = catalog.uploads[plan.image]
    if width < 8 or height < 8:
        raise r.fail(pixels, "the image is smaller than 8 pixels", "image", plan.image)
    fields.update(width=width // 8 * 8, height=height // 8 * 8)  # as VAEEncode crops it
    if latent_class != "VAEEncode":
        mask_node, slot = r.link(latent, "mask", "LoadImage")
        grow = r.value(latent, "grow_mask_by", 6) if latent_class == "VAEEncodeForInpaint" else 0
        if not 0 <= grow <= 64:
            raise r.fail(latent, "0 to 64", "grow_mask_by", grow, kind="value_bigger_than_max")
        name = _upload(r, mask_node)
        if not catalog.uploads[name][2]:
            raise r.fail(mask_node, "this image has no alpha channel, so its mask is empty: nothing would be "
                                    "painted (make the parts to paint transparent)", "image", name)
        plan.mask = (name, grow)
    return plan


def _stem(name: str) -> str:
    path = PurePosixPath(name.replace("\\", "/"))
    return path.stem if path.suffix.lower() in CHECKPOINT_SUFFIXES else path.name


def _model(r: _Reader, node: str) -> str:
    asked = r.value(r_node := node, "ckpt_name")
    for candidate in (asked, _stem(asked)):
        if candidate in r.catalog.models:
            return candidate
    raise r.fail(r_node, f"Value not in list: atelier's image models are {', '.join(r.catalog.models)}", "ckpt_name",
                 asked, kind="value_not_in_list")


ANNOTATION = re.compile(r"\s*\[(input|output|temp)\]$")


def _upload(r: _Reader, node: str) -> str:
    asked = r.value(node, "image")
    name = ANNOTATION.sub("", asked)
    if name not in r.catalog.uploads:
        raise r.fail(node, "no such image among your uploads: send it to /upload/image first", "image", asked,
                     kind="value_not_in_list")
    return name
