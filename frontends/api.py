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
import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from atelier.jobs import JobId, JobInputs, JobRecord, JobSpec, Name

INPUTS = ("image", "mask", "control_image", "ip_adapter_image")
# A prompt needs one character that is not white space, as JobSpec's validator reads it (str.strip):
# spelled out, because \s means slightly different sets in Python, in JSON Schema and in pydantic.
NOT_BLANK = r"[^\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


def _prompt() -> Any:
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
    prompt: str = _prompt()  # JobSpec's own, with its not-blank rule where the document shows it
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
    controlnets: list[str] = Field(default_factory=list)  # the names a job's controlnet may use
    ip_adapter: bool = False  # a job may bring an ip_adapter_image


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelEntry]


# --------------------------------------------------------------------------- #
# OpenAI: POST /v1/images/generations


class OpenAIImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = _prompt()
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


# --------------------------------------------------------------------------- #
# AUTOMATIC1111: /sdapi/v1/…


class A1111Txt2Img(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # Stricter than A1111 where a JobSpec is: a prompt is required, sizes are multiples of 8.
    prompt: str = _prompt()
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
