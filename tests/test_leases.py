"""VRAM leases on the pure policy core (time passed in) and a runner's memory logic (atelier/vram.py, a probe
passed in): what each rule does, with device budgets in bytes."""

from __future__ import annotations

import pytest

from atelier.jobs import Capabilities, ErrorCode, HeldLease, JobFailed, JobState, RunTiming
from atelier.resident import ResidentSet
from atelier.scheduling.leases import AskReclaim, AskYield, Ended, Granted, NotGranted
from atelier.scheduling.policy import Dispatch, Refused, StopRunning
from atelier.vram import PRESSURE_STEP, DeviceMemory, make_free, parse_duration, parse_size
from tests.test_policy import finish, job, make_policy

GB = 1 << 30


def runner(name: str = "r1", node: str = "n1", device: str = "cuda:0", *, budget: int = 20 * GB,
           resident: dict[str, int] | None = None, devices: list[str] | None = None, **more) -> Capabilities:
    return Capabilities(pid=1, node=node, device=device, device_name="H100", devices=devices or [device],
                        resident=resident or {}, budget_bytes=budget, full_budget_bytes=budget, **more)


def ask(policy, now: float = 0.0, **kw):
    settings = dict(device="cuda:0", node=None, nbytes=8 * GB, ttl_s=600.0, urgent=False, holder="maw",
                    client="client-maw", wait_s=60.0)
    settings.update(kw)
    return policy.leases.request(now, **settings)


def lease_effects(policy, kind):
    return [e for e in policy.leases.drain() if isinstance(e, kind)]


def running(policy, now: float = 0.0, **kw):
    """One job dispatched to r1 and running."""
    submitted = policy.submit(job(**kw), "c", now)
    policy.schedule(now)
    (dispatch,) = [e for e in policy.drain() if isinstance(e, Dispatch)]
    policy.batch_update("r1", dispatch.batch.id, JobState.running, now)
    policy.drain()
    return submitted, dispatch


def grant(policy, lease, now: float, *, freed: int = 0, budget: int = 12 * GB):
    (yield_,) = lease_effects(policy, AskYield)
    assert yield_.runner == "r1" and yield_.lease.bytes == lease.bytes
    policy.leases.taken(lease.id, "r1", freed, budget, now)
    (granted,) = lease_effects(policy, Granted)
    return granted


def test_a_lease_that_can_never_be_granted_is_refused_saying_why(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", runner(), 0.0)
    policy.runner_up("r2", runner("r2", node="n2"), 0.0)
    with pytest.raises(Refused) as several:
        ask(policy)
    assert several.value.field == "node" and "n1, n2" in several.value.message
    with pytest.raises(Refused) as unknown:
        ask(policy, device="cuda:7")
    assert unknown.value.field == "device" and "n1:cuda:0" in unknown.value.message
    with pytest.raises(Refused) as too_big:
        ask(policy, node="n1", nbytes=21 * GB)
    assert too_big.value.field == "bytes" and "no eviction" in too_big.value.message
    assert ask(policy, node="n2").runners == ["r2"]


def test_a_lease_waits_for_the_running_batch_blocks_new_ones_and_its_runner_works_again_once_granted(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", runner(), 0.0)
    first, dispatch = running(policy)
    lease = ask(policy, now=1.0)
    waiting = policy.submit(job(user="bob"), "c", 1.0)
    policy.schedule(1.0)
    assert not [e for e in policy.drain() if isinstance(e, Dispatch | StopRunning)]  # not urgent: it finishes
    assert not lease_effects(policy, AskYield)
    finish(policy, dispatch, 2.0, resident={"tiny-sd": 2 * GB})
    assert first.state is JobState.done and first.attempts == 1
    policy.schedule(2.0)
    assert not [e for e in policy.drain() if isinstance(e, Dispatch)]  # the lease goes first
    granted = grant(policy, lease, 2.5, freed=2 * GB)
    assert granted.lease.record().state == "granted" and granted.lease.record().freed_bytes == 2 * GB
    assert granted.lease.expires_at == 2.5 + 600.0
    policy.schedule(2.5)
    (again,) = [e for e in policy.drain() if isinstance(e, Dispatch)]
    assert [spec.id for spec, *_ in again.items] == [waiting.id]
    assert policy.status().runners[0].capabilities.budget_bytes == 12 * GB


def test_an_urgent_lease_stops_the_batch_at_its_next_step_and_its_jobs_lose_nothing(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", runner(), 0.0)
    first, dispatch = running(policy)
    lease = ask(policy, now=1.0, urgent=True)
    policy.schedule(1.0)
    (stop,) = [e for e in policy.drain() if isinstance(e, StopRunning)]
    assert stop.pause and stop.runner == "r1" and lease.id in stop.reason
    policy.batch_done("r1", dispatch.batch.id, [JobFailed(job_id=first.id, reason="paused: making way",
                                                          retryable=True, yielded=True)], {}, RunTiming(), 1.5)
    assert first.state is JobState.queued and first.attempts == 0  # no attempt counted
    assert policy.queued()[0] == first.id
    policy.schedule(1.5)
    grant(policy, lease, 1.6)
    policy.schedule(1.6)
    (again,) = [e for e in policy.drain() if isinstance(e, Dispatch)]
    assert [spec.id for spec, *_ in again.items] == [first.id]


def test_a_model_that_does_not_fit_the_leased_budget_waits_until_the_lease_ends(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", runner(resident={"tiny-sd": 15 * GB}), 0.0)
    lease = ask(policy)
    policy.schedule(0.0)
    grant(policy, lease, 0.0, freed=15 * GB)
    big = policy.submit(job(), "c", 1.0)
    policy.schedule(1.0)
    assert not [e for e in policy.drain() if isinstance(e, Dispatch)]
    assert big.state is JobState.queued and "tiny-sd" in policy.state.runners["r1"].cannot_hold
    policy.leases.end(lease.id, "released by maw", 2.0)
    assert [e.runner for e in lease_effects_all(policy, AskReclaim)] == ["r1"]
    policy.schedule(2.0)
    (dispatch,) = [e for e in policy.drain() if isinstance(e, Dispatch)]
    assert dispatch.items[0][0].id == big.id


def lease_effects_all(policy, kind):
    return [e for e in policy.leases.effects if isinstance(e, kind)]


def test_a_handed_back_batch_keeps_its_model_off_the_leased_runner_and_counts_no_attempt(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", runner(), 0.0)
    lease = ask(policy)
    policy.schedule(0.0)
    grant(policy, lease, 0.0)
    spec = policy.submit(job(), "c", 1.0)
    policy.schedule(1.0)
    (dispatch,) = [e for e in policy.drain() if isinstance(e, Dispatch)]  # its size was not known
    policy.batch_done("r1", dispatch.batch.id, [JobFailed(job_id=spec.id, reason="does not fit", retryable=True)],
                      {}, RunTiming(), 1.1, refused=True)
    assert spec.state is JobState.queued and spec.attempts == 0
    policy.schedule(1.2)
    assert not [e for e in policy.drain() if isinstance(e, Dispatch)]
    policy.leases.end(lease.id, "released", 2.0)
    policy.schedule(2.0)
    assert [e for e in policy.drain() if isinstance(e, Dispatch)]


def test_a_lease_ends_at_its_expiry_and_when_its_holder_goes_away(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", runner(), 0.0)
    timed = ask(policy, ttl_s=10.0)
    policy.schedule(0.0)
    grant(policy, timed, 0.0)
    assert policy.leases.wake_at == 10.0
    policy.schedule(9.9)
    assert not lease_effects_all(policy, Ended)
    policy.schedule(10.0)
    effects = policy.leases.drain()
    assert [type(e) for e in effects] == [AskReclaim, Ended] and effects[1].lease.ended_reason == "expired"
    assert policy.status().runners[0].capabilities.budget_bytes == 20 * GB

    held = ask(policy, now=11.0, client="client-killed")
    policy.schedule(11.0)
    grant(policy, held, 11.0)
    policy.leases.holder_gone("client-killed", 12.0)
    (ended,) = lease_effects(policy, Ended)
    assert "client-killed went away" in ended.lease.ended_reason
    assert [lease.state for lease in policy.leases.listing()] == ["ended", "ended"]


def test_a_lease_not_freed_in_its_wait_is_refused_and_its_runner_works_again(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", runner(), 0.0)
    _, dispatch = running(policy)
    lease = ask(policy, wait_s=5.0)
    policy.schedule(5.0)
    (refused,) = lease_effects(policy, NotGranted)
    assert refused.lease is lease and refused.code is ErrorCode.busy and "r1" in refused.message
    assert "r1" not in policy.leases.blocked()


def test_a_lease_on_a_device_covers_the_gang_that_spans_it(tmp_path):
    policy = make_policy(tmp_path)
    policy.runner_up("r1", runner("r1"), 0.0)
    policy.runner_up("g", runner("g", device="cuda:0+cuda:1", devices=["cuda:0", "cuda:1"]), 0.0)
    policy.runner_up("r2", runner("r2", device="cuda:1"), 0.0)
    lease = ask(policy)
    assert sorted(lease.runners) == ["g", "r1"]
    everything = ask(policy, device=None)
    assert sorted(everything.runners) == ["g", "r1", "r2"]


def test_a_restarted_scheduler_learns_the_leases_its_runners_hold(tmp_path):
    policy = make_policy(tmp_path)
    held = HeldLease(id="L1", bytes=8 * GB, expires_at=1000.0, holder="maw", client="client-maw", node="n1",
                     device="cuda:0", granted_at=5.0)
    policy.runner_up("r1", runner(budget=12 * GB, leases=[held]).model_copy(
        update={"full_budget_bytes": 20 * GB, "leased_bytes": 8 * GB}), 100.0)
    (lease,) = policy.leases.listing()
    assert (lease.id, lease.state, lease.runners, lease.holder) == ("L1", "granted", ["r1"], "maw")
    policy.leases.holder_gone("client-maw", 101.0)
    assert [e.runner for e in lease_effects(policy, AskReclaim)] == ["r1"]


# --------------------------------------------------------------------------- #
# A runner's memory (atelier/vram.py)


def test_sizes_and_durations_read_as_people_write_them():
    assert parse_size("8GiB") == 8 * GB and parse_size("512 MiB") == 512 << 20 and parse_size("2GB") == 2 * 10**9
    assert parse_size(123) == 123 and parse_duration("10m") == 600 and parse_duration("90") == 90
    for bad in ("8 parsecs", "-1", "0", ""):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError):
        parse_duration("soon")


def _lease(lease_id: str, nbytes: int, expires_at: float = 100.0) -> HeldLease:
    return HeldLease(id=lease_id, bytes=nbytes, expires_at=expires_at)


def test_a_lease_shrinks_the_budget_evicting_the_least_recently_used_and_giving_back_restores_it():
    memory = DeviceMemory(20 * GB)
    models = ResidentSet(memory.budget, 4)
    for name in ("old", "mid", "new"):
        models.add(name, object(), 6 * GB)
    memory.take(_lease("L1", 8 * GB))
    models.budget = memory.budget
    released = []
    assert make_free(models, 8 * GB, None, released.extend) == ["old"]  # 12 GiB left: two models of 6
    assert released == ["old"] and list(models.bytes) == ["mid", "new"]
    with pytest.raises(ValueError):
        memory.take(_lease("L2", 13 * GB))  # with L1: more than the device budget ever gives
    assert memory.expired(now=99.0) == [] and [lease.id for lease in memory.expired(now=100.0)] == ["L1"]
    assert memory.budget == 20 * GB and memory.leased == 0


def test_on_a_gpu_models_go_until_the_bytes_are_free_on_the_device_itself():
    models = ResidentSet(20 * GB, 4)
    for name in ("a", "b", "c"):
        models.add(name, object(), 4 * GB)
    other = 9 * GB  # what the accounting does not see: contexts, fragmentation, another process
    device = {"free": 24 * GB - other - models.used}

    def release(names):
        device["free"] = 24 * GB - other - models.used

    evicted = make_free(models, 8 * GB, lambda: device["free"], release)
    assert evicted == ["a", "b"] and device["free"] >= 8 * GB  # the budget alone would have evicted none


def test_memory_pressure_shrinks_the_budget_and_it_grows_back_when_memory_returns():
    memory = DeviceMemory(20 * GB, reserve=GB)
    assert not memory.observe(None, 0)  # the CPU: nothing measured
    assert not memory.observe(30 * GB, 4 * GB)  # plenty free
    assert memory.observe(9 * GB, 4 * GB)  # another process took memory: 9 + 4 - 1 left for the models
    assert memory.budget == 12 * GB
    assert not memory.observe(9 * GB + PRESSURE_STEP // 2, 4 * GB)  # the allocator's noise: no flapping
    assert memory.observe(40 * GB, 4 * GB) and memory.budget == 20 * GB


# --------------------------------------------------------------------------- #
# A runner's handlers (in this process, its sends captured; the device's free memory from a probe)


def _memory_runner(monkeypatch, probe=None, budget: int = 20 * GB):
    from actors.runner import Runner
    from atelier.config import Config

    config = Config(models={"a": {"family": "noop", "source": "builtin:noop"}}, default_model="a",
                    node={"device_budget_bytes": budget})
    runner = Runner(config, "tcp://127.0.0.1:9", node="n1", device="cpu:0", probe=probe)
    sent = []

    async def send(dst, msg, **kw):
        sent.append(msg)

    monkeypatch.setattr(runner, "send", send)
    return runner, sent


def _env(msg, src: str = "scheduler"):
    from actors.codec import Envelope

    return Envelope(msg=msg, src=src, dst="runner", id=1)


def test_a_runner_takes_a_lease_evicting_idle_models_and_refuses_one_from_anyone_but_the_scheduler(monkeypatch):
    import asyncio

    from actors.messages import Error, MemoryYielded, ReclaimMemory, YieldMemory

    runner, _ = _memory_runner(monkeypatch)
    for name in ("old", "new"):
        runner.models.add(name, object(), 8 * GB)
    lease = _lease("L1", 8 * GB, expires_at=2e9)

    async def go():
        asked = YieldMemory(lease=lease)
        refused = await runner.on_yield_memory(asked, _env(asked, src="client-x"))
        taken = await runner.on_yield_memory(asked, _env(asked))
        caps = runner.capabilities()
        reclaim = ReclaimMemory(lease_id="L1")
        await runner.on_reclaim_memory(reclaim, _env(reclaim))
        return refused, taken, caps

    refused, taken, caps = asyncio.run(go())
    assert isinstance(refused, Error) and refused.code is ErrorCode.forbidden
    assert isinstance(taken, MemoryYielded) and taken.evicted == ["old"] and taken.freed_bytes == 8 * GB
    assert (caps.budget_bytes, caps.leased_bytes, [h.id for h in caps.leases]) == (12 * GB, 8 * GB, ["L1"])
    assert runner.memory.budget == 20 * GB and runner.models.budget == 20 * GB


def test_a_runner_shrinks_its_budget_when_another_process_takes_memory_and_grows_it_back(monkeypatch):
    import asyncio

    from actors.messages import MemoryBudget

    device = {"free": 40 * GB}
    runner, sent = _memory_runner(monkeypatch, probe=lambda: device["free"])
    runner.models.add("old", object(), 6 * GB)
    runner.models.add("new", object(), 6 * GB)

    async def check():
        await runner._check_memory()

    asyncio.run(check())
    assert not sent  # plenty free: nothing changes
    device["free"] = 2 * GB  # another process took most of the device: 2 + 12 left for models
    asyncio.run(check())
    (shrunk,) = sent
    assert isinstance(shrunk, MemoryBudget) and shrunk.budget_bytes == 14 * GB and "another process" in shrunk.reason
    assert list(runner.models.bytes) == ["old", "new"]  # 12 GiB still fit 14
    runner.memory.reserve = GB  # as on CUDA: kept free beyond the models' bytes
    device["free"] = 0  # it grew again: 12 held, nothing free, 11 left for models
    asyncio.run(check())
    assert sent[-1].budget_bytes == 11 * GB and list(runner.models.bytes) == ["new"]  # the oldest went
    device["free"] = 40 * GB  # it ended
    asyncio.run(check())
    assert sent[-1].budget_bytes == 20 * GB and runner.models.budget == 20 * GB
