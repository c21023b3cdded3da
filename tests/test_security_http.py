"""The HTTP side of issue 13's security review: each finding's attack, sent as real HTTP on loopback
to a running atelier, refused; and the legitimate use beside it still served.

Most run on an atelier of this module with tokens of both roles; the checks of the tokenless
default (Host, Origin, Content-Type) run on the shared one, which has no tokens. Where what is
checked lives only inside the server (how often it asks the scheduler, what its tables hold), the
real server class answers real HTTP with a stand-in for the scheduler, or the table is driven
directly.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from PIL import Image

from tests.conftest import ROOT, Cluster, eventually_async, run
from tests.test_web import browser  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(240)

ANA = "ana-token-sec-0123456789abcdef"  # a user
BOB = "bob-token-sec-0123456789abcdef"  # another user
ROOT_TOKEN = "root-token-sec-0123456789abcdef"  # an admin
LIA = "lia-token-sec-0123456789abcdef"  # a user who may go live
LEO = "leo-token-sec-0123456789abcdef"  # a user who may go live, with a small rate


@pytest.fixture(scope="module")
def guarded(atelier_home, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sec-http")
    config = folder / "atelier.toml"
    # A node of its own: its loader clears its node's staged segments, and the shared atelier runs beside it.
    config.write_text(f"""
[node]
name = "sec-http"

[http]
max_live_sessions = 2
max_streams_per_user = 2

[[http.tokens]]
token = "{ANA}"
user = "ana"

[[http.tokens]]
token = "{BOB}"
user = "bob"

[[http.tokens]]
token = "{ROOT_TOKEN}"
user = "root"
role = "admin"

[[http.tokens]]
token = "{LIA}"
user = "lia"
live = true

[[http.tokens]]
token = "{LEO}"
user = "leo"
live = true
rate_per_minute = 3
""")
    cluster = Cluster(atelier_home, config).start()
    yield cluster
    cluster.stop()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tiny(**kw) -> dict:
    return {"model": "tiny-sd", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, **kw}


async def submit(http: aiohttp.ClientSession, url: str, token: str, **kw) -> dict:
    async with http.post(f"{url}/v1/jobs", json=tiny(**kw), headers=auth(token)) as response:
        assert response.status == 202, await response.text()
        return await response.json()


async def until(http: aiohttp.ClientSession, url: str, job_id: str, token: str, states: set[str]) -> dict:
    async def reached() -> dict | None:
        async with http.get(f"{url}/v1/jobs/{job_id}", headers=auth(token)) as response:
            view = await response.json()
        return view if view["state"] in states else None

    return await eventually_async(reached, timeout=90)


ENDED = {"done", "failed", "cancelled"}


# --------------------------------------------------------------------------- #
# H1: every job, artifact, stream and listing is its owner's (or an admin's)


def test_h1_artifact_of_another_user_is_not_served(guarded):
    async def go():
        async with aiohttp.ClientSession() as http:
            job = await submit(http, guarded.http, ANA)
            done = await until(http, guarded.http, job["spec"]["id"], ANA, ENDED)
            out = {}
            for who, token in (("ana", ANA), ("bob", BOB), ("root", ROOT_TOKEN)):
                async with http.get(done["urls"][0], headers=auth(token)) as response:
                    out[who] = (response.status, await response.read())
            gone = done["urls"][0].rsplit("/", 1)[0] + "/nosuchjob-0.png"
            async with http.get(gone, headers=auth(BOB)) as response:
                out["gone"] = (response.status, await response.json())
            return done, out

    done, out = run(go())
    assert done["state"] == "done"
    assert out["ana"][0] == 200 and Image.open(io.BytesIO(out["ana"][1])).size == (64, 64)
    assert out["root"][0] == 200 and out["root"][1] == out["ana"][1]
    assert out["bob"][0] == 403 and json.loads(out["bob"][1])["error"]["code"] == "forbidden"
    assert out["bob"][1].find(b"\x89PNG") < 0
    assert out["gone"][0] == 404 and out["gone"][1]["error"]["code"] == "not_found"


def test_h1_a_client_chosen_job_id_is_refused(guarded):
    async def go():
        async with aiohttp.ClientSession() as http:
            anas = await submit(http, guarded.http, ANA, steps=4)
            async with http.post(f"{guarded.http}/v1/jobs", json=tiny(id=anas["spec"]["id"], prompt="x"),
                                 headers=auth(BOB)) as response:
                replayed = (response.status, await response.json())
            async with http.post(f"{guarded.http}/v1/jobs", json=tiny(id="my-own-id"), headers=auth(ANA)) as response:
                own_id = response.status
            retried = []
            for _ in range(2):  # the safe retry: the same Idempotency-Key gets the same job
                async with http.post(f"{guarded.http}/v1/jobs", json=tiny(),
                                     headers={**auth(BOB), "Idempotency-Key": "sec-retry-1"}) as response:
                    retried.append((response.status, (await response.json())["spec"]))
            still = await until(http, guarded.http, anas["spec"]["id"], ANA, ENDED)
            return anas, replayed, own_id, retried, still

    anas, replayed, own_id, retried, still = run(go())
    status, body = replayed
    assert status == 422 and body["error"]["field"] == "id" and "Idempotency-Key" in body["error"]["message"]
    assert "a lighthouse" not in json.dumps(body)  # nothing of ana's job came back
    assert own_id == 422  # an id of one's own is refused too: the server assigns them
    assert [s for s, _ in retried] == [202, 202] and retried[0][1]["id"] == retried[1][1]["id"]
    assert retried[0][1]["user"] == "bob" and retried[0][1]["id"] != anas["spec"]["id"]
    assert still["state"] == "done" and still["spec"]["user"] == "ana"  # ana's job went on as hers


def test_h1_job_views_streams_lists_and_nodes_are_the_owners_or_an_admins(guarded):
    async def go():
        async with aiohttp.ClientSession() as http:
            url = guarded.http
            job = await submit(http, url, ANA, steps=400)
            job_id = job["spec"]["id"]
            await until(http, url, job_id, ANA, {"running"})
            out = {}
            for name, method, path in (("view", "GET", f"/v1/jobs/{job_id}"),
                                       ("events", "GET", f"/v1/jobs/{job_id}/events"),
                                       ("list of ana", "GET", "/v1/jobs?user=ana"),
                                       ("queue", "GET", "/v1/jobs?all=1"),
                                       ("cancel", "DELETE", f"/v1/jobs/{job_id}")):
                async with http.request(method, url + path, headers=auth(BOB)) as response:
                    out[name] = (response.status, await response.text())
            async with http.get(f"{url}/v1/nodes", headers=auth(BOB)) as response:
                out["nodes"] = (response.status, await response.text())
            async with http.get(f"{url}/v1/jobs", headers=auth(BOB)) as response:
                out["bob's own"] = (await response.json())["jobs"]
            # An admin: the job, anyone's list, the whole queue, the runners' jobs; and may cancel it.
            async with http.get(f"{url}/v1/jobs/{job_id}", headers=auth(ROOT_TOKEN)) as response:
                out["admin view"] = (response.status, await response.json())
            async with http.get(f"{url}/v1/jobs?user=ana", headers=auth(ROOT_TOKEN)) as response:
                out["admin list"] = [j["spec"]["id"] for j in (await response.json())["jobs"]]
            async with http.get(f"{url}/v1/jobs?all=1", headers=auth(ROOT_TOKEN)) as response:
                out["admin queue"] = [j["spec"]["id"] for j in (await response.json())["jobs"]]
            await asyncio.sleep(1.2)  # past the status cache of the user's look, so this one is fresh too
            async with http.get(f"{url}/v1/nodes", headers=auth(ROOT_TOKEN)) as response:
                out["admin nodes"] = await response.text()
            async with http.delete(f"{url}/v1/jobs/{job_id}", headers=auth(ROOT_TOKEN)) as response:
                out["admin cancel"] = response.status
            out["ended"] = await until(http, url, job_id, ANA, ENDED)
            return job_id, out

    job_id, out = run(go())
    for name in ("view", "events", "list of ana", "queue", "cancel"):
        status, text = out[name]
        assert status == 403 and json.loads(text)["error"]["code"] == "forbidden", (name, text)
        assert "a lighthouse" not in text, name
    status, text = out["nodes"]
    nodes = json.loads(text)
    assert status == 200 and job_id not in text and nodes["runners"]
    assert any(r["busy"] for r in nodes["runners"])  # what a user may know: a runner is busy
    assert all("pid" not in r["capabilities"] and "job" not in r for r in nodes["runners"])
    assert isinstance(nodes["queued"], int) and nodes["jobs"]  # counts, not ids
    assert job_id not in [j["spec"]["id"] for j in out["bob's own"]]
    assert out["admin view"][0] == 200 and out["admin view"][1]["spec"]["user"] == "ana"
    assert job_id in out["admin list"] and job_id in out["admin queue"]
    assert job_id in out["admin nodes"] and '"pid"' in out["admin nodes"]
    assert out["admin cancel"] == 200 and out["ended"]["state"] == "cancelled"


def test_h1_a1111_progress_and_interrupt_are_per_user(guarded):
    async def go():
        async with aiohttp.ClientSession() as http:
            url = guarded.http
            body = {"prompt": "a secret harbour", "steps": 300, "width": 64, "height": 64,
                    "override_settings": {"sd_model_checkpoint": "tiny-sd"}}
            long = asyncio.create_task(http.post(f"{url}/sdapi/v1/txt2img", json=body, headers=auth(ANA)))

            async def running() -> dict | None:
                async with http.get(f"{url}/sdapi/v1/progress", headers=auth(ANA)) as response:
                    progress = await response.json()
                return progress if progress["progress"] > 0 and progress["current_image"] else None

            anas = await eventually_async(running, timeout=60)
            async with http.get(f"{url}/sdapi/v1/progress", headers=auth(BOB)) as response:
                bobs = await response.json()
            async with http.post(f"{url}/sdapi/v1/interrupt", headers=auth(BOB)) as response:
                bob_interrupt = response.status
            await asyncio.sleep(0.5)
            async with http.get(f"{url}/sdapi/v1/progress", headers=auth(ANA)) as response:
                after = await response.json()
            async with http.post(f"{url}/sdapi/v1/interrupt", headers=auth(ANA)) as response:
                assert response.status == 200
            answer = await long
            status = answer.status
            answer.release()
            return anas, bobs, bob_interrupt, after, status

    anas, bobs, bob_interrupt, after, status = run(go())
    assert anas["state"]["job"] and anas["current_image"]
    assert bobs["progress"] == 0 and bobs["state"]["job"] == "" and bobs["current_image"] is None
    assert bob_interrupt == 200 and after["progress"] >= anas["progress"] and after["state"]["job"]
    assert status == 409  # ana's own interrupt ended it


# --------------------------------------------------------------------------- #
# M1: live is a permission; sessions are bounded and a new one costs a job


def test_m1_live_needs_the_tokens_permission(guarded):
    async def go():
        async with aiohttp.ClientSession() as http:
            out = {}
            for who, token in (("ana", ANA), ("lia", LIA), ("root", ROOT_TOKEN)):
                async with http.post(f"{guarded.http}/v1/jobs", json=tiny(priority="live", session=f"m1-{who}"),
                                     headers=auth(token)) as response:
                    out[who] = (response.status, await response.json())
            return out

    out = run(go())
    status, body = out["ana"]
    assert status == 403 and body["error"]["field"] == "priority" and "live = true" in body["error"]["message"]
    assert out["lia"][0] == 202 and out["root"][0] == 202


def test_m1_live_sessions_are_bounded_and_a_new_one_costs_a_job(guarded):
    # leo may submit 3 jobs a minute and keep 2 live sessions open.
    async def go():
        async with aiohttp.ClientSession() as http:
            statuses = []
            for session in ("s1", "s1", "s2", "s3", "s2", "s1", "s3"):
                async with http.post(f"{guarded.http}/v1/jobs", json=tiny(priority="live", session=session,
                                                                         prompt=f"typed {len(statuses)}"),
                                     headers=auth(LEO)) as response:
                    statuses.append((session, response.status, (await response.json()).get("error")))
            return statuses

    statuses = run(go())
    assert [s for _, s, _ in statuses] == [
        202,  # s1 opens: one of leo's 3 jobs a minute
        202,  # s1 again: the live rate, not his jobs'
        202,  # s2 opens: his second job
        202,  # s3 opens, his third job, and takes the place of s1, the one used longest ago
        202,  # s2 is open: the live rate
        429,  # s1 would open again, as a job: his jobs are spent
        202,  # s3 is open: the live rate
    ], statuses
    assert statuses[5][2]["code"] == "rate_limited"


# --------------------------------------------------------------------------- #
# M6: the tokenless default is closed to other sites' pages (the shared atelier has no tokens)


def test_m6_cross_site_posts_and_foreign_hosts_are_refused_on_the_tokenless_server(shared_cluster):
    url = shared_cluster.http
    own = url  # the page's own origin: http://127.0.0.1:<port>

    async def go():
        async with aiohttp.ClientSession() as http:
            out = {}
            job = json.dumps(tiny(user="sec-m6"))
            # What any web page may send without a preflight: a "simple" text/plain or form POST.
            async with http.post(f"{url}/v1/jobs", data=job, headers={"Content-Type": "text/plain",
                                                                     "Origin": "http://evil.example"}) as response:
                out["text/plain cross-site"] = (response.status, await response.json())
            async with http.post(f"{url}/v1/jobs", data=job, headers={"Content-Type": "text/plain"}) as response:
                out["text/plain"] = (response.status, await response.json())
            async with http.post(f"{url}/sdapi/v1/txt2img", data={"prompt": "x"}) as response:
                out["form"] = (response.status, await response.json())
            async with http.post(f"{url}/v1/jobs", data=job, headers={"Content-Type": "application/json",
                                                                     "Origin": "http://evil.example"}) as response:
                out["json cross-site"] = (response.status, await response.json())
            async with http.post(f"{url}/sdapi/v1/interrupt", headers={"Origin": "null"}) as response:
                out["interrupt from a sandbox"] = (response.status, await response.json())
            # DNS rebinding: evil.example resolves to 127.0.0.1, so the browser sends its own name as Host.
            for path in ("/v1/jobs", "/", "/v1/artifacts/x-0.png"):
                async with http.get(f"{url}{path}", headers={"Host": "evil.example:8080"}) as response:
                    out[f"rebound {path}"] = (response.status, await response.text())
            async with http.get(f"{url}/v1/jobs?user=sec-m6") as response:
                out["listed"] = (await response.json())["jobs"]
            # The page and ordinary clients: same-origin, and no Origin at all.
            async with http.post(f"{url}/v1/jobs", data=job, headers={"Content-Type": "application/json",
                                                                     "Origin": own}) as response:
                out["same origin"] = (response.status, await response.json())
            job_id = out["same origin"][1]["spec"]["id"]
            async with http.delete(f"{url}/v1/jobs/{job_id}", headers={"Origin": own}) as response:
                out["cancel"] = response.status
            port = url.rsplit(":", 1)[1]
            async with http.get(f"{url}/", headers={"Host": f"localhost:{port}"}) as response:
                out["by localhost"] = response.status
            return out

    out = run(go())
    for name in ("text/plain cross-site", "json cross-site"):
        assert out[name][0] == 403 and out[name][1]["error"]["code"] == "cross_origin", (name, out[name])
    assert out["interrupt from a sandbox"][0] == 403 and out["interrupt from a sandbox"][1]["detail"]  # A1111's shape
    assert out["text/plain"][0] == 415 and "application/json" in out["text/plain"][1]["error"]["message"]
    assert out["form"][0] == 415 and "application/json" in out["form"][1]["detail"]
    for path in ("/v1/jobs", "/", "/v1/artifacts/x-0.png"):
        status, text = out[f"rebound {path}"]
        assert status == 421 and "evil.example" in json.loads(text)["error"]["message"], (path, text)
    assert out["listed"] == []  # none of the refused posts made a job
    assert out["same origin"][0] == 202 and out["same origin"][1]["spec"]["user"] == "sec-m6"
    assert out["cancel"] == 200 and out["by localhost"] == 200


# --------------------------------------------------------------------------- #
# M8: /metrics needs a token, and a flood of it asks the scheduler about once a second


def test_m8_metrics_need_a_token_when_tokens_are_set(guarded):
    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{guarded.http}/metrics") as response:
                none = (response.status, await response.json())
            async with http.get(f"{guarded.http}/metrics", headers=auth(BOB)) as response:
                user = (response.status, await response.text())
            return none, user

    none, user = run(go())
    assert none[0] == 401 and none[1]["error"]["code"] == "unauthorized"
    assert user[0] == 200 and "atelier_queue_depth" in user[1]


class _CountingScheduler:
    """The client the HTTP server asks, as far as /metrics and /v1/nodes use it: counts the questions."""

    def __init__(self):
        self.asked = 0

    async def status(self):
        from actors.messages import ClusterStatus

        self.asked += 1
        await asyncio.sleep(0.05)  # a scheduler busy with a queue
        return ClusterStatus(runners=[], queued=["j1", "j2"], counts={"queued": 2})


def test_m8_a_flood_of_metrics_asks_the_scheduler_about_once_a_second():
    from atelier.config import Config
    from frontends.http import STATUS_TTL_S, HttpServer

    async def go():
        stand_in = _CountingScheduler()
        server = HttpServer(Config(), stand_in, base_url="")
        test_server = TestServer(server.app, host="127.0.0.1")
        await test_server.start_server()
        try:
            async with aiohttp.ClientSession() as http:
                async def scrape(path: str) -> tuple[int, str]:
                    async with http.get(test_server.make_url(path)) as response:
                        return response.status, await response.text()

                started = time.monotonic()
                answers = await asyncio.gather(*(scrape("/metrics" if i % 2 else "/v1/nodes") for i in range(200)))
                flood_s = time.monotonic() - started
                await asyncio.sleep(STATUS_TTL_S + 0.1)
                later = await scrape("/metrics")
            return stand_in.asked, flood_s, answers, later
        finally:
            await test_server.close()

    asked, flood_s, answers, later = run(go())
    assert all(status == 200 for status, _ in answers)
    assert asked <= 2 + flood_s / STATUS_TTL_S, asked  # not 200
    assert later[0] == 200 and "atelier_queue_depth 2.0" in later[1]  # the queue as a count
    assert '"queued":2' in [text for _, text in answers if text.startswith("{")][0].replace(" ", "")


# --------------------------------------------------------------------------- #
# M9: body caps per route, stream caps per user, bounded listener queues, the plain-HTTP warning


def test_m9_a_json_only_route_takes_1_mib_and_image_routes_more(guarded):
    big = "x" * (2 << 20)

    async def go():
        async with aiohttp.ClientSession() as http:
            out = {}
            async with http.post(f"{guarded.http}/v1/images/generations", json={"prompt": big},
                                 headers=auth(ANA)) as response:
                out["openai"] = (response.status, await response.json())

            async def chunks():  # no Content-Length: the cap must hold while reading, too
                for _ in range(4):
                    yield b"[" + b"0," * (256 << 10) + b"0]"

            async with http.post(f"{guarded.http}/sdapi/v1/txt2img", data=chunks(),
                                 headers={**auth(ANA), "Content-Type": "application/json"}) as response:
                out["a1111 chunked"] = (response.status, await response.json())
            # 2 MiB of image on the route that takes images: past the cap, it reaches the image check.
            image = base64.b64encode(os.urandom(3 << 19)).decode()
            async with http.post(f"{guarded.http}/v1/jobs", json=tiny(kind="img2img", image=image, width=None,
                                                                     height=None), headers=auth(ANA)) as response:
                out["image"] = (response.status, await response.json())
            return out

    out = run(go())
    assert out["openai"][0] == 413 and "1 MiB" in out["openai"][1]["error"]["message"]
    assert out["a1111 chunked"][0] == 413 and out["a1111 chunked"][1]["detail"]
    assert out["image"][0] in (400, 422), out["image"]  # refused as no image, not as too large


def test_m9_event_streams_are_capped_per_user(guarded):
    async def go():
        async with aiohttp.ClientSession() as http:
            url = guarded.http
            job = await submit(http, url, ANA, steps=400)
            job_id = job["spec"]["id"]
            events = f"{url}/v1/jobs/{job_id}/events"
            first = await http.get(events, headers=auth(ANA))
            second = await http.get(events, headers=auth(ANA))
            await first.content.readline()
            async with http.get(events, headers=auth(ANA)) as response:
                third = (response.status, response.headers.get("Retry-After"), await response.json())
            async with http.get(events, headers=auth(ROOT_TOKEN)) as response:  # an admin is not bound per user
                admin = (response.status, await response.content.readline())
            first.close()  # a stream closed makes room

            async def opened() -> int | None:
                async with http.get(events, headers=auth(ANA)) as response:
                    return response.status if response.status == 200 else None

            again = await eventually_async(opened, timeout=10)
            second.close()
            async with http.delete(f"{url}/v1/jobs/{job_id}", headers=auth(ANA)):
                pass
            return [first.status, second.status], third, admin, again

    opened, third, admin, again = run(go())
    assert opened == [200, 200]
    assert third[0] == 429 and int(third[1]) >= 1 and third[2]["error"]["code"] == "too_many_streams"
    assert admin[0] == 200 and admin[1].startswith(b"event: state")
    assert again == 200


def test_m9_a_stalled_listener_keeps_only_the_newest_events():
    from actors.messages import JobEvent, Preview, Progress
    from atelier.jobs import JobState
    from frontends.http import _Listener

    listener = _Listener()
    listener.put(JobEvent(job_id="j", state=JobState.running))
    for step in range(1, 10_001):  # a reader that stopped reading, and a long job's every frame
        listener.put(Progress(job_id="j", step=step, total=10_000, elapsed_s=step, eta_s=None))
        listener.put(Preview(job_id="j", step=step, width=8, height=8, image=b"\xff\xd8" + bytes(100)))
    listener.put(JobEvent(job_id="j", state=JobState.done))
    listener.put(None)

    async def drain() -> list:
        return [await listener.get() for _ in range(4)]

    left = run(drain())
    assert [type(e).__name__ for e in left] == ["Progress", "Preview", "JobEvent", "NoneType"]
    assert left[0].step == 10_000 and left[1].step == 10_000 and left[2].state is JobState.done


def test_m9_tokens_over_plain_http_beyond_loopback_warn_at_start(tmp_path):
    config = tmp_path / "atelier.toml"
    # Behind a proxy that serves plain http:// to the world (loopback here, as a test should bind).
    config.write_text(f'[http]\npublic_url = "http://atelier.example.org"\n'
                      f'[[http.tokens]]\ntoken = "{ANA}"\nuser = "ana"\n')
    process = subprocess.Popen([sys.executable, "-m", "frontends.http", "--listen", "127.0.0.1:0", "--config",
                                str(config), "--router", "tcp://127.0.0.1:9", "--pub", "tcp://127.0.0.1:9"],
                               cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "ATELIER_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)})
    try:
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            seen.append(line)
            if "TLS" in line:
                break
    finally:
        process.kill()  # only its start is under test
        process.wait(20)
    assert any("plain HTTP" in line and "TLS proxy" in line for line in seen), seen


# --------------------------------------------------------------------------- #
# L6, L7, L8


def test_l6_sd_models_show_no_source_paths(guarded, atelier_home):
    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{guarded.http}/sdapi/v1/sd-models", headers=auth(ANA)) as response:
                return response.status, await response.text()

    status, text = run(go())
    models = json.loads(text)
    assert status == 200 and {"tiny-sd"} <= {m["model_name"] for m in models}
    assert str(atelier_home) not in text and all("/" not in m["filename"] for m in models)


def test_l7_crafted_requests_get_the_apis_error_shapes_not_500(guarded):
    host, port = guarded.http.removeprefix("http://").rsplit(":", 1)

    async def raw(head: bytes) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(head + b"Connection: close\r\n\r\n")
        await writer.drain()
        answer = await reader.read()
        writer.close()
        status = int(answer.split(b" ", 2)[1])
        return status, answer.partition(b"\r\n\r\n")[2]

    async def go():
        out = {}
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{guarded.http}/v1/artifacts/j1-{'9' * 5000}.png", headers=auth(ANA)) as response:
                out["huge index"] = (response.status, await response.json())
            deep = "[" * 100_000 + "]" * 100_000
            for path in ("/v1/jobs", "/sdapi/v1/txt2img"):
                async with http.post(f"{guarded.http}{path}", data=deep,
                                     headers={**auth(ANA), "Content-Type": "application/json"}) as response:
                    out[f"deep {path}"] = (response.status, await response.json())
            nested = {"prompt": "x", "override_settings": {"a": json.loads("[" * 500 + "]" * 500)}}
            async with http.post(f"{guarded.http}/sdapi/v1/txt2img", json=nested, headers=auth(ANA)) as response:
                out["nested settings"] = (response.status, await response.json())
        request = f"GET /v1/models HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
        out["not utf-8"] = await raw(request + b"Authorization: Bearer \xff\xfe\xfd-0123456789abcdef\r\n")
        out["not ascii"] = await raw(request + "Authorization: Bearer ünïcødé-0123456789abcdef\r\n".encode())
        return out

    out = run(go())
    assert out["huge index"][0] == 404 and out["huge index"][1]["error"]["code"] == "not_found"
    assert out["deep /v1/jobs"][0] == 400 and "nests" in out["deep /v1/jobs"][1]["error"]["message"]
    assert out["deep /sdapi/v1/txt2img"][0] == 400 and "nests" in out["deep /sdapi/v1/txt2img"][1]["detail"]
    assert out["nested settings"][0] == 400 and "nests" in out["nested settings"][1]["detail"]
    for name in ("not utf-8", "not ascii"):
        status, body = out[name]
        assert status in (400, 401), (name, status, body)
        if status == 401:
            assert json.loads(body)["error"]["code"] == "unauthorized"


def test_l8_rate_buckets_and_live_sessions_stay_bounded():
    from frontends.http import LiveSessions, RateLimiter

    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    for i in range(RateLimiter.MAX_BUCKETS + 5_000):  # tokenless: any request may name a new user
        assert limiter.take(f"name-{i}", 30) == 0.0
    assert len(limiter) <= RateLimiter.MAX_BUCKETS
    limiter.take("ana", 2)
    limiter.take("ana", 2)
    assert limiter.take("ana", 2) > 0  # a bucket in use is kept: the limit still holds
    now[0] += 2 * RateLimiter.SWEEP_S  # everyone idle long enough to be full again
    limiter.take("ben", 30)
    assert len(limiter) == 1  # full buckets are what new ones would be: forgotten

    sessions = LiveSessions(limit=2)
    for i in range(LiveSessions.MAX_USERS + 100):
        for j in range(5):
            sessions.use(f"user-{i}", f"tab-{j}")
    assert len(sessions._open) <= LiveSessions.MAX_USERS
    assert all(len(open_) <= 2 for open_ in sessions._open.values())


# --------------------------------------------------------------------------- #
# Last in the module: from its first use to the module's end, the browser holds this thread's event loop.


def test_h1_the_web_page_shows_a_user_nothing_of_anothers(guarded, browser):  # noqa: F811
    from tests.test_web import JOB_MS, WAIT_MS, expect

    async def jobs():
        async with aiohttp.ClientSession() as http:
            for token, prompt in ((ANA, "ana's private garden"), (BOB, "bob's own boat")):
                job = await submit(http, guarded.http, token, prompt=prompt)
                await until(http, guarded.http, job["spec"]["id"], token, ENDED)

    with ThreadPoolExecutor(1) as thread:  # Playwright's sync API holds this thread's event loop
        thread.submit(run, jobs()).result()
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    context.add_init_script(f"localStorage.setItem('atelier.token', '{BOB}')")  # bob's page, his token kept
    try:
        page = context.new_page()
        page.goto(guarded.http + "/")
        expect(page.locator("#jobs li").filter(has_text="bob's own boat").first).to_contain_text("Done",
                                                                                               timeout=JOB_MS)
        expect(page.locator("#gallery .tile").first).to_have_attribute("data-prompt", "bob's own boat")
        text = page.content()
    finally:
        context.close()
    assert "private garden" not in text
