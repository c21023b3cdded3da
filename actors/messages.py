"""Every envelope that crosses a process boundary in atelier, and nothing else.

Each message is a pydantic model with a literal ``kind``; ``Message`` is the
discriminated union of all of them. ``extra="forbid"`` everywhere: a field we do
not know is a bug or an attack, never something to carry along silently.

The records the envelopes carry (JobSpec, JobRecord, Artifact, …) are the library's, in
``atelier/jobs.py``. Bytes never travel inside the msgpack head: a ``Blob`` field is handed to
the codec (``actors/codec.py``) through the serialisation context and travels as an
out-of-band frame, referenced from the head by index.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal, Union

from pydantic import Field, TypeAdapter

from atelier.jobs import (
    Artifact,
    Blob,
    Capabilities,
    ErrorCode,
    JobDone,
    JobFailed,
    JobId,
    JobInputs,
    JobKind,
    JobRecord,
    JobSpec,
    JobState,
    Name,
    RunTiming,
    SchedulerStats,
    StagedFile,
    Wire,
)


class Role(str, enum.Enum):
    scheduler = "scheduler"
    loader = "loader"
    runner = "runner"
    frontend = "frontend"


# --------------------------------------------------------------------------- #
# Registration and liveness (peer <-> broker)


class Hello(Wire):
    kind: Literal["hello"] = "hello"
    role: Role
    # A new random value per process start: the broker tells a restart (new
    # incarnation, so the old one is dead) from a reconnect (same incarnation).
    incarnation: str
    capabilities: Capabilities


class Welcome(Wire):
    kind: Literal["welcome"] = "welcome"
    heartbeat_s: float


class Heartbeat(Wire):
    kind: Literal["heartbeat"] = "heartbeat"


class Goodbye(Wire):
    kind: Literal["goodbye"] = "goodbye"
    reason: str = "shutdown"


class PeerUp(Wire):
    kind: Literal["peer_up"] = "peer_up"
    name: Name
    role: Role
    capabilities: Capabilities


class PeerDown(Wire):
    kind: Literal["peer_down"] = "peer_down"
    name: Name
    role: Role
    reason: str


class Error(Wire):
    kind: Literal["error"] = "error"
    code: ErrorCode
    message: str
    field: str | None = None
    retry_after_s: float | None = None


class Ok(Wire):
    kind: Literal["ok"] = "ok"


# --------------------------------------------------------------------------- #
# Frontend <-> scheduler


class Submit(Wire):
    kind: Literal["submit"] = "submit"
    job: JobSpec
    inputs: JobInputs | None = None
    # A client that retries a submit (after a timeout, a reconnect, a restart) with the same key gets
    # the job the first try made, not a second one. Scoped to the job's user.
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)


class Accepted(Wire):
    kind: Literal["accepted"] = "accepted"
    job: JobRecord


class CancelJob(Wire):
    kind: Literal["cancel_job"] = "cancel_job"
    job_id: JobId


class GetJob(Wire):
    kind: Literal["get_job"] = "get_job"
    job_id: JobId


class GetResult(Wire):
    """The final word on a job again, with its outputs read back from the artifact store: for a
    frontend that was away (restarting, reconnecting) when the JobResult was sent. Answered with
    the JobResult once the job has ended, with JobInfo before."""

    kind: Literal["get_result"] = "get_result"
    job_id: JobId


class JobInfo(Wire):
    kind: Literal["job_info"] = "job_info"
    job: JobRecord


class GetStatus(Wire):
    kind: Literal["get_status"] = "get_status"


class RunnerStatus(Wire):
    name: Name
    capabilities: Capabilities
    job: JobId | None = None


class Release(Wire):
    """A runner has built its model from a staged segment: the loader may evict it (runner -> loader)."""

    kind: Literal["release"] = "release"
    model: Name


class LoaderState(Wire):
    """What a node's loader holds staged (loader -> scheduler, after every change)."""

    kind: Literal["loader_state"] = "loader_state"
    node: str
    budget_bytes: int
    staged: dict[str, int]  # model -> bytes


class Preload(Wire):
    """Stage these models now: jobs for them are coming to this node (scheduler -> loader)."""

    kind: Literal["preload"] = "preload"
    models: list[Name]


class ClusterStatus(Wire):
    kind: Literal["cluster_status"] = "cluster_status"
    runners: list[RunnerStatus]
    loaders: list[LoaderState] = Field(default_factory=list)
    queued: list[JobId]
    counts: dict[str, int]  # jobs by state, over the jobs the scheduler remembers
    stats: SchedulerStats = Field(default_factory=SchedulerStats)


class ListJobs(Wire):
    """A user's jobs that the scheduler remembers, newest first."""

    kind: Literal["list_jobs"] = "list_jobs"
    user: str = Field(min_length=1, max_length=128)
    limit: int = Field(default=100, ge=1, le=1000)


class JobList(Wire):
    kind: Literal["job_list"] = "job_list"
    jobs: list[JobRecord]


class GetModels(Wire):
    kind: Literal["get_models"] = "get_models"


class ModelInfo(Wire):
    name: Name
    family: str
    kinds: list[JobKind]
    default_width: int
    default_height: int
    default_steps: int
    default_guidance: float = 0.0
    max_width: int
    max_height: int
    default: bool = False  # the catalog's default_model
    max_count: int = 1
    media: Literal["image", "video", "audio"] = "image"
    inpaint: bool = False  # an img2img job may bring a mask
    # Video and audio: what a job gets when it does not say, and the most it may ask for.
    default_frames: int | None = None
    max_frames: int | None = None
    default_fps: int | None = None
    default_duration_s: float | None = None
    max_duration_s: float | None = None
    loras: list[Name] = Field(default_factory=list)  # what JobSpec.loras may choose from
    controlnets: list[Name] = Field(default_factory=list)  # what JobSpec.controlnet may choose from
    ip_adapter: bool = False  # a job may bring an ip_adapter_image


class Models(Wire):
    kind: Literal["models"] = "models"
    models: list[ModelInfo]


class JobResult(Wire):
    """The final word on a job, sent to the submitting frontend over the routed path."""

    kind: Literal["job_result"] = "job_result"
    job: JobRecord
    outputs: list[Artifact] = Field(default_factory=list)


# --------------------------------------------------------------------------- #
# Scheduler <-> runner, runner <-> loader


class BatchItem(Wire):
    job: JobSpec  # fully resolved: size, steps, guidance and seed are set
    attempt: int = Field(ge=1)
    inputs: JobInputs | None = None


class RunBatch(Wire):
    """Jobs that share one pipeline call: same model, kind, size, steps, guidance (scheduler -> runner)."""

    kind: Literal["run_batch"] = "run_batch"
    batch_id: JobId
    items: list[BatchItem] = Field(min_length=1, max_length=1024)


class StopJob(Wire):
    kind: Literal["stop_job"] = "stop_job"
    job_id: JobId
    reason: str


class BatchUpdate(Wire):
    kind: Literal["batch_update"] = "batch_update"
    batch_id: JobId
    state: Literal[JobState.loading, JobState.running]


class BatchDone(Wire):
    """The outcome of every job of a batch; the runner is free again (runner -> scheduler)."""

    kind: Literal["batch_done"] = "batch_done"
    batch_id: JobId
    outcomes: list[Annotated[Union[JobDone, JobFailed], Field(discriminator="kind")]]
    resident: dict[str, int]
    timing: RunTiming = Field(default_factory=RunTiming)
    # The runner refused the batch and started none of it (it is shutting down, or still busy): no
    # attempt counts. ``active_batch`` and ``active_jobs``: what it is busy with, which a restarted
    # scheduler did not know it had.
    refused: bool = False
    active_batch: JobId | None = None
    active_jobs: list[JobId] = Field(default_factory=list, max_length=256)


class Draining(Wire):
    """A runner that is shutting down: give it nothing more (runner -> scheduler)."""

    kind: Literal["draining"] = "draining"


class GetRunnerState(Wire):
    """What a runner holds and runs now (scheduler -> runner, when it joins): the broker's PeerUp
    carries its capabilities as of its Hello, which may be from before a batch began or ended."""

    kind: Literal["get_runner_state"] = "get_runner_state"


class RunnerState(Wire):
    kind: Literal["runner_state"] = "runner_state"
    capabilities: Capabilities


class Stage(Wire):
    kind: Literal["stage"] = "stage"
    model: Name


class Staged(Wire):
    kind: Literal["staged"] = "staged"
    model: Name
    path: str  # the model's folder on this host ("" for a family that needs none)
    bytes: int
    segment: str | None = None  # the shared-memory file holding the weights, when staged
    files: list[StagedFile] = Field(default_factory=list)


# --------------------------------------------------------------------------- #
# Events, published on the broker's XPUB (lossy; the routed path carries results)


class JobEvent(Wire):
    kind: Literal["job_event"] = "job_event"
    job_id: JobId
    state: JobState
    reason: str | None = None
    position: int | None = None
    eta_s: float | None = None
    runner: str | None = None
    attempt: int = 0
    batch_id: str | None = None


class Progress(Wire):
    kind: Literal["progress"] = "progress"
    job_id: JobId
    step: int
    total: int
    elapsed_s: float
    eta_s: float | None


class Preview(Wire):
    kind: Literal["preview"] = "preview"
    job_id: JobId
    step: int
    media_type: str = "image/jpeg"
    width: int
    height: int
    image: Blob


Message = Annotated[
    Union[
        Hello,
        Welcome,
        Heartbeat,
        Goodbye,
        PeerUp,
        PeerDown,
        Error,
        Ok,
        Submit,
        Accepted,
        CancelJob,
        GetJob,
        GetResult,
        JobInfo,
        GetStatus,
        ClusterStatus,
        ListJobs,
        JobList,
        LoaderState,
        Preload,
        Release,
        GetModels,
        Models,
        JobResult,
        RunBatch,
        StopJob,
        BatchUpdate,
        BatchDone,
        Draining,
        GetRunnerState,
        RunnerState,
        Stage,
        Staged,
        JobEvent,
        Progress,
        Preview,
    ],
    Field(discriminator="kind"),
]

MESSAGE_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)
