"""Images as the user types: 20 keystrokes 80 ms apart into one live session.

A live session (``JobSpec.session``, priority ``live``) keeps at most one pending job: each new
prompt replaces the queued one and stops the running one at its next step, so the last prompt
starts almost at once instead of waiting behind every stale one. This benchmark types a prompt
one keystroke at a time into a fresh ``atelier up`` (built-in tiny-sd on this CPU, one runner):
each keystroke submits the prompt so far, 80 ms after the one before, without waiting.

Figures, side by side in one run:

- *plain*: one generation of the same size and steps on an idle system, submit to image (the
  median of ``--plain`` runs): the least a prompt can take.
- *live*: the latency from the last keystroke to its image, and the share of the 20 prompts that
  were rendered at all (each rendered stale prompt is compute the user did not need): the median
  latency and the mean share over ``--trials`` typings (one latency is one sample of a noisy VM).
- *no session* (the baseline): the same keystrokes as plain jobs, every one rendered, as a bot
  without live sessions would (atelier still batches them); the last prompt's latency again.

    python bench/live.py [--keystrokes 20] [--interval 0.08] [--size 128] [--steps 4] [--trials 5]

Last line: ``RESULT last_latency_ratio=<live last latency / plain> rendered_fraction=<rendered / typed>``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the atelier modules live at the root
sys.path.insert(0, str(REPO / "bench"))

import overhead  # noqa: E402

from actors.messages import JobResult  # noqa: E402
from atelier.jobs import JobSpec, JobState, Priority  # noqa: E402
from frontends.client import AtelierClient  # noqa: E402

TEXT = "a lighthouse on a cliff at dusk, oil painting"


def prompts(keystrokes: int) -> list[str]:
    """What the box holds after each of the last ``keystrokes`` keystrokes of typing TEXT."""
    return [TEXT[: len(TEXT) - keystrokes + 1 + i] for i in range(keystrokes)]


async def plain(client: AtelierClient, args: argparse.Namespace) -> list[float]:
    times = []
    for i in range(args.plain):
        spec = JobSpec(model=args.model, prompt=f"{TEXT} {i}", width=args.size, height=args.size, steps=args.steps)
        started = time.perf_counter()
        result = await client.generate(spec, timeout=120)
        assert result.job.state is JobState.done, result.job.reason
        times.append(time.perf_counter() - started)
    return times


async def typing(client: AtelierClient, args: argparse.Namespace, *, live: bool) -> tuple[float, list[JobResult]]:
    """Types the prompt; returns the last keystroke's latency to its image, and every job's result."""
    session = uuid.uuid4().hex if live else None
    specs = [JobSpec(model=args.model, prompt=p, width=args.size, height=args.size, steps=args.steps, seed=1,
                     user="typist", session=session, priority=Priority.live if live else Priority.interactive)
             for p in prompts(args.keystrokes)]
    start = time.perf_counter()
    typed_at = []
    for i, spec in enumerate(specs):
        await asyncio.sleep(max(0.0, start + i * args.interval - time.perf_counter()))
        typed_at.append(time.perf_counter())
        await client.submit(spec, events=False)
    last = await client.wait(specs[-1].id, timeout=300)
    latency = time.perf_counter() - typed_at[-1]
    results = [await client.wait(spec.id, timeout=300) for spec in specs]
    assert last.job.state is JobState.done, last.job.reason
    return latency, results


async def measure(system: overhead.System, args: argparse.Namespace) -> dict:
    async with AtelierClient(system.router, system.pub) as client:
        await plain(client, args)  # warm: the model resident, the worker's first-call costs paid
        plain_s = statistics.median(await plain(client, args))
        trials = [await typing(client, args, live=True) for _ in range(args.trials)]
        naive_s, naive_results = await typing(client, args, live=False)
    return {"plain": plain_s, "live": statistics.median(latency for latency, _ in trials),
            "live_all": [latency for latency, _ in trials],
            "live_rendered": statistics.mean(_rendered(results) for _, results in trials),
            "live_superseded": statistics.mean(_superseded(results) for _, results in trials),
            "naive": naive_s, "naive_results": naive_results}


def _rendered(results: list[JobResult]) -> int:
    return sum(r.job.state is JobState.done for r in results)


def _superseded(results: list[JobResult]) -> int:
    return sum("superseded" in (r.job.reason or "") for r in results)


def main(argv: list[str] | None = None) -> int:
    from atelier.runtime import run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keystrokes", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.08, help="seconds between keystrokes")
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--plain", type=int, default=5, help="plain generations for the median")
    parser.add_argument("--trials", type=int, default=5, help="typings into live sessions, for the median")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="atelier-bench-live-"))
    system = overhead.System(home=tmp / "home", log_path=tmp / "up.log")
    try:
        system.start(timeout=180)
        system.settle(timeout=120)
        try:
            figures = run(measure(system, args))
        finally:
            leftovers = system.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    live_rendered = figures["live_rendered"]
    print(f"live: {args.keystrokes} keystrokes {args.interval * 1000:.0f} ms apart, {args.model} "
          f"{args.size}x{args.size}, {args.steps} steps, one runner on this CPU")
    print(f"  {'':<28} {'last keystroke to image s':>26} {'x plain':>8} {'prompts rendered':>17}")
    print(f"  {'plain generation (idle)':<28} {figures['plain']:>26.3f} {1:>8.2f} {'':>17}")
    print(f"  {'live session (median)':<28} {figures['live']:>26.3f} {figures['live'] / figures['plain']:>8.2f} "
          f"{live_rendered:>11.1f} / {args.keystrokes}")
    naive = figures["naive"]
    print(f"  {'no session (batched as usual)':<28} {naive:>26.3f} {naive / figures['plain']:>8.2f} "
          f"{_rendered(figures['naive_results']):>11} / {args.keystrokes}")
    print("  live, each typing's latency s: " + " ".join(f"{s:.3f}" for s in figures["live_all"]))
    print(f"  superseded per typing: {figures['live_superseded']:.1f} (cancelled, never delivered as the latest)")
    for line in leftovers:
        print(f"warning: {line}")
    print(f"RESULT last_latency_ratio={figures['live'] / figures['plain']:.2f} "
          f"rendered_fraction={live_rendered / args.keystrokes:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
