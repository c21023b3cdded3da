"""ComfyUI's API on atelier, called as ComfyUI's own script_examples/websockets_api_example.py does:
websocket-client for /ws, urllib for the rest, an API-format workflow of the standard nodes."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
import websocket
from PIL import Image

from frontends.comfy_workflow import Catalog, WorkflowError, translate


def workflow(**changes) -> dict:
    """Open WebUI's text-to-image workflow, small."""
    w = {
        "3": {"class_type": "KSampler", "inputs": {
            "cfg": 7.0, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0], "negative": ["7", 0],
            "positive": ["6", 0], "sampler_name": "euler", "scheduler": "normal", "seed": 5, "steps": 2}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": 64, "width": 64}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a red fox"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": ""}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }
    for key, value in changes.items():
        node, _, name = key.partition("__")
        if name:
            w[node]["inputs"][name] = value
        elif value is None:
            del w[node]
        else:
            w[node] = value
    return w


CATALOG = Catalog(models={"tiny-sd": [], "lora-sd": ["ink", "moss"]}, default_model="tiny-sd",
                  uploads={"cat.png": (72, 64, False), "holes.png": (64, 64, True)})


# -- the translation, alone (no jobs) ------------------------------------------ #


def test_a_workflow_is_one_job_with_its_choices():
    w = workflow(**{"4__ckpt_name": "lora-sd", "3__sampler_name": "dpmpp_2m", "3__scheduler": "karras",
                    "5__width": 70,  # ComfyUI's latent is an eighth of it: the image is 64 wide, in both
                    "3__seed": 2**64 - 1, "5__batch_size": 3, "3__model": ["10", 0], "6__clip": ["10", 1],
                    "10": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1],
                                                                  "lora_name": "ink.safetensors",
                                                                  "strength_model": 0.5, "strength_clip": 1}}})
    plan = translate(w, CATALOG)
    assert plan.fields == {"model": "lora-sd", "loras": {"ink": 0.5}, "prompt": "a red fox", "negative_prompt": None,
                           "seed": (2**64 - 1) % 2**63, "steps": 2, "guidance": 7.0, "sampler": "dpm++2m",
                           "schedule": "karras", "width": 64, "height": 64, "kind": "txt2img", "count": 3}
    assert (plan.sampler, plan.decoder, plan.outputs) == ("3", "8", {"9": "output"})


def test_img2img_and_inpainting_read_the_upload():
    encode = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}}
    load = {"class_type": "LoadImage", "inputs": {"image": "cat.png [input]"}}
    plan = translate(workflow(**{"5": encode, "11": load, "3__denoise": 0.4}), CATALOG)
    assert (plan.fields["kind"], plan.fields["strength"], plan.image, plan.mask) == ("img2img", 0.4, "cat.png", None)
    assert (plan.fields["width"], plan.fields["height"]) == (72, 64)  # as VAEEncode crops to multiples of 8
    inpaint = {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["11", 0], "vae": ["4", 2],
                                                               "mask": ["11", 1], "grow_mask_by": 2}}
    plan = translate(workflow(**{"5": inpaint, "11": {**load, "inputs": {"image": "holes.png"}}}), CATALOG)
    assert (plan.image, plan.mask) == ("holes.png", ("holes.png", 2))
    with pytest.raises(WorkflowError) as refused:  # no alpha: ComfyUI's mask would be empty
        translate(workflow(**{"5": inpaint, "11": load}), CATALOG)
    assert refused.value.node_errors["11"]["errors"][0]["extra_info"]["input_name"] == "image"


@pytest.mark.parametrize("changes, node, input_name", [
    ({"3__sampler_name": "dpm_fast"}, "3", "sampler_name"),
    ({"3__scheduler": "ddim_uniform"}, "3", "scheduler"),
    ({"4__ckpt_name": "sdxl_base.safetensors"}, "4", "ckpt_name"),
    ({"5__width": 4}, "5", "width"),  # under 8 pixels
    ({"5__batch_size": 64}, "5", "batch_size"),
    ({"3__denoise": 0.5}, "3", "denoise"),
    ({"3__steps": "many"}, "3", "steps"),
    ({"3__positive": ["99", 0]}, "3", "positive"),
    # A second pass (hires fix, a refiner): one sampler's latent into another's.
    ({"12": {"class_type": "KSampler", "inputs": {**workflow()["3"]["inputs"], "latent_image": ["3", 0]}},
      "8__samples": ["12", 0]}, "12", "latent_image"),
    ({"12": {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["4", 0], "add_noise": "disable", "noise_seed": 1, "steps": 2, "cfg": 7, "sampler_name": "euler",
        "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
        "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
      "8__samples": ["12", 0], "3": None}, "12", "add_noise"),
])
def test_what_atelier_cannot_run_is_refused_naming_the_node_and_input(changes, node, input_name):
    with pytest.raises(WorkflowError) as refused:
        translate(workflow(**changes), CATALOG)
    errors = refused.value.node_errors[node]
    assert errors["class_type"] == workflow(**changes)[node]["class_type"]
    assert errors["errors"][0]["extra_info"]["input_name"] == input_name, errors


def test_a_latent_upscale_is_refused_naming_it():
    w = workflow(**{"12": {"class_type": "LatentUpscale", "inputs": {"samples": ["3", 0]}}, "8__samples": ["12", 0]})
    with pytest.raises(WorkflowError) as refused:
        translate(w, CATALOG)
    assert "12" in refused.value.node_errors and "latent upscaling" in str(refused.value)


# -- through HTTP, on the shared atelier --------------------------------------- #


def call(http, path: str, user: str | None = "ana", body=None, method=None, data=None, headers=None):
    """(status, parsed JSON or bytes) of a request as urllib makes it."""
    headers = dict(headers or {})
    if user:
        headers.update(http.auth(user))
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(http.url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw, kind = response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        status, raw, kind = exc.code, exc.read(), exc.headers.get_content_type()
    return status, (json.loads(raw) if kind == "application/json" and raw else raw)


def connect(http, user: str) -> tuple[websocket.WebSocket, str]:
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(http.url.replace("http", "ws", 1) + f"/ws?clientId={client_id}",
                                     header=[f"Authorization: Bearer {http.token(user)}"], timeout=60)
    return ws, client_id


def messages_until_done(ws: websocket.WebSocket, prompt_id: str) -> list:
    """JSON messages as dicts and binary frames as bytes, until ComfyUI's end: executing with node null."""
    seen = []
    while True:
        message = ws.recv()
        if isinstance(message, bytes):
            seen.append(message)
            continue
        message = json.loads(message)
        seen.append(message)
        data = message["data"]
        if message["type"] == "executing" and data["node"] is None and data["prompt_id"] == prompt_id:
            return seen


def native_job(http, user: str, job_id: str) -> dict:
    status, body = call(http, f"/v1/jobs/{job_id}", user)
    assert status == 200, body
    return body


def test_txt2img_over_the_websocket_then_history_and_view(compat_http):
    http = compat_http
    ws, client_id = connect(http, "ana")
    try:
        first = json.loads(ws.recv())
        assert first["type"] == "status" and first["data"]["sid"] == client_id
        assert isinstance(first["data"]["status"]["exec_info"]["queue_remaining"], int)
        w = workflow(**{"4__ckpt_name": "compat-lora-sd.safetensors", "3__sampler_name": "dpmpp_2m",
                        "3__scheduler": "karras", "5__batch_size": 2, "3__model": ["10", 0],
                        "10": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["4", 0], "lora_name": "ink",
                                                                               "strength_model": 0.7}}})
        status, answer = call(http, "/prompt", body={"prompt": w, "client_id": client_id})
        assert status == 200 and answer["node_errors"] == {} and isinstance(answer["number"], int), answer
        prompt_id = answer["prompt_id"]
        seen = messages_until_done(ws, prompt_id)
    finally:
        ws.close()
    kinds = [m["type"] if isinstance(m, dict) else "preview" for m in seen]
    kinds = [k for k in kinds if k != "status"]
    assert kinds[:3] == ["execution_start", "execution_cached", "executing"], kinds
    assert seen[[i for i, m in enumerate(seen) if isinstance(m, dict) and m["type"] == "executing"][0]]["data"][
        "node"] == "3"
    progress = [m["data"] for m in seen if isinstance(m, dict) and m["type"] == "progress"]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 2 and progress[-1]["node"] == "3"
    frames = [m for m in seen if isinstance(m, bytes)]
    assert frames, kinds
    event, image_type = struct.unpack(">II", frames[0][:8])
    assert event == 1 and image_type in (1, 2)
    Image.open(io.BytesIO(frames[0][8:])).verify()
    assert kinds.index("executed") > kinds.index("progress")
    assert kinds[-2:] == ["execution_success", "executing"]
    executed = next(m["data"] for m in seen if isinstance(m, dict) and m["type"] == "executed")
    assert executed["node"] == "9" and executed["prompt_id"] == prompt_id
    images = executed["output"]["images"]
    assert len(images) == 2 and all(i["subfolder"] == "" and i["type"] == "output" for i in images)

    # The choices reached the job, the token's user's, on the native API.
    job = native_job(http, "ana", prompt_id)
    spec = job["spec"]
    assert (spec["user"], spec["model"], spec["sampler"], spec["schedule"], spec["loras"], spec["count"],
            spec["steps"], spec["seed"]) == ("compat-ana", "compat-lora-sd", "dpm++2m", "karras", {"ink": 0.7}, 2, 2, 5)

    status, history = call(http, f"/history/{prompt_id}")
    entry = history[prompt_id]
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    assert entry["outputs"]["9"]["images"] == images and entry["prompt"][1] == prompt_id
    assert entry["prompt"][2] == json.loads(json.dumps(w))
    assert prompt_id in call(http, "/history")[1] and call(http, "/api/history?max_items=1")[1].keys() == {prompt_id}
    query = urllib.parse.urlencode(images[1])
    status, data = call(http, f"/view?{query}")
    assert status == 200 and Image.open(io.BytesIO(data)).size == (64, 64)
    # Another user sees neither the prompt nor its files.
    assert call(http, f"/history/{prompt_id}", "ben") == (200, {})
    assert prompt_id not in call(http, "/history", "ben")[1]
    assert call(http, f"/view?{query}", "ben")[0] == 404
    status, queue = call(http, "/queue")
    assert status == 200 and queue == {"queue_running": [], "queue_pending": []}


def test_img2img_from_an_upload(compat_http):
    http = compat_http
    source = io.BytesIO()
    Image.new("RGB", (80, 64), (200, 30, 30)).save(source, format="PNG")
    boundary = uuid.uuid4().hex
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"red.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + source.getvalue() + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n"
            f"--{boundary}--\r\n").encode()
    status, uploaded = call(http, "/upload/image", "ben", data=form,
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert (status, uploaded) == (200, {"name": "red.png", "subfolder": "", "type": "input"})
    assert call(http, "/view?filename=red.png&type=input", "ben") == (200, source.getvalue())
    assert call(http, "/view?filename=red.png&type=input", "ana")[0] == 404  # uploads are each user's own
    info = call(http, "/object_info/LoadImage", "ben")[1]
    assert "red.png" in info["LoadImage"]["input"]["required"]["image"][0]

    w = workflow(**{"5": {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}},
                    "11": {"class_type": "LoadImage", "inputs": {"image": "red.png"}},
                    "3": {"class_type": "KSamplerAdvanced", "inputs": {
                        "model": ["4", 0], "add_noise": "enable", "noise_seed": 3, "steps": 2, "cfg": 7,
                        "sampler_name": "euler_ancestral", "scheduler": "normal", "positive": ["6", 0],
                        "negative": ["7", 0], "latent_image": ["5", 0], "start_at_step": 1, "end_at_step": 10000,
                        "return_with_leftover_noise": "disable"}},
                    "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}})
    ws, client_id = connect(http, "ben")
    try:
        status, answer = call(http, "/api/prompt", "ben", body={"prompt": w, "client_id": client_id})
        assert status == 200, answer
        seen = messages_until_done(ws, answer["prompt_id"])
    finally:
        ws.close()
    executed = next(m["data"] for m in seen if isinstance(m, dict) and m["type"] == "executed")
    image = executed["output"]["images"][0]
    assert image["type"] == "temp"
    status, data = call(http, "/view?" + urllib.parse.urlencode(image), "ben")
    assert status == 200 and Image.open(io.BytesIO(data)).size == (80, 64)
    spec = native_job(http, "ben", answer["prompt_id"])["spec"]
    assert (spec["kind"], spec["strength"], spec["sampler"], spec["inputs"], spec["width"]) == \
        ("img2img", 0.5, "euler_a", ["image"], 80)


def test_interrupt_stops_the_running_prompt(compat_http):
    http = compat_http
    ws, _ = connect(http, "ben")
    try:
        # No client_id: ComfyUI's messages then go to every socket, here to every one of the user's own.
        status, answer = call(http, "/prompt", "ben", body={"prompt": workflow(**{"3__steps": 400})})
        assert status == 200, answer
        prompt_id = answer["prompt_id"]
        while True:
            message = ws.recv()
            if isinstance(message, str) and json.loads(message)["type"] == "progress":
                break
        status, queue = call(http, "/queue", "ben")
        assert [item[1] for item in queue["queue_running"]] == [prompt_id] and queue["queue_pending"] == []
        assert call(http, "/interrupt", "ben", data=b"", method="POST")[0] == 200
        kinds = [m["type"] for m in messages_until_done(ws, prompt_id) if isinstance(m, dict)]
    finally:
        ws.close()
    assert "execution_interrupted" in kinds and "execution_success" not in kinds
    entry = call(http, f"/history/{prompt_id}", "ben")[1][prompt_id]
    assert entry["status"]["status_str"] == "error" and entry["outputs"] == {}
    assert native_job(http, "ben", prompt_id)["state"] == "cancelled"


def test_an_unknown_node_is_refused_before_anything_runs(compat_http):
    http = compat_http
    before = call(http, "/v1/jobs?limit=1000", "admin")[1]["jobs"]
    w = workflow(**{"12": {"class_type": "ETN_KritaOutput", "inputs": {"images": ["8", 0]}}})
    status, answer = call(http, "/prompt", "admin", body={"prompt": w})
    assert status == 400 and answer["error"]["type"] == "invalid_prompt"
    assert "ETN_KritaOutput" in answer["error"]["message"] and answer["error"]["details"] == "Node ID '#12'"
    assert answer["node_errors"]["12"]["class_type"] == "ETN_KritaOutput"
    # SillyTavern's server posts the workflow as text/plain, which ComfyUI reads as JSON: so does atelier,
    # from a request no browser page made (it has no Origin); a page's is refused, JSON or not.
    text = json.dumps({"prompt": w}).encode()
    status, answer = call(http, "/api/prompt", "admin", data=text, headers={"Content-Type": "text/plain"})
    assert status == 400 and answer["error"]["type"] == "invalid_prompt"
    status, answer = call(http, "/api/prompt", "admin", data=text, headers={"Content-Type": "text/plain",
                                                                           "Origin": http.url})
    assert status == 415 and "application/json" in answer["error"]["message"]
    assert call(http, "/v1/jobs?limit=1000", "admin")[1]["jobs"] == before


def test_tokens_and_the_rate_limit(compat_http):
    http = compat_http
    status, answer = call(http, "/prompt", None, body={"prompt": workflow()})
    assert status == 401 and "token" in answer["error"]["message"]
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(http.url.replace("http", "ws", 1) + "/ws?clientId=x", timeout=10)
    assert refused.value.status_code == 401
    # The scheduler refuses these (too large for the model) after the rate limit counted them, so no job
    # runs; slow's 2 a minute may be spent already by another API's test.
    for _ in range(3):
        status, answer = call(http, "/prompt", "slow", body={"prompt": workflow(**{"5__width": 8192})})
        if status == 429:
            break
        assert status == 400 and answer["node_errors"]["5"]["errors"][0]["extra_info"]["input_name"] == "width"
    assert status == 429 and "a minute" in answer["error"]["message"], answer


@pytest.mark.parametrize("path", ["/object_info", "/api/object_info"])
def test_object_info_lists_the_nodes_atelier_runs(compat_http, path):
    status, info = call(compat_http, path)
    assert status == 200
    assert {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "KSamplerAdvanced",
            "VAEDecode", "VAEEncode", "SaveImage", "PreviewImage", "LoraLoader", "LoadImage"} <= info.keys()
    required = info["KSampler"]["input"]["required"]
    assert "dpmpp_2m" in required["sampler_name"][0] and "karras" in required["scheduler"][0]
    assert info["KSampler"]["output"] == ["LATENT"] and info["SaveImage"]["output_node"] is True
    assert "tiny-sd" in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert "ink" in info["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert call(compat_http, "/object_info/LatentUpscale") == (200, {})


def test_system_stats_and_the_small_routes(compat_http):
    status, stats = call(compat_http, "/system_stats")
    assert status == 200 and stats["system"]["ram_total"] > 0 and stats["system"]["python_version"]
    assert stats["devices"] and all({"name", "type", "vram_total"} <= d.keys() for d in stats["devices"])
    assert call(compat_http, "/embeddings") == (200, [])
    assert "checkpoints" in call(compat_http, "/models")[1] and "tiny-sd" in call(compat_http, "/models/checkpoints")[1]
    assert call(compat_http, "/queue", body={"clear": True}, method="POST")[0] == 200


def test_the_mask_is_one_minus_alpha_grown_and_uploads_are_bounded():
    from frontends import comfy

    image = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    image.putpixel((16, 16), (0, 0, 0, 0))  # the one transparent pixel: the one to paint anew
    data = io.BytesIO()
    image.save(data, format="PNG")
    surface = comfy.ComfySurface(None)
    surface.uploads.add("ana", "holes.png", data.getvalue(), (32, 32, True))
    plan = translate(workflow(**{"5": {"class_type": "VAEEncodeForInpaint", "inputs": {
        "pixels": ["11", 0], "vae": ["4", 2], "mask": ["11", 1], "grow_mask_by": 1}},
        "11": {"class_type": "LoadImage", "inputs": {"image": "holes.png"}}}), CATALOG)
    mask = Image.open(io.BytesIO(asyncio.run(surface._inputs("ana", plan)).mask))
    painted = {(x, y) for x in range(32) for y in range(32) if mask.getpixel((x, y)) == 255}
    assert painted == {(x, y) for x in (15, 16, 17) for y in (15, 16, 17)}
    for n in range(comfy.UPLOADS_PER_USER + 3):
        surface.uploads.add("ben", f"{n}.png", b"x" * 10, (8, 8, False))
    assert len(surface.uploads.of("ben")) == comfy.UPLOADS_PER_USER and "0.png" not in surface.uploads.of("ben")
    assert "holes.png" in surface.uploads.of("ana")
