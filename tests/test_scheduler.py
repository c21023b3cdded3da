"""The scheduler's rules, with a real broker and scheduler and runners that are only stand-ins.

The stand-in runners are real actors that register as runners and do what a test tells them,
so each rule can be seen without loading a model.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from actors.actor import Actor, handles
from actors.codec import Envelope
from actors.messages import BatchDone, JobEvent, LoaderState, Preload, Role, RunBatch, StopJob
from actors.scheduler import Scheduler
from atelier.config import Config
from atelier.jobs import Artifact, Capabilities, JobDone, JobSpec, JobState
from broker import Broker
from frontends.client import AtelierClient
from tests.conftest import broker_thread, run

pytestmark = pytest.mark.timeout(60)


class StandInRunner(Actor):
    role = Role.runner

    def __init__(self, name: str, router: str):
        super().__init__(name, router, heartbeat_s=0.2)
        self.batches: asyncio.Queue[RunBatch] = asyncio.Queue()
        self.stops: asyncio.Queue[str] = asyncio.Queue()
        self._batch_of: dict[str, str] = {}

    @handles(RunBatch)
    async def on_run(self, msg: RunBatch, env: Envelope) -> None:
        self.batches.put_nowait(msg)

    @handles(StopJob)
    async def on_stop_job(self, msg: StopJob, env: Envelope) -> None:
        self.stops.put_nowait(msg.job_id)

    async def next_job(self, timeout: float = 10.0):
        """The next batch, which these tests expect to hold one job: its BatchItem."""
        batch = await asyncio.wait_for(self.batches.get(), timeout)
        assert len(batch.items) == 1, batch
        self._batch_of[batch.items[0].job.id] = batch.batch_id
        return batch.items[0]

    async def finish(self, item) -> None:
        job = item.job
        png = Artifact(media_type="image/png", data=b"\x89PNG fake", width=8, height=8, seed=job.seed)
        await self.ask("scheduler", BatchDone(batch_id=self._batch_of[job.id],
                                              outcomes=[JobDone(job_id=job.id, outputs=[png], elapsed_s=0.01)],
                                              resident={job.model: 0}))


class StandInLoader(Actor):
    role = Role.loader

    def __init__(self, node: str, router: str):
        super().__init__(f"loader-{node}", router, heartbeat_s=0.2)
        self.node = node
        self.preloads: asyncio.Queue[list[str]] = asyncio.Queue()

    def capabilities(self) -> Capabilities:
        return Capabilities(pid=0, node=self.node)

    @handles(Preload)
    async def on_preload(self, msg: Preload, env: Envelope) -> None:
        self.preloads.put_nowait(msg.models)


@pytest.fixture
def system(tmp_path):
    # One job per batch: these tests are about the other rules (batching has tests of its own).
    config = Config.model_validate({"home": str(tmp_path), "broker": {"heartbeat_s": 0.2},
                                    "scheduler": {"max_batch": 1}})
    with broker_thread(heartbeat_s=0.2) as (broker, _):
        yield broker, config


@contextlib.asynccontextmanager
async def scheduler_with_client(broker: Broker, config: Config):
    scheduler = Scheduler(config, broker.router_endpoint)
    await scheduler.start()
    try:
        async with AtelierClient(broker.router_endpoint, broker.pub_endpoint, heartbeat_s=0.2) as client:
            yield scheduler, client
    finally:
        await scheduler.close()


@contextlib.asynccontextmanager
async def scheduler_and_client(broker: Broker, config: Config):
    async with scheduler_with_client(broker, config) as (_, client):
        yield client


def noop_job(**kw) -> JobSpec:
    return JobSpec(model="noop", prompt="p", **kw)


def test_fifo_order_defaults_and_a_fixed_seed(system):
    broker, config = system

    async def go():
        async with scheduler_and_client(broker, config) as client:
            specs = [noop_job() for _ in range(3)]
            for spec in specs:
                await client.submit(spec, events=False)
            runner = StandInRunner("runner-a", broker.router_endpoint)
            await runner.start()
            seen = []
            for _ in specs:
                job = await runner.next_job()
                seen.append(job)
                await runner.finish(job)
            results = [await client.wait(spec.id, 10) for spec in specs]
            await runner.close()
        return specs, seen, results

    specs, seen, results = run(go(), 30)
    assert [j.job.id for j in seen] == [s.id for s in specs]  # first come, first served
    job = seen[0].job
    assert (job.width, job.height, job.steps) == (64, 64, 1)  # the model's defaults, filled in
    assert job.seed is not None  # chosen once, so a retry makes the same image
    assert all(r.job.state is JobState.done and r.outputs[0].data == b"\x89PNG fake" for r in results)
    assert all(r.job.artifacts and r.job.artifacts[0].startswith("file://") for r in results)


def test_a_job_whose_runner_keeps_dying_fails_after_three_attempts(system):
    broker, config = system

    async def go():
        async with scheduler_and_client(broker, config) as client:
            spec = noop_job(seed=5)
            await client.submit(spec)
            attempts = []
            for _ in range(3):
                runner = StandInRunner("runner-a", broker.router_endpoint)
                await runner.start()
                job = await runner.next_job()
                attempts.append((job.attempt, job.job.seed))
                await runner.close()  # gone with the job in hand
            events = [e async for e in client.events(spec.id, timeout=10)]
        return attempts, events

    attempts, events = run(go(), 40)
    assert attempts == [(1, 5), (2, 5), (3, 5)]
    result = events[-1]
    assert result.job.state is JobState.failed
    assert "runner-a died" in result.job.reason and "gave up after 3 attempts" in result.job.reason
    requeued = [e for e in events if isinstance(e, JobEvent) and e.state is JobState.queued and e.reason]
    assert len(requeued) == 2


def test_cancel_of_a_queued_job_and_of_a_running_one(system):
    broker, config = system

    async def go():
        async with scheduler_and_client(broker, config) as client:
            runner = StandInRunner("runner-a", broker.router_endpoint)
            await runner.start()
            running, queued = noop_job(), noop_job()
            await client.submit(running, events=False)
            await client.submit(queued, events=False)
            await runner.next_job()
            queued_after = await client.cancel(queued.id)
            running_after = await client.cancel(running.id)
            stopped = await asyncio.wait_for(runner.stops.get(), 10)
            await runner.close()
            queued_result = await client.wait(queued.id, 10)
        return queued_after, running_after, stopped, queued_result

    queued_after, running_after, stopped, queued_result = run(go(), 30)
    assert queued_after.state is JobState.cancelled and queued_result.job.state is JobState.cancelled
    assert running_after.state is JobState.assigned  # it stops at its next step, not at once
    assert stopped == running_after.spec.id


def test_the_next_jobs_models_are_preloaded_while_the_runner_is_busy(system):
    broker, config = system

    async def go():
        async with scheduler_and_client(broker, config) as client:
            loader = StandInLoader("n1", broker.router_endpoint)
            await loader.start()
            await loader.send("scheduler", LoaderState(node="n1", budget_bytes=10**9, staged={"tiny-sd": 5}))
            runner = StandInRunner("runner-n1-cpu", broker.router_endpoint)
            runner.capabilities = lambda: Capabilities(pid=0, node="n1")
            await runner.start()
            for model in ("noop", "tiny-sd", "tiny-sdxl"):
                await client.submit(JobSpec(model=model, prompt="p"), events=False)
            first = await runner.next_job()
            asked = await asyncio.wait_for(loader.preloads.get(), 10)
            await runner.close()
            await loader.close()
        return first, asked

    first, asked = run(go(), 30)
    assert first.job.model == "noop"
    # tiny-sd is staged already; tiny-sdxl is what the node will need next
    assert asked == ["tiny-sdxl"]
