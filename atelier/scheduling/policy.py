"""The scheduling policy: which job runs where, when, and with which others.

A pure core. It holds the jobs, the runners and what each node's loader has staged (its own
state, ``state.py``); it takes events (a submit, a cancel, a runner joining or dying, a batch
starting or ending) with the time passed in, and answers with *effects* (announce a job's
state, deliver its result, run a batch, stop a job, preload models) that the scheduler actor
turns into messages. No sockets and no clock of its own, so every rule is tested by calling it
(tests/test_policy.py). What the wire shows of a job is a snapshot, ``Job.record(now)``.

The rules, in the order they apply, and where each lives:

1. Admission (``admission.py``): what a model can take, every default filled in.
2. Order (``FairQueue``): live before interactive before batch; within a class, users take
   turns by the work they have started, so one person's burst does not hold back another's
   single job. Per-user caps on queued and running jobs; a bounded queue that refuses with
   "queue full" and a hint of when to retry (here).
3. Batching, placement and preloading (``planner.py``), from measured times (``estimates.py``).
4. Live sessions (here): a newer job of a (user, session) replaces the session's queued job and
   stops its running one at the next step; a superseded job ends cancelled, never delivered as done.
5. What runners report against what they were given (``reconcile.py``): lost batches, runners
   that come back, late reports, retries after a runner dies.
6. Every queued job's position and ETA come from the same plan.
7. An operator's controls (``controls.py``): a paused queue or model, a drained node, the front lane
   (a class ahead of ``live``), a reloaded catalog; the plan asks them which runners and models may start work.

When plans run (``schedule``), so that a fleet's thousands of events a second cost little each: a *full*
plan (every place, ETA and preload, and each busy runner's next batch) when one is due, that is
REPLAN_BUSY_S after the last, or PLAN_SPACING times as long as the last took if that is longer; in
between, a runner that frees takes the batch planned for it next, and only runners left idle get a
plan, one that stops once each has a batch. Jobs submitted in between are announced, with their place,
by the next full plan; one of a class ahead of the planned batches is weighed at once.
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from atelier.config import Config
from atelier.jobs import (
    Capabilities,
    ErrorCode,
    JobDone,
    JobFailed,
    JobInputs,
    JobKind,
    JobRecord,
    JobSpec,
    JobState,
    Priority,
    RunTiming,
    SchedulerStats,
)
from atelier.scheduling import admission, planner, reconcile
from atelier.scheduling.admission import Refused
from atelier.scheduling.controls import Controls
from atelier.scheduling.estimates import Estimates
from atelier.scheduling.fairqueue import Entry
from atelier.scheduling.leases import Leases
from atelier.scheduling.loras import LoraBook
from atelier.scheduling.state import (
    PRIORITY_CLASS,
    Announce,
    Batch,
    BatchKey,
    Deliver,
    Dispatch,
    Effect,
    Job,
    PreloadModels,
    Runner,
    State,
    StopRunning,
    input_bytes,
)

__all__ = ["Announce", "Deliver", "Dispatch", "Effect", "Job", "Policy", "PreloadModels", "Refused", "RunnerView",
           "Status", "StopRunning", "input_bytes"]

ANNOUNCE_POSITIONS = 100  # queued jobs whose new position is published on a refresh, from the front
# While every runner is busy, a new plan only refreshes ETAs and preloads: once in this long is
# enough, and a burst of submits then costs one plan, not one each.
REPLAN_BUSY_S = 0.05
PLAN_SPACING = 20  # a full plan is due no sooner than this many times its own CPU time after it (see schedule)
MIB = 1 << 20
NO_CLASS = PRIORITY_CLASS[Priority.batch] + 1  # after every priority class: "no job submitted since"
PLACED_PER_S = 5_000  # queued jobs placed a second, at most, by refresh (past the window; see refresh)


def _cannot_run(spec: JobSpec, inputs: JobInputs | None, config: Config, loras: LoraBook) -> str | None:
    """Why a job accepted before a restart can no longer run here, in words a person can act on."""
    if spec.model not in config.models:
        return f"model {spec.model!r} is no longer in the catalog"
    try:
        loras.resolve(spec, config.models[spec.model].loras)
        admission.check(spec, inputs, config)
    except Refused as refused:
        return refused.message
    return None


@dataclass(frozen=True)
class RunnerView:
    name: str
    job: str | None  # the first job of the batch it runs
    capabilities: Capabilities  # with the models it holds as it last reported


@dataclass(frozen=True)
class Status:
    counts: dict[str, int]  # jobs held, by state
    runners: list[RunnerView]
    queued: list[str]  # job ids, in the order they would start (the first ``limit``)
    queued_total: int
    stats: SchedulerStats


class Policy:
    def __init__(self, config: Config, *, estimates: Estimates | None = None,
                 new_id: Callable[[], str] = lambda: uuid.uuid4().hex[:16],
                 rng: random.Random | None = None, cpu_clock: Callable[[], float] = time.process_time):
        self.config = config
        self.settings = config.scheduler
        self.estimates = estimates or Estimates()
        self.state = State(self.settings)
        self.loras = LoraBook()  # the users' trained LoRAs: the scheduler fills it from its journal
        self.controls = Controls()  # an operator's pauses, drains and front lane (controls.py)
        self.wake_at: float | None = None  # when schedule() wants calling again (a batch waiting, a plan put off)
        self._fresh: list[Job] = []  # submitted, not yet announced
        self._held: set[str] = set()  # submitted with hold: not queued until admitted
        self._next_plan = float("-inf")  # while all runners are busy, no new plan before this
        self._next_whole = float("-inf")  # no placing of the whole queue (refresh) before this
        self._idle_left: set[str] = set()  # the runners the last plan left idle
        self._queue_left = False  # and whether it left jobs queued
        self._ahead: dict[str, tuple[Job, ...]] = {}  # by runner: its next batch, as the last full plan had it
        self._fresh_top = NO_CLASS  # the first class of the jobs submitted since it
        self._seq = itertools.count()
        self._new_id = new_id
        self._rng = rng or random.Random()
        self._cpu_clock = cpu_clock  # what a full plan costs sets how soon the next is due (schedule)
        self.leases = Leases(self.state, new_id)  # VRAM leases: their runners take no batch until granted
        self._costed_at, self._cost_device = -1, {}  # _cost's device by family, as of State.joined

    def drain(self) -> list[Effect]:
        effects, self.state.effects = self.state.effects, []
        return effects

    # -- queries ----------------------------------------------------------------- #

    def job(self, job_id: str) -> Job:
        job = self.state.jobs.get(job_id)
        if job is None:
            raise Refused(ErrorCode.unknown_job, field="job_id", message=(
                f"no job {job_id!r} (never submitted, or finished long enough ago to be forgotten)"))
        return job

    def find(self, job_id: str) -> Job | None:
        return self.state.jobs.get(job_id)

    def by_key(self, user: str, idempotency_key: str) -> Job | None:
        """The job a user submitted with this idempotency key, while it is remembered."""
        return self.state.jobs.get(self.state.keys.get((user, idempotency_key), ""))

    def jobs_of(self, user: str, limit: int) -> list[Job]:
        """A user's jobs that are still remembered, newest first."""
        mine = [job for job in self.state.jobs.values() if job.spec.user == user]
        return sorted(mine, key=lambda job: job.submitted_at, reverse=True)[:limit]

    def queued(self, limit: int | None = None) -> list[str]:
        """The queued jobs' ids, in the order they would start (the first ``limit``; None: all)."""
        return [entry.id for entry in self.state.queue.order(limit)]

    def has_runner(self, name: str) -> bool:
        return name in self.state.runners

    def runner_batch(self, name: str) -> str | None:
        """The batch the runner has from here, if any."""
        runner = self.state.runners.get(name)
        return runner.batch.id if runner is not None and runner.batch is not None else None

    def status(self, limit: int | None = None) -> Status:
        """The jobs by state, the runners, and the first ``limit`` queued jobs (None: all) in the order they
        would start."""
        counts = Counter(job.state.value for job in self.state.jobs.values())
        runners = [RunnerView(r.name, r.batch.jobs[0] if r.batch and r.batch.jobs else None,
                              r.capabilities.model_copy(update={"resident": dict(r.resident)}))
                   for r in self.state.runners.values()]
        return Status(dict(counts), runners, self.queued(limit), len(self.state.queue), self.state.counters.stats())

    # -- frontends ------------------------------------------------------------- #

    def submit(self, spec: JobSpec, client: str, now: float, inputs: JobInputs | None = None,
               idempotency_key: str | None = None, *, hold: bool = False) -> Job:
        """Queues a job (announced by the next ``schedule``); raises Refused. A submit with the
        idempotency key of a job of the same user that is still remembered returns that job.
        ``hold``: the job is accepted but not queued until ``admit`` (or ``withdraw``), so that
        nothing plans, announces or dispatches it while the caller writes it down."""
        state = self.state
        known = state.jobs.get(spec.id)
        if known is not None:
            # Before anything else reads the spec: an id is not proof of anything, so another
            # user's job is neither returned nor described, only refused.
            if known.spec.user == spec.user and known.client == client:
                return known  # a retry of a submit whose answer was lost
            raise Refused(ErrorCode.conflict, f"job id {spec.id!r} is taken; submit without an id for a new one",
                          field="id")
        if idempotency_key is not None:
            known = self.by_key(spec.user, idempotency_key)
            if known is not None:
                return known
        entry = self.config.models.get(spec.model)
        if entry is not None:
            spec = self.loras.resolve(spec, entry.loras)
        admission.check(spec, inputs, self.config)
        size = input_bytes(inputs)
        self._check_input_budget(spec.user, size, now)
        replaced = self._session_job(spec)
        frees = 1 if replaced is not None and replaced.state is JobState.queued else 0
        if len(state.queue) - frees >= self.settings.max_queue:
            raise Refused(ErrorCode.queue_full, f"the queue is full ({len(state.queue)} jobs); try again later",
                          retry_after_s=self._retry_hint(now))
        mine = state.queue.queued_by(spec.user) - frees
        if mine >= self.settings.max_queued_per_user:
            raise Refused(ErrorCode.queue_full, field="user", retry_after_s=self._retry_hint(now, spec.user),
                          message=f"{spec.user} has {mine} jobs queued, the most one person may; "
                                  "try again when some have run")
        spec = admission.resolve(spec, inputs, self.config, self._rng)
        job = self._remember(spec, now, client, inputs, idempotency_key)
        state.hold_inputs(job, inputs)
        if hold:
            self._held.add(job.id)
        else:
            self._admit(job, now)
        return job

    def admit(self, job_id: str, now: float) -> None:
        """Queues a job that ``submit`` was told to hold."""
        self._held.remove(job_id)
        self._admit(self.state.jobs[job_id], now)

    def _admit(self, job: Job, now: float) -> None:
        spec = job.spec
        if spec.session is not None:
            replaced = self._session_job(spec)
            self.state.sessions[(spec.user, spec.session)] = spec.id
            if replaced is not None:
                self._supersede(replaced, job, now)
        self.state.queue.push(job.entry)
        self._fresh.append(job)
        self._fresh_top = min(self._fresh_top, job.entry.priority)

    def withdraw(self, job_id: str) -> None:
        """Takes back a submit that cannot be kept (the journal could not write it): the job is
        forgotten as if it had never been submitted, and nothing is said of it. Only a job held or
        not yet announced (no ``schedule`` since its submit) can be withdrawn."""
        job = self.job(job_id)
        if job.id in self._held:
            self._held.remove(job.id)
        elif job in self._fresh:
            self._fresh.remove(job)
            self.state.queue.remove(job_id)
        else:
            raise ValueError(f"job {job_id} has been announced already; cancel it instead")
        del self.state.jobs[job_id]
        self.state.release_inputs(job)
        self.state.forget(job)

    def spill_inputs(self, job_id: str) -> None:
        """The caller keeps the job's input images (on disk) and hands them to its dispatch: the
        policy forgets the bytes, and a ``Dispatch`` carries None for them."""
        job = self.state.jobs.get(job_id)
        if job is not None:
            job.inputs = None

    def restore(self, record: JobRecord, client: str, inputs: JobInputs | None, idempotency_key: str | None,
                now: float, *, unusable: str | None = None) -> Job:
        """A job read back from the journal after a restart. One that had ended is remembered as it
        was (its result is not sent again), whether or not its model is still in the catalog; any
        other is queued again, behind those restored before it: call in submit order. One that was
        running runs again (the same seed, the same images), with its attempts so far counted. One
        that can no longer run (its model left the catalog, its inputs or settings are above limits
        tightened since, or ``unusable`` says why) fails now with the reason, and the rest go on."""
        spec = record.spec
        ended = record.state.terminal
        why_not = None if ended else unusable or _cannot_run(spec, inputs, self.config, self.loras)
        job = self._remember(spec, record.submitted_at, client, None if ended else inputs, idempotency_key,
                             state=record.state, reason=record.reason, attempts=record.attempts,
                             runner=record.runner, batch_id=record.batch_id, position=record.position,
                             started_at=record.started_at, finished_at=record.finished_at,
                             artifacts=list(record.artifacts), checkpoint=record.checkpoint,
                             trained_steps=record.trained_steps)
        if ended:
            self.state.remember_finished(job)
            return job
        if why_not is not None:
            self.state.finish(job, JobState.failed, f"cannot run after a restart: {why_not}", now)
            return job
        self.state.hold_inputs(job, inputs)
        if record.state is not JobState.queued:
            job.reason = f"requeued: the scheduler restarted while it was {record.state.value}"
        job.state, job.runner, job.batch_id, job.position = JobState.queued, None, None, None
        if spec.session is not None:
            self.state.sessions[(spec.user, spec.session)] = spec.id
        self.state.queue.push(job.entry)
        self._fresh.append(job)
        return job

    def _remember(self, spec: JobSpec, submitted_at: float, client: str, inputs: JobInputs | None,
                  idempotency_key: str | None, **standing) -> Job:
        """A job held from now on, with its place in the queue's order (not yet in the queue)."""
        entry = Entry(spec.id, spec.user, PRIORITY_CLASS[spec.priority], self._cost(spec), next(self._seq))
        job = Job(spec, client, BatchKey.of(spec), entry, submitted_at, inputs=inputs,
                  idempotency_key=idempotency_key, **standing)
        self.state.jobs[job.id] = job
        if idempotency_key is not None:
            self.state.keys[(spec.user, idempotency_key)] = job.id
        return job

    def cancel(self, job_id: str, now: float) -> Job:
        job = self.job(job_id)
        if job.state is JobState.queued:
            self.state.queue.remove(job_id)
            self.state.finish(job, JobState.cancelled, "cancelled while queued", now)
        elif job.live and not job.cancel_requested:
            job.cancel_requested = True
            self.state.stop(job, "cancelled", now)
        return job

    def _session_job(self, spec: JobSpec) -> Job | None:
        """The live job a submit to this session replaces, if any."""
        if spec.session is None:
            return None
        job = self.state.jobs.get(self.state.sessions.get((spec.user, spec.session), ""))
        return job if job is not None and job.live else None

    def _supersede(self, old: Job, new: Job, now: float) -> None:
        old.superseded_by = new.id
        if old.state is JobState.queued:
            self.state.queue.remove(old.id)
            self.state.finish(old, JobState.cancelled, old.stop_reason, now)
        else:
            self.state.stop(old, old.stop_reason, now)

    # -- runners and loaders --------------------------------------------------- #

    def runner_up(self, name: str, caps: Capabilities, now: float) -> None:
        reconcile.runner_up(self.state, name, caps, now, self._new_id)
        self.leases.runner_seen(name, caps, now)

    def runner_state(self, name: str, caps: Capabilities, asked_during: str | None, now: float) -> None:
        """What a runner said it runs, asked when it joined (``asked_during``: the batch it had here then)."""
        reconcile.runner_state(self.state, name, caps, asked_during, now, self._new_id)
        self.leases.runner_seen(name, caps, now)

    def runner_down(self, name: str, reason: str, now: float) -> None:
        reconcile.runner_down(self.state, name, reason, now)

    def runner_draining(self, name: str) -> None:
        runner = self.state.runners.get(name)
        if runner is not None:
            runner.draining = True

    def loader_state(self, node: str, staged: dict[str, int]) -> None:
        self.state.staged[node] = dict(staged)
        self.state.asked.pop(node, None)
        self.state.restage(node)

    def loader_down(self, node: str) -> None:
        self.state.staged.pop(node, None)
        self.state.asked.pop(node, None)
        self.state.restage(node)

    # -- batches ---------------------------------------------------------------- #

    def batch_update(self, runner: str, batch_id: str, job_state: JobState, now: float) -> None:
        batch = self.state.batches.get(batch_id)
        if batch is None or batch.runner != runner:
            return
        r = self.state.runners.get(runner)
        run_s = planner.batch_run_s(self.state, self.estimates, batch, r) if r is not None else None
        for job_id in batch.jobs:
            job = self.state.job_on(job_id, runner)
            if job is None:
                continue
            job.state = job_state
            if job_state is JobState.running:
                job.started_at = now
                if run_s is not None:
                    job.finish_at = now + run_s
            self.state.effects.append(Announce(job))
        if job_state is JobState.running and run_s is not None:
            # The load is behind it: when the runner is free again is now the run alone.
            batch.started, batch.expected_s = now, run_s
            if r is not None:
                self.state.touch(r)

    def batch_done(self, runner: str, batch_id: str, outcomes: Iterable[JobDone | JobFailed],
                   resident: dict[str, int], timing: RunTiming, now: float, *, refused: bool = False,
                   active: tuple[str, list[str]] | None = None) -> list[tuple[Job, JobDone]]:
        """Frees the runner and settles every job of the batch; returns the done ones, whose
        artifacts the caller stores before calling ``complete``. A ``refused`` batch never started:
        its jobs go back without an attempt counted; ``active`` is the batch the runner is busy with
        instead (after a restart here, one this policy did not know of), which it waits for."""
        batch, r = self.state.batches.get(batch_id), self.state.runners.get(runner)
        if batch is not None and r is not None:
            self._learn(batch, r, timing)
            if refused and active is None and not r.draining:  # short of memory (a lease): not there for now
                self.leases.handed_back(runner, batch.model)
        return reconcile.batch_done(self.state, runner, batch_id, outcomes, resident, now, refused=refused,
                                    active=active)

    def dispatch_refused(self, runner: str, batch_id: str, reason: str, now: float, *, unreachable: bool) -> None:
        """The batch's RunBatch was refused on its way (see ``reconcile.dispatch_refused``)."""
        reconcile.dispatch_refused(self.state, runner, batch_id, reason, now, unreachable=unreachable)

    def checkpointed(self, runner: str, job_id: str, uri: str, step: int) -> str | None:
        """A training on ``runner`` has its state at ``step`` stored at ``uri``; returns the checkpoint this
        replaces (for the caller to delete), or ``uri`` itself where the job is not that runner's any more."""
        job = self.state.job_on(job_id, runner)
        if job is None or job.spec.kind is not JobKind.train or step <= job.trained_steps:
            return uri
        older, job.checkpoint, job.trained_steps = job.checkpoint, uri, step
        return older

    def complete(self, job: Job, artifacts: list[str], outputs: tuple, now: float) -> None:
        if not job.live:
            return
        job.artifacts = list(artifacts)
        self.state.finish(job, JobState.done, None, now, outputs)

    # -- the plan ------------------------------------------------------------------ #

    def schedule(self, now: float, *, whole_queue: bool = False) -> None:
        """Starts what should start now, plans the rest for ETAs and preloading, announces new jobs.

        The plan covers the first ``plan_window`` jobs; ``whole_queue`` also places the rest
        (``refresh`` does, once a second, so a long queue costs little per event)."""
        state = self.state
        self.wake_at = None
        self.leases.update(now)
        self.controls.explain(state, self.config, self._fresh, now, whole=whole_queue)
        usable = self._usable(now)
        if state.queue and any(usable(r) for r in state.runners.values()):
            due = whole_queue or now >= self._next_plan
            if not due:
                self._start_ahead(usable, now)
            planned = due or (state.idle and not self._idle_in_vain())
            if planned:
                # Due: the whole window is placed (ETAs, preloads) and new jobs are announced with their place.
                # Otherwise, within REPLAN_BUSY_S of the last such plan, only what starts now is decided (the
                # plan stops once each idle runner has its batch): so a burst of events costs little each.
                spent = self._cpu_clock()
                made = planner.plan(state, self.config, self.estimates, usable, now, full=due,
                                    held=self.controls.held_models())
                spent = self._cpu_clock() - spent
                self._carry_out(made, usable, whole_queue, now)
                if due:
                    self._ahead, self._fresh_top = made.ahead, NO_CLASS
                self._make_way(usable)
                # A plan that started something changed the window: the next one may find the idle runners work.
                self._idle_left = set() if made.starts else set(state.idle)
                self._queue_left = bool(state.queue)
            if not due:
                if self._fresh and planned:  # those it started are announced already
                    self._fresh = [job for job in self._fresh if job.state is JobState.queued]
                if self._fresh:  # placed and announced by the plan that is due then
                    self.wake_at = min(self.wake_at or self._next_plan, self._next_plan)
                return
            # At fleet scale a full plan takes a while: the next waits long enough that they take at most
            # 1 / PLAN_SPACING of the scheduler's time (in between, runners take their planned batches).
            self._next_plan = now + max(REPLAN_BUSY_S, PLAN_SPACING * spent)
        elif state.queue:
            for entry in state.queue.order(self.settings.plan_window):
                state.jobs[entry.id].finish_at = None
        for job in self._fresh:
            if job.state is JobState.queued:
                job.announced_position = job.position
                state.effects.append(Announce(job))
        self._fresh.clear()

    def _start_ahead(self, usable: Callable[[Runner], bool], now: float) -> None:
        """Between full plans, a runner that is free again takes the batch the last one had planned for it
        next, where that still holds (its jobs all queued, nothing keeping it or them back): at fleet scale
        this is most of the dispatches, each costing its batch, not a plan. Jobs submitted since that plan
        wait for the next (within REPLAN_BUSY_S, or as long as a plan takes) to be weighed, unless they are of
        a class ahead of the planned batch's (a live job): then the runner is planned for now."""
        if not self._ahead or self.settings.max_running_per_user is not None:
            return
        held = self.controls.held_models()
        for name in sorted(self.state.idle & self._ahead.keys()):
            jobs = self._ahead.pop(name)
            runner = self.state.runners[name]
            if name not in self.state.idle or not usable(runner) or jobs[0].spec.model in held \
                    or self._fresh_top < jobs[0].entry.priority \
                    or jobs[0].spec.model in runner.cannot_hold \
                    or any(job.state is not JobState.queued or job.id not in self.state.queue for job in jobs):
                continue
            start = planner.start_planned(self.state, self.config, self.estimates, runner, jobs, now)
            if start is not None:
                self._dispatch(start, now)
                self._idle_left.discard(name)

    def _idle_in_vain(self) -> bool:
        """Whether a plan now would most likely leave the idle runners idle as the last one did: that plan
        started nothing and left jobs queued and these runners idle (their work lay past the plan window,
        or nowhere), and no runner has become idle since. Only submits came since, then: they wait for the
        plan due next (within REPLAN_BUSY_S) rather than each paying a plan, in a fleet bigger than the
        window."""
        return self._queue_left and self.state.idle <= self._idle_left

    def _usable(self, now: float) -> Callable[[Runner], bool]:
        """Whether a runner may take a batch now: not shutting down nor unreachable, held by no pending lease,
        and allowed by the operator's controls."""
        blocked = self.leases.blocked()
        controls = self.controls
        return lambda r: (not r.draining and now >= r.unreachable_until and r.name not in blocked
                          and controls.allows(r))

    def refresh(self, now: float) -> None:
        """Replans as time passes and publishes the new position of queued jobs that moved. The jobs past
        the plan window are placed at most ``PLACED_PER_S`` a second: with a hundred thousand queued, every
        twenty seconds (placing them all takes most of a second of CPU), with a few thousand, every second; and
        not before the next full plan is due (``schedule``)."""
        whole = now >= self._next_whole and now >= self._next_plan  # a full plan's spacing holds here too
        if whole:
            self._next_whole = now + len(self.state.queue) / PLACED_PER_S
        self.schedule(now, whole_queue=whole)
        if not whole:
            return
        moved = 0
        for entry in self.state.queue.order():
            job = self.state.jobs[entry.id]
            if moved >= ANNOUNCE_POSITIONS:
                break
            if job.position != job.announced_position:
                job.announced_position = job.position
                self.state.effects.append(Announce(job))
                moved += 1

    def _carry_out(self, plan: planner.Plan, usable: Callable[[Runner], bool], whole_queue: bool, now: float) -> None:
        for place in plan.places:
            place.job.position, place.job.finish_at = place.position, place.finish_at
        for start in plan.starts:
            self._dispatch(start, now)
        self.wake_at = plan.wake_at
        if whole_queue:
            # Placed once the starts have left the queue: the order of the rest depends on them.
            runners = [r for r in self.state.runners.values() if usable(r)]
            for place in planner.place_rest(self.state, self.estimates, plan, runners):
                place.job.position, place.job.finish_at = place.position, place.finish_at
        for node, models in plan.preloads.items():
            self.state.asked.setdefault(node, set()).update(models)
            self.state.restage(node)
            self.state.effects.append(PreloadModels(node, models))

    def _make_way(self, usable: Callable[[Runner], bool]) -> None:
        """Trainings yield: each live or interactive job left waiting by the plan asks one runner that is
        training (and could run it) to checkpoint at its next step and make way. The training is queued
        again at batch priority, so the waiting job takes the device, and the training resumes after it."""
        if not self.state.training:
            return
        batch_class = PRIORITY_CLASS[Priority.batch]
        held = self.controls.held_models()
        waiting = [job for entry in self.state.queue.order(self.settings.plan_window)
                   if entry.priority < batch_class and (job := self.state.jobs[entry.id]).spec.model not in held]
        if not waiting:
            return
        training = {}  # runner name -> its training job
        for runner in (self.state.runners[name] for name in sorted(self.state.training)):
            if not usable(runner):
                continue
            job = self.state.jobs.get(runner.batch.jobs[0]) if runner.batch and runner.batch.jobs else None
            if job is not None and job.live and job.spec.kind is JobKind.train:
                training[runner.name] = (runner, job)
        pausing = sum(job.pausing for _, job in training.values())
        for waiter in waiting[pausing:]:
            entry = self.config.models[waiter.spec.model]
            found = next(((runner, job) for runner, job in training.values()
                          if not job.pausing and not job.stopping and runner.takes(entry)), None)
            if found is None:
                continue
            runner, job = found
            job.pausing = True
            self.state.effects.append(StopRunning(runner.name, job.id, f"making way for job {waiter.id}", pause=True))

    def _dispatch(self, start: planner.Start, now: float) -> None:
        state = self.state
        runner = start.runner
        batch = Batch(self._new_id(), runner.name, start.jobs[0].spec.model, [j.id for j in start.jobs], start.images,
                      started=now, expected_s=start.finish - now)
        state.batches[batch.id] = batch
        state.set_batch(runner, batch)
        items = []
        for job in start.jobs:
            state.queue.take(job.id)
            job.attempts += 1
            state.set_running(job, runner.name, batch.id, JobState.assigned)
            job.finish_at = start.finish
            job.steps_at_dispatch = job.trained_steps
            items.append((job.spec, job.attempts, job.inputs, job.checkpoint))
            state.effects.append(Announce(job))
        state.effects.append(Dispatch(batch, tuple(items)))

    # -- estimates -------------------------------------------------------------- #

    def _learn(self, batch: Batch, runner: Runner, timing: RunTiming) -> None:
        self.state.counters.count_batch(batch.model, timing)
        first = self.state.jobs.get(batch.jobs[0]) if batch.jobs else None
        if first is not None and timing.step_s is not None and timing.images:
            self.estimates.observe_step(batch.model, runner.device_name, first.spec.width * first.spec.height,
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
        entry = self.config.models.get(spec.model)
        if entry is None:  # an ended job of a model since removed: it will never be charged
            return 0.0
        family = entry.family
        if self._costed_at != self.state.joined:
            self._costed_at, self._cost_device = self.state.joined, {}
        device = self._cost_device.get(family)
        if device is None:
            # A single device's time: a gang's would charge a job less for taking more devices.
            runner = min((r for r in self.state.runners.values() if r.accepts(family)), key=lambda r: r.gang,
                         default=None)
            device = self._cost_device[family] = runner.device_name if runner else ""
        return self.estimates.run_s(spec.model, device, width=spec.width,
                                    height=spec.height, images=spec.count, steps=spec.work_steps)

    def _check_input_budget(self, user: str, size: int, now: float) -> None:
        """Input images are held until their job ends: a bound per user and in all, like the queue's."""
        if not size:
            return
        held = self.state.input_bytes
        mine, per_user = held[user], self.settings.max_input_bytes_per_user
        if mine + size > per_user:
            raise Refused(ErrorCode.queue_full, field="inputs", retry_after_s=self._retry_hint(now, user),
                          message=f"{user}'s queued jobs hold {mine / MIB:.0f} MiB of input images and this one "
                                  f"{size / MIB:.1f} MiB, above the {per_user / MIB:.0f} MiB one person may; "
                                  "try again when some have run")
        total, limit = sum(held.values()), self.settings.max_input_bytes
        if total + size > limit:
            raise Refused(ErrorCode.queue_full, field="inputs", retry_after_s=self._retry_hint(now),
                          message=f"queued jobs hold {total / MIB:.0f} MiB of input images, near the "
                                  f"{limit / MIB:.0f} MiB the scheduler takes; try again later")

    def _retry_hint(self, now: float, user: str | None = None) -> float:
        """Seconds until a slot is likely to free: the soonest expected end of a running (or the
        user's) batch, within 1 s to 5 min."""
        ends = [j.finish_at for j in self.state.jobs.values()
                if j.live and j.state is not JobState.queued and j.finish_at is not None
                and (user is None or j.spec.user == user)]
        soonest = min(ends) - now if ends else 5.0
        return round(min(300.0, max(1.0, soonest)), 1)
