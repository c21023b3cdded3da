"""Training a LoRA over HTTP, and the trained LoRAs: ``/v1/trainings`` and ``/v1/loras``.

``POST /v1/trainings`` queues a training from a few images: multipart (each image a file part named
``images``, each field of ``TrainingRequest`` a text part, ``captions`` once per image, in the images'
order), or JSON with the images in base64. It answers as ``POST /v1/jobs`` does (202, the job), and its
progress (step, total, loss, ETA) and sample images come on ``/v1/jobs/{id}/events`` like any job's.
The LoRA it makes is its owner's: ``GET /v1/loras`` lists what the caller may use, ``DELETE
/v1/loras/{name}`` deletes one, ``PUT /v1/loras/{name}/share`` lends it to other users, and
``GET /v1/loras/{name}/file`` (``?format=kohya``) downloads it.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from aiohttp import BodyPartReader, web
from pydantic import BaseModel, ConfigDict, Field

from actors.actor import RemoteError
from atelier.jobs import (
    MAX_INPUT_BYTES,
    MAX_TRAIN_IMAGES,
    ErrorCode,
    JobInputs,
    JobKind,
    JobSpec,
    LoraInfo,
    Name,
    TrainSpec,
)
from frontends import api
from frontends.httpbase import Problem, Surface, from_remote, json_response, parse, read_json, read_part

MAX_FIELD_BYTES = 16 << 10
LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # TrainSpec.name's rule
MAX_PARTS = MAX_TRAIN_IMAGES * 2 + 32  # every image, a caption each, and the settings


class TrainingRequest(BaseModel):
    """``POST /v1/trainings``: what to train (every field of the training's settings), and from which images."""

    model_config = ConfigDict(extra="forbid")

    model: Name | None = Field(default=None, description="the base model; default: the catalog's default")
    prompt: str = Field(min_length=1, max_length=1000, description="the instance prompt, e.g. 'a photo of sks dog'")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    images: list[str] = Field(default_factory=list, max_length=MAX_TRAIN_IMAGES,
                              description="JSON only: the instance images, base64 (or data URLs)")
    # TrainSpec's fields, as they are (name, captions, rank, alpha, learning_rate, steps, resolution, ...).
    train: TrainSpec


class LoraShare(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Who may use it: replaces the list ([] lends it to no one).
    users: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(max_length=1000)


class LoraListing(BaseModel):
    loras: list[LoraInfo]


class TrainingSurface(Surface):
    paths = ("/v1/trainings", "/v1/loras")
    form_routes = frozenset({"/v1/trainings"})
    image_routes = frozenset({"/v1/trainings"})

    def routes(self) -> list[web.AbstractRouteDef]:
        return [web.post("/v1/trainings", self.create), web.get("/v1/loras", self.listing),
                web.delete("/v1/loras/{name}", self.delete), web.put("/v1/loras/{name}/share", self.share),
                web.get("/v1/loras/{name}/file", self.download)]

    def render(self, problem: Problem) -> tuple[BaseModel, int]:
        return api.ApiError(error=api.ErrorBody(code=problem.code, message=problem.message, field=problem.field,
                                                problems=problem.problems, retry_after_s=problem.retry_after_s)), \
            problem.status

    async def create(self, request: web.Request) -> web.Response:
        if request.content_type.startswith("multipart/"):
            body, images = await self._form(request)
        else:
            body = parse(TrainingRequest, await read_json(request))
            images = []
            for n, encoded in enumerate(body.images):
                try:
                    images.append(api.decode_image(encoded))
                except ValueError as exc:
                    raise Problem(422, "bad_request", f"images.{n}: {exc}", field=f"images.{n}") from None
        gateway = self.gateway
        spec = JobSpec(kind=JobKind.train, model=body.model or gateway.config.default_model, prompt=body.prompt,
                       seed=body.seed, train=body.train)
        spec = gateway.owned(spec, request["caller"])
        record = await gateway.submit(spec, request["caller"], JobInputs(train_images=images))
        view = api.JobView(**record.model_dump(), urls=[])
        return json_response(view, status=202)

    async def _form(self, request: web.Request) -> tuple[TrainingRequest, list[bytes]]:
        """The multipart body: image parts, caption parts (in the images' order), and the settings as text."""
        try:
            reader = await request.multipart()
        except (ValueError, AssertionError) as exc:
            raise Problem(400, "bad_request", f"the multipart body does not parse: {exc}") from None
        texts: dict[str, str] = {}
        captions: list[str] = []
        images: list[bytes] = []
        try:
            for _ in range(MAX_PARTS + 1):
                part = await reader.next()
                if part is None:
                    break
                if not isinstance(part, BodyPartReader) or not part.name:
                    raise Problem(400, "bad_request", "every part of the body needs a name (Content-Disposition)")
                if part.name == "images":
                    if len(images) == MAX_TRAIN_IMAGES:
                        raise Problem(422, "bad_request", f"images: {MAX_TRAIN_IMAGES} at most", field="images")
                    images.append(await read_part(part, f"images.{len(images)}", MAX_INPUT_BYTES))
                    continue
                if part.filename is not None:
                    raise Problem(400, "bad_request", f"{part.name}: files go in parts named images", field=part.name)
                raw = await read_part(part, part.name, MAX_FIELD_BYTES)
                try:
                    text = raw.decode(part.get_charset("utf-8"))
                except (UnicodeDecodeError, LookupError):
                    raise Problem(400, "bad_request", f"{part.name}: not UTF-8 text", field=part.name) from None
                if part.name == "captions":
                    captions.append(text)
                elif part.name in texts:
                    raise Problem(400, "bad_request", f"{part.name}: sent twice; send it once", field=part.name)
                else:
                    texts[part.name] = text
            else:
                raise Problem(400, "bad_request", f"the body has more than {MAX_PARTS} parts")
        except (ValueError, AssertionError) as exc:
            raise Problem(400, "bad_request", f"the multipart body does not parse: {exc}") from None
        return parse(TrainingRequest, _form_fields(texts, captions)), images

    async def listing(self, request: web.Request) -> web.Response:
        return json_response(LoraListing(loras=await self._ask("loras", request["caller"].user)))

    async def delete(self, request: web.Request) -> web.Response:
        name = self._name(request)
        return json_response(LoraListing(loras=await self._ask("delete_lora", request["caller"].user, name)))

    async def share(self, request: web.Request) -> web.Response:
        name = self._name(request)
        body = parse(LoraShare, await read_json(request))
        return json_response(LoraListing(loras=await self._ask("share_lora", request["caller"].user, name,
                                                               body.users)))

    async def download(self, request: web.Request) -> web.StreamResponse:
        """The caller's own LoRA file, in the diffusers format or (``?format=kohya``) kohya's."""
        name, user = self._name(request), request["caller"].user
        kohya = request.query.get("format", "diffusers") == "kohya"
        found = next((lora for lora in await self._ask("loras", user) if lora.name == name and lora.owner == user),
                     None)
        if found is None:
            raise Problem(404, "not_found", f"{user} has no LoRA {name!r}; GET /v1/loras lists them", field="name")
        result = await self._ask("fetch_result", found.job_id)
        outputs = result.outputs if result is not None else []
        index = 1 if kohya else 0
        if index >= len(outputs):
            raise Problem(404, "not_found", f"the file of LoRA {name!r} is gone from the artifact store")
        suffix = ".kohya" if kohya else ""
        return web.Response(body=bytes(outputs[index].data), content_type="application/octet-stream",
                            headers={"Content-Disposition": f'attachment; filename="{name}{suffix}.safetensors"'})

    async def _ask(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.gateway.client, method)(*args)
        except RemoteError as exc:
            if exc.error.code is ErrorCode.unknown_model and exc.error.field == "name":
                raise Problem(404, "not_found", exc.error.message, field="name") from None
            raise from_remote(exc) from None

    @staticmethod
    def _name(request: web.Request) -> str:
        """The LoRA named in the path; one no LoRA can have (TrainSpec.name's rule) is not found."""
        name = request.match_info["name"]
        if not LORA_NAME.fullmatch(name):
            raise Problem(404, "not_found", f"no LoRA {name[:64]!r}: a name is letters, digits, . _ and -",
                          field="name")
        return name


def _form_fields(texts: dict[str, str], captions: list[str]) -> dict[str, Any]:
    """A multipart training's text parts as a TrainingRequest's fields: the top-level ones as they are, every
    other one into ``train`` (JSON where it reads as JSON, so numbers and booleans come through as such)."""
    top = {"model", "prompt", "seed"}
    body: dict[str, Any] = {name: value for name, value in texts.items() if name in top and value != ""}
    train: dict[str, Any] = {}
    for name, value in texts.items():
        if name in top or value == "":
            continue
        try:
            train[name] = json.loads(value) if name not in ("name", "class_prompt", "sample_prompt") else value
        except json.JSONDecodeError:
            train[name] = value
    if captions:
        train["captions"] = captions
    body["train"] = train
    return body
