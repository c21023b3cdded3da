"""How long things take, learnt from what the runners measure.

A denoising step's time depends on the model, the device, the image size and the batch, so
for each (model, device) we keep a moving average of seconds per step for every (pixels,
images) pair seen. A pair not seen yet is estimated from those that were:

- the same size with other batch sizes: the line through the two nearest (a batch costs a
  fixed part plus a part per image; on a GPU the fixed part is large, which is why batching pays);
- otherwise the nearest pair by work (pixels x images), scaled in proportion to the work;
- for a model not seen on the device at all: the device's mean rate per work unit over the
  models it has run, else a prior.

Loads are kept per (model, where from): resident, staged in shared memory, or disk.

Pure: no clock and no I/O, so the scheduler's tests can feed it whatever they like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

UNIT_PIXELS = 512 * 512  # a work unit is one 512x512 image for one step
NEGLIGIBLE_STEP_S = 0.002  # a batch step faster than this costs nothing worth batching less for


def work_units(width: int, height: int, images: int, steps: int) -> float:
    return steps * images * width * height / UNIT_PIXELS


@dataclass
class _Average:
    value: float
    samples: int = 1

    def add(self, sample: float, alpha: float) -> None:
        # The first few samples count fully (a plain mean), then the average moves with the device.
        weight = max(alpha, 1.0 / (self.samples + 1))
        self.value += weight * (sample - self.value)
        self.samples += 1


class Estimates:
    def __init__(self, *, prior_step_s: float = 0.05, prior_load_s: dict[str, float] | None = None,
                 alpha: float = 0.3):
        self.prior_step_s = prior_step_s  # seconds per step per work unit, before anything is measured
        self.prior_load_s = {"resident": 0.0, "staged": 1.0, "disk": 5.0, **(prior_load_s or {})}
        self.alpha = alpha
        self._steps: dict[tuple[str, str], dict[tuple[int, int], _Average]] = {}
        self._loads: dict[tuple[str, str], _Average] = {}

    # -- what runners measured -------------------------------------------------- #

    def observe_step(self, model: str, device: str, pixels: int, images: int, step_s: float) -> None:
        if step_s <= 0 or images <= 0 or pixels <= 0:
            return
        seen = self._steps.setdefault((model, device), {})
        average = seen.get((pixels, images))
        if average is None:
            seen[(pixels, images)] = _Average(step_s)
        else:
            average.add(step_s, self.alpha)

    def observe_load(self, model: str, source: str, seconds: float) -> None:
        if source == "resident" or seconds < 0:
            return
        average = self._loads.get((model, source))
        if average is None:
            self._loads[(model, source)] = _Average(seconds)
        else:
            average.add(seconds, self.alpha)

    # -- estimates ---------------------------------------------------------------- #

    def step_s(self, model: str, device: str, pixels: int, images: int) -> float:
        seen = self._steps.get((model, device))
        if not seen:
            return self._device_rate(device) * pixels * images / UNIT_PIXELS
        exact = seen.get((pixels, images))
        if exact is not None:
            return exact.value
        same_size = sorted((n, a.value) for (p, n), a in seen.items() if p == pixels)
        if len(same_size) >= 2:
            (n1, t1), (n2, t2) = sorted(same_size, key=lambda s: abs(s[0] - images))[:2]
            per_image = (t2 - t1) / (n2 - n1)
            # A bigger batch never takes less than a smaller one measured: noisy samples may tilt the line.
            floor = max((t for n, t in same_size if n <= images), default=0.0)
            return max(t1 + per_image * (images - n1), floor)
        work = pixels * images
        (p, n), average = min(seen.items(), key=lambda item: abs(math.log(item[0][0] * item[0][1] / work)))
        return average.value * work / (p * n)

    def measured(self, model: str, device: str) -> bool:
        """Whether a step of the model on the device was ever measured (estimates for it are not guesses)."""
        return bool(self._steps.get((model, device)))

    def useful_batch(self, model: str, device: str, pixels: int, cap: int, min_gain: float) -> int:
        """The most images worth running in one call at this size, up to ``cap``.

        A bigger batch is worth it while each step of measured sizes lowers the time per image by
        at least ``min_gain`` (on a busy GPU it stops: a batch of 8 then costs 8 images' time and
        makes the first image wait for the last). Past the largest size measured, it explores:
        twice that size (2 before anything is measured), so the next batches measure it."""
        seen = sorted((n, a.value / n) for (p, n), a in self._steps.get((model, device), {}).items() if p == pixels)
        for (n1, per1), (n2, per2) in zip(seen, seen[1:], strict=False):
            # A step that costs next to nothing (the noop model) has no time to lose: batch it fully,
            # which saves the messages of separate calls.
            if per2 > per1 * (1 - min_gain) and per2 * n2 > NEGLIGIBLE_STEP_S:
                return min(cap, n1)
        return min(cap, 2 * seen[-1][0] if seen else 2)

    def run_s(self, model: str, device: str, *, width: int, height: int, images: int, steps: int) -> float:
        return self.step_s(model, device, width * height, images) * steps

    def load_s(self, model: str, source: str) -> float:
        average = self._loads.get((model, source))
        if average is not None:
            return average.value
        return self.prior_load_s[source]

    def _device_rate(self, device: str) -> float:
        """Mean seconds per step per work unit over what this device has run; the prior if nothing."""
        rates = [a.value / (p * n / UNIT_PIXELS)
                 for (_, d), seen in self._steps.items() if d == device
                 for (p, n), a in seen.items()]
        return sum(rates) / len(rates) if rates else self.prior_step_s
