"""A mixed trace run several ways: atelier's policy against how the systems it replaces schedule.

One fixed, seeded trace: 90 jobs from 4 users over 3 models at mixed sizes and counts, three
users submitting steadily and the fourth in one burst of 30. It runs on a fresh ``atelier up``
for each policy, changing only the configuration:

- ``atelier``: the fair policy (priorities, fair share, batching of compatible jobs from anywhere
  in the queue, placement by expected finish), models resident within the device budget,
  weights staged in shared memory and preloaded.
- ``fifo``: one queue in arrival order, one resident model per runner, batching only of the
  consecutive same-model jobs at the head, the next job's model preloaded into host memory so a
  switch is a copy to the device (how Dante4 works: passthrough, preloading, prompt batching).
- ``reload``: one queue in arrival order, one job per call, the model loaded from disk for every
  job (how the SDXL/SVD microservice works).
- ``fifo-disk`` (shown, not in the RESULT line): ``fifo`` without the preloading, so every model
  switch reads the disk; it shows what Dante4's preloading is worth.

And the trace runs on two kinds of model:

1. The GPU profile (``--profile``, default ``bench/profiles/h100.toml``): cost-model models whose
   runners sleep the profile's disk load, staged load, per-step (by resolution and batch size)
   and VAE decode times for SD 1.5 (30 steps), SDXL (30 steps) and FLUX.1-schnell (4 steps; the
   profile's FLUX.1 transformer costs), two runners standing in for two H100s.
   Everything else is the real system. Times are multiplied by ``--time-scale`` so the run is
   short; figures are reported in the profile's own seconds.
2. Real tiny diffusers models (tiny-sd, tiny-sdxl and a second tiny SD-shaped model) on this
   machine's CPU, one runner. Here compute swamps loading and batching gains little, so this
   run shows the system's behaviour, not a GPU's economics.

Figures per run: throughput (jobs per second from the first submit to the last result; the
arrivals come faster than any of them can serve them, so this is capacity), the device
time spent running pipelines over all runners (and its share of their wall time: the rest went
to loading models or waiting for work), the latency of jobs (submit to result), and per user two
kinds of wait:

- *wait*: from submit until the job's pipeline started running;
- *turn wait*: from the moment a job became its owner's next one (submitted, and every earlier
  job of the same owner started) until it started. A user who queues 30 jobs at once waits
  for their own 29 others whatever the policy; that part is theirs, not unfairness. The turn
  wait is what the others make one wait, and fair share makes it about equal for everyone.

``fairness`` is the worst user's p95 turn wait over the best user's. (In arrival order the
jobs behind the burst wait for all of it while the burst's own jobs run back to back; the plain
waits hide that, because under fair share the burst's owner rightly waits longest.)

    python bench/mixed.py [--time-scale 0.25] [--only gpu|cpu] [--keep]

Last line: ``RESULT vs_fifo=… vs_reload=… fairness=…`` for the GPU profile (throughput ratios of
atelier against each baseline, and atelier's fairness); the line before has the same figures for
the real tiny models.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the atelier modules live at the root
sys.path.insert(0, str(REPO / "bench"))

import overhead  # noqa: E402

from atelier.jobs import JobRecord, JobSpec, JobState  # noqa: E402
from frontends.client import AtelierClient  # noqa: E402

SEED = 7
STEADY_USERS = ("ana", "ben", "caro")
BURST_USER = "dora"
STEADY_JOBS = 20  # per steady user
BURST_JOBS = 30
POPULARITY = (0.5, 0.35, 0.15)  # of the three models, for the steady users
POLICIES = ("atelier", "fifo", "reload", "fifo-disk")


# --------------------------------------------------------------------------- #
# the trace


@dataclass(frozen=True)
class TraceJob:
    at: float  # when it is submitted, as a fraction of the arrival window
    user: str
    model: int  # which of the three models
    native: bool  # the model's own size, or its other profiled size
    count: int
    seed: int


def make_trace(seed: int = SEED) -> list[TraceJob]:
    rng = random.Random(seed)
    jobs = []
    for user in STEADY_USERS:
        at = 0.0
        for _ in range(STEADY_JOBS):
            at += rng.expovariate(STEADY_JOBS)  # Poisson arrivals, STEADY_JOBS over the window on average
            jobs.append(TraceJob(min(at, 1.0), user, rng.choices(range(3), POPULARITY)[0], rng.random() < 0.7,
                                 rng.choice((1, 1, 1, 2, 4)), rng.randrange(2**31)))
    # The burst: 30 jobs within a moment, a fifth of the way in (a script, say), one image each,
    # of the same models as everyone's.
    for i in range(BURST_JOBS):
        jobs.append(TraceJob(0.2 + i * 0.001, BURST_USER, rng.choices(range(3), POPULARITY)[0], rng.random() < 0.7,
                             1, rng.randrange(2**31)))
    return sorted(jobs, key=lambda j: j.at)


@dataclass(frozen=True)
class Model:
    name: str
    sizes: tuple[int, int]  # (native, other)
    steps: int


def spec_of(job: TraceJob, models: list[Model], index: int) -> JobSpec:
    model = models[job.model]
    side = model.sizes[0] if job.native else model.sizes[1]
    return JobSpec(model=model.name, prompt=f"mixed bench {index}", width=side, height=side, steps=model.steps,
                   count=job.count, seed=job.seed, user=job.user)


# --------------------------------------------------------------------------- #
# the configurations


def write_config(path: Path, home: Path, policy: str, catalog: list[str], *, devices: list[str], default: str,
                 device_budget: int | None, resident: int) -> None:
    if policy == "atelier":
        scheduler = ['policy = "fair"']
        node = [f"resident_models = {resident}"]
    elif policy == "fifo":
        scheduler = ['policy = "fifo"']
        node = ["resident_models = 1"]
    elif policy == "fifo-disk":
        scheduler = ['policy = "fifo"', "preload = false"]
        node = ["resident_models = 1", "staging = false"]
    else:
        scheduler = ['policy = "fifo"', "preload = false", "max_batch = 1"]
        node = ["resident_models = 0", "staging = false"]
    if device_budget is not None:
        # The stand-ins take no memory: the host RAM of a GPU box for staging, its GPU for residency.
        node += [f"device_budget_bytes = {device_budget}", "stage_budget_bytes = 512_000_000_000"]
    lines = [f'home = "{home}"', "builtin_models = false", f'default_model = "{default}"', "",
             "[scheduler]", *scheduler, "", "[node]", f"devices = {devices!r}".replace("'", '"'), *node, "",
             *catalog]
    path.write_text("\n".join(lines) + "\n")


def gpu_catalog(profile: dict, folder: Path, time_scale: float) -> tuple[list[Model], list[str], int]:
    from atelier.families.costmodel import write_model

    models, lines = [], []
    for name, key, steps in (("sd15", "sd15", 30), ("sdxl", "sdxl", 30), ("flux-schnell", "flux", 4)):
        entry = profile["models"][key]
        path = write_model(folder / name, entry, time_scale=time_scale)
        native = int(entry["default_resolution"])
        other = next(int(r) for r in entry["step_s"] if int(r) != native)
        models.append(Model(name, (native, other), steps))
        lines += [f'[models."{name}"]', 'family = "costmodel"', f'source = "{path}"', f"default_width = {native}",
                  f"default_height = {native}", f"default_steps = {steps}", "max_batch = 8", ""]
    budget = int(profile["device"]["memory_bytes"] * 0.9)  # atelier's default share of a GPU
    return models, lines, budget


def cpu_catalog(folder: Path) -> tuple[list[Model], list[str]]:
    from atelier.runtime import quiet_model_libraries

    quiet_model_libraries()  # before the libraries load: building the models would draw progress bars
    from atelier.tiny_models import build_tiny_sd, build_tiny_sdxl

    models, lines = [], []
    for name, build in (("tiny-sd", build_tiny_sd), ("tiny-sdxl", build_tiny_sdxl), ("tiny-sd-b", build_tiny_sd)):
        path = folder / name
        if not (path / "model_index.json").is_file():
            build(path)
        models.append(Model(name, (64, 128), 4))
        lines += [f'[models."{name}"]', f'family = "{"sdxl" if "sdxl" in name else "sd1"}"', f'source = "{path}"',
                  'dtype = "float32"', "default_width = 64", "default_height = 64", "default_steps = 4", ""]
    return models, lines


# --------------------------------------------------------------------------- #
# one run


async def replay(system: overhead.System, trace: list[TraceJob], models: list[Model], window_s: float,
                 timeout: float) -> tuple[float, float, list[JobRecord]]:
    async with AtelierClient(system.router, system.pub) as client:
        specs = [spec_of(job, models, i) for i, job in enumerate(trace)]
        start = time.time()

        async def submit_at(job: TraceJob, spec: JobSpec) -> None:
            await asyncio.sleep(max(0.0, start + job.at * window_s - time.time()))
            await client.submit(spec, timeout=30, events=False)

        await asyncio.gather(*(submit_at(job, spec) for job, spec in zip(trace, specs, strict=True)))
        results = await asyncio.gather(*(client.wait(spec.id, timeout=timeout) for spec in specs))
        return start, time.time(), [r.job for r in results]


def run_policy(policy: str, catalog: list[str], models: list[Model], trace: list[TraceJob], *, devices: list[str],
               device_budget: int | None, window_s: float, args: argparse.Namespace, label: str) -> dict:
    from atelier.runtime import run

    tmp = Path(tempfile.mkdtemp(prefix=f"atelier-bench-mixed-{label}-{policy}-"))
    config = tmp / "atelier.toml"
    write_config(config, tmp / "home", policy, catalog, devices=devices, default=models[0].name,
                 device_budget=device_budget, resident=len(models))
    system = overhead.System(home=tmp / "home", log_path=tmp / "up.log", config=config, log_level="INFO")
    try:
        system.start(timeout=180)
        system.settle(timeout=120)
        try:
            start, end, records = run(replay(system, trace, models, window_s, args.timeout))
        finally:
            leftovers = system.stop()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"start": start, "end": end, "records": records, "leftovers": leftovers, "dir": tmp}


def waits(records: list[JobRecord]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per user: each job's wait (submit to start) and turn wait (its turn to start), in seconds."""
    by_user: dict[str, list[JobRecord]] = {}
    for r in sorted(records, key=lambda r: r.submitted_at):
        by_user.setdefault(r.spec.user, []).append(r)
    plain: dict[str, list[float]] = {}
    turn: dict[str, list[float]] = {}
    for user, mine in by_user.items():
        earlier_started = 0.0  # when every earlier job of this user had started
        for r in mine:
            began = r.started_at or r.finished_at or r.submitted_at  # never started: until it ended
            plain.setdefault(user, []).append(began - r.submitted_at)
            turn.setdefault(user, []).append(max(0.0, began - max(r.submitted_at, earlier_started)))
            earlier_started = max(earlier_started, began)
    return plain, turn


def summarise(result: dict, scale: float) -> dict:
    records = result["records"]
    done = [r for r in records if r.state is JobState.done]
    wall = (max(r.finished_at for r in records) - result["start"]) / scale
    # Device time spent running pipelines, over all runners: batching shrinks it; what is left of
    # the runners' wall time went to loading models and to waiting for work.
    calls = {r.batch_id: (r.started_at, r.finished_at) for r in records if r.batch_id and r.started_at}
    running = sum(end - begin for begin, end in calls.values()) / scale
    runners = len({r.runner for r in records if r.runner})
    plain, turn = waits(records)
    p95 = {user: overhead.percentile(w, 0.95) / scale for user, w in sorted(plain.items())}
    p95_turn = {user: overhead.percentile(w, 0.95) / scale for user, w in sorted(turn.items())}
    latency = [(r.finished_at - r.submitted_at) / scale for r in records]
    best = min(p95_turn.values())
    return {"done": len(done), "failed": [r for r in records if r.state is not JobState.done], "wall": wall,
            "throughput": len(done) / wall, "p95": p95, "p95_turn": p95_turn, "running": running,
            "running_share": running / (runners * wall) if runners else 0.0,
            "fairness": max(p95_turn.values()) / best if best else float("inf"),
            "latency_p50": statistics.median(latency), "latency_p95": overhead.percentile(latency, 0.95),
            "leftovers": result["leftovers"], "dir": result["dir"]}


def report(title: str, figures: dict[str, dict], keep: bool) -> tuple[float, float, float, int]:
    print(title)
    users = list(next(iter(figures.values()))["p95"])
    names = " ".join(f"{u:>6}" for u in users)
    print(f"  {'policy':<9} {'wall s':>7} {'jobs/s':>7} {'atelier x':>9} {'running s (%)':>14} "
          f"{'latency p50/p95 s':>17}  p95 wait s: {names}  p95 turn wait s: {names}  fairness")
    base = figures["atelier"]["throughput"]
    status = 0
    for policy, f in figures.items():
        plain = " ".join(f"{f['p95'][u]:6.1f}" for u in users)
        turn = " ".join(f"{f['p95_turn'][u]:6.1f}" for u in users)
        print(f"  {policy:<9} {f['wall']:>7.1f} {f['throughput']:>7.3f} {base / f['throughput']:>9.2f} "
              f"{f['running']:>7.1f} ({f['running_share']:>3.0%}) "
              f"{f['latency_p50']:>7.1f} / {f['latency_p95']:<7.1f}  {'':>11}{plain}  {'':>16}{turn}  "
              f"{f['fairness']:>8.2f}")
        for record in f["failed"]:
            print(f"  FAILED ({policy}) job {record.spec.id} ({record.spec.model}) ended {record.state.value}: "
                  f"{record.reason}")
            status = 1
        for line in f["leftovers"]:
            print(f"  warning ({policy}): {line}")
        if keep:
            print(f"  ({policy}: config and up.log kept in {f['dir']})")
    vs_fifo = base / figures["fifo"]["throughput"]
    vs_reload = base / figures["reload"]["throughput"]
    return vs_fifo, vs_reload, figures["atelier"]["fairness"], status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, default=REPO / "bench" / "profiles" / "h100.toml")
    parser.add_argument("--time-scale", type=float, default=0.25, help="profile times are multiplied by this")
    parser.add_argument("--gpu-window", type=float, default=20.0,
                        help="arrival window of the trace on the GPU profile, in profile seconds")
    parser.add_argument("--cpu-window", type=float, default=3.0, help="arrival window for the real tiny models")
    parser.add_argument("--gpus", type=int, default=2, help="runners standing in for GPUs")
    parser.add_argument("--only", choices=("gpu", "cpu"))
    parser.add_argument("--timeout", type=float, default=900.0, help="give up on a run's results after")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder (config, up.log)")
    args = parser.parse_args(argv)

    trace = make_trace()
    users = sorted({j.user for j in trace})
    print(f"mixed: {len(trace)} jobs from {len(users)} users ({', '.join(STEADY_USERS)}: {STEADY_JOBS} each, "
          f"steady; {BURST_USER}: a burst of {BURST_JOBS}), 3 models, seed {SEED}; {os.cpu_count()} CPUs here")
    status = 0
    lines = []
    work = Path(tempfile.mkdtemp(prefix="atelier-bench-mixed-models-"))
    try:
        if args.only in (None, "cpu"):
            models, catalog = cpu_catalog(work / "tiny")
            figures = {p: summarise(run_policy(p, catalog, models, trace, devices=["cpu"], device_budget=None,
                                               window_s=args.cpu_window, args=args, label="cpu"), 1.0)
                       for p in POLICIES}
            vs_fifo, vs_reload, fairness, bad = report(
                f"real tiny models on this CPU ({', '.join(m.name for m in models)}; 64 or 128 px, 4 steps; "
                f"one runner; arrivals over {args.cpu_window:.0f} s)", figures, args.keep)
            status |= bad
            lines.append(f"real-models: vs_fifo={vs_fifo:.2f} vs_reload={vs_reload:.2f} fairness={fairness:.2f}")
        if args.only in (None, "gpu"):
            profile = tomllib.loads(args.profile.read_text())
            models, catalog, budget = gpu_catalog(profile, work / "costmodel", args.time_scale)
            devices = [f"cpu:{i}" for i in range(args.gpus)]
            figures = {p: summarise(run_policy(p, catalog, models, trace, devices=devices, device_budget=budget,
                                               window_s=args.gpu_window * args.time_scale, args=args,
                                               label="gpu"), args.time_scale)
                       for p in POLICIES}
            vs_fifo, vs_reload, fairness, bad = report(
                f"GPU profile ({args.profile.name}: {profile['device']['name']}; {args.gpus} runners; "
                f"{', '.join(f'{m.name} {m.sizes[0]}/{m.sizes[1]} px' for m in models)}; arrivals over "
                f"{args.gpu_window:.0f} s; run at x{args.time_scale} time, figures in profile seconds)",
                figures, args.keep)
            status |= bad
            lines.append(f"RESULT vs_fifo={vs_fifo:.2f} vs_reload={vs_reload:.2f} fairness={fairness:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for line in lines:
        print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
