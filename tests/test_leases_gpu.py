"""VRAM leases on a real GPU: what a lease frees is measured with ``mem_get_info``, and a second process that
allocates makes the runner shrink its budget (and grow it back when that process ends). Marked ``gpu``:
bench/gpu_check.py runs them on a lent machine; skipped without CUDA."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(120),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GIB = 1 << 30


class _Held:
    """A resident "model": a tensor of ``nbytes`` on the GPU (the ResidentSet holds its only reference)."""

    def __init__(self, nbytes: int):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")


def _runner(monkeypatch, budget: int):
    from actors.runner import Runner
    from atelier.config import Config

    config = Config(models={"a": {"family": "noop", "source": "builtin:noop"}}, default_model="a",
                    node={"device_budget_bytes": budget})
    runner = Runner(config, "tcp://127.0.0.1:9", node="gpu-test", device="cuda:0")
    sent = []

    async def send(dst, msg, **kw):
        sent.append(msg)

    monkeypatch.setattr(runner, "send", send)
    return runner, sent


def _env(msg):
    from actors.codec import Envelope

    return Envelope(msg=msg, src="scheduler", dst="runner", id=1)


def _free() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info(0)[0]


def test_a_lease_frees_its_bytes_on_the_device_itself(monkeypatch):
    from actors.messages import MemoryYielded, ReclaimMemory, YieldMemory
    from atelier.jobs import HeldLease

    free = _free()
    budget = min(free // 2, 16 * GIB)
    runner, _ = _runner(monkeypatch, budget)
    piece = budget // 4
    for name in ("a", "b", "c"):
        runner.models.add(name, runner._worker.submit(_Held, piece).result(), piece)
    before = runner._worker.submit(_free).result()
    want = 2 * piece + piece // 2  # more than is free beside the budget's slack: two models must go
    lease = HeldLease(id="gpu-lease", bytes=want, expires_at=4e9)

    async def go():
        msg = YieldMemory(lease=lease)
        taken = await runner.on_yield_memory(msg, _env(msg))
        reclaim = ReclaimMemory(lease_id=lease.id)
        after = runner._worker.submit(_free).result()
        budget_then = runner.memory.budget
        await runner.on_reclaim_memory(reclaim, _env(reclaim))
        return taken, after, budget_then

    taken, after, budget_then = asyncio.run(go())
    assert isinstance(taken, MemoryYielded)
    assert taken.free_bytes is not None and taken.free_bytes >= want  # measured by mem_get_info, not assumed
    assert after - before >= len(taken.evicted) * piece * 0.9 and taken.freed_bytes >= piece
    assert taken.evicted[0] == "a" and budget_then == budget - want
    assert runner.memory.budget == budget


def test_a_second_process_allocating_shrinks_the_budget_and_its_end_grows_it_back(monkeypatch):
    free = _free()
    budget = min(int(free * 0.8), 40 * GIB)
    runner, sent = _runner(monkeypatch, budget)
    piece = budget // 4
    for name in ("a", "b"):
        runner.models.add(name, runner._worker.submit(_Held, piece).result(), piece)
    # Another program takes most of what is free now (beside the two models), and holds it until told.
    take = int((runner._worker.submit(_free).result()) * 0.9)
    hog = subprocess.Popen([sys.executable, "-c", f"import torch, sys; x = torch.empty({take}, dtype=torch.uint8, "
                            "device='cuda:0'); torch.cuda.synchronize(); print('held', flush=True); sys.stdin.read()"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout is not None and hog.stdout.readline().strip() == "held"
        asyncio.run(runner._check_memory())
        assert runner.memory.pressure > 0 and runner.memory.budget < budget
        assert sent and sent[-1].budget_bytes == runner.memory.budget
        assert runner.models.used <= runner.memory.budget  # idle models went rather than an OOM later
    finally:
        hog.communicate("", timeout=60)
    asyncio.run(runner._check_memory())
    assert runner.memory.pressure == 0 and runner.memory.budget == budget
