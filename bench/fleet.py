"""The scheduler at fleet scale: the real scheduler process against a simulated fleet of runners.

What runs for real: the broker and the scheduler (policy, journal, artifact store), started as
``atelier up`` starts them (``atelier.topology.UP``'s argv, as their own processes), on a catalog of six
cost-model models (``atelier/families/costmodel.py``, ``bench/profiles/h100.toml``: SD 1.5, SDXL and FLUX
costs, two catalog entries each). What is simulated: the runners. A few host processes each run hundreds
of them in one asyncio loop, each its own ZeroMQ DEALER identity (``actors.actor.Actor``) registered with
the broker as a runner of node ``node000`` … ``node099``, speaking the wire messages of
``actors/messages.py`` through ``actors/codec.py`` as ``actors/runner.py`` does: Hello with its
capabilities, ``GetRunnerState``, and for each ``RunBatch`` a ``BatchUpdate`` (loading, when the model is
not resident: the profile's disk load, as a runner whose loader is away), ``BatchUpdate`` (running), the
cost model's time for the batch (its seconds per step by resolution and batch size, and the VAE decode,
times ``--time-scale``: slept, not computed, no torch), then ``BatchDone`` with a tiny PNG per image,
the resident models and the timing, sent until acknowledged. Progress and previews (which go to the
broker's XPUB and never reach the scheduler) are left out. Jobs come from 1,000 users through a raw
frontend actor (``Submit``/``Accepted``, ``JobResult``), many in flight at once.

Each fleet size (``--fleets``, default 8, 64, 256, 1000 runners on 100 nodes) gets a fresh broker and
scheduler; its runners register on an empty queue, then the queue is filled, deeper and deeper
(``--queues``, default 1,000, 10,000, 100,000 queued beyond what the runners hold; the deepest only for
the smallest and the largest fleet: a fill of 100,000 takes minutes here). In each cell:

- every runner but one (the *probe*) is busy: it holds its batch's BatchDone until the end (to the
  scheduler it is a batch running longer than expected);
- submit: ``--submit-jobs`` more pipelined submits: the scheduler's CPU per submit (from
  ``/proc/<pid>/stat``), and ``--rtt-jobs`` sequential submits for the round trip's p50;
- dispatch cycle: the probe is let go for ``--cycles`` cycles: it reports its batch done, the scheduler
  settles it (stores the outputs, journals, announces, delivers the results) and plans the next batch
  with every other runner busy and the queue deep, and the probe runs that batch. Its cost is the
  scheduler's CPU per cycle, and the wall time from the probe's BatchDone going out to its next
  RunBatch coming in (p50/p95; the runner's own clock, both ends in one process).
- both CPU figures are shown raw and *net*: less the scheduler's background CPU in that state (the
  once-a-second refresh of every queued job's position and ETA, heartbeats), measured for
  ``--idle-s`` seconds with nothing happening, times the measurement's length.
- the scheduler's RSS, at each depth.

Each fill has ``--fill-budget`` seconds and each measurement ``--measure-budget`` (the scheduler before
the runner index needed half a second per event at 1,000 runners): a cell whose fill runs out of time is
measured at the depth it reached, which the table shows (``reached``) and the growth uses. The first
fill of a fleet goes in with the queue paused (``PauseQueue``), and its resume starts the idle fleet in a
few plans; the measurements are all taken with the queue running.

Side by side: the raw limit, the round trip of a bare ask (``GetRunnerState``) from a frontend to a
simulated runner through the same broker, sequential (a dispatch cycle needs one such round trip at
the least: BatchDone in, RunBatch out); and the naive baseline, the same run of the largest fleet at the
second deepest queue with ``policy = "fifo"`` (arrival order, batches of consecutive jobs only).

Growth: for a cost c that grows from x0 to x1 (runners 8 → 1,000, or queued 1,000 → 100,000),
``growth = (c(x1) / c(x0)) / (log(x1) / log(x0))``: 1.0 grows exactly as the logarithm, below 1 slower,
above faster (linear growth from 8 to 1,000 runners is 125 / 2.3 = 54). Three are shown: the dispatch
cycle over the fleet (deepest queue), over the queue (largest fleet), and a submit over the queue
(largest fleet); ``growth`` in the RESULT line is the largest of them. Costs are net CPU.

No job may be lost or run twice: every job a runner ran is counted across all hosts (none twice), every
JobResult is counted (none twice, none for a job that did not run, none failed), and where the queue
is short enough for one ``GetStatus`` (≤ 20,000), the scheduler's count of jobs by state adds up to the
jobs accepted. ``--drain`` also lets every runner go at the end and waits for every job's result.

    python bench/fleet.py [--quick] [--fleets 8,64,256,1000] [--queues 1000,10000,100000] [--cycles 30]

``--quick`` (8 and 64 runners, 500 and 4,000 queued, 8 cycles; about 30 s) is what
tests/test_fleet_bench.py runs.

Last line: ``RESULT dispatch_ms_1000=… submit_us_100k=… growth=…``: the scheduler's net CPU ms per
dispatch cycle at the largest fleet and deepest queue, its net CPU µs per submit there, and the growth.
Figures are from a shared 2-core machine: every process of the run (and other work) shares its CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the atelier modules live at the root

import zmq.asyncio  # noqa: E402

from actors.actor import Actor, RemoteError, handles  # noqa: E402
from actors.codec import SCHEDULER, Envelope  # noqa: E402
from actors.messages import (  # noqa: E402
    BatchDone,
    BatchUpdate,
    CatalogUpdate,
    Error,
    GetRunnerState,
    GetStatus,
    JobResult,
    Ok,
    PauseQueue,
    ResumeQueue,
    Role,
    RunBatch,
    RunnerState,
    StopJob,
    Submit,
)
from actors.runner import runner_name  # noqa: E402
from atelier import topology  # noqa: E402
from atelier.families.costmodel import COSTS, CostModelPipeline, write_model  # noqa: E402
from atelier.jobs import Artifact, Capabilities, ErrorCode, JobDone, JobFailed, JobSpec, JobState, RunTiming  # noqa: E402
from atelier.registry import FAMILY_LIMITS  # noqa: E402
from atelier.runtime import READY_PREFIX, die_with_parent  # noqa: E402

log = logging.getLogger("bench.fleet")

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SEED = 19
USERS = 1000
NODES = 100
DEVICE_NAME = "NVIDIA H200 (simulated)"
DEVICE_BYTES = 150_000_000_000  # an H200's 141 GiB: room for every model of the catalog at once
RESIDENT_MODELS = 6  # every model of the catalog stays resident (see runner_specs)
# Six catalog entries over the profile's three models: (name, profile key, steps, share of the jobs).
MODELS = (("sd15", "sd15", 30, 0.30), ("dreamshaper", "sd15", 30, 0.15), ("sdxl", "sdxl", 30, 0.25),
          ("juggernaut-xl", "sdxl", 30, 0.10), ("flux-schnell", "flux", 4, 0.15), ("flux-dev", "flux", 28, 0.05))
STATUS_MAX_QUEUE = 20_000  # GetStatus lists every queued id: above this its answer is too large for one message
REPORT_TIMEOUT_S = 10.0  # as actors/runner.py's: a BatchDone not acknowledged in this long is sent again


# --------------------------------------------------------------------------- #
# the simulated runners (``--host``: one process of many)


def tiny_png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 150)).save(out, format="PNG")
    return out.getvalue()


@dataclass
class SimModel:
    pipe: CostModelPipeline  # seconds per step by resolution and batch size, decode, already scaled
    disk_load_s: float
    nbytes: int


def read_models(folder: Path, time_scale: float) -> dict[str, SimModel]:
    """Each catalog model's costs as the cost-model family reads them from its folder (``CostModelFamily.build``),
    times ``time_scale``."""
    models = {}
    for name, *_ in MODELS:
        costs = json.loads((folder / name / COSTS).read_text())
        scale = float(costs["time_scale"]) * time_scale
        step_s = {int(res) ** 2: [scale * t for t in row] for res, row in costs["step_s"].items()}
        pipe = CostModelPipeline(nbytes=int(costs["bytes"]), step_s=step_s, batches=list(costs["batches"]),
                                 decode_s=scale * float(costs.get("vae_decode_s", 0.0)),
                                 native_pixels=int(costs["native_resolution"]) ** 2)
        models[name] = SimModel(pipe, scale * float(costs["disk_load_s"]), int(costs["bytes"]))
    return models


class Host:
    """One process's share of the fleet, and what the bench asks of it."""

    def __init__(self, router: str, heartbeat_s: float, models: dict[str, SimModel]):
        self.router = router
        self.heartbeat_s = heartbeat_s
        self.models = models
        self.ctx = zmq.asyncio.Context()
        self.png = tiny_png()
        self.runners: list[SimRunner] = []
        self.release = asyncio.Event()  # set: the held runners report their batches
        self.probe_go = asyncio.Event()  # set: the probe cycles
        self.ran: Counter[str] = Counter()  # job id -> times a runner here ran it
        self.received = 0  # jobs handed to runners here
        self.gaps: list[float] = []  # the probe's: its BatchDone out -> its next RunBatch in, seconds
        self.refused = 0
        self.resent = 0


class SimRunner(Actor):
    role = Role.runner

    def __init__(self, host: Host, node: str, device: str, resident: list[str], probe: bool):
        super().__init__(runner_name(node, device), host.router, heartbeat_s=host.heartbeat_s, context=host.ctx)
        self.host, self.node, self.device, self.probe = host, node, device, probe
        self.resident = {model: host.models[model].nbytes for model in resident}  # oldest first
        self.active: RunBatch | None = None
        self.done_at: float | None = None  # when its last BatchDone went out

    def capabilities(self) -> Capabilities:
        mine = dict(node=self.node, device=self.device, device_name=DEVICE_NAME, families=sorted(FAMILY_LIMITS),
                    resident=dict(self.resident), devices=[self.device], gang=1, budget_bytes=DEVICE_BYTES,
                    full_budget_bytes=DEVICE_BYTES)
        if self.active is not None:
            mine.update(active_batch=self.active.batch_id, active_jobs=[item.job.id for item in self.active.items])
        return super().capabilities().model_copy(update=mine)

    @handles(RunBatch)
    async def on_run(self, msg: RunBatch, env: Envelope) -> Error | None:
        if env.src != SCHEDULER:
            return Error(code=ErrorCode.forbidden, message=f"{self.name} takes run_batch only from the scheduler")
        if self.active is not None:  # as actors/runner.py: hand it straight back, saying what it is busy with
            self.host.refused += 1
            refused = BatchDone(batch_id=msg.batch_id, resident=dict(self.resident), refused=True,
                                outcomes=[JobFailed(job_id=item.job.id, retryable=True,
                                                    reason=f"{self.name} is busy with batch {self.active.batch_id}")
                                          for item in msg.items],
                                active_batch=self.active.batch_id,
                                active_jobs=[item.job.id for item in self.active.items])
            self._tasks.spawn(self._report(refused), "refuse")
            return None
        if self.probe and self.done_at is not None:
            self.host.gaps.append(time.monotonic() - self.done_at)
        self.done_at = None
        self.active = msg
        self.host.received += len(msg.items)
        self._tasks.spawn(self._execute(msg), f"batch-{msg.batch_id}")
        return None

    @handles(GetRunnerState)
    async def on_get_state(self, msg: GetRunnerState, env: Envelope) -> RunnerState:
        return RunnerState(capabilities=self.capabilities())

    @handles(StopJob)
    async def on_stop_job(self, msg: StopJob, env: Envelope) -> Ok:
        return Ok()  # the bench cancels nothing: a stopped job would still run to its end here

    @handles(CatalogUpdate)
    async def on_catalog(self, msg: CatalogUpdate, env: Envelope) -> None:
        return None

    async def _execute(self, batch: RunBatch) -> None:
        first = batch.items[0].job
        model = self.host.models[first.model]
        images = sum(item.job.count for item in batch.items)
        timing = RunTiming(images=images)
        if first.model not in self.resident:
            await self.send(SCHEDULER, BatchUpdate(batch_id=batch.batch_id, state=JobState.loading))
            # No loader on these nodes: from the disk, as actors/runner.py does when its loader is away.
            await asyncio.sleep(model.disk_load_s)
            self.resident[first.model] = model.nbytes
            while len(self.resident) > RESIDENT_MODELS:
                self.resident.pop(next(iter(self.resident)))
            timing = RunTiming(images=images, loaded_from="disk", load_s=model.disk_load_s)
        else:
            self.resident[first.model] = self.resident.pop(first.model)  # the newest now
        await self.send(SCHEDULER, BatchUpdate(batch_id=batch.batch_id, state=JobState.running))
        started = time.monotonic()
        pixels = first.width * first.height
        per_step = model.pipe.seconds_per_step(pixels, images)
        await asyncio.sleep(per_step * first.steps + model.pipe.decode_s * images * pixels / model.pipe.native_pixels)
        await (self.host.probe_go if self.probe else self.host.release).wait()
        outcomes = []
        for item in batch.items:
            spec = item.job
            self.host.ran[spec.id] += 1
            outputs = [Artifact(media_type="image/png", data=self.host.png, width=spec.width, height=spec.height,
                                seed=spec.seed + i) for i in range(spec.count)]
            outcomes.append(JobDone(job_id=spec.id, outputs=outputs, elapsed_s=time.monotonic() - started))
        timing = timing.model_copy(update={"steps": first.steps, "step_s": per_step})
        self.active = None  # free for the next batch while the report travels, as actors/runner.py
        self.done_at = time.monotonic()
        await self._report(BatchDone(batch_id=batch.batch_id, outcomes=outcomes, resident=dict(self.resident),
                                     timing=timing))

    async def _report(self, outcome: BatchDone) -> None:
        """Until the scheduler acknowledges it, as actors/runner.py's ``_report``."""
        delay = 0.2
        while True:
            try:
                await self.ask(SCHEDULER, outcome, timeout=REPORT_TIMEOUT_S)
                return
            except RemoteError as exc:
                if exc.error.code not in (ErrorCode.unroutable, ErrorCode.busy, ErrorCode.internal):
                    log.error("the scheduler refused batch %s: %s", outcome.batch_id, exc)
                    return
            except asyncio.TimeoutError:
                pass
            self.host.resent += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def host_main(args: argparse.Namespace) -> int:
    host = Host(args.router, args.heartbeat, read_models(Path(args.models), args.time_scale))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(reply: dict) -> None:
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()

    while line := await reader.readline():
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "up":
            fresh = [SimRunner(host, r["node"], r["device"], r["resident"], r["probe"]) for r in cmd["runners"]]
            for i in range(0, len(fresh), 50):  # Hellos in waves: a real fleet does not join in one instant
                await asyncio.gather(*(runner.start(timeout=120) for runner in fresh[i:i + 50]))
            host.runners += fresh
            answer({"up": len(fresh)})
        elif op == "hold":
            for event, go in ((host.release, not cmd["held"]), (host.probe_go, cmd["probe"])):
                event.set() if go else event.clear()
            answer({})
        elif op == "stats":
            gaps, host.gaps = host.gaps, []
            answer({"gaps": gaps, "received": host.received, "ran": sum(host.ran.values()),
                    "busy": sum(r.active is not None for r in host.runners), "refused": host.refused,
                    "resent": host.resent})
        elif op == "ran":
            answer({"ran": dict(host.ran)})
        elif op == "stop":
            break
    for i in range(0, len(host.runners), 100):
        await asyncio.gather(*(runner.close(drain_timeout=1.0) for runner in host.runners[i:i + 100]))
    host.ctx.term()
    answer({"stopped": True})
    return 0


# --------------------------------------------------------------------------- #
# the bench's side: the system, the hosts, the frontend


class Frontend(Actor):
    """A frontend on the raw wire: submits many jobs at once and counts the results."""

    role = Role.frontend

    def __init__(self, router: str, heartbeat_s: float):
        super().__init__(f"client-fleet-{uuid.uuid4().hex[:8]}", router, heartbeat_s=heartbeat_s)
        self.results: Counter[str] = Counter()
        self.ended: Counter[str] = Counter()  # by final state
        self.accepted: set[str] = set()
        self.refusals: list[str] = []

    @handles(JobResult)
    async def on_result(self, msg: JobResult, env: Envelope) -> None:
        self.results[msg.job.spec.id] += 1
        self.ended[msg.job.state.value] += 1

    async def submit_one(self, spec: JobSpec, timeout: float) -> None:
        for attempt in range(3):  # a repeat from the same client with the same id gets the same job
            try:
                accepted = await self.ask(SCHEDULER, Submit(job=spec), timeout)
            except asyncio.TimeoutError:
                if attempt == 2:
                    raise
                continue
            except RemoteError as exc:
                self.refusals.append(str(exc))
                return
            self.accepted.add(accepted.job.spec.id)
            return

    async def submit_many(self, specs: list[JobSpec], window: int, timeout: float) -> None:
        gate = asyncio.Semaphore(window)

        async def one(spec: JobSpec) -> None:
            try:
                await self.submit_one(spec, timeout)
            finally:
                gate.release()

        tasks = []
        for spec in specs:
            await gate.acquire()
            tasks.append(asyncio.ensure_future(one(spec)))
        await asyncio.gather(*tasks)


class Jobs:
    """The trace: jobs of 1,000 users over the six models, seeded."""

    def __init__(self, folder: Path):
        self.rng = random.Random(SEED)
        self.count = 0
        self.sizes = {}
        profile = tomllib.loads((REPO / "bench" / "profiles" / "h100.toml").read_text())
        for name, key, steps, _ in MODELS:
            entry = profile["models"][key]
            native = int(entry["default_resolution"])
            other = next(int(r) for r in entry["step_s"] if int(r) != native)
            self.sizes[name] = (native, other, steps)

    def take(self, n: int) -> list[JobSpec]:
        names = [m[0] for m in MODELS]
        weights = [m[3] for m in MODELS]
        out = []
        for _ in range(n):
            model = self.rng.choices(names, weights)[0]
            native, other, steps = self.sizes[model]
            side = native if self.rng.random() < 0.75 else other
            out.append(JobSpec(id=uuid.UUID(int=self.rng.getrandbits(128)).hex, model=model,
                               prompt=f"fleet bench {self.count}", width=side, height=side, steps=steps,
                               count=2 if self.rng.random() < 0.1 else 1, seed=self.rng.randrange(2**31),
                               user=f"u{self.rng.randrange(USERS):04d}"))
            self.count += 1
        return out


def write_catalog(folder: Path) -> list[str]:
    profile = tomllib.loads((REPO / "bench" / "profiles" / "h100.toml").read_text())
    lines = []
    for name, key, steps, _ in MODELS:
        entry = profile["models"][key]
        path = write_model(folder / name, entry)
        native = int(entry["default_resolution"])
        lines += [f'[models."{name}"]', 'family = "costmodel"', f'source = "{path}"', f"default_width = {native}",
                  f"default_height = {native}", f"default_steps = {steps}", "max_batch = 8", ""]
    return lines


def write_config(path: Path, home: Path, catalog: list[str], *, policy: str, heartbeat_s: float,
                 plan_window: int) -> None:
    # The limits a 100,000-job queue from 1,000 users needs: max_queue (default 10,000) above the deepest
    # queue and what the runners hold; max_queued_per_user (default 1,000) well above the ~100 each user has.
    lines = [f'home = "{home}"', "builtin_models = false", f'default_model = "{MODELS[0][0]}"', "",
             "[broker]", f"heartbeat_s = {heartbeat_s}", "",
             "[scheduler]", f'policy = "{policy}"', "max_queue = 250_000", "max_queued_per_user = 2_000",
             f"plan_window = {plan_window}", "", *catalog]
    path.write_text("\n".join(lines) + "\n")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


class HostProc:
    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process

    async def ask(self, cmd: dict, timeout: float = 600.0) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"a runner host exited (status {await self.process.wait()}); see its log")
        return json.loads(line)


@dataclass
class Cell:
    runners: int
    queued: int
    submit_cpu_us: float = float("nan")  # raw, per submit
    submit_net_us: float = float("nan")
    submit_rtt_ms: float = float("nan")  # p50
    submits_per_s: float = float("nan")  # of the pipelined submits
    cycle_cpu_ms: float = float("nan")  # raw, per cycle
    cycle_net_ms: float = float("nan")
    cycle_p50_ms: float = float("nan")
    cycle_p95_ms: float = float("nan")
    cycles: int = 0
    background: float = float("nan")  # the scheduler's CPU share with nothing happening
    rss: int = 0
    starved: bool = False  # the probe got no next batch in time
    idle: int = 0  # runners with no batch after the fill, the queue deep
    fill_s: float = 0.0
    reached: int = 0  # the depth measured at (below ``queued`` where the fill ran out of time)


@dataclass
class Run:
    policy: str
    cells: list[Cell] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    raw_rtt_ms: float = float("nan")
    fill_s: float = 0.0
    resent: int = 0
    refused: int = 0


class Fleet:
    """One broker and one scheduler, as ``atelier up`` starts them, and the hosts of the simulated runners."""

    def __init__(self, tmp: Path, models: Path, catalog: list[str], args: argparse.Namespace, policy: str):
        self.tmp, self.models, self.args = tmp, models, args
        tmp.mkdir(parents=True, exist_ok=True)
        self.config = tmp / "atelier.toml"
        write_config(self.config, tmp / "home", catalog, policy=policy, heartbeat_s=args.heartbeat,
                     plan_window=args.plan_window)
        self.procs: list[subprocess.Popen] = []
        self.hosts: list[HostProc] = []
        self.logs = []
        self.scheduler_pid = 0
        self.router = ""

    def _popen(self, argv: list[str], name: str, **kw) -> subprocess.Popen:
        log_file = open(self.tmp / f"{name}.log", "w")
        self.logs.append(log_file)
        process = subprocess.Popen(argv, cwd=REPO, stderr=log_file, preexec_fn=die_with_parent, **kw)
        self.procs.append(process)
        return process

    def start(self) -> None:
        parts = {part.name: part for part in topology.UP}
        place = topology.Place(router="tcp://127.0.0.1:0", pub="tcp://127.0.0.1:0", config_path=str(self.config),
                               log_level="WARNING")
        broker = self._popen(topology.specs(parts["broker"], place)[0].argv, "broker", stdout=subprocess.PIPE,
                             text=True)
        assert broker.stdout is not None
        line = broker.stdout.readline()  # the broker prints its ready line first, then nothing more
        if not line.startswith(READY_PREFIX):
            raise RuntimeError(f"the broker did not start: {(self.tmp / 'broker.log').read_text()[-2000:]}")
        parts["broker"].bound(place, json.loads(line[len(READY_PREFIX):]))
        self.router = place.router
        scheduler = self._popen(topology.specs(parts["scheduler"], place)[0].argv, "scheduler")
        self.scheduler_pid = scheduler.pid

    async def start_hosts(self, count: int) -> None:
        for i in range(count):
            log_file = open(self.tmp / f"host{i}.log", "w")
            self.logs.append(log_file)
            process = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), "--host", "--router", self.router,
                "--heartbeat", str(self.args.heartbeat), "--models", str(self.models),
                "--time-scale", str(self.args.time_scale), cwd=REPO, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log_file, preexec_fn=die_with_parent, limit=1 << 26)
            self.hosts.append(HostProc(process))

    async def all_hosts(self, cmd: dict, timeout: float = 600.0) -> list[dict]:
        return list(await asyncio.gather(*(host.ask(cmd, timeout) for host in self.hosts)))

    def cpu(self) -> float:
        return cpu_seconds(self.scheduler_pid)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.all_hosts({"op": "stop"}), 60)
        for host in self.hosts:
            with contextlib.suppress(ProcessLookupError):
                if host.process.returncode is None:
                    host.process.kill()
            await host.process.wait()
        for process in reversed(self.procs):  # the scheduler first, then the broker
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for log_file in self.logs:
            log_file.close()

    def log_tail(self, name: str, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "".join((self.tmp / f"{name}.log").read_text(errors="replace").splitlines(True)[-lines:])
        return ""


def runner_specs(count: int) -> list[dict]:
    """``count`` runners over NODES nodes (runner i: node i % 100, device i // 100); the probe is the last
    in name order (the plan breaks its last ties by name). Each holds all six models (86 GB of an H200's
    127 GB budget). With one or two each, the plan left runners idle with the queue deep: a job whose
    model an idle runner would have to load goes to a busy runner that holds it once that runner's batch
    is past its expected end, which the plan counts as free now (planner.plan's ``free_at``); and while
    any runner is idle, every event plans anew (no REPLAN_BUSY_S), ~0.5 s at 1,000 runners."""
    names = [m[0] for m in MODELS]
    return [{"node": f"node{i % NODES:03d}", "device": f"cuda:{i // NODES}", "probe": i == count - 1,
             "resident": names} for i in range(count)]


async def wait_for(predicate, timeout: float, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(every)
    return False


async def run_fleet(runners: int, queues: list[int], policy: str, tmp: Path, models: Path, catalog: list[str],
                    jobs: Jobs, args: argparse.Namespace, run: Run) -> None:
    began = time.monotonic()
    fleet = Fleet(tmp, models, catalog, args, policy)
    fleet.start()
    client = Frontend(fleet.router, args.heartbeat)
    try:
        await client.start()
        if not await wait_for(lambda: _answers(client), 60):
            raise RuntimeError(f"the scheduler did not answer: {fleet.log_tail('scheduler')}")
        await fleet.start_hosts(min(args.hosts, runners))
        specs = runner_specs(runners)
        probe_host = fleet.hosts[(runners - 1) % len(fleet.hosts)]
        await fleet.all_hosts({"op": "hold", "held": True, "probe": False})
        await asyncio.gather(*(host.ask({"op": "up", "runners": specs[i::len(fleet.hosts)]})
                               for i, host in enumerate(fleet.hosts)))
        if not await wait_for(lambda: _runners_known(client, runners), 120, every=0.5):
            raise RuntimeError(f"the scheduler does not list {runners} runners: {fleet.log_tail('scheduler')}")
        print(f"  {policy:>4} {runners:>5} runners: up and registered in {time.monotonic() - began:.1f} s", flush=True)
        if policy == "fair" and runners == max(args.fleets):
            run.raw_rtt_ms = await raw_round_trip(client, runner_name(specs[0]["node"], specs[0]["device"]),
                                                  args.rtt_jobs)
        timeout = args.submit_timeout

        async def depth() -> tuple[int, int]:
            stats = await fleet.all_hosts({"op": "stats"})
            received = sum(s["received"] for s in stats)
            return len(client.accepted) - received, sum(s["busy"] for s in stats)

        for queued in queues:
            cell = Cell(runners, queued)
            run.cells.append(cell)
            measured = min(args.submit_jobs, max(queued // 2, 100))
            target = queued - measured // 2 - args.rtt_jobs
            started = time.monotonic()

            async def all_busy() -> bool:
                return (await depth())[1] >= runners

            for attempt in range(3):  # the first fill also gives every runner its batch, out of the queue
                # The first fill of a fleet goes in with the queue paused (an operator's PauseQueue), and the
                # resume starts the whole fleet in a few plans: with runners idle, every submit plans anew,
                # and one plan costs ~0.4 s at 1,000 runners. Not later fills: while paused every event walks
                # the whole queue (Controls.explain), so a deep fill would be quadratic. The measurements
                # below are all taken with the queue running.
                paused = attempt == 0 and queued == queues[0]
                # Paused, the fill also holds what the idle runners will take at the resume (two jobs each, the
                # first batch size the plan tries before anything is measured), so that none stays idle after.
                goal = target + 2 * runners if paused else target
                if paused:
                    await client.ask(SCHEDULER, PauseQueue(), timeout=timeout)
                while (now_queued := (await depth())[0]) < goal:
                    if time.monotonic() - started > args.fill_budget:
                        break  # the scheduler is too slow to fill this deep in the time given: measured as it is
                    await client.submit_many(jobs.take(min(goal - now_queued, 5000)), args.window, timeout)
                if paused:
                    await client.ask(SCHEDULER, ResumeQueue(), timeout=timeout)
                await wait_for(all_busy, args.busy_timeout, every=0.5)
                if (await depth())[0] >= 0.98 * target or time.monotonic() - started > args.fill_budget:
                    break
            cell.idle = runners - (await depth())[1]  # runners the plan left idle with the queue this deep
            if cell.idle:
                print(f"  ({cell.idle} of {runners} runners idle after the fill)", flush=True)
            cell.fill_s = time.monotonic() - started
            cell.reached = (await depth())[0] + measured // 2 + args.rtt_jobs
            if cell.reached < 0.9 * queued:
                print(f"  (the fill reached {cell.reached:,} of {queued:,} queued in its {args.fill_budget:.0f} s)",
                      flush=True)
            run.fill_s += cell.fill_s
            await asyncio.sleep(args.settle_s)  # the journal and the announcements of the fill are behind it
            cell.background = await background(fleet, args.idle_s, args.long_window)
            before, t0 = fleet.cpu(), time.monotonic()
            sent = 0
            while sent < measured and time.monotonic() - t0 < args.measure_budget:
                chunk = min(measured - sent, max(50, args.window))
                await client.submit_many(jobs.take(chunk), args.window, timeout)
                sent += chunk
            spent, elapsed = fleet.cpu() - before, time.monotonic() - t0
            cell.submit_cpu_us = spent / sent * 1e6
            cell.submit_net_us = max(0.0, spent - cell.background * elapsed) / sent * 1e6
            cell.submits_per_s = sent / elapsed
            rtts = []
            t0 = time.monotonic()
            for spec in jobs.take(args.rtt_jobs):
                t = time.perf_counter()
                await client.submit_one(spec, timeout)
                rtts.append(time.perf_counter() - t)
                if time.monotonic() - t0 > args.measure_budget / 2 and len(rtts) >= 5:
                    break
            cell.submit_rtt_ms = statistics.median(rtts) * 1000
            cell.rss = rss_bytes(fleet.scheduler_pid)
            await asyncio.sleep(args.settle_s)
            await probe_cycles(fleet, probe_host, cell, args)
            if len(client.accepted) - sum(s["received"] for s in await fleet.all_hosts({"op": "stats"})) \
                    <= STATUS_MAX_QUEUE:
                await check_counts(client, run, f"{runners} runners, {queued:,} queued")
            print(f"  {policy:>4} {runners:>5} runners {queued:>7,} queued: {cell_line(cell)}", flush=True)
        stats = await fleet.all_hosts({"op": "stats"})
        run.resent += sum(s["resent"] for s in stats)
        run.refused += sum(s["refused"] for s in stats)
        if args.drain:
            await fleet.all_hosts({"op": "hold", "held": False, "probe": True})
            if not await wait_for(lambda: _all_ended(client), args.drain_timeout, every=0.5):
                run.problems.append(f"{runners} runners: {len(client.accepted) - len(client.results):,} jobs had no "
                                    f"result {args.drain_timeout:.0f} s after the runners were let go")
            await check_counts(client, run, f"{runners} runners, drained")
        await fleet.all_hosts({"op": "hold", "held": True, "probe": False})
        await asyncio.sleep(0.5)  # JobResults of batches reported just before are on their way
        ran: Counter[str] = Counter()
        for reply in await fleet.all_hosts({"op": "ran"}):
            ran.update(reply["ran"])
        check_ran(client, ran, run, runners)
    finally:
        await client.close()
        await fleet.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


async def _answers(client: Frontend) -> bool:
    with contextlib.suppress(RemoteError, asyncio.TimeoutError):
        await client.ask(SCHEDULER, GetStatus(), timeout=2.0)
        return True
    return False


async def _runners_known(client: Frontend, runners: int) -> bool:
    with contextlib.suppress(RemoteError, asyncio.TimeoutError):
        return len((await client.ask(SCHEDULER, GetStatus(), timeout=10.0)).runners) >= runners
    return False


async def _all_ended(client: Frontend) -> bool:
    return len(client.results) >= len(client.accepted)


async def background(fleet: Fleet, seconds: float, longer: float) -> float:
    """The scheduler's CPU share while nothing happens (its refresh loop, heartbeats); measured ``longer``
    where it is a good share, so that the window holds several rounds of the refresh."""
    before, t0 = fleet.cpu(), time.monotonic()
    await asyncio.sleep(seconds)
    if (fleet.cpu() - before) / (time.monotonic() - t0) > 0.1:
        await asyncio.sleep(max(0.0, longer - seconds))
    return (fleet.cpu() - before) / (time.monotonic() - t0)


async def probe_cycles(fleet: Fleet, probe_host: HostProc, cell: Cell, args: argparse.Namespace) -> None:
    """Lets the probe cycle ``--cycles`` times, every other runner busy and the queue deep."""
    await probe_host.ask({"op": "stats"})  # forget gaps from before
    gaps: list[float] = []
    before, t0 = fleet.cpu(), time.monotonic()
    await probe_host.ask({"op": "hold", "held": True, "probe": True})
    last_gap = t0
    # Where the refresh loop's CPU is a good share of the whole, over a window long enough to hold several of its
    # rounds (each takes most of a second at 100,000 queued): what is taken off as background is then about
    # what it really took.
    window = args.long_window if cell.background > 0.1 else 0.0

    def more() -> bool:
        elapsed = time.monotonic() - t0
        wanted = len(gaps) < args.cycles or elapsed < window
        return wanted and (elapsed < args.measure_budget or len(gaps) < 5)

    while more():
        await asyncio.sleep(0.05)
        fresh = (await probe_host.ask({"op": "stats"}))["gaps"]
        gaps += fresh
        now = time.monotonic()
        if fresh:
            last_gap = now
        elif now - last_gap > args.cycle_timeout:
            cell.starved = True  # no next batch for the probe in all that time
            break
    spent, elapsed = fleet.cpu() - before, time.monotonic() - t0
    await probe_host.ask({"op": "hold", "held": True, "probe": False})
    cell.cycles = len(gaps)
    if gaps:
        cell.cycle_cpu_ms = spent / len(gaps) * 1000
        cell.cycle_net_ms = max(0.0, spent - cell.background * elapsed) / len(gaps) * 1000
        cell.cycle_p50_ms = percentile(gaps, 0.5) * 1000
        cell.cycle_p95_ms = percentile(gaps, 0.95) * 1000


async def raw_round_trip(client: Frontend, runner: str, count: int) -> float:
    """p50 of a bare ask through the broker: the frontend to a simulated runner and back."""
    for _ in range(20):
        await client.ask(runner, GetRunnerState(), timeout=10.0)
    samples = []
    for _ in range(count):
        t = time.perf_counter()
        await client.ask(runner, GetRunnerState(), timeout=10.0)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000


async def check_counts(client: Frontend, run: Run, where: str) -> None:
    """The scheduler's jobs by state add up to the jobs accepted, and none failed."""
    status = await client.ask(SCHEDULER, GetStatus(), timeout=60.0)
    counts = status.counts
    finished = status.stats.finished  # since start: jobs the scheduler forgot from memory are counted here too
    held = sum(n for state, n in counts.items() if not JobState(state).terminal)
    ended = sum(finished.values())
    if held + ended != len(client.accepted):
        run.problems.append(f"{where}: the scheduler holds {held:,} live and ended {ended:,} jobs, "
                            f"but {len(client.accepted):,} were accepted")
    bad = {state: n for state, n in finished.items() if state != JobState.done.value}
    if bad:
        run.problems.append(f"{where}: jobs ended other than done: {bad}")
    run.checked.append(f"{where}: {held:,} live + {ended:,} ended = {len(client.accepted):,} accepted")


def check_ran(client: Frontend, ran: Counter[str], run: Run, runners: int) -> None:
    twice = [job for job, n in ran.items() if n > 1]
    results_twice = [job for job, n in client.results.items() if n > 1]
    unran = [job for job in client.results if job not in ran]
    where = f"{runners} runners"
    if twice:
        run.problems.append(f"{where}: {len(twice)} jobs ran more than once, e.g. {twice[:3]}")
    if results_twice:
        run.problems.append(f"{where}: {len(results_twice)} jobs had more than one JobResult")
    if unran:
        run.problems.append(f"{where}: {len(unran)} results for jobs no runner ran")
    failed = {state: n for state, n in client.ended.items() if state != JobState.done.value}
    if failed:
        run.problems.append(f"{where}: results other than done: {failed}")
    if client.refusals:
        run.problems.append(f"{where}: {len(client.refusals)} submits refused, e.g. {client.refusals[0]}")
    run.checked.append(f"{where}: {len(ran):,} jobs ran, none twice; {sum(client.results.values()):,} results, "
                       f"each once, of jobs that ran; {len(client.accepted):,} accepted, "
                       f"{len(client.refusals)} refused")


# --------------------------------------------------------------------------- #
# the report


def cell_line(c: Cell) -> str:
    starved = " PROBE STARVED" if c.starved else ""
    return (f"submit {c.submit_net_us:>7,.0f} us net ({c.submit_cpu_us:,.0f} raw, {c.submits_per_s:,.0f}/s, "
            f"rtt p50 {c.submit_rtt_ms:.2f} ms) | cycle {c.cycle_net_ms:>7.2f} ms net ({c.cycle_cpu_ms:.2f} raw), "
            f"wall p50 {c.cycle_p50_ms:.1f} p95 {c.cycle_p95_ms:.1f} ms, n={c.cycles} | idle cpu "
            f"{c.background:.0%} | rss {c.rss / 2**20:,.0f} MiB | idle runners {c.idle} | filled in {c.fill_s:.1f} s"
            f"{starved}")


def growth(c0: float, c1: float, x0: int, x1: int) -> float:
    if not (c0 > 0 and c1 > 0) or x0 <= 1 or x1 == x0:
        return float("nan")
    return (c1 / c0) / (math.log(x1) / math.log(x0))


def report(main: Run, baseline: Run | None, args: argparse.Namespace) -> int:
    fleets, queues = sorted(args.fleets), sorted(args.queues)
    cell = {(c.runners, c.queued): c for c in main.cells}
    print(f"\nfleet: the real scheduler (policy \"{main.policy}\", journal, store) and broker; simulated runners on "
          f"{NODES} nodes in {args.hosts} processes; {USERS} users, {len(MODELS)} models; plan_window "
          f"{args.plan_window}; {os.cpu_count()} CPUs (shared)")
    print("net = less the scheduler's CPU while idle in the same state (its refresh loop), times the span measured")
    head = f"  {'runners':>7} {'queued':>8}"
    print(f"{head} {'reached':>8}  {'cycle cpu ms':>12} {'(raw)':>8} {'wall p50':>9} {'p95 ms':>8}  "
          f"{'submit cpu us':>13} {'(raw)':>8} {'rtt p50 ms':>10}  {'idle cpu':>8} {'rss MiB':>8}")
    for runners in fleets:
        for queued in queues:
            c = cell.get((runners, queued))
            if c is None:
                continue
            flag = ("  probe starved" if c.starved else "") + (f"  {c.idle} runners idle" if c.idle else "")
            print(f"  {runners:>7} {queued:>8,} {c.reached:>8,}  {c.cycle_net_ms:>12.2f} {c.cycle_cpu_ms:>8.2f} "
                  f"{c.cycle_p50_ms:>9.1f} {c.cycle_p95_ms:>8.1f}  {c.submit_net_us:>13,.0f} {c.submit_cpu_us:>8,.0f} "
                  f"{c.submit_rtt_ms:>10.2f}"
                  f"  {c.background:>8.0%} {c.rss / 2**20:>8,.0f}{flag}")
    big, deep, middle = fleets[-1], queues[-1], side_queue(args)
    top = cell.get((big, deep))
    side = [("this scheduler (fair)", cell.get((big, middle)))]
    if baseline is not None:
        side.append(("naive baseline (fifo)", {(c.runners, c.queued): c for c in baseline.cells}.get((big, middle))))
    print(f"side by side at {big} runners, {middle:,} queued (raw limit: a bare ask through the broker, "
          f"frontend -> simulated runner -> frontend, sequential):")
    print(f"  {'raw limit (round trip)':<24} wall {main.raw_rtt_ms:.2f} ms")
    for name, c in side:
        if c is not None:
            print(f"  {name:<24} cycle {c.cycle_net_ms:.2f} ms cpu, wall p50 {c.cycle_p50_ms:.1f} ms "
                  f"({c.cycle_p50_ms / main.raw_rtt_ms:.0f}x the raw round trip); "
                  f"submit {c.submit_net_us:,.0f} us cpu, "
                  f"rtt p50 {c.submit_rtt_ms:.2f} ms")
    small = fleets[0]
    shallow = queues[0]

    def net(r: int, q: int, what: str) -> float:
        c = cell.get((r, q))
        return getattr(c, what) if c is not None else float("nan")

    def reached(r: int, q: int) -> int:
        c = cell.get((r, q))
        return c.reached if c is not None and c.reached else q

    # Over the queue, between the depths the fill reached (the largest fleet may not reach the deepest).
    q0, q1 = reached(big, shallow), reached(big, deep)
    growths = {
        f"dispatch cycle, {small} -> {big} runners ({deep:,} queued)":
            growth(net(small, deep, "cycle_net_ms"), net(big, deep, "cycle_net_ms"), small, big),
        f"dispatch cycle, {q0:,} -> {q1:,} queued ({big} runners)":
            growth(net(big, shallow, "cycle_net_ms"), net(big, deep, "cycle_net_ms"), q0, q1),
        f"submit, {q0:,} -> {q1:,} queued ({big} runners)":
            growth(net(big, shallow, "submit_net_us"), net(big, deep, "submit_net_us"), q0, q1),
    }
    print("growth against the logarithm ((c1/c0) / (log x1 / log x0); 1 = logarithmic, below is slower):")
    for name, value in growths.items():
        print(f"  {name:<48} {value:.2f}")
    deepest = max(main.cells, key=lambda c: (c.reached, c.runners), default=None)
    if deepest is not None:
        print(f"scheduler RSS at the deepest queue reached, {deepest.reached:,} queued ({deepest.runners} runners): "
              f"{deepest.rss / 2**20:,.0f} MiB")
    print(f"runner reports sent again (no answer in {REPORT_TIMEOUT_S:.0f} s): {main.resent}; RunBatch refused by a "
          f"busy runner: {main.refused}; filling took {main.fill_s:.0f} s")
    for run in (main, baseline):
        if run is None:
            continue
        for line in run.checked:
            print(f"  checked ({run.policy}): {line}")
        for line in run.problems:
            print(f"  PROBLEM ({run.policy}): {line}")
    if top is not None and top.reached < 0.9 * deep:
        print(f"NOTE: at {big} runners the fill reached {top.reached:,} queued, not {deep:,}, in its "
              f"{args.fill_budget:.0f} s: the deep figures below are at that depth")
    worst = max((g for g in growths.values() if not math.isnan(g)), default=float("nan"))
    dispatch = top.cycle_net_ms if top is not None else float("nan")
    submit = top.submit_net_us if top is not None else float("nan")
    print(f"RESULT dispatch_ms_{big}={dispatch:.2f} submit_us_{deep // 1000}k={submit:.1f} growth={worst:.2f}")
    starved = any(c.starved for r in (main, baseline) if r for c in r.cells)
    return 1 if main.problems or (baseline and baseline.problems) or starved else 0


def queues_of(runners: int, args: argparse.Namespace) -> list[int]:
    """The depths a fleet is measured at: the deepest only for the smallest and largest fleets (filling
    100,000 jobs takes minutes on 2 cores), which is what the growth over the fleet compares."""
    if runners in (args.fleets[0], args.fleets[-1]) or len(args.queues) == 1:
        return args.queues
    return args.queues[:-1]


def side_queue(args: argparse.Namespace) -> int:
    """The depth of the side-by-side comparison (and the baseline's run): the shallowest, the one every
    fleet reaches (1,000 runners take minutes to fill deeper on today's scheduler)."""
    return args.queues[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 and 64 runners, 500 and 4,000 queued, 8 cycles")
    parser.add_argument("--fleets", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64, 256, 1000])
    parser.add_argument("--queues", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10_000, 100_000])
    parser.add_argument("--cycles", type=int, default=30, help="probe cycles measured in each cell")
    parser.add_argument("--cycle-timeout", type=float, default=60.0,
                        help="a probe with no next batch for this long is starved")
    parser.add_argument("--submit-jobs", type=int, default=2000, help="pipelined submits measured in each cell")
    parser.add_argument("--rtt-jobs", type=int, default=100, help="sequential submits timed in each cell")
    parser.add_argument("--window", type=int, default=256, help="submits in flight at once")
    parser.add_argument("--submit-timeout", type=float, default=120.0)
    parser.add_argument("--hosts", type=int, default=3, help="processes the simulated runners share")
    parser.add_argument("--time-scale", type=float, default=0.01, help="the cost model's times are multiplied by this")
    parser.add_argument("--heartbeat", type=float, default=2.0, help="[broker] heartbeat_s")
    parser.add_argument("--plan-window", type=int, default=256, help="[scheduler] plan_window (its default: 256)")
    parser.add_argument("--idle-s", type=float, default=2.0, help="how long the idle CPU is measured in each cell")
    parser.add_argument("--settle-s", type=float, default=0.5)
    parser.add_argument("--long-window", type=float, default=8.0,
                        help="where the idle CPU is over 10%%, the idle and the cycles are measured at least this long")
    parser.add_argument("--busy-timeout", type=float, default=60.0,
                        help="after a fill, how long to wait for every runner to have a batch")
    parser.add_argument("--fill-budget", type=float, default=90.0,
                        help="seconds a cell's fill may take; beyond it the cell is measured at the depth reached")
    parser.add_argument("--measure-budget", type=float, default=30.0,
                        help="seconds each measurement of a cell (submits, round trips, cycles) may take")
    parser.add_argument("--no-baseline", action="store_true", help="skip the fifo run")
    parser.add_argument("--drain", action="store_true", help="let every runner go at the end, wait for every result")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--keep", action="store_true", help="keep each run's folder (config, logs, journal)")
    parser.add_argument("--host", action="store_true", help=argparse.SUPPRESS)  # a process of simulated runners
    parser.add_argument("--router", help=argparse.SUPPRESS)
    parser.add_argument("--models", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.host:
        return asyncio.run(host_main(args))
    if args.quick:
        args.fleets, args.queues, args.cycles, args.submit_jobs, args.rtt_jobs, args.idle_s, args.settle_s = \
            [8, 64], [500, 4000], 8, 300, 20, 0.5, 0.2
        args.long_window = 2.0
    args.fleets, args.queues = sorted(args.fleets), sorted(args.queues)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    work = Path(tempfile.mkdtemp(prefix="atelier-bench-fleet-"))
    started = time.monotonic()
    try:
        catalog = write_catalog(work / "models")
        print(f"fleet: fleets {args.fleets} runners, queues {args.queues}, {args.cycles} probe cycles a cell; "
              f"time scale {args.time_scale}", flush=True)

        async def everything() -> tuple[Run, Run | None]:
            main_run = Run("fair")
            for runners in args.fleets:
                await run_fleet(runners, queues_of(runners, args), "fair", work / f"fair-{runners}", work / "models",
                                catalog, Jobs(work), args, main_run)
            baseline = None
            if not args.no_baseline:
                baseline = Run("fifo")
                await run_fleet(args.fleets[-1], [side_queue(args)], "fifo", work / "fifo", work / "models", catalog,
                                Jobs(work), args, baseline)
            return main_run, baseline

        main_run, baseline = asyncio.run(everything())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"(kept in {work})")
    print(f"(the whole run took {time.monotonic() - started:.0f} s)")
    return report(main_run, baseline, args)


if __name__ == "__main__":
    sys.exit(main())
