"""VRAM leases, the policy's half: which runners a lease covers, when each is asked to take it, when it is
granted and when it ends. Pure: time is passed in, and what is to be sent comes out as effects.

- A lease covers every runner whose devices include its device (a gang spanning it too), or every runner of
  its node. While it is pending those runners take no new batch (``blocks``); an urgent lease also asks the
  batch each one runs to make way at its next step (``StopRunning(pause=True)``: a generation's jobs go back
  to the front of their owners' queues, a training checkpoints; no attempt is counted, nothing is lost).
- Each runner, once idle, is asked to take the lease (``AskYield``); when all have, it is granted
  (``Granted``) and they take work again within the smaller budget. A model that does not fit that budget is
  not placed there (``Runner.cannot_hold``): its jobs wait, or go to another runner, until the lease ends.
  No job fails because of a lease.
- A lease ends at its release, at its expiry, when its holder (the peer that asked) goes away, or, while
  pending, when it was not granted within its wait (``NotGranted``). Its runners get the memory back
  (``AskReclaim``). Each runner also keeps the deadline itself, a little later than the policy's, so a lease
  ends even if the scheduler dies; a restarted scheduler learns the leases held from the runners.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from atelier.jobs import Capabilities, ErrorCode, HeldLease, Lease
from atelier.scheduling.admission import Refused
from atelier.scheduling.state import Runner, State, StopRunning

RUNNER_GRACE_S = 10.0  # a runner's own deadline comes this long after the policy's: the policy's ends it first
KEEP_ENDED = 50  # ended leases still listed


@dataclass
class LeaseEntry:
    id: str
    holder: str
    client: str  # the peer that asked: its end ends the lease
    node: str | None
    device: str | None
    runners: list[str]
    bytes: int
    urgent: bool
    ttl_s: float
    wait_until: float
    state: str = "pending"
    granted_at: float | None = None
    expires_at: float | None = None
    ended_reason: str | None = None
    asked: set[str] = field(default_factory=set)  # runners asked to take it, not yet answered
    taken: dict[str, int] = field(default_factory=dict)  # runner -> the bytes it freed for it
    paused: set[str] = field(default_factory=set)  # runners whose batch was asked to make way

    def record(self) -> Lease:
        return Lease(id=self.id, holder=self.holder, node=self.node, device=self.device, runners=list(self.runners),
                     bytes=self.bytes, freed_bytes=sum(self.taken.values()), urgent=self.urgent, state=self.state,
                     granted_at=self.granted_at, expires_at=self.expires_at, ended_reason=self.ended_reason)

    def held(self, now: float) -> HeldLease:
        """The lease as a runner is asked to take it, with its own deadline."""
        deadline = (self.expires_at if self.expires_at is not None else now + self.ttl_s) + RUNNER_GRACE_S
        return HeldLease(id=self.id, bytes=self.bytes, expires_at=deadline, holder=self.holder, client=self.client,
                         node=self.node, device=self.device, urgent=self.urgent)


# Effects: carried out by the scheduler's lease handlers (actors/scheduler_leases.py)


@dataclass(frozen=True)
class AskYield:
    runner: str
    lease: HeldLease


@dataclass(frozen=True)
class AskReclaim:
    runner: str
    lease_id: str


@dataclass(frozen=True)
class Granted:
    lease: LeaseEntry


@dataclass(frozen=True)
class NotGranted:
    lease: LeaseEntry
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class Ended:
    lease: LeaseEntry


LeaseEffect = AskYield | AskReclaim | Granted | NotGranted | Ended


class Leases:
    def __init__(self, state: State, new_id: Callable[[], str]):
        self.state = state
        self.new_id = new_id
        self.active: dict[str, LeaseEntry] = {}  # pending and granted, by id
        self.ended: deque[LeaseEntry] = deque(maxlen=KEEP_ENDED)
        self.effects: list[LeaseEffect] = []
        self._refused: dict[str, set[str]] = {}  # runner -> models it handed back for want of memory
        self._limited: set[str] = set()  # runners given a ``cannot_hold`` by ``_fit_models``

    def drain(self) -> list[LeaseEffect]:
        effects, self.effects = self.effects, []
        return effects

    # -- queries -------------------------------------------------------------- #

    def listing(self) -> list[Lease]:
        return [lease.record() for lease in self.active.values()] + [lease.record() for lease in self.ended]

    def get(self, lease_id: str) -> LeaseEntry:
        lease = self.active.get(lease_id) or next((e for e in self.ended if e.id == lease_id), None)
        if lease is None:
            raise Refused(ErrorCode.bad_request, field="id", message=(
                f"no lease {lease_id!r} (never taken, or ended long ago); `atelier status` lists them"))
        return lease

    def blocked(self) -> set[str]:
        """The runners a pending lease keeps from taking a new batch."""
        return {name for lease in self.active.values() if lease.state == "pending" for name in lease.runners}

    @property
    def wake_at(self) -> float | None:
        """When a lease is next due: a pending one's wait, or a granted one's expiry."""
        times = [lease.wait_until if lease.state == "pending" else lease.expires_at for lease in self.active.values()]
        return min((t for t in times if t is not None), default=None)

    # -- frontends ------------------------------------------------------------ #

    def request(self, now: float, *, device: str | None, node: str | None, nbytes: int, ttl_s: float, urgent: bool,
                holder: str, client: str, wait_s: float) -> LeaseEntry:
        """A new pending lease, over the runners it covers; Refused where it can never be granted."""
        runners = self._covered(device, node)
        node = runners[0].node
        for runner in runners:
            full = runner.capabilities.full_budget_bytes
            if full and nbytes > full:
                where = f"{device} of node {node}" if device else f"a device of node {node}"
                raise Refused(ErrorCode.bad_request, field="bytes", message=(
                    f"{nbytes:,} bytes is more than the budget of {full:,} bytes atelier has on {where} "
                    f"({runner.name}): no eviction can free them; ask for at most that"))
        lease = LeaseEntry(self.new_id(), holder, client, node, device, [r.name for r in runners], nbytes, urgent,
                           ttl_s, now + wait_s)
        self.active[lease.id] = lease
        return lease

    def end(self, lease_id: str, reason: str, now: float) -> LeaseEntry:
        """Ends a lease (released, expired, its holder gone); one ended already is returned as it is."""
        lease = self.get(lease_id)
        if lease.state != "ended":
            self._end(lease, reason, now)
        return lease

    def holder_gone(self, client: str, now: float) -> None:
        for lease in [lease for lease in self.active.values() if lease.client == client]:
            self._end(lease, f"its holder {client} went away", now)

    def _covered(self, device: str | None, node: str | None) -> list[Runner]:
        runners = [r for r in self.state.runners.values() if node is None or r.node == node]
        if device is not None:
            runners = [r for r in runners if device in r.devices or r.device == device]
        nodes = sorted({r.node or "" for r in runners})
        if not runners:
            known = sorted({f"{r.node}:{d}" if node is None else d for r in self.state.runners.values()
                            if node is None or r.node == node for d in (r.devices or {r.device})})
            what = f"device {device!r}" if device else "any device"
            where = f" on node {node!r}" if node else ""
            raise Refused(ErrorCode.bad_request, field="device" if device else "node", message=(
                f"no runner has {what}{where}; the devices are: {', '.join(known) or 'none (no runner has joined)'}"))
        if len(nodes) > 1:
            raise Refused(ErrorCode.bad_request, field="node", message=(
                f"{'device ' + repr(device) if device else 'a lease on every device'} is on several nodes "
                f"({', '.join(nodes)}): name one with node"))
        return runners

    # -- the plan ------------------------------------------------------------- #

    def update(self, now: float) -> None:
        """Moves every lease on: expiries, waits run out, idle runners asked to take a pending one, urgent
        ones' batches asked to make way; and which models each runner's budget cannot hold now."""
        for lease in list(self.active.values()):
            if lease.state == "granted":
                if lease.expires_at is not None and now >= lease.expires_at:
                    self._end(lease, "expired", now)
                continue
            lease.runners = [name for name in lease.runners if name in self.state.runners]
            if not lease.runners:
                self._not_granted(lease, ErrorCode.unroutable, "its runners went away before it was granted", now)
            elif now >= lease.wait_until:
                busy = [name for name in lease.runners if name not in lease.taken]
                self._not_granted(lease, ErrorCode.busy, (
                    f"not freed in time: {', '.join(busy)} still ran a batch; ask with urgent to stop it at its "
                    "next step, or wait longer"), now)
            else:
                self._progress(lease, now)
        self._fit_models()

    def _progress(self, lease: LeaseEntry, now: float) -> None:
        for name in lease.runners:
            runner = self.state.runners[name]
            if name in lease.taken or name in lease.asked:
                continue
            if runner.batch is None:
                lease.asked.add(name)
                self.effects.append(AskYield(name, lease.held(now)))
            elif lease.urgent and name not in lease.paused:
                first = self.state.jobs.get(runner.batch.jobs[0]) if runner.batch.jobs else None
                lease.paused.add(name)
                if first is not None and first.live and not first.stopping and not first.pausing:
                    first.pausing = True
                    self.state.effects.append(StopRunning(name, first.id, f"making way for VRAM lease {lease.id} "
                                                                          f"({lease.holder or 'urgent'})", pause=True))
        if lease.runners and all(name in lease.taken for name in lease.runners):
            lease.state, lease.granted_at, lease.expires_at = "granted", now, now + lease.ttl_s
            self.effects.append(Granted(lease))

    def _fit_models(self) -> None:
        """Which models each runner cannot hold in its budget now: those known to be bigger, and those it
        handed back for want of memory, until its budget is whole again."""
        # Only runners whose budget is short (``State.short``) hold anything back: a fleet at its full budgets
        # costs nothing here.
        for name in [n for n in self._limited if n not in self.state.short]:
            self._limited.discard(name)
            self._refused.pop(name, None)
            if name in self.state.runners:
                self.state.runners[name].cannot_hold = set()
        if not self.state.short:
            return
        sizes: dict[str, int] = {}
        for report in [*(r.resident for r in self.state.runners.values()), *self.state.staged.values()]:
            for model, size in report.items():
                sizes[model] = max(size, sizes.get(model, 0))
        for name in self.state.short:
            runner = self.state.runners[name]
            runner.cannot_hold = {m for m, size in sizes.items() if size > runner.capabilities.budget_bytes} | \
                self._refused.get(name, set())
            self._limited.add(name)

    # -- what runners say ----------------------------------------------------- #

    def taken(self, lease_id: str, runner: str, freed: int, budget: int, now: float, *,
              resident: dict[str, int] | None = None) -> None:
        """The runner took the lease: it freed ``freed`` bytes, its budget is ``budget``, ``resident`` stays."""
        lease = self.active.get(lease_id)
        r = self.state.runners.get(runner)
        if r is not None and r.batch is None and resident is not None:
            self.state.set_resident(r, resident)
        if lease is None or lease.state == "ended":  # it ended while the runner took it: give it back
            self.effects.append(AskReclaim(runner, lease_id))
            return
        if r is not None:
            caps = r.capabilities
            self.state.set_capabilities(r, caps.model_copy(update={"budget_bytes": budget,
                                                                   "leased_bytes": caps.leased_bytes + lease.bytes}))
        lease.asked.discard(runner)
        lease.taken[runner] = freed
        if lease.state == "pending":
            self._progress(lease, now)

    def take_failed(self, lease_id: str, runner: str) -> None:
        """The runner did not take it (busy after all, or no answer): asked again at the next update."""
        lease = self.active.get(lease_id)
        if lease is not None:
            lease.asked.discard(runner)

    def runner_seen(self, name: str, caps: Capabilities, now: float) -> None:
        """A runner (re)joined or said what it holds: its leases, which a restarted scheduler learns here."""
        held = {lease.id: lease for lease in caps.leases}
        for lease in self.active.values():
            if name in lease.taken and lease.id not in held:  # the runner restarted: it holds nothing now
                del lease.taken[name]
        for lease_id, h in held.items():
            lease = self.active.get(lease_id)
            if lease is None:
                if any(e.id == lease_id for e in self.ended):
                    self.effects.append(AskReclaim(name, lease_id))
                    continue
                lease = LeaseEntry(lease_id, h.holder, h.client, h.node, h.device, [], h.bytes, h.urgent,
                                   ttl_s=max(0.0, h.expires_at - RUNNER_GRACE_S - now), wait_until=now, state="granted",
                                   granted_at=h.granted_at or now, expires_at=h.expires_at - RUNNER_GRACE_S)
                self.active[lease_id] = lease
            if name not in lease.runners:
                lease.runners.append(name)
            lease.taken.setdefault(name, 0)

    def runner_budget(self, name: str, budget: int, leased: int, full: int, leases: list[HeldLease],
                      now: float, *, resident: dict[str, int] | None = None) -> None:
        """A runner's budget changed on its own (other processes' memory, a lease's deadline there)."""
        runner = self.state.runners.get(name)
        if runner is None:
            return
        if runner.batch is None and resident is not None:
            self.state.set_resident(runner, resident)
        self.state.set_capabilities(runner, runner.capabilities.model_copy(update={
            "budget_bytes": budget, "leased_bytes": leased, "full_budget_bytes": full, "leases": list(leases)}))
        self._refused.pop(name, None)  # what did not fit may now: the next refusal says again
        held = {lease.id for lease in leases}
        for lease in list(self.active.values()):
            if lease.state == "granted" and name in lease.taken and lease.id not in held:
                del lease.taken[name]
                if not lease.taken:
                    self._end(lease, "its runners' own deadline passed", now, reclaim=False)

    def handed_back(self, runner: str, model: str) -> None:
        """The runner handed a batch back unstarted: its budget is short of the model now."""
        r = self.state.runners.get(runner)
        if r is not None and r.capabilities.full_budget_bytes and \
                r.capabilities.budget_bytes < r.capabilities.full_budget_bytes:
            self._refused.setdefault(runner, set()).add(model)
            r.cannot_hold.add(model)

    # -- transitions ---------------------------------------------------------- #

    def _not_granted(self, lease: LeaseEntry, code: ErrorCode, message: str, now: float) -> None:
        self.effects.append(NotGranted(lease, code, message))
        self._end(lease, f"not granted: {message}", now, announce=False)

    def _end(self, lease: LeaseEntry, reason: str, now: float, *, announce: bool = True,
             reclaim: bool = True) -> None:
        was_granted = lease.state == "granted"
        lease.state, lease.ended_reason = "ended", reason
        for name in [*lease.taken, *lease.asked]:
            if reclaim:
                self.effects.append(AskReclaim(name, lease.id))
            runner = self.state.runners.get(name)
            if runner is not None and name in lease.taken:
                caps = runner.capabilities
                self.state.set_capabilities(runner, caps.model_copy(update={
                    "budget_bytes": min(caps.full_budget_bytes or caps.budget_bytes + lease.bytes,
                                        caps.budget_bytes + lease.bytes),
                    "leased_bytes": max(0, caps.leased_bytes - lease.bytes)}))
        self.active.pop(lease.id, None)
        self.ended.appendleft(lease)
        if announce and was_granted:
            self.effects.append(Ended(lease))
        elif announce:  # its asker still waits for an answer
            self.effects.append(NotGranted(lease, ErrorCode.conflict,
                                           f"the lease ended before it was granted: {reason}"))
