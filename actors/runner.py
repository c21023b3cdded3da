"""A runner (one per GPU, or one on the CPU): keeps models resident and runs batches of jobs.

The scheduler sends a batch: jobs that share one pipeline call. Pipelines run in one worker
thread so the event loop stays free to heartbeat, publish progress and hear a cancel. Every
step publishes, for each job of the batch, ``Progress`` and a ``Preview`` (a linear
latent-to-RGB projection of its first image, or its model's ``preview_decoder``'s picture; JPEG,
at most 256 px). Any exception inside a batch fails its jobs with the reason; the runner goes on.
A job whose input images do not decode fails alone: the rest of its batch runs without it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import itertools
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from actors import catalog, keys, training_run
from actors.actor import Actor, RemoteError, handles
from actors.codec import SCHEDULER, Envelope
from actors.loader import loader_name
from actors.messages import (
    BatchDone,
    BatchItem,
    BatchUpdate,
    CatalogUpdate,
    Draining,
    Error,
    GetLora,
    GetRunnerState,
    Ok,
    Preview,
    Progress,
    Release,
    Role,
    RunBatch,
    RunnerState,
    Stage,
    Staged,
    StopJob,
)
from actors.runner_leases import MemoryHandlers
from atelier import media, sources, staging
from atelier.config import Config
from atelier.families import GenerateRequest, JobCancelled, get_family, loras
from atelier.families.loaded import LoadedModel, LoadRequest
from atelier.gang import GangBroken
from atelier.jobs import Artifact, Capabilities, ErrorCode, JobDone, JobFailed, JobSpec, JobState, RunTiming
from atelier.preview import encode_jpeg, use_one_cpu_thread
from atelier.public import scrub
from atelier.registry import FAMILY_LIMITS
from atelier.resident import DeviceBudgetError, ResidentSet
from atelier.runtime import process_main, process_parser
from atelier.vram import DeviceMemory, cuda_probe

log = logging.getLogger("atelier.runner")

STAGE_TIMEOUT_S = 600.0  # generating or reading a big checkpoint takes a while
STAGE_POLL_S = 5.0
PREVIEW_INTERVAL_S = 0.1  # a job's previews come at most this often: more is motion no one sees
PREVIEW_CPU_SHARE = 0.2  # of one core, at most, for making previews (a TAESD decode on a CPU: 0.1-0.6 s)
REPORT_PATIENCE_S = 3600.0  # keep a finished result this long while the scheduler is away
STUCK_EXIT = 75  # the exit status of a runner its watchdog ended (EX_TEMPFAIL: start it again)
GANG_PING_S = 5.0  # a gang's rank 0 silent this long asks its other ranks to answer (they time out waiting)
# More time the watchdog gives the first step of a batch on a compiled model: torch.compile compiles in it
# (again for each new size), and a max-autotune compile of a large transformer can outlast step_timeout_s.
COMPILE_GRACE_S = 1800.0
# Device memory kept free beyond an incoming model's weights when room is made for it: what the budget
# does not count (cuBLAS and cuDNN workspaces, the load's own buffers, the first activations).
DEVICE_RESERVE = 1 << 30
# Allocation failures that are out-of-memory under other names: cuBLAS and cuDNN creating handles or workspaces.
_OOM_WORDS = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
              "cudaErrorMemoryAllocation", "CUDA error: out of memory")


@dataclass
class ActiveBatch:
    id: str
    items: list[BatchItem]
    # Jobs stopped by the scheduler, with the reason: their images are dropped. When every job
    # is stopped (or the runner shuts down) ``cancel`` is set and the call ends at its next step.
    stopped: dict[str, str] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    shutting_down: str | None = None
    paused: str | None = None  # a training asked to make way for waiting jobs: why
    started: float = field(default_factory=time.monotonic)
    # When its pipeline last showed life (it started running, or finished a step); None while loading.
    progress_at: float | None = None
    stepped: bool = False  # a step has finished
    first_step_grace: float = 0.0  # more quiet allowed before the first step (a compile)

    def quiet_allowed(self, timeout: float) -> float:
        """How long this batch's pipeline may show no life before the watchdog calls it stuck."""
        return timeout if self.stepped else timeout + self.first_step_grace

    @property
    def specs(self) -> list[JobSpec]:
        return [item.job for item in self.items]

    def stop(self, job_id: str, reason: str) -> None:
        if any(spec.id == job_id for spec in self.specs):
            self.stopped[job_id] = reason
            if len(self.stopped) == len(self.items):
                self.cancel.set()

    def pause(self, job_id: str, reason: str) -> None:
        """The batch hands itself back at its next step, no attempt counted: a training checkpoints first; a
        generation's jobs are queued again (seeded: the next run makes the same images)."""
        if any(spec.id == job_id for spec in self.specs):
            self.paused = reason
            self.cancel.set()


@dataclass
class BatchTiming:
    """What a batch costs, measured as it runs (the load and each step write here): the wire's
    RunTiming is frozen, so the report is made from this once the batch has ended."""

    images: int
    loaded_from: Literal["resident", "staged", "disk"] = "resident"
    stage_wait_s: float = 0.0
    load_s: float = 0.0
    steps: int = 0
    step_s: float | None = None

    def report(self) -> RunTiming:
        return RunTiming(**asdict(self))


class ShrunkBudget(Exception):
    """A model that fits the configured budget but not the one left by leases or other processes."""


class LocalEngine:
    """What the worker thread does with the models of a runner on one device: all of it here, in this process.

    The one seam between a runner and where its pipelines run: a gang's rank 0 has a ``GangLeader``
    (actors/gang_rank.py) in its place, which tells the gang's other ranks each of these first, does it
    here the same way, and has every rank agree on the outcome. Called on the worker thread."""

    def __init__(self, device: str):
        self.devices = [device]  # the node's device names it occupies, in rank order

    @property
    def world(self) -> int:
        return len(self.devices)

    def load(self, model: str, family: Any, request: LoadRequest, staged: Staged, owner: str) -> tuple[Any, bool]:
        """``family.load`` of ``request`` over the staged weights: (the model, whether it came from staged memory)."""
        return load_staged(family, request, staged, owner)

    def generate(self, model: str, loaded: LoadedModel, items: list[BatchItem], request: GenerateRequest,
                 on_step: Any) -> list[Any]:
        """The pipeline call of ``request`` (made from ``items``): one output per image, in order."""
        return loaded.generate(request, on_step)

    def step(self, cancel: bool) -> bool:
        """At each step: whether the call stops here (``cancel``: this process wants it to)."""
        return cancel

    def drop(self, models: list[str]) -> None:
        """The runner let these models go (its ResidentSet held the only reference here)."""

    def ping(self, quiet_s: float) -> None:
        """Nothing to keep in step."""

    def close(self) -> None:
        """The runner stops."""


class Runner(MemoryHandlers, Actor):
    role = Role.runner

    def __init__(self, config: Config, router: str, *, node: str, device: str = "cpu", torch_device: str | None = None,
                 engine: Any = None, probe: Any = None, **kwargs):
        """``device`` names the runner (its name, logs, capabilities: the node's ``cuda:N``, or a gang's
        ``cuda:0+cuda:1``); ``torch_device`` is that device as this process's torch sees it (``cuda:0`` once
        ``own_gpu`` has hidden the others). ``engine``: where the pipelines run (a ``LocalEngine`` by default;
        a gang's ``GangLeader``). ``probe``: the device's free memory (``atelier.vram.Probe``; on CUDA by default
        ``mem_get_info``, on the CPU none: the budget's accounting alone)."""
        super().__init__(runner_name(node, device), router, heartbeat_s=config.broker.heartbeat_s, **kwargs)
        self.config = config
        self.node = node
        self.device = device
        self.torch_device = torch_device or device
        self.engine = engine or LocalEngine(device)
        self.models = ResidentSet(config.node.device_budget_bytes or default_device_budget(self.torch_device),
                                  config.node.resident_models, device=device)
        cuda = self.torch_device.startswith("cuda")
        self.memory = DeviceMemory(self.models.budget, reserve=DEVICE_RESERVE if cuda else 0)
        self.probe = probe if probe is not None else cuda_probe(self.torch_device) if cuda else None
        self._evicted_bytes: dict[str, int] = {}
        self.active: ActiveBatch | None = None
        self._execution: asyncio.Task | None = None
        self._draining = False
        self._stale: set[str] = set()  # models whose catalog entry changed: their resident copy goes once idle
        # Each thread that runs CUDA work selects the device first: a thread's current device is 0 otherwise,
        # and the first CUDA call there (a pin, say) would open a context on GPU 0.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-worker",
                                          initializer=use_device, initargs=(self.torch_device,))
        self.previews = PreviewMaker(self.publish_threadsafe, self.torch_device)
        self.device_name = _device_name(self.torch_device)  # once: on a GPU it needs torch and CUDA
        if self.engine.world > 1:  # a gang's speed is its own: "2x NVIDIA H100 80GB HBM3"
            self.device_name = f"{self.engine.world}x {self.device_name}"

    def capabilities(self) -> Capabilities:
        mine = dict(node=self.node, device=self.device, device_name=self.device_name, families=sorted(FAMILY_LIMITS),
                    resident=dict(self.resident_bytes), devices=list(self.engine.devices), gang=self.engine.world,
                    **self.memory_capabilities())
        if self.active is not None:
            mine.update(active_batch=self.active.id, active_jobs=[spec.id for spec in self.active.specs])
        return super().capabilities().model_copy(update=mine)

    async def on_start(self) -> None:
        # Import torch and diffusers now, in the worker, so the first job does not pay for it
        # and the event loop never blocks on an import.
        default = self.config.models.get(self.config.default_model)
        if default is not None:
            self._worker.submit(get_family, default.family)
        if self.config.node.step_timeout_s:
            self._tasks.spawn(self._watchdog(self.config.node.step_timeout_s), "watchdog")
        if self.engine.world > 1:
            self._tasks.spawn(self._keep_gang_in_step(GANG_PING_S), "gang-ping")
        self._tasks.spawn(self._watch_memory(), "memory")

    async def _keep_gang_in_step(self, every: float) -> None:
        """Asks the gang's other ranks to answer when rank 0 has told them nothing for ``every`` seconds
        (idle, or staging a model): they wait for its next command in a collective, which times out after
        a while, and a dead peer shows here rather than in the next job. On the worker, between the
        batches' commands."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            if self._draining:
                continue
            try:
                await loop.run_in_executor(self._worker, self.engine.ping, every)
            except GangBroken as exc:
                if self.active is None:  # else that batch's next command fails too, and hands its jobs back
                    self._exit_broken(str(exc))

    def _exit_broken(self, why: str) -> None:
        """Ends this process when its gang is out of step; the node starts the whole gang again."""
        log.error("%s: %s: the gang must start again", self.name, why)
        logging.shutdown()
        os._exit(STUCK_EXIT)

    async def _watchdog(self, timeout: float) -> None:
        """Ends this process when the batch in hand makes no step for ``timeout`` seconds (its first step,
        on a compiled model, ``COMPILE_GRACE_S`` more: the compile runs in it). A stuck
        pipeline call cannot be interrupted from Python (the worker thread is in it), so the
        runner hands the jobs back (each counts an attempt: one that always hangs fails in the end)
        and exits; its node starts a fresh one."""
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            batch = self.active
            if batch is None or batch.progress_at is None:
                continue
            quiet = time.monotonic() - batch.progress_at
            if quiet <= batch.quiet_allowed(timeout):
                continue
            reason = f"no progress for {quiet:.0f}s (a stuck step): {self.name} was restarted"
            log.error("%s: watchdog: batch %s %s", self.name, batch.id, reason)
            outcomes = [self._stopped_outcome(batch, spec) if spec.id in batch.stopped else
                        JobFailed(job_id=spec.id, reason=reason, retryable=True) for spec in batch.specs]
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._report(SCHEDULER, BatchDone(
                    batch_id=batch.id, outcomes=outcomes, resident={})), timeout=10)
            logging.shutdown()
            os._exit(STUCK_EXIT)

    # -- handlers -------------------------------------------------------------- #

    @handles(RunBatch)
    async def on_run(self, msg: RunBatch, env: Envelope) -> Error | None:
        if env.src != SCHEDULER:
            return self._not_from_scheduler(env)
        refusal = None
        if self._draining:
            refusal = f"{self.name} is shutting down"
        elif self.active is not None:
            # The scheduler thought we were free (it restarted, say): hand the jobs straight back, and
            # say what we are busy with, so that it waits for that rather than running it again.
            refusal = f"{self.name} is busy with batch {self.active.id}"
        if refusal is not None:
            outcomes = [JobFailed(job_id=item.job.id, retryable=True, reason=refusal) for item in msg.items]
            busy = self.active if not self._draining else None
            refused = BatchDone(batch_id=msg.batch_id, outcomes=outcomes, resident=self.resident_bytes, refused=True,
                                active_batch=busy.id if busy else None,
                                active_jobs=[spec.id for spec in busy.specs] if busy else [])
            self._tasks.spawn(self._report(env.src, refused), "refuse")
            return None
        self.active = ActiveBatch(msg.batch_id, list(msg.items))
        self._execution = self._tasks.spawn(self._execute(self.active, env.src), f"batch-{msg.batch_id}")
        return None

    def _not_from_scheduler(self, env: Envelope) -> Error:
        # Work and stops come through the scheduler alone: anyone else would skip admission and the
        # fair share, or stop other people's jobs.
        log.warning("%s: refused %s from %r: only the scheduler sends it", self.name, env.msg.kind, env.src[:128])
        return Error(code=ErrorCode.forbidden, message=f"{self.name} takes {env.msg.kind} only from the scheduler")

    @handles(CatalogUpdate)
    async def on_catalog(self, msg: CatalogUpdate, env: Envelope) -> Error | None:
        if env.src != SCHEDULER:
            return self._not_from_scheduler(env)
        self._stale.update(catalog.take(self.config, msg))
        if self.active is None:
            self._drop_stale()
        return None

    def _drop_stale(self) -> None:
        """Evicts the resident copies of models whose catalog entry changed (between batches only)."""
        gone = [model for model in sorted(self._stale) if self.models.discard(model)]
        self._stale.clear()
        if gone:
            self._dropped(gone, "(its catalog entry changed or was removed)")
            self._free_memory()

    @handles(GetRunnerState)
    async def on_get_state(self, msg: GetRunnerState, env: Envelope) -> RunnerState:
        return RunnerState(capabilities=self.capabilities())

    @handles(StopJob)
    async def on_stop_job(self, msg: StopJob, env: Envelope) -> Ok | Error:
        if env.src != SCHEDULER:
            return self._not_from_scheduler(env)
        if self.active is not None:
            if msg.pause:
                self.active.pause(msg.job_id, msg.reason)
            else:
                self.active.stop(msg.job_id, msg.reason)
        return Ok()

    async def drain(self) -> None:
        # First tell the scheduler to send nothing more, then stop the batch in hand at its next
        # step; the scheduler requeues its jobs. Both travel the same path, so they arrive in order.
        self._draining = True
        with contextlib.suppress(Exception):
            await self.send(SCHEDULER, Draining())
        if self.active is not None:
            self.active.shutting_down = f"{self.name} is shutting down"
            self.active.cancel.set()
        if self._execution is not None:
            await self._execution  # includes handing the outcomes to the scheduler
        if self.engine.world > 1:  # the other ranks end with rank 0 (a stuck worker: the node stops them)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self._worker, self.engine.close), 5)
        self._worker.shutdown(wait=False)

    # -- a batch ------------------------------------------------------------------ #

    async def _execute(self, batch: ActiveBatch, scheduler: str) -> None:
        specs = batch.specs
        first = specs[0]
        timing = BatchTiming(images=sum(spec.count for spec in specs))
        out_of_memory = False  # its memory is freed once the exception, and its frames, are gone
        broken = None  # a gang out of step: this process ends once the jobs are handed back
        refused = False  # handed back unstarted: no attempt counts
        try:
            self._drop_stale()  # a model reloaded since the last batch is loaded anew
            model = self.models.get(first.model)
            if model is None:
                await self.send(scheduler, BatchUpdate(batch_id=batch.id, state=JobState.loading))
                model = await self._load(first.model, timing)
            await self.send(scheduler, BatchUpdate(batch_id=batch.id, state=JobState.running))
            if first.train is not None:
                outcomes = [await training_run.run_training(self, batch, model)]
            else:
                outcomes = await self._generate(batch, model, timing)
        except JobCancelled:
            outcomes = [self._stopped_outcome(batch, spec) for spec in specs]
        except ShrunkBudget as exc:  # not the jobs' doing: they wait for the memory (or go elsewhere)
            log.info("%s: batch %s handed back: %s", self.name, batch.id, exc)
            outcomes = [JobFailed(job_id=spec.id, reason=str(exc), retryable=True) for spec in specs]
            refused = True
        except Exception as exc:
            reason, retryable = self._explain(exc)
            # str(exc): a record kept by a handler must not keep the exception, and its frames, alive.
            log.warning("batch %s failed: %s: %s", batch.id, type(exc).__name__, str(exc), exc_info=not retryable)
            outcomes = [JobFailed(job_id=spec.id, reason=reason, retryable=retryable) for spec in specs]
            out_of_memory = _is_cuda_oom(exc)
            broken = str(exc) if isinstance(exc, GangBroken) else None
        finally:
            self.active = None  # free for the next batch while the report travels
            self._drop_stale()  # a model reloaded while this batch ran: the resident reported is the truth
        if out_of_memory:
            await self._free_memory_unheld()
        if self.config.node.resident_models == 0 and broken is None:
            self._unload_all()
        if self.models.used > self.memory.budget and broken is None:  # the budget shrank during the batch
            await self._fit_budget(f"to fit a budget of {self.memory.budget:,} bytes", need=0)
        await self._report(scheduler, BatchDone(batch_id=batch.id, outcomes=outcomes,
                                                resident={} if broken else self.resident_bytes,
                                                timing=timing.report(), refused=refused))
        if broken is not None:
            self._exit_broken(broken)

    async def _generate(self, batch: ActiveBatch, model: LoadedModel, timing: BatchTiming) -> list[JobDone | JobFailed]:
        """The batch's pipeline call on the resident ``model``: each job's outcome, in order."""
        specs = batch.specs
        first = specs[0]
        loop = asyncio.get_running_loop()
        if self.config.models[first.model].compile:
            batch.first_step_grace = COMPILE_GRACE_S
        await self._add_user_loras(model, first.loras)
        batch.progress_at = time.monotonic()

        def work() -> tuple[dict[str, list[Artifact]], dict[str, str]]:
            # One trip to the worker per batch, not one per stage: each trip costs two thread
            # wake-ups, which is most of a short job's cost. Decoding the input images and
            # encoding the outputs are CPU work too: here, off the event loop.
            decoded, refused = decode_inputs(batch.items, self.config.input_pixel_budget)
            for spec in specs:
                problem = None if spec.id in refused else model.unreadable([spec.prompt, spec.negative_prompt])
                if problem is not None:
                    refused[spec.id] = problem
            runnable = [item for item in batch.items if item.job.id not in refused]
            outputs: dict[str, list[Artifact]] = {}
            if not runnable:
                return outputs, refused
            reporter = self._step_reporter(batch, [item.job for item in runnable], model.previewer, timing)
            items = self.engine.generate(first.model, model, runnable, batch_request(runnable, decoded), reporter)
            start = 0
            for spec in (item.job for item in runnable):
                mine = items[start:start + spec.count]
                start += spec.count
                outputs[spec.id] = [] if spec.id in batch.stopped else \
                    [media.encode(item, spec, spec.seed + i) for i, item in enumerate(mine)]
            return outputs, refused

        per_job, refused = await loop.run_in_executor(self._worker, work)
        outcomes: list[JobDone | JobFailed] = []
        for spec in specs:
            if spec.id in batch.stopped:
                outcomes.append(JobFailed(job_id=spec.id, reason=batch.stopped[spec.id], cancelled=True))
            elif spec.id in refused:  # its own input or prompt: another attempt reads it no better
                outcomes.append(JobFailed(job_id=spec.id, reason=refused[spec.id]))
            else:
                outcomes.append(JobDone(job_id=spec.id, outputs=per_job[spec.id],
                                        elapsed_s=time.monotonic() - batch.started))
        return outcomes

    async def _add_user_loras(self, model: LoadedModel, chosen: dict[str, float]) -> None:
        """Loads into the resident model the users' trained LoRAs a batch chooses ("@<version>") that it
        does not hold yet, their files asked of the scheduler: the base model stays as it is."""
        for ref in chosen:
            if not ref.startswith("@") or ref in model.loras:
                continue
            if self.engine.world > 1:  # the other ranks would run the call without it
                raise sources.ModelSourceError(f"a trained LoRA runs on a single device, not on the gang {self.device} "
                                               "(yet): submit it for a model without parallel")
            try:
                found = await self.ask(SCHEDULER, GetLora(ref=ref), timeout=60.0)
            except RemoteError as exc:
                raise sources.ModelSourceError(exc.error.message) from None
            await asyncio.get_running_loop().run_in_executor(self._worker, loras.add_user_lora, model, ref, found.data)

    @staticmethod
    def _stopped_outcome(batch: ActiveBatch, spec: JobSpec) -> JobFailed:
        if spec.id in batch.stopped:
            return JobFailed(job_id=spec.id, reason=batch.stopped[spec.id], cancelled=True)
        if batch.paused and batch.shutting_down is None:  # made way (a VRAM lease): queued again, nothing lost
            return JobFailed(job_id=spec.id, reason=f"paused: {batch.paused}", retryable=True, yielded=True)
        # Stopped because the runner is going away: the job itself is fine, another runner takes it.
        return JobFailed(job_id=spec.id, reason=batch.shutting_down or "stopped", retryable=True)

    async def _report(self, scheduler: str, outcome: BatchDone) -> None:
        """Delivers a batch's outcomes until the scheduler acknowledges them: a result is never
        dropped because the broker or the scheduler was restarting at that moment."""
        delay = 0.2
        deadline = time.monotonic() + REPORT_PATIENCE_S
        while True:
            try:
                await self.ask(scheduler, outcome, timeout=10.0)
                return
            except RemoteError as exc:
                # Unroutable: restarting. Busy: its queue is full. Internal: it failed to take them
                # (a store error, say) and may not next time. Anything else is a refusal of these
                # very outcomes, which sending them again would not change.
                if exc.error.code not in (ErrorCode.unroutable, ErrorCode.busy, ErrorCode.internal):
                    log.error("the scheduler refused the outcome of batch %s: %s", outcome.batch_id, exc)
                    return
                problem = str(exc)
            except asyncio.TimeoutError:
                problem = "no answer"
            if time.monotonic() > deadline:
                log.error("gave up reporting batch %s to %s: %s", outcome.batch_id, scheduler, problem)
                return
            log.warning("could not report batch %s yet (%s); retrying in %.1fs", outcome.batch_id, problem, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _step_reporter(self, batch: ActiveBatch, specs: list[JobSpec], previewer, timing: BatchTiming):
        """The per-step callback of the pipeline call that makes ``specs`` (the batch's jobs whose
        inputs decoded); it runs in the worker thread, between denoising steps."""
        started = time.monotonic()
        self.previews.drop_others({spec.id for spec in specs})  # an ended job's preview is of no use
        # Where each job's first image sits in the batch: its preview is of that one.
        first_image = [0, *itertools.accumulate(spec.count for spec in specs)][:-1]
        last_preview = -PREVIEW_INTERVAL_S

        def on_step(step: int, total: int, latents) -> None:
            nonlocal last_preview
            if self.engine.step(batch.cancel.is_set()):  # a gang's ranks all stop at this step
                raise JobCancelled(batch.shutting_down or "cancelled")
            now = time.monotonic()
            batch.progress_at, batch.stepped = now, True
            per_step = (now - started) / step
            timing.steps, timing.step_s = step, per_step
            if now - last_preview < PREVIEW_INTERVAL_S and step < total:
                latents = None  # too soon after the last one (the last step always shows)
            else:
                last_preview = now
            for spec, index in zip(specs, first_image, strict=True):
                if spec.id in batch.stopped:
                    continue  # its owner has moved on: no more of its progress
                self.publish_threadsafe(Progress(job_id=spec.id, step=step, total=total,
                                                 elapsed_s=now - batch.started, eta_s=per_step * (total - step)))
                if latents is not None and spec.previews:
                    # Only a copy of this image's latents here; the picture is made on the preview thread.
                    self.previews.offer(spec.id, step, previewer, latents[index].detach().clone())

        return on_step

    async def _load(self, model: str, timing: BatchTiming) -> LoadedModel:
        entry = self.config.models[model]
        asked = time.monotonic()
        staged = await self._stage(model)
        timing.stage_wait_s = time.monotonic() - asked
        request = LoadRequest.for_entry(entry, Path(staged.path) if staged.path else None,
                                        device=self.torch_device, model_cache=self.config.model_cache)

        def load() -> LoadedModel:
            family = get_family(entry.family)  # the first call imports torch: keep it off the loop
            started = time.monotonic()
            loaded, from_staged = self.engine.load(model, family, request, staged, self.name)
            timing.loaded_from = "staged" if from_staged else "disk"
            timing.load_s = time.monotonic() - started
            log.info("%s: loaded %s from %s in %.2fs%s", self.name, model,
                     "staged memory" if from_staged else "disk", timing.load_s, self._memory_note())
            return loaded

        def run_load() -> asyncio.Future[LoadedModel]:
            return asyncio.get_running_loop().run_in_executor(self._worker, load)

        # Room first, by the staged size (the loaded size is close to it): two models that
        # cannot share the device must never be on it at once. On CUDA the device's free memory too:
        # the budget sees only weights, not contexts, workspaces, graph pools or other processes.
        # An offloaded model's whole size is in RAM, not on the device: its share is known once loaded.
        free = None
        if self.torch_device.startswith("cuda"):
            free = await asyncio.get_running_loop().run_in_executor(self._worker, self._device_free)
            await self.observe_before_load(free)
        incoming = 0 if entry.offload else staged.bytes
        if self.memory.full >= incoming > self.memory.budget:
            raise ShrunkBudget(f"model {model} needs {incoming:,} bytes on {self.device}, more than its budget of "
                               f"{self.memory.budget:,} while {self.memory.leased:,} are leased and "
                               f"{self.memory.pressure:,} taken by other processes; it waits for the memory")
        self._evicted(model, self.models.make_room(model, incoming, keep_slot=True, free=free, reserve=DEVICE_RESERVE))
        try:
            again = False
            try:
                loaded = await run_load()
            except Exception as exc:
                if not _is_cuda_oom(exc) or not len(self.models):
                    raise
                # The other models' memory is what this load lacked (the staged size undercounts it, the
                # loader may be down): all of them go, and the load is tried once more.
                log.warning("%s: out of memory loading %s: evicting every other model and trying again",
                            self.name, model)
                again = True
            if again:
                evicted = self.models.clear()
                self._dropped(evicted, f"to make room for {model}")
                await self._free_memory_unheld()
                loaded = await run_load()
        finally:
            if staged.segment:
                await self.send(loader_name(self.node), Release(model=model))
        self._evicted(model, self.models.add(model, loaded, loaded.device_bytes()))
        return loaded

    def _memory_note(self) -> str:
        """The device memory torch holds after a load, for the log (the budget counts only weights)."""
        if not self.torch_device.startswith("cuda"):
            return ""
        import torch

        return (f" ({torch.cuda.memory_allocated(self.torch_device) / 2**30:.2f} GiB allocated, "
                f"{torch.cuda.memory_reserved(self.torch_device) / 2**30:.2f} GiB reserved on {self.device})")

    @property
    def resident_bytes(self) -> dict[str, int]:
        return self.models.bytes

    def _evicted(self, model: str, names: list[str]) -> None:
        self._dropped(names, f"to make room for {model}")
        if names:
            self._free_memory()

    def _dropped(self, names: list[str], why: str) -> None:
        for name in names:
            log.info("%s: evicted %s %s", self.name, name, why)
        if names and self.engine.world > 1:  # the gang's other ranks let them go too, before the next command
            self._worker.submit(self._gang_drop, names)
        compiled = {name for name, entry in self.config.models.items() if entry.compile}
        if compiled.intersection(names) and not compiled.intersection(self.models.bytes):
            # torch.compile's code and CUDA-graph pools are the process's, not the model's: an evicted
            # compiled model leaves them behind, outside the budget. Reset only when no compiled model
            # stays resident (a resident one's graphs would be freed under it). On the worker, after
            # whatever it is doing: the compiled calls run there.
            self._worker.submit(reset_compiled)

    def _gang_drop(self, names: list[str]) -> None:
        try:
            self.engine.drop(names)
        except GangBroken as exc:  # the engine remembers: its next command fails, and the runner exits
            log.error("%s: could not drop %s on the gang's other ranks: %s", self.name, ", ".join(names), exc)

    async def _stage(self, model: str) -> Staged:
        """Asks the node's loader; if it is down, resolves the weights here (slower, but no job waits).

        The question is asked again every few seconds: a loader that died mid-stage never
        answers, and its restarted successor only hears a question asked after it came back.
        The loader answers repeats of one question from one staging.
        """
        deadline = time.monotonic() + STAGE_TIMEOUT_S
        while True:
            try:
                return await self.ask(loader_name(self.node), Stage(model=model), timeout=STAGE_POLL_S)
            except asyncio.TimeoutError:
                if time.monotonic() < deadline:
                    continue
                problem = f"no answer in {STAGE_TIMEOUT_S:.0f}s"
            except RemoteError as exc:
                if exc.error.code is not ErrorCode.unroutable:
                    raise sources.ModelSourceError(exc.error.message) from None
                problem = exc.error.message
            log.warning("%s: loader unavailable (%s); loading %s from disk", self.name, problem, model)
            entry = self.config.models[model]
            # On the worker: it is the one thread here that may import diffusers (lazily, not thread-safe).
            path = await asyncio.get_running_loop().run_in_executor(
                self._worker, functools.partial(sources.resolve, downloads=self.config.node.downloads), model,
                entry, self.config.model_cache)
            return Staged(model=model, path=str(path) if path else "", bytes=0)

    def _explain(self, exc: Exception) -> tuple[str, bool]:
        """A reason a person can act on, and whether another attempt may succeed."""
        if _is_cuda_oom(exc):
            evicted = self.models.keep_newest()
            self._dropped(evicted, "after running out of memory")  # _execute frees their memory past the except
            freed = bool(evicted)
            return scrub(f"out of GPU memory on {self.device}: {exc}; try a smaller size or count"), freed
        if isinstance(exc, (sources.ModelSourceError, DeviceBudgetError)):
            return scrub(str(exc)), False
        if isinstance(exc, GangBroken):  # not the job's doing: the restarted gang runs it again
            return scrub(f"{exc}: the gang {self.device} was restarted"), True
        return scrub(f"{type(exc).__name__}: {exc}"), False

    def _unload_all(self) -> None:
        """resident_models = 0: nothing stays loaded between batches."""
        evicted = self.models.clear()
        self._dropped(evicted, "(resident_models = 0)")
        if evicted:
            self._free_memory()

    async def _free_memory_unheld(self) -> None:
        """Frees memory after a failed call, once its exception is gone: its traceback's frames hold the
        call's activations (or half-uploaded modules), and while they live nothing of them can go back to
        the device. Past the except block is not enough: the task's wake-up that threw the exception into
        this coroutine holds it until the coroutine next yields, hence the sleep(0)."""
        await asyncio.sleep(0)
        self._free_memory()

    def _free_memory(self) -> None:
        gc.collect()
        if self.torch_device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _device_free(self) -> int | None:
        """Device memory a load may use now (the driver's free memory and what torch's cache holds unused),
        or None off CUDA. On the worker: the first CUDA call of a thread opens the device there."""
        if not self.torch_device.startswith("cuda"):
            return None
        import torch

        free, _ = torch.cuda.mem_get_info(self.torch_device)
        return free + torch.cuda.memory_reserved(self.torch_device) - torch.cuda.memory_allocated(self.torch_device)


def load_staged(family: Any, request: LoadRequest, staged: Staged, owner: str) -> tuple[LoadedModel, bool]:
    """``family.load`` of ``request`` over the weights ``staged`` in shared memory (each rank of a gang maps
    the same segment itself), or from the disk; (the model, whether it came from staged memory)."""
    weights, pinned = map_staged(staged, request.load_device, request.device, owner)
    try:
        loaded = family.load(replace(request, weights=weights))
    finally:
        if pinned is not None:
            # After the copies out of it have ended (a failed load may leave some in flight);
            # on the GPU now, and the loader's copy serves the next switch.
            staging.unpin(pinned, request.device)
    return loaded, weights is not None


def map_staged(staged: Staged, device: str, torch_device: str, owner: str) -> tuple[dict | None, Any]:
    """The staged weights as tensors over the shared segment (pinned on CUDA), or None: read the disk.
    A model kept on the CPU (offload) gets a private copy-on-write mapping: its weights live there.
    ``device``: where the pipeline is built; ``torch_device``: the runner's (for unpinning)."""
    if not staged.segment:
        return None, None
    cuda = device.startswith("cuda")
    try:
        mapping = staging.map_segment(Path(staged.segment), shared=cuda)
    except FileNotFoundError:
        log.warning("%s: segment of %s was evicted before we mapped it; reading the disk", owner, staged.model)
        return None, None
    # A cost-model stand-in holds no tensors: registering it would fault in its whole sparse file.
    stand_in = any(entry.name == staging.STAND_IN for entry in staged.files)
    pinned = _pin(mapping, owner) if cuda and not stand_in else None
    try:
        return staging.state_dicts(mapping, staged.files), pinned
    except BaseException:
        if pinned is not None:  # a damaged segment: never leave its pages registered
            staging.unpin(pinned, torch_device)
        raise


def _pin(mapping: Any, owner: str) -> Any:
    """The mapping page-locked for DMA, or None: a failed registration costs speed, not the load."""
    try:
        return staging.pin(mapping)
    except staging.StagingError as exc:
        log.warning("%s: %s; uploading from pageable memory", owner, exc)
        return None


class PreviewMaker:
    """Makes preview images on a thread of its own, so that denoising never waits for one.

    The step callback hands over a copy of an image's latents; this thread projects it to RGB (or
    decodes it with the model's preview decoder), encodes the JPEG and publishes it. A job keeps only
    its newest pending latents: when the denoising runs faster than previews can be made, the stale
    ones are skipped, not queued.
    """

    def __init__(self, publish: Any, device: str = "cpu"):
        self.publish = publish
        self.device = device
        self._pending: dict[str, tuple[int, Any, Any]] = {}  # job id -> (step, family, latents)
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="previews", daemon=True)
        self._thread.start()

    def offer(self, job_id: str, step: int, family: Any, latents: Any) -> None:
        with self._wake:
            self._pending[job_id] = (step, family, latents)
            self._wake.notify()

    def drop_others(self, job_ids: set[str]) -> None:
        """Forgets the pending previews of any other jobs (a slow decoder may be behind jobs that ended)."""
        with self._wake:
            self._pending = {job: work for job, work in self._pending.items() if job in job_ids}

    def _run(self) -> None:
        selected = False
        while True:
            with self._wake:
                while not self._pending:
                    self._wake.wait()
                work, self._pending = self._pending, {}
            use_one_cpu_thread()  # its torch work on one core: the denoiser keeps its own threads
            if not selected:  # here, not at start: torch is imported by the time latents arrive
                use_device(self.device)
                selected = True
            spent = time.thread_time()
            for job_id, (step, family, latents) in work.items():
                try:
                    rgb = family.preview(latents[None], 0)
                    self.publish(Preview(job_id=job_id, step=step, width=rgb.shape[1], height=rgb.shape[0],
                                         image=encode_jpeg(rgb)))
                except Exception:  # a preview is a nicety: its failure must not reach the job
                    log.exception("preview of %s at step %d failed", job_id, step)
            # The interval between a job's previews keeps cheap ones within their share of a core; after a
            # costly one (a TAESD on a CPU) the thread rests in proportion, newer latents replacing pending ones.
            spent = time.thread_time() - spent
            if spent > PREVIEW_CPU_SHARE * PREVIEW_INTERVAL_S:
                time.sleep(spent * (1 / PREVIEW_CPU_SHARE - 1))


def decode_inputs(items: list[BatchItem], max_pixels: int) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Each job's input images, decoded and at its size (by job id, then input name); and the jobs
    whose images do not decode, with the reason. Such a job fails alone: the others of its batch run
    without it (admission decoded every image already; this is for one that passed it some other way)."""
    decoded: dict[str, dict[str, Any]] = {}
    refused: dict[str, str] = {}
    for item in items:
        try:
            decoded[item.job.id] = {
                # An IP-Adapter's image is a prompt, not a canvas: its encoder crops and sizes it itself.
                name: _decode(data, item.job, name, mode, max_pixels, resize=name != "ip_adapter_image")
                for name, mode in _INPUT_MODES.items()
                if item.inputs is not None and (data := getattr(item.inputs, name))}
        except media.InputImageError as exc:
            refused[item.job.id] = str(exc)
    return decoded, refused


def batch_request(items: list[BatchItem], decoded: dict[str, dict[str, Any]]) -> GenerateRequest:
    """One pipeline call for a batch: every image in job order, each with its own prompt and seed,
    and, for a job that starts from an image, that image (and mask, and control image) at the job's
    size, from ``decoded`` (``decode_inputs``)."""
    specs = [item.job for item in items]
    first = specs[0]
    inputs: dict[str, list[Any]] = {name: [] for name in _INPUT_MODES}
    for spec in specs:
        for name, image in decoded.get(spec.id, {}).items():
            inputs[name] += [image] * spec.count  # one decoded image, the same object for each of the job's outputs
    return GenerateRequest(
        prompts=tuple(spec.prompt for spec in specs for _ in range(spec.count)),
        negative_prompts=tuple(spec.negative_prompt for spec in specs for _ in range(spec.count)),
        seeds=tuple(spec.seed + i for spec in specs for i in range(spec.count)),
        width=first.width, height=first.height, steps=first.steps, guidance=first.guidance, kind=first.kind.value,
        sampler=first.sampler, schedule=first.schedule,
        images=tuple(inputs["image"]), masks=tuple(inputs["mask"]), strength=first.strength, frames=first.frames,
        fps=first.fps, duration_s=first.duration_s, loras=tuple(first.loras.items()),
        controlnet=first.controlnet, control_images=tuple(inputs["control_image"]),
        controlnet_scale=1.0 if first.controlnet_scale is None else first.controlnet_scale,
        ip_adapter_images=tuple(inputs["ip_adapter_image"]),
        ip_adapter_scale=1.0 if first.ip_adapter_scale is None else first.ip_adapter_scale)


# A job's input images (JobInputs' fields) and the PIL mode each is decoded to.
_INPUT_MODES = {"image": "RGB", "mask": "L", "control_image": "RGB", "ip_adapter_image": "RGB"}


def _decode(data: Any, spec: JobSpec, name: str, mode: str, max_pixels: int, *, resize: bool = True) -> Any:
    from PIL import Image

    with media.open_input(data, name, max_pixels) as image:
        image = image.convert(mode)
    if resize and image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), Image.Resampling.LANCZOS)
    return image


def default_device_budget(device: str) -> int:
    """90% of a GPU's memory (activations need the rest); a quarter of the RAM on the CPU."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory * 0.9)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def runner_name(node: str, device: str) -> str:
    return f"runner-{node}-{device.replace(':', '')}"


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def _is_cuda_oom(exc: BaseException) -> bool:
    text = str(exc)
    return type(exc).__name__ == "OutOfMemoryError" or any(words in text for words in _OOM_WORDS)


def own_gpu(device: str, environ: dict[str, str] | os._Environ) -> str:
    """Makes ``device`` (the node's ``cuda:N``) the only GPU this process sees, before anything opens CUDA,
    and returns its name here (``cuda:0``). Without it every runner opened a context on GPU 0 (the current
    device of any thread that never chose one), whose own runner then ran out of memory. N counts the
    GPUs the node sees: the Nth entry of an inherited CUDA_VISIBLE_DEVICES, else physical GPU N (a child
    inherits CUDA_DEVICE_ORDER, so the order is the node's). A CPU stand-in device ``cpu:N`` is ``cpu`` to torch."""
    if not device.startswith("cuda"):
        return "cpu" if device.startswith("cpu:") else device
    index = int(device.partition(":")[2] or 0)
    inherited = environ.get("CUDA_VISIBLE_DEVICES")
    visible = [part.strip() for part in inherited.split(",")] if inherited is not None else None
    if visible is not None and index >= len(visible):
        raise ValueError(f"--device {device}: CUDA_VISIBLE_DEVICES={inherited!r} shows {len(visible)} GPU(s)")
    environ["CUDA_VISIBLE_DEVICES"] = visible[index] if visible is not None else str(index)
    return "cuda:0"


def use_device(device: str) -> None:
    """Selects ``device`` as this thread's current CUDA device (a thread starts on device 0)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(device))


def reset_compiled() -> None:
    """Forgets every torch.compile result and CUDA-graph pool of this process (torch._dynamo.reset)."""
    import torch

    torch._dynamo.reset()
    log.info("reset torch.compile's caches: no compiled model is resident")


async def serve(args: argparse.Namespace, config: Config, stop: asyncio.Event) -> None:
    engine = None
    if "+" in args.device:  # a gang's rank 0: the others are started beside it (actors/gang_rank.py)
        from actors import gang_rank

        torch_device, engine = await gang_rank.lead(config, args.device, world=args.world, port=args.port)
    else:
        # First, before torch opens CUDA; the runner keeps the node's name for the device in its name and logs.
        torch_device = own_gpu(args.device, os.environ)
    await Runner(config, args.router or config.broker.router, node=args.node, device=args.device,
                 torch_device=torch_device, engine=engine, keys=keys.for_peer(config)).run(stop)


def main(argv: list[str] | None = None) -> int:
    parser = process_parser("atelier runner", "Run one runner (one device, or rank 0 of a gang).")
    parser.add_argument("--node", default=socket.gethostname())
    parser.add_argument("--device", default="cpu", help="cuda:N, cpu; a gang's devices joined by +: cuda:0+cuda:1")
    parser.add_argument("--rank", type=int, default=0, choices=[0], help="a gang's rank: the runner is its rank 0")
    parser.add_argument("--world", type=int, help="a gang's: its number of ranks")
    parser.add_argument("--port", type=int, help="a gang's: the loopback port its process group forms on")
    code = process_main(parser, serve, argv, log_name=lambda args: runner_name(args.node, args.device),
                        loads_models=True)
    # The job in hand was handed back during the drain; what may still run in the worker is an
    # import or an abandoned pipeline call, and waiting for it (as interpreter exit would) only
    # delays the node's shutdown.
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
