"""A runner's device memory: the budget its models may use, what VRAM leases hold of it, and what other
processes on the device took. Torch-free: the device's free memory comes from a probe passed in
(``cuda_probe`` on a GPU; none on the CPU, where the budget's accounting is all there is), so the tests
drive it with numbers.

- A lease (``take``) shrinks the budget by its bytes until it is given back (``give_back``) or its deadline
  passes (``expired``): the runner keeps the deadline itself, so a lease ends even if the scheduler dies.
- Pressure (``observe``): when the device's free memory and what the models hold no longer cover the budget
  (another process grew), the budget shrinks to what is there, less a reserve; it grows back as memory comes
  back. Changes smaller than ``PRESSURE_STEP`` are ignored, so a budget does not flap with the allocator.
- ``make_free`` evicts least recently used models until the models fit the budget and, where the probe
  measures, the bytes are free on the device itself (after the caller's release: gc and ``empty_cache``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from atelier.jobs import HeldLease
from atelier.resident import ResidentSet

Probe = Callable[[], "int | None"]  # the device's free bytes now (None: not measurable)

PRESSURE_STEP = 256 << 20  # a budget moves for pressure only by at least this much
GIB = 1 << 30

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d|)\s*")


def parse_size(text: str | int) -> int:
    """Bytes from ``8GiB``, ``512MiB``, ``8G`` (10^9; ``GiB``: 2^30) or a plain number; ValueError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"{text}: a size is a positive number of bytes")
        return text
    found = _SIZE.fullmatch(str(text))
    unit = found.group(2).lower() if found else None
    if found is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size: write bytes, or a number with a unit (8GiB, 512MiB, 10GB)")
    size = int(float(found.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{text!r}: a size is more than 0 bytes")
    return size


def parse_duration(text: str | float) -> float:
    """Seconds from ``600``, ``90s``, ``10m``, ``2h``, ``1d``; ValueError otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        found = _DURATION.fullmatch(str(text))
        if found is None:
            raise ValueError(f"{text!r} is not a duration: write seconds, or 90s, 10m, 2h, 1d")
        seconds = float(found.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[found.group(2)]
    if seconds <= 0:
        raise ValueError(f"{text!r}: a duration is more than 0 seconds")
    return seconds


def size_text(size: int) -> str:
    """A size as people read it: ``8.0 GiB``, ``512.0 MiB``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(size) >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def cuda_probe(device: str) -> Probe:
    """The free memory of a CUDA device as a load could use it: the driver's free memory and what torch's
    cache holds unused. Called on the runner's worker thread (its current device is ``device``)."""

    def probe() -> int:
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)

    return probe


@dataclass
class DeviceMemory:
    """What a runner's models may hold on its device, and why it is less than configured."""

    full: int  # the configured budget (``node.device_budget_bytes``, or 90% of the GPU)
    reserve: int = 0  # kept free beyond the models' bytes under pressure (workspaces, activations)
    leases: dict[str, HeldLease] = field(default_factory=dict)
    pressure: int = 0  # bytes given up to other processes' growth

    @property
    def leased(self) -> int:
        return sum(lease.bytes for lease in self.leases.values())

    @property
    def budget(self) -> int:
        return max(0, self.full - self.leased - self.pressure)

    def take(self, lease: HeldLease) -> None:
        """Holds ``lease`` (again: a repeat of one held changes nothing). ValueError where its bytes, with
        the other leases', are more than the configured budget: then no eviction could grant it."""
        if lease.id in self.leases:
            return
        if lease.bytes + self.leased > self.full:
            raise ValueError(f"a lease of {lease.bytes:,} bytes, with the {self.leased:,} leased already, is more "
                             f"than the device budget of {self.full:,} bytes")
        self.leases[lease.id] = lease

    def give_back(self, lease_id: str) -> HeldLease | None:
        return self.leases.pop(lease_id, None)

    def expired(self, now: float | None = None) -> list[HeldLease]:
        """Ends the leases whose deadline has passed (wall clock); returns them."""
        now = time.time() if now is None else now
        ended = [lease for lease in self.leases.values() if lease.expires_at <= now]
        for lease in ended:
            del self.leases[lease.id]
        return ended

    def observe(self, free: int | None, held: int) -> bool:
        """Takes a measurement of the device (``free`` bytes, while the models hold ``held``: between batches,
        or before a load); returns whether the budget changed. What the models may use is at most what they
        hold and what is free, less the reserve: the rest is another process's now."""
        if free is None:
            return False
        ceiling = max(0, self.full - self.leased)
        room = max(0, free + held - self.reserve)
        pressure = max(0, ceiling - room)
        if abs(pressure - self.pressure) < PRESSURE_STEP and not (pressure == 0 and self.pressure):
            return False
        self.pressure = pressure
        return True


def make_free(models: ResidentSet, need: int, probe: Probe | None, release: Callable[[list[str]], None]) -> list[str]:
    """Evicts least recently used models until the rest fit ``models.budget`` and, where ``probe`` measures,
    ``need`` bytes are free on the device; ``release`` (the runner's: drop references, gc, ``empty_cache``)
    is called with each round's evicted before measuring again. Returns every evicted, oldest first."""
    evicted = models.make_room("", 0, keep_slot=False)
    if evicted:
        release(evicted)
    while probe is not None and len(models):
        free = probe()
        if free is None or free >= need:
            break
        # By the accounting, enough to cover the shortfall (else the oldest: the device knows better); measured
        # again after the release.
        more = models.make_room("", 0, keep_slot=False, free=free, reserve=need) or models.evict_oldest()
        release(more)
        evicted += more
    return evicted
