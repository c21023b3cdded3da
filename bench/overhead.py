"""atelier's own cost per job, measured end to end on the real system.

It starts atelier the way a user does (``atelier up`` as a separate process,
with its broker, scheduler, node, loader and runner as further processes) and
sends jobs of the built-in ``noop`` model, which does no diffusion, through
``AtelierClient``. Whatever time a job takes is therefore atelier's: framing,
validation, routing, scheduling, events, the runner's worker thread, the PNG
and the artifact store.

Four figures:

1. latency    one job in flight: p50/p99 of submit -> JobResult.
2. throughput many jobs in flight (bounded concurrency): jobs per second.
3. raw limit  a bare pyzmq DEALER -> ROUTER -> DEALER round trip with msgpack,
              sequential, on loopback TCP: the floor any design over ZeroMQ
              pays per message exchange on this machine.

4. polls      CPU per poll of a job's state (``GET /v1/jobs/{id}``) in all of atelier's processes, side by
              side: the HTTP gateway answering from the job's events it heard (the default) and asking
              the scheduler every time (``[http] poll_cache_s = 0``), each on an atelier of its own.

    python bench/overhead.py [--jobs 2000] [--latency-jobs 300] [--concurrency 128] [--polls 2000]

The last line printed is machine-readable:
``RESULT jobs_per_s=... p50_ms=... p99_ms=... raw_roundtrips_per_s=... poll_cpu_us_cached=... poll_cpu_us_asked=...``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the atelier modules live at the root

import msgpack  # noqa: E402
import zmq  # noqa: E402

from atelier.jobs import JobRecord, JobSpec, JobState  # noqa: E402
from atelier.runtime import READY_PREFIX  # noqa: E402
from frontends.client import AtelierClient  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def noop_job(index: int) -> JobSpec:
    # A fixed seed: every job makes the same 64x64 PNG, so runs compare like with like.
    return JobSpec(model="noop", prompt=f"overhead bench {index}", steps=1, width=64, height=64, seed=0)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --------------------------------------------------------------------------- #
# 3. raw limit: bare pyzmq + msgpack


def _echo_server(conn) -> None:
    """A ROUTER that decodes and re-encodes each message, as the least a broker-like hop can do."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    conn.send(port)
    try:
        while True:
            ident, payload = sock.recv_multipart()
            if payload == b"stop":
                return
            sock.send_multipart([ident, msgpack.packb(msgpack.unpackb(payload))])
    finally:
        sock.close(linger=0)
        ctx.term()


def raw_roundtrips(seconds: float) -> tuple[float, int]:
    """Sequential round trips per second against an echoing ROUTER in another process."""
    # A separate process, not a thread: like atelier's broker it must not share our GIL.
    mp = multiprocessing.get_context("spawn")
    parent, child = mp.Pipe()
    server = mp.Process(target=_echo_server, args=(child,), daemon=True)
    server.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        if not parent.poll(30):
            raise RuntimeError("the raw echo server did not start")
        sock.connect(f"tcp://127.0.0.1:{parent.recv()}")
        sock.setsockopt(zmq.RCVTIMEO, 5000)  # a lost reply fails the bench instead of hanging it
        # About the size of an atelier Submit head.
        payload = {"kind": "submit", "id": 0, "src": "client-0123456789ab", "dst": "scheduler",
                   "job": {"id": "0" * 32, "model": "noop", "prompt": "overhead bench", "steps": 1,
                           "width": 64, "height": 64, "seed": 0}}

        def round_trip(i: int) -> None:
            payload["id"] = i
            sock.send(msgpack.packb(payload))
            msgpack.unpackb(sock.recv())

        for i in range(2000):  # connect, warm caches
            round_trip(i)
        count = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            for _ in range(500):  # check the clock every 500 only: it costs as much as a send
                round_trip(count)
                count += 1
            if time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - start
        sock.send(b"stop")
        return count / elapsed, count
    finally:
        sock.close(linger=100)
        ctx.term()
        server.join(5)
        if server.is_alive():
            server.kill()
            server.join()


# --------------------------------------------------------------------------- #
# the system under test, as separate processes


def _children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # it exited while we looked
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / CLOCK_TICKS, sum(ticks) / CLOCK_TICKS


def _label(pid: int) -> str:
    """The atelier part a process is, from its command line (``-m actors.runner`` -> ``runner``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return str(pid)
    if "-m" in argv and argv.index("-m") + 1 < len(argv):
        module = argv[argv.index("-m") + 1]
        if module == "frontends.cli":
            return "up (supervisor)"
        return module.rsplit(".", 1)[-1].replace("gpu_node", "node (supervisor)")
    return Path(argv[0]).name or str(pid)


class System:
    """``atelier up`` in its own session, so that everything it starts can be found and reaped."""

    def __init__(self, home: Path, log_path: Path, *, config: Path | None = None, log_level: str = "WARNING",
                 http: str = "off"):
        self.home = home
        self.http_listen = http  # "off", or HOST:PORT for the HTTP frontend
        self.http = ""  # its base URL once started
        self.log_path = log_path  # up's stderr and its children's output: kept out of the table
        self.config = config  # None: the built-in catalog, as a new user gets it
        self.log_level = log_level
        self.process: subprocess.Popen | None = None
        self.router = self.pub = ""

    def start(self, timeout: float) -> None:
        env = dict(os.environ, ATELIER_HOME=str(self.home), HF_HUB_OFFLINE="1")
        env.pop("ATELIER_CONFIG", None)
        config = ["--config", str(self.config)] if self.config is not None else []
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "frontends.cli", "up", "--router", "tcp://127.0.0.1:0",
             "--pub", "tcp://127.0.0.1:0", "--http", self.http_listen, *config, "--log-level", self.log_level],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True,
            start_new_session=True)
        ready = threading.Event()
        found: dict[str, str] = {}

        def read_stdout() -> None:
            # Keep reading after the ready line: a full pipe would block the supervisor.
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                if line.startswith(READY_PREFIX) and not ready.is_set():
                    found.update(json.loads(line[len(READY_PREFIX):]))
                    ready.set()
                else:
                    self._log.write(line)
            ready.set()  # EOF: it exited before it was ready

        self._reader = threading.Thread(target=read_stdout, name="up-stdout", daemon=True)
        self._reader.start()
        if not ready.wait(timeout) or not found:
            self.stop()
            raise RuntimeError(f"atelier up did not report ready in {timeout:.0f}s; see {self.log_path}:\n"
                               + self.log_tail())
        self.router, self.pub, self.http = found["router"], found["pub"], found.get("http") or ""

    def pids(self) -> list[int]:
        """``up`` and every process under it."""
        if self.process is None:
            return []
        tree = _children_of()
        out, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(tree.get(pid, ()))
        return out

    def cpu(self) -> dict[int, float]:
        return {pid: cpu for pid in self.pids() if (cpu := _cpu_seconds(pid)) is not None}

    def settle(self, timeout: float, idle_share: float = 0.1) -> float:
        """Waits until the start-up work (imports, the loader staging its default model) is over.

        Returns how long it waited. Anything still burning CPU would steal it from the measurement.
        """
        start = time.monotonic()
        window = 0.5
        before = sum(self.cpu().values())
        while time.monotonic() - start < timeout:
            time.sleep(window)
            now = sum(self.cpu().values())
            if now - before < idle_share * window:
                break
            before = now
        return time.monotonic() - start

    def stop(self, timeout: float = 30.0) -> list[str]:
        """SIGTERM to ``up`` (as Ctrl-C would), wait for it, then reap anything left. Returns the leftovers."""
        if self.process is None:
            return []
        leftovers: list[str] = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                leftovers.append(f"up (pid {self.process.pid}) ignored SIGTERM for {timeout:.0f}s")
                self.process.kill()
                self.process.wait()
        # Its children die with it (PDEATHSIG); give them a moment, then make sure.
        pgid = self.process.pid  # start_new_session: the group is ours alone
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            leftovers.append("processes of atelier up outlived it by 10s; killed them")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self._reader.join(5)  # the pipe is closed once the last of them is gone
        self._log.close()
        return leftovers

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])
        return ""


# --------------------------------------------------------------------------- #
# 1 and 2: through AtelierClient


@dataclass
class Figures:
    latencies_ms: list[float]
    jobs: int
    throughput_s: float
    cpu_by_part: dict[str, float]  # CPU seconds during the throughput run, per atelier part
    machine_busy: float  # share of all CPUs busy during the throughput run
    stages_ms: dict[str, list[float]]  # the latency run, split at the scheduler's timestamps


# Segments of one job's latency, between the timestamps a JobRecord carries.
STAGES = [
    ("client -> scheduler accepts", "Submit encoded, routed, decoded, validated"),
    ("accepted -> runner running", "RunBatch to the runner, BatchUpdate(running) back"),
    ("running -> scheduler finishes", "generate + PNG in the worker, BatchDone back, artifact written"),
    ("finished -> client has result", "JobResult routed to the client and decoded"),
]


async def _one(client: AtelierClient, spec: JobSpec, timeout: float) -> JobRecord:
    # Results only, as an API caller that does not stream progress would: no event subscription.
    await client.submit(spec, timeout=timeout, events=False)
    result = await client.wait(spec.id, timeout=timeout)
    if result.job.state is not JobState.done:
        raise RuntimeError(f"job {spec.id} ended {result.job.state.value}: {result.job.reason}")
    return result.job


async def measure(system: System, args: argparse.Namespace) -> Figures:
    async with AtelierClient(system.router, system.pub) as client:
        # Warm-up: the runner's first job waits for its worker thread's start-up import,
        # and every process's code paths get warm.
        for i in range(args.warmup):
            await _one(client, noop_job(i), timeout=120)

        latencies = []
        stages: dict[str, list[float]] = {name: [] for name, _ in STAGES}
        for i in range(args.latency_jobs):
            sent = time.time()
            start = time.perf_counter()
            record = await _one(client, noop_job(i), timeout=30)
            latencies.append((time.perf_counter() - start) * 1000)
            # The scheduler stamps the record with the same wall clock (one machine): where did the time go?
            marks = [sent, record.submitted_at, record.started_at, record.finished_at, time.time()]
            for (name, _), a, b in zip(STAGES, marks[:-1], marks[1:], strict=True):
                stages[name].append((b - a) * 1000)

        gate = asyncio.Semaphore(args.concurrency)

        async def bounded(i: int) -> None:
            async with gate:
                await _one(client, noop_job(i), timeout=60)

        cpu_before = system.cpu()
        busy_before = _machine_busy()
        own_before = time.process_time()
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(bounded(i) for i in range(args.jobs))), args.max_seconds)
        elapsed = time.perf_counter() - start
        own = time.process_time() - own_before
        cpu_after = system.cpu()
        busy_after = _machine_busy()

    by_part: dict[str, float] = {"bench client": own}
    for pid, cpu in cpu_after.items():
        label = _label(pid)
        by_part[label] = by_part.get(label, 0.0) + cpu - cpu_before.get(pid, cpu)
    busy = (busy_after[0] - busy_before[0]) / max(busy_after[1] - busy_before[1], 1e-9)
    return Figures(latencies, args.jobs, elapsed, by_part, busy, stages)


# --------------------------------------------------------------------------- #
# 4. polls: one GET /v1/jobs/{id}, answered from the gateway's cache or by asking the scheduler


POLL_PARTS = ("http", "scheduler", "broker")


async def measure_polls(system: System, polls: int) -> tuple[float, dict[str, float]]:
    """CPU per poll of one job's state (a finished job the HTTP server submitted), over ``polls``
    sequential polls: (seconds of CPU per poll in all of atelier's processes, by part)."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        body = {"model": "noop", "prompt": "polled", "steps": 1, "width": 64, "height": 64, "seed": 0}
        async with http.post(f"{system.http}/v1/jobs", json=body) as response:
            if response.status != 202:
                raise RuntimeError(f"POST /v1/jobs answered {response.status}: {await response.text()}")
            url = f"{system.http}/v1/jobs/{(await response.json())['spec']['id']}"
        deadline = time.monotonic() + 60
        while True:  # until done: the runner's first job waits for its worker's imports
            async with http.get(url) as response:
                if (await response.json())["state"] == "done":
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the polled job did not finish in 60 s")
            await asyncio.sleep(0.05)
        for _ in range(50):  # warm
            async with http.get(url) as response:
                await response.read()
        before = system.cpu()
        for _ in range(polls):
            async with http.get(url) as response:
                if response.status != 200:
                    raise RuntimeError(f"GET {url} answered {response.status}")
                await response.read()
        after = system.cpu()
    by_part: dict[str, float] = {}
    for pid, cpu in after.items():
        label = _label(pid)
        by_part[label] = by_part.get(label, 0.0) + (cpu - before.get(pid, cpu)) / polls
    return sum(by_part.values()), by_part


def poll_costs(tmp: Path, polls: int) -> dict[str, tuple[float, dict[str, float]]]:
    """Polls side by side: the gateway answering from what it heard (the default), and asking the scheduler
    every time (``[http] poll_cache_s = 0``), each on an atelier of its own."""
    from atelier.runtime import run

    out = {}
    for name, cache_s in (("cached", None), ("asked", 0)):
        config = None
        if cache_s is not None:
            config = tmp / f"poll-{name}.toml"
            config.write_text(f"[http]\npoll_cache_s = {cache_s}\n")
        system = System(home=tmp / f"home-{name}", log_path=tmp / f"up-{name}.log", config=config,
                        http="127.0.0.1:0")
        system.start(timeout=120)
        system.settle(timeout=60)
        try:
            out[name] = run(measure_polls(system, polls))
        finally:
            system.stop()
    return out


# --------------------------------------------------------------------------- #


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs in the throughput run (default 2000)")
    parser.add_argument("--latency-jobs", type=int, default=300, help="sequential jobs timed (default 300)")
    parser.add_argument("--warmup", type=int, default=50, help="sequential jobs before timing (default 50)")
    parser.add_argument("--concurrency", type=int, default=128, help="jobs in flight in the throughput run")
    parser.add_argument("--raw-seconds", type=float, default=2.0, help="how long the raw round trip runs")
    parser.add_argument("--max-seconds", type=float, default=90.0, help="give up on the throughput run after")
    parser.add_argument("--polls", type=int, default=2000, help="sequential polls timed on each side (0: none)")
    args = parser.parse_args(argv)

    from atelier.runtime import run

    raw_per_s, raw_count = raw_roundtrips(args.raw_seconds)

    with tempfile.TemporaryDirectory(prefix="atelier-bench-") as tmp:
        system = System(home=Path(tmp) / "home", log_path=Path(tmp) / "up.log")
        t0 = time.monotonic()
        system.start(timeout=120)
        up_s = time.monotonic() - t0
        settle_s = system.settle(timeout=60)
        try:
            figures = run(measure(system, args))
        except BaseException:
            leftovers = system.stop()
            print(f"the bench failed; atelier's log ends with:\n{system.log_tail()}", file=sys.stderr)
            for line in leftovers:
                print(f"warning: {line}", file=sys.stderr)
            raise
        leftovers = system.stop()
        polls = poll_costs(Path(tmp), args.polls) if args.polls else {}

    raw_rtt_us = 1e6 / raw_per_s
    p50, p99 = percentile(figures.latencies_ms, 0.50), percentile(figures.latencies_ms, 0.99)
    jobs_per_s = figures.jobs / figures.throughput_s

    print(f"atelier overhead: noop jobs (steps=1, 64x64) on {os.cpu_count()} CPUs; "
          f"up in {up_s:.1f}s, settled after {settle_s:.1f}s more")
    rows = [
        ("raw pyzmq+msgpack round trip", f"{raw_per_s:,.0f} /s", f"{raw_rtt_us:.0f} us each, {raw_count:,} sequential"),
        ("latency p50 (1 in flight)", f"{p50:.2f} ms", f"{p50 * 1000 / raw_rtt_us:.0f}x a raw round trip"),
        ("latency p99 (1 in flight)", f"{p99:.2f} ms", f"mean {statistics.fmean(figures.latencies_ms):.2f} ms, "
                                                       f"n={len(figures.latencies_ms)}"),
        ("throughput", f"{jobs_per_s:,.0f} jobs/s",
         f"{figures.jobs} jobs, {args.concurrency} in flight, {figures.throughput_s:.2f}s "
         f"(a job every {1e6 / jobs_per_s / raw_rtt_us:.0f} raw round trips)"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"  {'':<{width}}  {'figure':>14}  note")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>14}  {note}")
    print("latency p50 by segment (scheduler timestamps):")
    for name, note in STAGES:
        print(f"  {name:<{width}}  {statistics.median(figures.stages_ms[name]):>11.2f} ms  {note}")
    total_cpu = sum(figures.cpu_by_part.values())
    print(f"CPU per job in the throughput run (machine {figures.machine_busy:.0%} busy over "
          f"{os.cpu_count()} CPUs):")
    for part, cpu in sorted(figures.cpu_by_part.items(), key=lambda kv: -kv[1]):
        if cpu > 0:
            print(f"  {part:<{width}}  {cpu * 1e6 / figures.jobs:>11,.0f} us  {cpu / total_cpu:.0%}")
    print(f"  {'all':<{width}}  {total_cpu * 1e6 / figures.jobs:>11,.0f} us")
    poll_figures = ""
    if polls:
        print(f"CPU per poll of a job's state (GET /v1/jobs/{{id}}, {args.polls} sequential, all processes):")
        for name, (total, by_part) in polls.items():
            parts = ", ".join(f"{part} {by_part.get(part, 0.0) * 1e6:,.0f}" for part in POLL_PARTS)
            print(f"  {name:<{width}}  {total * 1e6:>11,.0f} us  {parts} us")
        poll_figures = (f" poll_cpu_us_cached={polls['cached'][0] * 1e6:.0f}"
                        f" poll_cpu_us_asked={polls['asked'][0] * 1e6:.0f}")
    for line in leftovers:
        print(f"warning: {line}")
    print(f"RESULT jobs_per_s={jobs_per_s:.1f} p50_ms={p50:.3f} p99_ms={p99:.3f} "
          f"raw_roundtrips_per_s={raw_per_s:.1f}{poll_figures}")
    return 1 if leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
