"""What a model switch costs: diffusers reading the disk, a runner mapping staged weights, a raw copy.

A full-size SD-1.5-shaped pipeline with random weights (UNet, VAE and CLIP text encoder at
their real shapes, a tiny byte-level tokenizer, float16: about 2 GB of safetensors) is
generated once and cached. Then, side by side in one run, each repeated ``--repeats`` times:

1. disk     ``StableDiffusionPipeline.from_pretrained(folder, dtype=float16)``: diffusers' own
            path. The files sit in the page cache after the first load; the first load is
            also made after asking the kernel to drop the folder's pages
            (``posix_fadvise(DONTNEED)``, no root needed) and reported on its own.
2. staged   the loader has already staged the folder into a ``/dev/shm`` segment (timed once,
            as ``stage``); a switch is ``map_segment`` + ``state_dicts`` + ``build_pipeline``,
            what a runner does on the CPU.
3. raw      one plain memory copy of the segment's bytes into a preallocated buffer: the
            least any loader could spend putting those bytes somewhere else.

Neither load reads the weight bytes: the staged pipeline's tensors are views of the segment,
and diffusers (0.42, with safetensors files of the requested dtype) memory-maps the files too.
The pages are mapped in when first used, so after each load the bench also times reading one
byte of every weight page once (``+ touch``): minor faults from the page cache or the segment
when warm, real disk reads after the page cache was dropped.

With CUDA it also times staged -> GPU (map shared, pin, build, upload as the family does)
against a raw pinned host-to-device copy of the same bytes and prints the bandwidth ratio.

    python bench/model_switch.py [--repeats 3] [--cache DIR]

The last line printed is machine-readable:
``RESULT disk_s=... staged_s=... raw_s=... staged_vs_disk=... staged_vs_raw=...``.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the atelier modules live at the root

import torch  # noqa: E402

from atelier import staging  # noqa: E402

MODEL_NAME = "sd15-random-fp16"
GB = 1e9


# --------------------------------------------------------------------------- #
# the model: real SD-1.5 shapes, random weights, generated once


def default_cache() -> Path:
    home = os.environ.get("ATELIER_HOME")
    return Path(home) / "bench" if home else Path("/tmp/atelier-bench")


def cached_model(cache: Path, name: str, build: Callable[[Path], None]) -> tuple[Path, float | None]:
    """The model folder ``cache/name``, built by ``build`` the first time; and how long that took
    (None: it was cached). Shared with bench/preload.py."""
    target = cache / name
    if (target / "model_index.json").is_file():
        return target, None
    cache.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would keep the folder from other users
        os.rename(tmp, target)  # complete or absent, never half written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, time.perf_counter() - started


def _build_model(path: Path) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from atelier.tiny_models import _scheduler, _tokenizer

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        tokenizer = _tokenizer()  # 514 byte-level tokens: only the embedding table is smaller than CLIP's
        text_encoder = CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14's text tower, as in SD 1.5
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        vae = AutoencoderKL(  # SD 1.5's VAE config
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, norm_num_groups=32, sample_size=512,
        )
        unet = UNet2DConditionModel(  # SD 1.5's UNet config
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                              "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
        pipe = StableDiffusionPipeline(
            vae=vae.half().eval(), text_encoder=text_encoder.half().eval(), tokenizer=tokenizer,
            unet=unet.half().eval(), scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(path, safe_serialization=True)  # no variant: the plain file names


# --------------------------------------------------------------------------- #
# helpers


def evict_page_cache(folder: Path) -> None:
    """Asks the kernel to drop the folder's clean cached pages (a hypervisor may still cache them)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def resident_fraction(files: list[Path]) -> str:
    """How much of the files the page cache holds, per util-linux's fincore, or '?'."""
    if not shutil.which("fincore"):
        return "?"
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
                             capture_output=True, text=True, check=True).stdout.split()
        return f"{sum(map(int, out)) / sum(p.stat().st_size for p in files):.0%}"
    except (subprocess.CalledProcessError, ValueError):
        return "?"


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def median(samples: list[float]) -> float:
    return statistics.median(samples)


# --------------------------------------------------------------------------- #
# the three ways


def touch(pipe) -> float:
    """Seconds to read one byte of every page of every weight once: the faults a first generation pays."""
    started = time.perf_counter()
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for tensor in [*module.parameters(), *module.buffers()]:
                if tensor.numel():
                    tensor.detach().reshape(-1).view(torch.uint8)[::4096].sum()
    return time.perf_counter() - started


def load_disk(folder: Path) -> tuple[float, float]:
    """Seconds for from_pretrained; then seconds to touch every weight page once."""
    from diffusers import StableDiffusionPipeline

    started = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float16, local_files_only=True)
    took = time.perf_counter() - started
    touched = touch(pipe)
    del pipe
    release()
    return took, touched


def load_staged(folder: Path, segment: Path, table: list) -> tuple[float, float]:
    """Seconds to map and build, as a runner does; then seconds to touch every weight page once."""
    started = time.perf_counter()
    mapping = staging.map_segment(segment)
    weights = staging.state_dicts(mapping, table)
    pipe = staging.build_pipeline(folder, weights, dtype=torch.float16)
    took = time.perf_counter() - started
    touched = touch(pipe)
    del pipe, weights, mapping
    release()
    return took, touched


def raw_copies(segment: Path, repeats: int) -> tuple[float, list[float]]:
    """The first copy (page faults on both sides), then ``repeats`` copies between faulted buffers."""
    mapping = staging.map_segment(segment)
    source = torch.frombuffer(mapping, dtype=torch.uint8)
    target = torch.empty(source.numel(), dtype=torch.uint8)  # preallocated, not yet touched
    started = time.perf_counter()
    target.copy_(source)
    first = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - started)
    del source, target, mapping
    release()
    return first, times


# --------------------------------------------------------------------------- #
# CUDA only: staged -> GPU against a raw pinned host-to-device copy


def cuda_figures(folder: Path, segment: Path, table: list, repeats: int) -> list[str]:
    from atelier.families.loading import upload  # the families' upload, timed apart from the build

    n = os.stat(segment).st_size
    torch.zeros(1, device="cuda")  # the CUDA context, outside every timing
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    raw = []
    for i in range(repeats + 1):  # the first copy warms the caching allocator; it is not counted
        torch.cuda.synchronize()
        started = time.perf_counter()
        device_copy = host.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        if i:
            raw.append(time.perf_counter() - started)
        del device_copy
    del host
    release()

    totals, pins, uploads = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        mapping = staging.map_segment(segment, shared=True)
        handle = staging.pin(mapping)
        pinned = time.perf_counter()
        try:
            pipe = staging.build_pipeline(folder, staging.state_dicts(mapping, table), dtype=torch.float16)
            built = time.perf_counter()
            upload(pipe, "cuda")
            done = time.perf_counter()
        finally:
            staging.unpin(handle)
        totals.append(done - started)
        pins.append(pinned - started)
        uploads.append(done - built)
        assert pipe.unet.device.type == "cuda"
        del pipe, handle, mapping
        release()

    raw_bw = n / median(raw) / GB
    upload_bw = n / median(uploads) / GB
    return [
        f"  {'raw pinned H2D copy':<26}{median(raw):>9.3f} s  {raw_bw:6.1f} GB/s  host.to('cuda', non_blocking) + sync",
        f"  {'staged -> GPU, total':<26}{median(totals):>9.3f} s  {n / median(totals) / GB:6.1f} GB/s"
        f"  map shared + pin + build + upload",
        f"  {'  of which pin':<26}{median(pins):>9.3f} s  {'':>12}  cudaHostRegister of the segment",
        f"  {'  of which upload':<26}{median(uploads):>9.3f} s  {upload_bw:6.1f} GB/s"
        f"  {upload_bw / raw_bw:.0%} of the pinned copy's bandwidth (aim: 80%)",
    ]


# --------------------------------------------------------------------------- #


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed loads of each kind (default 3)")
    parser.add_argument("--cache", type=Path, default=default_cache(),
                        help="where the generated model is kept (default $ATELIER_HOME/bench or /tmp/atelier-bench)")
    args = parser.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # one "kept in float32: []" warning per load would bury the table
    diffusers_logging.disable_progress_bar()
    if staging.SHM_ROOT is None:
        print("no /dev/shm on this machine: nothing to stage into", file=sys.stderr)
        return 1

    # Import everything the loads use, so that no timing pays for a first import.
    import diffusers  # noqa: F401
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    folder, generated = cached_model(args.cache, MODEL_NAME, _build_model)
    files = [path for _, path in staging.plan(folder)]
    weight_bytes = sum(p.stat().st_size for p in files)
    print(f"model {folder}: {len(files)} safetensors files, {weight_bytes / GB:.2f} GB float16"
          + (f" (generated in {generated:.0f}s)" if generated is not None else " (cached)"), flush=True)

    segment = staging.SHM_ROOT / f"atelier-bench-model-switch-{os.getpid()}"
    try:
        load_disk(folder)  # untimed: the first call in a process pays lazy imports and one-off set-up
        evict_page_cache(folder)
        before = resident_fraction(files)
        disk_cold, disk_cold_touch = load_disk(folder)
        print(f"disk, cold-ish: {disk_cold:.2f}s + first touch {disk_cold_touch:.2f}s "
              f"(page cache held {before} of the files before)", flush=True)

        evict_page_cache(folder)
        before = resident_fraction(files)
        started = time.perf_counter()
        table = staging.stage(folder, segment)
        stage_s = time.perf_counter() - started
        print(f"staged into {segment} in {stage_s:.2f}s (page cache held {before} of the files before)",
              flush=True)
        load_staged(folder, segment, table)  # untimed, as for the disk: first-call costs are not a switch's

        disk, disk_touch, staged, staged_touch = [], [], [], []
        for i in range(args.repeats):  # interleaved, so that a noisy neighbour hurts both alike
            took, touched = load_disk(folder)
            disk.append(took)
            disk_touch.append(touched)
            took, touched = load_staged(folder, segment, table)
            staged.append(took)
            staged_touch.append(touched)
            print(f"  repeat {i + 1}: disk {disk[-1]:.3f}s (+ touch {disk_touch[-1]:.3f}s)  "
                  f"staged {staged[-1]:.3f}s (+ touch {staged_touch[-1]:.3f}s)", flush=True)
        raw_first, raw = raw_copies(segment, args.repeats)

        n = os.stat(segment).st_size
        disk_s, staged_s, raw_s = median(disk), median(staged), median(raw)
        rows = [
            ("disk, first (cold-ish)", disk_cold, disk_cold_touch,
             "from_pretrained after posix_fadvise(DONTNEED) of the folder"),
            ("disk (from_pretrained)", disk_s, median(disk_touch),
             f"page cache warm (files read by the runs before); median of {len(disk)}"),
            ("stage (loader, once)", stage_s, None,
             f"folder -> /dev/shm, page cache dropped first; {n / stage_s / GB:.2f} GB/s"),
            ("staged (map + build)", staged_s, median(staged_touch),
             f"map_segment + state_dicts + build_pipeline; median of {len(staged)}"),
            ("raw copy", raw_s, None, f"segment -> preallocated buffer, both faulted; {n / raw_s / GB:.1f} GB/s"),
            ("raw copy, first", raw_first, None,
             f"into freshly allocated memory, page faults included; {n / raw_first / GB:.2f} GB/s"),
        ]
        print(f"\nmodel switch, {n / GB:.2f} GB of float16 weights, CPU ({torch.get_num_threads()} threads)")
        print(f"  {'':<24}{'load s':>8}  {'+ touch s':>9}  note")
        for name, seconds, touched, note in rows:
            extra = f"{touched:9.3f}" if touched is not None else f"{'':9}"
            print(f"  {name:<24}{seconds:8.3f}  {extra}  {note}")
        print("  (+ touch: reading one byte of every weight page once after the load, which the first"
              " generation pays: both loads map their weights lazily)")
        if torch.cuda.is_available():
            print(f"\nCUDA ({torch.cuda.get_device_name()}), medians of {args.repeats}:")
            try:
                for line in cuda_figures(folder, segment, table, args.repeats):
                    print(line)
            except Exception as exc:  # the CPU figures still stand; say why the GPU ones are missing
                print(f"  CUDA figures failed: {type(exc).__name__}: {exc}")
        print(f"RESULT disk_s={disk_s:.3f} staged_s={staged_s:.3f} raw_s={raw_s:.3f} "
              f"staged_vs_disk={disk_s / staged_s:.1f} staged_vs_raw={staged_s / raw_s:.2f}")
    finally:
        segment.unlink(missing_ok=True)
        segment.with_name(segment.name + ".partial").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
