"""The whole job path over real sockets: frontend -> broker -> scheduler -> runner and back.

Every part runs as its own process, started by ``atelier up`` (see conftest.py).
"""

from __future__ import annotations

import io
import os
import signal

import pytest
import zmq
import zmq.asyncio
from PIL import Image

from actors.actor import RemoteError
from actors.messages import JobEvent, JobResult, Preview, Progress
from atelier.jobs import ErrorCode, JobSpec, JobState
from tests.conftest import run

pytestmark = pytest.mark.timeout(240)


def tiny(prompt: str = "a lighthouse", **kw) -> JobSpec:
    params = dict(model="tiny-sd", prompt=prompt, width=64, height=64, steps=4, seed=7)
    params.update(kw)
    return JobSpec(**params)


def test_job_round_trip_streams_progress_and_previews(cluster):
    async def go():
        async with cluster.client() as client:
            spec = tiny(count=2, steps=5)
            await client.submit(spec)
            return [event async for event in client.events(spec.id, timeout=120)]

    events = run(go())
    result = events[-1]
    assert isinstance(result, JobResult)
    assert result.job.state is JobState.done, result.job.reason
    assert len(result.outputs) == 2
    for index, artifact in enumerate(result.outputs):
        image = Image.open(io.BytesIO(artifact.data))
        assert image.format == "PNG" and image.size == (64, 64)
        assert f"Seed: {7 + index}" in image.info["parameters"]
        assert artifact.uri and os.path.exists(artifact.uri.removeprefix("file://"))
    steps = [e.step for e in events if isinstance(e, Progress)]
    assert steps == sorted(steps) and steps[-1] == 5 and len(steps) == 5
    previews = [e for e in events if isinstance(e, Preview)]
    assert previews and bytes(previews[0].image[:2]) == b"\xff\xd8"
    assert max(previews[0].width, previews[0].height) <= 256
    states = [e.state for e in events if isinstance(e, JobEvent)]
    assert states[-1] is JobState.done and JobState.running in states


def test_same_seed_gives_the_same_image(cluster):
    async def go():
        async with cluster.client() as client:
            first = await client.generate(tiny(seed=123), timeout=120)
            second = await client.generate(tiny(seed=123), timeout=120)
            other = await client.generate(tiny(seed=124), timeout=120)
            return first, second, other

    first, second, other = run(go())
    pixels = [Image.open(io.BytesIO(r.outputs[0].data)).tobytes() for r in (first, second, other)]
    assert pixels[0] == pixels[1] != pixels[2]


@pytest.mark.parametrize("spec, field", [
    (dict(model="no-such-model"), "model"),
    (dict(steps=0), "steps"),
    (dict(steps=10**9), "steps"),
    (dict(width=65), "width"),
    (dict(height=1024), "height"),  # a multiple of 8, but above tiny-sd's limit of 512
    (dict(count=0), "count"),
    (dict(count=17), "count"),
    (dict(prompt="   "), "prompt"),
])
def test_bad_parameters_are_refused_naming_the_field(cluster, spec, field):
    # model_construct skips client-side validation: the scheduler must refuse on its own.
    params = dict(model="tiny-sd", prompt="a lighthouse", width=64, height=64, steps=4, count=1)
    params.update(spec)
    job = JobSpec.model_construct(**{**JobSpec(model="x", prompt="x").model_dump(), **params})

    async def go():
        async with cluster.client() as client:
            with pytest.raises(RemoteError) as caught:
                await client.submit(job)
            return caught.value.error

    error = run(go())
    assert error.field is not None and error.field.split(".")[-1] == field, error
    assert field in error.message
    assert error.code in (ErrorCode.bad_request, ErrorCode.unknown_model)


def test_cancel_stops_a_running_job_within_a_step(cluster):
    async def go():
        async with cluster.client() as client:
            spec = tiny(steps=400)
            await client.submit(spec)
            cancelled_at = None
            last_step = 0
            async for event in client.events(spec.id, timeout=120):
                if isinstance(event, Progress):
                    last_step = event.step
                    if cancelled_at is None and event.step >= 2:
                        cancelled_at = event.step
                        await client.cancel(spec.id)
                if isinstance(event, JobResult):
                    return event, cancelled_at, last_step

    result, cancelled_at, last_step = run(go())
    assert result.job.state is JobState.cancelled
    # The request crossed the system while at most a step or two more ran.
    assert last_step - cancelled_at <= 3, (cancelled_at, last_step)


def test_exception_in_pipeline_fails_that_job_and_the_next_succeeds(cluster):
    async def go():
        async with cluster.client() as client:
            broken = await client.generate(JobSpec(model="broken-sd", prompt="x", seed=1), timeout=120)
            fine = await client.generate(tiny(), timeout=120)
            return broken, fine

    broken, fine = run(go())
    assert broken.job.state is JobState.failed
    assert "max_position_embeddings" in broken.job.reason
    assert fine.job.state is JobState.done


@pytest.mark.parametrize("model, words", [("missing-sd", "does not exist"), ("truncated-sd", "unet")])
def test_a_bad_checkpoint_fails_its_job_with_the_reason(cluster, model, words):
    async def go():
        async with cluster.client() as client:
            bad = await client.generate(JobSpec(model=model, prompt="x", seed=1), timeout=120)
            fine = await client.generate(tiny(), timeout=120)
            return bad, fine

    bad, fine = run(go())
    assert bad.job.state is JobState.failed and words in bad.job.reason, bad.job.reason
    assert fine.job.state is JobState.done


def test_a_killed_loader_loses_no_job(cluster):
    async def go():
        async with cluster.client() as client:
            status = await client.status()
            node = status.runners[0].capabilities.node
            loader = cluster.pid_of(b"actors.loader")
            os.kill(loader, signal.SIGKILL)
            # A model switch right away: the runner must get its weights from a restarted loader
            # or, while there is none, from the disk.
            return node, await client.generate(tiny(model="tiny-sdxl"), timeout=120)

    node, result = run(go())
    assert node and result.job.state is JobState.done, result.job.reason


def test_malformed_frames_do_not_stop_the_system(cluster):
    async def go():
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(cluster.router)
        garbage = [[b"not atelier"], [b"ATL1", b"\xc1\xc1"], [b"ATL1", b"\x93\x01\x02\x03"],
                   [b"ATL1", b"\x96\xa5hello\x01\xc0\xa1x\xa6broker\x80"], [b"ATL1"] + [b"x"] * 100, [b""]]
        for i in range(1000):
            await sock.send_multipart(garbage[i % len(garbage)])
        sock.close(linger=1000)
        ctx.term()
        async with cluster.client() as client:
            return await client.generate(tiny(), timeout=120)

    assert run(go()).job.state is JobState.done


def test_cli_generate_writes_pngs_and_status_lists_the_runner(cluster, tmp_path):
    out = tmp_path / "out"
    done = cluster.cli("generate", "a lighthouse", "--width", "64", "--height", "64", "--count", "2",
                       "--sampler", "dpm++2m", "--schedule", "karras", "-o", str(out))
    assert done.returncode == 0, done.stderr
    paths = done.stdout.split()
    assert len(paths) == 2
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (64, 64)
            # The sampler reached the job: its PNG says what made it.
            assert "Sampler: dpm++2m, Schedule type: karras" in image.info["parameters"]
    status = cluster.cli("status")
    assert status.returncode == 0 and "runner-" in status.stdout and "tiny-sd (" in status.stdout
    assert "staged in shared memory" in status.stdout and "MiB" in status.stdout
    bad = cluster.cli("generate", "x", "--steps", "1000")
    assert bad.returncode == 2 and "steps" in bad.stderr
    # From an image: img2img keeps its size; --format webp writes .webp files.
    source = tmp_path / "source.png"
    Image.new("RGB", (80, 48), (200, 40, 40)).save(source)
    edited = cluster.cli("generate", "a lighthouse", "--image", str(source), "--strength", "0.5", "--steps", "4",
                         "--format", "webp", "-o", str(out))
    assert edited.returncode == 0, edited.stderr
    (path,) = edited.stdout.split()
    with Image.open(path) as image:
        assert path.endswith(".webp") and image.format == "WEBP" and image.size == (80, 48)


def test_cli_makes_what_each_model_makes(cluster, tmp_path):
    """The kind follows the model unless given: a sound, a video, an upscale, each with its own flags."""
    import av

    out = tmp_path / "media"
    sound = cluster.cli("generate", "rain on a roof", "--model", "tiny-audioldm2", "--duration", "0.5",
                        "--format", "flac", "-o", str(out))
    assert sound.returncode == 0, sound.stderr
    (path,) = sound.stdout.split()
    with av.open(path) as container:
        stream = container.streams.audio[0]
        assert path.endswith(".flac") and stream.sample_rate == 16000
        assert abs(float(stream.duration * stream.time_base) - 0.5) < 0.01
    clip = cluster.cli("generate", "a spinning top", "--model", "tiny-animatediff", "--frames", "3", "--fps", "6",
                       "--steps", "2", "-o", str(out))
    assert clip.returncode == 0, clip.stderr
    (path,) = clip.stdout.split()
    with av.open(path) as container:
        frames = list(container.decode(video=0))
        assert path.endswith(".mp4") and len(frames) == 3 and container.streams.video[0].average_rate == 6
    source = tmp_path / "small.png"
    Image.new("RGB", (24, 16), (30, 90, 200)).save(source)
    bigger = cluster.cli("generate", "sharp", "--model", "tiny-sd-upscaler", "--image", str(source), "--steps", "2",
                         "-o", str(out))
    assert bigger.returncode == 0, bigger.stderr
    with Image.open(bigger.stdout.split()[0]) as image:
        assert image.size == (96, 64)
    # What a model cannot do, and a LoRA it does not have, are refused before anything runs.
    needs_image = cluster.cli("generate", "x", "--model", "tiny-svd")
    assert needs_image.returncode == 2 and "tiny-svd does img2vid: give it an --image" in needs_image.stderr
    no_lora = cluster.cli("generate", "x", "--lora", "ink=0.5")
    assert no_lora.returncode == 2 and "loras:" in no_lora.stderr and "has no LoRA 'ink'" in no_lora.stderr
    bad_scale = cluster.cli("generate", "x", "--lora", "ink=lots")
    assert bad_scale.returncode == 2 and "the scale after '=' is a number" in bad_scale.stderr


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["crash", "graceful-stop"])
def test_runner_killed_mid_job_is_requeued_and_completes(cluster, sig):
    async def go():
        async with cluster.client() as client:
            status = await client.status()
            victim = status.runners[0]
            spec = tiny(steps=20, seed=99)  # killed at step 2: the rest is the retry's, at a new runner
            await client.submit(spec)
            async for event in client.events(spec.id, timeout=180):
                if isinstance(event, Progress) and event.step >= 2:
                    os.kill(victim.capabilities.pid, sig)
                    break
            result = await client.wait(spec.id, timeout=180)
            after = await client.status()
            return victim, result, after

    victim, result, after = run(go(), timeout=240)
    assert result.job.state is JobState.done, result.job.reason
    assert result.job.attempts == 2
    assert after.runners and after.runners[0].capabilities.pid != victim.capabilities.pid
