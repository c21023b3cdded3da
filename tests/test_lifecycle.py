"""Starting and stopping: ``atelier up`` leaves no process behind, however it ends."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpu_node import GPU_DRIVER_PATHS
from tests.conftest import ROOT, Cluster, descendants

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc")]


def alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            living.add(pid)
    return living


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(pids)


@pytest.fixture(scope="module")
def served_cluster(atelier_home):
    """One atelier for two tests in turn: its broker is killed and restarted mid-use, then Ctrl-C stops it
    all, the restarted broker and the runner that has a model loaded too (an atelier costs seconds to start)."""
    cluster = Cluster(atelier_home).start()
    yield cluster
    cluster.stop()  # nothing left to do once the Ctrl-C test has stopped it


def test_peers_register_again_after_the_broker_restarts(served_cluster):
    from atelier.jobs import JobSpec, JobState
    from tests.conftest import run

    cluster = served_cluster
    broker_pid = cluster.pid_of(b"broker")

    async def go():
        async with cluster.client() as client:
            spec = dict(model="tiny-sd", prompt="a lighthouse", width=64, height=64, steps=2)
            before = await client.generate(JobSpec(**spec), timeout=120)
            os.kill(broker_pid, signal.SIGKILL)
            # `up` restarts it on the same endpoints; every peer (this client too) must find it
            # and say Hello again without being told.
            after = await client.generate(JobSpec(**spec), timeout=120)
            return before, after, await client.status()

    before, after, status = run(go(), timeout=150)
    assert before.job.state is JobState.done
    assert after.job.state is JobState.done, after.job.reason
    assert status.runners


def test_a_restarted_scheduler_learns_what_each_loader_has_staged(served_cluster):
    """A loader says what it has staged when that changes; a scheduler that was not there to hear it (it
    restarted, or came up after the node) asks, so placement and `atelier status` know the staged models."""
    from tests.conftest import run

    cluster = served_cluster

    async def staged(client) -> dict[str, int]:
        """What the scheduler says the node's loader has staged, once it says anything (within 60 s)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                status = await asyncio.wait_for(client.status(), 5)
            except Exception:  # the scheduler is not back yet
                status = None
            if status is not None and status.loaders and status.loaders[0].staged:
                return status.loaders[0].staged
            await asyncio.sleep(0.5)
        return {}

    async def before_and_after_restart() -> tuple[dict[str, int], dict[str, int]]:
        async with cluster.client() as client:
            before = await staged(client)  # the loader stages the default model when it starts
            os.kill(cluster.pid_of(b"actors.scheduler"), signal.SIGKILL)  # `up` starts another
            await asyncio.sleep(1)
            return before, await staged(client)

    before, after = run(before_and_after_restart(), timeout=150)
    assert "tiny-sd" in before and "tiny-sd" in after


def test_ctrl_c_stops_every_process(served_cluster):
    cluster = served_cluster
    tree = descendants(cluster.process.pid)
    # broker, scheduler, node, loader, runner
    assert len(tree) >= 5, tree
    assert cluster.stop() == 0
    assert wait_gone(tree, 20) == set()


def test_killed_supervisor_takes_its_children_along(atelier_home):
    cluster = Cluster(atelier_home).start()
    tree = descendants(cluster.process.pid)
    os.kill(cluster.process.pid, signal.SIGKILL)
    cluster.process.wait(10)
    # No one is left to stop them cleanly: the kernel's parent-death signal must.
    assert wait_gone(tree, 30) == set()


@pytest.mark.skipif(any(os.path.exists(path) for path in GPU_DRIVER_PATHS),
                    reason="a GPU driver is here: the node asks torch for its devices")
def test_a_node_on_a_host_without_a_gpu_serves_the_cpu_without_importing_torch():
    """Where no GPU driver is, a node starts its CPU runner at once: importing torch only to count no GPUs
    cost each ``atelier up`` seconds before its runner started."""
    said = subprocess.run([sys.executable, "-c", "import sys, gpu_node; print(gpu_node.detect_devices(), "
                           "'torch' in sys.modules)"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert said.stdout.split() == ["['cpu']", "False"], said.stderr
