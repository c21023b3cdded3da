"""OpenAI's Images API, as the OpenAI SDK and the front ends built on it (Open WebUI, SillyTavern…) call it.

``POST /v1/images/generations`` makes images from a prompt; requests are strict, as OpenAI's are, and
errors come in OpenAI's shape, with the statuses its SDK turns into its exception classes.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from atelier.jobs import JobSpec, Name
from frontends.api import prompt_field
from frontends.httpbase import Problem, Surface, json_response, parse, read_json

OPENAI_MODEL_NAMES = re.compile(r"^(dall-e|gpt-image)")  # OpenAI's own models: they mean "the default"


class OpenAIImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = prompt_field()
    # A catalog model, or one of OpenAI's names (dall-e-2, dall-e-3, gpt-image-1…), which mean
    # the default model: clients that cannot choose still work.
    model: Name | None = None
    n: int = Field(default=1, ge=1, le=16)
    size: str | None = Field(default=None, pattern=r"^(auto|\d+x\d+)$",
                             description="WIDTHxHEIGHT, or auto for the model's default")
    response_format: Literal["url", "b64_json"] = "url"
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

    def routes(self) -> list[web.AbstractRouteDef]:
        return [web.post("/v1/images/generations", self.generate)]

    def render(self, problem: Problem) -> tuple[BaseModel, int]:
        body = OpenAIError(error=OpenAIErrorBody(
            message=problem.message, param=problem.field,
            type="rate_limit_error" if problem.status == 429 else "invalid_request_error",
            code="model_not_found" if problem.code == "unknown_model" else problem.code))
        status = 404 if problem.code == "unknown_model" else 400 if problem.status == 422 else problem.status
        return body, status

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
        data = []
        for i, output in enumerate(result.outputs):
            if body.response_format == "b64_json":
                data.append(OpenAIImage(b64_json=base64.b64encode(output.data).decode("ascii")))
            else:
                data.append(OpenAIImage(url=self.gateway.url(result.job, i)))
        return json_response(OpenAIImagesResponse(created=int(result.job.finished_at or time.time()), data=data))
