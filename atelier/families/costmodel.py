"""The "costmodel" family: a GPU's costs without the GPU.

A cost-model model is a folder (``write_model``) holding one model's costs on one device, taken
from a stated profile (``bench/profiles/h100.toml``): its weight bytes, the time to load it from
disk and from staged memory, the seconds per denoising step by resolution and batch size, and
the VAE decode per image. Its runner sleeps for those times instead of computing, so everything
else in atelier (the processes and messages, the scheduling, staging and residency budgets in
bytes) runs for real, at a GPU's pace, on any machine. ``time_scale`` shrinks every time by one
factor so that a long trace fits in a benchmark run.

A profile may also give the model's costs on gangs (``gang_step_s``: by gang size, seconds per step
by resolution and batch size, as ``step_s``). On a gang, ``parallelize`` (which
``atelier.families.parallel.parallelize`` hands a layout to, on every rank) switches the model to the
costs of the gang's size, so a gang's speed-up is the profile's and the scheduler measures it like
any other runner's.

The folder also holds a stand-in for the weights (``staging.STAND_IN``): the loader stages it as
a segment of the model's real size that takes no memory, after the profile's disk read time.
Torch-free, like ``noop``.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from atelier.families.base import Family, GenerateRequest, StepCallback
from atelier.families.loaded import LoadedModel, LoadRequest
from atelier.staging import STAND_IN

COSTS = "costmodel.json"


@dataclass(frozen=True, eq=False)  # hashed by identity, as a loaded pipeline is
class CostModelPipeline:
    """What a loaded cost-model model is: its costs, already scaled."""

    nbytes: int  # what it would occupy on the device: runners budget it like real weights
    step_s: dict[int, list[float]]  # pixels -> seconds per step at batch sizes ``batches``
    batches: list[int]
    decode_s: float  # per image at the native resolution
    native_pixels: int
    gangs: dict[int, dict[int, list[float]]] = field(default_factory=dict)  # gang size -> its ``step_s``

    def seconds_per_step(self, pixels: int, images: int) -> float:
        """From the nearest profiled resolution (scaled by pixels) and the batch sizes either side."""
        nearest = min(self.step_s, key=lambda p: abs(p - pixels))
        row = self.step_s[nearest]
        i = bisect.bisect_left(self.batches, images)
        if i < len(self.batches) and self.batches[i] == images:
            base = row[i]
        else:
            # Between two profiled batch sizes, or past the last: the line through the nearest two.
            lo = min(max(i - 1, 0), len(self.batches) - 2)
            (b1, t1), (b2, t2) = (self.batches[lo], row[lo]), (self.batches[lo + 1], row[lo + 1])
            base = max(t1 + (t2 - t1) / (b2 - b1) * (images - b1), row[0])
        return base * pixels / nearest


class CostModelFamily(Family):
    name = "costmodel"

    def build(self, request: LoadRequest) -> LoadedModel:
        path, options = request.path, request.options
        if path is None or not (path / COSTS).is_file():
            raise ValueError(f"{path} is not a cost-model folder (no {COSTS})")
        if options:
            raise ValueError(f"unknown options for family 'costmodel': {sorted(options)}")
        if request.variant is not None:
            raise ValueError("family 'costmodel' reads no weight files: a variant does not apply")
        costs = json.loads((path / COSTS).read_text())
        scale = float(costs["time_scale"])

        def scaled(step_s: dict[str, list[float]]) -> dict[int, list[float]]:
            return {int(res) ** 2: [scale * t for t in row] for res, row in step_s.items()}

        # Weights that come staged were read from the disk by the loader already: a memory copy.
        time.sleep(scale * (costs["staged_load_s"] if request.weights is not None else costs["disk_load_s"]))
        return LoadedModel(CostModelPipeline(
            nbytes=int(costs["bytes"]),
            step_s=scaled(costs["step_s"]),
            batches=list(costs["batches"]),
            decode_s=scale * float(costs.get("vae_decode_s", 0.0)),
            native_pixels=int(costs["native_resolution"]) ** 2,
            gangs={int(size): scaled(rows) for size, rows in costs.get("gang_step_s", {}).items()},
        ), self)

    def parallelize(self, model: LoadedModel, layout: Any, *, rank: int, world: int, device: str) -> LoadedModel:
        """The model on a gang of ``world`` ranks (``layout`` spans them all): it sleeps the profile's
        costs for a gang of that size from now on, on every rank. Nothing else to split: no tensors."""
        pipe: CostModelPipeline = model.pipe
        if world not in pipe.gangs:
            raise ValueError(f"parallel: this cost model's profile has no costs for a gang of {world} (its "
                             f"gang_step_s has {', '.join(map(str, sorted(pipe.gangs))) or 'none'})")
        model.pipe = dataclasses.replace(pipe, step_s=pipe.gangs[world])
        return model

    def generate(self, model: LoadedModel, req: GenerateRequest, on_step: StepCallback) -> list[Image.Image]:
        pipe: CostModelPipeline = model.pipe
        pixels = req.width * req.height
        per_step = pipe.seconds_per_step(pixels, req.count)
        deadline = time.monotonic()
        for step in range(1, req.steps + 1):
            deadline += per_step
            _sleep_until(deadline)  # against a deadline, so callback time does not add up
            on_step(step, req.steps, None)
        _sleep_until(deadline + pipe.decode_s * req.count * pixels / pipe.native_pixels)
        return [Image.new("RGB", (req.width, req.height), _colour(seed, prompt))
                for seed, prompt in zip(req.seeds, req.prompts, strict=True)]

    def preview(self, latents: Any, index: int = 0) -> np.ndarray:
        return np.full((8, 8, 3), 128, dtype=np.uint8)


def write_model(folder: Path, profile: dict[str, Any], *, time_scale: float = 1.0) -> Path:
    """Writes a cost-model folder for one model of a profile (a ``[models.X]`` table of the TOML)."""
    folder.mkdir(parents=True, exist_ok=True)
    step_s = {str(res): list(row) for res, row in profile["step_s"].items()}
    gang_step_s = {str(size): {str(res): list(row) for res, row in rows.items()}
                   for size, rows in profile.get("gang_step_s", {}).items()}
    for size, rows in gang_step_s.items():
        if int(size) < 2 or set(rows) != set(step_s):
            raise ValueError(f"gang_step_s.{size}: a gang is 2 or more devices, profiled at the resolutions of "
                             f"step_s ({', '.join(step_s)})")
    costs = {
        "bytes": int(profile["bytes"]),
        "disk_load_s": float(profile["disk_load_s"]),
        "staged_load_s": float(profile["staged_load_s"]),
        "step_s": step_s,
        "batches": list(profile.get("batches", [1, 2, 4, 8])),
        "vae_decode_s": float(profile.get("vae_decode_s", 0.0)),
        "native_resolution": int(profile["default_resolution"]),
        "time_scale": time_scale,
        "gang_step_s": gang_step_s,
    }
    (folder / COSTS).write_text(json.dumps(costs, indent=1))
    (folder / STAND_IN).write_text(json.dumps({"bytes": costs["bytes"],
                                               "read_s": time_scale * float(profile["stage_s"])}))
    # A diffusers-shaped folder, so that the catalog takes it like any other.
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "CostModel"}))
    return folder


def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)


def _colour(seed: int, prompt: str) -> tuple[int, int, int]:
    r, g, b = hashlib.blake2b(f"{seed}:{prompt}".encode(), digest_size=3).digest()
    return r, g, b
