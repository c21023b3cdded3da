"""What the scheduling policy holds, and the transitions of a job that every rule shares.

The policy's state is its own: plain dataclasses it changes in place. The wire records
(``atelier/jobs.py``) are frozen; a ``JobRecord`` is made from a ``Job`` on demand, as a
snapshot (``Job.record``), and the counters become a ``SchedulerStats`` the same way.

A transition (``State.finish``, ``requeue``, ``stop``, …) changes the state and appends the
*effects* the scheduler actor is to carry out: announce a job's state, deliver its result,
run a batch, stop a job, preload models. No sockets and no clock: time is passed in.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from atelier.config import ModelEntry, SchedulerConfig
from atelier.jobs import (
    Capabilities,
    JobInputs,
    JobKind,
    JobRecord,
    JobSpec,
    JobState,
    ModelStats,
    Priority,
    RunTiming,
    SchedulerStats,
)
from atelier.scheduling.fairqueue import Entry, FairQueue
from atelier.scheduling.index import IDLE, Kind, RunnerIndex

PRIORITY_CLASS = {Priority.live: 0, Priority.interactive: 1, Priority.batch: 2}
# What may differ between the jobs of one pipeline call: everything per image or about the job.
# Any other field (and any field added later) must match, which is the safe default.
PER_JOB_FIELDS = frozenset({"id", "prompt", "negative_prompt", "seed", "count", "user", "priority", "session",
                            "previews"})
JOB_SECONDS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)  # submit to end, for /metrics


def input_bytes(inputs: JobInputs | None) -> int:
    return sum(len(data) for _, data in inputs.files()) if inputs is not None else 0


@dataclass(frozen=True)
class BatchKey:
    """What jobs must have in common to share one pipeline call."""

    model: str
    fields: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, spec: JobSpec) -> BatchKey:
        shared = spec.model_dump(exclude=set(PER_JOB_FIELDS), mode="json")
        if spec.train is not None:  # a training runs alone: its own key
            shared["id"] = spec.id
        return cls(spec.model, tuple(sorted((k, repr(v)) for k, v in shared.items())))


@dataclass(eq=False)
class Job:
    """One job as the policy holds it: where it stands, and what the policy needs to move it on."""

    spec: JobSpec
    client: str  # the frontend that submitted it: where the result goes
    key: BatchKey
    entry: Entry  # its place in the queue's order
    submitted_at: float
    state: JobState = JobState.queued
    reason: str | None = None
    attempts: int = 0
    runner: str | None = None
    batch_id: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    artifacts: list[str] = field(default_factory=list)
    position: int | None = None  # 0-based place in the plan while queued
    finish_at: float | None = None  # expected end, absolute; a record's eta_s is derived from it
    inputs: JobInputs | None = None  # kept until it ends: a retry needs them again
    input_bytes: int = 0  # what its inputs count against the byte budgets, until it ends
    input_count: int = 0  # how many input images it has, held here or (``inputs`` None) elsewhere
    idempotency_key: str | None = None
    cancel_requested: bool = False
    superseded_by: str | None = None
    announced_position: int | None = None
    # A training: its newest checkpoint's URI and steps, the steps it had when last dispatched (what the
    # run since has done is charged), and whether it has been asked to make way for waiting jobs.
    checkpoint: str | None = None
    trained_steps: int = 0
    steps_at_dispatch: int = 0
    pausing: bool = False

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def live(self) -> bool:
        return not self.state.terminal

    @property
    def stopping(self) -> bool:
        return self.cancel_requested or self.superseded_by is not None

    @property
    def stop_reason(self) -> str:
        if self.superseded_by is not None:
            return f"superseded by a newer prompt (job {self.superseded_by})"
        return "cancelled"

    def record(self, now: float) -> JobRecord:
        """The job as the wire shows it, with its ETA as seconds from ``now``."""
        eta = None if self.finish_at is None else round(max(0.0, self.finish_at - now), 3)
        return JobRecord(spec=self.spec, state=self.state, reason=self.reason, attempts=self.attempts,
                         runner=self.runner, position=self.position, eta_s=eta, batch_id=self.batch_id,
                         submitted_at=self.submitted_at, started_at=self.started_at,
                         finished_at=self.finished_at, artifacts=list(self.artifacts), checkpoint=self.checkpoint,
                         trained_steps=self.trained_steps)


@dataclass
class Batch:
    id: str
    runner: str
    model: str
    jobs: list[str]
    images: int
    started: float
    expected_s: float  # load + run, as estimated at dispatch


@dataclass
class Runner:
    name: str
    capabilities: Capabilities  # as it last registered or said
    resident: dict[str, int] = field(default_factory=dict)  # as it last reported
    draining: bool = False  # shutting down: finishes or hands back its batch, takes no new one
    batch: Batch | None = None
    # A dispatch found it unreachable (gone, its restart not yet registered): none is sent it until
    # then, or until it joins again (a new Runner), rather than failing job after job on it.
    unreachable_until: float = float("-inf")
    # Models its budget cannot hold now (VRAM leases, other processes' memory): none is placed on it until then.
    cannot_hold: set[str] = field(default_factory=set)

    @property
    def node(self) -> str | None:
        return self.capabilities.node

    @property
    def device(self) -> str:
        return self.capabilities.device or "cpu"

    @property
    def device_name(self) -> str:
        """What its step times are measured on: runners with the same device name share estimates."""
        return self.capabilities.device_name or self.device

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def devices(self) -> frozenset[str]:
        """The node's devices it occupies, as it said (a gang: all of its ranks'). None said: it
        shares a device with no other runner."""
        return frozenset(self.capabilities.devices)

    @property
    def gang(self) -> int:
        """How many devices (ranks) one of its pipeline calls runs on: 1 for a single-device runner."""
        return max(1, self.capabilities.gang)

    def accepts(self, family: str) -> bool:
        return not self.capabilities.families or family in self.capabilities.families

    def takes(self, entry: ModelEntry) -> bool:
        """Whether it runs the model's batches: a family it runs, and on a gang only a model whose
        catalog layout (``parallel``) spans exactly the gang's devices."""
        if not self.accepts(entry.family):
            return False
        if self.gang == 1:
            return True
        return entry.parallel is not None and entry.parallel.size == self.gang

    @property
    def kind(self) -> Kind:
        """What makes it interchangeable with others for the planner (index.py)."""
        return (self.device_name, self.on_gpu, tuple(sorted(self.capabilities.families)))

    def shares_device(self, other: Runner) -> bool:
        """Whether the two are different runners of one node over at least one same device (a gang
        and a single on one of its devices, two gangs that overlap): they never run at once."""
        return other is not self and other.node == self.node and not self.devices.isdisjoint(other.devices)


# --------------------------------------------------------------------------- #
# Effects: what the actor is asked to do, in order


@dataclass(frozen=True)
class Announce:
    """Publish the job's current state (a JobEvent)."""

    job: Job


@dataclass(frozen=True)
class Deliver:
    """The job has ended: publish its state and send its result to its client."""

    job: Job
    outputs: tuple = ()


@dataclass(frozen=True)
class Dispatch:
    """Send the batch to its runner."""

    batch: Batch
    # (spec, attempt, inputs, a training's checkpoint URI); inputs None also where the policy was told to
    # forget them (spill_inputs)
    items: tuple[tuple[JobSpec, int, JobInputs | None, str | None], ...]


@dataclass(frozen=True)
class StopRunning:
    """Ask a runner to stop a job at its next step."""

    runner: str
    job_id: str
    reason: str
    pause: bool = False  # a training: checkpoint and make way (it is queued again), not an end


@dataclass(frozen=True)
class PreloadModels:
    """Ask a node's loader to stage these models now."""

    node: str
    models: tuple[str, ...]


Effect = Announce | Deliver | Dispatch | StopRunning | PreloadModels


# --------------------------------------------------------------------------- #
# Counters


@dataclass
class ModelCounters:
    loads: Counter[str] = field(default_factory=Counter)  # by where from: staged, disk
    load_seconds: float = 0.0
    batches: int = 0
    images: int = 0
    steps: int = 0
    step_seconds: float = 0.0


@dataclass
class Counters:
    """What the scheduler has done since it started (monotonic, for /metrics)."""

    finished: Counter[str] = field(default_factory=Counter)  # by final state
    job_seconds_counts: list[int] = field(default_factory=lambda: [0] * (len(JOB_SECONDS_BUCKETS) + 1))
    job_seconds_sum: float = 0.0
    models: dict[str, ModelCounters] = field(default_factory=dict)

    def count_finished(self, state: JobState, seconds: float) -> None:
        self.finished[state.value] += 1
        self.job_seconds_sum += seconds
        for i, bound in enumerate([*JOB_SECONDS_BUCKETS, float("inf")]):
            if seconds <= bound:
                self.job_seconds_counts[i] += 1

    def count_batch(self, model: str, timing: RunTiming) -> None:
        counters = self.models.setdefault(model, ModelCounters())
        counters.batches += 1
        counters.images += timing.images
        counters.steps += timing.steps
        counters.step_seconds += (timing.step_s or 0.0) * timing.steps
        if timing.loaded_from != "resident":
            counters.loads[timing.loaded_from] += 1
            counters.load_seconds += timing.stage_wait_s + timing.load_s

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            finished=dict(self.finished), job_seconds_buckets=list(JOB_SECONDS_BUCKETS),
            job_seconds_counts=list(self.job_seconds_counts), job_seconds_sum=self.job_seconds_sum,
            models={model: ModelStats(loads=dict(c.loads), load_seconds=c.load_seconds, batches=c.batches,
                                      images=c.images, steps=c.steps, step_seconds=c.step_seconds)
                    for model, c in self.models.items()})


# --------------------------------------------------------------------------- #


def busy_until(runner: Runner) -> float:
    """When the batch it has is expected to end; ``IDLE`` when it has none."""
    return IDLE if runner.batch is None else runner.batch.started + runner.batch.expected_s


def staying(runner: Runner) -> set[str]:
    """Models sure to be on the runner when it is next free. A busy runner loading another
    model may evict what it holds; the one it runs now stays."""
    if runner.batch is None or runner.batch.model in runner.resident:
        return set(runner.resident)
    return {runner.batch.model}


class State:
    """The jobs, the runners, their batches and what each node's loader has staged, with the
    transitions a job goes through whichever rule moves it."""

    def __init__(self, settings: SchedulerConfig):
        self.settings = settings
        self.queue = FairQueue(fair=settings.policy == "fair")
        self.jobs: dict[str, Job] = {}
        self.runners: dict[str, Runner] = {}
        self.batches: dict[str, Batch] = {}
        self.staged: dict[str, dict[str, int]] = {}  # by node: what its loader reported staged
        self.asked: dict[str, set[str]] = {}  # by node: preloads asked for, not yet reported staged
        self.sessions: dict[tuple[str, str], str] = {}  # (user, session) -> its newest job
        self.keys: dict[tuple[str, str], str] = {}  # (user, idempotency key) -> its job
        self.input_bytes: Counter[str] = Counter()  # by user: input bytes of jobs not yet ended
        self.effects: list[Effect] = []
        self.counters = Counters()
        self.finished: deque[str] = deque()  # ended jobs still held, oldest first
        # Kept by ``touch``, so that a plan looks only at the runners that can matter (index.py):
        self.index = RunnerIndex()
        self.idle: set[str] = set()  # runners that could take a batch now: none of theirs or of those sharing a device
        self.training: set[str] = set()  # runners whose batch is a training
        self._sharing: dict[str, list[Runner]] = {}  # by runner: ``sharing``, until a runner joins or leaves
        self._on_node: dict[str | None, dict[str, Runner]] = {}  # the runners of each node
        self.short: set[str] = set()  # runners whose device budget is below their full one (leases.py)
        self.joined = 0  # counts runners joining, leaving and changing what they are: a cache of them asks it

    # -- runners: every change to one goes through here, so the index and idle set follow ------------- #

    def add_runner(self, runner: Runner) -> None:
        self.joined += 1
        self.runners[runner.name] = runner
        self._on_node.setdefault(runner.node, {})[runner.name] = runner
        self._regroup(runner.node)
        self.set_capabilities(runner, runner.capabilities)

    def remove_runner(self, name: str) -> Runner | None:
        runner = self.runners.pop(name, None)
        if runner is not None:
            self.joined += 1
            self.index.drop(name)
            self.idle.discard(name)
            self.training.discard(name)
            self.short.discard(name)
            self._sharing.pop(name, None)
            self._leave_node(runner)
            self._regroup(runner.node)
        return runner

    def _leave_node(self, runner: Runner) -> None:
        mates = self._on_node.get(runner.node, {})
        mates.pop(runner.name, None)
        if not mates:
            self._on_node.pop(runner.node, None)

    def set_batch(self, runner: Runner, batch: Batch | None) -> None:
        runner.batch = batch
        self.touch(runner)

    def set_resident(self, runner: Runner, resident: dict[str, int]) -> None:
        runner.resident = dict(resident)
        self.touch(runner)

    def set_capabilities(self, runner: Runner, caps: Capabilities) -> None:
        devices, kind, node = runner.devices, runner.kind, runner.node
        if caps.node != node and runner.name in self.runners:  # it came back as part of another node
            self._leave_node(runner)
            self._on_node.setdefault(caps.node, {})[runner.name] = runner
        runner.capabilities = caps
        if runner.node != node:
            self._regroup(node)
        if runner.kind != kind:
            self.joined += 1
        if caps.full_budget_bytes and caps.budget_bytes < caps.full_budget_bytes:
            self.short.add(runner.name)
        else:
            self.short.discard(runner.name)
        if runner.devices != devices or runner.node != node:
            self._regroup(runner.node)
        self.touch(runner)

    def restage(self, node: str) -> None:
        """What the node's loader has staged, or was asked to stage, changed."""
        for r in list(self._on_node.get(node, {}).values()):
            self._place(r)

    def staged_on(self, node: str | None) -> set[str]:
        """The models a runner of the node would load from its loader's memory (staged or being staged)."""
        if node is None:
            return set()
        return set(self.staged.get(node, ())) | self.asked.get(node, set())

    def touch(self, runner: Runner) -> None:
        """Its batch, models or capabilities changed (or a batch's expected end): the index and the idle set
        follow, for it and for the runners sharing a device with it."""
        if runner.name not in self.runners:
            return
        for r in (runner, *self.sharing(runner)):
            self._place(r)

    def _idle_now(self, r: Runner) -> bool:
        return r.batch is None and not any(o.batch is not None for o in self.sharing(r))

    def _special(self, r: Runner) -> bool:
        """A gang, or a runner sharing a device with another: not listed in the index (index.py)."""
        return r.gang > 1 or bool(self.sharing(r))

    def _place(self, r: Runner) -> None:
        if self._idle_now(r):
            self.idle.add(r.name)
        else:
            self.idle.discard(r.name)
        first = self.jobs.get(r.batch.jobs[0]) if r.batch is not None and r.batch.jobs else None
        if first is not None and first.spec.kind is JobKind.train:
            self.training.add(r.name)
        else:
            self.training.discard(r.name)
        if self._special(r):
            self.index.put_special(r.name)
        else:
            self.index.put(r.name, r.kind, busy_until(r), staying(r), self.staged_on(r.node))

    def _regroup(self, node: str | None) -> None:
        """A runner of ``node`` joined, left or changed devices: who shares a device with whom is asked again."""
        mates = list(self._on_node.get(node, {}).values())
        for r in mates:
            self._sharing.pop(r.name, None)
        for r in mates:
            self._place(r)

    def sharing(self, runner: Runner) -> list[Runner]:
        """The other runners of its node that share a device with it (``Runner.shares_device``)."""
        if not runner.devices:
            return []
        known = self._sharing.get(runner.name)
        if known is None:
            known = self._sharing[runner.name] = [other for other in self._on_node.get(runner.node, {}).values()
                                                  if runner.shares_device(other)]
        return known

    def check_index(self) -> list[str]:
        """Where the index or the idle set disagree with the runners (for the tests): empty when they agree."""
        wrong = []
        for r in self.runners.values():
            idle = self._idle_now(r)
            if idle != (r.name in self.idle):
                wrong.append(f"{r.name}: idle is {r.name in self.idle}, should be {idle}")
            if self._special(r):
                if r.name not in self.index.special:
                    wrong.append(f"{r.name}: not special")
                continue
            busy = busy_until(r)
            held = frozenset(staying(r))
            if self.index.listed(r.name) != (r.kind, (busy, r.name), held, frozenset(self.staged_on(r.node)) - held):
                wrong.append(f"{r.name}: listed {self.index.listed(r.name)}, is {(r.kind, busy, staying(r))}")
        return wrong

    def job_on(self, job_id: str, runner: str) -> Job | None:
        """The job, if ``runner`` is (still) the one running it; late words from an old runner are ignored."""
        job = self.jobs.get(job_id)
        if job is None or job.runner != runner or not job.live:
            return None
        return job

    def set_running(self, job: Job, runner: str, batch_id: str, state: JobState) -> None:
        job.state = state
        job.runner = runner
        job.batch_id = batch_id
        job.position = None
        job.announced_position = None

    def requeue(self, job: Job, reason: str, *, started: bool = True) -> None:
        """Back to the front of its owner's queue. ``started=False``: the runner never began it, so
        the attempt counted at dispatch is taken back."""
        if not started:
            job.attempts -= 1
        job.pausing = False
        job.state = JobState.queued
        job.runner = None
        job.batch_id = None
        job.reason = reason
        job.finish_at = None
        self.queue.refund(job.entry)
        self.queue.push(job.entry, front=True)  # it waited its turn already
        self.effects.append(Announce(job))

    def pause(self, job: Job, reason: str) -> None:
        """A training that made way at a checkpoint: queued again at the front of its owner's batch work,
        no attempt counted. Its owner is charged for the steps it ran, and its next start for those left."""
        train = job.spec.train
        total = train.steps if train is not None else 1
        left_before = max(1, total - job.steps_at_dispatch)
        per_step = job.entry.cost / left_before
        ran = max(0, min(job.trained_steps, total) - job.steps_at_dispatch)
        job.entry.cost = per_step * (left_before - ran)  # what was not run: given back, charged when it starts
        self.queue.refund(job.entry)
        job.attempts -= 1
        job.pausing = False
        job.state, job.runner, job.batch_id, job.reason, job.finish_at = JobState.queued, None, None, reason, None
        self.queue.push(job.entry, front=True)
        self.effects.append(Announce(job))

    def stop(self, job: Job, reason: str, now: float) -> None:
        """Stops a job that a runner has. If the rest of its batch goes on, the job ends now (the
        runner drops its images); if it was all the batch had, the runner stops at its next step
        and its report ends the job, so the runner is known to be free."""
        if job.runner is None:
            return
        self.effects.append(StopRunning(job.runner, job.id, reason))
        batch = self.batches.get(job.batch_id or "")
        if batch is not None and any(j != job.id and self.jobs.get(j) is not None and self.jobs[j].live
                                     and not self.jobs[j].stopping for j in batch.jobs):
            self.finish(job, JobState.cancelled, reason, now)

    def finish(self, job: Job, state: JobState, reason: str | None, now: float, outputs: tuple = ()) -> None:
        job.state = state
        job.reason = reason
        job.finished_at = now
        job.position = None
        job.finish_at = None
        job.inputs = None  # no attempt comes after an end
        self.release_inputs(job)
        self.counters.count_finished(state, now - job.submitted_at)
        self.effects.append(Deliver(job, outputs))
        self.remember_finished(job)

    def hold_inputs(self, job: Job, inputs: JobInputs | None) -> None:
        job.input_bytes, job.input_count = input_bytes(inputs), len(inputs.names()) if inputs is not None else 0
        self.input_bytes[job.spec.user] += job.input_bytes

    def release_inputs(self, job: Job) -> None:
        self.input_bytes[job.spec.user] -= job.input_bytes
        if self.input_bytes[job.spec.user] <= 0:
            del self.input_bytes[job.spec.user]
        job.input_bytes = 0

    def remember_finished(self, job: Job) -> None:
        """Ended jobs beyond ``remember_finished`` leave memory (the journal still has them)."""
        self.finished.append(job.id)
        while len(self.finished) > self.settings.remember_finished:
            forgotten = self.jobs.pop(self.finished.popleft(), None)
            if forgotten is not None:
                self.forget(forgotten)

    def forget(self, job: Job) -> None:
        """Drops what points to a job that has left ``jobs``."""
        if job.spec.session is not None:
            key = (job.spec.user, job.spec.session)
            if self.sessions.get(key) == job.id:
                del self.sessions[key]
        if job.idempotency_key is not None:
            self.keys.pop((job.spec.user, job.idempotency_key), None)
