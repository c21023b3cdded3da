"""What training a LoRA through atelier costs against the same loop run directly, and what a crash loses.

Three figures, measured in one run on one machine:

1. direct     ``atelier.training.LoraTrainer`` driven in this process, step after step, on a model
              loaded here: the raw limit of this loop on this machine (steps per second).
2. atelier    the same training (same model, images, settings, seed) submitted to a running atelier
              (``atelier up``: broker, scheduler, node, runner as processes), timed from its Progress
              events: every step is one trip to the runner's worker thread, a Progress event, and a
              checkpoint handed to the scheduler every ``checkpoint_every`` steps.
              ``train_overhead`` = 1 - atelier's steps/s over direct's (the aim: at most 0.05).
3. crash      a second training whose runner is SIGKILLed mid-interval; the node restarts it and the
              training resumes from its newest checkpoint. ``resume_lost_steps``: the steps run before
              the kill that were run again after it (at most ``checkpoint_every``).

    python bench/train.py [--model tiny-sd] [--steps 200] [--checkpoint-every 50] [--resolution 64]

Last line: ``RESULT train_overhead=… resume_lost_steps=… checkpoint_every=…``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from chaos import pid_of  # noqa: E402
from overhead import System  # noqa: E402

from actors.messages import JobResult, Progress  # noqa: E402
from atelier.jobs import JobInputs, JobKind, JobSpec, JobState, TrainSpec  # noqa: E402
from frontends.client import AtelierClient  # noqa: E402


def images(side: int) -> list[bytes]:
    """Two instance images with something to learn: a square of one colour on another."""
    from PIL import Image

    found = []
    for color in ((200, 30, 30), (30, 30, 200)):
        image = Image.new("RGB", (side, side), color)
        image.paste((255 - color[0], 255 - color[1], 255 - color[2]), (side // 4, side // 4, side // 2, 3 * side // 4))
        out = io.BytesIO()
        image.save(out, format="PNG")
        found.append(out.getvalue())
    return found


def training(args: argparse.Namespace, name: str, steps: int) -> tuple[JobSpec, JobInputs]:
    train = TrainSpec(name=name, steps=steps, resolution=args.resolution, rank=4, learning_rate=1e-3,
                      checkpoint_every=args.checkpoint_every, sample_every=10 * steps)  # no samples: steps only
    spec = JobSpec(kind=JobKind.train, model=args.model, prompt="a photo of sks cube", seed=7, train=train,
                   user="bench-train")
    return spec, JobInputs(train_images=images(args.resolution))


def direct_steps_per_s(args: argparse.Namespace, home: Path) -> float:
    """The loop alone: the model loaded here, the trainer stepped back to back (warm-up steps excluded)."""
    from PIL import Image

    from atelier.config import load_config
    from atelier.families import get_family
    from atelier.families.loaded import LoadRequest
    from atelier.tiny_models import ensure_builtin
    from atelier.training import LoraTrainer

    config = load_config(None)
    entry = config.models[args.model]
    path = ensure_builtin(entry.source.removeprefix("builtin:"), home / "models")
    model = get_family(entry.family).load(LoadRequest.for_entry(entry, path, device="cpu", model_cache=home / "models"))
    spec, inputs = training(args, "direct", args.steps)
    instance = [(Image.open(io.BytesIO(data)).convert("RGB"), spec.prompt) for data in inputs.train_images]
    trainer = LoraTrainer(model.pipe, entry.family, spec.train, instance, device="cpu", seed=spec.seed)
    try:
        trainer.train_step()  # the first step pays for lazy set-up, as atelier's first step does too
        started = time.perf_counter()
        for _ in range(args.steps - 1):
            trainer.train_step()
        return (args.steps - 1) / (time.perf_counter() - started)
    finally:
        trainer.close()


async def atelier_steps_per_s(client: AtelierClient, args: argparse.Namespace) -> float:
    """The same training through atelier, timed between its first and last Progress events."""
    spec, inputs = training(args, "through-atelier", args.steps)
    await client.submit(spec, inputs=inputs)
    stamps: dict[int, float] = {}
    async for event in client.events(spec.id, timeout=3600):
        if isinstance(event, Progress):
            stamps[event.step] = time.perf_counter()
        elif isinstance(event, JobResult):
            if event.job.state is not JobState.done:
                raise RuntimeError(f"the training {event.job.state.value}: {event.job.reason}")
            break
    first, last = min(stamps), max(stamps)
    return (last - first) / (stamps[last] - stamps[first])


async def steps_lost_to_a_kill(client: AtelierClient, system: System, args: argparse.Namespace) -> tuple[int, int]:
    """Kills the runner half way between two checkpoints; (the step it was killed at, the steps run again)."""
    every = args.checkpoint_every
    kill_at = 2 * every + every // 2
    spec, inputs = training(args, "killed", kill_at + every)
    await client.submit(spec, inputs=inputs)
    seen: list[int] = []
    killed_at = None
    async for event in client.events(spec.id, timeout=3600):
        if isinstance(event, Progress):
            seen.append(event.step)
            if killed_at is None and event.step >= kill_at:
                killed_at = event.step
                os.kill(pid_of(system, "actors.runner"), signal.SIGKILL)
        elif isinstance(event, JobResult):
            if event.job.state is not JobState.done:
                raise RuntimeError(f"the killed training {event.job.state.value}: {event.job.reason}")
            break
    after = seen[seen.index(killed_at) + 1:]
    resumed = next(step for step in after if step <= killed_at)  # the first step the restarted runner ran
    return killed_at, killed_at - (resumed - 1)


async def through_atelier(args: argparse.Namespace, home: Path) -> tuple[float, int, int]:
    system = System(home, home / "up.log")
    system.start(timeout=300)
    try:
        system.settle(60)
        async with AtelierClient(system.router, system.pub) as client:
            rate = await atelier_steps_per_s(client, args)
            killed_at, lost = await steps_lost_to_a_kill(client, system, args)
        return rate, killed_at, lost
    finally:
        system.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="atelier-bench-train-") as folder:
        home = Path(folder)
        os.environ["ATELIER_HOME"] = str(home)
        direct = direct_steps_per_s(args, home)
        rate, killed_at, lost = asyncio.run(through_atelier(args, home))
    overhead = 1 - rate / direct
    print(f"{'':24}{'steps/s':>10}{'vs direct':>11}")
    print(f"{'direct loop (raw limit)':24}{direct:>10.2f}{1.0:>11.3f}")
    print(f"{'through atelier':24}{rate:>10.2f}{rate / direct:>11.3f}")
    print(f"SIGKILL at step {killed_at}: {lost} steps run again (checkpoint every {args.checkpoint_every}); "
          f"a training without checkpoints loses all {killed_at}")
    print(f"RESULT train_overhead={overhead:.3f} resume_lost_steps={lost} checkpoint_every={args.checkpoint_every}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
