"""The shapes of atelier's HTTP API: its own, and the OpenAI and AUTOMATIC1111 ones it speaks.

These are HTTP bodies, not wire types: the wire between processes is ``actors/messages.py``.
The native API takes a ``JobSpec`` as it is and answers with ``JobView`` (a ``JobRecord`` plus
the artifacts' URLs). The compatibility models take what those APIs' clients send: the OpenAI
request is strict, as OpenAI is; the AUTOMATIC1111 one ignores fields it does not know, as
A1111 itself does (its clients send dozens of settings), and refuses the features it names but
atelier does not have, so none is silently ignored.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from atelier.jobs import JobId, JobInputs, JobRecord, JobSpec

INPUTS = ("image", "mask", "control_image", "ip_adapter_image")
# A prompt needs one character that is not white space, as JobSpec's validator reads it (str.strip):
# spelled out, because \s means slightly different sets in Python, in JSON Schema and in pydantic.
NOT_BLANK = r"[^\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


def prompt_field() -> Any:
    return Field(max_length=4000, pattern=NOT_BLANK)


def decode_image(text: str) -> bytes:
    """An image sent in JSON: base64, or a data URL (as browsers and A1111 clients send it)."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64 (nor a data: URL)") from None


class JobRequest(JobSpec):
    """``POST /v1/jobs``: a JobSpec, and the images it starts from, in base64 (or data URLs).

    Inside atelier the images travel as frames of their own; JSON has no other way to carry them."""

    # The server assigns it: a request that names one is refused (an Idempotency-Key makes retries safe).
    id: JobId = Field(default_factory=lambda: uuid.uuid4().hex, json_schema_extra={"readOnly": True},
                      description="assigned by the server; a request that sets it is refused")
    prompt: str = prompt_field()  # JobSpec's own, with its not-blank rule where the document shows it
    image: str | None = Field(default=None, description="img2img and the like: the source image, base64")
    mask: str | None = Field(default=None, description="inpainting: white where to paint, base64")
    control_image: str | None = None
    ip_adapter_image: str | None = None

    def split(self) -> tuple[JobSpec, JobInputs | None]:
        """The job, and its images decoded (raises ValueError naming the field)."""
        found = {}
        for name in INPUTS:
            value = getattr(self, name)
            if value is not None:
                try:
                    found[name] = decode_image(value)
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        spec = JobSpec.model_validate(self.model_dump(exclude=set(INPUTS), exclude_unset=True))
        return spec, JobInputs(**found) if found else None


class JobView(JobRecord):
    """A job as the HTTP API shows it: its record, and where its outputs can be fetched."""

    urls: list[str] = Field(default_factory=list)


class FieldProblem(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None
    problems: list[FieldProblem] = Field(default_factory=list)
    retry_after_s: float | None = None


class ApiError(BaseModel):
    """Every error of the native API: 401, 403, 404, 422 and 429 alike."""

    error: ErrorBody


class ModelEntry(BaseModel):
    """``GET /v1/models``: OpenAI's model object, with atelier's own fields beside."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "atelier"
    family: str
    kinds: list[str]
    default_width: int
    default_height: int
    default_steps: int
    default_guidance: float
    max_width: int
    max_height: int
    default: bool  # the model a job gets when it names none
    max_count: int
    media: str  # image, video or audio
    inpaint: bool  # an img2img job may bring a mask
    default_frames: int | None = None
    max_frames: int | None = None
    default_fps: int | None = None
    default_duration_s: float | None = None
    max_duration_s: float | None = None
    loras: list[str] = Field(default_factory=list)  # the names a job's loras may use
    user_loras: list[str] = Field(default_factory=list)  # the caller's trained LoRAs for it (and those lent them)
    controlnets: list[str] = Field(default_factory=list)  # the names a job's controlnet may use
    ip_adapter: bool = False  # a job may bring an ip_adapter_image


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelEntry]
