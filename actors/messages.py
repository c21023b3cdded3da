"""Every envelope that crosses a process boundary in atelier and the protocol they make up, nothing else.

Each message is a pydantic model with a literal ``kind``; ``Message`` is the
discriminated union of all of them. ``extra="forbid"`` everywhere: a field we do
not know is a bug or an attack, never something to carry along silently.

Each message also declares its place in the protocol: its ``route`` (who sends it, who
receives it, how it travels, an event's topic) and, for one that is asked, its reply type
(its ``AnsweredBy[...]`` base; an ``Error`` may answer any ask). The broker's and the
codec's tables are derived from these, and ``Actor.ask`` returns the declared type.
``python -m actors.messages`` prints the whole protocol.

The records the envelopes carry (JobSpec, JobRecord, Artifact, …) are the library's, in
``atelier/jobs.py``. Bytes never travel inside the msgpack head: a ``Blob`` field is handed to
the codec (``actors/codec.py``) through the serialisation context and travels as an
out-of-band frame, referenced from the head by index.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Final, ForwardRef, Generic, Literal, TypeVar, Union, get_args, get_origin

from pydantic import Field, TypeAdapter, model_validator

from atelier.jobs import (
    Artifact,
    Blob,
    Capabilities,
    ErrorCode,
    HeldLease,
    JobDone,
    JobFailed,
    JobId,
    JobInputs,
    JobKind,
    JobRecord,
    JobSpec,
    JobState,
    Lease,
    LeaseId,
    LoraInfo,
    Name,
    PeerName,
    Priority,
    RunTiming,
    SchedulerStats,
    StagedFile,
    Wire,
)


class ClusterEventKind(str, enum.Enum):
    queue_busy = "queue_busy"  # a job was waiting or running after none was
    queue_idle = "queue_idle"  # nothing waits and nothing runs: the GPUs are free
    lease_granted = "lease_granted"
    lease_ended = "lease_ended"  # released, expired, or its holder is gone
    paused = "paused"  # the queue, or one model (detail: model)
    resumed = "resumed"
    node_draining = "node_draining"
    node_drained = "node_drained"  # a draining node's runners are all idle
    node_resumed = "node_resumed"
    catalog_reloaded = "catalog_reloaded"


class Role(str, enum.Enum):
    scheduler = "scheduler"
    loader = "loader"
    runner = "runner"
    frontend = "frontend"


# --------------------------------------------------------------------------- #
# The protocol's declarations


CLUSTER_TOPIC: Final = "cluster"  # an event's topic that is the cluster's, not a job's: cluster/<event>
BROKER: Final = "broker"  # the broker's name on the wire: a party to the protocol, never a peer's role
PEERS = tuple(Role)
Party = Role | Literal["broker"]


class Via(enum.Enum):
    """How a message reaches its receiver, and so who deals with it there."""

    handler = "handler"  # the receiving actor's handler for it: a tell, or an ask the handler answers
    answer = "answer"  # only in answer to an ask: the asker's receive loop hands it to the waiting ask
    event = "event"  # published on the broker's XPUB as job/<id>/<topic>; receivers subscribe
    link = "link"  # registration and liveness: the broker's and the actor base's own


@dataclass(frozen=True, init=False)
class Route:
    """Who sends a message, who receives it, how it travels and, for an event, its topic."""

    sent_by: tuple[Party, ...]
    to: tuple[Party, ...]
    via: Via
    topic: str | None

    def __init__(self, sent_by: Party | tuple[Party, ...], to: Party | tuple[Party, ...], via: Via = Via.handler,
                 topic: str | None = None):
        object.__setattr__(self, "sent_by", sent_by if isinstance(sent_by, tuple) else (sent_by,))
        object.__setattr__(self, "to", to if isinstance(to, tuple) else (to,))
        object.__setattr__(self, "via", via)
        object.__setattr__(self, "topic", topic)
        # The broker knows an event's publisher as one role and one topic.
        if (via is Via.event) != (topic is not None and len(self.sent_by) == 1):
            raise ValueError(f"an event, and only an event, has a topic and one publisher: {self}")


Reply = TypeVar("Reply")


class AnsweredBy(Generic[Reply]):
    """The base of a message that is asked: ``class Stage(Wire, AnsweredBy["Staged"])``. The reply is
    named as a string, ``"A | B"`` for either, since it is mostly defined further down."""

    __slots__ = ()


@functools.cache
def reply_types(message: type) -> tuple[type[Wire], ...]:
    """What the receiver of ``message`` answers it with (besides an Error); () for one not asked."""
    for klass in message.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            if get_origin(base) is AnsweredBy:
                (reply,) = get_args(base)
                if isinstance(reply, ForwardRef):  # names of messages of this module
                    return tuple(globals()[name.strip()] for name in reply.__forward_arg__.split("|"))
                return get_args(reply) or (reply,)
    return ()


def kind_of(message: type[Wire]) -> str:
    return message.model_fields["kind"].default


# --------------------------------------------------------------------------- #
# Registration and liveness (peer <-> broker)


class Hello(Wire, AnsweredBy["Welcome"]):
    kind: Literal["hello"] = "hello"
    route: ClassVar[Route] = Route(PEERS, BROKER, Via.link)
    role: Role
    # A new random value per process start: the broker tells a restart (new
    # incarnation, so the old one is dead) from a reconnect (same incarnation).
    incarnation: str
    capabilities: Capabilities


class Welcome(Wire):
    kind: Literal["welcome"] = "welcome"
    route: ClassVar[Route] = Route(BROKER, PEERS, Via.answer)
    heartbeat_s: float


class Heartbeat(Wire):
    kind: Literal["heartbeat"] = "heartbeat"
    route: ClassVar[Route] = Route((BROKER, *PEERS), (BROKER, *PEERS), Via.link)


class Goodbye(Wire):
    kind: Literal["goodbye"] = "goodbye"
    route: ClassVar[Route] = Route(PEERS, BROKER, Via.link)
    reason: str = "shutdown"


class PeerUp(Wire):
    kind: Literal["peer_up"] = "peer_up"
    route: ClassVar[Route] = Route(BROKER, Role.scheduler)
    name: PeerName
    role: Role
    capabilities: Capabilities


class PeerDown(Wire):
    kind: Literal["peer_down"] = "peer_down"
    route: ClassVar[Route] = Route(BROKER, Role.scheduler)
    name: PeerName
    role: Role
    reason: str


class Error(Wire):
    kind: Literal["error"] = "error"
    # The answer any ask may get in place of its reply; the broker also sends one unasked (to a peer
    # over its rate, or one it does not know), which the actor base takes.
    route: ClassVar[Route] = Route((BROKER, *PEERS), PEERS, Via.answer)
    code: ErrorCode
    message: str
    field: str | None = None
    retry_after_s: float | None = None


class Ok(Wire):
    kind: Literal["ok"] = "ok"
    route: ClassVar[Route] = Route((Role.scheduler, Role.runner), (Role.runner, Role.scheduler), Via.answer)


# --------------------------------------------------------------------------- #
# Frontend <-> scheduler


class Submit(Wire, AnsweredBy["Accepted"]):
    kind: Literal["submit"] = "submit"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)
    job: JobSpec
    inputs: JobInputs | None = None
    # A client that retries a submit (after a timeout, a reconnect, a restart) with the same key gets
    # the job the first try made, not a second one. Scoped to the job's user.
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)


class Accepted(Wire):
    kind: Literal["accepted"] = "accepted"
    route: ClassVar[Route] = Route(Role.scheduler, Role.frontend, Via.answer)
    job: JobRecord


class CancelJob(Wire, AnsweredBy["JobInfo"]):
    kind: Literal["cancel_job"] = "cancel_job"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)
    job_id: JobId


class GetJob(Wire, AnsweredBy["JobInfo"]):
    kind: Literal["get_job"] = "get_job"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)
    job_id: JobId


class GetResult(Wire, AnsweredBy["JobResult | JobInfo"]):
    """The final word on a job again, with its outputs read back from the artifact store: for a
    frontend that was away (restarting, reconnecting) when the JobResult was sent. Answered with
    the JobResult once the job has ended, with JobInfo before."""

    kind: Literal["get_result"] = "get_result"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)
    job_id: JobId


class JobInfo(Wire):
    kind: Literal["job_info"] = "job_info"
    route: ClassVar[Route] = Route(Role.scheduler, Role.frontend, Via.answer)
    job: JobRecord


class GetStatus(Wire, AnsweredBy["ClusterStatus"]):
    kind: Literal["get_status"] = "get_status"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)


class RunnerStatus(Wire):
    name: PeerName
    capabilities: Capabilities
    job: JobId | None = None


class Release(Wire):
    """A runner has built its model from a staged segment: the loader may evict it (runner -> loader)."""

    kind: Literal["release"] = "release"
    route: ClassVar[Route] = Route(Role.runner, Role.loader)
    model: Name


class LoaderState(Wire):
    """What a node's loader holds staged (loader -> scheduler, after every change)."""

    kind: Literal["loader_state"] = "loader_state"
    route: ClassVar[Route] = Route(Role.loader, Role.scheduler)
    node: str
    budget_bytes: int
    staged: dict[str, int]  # model -> bytes


class ReportStaged(Wire):
    """Say what is staged here (scheduler -> loader, when the loader or the scheduler joins): a LoaderState
    the loader sent before the scheduler was there, or to one that restarted since, reached nobody."""

    kind: Literal["report_staged"] = "report_staged"
    route: ClassVar[Route] = Route(Role.scheduler, Role.loader)


class Preload(Wire):
    """Stage these models now: jobs for them are coming to this node (scheduler -> loader)."""

    kind: Literal["preload"] = "preload"
    route: ClassVar[Route] = Route(Role.scheduler, Role.loader)
    models: list[Name]


class ClusterStatus(Wire):
    kind: Literal["cluster_status"] = "cluster_status"
    route: ClassVar[Route] = Route(Role.scheduler, Role.frontend, Via.answer)
    runners: list[RunnerStatus]
    loaders: list[LoaderState] = Field(default_factory=list)
    queued: list[JobId]  # the first to start, in order (the scheduler's STATUS_QUEUED): all would not fit
    queued_total: int = Field(default=0, ge=0)  # how many are queued
    counts: dict[str, int]  # jobs by state, over the jobs the scheduler remembers
    stats: SchedulerStats = Field(default_factory=SchedulerStats)
    leases: list[Lease] = Field(default_factory=list)  # VRAM leases pending and granted

    @model_validator(mode="before")
    @classmethod
    def _total_counts_the_listed(cls, data: Any) -> Any:
        """A status without ``queued_total`` (an older scheduler's) lists every queued job."""
        if isinstance(data, dict) and "queued_total" not in data and isinstance(data.get("queued"), list):
            data = {**data, "queued_total": len(data["queued"])}
        return data


class ListJobs(Wire, AnsweredBy["JobList"]):
    """A user's jobs that the scheduler remembers, newest first."""

    kind: Literal["list_jobs"] = "list_jobs"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)
    user: str = Field(min_length=1, max_length=128)
    limit: int = Field(default=100, ge=1, le=1000)


class JobList(Wire):
    kind: Literal["job_list"] = "job_list"
    route: ClassVar[Route] = Route(Role.scheduler, Role.frontend, Via.answer)
    jobs: list[JobRecord]


class GetModels(Wire, AnsweredBy["Models"]):
    kind: Literal["get_models"] = "get_models"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)
    user: str | None = Field(default=None, min_length=1, max_length=128)  # also list this user's LoRAs


class ListLoras(Wire, AnsweredBy["LoraList"]):
    """The LoRAs a user may use: their own, and those shared with them."""

    kind: Literal["list_loras"] = "list_loras"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)
    user: str = Field(min_length=1, max_length=128)


class DeleteLora(Wire, AnsweredBy["LoraList"]):
    kind: Literal["delete_lora"] = "delete_lora"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)
    user: str = Field(min_length=1, max_length=128)  # only its owner deletes it
    name: Name


class ShareLora(Wire, AnsweredBy["LoraList"]):
    """Lets other users apply one's LoRA (``users`` replaces the list; empty: shared with no one)."""

    kind: Literal["share_lora"] = "share_lora"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)
    user: str = Field(min_length=1, max_length=128)
    name: Name
    users: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(default_factory=list, max_length=1000)


class LoraList(Wire):
    kind: Literal["lora_list"] = "lora_list"
    route: ClassVar[Route] = Route(Role.scheduler, Role.frontend, Via.answer)
    loras: list[LoraInfo]


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
    # The asking user's trained LoRAs for this model (their own and those shared with them): a job
    # names them "name" (its own) or "@owner/name".
    user_loras: list[str] = Field(default_factory=list)
    controlnets: list[Name] = Field(default_factory=list)  # what JobSpec.controlnet may choose from
    ip_adapter: bool = False  # a job may bring an ip_adapter_image


class Models(Wire):
    kind: Literal["models"] = "models"
    route: ClassVar[Route] = Route(Role.scheduler, Role.frontend, Via.answer)
    models: list[ModelInfo]


class JobResult(Wire):
    """The final word on a job, sent to the submitting frontend over the routed path."""

    kind: Literal["job_result"] = "job_result"
    route: ClassVar[Route] = Route(Role.scheduler, Role.frontend)
    job: JobRecord
    outputs: list[Artifact] = Field(default_factory=list)


# --------------------------------------------------------------------------- #
# Scheduler <-> runner, runner <-> loader


class BatchItem(Wire):
    job: JobSpec  # fully resolved: size, steps, guidance and seed are set
    attempt: int = Field(ge=1)
    inputs: JobInputs | None = None
    checkpoint: Blob | None = None  # a training's newest checkpoint: it resumes from there


class RunBatch(Wire):
    """Jobs that share one pipeline call: same model, kind, size, steps, guidance (scheduler -> runner)."""

    kind: Literal["run_batch"] = "run_batch"
    route: ClassVar[Route] = Route(Role.scheduler, Role.runner)
    batch_id: JobId
    items: list[BatchItem] = Field(min_length=1, max_length=1024)


class StopJob(Wire, AnsweredBy["Ok"]):
    kind: Literal["stop_job"] = "stop_job"
    # Told, not asked: the scheduler does not wait for the runner's Ok.
    route: ClassVar[Route] = Route(Role.scheduler, Role.runner)
    job_id: JobId
    reason: str
    # A training is asked to make way, not to end: it checkpoints at its next step and is queued again.
    pause: bool = False


class TrainCheckpoint(Wire, AnsweredBy["Ok"]):
    """A training's state at ``step`` (a safetensors file), kept in the artifact store so a runner that
    dies, or yields, resumes from it (runner -> scheduler)."""

    kind: Literal["train_checkpoint"] = "train_checkpoint"
    route: ClassVar[Route] = Route(Role.runner, Role.scheduler)
    job_id: JobId
    step: int = Field(ge=1)
    data: Blob


class GetLora(Wire, AnsweredBy["LoraFile"]):
    """The file of a user's trained LoRA, by the reference a resolved job carries (runner -> scheduler)."""

    kind: Literal["get_lora"] = "get_lora"
    route: ClassVar[Route] = Route(Role.runner, Role.scheduler)
    ref: str = Field(min_length=1, max_length=400)


class LoraFile(Wire):
    kind: Literal["lora_file"] = "lora_file"
    route: ClassVar[Route] = Route(Role.scheduler, Role.runner, Via.answer)
    ref: str
    data: Blob


class BatchUpdate(Wire):
    kind: Literal["batch_update"] = "batch_update"
    route: ClassVar[Route] = Route(Role.runner, Role.scheduler)
    batch_id: JobId
    state: Literal[JobState.loading, JobState.running]


class BatchDone(Wire, AnsweredBy["Ok"]):
    """The outcome of every job of a batch; the runner is free again (runner -> scheduler)."""

    kind: Literal["batch_done"] = "batch_done"
    route: ClassVar[Route] = Route(Role.runner, Role.scheduler)
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
    route: ClassVar[Route] = Route(Role.runner, Role.scheduler)


class GetRunnerState(Wire, AnsweredBy["RunnerState"]):
    """What a runner holds and runs now (scheduler -> runner, when it joins): the broker's PeerUp
    carries its capabilities as of its Hello, which may be from before a batch began or ended."""

    kind: Literal["get_runner_state"] = "get_runner_state"
    route: ClassVar[Route] = Route(Role.scheduler, Role.runner)


class RunnerState(Wire):
    kind: Literal["runner_state"] = "runner_state"
    route: ClassVar[Route] = Route(Role.runner, Role.scheduler, Via.answer)
    capabilities: Capabilities


class Stage(Wire, AnsweredBy["Staged"]):
    kind: Literal["stage"] = "stage"
    route: ClassVar[Route] = Route(Role.runner, Role.loader)
    model: Name


class Staged(Wire):
    kind: Literal["staged"] = "staged"
    route: ClassVar[Route] = Route(Role.loader, Role.runner, Via.answer)
    model: Name
    path: str  # the model's folder on this host ("" for a family that needs none)
    bytes: int
    segment: str | None = None  # the shared-memory file holding the weights, when staged
    files: list[StagedFile] = Field(default_factory=list)


# --------------------------------------------------------------------------- #
# ---- VRAM leases: another program borrows device memory for a while (frontend <-> scheduler <-> runner)

MAX_LEASE_S: Final = 86400.0  # a day: a lease forgotten by its holder still ends
MAX_LEASE_WAIT_S: Final = 3600.0


class TakeLease(Wire, AnsweredBy["LeaseInfo"]):
    """Asks for ``bytes`` of device memory on ``device`` ("cuda:0", "cpu"; None: every device of the node, each
    ``bytes``) for at most ``ttl_s``. Answered once granted (the runners on it finished or, ``urgent``, handed
    back their batch, and evicted models until the bytes were free), or with an Error that says why not
    (unknown device, more than its budget can ever give, not freed within ``wait_s``). The lease ends at
    ``EndLease``, at ``ttl_s``, or when the asking peer goes away (frontend -> scheduler)."""

    kind: Literal["take_lease"] = "take_lease"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)
    device: str | None = Field(default=None, min_length=1, max_length=64)
    node: str | None = Field(default=None, min_length=1, max_length=128)  # needed where the device is on several
    bytes: int = Field(gt=0, le=1 << 50)
    ttl_s: float = Field(gt=0, le=MAX_LEASE_S)
    urgent: bool = False
    holder: str = Field(default="", max_length=128)  # who holds it, for people: "maw", "llm-bot"
    wait_s: float = Field(default=120.0, gt=0, le=MAX_LEASE_WAIT_S)


class EndLease(Wire, AnsweredBy["LeaseInfo"]):
    """Gives a lease's memory back (frontend -> scheduler); answered with the ended lease."""

    kind: Literal["end_lease"] = "end_lease"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)
    id: LeaseId


class ListLeases(Wire, AnsweredBy["LeaseList"]):
    kind: Literal["list_leases"] = "list_leases"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)


class LeaseInfo(Wire):
    kind: Literal["lease_info"] = "lease_info"
    route: ClassVar[Route] = Route(Role.scheduler, Role.frontend, Via.answer)
    lease: Lease


class LeaseList(Wire):
    kind: Literal["lease_list"] = "lease_list"
    route: ClassVar[Route] = Route(Role.scheduler, Role.frontend, Via.answer)
    leases: list[Lease]  # pending and granted, then the last ended ones


class YieldMemory(Wire, AnsweredBy["MemoryYielded"]):
    """Take a lease (scheduler -> idle runner): the budget shrinks by ``lease.bytes``, least recently used models
    go until the bytes are free on the device itself, and the runner ends the lease at ``lease.expires_at``
    on its own if no ``ReclaimMemory`` comes first."""

    kind: Literal["yield_memory"] = "yield_memory"
    route: ClassVar[Route] = Route(Role.scheduler, Role.runner)
    lease: HeldLease


class MemoryYielded(Wire):
    kind: Literal["memory_yielded"] = "memory_yielded"
    route: ClassVar[Route] = Route(Role.runner, Role.scheduler, Via.answer)
    lease_id: LeaseId
    freed_bytes: int = Field(ge=0)  # measured on the device (CUDA), else by the budget's accounting
    evicted: list[Name] = Field(default_factory=list)
    budget_bytes: int = Field(ge=0)
    free_bytes: int | None = None  # the device's free memory after, where measured
    resident: dict[str, int] = Field(default_factory=dict)  # what stays loaded


class ReclaimMemory(Wire, AnsweredBy["Ok"]):
    """A lease ended: the runner's budget grows back by its bytes (scheduler -> runner, told)."""

    kind: Literal["reclaim_memory"] = "reclaim_memory"
    route: ClassVar[Route] = Route(Role.scheduler, Role.runner)
    lease_id: LeaseId


class MemoryBudget(Wire):
    """A runner's budget changed on its own: another process took or gave back device memory, or a lease's
    deadline passed (runner -> scheduler)."""

    kind: Literal["memory_budget"] = "memory_budget"
    route: ClassVar[Route] = Route(Role.runner, Role.scheduler)
    budget_bytes: int = Field(ge=0)
    leased_bytes: int = Field(ge=0)
    full_budget_bytes: int = Field(ge=0)
    leases: list[HeldLease] = Field(default_factory=list, max_length=64)
    reason: str = Field(default="", max_length=400)
    resident: dict[str, int] = Field(default_factory=dict)  # what stays loaded


# ---- Operator controls (frontend -> scheduler; the catalog also scheduler -> runner, loader)
# Any frontend may send these over ZeroMQ: the CLI is the operator, as for CancelJob; the HTTP
# server lets only its admins through (frontends/operator.py).


NodeState = Literal["serving", "draining", "drained"]


class OperatorControls(Wire):
    """What an operator has paused and drained (the answer to every control)."""

    kind: Literal["operator_controls"] = "operator_controls"
    route: ClassVar[Route] = Route(Role.scheduler, Role.frontend, Via.answer)
    paused: bool  # the whole queue
    paused_models: list[Name] = Field(default_factory=list)
    nodes: dict[str, NodeState] = Field(default_factory=dict)  # every node the scheduler knows


class GetControls(Wire, AnsweredBy["OperatorControls"]):
    kind: Literal["get_controls"] = "get_controls"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)


class PauseQueue(Wire, AnsweredBy["OperatorControls"]):
    """Nothing new starts (the whole queue, or ``model``'s jobs); what runs finishes, submits are taken."""

    kind: Literal["pause_queue"] = "pause_queue"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)
    model: Name | None = None


class ResumeQueue(Wire, AnsweredBy["OperatorControls"]):
    """Starts again what a pause held (``model`` None: the queue and every paused model)."""

    kind: Literal["resume_queue"] = "resume_queue"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)
    model: Name | None = None


class DrainNode(Wire, AnsweredBy["OperatorControls"]):
    """The node's runners finish what they run and take nothing new, until ``ResumeNode``."""

    kind: Literal["drain_node"] = "drain_node"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)
    node: str = Field(min_length=1, max_length=128)


class ResumeNode(Wire, AnsweredBy["OperatorControls"]):
    kind: Literal["resume_node"] = "resume_node"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)
    node: str = Field(min_length=1, max_length=128)


class MoveToFront(Wire, AnsweredBy["JobInfo"]):
    """A queued job starts next, before every other queued job (after those moved before it)."""

    kind: Literal["move_to_front"] = "move_to_front"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)
    job_id: JobId


class SetPriority(Wire, AnsweredBy["JobInfo"]):
    """A queued job's priority class changes."""

    kind: Literal["set_priority"] = "set_priority"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)
    job_id: JobId
    priority: Priority


class ReloadCatalog(Wire, AnsweredBy["CatalogChanges"]):
    """The scheduler reads its config file again and takes its ``models`` and ``default_model``."""

    kind: Literal["reload_catalog"] = "reload_catalog"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)


class CatalogChanges(Wire):
    """What a reload changed, by model name."""

    kind: Literal["catalog_changes"] = "catalog_changes"
    route: ClassVar[Route] = Route(Role.scheduler, Role.frontend, Via.answer)
    added: list[Name] = Field(default_factory=list)
    changed: list[Name] = Field(default_factory=list)
    removed: list[Name] = Field(default_factory=list)


class GetCatalog(Wire, AnsweredBy["Catalog"]):
    """The catalog as the scheduler serves it now: a frontend asks after a ``catalog_reloaded`` event."""

    kind: Literal["get_catalog"] = "get_catalog"
    route: ClassVar[Route] = Route(Role.frontend, Role.scheduler)


# Each model's ModelEntry as JSON text (``ModelEntry.model_dump_json()``), validated by its receiver: the
# entry's own schema (its ``options`` table is free-form) stays the config's, not the wire's.
CatalogEntries = dict[Name, str]


class Catalog(Wire):
    kind: Literal["catalog"] = "catalog"
    route: ClassVar[Route] = Route(Role.scheduler, Role.frontend, Via.answer)
    models: CatalogEntries = Field(max_length=10_000)
    default_model: str


class CatalogUpdate(Wire):
    """The catalog after a reload (scheduler -> runner, loader; and to one that joins after it): a changed or
    removed model's resident and staged copies are dropped once idle. The message is the truth, whatever
    the receiver's own config file says."""

    kind: Literal["catalog_update"] = "catalog_update"
    route: ClassVar[Route] = Route(Role.scheduler, (Role.runner, Role.loader))
    models: CatalogEntries = Field(max_length=10_000)
    default_model: str


# --------------------------------------------------------------------------- #
# Events, published on the broker's XPUB (lossy; the routed path carries results)


class JobEvent(Wire):
    kind: Literal["job_event"] = "job_event"
    route: ClassVar[Route] = Route(Role.scheduler, Role.frontend, Via.event, topic="state")
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
    route: ClassVar[Route] = Route(Role.runner, Role.frontend, Via.event, topic="progress")
    job_id: JobId
    step: int
    total: int
    elapsed_s: float
    eta_s: float | None
    loss: float | None = None  # a training's, at this step


class ClusterEvent(Wire):
    """Something another program on the box may act on, not about one job: the queue went busy or idle, a
    VRAM lease was granted or ended, an operator paused, drained or reloaded something. Published on
    ``cluster/<event>`` (so a subscriber takes all with ``cluster/``, or one kind), and handed to the
    configured webhooks. ``detail`` is small and flat: what a script needs to act (a device, bytes, a model)."""

    kind: Literal["cluster_event"] = "cluster_event"
    route: ClassVar[Route] = Route(Role.scheduler, Role.frontend, Via.event, topic="cluster")
    event: ClusterEventKind
    at: float  # the scheduler's wall clock, seconds since the epoch
    detail: dict[str, str | int | float | bool | None] = Field(default_factory=dict, max_length=32)


class Preview(Wire):
    kind: Literal["preview"] = "preview"
    route: ClassVar[Route] = Route(Role.runner, Role.frontend, Via.event, topic="preview")
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
        ReportStaged,
        Preload,
        Release,
        GetModels,
        Models,
        ListLoras,
        DeleteLora,
        ShareLora,
        LoraList,
        JobResult,
        RunBatch,
        StopJob,
        TrainCheckpoint,
        GetLora,
        LoraFile,
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
        ClusterEvent,
        TakeLease,
        EndLease,
        ListLeases,
        LeaseInfo,
        LeaseList,
        YieldMemory,
        MemoryYielded,
        ReclaimMemory,
        MemoryBudget,
        OperatorControls,
        GetControls,
        PauseQueue,
        ResumeQueue,
        DrainNode,
        ResumeNode,
        MoveToFront,
        SetPriority,
        ReloadCatalog,
        CatalogChanges,
        GetCatalog,
        Catalog,
        CatalogUpdate,
    ],
    Field(discriminator="kind"),
]

MESSAGE_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)
MESSAGES = get_args(get_args(Message)[0])


def _topic_pattern(topic: str | None) -> str:
    if topic is None:
        return "-"
    return "cluster/<event>" if topic == CLUSTER_TOPIC else f"job/<id>/{topic}"


def protocol_table() -> str:
    """Every message with its route and reply, one a line, in columns."""

    def names(parties: tuple[Party, ...]) -> str:
        if set(PEERS) <= set(parties):
            return ", ".join([*(p for p in parties if p not in PEERS), "peers"])
        return ", ".join(getattr(p, "value", p) for p in parties)

    rows = [("kind", "from", "to", "via", "reply", "topic")]
    for message in MESSAGES:
        route = message.route
        rows.append((kind_of(message), names(route.sent_by), names(route.to), route.via.value,
                     " | ".join(kind_of(reply) for reply in reply_types(message)) or "-",
                     _topic_pattern(route.topic)))
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


if __name__ == "__main__":
    print(protocol_table())
