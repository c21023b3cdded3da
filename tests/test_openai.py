"""OpenAI's Images API through OpenAI's own SDK, on the shared atelier's tokened HTTP server: generations,
edits (img2img, and inpainting with OpenAI's transparent-where-to-paint mask), variations, the model list,
and each of atelier's refusals as the exception class the SDK raises for it."""

from __future__ import annotations

import base64
import io

import openai
import pytest
import requests
from PIL import Image

from frontends.openai_images import EDIT_STRENGTH, INPAINT_STRENGTH, VARIATION_PROMPT, VARIATION_STRENGTH


def _png(width: int, height: int, mode: str = "RGB", color=(200, 80, 40)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), color).save(out, format="PNG")
    return out.getvalue()


def _mask(width: int, height: int) -> bytes:
    """OpenAI's convention: opaque everywhere but a transparent square, the part to paint."""
    image = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    image.paste((0, 0, 0, 0), (16, 16, 48, 48))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _file(data: bytes, name: str = "image.png") -> tuple[str, bytes, str]:
    return name, data, "image/png"


@pytest.fixture(scope="module")
def sdk(compat_http) -> openai.OpenAI:
    return openai.OpenAI(base_url=compat_http.url + "/v1", api_key=compat_http.token("ana"), max_retries=0)


def _job(compat_http, url: str, user: str = "ana") -> dict:
    """The native API's view of the job behind an artifact URL (<job id>-<n>.<ext>), with the same token."""
    job_id = url.rsplit("/", 1)[1].rsplit("-", 1)[0]
    response = requests.get(f"{compat_http.url}/v1/jobs/{job_id}", headers=compat_http.auth(user), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _fetch(compat_http, url: str) -> Image.Image:
    response = requests.get(url, headers=compat_http.auth("ana"), timeout=30)
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content))


def test_generate_as_a_url_and_as_base64(sdk, compat_http):
    linked = sdk.images.generate(prompt="a lighthouse", model="tiny-sd", size="64x64")
    # gpt-image models answer in base64 only, and their clients (Open WebUI) ask for no format.
    inline = sdk.images.generate(prompt="a lighthouse", model="gpt-image-1", size="64x64")
    assert _fetch(compat_http, linked.data[0].url).size == (64, 64)
    assert _job(compat_http, linked.data[0].url)["spec"]["user"] == "compat-ana"  # the token's user
    assert Image.open(io.BytesIO(base64.b64decode(inline.data[0].b64_json))).size == (64, 64)


def test_edit_without_a_mask_is_an_img2img_of_the_image_at_its_size(sdk, compat_http):
    answer = sdk.images.edit(image=_file(_png(40, 56)), prompt="the same, at dusk", model="tiny-sd")
    assert _fetch(compat_http, answer.data[0].url).size == (40, 56)
    spec = _job(compat_http, answer.data[0].url)["spec"]
    assert (spec["kind"], spec["inputs"], spec["strength"]) == ("img2img", ["image"], EDIT_STRENGTH)
    assert spec["prompt"] == "the same, at dusk" and spec["user"] == "compat-ana"


def test_edit_with_a_mask_inpaints(sdk, compat_http):
    answer = sdk.images.edit(image=[_file(_png(64, 64))], mask=_file(_mask(64, 64), "mask.png"),
                             prompt="a window", model="gpt-image-1", size="64x64", response_format="url")
    assert _fetch(compat_http, answer.data[0].url).size == (64, 64)
    spec = _job(compat_http, answer.data[0].url)["spec"]
    assert spec["model"] == "tiny-sd"  # OpenAI's model names are the default model
    assert (spec["kind"], spec["inputs"], spec["strength"]) == ("img2img", ["image", "mask"], INPAINT_STRENGTH)


def test_variation_is_an_img2img_steered_by_the_image_where_the_model_has_an_ip_adapter(sdk, compat_http):
    answer = sdk.images.create_variation(image=_file(_png(64, 64)), model="guided-sd", response_format="b64_json")
    assert Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).size == (64, 64)
    jobs = requests.get(f"{compat_http.url}/v1/jobs?limit=20", headers=compat_http.auth("ana"), timeout=30).json()
    spec = next(job["spec"] for job in jobs["jobs"] if job["spec"]["model"] == "guided-sd")
    assert (spec["kind"], spec["prompt"], spec["strength"]) == ("img2img", VARIATION_PROMPT, VARIATION_STRENGTH)
    assert spec["inputs"] == ["image", "ip_adapter_image"]


def test_models_list_and_retrieve(sdk):
    names = [model.id for model in sdk.models.list()]
    assert "tiny-sd" in names and sdk.models.retrieve("tiny-sd").id == "tiny-sd"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("no-such-model")


REFUSALS = {  # what is sent -> the exception, and the field its .param names
    "unknown model": (dict(model="no-such-model"), openai.NotFoundError, "model"),
    "a model that does not start from an image": (dict(model="tiny-pixart-alpha"), openai.BadRequestError, "model"),
    "two images": (dict(image=[_file(_png(64, 64)), _file(_png(64, 64))]), openai.BadRequestError, "image"),
    "not an image": (dict(image=_file(b"not a picture")), openai.BadRequestError, "image"),
    "a mask without alpha": (dict(mask=_file(_png(64, 64))), openai.BadRequestError, "mask"),
    "a mask of another size": (dict(mask=_file(_mask(32, 32))), openai.BadRequestError, "mask"),
    "a bad size": (dict(size="huge"), openai.BadRequestError, "size"),
    "too many": (dict(n=99), openai.BadRequestError, "n"),
    "a field OpenAI has and atelier cannot honour": (dict(output_format="jpeg"), openai.BadRequestError,
                                                     "output_format"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_edit_refusals_are_the_sdk_exceptions_naming_the_field(sdk, case):
    changes, error, param = REFUSALS[case]
    with pytest.raises(error) as raised:
        sdk.images.edit(**{"image": _file(_png(64, 64)), "prompt": "x", "model": "tiny-sd", **changes})
    assert raised.value.param == param and raised.value.body["message"]


def test_variation_refused_on_a_model_that_cannot_vary_an_image(sdk):
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.images.create_variation(image=_file(_png(64, 64)), model="tiny-sd-upscaler")
    assert raised.value.param == "model"


def test_token_origin_and_route_refusals_in_openais_shape(compat_http):
    image = _file(_png(64, 64))
    stranger = openai.OpenAI(base_url=compat_http.url + "/v1", api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        stranger.images.edit(image=image, prompt="x")
    assert raised.value.code == "invalid_api_key"
    page = openai.OpenAI(base_url=compat_http.url + "/v1", api_key=compat_http.token("ana"), max_retries=0,
                         default_headers={"Origin": "http://elsewhere.example"})
    with pytest.raises(openai.PermissionDeniedError):  # another site's page may not submit
        page.images.create_variation(image=image)
    missing = requests.post(f"{compat_http.url}/v1/images/nope", headers=compat_http.auth("ana"), json={})
    wrong_method = requests.get(f"{compat_http.url}/v1/images/edits", headers=compat_http.auth("ana"))
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"


def test_rate_limit_is_a_rate_limit_error(compat_http):
    slow = openai.OpenAI(base_url=compat_http.url + "/v1", api_key=compat_http.token("slow"), max_retries=0)
    # Refused by the scheduler (above tiny-sd's size limit), so no job runs, but each uses one of the
    # 2 submits a minute the slow token has.
    for _ in range(4):
        try:
            slow.images.edit(image=_file(_png(64, 64)), prompt="x", model="tiny-sd", size="1024x1024")
        except openai.BadRequestError as exc:
            assert exc.param == "size"
        except openai.RateLimitError as exc:
            assert exc.code == "rate_limit_exceeded" and exc.type == "rate_limit_error"
            assert int(exc.response.headers["Retry-After"]) >= 1
            return
    pytest.fail("the slow token was never rate limited")


def test_openais_mask_becomes_atelier_white_where_to_paint():
    from types import SimpleNamespace

    from frontends.openai_images import OpenAISurface

    surface = OpenAISurface(SimpleNamespace(config=SimpleNamespace(input_pixel_budget=1 << 20)))
    converted = Image.open(io.BytesIO(surface._atelier_mask(_png(64, 64), _mask(64, 64))))
    assert converted.getpixel((32, 32)) == 255 and converted.getpixel((4, 4)) == 0  # transparent: paint
