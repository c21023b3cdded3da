"""A runner's side of VRAM leases and of memory pressure: the ``Runner``'s handlers and loop for them.

The scheduler asks an idle runner to take a lease (``YieldMemory``): the budget shrinks by its bytes and the
least recently used models go until the bytes are free on the device itself (``atelier.vram.make_free``:
``mem_get_info`` after gc and ``empty_cache`` on CUDA; the budget's accounting on the CPU). ``ReclaimMemory``
gives them back; so does the lease's own deadline, kept here, so a lease ends even if the scheduler dies.

On CUDA the device's free memory is also watched (every ``WATCH_S``, and before a load): when another
process grew, the budget shrinks (idle models go, never mid-batch) rather than running into an OOM, and it
grows back when the memory comes back. Every change the runner makes on its own is told to the scheduler
(``MemoryBudget``), which places work by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from actors.actor import handles
from actors.codec import SCHEDULER, Envelope
from actors.messages import Error, MemoryBudget, MemoryYielded, Ok, ReclaimMemory, YieldMemory
from atelier.jobs import ErrorCode
from atelier.vram import DeviceMemory, make_free, size_text

log = logging.getLogger("atelier.runner")

WATCH_S = 2.0  # how often the device's free memory is measured, and the leases' deadlines looked at


class MemoryHandlers:
    """Mixed into ``Runner``: it provides ``models`` (a ResidentSet), ``memory`` (a DeviceMemory), ``probe``,
    ``active``, ``_worker``, ``_dropped``, ``_free_memory`` and the actor's ``send``."""

    memory: DeviceMemory
    probe: Any  # atelier.vram.Probe | None

    def memory_capabilities(self) -> dict[str, Any]:
        memory = self.memory
        return dict(budget_bytes=memory.budget, leased_bytes=memory.leased, full_budget_bytes=memory.full,
                    leases=list(memory.leases.values()))

    @handles(YieldMemory)
    async def on_yield_memory(self, msg: YieldMemory, env: Envelope) -> MemoryYielded | Error:
        if env.src != SCHEDULER:
            return self._not_from_scheduler(env)
        if self.active is not None:  # the scheduler waits for idle runners: it restarted, say; it asks again
            return Error(code=ErrorCode.busy, message=f"{self.name} is running batch {self.active.id}; "
                                                      "a lease is taken between batches")
        lease = msg.lease
        try:
            self.memory.take(lease)
        except ValueError as exc:
            return Error(code=ErrorCode.bad_request, field="bytes", message=f"{self.name}: {exc}")
        before = await self._measure()
        evicted = await self._fit_budget(f"for VRAM lease {lease.id} ({lease.holder or 'no holder named'})",
                                         need=lease.bytes)
        after = await self._measure()
        freed = max(0, after - before) if after is not None and before is not None else 0
        if after is None:  # the CPU: what the accounting gave up
            freed = sum(self._evicted_bytes.pop(name, 0) for name in evicted)
        self._evicted_bytes.clear()
        log.info("%s: took lease %s of %s until %s: evicted %s, freed %s; budget now %s", self.name, lease.id,
                 size_text(lease.bytes), time.strftime("%H:%M:%S", time.localtime(lease.expires_at)),
                 ", ".join(evicted) or "nothing", size_text(freed), size_text(self.memory.budget))
        return MemoryYielded(lease_id=lease.id, freed_bytes=freed, evicted=evicted, budget_bytes=self.memory.budget,
                             free_bytes=after, resident=self.models.bytes)

    @handles(ReclaimMemory)
    async def on_reclaim_memory(self, msg: ReclaimMemory, env: Envelope) -> Ok | Error:
        if env.src != SCHEDULER:
            return self._not_from_scheduler(env)
        if self.memory.give_back(msg.lease_id) is not None:
            self.models.budget = self.memory.budget
            # Told, so the scheduler places work by the budget as it is, whatever it guessed.
            await self._tell_budget(f"lease {msg.lease_id} ended")
        return Ok()

    async def _watch_memory(self) -> None:
        """Ends leases at their deadline and follows the device's free memory, between batches."""
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                await self._check_memory()
            except Exception:  # the next round tries again
                log.exception("%s: watching device memory failed", self.name)

    async def _check_memory(self) -> None:
        reasons = [f"lease {lease.id} reached its deadline" for lease in self.memory.expired()]
        if self.active is None and self.probe is not None:
            free = await self._measure()
            if self.memory.observe(free, self.models.used):
                reasons.append(f"the device has {size_text(free or 0)} free besides the models' "
                               f"{size_text(self.models.used)}: another process took or gave back memory")
        if not reasons:
            return
        if self.active is None:
            await self._fit_budget(f"to fit a budget of {size_text(self.memory.budget)}", need=0)
        else:
            self.models.budget = self.memory.budget  # the batch's model stays; the rest go after it
        await self._tell_budget("; ".join(reasons))

    async def observe_before_load(self, free: int | None) -> None:
        """A load measured the device first: a shrink found there counts now, before room is made, and the
        scheduler hears of it before the batch's report (which may hand the batch back for it)."""
        if self.memory.observe(free, self.models.used):
            self.models.budget = self.memory.budget
            await self._tell_budget(f"the device has {size_text(free or 0)} free before a load")

    async def _tell_budget(self, why: str) -> None:
        log.info("%s: budget now %s (%s)", self.name, size_text(self.memory.budget), why)
        with contextlib.suppress(Exception):
            await self.send(SCHEDULER, MemoryBudget(budget_bytes=self.memory.budget, leased_bytes=self.memory.leased,
                                                    full_budget_bytes=self.memory.full,
                                                    leases=list(self.memory.leases.values()), reason=why[:400],
                                                    resident=self.models.bytes))

    async def _fit_budget(self, why: str, *, need: int) -> list[str]:
        """Evicts until the models fit the budget and ``need`` bytes are free on the device; the evicted."""
        self.models.budget = self.memory.budget
        sizes = self.models.bytes

        def release(names: list[str]) -> None:
            for name in names:
                self._evicted_bytes[name] = sizes.get(name, 0)
            self._dropped(names, why)
            self._free_memory()

        if self.probe is None:
            return make_free(self.models, need, None, release)
        # On the worker: the probe and empty_cache are CUDA calls, which run on the thread that owns the device.
        return await asyncio.get_running_loop().run_in_executor(self._worker, make_free, self.models, need,
                                                                self.probe, release)

    async def _measure(self) -> int | None:
        if self.probe is None:
            return None
        return await asyncio.get_running_loop().run_in_executor(self._worker, self.probe)
