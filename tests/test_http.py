"""The HTTP API through real HTTP on loopback, against a running atelier with tokens configured."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys

import aiohttp
import pytest
from PIL import Image

from tests.conftest import ROOT, Cluster, eventually_async, run

pytestmark = pytest.mark.timeout(180)

ANA = "ana-token-0123456789abcdef"
BEN = "ben-token-0123456789abcdef"
SLOW = "slow-token-0123456789abcdef"  # two jobs a minute


@pytest.fixture(scope="module")
def web(atelier_home, tmp_path_factory):
    folder = tmp_path_factory.mktemp("http")
    config = folder / "atelier.toml"
    config.write_text(f"""
[scheduler]
max_queued_per_user = 3

[[http.tokens]]
token = "{ANA}"
user = "ana"

[[http.tokens]]
token = "{BEN}"
user = "ben"

[[http.tokens]]
token = "{SLOW}"
user = "slow"
rate_per_minute = 2
live = true
""")
    cluster = Cluster(atelier_home, config).start()
    yield cluster
    cluster.stop()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tiny(**kw) -> dict:
    return {"model": "tiny-sd", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, **kw}


async def until_done(http: aiohttp.ClientSession, url: str, job_id: str, token: str = ANA) -> dict:
    async def ended() -> dict | None:
        async with http.get(f"{url}/v1/jobs/{job_id}", headers=auth(token)) as response:
            view = await response.json()
        return view if view["state"] in ("done", "failed", "cancelled") else None

    return await eventually_async(ended, timeout=90)


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


# --------------------------------------------------------------------------- #
# native API


def test_a_job_round_trip_and_its_artifact(web):
    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{web.http}/v1/jobs", json=tiny(count=2), headers=auth(ANA)) as response:
                assert response.status == 202
                queued = await response.json()
            assert queued["spec"]["user"] == "ana"  # the token's user, not the request's
            done = await until_done(http, web.http, queued["spec"]["id"])
            images = []
            for url in done["urls"]:
                async with http.get(url, headers=auth(ANA)) as response:
                    assert response.status == 200
                    images.append(png(await response.read()))
            async with http.get(f"{web.http}/v1/jobs", headers=auth(ANA)) as response:
                mine = (await response.json())["jobs"]
            async with http.get(f"{web.http}/v1/jobs", headers=auth(BEN)) as response:
                theirs = (await response.json())["jobs"]
            return queued, done, images, mine, theirs

    queued, done, images, mine, theirs = run(go())
    assert done["state"] == "done" and len(done["urls"]) == 2
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    assert queued["spec"]["id"] in [job["spec"]["id"] for job in mine]
    assert queued["spec"]["id"] not in [job["spec"]["id"] for job in theirs]  # only the caller's


def test_an_idempotency_key_makes_one_job_of_retried_posts(web):
    async def go():
        async with aiohttp.ClientSession() as http:
            views = []
            for _ in range(2):  # the same POST twice, as a client that timed out would send it again
                headers = {**auth(ANA), "Idempotency-Key": "order-2026-11-23"}
                async with http.post(f"{web.http}/v1/jobs", json=tiny(), headers=headers) as response:
                    assert response.status == 202
                    views.append(await response.json())
            async with http.post(f"{web.http}/v1/jobs", json=tiny(),
                                 headers={**auth(BEN), "Idempotency-Key": "order-2026-11-23"}) as response:
                other_user = await response.json()
            async with http.post(f"{web.http}/v1/jobs", json=tiny(),
                                 headers={**auth(ANA), "Idempotency-Key": "no spaces please"}) as response:
                bad = response.status, await response.json()
            return views, other_user, bad

    (first, again), other_user, bad = run(go())
    assert again["spec"]["id"] == first["spec"]["id"]
    assert other_user["spec"]["id"] != first["spec"]["id"]  # a key is the user's own
    assert bad[0] == 422 and bad[1]["error"]["field"] == "Idempotency-Key"


def test_the_event_stream_delivers_progress_in_order_previews_and_the_result(web):
    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{web.http}/v1/jobs", json=tiny(steps=6), headers=auth(ANA)) as response:
                job_id = (await response.json())["spec"]["id"]
            events = []
            async with http.get(f"{web.http}/v1/jobs/{job_id}/events", headers=auth(ANA)) as response:
                assert response.headers["Content-Type"].startswith("text/event-stream")
                name = None
                async for raw in response.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        events.append((name, json.loads(line[6:])))
            return events

    events = run(go())
    names = [name for name, _ in events]
    assert names[0] == "state" and names[-1] == "result"
    steps = [data["step"] for name, data in events if name == "progress"]
    assert steps and steps == sorted(steps) and steps[-1] == 6
    previews = [data for name, data in events if name == "preview"]
    assert previews and previews[0]["image"].startswith("data:image/jpeg;base64,")
    assert base64.b64decode(previews[0]["image"].split(",", 1)[1])[:2] == b"\xff\xd8"
    result = events[-1][1]
    assert result["state"] == "done" and result["urls"]


def test_cancel_a_running_job(web):
    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{web.http}/v1/jobs", json=tiny(steps=300), headers=auth(ANA)) as response:
                job_id = (await response.json())["spec"]["id"]
            async with http.delete(f"{web.http}/v1/jobs/{job_id}", headers=auth(BEN)) as response:
                someone_else = response.status
            async with http.delete(f"{web.http}/v1/jobs/{job_id}", headers=auth(ANA)) as response:
                assert response.status == 200
            return someone_else, await until_done(http, web.http, job_id)

    someone_else, ended = run(go())
    assert someone_else == 403
    assert ended["state"] == "cancelled"


@pytest.mark.parametrize("body, field", [
    (tiny(steps=0), "steps"),
    (tiny(width=65), "width"),
    (tiny(model="no-such-model"), "model"),
    (tiny(prompt="   "), "prompt"),
    (tiny(surprise=1), "surprise"),
])
def test_bad_input_is_422_naming_the_field(web, body, field):
    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{web.http}/v1/jobs", json=body, headers=auth(ANA)) as response:
                return response.status, await response.json()

    status, error = run(go())
    assert status == 422, error
    assert error["error"]["field"] == field and field in error["error"]["message"]


def test_auth_failures_are_401_and_403(web):
    async def go():
        async with aiohttp.ClientSession() as http:
            out = {}
            async with http.get(f"{web.http}/v1/models") as response:
                out["none"] = (response.status, response.headers.get("WWW-Authenticate"), await response.json())
            async with http.get(f"{web.http}/v1/models", headers=auth("not-a-token-of-ours-xxxx")) as response:
                out["wrong"] = response.status
            async with http.post(f"{web.http}/v1/jobs", json=tiny(user="ben"), headers=auth(ANA)) as response:
                out["as someone else"] = response.status
            async with http.post(f"{web.http}/v1/jobs", data=b"{not json",
                                 headers={**auth(ANA), "Content-Type": "application/json"}) as response:
                out["not json"] = response.status
            return out

    out = run(go())
    assert out["none"][0] == 401 and out["none"][1].startswith("Bearer") and out["none"][2]["error"]["code"]
    assert out["wrong"] == 401
    assert out["as someone else"] == 403
    assert out["not json"] == 400


def test_rate_limit_and_full_queue_are_429_with_retry_after(web):
    async def go():
        async with aiohttp.ClientSession() as http:
            statuses = []
            # A new live session's first prompt is an ordinary job (so fresh sessions buy nothing)...
            async with http.post(f"{web.http}/v1/jobs", json=tiny(prompt="a", session="tab", priority="live"),
                                 headers=auth(SLOW)) as response:
                statuses.append((response.status, None))
            for _ in range(2):
                async with http.post(f"{web.http}/v1/jobs", json=tiny(), headers=auth(SLOW)) as response:
                    statuses.append((response.status, response.headers.get("Retry-After")))
            # ...then its prompts, which replace each other, have a limit of their own, not the user's jobs'.
            for prompt in ("a b", "a b c"):
                async with http.post(f"{web.http}/v1/jobs", json=tiny(prompt=prompt, session="tab", priority="live"),
                                     headers=auth(SLOW)) as response:
                    statuses.append((response.status, None))
            # ben may queue 3 jobs: long ones hold the runners, three wait, the next is refused. All long:
            # a short one could finish on a free runner between two submits and leave room in the queue.
            ids, refusal = [], None
            for i in range(8):
                async with http.post(f"{web.http}/v1/jobs", json=tiny(steps=300, seed=i),
                                     headers=auth(BEN)) as response:
                    if response.status == 429:
                        refusal = (response.headers.get("Retry-After"), await response.json())
                        break
                    ids.append((await response.json())["spec"]["id"])
            for job_id in ids:
                async with http.delete(f"{web.http}/v1/jobs/{job_id}", headers=auth(BEN)):
                    pass
            return statuses, refusal

    statuses, refusal = run(go())
    assert [s for s, _ in statuses] == [202, 202, 429, 202, 202]
    assert int(statuses[2][1]) >= 1
    assert refusal is not None and int(refusal[0]) >= 1
    assert refusal[1]["error"]["code"] == "queue_full" and "ben has 3 jobs queued" in refusal[1]["error"]["message"]


def test_models_and_nodes(web):
    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{web.http}/v1/models", headers=auth(ANA)) as response:
                models = await response.json()
            async with http.get(f"{web.http}/v1/nodes", headers=auth(ANA)) as response:
                nodes = await response.json()
            return models, nodes

    models, nodes = run(go())
    assert models["object"] == "list" and {"tiny-sd", "tiny-sdxl"} <= {m["id"] for m in models["data"]}
    assert all(m["object"] == "model" for m in models["data"])
    # What a client needs to build a form for each model: what it makes, and its limits.
    by_id = {m["id"]: m for m in models["data"]}
    assert by_id["tiny-sd"]["media"] == "image" and by_id["tiny-sd"]["inpaint"] is True
    assert by_id["tiny-svd"]["kinds"] == ["img2vid"] and by_id["tiny-svd"]["media"] == "video"
    assert (by_id["tiny-svd"]["default_frames"], by_id["tiny-svd"]["max_frames"]) == (4, 8)
    assert by_id["tiny-audioldm2"]["media"] == "audio" and by_id["tiny-audioldm2"]["max_duration_s"] == 4.0
    assert nodes["runners"] and nodes["runners"][0]["capabilities"]["device"] == "cpu"


def _b64_png(width: int, height: int, colour=(200, 40, 40)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def test_img2img_and_inpainting_from_an_input_image_and_webp_output(web):
    async def go():
        async with aiohttp.ClientSession() as http:
            views = {}
            for name, extra in (("img2img", {"image": _b64_png(96, 64), "strength": 0.6}),
                                ("inpaint", {"image": "data:image/png;base64," + _b64_png(96, 64),
                                             "mask": _b64_png(96, 64, (255, 255, 255))}),
                                ("webp", {"output_format": "webp"})):
                body = {"model": "tiny-sd", "prompt": "a lighthouse", "steps": 4,
                        "kind": "txt2img" if name == "webp" else "img2img", **extra}
                if name == "webp":
                    body.update(width=64, height=64)
                async with http.post(f"{web.http}/v1/jobs", json=body, headers=auth(ANA)) as response:
                    assert response.status == 202, await response.text()
                    job_id = (await response.json())["spec"]["id"]
                view = await until_done(http, web.http, job_id)
                async with http.get(view["urls"][0], headers=auth(ANA)) as response:
                    views[name] = (view, response.headers["Content-Type"], await response.read())
            async with http.post(f"{web.http}/v1/jobs", json={"model": "tiny-sd", "prompt": "x", "kind": "img2img",
                                                            "image": "not base64!"}, headers=auth(ANA)) as response:
                garbage = (response.status, await response.json())
            async with http.post(f"{web.http}/v1/jobs", json={"model": "tiny-sd", "prompt": "x", "kind": "img2img"},
                                 headers=auth(ANA)) as response:
                missing = (response.status, await response.json())
            return views, garbage, missing

    views, garbage, missing = run(go())
    for name in ("img2img", "inpaint"):
        view, content_type, data = views[name]
        assert view["state"] == "done" and view["spec"]["inputs"] == (["image"] if name == "img2img"
                                                                      else ["image", "mask"])
        assert (view["spec"]["width"], view["spec"]["height"]) == (96, 64)  # the input's size
        assert png(data).size == (96, 64)
    assert views["img2img"][0]["spec"]["strength"] == 0.6 and views["inpaint"][0]["spec"]["strength"] == 0.75
    view, content_type, data = views["webp"]
    assert content_type == "image/webp" and Image.open(io.BytesIO(data)).format == "WEBP"
    assert garbage[0] == 422 and garbage[1]["error"]["field"] == "image"
    assert missing[0] == 422 and missing[1]["error"]["field"] == "image"


# --------------------------------------------------------------------------- #
# OpenAI and AUTOMATIC1111


def test_openai_images_in_both_response_formats_and_its_errors(web):
    async def go():
        async with aiohttp.ClientSession() as http:
            url = f"{web.http}/v1/images/generations"
            async with http.post(url, json={"prompt": "a lighthouse", "model": "dall-e-3", "n": 2, "size": "64x64",
                                            "response_format": "b64_json"}, headers=auth(ANA)) as response:
                b64 = (response.status, await response.json())
            async with http.post(url, json={"prompt": "a lighthouse", "model": "tiny-sdxl", "size": "64x64"},
                                 headers=auth(ANA)) as response:
                linked = await response.json()
            async with http.get(linked["data"][0]["url"], headers=auth(ANA)) as response:
                fetched = await response.read()
            async with http.post(url, json={"prompt": "x", "model": "no-such"}, headers=auth(ANA)) as response:
                unknown = (response.status, await response.json())
            async with http.post(url, json={"prompt": "x", "size": "huge"}, headers=auth(ANA)) as response:
                bad_size = (response.status, await response.json())
            return b64, linked, fetched, unknown, bad_size

    b64, linked, fetched, unknown, bad_size = run(go())
    assert b64[0] == 200 and isinstance(b64[1]["created"], int) and len(b64[1]["data"]) == 2
    assert png(base64.b64decode(b64[1]["data"][0]["b64_json"])).size == (64, 64)
    assert png(fetched).size == (64, 64)
    assert unknown[0] == 404 and unknown[1]["error"]["code"] == "model_not_found"
    assert unknown[1]["error"]["type"] == "invalid_request_error"
    assert bad_size[0] == 400 and bad_size[1]["error"]["param"] == "size"


def test_automatic1111_txt2img_models_progress_and_refusals(web):
    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{web.http}/sdapi/v1/sd-models", headers=auth(BEN)) as response:
                models = await response.json()
            body = {"prompt": "a lighthouse", "negative_prompt": "fog", "seed": 42, "batch_size": 2, "n_iter": 1,
                    "steps": 2, "cfg_scale": 7, "width": 64, "height": 64, "sampler_name": "Euler a",
                    "override_settings": {"sd_model_checkpoint": "tiny-sd"}, "restore_faces": False}
            async with http.post(f"{web.http}/sdapi/v1/txt2img", json=body, headers=auth(BEN)) as response:
                images = (response.status, await response.json())
            # A long job in the background; /progress shows it while it runs.
            long = asyncio.create_task(http.post(f"{web.http}/sdapi/v1/txt2img", headers=auth(BEN),
                                                 json={**body, "steps": 200, "batch_size": 1}))
            async def showing_the_long_job() -> dict | None:
                async with http.get(f"{web.http}/sdapi/v1/progress", headers=auth(BEN)) as response:
                    progress = await response.json()
                return progress if progress["progress"] > 0 and progress["current_image"] else None

            progress = await eventually_async(showing_the_long_job, timeout=60)
            async with http.post(f"{web.http}/sdapi/v1/interrupt", headers=auth(BEN)) as response:
                assert response.status == 200
            interrupted = await long
            interrupted_status = interrupted.status
            interrupted.release()
            async with http.post(f"{web.http}/sdapi/v1/txt2img", json={**body, "enable_hr": True},
                                 headers=auth(BEN)) as response:
                hires = (response.status, await response.json())
            async with http.post(f"{web.http}/sdapi/v1/img2img", json=body, headers=auth(BEN)) as response:
                no_init = response.status
            async with http.post(f"{web.http}/sdapi/v1/img2img", headers=auth(BEN), json={
                    **body, "init_images": ["data:image/png;base64," + _b64_png(64, 64)], "denoising_strength": 0.5,
                    "batch_size": 1}) as response:
                edited = (response.status, await response.json())
            return models, images, progress, interrupted_status, hires, no_init, edited

    models, images, progress, interrupted_status, hires, no_init, edited = run(go())
    assert edited[0] == 200 and len(edited[1]["images"]) == 1
    assert png(base64.b64decode(edited[1]["images"][0])).size == (64, 64)
    assert {"tiny-sd", "tiny-sdxl"} <= {m["model_name"] for m in models} and all("title" in m for m in models)
    status, body = images
    assert status == 200 and len(body["images"]) == 2
    assert all(png(base64.b64decode(image)).size == (64, 64) for image in body["images"])
    info = json.loads(body["info"])
    assert info["all_seeds"] == [42, 43] and info["sd_model_name"] == "tiny-sd"
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 200
    assert base64.b64decode(progress["current_image"])[:2] == b"\xff\xd8"
    assert interrupted_status == 409  # cancelled by /interrupt: no images
    assert hires[0] == 422 and "enable_hr" in hires[1]["detail"]
    assert no_init == 422


# --------------------------------------------------------------------------- #
# the document, the metrics, the guards


def test_the_openapi_document_matches_what_the_server_accepts(web):
    from atelier.jobs import JobSpec

    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{web.http}/openapi.json") as response:
                document = await response.json()
            routed = {}
            for path, operations in document["paths"].items():
                for method in operations:
                    concrete = path.replace("{job_id}", "nope").replace("{name}", "nope-0.png")
                    async with http.request(method.upper(), f"{web.http}{concrete}", headers=auth(ANA),
                                            json={}) as response:
                        routed[(method, path)] = response.status
            return document, routed

    document, routed = run(go())
    assert document["openapi"].startswith("3.")
    assert not [key for key, status in routed.items() if status == 405 or (status == 404 and "nope" not in key[1]
                                                                           and "{" not in key[1])]
    job_schema = document["components"]["schemas"]["JobRequest"]
    assert set(job_schema["properties"]) == set(JobSpec.model_fields) | {"image", "mask", "control_image",
                                                                         "ip_adapter_image"}
    assert set(job_schema["required"]) == {"model", "prompt"}
    assert document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobRequest"}


def test_metrics_cover_queue_jobs_times_loads_and_memory(web):
    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{web.http}/v1/jobs", json=tiny(), headers=auth(ANA)) as response:
                job_id = (await response.json())["spec"]["id"]
            await until_done(http, web.http, job_id)
            async with http.get(f"{web.http}/metrics", headers=auth(ANA)) as response:
                return response.headers["Content-Type"], await response.text()

    content_type, text = run(go())
    assert content_type.startswith("text/plain")
    for name in ("atelier_queue_depth", 'atelier_jobs_finished_total{state="done"}', "atelier_job_seconds_bucket",
                 'atelier_model_loads_total{model="tiny-sd"', 'atelier_step_seconds_total{model="tiny-sd"}',
                 'atelier_staged_bytes{model="tiny-sd"', 'atelier_resident_bytes{model="tiny-sd"',
                 "atelier_http_requests_total"):
        assert name in text, name


def test_tokens_never_reach_the_log(web):
    # Every test above sent tokens; the log of the whole run (all processes) must not hold one.
    text = web.log.read_text(errors="replace")
    assert "/v1/jobs" in text  # the access log is there
    assert ANA not in text and BEN not in text and SLOW not in text


def test_a_public_bind_without_tokens_refuses_to_start(tmp_path):
    done = subprocess.run([sys.executable, "-m", "frontends.http", "--listen", "0.0.0.0:0",
                           "--router", "tcp://127.0.0.1:9", "--pub", "tcp://127.0.0.1:9"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"ATELIER_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0 and "tokens are required" in done.stderr
