"""A training job on a runner: the loop around ``atelier.training.LoraTrainer``, step by step.

Each step is one trip to the runner's worker thread, so between steps the event loop publishes the
step's progress (with its loss), hears a cancel or a request to make way, and keeps the heartbeat.
Every ``checkpoint_every`` steps the trainer's whole state goes to the scheduler, which keeps it in the
artifact store: a runner that dies resumes from there, losing at most that many steps. Asked to make
way (an interactive job waits for the device) or to shut down, the training checkpoints at its next
step and hands itself back (``JobFailed(yielded=True)``: queued again, no attempt counted).
The trainer trains the runner's resident pipeline in place and takes its adapter off at the end, so
the model stays loaded for the jobs after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from actors.codec import SCHEDULER
from actors.messages import BatchItem, Preview, Progress, TrainCheckpoint
from atelier import media
from atelier.jobs import Artifact, JobDone, JobFailed
from atelier.preview import encode_jpeg

if TYPE_CHECKING:
    from actors.runner import ActiveBatch, Runner

log = logging.getLogger("atelier.runner")

CHECKPOINT_TIMEOUT_S = 60.0  # the scheduler writes a checkpoint (megabytes) to the store in this
SAMPLE_STEPS = 20  # denoising steps of a progress sample
SAMPLE_SIDE = 256  # a sample preview's largest side, like the step previews'
LORA_MEDIA_TYPE = "application/vnd.safetensors"


def start_trainer(model: Any, item: BatchItem, device: str, max_pixels: int) -> Any:
    """A LoraTrainer on the resident ``model`` for the job of ``item``, from its checkpoint if it has one
    (on the worker: it decodes the images, encodes them, and may make class images with the pipeline)."""
    from atelier.training import LoraTrainer, make_class_images

    spec, train = item.job, item.job.train
    instance = []
    for n, data in enumerate(item.inputs.train_images if item.inputs is not None else []):
        with media.open_input(data, f"train_images/{n}", max_pixels) as image:
            caption = train.captions[n] if n < len(train.captions) and train.captions[n].strip() else spec.prompt
            instance.append((image.convert("RGB"), caption))
    class_images = None
    if train.class_images and train.class_prompt:
        class_images = make_class_images(model.pipe, train.class_prompt, train.class_images, spec.seed,
                                         train.resolution)
    trainer = LoraTrainer(model.pipe, model.family.name, train, instance, device=device, seed=spec.seed,
                          class_images=class_images)
    if item.checkpoint is not None:
        try:
            trainer.restore(bytes(item.checkpoint))
        except BaseException:
            trainer.close()
            raise
    return trainer


async def run_training(runner: Runner, batch: ActiveBatch, model: Any) -> JobDone | JobFailed:
    """Trains the batch's one job on ``model`` to its end, or until stopped; its outcome."""
    item = batch.items[0]
    spec, train = item.job, item.job.train
    loop = asyncio.get_running_loop()
    worker = runner._worker
    batch.progress_at = None  # the watchdog waits while images encode and class images are made
    trainer = await loop.run_in_executor(worker, start_trainer, model, item, runner.torch_device,
                                         runner.config.input_pixel_budget)
    try:
        resumed = trainer.step
        if resumed:
            log.info("%s: job %s resumes its training at step %d of %d", runner.name, spec.id, resumed, train.steps)
        checkpointed = resumed
        started = time.monotonic()
        batch.progress_at = started
        while trainer.step < train.steps and not batch.cancel.is_set():
            loss = await loop.run_in_executor(worker, trainer.train_step)
            now = time.monotonic()
            batch.progress_at, batch.stepped = now, True
            per_step = (now - started) / (trainer.step - resumed)
            runner.publish_threadsafe(Progress(job_id=spec.id, step=trainer.step, total=train.steps,
                                               elapsed_s=now - batch.started, loss=float(loss),
                                               eta_s=per_step * (train.steps - trainer.step)))
            if trainer.step % train.sample_interval == 0 and trainer.step < train.steps and spec.previews:
                await _sample(runner, trainer, spec)
            if trainer.step % train.checkpoint_every == 0 and trainer.step < train.steps:
                if await _checkpoint(runner, trainer, spec.id):
                    checkpointed = trainer.step
        if spec.id in batch.stopped and not batch.paused:
            return JobFailed(job_id=spec.id, reason=batch.stopped[spec.id], cancelled=True)
        if trainer.step < train.steps:  # asked to make way, or the runner is shutting down
            if trainer.step > checkpointed:
                await _checkpoint(runner, trainer, spec.id)
            why = batch.shutting_down or batch.paused or "stopped"
            return JobFailed(job_id=spec.id, yielded=True, retryable=True,
                             reason=f"paused at step {trainer.step} of {train.steps}: {why}")
        files = await loop.run_in_executor(worker, _files, trainer)
        outputs = [Artifact(media_type=LORA_MEDIA_TYPE, data=data) for data in files]
        return JobDone(job_id=spec.id, outputs=outputs, elapsed_s=time.monotonic() - batch.started)
    finally:
        await loop.run_in_executor(worker, trainer.close)  # the resident model as it was, for the next job


def _files(trainer: Any) -> list[bytes]:
    """The LoRA in the diffusers format, then kohya's (which diffusers cannot write for FLUX: left out there)."""
    files = [trainer.lora_file()]
    try:
        files.append(trainer.kohya_file())
    except NotImplementedError as exc:
        log.info("no kohya file: %s", exc)
    return files


async def _checkpoint(runner: Runner, trainer: Any, job_id: str) -> bool:
    """Hands the trainer's state to the scheduler for the store; False where it could not be kept (the
    training goes on: a crash then resumes from the checkpoint before)."""
    data = await asyncio.get_running_loop().run_in_executor(runner._worker, trainer.checkpoint)
    try:
        await runner.ask(SCHEDULER, TrainCheckpoint(job_id=job_id, step=trainer.step, data=data),
                         timeout=CHECKPOINT_TIMEOUT_S)
    except Exception as exc:  # the scheduler away, or its store failing: the next interval tries again
        log.warning("%s: checkpoint at step %d of job %s not kept: %s", runner.name, trainer.step, job_id, exc)
        return False
    return True


async def _sample(runner: Runner, trainer: Any, spec: Any) -> None:
    """A sample image of what the LoRA has learnt so far, as the job's preview (a failed one is logged)."""
    prompt = spec.train.sample_prompt or spec.prompt
    try:
        image = await asyncio.get_running_loop().run_in_executor(runner._worker, trainer.sample, prompt, spec.seed,
                                                                 SAMPLE_STEPS)
        image.thumbnail((SAMPLE_SIDE, SAMPLE_SIDE))
        runner.publish_threadsafe(Preview(job_id=spec.id, step=trainer.step, width=image.width, height=image.height,
                                          image=encode_jpeg(image.convert("RGB"))))
    except Exception:
        log.exception("%s: sample of job %s at step %d failed", runner.name, spec.id, trainer.step)
