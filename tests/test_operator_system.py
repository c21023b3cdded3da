"""An operator's controls through the real processes: pause, drain, reorder, reload the catalog, a restart.

One atelier for the module (broker, scheduler, one node "box" with one CPU runner, the HTTP server with an
admin's and a user's token), serving cost-model models: they sleep a stated profile's step times instead of
denoising, so a job's length is known while every process, message and decision is the real one. The
tests run in file order and leave the queue running; the catalog reload and the restart come last.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import requests

from actors.actor import RemoteError
from actors.codec import SCHEDULER
from actors.messages import (
    ClusterEventKind,
    DrainNode,
    GetControls,
    MoveToFront,
    PauseQueue,
    ReloadCatalog,
    ResumeNode,
    ResumeQueue,
    SetPriority,
)
from atelier.families.costmodel import write_model
from atelier.jobs import ErrorCode, JobSpec, JobState, Priority
from atelier.scheduling.controls import QUEUE_PAUSED, model_paused, model_removed
from tests.conftest import Cluster, eventually, eventually_async, run

pytestmark = pytest.mark.timeout(180)

STEP_S = 0.02
PROFILE = {"bytes": 1_000_000, "disk_load_s": 0.05, "staged_load_s": 0.01, "stage_s": 0.01,
           "default_resolution": 64, "step_s": {"64": [STEP_S] * 4}, "vae_decode_s": 0.0}
ADMIN, USER = "op-admin-0123456789abcdef", "op-user-0123456789abcdef"
LONG = 100  # steps: two seconds on the runner, long enough to act while it runs


def catalog(folder, models: dict[str, int]) -> str:
    """The module's config: ``models`` (name -> its default steps) over cost-model folders."""
    lines = ["builtin_models = false", 'default_model = "cm-a"', "[node]", 'name = "box"', 'devices = ["cpu"]',
             "[http]", "rate_per_minute = 10000",
             "[[http.tokens]]", f'token = "{ADMIN}"', 'user = "boss"', 'role = "admin"',
             "[[http.tokens]]", f'token = "{USER}"', 'user = "ana"']
    for name, steps in models.items():
        path = write_model(folder / name, PROFILE)
        lines += [f"[models.{name}]", 'family = "costmodel"', f'source = "{path}"', "default_width = 64",
                  "default_height = 64", f"default_steps = {steps}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def ops(atelier_home, tmp_path_factory):
    folder = tmp_path_factory.mktemp("operator")
    config = folder / "atelier.toml"
    config.write_text(catalog(folder, {"cm-a": 4, "cm-b": 4, "cm-d": 4}))
    cluster = Cluster(atelier_home, config).start()
    cluster.folder = folder
    yield cluster
    cluster.stop()


def spec(model: str = "cm-a", user: str = "ops", **kw) -> JobSpec:
    return JobSpec(model=model, prompt=kw.pop("prompt", "p"), user=user, **kw)


async def _running(client, job_id: str) -> None:
    async def running() -> bool:
        return (await client.job(job_id)).state is JobState.running

    await eventually_async(running, timeout=30)


async def _controls(client):
    return await client.ask(SCHEDULER, GetControls())


def test_a_job_submitted_while_paused_waits_saying_why_and_runs_after_resume(ops):
    async def go():
        async with ops.client() as client:
            assert (await client.ask(SCHEDULER, PauseQueue())).paused
            held = spec(prompt="held")
            await client.submit(held)
            first = await anext(aiter(client.events(held.id, timeout=10)))
            record = await client.job(held.id)  # the submit's plan ran: it did not start
            resumed_at = time.time()
            controls = await client.ask(SCHEDULER, ResumeQueue())
            result = await client.wait(held.id, timeout=30)
        return first, record, controls, result, resumed_at

    first, record, controls, result, resumed_at = run(go(), 60)
    assert first.state is JobState.queued and first.reason == QUEUE_PAUSED  # what the JobEvent says
    assert record.state is JobState.queued and record.reason == QUEUE_PAUSED and record.started_at is None
    assert not controls.paused
    assert result.job.state is JobState.done and result.job.reason is None
    assert result.job.started_at >= resumed_at


def test_a_paused_model_waits_while_another_models_jobs_run(ops):
    async def go():
        async with ops.client() as client:
            controls = await client.ask(SCHEDULER, PauseQueue(model="cm-b"))
            b, a = spec("cm-b", prompt="b"), spec("cm-a", prompt="a")
            await client.submit(b, events=False)
            await client.submit(a, events=False)
            ran = await client.wait(a.id, timeout=30)
            waiting = await client.job(b.id)
            await client.ask(SCHEDULER, ResumeQueue(model="cm-b"))
            return controls, ran, waiting, await client.wait(b.id, timeout=30)

    controls, ran, waiting, result = run(go(), 60)
    assert controls.paused_models == ["cm-b"] and not controls.paused
    assert ran.job.state is JobState.done
    assert waiting.state is JobState.queued and waiting.reason == model_paused("cm-b") and waiting.started_at is None
    assert result.job.state is JobState.done and result.job.started_at > ran.job.finished_at


def test_a_drained_node_finishes_its_batch_takes_nothing_new_and_serves_again_once_resumed(ops):
    async def go():
        async with ops.client() as client:
            events = []

            async def listen():
                async for event in client.cluster_events():
                    events.append(event)

            listening = asyncio.create_task(listen())
            long = spec(prompt="long", steps=LONG)
            await client.submit(long, events=False)
            await _running(client, long.id)
            draining = await client.ask(SCHEDULER, DrainNode(node="box"))
            waiter = spec(prompt="waits", user="dan")
            await client.submit(waiter, events=False)
            done = await client.wait(long.id, timeout=30)

            async def drained():
                return (await _controls(client)).nodes.get("box") == "drained"

            await eventually_async(drained, timeout=10)
            waiting = await client.job(waiter.id)
            with pytest.raises(RemoteError) as unknown:
                await client.ask(SCHEDULER, DrainNode(node="nowhere"))
            resumed = await client.ask(SCHEDULER, ResumeNode(node="box"))
            result = await client.wait(waiter.id, timeout=30)

            async def heard() -> bool:
                return ClusterEventKind.node_resumed in [e.event for e in events]

            await eventually_async(heard, timeout=10)
            listening.cancel()
        return draining, done, waiting, unknown.value, resumed, result, events

    draining, done, waiting, unknown, resumed, result, events = run(go(), 90)
    assert draining.nodes == {"box": "draining"}  # its runner still runs the long job
    assert done.job.state is JobState.done
    assert waiting.state is JobState.queued and waiting.started_at is None
    assert "node box, drained for maintenance by an operator" in waiting.reason
    assert unknown.error.field == "node" and "no node 'nowhere' (nodes: box)" in unknown.error.message
    assert resumed.nodes == {"box": "serving"}
    assert result.job.state is JobState.done and result.job.started_at > done.job.finished_at
    told = [(e.event, e.detail.get("node")) for e in events if e.event.value.startswith("node_")]  # not the queue's
    assert told == [(ClusterEventKind.node_draining, "box"), (ClusterEventKind.node_drained, "box"),
                    (ClusterEventKind.node_resumed, "box")]


def test_jobs_moved_to_the_front_and_reprioritised_start_in_the_operators_order(ops):
    async def go():
        async with ops.client() as client:
            await client.ask(SCHEDULER, PauseQueue())
            # Other step counts: three batches, not one pipeline call.
            a = spec(prompt="a", user="u1", steps=4)
            b = spec(prompt="b", user="u2", steps=5)
            c = spec(prompt="c", user="u3", steps=6, priority=Priority.batch)
            for s in (a, b, c):
                await client.submit(s, events=False)
            fronted = (await client.ask(SCHEDULER, MoveToFront(job_id=c.id))).job
            lowered = (await client.ask(SCHEDULER, SetPriority(job_id=a.id, priority=Priority.batch))).job
            await client.ask(SCHEDULER, ResumeQueue())
            results = [await client.wait(s.id, timeout=30) for s in (a, b, c)]
            with pytest.raises(RemoteError) as refused:
                await client.ask(SCHEDULER, SetPriority(job_id=a.id, priority=Priority.live))
        return a, b, c, fronted, lowered, results, refused.value

    a, b, c, fronted, lowered, results, refused = run(go(), 60)
    assert fronted.position == 0 and lowered.spec.priority is Priority.batch
    started = sorted(results, key=lambda r: r.job.started_at)
    assert [r.job.spec.id for r in started] == [c.id, b.id, a.id]
    assert all(r.job.state is JobState.done for r in results)
    assert refused.error.code is ErrorCode.conflict and "is done: only a queued job" in refused.error.message


def test_http_operator_routes_are_an_admins_and_an_admin_cancels_anyones_job(ops):
    admin, user = {"Authorization": f"Bearer {ADMIN}"}, {"Authorization": f"Bearer {USER}"}
    url = ops.http
    with requests.Session() as http:
        for method, path, body in [("GET", "/v1/admin/controls", None), ("POST", "/v1/admin/pause", None),
                                   ("POST", "/v1/admin/resume", {"model": "cm-a"}),
                                   ("POST", "/v1/admin/nodes/box/drain", None),
                                   ("POST", "/v1/admin/nodes/box/resume", None),
                                   ("POST", "/v1/jobs/j1/front", None),
                                   ("POST", "/v1/jobs/j1/priority", {"priority": "live"}),
                                   ("POST", "/v1/admin/catalog/reload", None)]:
            answer = http.request(method, url + path, json=body, headers=user, timeout=30)
            assert answer.status_code == 403, (path, answer.text)
            error = answer.json()["error"]
            assert error["code"] == "forbidden" and "only an admin" in error["message"]
        paused = http.post(f"{url}/v1/admin/pause", json={"model": "cm-a"}, headers=admin, timeout=30)
        assert paused.status_code == 200 and paused.json() == {"paused": False, "paused_models": ["cm-a"],
                                                               "nodes": {"box": "serving"}}
        job = http.post(f"{url}/v1/jobs", json={"model": "cm-a", "prompt": "anas"}, headers=user, timeout=30).json()
        job_id = job["spec"]["id"]
        assert job["reason"] == model_paused("cm-a")
        fronted = http.post(f"{url}/v1/jobs/{job_id}/front", headers=admin, timeout=30)
        assert fronted.status_code == 200 and fronted.json()["position"] == 0
        bad = http.post(f"{url}/v1/jobs/{job_id}/priority", json={"priority": "urgent"}, headers=admin, timeout=30)
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "priority"
        bosses = http.post(f"{url}/v1/jobs", json={"model": "cm-a", "prompt": "boss's"}, headers=admin, timeout=30)
        not_hers = http.delete(f"{url}/v1/jobs/{bosses.json()['spec']['id']}", headers=user, timeout=30)
        assert not_hers.status_code == 403  # a user cancels only their own
        assert http.delete(f"{url}/v1/jobs/{bosses.json()['spec']['id']}", headers=admin, timeout=30).ok
        cancelled = http.delete(f"{url}/v1/jobs/{job_id}", headers=admin, timeout=30)
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"  # ana's, by an admin
        late = http.post(f"{url}/v1/jobs/{job_id}/front", headers=admin, timeout=30)
        assert late.status_code == 409 and "only a queued job" in late.json()["error"]["message"]
        unknown = http.post(f"{url}/v1/admin/pause", json={"model": "nope"}, headers=admin, timeout=30)
        assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "model"
        resumed = http.post(f"{url}/v1/admin/resume", headers=admin, timeout=30)
        assert resumed.status_code == 200 and resumed.json()["paused_models"] == []


def test_the_cli_pauses_drains_and_shows_it_each_failure_one_line(ops):
    assert ops.cli("pause").stdout.strip() == "queue: paused; nodes: box serving"
    drained = ops.cli("drain", "box")  # idle: drained at once
    assert drained.returncode == 0 and drained.stdout.strip() == "queue: paused; nodes: box drained"
    assert "operator: queue: paused; nodes: box drained" in ops.cli("status").stdout
    assert ops.cli("resume", "--node", "box").stdout.strip() == "queue: paused; nodes: box serving"
    assert ops.cli("resume").stdout.strip() == "queue: running; nodes: box serving"
    for argv, said in [(("undrain", "box"), "node 'box' is not draining; nothing to resume"),
                       (("priority", "nosuchjob", "batch"), "no job 'nosuchjob'"),
                       (("pause", "--model", "nope"), "no model 'nope' in the catalog")]:
        failed = ops.cli(*argv)
        lines = failed.stderr.strip().splitlines()
        assert failed.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (argv, failed.stderr)
        assert said in lines[0], (argv, lines)


def test_a_catalog_reload_adds_changes_and_removes_models_and_refuses_an_invalid_file(ops):
    config = ops.config
    valid = config.read_text()

    async def go():
        async with ops.client() as client:
            warm = spec("cm-b", prompt="warm")  # cm-b resident on the runner, before it changes
            await client.generate(warm, timeout=30)
            long = spec("cm-d", prompt="long", steps=LONG)
            await client.submit(long, events=False)
            await _running(client, long.id)
            queued = spec("cm-d", prompt="queued", steps=5, user="dan")
            await client.submit(queued, events=False)
            config.write_text(catalog(ops.folder, {"cm-a": 4, "cm-b": 3, "cm-c": 4}))
            reloaded = ops.cli("reload")
            assert reloaded.returncode == 0, reloaded.stderr
            failed = await client.wait(queued.id, timeout=30)
            finished = await client.wait(long.id, timeout=30)
            added = await client.generate(spec("cm-c", prompt="new"), timeout=30)
            changed = await client.generate(spec("cm-b", prompt="changed"), timeout=30)
            config.write_text(valid.replace('family = "costmodel"', 'family = "nope"', 1))
            with pytest.raises(RemoteError) as refused:
                await client.ask(SCHEDULER, ReloadCatalog())
            models = [m.name for m in await client.models()]
        return reloaded, failed, finished, added, changed, refused.value, models

    try:
        reloaded, failed, finished, added, changed, refused, models = run(go(), 120)
    finally:
        config.write_text(catalog(ops.folder, {"cm-a": 4, "cm-b": 3, "cm-c": 4}))
    assert reloaded.returncode == 0, reloaded.stderr
    assert reloaded.stdout.strip() == "catalog reloaded: added cm-c; changed cm-b; removed cm-d"
    assert failed.job.state is JobState.failed and failed.job.reason == model_removed("cm-d")
    assert finished.job.state is JobState.done  # running when its model left: it finished
    assert added.job.state is JobState.done
    assert changed.job.state is JobState.done and changed.job.spec.steps == 3  # the new entry's default
    # The runner dropped its copy of the old cm-b; the loader its staged one.
    eventually(lambda: "evicted cm-b (its catalog entry changed" in ops.log.read_text(), timeout=10)
    assert refused.error.code is ErrorCode.bad_request
    assert "models.cm-a.family: Value error, unknown family 'nope'" in refused.error.message
    assert refused.error.message.endswith("nothing was changed")
    assert sorted(models) == ["cm-a", "cm-b", "cm-c"]  # the reload before it stands
    # The HTTP server heard catalog_reloaded and took the new catalog: its A1111 list is of it.
    def a1111_models() -> list[str] | None:
        listed = requests.get(f"{ops.http}/sdapi/v1/sd-models", headers={"Authorization": f"Bearer {USER}"},
                              timeout=30).json()
        names = sorted(m["model_name"] for m in listed)
        return names if "cm-c" in names else None

    assert eventually(a1111_models, timeout=10) == ["cm-a", "cm-b", "cm-c"]


def test_the_controls_survive_a_scheduler_restart(ops):
    async def go():
        async with ops.client() as client:
            await client.ask(SCHEDULER, PauseQueue())
            await client.ask(SCHEDULER, PauseQueue(model="cm-b"))
            held = spec(prompt="across a restart")
            await client.submit(held, events=False)
            os.kill(ops.pid_of(b"actors.scheduler"), signal.SIGKILL)

            async def back():
                controls = await client.ask(SCHEDULER, GetControls(), timeout=2)
                return controls if controls.paused else None

            controls = await eventually_async(back, timeout=60, ignoring=(RemoteError, asyncio.TimeoutError))
            record = await client.job(held.id)
            await client.ask(SCHEDULER, ResumeQueue())
            return controls, record, await client.wait(held.id, timeout=30)

    controls, record, result = run(go(), 120)
    assert controls.paused and controls.paused_models == ["cm-b"]
    assert record.state is JobState.queued and record.reason == QUEUE_PAUSED
    assert result.job.state is JobState.done
