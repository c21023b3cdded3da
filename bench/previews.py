"""What per-step previews cost: the same generation with and without them, in one run.

A preview is a linear projection of one image's latents to RGB, a JPEG of at most 256 px and an
event on the broker's PUB socket, every denoising step. The runner's step callback only copies
the image's latents; a thread of its own makes and publishes the picture, dropping stale ones,
so that the denoising does not wait for it. This benchmark measures what is left.

On a fresh ``atelier up`` (built-in tiny-sd, one runner on this machine), it runs ``--pairs``
pairs of the same job (same prompt, size, steps and seed), one with ``previews`` on and one with
them off, in alternating order so that drift on a noisy machine hits both alike, one job at a
time. Each job's time is the runner's, from the scheduler's timestamps: from the moment it
started running (model resident) to its result.

    python bench/previews.py [--pairs 30] [--size 256] [--steps 8] [--decoder]

``--decoder`` previews through a TAESD instead (a catalog entry's ``preview_decoder``): one of a real
TAESD's size, with random weights, so it costs what a real one does.

Last line: ``RESULT preview_overhead=<median with / median without - 1>`` (a fraction).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the atelier modules live at the root
sys.path.insert(0, str(REPO / "bench"))

import overhead  # noqa: E402

from atelier.jobs import JobSpec, JobState  # noqa: E402
from frontends.client import AtelierClient  # noqa: E402

MODEL = "tiny-sd"
DECODER_MODEL = "tiny-sd-taesd"


def decoder_catalog(folder: Path) -> Path:
    """A catalog with the built-in tiny-sd previewed through a TAESD of the real size."""
    from atelier.tiny.previews import build_tiny_taesd

    taesd = build_tiny_taesd(folder / "taesd", full_size=True)
    config = folder / "atelier.toml"
    config.write_text(f'builtin_models = true\ndefault_model = "{DECODER_MODEL}"\n'
                      f'[models.{DECODER_MODEL}]\nfamily = "sd1"\n'
                      f'source = "builtin:tiny-sd"\npreview_decoder = "{taesd}"\n')
    return config


async def measure(system: overhead.System, args: argparse.Namespace) -> tuple[dict[bool, list[float]], list[int]]:
    times: dict[bool, list[float]] = {True: [], False: []}
    seen: list[int] = []  # previews each job with previews on received before its result
    model = DECODER_MODEL if args.decoder else MODEL
    async with AtelierClient(system.router, system.pub) as client:

        async def one(previews: bool, i: int) -> float:
            spec = JobSpec(model=model, prompt="a lighthouse on a cliff", width=args.size, height=args.size,
                           steps=args.steps, seed=1, previews=previews)
            # Subscribed to the job's events, as a frontend that shows previews is.
            await client.submit(spec)
            previews_seen = 0
            async for event in client.events(spec.id, timeout=300):
                previews_seen += event.kind == "preview"
            result = await client.wait(spec.id, timeout=300)
            assert result.job.state is JobState.done, result.job.reason
            # A TAESD on a CPU takes about a second a preview: a short job may end before its first one.
            assert previews_seen == 0 if not previews else previews_seen > 0 or args.decoder, previews_seen
            if previews and i >= 0:
                seen.append(previews_seen)
            return result.job.finished_at - result.job.started_at

        for i in range(2):  # warm: the model resident, first-call costs paid
            await one(i == 0, -1)
        for i in range(args.pairs):
            order = (True, False) if i % 2 == 0 else (False, True)
            for previews in order:
                times[previews].append(await one(previews, i))
    return times, seen


def main(argv: list[str] | None = None) -> int:
    from atelier.runtime import run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--decoder", action="store_true", help="previews through a TAESD of the real size")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="atelier-bench-previews-"))
    config = decoder_catalog(tmp) if args.decoder else None
    system = overhead.System(home=tmp / "home", log_path=tmp / "up.log", config=config)
    try:
        system.start(timeout=180)
        system.settle(timeout=120)
        try:
            times, seen = run(measure(system, args))
        finally:
            leftovers = system.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with_, without = statistics.median(times[True]), statistics.median(times[False])
    through = " through a TAESD" if args.decoder else ""
    print(f"previews{through}: tiny-sd {args.size}x{args.size}, {args.steps} steps, {args.pairs} pairs, one runner "
          f"on this machine; time from running to result")
    print(f"  {'':<18} {'median s':>9} {'min s':>7} {'max s':>7}")
    for label, samples in (("with previews", times[True]), ("without", times[False])):
        print(f"  {label:<18} {statistics.median(samples):>9.3f} {min(samples):>7.3f} {max(samples):>7.3f}")
    print(f"  previews received per job with them on: {statistics.mean(seen):.1f} (from {min(seen)} to {max(seen)})")
    for line in leftovers:
        print(f"warning: {line}")
    print(f"RESULT preview_overhead={with_ / without - 1:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
