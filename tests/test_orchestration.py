"""The orchestration path's shortcuts keep their word: the HTTP gateway's poll cache answers what the
scheduler would, and the broker's routing-only head reader refuses what the full one refuses."""

from __future__ import annotations

import asyncio

import aiohttp
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import codec
from actors.codec import DecodeError, Envelope
from actors.messages import JobEvent, Progress, Submit
from atelier.jobs import JobKind, JobRecord, JobSpec, JobState, TrainSpec
from frontends.jobcache import JobCache
from tests.conftest import run

pytestmark = pytest.mark.timeout(180)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(state: JobState = JobState.queued, **kw) -> JobRecord:
    spec = JobSpec(id="j1", model="noop", prompt="p", user="ana")
    return JobRecord(spec=spec, state=state, submitted_at=1.0, **kw)


def event(state: JobState, **kw) -> JobEvent:
    return JobEvent(job_id="j1", state=state, **kw)


# --------------------------------------------------------------------------- #
# the cache's rule, on a clock of its own


def test_a_polled_job_follows_its_events_and_a_transition_is_asked_once():
    clock = Clock()
    cache = JobCache(fresh_s=2.0, clock=clock)
    assert cache.get("j1") is None  # never seen: ask
    cache.learned(record(position=3, eta_s=10.0))
    assert cache.get("j1").position == 3
    cache.event(event(JobState.queued, position=1, eta_s=6.0))  # moved up the queue
    clock.now += 1.0
    got = cache.get("j1")
    assert (got.state, got.position, got.eta_s) == (JobState.queued, 1, 5.0)  # the ETA counts down
    cache.event(event(JobState.running, runner="runner-a"))
    assert cache.get("j1") is None  # started_at is the scheduler's: ask
    asked_at = clock.now
    cache.learned(record(JobState.running, started_at=101.0, runner="runner-a"), asked_at)
    cache.event(Progress(job_id="j1", step=1, total=4, elapsed_s=0.1, eta_s=0.3))
    assert cache.get("j1").started_at == 101.0
    assert (cache.hits, cache.misses) == (3, 2)


def test_a_live_job_not_heard_of_is_asked_again_and_a_crossed_answer_is_not_trusted():
    clock = Clock()
    cache = JobCache(fresh_s=2.0, clock=clock)
    cache.learned(record())
    clock.now += 2.5  # its events may have been lost (they are lossy) or its position moved unannounced
    assert cache.get("j1") is None
    asked_at = clock.now
    clock.now += 0.1
    cache.event(event(JobState.assigned, runner="r"))  # heard while the ask was on its way
    cache.learned(record(), asked_at)  # the answer predates the event: neither is sure to be the latest
    assert cache.get("j1") is None
    # A Progress on a job the cache thinks queued: the running event was lost.
    cache.learned(record(JobState.loading))
    cache.event(Progress(job_id="j1", step=1, total=4, elapsed_s=0.1, eta_s=0.3))
    assert cache.get("j1") is None


def test_after_the_result_the_record_is_always_the_schedulers():
    clock = Clock()
    cache = JobCache(fresh_s=2.0, clock=clock)
    cache.learned(record(JobState.running, started_at=5.0))
    cache.event(event(JobState.done))  # the event says it ended; the outputs and finished_at are the scheduler's
    assert cache.get("j1") is None
    final = record(JobState.done, started_at=5.0, finished_at=6.0, artifacts=["file:///a.png"])
    cache.learned(final)
    cache.event(event(JobState.running))  # late and out of order: ignored
    cache.learned(record(JobState.running, started_at=5.0))  # an answer that crossed the result: ignored
    clock.now += 3600
    assert cache.get("j1") == final


def test_a_running_training_is_always_asked():
    cache = JobCache(clock=Clock())
    spec = JobSpec(id="t1", kind=JobKind.train, model="noop", prompt="p", train=TrainSpec(name="x"))
    cache.learned(JobRecord(spec=spec, state=JobState.running, submitted_at=1.0))
    assert cache.get("t1") is None  # its checkpoints move its record, and no event says so


# --------------------------------------------------------------------------- #
# the broker's routing-only reader


@settings(derandomize=True, database=None, deadline=None, max_examples=300)
@given(data=st.binary(max_size=200))
def test_the_routing_reader_raises_only_decode_error(data):
    frames = [codec.MAGIC, data]
    try:
        head = codec.read_route(frames)
    except DecodeError:
        return
    assert isinstance(head.kind, str) and isinstance(head.src, str) and isinstance(head.dst, str)


def test_the_routing_reader_refuses_what_the_full_reader_refuses_in_the_framing():
    frames = codec.encode(Envelope(Submit(job=JobSpec(model="noop", prompt="p")), "client-a", "scheduler", 7))
    head = codec.read_route(frames)
    assert (head.kind, head.id, head.src, head.dst) == ("submit", 7, "client-a", "scheduler")
    bad = {
        "trailing bytes": [codec.MAGIC, bytes(frames[1]) + b"\x00"],
        "body not a map": [codec.MAGIC, msgpack.packb(["submit", 1, None, "a", "b", [1]])],
        "five fields": [codec.MAGIC, msgpack.packb(["submit", 1, None, "a", "b"])],
        "truncated": [codec.MAGIC, bytes(frames[1])[:-3]],
        "bad magic": [b"ATL0", frames[1]],
        "src not a string": [codec.MAGIC, msgpack.packb(["submit", 1, None, 5, "b", {}])],
    }
    for name, frames in bad.items():
        with pytest.raises(DecodeError):
            codec.read_route(frames)
        with pytest.raises(DecodeError):
            codec.read_head(frames)
        print(name, "refused by both")


# --------------------------------------------------------------------------- #
# through the real gateway


ORDER = ["queued", "assigned", "loading", "running", "done"]


def test_polls_follow_the_job_and_end_on_the_schedulers_record(shared_cluster, compat_http):
    """Polled as a script would: the states only move forward, and once done every field is the scheduler's;
    a job the gateway never saw (submitted by another client) is answered with the scheduler's record too."""
    headers, user, url = compat_http.auth("ana"), "compat-ana", compat_http.url

    async def go():
        async with aiohttp.ClientSession() as http, shared_cluster.client() as client:
            # The runner's first job waits for its worker's start-up imports: not what is polled here.
            await client.generate(JobSpec(model="noop", prompt="warm up", steps=1, user=user), timeout=90)
            body = {"model": "noop", "prompt": "polled", "steps": 3, "width": 64, "height": 64}
            async with http.post(f"{url}/v1/jobs", json=body, headers=headers) as response:
                assert response.status == 202
                job_id = (await response.json())["spec"]["id"]
            seen = []
            deadline = asyncio.get_running_loop().time() + 60
            while asyncio.get_running_loop().time() < deadline:
                async with http.get(f"{url}/v1/jobs/{job_id}", headers=headers) as response:
                    view = await response.json()
                seen.append(view["state"])
                if view["state"] == "done":
                    break
                await asyncio.sleep(0.005)
            final = view
            again = []
            for _ in range(3):  # after the result: the same answer every time
                async with http.get(f"{url}/v1/jobs/{job_id}", headers=headers) as response:
                    again.append(await response.json())
            truth = await client.job(job_id)
            other = JobSpec(model="noop", prompt="elsewhere", steps=1, user=user)
            result = await client.generate(other, timeout=60)
            async with http.get(f"{url}/v1/jobs/{other.id}", headers=headers) as response:
                foreign = await response.json()
            return seen, final, again, truth, result.job, foreign

    seen, final, again, truth, other, foreign = run(go(), timeout=170)
    assert seen[-1] == "done"
    assert [ORDER.index(s) for s in seen] == sorted(ORDER.index(s) for s in seen), seen  # never backwards
    for view in (final, *again):
        assert (view["state"], view["started_at"], view["finished_at"], view["artifacts"]) == \
            (truth.state.value, truth.started_at, truth.finished_at, truth.artifacts)
    assert (foreign["state"], foreign["finished_at"], foreign["artifacts"]) == \
        ("done", other.finished_at, other.artifacts)


# --------------------------------------------------------------------------- #
# the broker: previews after everything else, the newest of each job only


def test_previews_leave_after_progress_and_only_the_newest_of_a_job():
    import zmq

    import broker as broker_module
    from actors.messages import Hello, Preview, Role
    from atelier.jobs import Capabilities

    b = broker_module.Broker("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.connect(b.pub_endpoint)
        sub.setsockopt_string(zmq.SUBSCRIBE, "job/")
        assert b.xpub.poll(10_000), "the subscription never reached the broker"
        b.xpub.recv()

        def frames(ident: bytes, msg, src: str, dst: str) -> list:
            return [zmq.Frame(ident), *(zmq.Frame(bytes(f)) for f in codec.encode(Envelope(msg, src, dst, 1)))]

        hello = Hello(role=Role.runner, incarnation="i1", capabilities=Capabilities(pid=1))
        b._route(frames(b"r1", hello, "runner-x", "broker"))  # registered (its Welcome finds no socket: fine)

        def preview(step: int) -> Preview:
            return Preview(job_id="a", step=step, width=8, height=8, image=b"x" * 100)

        b._route(frames(b"r1", preview(1), "runner-x", "#job/a/preview"))
        b._route(frames(b"r1", preview(2), "runner-x", "#job/a/preview"))
        progress = Progress(job_id="a", step=2, total=4, elapsed_s=0.1, eta_s=0.2)
        b._route(frames(b"r1", progress, "runner-x", "#job/a/progress"))
        b._send_previews()  # the burst's end
        got = []
        while sub.poll(2000):
            topic, *rest = sub.recv_multipart()
            got.append((topic.decode(), codec.decode(rest).msg))
            if len(got) == 2:
                break
    finally:
        sub.close(linger=0)
        ctx.term()
        b.close()
    assert [topic for topic, _ in got] == ["job/a/progress", "job/a/preview"]
    assert got[1][1].step == 2 and b.stats.previews_shed == 1
