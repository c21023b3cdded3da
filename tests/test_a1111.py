"""AUTOMATIC1111's API as its clients call it: webuiapi (the Python client most scripts and bots use)
against the shared atelier's tokened HTTP server (``compat_http``), and that what a call chooses
(checkpoint, sampler, schedule, LoRA, upscaler, hires size, file format) reaches the job, as the native
API (``/v1/jobs``) and the PNG's own parameters show it.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests
import webuiapi
from PIL import Image

pytestmark = pytest.mark.timeout(120)


def client(compat_http, user: str) -> webuiapi.WebUIApi:
    api = webuiapi.WebUIApi(baseurl=f"{compat_http.url}/sdapi/v1", sampler="Euler a", steps=1)
    api.session.headers.update(compat_http.auth(user))
    return api


def jobs(compat_http, user: str, limit: int = 5) -> list[dict]:
    response = requests.get(f"{compat_http.url}/v1/jobs?limit={limit}", headers=compat_http.auth(user), timeout=30)
    assert response.status_code == 200
    return response.json()["jobs"]


def refused(call, *args, **kwargs) -> tuple[int, str]:
    """What webuiapi raises for a refusal: (status, the body's text)."""
    with pytest.raises(RuntimeError) as caught:
        call(*args, **kwargs)
    return caught.value.args[0], caught.value.args[1]


def picture(width: int, height: int, colour=(30, 120, 200)) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


SMALL = {"width": 64, "height": 64, "steps": 1, "cfg_scale": 5, "seed": 7}


@pytest.fixture(scope="module")
def listings(compat_http):
    api = client(compat_http, "ana")
    return {"samplers": api.get_samplers(), "schedulers": api.get_schedulers(), "upscalers": api.get_upscalers(),
            "loras": api.get_loras(), "options": api.get_options(), "memory": api.get_memory(),
            "cmd_flags": api.get_cmd_flags(), "embeddings": api.get_embeddings(), "scripts": api.get_scripts(),
            "sd_vae": api.get_sd_vae(), "prompt_styles": api.get_prompt_styles(),
            "face_restorers": api.get_face_restorers(), "realesrgan": api.get_realesrgan_models(),
            "hypernetworks": api.get_hypernetworks(), "latent_modes": api.get_latent_upscale_modes(),
            "refresh": api.refresh_checkpoints(), "script_info": api.custom_get("script-info", baseurl=True),
            "extensions": api.custom_get("extensions", baseurl=True)}


def test_samplers_and_schedulers_in_a1111s_names_and_shapes(listings):
    samplers = {s["name"]: s for s in listings["samplers"]}
    assert {"Euler a", "Euler", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "DPM2", "DPM2 a", "Heun", "LMS", "DDIM",
            "PLMS", "UniPC", "LCM", "DEIS"} <= set(samplers)
    assert all(set(s) == {"name", "aliases", "options"} and isinstance(s["aliases"], list) for s in samplers.values())
    assert "k_euler_a" in samplers["Euler a"]["aliases"]
    assert samplers["DPM++ 2M"]["options"]["diffusers"] == "DPMSolverMultistepScheduler"
    schedulers = {s["label"]: s for s in listings["schedulers"]}
    assert set(schedulers) == {"Automatic", "Karras", "Exponential", "SGM Uniform", "Beta"}
    assert schedulers["Karras"] == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                                    "need_inner_model": False}


def test_upscalers_loras_and_options_list_the_catalog_never_its_paths(listings):
    upscalers = {u["name"]: u for u in listings["upscalers"]}
    assert {"None", "Lanczos", "Nearest", "tiny-sd-upscaler"} <= set(upscalers)
    assert all(u["model_path"] is None for u in upscalers.values()) and upscalers["tiny-sd-upscaler"]["scale"] == 4
    loras = {lora["name"]: lora for lora in listings["loras"]}
    assert {"ink", "moss"} <= set(loras)
    assert loras["ink"] == {"name": "ink", "alias": "ink", "path": "ink", "metadata": {}}
    assert listings["options"]["sd_vae"] == "Automatic" and listings["options"]["CLIP_stop_at_last_layers"] == 1
    assert listings["options"]["samples_format"] == "png" and listings["options"]["sd_model_checkpoint"]


@pytest.mark.parametrize("name, expected", [
    ("embeddings", {"loaded": {}, "skipped": {}}), ("scripts", {"txt2img": [], "img2img": []}), ("sd_vae", []),
    ("prompt_styles", []), ("face_restorers", []), ("realesrgan", []), ("hypernetworks", []), ("latent_modes", []),
    ("script_info", []), ("extensions", []), ("refresh", None)])
def test_what_atelier_has_none_of_answers_empty_not_404(listings, name, expected):
    assert listings[name] == expected


def test_memory_and_cmd_flags(listings):
    ram = listings["memory"]["ram"]
    assert 0 < ram["process"] < ram["total"] and ram["used"] + ram["free"] == ram["total"]
    assert listings["memory"]["cuda"]["runners"] and listings["memory"]["cuda"]["error"]
    assert listings["cmd_flags"]["api"] is True


def test_without_a_token_a_1111_shaped_401_and_the_token_as_a_basic_password(compat_http):
    response = requests.get(f"{compat_http.url}/sdapi/v1/samplers", timeout=30)
    assert response.status_code == 401 and "token" in response.json()["detail"]
    # A1111's clients know only its --api-auth (HTTP Basic): the token goes as the password.
    api = webuiapi.WebUIApi(baseurl=f"{compat_http.url}/sdapi/v1")
    api.set_auth("ana", compat_http.token("ana"))
    assert "tiny-sd" in api.util_get_model_names()
    wrong = requests.get(f"{compat_http.url}/sdapi/v1/samplers", auth=("ana", "not-a-token"), timeout=30)
    assert wrong.status_code == 401 and "token" in wrong.json()["detail"]
    # Only where the clients need it: the native API takes no Basic credentials.
    native = requests.get(f"{compat_http.url}/v1/jobs", auth=("ana", compat_http.token("ana")), timeout=30)
    assert native.status_code == 401


def test_options_choose_the_checkpoint_and_the_prompt_sampler_and_lora_reach_the_job(compat_http):
    api = client(compat_http, "ben")
    # webuiapi's set_options reads the answer whatever its status: the refusal is in the body.
    for option in ({"sd_model_checkpoint": "no-such-model"}, {"eta_noise_seed_delta": 31337}):
        response = api.session.post(f"{api.baseurl}/options", json=option)
        assert response.status_code == 422 and next(iter(option)) in response.json()["detail"]
        assert str(next(iter(option.values()))) in response.json()["detail"] or "no such setting" in response.text
    assert api.set_options({"sd_model_checkpoint": "compat-lora-sd", "CLIP_stop_at_last_layers": 1}) is None  # per user
    assert api.get_options()["sd_model_checkpoint"] == "compat-lora-sd"
    assert client(compat_http, "ana").get_options()["sd_model_checkpoint"] != "compat-lora-sd"  # ben's alone
    try:
        for kwargs, field, what in [({"sampler_name": "Euler Foo"}, "sampler_name", "Euler Foo"),
                                    ({"scheduler": "Simple"}, "scheduler", "Simple"),
                                    ({"prompt": "a cat <lora:nope:1>"}, "prompt", "nope"),
                                    ({"override_settings": {"sd_vae": "other.vae"}}, "sd_vae", "Automatic"),
                                    ({"enable_hr": True, "hr_upscaler": "Latent"}, "hr_upscaler", "latent"),
                                    ({"sampler_name": "DPM++ 2M", "override_settings":
                                     {"sd_model_checkpoint": "tiny-flux"}}, "sampler_name", "Euler")]:
            status, text = refused(api.txt2img, **{"prompt": "a cat", **SMALL, **kwargs})
            assert status == 422 and field in text and what in text, text
        result = api.txt2img(prompt="a cat <lora:ink:0.5>", sampler_name="DPM++ 2M Karras", **SMALL)
        info = api.png_info(result.image)
    finally:
        api.set_options({"sd_model_checkpoint": "tiny-sd"})
    assert result.image.size == (64, 64)
    assert result.info["sampler_name"] == "DPM++ 2M" and result.info["scheduler"] == "Karras"
    assert result.info["sd_model_name"] == "compat-lora-sd" and result.info["all_seeds"] == [7]
    spec = jobs(compat_http, "ben", 1)[0]["spec"]
    assert (spec["user"], spec["model"], spec["prompt"]) == ("compat-ben", "compat-lora-sd", "a cat")
    assert (spec["sampler"], spec["schedule"], spec["loras"]) == ("dpm++2m", "karras", {"ink": 0.5})
    read = info.parameters  # png-info: the PNG's parameters, back in A1111's fields
    assert read["Prompt"] == "a cat <lora:ink:0.5>" and read["Negative prompt"] == ""
    assert (read["Steps"], read["Seed"], read["Size-1"], read["Size-2"], read["Model"]) == ("1", "7", "64", "64",
                                                                                           "compat-lora-sd")
    assert (read["Sampler"], read["Schedule type"], read["CFG scale"]) == ("dpm++2m", "karras", "5.0")
    assert info.info.startswith("a cat <lora:ink:0.5>\nNegative prompt:")


def test_hires_fix_in_passes_through_the_upscaler_model_and_extras(compat_http):
    api = client(compat_http, "ana")
    hires = api.txt2img(prompt="a lighthouse", enable_hr=True, hr_upscaler="tiny-sd-upscaler", hr_scale=2,
                        hr_second_pass_steps=2, denoising_strength=0.5,
                        override_settings={"samples_format": "webp"}, **{**SMALL, "width": 32, "height": 32})
    assert hires.image.size == (64, 64) and hires.image.format == "WEBP"
    assert (hires.info["width"], hires.info["height"], hires.info["denoising_strength"]) == (64, 64, 0.5)
    passes = {j["spec"]["kind"]: j["spec"] for j in jobs(compat_http, "ana", 3)}
    assert set(passes) == {"txt2img", "upscale", "img2img"}
    assert (passes["txt2img"]["width"], passes["upscale"]["model"], passes["upscale"]["width"]) == \
        (32, "tiny-sd-upscaler", 32)
    assert (passes["img2img"]["width"], passes["img2img"]["strength"], passes["img2img"]["seed"],
            passes["img2img"]["output_format"]) == (64, 0.5, 7, "webp")
    # Extras: a Pillow resize makes no job; the upscaler model does one, 4x, resized to what was asked.
    resized = api.extra_single_image(picture(32, 24), upscaler_1="Lanczos", upscaling_resize=2)
    assert resized.image.size == (64, 48)
    upscaled = api.extra_single_image(picture(32, 32), upscaler_1="tiny-sd-upscaler", upscaling_resize=1.5)
    assert upscaled.image.size == (48, 48)
    latest = jobs(compat_http, "ana", 1)[0]["spec"]
    assert (latest["kind"], latest["model"], latest["width"]) == ("upscale", "tiny-sd-upscaler", 32)
    batch = api.extra_batch_images([picture(16, 16), picture(8, 8)], upscaler_1="Nearest", resize_mode=1,
                                   upscaling_resize_w=40, upscaling_resize_h=20)
    assert [im.size for im in batch.images] == [(40, 20), (40, 20)]
    status, text = refused(api.extra_single_image, picture(8, 8), upscaler_1="R-ESRGAN 4x+")
    assert status == 422 and "R-ESRGAN 4x+" in text


def test_skip_cancels_the_callers_current_job_and_progress_can_leave_the_image_out(compat_http):
    api = client(compat_http, "ana")
    answer: dict = {}

    def long_job():
        answer["response"] = api.session.post(f"{api.baseurl}/txt2img", json={
            "prompt": "a long night", "width": 60, "height": 64, "steps": 300, "sampler_name": "Euler"})

    thread = threading.Thread(target=long_job)
    thread.start()
    deadline = time.monotonic() + 60
    while (progress := api.session.get(f"{api.baseurl}/progress?skip_current_image=true").json())["progress"] == 0:
        assert time.monotonic() < deadline, "the long job never showed progress"
        time.sleep(0.05)
    assert progress["current_image"] is None and progress["state"]["sampling_steps"] == 300
    assert api.skip() is None
    thread.join(60)
    assert answer["response"].status_code == 409 and answer["response"].json()["detail"]
    [job] = jobs(compat_http, "ana", 1)
    assert job["state"] == "cancelled"
    assert job["spec"]["width"] == 56  # A1111 takes any size, and makes it rounded down to a multiple of 8


def test_the_rate_limit_answers_429_in_a1111s_shape(compat_http):
    api = client(compat_http, "slow")  # 2 jobs a minute: the third is refused, wherever the bucket stood
    for _ in range(3):
        response = api.session.post(f"{api.baseurl}/txt2img", json={"prompt": "a dot", **SMALL})
        if response.status_code == 429:
            break
        assert response.status_code == 200
    assert response.status_code == 429 and "a minute" in response.json()["detail"]


@pytest.mark.parametrize("sampler_name, scheduler, expected", [
    ("Euler a", "automatic", ("euler_a", None)), ("DPM++ 2M Karras", None, ("dpm++2m", "karras")),
    ("DPM++ 2M SDE Exponential", "Automatic", ("dpm++2m_sde", "exponential")), ("k_lms", "karras", ("lms", "karras")),
    ("PLMS", "SGM Uniform", ("pndm", "trailing")), ("dpm++2m", "beta", ("dpm++2m", "beta")),
    (None, None, (None, None))])
def test_a1111s_sampler_names_pick_atelier_s(sampler_name, scheduler, expected):
    from frontends.a1111_names import choose

    assert choose(sampler_name, scheduler) == expected


def test_png_info_of_a_picture_without_parameters_is_empty_not_an_error(compat_http):
    read = client(compat_http, "ana").png_info(picture(8, 8))
    assert (read.info, read.parameters) == ("", {})
