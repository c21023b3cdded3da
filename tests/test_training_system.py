"""Training jobs through a running atelier: a LoRA trained in the queue and used by name at once, a
training that makes way for an interactive job and resumes, a SIGKILLed runner that resumes from its
last checkpoint, and the HTTP and CLI ways in.

One atelier of this module's own (one CPU runner): the SIGKILL test kills its runner, and the others
need a runner that nothing else uses, to see the training hand it over."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import time
import urllib.request
import uuid

import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"

from actors.actor import RemoteError  # noqa: E402
from actors.messages import JobEvent, JobResult, Preview, Progress  # noqa: E402
from atelier.jobs import JobInputs, JobKind, JobSpec, JobState, TrainSpec  # noqa: E402
from tests.conftest import Cluster, run  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def trainer_cluster(atelier_home, tmp_path_factory):
    c = Cluster(atelier_home).start()
    yield c
    c.stop()


def _png(color: tuple[int, int, int], side: int = 64) -> bytes:
    image = Image.new("RGB", (side, side), color)
    for x in range(side // 4, side // 2):  # something to learn beyond a flat colour
        for y in range(side // 4, 3 * side // 4):
            image.putpixel((x, y), (255 - color[0], 255 - color[1], 255 - color[2]))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


IMAGES = [_png((200, 30, 30)), _png((30, 30, 200))]


def _training(user: str, name: str, **settings) -> tuple[JobSpec, JobInputs]:
    train = TrainSpec(name=name, resolution=64, rank=4, learning_rate=5e-3, **settings)
    spec = JobSpec(kind=JobKind.train, model="tiny-sd", prompt="a photo of sks cube", user=user, seed=5, train=train)
    return spec, JobInputs(train_images=IMAGES)


async def _follow(client, job_id: str, timeout: float = 240.0, on_event=None) -> tuple[list, JobResult]:
    seen = []
    async for event in client.events(job_id, timeout=timeout):
        seen.append((time.monotonic(), event))
        if on_event is not None:
            await on_event(event)
        if isinstance(event, JobResult):
            return seen, event
    raise AssertionError("the events ended without a result")


def test_a_trained_lora_is_its_owners_by_name_at_once_and_is_the_file_diffusers_reads(trainer_cluster, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    from atelier.tiny_models import ensure_builtin

    async def go():
        async with trainer_cluster.client() as client:
            spec, inputs = _training("train-ana", "cube", steps=12, checkpoint_every=5, sample_every=5)
            await client.submit(spec, inputs=inputs)
            seen, result = await _follow(client, spec.id)
            steps = [e for _, e in seen if isinstance(e, Progress)]
            samples = [e for _, e in seen if isinstance(e, Preview)]
            assert result.job.state is JobState.done, result.job.reason
            assert result.job.spec.priority.value == "batch"  # whatever was asked: a training yields
            # Progress every step, with its loss; a sample image every 5 steps.
            assert [p.step for p in steps] == list(range(1, 13)) and all(p.total == 12 for p in steps)
            assert all(p.loss is not None and p.loss >= 0 for p in steps)
            assert {p.step for p in samples} == {5, 10}
            lora, kohya = result.outputs
            assert lora.media_type == kohya.media_type == "application/vnd.safetensors"
            # The owner's at once, by name, listed with its model; nobody else's.
            assert [lo.name for lo in await client.loras("train-ana")] == ["cube"]
            assert await client.loras("train-ben") == []
            listed = {m.name: m.user_loras for m in await client.models(user="train-ana")}
            assert listed["tiny-sd"] == ["cube"] and listed["tiny-sdxl"] == []

            def image_job(loras: dict[str, float], user: str = "train-ana") -> JobSpec:
                return JobSpec(model="tiny-sd", prompt="a photo of sks cube", width=64, height=64, steps=3,
                               guidance=5.0, seed=3, user=user, loras=loras)

            with_lora = await client.generate(image_job({"cube": 1.0}), timeout=120)
            without = await client.generate(image_job({}), timeout=120)
            assert with_lora.job.state is JobState.done, with_lora.job.reason
            with pytest.raises(RemoteError, match="no LoRA 'cube'"):
                await client.submit(image_job({"cube": 1.0}, user="train-ben"))
            return bytes(lora.data), bytes(with_lora.outputs[0].data), bytes(without.outputs[0].data)

    lora, with_lora, without = run(go(), timeout=280)
    assert with_lora != without
    # The same file through diffusers alone gives the very image atelier made with it.
    (tmp_path / "cube.safetensors").write_bytes(lora)
    pipe = StableDiffusionPipeline.from_pretrained(ensure_builtin("tiny-sd", trainer_cluster.home / "models"),
                                                   local_files_only=True, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path), weight_name="cube.safetensors", adapter_name="cube")
    direct = pipe(prompt=["a photo of sks cube"], negative_prompt=[""], width=64, height=64, num_inference_steps=3,
                  guidance_scale=5.0, generator=[torch.Generator().manual_seed(3)], output_type="pil").images[0]
    assert (Image.open(io.BytesIO(with_lora)).convert("RGB").tobytes() == direct.convert("RGB").tobytes())


def test_an_interactive_job_takes_the_device_from_a_training_within_a_step_and_the_training_resumes(
        trainer_cluster):
    async def go():
        async with trainer_cluster.client() as client:
            # Its periodic checkpoint (at 40) comes after its end (30): the one it resumes from is the one it made
            # as it yielded.
            spec, inputs = _training("train-cy", "long", steps=30, checkpoint_every=40, sample_every=1000)
            await client.submit(spec, inputs=inputs)
            image = JobSpec(model="tiny-sd", prompt="a lighthouse", width=64, height=64, steps=2, seed=1,
                            user="train-dee")
            asked: dict[str, float] = {}

            async def on_event(event):
                if isinstance(event, Progress) and event.step == 10 and "at" not in asked:
                    asked["at"] = time.monotonic()
                    asked["result"] = asyncio.ensure_future(client.generate(image, timeout=60))

            seen, result = await _follow(client, spec.id, on_event=on_event)
            interactive = await asked["result"]
            return asked["at"], seen, result, interactive

    asked_at, seen, result, interactive = run(go(), timeout=280)
    assert result.job.state is JobState.done, result.job.reason
    assert interactive.job.state is JobState.done
    reasons = [e.reason for _, e in seen if isinstance(e, JobEvent) and e.state is JobState.queued and e.reason]
    paused = [int(m.group(1)) for reason in reasons if (m := re.search(r"paused at step (\d+)", reason))]
    assert paused, f"the training never made way: {reasons}"
    # It made way at its next step or so after the interactive job came, well before its next checkpoint.
    assert 10 <= paused[0] <= 14
    # The interactive job started within the stated bound: one training step and a checkpoint's write
    # (milliseconds on the tiny model; seconds here allow for a loaded CI machine).
    assert interactive.job.started_at - interactive.job.submitted_at < 10
    # Resumed from the checkpoint it made as it yielded, not from step 0; making way counts no attempt.
    numbers = [e.step for _, e in seen if isinstance(e, Progress)]
    after = numbers[numbers.index(paused[0]) + 1:]
    assert after and after[0] == paused[0] + 1 and numbers[-1] == 30
    assert result.job.attempts == 1


def test_a_sigkilled_runner_resumes_the_training_from_its_last_checkpoint(trainer_cluster):
    async def go():
        async with trainer_cluster.client() as client:
            spec, inputs = _training("train-eve", "kill", steps=20, checkpoint_every=5, sample_every=1000)
            await client.submit(spec, inputs=inputs)
            killed: dict[str, int] = {}

            async def on_event(event):
                if isinstance(event, Progress) and event.step >= 12 and not killed:
                    killed["step"] = event.step
                    os.kill(trainer_cluster.pid_of(b"actors.runner"), signal.SIGKILL)

            seen, result = await _follow(client, spec.id, on_event=on_event)
            return killed["step"], seen, result

    killed_at, seen, result = run(go(), timeout=280)
    assert result.job.state is JobState.done, result.job.reason
    numbers = [e.step for _, e in seen if isinstance(e, Progress)]
    after = numbers[numbers.index(killed_at) + 1:]
    resumed_at = next(n for n in after if n <= killed_at)  # the first step after the restart
    # From a checkpoint (one every 5 steps), the newest stored: at most one interval of steps lost.
    assert (resumed_at - 1) % 5 == 0 and 0 <= killed_at - (resumed_at - 1) <= 5, (killed_at, resumed_at)
    assert numbers[-1] == 20 and result.job.attempts == 2


def test_http_trains_from_a_multipart_upload_and_lists_and_deletes_the_lora(trainer_cluster):
    boundary = uuid.uuid4().hex
    parts = [("prompt", "a photo of sks cube"), ("model", "tiny-sd"), ("name", "web-cube"), ("steps", "3"),
             ("resolution", "64"), ("rank", "4"), ("captions", "a red cube"), ("captions", "a blue cube")]
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                    for k, v in parts)
    for n, data in enumerate(IMAGES):
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{n}.png"\r\n'
                 f"Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    base = trainer_cluster.http
    request = urllib.request.Request(f"{base}/v1/trainings", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 202
        job = json.load(response)
    assert job["spec"]["train"]["captions"] == ["a red cube", "a blue cube"]
    with urllib.request.urlopen(f"{base}/v1/jobs/{job['spec']['id']}/events", timeout=120) as events:
        text = events.read().decode()
    assert '"loss":' in text and '"state":"done"' in text.replace(" ", "")
    with urllib.request.urlopen(f"{base}/v1/loras", timeout=10) as response:
        assert [lora["name"] for lora in json.load(response)["loras"]] == ["web-cube"]
    with urllib.request.urlopen(f"{base}/v1/loras/web-cube/file?format=kohya", timeout=10) as response:
        kohya = response.read()
    from safetensors.torch import load

    assert any(key.startswith("lora_unet_") for key in load(kohya))
    with urllib.request.urlopen(urllib.request.Request(f"{base}/v1/loras/web-cube", method="DELETE"),
                                timeout=10) as response:
        assert json.load(response)["loras"] == []


def test_cli_trains_a_folder_of_images_with_a_progress_bar(trainer_cluster, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for n, data in enumerate(IMAGES):
        (folder / f"{n}.png").write_bytes(data)
    (folder / "0.txt").write_text("a red cube")
    done = trainer_cluster.cli("train", "--images", str(folder), "--name", "cli-cube", "--steps", "3",
                               "--resolution", "64", "--rank", "4", "--user", "train-cli", "-o", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "cli-cube.safetensors").is_file()
    assert "--lora cli-cube" in done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = trainer_cluster.cli("train", "--images", str(empty), "--name", "x")
    assert refused.returncode == 2 and "no .png" in refused.stderr and "Traceback" not in refused.stderr
