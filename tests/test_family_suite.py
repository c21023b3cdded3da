"""What every family's adapter must do, on each built-in tiny model (CPU, no network): a cancel
from the step callback stops the run, and a batch of several jobs gives each job's outputs as
that job alone makes them. The family's own files test what only that family does."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

# Before anything imports huggingface_hub: nothing here may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from PIL import Image  # noqa: E402

from atelier.families import GenerateRequest, JobCancelled  # noqa: E402
from atelier.media import Audio, Video  # noqa: E402
from atelier.tiny.audio import STABLE_AUDIO_LATENTS  # noqa: E402
from atelier.tiny_models import BUILTIN  # noqa: E402

pytestmark = pytest.mark.timeout(180)

AUDIO = {"stable-audio", "audioldm2"}


def _picture(width: int, height: int) -> Image.Image:
    """An input image with something in it: a gradient, not a flat colour."""
    return Image.linear_gradient("L").convert("RGB").resize((width, height))


def _fields(model: str) -> dict[str, Any]:
    """What a request to ``model`` needs beside its prompts, seeds, steps and count: its kind, size and inputs."""
    family = BUILTIN[model]
    if family in AUDIO:
        return dict(width=8, height=8, guidance=7.0, kind="txt2audio", duration_s=1.0)
    if family == "sd-upscaler":
        return dict(width=32, height=24, guidance=5.0, image=_picture(32, 24))
    if family == "svd":
        return dict(width=64, height=48, guidance=5.0, image=_picture(64, 48), frames=3, fps=7)
    if family == "animatediff":
        return dict(width=64, height=48, guidance=5.0, frames=3, fps=8)
    return dict(width=64, height=64, guidance=5.0)


@pytest.mark.parametrize("model", sorted(BUILTIN))
def test_a_cancel_from_the_step_callback_propagates(tiny_model, model: str) -> None:
    family, pipe, _ = tiny_model(model)
    seen: list[int] = []

    def on_step(i: int, n: int, latents: Any) -> None:
        seen.append(i)
        if i == 2:
            raise JobCancelled()

    request = GenerateRequest.single(prompt="a red cube", negative_prompt="blurry", steps=5, seed=1, count=1,
                                     **_fields(model))
    with pytest.raises(JobCancelled):
        family.generate(pipe, request, on_step)
    assert seen == [1, 2]


@dataclass(frozen=True)
class Batch:
    """Two jobs, one of two images (seeds 7 and 8) and one of one (seed 100), then the three as one batch."""

    steps: int
    first: tuple[str, str | None]  # the first job's prompt and negative prompt
    second: tuple[str, str | None]
    order: tuple[int, int, int] = (0, 1, 2)  # which of the jobs' images (7, 8, 100) each of the batch's is


IMAGES = Batch(2, ("a red cube", None), ("a blue sphere", "blurry"))
BATCHES = {
    # Without a negative prompt stable audio's unconditional half is zeros, with one it is that text:
    # a batch that mixes both, in turns.
    "stable-audio": Batch(3, ("rain on a tin roof", None), ("rain on a tin roof", "wind"), order=(0, 2, 1)),
    "audioldm2": Batch(3, ("rain on a tin roof", None), ("church bells far away", "hiss")),
}
# The families that make images or sounds from a prompt: a batch mixes jobs of different prompts.
BATCHED = sorted(model for model, family in BUILTIN.items() if family not in {"sd-upscaler", "svd", "animatediff"})


def _as_array(output: Any) -> np.ndarray:
    if isinstance(output, Audio):
        return np.asarray(output.samples)
    frames = output.frames if isinstance(output, Video) else [output]
    return np.stack([np.asarray(frame, dtype=int) for frame in frames])


@pytest.mark.parametrize("model", BATCHED)
def test_a_batch_of_several_jobs_keeps_each_jobs_prompt_and_seed(tiny_model, model: str) -> None:
    family, pipe, _ = tiny_model(model)
    case = BATCHES.get(family.name, IMAGES)
    fields = {**_fields(model), "steps": case.steps}
    (prompt, negative), (other_prompt, other_negative) = case.first, case.second

    def quiet(*_: Any) -> None:
        pass

    first = family.generate(pipe, GenerateRequest.single(prompt=prompt, negative_prompt=negative, seed=7, count=2,
                                                         **fields), quiet)
    second = family.generate(pipe, GenerateRequest.single(prompt=other_prompt, negative_prompt=other_negative,
                                                          seed=100, **fields), quiet)
    jobs = [(prompt, negative, 7), (prompt, negative, 8), (other_prompt, other_negative, 100)]
    batch = GenerateRequest(prompts=tuple(jobs[i][0] for i in case.order),
                            negative_prompts=tuple(jobs[i][1] for i in case.order),
                            seeds=tuple(jobs[i][2] for i in case.order), **fields)
    steps: list[tuple[int, int, tuple[int, ...]]] = []
    together = [_as_array(output) for output in
                family.generate(pipe, batch, lambda i, n, lat: steps.append((i, n, tuple(lat.shape))))]
    alone = [_as_array(output) for output in [*first, *second]]

    assert len(together) == 3
    for index, batched in zip(case.order, together, strict=True):
        if family.name in AUDIO:
            np.testing.assert_allclose(batched, alone[index], atol=1e-4)
        else:  # the same image; a bigger batch only changes float rounding (at most a level or two)
            assert np.abs(alone[index] - batched).max() <= 2
    if family.name in AUDIO:
        if family.name == "stable-audio":
            assert not np.allclose(alone[2], together[0], atol=1e-2)
            # Two pipeline calls, counted as one run of steps, with the whole batch's latents for previews.
            assert [(i, n) for i, n, _ in steps] == [(i, 6) for i in range(1, 7)]
            assert {shape for _, _, shape in steps} == {(3, 8, STABLE_AUDIO_LATENTS)}
    else:
        assert np.abs(together[0] - together[2]).mean() > 5
