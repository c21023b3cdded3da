"""The scheduler's handlers for VRAM leases (mixed into ``Scheduler``): frontends take, end and list leases;
runners take them and give them back. Every decision is the policy's (``atelier/scheduling/leases.py``);
this turns its effects into messages and cluster events.

A ``TakeLease`` is answered when the lease is granted or refused, not at once: its envelope is kept, and
the answer goes to it then (the mailbox goes on meanwhile). Asking a runner to take a lease is done aside,
so a runner slow to evict never holds up the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from actors.actor import RemoteError, UnexpectedReply, handles
from actors.codec import Envelope
from actors.messages import (
    ClusterEventKind,
    EndLease,
    Error,
    LeaseInfo,
    LeaseList,
    ListLeases,
    MemoryBudget,
    ReclaimMemory,
    TakeLease,
    YieldMemory,
)
from atelier.scheduling.admission import Refused
from atelier.scheduling.leases import AskReclaim, AskYield, Ended, Granted, NotGranted

log = logging.getLogger("atelier.scheduler")

YIELD_TIMEOUT_S = 120.0  # evicting, gc and empty_cache of large models on a busy host


class LeaseHandlers:
    """Mixed into ``Scheduler``: it provides ``policy``, ``clock``, ``_schedule``, ``tell_cluster``, ``ask``,
    ``send``, ``reply`` and ``_tasks``."""

    policy: Any
    _lease_askers: dict[str, Envelope]

    @handles(TakeLease)
    async def on_take_lease(self, msg: TakeLease, env: Envelope) -> Error | None:
        try:
            lease = self.policy.leases.request(self.clock(), device=msg.device, node=msg.node, nbytes=msg.bytes,
                                               ttl_s=msg.ttl_s, urgent=msg.urgent, holder=msg.holder or env.src,
                                               client=env.src, wait_s=msg.wait_s)
        except Refused as refused:
            return Error(code=refused.code, message=refused.message, field=refused.field)
        log.info("lease %s asked by %s: %s bytes on %s of %s%s", lease.id, lease.holder, f"{lease.bytes:,}",
                 lease.device or "every device", lease.node, " (urgent)" if lease.urgent else "")
        self._askers()[lease.id] = env
        await self._schedule()
        return None  # answered once granted or refused

    @handles(EndLease)
    async def on_end_lease(self, msg: EndLease, env: Envelope) -> LeaseInfo | Error:
        try:
            lease = self.policy.leases.end(msg.id, f"released by {env.src}", self.clock())
        except Refused as refused:
            return Error(code=refused.code, message=refused.message, field=refused.field)
        await self._schedule()
        return LeaseInfo(lease=lease.record())

    @handles(ListLeases)
    async def on_list_leases(self, msg: ListLeases, env: Envelope) -> LeaseList:
        return LeaseList(leases=self.policy.leases.listing())

    @handles(MemoryBudget)
    async def on_memory_budget(self, msg: MemoryBudget, env: Envelope) -> None:
        if not self.policy.has_runner(env.src):
            return
        self.policy.leases.runner_budget(env.src, msg.budget_bytes, msg.leased_bytes, msg.full_budget_bytes,
                                         msg.leases, self.clock(), resident=msg.resident)
        log.info("runner %s: budget %s bytes (%s)", env.src, f"{msg.budget_bytes:,}", msg.reason)
        await self._schedule()

    async def holder_gone(self, peer: str) -> None:
        """A frontend went away: the leases it asked for end (an `atelier lease` killed gives the memory back)."""
        self.policy.leases.holder_gone(peer, self.clock())
        self._askers().pop(peer, None)
        await self._schedule()

    def _askers(self) -> dict[str, Envelope]:
        if not hasattr(self, "_lease_askers"):
            self._lease_askers = {}
        return self._lease_askers

    async def carry_out_leases(self) -> None:
        """Sends what the lease policy decided (called with every batch of the policy's effects)."""
        for effect in self.policy.leases.drain():
            lease = getattr(effect, "lease", None)
            if isinstance(effect, AskYield):
                self._tasks.spawn(self._ask_yield(effect), f"lease-{effect.lease.id}-{effect.runner}")
            elif isinstance(effect, AskReclaim):
                await self.send(effect.runner, ReclaimMemory(lease_id=effect.lease_id))
            elif isinstance(effect, Granted):
                record = lease.record()
                log.info("lease %s granted to %s: %s bytes on %s, %s freed", lease.id, lease.holder,
                         f"{lease.bytes:,}", ", ".join(lease.runners), f"{record.freed_bytes:,}")
                asker = self._askers().pop(lease.id, None)
                if asker is not None:
                    await self.reply(asker, LeaseInfo(lease=record))
                await self.tell_cluster(ClusterEventKind.lease_granted, id=lease.id, device=lease.device,
                                        node=lease.node, bytes=lease.bytes, freed=record.freed_bytes,
                                        holder=lease.holder, expires_at=lease.expires_at)
            elif isinstance(effect, NotGranted):
                log.info("lease %s not granted: %s", lease.id, effect.message)
                asker = self._askers().pop(lease.id, None)
                if asker is not None:
                    await self.reply(asker, Error(code=effect.code, message=effect.message))
            elif isinstance(effect, Ended):
                log.info("lease %s ended: %s", lease.id, lease.ended_reason)
                self._askers().pop(lease.id, None)
                await self.tell_cluster(ClusterEventKind.lease_ended, id=lease.id, device=lease.device,
                                        node=lease.node, bytes=lease.bytes, freed=lease.record().freed_bytes,
                                        holder=lease.holder, reason=lease.ended_reason)

    async def _ask_yield(self, effect: AskYield) -> None:
        try:
            answer = await self.ask(effect.runner, YieldMemory(lease=effect.lease), timeout=YIELD_TIMEOUT_S)
        except (asyncio.TimeoutError, RemoteError, UnexpectedReply) as exc:
            log.warning("runner %s did not take lease %s (%s); asking again", effect.runner, effect.lease.id, exc)
            await asyncio.sleep(0.5)  # busy: its batch's report is on its way; else not in a tight loop
            self.policy.leases.take_failed(effect.lease.id, effect.runner)
        else:
            self.policy.leases.taken(effect.lease.id, effect.runner, answer.freed_bytes, answer.budget_bytes,
                                     self.clock(), resident=answer.resident)
        await self._schedule()
