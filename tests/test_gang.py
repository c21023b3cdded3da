"""Gangs through the whole system, on the CPU: a node whose one runner is a gang of two processes ("cpu:0",
"cpu:1", gloo), running the tiny FLUX and SD3 models with diffusers' context parallelism (Ulysses 2).

One atelier serves the module: the gang's images against one process's, jobs of other sizes, steps,
seeds and models in a row on the same process group, and, last, a rank SIGKILLed mid-job.
"""

from __future__ import annotations

import io
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actors.messages import JobEvent, JobResult, Progress
from atelier.jobs import JobSpec, JobState
from tests.conftest import Cluster, eventually, eventually_async, run

pytestmark = pytest.mark.timeout(300)

GANG = "cpu:0+cpu:1"
GUIDANCE = {"tiny-flux": 3.5, "tiny-sd3": 4.0}


def _catalog() -> str:
    models = "".join(
        f'[models.{name}]\nfamily = "{family}"\nsource = "builtin:{name}"\ndtype = "float32"\n'
        "default_width = 64\ndefault_height = 64\ndefault_steps = 2\nmax_steps = 500\n"
        f'[models.{name}.parallel]\nbackend = "diffusers"\nulysses_degree = 2\n'
        for name, family in (("tiny-flux", "flux"), ("tiny-sd3", "sd3")))
    # No single-device runner: the gang is the node's one runner, so every job here runs on it.
    # resident_models = 1: every switch of model evicts the other on every rank, and loads and wraps anew.
    # step_timeout_s: a rank that hangs mid-job (the last test) stalls rank 0's steps, and its watchdog acts.
    return ('default_model = "tiny-flux"\n[node]\ndevices = []\ngangs = [["cpu:0", "cpu:1"]]\n'
            f"resident_models = 1\nstep_timeout_s = 5\n{models}")


@pytest.fixture(scope="module")
def gang_cluster(atelier_home: Path, tmp_path_factory):
    config = tmp_path_factory.mktemp("gang") / "atelier.toml"
    config.write_text(_catalog())
    cluster = Cluster(atelier_home, config).start(timeout=240)
    yield cluster
    cluster.stop()


def _job(model: str, **settings) -> JobSpec:
    params = dict(model=model, prompt="a lighthouse at dusk", width=64, height=64, steps=2, seed=7,
                  guidance=GUIDANCE[model])
    params.update(settings)
    return JobSpec(**params)


def _pixels(result: JobResult) -> np.ndarray:
    assert result.job.state is JobState.done, result.job.reason
    return np.asarray(Image.open(io.BytesIO(result.outputs[0].data)).convert("RGB"), dtype=np.int16)


def _formed(cluster: Cluster) -> list[str]:
    """The log lines of ranks forming their process group."""
    return re.findall(r"rank \d of 2 formed process group", cluster.log.read_text(errors="replace"))


def test_a_gang_is_one_runner_and_makes_the_images_one_process_makes(gang_cluster, tiny_model):
    from atelier.families import GenerateRequest

    jobs = [_job("tiny-flux", seed=7), _job("tiny-sd3", seed=8)]

    async def go():
        async with gang_cluster.client() as client:
            status = await client.status()
            return status, [await client.generate(spec, timeout=180) for spec in jobs]

    status, results = run(go(), timeout=240)
    [runner] = status.runners
    capabilities = runner.capabilities
    assert runner.name.endswith("-cpu0+cpu1") and capabilities.device == GANG
    assert capabilities.devices == ["cpu:0", "cpu:1"] and capabilities.gang == 2
    assert capabilities.device_name == "2x cpu"
    for spec, result in zip(jobs, results, strict=True):
        assert result.job.runner == runner.name
        _, loaded, _ = tiny_model(spec.model)
        [alone] = loaded.generate(GenerateRequest.single(
            prompt=spec.prompt, negative_prompt=None, width=64, height=64, steps=2, guidance=spec.guidance,
            seed=spec.seed), lambda step, total, latents: None)
        expected = np.asarray(alone.convert("RGB"), dtype=np.int16)
        # Float tolerance: the ranks' attention is split across processes, and summed in another order.
        assert np.abs(_pixels(result) - expected).max() <= 2, spec.model


def test_a_gang_serves_jobs_of_other_sizes_steps_seeds_and_models_without_forming_again(gang_cluster):
    leader = gang_cluster.pid_of(b"actors.runner")
    rank1 = gang_cluster.pid_of(b"actors.gang_rank")
    jobs = [_job("tiny-flux", width=96, height=64, steps=3, seed=21),
            _job("tiny-sd3", width=64, height=96, steps=2, seed=22),
            _job("tiny-flux", width=64, height=64, steps=4, seed=23, count=2),
            _job("tiny-flux", width=96, height=64, steps=3, seed=21)]  # the first again

    async def go():
        async with gang_cluster.client() as client:
            return [await client.generate(spec, timeout=180) for spec in jobs]

    results = run(go(), timeout=240)
    for spec, result in zip(jobs, results, strict=True):
        assert result.job.state is JobState.done, result.job.reason
        assert len(result.outputs) == spec.count
        assert all((output.width, output.height) == (spec.width, spec.height) for output in result.outputs)
    assert np.array_equal(_pixels(results[0]), _pixels(results[3]))  # the same job, the same image
    assert not np.array_equal(_pixels(results[2]), np.asarray(
        Image.open(io.BytesIO(results[2].outputs[1].data)).convert("RGB"), dtype=np.int16))  # two seeds
    # The same processes, and each rank formed its process group once (it is formed at start, not per job).
    assert (gang_cluster.pid_of(b"actors.runner"), gang_cluster.pid_of(b"actors.gang_rank")) == (leader, rank1)
    assert re.search(r"rank1: dropped tiny-sd3", gang_cluster.log.read_text(errors="replace"))  # evicted on rank 1 too
    assert sorted(_formed(gang_cluster)) == ["rank 0 of 2 formed process group", "rank 1 of 2 formed process group"]


def test_a_cancel_stops_every_rank_at_the_same_step_and_the_gang_goes_on(gang_cluster):
    processes = (gang_cluster.pid_of(b"actors.runner"), gang_cluster.pid_of(b"actors.gang_rank"))
    spec = _job("tiny-flux", steps=400, seed=41, prompt="a long one")

    async def go():
        async with gang_cluster.client() as client:
            await client.submit(spec)
            cancelled_at = last_step = None
            async for event in client.events(spec.id, timeout=120):
                if isinstance(event, Progress):
                    last_step = event.step
                    if cancelled_at is None and event.step >= 2:
                        cancelled_at = event.step
                        await client.cancel(spec.id)
                if isinstance(event, JobResult):
                    # Had rank 1 gone on, or stopped at another step, the next job's collectives would not meet.
                    return event, cancelled_at, last_step, await client.generate(_job("tiny-flux", seed=42),
                                                                                  timeout=120)

    result, cancelled_at, last_step, after = run(go(), timeout=240)
    assert result.job.state is JobState.cancelled
    assert last_step - cancelled_at <= 3, (cancelled_at, last_step)
    assert after.job.state is JobState.done and after.job.attempts == 1, after.job.reason
    assert (gang_cluster.pid_of(b"actors.runner"), gang_cluster.pid_of(b"actors.gang_rank")) == processes


def test_a_killed_rank_restarts_its_gang_and_the_job_completes_once(gang_cluster):
    leader = gang_cluster.pid_of(b"actors.runner")
    spec = _job("tiny-flux", steps=12, seed=31, prompt="a ship in a storm")
    artifacts = gang_cluster.home / "artifacts"

    async def go():
        async with gang_cluster.client() as client:
            await client.submit(spec)
            killed = False
            events = []
            async for event in client.events(spec.id, timeout=240):
                events.append(event)
                if not killed and isinstance(event, Progress) and event.step >= 3:
                    os.kill(gang_cluster.pid_of(b"actors.gang_rank"), signal.SIGKILL)
                    killed = True
            return events, await client.job(spec.id)

    events, record = run(go(), timeout=280)
    result = events[-1]
    assert isinstance(result, JobResult) and result.job.state is JobState.done, result.job.reason
    assert [isinstance(event, JobResult) for event in events].count(True) == 1
    states = [event.state for event in events if isinstance(event, JobEvent)]
    assert states.count(JobState.done) <= 1 and JobState.queued in states[states.index(JobState.running):]
    # Retried (2 attempts; 3 where a dispatch reached the dying rank 0 before it went, which the scheduler
    # then counts when the broker declares it dead), and done once.
    assert record.state is JobState.done and record.attempts >= 2
    assert len(result.outputs) == 1 and len(list(artifacts.glob(f"{spec.id}-*"))) == 1
    # The whole gang started again: a new rank 0 (the runner) beside the new rank 1.
    eventually(lambda: gang_cluster.pid_of(b"actors.runner") != leader, timeout=30, ignoring=(LookupError,))
    assert len(_formed(gang_cluster)) == 4


def test_a_hung_rank_restarts_its_gang_and_the_job_completes_once(gang_cluster):
    leader = gang_cluster.pid_of(b"actors.runner")
    spec = _job("tiny-flux", steps=12, seed=51, prompt="a calm sea")

    async def go():
        async with gang_cluster.client() as client:
            await client.submit(spec)
            stopped = False
            results = 0
            async for event in client.events(spec.id, timeout=240):
                if not stopped and isinstance(event, Progress) and event.step >= 3:
                    os.kill(gang_cluster.pid_of(b"actors.gang_rank"), signal.SIGSTOP)  # alive, and never answering
                    stopped = True
                results += isinstance(event, JobResult)
            return event, results, await client.job(spec.id)

    result, results, record = run(go(), timeout=280)
    assert result.job.state is JobState.done and results == 1, result.job.reason
    assert record.attempts >= 2  # see the killed rank's test
    assert gang_cluster.pid_of(b"actors.runner") != leader
    assert "no progress for" in gang_cluster.log.read_text(errors="replace")  # rank 0's watchdog saw the stall


def test_the_supervisor_stops_and_starts_a_group_as_one(tmp_path: Path):
    """A group's member exits: the others are stopped, and the whole group starts again from a fresh spec."""
    import asyncio
    import sys

    from atelier.supervisor import ChildSpec, Supervisor

    made: list[int] = []

    def make() -> list[ChildSpec]:
        made.append(len(made))
        sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
        return [ChildSpec("rank1", sleep), ChildSpec("rank0", sleep)]

    async def go():
        supervisor = Supervisor(grace_s=2.0)
        try:
            first = await supervisor.start_group("gang", make)
            first[0].process.kill()
            await asyncio.wait_for(first[1].process.wait(), 10)  # stopped with it
            await eventually_async(lambda: _restarted(supervisor, first), timeout=10)
            return [child.restarts for child in supervisor.children.values()]
        finally:
            await supervisor.stop()

    async def _restarted(supervisor, first) -> bool:
        children = supervisor.children
        return all(children[child.spec.name] is not child for child in first)

    assert run(go(), timeout=30) == [1, 1]
    assert made == [0, 1]


# Two ranks over gloo, without the rest of atelier: rank 0's commands, agreement, the per-step word, and the
# outputs of a rank other than 0 (xfuser's output rank is the last) reaching rank 0 pixel for pixel.
_CHANNEL_RANK = """
import sys
from PIL import Image
from actors.gang_rank import pack_outputs, unpack_outputs
from atelier import gang
from atelier.media import Video

rank, port = int(sys.argv[1]), int(sys.argv[2])
gang.join(rank, 2, port, "gloo", 30)
channel = gang.Channel(rank, 2)
command = {"op": "generate", "items": [{"prompt": "é", "data": bytes(range(256)) * 300}]}
if rank == 0:
    channel.send(command)
else:
    assert channel.receive() == command
assert channel.agree(True) and not channel.agree(rank == 0)
assert channel.step(cancel=False) is False and channel.step(cancel=rank == 0) is True
images = [Image.new("RGB", (24, 16), (rank, 2, 3)), Video(frames=[Image.new("L", (8, 8), 9)], fps=4)]
got = unpack_outputs(channel.share(pack_outputs(images) if rank == 1 else None, 1))
assert got[0].tobytes() == Image.new("RGB", (24, 16), (1, 2, 3)).tobytes() and got[1].frames[0].size == (8, 8)
assert channel.agree(True)  # both are done before either leaves
print("ok", rank, flush=True)
import os
os._exit(0)  # as a gang's ranks end: at interpreter exit gloo's threads may abort the process
"""


def test_a_channel_carries_commands_agreement_steps_and_another_ranks_outputs():
    import subprocess
    import sys

    from atelier.topology import free_port
    from tests.conftest import ROOT

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ranks = [subprocess.Popen([sys.executable, "-c", _CHANNEL_RANK, str(rank), str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [rank.communicate(timeout=90)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert [output.strip().splitlines()[-1] for output in outputs] == ["ok 0", "ok 1"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["diffusers", "xfuser"])
def test_a_cuda_gang_makes_the_images_one_gpu_makes(atelier_home: Path, tmp_path: Path, backend: str):
    """Where two GPUs are: NCCL, each rank on its own GPU, and (xfuser) the images coming from the last rank."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("a CUDA gang needs two GPUs")
    if backend == "xfuser":
        pytest.importorskip("xfuser")
    from atelier.families import GenerateRequest, get_family
    from atelier.families.loaded import LoadRequest
    from atelier.tiny_models import ensure_builtin

    config = tmp_path / "atelier.toml"
    config.write_text('default_model = "tiny-flux"\n[node]\ndevices = []\ngangs = [["cuda:0", "cuda:1"]]\n'
                      '[models.tiny-flux]\nfamily = "flux"\nsource = "builtin:tiny-flux"\ndtype = "float32"\n'
                      f'[models.tiny-flux.parallel]\nbackend = "{backend}"\nulysses_degree = 2\n')
    spec = _job("tiny-flux", width=128, height=128, seed=61)
    cluster = Cluster(atelier_home, config).start(timeout=300)
    try:
        async def go():
            async with cluster.client() as client:
                return await client.status(), await client.generate(spec, timeout=240)

        status, result = run(go(), timeout=280)
    finally:
        cluster.stop()
    [runner] = status.runners
    assert runner.capabilities.devices == ["cuda:0", "cuda:1"] and runner.capabilities.device_name.startswith("2x ")
    loaded = get_family("flux").load(LoadRequest(ensure_builtin("tiny-flux", atelier_home / "models"), device="cuda"))
    [alone] = loaded.generate(GenerateRequest.single(prompt=spec.prompt, negative_prompt=None, width=128, height=128,
                                                     steps=2, guidance=spec.guidance, seed=spec.seed),
                              lambda step, total, latents: None)
    assert np.abs(_pixels(result) - np.asarray(alone.convert("RGB"), dtype=np.int16)).mean() < 2
