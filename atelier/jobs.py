"""The domain records of atelier: what a job is, where it stands, and what it made.

These are the records that the library (config, families, scheduling, staging) and the processes
share. The envelopes that carry them between processes are in ``actors/messages.py``, above this
module; nothing here knows about the wire beyond how a ``Blob`` serialises.

Every record is a pydantic model with ``extra="forbid"``: a field we do not know is a bug or an
attack, never something to carry along silently. A ``Blob`` field is handed to the codec through
the serialisation context and travels as an out-of-band frame, never inside the msgpack head.
"""

from __future__ import annotations

import base64
import enum
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    SerializationInfo,
    WithJsonSchema,
    field_validator,
)


def _validate_blob(value: Any) -> bytes | memoryview:
    # memoryview is accepted as is: received frames above 64 KiB are not copied.
    if isinstance(value, (bytes, memoryview)):
        return value
    if isinstance(value, bytearray):
        return bytes(value)
    raise ValueError(f"expected bytes, got {type(value).__name__}")


def _serialize_blob(value: bytes | memoryview, info: SerializationInfo) -> Any:
    context = info.context
    if context is not None and "blob" in context:
        return context["blob"](value)  # the codec turns it into a frame reference
    if info.mode_is_json():
        return base64.b64encode(value).decode("ascii")
    return value


Blob = Annotated[
    Any,
    PlainValidator(_validate_blob),
    PlainSerializer(_serialize_blob),
    WithJsonSchema({"type": "string", "format": "binary"}),
]


Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@/-]+$")]


# A peer's name on the broker: a Name, or a gang runner's, whose devices are joined by + ("runner-n-cuda0+cuda1").
PeerName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@/+-]+$")]


JobId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


SessionId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@/-]+$")]


# The images a job may start from (JobInputs' fields), and the files a job's outputs may be.
InputName = Literal["image", "mask", "control_image", "ip_adapter_image", "train_images"]


OutputFormat = Literal["png", "webp", "mp4", "gif", "wav", "flac"]


MAX_INPUT_BYTES = 32 << 20  # one input image, encoded


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class JobState(str, enum.Enum):
    queued = "queued"
    assigned = "assigned"
    loading = "loading"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.done, JobState.failed, JobState.cancelled)


class JobKind(str, enum.Enum):
    txt2img = "txt2img"
    img2img = "img2img"
    img2vid = "img2vid"
    txt2vid = "txt2vid"
    txt2audio = "txt2audio"
    upscale = "upscale"
    train = "train"

    @classmethod
    def default_for(cls, kinds: "list[JobKind]", *, from_image: bool) -> "JobKind | None":
        """What a frontend asks of a model when the user did not say: from a prompt alone an image, else
        a video, else a sound; from an image an edit, else an upscale, else a video. None: it cannot."""
        preferred = (cls.img2img, cls.upscale, cls.img2vid) if from_image else (cls.txt2img, cls.txt2vid,
                                                                               cls.txt2audio)
        return next((kind for kind in preferred if kind in kinds), None)


class Priority(str, enum.Enum):
    live = "live"
    interactive = "interactive"
    batch = "batch"


class ErrorCode(str, enum.Enum):
    bad_request = "bad_request"  # the message decoded but a field is wrong
    malformed = "malformed"  # the frames did not decode at all
    too_large = "too_large"
    unknown_model = "unknown_model"
    unknown_job = "unknown_job"
    unroutable = "unroutable"  # no registered peer by that name
    not_registered = "not_registered"  # say Hello first
    unsupported = "unsupported"  # the receiver has no handler for this kind
    busy = "busy"
    queue_full = "queue_full"
    conflict = "conflict"  # the id names a job that exists already, or someone else's
    forbidden = "forbidden"  # the sender may not send this (its role or name does not allow it)
    internal = "internal"


# The samplers and noise schedules a job may choose (atelier/samplers.py: what each one is, and
# which families take it).
SamplerName = Literal["euler", "euler_a", "heun", "lms", "ddim", "pndm", "unipc", "lcm", "deis", "dpm2", "dpm2_a",
                      "dpm++2m", "dpm++2m_sde", "dpm++sde", "dpm++2s"]
ScheduleName = Literal["default", "karras", "exponential", "beta", "trailing"]


TrainFamily = Literal["sd1", "sd2", "sdxl", "flux"]  # the families a LoRA can be trained for

MAX_TRAIN_IMAGES = 32  # instance images of one training (each a frame: the codec takes 64 a message)


class TrainSpec(Wire):
    """A LoRA training (``JobSpec.kind = train``): what to learn, from which images, for how long.

    The job's ``prompt`` is the instance prompt ("a photo of sks dog"), the caption of every image
    that has none of its own in ``captions``; the images travel as ``JobInputs.train_images``.
    """

    # The LoRA's name, as its owner's generation jobs choose it (JobSpec.loras) once it is trained;
    # others it is lent to write @owner/name.
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    captions: list[Annotated[str, Field(max_length=1000)]] = Field(default_factory=list, max_length=MAX_TRAIN_IMAGES)
    # Dreambooth's prior preservation: images of the class ("a photo of a dog") made by the base model
    # itself, trained beside the instance images so the model does not forget what a dog looks like.
    class_prompt: str | None = Field(default=None, min_length=1, max_length=1000)
    class_images: int = Field(default=0, ge=0, le=200)
    prior_loss_weight: float = Field(default=1.0, gt=0, le=10)
    rank: int = Field(default=8, ge=1, le=256)
    alpha: float | None = Field(default=None, gt=0, le=1024)  # default: the rank (a scale of 1)
    learning_rate: float = Field(default=1e-4, gt=0, le=1)
    steps: int = Field(default=500, ge=1, le=100_000)
    resolution: int = Field(default=512, ge=8, le=2048, multiple_of=8)
    batch_size: int = Field(default=1, ge=1, le=64)
    train_text_encoder: bool = False  # LoRA adapters on the text encoder(s) too (UNet families)
    # Every this many steps: a checkpoint into the artifact store (a crash loses at most this many
    # steps; an interactive job waiting for the device takes it at this boundary), and a sample image.
    checkpoint_every: int = Field(default=100, ge=1, le=100_000)
    sample_every: int | None = Field(default=None, ge=1, le=100_000)  # default: checkpoint_every
    sample_prompt: str | None = Field(default=None, min_length=1, max_length=1000)  # default: the instance prompt

    @property
    def alpha_value(self) -> float:
        return float(self.rank) if self.alpha is None else self.alpha

    @property
    def sample_interval(self) -> int:
        return self.sample_every or self.checkpoint_every


class JobSpec(Wire):
    """What a person asks for. Size, steps and guidance left empty take the model's defaults."""

    id: JobId = Field(default_factory=lambda: uuid.uuid4().hex)
    kind: JobKind = JobKind.txt2img
    model: Name
    prompt: str = Field(max_length=4000)
    negative_prompt: str | None = Field(default=None, max_length=4000)
    width: int | None = Field(default=None, ge=8, le=8192, multiple_of=8)
    height: int | None = Field(default=None, ge=8, le=8192, multiple_of=8)
    steps: int | None = Field(default=None, ge=1, le=500)
    guidance: float | None = Field(default=None, ge=0.0, le=50.0)
    # The solver and its noise spacing for this job; the model's own scheduler when left out.
    sampler: SamplerName | None = None
    schedule: ScheduleName | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    count: int = Field(default=1, ge=1, le=16)
    # img2img (with a mask: inpainting): how far from the input image; 1 ignores it.
    strength: float | None = Field(default=None, gt=0, le=1)
    frames: int | None = Field(default=None, ge=1, le=256)  # video: frames to make
    fps: int | None = Field(default=None, ge=1, le=60)  # video: frames a second in the file
    duration_s: float | None = Field(default=None, gt=0, le=300)  # audio: seconds to make
    output_format: OutputFormat | None = None  # default: png, mp4 or wav, by what the model makes
    # LoRAs of the model's catalog entry to apply, with their scales (switching them reloads nothing).
    loras: dict[Name, Annotated[float, Field(ge=-4, le=4)]] = Field(default_factory=dict, max_length=8)
    # ControlNet of the model's catalog entry that reads the job's control_image, and how strongly
    # (default 1; 0 ignores it). IP-Adapter: how strongly the ip_adapter_image steers (default 1).
    controlnet: Name | None = None
    controlnet_scale: float | None = Field(default=None, ge=0, le=2)
    ip_adapter_scale: float | None = Field(default=None, ge=0, le=2)
    # Preview images every step, on the job's events: off saves the work for a caller who does not look.
    previews: bool = True
    # Which JobInputs the submit carried: set by the scheduler from the inputs themselves.
    inputs: list[InputName] = Field(default_factory=list, max_length=5)
    user: str = Field(default="anonymous", min_length=1, max_length=128)
    priority: Priority = Priority.interactive
    # A live session (images as the user types): a newer job of the same user and session
    # replaces this one if it is still queued, and stops it at its next step if it is running.
    session: SessionId | None = None
    train: TrainSpec | None = None  # kind = train: the training's settings

    @property
    def work_steps(self) -> int | None:
        """Denoising steps' worth of work, for estimates: a training step is a forward and a backward pass
        over its batch, about three denoising steps per image."""
        if self.train is not None:
            return 3 * self.train.steps * self.train.batch_size
        return self.steps

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value


class JobInputs(Wire):
    """The images a job starts from, each an encoded file (PNG, JPEG, WebP) sent as its own frame."""

    image: Blob | None = None  # img2img, inpainting, image to video, upscaling: the source
    mask: Blob | None = None  # inpainting: white where the image is painted anew
    control_image: Blob | None = None  # ControlNet's condition (edges, depth, pose…)
    ip_adapter_image: Blob | None = None  # IP-Adapter: an image prompt
    train_images: list[Blob] = Field(default_factory=list, max_length=MAX_TRAIN_IMAGES)  # a training's instances

    @field_validator("image", "mask", "control_image", "ip_adapter_image")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        if value is not None and len(value) > MAX_INPUT_BYTES:
            raise ValueError(f"{len(value):,} bytes; an input image may have {MAX_INPUT_BYTES:,} at most")
        return value

    @field_validator("train_images")
    @classmethod
    def _each_bounded(cls, values: list[Any]) -> list[Any]:
        for value in values:
            cls._bounded(value)
        return values

    def names(self) -> list[str]:
        return [name for name in ("image", "mask", "control_image", "ip_adapter_image", "train_images")
                if getattr(self, name)]

    def files(self) -> list[tuple[str, Any]]:
        """Every encoded image with a name of its own: a field's, or ``train_images/<n>`` for a training's."""
        single = [(name, getattr(self, name)) for name in ("image", "mask", "control_image", "ip_adapter_image")
                  if getattr(self, name) is not None]
        return single + [(f"train_images/{n}", data) for n, data in enumerate(self.train_images)]

    @classmethod
    def from_files(cls, files: dict[str, Any]) -> "JobInputs":
        """``files()`` read back."""
        train = sorted((int(name.partition("/")[2]), data) for name, data in files.items()
                       if name.startswith("train_images/"))
        single = {name: data for name, data in files.items() if not name.startswith("train_images/")}
        return cls(**single, train_images=[data for _, data in train])


class Artifact(Wire):
    """One encoded output (an image, a video, a sound) of a finished job."""

    media_type: str
    data: Blob
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    frames: int | None = None  # video
    fps: float | None = None  # video
    duration_s: float | None = None  # video and audio
    sample_rate: int | None = None  # audio
    uri: str | None = None  # where the artifact store kept it, once stored


class JobRecord(Wire):
    """The scheduler's view of one job: what was asked and where it stands."""

    spec: JobSpec
    state: JobState
    reason: str | None = None
    attempts: int = 0
    runner: str | None = None
    position: int | None = None  # 0-based place in the queue while queued
    eta_s: float | None = None  # expected seconds from the last update until it is done, from measured step times
    batch_id: str | None = None  # the pipeline call it ran in, shared with the jobs batched with it
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    artifacts: list[str] = Field(default_factory=list)
    # A training: its newest checkpoint in the artifact store, and the steps that checkpoint holds.
    checkpoint: str | None = None
    trained_steps: int = 0


class LoraInfo(Wire):
    """A LoRA a user trained: usable by name in its owner's jobs (and theirs it is shared with)."""

    name: Name
    owner: str = Field(min_length=1, max_length=128)
    model: Name  # the base model it was trained on, and the one it applies to
    version: str = Field(pattern=r"^[0-9a-f]{8,32}$")  # unique: a new one each time it is trained
    job_id: JobId  # the training that made it
    created_at: float
    bytes: int = 0
    shared_with: list[str] = Field(default_factory=list, max_length=1000)

    @property
    def ref(self) -> str:
        """How a job names it once resolved (JobSpec.loras), and runners cache it: ``@<version>``."""
        return f"@{self.version}"


LeaseId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class HeldLease(Wire):
    """A VRAM lease as a runner holds it: until ``expires_at`` (wall clock) at the latest, whoever says what."""

    id: LeaseId
    bytes: int = Field(gt=0)
    expires_at: float
    holder: str = Field(default="", max_length=128)
    client: str = Field(default="", max_length=128)  # the peer that asked for it: its end ends the lease
    node: str | None = Field(default=None, max_length=128)
    device: str | None = Field(default=None, max_length=128)
    urgent: bool = False
    granted_at: float | None = None


class Lease(Wire):
    """A VRAM lease as the scheduler shows it: another program's hold on device memory atelier gave up."""

    id: LeaseId
    holder: str = Field(default="", max_length=128)
    node: str | None = None
    device: str | None = None  # "cuda:0"; None: every device of the node
    runners: list[str] = Field(default_factory=list)
    bytes: int = Field(gt=0)  # on each device it covers
    freed_bytes: int = Field(default=0, ge=0)  # what its runners evicted to grant it
    urgent: bool = False
    state: Literal["pending", "granted", "ended"] = "pending"
    granted_at: float | None = None
    expires_at: float | None = None  # wall clock: the granted lease ends then at the latest
    ended_reason: str | None = None


class Capabilities(Wire):
    pid: int
    host: str = ""
    node: str | None = None
    device: str | None = None  # "cpu", "cuda:0"; a gang's devices joined: "cuda:0+cuda:1"
    device_name: str | None = None  # a gang's: "2x NVIDIA H100 80GB HBM3"
    # The node's devices a runner occupies, in rank order (a single runner: [its device]), and how many.
    devices: list[str] = Field(default_factory=list)
    gang: int = Field(default=1, ge=1)
    families: list[str] = Field(default_factory=list)
    resident: dict[str, int] = Field(default_factory=dict)  # models loaded and ready, with their bytes
    # The batch a runner is working on when it (re)registers, so a scheduler that thought
    # it dead takes the jobs back instead of running them twice.
    active_batch: str | None = None
    active_jobs: list[JobId] = Field(default_factory=list)
    # Device memory (a runner's): the budget its models may use now, what VRAM leases hold of the configured
    # budget (``full_budget_bytes``), and those leases, so a restarted scheduler learns them. 0: not reported.
    budget_bytes: int = Field(default=0, ge=0)
    leased_bytes: int = Field(default=0, ge=0)
    full_budget_bytes: int = Field(default=0, ge=0)
    leases: list[HeldLease] = Field(default_factory=list, max_length=64)


class ModelStats(Wire):
    """What one model has cost since the scheduler started (monotonic counters, for /metrics)."""

    loads: dict[str, int] = Field(default_factory=dict)  # by where from: staged, disk
    load_seconds: float = 0.0
    batches: int = 0
    images: int = 0
    steps: int = 0  # denoising steps of whole batches
    step_seconds: float = 0.0


class SchedulerStats(Wire):
    """Counters since the scheduler started: jobs that ended, by state, and how long they took."""

    finished: dict[str, int] = Field(default_factory=dict)  # by final state
    job_seconds_buckets: list[float] = Field(default_factory=list)  # upper bounds
    job_seconds_counts: list[int] = Field(default_factory=list)  # cumulative, one per bucket, then +Inf
    job_seconds_sum: float = 0.0
    models: dict[str, ModelStats] = Field(default_factory=dict)
    # The artifact store: failed writes since start, and whether the last one failed (and why: public).
    store_errors: int = 0
    store_failing: bool = False
    store_error: str | None = None
    store_swept: int = 0  # outputs retention deleted since start
    # Webhooks ([events] webhooks): events POSTed, given up after every retry, and dropped unsent from a
    # full queue (a slow or dead hook's oldest), since start.
    webhook_sent: int = 0
    webhook_failed: int = 0
    webhook_dropped: int = 0


class JobDone(Wire):
    kind: Literal["job_done"] = "job_done"
    job_id: JobId
    outputs: list[Artifact]
    elapsed_s: float


class JobFailed(Wire):
    kind: Literal["job_failed"] = "job_failed"
    job_id: JobId
    reason: str
    cancelled: bool = False
    retryable: bool = False  # True when the job itself is fine and another try may succeed
    # A training that stopped at a checkpoint to let waiting jobs have the device: it resumes from
    # there, and no attempt counts.
    yielded: bool = False


class RunTiming(Wire):
    """What a batch cost, measured by the runner: the scheduler's estimates learn from it."""

    loaded_from: Literal["resident", "staged", "disk"] = "resident"
    stage_wait_s: float = 0.0  # waiting for the loader to stage the weights (0 when they were staged already)
    load_s: float = 0.0  # building the pipeline and moving it to the device, after that
    images: int = 0
    steps: int = 0  # denoising steps actually run (fewer when stopped early)
    step_s: float | None = None  # mean seconds per step of the whole batch


class StagedFile(Wire):
    """Where one weight file lies inside a staged segment."""

    component: str
    name: str
    offset: int = Field(ge=0)
    length: int = Field(ge=0)