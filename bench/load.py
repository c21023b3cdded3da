"""Many people at once: every job accounted for, and the broker's and scheduler's memory flat.

It starts atelier as a user does (``atelier up``: broker, scheduler, a node with its loader and one
runner) with a config of its own: the ``noop`` model with a small sleep per step and one image per
pipeline call, so that the runner, not atelier, is the bottleneck and a queue forms; and a
``max_queue`` small enough that at the peak of the burst some submits are refused with
``queue_full``, so that path is exercised too.

Then, round after round, ``--clients`` clients (each its own ``AtelierClient``, so its own ZeroMQ
identity and its own user), spread over ``--processes`` worker processes with asyncio inside, each
submit ``--jobs-per-client`` jobs at once (a burst) and wait for every accepted job's result. Each
job ends up as one of:

    done      its JobResult came, state done, with its image
    failed    its JobResult came with another state, or the submit was refused for a reason other
              than a full queue (the reason is kept)
    refused   the submit was answered ``queue_full`` (not retried: it is accounted as refused)
    lost      accepted (or never answered) and no result by the deadline, even when asked for it
              once more with ``fetch_result``

Memory: VmRSS of the broker and the scheduler after a warm-up round (imports, caches, the
first allocations settle), then after each measured round and a short idle settle. A first round
legitimately grows bounded structures (the ended jobs the scheduler remembers, SQLite's page cache,
allocator arenas), so the growth reported is steady state: from the end of the first measured round
to the end of the last one (with ``--rounds 1``: from the warm-up's end). ``remember_finished`` is set
below the warm-up's size, so that bound is already reached when the baseline is taken. RSS also
counts what the C allocator keeps after frees, which moves by a megabyte or two from round to round
with no live object more: a leak shows as growth round after round (``--rounds 6``), not in one pair.

    python bench/load.py [--clients 50] [--jobs-per-client 20] [--processes 5] [--rounds 2] [--keep]

Last line: ``RESULT clients=50 jobs=1000 lost=… rss_growth_mb=…`` (jobs: per round; lost: over every
round, the warm-up included). The exit status is 1 if any job was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the atelier modules live at the root
sys.path.insert(0, str(REPO / "bench"))

import overhead  # noqa: E402

from actors.actor import RemoteError  # noqa: E402
from atelier.jobs import ErrorCode, JobSpec, JobState  # noqa: E402
from frontends.client import AtelierClient  # noqa: E402

STEP_S = 0.01  # one step of "work" per job: about 50-80 jobs/s through the one runner at most
MAX_QUEUE = 500  # half of a 1000-job burst: the other half is refused queue_full at the peak
REMEMBER_FINISHED = 100  # below the warm-up's job count: that bound is reached before the baseline


def config_text(step_s: float, max_queue: int) -> str:
    return f"""\
builtin_models = false
default_model = "noop"

[models.noop]
family = "noop"
source = "builtin:noop"
options = {{ step_s = {step_s} }}
max_batch = 1

[node]
resident_models = 1

[scheduler]
max_queue = {max_queue}
remember_finished = {REMEMBER_FINISHED}
"""


# --------------------------------------------------------------------------- #
# a worker process: some of the clients


@dataclass
class Outcome:
    job: str
    client: int
    outcome: str  # done, failed, refused, lost
    reason: str | None = None
    latency_ms: float | None = None  # submit -> result, for a job that has one
    ended: float | None = None  # wall clock when its result came
    fetched: bool = False  # the result came only when asked for once more


async def one_job(client: AtelierClient, index: int, n: int, deadline: float) -> Outcome:
    spec = JobSpec(model="noop", prompt=f"load client {index} job {n}", user=f"load-{index}", steps=1, width=64,
                   height=64, seed=n)
    started = time.perf_counter()
    answered = True
    try:
        # Events on, as a user's client has them: the broker's subscriptions are part of the load.
        await client.submit(spec, timeout=10.0)
    except RemoteError as exc:
        if exc.error.code is ErrorCode.queue_full:
            return Outcome(spec.id, index, "refused", exc.error.message)
        return Outcome(spec.id, index, "failed", f"submit refused: {exc}")
    except asyncio.TimeoutError:
        answered = False  # no answer to three tries: whether the scheduler has it is found out below
    result = None
    with contextlib.suppress(asyncio.TimeoutError):
        result = await client.wait(spec.id, timeout=max(0.1, deadline - time.time()))
    fetched = False
    if result is None:
        with contextlib.suppress(RemoteError, asyncio.TimeoutError):
            result = await client.fetch_result(spec.id)
            fetched = result is not None
    if result is None:
        why = "no result by the deadline, nor when asked again"
        return Outcome(spec.id, index, "lost", why if answered else f"submit never answered; {why}")
    latency = (time.perf_counter() - started) * 1000
    if result.job.state is not JobState.done:
        return Outcome(spec.id, index, "failed", f"{result.job.state.value}: {result.job.reason}", latency,
                       time.time(), fetched)
    if not any(artifact.data for artifact in result.outputs):
        return Outcome(spec.id, index, "failed", "done, but no image came with the result", latency, time.time(),
                       fetched)
    return Outcome(spec.id, index, "done", None, latency, time.time(), fetched)


async def worker_main(args: argparse.Namespace) -> None:
    indexes = range(args.first, args.first + args.count)
    clients = [AtelierClient(args.router, args.pub) for _ in indexes]
    await asyncio.gather(*(client.start() for client in clients))
    try:
        print("ready", flush=True)
        # The go line: every worker's clients are connected before any of them bursts.
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if line.strip() != "go":
            return
        deadline = time.time() + args.deadline
        outcomes = await asyncio.gather(*(one_job(client, index, n, deadline)
                                          for client, index in zip(clients, indexes, strict=True)
                                          for n in range(args.jobs_per_client)))
    finally:
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
    Path(args.out).write_text(json.dumps([o.__dict__ for o in outcomes]))


# --------------------------------------------------------------------------- #
# the run


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def find_parts(system: overhead.System) -> dict[str, int]:
    parts = {overhead._label(pid): pid for pid in system.pids()}
    missing = {"broker", "scheduler"} - set(parts)
    if missing:
        raise RuntimeError(f"atelier up has no {', '.join(sorted(missing))} process: {sorted(parts)}")
    return {"broker": parts["broker"], "scheduler": parts["scheduler"]}


@dataclass
class Round:
    name: str
    outcomes: list[Outcome]
    wall_s: float  # go -> the last result (or the last worker's exit, if no job is done)
    peak_queued: int
    rss: dict[str, float]  # after the round and the settle


async def watch_queue(system: overhead.System, stop: asyncio.Event) -> int:
    """The longest the queue got while the round ran, from the scheduler's own status."""
    peak = 0
    async with AtelierClient(system.router, system.pub) as client:
        while not stop.is_set():
            with contextlib.suppress(RemoteError, asyncio.TimeoutError):
                peak = max(peak, len((await client.status()).queued))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
    return peak


async def run_round(system: overhead.System, folder: Path, name: str, args: argparse.Namespace,
                    jobs_per_client: int) -> tuple[list[Outcome], float, int]:
    per = math.ceil(args.clients / args.processes)
    groups = [(first, min(per, args.clients - first)) for first in range(0, args.clients, per)]
    workers = []
    with open(folder / "workers.log", "a") as log:
        for first, count in groups:
            out = folder / f"{name}-{first}.json"
            workers.append((out, await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--worker", "--first", str(first), "--count", str(count),
                "--jobs-per-client", str(jobs_per_client), "--deadline", str(args.deadline),
                "--router", system.router, "--pub", system.pub, "--out", str(out),
                cwd=REPO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                env=dict(os.environ, HF_HUB_OFFLINE="1"))))
    for _, proc in workers:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"a worker did not start; see {folder / 'workers.log'}")
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_queue(system, stop))
    await asyncio.sleep(0.5)  # the watcher's client has joined before the burst
    started, go = time.monotonic(), time.time()
    for _, proc in workers:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
    codes = [await proc.wait() for _, proc in workers]
    wall = time.monotonic() - started
    stop.set()
    peak = await watcher
    if any(codes):
        raise RuntimeError(f"a worker failed (exit {codes}); see {folder / 'workers.log'}")
    outcomes = [Outcome(**o) for out, _ in workers for o in json.loads(out.read_text())]
    ends = [o.ended for o in outcomes if o.ended is not None]
    # The workers' exit includes closing 50 clients: the round's time ends with its last result.
    return outcomes, (max(ends) - go if ends else wall), peak


def measure_rss(system: overhead.System, parts: dict[str, int], idle_s: float) -> dict[str, float]:
    system.settle(timeout=30)  # the refresh loop, the journal's writes: done before reading memory
    time.sleep(idle_s)
    return {name: rss_mb(pid) for name, pid in parts.items()}


def percentile(samples: list[float], q: float) -> float:
    return overhead.percentile(samples, q) if samples else float("nan")


def print_rounds(rounds: list[Round]) -> None:
    head = ("round", "jobs", "done", "refused", "failed", "lost", "wall s", "done/s", "p50 ms", "p95 ms",
            "peak queue")
    print("  " + "".join(f"{h:>11}" for h in head))
    for r in rounds:
        counts = {k: sum(1 for o in r.outcomes if o.outcome == k) for k in ("done", "refused", "failed", "lost")}
        latencies = [o.latency_ms for o in r.outcomes if o.outcome == "done" and o.latency_ms is not None]
        row = (r.name, len(r.outcomes), counts["done"], counts["refused"], counts["failed"], counts["lost"],
               f"{r.wall_s:.1f}", f"{counts['done'] / r.wall_s:.1f}", f"{percentile(latencies, 0.50):.0f}",
               f"{percentile(latencies, 0.95):.0f}", r.peak_queued)
        print("  " + "".join(f"{str(v):>11}" for v in row))


def print_reasons(rounds: list[Round]) -> None:
    reasons: dict[tuple[str, str], int] = {}
    for r in rounds:
        for o in r.outcomes:
            if o.outcome != "done":
                # The refusal's message names the queue's length; one line per kind of reason.
                key = (o.outcome, (o.reason or "").split(" (")[0])
                reasons[key] = reasons.get(key, 0) + 1
    for (outcome, reason), count in sorted(reasons.items()):
        print(f"    {outcome} x{count}: {reason}")
    fetched = sum(1 for r in rounds for o in r.outcomes if o.fetched)
    if fetched:
        print(f"    {fetched} results came only when asked for again (fetch_result) after the deadline")


async def bench(system: overhead.System, folder: Path, args: argparse.Namespace) -> tuple[list[Round], dict]:
    parts = find_parts(system)
    before_warmup = {name: rss_mb(pid) for name, pid in parts.items()}
    rounds: list[Round] = []
    plan = [("warm-up", max(1, math.ceil(args.warmup / args.clients)))]
    plan += [(f"round {i + 1}", args.jobs_per_client) for i in range(args.rounds)]
    for name, per_client in plan:
        outcomes, wall, peak = await run_round(system, folder, name.replace(" ", ""), args, per_client)
        rss = await asyncio.to_thread(measure_rss, system, parts, args.idle)
        rounds.append(Round(name, outcomes, wall, peak, rss))
        print(f"  {name}: {len(outcomes)} jobs in {wall:.1f}s; RSS broker {rss['broker']:.1f} MB, "
              f"scheduler {rss['scheduler']:.1f} MB", flush=True)
    return rounds, before_warmup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--jobs-per-client", type=int, default=20)
    parser.add_argument("--processes", type=int, default=5, help="worker processes the clients are spread over")
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds (growth: end of 1st -> end of last)")
    parser.add_argument("--warmup", type=int, default=200, help="jobs in the warm-up round, spread over the clients")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds a round's jobs get for a result")
    parser.add_argument("--step-s", type=float, default=STEP_S, help="the noop model's seconds per step")
    parser.add_argument("--max-queue", type=int, default=MAX_QUEUE, help="[scheduler] max_queue")
    parser.add_argument("--idle", type=float, default=2.0, help="idle seconds after a round before reading RSS")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (config, logs, outcomes)")
    # A worker process (started by the run itself).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--router", help=argparse.SUPPRESS)
    parser.add_argument("--pub", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from atelier.runtime import run

    if args.worker:
        run(worker_main(args))
        return 0
    if min(args.clients, args.jobs_per_client, args.processes, args.rounds) < 1:
        parser.error("--clients, --jobs-per-client, --processes and --rounds must be at least 1")

    jobs = args.clients * args.jobs_per_client
    folder = Path(tempfile.mkdtemp(prefix="atelier-load-"))
    (folder / "atelier.toml").write_text(config_text(args.step_s, args.max_queue))
    system = overhead.System(folder / "home", folder / "up.log", config=folder / "atelier.toml")
    print(f"load: {args.clients} clients x {args.jobs_per_client} jobs ({jobs} a round) in {args.processes} "
          f"processes, {args.rounds} measured rounds after a {args.warmup}-job warm-up; on {os.cpu_count()} CPUs")
    print(f"  noop, 1 step of {args.step_s}s, max_batch 1 (the runner is the bottleneck); max_queue {args.max_queue} "
          f"(a burst past it is refused queue_full, not retried); remember_finished {REMEMBER_FINISHED}")
    system.start(timeout=120)
    try:
        system.settle(timeout=60)
        rounds, before_warmup = run(bench(system, folder, args))
    except BaseException:
        leftovers = system.stop()
        print(f"the bench failed; atelier's log ends with:\n{system.log_tail()}", file=sys.stderr)
        for line in leftovers:
            print(f"warning: {line}", file=sys.stderr)
        print(f"kept {folder}", file=sys.stderr)
        raise
    leftovers = system.stop()

    print_rounds(rounds)
    print_reasons(rounds)
    warm, first, last = rounds[0], rounds[1], rounds[-1]
    base = first if len(rounds) > 2 else warm
    print(f"  RSS MB       {'start':>8} {'warm-up':>8} " + " ".join(f"{r.name:>8}" for r in rounds[1:]))
    for part in ("broker", "scheduler"):
        print(f"  {part:<12} {before_warmup[part]:>8.1f} " + " ".join(f"{r.rss[part]:>8.1f}" for r in rounds))
    growth = {part: last.rss[part] - base.rss[part] for part in ("broker", "scheduler")}
    rss_growth = max(growth.values())
    print(f"  rss_growth_mb: the larger of broker {growth['broker']:+.1f} and scheduler {growth['scheduler']:+.1f} "
          f"MB, from the end of {base.name} to the end of {last.name} (steady state)")
    lost = sum(1 for r in rounds for o in r.outcomes if o.outcome == "lost")
    for line in leftovers:
        print(f"  warning: {line}")
    if args.keep or lost:
        print(f"  kept {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"RESULT clients={args.clients} jobs={jobs} lost={lost} rss_growth_mb={rss_growth:.1f}")
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
