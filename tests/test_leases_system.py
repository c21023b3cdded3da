"""VRAM leases through the real processes: the Python client, ``atelier lease`` and ``/v1/leases``, against one
atelier with one CPU runner whose device budget is 3 GB, serving cost-model models (a GPU's sizes and step
times, slept instead of computed).

One system for the module; every test leaves no lease behind.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from actors.actor import RemoteError
from actors.messages import ClusterEventKind
from atelier.families.costmodel import write_model
from atelier.jobs import JobSpec, JobState
from tests.conftest import ROOT, Cluster, HttpFrontend, eventually, eventually_async, run

pytestmark = pytest.mark.timeout(180)

BUDGET = 3_000_000_000
SMALL, BIG = 1_000_000_000, 2_500_000_000
STEP_S = 0.05  # 40 steps: a 2 s batch


def _profile(nbytes: int) -> dict:
    return {"bytes": nbytes, "disk_load_s": 0.1, "staged_load_s": 0.05, "stage_s": 0.05, "default_resolution": 64,
            "step_s": {"64": [STEP_S, STEP_S, STEP_S, STEP_S]}, "vae_decode_s": 0.0}


@pytest.fixture(scope="module")
def leased(atelier_home, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lease-models")
    lines = ["builtin_models = false", 'default_model = "cm-small"', "[node]", 'devices = ["cpu:0"]',
             "resident_models = 2", f"device_budget_bytes = {BUDGET}"]
    for name, nbytes in (("cm-small", SMALL), ("cm-big", BIG)):
        path = write_model(folder / name, _profile(nbytes))
        lines += [f"[models.{name}]", 'family = "costmodel"', f'source = "{path}"', "default_width = 64",
                  "default_height = 64", "default_steps = 4"]
    config = folder / "atelier.toml"
    config.write_text("\n".join(lines) + "\n")
    cluster = Cluster(atelier_home, config).start()
    yield cluster
    cluster.stop()


async def _runner(client):
    (runner,) = (await client.status()).runners
    return runner.capabilities


async def _until_state(client, job_id: str, state: JobState, timeout: float = 30.0):
    async def reached():
        record = await client.job(job_id)
        return record if record.state is state else None

    return await eventually_async(reached, timeout=timeout)


async def _no_leases(client) -> bool:
    caps = await _runner(client)
    return not (await client.status()).leases and caps.budget_bytes == BUDGET and caps.leased_bytes == 0


def test_an_idle_runner_evicts_for_a_lease_and_gets_its_budget_back_at_release(leased):
    async def go():
        async with leased.client() as client:
            # The lease's events; the warm-up job's queue_busy and queue_idle come among them.
            events = (event async for event in client.cluster_events() if not event.event.value.startswith("queue_"))
            first = asyncio.ensure_future(events.__anext__())
            await client.generate(JobSpec(model="cm-small", prompt="warm", user="lea"), timeout=30)
            assert "cm-small" in (await _runner(client)).resident
            asked = time.monotonic()
            lease = await client.take_lease("cpu:0", BIG, 60, holder="maw", wait_s=20)
            granted_in = time.monotonic() - asked
            caps = await _runner(client)
            granted_event = await asyncio.wait_for(first, 10)
            listed = (await client.status()).leases
            ended = await client.end_lease(lease.id)
            second = await asyncio.wait_for(events.__anext__(), 10)
            await eventually_async(lambda: _no_leases(client), timeout=10)
            return lease, granted_in, caps, granted_event, listed, ended, second

    lease, granted_in, caps, granted_event, listed, ended, second = run(go(), 90)
    assert lease.state == "granted" and granted_in < 2.0
    assert lease.freed_bytes == SMALL and lease.runners == ["runner-" + lease.node + "-cpu0"]
    assert caps.resident == {} and caps.budget_bytes == BUDGET - BIG and caps.leased_bytes == BIG
    assert granted_event.event is ClusterEventKind.lease_granted
    assert granted_event.detail["id"] == lease.id and granted_event.detail["freed"] == SMALL
    assert [item.id for item in listed] == [lease.id]
    assert ended.state == "ended" and "released" in ended.ended_reason
    assert second.event is ClusterEventKind.lease_ended and second.detail["id"] == lease.id


def test_a_lease_waits_for_the_running_batch_and_an_urgent_one_hands_it_back_losing_nothing(leased):
    async def go():
        async with leased.client() as client:
            calm = JobSpec(model="cm-small", prompt="calm", steps=40, user="lea", seed=7)
            await client.submit(calm, events=False)
            await _until_state(client, calm.id, JobState.running)
            asked = time.monotonic()
            lease = await client.take_lease("cpu:0", SMALL, 60, holder="calm", wait_s=30)
            waited = time.monotonic() - asked
            calm_done = await client.wait(calm.id, timeout=10)
            await client.end_lease(lease.id)

            rushed = JobSpec(model="cm-small", prompt="rushed", steps=40, user="lea", seed=11)
            await client.submit(rushed, events=False)
            await _until_state(client, rushed.id, JobState.running)
            asked = time.monotonic()
            urgent = await client.take_lease("cpu:0", BIG, 60, holder="urgent", urgent=True, wait_s=30)
            stopped_in = time.monotonic() - asked
            handed_back = await client.job(rushed.id)
            await client.end_lease(urgent.id)
            rushed_done = await client.wait(rushed.id, timeout=30)
            again = JobSpec(model="cm-small", prompt="rushed", steps=4, user="lea", seed=11)
            reference = await client.generate(again, timeout=30)
            await eventually_async(lambda: _no_leases(client), timeout=10)
            return waited, calm_done, stopped_in, handed_back, rushed_done, reference

    waited, calm_done, stopped_in, handed_back, rushed_done, reference = run(go(), 120)
    # Not urgent: granted once the 2 s batch ended, which ended done, its one attempt.
    assert calm_done.job.state is JobState.done and calm_done.job.attempts == 1
    assert 0.3 < waited < 5.0
    # Urgent: the batch stopped at its next step and went back to the queue, no attempt counted.
    assert stopped_in < 1.5
    assert handed_back.state is JobState.queued and handed_back.attempts == 0 and "VRAM lease" in handed_back.reason
    assert rushed_done.job.state is JobState.done and rushed_done.job.attempts == 1
    assert _pixels(rushed_done) == _pixels(reference)  # the same image: the retry is seeded


def _pixels(result) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(bytes(result.outputs[0].data))) as image:
        return image.convert("RGB").tobytes()


def test_a_model_too_big_for_the_leased_budget_waits_and_runs_after_the_release(leased):
    async def go():
        async with leased.client() as client:
            lease = await client.take_lease("cpu:0", SMALL, 60, holder="squeeze", wait_s=20)
            big = JobSpec(model="cm-big", prompt="big", user="lea")
            await client.submit(big, events=False)
            small = JobSpec(model="cm-small", prompt="small", user="lea")
            small_done = await client.generate(small, timeout=30)  # submitted after: runs while big waits
            waiting = await client.job(big.id)
            await client.end_lease(lease.id)
            big_done = await client.wait(big.id, timeout=30)
            await eventually_async(lambda: _no_leases(client), timeout=10)
            return small_done, waiting, big_done

    small_done, waiting, big_done = run(go(), 90)
    assert small_done.job.state is JobState.done
    assert waiting.state is JobState.queued and waiting.attempts == 0
    assert big_done.job.state is JobState.done and big_done.job.attempts == 1


def test_a_lease_ends_at_its_expiry_and_refusals_say_why(leased):
    async def go():
        async with leased.client() as client:
            events = client.cluster_events()
            lease = await client.take_lease("cpu:0", SMALL, 1.0, holder="brief", wait_s=20)
            async for event in events:
                if event.event is ClusterEventKind.lease_ended and event.detail["id"] == lease.id:
                    break
            await eventually_async(lambda: _no_leases(client), timeout=10)
            refusals = []
            for device, nbytes in (("cuda:9", SMALL), ("cpu:0", BUDGET + 1)):
                with pytest.raises(RemoteError) as refused:
                    await client.take_lease(device, nbytes, 60)
                refusals.append(refused.value.error)
            return event, refusals

    event, (unknown, too_big) = run(go(), 60)
    assert event.detail["reason"] == "expired"
    assert unknown.field == "device" and "cpu:0" in unknown.message
    assert too_big.field == "bytes" and "no eviction" in too_big.message


def test_the_cli_holds_a_lease_until_ctrl_c_and_a_killed_holder_gives_it_back(leased):
    def hold(*more: str) -> tuple[subprocess.Popen, str]:
        argv = [sys.executable, "-m", "frontends.cli", "lease", "cpu:0", "1GB", "--for", "10m", "--router",
                leased.router, "--pub", leased.pub, "--config", str(leased.config), *more]
        process = subprocess.Popen(argv, cwd=ROOT, env=leased.env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        assert process.stdout is not None
        return process, process.stdout.readline()

    def leases() -> list:
        async def ask():
            async with leased.client() as client:
                return (await client.status()).leases

        return run(ask(), 30)

    process, granted = hold("--holder", "cli")
    assert granted.startswith("lease ") and "held on cpu:0" in granted and "Ctrl-C gives it back" in granted
    assert [lease.holder for lease in leases()] == ["cli"]
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert out.strip().endswith("given back (interrupted)") and "Traceback" not in err
    eventually(lambda: not leases(), timeout=10)

    killed, granted = hold("--holder", "killed")
    assert "held on cpu:0" in granted
    killed.kill()  # SIGKILL: no release is sent; the broker sees it go silent
    killed.communicate(timeout=30)
    eventually(lambda: not leases(), timeout=15)

    refused = leased.cli("lease", "cuda:9", "1GB")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "no runner has device" in refused.stderr
    bad = leased.cli("lease", "cpu:0", "lots")
    assert bad.returncode == 2 and "not a size" in bad.stderr and "Traceback" not in bad.stderr
    status = leased.cli("status", "--all")
    assert status.returncode == 0 and "budget" in status.stdout


def test_the_readmes_second_python_program_holds_vram_with_a_plain_with(leased):
    readme = (ROOT / "README.md").read_text()
    example = readme.split("## Sharing a GPU", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    asked = 'hold_vram("cuda:0", "8GiB", for_s=600, holder="my-bot")'
    assert asked in example
    # The README's program as it is, on this atelier's CPU device and ports; its "LLM" waits for a line.
    program = "def run_my_llm():\n    input()\n\n" + example.replace(
        asked, f'hold_vram("cpu:0", "1GB", for_s=600, holder="my-bot", router={leased.router!r}, '
               f'pub={leased.pub!r})') + 'print("given back", flush=True)\n'
    process = subprocess.Popen([sys.executable, "-u", "-c", program], cwd=ROOT, env=leased.env(),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdin is not None
    line = process.stdout.readline()
    assert line.startswith("atelier freed ") and " bytes until " in line, line

    async def holders():
        async with leased.client() as client:
            return [(lease.holder, lease.bytes, lease.state) for lease in (await client.status()).leases]

    assert run(holders(), 30) == [("my-bot", 10**9, "granted")]
    out, err = process.communicate("\n", timeout=30)
    assert out.strip() == "given back" and process.returncode == 0, err
    assert run(holders(), 30) == []


def test_http_leases_are_for_admins(leased, tmp_path):
    http = HttpFrontend(leased, tmp_path)
    try:
        def call(method: str, path: str, user: str, body: dict | None = None) -> tuple[int, dict]:
            data = json.dumps(body).encode() if body is not None else None
            request = urllib.request.Request(http.url + path, data=data, method=method,
                                             headers={**http.auth(user), "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    return answer.status, json.loads(answer.read())
            except urllib.error.HTTPError as refused:
                return refused.code, json.loads(refused.read())

        assert call("GET", "/v1/leases", "ana")[0] == 403
        status, problem = call("POST", "/v1/leases", "ana", {"device": "cpu:0", "bytes": "1GB"})
        assert status == 403 and problem["error"]["code"] == "forbidden"
        status, bad = call("POST", "/v1/leases", "admin", {"device": "cpu:0", "bytes": "lots"})
        assert status == 422 and bad["error"]["field"] == "bytes"
        status, lease = call("POST", "/v1/leases", "admin", {"device": "cpu:0", "bytes": "1GB", "for_s": 120,
                                                            "holder": "maw"})
        assert status == 201 and lease["state"] == "granted" and lease["bytes"] == 10**9
        assert set(lease) >= {"id", "holder", "node", "device", "runners", "bytes", "freed_bytes", "urgent", "state",
                              "granted_at", "expires_at", "ended_reason"}
        status, listed = call("GET", "/v1/leases", "admin")
        assert status == 200 and [item["id"] for item in listed["leases"]][:1] == [lease["id"]]
        assert call("DELETE", f"/v1/leases/{lease['id']}", "ana")[0] == 403
        status, ended = call("DELETE", f"/v1/leases/{lease['id']}", "admin")
        assert status == 200 and ended["state"] == "ended"
        assert call("DELETE", "/v1/leases/nosuchlease", "admin")[0] == 404
    finally:
        http.stop()
