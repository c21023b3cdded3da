"""The "noop" family: no model, no diffusion, no torch.

It goes through the same load / step / preview / result path as a real
family, so running it measures the serving system's own overhead. The only
cost it adds is an optional fixed sleep per step, to mimic a model's pace. For testing what
happens when a pipeline hangs (the runner's watchdog), ``hang_after_steps`` makes the step
after that many never return, as a deadlocked CUDA call would not.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from atelier.families.base import Family, GenerateRequest, StepCallback
from atelier.families.loaded import LoadedModel, LoadRequest

_PREVIEW_SIDE = 8


@dataclass(frozen=True)
class NoopPipeline:
    step_s: float = 0.0
    hang_after_steps: int | None = None


class NoopFamily(Family):
    name = "noop"

    def build(self, request: LoadRequest) -> LoadedModel:
        if request.variant is not None:
            raise ValueError("family 'noop' reads no weight files: a variant does not apply")
        options = request.options
        unknown = set(options) - {"step_s", "hang_after_steps"}
        if unknown:
            raise ValueError(f"unknown options for family 'noop': {sorted(unknown)}")
        step_s = float(options.get("step_s", 0.0))
        if step_s < 0:
            raise ValueError(f"step_s must be >= 0, got {step_s}")
        hang = options.get("hang_after_steps")
        if hang is not None and (isinstance(hang, bool) or not isinstance(hang, int) or hang < 0):
            raise ValueError(f"hang_after_steps must be a whole number >= 0, got {hang!r}")
        return LoadedModel(NoopPipeline(step_s=step_s, hang_after_steps=hang), self)

    def generate(self, model: LoadedModel, req: GenerateRequest, on_step: StepCallback) -> list[Image.Image]:
        pipe: NoopPipeline = model.pipe
        for step in range(1, req.steps + 1):
            if pipe.hang_after_steps is not None and step > pipe.hang_after_steps:
                threading.Event().wait()  # forever: only the process ending ends it
            if pipe.step_s:
                time.sleep(pipe.step_s)
            on_step(step, req.steps, None)
        # Per-image seeds as in the real families, so outputs differ per seed
        # and per image, and repeat exactly for the same seed.
        return [Image.new("RGB", (req.width, req.height), _seed_colour(seed)) for seed in req.seeds]

    def preview(self, latents: Any, index: int = 0) -> np.ndarray:
        return np.full((_PREVIEW_SIDE, _PREVIEW_SIDE, 3), 128, dtype=np.uint8)


def _seed_colour(seed: int) -> tuple[int, int, int]:
    # A hash rather than e.g. seed % 256: neighbouring seeds get unrelated colours.
    r, g, b = hashlib.blake2b(str(seed).encode(), digest_size=3).digest()
    return r, g, b
