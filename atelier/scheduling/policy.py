"""The scheduling policy: which job runs where, when, and with which others.

A pure core. It holds the jobs, the runners and what each node's loader has staged; it takes
events (a submit, a cancel, a runner joining or dying, a batch starting or ending) with the
time passed in, and answers with *effects* (announce a job's state, deliver its result, run a
batch, stop a job, preload models) that the scheduler actor turns into messages. No sockets
and no clock of its own, so every rule is tested by calling it (tests/test_policy.py).

The rules, in the order they apply:

1. Order (``FairQueue``): live before interactive before batch; within a class, users take
   turns by the work they have started, so one person's burst does not hold back another's
   single job. Per-user caps on queued and running jobs; a bounded queue that refuses with
   "queue full" and a hint of when to retry.
2. Batching: a job starts together with the queued jobs that can share its pipeline call
   (the same ``BatchKey``), wherever they stand in the queue, up to the model's batch size on
   that runner. Each image keeps its own seed. No runner waits for a batch to fill unless
   ``batch_wait_s`` says so; batches form from what queued while the runners were busy.
3. Placement: walking the queue in order, each batch goes to the runner where it is expected
   to *finish* first: when that runner is free, plus loading the model there (nothing if it is
   resident, a memory copy if the node has it staged, a disk read otherwise), plus the run,
   from measured step times (``Estimates``). So a job waits for a busy runner that holds its
   model when loading it elsewhere would take longer, a popular model is not loaded on every
   device, and a rare one still gets its turn in queue order.
4. Preloading: a batch planned for later on a runner that does not hold its model tells that
   node's loader to stage it now.
5. Live sessions: a newer job of a (user, session) replaces the session's queued job and stops
   its running one at the next step; a superseded job ends cancelled, never delivered as done.
6. Every queued job's position and ETA come from the same plan.

With ``policy = "fifo"`` the queue is one line in arrival order, a batch takes only the
consecutive compatible jobs at its head, and the head goes to the runner free first: how a
single-queue bot works, kept as the baseline the benchmarks compare against.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from atelier.config import Config
from atelier.families import FAMILY_LIMITS
from atelier.jobs import (
    Capabilities,
    ErrorCode,
    JobDone,
    JobFailed,
    JobInputs,
    JobRecord,
    JobSpec,
    JobState,
    ModelStats,
    Priority,
    RunTiming,
    SchedulerStats,
)
from atelier.scheduling import admission
from atelier.scheduling.admission import Refused
from atelier.scheduling.estimates import Estimates
from atelier.scheduling.fairqueue import Entry, FairQueue

PRIORITY_CLASS = {Priority.live: 0, Priority.interactive: 1, Priority.batch: 2}
# What may differ between the jobs of one pipeline call: everything per image or about the job.
# Any other field (and any field added later) must match, which is the safe default.
PER_JOB_FIELDS = frozenset({"id", "prompt", "negative_prompt", "seed", "count", "user", "priority", "session",
                            "previews"})
JOB_SECONDS_BUCKETS = [1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0]  # submit to end, for /metrics
ANNOUNCE_POSITIONS = 100  # queued jobs whose new position is published on a refresh, from the front
# While every runner is busy, a new plan only refreshes ETAs and preloads: once in this long is
# enough, and a burst of submits then costs one plan, not one each.
REPLAN_BUSY_S = 0.05


@dataclass(frozen=True)
class BatchKey:
    """What jobs must have in common to share one pipeline call."""

    model: str
    fields: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, spec: JobSpec) -> "BatchKey":
        shared = spec.model_dump(exclude=set(PER_JOB_FIELDS), mode="json")
        return cls(spec.model, tuple(sorted((k, repr(v)) for k, v in shared.items())))


@dataclass
class Job:
    record: JobRecord
    client: str  # the frontend that submitted it: where the result goes
    key: BatchKey
    entry: Entry
    inputs: JobInputs | None = None  # kept until it ends: a retry needs them again
    idempotency_key: str | None = None
    cancel_requested: bool = False
    superseded_by: str | None = None
    finish_at: float | None = None  # expected, absolute; record.eta_s is derived from it
    announced_position: int | None = None

    @property
    def id(self) -> str:
        return self.record.spec.id

    @property
    def spec(self) -> JobSpec:
        return self.record.spec

    @property
    def live(self) -> bool:
        return not self.record.state.terminal


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
    capabilities: Capabilities  # as it registered
    resident: dict[str, int] = field(default_factory=dict)  # as it last reported
    draining: bool = False  # shutting down: finishes or hands back its batch, takes no new one
    batch: Batch | None = None

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

    def accepts(self, family: str) -> bool:
        return not self.capabilities.families or family in self.capabilities.families


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
    items: tuple[tuple[JobSpec, int, JobInputs | None], ...]  # (spec, attempt, inputs)


@dataclass(frozen=True)
class StopRunning:
    """Ask a runner to stop a job at its next step."""

    runner: str
    job_id: str
    reason: str


@dataclass(frozen=True)
class PreloadModels:
    """Ask a node's loader to stage these models now."""

    node: str
    models: tuple[str, ...]


Effect = Announce | Deliver | Dispatch | StopRunning | PreloadModels


# --------------------------------------------------------------------------- #


class Policy:
    def __init__(self, config: Config, *, estimates: Estimates | None = None,
                 new_id: Callable[[], str] = lambda: uuid.uuid4().hex[:16],
                 rng: random.Random | None = None):
        self.config = config
        self.settings = config.scheduler
        self.fair = self.settings.policy == "fair"
        self.estimates = estimates or Estimates()
        self.queue = FairQueue(fair=self.fair)
        self.jobs: dict[str, Job] = {}
        self.runners: dict[str, Runner] = {}
        self.batches: dict[str, Batch] = {}
        self.staged: dict[str, dict[str, int]] = {}  # by node: what its loader reported staged
        self.sessions: dict[tuple[str, str], str] = {}  # (user, session) -> its newest job
        self.keys: dict[tuple[str, str], str] = {}  # (user, idempotency key) -> its job
        self.effects: list[Effect] = []
        self.stats = SchedulerStats(job_seconds_buckets=JOB_SECONDS_BUCKETS,
                                    job_seconds_counts=[0] * (len(JOB_SECONDS_BUCKETS) + 1))
        self.wake_at: float | None = None  # when schedule() wants calling again (a batch waiting, a plan put off)
        self._finished: deque[str] = deque()
        self._asked: dict[str, set[str]] = {}  # by node: preloads asked for, not yet reported staged
        self._fresh: list[Job] = []  # submitted, not yet announced
        self._next_plan = float("-inf")  # while all runners are busy, no new plan before this
        self._seq = itertools.count()
        self._new_id = new_id
        self._rng = rng or random.Random()

    def drain(self) -> list[Effect]:
        effects, self.effects = self.effects, []
        return effects

    # -- frontends ------------------------------------------------------------- #

    def submit(self, spec: JobSpec, client: str, now: float, inputs: JobInputs | None = None,
               idempotency_key: str | None = None) -> Job:
        """Queues a job (announced by the next ``schedule``); raises Refused. A submit with the
        idempotency key of a job of the same user that is still remembered returns that job."""
        if idempotency_key is not None:
            known = self.jobs.get(self.keys.get((spec.user, idempotency_key), ""))
            if known is not None:
                return known
        known = self.jobs.get(spec.id)
        if known is not None:
            if known.client == client:
                return known  # a retry of a submit whose answer was lost
            raise Refused(ErrorCode.bad_request, f"job id {spec.id!r} already exists", field="id")
        admission.check(spec, inputs, self.config)
        replaced = self._session_job(spec)
        frees = 1 if replaced is not None and replaced.record.state is JobState.queued else 0
        if len(self.queue) - frees >= self.settings.max_queue:
            raise Refused(ErrorCode.queue_full, f"the queue is full ({len(self.queue)} jobs); try again later",
                          retry_after_s=self._retry_hint(now))
        mine = self.queue.queued_by(spec.user) - frees
        if mine >= self.settings.max_queued_per_user:
            raise Refused(ErrorCode.queue_full, field="user", retry_after_s=self._retry_hint(now, spec.user),
                          message=f"{spec.user} has {mine} jobs queued, the most one person may; "
                                  "try again when some have run")
        spec = admission.resolve(spec, inputs, self.config, self._rng)
        job = self._remember(JobRecord(spec=spec, state=JobState.queued, submitted_at=now), client, inputs,
                             idempotency_key)
        if spec.session is not None:
            self.sessions[(spec.user, spec.session)] = spec.id
            if replaced is not None:
                self._supersede(replaced, job, now)
        self.queue.push(job.entry)
        self._fresh.append(job)
        return job

    def restore(self, record: JobRecord, client: str, inputs: JobInputs | None, idempotency_key: str | None,
                now: float) -> Job:
        """A job read back from the journal after a restart. One that had ended is remembered as it
        was (its result is not sent again); any other is queued again, behind those restored before
        it: call in submit order. One that was running runs again (the same seed, the same images),
        with its attempts so far counted."""
        spec = record.spec
        job = self._remember(record, client, inputs, idempotency_key)
        if record.state.terminal:
            job.inputs = None
            self._finished.append(job.id)
            self._forget_beyond_memory()
            return job
        if record.state is not JobState.queued:
            record.reason = f"requeued: the scheduler restarted while it was {record.state.value}"
        record.state, record.runner, record.batch_id, record.position, record.eta_s = (
            JobState.queued, None, None, None, None)
        if spec.session is not None:
            self.sessions[(spec.user, spec.session)] = spec.id
        self.queue.push(job.entry)
        self._fresh.append(job)
        return job

    def _remember(self, record: JobRecord, client: str, inputs: JobInputs | None,
                  idempotency_key: str | None) -> Job:
        """A job held from now on, with its place in the queue's order (not yet in the queue)."""
        spec = record.spec
        entry = Entry(spec.id, spec.user, PRIORITY_CLASS[spec.priority], self._cost(spec), next(self._seq))
        job = Job(record, client, BatchKey.of(spec), entry, inputs, idempotency_key=idempotency_key)
        self.jobs[job.id] = job
        if idempotency_key is not None:
            self.keys[(spec.user, idempotency_key)] = job.id
        return job

    def cancel(self, job_id: str, now: float) -> Job:
        job = self.job(job_id)
        if job.record.state is JobState.queued:
            self.queue.remove(job_id)
            self._finish(job, JobState.cancelled, "cancelled while queued", now)
        elif job.live and not job.cancel_requested:
            job.cancel_requested = True
            self._stop(job, "cancelled", now)
        return job

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise Refused(ErrorCode.unknown_job, field="job_id", message=(
                f"no job {job_id!r} (never submitted, or finished long enough ago to be forgotten)"))
        return job

    def jobs_of(self, user: str, limit: int) -> list[Job]:
        """A user's jobs that are still remembered, newest first."""
        mine = [job for job in self.jobs.values() if job.spec.user == user]
        return sorted(mine, key=lambda job: job.record.submitted_at, reverse=True)[:limit]

    def record(self, job: Job, now: float) -> JobRecord:
        """The job's record with its ETA as seconds from ``now``."""
        job.record.eta_s = None if job.finish_at is None else round(max(0.0, job.finish_at - now), 3)
        return job.record

    # -- runners and loaders --------------------------------------------------- #

    def runner_up(self, name: str, caps: Capabilities, now: float) -> None:
        known = self.runners.get(name)
        if known is not None:
            # It registered again (the broker restarted) and says what it runs now.
            self._reconcile(known, caps, now)
            return
        runner = Runner(name, caps, dict(caps.resident))
        self.runners[name] = runner
        if caps.active_jobs:
            self._reclaim(runner, caps.active_batch or self._new_id(), caps.active_jobs, now)

    def _reclaim(self, runner: Runner, batch_id: str, job_ids: list[str], now: float) -> None:
        """A runner we had given up on came back still working: let it finish rather than run the jobs twice."""
        mine = []
        for job_id in job_ids:
            job = self.jobs.get(job_id)
            if job is not None and job.live and job.record.runner in (None, runner.name):
                mine.append(job)
            else:
                self.effects.append(StopRunning(runner.name, job_id, "the job was reassigned"))
        # Busy until it reports, even with nothing of ours in hand: a new batch would be refused.
        batch = Batch(batch_id, runner.name, mine[0].spec.model if mine else "", [j.id for j in mine],
                      sum(j.spec.count for j in mine), now, 0.0)
        self.batches[batch_id] = batch
        runner.batch = batch
        for job in mine:
            if job.record.state is JobState.queued:
                self.queue.take(job.id)
            self._set_running(job, runner.name, batch_id, JobState.running)
            self.effects.append(Announce(job))

    def runner_state(self, name: str, caps: Capabilities, asked_during: str | None, now: float) -> None:
        """What a runner said it runs, asked when it joined (``asked_during``: the batch it had here
        then). An answer overtaken by a newer batch is out of date and changes nothing."""
        runner = self.runners.get(name)
        if runner is not None and (runner.batch.id if runner.batch else None) == asked_during:
            self._reconcile(runner, caps, now)

    def _reconcile(self, runner: Runner, caps: Capabilities, now: float) -> None:
        runner.capabilities = caps
        if runner.batch is not None and runner.batch.id != caps.active_batch:
            self._lost_batch(runner, caps, now)
        elif runner.batch is None and caps.active_jobs:
            self._reclaim(runner, caps.active_batch or self._new_id(), caps.active_jobs, now)

    def _lost_batch(self, runner: Runner, caps: Capabilities, now: float) -> None:
        """The runner is not running the batch it was given: the RunBatch was lost with a broker that
        died, or the batch ended and its report is still on its way (a done outcome is then taken
        by ``_adopt``). Its jobs go back to the queue, no attempt counted: none was started here."""
        batch = self.batches.pop(runner.batch.id, None) if runner.batch else None
        runner.batch = None
        for job_id in batch.jobs if batch else ():
            job = self._job_on(job_id, runner.name)
            if job is None:
                continue
            if self._stopping(job):
                self.effects.append(StopRunning(runner.name, job_id, self._stop_reason(job)))
                continue
            self._requeue(job, f"runner {runner.name} did not have it after reconnecting", started=False)
        if caps.active_batch and caps.active_batch not in self.batches:
            self._reclaim(runner, caps.active_batch, caps.active_jobs, now)

    def runner_down(self, name: str, reason: str, now: float) -> None:
        runner = self.runners.pop(name, None)
        if runner is None or runner.batch is None:
            return
        batch = self.batches.pop(runner.batch.id, None)
        for job_id in batch.jobs if batch else ():
            job = self._job_on(job_id, name)
            if job is None:
                continue
            why = f"runner {name} died while running this job ({reason})"
            if job.cancel_requested or job.superseded_by:
                self._finish(job, JobState.cancelled, self._stop_reason(job), now)
            elif job.record.attempts >= self.settings.max_attempts:
                self._finish(job, JobState.failed, f"{why}; gave up after {job.record.attempts} attempts", now)
            else:
                self._requeue(job, why)

    def runner_draining(self, name: str) -> None:
        runner = self.runners.get(name)
        if runner is not None:
            runner.draining = True

    def loader_state(self, node: str, staged: dict[str, int]) -> None:
        self.staged[node] = dict(staged)
        self._asked.pop(node, None)

    def loader_down(self, node: str) -> None:
        self.staged.pop(node, None)
        self._asked.pop(node, None)

    # -- batches ---------------------------------------------------------------- #

    def batch_update(self, runner: str, batch_id: str, state: JobState, now: float) -> None:
        batch = self.batches.get(batch_id)
        if batch is None or batch.runner != runner:
            return
        r = self.runners.get(runner)
        run_s = self._run_s(batch, r) if r is not None else None
        for job_id in batch.jobs:
            job = self._job_on(job_id, runner)
            if job is None:
                continue
            job.record.state = state
            if state is JobState.running:
                job.record.started_at = now
                if run_s is not None:
                    job.finish_at = now + run_s
            self.effects.append(Announce(job))
        if state is JobState.running and run_s is not None:
            # The load is behind it: when the runner is free again is now the run alone.
            batch.started, batch.expected_s = now, run_s

    def batch_done(self, runner: str, batch_id: str, outcomes: Iterable[JobDone | JobFailed],
                   resident: dict[str, int], timing: RunTiming, now: float, *, refused: bool = False,
                   active: tuple[str, list[str]] | None = None) -> list[tuple[Job, JobDone]]:
        """Frees the runner and settles every job of the batch; returns the done ones, whose
        artifacts the caller stores before calling ``complete``. A ``refused`` batch never started:
        its jobs go back without an attempt counted; ``active`` is the batch the runner is busy with
        instead (after a restart here, one this policy did not know of), which it waits for."""
        r = self.runners.get(runner)
        batch = self.batches.pop(batch_id, None)
        if r is not None:
            r.resident = dict(resident)
            if r.batch is not None and r.batch.id == batch_id:
                r.batch = None
        if batch is not None and r is not None:
            self._learn(batch, r, timing)
        done: list[tuple[Job, JobDone]] = []
        reported = set()
        for outcome in outcomes:
            reported.add(outcome.job_id)
            job = self._job_on(outcome.job_id, runner)
            if job is None and isinstance(outcome, JobDone):
                job = self._adopt(outcome.job_id, runner)
            if job is None:
                continue
            if job.superseded_by is not None:
                self._finish(job, JobState.cancelled, self._stop_reason(job), now)
            elif isinstance(outcome, JobDone):
                done.append((job, outcome))
            elif outcome.cancelled or job.cancel_requested:
                self._finish(job, JobState.cancelled, outcome.reason, now)
            elif refused:
                self._requeue(job, outcome.reason, started=False)
            elif outcome.retryable and job.record.attempts < self.settings.max_attempts:
                self._requeue(job, outcome.reason)
            else:
                self._finish(job, JobState.failed, outcome.reason, now)
        for job_id in batch.jobs if batch else ():
            job = self._job_on(job_id, runner) if job_id not in reported else None
            if job is not None:  # the runner said nothing of it: it is not done, so it runs again
                self._requeue(job, f"runner {runner} reported no outcome for it")
        if active is not None and r is not None and r.batch is None:
            self._reclaim(r, active[0], active[1], now)
        return done

    def _adopt(self, job_id: str, runner: str) -> Job | None:
        """A job that was queued again while a runner still had it (the scheduler restarted, or gave
        the runner up too early), and that nobody else has started: the images it reports done are
        the ones a second run would make (the same seeds), so they are taken rather than made again."""
        job = self.jobs.get(job_id)
        if job is None or job.record.state is not JobState.queued or job.record.runner is not None:
            return None
        self.queue.take(job.id)
        self._set_running(job, runner, job.record.batch_id or "", JobState.running)
        return job

    def complete(self, job: Job, artifacts: list[str], outputs: tuple, now: float) -> None:
        if not job.live:
            return
        job.record.artifacts = artifacts
        self._finish(job, JobState.done, None, now, outputs)

    # -- the plan ------------------------------------------------------------------ #

    def schedule(self, now: float, *, whole_queue: bool = False) -> None:
        """Starts what should start now, plans the rest for ETAs and preloading, announces new jobs.

        The plan covers the first ``plan_window`` jobs; ``whole_queue`` also places the rest
        (``refresh`` does, once a second, so a long queue costs little per event)."""
        self.wake_at = None
        usable = [r for r in self.runners.values() if not r.draining]
        if self.queue and usable:
            if not whole_queue and now < self._next_plan and all(r.batch is not None for r in usable):
                self.wake_at = self._next_plan  # nothing can start now: plan (and announce) a little later
                return
            self._plan(now, usable, whole_queue)
            self._next_plan = now + REPLAN_BUSY_S
        elif self.queue:
            for entry in self.queue.order(self.settings.plan_window):
                self.jobs[entry.id].finish_at = None
        for job in self._fresh:
            if job.record.state is JobState.queued:
                job.announced_position = job.record.position
                self.effects.append(Announce(job))
        self._fresh.clear()

    def refresh(self, now: float) -> None:
        """Replans as time passes and publishes the new position of queued jobs that moved."""
        self.schedule(now, whole_queue=True)
        moved = 0
        for entry in self.queue.order():
            job = self.jobs[entry.id]
            if moved >= ANNOUNCE_POSITIONS:
                break
            if job.record.position != job.announced_position:
                job.announced_position = job.record.position
                self.effects.append(Announce(job))
                moved += 1

    def _plan(self, now: float, usable: list[Runner], whole_queue: bool) -> None:
        order = [self.jobs[e.id] for e in self.queue.order(self.settings.plan_window)]
        free_at: dict[str, float] = {}
        holds: dict[str, set[str]] = {}
        for r in usable:
            free_at[r.name] = now if r.batch is None else max(now, r.batch.started + r.batch.expected_s)
            holds[r.name] = self._staying(r)
        idle = {r.name for r in usable if r.batch is None}
        running = self._running_by_user() if self.settings.max_running_per_user else Counter()
        compatible: dict[BatchKey, list[Job]] = defaultdict(list)
        for job in order:
            compatible[job.key].append(job)
        taken: set[str] = set()
        wanted: dict[str, list[str]] = defaultdict(list)  # by node: models to preload, in plan order
        position = 0
        for index, job in enumerate(order):
            if job.id in taken:
                continue
            family = self.config.models[job.spec.model].family
            able = [r for r in usable if r.accepts(family)]
            if not able or self._at_running_limit(job, running):
                # Nowhere to run, or its owner has all the jobs running they may: it waits, and
                # holds no runner in the plan; the next event that changes that replans it.
                job.record.position, job.finish_at = position, None
                position += 1
                continue
            runner = min(able, key=lambda r: self._placement(job, r, free_at, holds, now))
            immediate = runner.name in idle
            peers = compatible[job.key] if self.fair else order[index:]
            members = self._fill(job, runner, peers, taken, running if immediate else None)
            taken.update(m.id for m in members)
            images = sum(m.spec.count for m in members)
            load = self._load_s(job.spec.model, runner, holds)
            finish = free_at[runner.name] + load + self.estimates.run_s(
                job.spec.model, runner.device_name, width=job.spec.width, height=job.spec.height,
                images=images, steps=job.spec.steps)
            if immediate and self._should_wait(members, images, runner, now):
                # Waiting for company: the runner stays free for other work meanwhile.
                for member in members:
                    member.record.position, member.finish_at = position, finish + self.wake_at - now
                    position += 1
                continue
            if immediate:
                self._dispatch(runner, members, images, finish, now)
                idle.discard(runner.name)
                for member in members:
                    running[member.spec.user] += 1
            else:
                for member in members:
                    member.record.position, member.finish_at = position, finish
                    position += 1
                if job.spec.model not in holds[runner.name] and runner.node is not None:
                    wanted[runner.node].append(job.spec.model)
            free_at[runner.name] = finish
            holds[runner.name].add(job.spec.model)
        if whole_queue:
            self._place_beyond_window(order, position, free_at, usable)
        if self.settings.preload:
            self._preload(wanted)

    def _placement(self, job: Job, runner: Runner, free_at: dict[str, float], holds: dict[str, set[str]],
                   now: float) -> tuple:
        """Sort key of a runner for a job: the runner free first (FIFO), or where it finishes first (fair)."""
        has_model = job.spec.model in holds[runner.name]
        if not self.fair:
            return (free_at[runner.name], not has_model, runner.name)
        finish = free_at[runner.name] + self._load_s(job.spec.model, runner, holds) + self.estimates.run_s(
            job.spec.model, runner.device_name, width=job.spec.width, height=job.spec.height,
            images=job.spec.count, steps=job.spec.steps)
        # Ties: the runner that has the model, then an idle one, then the one holding fewest models
        # (loading there evicts least, and models spread over the devices).
        return (round(finish, 6), not has_model, free_at[runner.name] > now, len(holds[runner.name]), runner.name)

    def _fill(self, head: Job, runner: Runner, peers: list[Job], taken: set[str],
              running: Counter | None) -> list[Job]:
        """The head job and the queued jobs that share its pipeline call, in queue order, up to the
        runner's batch size (a job is never split: one bigger than the batch size runs alone).
        ``running``: per-user running counts to respect, when the batch starts now."""
        spec = head.spec
        useful = self.estimates.useful_batch(spec.model, runner.device_name, spec.width * spec.height,
                                             self._max_images(spec.model, runner), self.settings.batch_min_gain)
        limit = max(useful, spec.count)
        members, images = [head], head.spec.count
        limit_per_user = self.settings.max_running_per_user
        added: Counter[str] = Counter({head.spec.user: 1})
        for peer in peers:
            if images >= limit:
                break
            if peer is head or peer.id in taken:
                continue
            if peer.key != head.key:
                if self.fair:
                    continue
                break  # the FIFO baseline batches only the consecutive run of compatible jobs
            if images + peer.spec.count > limit:
                continue
            if running is not None and limit_per_user is not None \
                    and running[peer.spec.user] + added[peer.spec.user] >= limit_per_user:
                continue
            members.append(peer)
            images += peer.spec.count
            added[peer.spec.user] += 1
        return members

    def _dispatch(self, runner: Runner, members: list[Job], images: int, finish: float, now: float) -> None:
        batch = Batch(self._new_id(), runner.name, members[0].spec.model, [m.id for m in members], images,
                      started=now, expected_s=finish - now)
        self.batches[batch.id] = batch
        runner.batch = batch
        items = []
        for job in members:
            self.queue.take(job.id)
            job.record.attempts += 1
            self._set_running(job, runner.name, batch.id, JobState.assigned)
            job.finish_at = finish
            items.append((job.spec, job.record.attempts, job.inputs))
            self.effects.append(Announce(job))
        self.effects.append(Dispatch(batch, tuple(items)))

    def _should_wait(self, members: list[Job], images: int, runner: Runner, now: float) -> bool:
        """With batch_wait_s, a batch short of its size waits that long (from its oldest job) for company."""
        wait = self.settings.batch_wait_s
        spec = members[0].spec
        if not wait or images >= self.estimates.useful_batch(spec.model, runner.device_name, spec.width * spec.height,
                                                             self._max_images(spec.model, runner),
                                                             self.settings.batch_min_gain):
            return False
        until = min(m.record.submitted_at for m in members) + wait
        if until <= now:
            return False
        self.wake_at = until if self.wake_at is None else min(self.wake_at, until)
        return True

    def _place_beyond_window(self, planned: list[Job], position: int, free_at: dict[str, float],
                             usable: list[Runner]) -> None:
        """Jobs past the plan window: their place in line, and an ETA from the mean rate of the runners."""
        if len(self.queue) <= len(planned):
            return
        seen = {j.id for j in planned}
        start = max(free_at.values())
        runner = usable[0]
        backlog = 0.0
        for entry in self.queue.order():
            if entry.id in seen:
                continue
            job = self.jobs[entry.id]
            backlog += self.estimates.run_s(job.spec.model, runner.device_name, width=job.spec.width,
                                            height=job.spec.height, images=job.spec.count,
                                            steps=job.spec.steps)
            job.record.position, job.finish_at = position, start + backlog / len(usable)
            position += 1

    def _preload(self, wanted: dict[str, list[str]]) -> None:
        for node, models in wanted.items():
            if node not in self.staged:
                continue  # no loader reported on that node: nobody to ask
            asked = self._asked.setdefault(node, set())
            fresh = []
            for model in models:
                if model not in self.staged[node] and model not in asked and model not in fresh:
                    fresh.append(model)
            if fresh:
                asked.update(fresh)
                self.effects.append(PreloadModels(node, tuple(fresh)))

    # -- estimates -------------------------------------------------------------- #

    def _staying(self, runner: Runner) -> set[str]:
        """Models sure to be on the runner when it is next free. A busy runner loading another
        model may evict what it holds; the one it runs now stays."""
        if runner.batch is None:
            return set(runner.resident)
        if runner.batch.model in runner.resident:
            return set(runner.resident)
        return {runner.batch.model}

    def _load_s(self, model: str, runner: Runner, holds: dict[str, set[str]]) -> float:
        if model in holds[runner.name]:
            return 0.0
        node = runner.node
        if node is not None and (model in self.staged.get(node, {}) or model in self._asked.get(node, ())):
            return self.estimates.load_s(model, "staged")
        return self.estimates.load_s(model, "disk")

    def _run_s(self, batch: Batch, runner: Runner) -> float:
        spec = self.jobs[batch.jobs[0]].spec if batch.jobs and batch.jobs[0] in self.jobs else None
        if spec is None:
            return 0.0
        return self.estimates.run_s(batch.model, runner.device_name, width=spec.width, height=spec.height,
                                    images=batch.images, steps=spec.steps)

    def _learn(self, batch: Batch, runner: Runner, timing: RunTiming) -> None:
        counters = self.stats.models.setdefault(batch.model, ModelStats())
        counters.batches += 1
        counters.images += timing.images
        counters.steps += timing.steps
        counters.step_seconds += (timing.step_s or 0.0) * timing.steps
        if timing.loaded_from != "resident":
            counters.loads[timing.loaded_from] = counters.loads.get(timing.loaded_from, 0) + 1
            counters.load_seconds += timing.stage_wait_s + timing.load_s
        spec = self.jobs[batch.jobs[0]].spec if batch.jobs and batch.jobs[0] in self.jobs else None
        if spec is not None and timing.step_s is not None and timing.images:
            self.estimates.observe_step(batch.model, runner.device_name, spec.width * spec.height,
                                        timing.images, timing.step_s)
        if timing.loaded_from == "disk":
            self.estimates.observe_load(batch.model, "disk", timing.load_s)
        elif timing.loaded_from == "staged":
            self.estimates.observe_load(batch.model, "staged", timing.load_s)
            if timing.stage_wait_s > 0.05:  # it was staged for this load: what a cold switch costs
                self.estimates.observe_load(batch.model, "disk", timing.stage_wait_s + timing.load_s)

    def _cost(self, spec: JobSpec) -> float:
        """What starting a job charges its owner's fair share: the device seconds it is expected to
        take alone, so a FLUX image costs more turns than an SD 1.5 one of the same size."""
        family = self.config.models[spec.model].family
        runner = next((r for r in self.runners.values() if r.accepts(family)), None)
        return self.estimates.run_s(spec.model, runner.device_name if runner else "", width=spec.width,
                                    height=spec.height, images=spec.count, steps=spec.steps)

    def _retry_hint(self, now: float, user: str | None = None) -> float:
        """Seconds until a slot is likely to free: the soonest expected end of a running (or the
        user's) batch, within 1 s to 5 min."""
        ends = [j.finish_at for j in self.jobs.values()
                if j.live and j.record.state is not JobState.queued and j.finish_at is not None
                and (user is None or j.spec.user == user)]
        soonest = min(ends) - now if ends else 5.0
        return round(min(300.0, max(1.0, soonest)), 1)

    # -- limits ------------------------------------------------------------------ #

    def _max_images(self, model: str, runner: Runner) -> int:
        entry = self.config.models[model]
        limits = FAMILY_LIMITS[entry.family]
        size = entry.max_batch or (limits.max_batch if runner.on_gpu else limits.max_batch_cpu)
        if self.settings.max_batch is not None:
            size = min(size, self.settings.max_batch)
        return size

    def _running_by_user(self) -> Counter[str]:
        return Counter(self.jobs[j].spec.user for b in self.batches.values() for j in b.jobs
                       if j in self.jobs and self.jobs[j].live)

    def _at_running_limit(self, job: Job, running: Counter[str]) -> bool:
        limit = self.settings.max_running_per_user
        return limit is not None and running[job.spec.user] >= limit

    # -- sessions, stops and ends --------------------------------------------------- #

    def _session_job(self, spec: JobSpec) -> Job | None:
        """The live job a submit to this session replaces, if any."""
        if spec.session is None:
            return None
        job = self.jobs.get(self.sessions.get((spec.user, spec.session), ""))
        return job if job is not None and job.live else None

    def _supersede(self, old: Job, new: Job, now: float) -> None:
        old.superseded_by = new.id
        if old.record.state is JobState.queued:
            self.queue.remove(old.id)
            self._finish(old, JobState.cancelled, self._stop_reason(old), now)
        else:
            self._stop(old, self._stop_reason(old), now)

    def _stop_reason(self, job: Job) -> str:
        if job.superseded_by is not None:
            return f"superseded by a newer prompt (job {job.superseded_by})"
        return "cancelled"

    def _stop(self, job: Job, reason: str, now: float) -> None:
        """Stops a job that a runner has. If the rest of its batch goes on, the job ends now (the
        runner drops its images); if it was all the batch had, the runner stops at its next step
        and its report ends the job, so the runner is known to be free."""
        if job.record.runner is None:
            return
        self.effects.append(StopRunning(job.record.runner, job.id, reason))
        batch = self.batches.get(job.record.batch_id or "")
        if batch is not None and any(j != job.id and self.jobs.get(j) is not None and self.jobs[j].live
                                     and not self._stopping(self.jobs[j]) for j in batch.jobs):
            self._finish(job, JobState.cancelled, reason, now)

    @staticmethod
    def _stopping(job: Job) -> bool:
        return job.cancel_requested or job.superseded_by is not None

    def _set_running(self, job: Job, runner: str, batch_id: str, state: JobState) -> None:
        job.record.state = state
        job.record.runner = runner
        job.record.batch_id = batch_id
        job.record.position = None
        job.announced_position = None

    def _requeue(self, job: Job, reason: str, *, started: bool = True) -> None:
        """Back to the front of its owner's queue. ``started=False``: the runner never began it, so
        the attempt counted at dispatch is taken back."""
        record = job.record
        if not started:
            record.attempts -= 1
        record.state = JobState.queued
        record.runner = None
        record.batch_id = None
        record.reason = reason
        job.finish_at = None
        self.queue.refund(job.entry)
        self.queue.push(job.entry, front=True)  # it waited its turn already
        self.effects.append(Announce(job))

    def _finish(self, job: Job, state: JobState, reason: str | None, now: float, outputs: tuple = ()) -> None:
        record = job.record
        record.state = state
        record.reason = reason
        record.finished_at = now
        record.position = None
        job.finish_at = None
        job.inputs = None  # no attempt comes after an end
        self._count_finished(state, now - record.submitted_at)
        self.effects.append(Deliver(job, outputs))
        self._finished.append(job.id)
        self._forget_beyond_memory()

    def _forget_beyond_memory(self) -> None:
        """Ended jobs beyond ``remember_finished`` leave memory (the journal still has them)."""
        while len(self._finished) > self.settings.remember_finished:
            forgotten = self.jobs.pop(self._finished.popleft(), None)
            if forgotten is None:
                continue
            if forgotten.spec.session is not None:
                key = (forgotten.spec.user, forgotten.spec.session)
                if self.sessions.get(key) == forgotten.id:
                    del self.sessions[key]
            if forgotten.idempotency_key is not None:
                self.keys.pop((forgotten.spec.user, forgotten.idempotency_key), None)

    def _count_finished(self, state: JobState, seconds: float) -> None:
        stats = self.stats
        stats.finished[state.value] = stats.finished.get(state.value, 0) + 1
        stats.job_seconds_sum += seconds
        for i, bound in enumerate([*stats.job_seconds_buckets, float("inf")]):
            if seconds <= bound:
                stats.job_seconds_counts[i] += 1

    def _job_on(self, job_id: str, runner: str) -> Job | None:
        """The job, if ``runner`` is (still) the one running it; late words from an old runner are ignored."""
        job = self.jobs.get(job_id)
        if job is None or job.record.runner != runner or not job.live:
            return None
        return job
