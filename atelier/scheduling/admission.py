"""What a job must be to be queued, beyond what pydantic checks: the catalog's and the family's rules.

``check`` refuses, naming the field, a job a model cannot run: an unknown model, a kind its
family does not do, a size, count or number of steps above its limits, an input the kind does
not take (or a missing one it needs), an input image that is not a PNG, JPEG or WebP or has too
many pixels, an option that means nothing for what the model makes (frames for an
image, a strength without an input image), an output format of another medium. ``resolve``
then fills in every default, so a runner gets a job with nothing left to decide, and every
attempt of it makes the same outputs. ``check_images`` reads every pixel of the input images
(the scheduler calls it off its event loop), so that a damaged one fails at submit.
"""

from __future__ import annotations

import random

from atelier import samplers
from atelier.config import Config
from atelier.jobs import ErrorCode, JobInputs, JobKind, JobSpec, Priority
from atelier.media import InputImageError, open_input
from atelier.registry import FAMILIES, FamilyLimits

# The inputs each kind needs, and those it may take besides.
NEEDS = {JobKind.img2img: {"image"}, JobKind.img2vid: {"image"}, JobKind.upscale: {"image"}}
MAY_TAKE = {JobKind.img2img: {"mask"}}
# Inputs any kind may bring, if the model's catalog entry has what reads them (_check_conditioning).
CONDITIONING_INPUTS = {"control_image", "ip_adapter_image"}
DEFAULT_STRENGTH = 0.75
# Parentheses nested this deep at most in a prompt that compel parses (a model's prompt_weighting):
# its grammar recurses per level, and a few dozen levels exhaust Python's stack. A1111 users write
# "((best quality))"; nobody's prompt means ten levels.
MAX_PROMPT_NESTING = 10


class Refused(Exception):
    """A submit or cancel the policy turns down, with what the caller needs to fix or wait for."""

    def __init__(self, code: ErrorCode, message: str, field: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s


def _bad(field: str, message: str) -> Refused:
    return Refused(ErrorCode.bad_request, message, field=field)


def check(spec: JobSpec, inputs: JobInputs | None, config: Config) -> None:
    entry = config.models.get(spec.model)
    if entry is None:
        known = ", ".join(sorted(config.models))
        raise Refused(ErrorCode.unknown_model, f"unknown model {spec.model!r}; available: {known}", field="model")
    lim = entry.limits
    what = f"{spec.model} ({entry.family})"
    # Only a job with input images needs it, and it walks every model's limits: a tenth of the
    # scheduler's time per submit when every submit computed it.
    max_pixels = config.input_pixel_budget if inputs is not None else 0
    if spec.kind.value not in lim.kinds:
        raise _bad("kind", f"{what} does not do {spec.kind.value}; it does {', '.join(sorted(lim.kinds))}")
    if spec.kind is JobKind.train or spec.train is not None:
        if entry.parallel is not None:
            raise _bad("model", f"model: {spec.model} runs on a gang (its catalog entry has parallel), and a "
                                "training runs on one device; train on a model without parallel")
        _check_training(spec, inputs, lim, max_pixels)
        return
    for name, value, limit in (("width", spec.width, lim.max_width), ("height", spec.height, lim.max_height)):
        if value is not None and value > limit:
            raise _bad(name, f"{name} {value} is above {spec.model}'s limit of {limit}")
    if spec.count > lim.max_count:
        raise _bad("count", f"count {spec.count} is above {spec.model}'s limit of {lim.max_count}")
    if spec.steps is not None and spec.steps > lim.max_steps:
        raise _bad("steps", f"steps {spec.steps} is above {spec.model}'s limit of {lim.max_steps}")
    if entry.options.get("prompt_weighting"):
        _check_nesting(spec)
    _check_inputs(spec, inputs, lim, what, max_pixels)
    _check_media(spec, lim, what)
    _check_sampler(spec, entry)
    # "@owner/name" is a user's trained LoRA, resolved (and its use allowed) by the policy's LoraBook.
    unknown = sorted(name for name in set(spec.loras) - set(entry.loras) if not name.startswith("@"))
    if unknown:
        offered = ", ".join(sorted(entry.loras)) or "none"
        raise _bad("loras", f"loras: {spec.model} has no LoRA {unknown[0]!r} (it has: {offered})")
    _check_conditioning(spec, set(inputs.names()) if inputs is not None else set(), entry.controlnets,
                        entry.ip_adapter is not None)


def _check_training(spec: JobSpec, inputs: JobInputs | None, lim: FamilyLimits, max_pixels: int) -> None:
    """A training: its settings, one to MAX_TRAIN_IMAGES instance images and nothing else."""
    train = spec.train
    if spec.kind is not JobKind.train:
        raise _bad("train", f"train: only a job of kind train has training settings, not {spec.kind.value}")
    if train is None:
        raise _bad("train", "train: a training job needs its settings (at least a name for the LoRA)")
    images = inputs.train_images if inputs is not None else []
    if not images:
        raise _bad("train_images", "train_images: a training needs at least one instance image")
    others = [name for name in (inputs.names() if inputs is not None else []) if name != "train_images"]
    if others:
        raise _bad(others[0], f"{others[0]}: a training takes instance images only (train_images)")
    if len(train.captions) > len(images):
        raise _bad("train.captions", f"train.captions: {len(train.captions)} captions for {len(images)} images")
    side = min(lim.max_width, lim.max_height)
    if train.resolution > side:
        raise _bad("train.resolution", f"train.resolution {train.resolution} is above {spec.model}'s limit of {side}")
    if train.class_images and train.class_prompt is None:
        raise _bad("train.class_prompt", "train.class_prompt: prior preservation (class_images) needs the class "
                                         "prompt its images are made from")
    for name, value in (("count", spec.count != 1), ("loras", spec.loras), ("controlnet", spec.controlnet),
                        ("sampler", spec.sampler), ("session", spec.session)):
        if value:
            raise _bad(name, f"{name}: a training job takes none (its settings are in train)")
    for n, data in enumerate(images):
        _image_size(data, max_pixels, f"train_images/{n}")


def _check_sampler(spec: JobSpec, entry) -> None:
    found = samplers.problem(spec.sampler, spec.schedule, FAMILIES[entry.family].samplers, entry.family)
    if found is None and spec.sampler is not None and entry.parallel is not None and entry.parallel.backend == "xfuser":
        found = "sampler", f"sampler: {spec.model} runs on a gang through xDiT, whose pipeline keeps the model's own " \
                           "scheduler; leave sampler out"
    if found is not None:
        raise _bad(*found)


def check_images(inputs: JobInputs | None, config: Config) -> None:
    """Decodes every input image in full, refusing one that is damaged or cut short: a bad image fails
    its own submit, never a batch it would share with others. CPU work: call it off the event loop."""
    if inputs is None:
        return
    for name, data in inputs.files():
        _open(data, name, config.input_pixel_budget, decode=True).close()


def _check_nesting(spec: JobSpec) -> None:
    for name, prompt in (("prompt", spec.prompt), ("negative_prompt", spec.negative_prompt or "")):
        depth = deepest = 0
        for char in prompt:
            if char == "(":
                depth += 1
                deepest = max(deepest, depth)
            elif char == ")":
                depth = max(0, depth - 1)
        if deepest > MAX_PROMPT_NESTING:
            raise _bad(name, f"{name}: parentheses nested {deepest} deep; {spec.model} weighs prompts, and takes "
                             f"at most {MAX_PROMPT_NESTING} levels")


def _check_inputs(spec: JobSpec, inputs: JobInputs | None, lim: FamilyLimits, what: str, max_pixels: int) -> None:
    given = set(inputs.names()) if inputs is not None else set()
    needed = NEEDS.get(spec.kind, set())
    allowed = needed | MAY_TAKE.get(spec.kind, set()) | CONDITIONING_INPUTS
    if "mask" in allowed and not lim.inpaint:
        allowed = allowed - {"mask"}
    for name in sorted(needed - given):
        raise _bad(name, f"{name}: {spec.kind.value} needs an input {name}")
    for name in sorted(given - allowed):
        raise _bad(name, f"{name}: {what} takes no {name} for {spec.kind.value}")
    for name in sorted(given):
        _image_size(getattr(inputs, name), max_pixels, name)
    if spec.strength is not None and "image" not in given:
        raise _bad("strength", "strength: only a job that starts from an image has one")


def _check_conditioning(spec: JobSpec, given: set[str], controlnets: dict[str, str], ip_adapter: bool) -> None:
    """A control image goes with one of the model's ControlNets, an IP-Adapter image with its IP-Adapter."""
    offered = f"(it has: {', '.join(sorted(controlnets)) or 'none'})"
    if spec.controlnet is not None and spec.controlnet not in controlnets:
        raise _bad("controlnet", f"controlnet: {spec.model} has no ControlNet {spec.controlnet!r} {offered}")
    if "control_image" in given and spec.controlnet is None:
        raise _bad("controlnet", f"controlnet: a control_image needs a controlnet to read it {offered}")
    if spec.controlnet is not None and "control_image" not in given:
        raise _bad("control_image", f"control_image: controlnet {spec.controlnet!r} needs a control image")
    if spec.controlnet_scale is not None and spec.controlnet is None:
        raise _bad("controlnet_scale", "controlnet_scale: only a job with a controlnet has one")
    if "ip_adapter_image" in given and not ip_adapter:
        raise _bad("ip_adapter_image", f"ip_adapter_image: {spec.model} has no ip_adapter in its catalog entry")
    if spec.ip_adapter_scale is not None and "ip_adapter_image" not in given:
        raise _bad("ip_adapter_scale", "ip_adapter_scale: only a job with an ip_adapter_image has one")


def _check_media(spec: JobSpec, lim: FamilyLimits, what: str) -> None:
    for name, value, media in (("frames", spec.frames, "video"), ("fps", spec.fps, "video"),
                               ("duration_s", spec.duration_s, "audio")):
        if value is not None and lim.media != media:
            raise _bad(name, f"{name}: {what} makes {lim.media}, not {media}")
    if spec.frames is not None and lim.max_frames is not None and spec.frames > lim.max_frames:
        raise _bad("frames", f"frames {spec.frames} is above {spec.model}'s limit of {lim.max_frames}")
    if spec.duration_s is not None and lim.max_duration_s is not None and spec.duration_s > lim.max_duration_s:
        raise _bad("duration_s", f"duration_s {spec.duration_s} is above {spec.model}'s limit of "
                                 f"{lim.max_duration_s}")
    formats = lim.formats
    if spec.output_format is not None and spec.output_format not in formats:
        raise _bad("output_format", f"output_format {spec.output_format!r}: {what} makes {lim.media}; "
                                    f"choose {', '.join(formats)}")


def resolve(spec: JobSpec, inputs: JobInputs | None, config: Config, rng: random.Random) -> JobSpec:
    """The job with every default filled in, and a seed, so every attempt makes the same outputs."""
    lim = config.models[spec.model].limits
    if spec.kind is JobKind.train:
        # Batch priority, whoever asks: a training yields the device to people waiting for an image.
        side = spec.train.resolution
        return spec.model_copy(update={"width": side, "height": side, "priority": Priority.batch, "steps": None,
                                       "seed": rng.randrange(2**32) if spec.seed is None else spec.seed,
                                       "inputs": inputs.names() if inputs is not None else [], "previews": True,
                                       "output_format": None, "guidance": None})
    width, height = spec.width, spec.height
    if inputs is not None and inputs.image is not None and (width is None or height is None):
        # A job that starts from an image keeps its size (within the model's limits, in steps of 8).
        source_w, source_h = _image_size(inputs.image, config.input_pixel_budget)
        width = width or max(8, min(source_w, lim.max_width) // 8 * 8)
        height = height or max(8, min(source_h, lim.max_height) // 8 * 8)
    video, audio = lim.media == "video", lim.media == "audio"
    return spec.model_copy(update={
        "width": width or lim.default_width,
        "height": height or lim.default_height,
        "steps": spec.steps or lim.default_steps,
        "guidance": lim.default_guidance if spec.guidance is None else spec.guidance,
        "seed": rng.randrange(2**32) if spec.seed is None else spec.seed,
        "strength": spec.strength if spec.strength is not None else
        (DEFAULT_STRENGTH if spec.kind is JobKind.img2img else None),
        "frames": spec.frames or (lim.default_frames if video else None),
        "fps": spec.fps or (lim.default_fps if video else None),
        "duration_s": spec.duration_s or (lim.default_duration_s if audio else None),
        "output_format": spec.output_format or lim.formats[0],
        "inputs": inputs.names() if inputs is not None else [],
        "loras": dict(sorted(spec.loras.items())),  # one order: the same choice batches together
        "controlnet_scale": 1.0 if spec.controlnet is not None and spec.controlnet_scale is None else
        spec.controlnet_scale,
        "ip_adapter_scale": 1.0 if inputs is not None and inputs.ip_adapter_image is not None and
        spec.ip_adapter_scale is None else spec.ip_adapter_scale,
    })


def _image_size(data: bytes, max_pixels: int, name: str = "image") -> tuple[int, int]:
    """The size of an encoded image, from its header alone (no pixel is read for this)."""
    with _open(data, name, max_pixels, decode=False) as image:
        return image.size


def _open(data: bytes, name: str, max_pixels: int, *, decode: bool):
    try:
        return open_input(data, name, max_pixels, decode=decode)
    except InputImageError as exc:
        raise Refused(ErrorCode.too_large if exc.too_large else ErrorCode.bad_request, str(exc), field=name) from None
