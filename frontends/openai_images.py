"""OpenAI's Images API, as the OpenAI SDK and the front ends built on it (Open WebUI, SillyTavern…) call it.

``POST /v1/images/generations`` makes images from a prompt; ``/v1/images/edits`` (multipart: an image,
an optional mask) is an img2img job, or inpainting with the mask; ``/v1/images/variations`` is an img2img
of the image at ``VARIATION_STRENGTH`` with a neutral prompt (and the image as an IP-Adapter image prompt
where the model has one). Requests are strict, as OpenAI's are, and errors come in OpenAI's shape, with the
statuses its SDK turns into its exception classes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from typing import Any, Literal

from aiohttp import BodyPartReader, web
from pydantic import BaseModel, ConfigDict, Field

from atelier.jobs import MAX_INPUT_BYTES, JobInputs, JobKind, JobSpec, Name
from atelier.media import InputImageError, open_input
from frontends.api import prompt_field
from frontends.httpbase import Problem, Surface, json_response, parse, read_json, read_part

OPENAI_MODEL_NAMES = re.compile(r"^(dall-e|gpt-image)")  # OpenAI's own models: they mean "the default"

# OpenAI has no strength: an edit without a mask keeps this much of the image's look (atelier's own
# img2img default); with a mask, the masked part is painted anew (1), the rest kept by the mask.
EDIT_STRENGTH = 0.75
INPAINT_STRENGTH = 1.0
# A variation has no prompt in OpenAI's API; a job needs one. This one asks for nothing beyond the image.
VARIATION_PROMPT = "a variation of this image"
VARIATION_STRENGTH = 0.6
# A multipart body's text fields and parts: far above what the SDK sends, far below what would cost memory.
MAX_FIELD_BYTES = 64 << 10
MAX_PARTS = 64
FILE_FIELDS = ("image", "mask")
# The scheduler's names for a job's fields, as OpenAI's requests call them.
PARAMS = {"width": "size", "height": "size", "count": "n", "kind": "model", "ip_adapter_image": "image",
          "output_format": "output_format"}


class OpenAIImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = prompt_field()
    # A catalog model, or one of OpenAI's names (dall-e-2, dall-e-3, gpt-image-1…), which mean
    # the default model: clients that cannot choose still work.
    model: Name | None = None
    n: int = Field(default=1, ge=1, le=16)
    size: str | None = Field(default=None, pattern=r"^(auto|\d+x\d+)$",
                             description="WIDTHxHEIGHT, or auto for the model's default")
    # Unset: url, and b64_json for OpenAI's gpt-image models, which answer only that (their clients send none).
    response_format: Literal["url", "b64_json"] | None = None
    user: str | None = Field(default=None, max_length=128)
    # Accepted because OpenAI's clients send them; they change nothing here.
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_format: Literal["png"] | None = None
    output_compression: int | None = None

    def dimensions(self) -> tuple[int | None, int | None]:
        if self.size in (None, "auto"):
            return None, None
        match = re.fullmatch(r"(\d+)x(\d+)", self.size)
        if match is None:
            raise ValueError(f"size must be WIDTHxHEIGHT (e.g. 1024x1024) or auto, not {self.size!r}")
        return int(match.group(1)), int(match.group(2))


class OpenAIEditFields(BaseModel):
    """The text fields of an edit or a variation (multipart sends every one as a string)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(default=None, max_length=4000)
    model: Name | None = None
    n: int = Field(default=1, ge=1, le=16)
    size: str | None = Field(default=None, pattern=r"^(auto|\d+x\d+)$")
    response_format: Literal["url", "b64_json"] | None = None  # as the generation request's
    output_format: Literal["png", "webp"] | None = None
    user: str | None = Field(default=None, max_length=128)
    # atelier's own: how far from the image (OpenAI has none; the defaults above otherwise).
    strength: float | None = Field(default=None, gt=0, le=1)
    # Not streamed here: the answer comes when the images are made.
    stream: Literal[False] = False
    partial_images: Literal[0] = 0
    # Accepted because OpenAI's clients send them; they change nothing here.
    quality: str | None = None
    background: Literal["auto", "opaque"] | None = None
    input_fidelity: str | None = None
    output_compression: int | None = None
    moderation: str | None = None
    safety_identifier: str | None = Field(default=None, max_length=128)
    complexity: str | None = None


class OpenAIImage(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


class OpenAISurface(Surface):
    paths = ("/v1/images",)
    form_routes = frozenset({"/v1/images/edits", "/v1/images/variations"})
    image_routes = form_routes

    def routes(self) -> list[web.AbstractRouteDef]:
        return [web.post("/v1/images/generations", self.generate), web.post("/v1/images/edits", self.edit),
                web.post("/v1/images/variations", self.variation)]

    def render(self, problem: Problem) -> tuple[BaseModel, int]:
        status = problem.status
        if problem.code == "unknown_model":
            status = 404
        elif status == 422 or (status == 413 and problem.field is not None):  # a file too large is a bad file
            status = 400
        # OpenAI's codes and types where it has one for the case (its SDK reads them as .code and .type).
        code = {"unknown_model": "model_not_found", "unauthorized": "invalid_api_key",
                "rate_limited": "rate_limit_exceeded"}.get(problem.code, problem.code)
        kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
        param = PARAMS.get(problem.field, problem.field) if problem.field else None
        return OpenAIError(error=OpenAIErrorBody(message=problem.message, param=param, type=kind, code=code)), status

    async def generate(self, request: web.Request) -> web.Response:
        caller = request["caller"]
        body = parse(OpenAIImageRequest, await read_json(request))
        try:
            width, height = body.dimensions()
        except ValueError as exc:
            raise Problem(422, "bad_request", str(exc), field="size") from None
        model = body.model
        if model is None or OPENAI_MODEL_NAMES.match(model):
            model = self.gateway.config.default_model
        fields: dict[str, Any] = {"model": model, "prompt": body.prompt, "count": body.n, "width": width,
                                  "height": height}
        if body.user and not caller.authenticated:  # OpenAI's end-user tag; a token's user comes first
            fields["user"] = body.user
        spec = self.gateway.owned(parse(JobSpec, fields), caller)
        result = await self.gateway.generate(spec, caller)
        return self._answer(result, body.response_format, body.model)

    async def edit(self, request: web.Request) -> web.Response:
        fields, files = await self._form(request)
        if not fields.prompt or not fields.prompt.strip():
            raise Problem(400, "bad_request", "prompt: an edit needs a prompt", field="prompt")
        image, model, entry = self._source(fields, files, "an edit")
        mask = files.get("mask")
        if mask is not None:
            if not entry.limits.inpaint:
                raise Problem(400, "bad_request", f"mask: {model} cannot inpaint; send no mask for an edit of "
                                                  "the whole image, or choose a model that inpaints", field="mask")
            mask = await asyncio.to_thread(self._atelier_mask, image, mask)
        strength = fields.strength or (INPAINT_STRENGTH if mask is not None else EDIT_STRENGTH)
        return await self._run(request, fields, model, fields.prompt, strength, JobInputs(image=image, mask=mask))

    async def variation(self, request: web.Request) -> web.Response:
        fields, files = await self._form(request)
        for name in ("prompt",):
            if getattr(fields, name) is not None:
                raise Problem(400, "bad_request", f"{name}: a variation takes no {name}; use /v1/images/edits",
                              field=name)
        if "mask" in files:
            raise Problem(400, "bad_request", "mask: a variation takes no mask; use /v1/images/edits", field="mask")
        image, model, entry = self._source(fields, files, "a variation")
        # Where the model has an IP-Adapter, the image steers as an image prompt too, as the prompt would.
        steer = image if entry.ip_adapter is not None else None
        return await self._run(request, fields, model, VARIATION_PROMPT, fields.strength or VARIATION_STRENGTH,
                               JobInputs(image=image, ip_adapter_image=steer))

    def _source(self, fields: Any, files: dict[str, bytes], what: str) -> tuple[bytes, str, Any]:
        """The image an edit or a variation starts from, and the model, which must start from one."""
        image = files.get("image")
        if image is None:
            raise Problem(400, "bad_request", f"image: {what} needs an image (PNG, JPEG or WebP)", field="image")
        model, entry = self._model(fields.model)
        if JobKind.img2img.value not in entry.limits.kinds:
            raise Problem(400, "bad_request", f"model: {model} cannot start from an image (it does "
                                              f"{', '.join(sorted(entry.limits.kinds))})", field="model")
        return image, model, entry

    def _model(self, asked: str | None) -> tuple[str, Any]:
        model = asked
        if model is None or OPENAI_MODEL_NAMES.match(model):
            model = self.gateway.config.default_model
        entry = self.gateway.config.models.get(model)
        if entry is None:
            raise Problem(404, "unknown_model", f"no model {model!r}; GET /v1/models lists them", field="model")
        return model, entry

    async def _run(self, request: web.Request, fields: OpenAIEditFields, model: str, prompt: str, strength: float,
                   inputs: JobInputs) -> web.Response:
        caller = request["caller"]
        width, height = _dimensions(fields.size)
        spec_fields: dict[str, Any] = {"kind": JobKind.img2img, "model": model, "prompt": prompt, "count": fields.n,
                                       "width": width, "height": height, "strength": strength,
                                       "output_format": fields.output_format}
        user = fields.user or fields.safety_identifier
        if user and not caller.authenticated:  # OpenAI's end-user tag; a token's user comes first
            spec_fields["user"] = user
        spec = self.gateway.owned(parse(JobSpec, spec_fields), caller)
        result = await self.gateway.generate(spec, caller, inputs)
        return self._answer(result, fields.response_format, fields.model)

    def _answer(self, result: Any, response_format: str | None, model: str | None) -> web.Response:
        if response_format is None:
            response_format = "b64_json" if model is not None and model.startswith("gpt-image") else "url"
        data = []
        for i, output in enumerate(result.outputs):
            if response_format == "b64_json":
                data.append(OpenAIImage(b64_json=base64.b64encode(output.data).decode("ascii")))
            else:
                data.append(OpenAIImage(url=self.gateway.url(result.job, i)))
        return json_response(OpenAIImagesResponse(created=int(result.job.finished_at or time.time()), data=data))

    async def _form(self, request: web.Request) -> tuple[OpenAIEditFields, dict[str, bytes]]:
        """The multipart body's fields and files, each capped as it is read (a chunked body declares no
        length for the server's own cap to check)."""
        if not request.content_type.startswith("multipart/"):
            raise Problem(400, "bad_request", "send the image as multipart/form-data (as OpenAI's SDK does)",
                          field="image")
        try:
            reader = await request.multipart()
        except (ValueError, AssertionError) as exc:
            raise Problem(400, "bad_request", f"the multipart body does not parse: {exc}") from None
        texts: dict[str, str] = {}
        files: dict[str, bytes] = {}
        images = 0
        try:
            for _ in range(MAX_PARTS + 1):
                part = await reader.next()
                if part is None:
                    break
                if not isinstance(part, BodyPartReader) or not part.name:
                    raise Problem(400, "bad_request", "every part of the body needs a name (Content-Disposition)")
                # The SDK names a list of images image[] (one per part); a single one image.
                name = "image" if re.fullmatch(r"image(\[\d*\])?", part.name) else part.name
                if name in FILE_FIELDS:
                    if name == "image":
                        images += 1
                        if images > 1:
                            raise Problem(400, "bad_request", "image: atelier edits one image at a time; send one",
                                          field="image")
                    elif name in files:
                        raise Problem(400, "bad_request", f"{name}: sent twice; send one", field=name)
                    files[name] = await read_part(part, name, MAX_INPUT_BYTES)
                elif part.filename is not None:
                    raise Problem(400, "bad_request", f"{part.name}: no file of that name is taken here (image, mask)",
                                  field=part.name)
                else:
                    if name in texts:
                        raise Problem(400, "bad_request", f"{name}: sent twice; send it once", field=name)
                    raw = await read_part(part, name, MAX_FIELD_BYTES)
                    try:
                        texts[name] = raw.decode(part.get_charset("utf-8"))
                    except (UnicodeDecodeError, LookupError):
                        raise Problem(400, "bad_request", f"{name}: not UTF-8 text", field=name) from None
            else:
                raise Problem(400, "bad_request", f"the body has more than {MAX_PARTS} parts; no request here does")
        except (ValueError, AssertionError) as exc:  # a malformed body: aiohttp's parser raises these
            raise Problem(400, "bad_request", f"the multipart body does not parse: {exc}") from None
        # Unset (an empty string, as some forms send for "nothing") is the default.
        return parse(OpenAIEditFields, {k: v for k, v in texts.items() if v != ""}), files

    def _atelier_mask(self, image: bytes, mask: bytes) -> bytes:
        """OpenAI's mask (transparent where to paint) as atelier's (white where to paint), as a PNG.

        Refused as OpenAI refuses it: a mask without an alpha channel, or of another size than the image."""
        budget = self.gateway.config.input_pixel_budget
        try:
            with open_input(image, "image", budget, decode=False) as source:
                size = source.size
            with open_input(mask, "mask", budget, decode=True) as opened:
                if "A" not in opened.getbands() and "transparency" not in opened.info:
                    raise Problem(400, "bad_request", "mask: it needs an alpha channel (an RGBA PNG, transparent "
                                                      "where the image is to be painted)", field="mask")
                if opened.size != size:
                    raise Problem(400, "bad_request", f"mask: {opened.size[0]}x{opened.size[1]}, but the image is "
                                                      f"{size[0]}x{size[1]}: they must be the same size", field="mask")
                alpha = opened.convert("RGBA").getchannel("A")
        except InputImageError as exc:
            field = str(exc).partition(":")[0]
            raise Problem(400, "bad_request", str(exc), field=field if field in FILE_FIELDS else "image") from None
        painted = alpha.point(lambda a: 255 if a == 0 else 0)  # fully transparent: paint; else keep
        out = io.BytesIO()
        painted.save(out, format="PNG")
        return out.getvalue()


def _dimensions(size: str | None) -> tuple[int | None, int | None]:
    if size in (None, "auto"):
        return None, None
    match = re.fullmatch(r"(\d+)x(\d+)", size)
    if match is None:
        raise Problem(400, "bad_request", f"size must be WIDTHxHEIGHT (e.g. 512x512) or auto, not {size!r}",
                      field="size")
    return int(match.group(1)), int(match.group(2))
