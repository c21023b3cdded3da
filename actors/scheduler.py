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
import hashlib
import logging
import re
import sqlite3
import time

from actors import keys
from actors.actor import Actor, RemoteError, UnexpectedReply, handles
from actors.codec import BROKER, Envelope
from actors.journal import DuplicateJob, Journal, JournalError, Restored
from actors.loader import loader_name
from actors.messages import (
    Accepted,
    BatchDone,
    BatchItem,
    BatchUpdate,
    CancelJob,
    ClusterEvent,
    ClusterEventKind,
    ClusterStatus,
    DeleteLora,
    Draining,
    Error,
    GetJob,
    GetLora,
    GetModels,
    GetResult,
    GetRunnerState,
    GetStatus,
    JobEvent,
    JobInfo,
    JobList,
    JobResult,
    ListJobs,
    ListLoras,
    LoaderState,
    LoraFile,
    LoraList,
    ModelInfo,
    Models,
    Ok,
    PeerDown,
    PeerUp,
    Preload,
    ReportStaged,
    Role,
    RunBatch,
    RunnerStatus,
    ShareLora,
    StopJob,
    Submit,
    TrainCheckpoint,
)
from actors.scheduler_events import EventsHandlers
from actors.scheduler_leases import LeaseHandlers
from actors.scheduler_operator import OperatorHandlers
from atelier.artifacts import StoreError, make_store
from atelier.config import Config, config_file
from atelier.jobs import (
    Artifact,
    ErrorCode,
    JobDone,
    JobFailed,
    JobInputs,
    JobKind,
    JobRecord,
    JobState,
    LoraInfo,
)
from atelier.runtime import Failure, process_main, process_parser
from atelier.scheduling import admission
from atelier.scheduling.policy import (
    Announce,
    Deliver,
    Dispatch,
    Effect,
    Job,
    Policy,
    PreloadModels,
    Refused,
    StopRunning,
    input_bytes,
)

log = logging.getLogger("atelier.scheduler")

REFRESH_S = 1.0  # how often queued jobs' positions and ETAs are brought up to date
RUNNER_STATE_TIMEOUT_S = 10.0  # a starting runner (importing torch) may take seconds to answer
PRUNE_S = 3600.0  # how often ended jobs older than journal_keep_days leave the journal
JOURNAL_OFF_LOOP_BYTES = 1 << 20  # inputs this big are written from a thread (1 MiB: ~20 ms)
DISPATCH_WATCH_S = 10.0  # a refusal of a RunBatch comes back within this (the broker's at once)
# ClusterStatus lists this many queued jobs, the first to start (an id is 16 bytes: a 100,000-deep queue would
# not fit in one message); queued_total says how many there are.
STATUS_QUEUED = 1000


class Scheduler(LeaseHandlers, OperatorHandlers, EventsHandlers, Actor):
    role = Role.scheduler

    def __init__(self, config: Config, router: str, *, name: str = "scheduler", clock=time.time, **kwargs):
        super().__init__(name, router, heartbeat_s=config.broker.heartbeat_s, **kwargs)
        self.config = config
        self.policy = Policy(config)
        self.store = make_store(config)
        self._store_failing_since: dict[str, float] = {}  # batch id -> first failed store of its outputs
        self._swept: set[str] = set()  # URIs retention deleted since start: GetJob says so without a read
        self._store_stats = {"store_errors": 0, "store_failing": False, "store_error": None, "store_swept": 0}
        self.clock = clock
        self.loaders: dict[str, LoaderState] = {}  # by node, for status
        self._wake: asyncio.TimerHandle | None = None
        self._sending = asyncio.Lock()  # effects go out in the order the policy decided them
        self.journal = Journal(config.journal_path)
        for lora in self.journal.loras():  # before the jobs: a queued job may use one
            self.policy.loras.put(lora)
        self._restore()
        self._restore_controls()
        self._start_events()

    def _restore(self) -> None:
        """Takes back what the journal holds: the last ended jobs, to answer for them, then every job
        that had not ended, queued again in the order it was submitted. Row by row: a row that cannot
        be read is quarantined, a job that can no longer run fails with the reason, and the scheduler
        comes up whatever the journal holds."""
        now = self.clock()
        self._prune(now)
        for kept in self.journal.finished(self.config.scheduler.remember_finished):
            self._restore_one(kept, now)
        restored = [job for kept in self.journal.each_unfinished()
                    if (job := self._restore_one(kept, now)) is not None]
        failed = [job for job in restored if job.state is JobState.failed]
        for job in failed:
            log.warning("journal: job %s cannot run any more: %s", job.id, job.reason)
        if len(restored) > len(failed):
            log.info("journal %s: %d jobs that had not ended are queued again", self.journal.path,
                     len(restored) - len(failed))
        if restored:
            # Written now: their new state (queued, no runner; or failed) must not wait for the first event.
            self.journal.update(job.record(now) for job in restored)

    def _restore_one(self, kept: Restored, now: float) -> Job | None:
        try:
            job = self.policy.restore(kept.record, kept.client, None if kept.record.state.terminal else kept.inputs,
                                      kept.idempotency_key, now, unusable=kept.unusable)
        except Exception as exc:  # a record this version cannot take back in any form: out of the way
            self.journal.quarantine(kept.record.spec.id, f"it could not be restored: {type(exc).__name__}: {exc}")
            return None
        self.policy.spill_inputs(job.id)  # one job's inputs in memory at a time, however long the queue
        return job

    async def on_start(self) -> None:
        self._tasks.spawn(self._refresh_loop(), "refresh")
        self._tasks.spawn(self._prune_loop(), "prune")
        if self.config.store.max_age_days is not None or self.config.store.max_bytes is not None:
            self._tasks.spawn(self._sweep_loop(), "sweep")

    async def on_stop(self) -> None:
        await super().on_stop()
        self.journal.close()

    # -- peers --------------------------------------------------------------- #

    @handles(PeerUp)
    async def on_peer_up(self, msg: PeerUp, env: Envelope) -> None:
        if env.src != BROKER:  # only the broker knows who joined (it also refuses to route these)
            return
        await self._operator_peer_up(msg)
        if msg.role is Role.loader:
            await self.send(msg.name, ReportStaged())  # what it said before this scheduler was here is lost
        elif msg.role is Role.runner:
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
        elif msg.role is Role.frontend:
            await self.holder_gone(msg.name)

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
        if self.policy.find(msg.job.id) is None:
            earlier = self._journaled(msg, env.src)  # a job long ended, forgotten from memory
            if earlier is not None:
                return earlier
        if msg.inputs is not None:
            try:
                # Every pixel, off the loop (the mailbox waits: one image decodes at a time).
                await asyncio.to_thread(admission.check_images, msg.inputs, self.config)
            except Refused as refused:
                return _error(refused)
        known = self.policy.find(msg.job.id)
        try:
            # Held, not queued, until written: nothing plans or announces a job a crash could lose.
            job = self.policy.submit(msg.job, env.src, now, msg.inputs, idempotency_key=key, hold=True)
        except Refused as refused:
            return _error(refused)
        if job is not known and job.id == msg.job.id:
            try:
                # Committed before the answer: a scheduler killed right after it still has the job.
                await self._journal_add(job.record(now), env.src, key, msg.inputs)
            except DuplicateJob as exc:
                self.policy.withdraw(job.id)
                return Error(code=ErrorCode.conflict, field="id", message=f"{exc}; submit without an id for a new one")
            except sqlite3.Error as exc:
                # Not written, not accepted: taking a job that a restart would lose breaks the promise.
                self.policy.withdraw(job.id)
                log.error("journal: cannot write job %s: %s", job.id, exc)
                return Error(code=ErrorCode.internal, message=f"the scheduler cannot record jobs right now ({exc})")
            self.policy.admit(job.id, now)
            self.policy.spill_inputs(job.id)  # the journal has them; read back at dispatch
        await self._schedule()
        return Accepted(job=job.record(now))

    async def _journal_add(self, record: JobRecord, client: str, key: str | None, inputs: JobInputs | None) -> None:
        """Writes a new job; large inputs off the event loop (32 MiB take most of a second to write,
        which would stall every other message and heartbeat)."""
        if input_bytes(inputs) >= JOURNAL_OFF_LOOP_BYTES:
            await asyncio.to_thread(self.journal.add, record, client, key, inputs)
        else:
            self.journal.add(record, client, key, inputs)

    def _journaled(self, msg: Submit, client: str) -> Accepted | Error | None:
        """A submit of a job the policy has forgotten but the journal has: the same user's retry gets it
        back (by its idempotency key, or its id from the same frontend); anyone else's id is refused,
        saying nothing of that job."""
        spec, key = msg.job, msg.idempotency_key
        if key is not None and self.policy.by_key(spec.user, key) is None:
            earlier = self.journal.by_key(spec.user, key)
            if earlier is not None:
                return Accepted(job=earlier)
        submitter = self.journal.submitter(spec.id)
        if submitter is None:
            return None
        earlier = self.journal.get(spec.id) if submitter == (spec.user, client) else None
        if earlier is not None:
            return Accepted(job=earlier)
        return Error(code=ErrorCode.conflict, field="id",
                     message=f"job id {spec.id!r} is taken; submit without an id for a new one")

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
            return JobInfo(job=self._mark_swept(earlier)) if earlier is not None else _error(refused)
        return JobInfo(job=self._mark_swept(job.record(self.clock())))

    def _mark_swept(self, record: JobRecord) -> JobRecord:
        """A done job whose outputs retention deleted (since this scheduler started) says so."""
        gone = sum(uri in self._swept for uri in record.artifacts)
        if not gone or record.state is not JobState.done or record.reason is not None:
            return record
        return record.model_copy(update={"reason": _swept_reason(gone, len(record.artifacts))})

    @handles(GetResult)
    async def on_get_result(self, msg: GetResult, env: Envelope) -> JobResult | JobInfo | Error:
        job = self.policy.find(msg.job_id)
        if job is not None and job.live:
            return JobInfo(job=job.record(self.clock()))
        record = job.record(self.clock()) if job is not None else self.journal.get(msg.job_id)
        if record is None:
            return Error(code=ErrorCode.unknown_job, field="job_id", message=f"no job {msg.job_id!r} in the journal")
        described = self.journal.outputs(msg.job_id)
        try:
            outputs = await asyncio.to_thread(self._read_outputs, described)
        except OSError as exc:
            return Error(code=ErrorCode.internal, message=f"the artifact store cannot be read now: {_public(exc)}")
        if len(outputs) < len(described) and record.state is JobState.done and record.reason is None:
            # Not a failure: the job ran; its outputs were deleted since (retention, or by hand).
            record = record.model_copy(update={"reason": _swept_reason(len(described) - len(outputs),
                                                                         len(described))})
        return JobResult(job=record, outputs=outputs)

    def _read_outputs(self, described: list[dict]) -> list[Artifact]:
        """The artifacts of a done job, read back from the store; one deleted since is left out. Raises
        OSError (StoreError) where the store itself fails."""
        outputs = []
        for meta in described:
            data = self.store.read(meta.get("uri") or "")
            if data is not None:
                outputs.append(Artifact(**meta, data=data))
        return outputs

    @handles(GetStatus)
    async def on_status(self, msg: GetStatus, env: Envelope) -> ClusterStatus:
        status = self.policy.status(STATUS_QUEUED)
        runners = [RunnerStatus(name=r.name, job=r.job, capabilities=r.capabilities) for r in status.runners]
        return ClusterStatus(runners=runners, loaders=list(self.loaders.values()), counts=status.counts,
                             queued=status.queued, queued_total=status.queued_total,
                             stats=status.stats.model_copy(update={**self._store_stats, **self.webhooks.stats()}),
                             leases=[lease for lease in self.policy.leases.listing() if lease.state != "ended"])

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
                                   user_loras=self._lora_names(msg.user, name) if msg.user else [],
                                   ip_adapter=entry.ip_adapter is not None))
        return Models(models=infos)

    # -- trained LoRAs ------------------------------------------------------- #

    def _lora_names(self, user: str, model: str) -> list[str]:
        """How ``user``'s jobs name the LoRAs they may use on ``model``: their own by name, others' as @owner/name."""
        return [lora.name if lora.owner == user else f"@{lora.owner}/{lora.name}"
                for lora in self.policy.loras.usable_by(user, model)]

    @handles(ListLoras)
    async def on_list_loras(self, msg: ListLoras, env: Envelope) -> LoraList:
        return LoraList(loras=self.policy.loras.usable_by(msg.user))

    @handles(DeleteLora)
    async def on_delete_lora(self, msg: DeleteLora, env: Envelope) -> LoraList | Error:
        if self.policy.loras.get(msg.user, msg.name) is None:
            return Error(code=ErrorCode.unknown_model, field="name", message=f"{msg.user} has no LoRA {msg.name!r}")
        uris = self.journal.delete_lora(msg.user, msg.name)
        self.policy.loras.remove(msg.user, msg.name)
        await asyncio.to_thread(self.store.delete, uris)
        log.info("LoRA %s of %s deleted", msg.name, msg.user)
        return LoraList(loras=self.policy.loras.usable_by(msg.user))

    @handles(ShareLora)
    async def on_share_lora(self, msg: ShareLora, env: Envelope) -> LoraList | Error:
        lora = self.policy.loras.get(msg.user, msg.name)
        if lora is None:
            return Error(code=ErrorCode.unknown_model, field="name", message=f"{msg.user} has no LoRA {msg.name!r}")
        shared = lora.model_copy(update={"shared_with": sorted(set(msg.users) - {msg.user})})
        self.journal.share_lora(shared)
        self.policy.loras.put(shared)
        return LoraList(loras=self.policy.loras.usable_by(msg.user))

    @handles(GetLora)
    async def on_get_lora(self, msg: GetLora, env: Envelope) -> LoraFile | Error:
        lora = self.policy.loras.by_ref(msg.ref)
        uri = self.journal.lora_uri(lora.owner, lora.name) if lora is not None else None
        data = await asyncio.to_thread(self.store.read, uri) if uri else None
        if data is None:
            return Error(code=ErrorCode.unknown_model, field="loras",
                         message=f"LoRA {msg.ref} was deleted or trained again since the job was submitted")
        return LoraFile(ref=msg.ref, data=data)

    @handles(TrainCheckpoint)
    async def on_train_checkpoint(self, msg: TrainCheckpoint, env: Envelope) -> Ok | Error:
        job = self.policy.find(msg.job_id)
        if job is None or job.runner != env.src:
            return Error(code=ErrorCode.forbidden, message=f"job {msg.job_id} is not {env.src[:128]}'s")
        try:
            uri = await asyncio.to_thread(self.store.put, f"checkpoints/{msg.job_id}/{msg.step:08d}.safetensors",
                                          bytes(msg.data), "application/octet-stream")
        except OSError as exc:  # the training goes on; a crash now resumes from the checkpoint before
            log.error("artifacts: cannot store checkpoint %d of job %s: %s", msg.step, msg.job_id, exc)
            return Error(code=ErrorCode.internal, message=f"the checkpoint could not be stored: {_public(exc)}")
        replaced = self.policy.checkpointed(env.src, msg.job_id, uri, msg.step)
        if replaced != uri:
            self._write_now(job)  # a crash from here on resumes from this step
        if replaced is not None:
            await asyncio.to_thread(self.store.delete, [replaced])
        return Ok()

    def _write_now(self, job) -> None:
        try:
            self.journal.update([job.record(self.clock())])
        except sqlite3.Error:
            log.exception("journal: cannot write job %s's checkpoint", job.id)

    def _store_lora(self, spec, outputs: list[Artifact]) -> tuple[Artifact, ...]:
        """A finished training's LoRA files (diffusers format, then kohya) into the store, under its owner's
        name, kept for good (no retention applies); the outputs with their URIs. Off the event loop."""
        version = _lora_version(spec.id)
        kept = []
        for artifact, suffix in zip(outputs, ("", ".kohya"), strict=False):
            uri = self.store.put(f"loras/{_key_part(spec.user)}/{spec.train.name}-{version}{suffix}.safetensors",
                                 bytes(artifact.data), artifact.media_type)
            kept.append(artifact.model_copy(update={"uri": uri}))
        return tuple(kept)

    async def _register_lora(self, spec, kept: tuple[Artifact, ...]) -> None:
        """Makes a stored LoRA usable by name in its owner's jobs from now on, replacing one of that name."""
        lora = LoraInfo(name=spec.train.name, owner=spec.user, model=spec.model, version=_lora_version(spec.id),
                        job_id=spec.id,
                        created_at=self.clock(), bytes=len(kept[0].data))
        try:
            replaced = self.journal.put_lora(lora, kept[0].uri, kept[1].uri if len(kept) > 1 else None)
        except sqlite3.Error:
            log.exception("journal: cannot record LoRA %s of %s", lora.name, lora.owner)
            return
        self.policy.loras.put(lora)
        await asyncio.to_thread(self.store.delete, replaced)
        log.info("LoRA %s of %s trained on %s (job %s)", lora.name, lora.owner, lora.model, spec.id)

    # -- runners ------------------------------------------------------------- #

    @handles(Draining)
    async def on_draining(self, msg: Draining, env: Envelope) -> None:
        self.policy.runner_draining(env.src)

    @handles(BatchUpdate)
    async def on_batch_update(self, msg: BatchUpdate, env: Envelope) -> None:
        self.policy.batch_update(env.src, msg.batch_id, msg.state, self.clock())
        await self._apply()

    @handles(BatchDone)
    async def on_batch_done(self, msg: BatchDone, env: Envelope) -> Ok | Error:
        # The outputs are stored before any job is settled. A store that fails (a full disk, S3 down)
        # loses nothing: the answer is an internal error, so the runner keeps the outcomes and reports
        # them again (with backoff); only after [store] patience_s of failures do the batch's jobs fail
        # with the reason, so no job is left running for ever on a batch that no longer exists.
        live = {o.job_id for o in msg.outcomes if (job := self.policy.find(o.job_id)) is not None and job.live}
        outcomes, failed, problem = await asyncio.to_thread(self._store, msg.outcomes, live)
        now = self.clock()
        if failed:
            first = self._store_failing_since.setdefault(msg.batch_id, now)
            if now - first < self.config.store.patience_s:
                return Error(code=ErrorCode.internal, message=f"the artifact store failed ({problem}): the "
                                                              "outputs are kept; report the batch again")
            log.error("artifacts: batch %s could not be stored for %.0f s; its jobs fail", msg.batch_id, now - first)
            reason = f"its outputs could not be stored: {problem}"
            outcomes = [(JobFailed(job_id=o.job_id, reason=reason), None) if o.job_id in failed else (o, where)
                        for o, where in outcomes]
        self._store_failing_since.pop(msg.batch_id, None)
        done = self.policy.batch_done(env.src, msg.batch_id, [outcome for outcome, _ in outcomes], msg.resident,
                                      msg.timing, now, refused=msg.refused,
                                      active=(msg.active_batch, msg.active_jobs) if msg.active_batch else None)
        stored = {outcome.job_id: where for outcome, where in outcomes if where is not None}
        for job, outcome in done:
            uris, outputs = stored.get(outcome.job_id, ([], ()))
            if job.spec.kind is JobKind.train and outputs and job.live:
                await self._register_lora(job.spec, outputs)
            self.policy.complete(job, uris, outputs, now)
        await self._schedule()
        return Ok()  # the runner may forget the outcomes now

    def _store(self, outcomes: list[JobDone | JobFailed],
               live: set[str]) -> tuple[list[tuple[JobDone | JobFailed, tuple | None]], set[str], str | None]:
        """Writes the outputs of every done job of ``live`` (one trip to a thread per batch): each
        outcome with where its outputs went (None: not stored), the jobs whose outputs could not be
        stored, and why (public)."""
        stored: list[tuple[JobDone | JobFailed, tuple | None]] = []
        failed: set[str] = set()
        problem = None
        for outcome in outcomes:
            if not isinstance(outcome, JobDone) or outcome.job_id not in live:
                stored.append((outcome, None))  # the policy settles (or ignores) it as it is
                continue
            try:
                job = self.policy.find(outcome.job_id)
                if job is not None and job.spec.kind is JobKind.train:
                    kept = self._store_lora(job.spec, outcome.outputs)
                    stored.append((outcome, ([a.uri for a in kept], kept)))
                    continue
                uris = self.store.put_all(outcome.job_id, outcome.outputs)
            except OSError as exc:
                log.error("artifacts: cannot store the outputs of job %s: %s", outcome.job_id, exc)
                problem = _public(exc)
                self._store_stats.update(store_errors=self._store_stats["store_errors"] + 1, store_failing=True,
                                         store_error=problem)
                failed.add(outcome.job_id)
                stored.append((outcome, None))
                continue
            self._store_stats.update(store_failing=False, store_error=None)
            outputs = tuple(artifact.model_copy(update={"uri": uri})
                            for artifact, uri in zip(outcome.outputs, uris, strict=True))
            stored.append((outcome, (uris, outputs)))
        return stored, failed, problem

    # -- effects ------------------------------------------------------------- #

    async def _schedule(self) -> None:
        self.policy.schedule(self.clock())
        self._arm_wake()
        await self._apply()
        await self._tell_drained()

    async def _apply(self) -> None:
        """Carries out what the policy decided, in the order it decided it."""
        async with self._sending:
            await self._carry_out(self.policy.drain())
            await self.carry_out_leases()

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
                if effect.job.checkpoint:  # a training that ended: nothing resumes from it now
                    uri, effect.job.checkpoint = effect.job.checkpoint, None
                    self._tasks.spawn(asyncio.to_thread(self.store.delete, [uri]), "drop-checkpoint")
            elif isinstance(effect, Dispatch):
                # Inputs come off the disk now, not held in memory while the job waited.
                items = [BatchItem(job=spec, attempt=attempt,
                                   inputs=inputs if inputs is not None else self._inputs(spec.id),
                                   checkpoint=await self._checkpoint(checkpoint) if checkpoint else None)
                         for spec, attempt, inputs, checkpoint in effect.items]
                await self._send_batch(effect.batch.runner, RunBatch(batch_id=effect.batch.id, items=items))
            elif isinstance(effect, StopRunning):
                await self.send(effect.runner, StopJob(job_id=effect.job_id, reason=effect.reason, pause=effect.pause))
            elif isinstance(effect, PreloadModels):
                await self.send(loader_name(effect.node), Preload(models=list(effect.models)))
        await self._note_activity()

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

    async def _checkpoint(self, uri: str) -> bytes | None:
        """A training's checkpoint, to resume from; None where it is gone (it starts over, and says so)."""
        data = await asyncio.to_thread(self.store.read, uri)
        if data is None:
            log.warning("artifacts: checkpoint %s is gone; its training starts from step 0", uri)
        return data

    def _inputs(self, job_id: str) -> JobInputs | None:
        try:
            return self.journal.inputs(job_id)
        except sqlite3.Error:  # its runner fails it as missing an input, which names the cause
            log.exception("journal: cannot read the inputs of job %s", job_id)
            return None

    async def _send_batch(self, runner: str, msg: RunBatch) -> None:
        """Told, not asked (the runner's answer is its BatchDone, minutes later), but watched for a
        refusal on the way: the broker's (too large, the runner's queue full, gone) or the runner's
        (undecodable). Either comes back correlated to this message, and means the runner never got
        the batch: without this the runner would count as busy with it for ever."""

        def refused(future: asyncio.Future) -> None:
            if not future.cancelled() and isinstance(future.result(), Error):
                self._tasks.spawn(self._dispatch_refused(runner, msg.batch_id, future.result()), "refused")

        (await self.send_watched(runner, msg, DISPATCH_WATCH_S)).add_done_callback(refused)

    async def _dispatch_refused(self, runner: str, batch_id: str, error: Error) -> None:
        log.warning("batch %s did not reach %s (%s: %s); its jobs go back to the queue", batch_id, runner,
                    error.code.value, error.message)
        unreachable = error.code in (ErrorCode.unroutable, ErrorCode.busy)
        self.policy.dispatch_refused(runner, batch_id, f"{error.code.value}: {error.message}", self.clock(),
                                     unreachable=unreachable)
        await self._schedule()

    async def tell_cluster(self, event: ClusterEventKind, **detail: str | int | float | bool | None) -> None:
        """Publishes a cluster event (``cluster/<event>``) for other programs on the box, and hands it to
        the configured webhooks."""
        message = ClusterEvent(event=event, at=self.clock(), detail=detail)
        await self.publish(message)
        self._hand_to_webhooks(message)

    async def _announce(self, r: JobRecord) -> None:
        await self.publish(JobEvent(job_id=r.spec.id, state=r.state, reason=r.reason, position=r.position,
                                    eta_s=r.eta_s, runner=r.runner, attempt=r.attempts, batch_id=r.batch_id))

    def _arm_wake(self) -> None:
        """batch_wait_s: be back when a waiting batch's time is up."""
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        wake_at = min((t for t in (self.policy.wake_at, self.policy.leases.wake_at) if t is not None), default=None)
        if wake_at is not None:
            delay = max(0.0, wake_at - self.clock())
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
                uris = self._prune(self.clock(), delete=False)
                await asyncio.to_thread(self.store.delete, uris)
            except (sqlite3.Error, OSError):
                log.exception("journal: pruning ended jobs failed")

    async def _sweep_loop(self) -> None:
        """Retention ([store] max_age_days, max_bytes): the store deletes old outputs, off the event loop;
        their jobs stay in the journal, and GetResult says their outputs were deleted."""
        while True:
            await asyncio.sleep(self.config.store.sweep_every_s)
            try:
                swept = await asyncio.to_thread(self.store.sweep, self.clock())
            except OSError as exc:
                log.error("artifacts: the retention sweep failed: %s", exc)
                continue
            if swept:
                self._store_stats["store_swept"] += len(swept)
                if len(self._swept) > 1_000_000:  # bounded: GetResult still finds out by reading
                    self._swept.clear()
                self._swept.update(swept)
                log.info("artifacts: retention deleted %d outputs", len(swept))

    def _prune(self, now: float, *, delete: bool = True) -> list[str]:
        """Forgets jobs ended more than journal_keep_days ago; their artifacts go with them (deleted
        here unless ``delete`` is off: then the caller deletes the URIs returned)."""
        before = now - self.config.scheduler.journal_keep_days * 86400
        # A training's outputs are its owner's LoRA, which stays until they delete it.
        uris = [uri for uri in self.journal.artifacts_before(before) if "/loras/" not in uri]
        self.journal.prune(before)
        if delete:
            try:
                self.store.delete(uris)
            except OSError as exc:  # the scheduler comes up regardless; the next sweep or prune tries others
                log.error("artifacts: %d outputs of pruned jobs could not be deleted: %s", len(uris), exc)
        return uris


def _lora_version(job_id: str) -> str:
    """The version of the LoRA a training makes: one per training job (its retries make the same one)."""
    return hashlib.sha256(job_id.encode()).hexdigest()[:16]


def _key_part(user: str) -> str:
    """A user's name as one part of a store key, which takes letters, digits and ._- only: readable, and
    made unique by a digest of the name itself (it may hold anything: "discord:123", "a/b")."""
    readable = re.sub(r"[^A-Za-z0-9._-]", "-", user)[:80]
    return f"u{readable}-{hashlib.sha256(user.encode()).hexdigest()[:8]}"


def _swept_reason(gone: int, of: int) -> str:
    return f"{gone} of its {of} outputs were deleted by the artifact store's retention"


def _public(exc: OSError) -> str:
    """What went wrong, fit for a user: a StoreError's message is; a bare OSError says only its kind
    (the log has the path)."""
    if isinstance(exc, StoreError):
        return exc.strerror or str(exc)
    return exc.strerror or type(exc).__name__


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
    scheduler.config_path = config_file(args.config)  # what an operator's catalog reload reads
    await scheduler.run(stop)


def main(argv: list[str] | None = None) -> int:
    parser = process_parser("atelier scheduler", "Run the atelier scheduler.")
    parser.add_argument("--journal", help="the job journal's file, in place of the config's")
    return process_main(parser, serve, argv, log_name="scheduler")


if __name__ == "__main__":
    raise SystemExit(main())
