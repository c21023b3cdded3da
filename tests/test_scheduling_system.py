"""Batching, model affinity and a live session, all in one run of the real system.

Two runners on one node (``--devices cpu:0,cpu:1``) serve two cost-model models: runners that
sleep a stated profile's load and step times instead of denoising, so the timing of the run is
known while every process, message and decision is the real one.
"""

from __future__ import annotations

import asyncio

import pytest

from actors.messages import JobEvent
from atelier.families.costmodel import write_model
from atelier.jobs import JobSpec, JobState, Priority
from tests.conftest import Cluster, eventually_async, run

pytestmark = pytest.mark.timeout(180)

# 50 ms a step at any batch size up to 8 (batching is free, as for a small model on a big GPU);
# a load from disk 1 s, from staged memory 0.2 s.
PROFILE = {"bytes": 2_000_000_000, "disk_load_s": 1.0, "staged_load_s": 0.2, "stage_s": 0.2,
           "default_resolution": 64, "step_s": {"64": [0.05, 0.05, 0.05, 0.05]}, "vae_decode_s": 0.0}


@pytest.fixture(scope="module")
def two_runners(atelier_home, tmp_path_factory):
    folder = tmp_path_factory.mktemp("costmodels")
    lines = ["builtin_models = false", 'default_model = "cm-a"', "[node]", 'devices = ["cpu:0", "cpu:1"]',
             "resident_models = 1"]
    for name in ("cm-a", "cm-b"):
        path = write_model(folder / name, PROFILE)
        lines += [f"[models.{name}]", 'family = "costmodel"', f'source = "{path}"', "default_width = 64",
                  "default_height = 64", "default_steps = 4"]
    config = folder / "atelier.toml"
    config.write_text("\n".join(lines) + "\n")
    cluster = Cluster(atelier_home, config).start()
    yield cluster
    cluster.stop()


def test_batching_affinity_and_a_live_session_in_one_run(two_runners):
    async def go():
        async with two_runners.client() as client:
            status = await client.status()
            assert len(status.runners) == 2
            # Two long jobs put one model on each runner (2 s each). Two images each: batch sizes grow
            # as measurements show they pay, and having seen 2 the scheduler tries 4 next.
            long_a = JobSpec(model="cm-a", prompt="long a", steps=40, count=2, user="ann")
            long_b = JobSpec(model="cm-b", prompt="long b", steps=40, count=2, user="bob")
            for spec in (long_a, long_b):
                await client.submit(spec, events=False)
            await _until_running(client, long_a.id, long_b.id)
            # While both are busy: three jobs for each model, and a live session typed into.
            a_jobs = [JobSpec(model="cm-a", prompt=f"a{i}", user="cy") for i in range(3)]
            b_jobs = [JobSpec(model="cm-b", prompt=f"b{i}", user="dan") for i in range(3)]
            for spec in a_jobs + b_jobs:
                await client.submit(spec, events=False)
            typed = ["a li", "a ligh", "a lighthouse"]
            live = [JobSpec(model="cm-a", prompt=p, user="eve", session="tab-1", priority=Priority.live)
                    for p in typed]
            for spec in live:
                await client.submit(spec)
            watched = asyncio.create_task(_collect(client, live[-1].id))
            results = {spec.id: await client.wait(spec.id, timeout=60)
                       for spec in [long_a, long_b, *a_jobs, *b_jobs, *live]}
            live_events = await watched
        return long_a, long_b, a_jobs, b_jobs, live, results, live_events

    long_a, long_b, a_jobs, b_jobs, live, results, live_events = run(go(), 150)
    record = {job_id: r.job for job_id, r in results.items()}
    runner_a, runner_b = record[long_a.id].runner, record[long_b.id].runner
    assert runner_a != runner_b

    # Affinity: every later job ran where its model was already resident.
    assert {record[s.id].runner for s in a_jobs} == {runner_a}
    assert {record[s.id].runner for s in b_jobs} == {runner_b}
    # Batching: the jobs that queued while the runners were busy shared one pipeline call per model,
    # each with its own images.
    assert len({record[s.id].batch_id for s in a_jobs}) == 1
    assert len({record[s.id].batch_id for s in b_jobs}) == 1
    assert all(record[s.id].state is JobState.done and len(results[s.id].outputs) == 1 for s in a_jobs + b_jobs)
    # The live session: each newer prompt replaced the one before; only the last is rendered.
    for old in live[:-1]:
        assert record[old.id].state is JobState.cancelled
        assert "superseded" in record[old.id].reason and results[old.id].outputs == []
    last = record[live[-1].id]
    assert last.state is JobState.done and last.runner == runner_a
    queued = [e for e in live_events if isinstance(e, JobEvent) and e.state is JobState.queued]
    assert queued and queued[0].position == 0  # live goes before the three interactive cm-a jobs
    assert queued[0].eta_s is not None and 0 < queued[0].eta_s < 10


async def _collect(client, job_id: str) -> list:
    return [event async for event in client.events(job_id, timeout=60)]


async def _until_running(client, *job_ids: str) -> None:
    async def all_running() -> bool:
        records = [await client.job(job_id) for job_id in job_ids]
        return all(r.state is JobState.running for r in records)

    await eventually_async(all_running, timeout=30)
