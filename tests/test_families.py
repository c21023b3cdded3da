"""Family adapters end to end on the tiny builtin models (CPU, no network)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# Before anything imports huggingface_hub: nothing here may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from atelier import tiny_models  # noqa: E402
from atelier.families import GenerateRequest, get_family  # noqa: E402
from atelier.families.loaded import LoadRequest  # noqa: E402
from atelier.preview import encode_jpeg  # noqa: E402
from atelier.registry import FAMILY_LIMITS  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def _request(seed: int = 1, steps: int = 2, count: int = 2) -> GenerateRequest:
    return GenerateRequest.single(
        prompt="a red cube",
        negative_prompt="blurry",
        width=64,
        height=64,
        steps=steps,
        guidance=5.0,
        seed=seed,
        count=count,
    )


def _ignore_steps(*_: Any) -> None:
    pass


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


# The generic checks below are for families that make images from text; the others have tests of their own.
IMAGE_MODELS = sorted(name for name, family in tiny_models.BUILTIN.items()
                      if FAMILY_LIMITS[family].media == "image" and "txt2img" in FAMILY_LIMITS[family].kinds)


@pytest.fixture(scope="module", params=IMAGE_MODELS)
def loaded(request: pytest.FixtureRequest, tiny_model) -> tuple[Any, Any]:
    family, pipe, _ = tiny_model(request.param)
    return family, pipe


def test_generate_images_steps_and_preview(loaded: tuple[Any, Any]) -> None:
    family, pipe = loaded
    seen: list[tuple[int, int, Any]] = []
    images = family.generate(pipe, _request(), lambda i, n, lat: seen.append((i, n, lat.clone())))

    assert len(images) == 2
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in images)
    assert [(i, n) for i, n, _ in seen] == [(1, 2), (2, 2)]
    latents = seen[-1][2]
    # Spatial latents, 8x smaller than the image: 4 channels (SD, SDXL, PixArt…), 16 (SD3, FLUX).
    assert latents.shape[0] == 2 and latents.shape[1] in (4, 16) and latents.shape[2:] == (8, 8)

    rgb = family.preview(latents)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert max(rgb.shape[:2]) <= 256
    assert encode_jpeg(rgb).startswith(b"\xff\xd8")


def test_one_step_without_guidance_as_turbo_models_run_for_live_use(loaded: tuple[Any, Any]) -> None:
    # SD-Turbo and SDXL-Turbo are sd1 and sdxl checkpoints run at 1 step and guidance 0 (their catalog
    # defaults); every image family must take that, not only the turbo ones.
    family, pipe = loaded
    seen: list[int] = []
    request = GenerateRequest.single(prompt="a red cube", negative_prompt=None, width=64, height=64, steps=1,
                                     guidance=0.0, seed=3, count=1)
    if family.name == "pixart-alpha":  # its pipeline steps once only with a consistency scheduler: says so
        with pytest.raises(ValueError, match="runs a single step only with a consistency-style scheduler"):
            family.generate(pipe, request, lambda i, n, lat: seen.append(n))
        return
    (image,) = family.generate(pipe, request, lambda i, n, lat: seen.append(n))
    assert image.size == (64, 64) and seen == [1]


def test_same_seed_same_pixels(loaded: tuple[Any, Any]) -> None:
    family, pipe = loaded
    first = [np.asarray(im) for im in family.generate(pipe, _request(seed=7), _ignore_steps)]
    again = [np.asarray(im) for im in family.generate(pipe, _request(seed=7), _ignore_steps)]
    other = [np.asarray(im) for im in family.generate(pipe, _request(seed=8), _ignore_steps)]

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])
    # Per-image seeds: the images of one batch differ from each other too.
    assert not np.array_equal(first[0], first[1])


def test_broken_model_fails_in_generate_not_load(tmp_path: Path) -> None:
    path = tiny_models.build_tiny_sd(tmp_path / "broken", text_max_positions=8)
    family = get_family("sd1")
    pipe = family.load(LoadRequest(path, device="cpu"))
    with pytest.raises(Exception, match="max_position_embeddings"):
        family.generate(pipe, _request(count=1), _ignore_steps)


def test_families_package_does_not_import_torch() -> None:
    # The scheduler imports these, and the noop family must measure overhead
    # without torch in the process.
    code = (
        "import sys, atelier.families, atelier.preview\n"
        "atelier.families.get_family('noop'), atelier.families.get_family('costmodel')\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_ensure_builtin_is_idempotent(model_cache: Path) -> None:
    path = tiny_models.ensure_builtin("tiny-sd", model_cache)
    mtime = (path / "model_index.json").stat().st_mtime_ns
    assert tiny_models.ensure_builtin("tiny-sd", model_cache) == path
    assert (path / "model_index.json").stat().st_mtime_ns == mtime


def test_ensure_builtin_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="tiny-nope"):
        tiny_models.ensure_builtin("tiny-nope", tmp_path)


def test_ensure_builtin_loses_race_gracefully(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "tiny-sd"

    def build_while_another_process_finishes_first(path: Path) -> Path:
        (path / "model_index.json").write_text("{}")
        target.mkdir()
        (target / "model_index.json").write_text('{"winner": true}')
        return path

    monkeypatch.setitem(tiny_models._BUILDERS, "tiny-sd", build_while_another_process_finishes_first)
    assert tiny_models.ensure_builtin("tiny-sd", tmp_path) == target
    assert (target / "model_index.json").read_text() == '{"winner": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-sd"]  # the loser's temp copy is gone


def test_builds_are_deterministic(tmp_path: Path) -> None:
    def digest(path: Path) -> str:
        h = hashlib.sha256()
        for f in sorted(path.rglob("*.safetensors")):
            h.update(f.read_bytes())
        return h.hexdigest()

    a = tiny_models.build_tiny_sd(tmp_path / "a")
    b = tiny_models.build_tiny_sd(tmp_path / "b")
    assert digest(a) == digest(b)


def test_noop_family() -> None:
    family = get_family("noop")
    pipe = family.load(LoadRequest(None, device="cpu", options={"step_s": 0.0}))
    steps: list[tuple[int, int, Any]] = []
    images = family.generate(pipe, _request(steps=3, count=2), lambda *a: steps.append(a))

    assert steps == [(1, 3, None), (2, 3, None), (3, 3, None)]
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    again = family.generate(pipe, _request(steps=1, count=1), _ignore_steps)
    other = family.generate(pipe, _request(seed=2, steps=1, count=1), _ignore_steps)
    assert again[0].getpixel((0, 0)) == images[0].getpixel((0, 0)) != other[0].getpixel((0, 0))
    assert family.preview(None).dtype == np.uint8


def test_limits_cover_every_family() -> None:
    # Every family has its limits and its adapter, and every built-in tiny model is of a family.
    assert set(FAMILY_LIMITS) >= set(tiny_models.BUILTIN.values()) | {"noop", "costmodel"}
    for name, limits in FAMILY_LIMITS.items():
        assert get_family(name).name == name
        assert limits.default_width <= limits.max_width and limits.default_height <= limits.max_height


COSTS = {"bytes": 7_000_000_000, "disk_load_s": 5.0, "staged_load_s": 0.5, "stage_s": 1.2, "default_resolution": 64,
         "step_s": {"64": [0.01, 0.012, 0.02, 0.04], "128": [0.03, 0.05, 0.1, 0.2]}, "vae_decode_s": 0.0}


def test_the_cost_model_sleeps_its_profiles_times_and_declares_its_size(tmp_path: Path) -> None:
    from atelier.families.costmodel import write_model

    folder = write_model(tmp_path / "sdxl-h100", COSTS, time_scale=0.1)
    family = get_family("costmodel")
    started = time.monotonic()
    model = family.load(LoadRequest(folder, device="cpu"))
    from_disk = model.pipe
    disk_s = time.monotonic() - started
    started = time.monotonic()
    family.load(LoadRequest(folder, device="cpu", weights={"stand_in": {}}))
    staged_s = time.monotonic() - started
    assert disk_s >= 0.5 > staged_s >= 0.05  # 5 s and 0.5 s at a tenth of the time
    assert from_disk.nbytes == 7_000_000_000
    assert from_disk.seconds_per_step(64 * 64, 4) == pytest.approx(0.002)  # profiled: 0.02 s, scaled
    assert from_disk.seconds_per_step(64 * 64, 3) == pytest.approx(0.0016)  # between batch 2 and 4
    assert from_disk.seconds_per_step(64 * 64, 16) == pytest.approx(0.008)  # past 8: the line from 4 to 8
    assert from_disk.seconds_per_step(112 * 112, 1) == pytest.approx(0.003 * 112 * 112 / (128 * 128))  # nearest: 128

    steps: list[int] = []
    request = GenerateRequest(prompts=("a", "b"), negative_prompts=(None, None), seeds=(1, 2), width=64,
                              height=64, steps=5, guidance=1.0)
    started = time.monotonic()
    images = family.generate(model, request, lambda i, n, lat: steps.append(i))
    assert time.monotonic() - started >= 5 * 0.0012
    assert steps == [1, 2, 3, 4, 5] and [im.size for im in images] == [(64, 64)] * 2
    assert images[0].getpixel((0, 0)) != images[1].getpixel((0, 0))


def test_a_stand_in_is_staged_at_its_declared_size_without_using_memory(tmp_path: Path) -> None:
    from atelier import staging
    from atelier.families.costmodel import write_model

    folder = write_model(tmp_path / "big", COSTS, time_scale=0.0)
    files = staging.plan(folder)
    assert staging.planned_bytes(files) == 7_000_000_000
    segment = tmp_path / "segment"
    table = staging.stage(folder, segment)
    assert staging.segment_bytes(table) == 7_000_000_000 == segment.stat().st_size
    assert segment.stat().st_blocks * 512 < 1 << 20  # a hole, not 7 GB of memory
    assert staging.state_dicts(staging.map_segment(segment), table) == {"stand_in": {}}
