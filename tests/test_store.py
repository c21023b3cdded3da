"""The artifact stores (atelier/artifacts.py): LocalStore, and S3Store against a real S3 server
(SeaweedFS's ``weed mini``, tests/s3server.py) that checks signatures."""

from __future__ import annotations

import asyncio
import os
import time
import urllib.error
import urllib.request

import pytest

from atelier.artifacts import LocalStore, S3Store, StoreError, make_store
from atelier.config import Config, StoreConfig
from atelier.jobs import Artifact
from tests import s3server

BUCKET = "atelier-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = s3server.start(tmp_path_factory.mktemp("weed"))
    try:
        yield server
    finally:
        server.stop()


def s3_config(server, **settings) -> StoreConfig:
    return StoreConfig(kind="s3", endpoint=server.endpoint, bucket=BUCKET, region="us-east-1",
                       access_key_id=s3server.ACCESS_KEY, secret_access_key=s3server.SECRET_KEY, **settings)


@pytest.fixture(scope="module")
def bucket(s3):
    store = S3Store(s3_config(s3))
    store.client.create_bucket(Bucket=BUCKET)
    return BUCKET


def png(data: bytes) -> Artifact:
    return Artifact(media_type="image/png", data=data, seed=1, width=8, height=8)


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_anonymous_requests_are_refused(s3, bucket):
    store = S3Store(s3_config(s3))
    [uri] = store.put_all("job-anon", [png(b"secret pixels")])
    status, _ = fetch(f"{s3.endpoint}/{BUCKET}/outputs/job-anon-0.png")
    assert status == 403
    assert store.read(uri) == b"secret pixels"


def test_presigned_url_downloads_the_bytes(s3, bucket):
    store = S3Store(s3_config(s3, prefix="p1/"))
    [uri] = store.put_all("job-a", [png(b"\x89PNG fake image")])
    assert uri == f"s3://{BUCKET}/p1/outputs/job-a-0.png"
    url = store.signed_url(uri)
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=3600" in url
    assert fetch(url) == (200, b"\x89PNG fake image")


def test_expired_presigned_url_is_refused(s3, bucket):
    store = S3Store(s3_config(s3, url_expiry_s=1))
    [uri] = store.put_all("job-exp", [png(b"short-lived")])
    url = store.signed_url(uri)
    assert fetch(url)[0] == 200
    time.sleep(2.1)  # the expiry itself is what is tested: there is nothing to wait on but the clock
    status, body = fetch(url)
    assert status == 403, body


def test_tampered_presigned_url_is_refused(s3, bucket):
    store = S3Store(s3_config(s3))
    store.put_all("job-t", [png(b"mine"), png(b"other")])
    url = store.signed_url(f"s3://{BUCKET}/outputs/job-t-0.png")
    assert fetch(url)[0] == 200
    assert fetch(url.replace("job-t-0.png", "job-t-1.png"))[0] == 403  # another key, same signature
    signature = url.rsplit("X-Amz-Signature=", 1)[1]
    forged = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    assert fetch(url.replace(signature, forged))[0] == 403


def test_uris_outside_the_bucket_or_prefix_are_ignored(s3, bucket):
    store = S3Store(s3_config(s3, prefix="mine/"))
    assert store.read(f"s3://{BUCKET}/other/outputs/x-0.png") is None
    assert store.read("s3://another-bucket/mine/outputs/x-0.png") is None
    assert store.read(f"s3://{BUCKET}/mine/../other/x-0.png") is None
    assert store.signed_url("file:///etc/passwd") is None
    assert store.delete([f"s3://{BUCKET}/other/outputs/x-0.png"]) == 0


def test_put_validates_keys_and_checkpoints_survive_the_sweep(s3, bucket, tmp_path):
    for store in (S3Store(s3_config(s3, prefix="keys/", max_bytes=0)), LocalStore(tmp_path, max_bytes=0)):
        for bad in ("../x.safetensors", "checkpoints/../../etc/passwd", "outputs/j/1.png", "loras/u/.."):
            with pytest.raises(ValueError):
                store.put(bad, b"x")
        ckpt = store.put("checkpoints/job-1/100.safetensors", b"weights")
        lora = store.put("loras/alice/cat.safetensors", b"lora")
        store.put_all("job-o", [png(b"out")])
        swept = store.sweep(time.time())
        assert len(swept) == 1 and swept[0].endswith("job-o-0.png")
        assert store.read(ckpt) == b"weights" and store.read(lora) == b"lora"


def _retention_by_age(store, backdate):
    old, new = store.put_all("job-old", [png(b"o" * 10)]), store.put_all("job-new", [png(b"n" * 10)])
    backdate(old[0], 3 * 86400)
    assert store.sweep(time.time()) == old
    assert store.read(old[0]) is None and store.read(new[0]) == b"n" * 10


def test_local_retention_by_age_and_bytes(tmp_path):
    def backdate(uri, seconds):
        path = urllib.request.url2pathname(uri.removeprefix("file://"))
        os.utime(path, (time.time() - seconds, time.time() - seconds))

    _retention_by_age(LocalStore(tmp_path / "age", max_age_days=1), backdate)
    store = LocalStore(tmp_path / "bytes", max_bytes=25)
    uris = [store.put_all(f"job-{n}", [png(bytes([n]) * 10)])[0] for n in range(4)]
    for age, uri in zip((40, 30, 20, 10), uris, strict=True):
        backdate(uri, age)
    assert store.sweep(time.time()) == uris[:2]  # the oldest, until 20 bytes are left
    assert [store.read(uri) is not None for uri in uris] == [False, False, True, True]


def test_s3_retention_by_age_and_bytes(s3, bucket):
    store = S3Store(s3_config(s3, prefix="age/", max_age_days=1))
    [old] = store.put_all("job-old", [png(b"o" * 10)])
    [new] = store.put_all("job-new", [png(b"n" * 10)])
    # S3 sets LastModified itself: "now" three days on makes both old, so sweep at +0.5 day and at +3.
    assert store.sweep(time.time() + 43200) == []
    assert sorted(store.sweep(time.time() + 3 * 86400)) == sorted([new, old])
    assert store.read(old) is None
    store = S3Store(s3_config(s3, prefix="bytes/", max_bytes=25))
    uris = []
    for n in range(4):
        uris += store.put_all(f"job-{n}", [png(bytes([n]) * 10)])
        time.sleep(1.1)  # S3's LastModified has one-second resolution: the order is what is tested
    assert store.sweep(time.time()) == uris[:2]
    assert [store.read(uri) is not None for uri in uris] == [False, False, True, True]


def test_s3_down_raises_a_clear_store_error(tmp_path):
    closed = s3server._free_ports(1)[0]
    store = S3Store(StoreConfig(kind="s3", endpoint=f"http://127.0.0.1:{closed}", bucket=BUCKET,
                                access_key_id="AKX", secret_access_key="do-not-print-me", region="us-east-1"))
    with pytest.raises(StoreError) as caught:
        store.put_all("job-down", [png(b"x")])
    assert isinstance(caught.value, OSError)
    assert "S3 is unreachable" in str(caught.value) and f"127.0.0.1:{closed}" in str(caught.value)
    assert "do-not-print-me" not in str(caught.value) and "do-not-print-me" not in repr(store.config)


def test_missing_bucket_says_so(s3, bucket):
    # SeaweedFS creates a bucket on a first put by an admin identity, so the check is head_bucket's.
    store = S3Store(s3_config(s3).model_copy(update={"bucket": "no-such-bucket"}))
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        store.check()
    S3Store(s3_config(s3)).check()


def test_make_store_follows_the_config(tmp_path):
    assert isinstance(make_store(Config(home=tmp_path)), LocalStore)
    config = Config(home=tmp_path, store={"kind": "s3", "bucket": "b-b-b", "endpoint": "http://127.0.0.1:1"})
    assert isinstance(make_store(config), S3Store)
    with pytest.raises(ValueError, match="needs a bucket"):
        Config(home=tmp_path, store={"kind": "s3"})


def test_a_done_job_whose_outputs_retention_deleted_says_so(tmp_path):
    """GetJob (the HTTP job view) and GetResult: still done, with a reason saying the outputs were deleted."""
    from actors.messages import BatchDone
    from atelier.jobs import JobDone, JobSpec, JobState
    from tests.conftest import broker_thread, eventually_async, run
    from tests.test_scheduler import StandInRunner, scheduler_with_client

    config = Config.model_validate({"home": str(tmp_path), "broker": {"heartbeat_s": 0.2},
                                    "scheduler": {"min_free_bytes": 0},
                                    "store": {"max_bytes": 0, "sweep_every_s": 0.05}})

    async def go():
        runner = StandInRunner("runner-a", broker.router_endpoint)
        await runner.start()
        try:
            async with scheduler_with_client(broker, config) as (scheduler, client):
                job = await client.submit(JobSpec(model="noop", prompt="p"), events=False)
                item = await runner.next_job()
                await runner.ask("scheduler", BatchDone(batch_id=runner._batch_of[item.job.id], resident={},
                                                        outcomes=[JobDone(job_id=item.job.id, outputs=[png(b"x")],
                                                                          elapsed_s=0.01)]))
                await client.wait(job.spec.id, timeout=30)
                async def swept():
                    record = await client.job(job.spec.id)
                    return record if record.reason is not None else None

                record = await eventually_async(swept, timeout=10)
                result = await client.fetch_result(job.spec.id)
                return record, result, (await client.status()).stats
        finally:
            await runner.close()

    with broker_thread(heartbeat_s=0.2) as (broker, _):
        record, result, stats = run(go(), timeout=60)
    assert record.state is JobState.done and "deleted by the artifact store's retention" in record.reason
    assert result.job.state is JobState.done and result.outputs == []
    assert "1 of its 1 outputs were deleted" in result.job.reason
    assert stats.store_swept == 1


class _StandInScheduler:
    """What the HTTP server asks of the scheduler for jobs and /metrics: fixed answers."""

    def __init__(self, records):
        self.records = {record.spec.id: record for record in records}

    async def job(self, job_id):
        from actors.actor import RemoteError
        from actors.messages import Error
        from atelier.jobs import ErrorCode

        if job_id not in self.records:
            raise RemoteError(Error(code=ErrorCode.unknown_job, message="no such job"))
        return self.records[job_id]

    async def status(self):
        from actors.messages import ClusterStatus
        from atelier.jobs import SchedulerStats

        return ClusterStatus(runners=[], queued=[], counts={},
                             stats=SchedulerStats(store_errors=4, store_failing=True, store_error="S3 is unreachable"))


def test_http_gives_presigned_urls_and_redirects_to_them(s3, bucket):
    """/v1/jobs/{id} carries pre-signed URLs; /v1/artifacts/<name> answers 302 to one, to the owner only;
    /metrics shows the store's errors."""


    import aiohttp
    from aiohttp.test_utils import TestServer

    from atelier.jobs import JobRecord, JobSpec, JobState
    from frontends.http import HttpServer
    from tests.conftest import run

    ana, ben = "ana-token-0123456789abcdef", "ben-token-0123456789abcdef"
    settings = s3_config(s3, prefix="http/").model_dump()
    settings["secret_access_key"] = s3server.SECRET_KEY
    config = Config.model_validate({"store": settings, "http": {"tokens": [{"token": ana, "user": "ana"},
                                                                           {"token": ben, "user": "ben"}]}})
    store = S3Store(config.store)
    spec = JobSpec(model="noop", prompt="p", user="ana")
    uris = store.put_all(spec.id, [png(b"ana's image")])
    record = JobRecord(spec=spec, state=JobState.done, submitted_at=1.0, artifacts=uris)

    async def go():
        server = HttpServer(config, _StandInScheduler([record]), base_url="")
        test_server = TestServer(server.app, host="127.0.0.1")
        await test_server.start_server()
        try:
            async with aiohttp.ClientSession() as http:
                async def get(path, token, **kw):
                    async with http.get(test_server.make_url(path), headers={"Authorization": f"Bearer {token}"},
                                        **kw) as answer:
                        return answer.status, answer.headers, await answer.read()

                view = await get(f"/v1/jobs/{spec.id}", ana)
                redirect = await get(f"/v1/artifacts/{spec.id}-0.png", ana, allow_redirects=False)
                followed = await get(f"/v1/artifacts/{spec.id}-0.png", ana)
                other = await get(f"/v1/artifacts/{spec.id}-0.png", ben, allow_redirects=False)
                scrape = await get("/metrics", ana)
                return view, redirect, followed, other, scrape
        finally:
            await test_server.close()

    view, redirect, followed, other, scrape = run(asyncio.wait_for(go(), 30))
    import json

    [url] = json.loads(view[2])["urls"]
    assert url.startswith(f"{s3.endpoint}/{BUCKET}/http/outputs/{spec.id}-0.png?") and "X-Amz-Expires=3600" in url
    assert fetch(url) == (200, b"ana's image")
    assert redirect[0] == 302 and redirect[1]["Location"].startswith(f"{s3.endpoint}/{BUCKET}/http/outputs/")
    assert followed[0] == 200 and followed[2] == b"ana's image"
    assert other[0] == 403
    assert b"atelier_store_errors_total 4.0" in scrape[2] and b"atelier_store_failing 1.0" in scrape[2]


def test_a_scheduler_on_s3_delivers_from_s3_and_keeps_outputs_while_s3_is_down(tmp_path):
    """Through the scheduler: outputs go to S3 and GetResult reads them back; with S3 stopped the
    batch's report is answered internal (the runner keeps it), the job stays on its batch, and the
    status (/metrics) counts the failure with a public reason."""
    from actors.actor import RemoteError
    from actors.messages import BatchDone
    from atelier.jobs import ErrorCode, JobDone, JobSpec, JobState
    from tests.conftest import broker_thread, run
    from tests.test_scheduler import StandInRunner, scheduler_with_client

    server = s3server.start(tmp_path / "weed")
    try:
        settings = s3_config(server, prefix="sched/").model_dump()
        settings["secret_access_key"] = s3server.SECRET_KEY
        S3Store(s3_config(server)).client.create_bucket(Bucket=BUCKET)
        config = Config.model_validate({"home": str(tmp_path), "broker": {"heartbeat_s": 0.2}, "store": settings})

        def report(runner, item):
            return BatchDone(batch_id=runner._batch_of[item.job.id], resident={},
                             outcomes=[JobDone(job_id=item.job.id, outputs=[png(b"from s3")], elapsed_s=0.01)])

        async def go():
            runner = StandInRunner("runner-a", broker.router_endpoint)
            await runner.start()
            try:
                async with scheduler_with_client(broker, config) as (scheduler, client):
                    job = await client.submit(JobSpec(model="noop", prompt="p"), events=False)
                    await runner.ask("scheduler", report(runner, await runner.next_job()))
                    await client.wait(job.spec.id, timeout=30)
                    result = await client.fetch_result(job.spec.id)
                    await asyncio.to_thread(server.stop)  # off the loop: the peers keep their heartbeats
                    kept = await client.submit(JobSpec(model="noop", prompt="p"), events=False)
                    with pytest.raises(RemoteError) as refused:
                        await runner.ask("scheduler", report(runner, await runner.next_job()), timeout=60)
                    return result, refused.value.error, await client.job(kept.spec.id), (await client.status()).stats
            finally:
                await runner.close()

        with broker_thread(heartbeat_s=0.2) as (broker, _):
            result, refused, kept, stats = run(go(), timeout=120)
    finally:
        server.stop()
    assert result.job.state is JobState.done and result.job.artifacts[0].startswith(f"s3://{BUCKET}/sched/outputs/")
    assert bytes(result.outputs[0].data) == b"from s3"
    assert refused.code is ErrorCode.internal and "S3 is unreachable" in refused.message
    assert kept.state is JobState.assigned
    assert stats.store_errors == 1 and stats.store_failing and "S3 is unreachable" in stats.store_error
    assert s3server.SECRET_KEY not in refused.message + stats.store_error
