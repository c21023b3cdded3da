"""The scheduler: the actor around the scheduling policy (``atelier/scheduling/policy.py``).

Every decision (order, fairness, batching, placement, preloading, live sessions, ETAs) is the
policy's; this actor turns messages into calls on it and its effects into messages. Every
state transition is published as a ``JobEvent``; the final ``JobResult`` goes to the
submitting frontend over the routed path, because events are lossy and results are not.

A runner that dies (the broker says ``PeerDown``) gives its jobs back to the front of their
owners' queues; generation is seeded, so a retry makes the same images. After
``max_attempts`` a job fails with the reason.

Every accepted job and each of its transitions is written to the journal
(``actors/journal.py``) before anyone hears of it; a restarted scheduler reads it
back and carries on with the jobs that had not ended.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import time

from actors import keys
from actors.actor import Actor, RemoteError, UnexpectedReply, handles
from actors.codec import BROKER, Envelope
from actors.journal import Journal, JournalError
from actors.loader import loader_name
from actors.messages import (
    Accepted,
    BatchDone,
    BatchItem,
    BatchUpdate,
    CancelJob,
    ClusterStatus,
    Draining,
    Error,
    GetJob,
    GetModels,
    GetResult,
    GetRunnerState,
    GetStatus,
    JobEvent,
    JobInfo,
    JobList,
    JobResult,
    ListJobs,
    LoaderState,
    ModelInfo,
    Models,
    Ok,
    PeerDown,
    PeerUp,
    Preload,
    Role,
    RunBatch,
    RunnerStatus,
    StopJob,
    Submit,
)
from atelier.artifacts import ArtifactStore
from atelier.config import Config
from atelier.jobs import Artifact, ErrorCode, JobKind, JobRecord
from atelier.runtime import Failure, process_main, process_parser
from atelier.scheduling.policy import (
    Announce,
    Deliver,
    Dispatch,
    Effect,
    Policy,
    PreloadModels,
    Refused,
    StopRunning,
)

log = logging.getLogger("atelier.scheduler")

REFRESH_S = 1.0  # how often queued jobs' positions and ETAs are brought up to date
RUNNER_STATE_TIMEOUT_S = 10.0  # a starting runner (importing torch) may take seconds to answer
PRUNE_S = 3600.0  # how often ended jobs older than journal_keep_days leave the journal


class Scheduler(Actor):
    role = Role.scheduler

    def __init__(self, config: Config, router: str, *, name: str = "scheduler", clock=time.time, **kwargs):
        super().__init__(name, router, heartbeat_s=config.broker.heartbeat_s, **kwargs)
        self.config = config
        self.policy = Policy(config)
        self.store = ArtifactStore(config.artifact_dir)
        self.clock = clock
        self.loaders: dict[str, LoaderState] = {}  # by node, for status
        self._wake: asyncio.TimerHandle | None = None
        self._sending = asyncio.Lock()  # effects go out in the order the policy decided them
        self.journal = Journal(config.journal_path)
        self._restore()

    def _restore(self) -> None:
        """Takes back what the journal holds: the last ended jobs, to answer for them, then every job
        that had not ended, queued again in the order it was submitted."""
        now = self.clock()
        self.journal.prune(now - self.config.scheduler.journal_keep_days * 86400)
        for kept in self.journal.finished(self.config.scheduler.remember_finished):
            self.policy.restore(kept.record, kept.client, None, kept.idempotency_key, now)
        requeued = [self.policy.restore(kept.record, kept.client, kept.inputs, kept.idempotency_key, now)
                    for kept in self.journal.unfinished()]
        if requeued:
            log.info("journal %s: %d jobs that had not ended are queued again", self.journal.path, len(requeued))
            # Written now: their new state (queued, no runner) must not wait for the first event.
            self.journal.update(job.record(now) for job in requeued)

    async def on_start(self) -> None:
        self._tasks.spawn(self._refresh_loop(), "refresh")
        self._tasks.spawn(self._prune_loop(), "prune")

    async def on_stop(self) -> None:
        await super().on_stop()
        self.journal.close()

    # -- peers --------------------------------------------------------------- #

    @handles(PeerUp)
    async def on_peer_up(self, msg: PeerUp, env: Envelope) -> None:
        if env.src != BROKER:  # only the broker knows who joined (it also refuses to route these)
            return
        if msg.role is Role.runner:
            if not self.policy.has_runner(msg.name):
                log.info("runner %s joined (%s)", msg.name, msg.capabilities.device)
            self.policy.runner_up(msg.name, msg.capabilities, self.clock())
            await self._schedule()
            # Asked aside, after what was just sent to it: the mailbox does not wait on a runner
            # still starting (importing torch), and the answer covers everything sent before.
            self._tasks.spawn(self._sync_runner(msg.name), f"sync-{msg.name}")

    async def _sync_runner(self, name: str) -> None:
        """Asks a joining runner what it runs now: the capabilities of its Hello, which the broker's
        PeerUp carries, may be from before a batch began or ended (or was lost with a broker)."""
        asked_during = self.policy.runner_batch(name)
        try:
            state = await self.ask(name, GetRunnerState(), timeout=RUNNER_STATE_TIMEOUT_S)
        except (asyncio.TimeoutError, RemoteError, UnexpectedReply) as exc:
            log.warning("runner %s did not say what it is running (%s); going by its Hello", name, exc)
            return
        self.policy.runner_state(name, state.capabilities, asked_during, self.clock())
        await self._schedule()

    @handles(PeerDown)
    async def on_peer_down(self, msg: PeerDown, env: Envelope) -> None:
        if env.src != BROKER:
            return
        if msg.role is Role.loader:
            for node in [n for n in self.loaders if loader_name(n) == msg.name]:
                del self.loaders[node]
                self.policy.loader_down(node)
        elif msg.role is Role.runner:
            if self.policy.has_runner(msg.name):
                log.warning("runner %s is gone (%s)", msg.name, msg.reason)
            self.policy.runner_down(msg.name, msg.reason, self.clock())
            await self._schedule()

    @handles(LoaderState)
    async def on_loader_state(self, msg: LoaderState, env: Envelope) -> Error | None:
        if env.src != loader_name(msg.node):  # what is staged where steers placement and preloads
            log.warning("refused LoaderState for node %r from %r", msg.node[:128], env.src[:128])
            return Error(code=ErrorCode.forbidden,
                         message=f"{msg.kind} for node {msg.node[:128]!r} is taken only from {loader_name(msg.node)}")
        self.loaders[msg.node] = msg
        self.policy.loader_state(msg.node, msg.staged)

    # -- frontends ----------------------------------------------------------- #

    @handles(Submit)
    async def on_submit(self, msg: Submit, env: Envelope) -> Accepted | Error:
        now = self.clock()
        key = msg.idempotency_key
        if key is not None and self.policy.by_key(msg.job.user, key) is None:
            earlier = self.journal.by_key(msg.job.user, key)  # a job long ended, forgotten from memory
            if earlier is not None:
                return Accepted(job=earlier)
        known = self.policy.find(msg.job.id)
        try:
            job = self.policy.submit(msg.job, env.src, now, msg.inputs, idempotency_key=key)
        except Refused as refused:
            return _error(refused)
        if job is not known and job.id == msg.job.id:
            try:
                self.journal.add(job.record(now), env.src, key, msg.inputs)
            except sqlite3.Error as exc:
                # Not written, not accepted: taking a job that a restart would lose breaks the promise.
                self.policy.withdraw(job.id)
                log.error("journal: cannot write job %s: %s", job.id, exc)
                return Error(code=ErrorCode.internal, message=f"the scheduler cannot record jobs right now ({exc})")
        await self._schedule()
        return Accepted(job=job.record(now))

    @handles(CancelJob)
    async def on_cancel(self, msg: CancelJob, env: Envelope) -> JobInfo | Error:
        now = self.clock()
        try:
            job = self.policy.cancel(msg.job_id, now)
        except Refused as refused:
            return _error(refused)
        await self._schedule()
        return JobInfo(job=job.record(now))

    @handles(GetJob)
    async def on_get_job(self, msg: GetJob, env: Envelope) -> JobInfo | Error:
        try:
            job = self.policy.job(msg.job_id)
        except Refused as refused:
            earlier = self.journal.get(msg.job_id)  # ended long ago: only the journal still has it
            return JobInfo(job=earlier) if earlier is not None else _error(refused)
        return JobInfo(job=job.record(self.clock()))

    @handles(GetResult)
    async def on_get_result(self, msg: GetResult, env: Envelope) -> JobResult | JobInfo | Error:
        job = self.policy.find(msg.job_id)
        if job is not None and job.live:
            return JobInfo(job=job.record(self.clock()))
        record = job.record(self.clock()) if job is not None else self.journal.get(msg.job_id)
        if record is None:
            return Error(code=ErrorCode.unknown_job, field="job_id", message=f"no job {msg.job_id!r} in the journal")
        described = self.journal.outputs(msg.job_id)
        outputs = await asyncio.to_thread(self._read_outputs, described)
        return JobResult(job=record, outputs=outputs)

    def _read_outputs(self, described: list[dict]) -> list[Artifact]:
        """The artifacts of a done job, read back from the store; one deleted since is left out."""
        outputs = []
        for meta in described:
            data = self.store.read(meta.get("uri") or "")
            if data is not None:
                outputs.append(Artifact(**meta, data=data))
        return outputs

    @handles(GetStatus)
    async def on_status(self, msg: GetStatus, env: Envelope) -> ClusterStatus:
        status = self.policy.status()
        runners = [RunnerStatus(name=r.name, job=r.job, capabilities=r.capabilities) for r in status.runners]
        return ClusterStatus(runners=runners, loaders=list(self.loaders.values()), counts=status.counts,
                             queued=status.queued, stats=status.stats)

    @handles(ListJobs)
    async def on_list_jobs(self, msg: ListJobs, env: Envelope) -> JobList:
        now = self.clock()
        return JobList(jobs=[job.record(now) for job in self.policy.jobs_of(msg.user, msg.limit)])

    @handles(GetModels)
    async def on_models(self, msg: GetModels, env: Envelope) -> Models:
        infos = []
        for name, entry in self.config.models.items():
            lim = entry.limits
            infos.append(ModelInfo(name=name, family=entry.family, kinds=sorted(JobKind(k) for k in lim.kinds),
                                   default_width=lim.default_width, default_height=lim.default_height,
                                   default_steps=lim.default_steps, default_guidance=lim.default_guidance,
                                   max_width=lim.max_width, max_height=lim.max_height,
                                   default=name == self.config.default_model, max_count=lim.max_count,
                                   media=lim.media, inpaint=lim.inpaint, default_frames=lim.default_frames,
                                   max_frames=lim.max_frames, default_fps=lim.default_fps,
                                   default_duration_s=lim.default_duration_s, max_duration_s=lim.max_duration_s,
                                   loras=sorted(entry.loras), controlnets=sorted(entry.controlnets),
                                   ip_adapter=entry.ip_adapter is not None))
        return Models(models=infos)

    # -- runners ------------------------------------------------------------- #

    @handles(Draining)
    async def on_draining(self, msg: Draining, env: Envelope) -> None:
        self.policy.runner_draining(env.src)

    @handles(BatchUpdate)
    async def on_batch_update(self, msg: BatchUpdate, env: Envelope) -> None:
        self.policy.batch_update(env.src, msg.batch_id, msg.state, self.clock())
        await self._apply()

    @handles(BatchDone)
    async def on_batch_done(self, msg: BatchDone, env: Envelope) -> Ok:
        done = self.policy.batch_done(env.src, msg.batch_id, msg.outcomes, msg.resident, msg.timing, self.clock(),
                                      refused=msg.refused, active=(msg.active_batch, msg.active_jobs)
                                      if msg.active_batch else None)
        await self._schedule()  # the runner is free: give it work before writing artifacts
        if done:
            stored = await asyncio.to_thread(self._store, done)
            now = self.clock()
            for (job, _), (uris, outputs) in zip(done, stored, strict=True):
                self.policy.complete(job, uris, outputs, now)
            await self._apply()
        return Ok()  # the runner may forget the outcomes now

    def _store(self, done: list) -> list[tuple[list[str], tuple[Artifact, ...]]]:
        """Writes every done job's outputs (one trip to a thread per batch): where they went, and
        the outputs that say so."""
        stored = []
        for job, outcome in done:
            uris = self.store.put_all(job.id, outcome.outputs)
            outputs = tuple(artifact.model_copy(update={"uri": uri})
                            for artifact, uri in zip(outcome.outputs, uris, strict=True))
            stored.append((uris, outputs))
        return stored

    # -- effects ------------------------------------------------------------- #

    async def _schedule(self) -> None:
        self.policy.schedule(self.clock())
        self._arm_wake()
        await self._apply()

    async def _apply(self) -> None:
        """Carries out what the policy decided, in the order it decided it."""
        async with self._sending:
            await self._carry_out(self.policy.drain())

    async def _carry_out(self, effects: list[Effect]) -> None:
        now = self.clock()
        # Each job as it stands now, once: what is written is what goes out.
        records = [effect.job.record(now) if isinstance(effect, Announce | Deliver) else None for effect in effects]
        self._write(effects, records)
        for effect, record in zip(effects, records, strict=True):
            if isinstance(effect, Announce):
                await self._announce(record)
            elif isinstance(effect, Deliver):
                await self._announce(record)
                await self.send(effect.job.client, JobResult(job=record, outputs=list(effect.outputs)))
            elif isinstance(effect, Dispatch):
                items = [BatchItem(job=spec, attempt=attempt, inputs=inputs) for spec, attempt, inputs in effect.items]
                await self.send(effect.batch.runner, RunBatch(batch_id=effect.batch.id, items=items))
            elif isinstance(effect, StopRunning):
                await self.send(effect.runner, StopJob(job_id=effect.job_id, reason=effect.reason))
            elif isinstance(effect, PreloadModels):
                await self.send(loader_name(effect.node), Preload(models=list(effect.models)))

    def _write(self, effects: list[Effect], records: list[JobRecord | None]) -> None:
        """Journals the transitions among ``effects`` before any of them is sent: what a frontend or
        runner hears of has been written."""
        # Every transition is announced (a dispatched job's too), so these are all of them.
        written = [record for record in records if record is not None]
        outputs = {effect.job.id: effect.outputs for effect in effects if isinstance(effect, Deliver)}
        try:
            self.journal.update(written, outputs)
        except sqlite3.Error:  # serving goes on; a restart now would redo these transitions
            log.exception("journal: cannot write %d job transitions", len(written))

    async def _announce(self, r: JobRecord) -> None:
        await self.publish(JobEvent(job_id=r.spec.id, state=r.state, reason=r.reason, position=r.position,
                                    eta_s=r.eta_s, runner=r.runner, attempt=r.attempts, batch_id=r.batch_id))

    def _arm_wake(self) -> None:
        """batch_wait_s: be back when a waiting batch's time is up."""
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        if self.policy.wake_at is not None:
            delay = max(0.0, self.policy.wake_at - self.clock())
            self._wake = asyncio.get_running_loop().call_later(delay, self._post_wake)

    def _post_wake(self) -> None:
        self._tasks.spawn(self._schedule(), "wake")

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                self.policy.refresh(self.clock())
                self._arm_wake()
                await self._apply()
            except Exception:  # the next tick tries again; the mailbox goes on regardless
                log.exception("refreshing positions and ETAs failed")


    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_S)
            try:
                self.journal.prune(self.clock() - self.config.scheduler.journal_keep_days * 86400)
            except sqlite3.Error:
                log.exception("journal: pruning ended jobs failed")


def _error(refused: Refused) -> Error:
    return Error(code=refused.code, message=refused.message, field=refused.field,
                 retry_after_s=refused.retry_after_s)


async def serve(args: argparse.Namespace, config: Config, stop: asyncio.Event) -> None:
    if args.journal:
        config.scheduler.journal = args.journal
    try:
        scheduler = Scheduler(config, args.router or config.broker.router, keys=keys.for_peer(config))
    except (JournalError, keys.CurveKeyError) as exc:
        raise Failure(str(exc), 2) from None
    await scheduler.run(stop)


def main(argv: list[str] | None = None) -> int:
    parser = process_parser("atelier scheduler", "Run the atelier scheduler.")
    parser.add_argument("--journal", help="the job journal's file, in place of the config's")
    return process_main(parser, serve, argv, log_name="scheduler")


if __name__ == "__main__":
    raise SystemExit(main())
