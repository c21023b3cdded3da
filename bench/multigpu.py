"""Gangs: what one costs per job on this CPU, and the adaptive choice between a gang and singles.

Every run starts a fresh ``atelier up`` (as bench/mixed.py does) and changes only its configuration.

(a) The gang's own cost. The same short job (a cost-model model whose load, steps and decode cost
    nothing, 64x64, one step) runs one at a time through a single-device runner and through a real
    two-rank gang (two processes in one gloo process group): the difference is what a gang adds per
    job: rank 0 broadcasting the batch to the other rank over the process group, both ranks
    running it, agreeing that it ended, and rank 0 sending the result. Milliseconds, p50 of
    ``--overhead-jobs`` jobs after a warm-up.

(b) The adaptive gang. FLUX.1-dev, 1024x1024, 28 steps, on the cost-model family with xDiT's published
    compiled figures (``bench/profiles/h100-flux-gang.toml``: 4.30 s on one H100, 1.63 s on a gang of
    four with Ulysses-4), four devices ("cpu:0".."cpu:3" standing in for four H100s), three setups:

    - ``singles``: four single-device runners (``devices = [cpu:0..cpu:3]``), the model without a layout;
    - ``static``: one gang of the four (``gangs = [[cpu:0..cpu:3]]``, ``devices = []``);
    - ``adaptive``: both over the same four devices: the scheduler chooses per batch, by load, from
      measured step times (atelier/scheduling/planner.py, "Gang or singles").

    Each setup is warmed up (a burst, then a lone job: every runner loads the model and measures its
    step time), then runs two phases:

    - low load: ``--low-jobs`` jobs one at a time, each ``--spacing`` profile seconds after the last
      (longer than one job on one device, so nothing queues): p50 latency, submit to result;
    - high load: a burst of ``--burst`` jobs at once (deeper than four): throughput, jobs per profile
      second from the first submit to the last result.

    Times run at ``--time-scale`` (the profile's seconds times it) and are reported in profile seconds.

    python bench/multigpu.py [--time-scale 0.2] [--only overhead|adaptive] [--keep]

Last line: ``RESULT gang_overhead_ms=… low_load_latency_gain=… high_load_throughput_ratio=…``: (a)'s
gang p50 minus the single's; the singles' low-load p50 over adaptive's (aim: at least 2; the profile's
ideal is 4.30 / 1.63 = 2.64); adaptive's high-load throughput over the singles' (aim: at least 0.95).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the atelier modules live at the root
sys.path.insert(0, str(REPO / "bench"))

import overhead  # noqa: E402

from atelier.jobs import JobSpec, JobState  # noqa: E402
from frontends.client import AtelierClient  # noqa: E402

PROFILE = REPO / "bench" / "profiles" / "h100-flux-gang.toml"
MODEL = "flux-compiled"  # the profile's model, and its name in the catalog
DEVICES = [f"cpu:{i}" for i in range(4)]
GANG_BACKEND = "diffusers"  # the gang backend that runs on the CPU (xfuser needs CUDA)
# (a): a cost-model model that costs nothing, on one device and on a gang of two.
ZERO = {"bytes": 1_000_000, "disk_load_s": 0.0, "staged_load_s": 0.0, "stage_s": 0.0, "default_resolution": 64,
        "step_s": {"64": [0.0, 0.0, 0.0, 0.0]}, "gang_step_s": {"2": {"64": [0.0, 0.0, 0.0, 0.0]}},
        "vae_decode_s": 0.0}
SETUPS = ("singles", "static", "adaptive")


# --------------------------------------------------------------------------- #
# configurations


def model_lines(name: str, path: Path, *, side: int, steps: int, layout: int | None) -> list[str]:
    lines = [f'[models."{name}"]', 'family = "costmodel"', f'source = "{path}"', f"default_width = {side}",
             f"default_height = {side}", f"default_steps = {steps}", "max_batch = 8", ""]
    if layout is not None:
        lines += [f'[models."{name}".parallel]', f'backend = "{GANG_BACKEND}"', f"ulysses_degree = {layout}", ""]
    return lines


def write_config(path: Path, home: Path, *, devices: list[str], gangs: list[list[str]], models: list[str],
                 default: str, device_budget: int | None = None) -> None:
    def toml_list(items: list) -> str:
        return repr(items).replace("'", '"')

    node = [f"devices = {toml_list(devices)}", f"gangs = {toml_list(gangs)}", "resident_models = 1"]
    if device_budget is not None:
        # A GPU's share for residency (the stand-ins take no memory). No staging: FLUX's 34 GB is more than
        # many a /dev/shm holds (the loader's budget is bounded by it), and loads happen in the warm-up only.
        node += [f"device_budget_bytes = {device_budget}", "staging = false"]
    lines = [f'home = "{home}"', "builtin_models = false", f'default_model = "{default}"', "",
             "[node]", *node, "", *models]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class Run:
    system: overhead.System
    folder: Path


def start(label: str, write: Callable[[Path, Path], None], args: argparse.Namespace) -> Run:
    folder = Path(tempfile.mkdtemp(prefix=f"atelier-bench-multigpu-{label}-"))
    config = folder / "atelier.toml"
    write(config, folder / "home")
    system = overhead.System(home=folder / "home", log_path=folder / "up.log", config=config, log_level="INFO")
    try:
        system.start(timeout=300)
    except BaseException:
        print(f"  ({label}: atelier up failed; config and up.log in {folder})", file=sys.stderr)
        raise
    system.settle(timeout=180)
    return Run(system, folder)


def stop(run: Run, label: str, args: argparse.Namespace, failed: bool) -> list[str]:
    leftovers = run.system.stop()
    if args.keep or failed:
        print(f"  ({label}: config and up.log kept in {run.folder})")
    else:
        shutil.rmtree(run.folder, ignore_errors=True)
    return leftovers


# --------------------------------------------------------------------------- #
# jobs


@dataclass(frozen=True)
class Timed:
    submitted: float  # wall clock, seconds
    ended: float
    state: JobState
    runner: str | None
    reason: str | None


async def timed(client: AtelierClient, spec: JobSpec, timeout: float) -> Timed:
    submitted = time.time()
    await client.submit(spec, timeout=60, events=False)
    result = await client.wait(spec.id, timeout=timeout)
    return Timed(submitted, time.time(), result.job.state, result.job.runner, result.job.reason)


def flux_job(tag: str, i: int) -> JobSpec:
    return JobSpec(model=MODEL, prompt=f"multigpu {tag} {i}", width=1024, height=1024, steps=28, seed=i,
                   user="bench")


async def burst(client: AtelierClient, tag: str, n: int, timeout: float) -> list[Timed]:
    return list(await asyncio.gather(*(timed(client, flux_job(tag, i), timeout) for i in range(n))))


async def spaced(client: AtelierClient, tag: str, n: int, every_s: float, timeout: float) -> list[Timed]:
    out = []
    for i in range(n):
        began = time.monotonic()
        out.append(await timed(client, flux_job(tag, i), timeout))
        await asyncio.sleep(max(0.0, began + every_s - time.monotonic()))
    return out


def failures(results: list[Timed]) -> list[str]:
    return [f"job ended {r.state.value}: {r.reason}" for r in results if r.state is not JobState.done]


# --------------------------------------------------------------------------- #
# (a) the gang's own cost


async def overhead_jobs(run: Run, args: argparse.Namespace) -> tuple[list[float], set[str], list[str]]:
    async with AtelierClient(run.system.router, run.system.pub) as client:
        def spec(i: int) -> JobSpec:
            return JobSpec(model="zero", prompt=f"gang overhead {i}", width=64, height=64, steps=1, seed=0,
                           user="bench")

        for i in range(args.warmup):
            await timed(client, spec(i), 120)
        results = [await timed(client, spec(args.warmup + i), 60) for i in range(args.overhead_jobs)]
    return [(r.ended - r.submitted) * 1000 for r in results], {r.runner or "?" for r in results}, failures(results)


def measure_overhead(work: Path, args: argparse.Namespace) -> tuple[float, float, list[str]]:
    from atelier.families.costmodel import write_model
    from atelier.runtime import run as run_async

    path = write_model(work / "zero", ZERO)
    figures: dict[str, float] = {}
    problems: list[str] = []
    for label, devices, gangs, layout in (("single", ["cpu:0"], [], None), ("gang-2", [], [["cpu:0", "cpu:1"]], 2)):
        run = start(f"overhead-{label}", lambda config, home, d=devices, g=gangs, lay=layout: write_config(
            config, home, devices=d, gangs=g, default="zero",
            models=model_lines("zero", path, side=64, steps=1, layout=lay)), args)
        failed = True
        try:
            latencies, runners, bad = run_async(overhead_jobs(run, args))
            failed = bool(bad)
        finally:
            problems += [f"{label}: {line}" for line in stop(run, f"overhead-{label}", args, failed)]
        problems += [f"{label}: {line}" for line in bad]
        figures[label] = statistics.median(latencies)
        print(f"  {label:<8} p50 {figures[label]:7.2f} ms  p90 {overhead.percentile(latencies, 0.9):7.2f} ms  "
              f"({len(latencies)} jobs one at a time, on {', '.join(sorted(runners))})")
    return figures["single"], figures["gang-2"], problems


# --------------------------------------------------------------------------- #
# (b) the adaptive trace


@dataclass
class Phases:
    low: list[Timed]
    high: list[Timed]
    warm: list[Timed]
    gangs: set[str]  # the runners that are gangs


async def phases(run: Run, args: argparse.Namespace) -> Phases:
    scale = args.time_scale
    timeout = 600.0
    async with AtelierClient(run.system.router, run.system.pub) as client:
        # Warm-up: a burst (every single loads the model and measures it; batch sizes are tried), then
        # lone jobs (the gang does the same), so that both phases start from what a server that has
        # been up a while knows.
        warm = await burst(client, "warm", args.warm_burst, timeout)
        warm += await spaced(client, "warm-lone", 2, args.spacing * scale, timeout)
        low = await spaced(client, "low", args.low_jobs, args.spacing * scale, timeout)
        await asyncio.sleep(args.spacing * scale)
        high = await burst(client, "high", args.burst, timeout)
        status = await client.status()
    return Phases(low, high, warm, {r.name for r in status.runners if r.capabilities.gang > 1})


def measure_adaptive(work: Path, args: argparse.Namespace) -> tuple[dict[str, dict], list[str]]:
    from atelier.families.costmodel import write_model
    from atelier.runtime import run as run_async

    profile = tomllib.loads(args.profile.read_text())
    entry = profile["models"][MODEL]
    path = write_model(work / MODEL, entry, time_scale=args.time_scale)
    budget = int(profile["device"]["memory_bytes"] * 0.9)  # atelier's default share of a GPU
    layouts = {"singles": (DEVICES, [], None), "static": ([], [DEVICES], len(DEVICES)),
               "adaptive": (DEVICES, [DEVICES], len(DEVICES))}
    figures: dict[str, dict] = {}
    problems: list[str] = []
    for setup in args.setups:
        devices, gangs, layout = layouts[setup]
        run = start(setup, lambda config, home, d=devices, g=gangs, lay=layout: write_config(
            config, home, devices=d, gangs=g, default=MODEL, device_budget=budget,
            models=model_lines(MODEL, path, side=1024, steps=28, layout=lay)), args)
        failed = True
        try:
            result = run_async(phases(run, args))
            bad = failures(result.warm + result.low + result.high)
            failed = bool(bad)
        finally:
            problems += [f"{setup}: {line}" for line in stop(run, setup, args, failed)]
        problems += [f"{setup}: {line}" for line in bad]
        scale = args.time_scale
        low = [(r.ended - r.submitted) / scale for r in result.low]
        wall = (max(r.ended for r in result.high) - min(r.submitted for r in result.high)) / scale
        figures[setup] = {
            "low_p50": statistics.median(low), "low_p90": overhead.percentile(low, 0.9),
            "high_jobs_per_s": len(result.high) / wall, "high_wall": wall,
            "low_on": _where(result.low, result.gangs), "high_on": _where(result.high, result.gangs)}
    return figures, problems


def _where(results: list[Timed], gangs: set[str]) -> str:
    """Which runners ran the jobs: 'gang' and 'single' counts."""
    gang = sum(1 for r in results if r.runner in gangs)
    return f"{gang} gang / {len(results) - gang} single"


# --------------------------------------------------------------------------- #


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, default=PROFILE)
    parser.add_argument("--time-scale", type=float, default=0.2, help="profile times are multiplied by this")
    parser.add_argument("--only", choices=("overhead", "adaptive"))
    parser.add_argument("--overhead-jobs", type=int, default=60, help="(a): jobs timed, one at a time")
    parser.add_argument("--warmup", type=int, default=10, help="(a): jobs before timing")
    parser.add_argument("--low-jobs", type=int, default=8, help="(b): jobs at low load, one at a time")
    parser.add_argument("--spacing", type=float, default=6.0, help="(b): profile seconds between low-load jobs")
    parser.add_argument("--burst", type=int, default=48, help="(b): jobs in the high-load burst")
    parser.add_argument("--warm-burst", type=int, default=8, help="(b): jobs in the warm-up burst")
    parser.add_argument("--setups", type=lambda text: text.split(","), default=list(SETUPS),
                        help="(b): which of singles,static,adaptive to run (default: all; singles is the baseline)")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder (config, up.log)")
    args = parser.parse_args(argv)
    if "singles" not in args.setups or set(args.setups) - set(SETUPS):
        parser.error(f"--setups: some of {', '.join(SETUPS)}, singles among them")

    status = 0
    gang_overhead = gain = ratio = float("nan")
    work = Path(tempfile.mkdtemp(prefix="atelier-bench-multigpu-models-"))
    try:
        if args.only in (None, "overhead"):
            print(f"(a) the gang's own cost per job: a zero-cost cost-model job (64x64, 1 step), one at a time, "
                  f"through one runner and through a two-rank gang ({GANG_BACKEND} backend, gloo); "
                  f"{os.cpu_count()} CPUs here")
            single, gang2, problems = measure_overhead(work, args)
            gang_overhead = gang2 - single
            print(f"  gang - single: {gang_overhead:.2f} ms per job")
            for line in problems:
                print(f"  FAILED {line}")
                status = 1
        if args.only in (None, "adaptive"):
            print(f"(b) adaptive gang: {MODEL} (xDiT's compiled FLUX.1-dev, {args.profile.name}) 1024x1024, 28 steps, "
                  f"on {len(DEVICES)} devices; low load: {args.low_jobs} jobs {args.spacing:g} s apart; high load: a "
                  f"burst of {args.burst}; run at x{args.time_scale} time, figures in profile seconds")
            figures, problems = measure_adaptive(work, args)
            base = figures["singles"]
            print(f"  {'setup':<9} {'low p50 s':>9} {'low p90 s':>9} {'gain':>6} {'low ran on':>19}  "
                  f"{'high jobs/s':>11} {'x singles':>9} {'high ran on':>20}")
            for setup, f in figures.items():
                print(f"  {setup:<9} {f['low_p50']:>9.2f} {f['low_p90']:>9.2f} {base['low_p50'] / f['low_p50']:>6.2f} "
                      f"{f['low_on']:>19}  {f['high_jobs_per_s']:>11.3f} "
                      f"{f['high_jobs_per_s'] / base['high_jobs_per_s']:>9.2f} {f['high_on']:>20}")
            if "adaptive" in figures:
                gain = base["low_p50"] / figures["adaptive"]["low_p50"]
                ratio = figures["adaptive"]["high_jobs_per_s"] / base["high_jobs_per_s"]
            for line in problems:
                print(f"  FAILED {line}")
                status = 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"RESULT gang_overhead_ms={gang_overhead:.2f} low_load_latency_gain={gain:.2f} "
          f"high_load_throughput_ratio={ratio:.2f}")
    return status


if __name__ == "__main__":
    sys.exit(main())
