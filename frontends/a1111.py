"""AUTOMATIC1111's web UI API (``/sdapi/v1/…``), as its API clients (webuiapi, Krita's and Photoshop's
plugins, Discord bots, scripts) call it.

Requests ignore fields atelier does not know, as A1111 itself does (its clients send dozens of
settings), and refuse the features they name that atelier does not have, so none is silently ignored.
Errors are A1111's ``{"detail": ...}``.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from actors.actor import RemoteError
from atelier.jobs import ErrorCode, JobInputs, JobKind, JobSpec
from frontends.api import decode_image, prompt_field
from frontends.httpbase import Gateway, Problem, Surface, json_response, parse, read_json


class A1111Txt2Img(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # Stricter than A1111 where a JobSpec is: a prompt is required, sizes are multiples of 8.
    prompt: str = prompt_field()
    negative_prompt: str = Field(default="", max_length=4000)
    seed: int = Field(default=-1, le=2**63 - 1)  # negative: random
    batch_size: int = Field(default=1, ge=1, le=16)
    n_iter: int = Field(default=1, ge=1, le=16)
    steps: int | None = Field(default=None, ge=1, le=500)  # None: the model's default
    cfg_scale: float | None = Field(default=None, ge=0, le=50)
    width: int | None = Field(default=None, ge=8, le=8192, multiple_of=8)
    height: int | None = Field(default=None, ge=8, le=8192, multiple_of=8)
    sampler_name: str | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    # Features of A1111 that atelier does not have: refused when asked for, never silently skipped.
    # The handler refuses them, with a message saying why; the document says which values pass.
    enable_hr: bool = Field(default=False, json_schema_extra={"const": False})
    restore_faces: bool | None = Field(default=None, json_schema_extra={"enum": [False, None]})
    tiling: bool | None = Field(default=None, json_schema_extra={"enum": [False, None]})
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict, json_schema_extra={"maxProperties": 0})


class A1111Img2Img(A1111Txt2Img):
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


class A1111Surface(Surface):
    paths = ("/sdapi/",)
    image_routes = frozenset({"/sdapi/v1/img2img"})

    def __init__(self, gateway: Gateway):
        super().__init__(gateway)
        self.current: dict[str, str] = {}  # user -> their latest /sdapi job, for /progress and /interrupt

    def routes(self) -> list[web.AbstractRouteDef]:
        return [web.post("/sdapi/v1/txt2img", self.txt2img), web.post("/sdapi/v1/img2img", self.img2img),
                web.get("/sdapi/v1/sd-models", self.models), web.get("/sdapi/v1/progress", self.progress),
                web.post("/sdapi/v1/interrupt", self.interrupt)]

    def render(self, problem: Problem) -> tuple[BaseModel, int]:
        return A1111Error(detail=problem.message), problem.status

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
                try:
                    found[name] = decode_image(value)
                except ValueError as exc:
                    field = "init_images" if name == "image" else name
                    raise Problem(422, "bad_request", f"{field}: {exc}", field=field) from None
        return await self._generate(request, body, JobKind.img2img, JobInputs(**found), body.denoising_strength)

    async def _generate(self, request: web.Request, body: A1111Txt2Img, kind: JobKind,
                     inputs: JobInputs | None = None, strength: float | None = None) -> web.Response:
        caller = request["caller"]
        for name, asked in (("enable_hr", body.enable_hr), ("restore_faces", body.restore_faces),
                            ("tiling", body.tiling), ("alwayson_scripts", body.alwayson_scripts)):
            if asked:
                raise Problem(422, "bad_request", f"{name}: atelier has no such feature; leave it off", field=name)
        model = self._model(body.override_settings.get("sd_model_checkpoint"))
        spec = self.gateway.owned(parse(JobSpec, {
            "kind": kind, "model": model, "prompt": body.prompt, "negative_prompt": body.negative_prompt or None,
            "width": body.width, "height": body.height, "steps": body.steps, "guidance": body.cfg_scale,
            "seed": None if body.seed < 0 else body.seed, "count": body.batch_size * body.n_iter,
            "strength": strength}), caller)
        self.current[spec.user] = spec.id
        result = await self.gateway.generate(spec, caller, inputs)
        job = result.job.spec
        info = {"prompt": job.prompt, "all_prompts": [job.prompt] * job.count, "negative_prompt": body.negative_prompt,
                "seed": job.seed, "all_seeds": [o.seed for o in result.outputs], "width": job.width,
                "height": job.height, "steps": job.steps, "cfg_scale": job.guidance, "sd_model_name": job.model,
                "batch_size": body.batch_size, "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
                "infotexts": [f"{job.prompt}\nSteps: {job.steps}, CFG scale: {job.guidance}, Seed: {o.seed}, "
                              f"Size: {job.width}x{job.height}, Model: {job.model}" for o in result.outputs]}
        images = [base64.b64encode(o.data).decode("ascii") for o in result.outputs] if body.send_images else []
        return json_response(A1111Images(images=images, parameters=body.model_dump(), info=json.dumps(info)))

    def _model(self, checkpoint: Any) -> str:
        if checkpoint in (None, ""):
            return self.gateway.config.default_model
        # A1111 names a checkpoint by its title, "name.safetensors [hash]": the catalog by its name.
        name = re.sub(r"\s*\[[0-9a-f]+\]$", "", str(checkpoint))
        for candidate in (name, Path(name).stem):
            if candidate in self.gateway.config.models:
                return candidate
        raise Problem(404, "unknown_model", f"no model {checkpoint!r}; see /sdapi/v1/sd-models",
                      field="sd_model_checkpoint")

    async def models(self, request: web.Request) -> web.Response:
        # The name, not the catalog's source: that is a path on the server, or a hub repository.
        listed = [A1111Model(title=m.name, model_name=m.name, filename=m.name)
                  for m in await self.gateway.client.models() if m.name in self.gateway.config.models]
        return web.json_response([m.model_dump() for m in listed])

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

    async def interrupt(self, request: web.Request) -> web.Response:
        job_id = self.current.get(request["caller"].user)
        if job_id is not None:
            try:
                await self.gateway.client.cancel(job_id)
            except RemoteError as exc:
                # The latest job was refused, or is long forgotten: nothing runs, and as in A1111
                # interrupting nothing is fine (it used to be an undocumented 404).
                if exc.error.code is not ErrorCode.unknown_job:
                    raise
        return web.json_response({})
