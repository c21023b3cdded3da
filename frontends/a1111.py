"""AUTOMATIC1111's web UI API (``/sdapi/v1/…``), as its API clients (webuiapi, Krita's and Photoshop's
plugins, Discord bots, scripts) call it.

Requests ignore fields atelier does not know, as A1111 itself does (its clients send dozens of
settings), and refuse the features they name that atelier does not have, so none is silently ignored.
Errors are A1111's ``{"detail": ...}``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from aiohttp import web
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from actors.actor import RemoteError
from atelier import media, samplers
from atelier.jobs import ErrorCode, JobInputs, JobKind, JobSpec
from atelier.registry import FAMILIES
from frontends import a1111_names as names
from frontends.api import decode_image, prompt_field
from frontends.httpbase import Gateway, Problem, Surface, json_response, parse, read_json


class A1111Generate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # Stricter than A1111 where a JobSpec is: a prompt is required, sizes are multiples of 8.
    prompt: str = prompt_field()
    negative_prompt: str = Field(default="", max_length=4000)
    seed: int = Field(default=-1, le=2**63 - 1)  # negative: random
    batch_size: int = Field(default=1, ge=1, le=16)
    n_iter: int = Field(default=1, ge=1, le=16)
    steps: int | None = Field(default=None, ge=1, le=500)  # None: the model's default
    cfg_scale: float | None = Field(default=None, ge=0, le=50)
    # Any size, as A1111 takes it: its latents are an eighth of it, so it makes the size rounded down to 8.
    width: int | None = Field(default=None, ge=8, le=8192)
    height: int | None = Field(default=None, ge=8, le=8192)
    # A1111's names (/sdapi/v1/samplers, /schedulers); neither: the model's own scheduler.
    sampler_name: str | None = Field(default=None, max_length=100)
    sampler_index: str | None = Field(default=None, max_length=100)  # the old name of sampler_name
    scheduler: str | None = Field(default=None, max_length=100)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    # Features of A1111 that atelier does not have: refused when asked for, never silently skipped.
    # The handler refuses them, with a message saying why; the document says which values pass.
    restore_faces: bool | None = Field(default=None, json_schema_extra={"enum": [False, None]})
    tiling: bool | None = Field(default=None, json_schema_extra={"enum": [False, None]})
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict, json_schema_extra={"maxProperties": 0})
    styles: list[str] = Field(default_factory=list, json_schema_extra={"maxItems": 0})
    script_name: str | None = Field(default=None, json_schema_extra={"enum": [None, ""]})


class A1111Txt2Img(A1111Generate):
    # Hires fix, in passes as A1111 makes it: the image at width x height, upscaled by hr_upscaler to
    # hr_scale times that (or to hr_resize_x x hr_resize_y), then img2img at that size.
    enable_hr: bool = False
    hr_upscaler: str | None = Field(default=None, max_length=100)  # None: A1111's default, "Latent"
    hr_scale: float = Field(default=2.0, gt=0, le=8)
    hr_resize_x: int = Field(default=0, ge=0, le=8192)
    hr_resize_y: int = Field(default=0, ge=0, le=8192)
    hr_second_pass_steps: int = Field(default=0, ge=0, le=500)  # 0: steps
    denoising_strength: float | None = Field(default=None, ge=0, le=1)  # the second pass's; None: 0.75
    hr_checkpoint_name: str | None = Field(default=None, max_length=300)
    hr_sampler_name: str | None = Field(default=None, max_length=100)
    hr_scheduler: str | None = Field(default=None, max_length=100)
    hr_prompt: str = Field(default="", max_length=4000)
    hr_negative_prompt: str = Field(default="", max_length=4000)


class A1111Img2Img(A1111Generate):
    init_images: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)  # the first is the source
    denoising_strength: float = Field(default=0.75, gt=0, le=1)
    mask: str | None = None


class A1111Images(BaseModel):
    images: list[str]  # base64 PNG
    parameters: dict[str, Any]
    info: str  # JSON, as A1111 sends it


class A1111Model(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class A1111ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class A1111Progress(BaseModel):
    progress: float
    eta_relative: float
    state: A1111ProgressState
    current_image: str | None = None  # base64 of the latest preview
    textinfo: str | None = None


class A1111Error(BaseModel):
    detail: str


class A1111Extras(BaseModel):
    """``/sdapi/v1/extra-single-image`` and ``extra-batch-images``: upscaling (A1111's "Extras" tab)."""

    model_config = ConfigDict(extra="ignore")

    resize_mode: Literal[0, 1] = 0  # 0: by upscaling_resize; 1: to upscaling_resize_w x upscaling_resize_h
    upscaling_resize: float = Field(default=2.0, gt=0, le=8)
    upscaling_resize_w: int = Field(default=512, ge=1, le=8192)
    upscaling_resize_h: int = Field(default=512, ge=1, le=8192)
    upscaling_crop: bool = True
    upscaler_1: str = Field(default="None", max_length=100)
    upscaler_2: str = Field(default="None", max_length=100)
    extras_upscaler_2_visibility: float = Field(default=0, ge=0, le=1)
    gfpgan_visibility: float = Field(default=0, ge=0, le=1)
    codeformer_visibility: float = Field(default=0, ge=0, le=1)


class A1111ExtrasSingle(A1111Extras):
    image: str = Field(min_length=1)


class A1111BatchImage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    data: str = Field(min_length=1)
    name: str = Field(default="", max_length=300)


class A1111ExtrasBatch(A1111Extras):
    imageList: list[A1111BatchImage] = Field(min_length=1, max_length=16)  # noqa: N815 (A1111's name)


class A1111PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str = Field(min_length=1)


# Settings atelier has, for /sdapi/v1/options and override_settings. The checkpoint and the file format
# are chosen; the VAE and CLIP skip are what atelier always does, accepted only at that value.
FIXED_SETTINGS = {"sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1}
SAMPLES_FORMATS = ("png", "webp")
SAME = {"", "Use same checkpoint", "Use same sampler", "Use same scheduler"}  # A1111's "as the first pass"
UPSCALER_PROMPT = "a detailed, high quality image"  # the upscaler model's prompt when the image carries none


class A1111Surface(Surface):
    paths = ("/sdapi/",)
    basic_auth = True
    image_routes = frozenset({"/sdapi/v1/img2img", "/sdapi/v1/extra-single-image", "/sdapi/v1/extra-batch-images",
                              "/sdapi/v1/png-info"})

    def __init__(self, gateway: Gateway):
        super().__init__(gateway)
        self.current: dict[str, str] = {}  # user -> their latest /sdapi job, for /progress, /interrupt, /skip
        self.options: dict[str, dict[str, Any]] = {}  # user -> what they set through POST /options

    def routes(self) -> list[web.AbstractRouteDef]:
        empty_list = self._answer([])
        return [web.post("/sdapi/v1/txt2img", self.txt2img), web.post("/sdapi/v1/img2img", self.img2img),
                web.get("/sdapi/v1/sd-models", self.models), web.get("/sdapi/v1/progress", self.progress),
                web.post("/sdapi/v1/interrupt", self.interrupt), web.post("/sdapi/v1/skip", self.skip),
                web.get("/sdapi/v1/options", self.get_options), web.post("/sdapi/v1/options", self.set_options),
                web.get("/sdapi/v1/samplers", self.samplers), web.get("/sdapi/v1/schedulers", self.schedulers),
                web.get("/sdapi/v1/upscalers", self.upscalers), web.get("/sdapi/v1/loras", self.loras),
                web.post("/sdapi/v1/extra-single-image", self.extra_single),
                web.post("/sdapi/v1/extra-batch-images", self.extra_batch),
                web.post("/sdapi/v1/png-info", self.png_info), web.get("/sdapi/v1/memory", self.memory),
                # The catalog is the configuration: there is nothing to re-read (A1111 answers null too).
                web.post("/sdapi/v1/refresh-checkpoints", self._answer(None)),
                web.post("/sdapi/v1/refresh-loras", self._answer(None)),
                web.get("/sdapi/v1/cmd-flags", self._answer({"api": True, "nowebui": True})),
                web.get("/sdapi/v1/embeddings", self._answer({"loaded": {}, "skipped": {}})),
                web.get("/sdapi/v1/scripts", self._answer({"txt2img": [], "img2img": []})),
                # What atelier has none of: the catalog's VAEs are its models' own, not a choice.
                *(web.get(f"/sdapi/v1/{name}", empty_list) for name in (
                    "sd-vae", "prompt-styles", "face-restorers", "realesrgan-models", "hypernetworks",
                    "script-info", "extensions", "latent-upscale-modes"))]

    def render(self, problem: Problem) -> tuple[BaseModel, int]:
        return A1111Error(detail=problem.message), problem.status

    @staticmethod
    def _answer(value: Any):
        async def answer(request: web.Request) -> web.Response:
            return web.json_response(value)
        return answer

    # -- generating ------------------------------------------------------------ #

    async def txt2img(self, request: web.Request) -> web.Response:
        body = parse(A1111Txt2Img, await read_json(request))
        return await self._generate(request, body, JobKind.txt2img)

    async def img2img(self, request: web.Request) -> web.Response:
        body = parse(A1111Img2Img, await read_json(request))
        if not body.init_images:
            raise Problem(422, "bad_request", "init_images: img2img needs an init image", field="init_images")
        found = {}
        for name, value in (("image", body.init_images[0]), ("mask", body.mask)):
            if value:
                found[name] = self._decode(value, "init_images" if name == "image" else name)
        return await self._generate(request, body, JobKind.img2img, JobInputs(**found), body.denoising_strength)

    async def _generate(self, request: web.Request, body: A1111Generate, kind: JobKind,
                        inputs: JobInputs | None = None, strength: float | None = None) -> web.Response:
        caller = request["caller"]
        for name, asked in (("restore_faces", body.restore_faces), ("tiling", body.tiling),
                            ("alwayson_scripts", body.alwayson_scripts), ("styles", body.styles),
                            ("script_name", body.script_name)):
            if asked:
                raise Problem(422, "bad_request", f"{name}: atelier has no such feature; leave it off", field=name)
        settings = {**self.options.get(caller.user, {}), **self._settings(body.override_settings, "override_settings")}
        model = settings.get("sd_model_checkpoint") or self.gateway.config.default_model
        spec = self._spec(caller, kind=kind, model=model, prompt=body.prompt, negative=body.negative_prompt,
                          sampler=(body.sampler_name or body.sampler_index, body.scheduler, "sampler_name"),
                          width=_eighth(body.width), height=_eighth(body.height), steps=body.steps,
                          guidance=body.cfg_scale,
                          seed=None if body.seed < 0 else body.seed, count=body.batch_size * body.n_iter,
                          strength=strength, output_format=settings.get("samples_format"))
        if isinstance(body, A1111Txt2Img) and body.enable_hr:
            outputs, job = await self._hires(caller, body, spec)
        else:
            result = await self._run(spec, caller, inputs)
            outputs, job = result.outputs, result.job.spec
        first = outputs[0] if outputs else None
        info = {"prompt": job.prompt, "all_prompts": [job.prompt] * len(outputs),
                "negative_prompt": body.negative_prompt, "all_negative_prompts": [body.negative_prompt] * len(outputs),
                "seed": first.seed if first else job.seed, "all_seeds": [o.seed for o in outputs],
                "width": job.width, "height": job.height, "steps": job.steps, "cfg_scale": job.guidance,
                "sampler_name": names.label(job.sampler), "scheduler": names.schedule_label(job.schedule),
                "sd_model_name": job.model, "sd_model_hash": None, "denoising_strength": job.strength,
                "clip_skip": 1, "batch_size": body.batch_size, "n_iter": body.n_iter, "index_of_first_image": 0,
                "restore_faces": False, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
                "extra_generation_params": {"Lora hashes": None} if job.loras else {},
                "infotexts": [media.parameters(job, o.seed or 0) for o in outputs]}
        images = [base64.b64encode(o.data).decode("ascii") for o in outputs] if body.send_images else []
        return json_response(A1111Images(images=images, parameters=body.model_dump(), info=json.dumps(info)))

    def _spec(self, caller: Any, *, model: str, prompt: str, negative: str, sampler: tuple, **fields: Any) -> JobSpec:
        """A JobSpec from A1111's names, checked here where A1111's names can say what is wrong."""
        name, scheduler, field = sampler
        try:
            chosen, schedule = names.choose(name, scheduler, field)
        except names.UnknownName as exc:
            raise Problem(422, "bad_request", str(exc), field=field) from None
        entry = self.gateway.config.models[model]
        table = FAMILIES[entry.family].samplers if entry.family in FAMILIES else None
        why = samplers.problem(chosen, schedule, table, entry.family)
        if why is not None:
            offered = [names.label(s) for s in names.samplers_for({table})] if table else []
            raise Problem(422, "bad_request", f"{field} {name!r} (scheduler {scheduler or 'Automatic'!r}) on {model}: "
                          f"{why[1]}" + (f"; A1111's names for them: {', '.join(offered)}" if offered else ""),
                          field=field)
        prompt_field_name = "hr_prompt" if field.startswith("hr_") else "prompt"
        try:
            text, loras = media.split_loras(prompt)
        except ValueError as exc:
            raise Problem(422, "bad_request", f"{prompt_field_name}: {exc}", field=prompt_field_name) from None
        missing = [lora for lora in loras if lora not in entry.loras]
        if missing:
            raise Problem(422, "bad_request", f"{prompt_field_name}: <lora:{missing[0]}>: the model {model} has no "
                          f"LoRA {missing[0]!r}; it has {', '.join(entry.loras) or 'none'} (see /sdapi/v1/loras)",
                          field=prompt_field_name)
        if not text.strip():
            raise Problem(422, "bad_request", f"{prompt_field_name}: the prompt is only LoRA tags; say what to draw",
                          field=prompt_field_name)
        return self.gateway.owned(parse(JobSpec, {
            "model": model, "prompt": text, "negative_prompt": negative or None, "sampler": chosen,
            "schedule": schedule, "loras": loras, **fields}), caller)

    async def _run(self, spec: JobSpec, caller: Any, inputs: JobInputs | None = None) -> Any:
        self.current[spec.user] = spec.id
        return await self.gateway.generate(spec, caller, inputs)

    async def _hires(self, caller: Any, body: A1111Txt2Img, first: JobSpec) -> tuple[list[Any], JobSpec]:
        """A1111's hires fix in passes: the image at its size, upscaled, then img2img at the target size.
        Everything is checked before the first pass runs."""
        config = self.gateway.config
        try:
            upscaler = names.upscaler(body.hr_upscaler or "Latent", self._upscaler_models(), "hr_upscaler")
        except names.UnknownName as exc:
            default = " (A1111's default for enable_hr)" if body.hr_upscaler is None else ""
            raise Problem(422, "bad_request", f"enable_hr: {exc}{default}", field="hr_upscaler") from None
        limits = config.models[first.model].limits
        width, height = first.width or limits.default_width, first.height or limits.default_height
        if body.hr_resize_x or body.hr_resize_y:
            target_w = body.hr_resize_x or round(body.hr_resize_y * width / height)
            target_h = body.hr_resize_y or round(body.hr_resize_x * height / width)
            size_field = "hr_resize_x"
        else:
            target_w, target_h, size_field = round(width * body.hr_scale), round(height * body.hr_scale), "hr_scale"
        target_w, target_h = max(8, target_w // 8 * 8), max(8, target_h // 8 * 8)  # JobSpec's multiples of 8
        model = first.model if body.hr_checkpoint_name in (None, *SAME) else \
            self._model(body.hr_checkpoint_name, "hr_checkpoint_name")
        hr_limits = config.models[model].limits
        if target_w > hr_limits.max_width or target_h > hr_limits.max_height:
            raise Problem(422, "bad_request", f"{size_field}: the hires size {target_w}x{target_h} is more than "
                          f"{model}'s {hr_limits.max_width}x{hr_limits.max_height}", field=size_field)
        strength = 0.75 if body.denoising_strength is None else body.denoising_strength
        if strength <= 0:
            raise Problem(422, "bad_request", "denoising_strength: the hires pass needs more than 0",
                          field="denoising_strength")
        same_sampler = body.hr_sampler_name in (None, *SAME)
        sampler = ((body.sampler_name or body.sampler_index) if same_sampler else body.hr_sampler_name,
                   body.scheduler if same_sampler and body.hr_scheduler in (None, *SAME) else body.hr_scheduler,
                   "hr_sampler_name")
        prompt = body.hr_prompt or body.prompt
        second = self._spec(caller, kind=JobKind.img2img, model=model, prompt=prompt, sampler=sampler,
                            negative=body.hr_negative_prompt or body.negative_prompt, width=target_w, height=target_h,
                            steps=body.hr_second_pass_steps or body.steps, guidance=body.cfg_scale, strength=strength,
                            output_format=first.output_format)
        base = await self._run(first, caller)
        outputs = []
        for image in base.outputs:
            bigger = await self._upscale(caller, bytes(image.data), upscaler, (target_w, target_h), second.prompt,
                                         "hr_upscaler")
            spec = second.model_copy(update={"id": uuid.uuid4().hex, "seed": image.seed})
            result = await self._run(spec, caller, JobInputs(image=bigger))
            outputs.extend(result.outputs)
        return outputs, result.job.spec

    # -- upscaling ------------------------------------------------------------- #

    def _upscaler_models(self) -> list[str]:
        return [name for name, entry in self.gateway.config.models.items()
                if entry.family == "sd-upscaler" and "upscale" in entry.limits.kinds]

    async def _upscale(self, caller: Any, data: bytes, upscaler: str, size: tuple[int, int], prompt: str,
                       field: str) -> bytes:
        """The image at ``size``: Pillow's resize, or the upscaler model's 4x then resized to ``size``."""
        if upscaler not in names.RESIZERS:
            spec = self.gateway.owned(parse(JobSpec, {"kind": JobKind.upscale, "model": upscaler, "prompt": prompt}),
                                      caller)
            data = bytes((await self._run(spec, caller, JobInputs(image=data))).outputs[0].data)
        image = self._open(data, field)

        def resize() -> bytes:
            resized = image
            if image.size != size:
                resample = Image.Resampling.NEAREST if upscaler == "Nearest" else Image.Resampling.LANCZOS
                resized = image.convert("RGB").resize(size, resample)
            out = io.BytesIO()
            resized.save(out, format="PNG")
            return out.getvalue()

        return await asyncio.to_thread(resize)  # a large resize would stall every other request meanwhile

    def _open(self, data: bytes, field: str) -> Image.Image:
        try:
            return media.open_input(data, field, self.gateway.config.input_pixel_budget)
        except media.InputImageError as exc:
            raise Problem(413 if exc.too_large else 422, "bad_request", str(exc), field=field) from None

    @staticmethod
    def _decode(value: str, field: str) -> bytes:
        try:
            return decode_image(value)
        except ValueError as exc:
            raise Problem(422, "bad_request", f"{field}: {exc}", field=field) from None

    async def _extras(self, request: web.Request, body: A1111Extras, images: list[tuple[str, str]]) -> list[str]:
        for name, amount in (("gfpgan_visibility", body.gfpgan_visibility),
                             ("codeformer_visibility", body.codeformer_visibility)):
            if amount:
                raise Problem(422, "bad_request", f"{name}: atelier has no face restorers; leave it 0", field=name)
        if body.upscaler_2 != "None" and body.extras_upscaler_2_visibility:
            raise Problem(422, "bad_request", "upscaler_2: atelier blends no second upscaler; leave it \"None\"",
                          field="upscaler_2")
        try:
            upscaler = names.upscaler(body.upscaler_1, self._upscaler_models(), "upscaler_1")
        except names.UnknownName as exc:
            raise Problem(422, "bad_request", str(exc), field="upscaler_1") from None
        out = []
        for field, value in images:
            data = self._decode(value, field)
            source = self._open(data, field)
            if body.resize_mode == 1:
                size = (body.upscaling_resize_w, body.upscaling_resize_h)
            else:
                size = (round(source.width * body.upscaling_resize), round(source.height * body.upscaling_resize))
            if max(size) > 8192 or size[0] * size[1] > self.gateway.config.input_pixel_budget:
                raise Problem(413, "too_large", f"upscaling_resize: {size[0]}x{size[1]} is larger than atelier "
                              "makes images", field="upscaling_resize")
            known = media.read_parameters(source.info["parameters"]).get("Prompt", "") \
                if isinstance(source.info.get("parameters"), str) else ""
            prompt = re.sub(r"\s{2,}", " ", media.LORA_TAG.sub(" ", known)).strip()  # the upscaler has no LoRAs
            if body.resize_mode == 1 and body.upscaling_crop:
                # A1111 fills the box, cropping the overflow: scale by the larger ratio, then cut the middle.
                scale = max(size[0] / source.width, size[1] / source.height)
                cover = (max(size[0], round(source.width * scale)), max(size[1], round(source.height * scale)))
                big = Image.open(io.BytesIO(await self._upscale(request["caller"], data, upscaler, cover,
                                                                prompt or UPSCALER_PROMPT, field)))
                left, top = (cover[0] - size[0]) // 2, (cover[1] - size[1]) // 2
                buf = io.BytesIO()
                big.crop((left, top, left + size[0], top + size[1])).save(buf, format="PNG")
                result = buf.getvalue()
            else:
                result = await self._upscale(request["caller"], data, upscaler, size, prompt or UPSCALER_PROMPT,
                                             field)
            out.append(base64.b64encode(result).decode("ascii"))
        return out

    async def extra_single(self, request: web.Request) -> web.Response:
        body = parse(A1111ExtrasSingle, await read_json(request))
        images = await self._extras(request, body, [("image", body.image)])
        return web.json_response({"html_info": "", "image": images[0]})

    async def extra_batch(self, request: web.Request) -> web.Response:
        body = parse(A1111ExtrasBatch, await read_json(request))
        images = await self._extras(request, body, [(f"imageList.{i}.data", item.data)
                                                    for i, item in enumerate(body.imageList)])
        return web.json_response({"html_info": "", "images": images})

    async def png_info(self, request: web.Request) -> web.Response:
        body = parse(A1111PngInfoRequest, await read_json(request))
        image = self._open(self._decode(body.image, "image"), "image")
        text = image.info.get("parameters")
        text = text if isinstance(text, str) else ""
        # The image's other text chunks, as A1111 shows them; binary ones (ICC profiles, EXIF) are left out.
        items = {k: v for k, v in image.info.items() if k != "parameters" and isinstance(v, str)}
        return web.json_response({"info": text, "items": items, "parameters": media.read_parameters(text) if text
                                  else {}})

    # -- settings and listings ----------------------------------------------- #

    def _settings(self, given: dict[str, Any], where: str) -> dict[str, Any]:
        """The settings of ``given`` atelier honours, checked; any other is refused by name."""
        chosen: dict[str, Any] = {}
        for key, value in given.items():
            field = f"{where}.{key}" if where else key
            if key == "sd_model_checkpoint":
                chosen[key] = self._model(value, field)
            elif key == "samples_format":
                if str(value).lower() not in SAMPLES_FORMATS:
                    raise Problem(422, "bad_request", f"{field}: {value!r}: atelier writes png or webp", field=field)
                chosen[key] = str(value).lower()
            elif key in FIXED_SETTINGS:
                if value != FIXED_SETTINGS[key]:
                    raise Problem(422, "bad_request", f"{field}: atelier always uses {FIXED_SETTINGS[key]!r} (the "
                                  "catalog decides a model's VAE and text encoder); it cannot be changed", field=field)
            else:
                raise Problem(422, "bad_request", f"{field}: atelier has no such setting; it has "
                              f"sd_model_checkpoint, samples_format, {', '.join(FIXED_SETTINGS)}", field=field)
        return chosen

    async def get_options(self, request: web.Request) -> web.Response:
        mine = self.options.get(request["caller"].user, {})
        return web.json_response({"sd_model_checkpoint": mine.get("sd_model_checkpoint",
                                                                  self.gateway.config.default_model),
                                  "samples_format": mine.get("samples_format", "png"), **FIXED_SETTINGS})

    async def set_options(self, request: web.Request) -> web.Response:
        given = await read_json(request)
        if not isinstance(given, dict):
            raise Problem(422, "bad_request", "body: the options are a JSON object of setting: value", field="body")
        chosen = self._settings(given, "")
        # Per token user, in this server's memory: later requests of the same user without override_settings.
        self.options.setdefault(request["caller"].user, {}).update(chosen)
        return web.json_response(None)

    def _model(self, checkpoint: Any, field: str = "sd_model_checkpoint") -> str:
        if checkpoint in (None, ""):
            return self.gateway.config.default_model
        # A1111 names a checkpoint by its title, "name.safetensors [hash]": the catalog by its name.
        name = re.sub(r"\s*\[[0-9a-f]+\]$", "", str(checkpoint))
        for candidate in (name, Path(name).stem):
            if candidate in self.gateway.config.models:
                return candidate
        raise Problem(404 if field == "override_settings.sd_model_checkpoint" else 422, "unknown_model",
                      f"{field}: no model {checkpoint!r}; see /sdapi/v1/sd-models", field=field)

    async def models(self, request: web.Request) -> web.Response:
        # The name, not the catalog's source: that is a path on the server, or a hub repository.
        listed = [A1111Model(title=m.name, model_name=m.name, filename=m.name)
                  for m in await self.gateway.client.models() if m.name in self.gateway.config.models]
        return web.json_response([m.model_dump() for m in listed])

    def _families(self) -> set[str]:
        return {FAMILIES[entry.family].samplers for entry in self.gateway.config.models.values()
                if entry.family in FAMILIES and FAMILIES[entry.family].samplers}

    async def samplers(self, request: web.Request) -> web.Response:
        tables = self._families()
        listed = []
        for sampler in names.samplers_for(tables):
            label, aliases = names.SAMPLERS[sampler]
            table = next(samplers.TABLES[t] for t in sorted(tables) if sampler in samplers.TABLES[t])
            listed.append({"name": label, "aliases": [*aliases, sampler], "options": {"diffusers": table[sampler][0]}})
        return web.json_response(listed)

    async def schedulers(self, request: web.Request) -> web.Response:
        return web.json_response([{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None,
                                   "default_rho": s.default_rho, "need_inner_model": s.need_inner_model}
                                  for s in names.SCHEDULES.values()])

    async def upscalers(self, request: web.Request) -> web.Response:
        listed = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                  for name in names.RESIZERS]
        listed += [{"name": name, "model_name": name, "model_path": None, "model_url": None, "scale": 4}
                   for name in self._upscaler_models()]
        return web.json_response(listed)

    async def loras(self, request: web.Request) -> web.Response:
        # The catalog's names: a LoRA's path is a file on the server, which no client is told.
        seen = dict.fromkeys(lora for entry in self.gateway.config.models.values() for lora in entry.loras)
        return web.json_response([{"name": lora, "alias": lora, "path": lora, "metadata": {}} for lora in seen])

    async def memory(self, request: web.Request) -> web.Response:
        status = await self.gateway.client.status()
        runners = [{"name": r.name, "device": r.capabilities.device, "device_name": r.capabilities.device_name,
                    "resident_bytes": sum(r.capabilities.resident.values()), "busy": r.job is not None}
                   for r in status.runners]
        cuda: dict[str, Any] = {"runners": runners}
        if not any((r["device"] or "").startswith("cuda") for r in runners):
            cuda["error"] = "no CUDA device among atelier's runners"
        else:
            cuda["error"] = "atelier's runners report the bytes of the models they hold, not the devices' free memory"
        return web.json_response({"ram": _ram(), "cuda": cuda})

    # -- progress and stopping --------------------------------------------- #

    async def progress(self, request: web.Request) -> web.Response:
        skip_image = request.query.get("skip_current_image", "false").lower()
        if skip_image not in ("true", "false"):  # what the document promises: a boolean, not anything at all
            raise Problem(422, "bad_request", "skip_current_image must be true or false", field="skip_current_image")
        job_id = self.current.get(request["caller"].user)
        followed = self.gateway.streams.latest(job_id) if job_id else None
        if followed is None or followed.ended:
            return json_response(A1111Progress(progress=0.0, eta_relative=0.0, state=A1111ProgressState()))
        progress, preview = followed.progress, followed.preview
        done = progress.step / progress.total if progress else 0.0
        image = None
        if preview is not None and skip_image != "true":
            image = base64.b64encode(bytes(preview.image)).decode("ascii")
        state = A1111ProgressState(job=job_id, job_count=1, sampling_step=progress.step if progress else 0,
                                   sampling_steps=progress.total if progress else 0)
        phase = followed.state.state.value if followed.state else "queued"
        return json_response(A1111Progress(progress=done, eta_relative=(progress.eta_s or 0.0) if progress else 0.0,
                                           state=state, current_image=image, textinfo=phase))

    async def _cancel_current(self, request: web.Request) -> None:
        job_id = self.current.get(request["caller"].user)
        if job_id is not None:
            try:
                await self.gateway.client.cancel(job_id)
            except RemoteError as exc:
                # The latest job was refused, or is long forgotten: nothing runs, and as in A1111
                # interrupting nothing is fine (it used to be an undocumented 404).
                if exc.error.code is not ErrorCode.unknown_job:
                    raise

    async def interrupt(self, request: web.Request) -> web.Response:
        await self._cancel_current(request)
        return web.json_response({})

    async def skip(self, request: web.Request) -> web.Response:
        # A1111 skips the image it is making and goes on with the batch; an atelier job is the whole
        # batch, so skipping it cancels the caller's current job (its request answers 409).
        await self._cancel_current(request)
        return web.json_response(None)


def _eighth(size: int | None) -> int | None:
    return None if size is None else size // 8 * 8


def _ram() -> dict[str, Any]:
    """The machine's memory and this server process's, from /proc (Linux), in bytes."""
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
                      if ":" in line)
    except OSError:
        return {"error": "this system has no /proc to read the memory from"}

    def kib(table: dict[str, str], key: str) -> int:
        return int(table[key].split()[0]) * 1024

    total, free = kib(meminfo, "MemTotal"), kib(meminfo, "MemAvailable")
    return {"free": free, "used": total - free, "total": total, "process": kib(status, "VmRSS")}
