"""What a VRAM lease costs: the time from asking to "granted", and the throughput a trace keeps while another
program borrows the GPU now and then, against the same trace undisturbed and against what a bot does today.

One ``atelier up`` with one runner whose device budget is 24 GB, serving a cost-model model of 12 GB (a GPU's
sizes and step times, slept instead of computed: the processes, messages, eviction and budgets are real).
Side by side in one run:

1. grant, idle    the model resident, the runner idle: ``take_lease`` (8 GB beyond what is free: the model is
                  evicted) until granted, ``--repeats`` times (median).
2. grant, busy    a ``--batch-s`` batch running, asked a third of the way in: a plain lease (waits for the
                  batch to end) and an urgent one (the batch hands itself back at its next step, requeued).
3. throughput     ``--jobs`` jobs submitted at once, three ways: undisturbed; with a lease every ``--period``
                  seconds held ``--hold`` seconds (each evicts the model: the next job loads it again); and the
                  naive baseline, a bot that frees the GPU by stopping atelier and starting it again after
                  ``--hold`` seconds (the journal keeps the queue). Throughput is images a second from the
                  first submit to the last result; "kept" is with leases over undisturbed, and "of the
                  possible" divides that by the share of the time the GPU was atelier's.

    python bench/lease.py [--jobs 48] [--period 5] [--hold 2] [--repeats 5]

The last line printed is machine-readable:
``RESULT grant_idle_s=… grant_busy_s=… grant_urgent_s=… throughput_kept=… naive_kept=…``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the atelier modules live at the root

from atelier.families.costmodel import write_model  # noqa: E402
from atelier.jobs import JobSpec, JobState  # noqa: E402
from atelier.runtime import READY_PREFIX  # noqa: E402
from frontends.client import AtelierClient  # noqa: E402

GB = 10**9
BUDGET, MODEL, LEASE = 24 * GB, 12 * GB, 20 * GB
STEP_S = 0.025


class Up:
    """``atelier up`` on fixed loopback ports (so a client finds it again after the naive baseline restarts it)."""

    def __init__(self, home: Path, config: Path, log: Path):
        self.home, self.config, self.log = home, config, log
        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        self.router, self.pub = (f"tcp://127.0.0.1:{port}" for port in ports)
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> float:
        began = time.monotonic()
        env = dict(os.environ, ATELIER_HOME=str(self.home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        env.pop("ATELIER_CONFIG", None)
        self._log = open(self.log, "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "frontends.cli", "up", "--router", self.router, "--pub", self.pub, "--http", "off",
             "--config", str(self.config), "--log-level", "INFO"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True, start_new_session=True)
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"atelier up exited early; see {self.log}")
            if line.startswith(READY_PREFIX):
                return time.monotonic() - began
        raise RuntimeError(f"atelier up was not ready in {timeout:.0f}s; see {self.log}")

    def stop(self, timeout: float = 60.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._log.close()


def write_config(folder: Path) -> Path:
    model = write_model(folder / "cm-12g", {"bytes": MODEL, "disk_load_s": 0.5, "staged_load_s": 0.2, "stage_s": 0.3,
                                            "default_resolution": 64, "step_s": {"64": [STEP_S] * 4},
                                            "vae_decode_s": 0.0})
    config = folder / "atelier.toml"
    config.write_text("\n".join([
        "builtin_models = false", 'default_model = "cm-12g"', "[node]", 'devices = ["cpu:0"]', "resident_models = 1",
        f"device_budget_bytes = {BUDGET}", "[models.cm-12g]", 'family = "costmodel"', f'source = "{model}"',
        "default_width = 64", "default_height = 64", "default_steps = 40"]) + "\n")
    return config


def job(prompt: str, steps: int = 40) -> JobSpec:
    return JobSpec(model="cm-12g", prompt=prompt, steps=steps, user="bench", seed=1)


async def _until(client: AtelierClient, job_id: str, state: JobState, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (await client.job(job_id)).state is not state:
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} never reached {state.value}")
        await asyncio.sleep(0.01)


async def grants(up: Up, repeats: int, batch_s: float) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"idle": [], "busy": [], "urgent": []}
    steps = max(4, int(batch_s / STEP_S))
    async with AtelierClient(up.router, up.pub) as client:
        for i in range(repeats):
            await client.generate(job(f"warm {i}", 4), timeout=60)  # the model resident, the runner idle
            asked = time.monotonic()
            lease = await client.take_lease("cpu:0", LEASE, 60, holder="bench", wait_s=60)
            out["idle"].append(time.monotonic() - asked)
            await client.end_lease(lease.id)
            for kind in ("busy", "urgent"):
                spec = job(f"{kind} {i}", steps)
                await client.submit(spec, events=False)
                await _until(client, spec.id, JobState.running)
                await asyncio.sleep(batch_s / 3)  # a third of the way into the batch
                asked = time.monotonic()
                lease = await client.take_lease("cpu:0", LEASE, 60, holder="bench", urgent=kind == "urgent", wait_s=60)
                out[kind].append(time.monotonic() - asked)
                await client.end_lease(lease.id)
                result = await client.wait(spec.id, timeout=120)
                assert result.job.state is JobState.done and result.job.attempts == 1, result.job
    return out


async def trace(up: Up, jobs: int, *, disturb: str | None, period: float, hold: float) -> dict[str, float]:
    """The trace's wall time and the seconds the GPU was lent (``disturb``: "lease", "restart" or None)."""
    lent = 0.0
    async with AtelierClient(up.router, up.pub) as client:
        specs = [job(f"trace {disturb} {i}") for i in range(jobs)]
        began = time.monotonic()
        for spec in specs:
            await client.submit(spec, events=False)

        async def disturber() -> None:
            nonlocal lent
            while True:
                await asyncio.sleep(period - hold)
                if disturb == "lease":
                    lease = await client.take_lease("cpu:0", LEASE, 60, holder="bench", wait_s=60)
                    granted = time.monotonic()
                    await asyncio.sleep(hold)
                    await client.end_lease(lease.id)
                    lent += time.monotonic() - granted
                else:  # what a bot does today: stop atelier, use the GPU, start atelier again
                    stopped = time.monotonic()
                    await asyncio.to_thread(up.stop)
                    await asyncio.sleep(hold)
                    lent += time.monotonic() - stopped
                    await asyncio.to_thread(up.start)

        task = asyncio.create_task(disturber()) if disturb else None
        failed = 0
        try:
            for spec in specs:
                result = await client.wait(spec.id, timeout=600)
                failed += result.job.state is not JobState.done  # a restart mid-batch counts an attempt
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        wall = time.monotonic() - began
    return {"wall": wall, "lent": lent, "images_per_s": (jobs - failed) / wall, "failed": failed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=48)
    parser.add_argument("--period", type=float, default=5.0, help="a lease every this many seconds")
    parser.add_argument("--hold", type=float, default=2.0, help="each held this long")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-s", type=float, default=2.0, help="the busy runner's batch")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="atelier-bench-lease-"))
    config = write_config(work)
    figures: dict[str, dict] = {}
    try:
        for name, disturb in (("undisturbed", None), ("leases", "lease"), ("naive restart", "restart")):
            up = Up(work / f"home-{name.split()[0]}", config, work / f"up-{name.split()[0]}.log")
            up.start()
            try:
                if disturb is None:
                    figures["grants"] = asyncio.run(grants(up, args.repeats, args.batch_s))
                figures[name] = asyncio.run(trace(up, args.jobs, disturb=disturb, period=args.period,
                                                  hold=args.hold))
            finally:
                up.stop()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    g = {kind: statistics.median(times) for kind, times in figures["grants"].items()}
    base = figures["undisturbed"]
    print(f"grant (median of {args.repeats}, a {LEASE / GB:.0f} GB lease evicting a {MODEL / GB:.0f} GB model):")
    print(f"  idle runner            {g['idle']:7.3f} s")
    print(f"  busy, waits for batch  {g['busy']:7.3f} s   (the {args.batch_s:.1f} s batch asked a third of the way in)")
    print(f"  busy, urgent           {g['urgent']:7.3f} s   (the batch handed back at its next step, requeued)")
    print(f"\nthroughput over {args.jobs} jobs of {40 * STEP_S:.1f} s (batched as they queue), the GPU lent "
          f"{args.hold:.0f} s in every {args.period:.0f} s:")
    print(f"  {'run':<15} {'wall s':>8} {'lent s':>8} {'images/s':>9} {'kept':>6} {'of possible':>12} {'failed':>7}")
    kept = {}
    for name in ("undisturbed", "leases", "naive restart"):
        f = figures[name]
        kept[name] = f["images_per_s"] / base["images_per_s"]
        possible = 1 - f["lent"] / f["wall"]
        print(f"  {name:<15} {f['wall']:8.2f} {f['lent']:8.2f} {f['images_per_s']:9.3f} {kept[name]:6.2f} "
              f"{kept[name] / possible if possible > 0 else 0:12.2f} {f['failed']:7d}")
    print(json.dumps({"grants": g, **{k: figures[k] for k in ("undisturbed", "leases", "naive restart")}}))
    print(f"RESULT grant_idle_s={g['idle']:.3f} grant_busy_s={g['busy']:.3f} grant_urgent_s={g['urgent']:.3f} "
          f"throughput_kept={kept['leases']:.3f} naive_kept={kept['naive restart']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
