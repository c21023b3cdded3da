"""The scheduler: the queue, job state, and every decision about where a job runs.

For now the policy is a plain FIFO over idle runners (a job no idle runner can
take does not hold back the ones behind it). Every state transition is
published as a ``JobEvent``; the final ``JobResult`` goes to the submitting
frontend over the routed path, because events are lossy and results are not.

A runner that dies (the broker says ``PeerDown``) gives its job back to the
front of the queue; generation is seeded, so the retry makes the same image.
After ``max_attempts`` the job fails with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field

from actors.actor import Actor, handles, run_actor
from actors.codec import Envelope
from actors.loader import loader_name
from actors.messages import (
    Accepted,
    CancelJob,
    Capabilities,
    ClusterStatus,
    Draining,
    Error,
    ErrorCode,
    GetJob,
    GetModels,
    GetStatus,
    JobDone,
    JobEvent,
    JobFailed,
    JobInfo,
    JobKind,
    JobRecord,
    JobResult,
    JobSpec,
    JobState,
    JobUpdate,
    LoaderState,
    ModelInfo,
    Models,
    Ok,
    PeerDown,
    PeerUp,
    Preload,
    Role,
    RunJob,
    RunnerStatus,
    StopJob,
    Submit,
)
from atelier.artifacts import ArtifactStore
from atelier.config import Config, load_config

log = logging.getLogger("atelier.scheduler")


@dataclass
class Job:
    record: JobRecord
    client: str  # the frontend that submitted it, where the result goes
    cancel_requested: bool = False


@dataclass
class RunnerSlot:
    name: str
    capabilities: Capabilities
    job: str | None = None
    resident: dict[str, int] = field(default_factory=dict)
    draining: bool = False  # shutting down: finishes or hands back its job, takes no new one


class Scheduler(Actor):
    role = Role.scheduler

    def __init__(self, config: Config, router: str, *, name: str = "scheduler", **kwargs):
        super().__init__(name, router, heartbeat_s=config.broker.heartbeat_s, **kwargs)
        self.config = config
        self.jobs: dict[str, Job] = {}
        self.queue: deque[str] = deque()
        self.runners: dict[str, RunnerSlot] = {}
        self.finished: deque[str] = deque()
        self.loaders: dict[str, LoaderState] = {}  # by node
        self._preloading: dict[str, set[str]] = {}  # by node: asked for, not yet reported staged
        self.store = ArtifactStore(config.artifact_dir)

    # -- peers --------------------------------------------------------------- #

    @handles(PeerUp)
    async def on_peer_up(self, msg: PeerUp, env: Envelope) -> None:
        if msg.role is not Role.runner or msg.name in self.runners:
            return
        slot = RunnerSlot(msg.name, msg.capabilities, resident=dict(msg.capabilities.resident))
        self.runners[msg.name] = slot
        log.info("runner %s joined (%s)", msg.name, msg.capabilities.device)
        if msg.capabilities.active_job is not None:
            await self._reclaim(slot, msg.capabilities.active_job)
        await self._dispatch()

    async def _reclaim(self, slot: RunnerSlot, job_id: str) -> None:
        """A runner we had given up on came back still working: let it finish rather than run the job twice."""
        job = self.jobs.get(job_id)
        mine = job is not None and not job.record.state.terminal and job.record.runner in (None, slot.name)
        if mine:
            slot.job = job_id
            if job.record.state is JobState.queued:
                self.queue.remove(job_id)
                job.record.state = JobState.running
                job.record.runner = slot.name
                job.record.position = None
                await self._announce(job)
        else:
            await self.send(slot.name, StopJob(job_id=job_id, reason="the job was reassigned"))

    @handles(LoaderState)
    async def on_loader_state(self, msg: LoaderState, env: Envelope) -> None:
        self.loaders[msg.node] = msg
        self._preloading.pop(msg.node, None)

    @handles(PeerDown)
    async def on_peer_down(self, msg: PeerDown, env: Envelope) -> None:
        if msg.role is Role.loader:
            gone = [node for node in self.loaders if loader_name(node) == msg.name]
            for node in gone:
                del self.loaders[node]
            return
        slot = self.runners.pop(msg.name, None)
        if slot is None or slot.job is None:
            return
        job = self.jobs.get(slot.job)
        if job is None or job.record.state.terminal:
            return
        reason = f"runner {msg.name} died while running this job ({msg.reason})"
        if job.cancel_requested:
            await self._finish(job, JobState.cancelled, "cancelled")
        elif job.record.attempts >= self.config.scheduler.max_attempts:
            await self._finish(job, JobState.failed,
                               f"{reason}; gave up after {job.record.attempts} attempts")
        else:
            log.warning("%s; requeueing %s (attempt %d)", reason, job.record.spec.id, job.record.attempts)
            await self._requeue(job, reason)
        await self._dispatch()

    # -- frontends ----------------------------------------------------------- #

    @handles(Submit)
    async def on_submit(self, msg: Submit, env: Envelope) -> Accepted | Error:
        spec = msg.job
        known = self.jobs.get(spec.id)
        if known is not None:
            if known.client == env.src:
                return Accepted(job=known.record)  # a retry of a submit whose answer was lost
            return Error(code=ErrorCode.bad_request, field="id", message=f"job id {spec.id!r} already exists")
        problem = self._check(spec)
        if problem is not None:
            return problem
        if len(self.queue) >= self.config.scheduler.max_queue:
            return Error(code=ErrorCode.queue_full, retry_after_s=5.0,
                         message=f"the queue is full ({len(self.queue)} jobs); try again later")
        record = JobRecord(spec=self._resolve(spec), state=JobState.queued, submitted_at=time.time(),
                           position=len(self.queue))
        job = Job(record, client=env.src)
        self.jobs[spec.id] = job
        self.queue.append(spec.id)
        await self._announce(job)
        await self._dispatch()
        return Accepted(job=job.record)

    @handles(CancelJob)
    async def on_cancel(self, msg: CancelJob, env: Envelope) -> JobInfo | Error:
        job = self.jobs.get(msg.job_id)
        if job is None:
            return _unknown_job(msg.job_id)
        state = job.record.state
        if state is JobState.queued:
            self.queue.remove(msg.job_id)
            await self._finish(job, JobState.cancelled, "cancelled while queued")
        elif not state.terminal and not job.cancel_requested:
            # It stops at its next step; the runner's JobFailed(cancelled) finishes it.
            job.cancel_requested = True
            await self.send(job.record.runner, StopJob(job_id=msg.job_id, reason="cancelled"))
        return JobInfo(job=job.record)

    @handles(GetJob)
    async def on_get_job(self, msg: GetJob, env: Envelope) -> JobInfo | Error:
        job = self.jobs.get(msg.job_id)
        if job is None:
            return _unknown_job(msg.job_id)
        if job.record.state is JobState.queued:
            job.record.position = self.queue.index(msg.job_id)
        return JobInfo(job=job.record)

    @handles(GetStatus)
    async def on_status(self, msg: GetStatus, env: Envelope) -> ClusterStatus:
        counts: dict[str, int] = {}
        for job in self.jobs.values():
            counts[job.record.state.value] = counts.get(job.record.state.value, 0) + 1
        runners = [RunnerStatus(name=s.name, job=s.job,
                                capabilities=s.capabilities.model_copy(update={"resident": s.resident}))
                   for s in self.runners.values()]
        return ClusterStatus(runners=runners, loaders=list(self.loaders.values()), queued=list(self.queue),
                             counts=counts)

    @handles(GetModels)
    async def on_models(self, msg: GetModels, env: Envelope) -> Models:
        infos = []
        for name, entry in self.config.models.items():
            lim = entry.limits
            infos.append(ModelInfo(name=name, family=entry.family, kinds=[JobKind.txt2img],
                                   default_width=lim.default_width, default_height=lim.default_height,
                                   default_steps=lim.default_steps, max_width=lim.max_width,
                                   max_height=lim.max_height))
        return Models(models=infos)

    # -- runners ------------------------------------------------------------- #

    @handles(Draining)
    async def on_draining(self, msg: Draining, env: Envelope) -> None:
        slot = self.runners.get(env.src)
        if slot is not None:
            slot.draining = True

    @handles(JobUpdate)
    async def on_job_update(self, msg: JobUpdate, env: Envelope) -> None:
        job = self._job_on(msg.job_id, env.src)
        if job is None:
            return
        job.record.state = msg.state
        if msg.state is JobState.running:
            job.record.started_at = time.time()
        await self._announce(job)

    @handles(JobDone)
    async def on_job_done(self, msg: JobDone, env: Envelope) -> Ok:
        job = self._job_on(msg.job_id, env.src)
        self._free(env.src, msg.resident)
        await self._dispatch()
        if job is not None:
            uris = await asyncio.to_thread(self.store.put_all, msg.job_id, msg.outputs)
            for artifact, uri in zip(msg.outputs, uris, strict=True):
                artifact.uri = uri
            job.record.artifacts = uris
            await self._finish(job, JobState.done, None, outputs=msg.outputs)
        return Ok()  # the runner may forget the result now

    @handles(JobFailed)
    async def on_job_failed(self, msg: JobFailed, env: Envelope) -> Ok:
        job = self._job_on(msg.job_id, env.src)
        self._free(env.src, msg.resident)
        if job is not None:
            if msg.cancelled or job.cancel_requested:
                await self._finish(job, JobState.cancelled, msg.reason)
            elif msg.retryable and job.record.attempts < self.config.scheduler.max_attempts:
                await self._requeue(job, msg.reason)
            else:
                await self._finish(job, JobState.failed, msg.reason)
        await self._dispatch()
        return Ok()

    # -- policy ---------------------------------------------------------------- #

    def _check(self, spec: JobSpec) -> Error | None:
        """What pydantic cannot know: the catalog and each model's own limits."""
        entry = self.config.models.get(spec.model)
        if entry is None:
            known = ", ".join(sorted(self.config.models))
            return Error(code=ErrorCode.unknown_model, field="model",
                         message=f"unknown model {spec.model!r}; available: {known}")
        if spec.kind is not JobKind.txt2img:
            return Error(code=ErrorCode.bad_request, field="kind",
                         message=f"{spec.model} ({entry.family}) does not do {spec.kind.value}")
        lim = entry.limits
        for field_name, value, limit in (("width", spec.width, lim.max_width),
                                         ("height", spec.height, lim.max_height)):
            if value is not None and value > limit:
                return Error(code=ErrorCode.bad_request, field=field_name,
                             message=f"{field_name} {value} is above {spec.model}'s limit of {limit}")
        if spec.count > lim.max_count:
            return Error(code=ErrorCode.bad_request, field="count",
                         message=f"count {spec.count} is above {spec.model}'s limit of {lim.max_count}")
        return None

    def _resolve(self, spec: JobSpec) -> JobSpec:
        """Fills in the model's defaults, and a seed, so every attempt makes the same images."""
        lim = self.config.models[spec.model].limits
        return spec.model_copy(update={
            "width": spec.width or lim.default_width,
            "height": spec.height or lim.default_height,
            "steps": spec.steps or lim.default_steps,
            "guidance": lim.default_guidance if spec.guidance is None else spec.guidance,
            "seed": random.randrange(2**32) if spec.seed is None else spec.seed,
        })

    async def _dispatch(self) -> None:
        """Gives idle runners the jobs they can take, then looks ahead for what to preload."""
        await self._assign()
        if self.config.scheduler.preload and self.queue:
            await self._preload()

    async def _assign(self) -> None:
        idle = [slot for slot in self.runners.values() if slot.job is None and not slot.draining]
        if not idle or not self.queue:
            return
        taken: list[str] = []
        for job_id in self.queue:
            if not idle:
                break
            job = self.jobs[job_id]
            family = self.config.models[job.record.spec.model].family
            able = [s for s in idle if not s.capabilities.families or family in s.capabilities.families]
            if not able:
                continue
            # Passthrough: a runner that already holds the model starts at once.
            slot = next((s for s in able if job.record.spec.model in s.resident), able[0])
            idle.remove(slot)
            taken.append(job_id)
            slot.job = job_id
            job.record.state = JobState.assigned
            job.record.runner = slot.name
            job.record.attempts += 1
            job.record.position = None
            await self.send(slot.name, RunJob(job=job.record.spec, attempt=job.record.attempts))
            await self._announce(job)
        for job_id in taken:
            self.queue.remove(job_id)

    async def _preload(self) -> None:
        """Asks each node's loader to stage the models of the jobs that will run next while its
        runners are busy, so that a model switch finds the weights in memory."""
        lookahead: list[str] = []
        for job_id in itertools.islice(self.queue, len(self.runners) + 1):
            model = self.jobs[job_id].record.spec.model
            if model not in lookahead:
                lookahead.append(model)
        for node, state in self.loaders.items():
            asked = self._preloading.setdefault(node, set())
            # A model resident on a busy runner may be evicted for that runner's current job;
            # only one that runner is using now, or an idle runner holds, is sure to stay.
            kept = set()
            for slot in self.runners.values():
                if slot.capabilities.node != node:
                    continue
                if slot.job is None:
                    kept.update(slot.resident)
                elif slot.job in self.jobs:
                    kept.add(self.jobs[slot.job].record.spec.model)
            wanted = [m for m in lookahead if m not in state.staged and m not in asked and m not in kept]
            if wanted:
                asked.update(wanted)
                await self.send(loader_name(node), Preload(models=wanted))

    async def _requeue(self, job: Job, reason: str) -> None:
        job.record.state = JobState.queued
        job.record.runner = None
        job.record.reason = reason
        job.record.position = 0
        self.queue.appendleft(job.record.spec.id)  # it waited its turn already
        await self._announce(job)

    async def _finish(self, job: Job, state: JobState, reason: str | None, outputs=()) -> None:
        record = job.record
        record.state = state
        record.reason = reason
        record.finished_at = time.time()
        record.position = None
        await self._announce(job)
        await self.send(job.client, JobResult(job=record, outputs=list(outputs)))
        self.finished.append(record.spec.id)
        while len(self.finished) > self.config.scheduler.remember_finished:
            self.jobs.pop(self.finished.popleft(), None)

    def _job_on(self, job_id: str, runner: str) -> Job | None:
        """The job, if ``runner`` is (still) the one running it; late words from an old runner are ignored."""
        job = self.jobs.get(job_id)
        if job is None or job.record.runner != runner or job.record.state.terminal:
            return None
        return job

    def _free(self, runner: str, resident: dict[str, int]) -> None:
        slot = self.runners.get(runner)
        if slot is not None:
            slot.job = None
            slot.resident = dict(resident)

    async def _announce(self, job: Job) -> None:
        r = job.record
        await self.publish(JobEvent(job_id=r.spec.id, state=r.state, reason=r.reason, position=r.position,
                                    runner=r.runner, attempt=r.attempts))


def _unknown_job(job_id: str) -> Error:
    return Error(code=ErrorCode.unknown_job, field="job_id",
                 message=f"no job {job_id!r} (never submitted, or finished long enough ago to be forgotten)")


def main(argv: list[str] | None = None) -> int:
    from atelier.runtime import setup_logging

    parser = argparse.ArgumentParser(prog="atelier scheduler", description="Run the atelier scheduler.")
    parser.add_argument("--config")
    parser.add_argument("--router", help="the broker's ROUTER endpoint")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, "scheduler")
    config = load_config(args.config)
    run_actor(Scheduler(config, args.router or config.broker.router))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
