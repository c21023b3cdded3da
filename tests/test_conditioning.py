"""Job conditioning of the UNet families: ControlNets, an IP-Adapter, weighted prompts (compel).

Through the adapter alone first (what each changes, and what leaves the image exactly as it was),
then through a real atelier with its own catalog: what a user gets back, and the refusals.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

# Before anything imports huggingface_hub: nothing here may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from actors.actor import RemoteError  # noqa: E402
from actors.messages import JobResult
from atelier import tiny_models  # noqa: E402
from atelier.config import ModelEntry  # noqa: E402
from atelier.families import GenerateRequest, get_family  # noqa: E402
from atelier.families.accel import module_bytes  # noqa: E402
from atelier.families.loaded import LoadedModel, LoadRequest  # noqa: E402
from atelier.jobs import JobInputs, JobSpec, JobState
from atelier.tiny.conditioning import build_tiny_controlnet, build_tiny_ip_adapter  # noqa: E402
from tests.catalog import guided_sd_files  # noqa: E402
from tests.conftest import Cluster, eventually_async, run  # noqa: E402

pytestmark = pytest.mark.timeout(240)


def _png(seed: int, size: int = 64) -> bytes:
    """A random RGB picture, PNG-encoded, as a job's input image travels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _picture(seed: int, size: int = 64) -> Image.Image:
    return Image.open(io.BytesIO(_png(seed, size))).convert("RGB")


@pytest.fixture(scope="module")
def files(atelier_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    sdxl = tiny_models.ensure_builtin("tiny-sdxl", atelier_home / "models")
    folder = tmp_path_factory.mktemp("conditioning")
    return {**guided_sd_files(atelier_home), "sdxl": sdxl,  # the shared atelier's guided-sd: the same files
            "xl-canny": build_tiny_controlnet(sdxl, folder / "xl-canny", seed=1),
            "xl-ip": build_tiny_ip_adapter(sdxl, folder / "xl-ip-adapter", seed=3)}


class Steps:
    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def __call__(self, step: int, total: int, latents: Any) -> None:
        self.seen.append((step, total))


def _images(family: str, model: LoadedModel, *, prompt: str = "a red cube", count: int = 1, steps: Steps | None = None,
            **inputs: Any) -> list[bytes]:
    request = GenerateRequest.single(prompt=prompt, negative_prompt=None, width=64, height=64, steps=3,
                                     guidance=5.0, seed=7, count=count, **inputs)
    return [image.tobytes() for image in get_family(family).generate(model, request, steps or Steps())]


def _load(family: str, folder: Path, *, controlnets: dict[str, Path] | None = None, ip_adapter: Path | None = None,
          **options: Any) -> LoadedModel:
    entry = ModelEntry(family=family, source=str(folder), options=options,
                       controlnets={k: str(v) for k, v in (controlnets or {}).items()},
                       ip_adapter=str(ip_adapter) if ip_adapter else None)
    return get_family(family).load(LoadRequest(folder, device="cpu", options=options, entry=entry))


# --------------------------------------------------------------------------- #
# The adapter


def test_controlnets_steer_the_image_and_switch_without_reloading(files: dict[str, Path]) -> None:
    base = _images("sd1", _load("sd1", files["sd"]))
    model = _load("sd1", files["sd"], controlnets={"canny": files["canny"], "depth": files["depth"]})
    unet = model.pipe.unet
    assert _images("sd1", model) == base  # ControlNets loaded, none chosen: the model as it was
    edges = _picture(1)
    canny = _images("sd1", model, controlnet="canny", control_image=edges)
    assert canny != base
    assert _images("sd1", model, controlnet="canny", control_image=edges) == canny  # same seed, same pixels
    assert _images("sd1", model, controlnet="canny", control_image=edges, controlnet_scale=0.0) == base
    assert _images("sd1", model, controlnet="canny", control_image=_picture(2)) not in (base, canny)
    depth = _images("sd1", model, controlnet="depth", control_image=edges)
    assert depth not in (base, canny)
    assert _images("sd1", model, controlnet="canny", control_image=edges) == canny  # back again, exactly
    assert model.pipe.unet is unet  # every ControlNet pipeline runs the one loaded UNet
    # The device budget counts the ControlNets beside the model, each once.
    held = model.held_modules
    controlnet_bytes = sum(p.numel() * p.element_size() for net in held for p in net.parameters())
    assert len(held) == 2 and controlnet_bytes > 0
    assert module_bytes(model.pipe, held + held) == module_bytes(model.pipe) + controlnet_bytes

    # img2img with a control image: the ControlNet still counts.
    start = dict(image=_picture(5), strength=0.8)
    plain = _images("sd1", model, **start)
    assert _images("sd1", model, controlnet="canny", control_image=edges, **start) != plain


def test_an_ip_adapter_image_steers_and_jobs_without_one_are_untouched(files: dict[str, Path]) -> None:
    plain_model = _load("sd1", files["sd"])
    base, pair = _images("sd1", plain_model), _images("sd1", plain_model, count=2)
    model = _load("sd1", files["sd"], ip_adapter=files["ip"])
    assert model.pipe.image_encoder is not None
    assert _images("sd1", model, count=2) == pair  # no image prompt: the model without its IP-Adapter
    first, second = _picture(1, 48), _picture(2, 48)
    steered = _images("sd1", model, ip_adapter_image=first)
    assert steered != base
    assert _images("sd1", model, ip_adapter_image=first) == steered  # same seed, same pixels
    assert _images("sd1", model, ip_adapter_image=first, ip_adapter_scale=0.0) == base
    assert _images("sd1", model, ip_adapter_image=first, ip_adapter_scale=0.5) not in (base, steered)
    other = _images("sd1", model, ip_adapter_image=second)
    assert other != steered
    assert _images("sd1", model, count=2) == pair  # and off again after a job with one

    # Two jobs with different image prompts in one batch: each image as its job alone would make it,
    # the steps reported as those of one call.
    request = GenerateRequest(prompts=("a red cube",) * 2, negative_prompts=(None, None), seeds=(7, 7), width=64,
                              height=64, steps=3, guidance=5.0, ip_adapter_images=(first, second))
    steps = Steps()
    batch = [image.tobytes() for image in get_family("sd1").generate(model, request, steps)]
    assert batch == [steered[0], other[0]]
    assert steps.seen == [(i, 6) for i in range(1, 7)]


def test_weighted_prompts_with_compel(files: dict[str, Path]) -> None:
    plain_model = _load("sd1", files["sd"])
    model = _load("sd1", files["sd"], prompt_weighting=True)
    plain = _images("sd1", model, prompt="a red cube")
    assert plain == _images("sd1", plain_model, prompt="a red cube")  # no weights: diffusers' own encoding
    stronger = _images("sd1", model, prompt="a (red:1.5) cube")  # A1111's syntax
    assert stronger != plain
    assert _images("sd1", model, prompt="a (red)1.5 cube") == stronger  # compel's own
    assert _images("sd1", model, prompt="a red++ cube") not in (plain, stronger)
    assert _images("sd1", model, prompt="a (red:1.0) cube") == plain  # weight 1 is no weight, exactly
    # Without the option the syntax is only text.
    assert _images("sd1", plain_model, prompt="a (red:1.5) cube") != stronger


def test_sdxl_takes_controlnets_ip_adapters_and_weighted_prompts(files: dict[str, Path]) -> None:
    model = _load("sdxl", files["sdxl"], controlnets={"canny": files["xl-canny"]}, ip_adapter=files["xl-ip"],
                 prompt_weighting=True)
    base = _images("sdxl", model)
    assert base == _images("sdxl", _load("sdxl", files["sdxl"]))  # both encoders and pooled, as diffusers
    assert _images("sdxl", model, prompt="a (red:1.5) cube") != base
    canny = _images("sdxl", model, controlnet="canny", control_image=_picture(1))
    assert canny != base
    assert _images("sdxl", model, controlnet="canny", control_image=_picture(1), controlnet_scale=0.0) == base
    both = _images("sdxl", model, controlnet="canny", control_image=_picture(1), ip_adapter_image=_picture(2, 48))
    assert both not in (base, canny)


def test_what_cannot_be_loaded_is_refused_by_name(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="controlnet xl: made for a UNet with cross_attention_dim"):
        _load("sd1", files["sd"], controlnets={"xl": files["xl-canny"]})  # an SDXL ControlNet on SD 1.5
    with pytest.raises(FileNotFoundError, match="controlnet gone"):
        _load("sd1", files["sd"], controlnets={"gone": tmp_path / "nowhere"})
    pickled = tmp_path / "ip-adapter.bin"
    pickled.write_bytes(b"not read")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        _load("sd1", files["sd"], ip_adapter=pickled)
    with pytest.raises(ValueError, match="ip_adapter: ip-adapter.safetensors does not fit"):
        _load("sd1", files["sd"], ip_adapter=files["xl-ip"])
    with pytest.raises(ValueError, match="attention_slicing"):
        _load("sd1", files["sd"], ip_adapter=files["ip"], attention_slicing=True)
    with pytest.raises(ValueError, match="prompt_weighting is true or false"):
        get_family("sd1").load(LoadRequest(files["sd"], device="cpu", options={"prompt_weighting": "yes"}))
    with pytest.raises(ValueError, match="family 'pixart-alpha' takes no controlnets"):
        get_family("pixart-alpha").load_conditioning(None, {"canny": str(files["canny"])}, None, None)


# --------------------------------------------------------------------------- #
# Through atelier


def _spec(**fields: Any) -> JobSpec:
    return JobSpec(**{"model": "guided-sd", "prompt": "a red cube", "seed": 7, **fields})


def test_jobs_bring_control_images_and_image_prompts_through_atelier(shared_cluster: Cluster) -> None:
    edges, look = JobInputs(control_image=_png(1)), JobInputs(ip_adapter_image=_png(2, 48))
    jobs = [(_spec(), None), (_spec(controlnet="canny"), edges), (_spec(controlnet="canny", controlnet_scale=0), edges),
            (_spec(controlnet="depth"), edges), (_spec(), look), (_spec(prompt="a (red:1.5) cube"), None),
            (_spec(controlnet="canny"), edges)]

    async def go() -> tuple[list[JobResult], dict[str, int], dict[str, RemoteError], bool]:
        async with shared_cluster.client() as client:
            # The shared atelier's other tests use guided-sd too: only loads from here on count.
            before = await client.status()
            resident = any("guided-sd" in r.capabilities.resident for r in before.runners)
            earlier = before.stats.models["guided-sd"].loads if "guided-sd" in before.stats.models else {}
            results = []
            for spec, inputs in jobs:
                record = await client.submit(spec, inputs=inputs)
                results.append(await client.wait(record.spec.id, timeout=120))
            after = (await client.status()).stats.models["guided-sd"].loads
            loads = {where: count - earlier.get(where, 0) for where, count in after.items()}
            refused = {}
            for name, spec, inputs in (
                    ("no controlnet", _spec(), edges),
                    ("no control image", _spec(controlnet="canny"), None),
                    ("unknown", _spec(controlnet="sobel"), edges),
                    ("elsewhere", _spec(model="tiny-sd", controlnet="canny"), edges),
                    ("no ip_adapter", _spec(model="tiny-sd"), look),
                    ("scale alone", _spec(ip_adapter_scale=0.5), None)):
                with pytest.raises(RemoteError) as caught:
                    await client.submit(spec, inputs=inputs)
                refused[name] = caught.value
            return results, loads, refused, resident

    results, loads, refused, resident = run(go(), timeout=300)
    assert [r.job.state for r in results] == [JobState.done] * len(jobs)
    images = [Image.open(io.BytesIO(bytes(r.outputs[0].data))) for r in results]
    assert {image.size for image in images} == {(64, 64)}
    plain, canny, canny_off, depth, looked, weighted, canny_again = (image.tobytes() for image in images)
    assert len({plain, canny, depth, looked, weighted}) == 5
    assert canny_off == plain and canny_again == canny
    # The PNG says what shaped it, so that the text is enough to ask for it again.
    assert "ControlNet: canny, ControlNet weight: 1" in images[1].info["parameters"]
    assert "ControlNet weight: 0," in images[2].info["parameters"] + ","
    assert "IP-Adapter weight: 1" in images[4].info["parameters"]
    assert "ControlNet" not in images[0].info["parameters"] + images[4].info["parameters"]
    assert results[1].job.spec.controlnet_scale == 1.0  # the default, filled in at submit
    assert sum(loads.values()) == (0 if resident else 1)  # switching ControlNets and image prompts never reloads

    fields = {name: error.error.field for name, error in refused.items()}
    assert fields == {"no controlnet": "controlnet", "no control image": "control_image", "unknown": "controlnet",
                      "elsewhere": "controlnet", "no ip_adapter": "ip_adapter_image",
                      "scale alone": "ip_adapter_scale"}
    assert "'sobel'" in refused["unknown"].error.message and "canny, depth" in refused["unknown"].error.message
    assert "has: none" in refused["elsewhere"].error.message


def test_the_http_api_takes_a_control_image(shared_cluster: Cluster) -> None:
    import aiohttp

    body = {"model": "guided-sd", "prompt": "a red cube", "seed": 7, "controlnet": "canny",
            "control_image": base64.b64encode(_png(1)).decode()}

    async def go() -> tuple[bytes, bytes]:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{shared_cluster.http}/v1/jobs", json=body) as response:
                assert response.status == 202, await response.text()
                job_id = (await response.json())["spec"]["id"]
            async def ended() -> dict | None:
                async with http.get(f"{shared_cluster.http}/v1/jobs/{job_id}") as response:
                    view = await response.json()
                return view if view["state"] in ("done", "failed", "cancelled") else None

            view = await eventually_async(ended, timeout=120)
            assert view["state"] == "done", view
            async with http.get(view["urls"][0]) as response:
                over_http = await response.read()
        async with shared_cluster.client() as client:
            record = await client.submit(_spec(controlnet="canny"), inputs=JobInputs(control_image=_png(1)))
            native = bytes((await client.wait(record.spec.id, timeout=120)).outputs[0].data)
        return over_http, native

    over_http, native = run(go(), timeout=180)
    as_image = [Image.open(io.BytesIO(data)).tobytes() for data in (over_http, native)]
    assert as_image[0] == as_image[1]  # the same job, whichever way it came
