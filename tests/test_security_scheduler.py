"""The security review's findings on the scheduler, its journal and its artifact store, each attacked
through the real interface (a Submit on the wire, a journal row written with sqlite3, a scheduler
process killed and started again, an artifact folder that cannot be written) and seen to fail, with
the legitimate use beside it still working."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from actors import codec
from actors.actor import Actor, RemoteError, handles
from actors.codec import Envelope
from actors.journal import DuplicateJob, Journal
from actors.messages import Accepted, BatchDone, BatchItem, Error, Ok, Role, RunBatch, Submit
from actors.runner import Runner
from actors.scheduler import Scheduler
from atelier.config import Config
from atelier.jobs import (
    MAX_INPUT_BYTES,
    Artifact,
    Capabilities,
    ErrorCode,
    JobDone,
    JobInputs,
    JobRecord,
    JobSpec,
    JobState,
)
from atelier.scheduling import planner
from atelier.scheduling.estimates import Estimates
from atelier.scheduling.policy import Dispatch, Policy, Refused
from frontends.client import AtelierClient
from tests.conftest import ROOT, broker_thread, eventually_async, run
from tests.test_scheduler import StandInRunner, scheduler_and_client, scheduler_with_client

pytestmark = pytest.mark.timeout(120)


def _config(tmp_path: Path, **scheduler) -> Config:
    return Config.model_validate({"home": str(tmp_path), "broker": {"heartbeat_s": 0.2},
                                  "scheduler": {"max_batch": 1, **scheduler}})


def _png(side: int = 64, noise: bool = False) -> bytes:
    pixels = os.urandom(side * side * 3) if noise else bytes(side * side * 3)
    image = Image.frombytes("RGB", (side, side), pixels)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _submit(client: AtelierClient, spec: JobSpec, inputs: JobInputs | None = None):
    """A raw Submit, as any frontend (or a peer that reached the broker) can send it."""
    return client.ask(codec.SCHEDULER, Submit(job=spec, inputs=inputs))


# -- H1: another user's job id --------------------------------------------------------------------- #


def test_h1_another_users_job_id_is_refused_and_reveals_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path)
    bob = JobSpec(model="noop", prompt="bob secret prompt", user="bob")

    async def go():
        async with scheduler_and_client(broker, config) as client:
            first = await _submit(client, bob)
            # Ana sends Bob's id from the same frontend (every HTTP user shares one client).
            with pytest.raises(RemoteError) as refused:
                await _submit(client, JobSpec(id=bob.id, model="noop", prompt="x", user="ana"))
            again = await _submit(client, bob)  # Bob's own retry: his job, not a second one
            return first, refused.value.error, again, await client.job(bob.id)

    with broker_thread(heartbeat_s=0.2) as (broker, _):
        first, error, again, record = run(go(), timeout=60)
    assert error.code is ErrorCode.conflict and error.field == "id"
    assert "secret" not in error.message and "bob" not in error.message
    assert isinstance(again, Accepted) and again.job.spec.id == first.job.spec.id
    assert record.spec.user == "bob" and record.spec.prompt == "bob secret prompt"


def test_h1_the_policy_checks_the_user_before_anything_reads_the_spec(tmp_path: Path) -> None:
    policy = Policy(_config(tmp_path))
    bob = policy.submit(JobSpec(model="noop", prompt="bob's", user="bob"), "fe", 1.0)
    # Not a valid job at all (an unknown model): still the id conflict, not an admission message.
    with pytest.raises(Refused) as refused:
        policy.submit(JobSpec(id=bob.id, model="no-such-model", prompt="x", user="ana"), "fe", 2.0)
    assert refused.value.code is ErrorCode.conflict
    with pytest.raises(Refused) as other_frontend:
        policy.submit(JobSpec(id=bob.id, model="noop", prompt="x", user="bob"), "another-fe", 2.0)
    assert other_frontend.value.code is ErrorCode.conflict
    assert policy.submit(JobSpec(id=bob.id, model="noop", prompt="bob's", user="bob"), "fe", 2.0) is bob


# -- a real scheduler process ---------------------------------------------------------------------- #


@contextlib.contextmanager
def scheduler_process(tmp_path: Path, router: str, journal: Path, catalog: str = ""):
    """``python -m actors.scheduler`` on a journal, with a catalog of its own; killed on the way out."""
    config = tmp_path / f"atelier-{time.monotonic_ns()}.toml"
    # Built-ins beside the catalog: tiny-sd is the model that stays when old-model goes.
    config.write_text('builtin_models = true\n[broker]\nheartbeat_s = 0.2\n' + catalog)
    log = tmp_path / f"scheduler-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "actors.scheduler", "--router", router, "--journal", str(journal),
             "--config", str(config)], cwd=ROOT, stdout=out, stderr=out,
            env={**os.environ, "ATELIER_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)})
    try:
        yield process, log
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


async def _serving(client: AtelierClient):
    return await eventually_async(lambda: client.status(), timeout=60, interval=0.2, ignoring=(Exception,))


OLD_CATALOG = '[models.old-model]\nfamily = "noop"\nsource = "none"\n'


def test_h2_a_journal_that_no_longer_fits_still_comes_up_and_fails_what_cannot_run(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite3"
    queued_old = JobSpec(model="old-model", prompt="of a removed model", user="bob")
    done_old = JobSpec(model="old-model", prompt="done long ago", user="bob")
    big = JobSpec(model="tiny-sd", kind="img2img", prompt="a huge input", user="bob")
    fine = JobSpec(model="noop", prompt="carries on", user="ana")

    async def before(router: str, pub: str) -> None:
        async with AtelierClient(router, pub, heartbeat_s=0.2) as client:
            await _serving(client)
            for spec in (done_old, queued_old, big, fine):
                await _submit(client, spec, JobInputs(image=_png()) if spec is big else None)
            await client.cancel(done_old.id)  # ended: a record its owner may still read

    async def after(router: str, pub: str):
        async with AtelierClient(router, pub, heartbeat_s=0.2) as client:
            await _serving(client)
            jobs = {spec.id: await client.job(spec.id) for spec in (queued_old, big, fine, done_old)}
            new = await _submit(client, JobSpec(model="noop", prompt="a new job", user="ana"))
            return jobs, new, await client.status()

    with broker_thread(heartbeat_s=0.2) as (broker, _):
        # A previous scheduler, with a catalog that had old-model.
        with scheduler_process(tmp_path, broker.router_endpoint, journal, OLD_CATALOG) as (process, _):
            run(before(broker.router_endpoint, broker.pub_endpoint), timeout=90)
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        # Rows that no longer fit: one that does not parse, inputs above a limit tightened since.
        db = sqlite3.connect(journal)
        db.execute("INSERT INTO jobs (id, user, client, state, record, submitted_at) VALUES"
                   " ('garbled', 'eve', 'fe', 'queued', '{\"spec\": 42}', 1.0)")
        db.execute("UPDATE inputs SET data = ? WHERE job_id = ?", (b"\0" * (MAX_INPUT_BYTES + 1), big.id))
        db.commit()
        db.close()
        with scheduler_process(tmp_path, broker.router_endpoint, journal) as (process, log):
            jobs, new, status = run(after(broker.router_endpoint, broker.pub_endpoint), timeout=90)
            assert process.poll() is None  # it came up and stays up
    assert jobs[queued_old.id].state is JobState.failed
    assert "model 'old-model' is no longer in the catalog" in jobs[queued_old.id].reason
    assert jobs[big.id].state is JobState.failed and "input images are no longer accepted" in jobs[big.id].reason
    assert jobs[fine.id].state is JobState.queued and fine.id in status.queued
    assert jobs[done_old.id].state is JobState.cancelled and jobs[done_old.id].spec.user == "bob"
    assert new.job.state is JobState.queued
    text = log.read_text()
    assert "garbled" in text and "quarantine" in text
    db = sqlite3.connect(journal)
    assert db.execute("SELECT reason FROM quarantine WHERE id = 'garbled'").fetchone()[0].startswith(
        "its record no longer parses")
    states = dict(db.execute("SELECT id, state FROM jobs").fetchall())
    assert states[queued_old.id] == "failed" and states[big.id] == "failed"  # the failure is journaled
    assert "garbled" not in states


# -- M5: a reused id, and a submit that is durable once answered ------------------------------------ #


def test_m5_a_job_id_still_in_the_journal_is_never_reused(tmp_path: Path) -> None:
    config = _config(tmp_path, remember_finished=0)  # an ended job leaves memory at once
    bob = JobSpec(model="noop", prompt="bob's", user="bob")

    async def go():
        async with scheduler_and_client(broker, config) as client:
            await _submit(client, bob)
            await client.cancel(bob.id)
            with pytest.raises(RemoteError) as refused:
                await _submit(client, JobSpec(id=bob.id, model="noop", prompt="ana's", user="ana"))
            retry = await _submit(client, bob)  # Bob's lost answer, asked again: his job as it ended
            return refused.value.error, retry

    with broker_thread(heartbeat_s=0.2) as (broker, _):
        error, retry = run(go(), timeout=60)
    assert error.code is ErrorCode.conflict and "bob" not in error.message
    assert retry.job.spec.id == bob.id and retry.job.state is JobState.cancelled
    journal = Journal(config.journal_path)
    assert journal.get(bob.id).spec.prompt == "bob's" and journal.submitter(bob.id)[0] == "bob"
    record = JobRecord(spec=JobSpec(id=bob.id, model="noop", prompt="ana's", user="ana"), state=JobState.queued,
                       submitted_at=time.time())
    with pytest.raises(DuplicateJob, match="exists already"):
        journal.add(record, "fe", None, None)  # a plain INSERT: the old row is not rewritten
    assert journal.get(bob.id).spec.user == "bob"


def test_m5_a_job_is_durable_as_soon_as_its_submit_is_answered(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite3"
    spec = JobSpec(model="tiny-sd", kind="img2img", prompt="kept", user="kim")
    image = _png()

    async def submit(router: str, pub: str):
        async with AtelierClient(router, pub, heartbeat_s=0.2) as client:
            await _serving(client)
            return await _submit(client, spec, JobInputs(image=image))

    async def read_back(router: str, pub: str):
        async with AtelierClient(router, pub, heartbeat_s=0.2) as client:
            await _serving(client)
            return await client.job(spec.id)

    with broker_thread(heartbeat_s=0.2) as (broker, _):
        with scheduler_process(tmp_path, broker.router_endpoint, journal) as (process, _):
            accepted = run(submit(broker.router_endpoint, broker.pub_endpoint), timeout=90)
            process.kill()  # right after the answer, before any other event
            process.wait(30)
        with scheduler_process(tmp_path, broker.router_endpoint, journal):
            record = run(read_back(broker.router_endpoint, broker.pub_endpoint), timeout=90)
    assert accepted.job.spec.id == spec.id
    assert record.state is JobState.queued and record.spec.prompt == "kept"
    assert Journal(journal).unfinished()[0].inputs == JobInputs(image=image)


# -- M2: a byte budget for queued inputs ----------------------------------------------------------- #


def test_m2_queued_input_images_are_bounded_per_user_and_in_all(tmp_path: Path) -> None:
    image = _png(128, noise=True)
    size = len(image)
    config = _config(tmp_path, max_input_bytes_per_user=2 * size + 10, max_input_bytes=3 * size + 10)

    def img2img(user: str) -> JobSpec:
        return JobSpec(model="tiny-sd", kind="img2img", prompt="p", user=user)

    async def go():
        async with scheduler_and_client(broker, config) as client:
            bob = [await _submit(client, img2img("bob"), JobInputs(image=image)) for _ in range(2)]
            with pytest.raises(RemoteError) as mine:
                await _submit(client, img2img("bob"), JobInputs(image=image))
            text_only = await _submit(client, JobSpec(model="noop", prompt="no inputs", user="bob"))
            await _submit(client, img2img("ana"), JobInputs(image=image))
            with pytest.raises(RemoteError) as everyone:
                await _submit(client, img2img("cy"), JobInputs(image=image))
            await client.cancel(bob[0].job.spec.id)  # an ended job's inputs no longer count
            freed = await _submit(client, img2img("bob"), JobInputs(image=image))
            return mine.value.error, everyone.value.error, text_only, freed

    with broker_thread(heartbeat_s=0.2) as (broker, _):
        mine, everyone, text_only, freed = run(go(), timeout=60)
    for error in (mine, everyone):
        assert error.code is ErrorCode.queue_full and error.retry_after_s and error.field == "inputs"
    assert "bob" in mine.message and "one person" in mine.message
    assert text_only.job.state is JobState.queued and freed.job.state is JobState.queued


# -- M4: a store that fails, retention, the runner's report ----------------------------------------- #


def _finish_all(runner: StandInRunner, item) -> BatchDone:
    png = Artifact(media_type="image/png", data=b"\x89PNG fake", width=8, height=8, seed=item.job.seed)
    return BatchDone(batch_id=runner._batch_of[item.job.id], resident={},
                     outcomes=[JobDone(job_id=item.job.id, outputs=[png], elapsed_s=0.01)])


@pytest.mark.parametrize("broken", ["folder is a file", "disk nearly full"])
def test_m4_outputs_that_cannot_be_stored_are_kept_by_the_runner_then_fail_after_patience(
        tmp_path: Path, broken: str) -> None:
    """A store that fails loses no output: the scheduler answers internal (the runner keeps the batch
    and reports it again); a store fixed in time gets the outputs; one that is not, after
    [store] patience_s, fails the job with the reason. /metrics' counters see every failure."""
    artifacts = tmp_path / "artifacts"
    settings = {"home": str(tmp_path), "artifacts": str(artifacts), "broker": {"heartbeat_s": 0.2},
                "store": {"patience_s": 0.05}}
    if broken == "folder is a file":
        artifacts.write_bytes(b"")
    else:
        settings["scheduler"] = {"min_free_bytes": 1 << 60}
    config = Config.model_validate(settings)

    def fix(scheduler) -> None:
        if artifacts.is_file():
            artifacts.unlink()
        scheduler.store.min_free_bytes = 0

    def breaks(scheduler) -> None:  # the folder now holds an output: a nearly full disk, whichever the case
        scheduler.store.min_free_bytes = 1 << 60

    async def go():
        runner = StandInRunner("runner-a", broker.router_endpoint)
        await runner.start()
        try:
            async with scheduler_with_client(broker, config) as (scheduler, client):
                # 1. Kept, and delivered once the store is back.
                job = await client.submit(JobSpec(model="noop", prompt="p"), events=False)
                done = _finish_all(runner, await runner.next_job())
                with pytest.raises(RemoteError) as refused:
                    await runner.ask("scheduler", done)
                running = await client.job(job.spec.id)
                fix(scheduler)
                assert isinstance(await runner.ask("scheduler", done), Ok)  # the same report, again
                kept = await client.wait(job.spec.id, timeout=30)
                stats = (await client.status()).stats
                # 2. Not back within patience_s: the job fails with the reason, once.
                breaks(scheduler)
                lost = await client.submit(JobSpec(model="noop", prompt="p"), events=False)
                done = _finish_all(runner, await runner.next_job())
                with pytest.raises(RemoteError):
                    await runner.ask("scheduler", done)
                await asyncio.sleep(0.1)  # patience_s is a duration: it has to pass
                assert isinstance(await runner.ask("scheduler", done), Ok)
                failed = await client.wait(lost.spec.id, timeout=30)
                return refused.value.error, running, kept, stats, failed, (await client.status()).stats
        finally:
            await runner.close()

    with broker_thread(heartbeat_s=0.2) as (broker, _):
        refused, running, kept, stats, failed, later = run(go(), timeout=60)
    assert refused.code is ErrorCode.internal and "outputs are kept" in refused.message
    assert running.state is JobState.assigned and running.attempts == 1  # still on its batch: not requeued
    assert kept.job.state is JobState.done and bytes(kept.outputs[0].data) == b"\x89PNG fake"
    assert stats.store_errors == 1 and not stats.store_failing
    assert failed.job.state is JobState.failed and failed.job.attempts == 1
    assert "its outputs could not be stored" in failed.job.reason
    assert str(tmp_path) not in failed.job.reason  # no server path in a public reason
    assert "kept spare" in failed.job.reason
    assert later.store_errors == 3 and later.store_failing and "kept spare" in later.store_error
    assert not list(artifacts.glob("*.part"))


def test_m4_a_failed_write_leaves_no_part_file_and_pruned_jobs_take_their_artifacts(tmp_path: Path) -> None:
    config = Config.model_validate({"home": str(tmp_path), "scheduler": {"journal_keep_days": 1}})
    store_dir = config.artifact_dir
    store_dir.mkdir(parents=True)
    (store_dir / "stray-0.png.part").write_bytes(b"half")  # left by a scheduler killed mid-write
    old, kept = (JobRecord(spec=JobSpec(model="noop", prompt=p, width=64, height=64, steps=4, seed=1),
                           state=JobState.queued, submitted_at=1.0) for p in ("old", "kept"))
    journal = Journal(config.journal_path)
    files = {}
    for record, ended in ((old, time.time() - 3 * 86400), (kept, time.time())):
        journal.add(record, "fe", None, None)
        path = store_dir / f"{record.spec.id}-0.png"
        path.write_bytes(b"png")
        files[record.spec.id] = path
        art = Artifact(media_type="image/png", data=b"", uri=path.resolve().as_uri())
        journal.update([record.model_copy(update={"state": JobState.done, "finished_at": ended,
                                                  "artifacts": [art.uri]})], {record.spec.id: [art]})
    journal.close()
    scheduler = Scheduler(config, "tcp://127.0.0.1:1")  # restoring prunes; no broker needed
    try:
        assert not files[old.spec.id].exists() and files[kept.spec.id].exists()
        assert scheduler.journal.get(old.spec.id) is None and scheduler.journal.get(kept.spec.id) is not None
        assert not (store_dir / "stray-0.png.part").exists()
        # A URI from the journal never reaches outside the store.
        outside = tmp_path / "outside.png"
        outside.write_bytes(b"keep me")
        assert scheduler.store.delete([outside.resolve().as_uri()]) == 0 and outside.exists()
    finally:
        scheduler.journal.close()
        scheduler.ctx.term()  # never started: no socket to close
    # A write that fails half way leaves nothing behind.
    (store_dir / "x-0.png").mkdir()  # os.replace onto a folder fails
    with pytest.raises(OSError):
        scheduler.store.put_all("x", [Artifact(media_type="image/png", data=b"png")])
    assert not list(store_dir.glob("*.part"))


class BusyScheduler(Actor):
    """A scheduler that answers a report busy, then failing, then takes it."""

    role = Role.scheduler

    def __init__(self, router: str):
        super().__init__("scheduler", router, heartbeat_s=0.2)
        self.answers = [Error(code=ErrorCode.busy, message="queue full"),
                        Error(code=ErrorCode.internal, message="OSError: disk full")]
        self.reports: list[str] = []

    @handles(BatchDone)
    async def on_batch_done(self, msg: BatchDone, env: Envelope) -> Ok | Error:
        self.reports.append(msg.batch_id)
        return self.answers.pop(0) if self.answers else Ok()


class Reporter(Actor):
    """Stands in for a runner: its report is the real Runner's."""

    role = Role.runner
    report = Runner._report


def test_m4_a_runner_keeps_reporting_through_busy_and_internal_answers(tmp_path: Path) -> None:
    async def go():
        scheduler = BusyScheduler(broker.router_endpoint)
        reporter = Reporter("runner-r", broker.router_endpoint, heartbeat_s=0.2)
        await scheduler.start()
        await reporter.start()
        try:
            await asyncio.wait_for(reporter.report("scheduler", BatchDone(batch_id="b1", outcomes=[], resident={})),
                                   timeout=20)
            return scheduler.reports
        finally:
            await reporter.close()
            await scheduler.close()

    with broker_thread(heartbeat_s=0.2) as (broker, _):
        reports = run(go(), timeout=30)
    assert reports == ["b1", "b1", "b1"]  # refused twice, then acknowledged: not dropped


# -- L4: batches that would not fit one message ----------------------------------------------------- #


def _first_batch(tmp_path: Path, specs: list[JobSpec]) -> Dispatch:
    """What one idle GPU runner is given first from these jobs, with step times measured so small
    that batching everything would pay (the noop model's)."""
    config = Config.model_validate({"home": str(tmp_path), "default_model": "wide",
                                    "models": {"wide": {"family": "noop", "source": "none", "max_batch": 1024}}})
    estimates = Estimates()
    for images in (1, 1024):
        estimates.observe_step("wide", "cuda:0", 64 * 64, images, 1e-6)
    policy = Policy(config, estimates=estimates)
    for spec in specs:
        policy.submit(spec, "fe", 1.0)
    policy.runner_up("r1", Capabilities(pid=1, node="n1", device="cuda:0"), 1.0)
    policy.schedule(1.0)
    return next(effect for effect in policy.drain() if isinstance(effect, Dispatch))


def test_l4_the_planner_caps_a_batch_at_what_one_message_carries(tmp_path: Path) -> None:
    assert (planner.MAX_BLOBS, planner.MAX_HEAD_BYTES * 2) == (codec.MAX_FRAMES, codec.MAX_HEAD_BYTES)
    # 96 images would be one batch by the model's size (1024): its BatchDone would carry 96 blobs.
    many = _first_batch(tmp_path, [JobSpec(model="wide", prompt="p", count=16, seed=1) for _ in range(6)])
    assert sum(spec.count for spec, *_ in many.items) == codec.MAX_FRAMES
    # 200 long prompts: one RunBatch of them all would have a head of about 1.6 MB.
    wordy = _first_batch(tmp_path, [JobSpec(model="wide", prompt="x" * 4000, negative_prompt="y" * 4000, seed=2)
                                    for _ in range(200)])
    assert 1 < len(wordy.items) < 200
    items = [BatchItem(job=spec, attempt=attempt) for spec, attempt, *_ in wordy.items]
    frames = codec.encode(Envelope(RunBatch(batch_id=wordy.batch.id, items=items), "scheduler", "r1", 1))
    assert len(frames) - 2 <= codec.MAX_FRAMES and len(frames[1]) <= codec.MAX_HEAD_BYTES
    codec.read_head(frames)  # what the broker and the runner check first: it passes


class RefusingRunner(StandInRunner):
    """A runner whose end refuses the RunBatch message (as one it cannot decode is refused)."""

    @handles(RunBatch)
    async def on_run(self, msg: RunBatch, env: Envelope) -> Error:
        self.batches.put_nowait(msg)
        return Error(code=ErrorCode.too_large, message="too many frames")


def test_l4_a_refused_dispatch_requeues_its_jobs_and_frees_the_runner(tmp_path: Path) -> None:
    config = _config(tmp_path, max_attempts=2)

    async def go():
        runner = RefusingRunner("runner-a", broker.router_endpoint)
        await runner.start()
        try:
            async with scheduler_and_client(broker, config) as client:
                job = await client.submit(JobSpec(model="noop", prompt="p"), events=False)
                sent = [await asyncio.wait_for(runner.batches.get(), 10) for _ in range(2)]  # tried again
                result = await client.wait(job.spec.id, timeout=30)
                status = await client.status()
                return sent, result, status
        finally:
            await runner.close()

    with broker_thread(heartbeat_s=0.2) as (broker, _):
        sent, result, status = run(go(), timeout=60)
    assert sent[0].batch_id != sent[1].batch_id
    assert result.job.state is JobState.failed and "could not be sent to runner-a: too_large" in result.job.reason
    assert [r.job for r in status.runners] == [None]  # not busy for ever with a batch it never had


def test_l4_a_runner_gone_between_its_death_and_its_restart_costs_no_attempt(tmp_path: Path) -> None:
    """The broker says unroutable while a dead runner's restart has not joined yet: the job waits for a
    runner rather than burning its attempts on the gap (test_watchdog hit it, one attempt left)."""
    policy = Policy(_config(tmp_path, max_attempts=1))
    policy.runner_up("runner-a", Capabilities(pid=1, node="n", device="cpu"), 0.0)
    job = policy.submit(JobSpec(model="noop", prompt="p"), "fe", 0.0)
    policy.schedule(0.0)
    first = next(e for e in policy.drain() if isinstance(e, Dispatch))
    policy.dispatch_refused("runner-a", first.batch.id, "unroutable: 'runner-a' is unreachable", 0.1, unreachable=True)
    policy.schedule(0.2)
    assert not [e for e in policy.drain() if isinstance(e, Dispatch)]  # not sent again into the gap
    assert job.state is JobState.queued and job.attempts == 0
    policy.schedule(5.0)  # the pause is over (or the runner joined again)
    again = next(e for e in policy.drain() if isinstance(e, Dispatch))
    assert again.batch.jobs == [job.id] and job.attempts == 1
    # Any other refusal is the batch's own: it counts, and ends in a failure with the reason.
    policy.dispatch_refused("runner-a", again.batch.id, "too_large: 70 frames", 5.1, unreachable=False)
    assert job.state is JobState.failed and "too_large" in job.reason


def test_m2_queued_inputs_wait_on_disk_and_reach_the_runner_at_dispatch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(tmp_path)
    image = _png(720, noise=True)  # above a MiB: written off the event loop
    spec = JobSpec(model="tiny-sd", kind="img2img", prompt="p", user="bob")
    writes = []
    add = Journal.add

    def watched_add(journal, record, *args):
        queued = spec.id in scheduler.policy.queued()
        writes.append((threading.current_thread() is threading.main_thread(), queued))
        add(journal, record, *args)

    monkeypatch.setattr(Journal, "add", watched_add)

    async def go():
        nonlocal scheduler
        async with scheduler_with_client(broker, config) as (scheduler, client):
            await _submit(client, spec, JobInputs(image=image))
            held = scheduler.policy.find(spec.id)
            in_memory = held.inputs, held.input_bytes
            runner = StandInRunner("runner-a", broker.router_endpoint)
            await runner.start()
            try:
                return in_memory, await runner.next_job()
            finally:
                await runner.close()

    scheduler = None
    with broker_thread(heartbeat_s=0.2) as (broker, _):
        (inputs, counted), item = run(go(), timeout=60)
    assert len(image) > 1 << 20 and writes == [(False, False)]  # in a thread, the job not yet queued
    assert inputs is None and counted == len(image)  # counted against the budget, not held
    assert item.job.id == spec.id and bytes(item.inputs.image) == image


class GpuStandIn(StandInRunner):
    def capabilities(self) -> Capabilities:
        return Capabilities(pid=os.getpid(), node="n1", device="cuda:0")


def test_l4_a_batch_too_large_for_one_message_is_not_sent_and_frees_the_runner(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As if the planner's estimate were wrong: 200 long prompts in one RunBatch, a head of about 1.7 MB.
    monkeypatch.setattr(planner, "MAX_HEAD_BYTES", 1 << 30)
    monkeypatch.setattr(planner, "MAX_BLOBS", 1 << 30)
    config = Config.model_validate({"home": str(tmp_path), "broker": {"heartbeat_s": 0.2},
                                    "scheduler": {"max_attempts": 1}, "default_model": "wide",
                                    "models": {"wide": {"family": "noop", "source": "none", "max_batch": 1024}}})
    specs = [JobSpec(model="wide", prompt="x" * 4000, negative_prompt="y" * 4000, seed=i) for i in range(200)]

    async def go():
        async with scheduler_with_client(broker, config) as (scheduler, client):
            for images in (1, 1024):
                scheduler.policy.estimates.observe_step("wide", "cuda:0", 64 * 64, images, 1e-6)
            for spec in specs:
                await _submit(client, spec)
            runner = GpuStandIn("runner-g", broker.router_endpoint)
            await runner.start()
            try:
                last = await client.wait(specs[-1].id, timeout=30)
                await asyncio.sleep(0.5)
                return last, runner.batches.qsize(), await client.status()
            finally:
                await runner.close()

    with broker_thread(heartbeat_s=0.2) as (broker, _):
        last, received, status = run(go(), timeout=90)
    assert last.job.state is JobState.failed and "above what one message may carry" in last.job.reason
    assert received == 0 and [r.job for r in status.runners] == [None]
