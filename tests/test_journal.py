"""The journal: a killed scheduler loses no job it accepted, a retried submit makes no second job,
and a frontend that was away gets its results."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from PIL import Image

from actors.journal import Journal, JournalError
from actors.messages import JobResult
from atelier.config import Config
from atelier.jobs import Artifact, JobInputs, JobRecord, JobSpec, JobState
from atelier.scheduling.policy import Announce, Dispatch, Policy
from tests.conftest import Cluster, eventually, eventually_async, run

pytestmark = pytest.mark.timeout(240)


def _record(prompt: str = "a lighthouse", user: str = "ann", **spec) -> JobRecord:
    return JobRecord(spec=JobSpec(model="tiny-sd", prompt=prompt, user=user, width=64, height=64, steps=2, **spec),
                     state=JobState.queued, submitted_at=time.time())


# -- the journal itself ------------------------------------------------------------------------- #


def test_jobs_and_their_inputs_come_back_in_submit_order(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    records = [_record(f"p{i}") for i in range(5)]
    for i, record in enumerate(records):
        journal.add(record, f"client-{i}", f"key-{i}" if i == 2 else None,
                    JobInputs(image=b"\x89PNG-" + bytes([i])) if i == 1 else None)
    records[3] = records[3].model_copy(update={"state": JobState.done, "finished_at": time.time(),
                                               "artifacts": ["file:///x-0.png"]})
    records[0] = records[0].model_copy(update={"state": JobState.running, "runner": "runner-a", "attempts": 1})
    assert journal.update(records) == 2  # only the two that changed
    live = [records[i] for i in (0, 1, 2, 4)]
    assert journal.update(live) == 0  # nothing new: not written again
    live[3] = records[4].model_copy(update={"position": 7, "eta_s": 3.5})
    assert journal.update(live) == 0  # a new position or ETA is not a transition
    journal.close()

    again = Journal(path)
    unfinished = again.unfinished()
    assert [r.record.spec.prompt for r in unfinished] == ["p0", "p1", "p2", "p4"]
    assert unfinished[0].record.state is JobState.running and unfinished[0].record.runner == "runner-a"
    assert unfinished[1].inputs == JobInputs(image=b"\x89PNG-\x01") and unfinished[0].inputs is None
    assert [r.client for r in unfinished] == ["client-0", "client-1", "client-2", "client-4"]
    assert again.by_key("ann", "key-2").spec.id == records[2].spec.id and again.by_key("bob", "key-2") is None
    finished = again.finished(10)
    assert [r.record.spec.prompt for r in finished] == ["p3"] and finished[0].record.artifacts == ["file:///x-0.png"]
    assert again.get(records[3].spec.id).state is JobState.done and again.get("nope") is None


def test_an_ended_jobs_inputs_go_and_old_ends_are_pruned(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    old, new = _record("old"), _record("new")
    for record in (old, new):
        journal.add(record, "c", None, JobInputs(image=b"img"))
    old = old.model_copy(update={"state": JobState.failed, "finished_at": 1000.0})
    new = new.model_copy(update={"state": JobState.done, "finished_at": time.time()})
    journal.update([old, new], {new.spec.id: [Artifact(media_type="image/png", data=b"x", width=8, height=8,
                                                       seed=3, uri="file:///a.png")]})
    assert journal.db.execute("SELECT count(*) FROM inputs").fetchone()[0] == 0
    assert journal.outputs(new.spec.id) == [{"media_type": "image/png", "width": 8, "height": 8, "seed": 3,
                                             "frames": None, "fps": None, "duration_s": None, "sample_rate": None,
                                             "uri": "file:///a.png"}]
    assert journal.prune(before=2000.0) == 1
    assert journal.get(old.spec.id) is None and journal.get(new.spec.id) is not None


def test_one_scheduler_at_a_time_and_no_journal_of_a_newer_version(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    first = Journal(path)
    with pytest.raises(JournalError, match="in use by another scheduler"):
        Journal(path)
    first.close()
    Journal(path).close()  # free again once the first is gone
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(JournalError, match="newer atelier"):
        Journal(path)
    (tmp_path / "junk").write_bytes(b"not a database at all" * 100)
    with pytest.raises(JournalError, match="not a journal"):
        Journal(tmp_path / "junk")


# -- the policy, restored ----------------------------------------------------------------------- #


def test_a_restored_policy_queues_again_in_order_and_remembers_the_ended(tmp_path: Path) -> None:
    config = Config.model_validate({"home": str(tmp_path)})
    policy = Policy(config)
    done, running, queued = _record("done"), _record("running"), _record("queued", user="bob")
    done = done.model_copy(update={"state": JobState.done, "finished_at": 5.0})
    running = running.model_copy(update={"state": JobState.running, "runner": "r1", "attempts": 1})
    for record in (done, running, queued):
        policy.restore(record, "fe", None, "k-" + record.spec.prompt, now=10.0)
    assert policy.queued() == [running.spec.id, queued.spec.id]
    again = policy.job(running.spec.id)
    assert again.state is JobState.queued and again.runner is None and again.attempts == 1
    assert "scheduler restarted while it was running" in again.reason
    assert policy.job(done.spec.id).state is JobState.done
    # The same idempotency key finds the job, whichever id the retry carries.
    retry = JobSpec(model="tiny-sd", prompt="running", user="ann", width=64, height=64, steps=2)
    assert policy.submit(retry, "another-frontend", 11.0, idempotency_key="k-running").id == running.spec.id
    assert policy.submit(retry, "fe", 11.0, idempotency_key="k-other").id == retry.id  # a new key: a new job

    # A runner that still had the job when the scheduler restarted reports it done: taken as it is.
    from atelier.jobs import Capabilities, JobDone, RunTiming

    policy.runner_up("r1", Capabilities(pid=1, node="n1", device="cpu"), 12.0)
    policy.drain()
    outcome = JobDone(job_id=running.spec.id, outputs=[], elapsed_s=1.0)
    taken = policy.batch_done("r1", "batch-before-the-restart", [outcome], {}, RunTiming(), 13.0)
    assert [job.id for job, _ in taken] == [running.spec.id]
    assert running.spec.id not in policy.queued()


def test_restored_jobs_are_announced_and_dispatched(tmp_path: Path) -> None:
    from atelier.jobs import Capabilities

    policy = Policy(Config.model_validate({"home": str(tmp_path)}))
    record = _record(kind="img2img")  # restored jobs pass admission again: a real image, of a kind that takes one
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, format="PNG")
    policy.restore(record, "fe", JobInputs(image=png.getvalue()), None, now=1.0)
    policy.runner_up("r1", Capabilities(pid=1, node="n1", device="cpu"), 2.0)
    policy.schedule(2.0)
    effects = policy.drain()
    dispatch = next(e for e in effects if isinstance(e, Dispatch))
    assert any(isinstance(e, Announce) and e.job.id == record.spec.id for e in effects)
    assert dispatch.items[0][0].id == record.spec.id and dispatch.items[0][2] == JobInputs(image=png.getvalue())


def test_a_busy_runners_refusal_counts_no_attempt_and_its_own_batch_is_waited_for(tmp_path: Path) -> None:
    from atelier.jobs import Capabilities, JobDone, JobFailed, RunTiming

    policy = Policy(Config.model_validate({"home": str(tmp_path), "scheduler": {"max_attempts": 1}}))
    before, new = _record("running when the scheduler died"), _record("new")
    policy.restore(before, "fe", None, None, now=1.0)
    policy.runner_up("r1", Capabilities(pid=1, node="n1", device="cpu"), 2.0)  # as it said Hello: idle
    policy.submit(new.spec, "fe", 2.0)
    policy.schedule(2.0)
    dispatch = next(e for e in policy.drain() if isinstance(e, Dispatch))
    refusal = [JobFailed(job_id=spec.id, retryable=True, reason="r1 is busy with batch old")
               for spec, *_ in dispatch.items]
    policy.batch_done("r1", dispatch.batch.id, refusal, {}, RunTiming(), 3.0, refused=True,
                      active=("old", [before.spec.id]))
    # No attempt counted (max_attempts 1 would have failed them), and the runner is busy with its old
    # batch, which now holds the restored job: nothing is dispatched to it until that ends.
    assert all(policy.job(spec.id).attempts == 0 for spec, *_ in dispatch.items
               if spec.id != before.spec.id)
    assert policy.job(before.spec.id).state is JobState.running
    assert policy.job(new.spec.id).state is JobState.queued
    policy.schedule(3.0)
    assert not [e for e in policy.drain() if isinstance(e, Dispatch)]
    done = policy.batch_done("r1", "old", [JobDone(job_id=before.spec.id, outputs=[], elapsed_s=1.0)], {},
                             RunTiming(), 4.0)
    assert [job.id for job, _ in done] == [before.spec.id]
    policy.schedule(4.0)
    assert [d.items[0][0].id for d in policy.drain() if isinstance(d, Dispatch)] == [new.spec.id]


# -- through atelier ---------------------------------------------------------------------------- #


def _wait_new_pid(cluster: Cluster, role: bytes, old: int, timeout: float = 30.0) -> int:
    def restarted() -> int | None:
        pid = cluster.pid_of(role)
        return pid if pid != old else None

    return eventually(restarted, timeout=timeout, interval=0.1, ignoring=(LookupError,))  # none while it restarts


@pytest.fixture(scope="module")
def restarting(atelier_home: Path) -> Cluster:
    cluster = Cluster(atelier_home).start()
    yield cluster
    cluster.stop()


def test_a_killed_scheduler_loses_no_job(restarting: Cluster) -> None:
    specs = [JobSpec(model="tiny-sd", prompt=f"a lighthouse {i}", width=64, height=64, steps=12, seed=i,
                     user=f"user-{i % 2}") for i in range(6)]

    async def go() -> tuple[list[JobResult], JobRecord]:
        async with restarting.client() as client:
            for spec in specs:
                await client.submit(spec, events=False)
            # Kill it while the first jobs run and the rest wait in its queue.
            async def first_running() -> bool:
                return (await client.job(specs[0].id)).state is JobState.running

            await eventually_async(first_running, timeout=120)
            old = restarting.pid_of(b"actors.scheduler")
            os.kill(old, signal.SIGKILL)
            await asyncio.to_thread(_wait_new_pid, restarting, b"actors.scheduler", old)
            results = [await client.wait(spec.id, timeout=180) for spec in specs]
            return results, await client.job(specs[0].id)

    results, first = run(go(), timeout=220)
    assert [r.job.state for r in results] == [JobState.done] * len(specs), [r.job.reason for r in results]
    for spec, result in zip(specs, results, strict=True):
        image = Image.open(io.BytesIO(bytes(result.outputs[0].data)))
        assert image.size == (64, 64) and f"Seed: {spec.seed}" in image.info["parameters"]
    assert first.state is JobState.done and first.artifacts  # the restarted scheduler answers for it


def test_an_idempotency_key_makes_one_job_across_a_restart(restarting: Cluster) -> None:
    spec = dict(model="tiny-sd", prompt="a key", width=64, height=64, steps=2, user="kim")

    async def go() -> tuple[JobRecord, JobRecord, JobResult, JobResult]:
        async with restarting.client() as client:
            first = await client.submit(JobSpec(**spec), idempotency_key="order-17", events=False)
            result = await client.wait(first.spec.id, timeout=60)
            old = restarting.pid_of(b"actors.scheduler")
            os.kill(old, signal.SIGKILL)
            await asyncio.to_thread(_wait_new_pid, restarting, b"actors.scheduler", old)
        # A new client (a restarted frontend) retries with the same key: it gets the first job,
        # ended, and its result with its image, fetched from the store.
        async with restarting.client() as again:
            second = await eventually_async(  # the scheduler may still be starting: its refusals mean not yet
                lambda: again.submit(JobSpec(**spec), idempotency_key="order-17", events=False, timeout=2),
                timeout=60, interval=0.2, ignoring=(Exception,))
            fetched = await again.wait(second.spec.id, timeout=30)
        return first, second, result, fetched

    first, second, result, fetched = run(go(), timeout=120)
    assert second.spec.id == first.spec.id and second.state is JobState.done
    assert fetched.job.state is JobState.done
    assert [bytes(a.data) for a in fetched.outputs] == [bytes(a.data) for a in result.outputs]
    assert (fetched.outputs[0].width, fetched.outputs[0].seed) == (64, result.outputs[0].seed)


def test_a_batch_lost_with_the_broker_goes_back_to_the_queue_uncounted(tmp_path: Path) -> None:
    from atelier.jobs import Capabilities, JobDone, RunTiming

    policy = Policy(Config.model_validate({"home": str(tmp_path), "scheduler": {"max_attempts": 1}}))
    policy.runner_up("r1", Capabilities(pid=1, node="n1", device="cpu"), 1.0)
    job = policy.submit(_record().spec, "fe", 1.0)
    policy.schedule(1.0)
    sent = next(e for e in policy.drain() if isinstance(e, Dispatch))
    # The broker died with the RunBatch in it; the runner registers again, running nothing.
    policy.runner_up("r1", Capabilities(pid=1, node="n1", device="cpu"), 2.0)
    assert job.state is JobState.queued and job.attempts == 0
    assert "did not have it after reconnecting" in job.reason
    policy.schedule(2.0)
    again = next(e for e in policy.drain() if isinstance(e, Dispatch))
    assert again.batch.id != sent.batch.id and again.items[0][0].id == job.id
    # Had it run after all, its late report is taken, not run a third time.
    for done, _ in policy.batch_done("r1", again.batch.id, [JobDone(job_id=job.id, outputs=[], elapsed_s=1.0)], {},
                                     RunTiming(), 3.0):
        policy.complete(done, [], (), 3.0)
    assert job.state is JobState.done
    assert policy.batch_done("r1", sent.batch.id, [JobDone(job_id=job.id, outputs=[], elapsed_s=1.0)], {},
                             RunTiming(), 3.5) == []


def test_a_job_the_journal_cannot_keep_is_not_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from actors.actor import RemoteError
    from atelier.jobs import ErrorCode
    from tests.conftest import broker_thread
    from tests.test_scheduler import scheduler_and_client

    def full_disk(*_args, **_kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Journal, "add", full_disk)
    config = Config.model_validate({"home": str(tmp_path), "broker": {"heartbeat_s": 0.2}})

    async def go():
        async with scheduler_and_client(broker, config) as client:
            with pytest.raises(RemoteError) as refused:
                await client.submit(_record().spec, events=False)
            return refused.value, await client.status()

    with broker_thread(heartbeat_s=0.2) as (broker, _):
        refused, status = run(go(), timeout=30)
    assert refused.error.code is ErrorCode.internal and "cannot record jobs" in refused.error.message
    assert status.queued == [] and not status.counts.get("queued")  # nothing taken that a restart would lose


def test_a_runners_answer_overtaken_by_a_newer_batch_changes_nothing(tmp_path: Path) -> None:
    from atelier.jobs import Capabilities

    policy = Policy(Config.model_validate({"home": str(tmp_path)}))
    idle = Capabilities(pid=1, node="n1", device="cpu")
    policy.runner_up("r1", idle, 1.0)  # asked now, while it has nothing of ours
    job = policy.submit(_record().spec, "fe", 1.0)
    policy.schedule(1.0)
    sent = next(e for e in policy.drain() if isinstance(e, Dispatch))
    policy.runner_state("r1", idle, None, 1.1)  # "idle": said before the batch reached it
    assert job.state is JobState.assigned and policy.runner_batch("r1") == sent.batch.id
    policy.runner_state("r1", idle, sent.batch.id, 1.2)  # "idle" though asked after: the batch was lost
    assert job.state is JobState.queued and job.attempts == 0
