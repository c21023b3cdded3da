"""What preloading saves: a trace that switches models on every job, with preloading on and off.

Two SD-1.5-shaped pipelines, A and B, with random weights (float32, about 0.35 GB of safetensors
each; a UNet with SD 1.5's block layout at smaller widths, a small CLIP text encoder and VAE)
are generated once into ``--cache`` and shared by both runs. The node is configured so that
every job is a model switch and every switch needs the loader:

- ``[node] resident_models = 1``: the runner keeps one model; A, B, A, ... drops and rebuilds.
- ``[node] stage_budget_bytes`` = 1.5x one model: the loader holds one staged model at a time,
  so each switch needs the other model staged again (a copy from the page cache to /dev/shm).

The same trace runs twice, each on a fresh ``atelier up`` with its own ``ATELIER_HOME``:
``[scheduler] preload = true``, then ``false``. ``--jobs`` jobs (default 20) alternating A, B, ...
are all submitted at once, so the queue always holds the next job: preloading needs that
look-ahead to stage the next model while the runner is busy with the current one.

Per run it reports the wall time from the first submit to the last result, and per job (from
the scheduler's timestamps, in the order jobs started) the switch cost, ``started_at`` of a job
minus ``finished_at`` of the one before (the runner loading the model, plus atelier's own
hand-over), and the generation time, ``finished_at - started_at``.

    python bench/preload.py [--jobs 20] [--cache /tmp/atelier-bench]

The last line printed is machine-readable: ``RESULT preload_speedup=<off wall time / on wall time>``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the atelier modules live at the root
sys.path.insert(0, str(REPO / "bench"))

import overhead  # noqa: E402
from model_switch import cached_model, default_cache  # noqa: E402

from atelier.jobs import JobRecord, JobSpec, JobState  # noqa: E402
from frontends.client import AtelierClient  # noqa: E402

MODELS = ("preload-a", "preload-b")


# --------------------------------------------------------------------------- #
# the models: generated once, loaded with StableDiffusionPipeline.from_pretrained


def _build_model(path: Path, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from atelier.tiny_models import _scheduler, _tokenizer

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        tokenizer = _tokenizer()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 128, 128),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, norm_num_groups=32, sample_size=64,
        )
        unet = UNet2DConditionModel(  # SD 1.5's layout at 0.3x its widths
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(96, 192, 384, 384), attention_head_dim=8, cross_attention_dim=256,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                              "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
        pipe = StableDiffusionPipeline(
            vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
            scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(path, safe_serialization=True)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def devices() -> list[str]:
    """The runners' devices: every CUDA device when there is one (each runner pins and uploads its
    staged models), else the CPU."""
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]


def write_config(path: Path, home: Path, folders: dict[str, Path], budget: int, preload: bool) -> None:
    lines = [
        f'home = "{home}"',
        "builtin_models = false",
        f'default_model = "{MODELS[0]}"',
        "",
        "[scheduler]",
        f"preload = {'true' if preload else 'false'}",
        "",
        "[node]",
        f"devices = {json.dumps(devices())}",
        "resident_models = 1",
        f"stage_budget_bytes = {budget}",
    ]
    for name, folder in folders.items():
        lines += ["", f'[models."{name}"]', 'family = "sd1"', f'source = "{folder}"', 'dtype = "float32"',
                  "default_width = 64", "default_height = 64", "default_steps = 4"]
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- #
# one run


async def trace(system: overhead.System, jobs: int, timeout: float) -> tuple[float, list[JobRecord]]:
    async with AtelierClient(system.router, system.pub) as client:
        specs = [JobSpec(model=MODELS[i % 2], prompt=f"preload bench {i}", seed=i) for i in range(jobs)]
        start = time.perf_counter()
        await asyncio.gather(*(client.submit(spec, timeout=30, events=False) for spec in specs))
        results = await asyncio.gather(*(client.wait(spec.id, timeout=timeout) for spec in specs))
        return time.perf_counter() - start, [r.job for r in results]


def run_once(preload: bool, folders: dict[str, Path], budget: int, args: argparse.Namespace) -> dict:
    from atelier.runtime import run

    tmp = Path(tempfile.mkdtemp(prefix=f"atelier-bench-preload-{'on' if preload else 'off'}-"))
    config = tmp / "atelier.toml"
    write_config(config, tmp / "home", folders, budget, preload)
    # INFO logs in up.log: the stagings and evictions are what tell a reader why a figure is what it is.
    system = overhead.System(home=tmp / "home", log_path=tmp / "up.log", config=config, log_level="INFO")
    try:
        system.start(timeout=180)
        system.settle(timeout=120)  # start-up over, the default model (A) staged
        try:
            wall, records = run(trace(system, args.jobs, args.timeout))
        finally:
            leftovers = system.stop()
        log = system.log_path.read_text(errors="replace")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    failed = [r for r in records if r.state is not JobState.done]
    ordered = sorted(records, key=lambda r: r.started_at or 0.0)
    switches = [b.started_at - a.finished_at for a, b in zip(ordered, ordered[1:], strict=False)
                if a.finished_at and b.started_at]
    generate = [r.finished_at - r.started_at for r in records if r.finished_at and r.started_at]
    return {
        "wall": wall, "failed": failed, "switches": switches, "generate": generate,
        "staged": log.count("staged preload-"), "preload_failed": log.count("preload failed"),
        "held": log.count("held by models runners are loading now"), "leftovers": leftovers,
        "log_dir": tmp if args.keep else None, "ordered": ordered,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20, help="jobs in the trace, alternating A, B (default 20)")
    parser.add_argument("--cache", type=Path, default=default_cache(), help="where the two models are kept")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up on a run's results after")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder (config, up.log)")
    parser.add_argument("--timeline", action="store_true", help="print each job's start and finish")
    args = parser.parse_args(argv)

    folders, built = {}, []
    for seed, name in enumerate(MODELS):
        folders[name], took = cached_model(args.cache, name, functools.partial(_build_model, seed=seed))
        if took is not None:
            built.append(f"{name} in {took:.0f}s")
    size = max(folder_bytes(f) for f in folders.values())
    budget = int(size * 1.5)

    results = {label: run_once(preload, folders, budget, args) for label, preload in (("on", True), ("off", False))}

    print(f"preload: {args.jobs} jobs alternating {MODELS[0]}, {MODELS[1]} (sd1, float32, {size / 1e9:.2f} GB "
          f"each; 64x64, 4 steps) on {', '.join(devices())} ({os.cpu_count()} CPUs); resident_models=1, stage budget "
          f"{budget / 1e9:.2f} GB" + (f"; generated {', '.join(built)}" if built else ""))
    print(f"  {'preload':<8} {'wall s':>8} {'per job s':>10} {'switch p50 s':>13} {'switch mean s':>14} "
          f"{'generate p50 s':>15} {'stagings':>9} {'preloads failed':>16}")
    for label, r in results.items():
        print(f"  {label:<8} {r['wall']:>8.2f} {r['wall'] / args.jobs:>10.2f} "
              f"{statistics.median(r['switches']):>13.3f} {statistics.fmean(r['switches']):>14.3f} "
              f"{statistics.median(r['generate']):>15.3f} {r['staged']:>9} {r['preload_failed']:>16}")
    status = 0
    for label, r in results.items():
        if args.timeline:
            t0 = min(rec.submitted_at for rec in r["ordered"])
            print(f"timeline, preload {label} (s after the first submit: started, finished):")
            for rec in r["ordered"]:
                print(f"  {rec.spec.model}  {(rec.started_at or t0) - t0:8.2f}  {(rec.finished_at or t0) - t0:8.2f}")
        if r["held"]:
            print(f"note: preload {label}: {r['held']} stagings refused: budget held by models runners are loading now")
        if r["log_dir"]:
            print(f"preload {label}: config and up.log kept in {r['log_dir']}")
        for line in r["leftovers"]:
            print(f"warning: preload {label}: {line}")
        for record in r["failed"]:
            print(f"FAILED (preload {label}) job {record.spec.id} ({record.spec.model}) ended "
                  f"{record.state.value}: {record.reason}")
            status = 1
    print(f"RESULT preload_speedup={results['off']['wall'] / results['on']['wall']:.2f}")
    return status


if __name__ == "__main__":
    sys.exit(main())
