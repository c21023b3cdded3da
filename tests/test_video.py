"""The families that start from an image or make video: the SD x4 upscaler, Stable Video Diffusion and
AnimateDiff, on their tiny built-in models (CPU, no network), alone and through a running atelier."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageSequence

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub

from actors.actor import RemoteError  # noqa: E402
from actors.messages import JobResult, Preview, Progress
from atelier import staging  # noqa: E402
from atelier.families import GenerateRequest, get_family  # noqa: E402
from atelier.families.loaded import LoadRequest  # noqa: E402
from atelier.jobs import JobInputs, JobKind, JobSpec, JobState
from atelier.media import Video  # noqa: E402
from atelier.tiny_models import ensure_builtin  # noqa: E402
from tests.conftest import run  # noqa: E402

pytestmark = pytest.mark.timeout(180)

MODELS = ("tiny-sd-upscaler", "tiny-svd", "tiny-animatediff")


def _image(width: int, height: int) -> Image.Image:
    """A picture with something in it (a gradient and a square), not a flat colour."""
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    y = np.linspace(255, 0, height, dtype=np.uint8)[:, None, None]
    pixels = np.concatenate(np.broadcast_arrays(x, y, (x // 2 + y // 2)), axis=2).copy()
    pixels[height // 4:height // 2, width // 4:width // 2] = (250, 250, 40)
    return Image.fromarray(pixels)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    _image(width, height).save(buffer, format="PNG")
    return buffer.getvalue()


def _request(model: str, *, seed: int = 1, count: int = 2, steps: int = 3, **extra: Any) -> GenerateRequest:
    if model == "tiny-sd-upscaler":
        size = dict(width=32, height=24, image=_image(32, 24))
    elif model == "tiny-svd":
        size = dict(width=64, height=48, image=_image(64, 48), frames=3, fps=7)
    else:
        size = dict(width=64, height=48, frames=3, fps=8)
    return GenerateRequest.single(prompt="a lighthouse at dusk", negative_prompt="fog", steps=steps, guidance=5.0,
                                  seed=seed, count=count, **{**size, **extra})


def _ignore(*_: Any) -> None:
    pass


def _array(item: Any) -> np.ndarray:
    """An image, or a video's frames, as integers (frames, h, w, 3)."""
    frames = item.frames if isinstance(item, Video) else [item]
    return np.stack([np.asarray(frame, dtype=int) for frame in frames])


def _pixels(item: Any) -> list[bytes]:
    return [frame.tobytes() for frame in item.frames] if isinstance(item, Video) else [item.tobytes()]


@pytest.fixture(scope="module")
def models(atelier_home: Path) -> Path:
    return atelier_home / "models"


@pytest.fixture(scope="module")
def loaded(tiny_model) -> dict[str, tuple[Any, Any, Path]]:
    """Each tiny model, loaded once for the module: (family, pipeline, folder)."""
    return {model: tiny_model(model) for model in MODELS}


# --------------------------------------------------------------------------- #
# each family on its own


def test_the_upscaler_makes_images_four_times_the_input(loaded) -> None:
    family, pipe, _ = loaded["tiny-sd-upscaler"]
    seen: list[tuple[int, int, Any]] = []
    images = family.generate(pipe, _request("tiny-sd-upscaler"), lambda i, n, lat: seen.append((i, n, lat.clone())))

    assert [(im.size, im.mode) for im in images] == [((128, 96), "RGB")] * 2
    assert [(i, n) for i, n, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    latents = seen[-1][2]
    assert latents.shape == (2, 4, 24, 32)  # at the input's size
    rgb = family.preview(latents, 1)
    assert rgb.dtype == np.uint8 and rgb.shape == (96, 128, 3)  # no larger than the output


def test_svd_makes_one_video_per_seed_from_the_image(loaded) -> None:
    family, pipe, _ = loaded["tiny-svd"]
    seen: list[tuple[int, int, Any]] = []
    videos = family.generate(pipe, _request("tiny-svd"), lambda i, n, lat: seen.append((i, n, lat.clone())))

    assert all(isinstance(v, Video) and v.fps == 7 for v in videos) and len(videos) == 2
    assert [[(f.size, f.mode) for f in v.frames] for v in videos] == [[((64, 48), "RGB")] * 3] * 2
    assert [(i, n) for i, n, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    latents = seen[-1][2]
    assert latents.shape == (2, 3, 4, 6, 8)  # (videos, frames, channels, h, w)
    assert family.preview(latents, 1).shape == (48, 64, 3)
    # A video, not one picture repeated
    assert videos[0].frames[0].tobytes() != videos[0].frames[-1].tobytes()


def test_animatediff_makes_one_video_per_seed_from_the_prompt(loaded) -> None:
    family, pipe, _ = loaded["tiny-animatediff"]
    seen: list[tuple[int, int, Any]] = []
    videos = family.generate(pipe, _request("tiny-animatediff"), lambda i, n, lat: seen.append((i, n, lat.clone())))

    assert all(isinstance(v, Video) and v.fps == 8 for v in videos) and len(videos) == 2
    assert [[(f.size, f.mode) for f in v.frames] for v in videos] == [[((64, 48), "RGB")] * 3] * 2
    assert [(i, n) for i, n, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    latents = seen[-1][2]
    assert latents.shape == (2, 4, 3, 6, 8)  # (videos, channels, frames, h, w)
    assert family.preview(latents, 1).shape == (48, 64, 3)
    assert videos[0].frames[0].tobytes() != videos[0].frames[-1].tobytes()
    assert pipe.pipe.motion_adapter is None  # merged into the UNet, not kept twice


@pytest.mark.parametrize("model", MODELS)
def test_a_seed_gives_the_same_output_and_other_seeds_others(loaded, model: str) -> None:
    family, pipe, _ = loaded[model]
    first = [_array(item) for item in family.generate(pipe, _request(model, seed=7, count=2, steps=2), _ignore)]
    again = [_array(item) for item in family.generate(pipe, _request(model, seed=7, count=2, steps=2), _ignore)]
    alone = [_array(item) for item in family.generate(pipe, _request(model, seed=8, count=1, steps=2), _ignore)]
    other = [_array(item) for item in family.generate(pipe, _request(model, seed=9, count=1, steps=2), _ignore)]

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    # Seed 8 alone is the batch's second: a batch of another size changes only float rounding (a level).
    assert np.abs(alone[0] - first[1]).max() <= 2
    assert np.abs(other[0] - first[0]).mean() > 1 and np.abs(first[1] - first[0]).mean() > 1


@pytest.fixture
def segment(tmp_path: Path):
    if staging.SHM_ROOT is None:
        pytest.skip("needs /dev/shm")
    path = staging.SHM_ROOT / f"atelier-test-{tmp_path.name}"
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.parametrize("model", MODELS)
def test_staged_weights_give_the_same_output_bit_for_bit(loaded, model: str, segment: Path) -> None:
    family, from_disk, path = loaded[model]
    table = staging.stage(path, segment)
    staged = family.load(LoadRequest(path, weights=staging.state_dicts(staging.map_segment(segment), table)))
    request = _request(model, count=1, steps=2)
    assert _pixels(family.generate(staged, request, _ignore)[0]) == _pixels(family.generate(from_disk, request,
                                                                                             _ignore)[0])


def test_animatediff_from_an_sd15_folder_and_a_motion_adapter(loaded, models: Path, segment: Path) -> None:
    """The usual way to run AnimateDiff: any SD 1.5 checkpoint, with a motion adapter merged on load."""
    family, merged, folder = loaded["tiny-animatediff"]
    sd15 = ensure_builtin("tiny-sd", models)
    options = {"motion_adapter": str(folder / "motion_adapter")}
    from_disk = family.load(LoadRequest(sd15, device="cpu", options=options))
    table = staging.stage(sd15, segment)
    staged = family.load(LoadRequest(sd15, device="cpu", options=options,
                                     weights=staging.state_dicts(staging.map_segment(segment), table)))

    # tiny-animatediff was built from tiny-sd's UNet: merging its adapter into tiny-sd gives its UNet back
    expected = merged.pipe.unet.state_dict()
    for pipe in (from_disk.pipe, staged.pipe):
        assert type(pipe.unet) is type(merged.pipe.unet) and pipe.motion_adapter is None
        weights = pipe.unet.state_dict()
        assert weights.keys() == expected.keys() and all(weights[k].equal(expected[k]) for k in expected)
    request = _request("tiny-animatediff", count=1, steps=2)
    assert _pixels(family.generate(staged, request, _ignore)[0]) == _pixels(family.generate(from_disk, request,
                                                                                             _ignore)[0])

    with pytest.raises(ValueError, match="motion_adapter"):
        family.load(LoadRequest(sd15, device="cpu"))  # an SD 1.5 folder alone makes no video


def test_options_change_the_output_and_bad_ones_are_refused_by_name(loaded) -> None:
    upscaler, pipe, folder = loaded["tiny-sd-upscaler"]
    noisy = upscaler.load(LoadRequest(folder, device="cpu", options={"noise_level": 300}))
    request = _request("tiny-sd-upscaler", count=1, steps=2)
    assert _pixels(upscaler.generate(noisy, request, _ignore)[0]) != _pixels(upscaler.generate(pipe, request,
                                                                                                _ignore)[0])
    svd, _, svd_folder = loaded["tiny-svd"]
    calm = svd.load(LoadRequest(svd_folder, device="cpu", options={"motion_bucket_id": 1, "decode_chunk_size": 1,
                                                                   "noise_aug_strength": 0.0,
                                                                   "min_guidance_scale": 1.5}))
    assert len(svd.generate(calm, _request("tiny-svd", count=1, steps=1), _ignore)[0].frames) == 3

    for family, path, options, named in (
        (upscaler, folder, {"noise_level": 351}, "noise_level"),  # above the model's max_noise_level
        (upscaler, folder, {"strength": 0.5}, "strength"),
        (svd, svd_folder, {"motion_bucket_id": 256}, "motion_bucket_id"),
        (svd, svd_folder, {"decode_chunk_size": "4"}, "decode_chunk_size"),
        (get_family("animatediff"), folder, {"motion_adapter": "/nowhere"}, "motion_adapter"),
    ):
        with pytest.raises(ValueError, match=named):
            family.load(LoadRequest(path, device="cpu", options=options))
    with pytest.raises(ValueError, match="single-file"):
        svd.load(LoadRequest(svd_folder, device="cpu", config=svd_folder))


@pytest.mark.parametrize("model", ["tiny-sd-upscaler", "tiny-svd"])
def test_a_request_without_its_image_is_refused(loaded, model: str) -> None:
    family, pipe, _ = loaded[model]
    request = GenerateRequest.single(prompt="x", negative_prompt=None, width=32, height=32, steps=1, guidance=5.0,
                                     seed=1)
    with pytest.raises(ValueError, match="image"):
        family.generate(pipe, request, _ignore)


# --------------------------------------------------------------------------- #
# through a running atelier: what a user receives


def _mp4(data: bytes) -> tuple[int, tuple[int, int], float]:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [frame for frame in container.decode(stream)]
        return len(frames), (frames[0].width, frames[0].height), float(stream.average_rate)


def _animation(data: bytes) -> tuple[str, int, tuple[int, int], set[int]]:
    """An animated GIF or WebP: its format, frames, size and the frames' durations (ms)."""
    with Image.open(io.BytesIO(data)) as image:
        durations = set()
        for frame in ImageSequence.Iterator(image):
            frame.load()  # WebP says a frame's duration once it is read
            durations.add(frame.info.get("duration"))
        return image.format, image.n_frames, image.size, durations


async def _run_job(client: Any, spec: JobSpec, inputs: JobInputs | None = None) -> list[Any]:
    await client.submit(spec, inputs=inputs)
    return [event async for event in client.events(spec.id, timeout=150)]


async def _refusal(client: Any, spec: JobSpec, inputs: JobInputs | None = None) -> Any:
    with pytest.raises(RemoteError) as caught:
        await client.submit(spec, inputs=inputs)
    return caught.value.error


def _done(events: list[Any]) -> JobResult:
    result = events[-1]
    assert isinstance(result, JobResult) and result.job.state is JobState.done, result.job.reason
    assert [e.step for e in events if isinstance(e, Progress)][-1] == result.job.spec.steps
    previews = [e for e in events if isinstance(e, Preview)]
    assert previews and bytes(previews[-1].image[:2]) == b"\xff\xd8" and max(previews[-1].width,
                                                                              previews[-1].height) <= 256
    return result


def _field(error: Any) -> str:
    return (error.field or "").split(".")[-1]


def test_upscale_end_to_end_a_png_four_times_the_input(shared_cluster) -> None:
    spec = JobSpec(model="tiny-sd-upscaler", kind=JobKind.upscale, prompt="a lighthouse", steps=3, seed=4, count=2)

    async def go():
        async with shared_cluster.client() as client:
            events = await _run_job(client, spec, JobInputs(image=_png(40, 24)))
            missing = await _refusal(client, JobSpec(model="tiny-sd-upscaler", kind=JobKind.upscale, prompt="x"))
            wrong_kind = await _refusal(client, JobSpec(model="tiny-sd-upscaler", prompt="x"))
            return events, missing, wrong_kind

    events, missing, wrong_kind = run(go(), timeout=170)
    result = _done(events)
    assert (result.job.spec.width, result.job.spec.height) == (40, 24)  # the input's size
    images = [Image.open(io.BytesIO(bytes(a.data))) for a in result.outputs]
    assert [(im.format, im.size, im.mode) for im in images] == [("PNG", (160, 96), "RGB")] * 2
    assert [(a.media_type, a.width, a.height) for a in result.outputs] == [("image/png", 160, 96)] * 2
    assert images[0].tobytes() != images[1].tobytes()
    assert _field(missing) == "image" and "image" in missing.message
    assert _field(wrong_kind) == "kind" and "upscale" in wrong_kind.message


def test_svd_end_to_end_mp4_and_gif_with_their_frames_and_rate(shared_cluster) -> None:
    image = JobInputs(image=_png(64, 48))
    spec = JobSpec(model="tiny-svd", kind=JobKind.img2vid, prompt="waves", steps=2, seed=3)

    async def go():
        async with shared_cluster.client() as client:
            events = await _run_job(client, spec, image)
            gif = await _run_job(client, JobSpec(model="tiny-svd", kind=JobKind.img2vid, prompt="waves", steps=2,
                                                 frames=5, fps=10, output_format="gif"), image)
            too_long = await _refusal(client, JobSpec(model="tiny-svd", kind=JobKind.img2vid, prompt="x", frames=9),
                                      image)
            no_image = await _refusal(client, JobSpec(model="tiny-svd", kind=JobKind.img2vid, prompt="x"))
            return events, gif, too_long, no_image

    events, gif, too_long, no_image = run(go(), timeout=170)
    (mp4,) = _done(events).outputs
    assert (mp4.media_type, mp4.frames, mp4.fps, mp4.width, mp4.height) == ("video/mp4", 4, 7, 64, 48)
    assert _mp4(bytes(mp4.data)) == (4, (64, 48), 7.0)  # the catalog's default frames and rate
    (animation,) = _done(gif).outputs
    assert animation.media_type == "image/gif"
    assert _animation(bytes(animation.data)) == ("GIF", 5, (64, 48), {100})
    assert _field(too_long) == "frames" and "8" in too_long.message
    assert _field(no_image) == "image"


def test_animatediff_end_to_end_mp4_and_webp_with_their_frames_and_rate(shared_cluster) -> None:
    spec = JobSpec(model="tiny-animatediff", kind=JobKind.txt2vid, prompt="a lighthouse", width=72, height=40,
                   steps=2, frames=6, fps=12, seed=8)

    async def go():
        async with shared_cluster.client() as client:
            events = await _run_job(client, spec)
            webp = await _run_job(client, JobSpec(**{**spec.model_dump(exclude={"id"}), "output_format": "webp",
                                                     "frames": 3, "fps": 4}))
            refusals = [await _refusal(client, JobSpec(model="tiny-animatediff", kind=JobKind.txt2vid, prompt="x",
                                                       **bad)) for bad in (dict(frames=17), dict(output_format="png"))]
            refusals.append(await _refusal(client, JobSpec(model="tiny-animatediff", kind=JobKind.txt2vid,
                                                           prompt="x"), JobInputs(image=_png(64, 64))))
            return events, webp, refusals

    events, webp, (too_long, not_a_video_format, an_image) = run(go(), timeout=170)
    (mp4,) = _done(events).outputs
    assert (mp4.media_type, mp4.frames, mp4.fps, mp4.width, mp4.height) == ("video/mp4", 6, 12, 72, 40)
    assert _mp4(bytes(mp4.data)) == (6, (72, 40), 12.0)
    (animation,) = _done(webp).outputs
    assert animation.media_type == "image/webp"
    assert _animation(bytes(animation.data)) == ("WEBP", 3, (72, 40), {250})
    assert _field(too_long) == "frames" and "16" in too_long.message
    assert _field(not_a_video_format) == "output_format"
    assert _field(an_image) == "image"
