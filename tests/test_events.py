"""Cluster events as another program on the box meets them: the queue going busy and idle, over ZeroMQ,
to webhooks (a real HTTP server on loopback, one live and signed, one that never answers), on the
HTTP event stream, and in ``atelier events``. One atelier for the module, with both hooks configured."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import aiohttp
import pytest
from aiohttp import web

from actors.messages import ClusterEventKind
from atelier.config import Config
from atelier.jobs import JobSpec, JobState
from atelier.scheduling.activity import QueueActivity, busy
from atelier.scheduling.policy import Policy
from tests.conftest import ROOT, Cluster, broker_thread, run

pytestmark = pytest.mark.timeout(180)

ADMIN = "events-admin-0123456789abcdef"
USER = "events-user-0123456789abcdef"
SECRET = "hook-secret-for-tests"
DEAD_TIMEOUT_S = 2.0  # the hook that never answers: each POST to it waits this long


class HookServer:
    """A program's webhook: an aiohttp server on loopback, in a thread, keeping every POST it gets."""

    def __init__(self):
        self.received: queue.Queue[tuple[dict, bytes, float]] = queue.Queue()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(30), "the hook server did not start"

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def hook(request: web.Request) -> web.Response:
            self.received.put((dict(request.headers), await request.read(), time.time()))
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hook", hook)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = self.runner.addresses[0][1]
        started.set()
        self.loop.run_forever()

    def next(self, kind: str, after: float, timeout: float = 30.0) -> tuple[dict, bytes, dict]:
        """The first POST of event ``kind`` that happened after ``after`` (the scheduler's clock)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                headers, body, _ = self.received.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {kind} POSTed within {timeout} s") from None
            event = json.loads(body)
            if event["event"] == kind and event["at"] >= after:
                return headers, body, event

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def hook():
    server = HookServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def black_hole():
    """A port that takes connections and never answers: a hung program's webhook."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture(scope="module")
def atelier(atelier_home, tmp_path_factory, hook, black_hole):
    config = tmp_path_factory.mktemp("events") / "atelier.toml"
    config.write_text(f"""
default_model = "noop"

[events]
queue = 4

[[events.webhooks]]
url = "http://127.0.0.1:{hook.port}/hook"
secret = "{SECRET}"

[[events.webhooks]]
url = "http://127.0.0.1:{black_hole}/hung"
events = ["queue_busy", "queue_idle"]
timeout_s = {DEAD_TIMEOUT_S}
retries = 1

[[http.tokens]]
token = "{ADMIN}"
user = "events-admin"
role = "admin"

[[http.tokens]]
token = "{USER}"
user = "events-user"
""")
    cluster = Cluster(atelier_home, config).start()
    yield cluster
    cluster.stop()


def noop(user: str = "events") -> JobSpec:
    return JobSpec(model="noop", prompt="events", user=user, steps=2, width=64, height=64)


async def one_job(client) -> float:
    """Runs a noop job to its end; when it was submitted, by the clock the scheduler's events carry."""
    submitted = time.time()
    spec = noop()
    await client.submit(spec)
    result = await client.wait(spec.id, timeout=60)
    assert result.job.state is JobState.done
    return submitted


# --------------------------------------------------------------------------- #


def test_a_job_makes_the_queue_busy_then_idle_with_counts(atelier):
    async def go():
        async with atelier.client() as client:
            stream = client.cluster_events()
            upcoming = asyncio.ensure_future(anext(stream))
            await asyncio.sleep(0)  # subscribed (the generator's first step) before the job goes in
            spec = noop()
            await client.submit(spec)
            seen = []
            while len(seen) < 2:
                seen.append(await asyncio.wait_for(upcoming, 30))
                upcoming = asyncio.ensure_future(anext(stream))
            upcoming.cancel()
            record = await client.job(spec.id)
            return seen, record

    (busy, idle), record = run(go())
    assert busy.event is ClusterEventKind.queue_busy and busy.detail["queued"] + busy.detail["running"] >= 1
    assert idle.event is ClusterEventKind.queue_idle and idle.detail == {"queued": 0, "running": 0}
    assert record.state is JobState.done and idle.at >= busy.at  # idle said once the job had ended


def test_the_webhook_gets_each_event_signed(atelier, hook):
    async def go():
        async with atelier.client() as client:
            return await one_job(client)

    submitted = run(go())
    headers, body, busy = hook.next("queue_busy", submitted)
    _, idle_body, idle = hook.next("queue_idle", submitted)
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Atelier-Signature"], expected)
    assert headers["X-Atelier-Event"] == "queue_busy" and headers["Content-Type"] == "application/json"
    assert set(busy) == {"event", "at", "detail"} and idle["detail"] == {"queued": 0, "running": 0}


def test_a_hung_webhook_slows_no_job_and_costs_the_others_no_event(atelier, hook):
    jobs = 5

    async def go():
        async with atelier.client() as client:
            started = time.monotonic()
            marks = [await one_job(client) for _ in range(jobs)]
            return marks, time.monotonic() - started

    marks, took = run(go())
    # Each job is two events to the hung hook, each of which waits there 2 s twice: had that held up the
    # scheduler, five jobs would take 40 s. They take what noop jobs take.
    assert took < jobs * DEAD_TIMEOUT_S / 2, took
    for mark in marks:  # and the live hook has every one of them, busy then idle
        hook.next("queue_busy", mark)
        hook.next("queue_idle", mark)
    with urllib.request.urlopen(urllib.request.Request(f"{atelier.http}/metrics",
                                                       headers={"Authorization": f"Bearer {ADMIN}"}),
                                timeout=10) as response:
        metrics = response.read().decode()
    dropped = next(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("atelier_webhook_dropped_total"))
    assert dropped > 0  # the hung hook's queue (4) overflowed: its oldest went, and it is counted


def test_the_http_event_stream_is_for_admins(atelier):
    async def go():
        async with aiohttp.ClientSession() as http, atelier.client() as client:
            async with http.get(f"{atelier.http}/v1/events", headers={"Authorization": f"Bearer {USER}"}) as refused:
                forbidden = refused.status, await refused.json()
            async with http.get(f"{atelier.http}/v1/me", headers={"Authorization": f"Bearer {USER}"}) as response:
                me = await response.json()
            timeout = aiohttp.ClientTimeout(total=60)
            async with http.get(f"{atelier.http}/v1/events", headers={"Authorization": f"Bearer {ADMIN}"},
                                timeout=timeout) as response:
                assert response.status == 200 and response.content_type == "text/event-stream"
                assert await response.content.readline() == b": connected\n"
                await client.submit(noop())
                events = []
                while len(events) < 2:
                    line = (await response.content.readline()).decode()
                    if line.startswith("data: "):
                        events.append(json.loads(line[len("data: "):]))
            return forbidden, me, events

    (status, body), me, events = run(go())
    assert status == 403 and body["error"]["code"] == "forbidden" and "admin" in body["error"]["message"]
    assert me == {"user": "events-user", "admin": False}
    assert [e["event"] for e in events] == ["queue_busy", "queue_idle"]
    assert events[1]["detail"] == {"queued": 0, "running": 0} and isinstance(events[1]["at"], float)


def test_atelier_events_prints_a_line_per_event_until_ctrl_c(atelier):
    argv = [sys.executable, "-m", "frontends.cli", "events", "--json", "--router", atelier.router, "--pub",
            atelier.pub, "--config", str(atelier.config)]
    process = subprocess.Popen(argv, cwd=ROOT, env=atelier.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        assert "following the cluster's events" in process.stderr.readline()

        async def go():
            async with atelier.client() as client:
                await one_job(client)

        run(go())
        line = process.stdout.readline()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert json.loads(line)["event"] == "queue_busy"
    assert process.returncode == 130 and "Traceback" not in err, err


def test_atelier_events_without_a_scheduler_says_so_in_one_line(tmp_path):
    with broker_thread() as (broker, _):
        done = subprocess.run([sys.executable, "-m", "frontends.cli", "events", "--router", broker.router_endpoint,
                               "--pub", broker.pub_endpoint], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "ATELIER_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)})
    output = done.stdout + done.stderr
    assert done.returncode == 3 and "Traceback" not in output, output
    assert [line for line in output.splitlines() if "no scheduler answers at" in line], output


def test_a_restored_queue_starts_busy_and_says_nothing_until_it_changes():
    policy = Policy(Config.model_validate({"default_model": "noop"}))
    before = Policy(policy.config)
    job = before.submit(noop(), "http-1", 0.0)
    policy.restore(job.record(0.0), "http-1", None, None, 1.0)  # as the scheduler reads back its journal
    restored = QueueActivity(busy(policy.state))
    assert restored.busy and restored.observe(busy(policy.state)) is None
    policy.cancel(job.id, 2.0)
    assert restored.observe(busy(policy.state)) is False  # idle: said once
    assert restored.observe(busy(policy.state)) is None


def test_a_webhook_asking_for_an_unknown_event_stops_the_scheduler_in_one_line(tmp_path):
    config = tmp_path / "atelier.toml"
    config.write_text('[scheduler]\njournal = ":memory:"\n'
                      '[[events.webhooks]]\nurl = "http://127.0.0.1:9/hook"\nevents = ["queue_idle", "gpu_free"]\n')
    done = subprocess.run([sys.executable, "-m", "actors.scheduler", "--config", str(config), "--router",
                           "tcp://127.0.0.1:9"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ATELIER_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)})
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in output, output
    assert [line for line in output.splitlines() if "no event 'gpu_free'" in line and "queue_idle" in line], output
