"""SD 2.x, SD 3.x and FLUX.1 on their tiny builtin models: the adapters alone, then through a real atelier."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

# Before anything imports huggingface_hub: nothing here may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from actors.actor import RemoteError  # noqa: E402
from actors.messages import JobResult, Preview, Progress
from atelier import staging, tiny_models  # noqa: E402
from atelier.config import load_config  # noqa: E402
from atelier.families import GenerateRequest, get_family  # noqa: E402
from atelier.families.loaded import LoadRequest  # noqa: E402
from atelier.jobs import JobInputs, JobSpec, JobState
from atelier.preview import FLUX_LATENT_RGB, SD3_LATENT_RGB  # noqa: E402
from atelier.scheduling import admission  # noqa: E402
from tests.conftest import run  # noqa: E402

pytestmark = pytest.mark.timeout(180)

MODELS = {"sd2": "tiny-sd2", "sd3": "tiny-sd3", "flux": "tiny-flux"}
CHANNELS = {"sd2": 4, "sd3": 16, "flux": 16}


def _request(seed: int = 1, count: int = 2, steps: int = 3, guidance: float = 5.0, negative: str | None = "blurry",
             **rest: Any) -> GenerateRequest:
    # Not square, so a latent layout that mixes up height and width shows.
    return GenerateRequest.single(prompt="a red cube", negative_prompt=negative, width=64, height=96, steps=steps,
                                  guidance=guidance, seed=seed, count=count, **rest)


def _quiet(*_: Any) -> None:
    pass


def _pixels(images: list[Image.Image]) -> list[bytes]:
    return [image.tobytes() for image in images]


@pytest.fixture(scope="module")
def folders(atelier_home: Path) -> dict[str, Path]:
    # The session's model cache: the builtin atelier below finds them built.
    return {family: tiny_models.ensure_builtin(name, atelier_home / "models") for family, name in MODELS.items()}


@pytest.fixture(scope="module")
def loaded(tiny_model) -> dict[str, Any]:
    return {family: tiny_model(name)[1] for family, name in MODELS.items()}


@pytest.mark.parametrize("family_name", MODELS)
def test_txt2img_sizes_steps_and_preview(loaded: dict[str, Any], family_name: str) -> None:
    family = get_family(family_name)
    seen: list[tuple[int, int, Any]] = []
    images = family.generate(loaded[family_name], _request(), lambda i, n, lat: seen.append((i, n, lat.clone())))

    assert [(im.size, im.mode) for im in images] == [((64, 96), "RGB")] * 2
    assert [(i, n) for i, n, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    latents = seen[-1][2]
    # FLUX steps on packed 2x2 patches; the adapter reports them as an image's latents.
    assert latents.shape == (2, CHANNELS[family_name], 12, 8)
    rgb = family.preview(latents, 1)
    assert rgb.dtype == np.uint8 and rgb.shape == (96, 64, 3)


@pytest.mark.parametrize("family_name", MODELS)
def test_seeds_decide_the_pixels(loaded: dict[str, Any], family_name: str) -> None:
    family, pipe = get_family(family_name), loaded[family_name]
    first = _pixels(family.generate(pipe, _request(seed=7), _quiet))
    again = _pixels(family.generate(pipe, _request(seed=7), _quiet))
    other = _pixels(family.generate(pipe, _request(seed=8, count=1), _quiet))
    assert first == again
    assert first[0] != other[0] and first[0] != first[1]  # per-image seeds, within a batch too


@pytest.mark.parametrize("family_name", MODELS)
def test_img2img_and_inpainting(loaded: dict[str, Any], family_name: str) -> None:
    family, pipe = get_family(family_name), loaded[family_name]
    red = Image.new("RGB", (64, 96), (200, 40, 40))
    steps: list[tuple[int, int]] = []
    edited = family.generate(pipe, _request(count=1, steps=4, kind="img2img", image=red, strength=0.5),
                             lambda i, n, lat: steps.append((i, n)))
    assert steps == [(1, 2), (2, 2)]  # half the way from the image: half the steps
    top = Image.new("L", (64, 96), 0)
    top.paste(255, (0, 0, 64, 48))
    painted = family.generate(pipe, _request(count=1, kind="img2img", image=red, mask=top, strength=1.0), _quiet)
    assert edited[0].size == painted[0].size == (64, 96)
    assert _pixels(painted) != _pixels(family.generate(pipe, _request(count=1), _quiet))


@pytest.mark.parametrize("family_name", MODELS)
def test_staged_load_gives_the_same_pixels_as_from_pretrained(loaded: dict[str, Any], folders: dict[str, Path],
                                                              family_name: str, tmp_path: Path) -> None:
    if staging.SHM_ROOT is None:
        pytest.skip("needs /dev/shm")
    segment = staging.SHM_ROOT / f"atelier-test-{family_name}-{tmp_path.name}"
    try:
        table = staging.stage(folders[family_name], segment)
        weights = staging.state_dicts(staging.map_segment(segment), table)
        family = get_family(family_name)
        staged = family.load(LoadRequest(folders[family_name], device="cpu", weights=weights))
        assert _pixels(family.generate(staged, _request(), _quiet)) == \
            _pixels(family.generate(loaded[family_name], _request(), _quiet))
    finally:
        segment.unlink(missing_ok=True)


def test_sd2_is_v_prediction_with_an_open_clip_style_text_encoder(loaded: dict[str, Any]) -> None:
    pipe = loaded["sd2"].pipe
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.text_encoder.config.hidden_act == "gelu"  # OpenCLIP's; OpenAI CLIP's is quick_gelu
    assert pipe.unet.config.use_linear_projection


def test_flux_guidance_is_the_distilled_embedding_and_ignores_negative_prompts(loaded: dict[str, Any]) -> None:
    flux, pipe = get_family("flux"), loaded["flux"]
    assert pipe.pipe.transformer.config.guidance_embeds  # dev-style
    base = _pixels(flux.generate(pipe, _request(count=1, guidance=3.5), _quiet))
    assert base == _pixels(flux.generate(pipe, _request(count=1, guidance=3.5, negative="something else"), _quiet))
    assert base != _pixels(flux.generate(pipe, _request(count=1, guidance=1.0), _quiet))
    # SD3 does classifier-free guidance: its negative prompt counts.
    sd3, pipe3 = get_family("sd3"), loaded["sd3"]
    assert _pixels(sd3.generate(pipe3, _request(count=1), _quiet)) != \
        _pixels(sd3.generate(pipe3, _request(count=1, negative="something else"), _quiet))


@pytest.mark.parametrize("family_name", ["sd3", "flux"])
def test_sizes_off_the_16_pixel_grid_are_refused_by_name(loaded: dict[str, Any], family_name: str) -> None:
    request = GenerateRequest.single(prompt="x", negative_prompt=None, width=72, height=64, steps=1, guidance=1.0,
                                     seed=1)
    with pytest.raises(ValueError, match="width 72"):
        get_family(family_name).generate(loaded[family_name], request, _quiet)


def test_options_are_checked_and_max_sequence_length_applies(folders: dict[str, Path]) -> None:
    flux = get_family("flux")
    with pytest.raises(ValueError, match="attention_slicing"):
        flux.load(LoadRequest(folders["flux"], device="cpu", options={"attention_slicing": True}))
    with pytest.raises(ValueError, match="max_sequence_length"):
        get_family("sd3").load(LoadRequest(folders["sd3"], device="cpu", options={"max_sequence_length": 4096}))
    short = flux.load(LoadRequest(folders["flux"], options={"max_sequence_length": 16, "vae_tiling": True}))
    assert short.pipe.vae.use_tiling
    assert len(flux.generate(short, _request(count=1), _quiet)) == 1


def test_previews_project_sixteen_channels_with_the_published_bias() -> None:
    import torch

    for family_name, table in (("sd3", SD3_LATENT_RGB), ("flux", FLUX_LATENT_RGB)):
        assert len(table.matrix) == 16
        rgb = get_family(family_name).preview(torch.zeros(1, 16, 4, 6), 0)
        assert rgb.shape == (32, 48, 3)
        assert tuple(rgb[0, 0]) == tuple(round((b + 1) * 127.5) for b in table.bias)


TURBO = """
[models.sd-turbo]
family = "sd2"
source = "builtin:tiny-sd2"
default_steps = 1
default_guidance = 0.0
default_width = 64
default_height = 64

[models.sdxl-turbo]
family = "sdxl"
source = "builtin:tiny-sdxl"
default_steps = 1
default_guidance = 0.0
default_width = 64
default_height = 64
"""


@pytest.mark.parametrize("model", ["sd-turbo", "sdxl-turbo"])
def test_turbo_is_a_catalog_entry_one_step_without_guidance(tmp_path: Path, atelier_home: Path, model: str) -> None:
    from atelier import sources

    (tmp_path / "atelier.toml").write_text(TURBO)
    config = load_config(tmp_path / "atelier.toml")
    entry = config.models[model]
    spec = admission.resolve(JobSpec(model=model, prompt="a cat", negative_prompt="dogs"), None, config,
                             random.Random(0))
    assert (spec.steps, spec.guidance, spec.width, spec.height) == (1, 0.0, 64, 64)
    family = get_family(entry.family)
    pipe = family.load(LoadRequest(sources.resolve(model, entry, atelier_home / "models"), device="cpu"))
    steps: list[tuple[int, int]] = []
    request = GenerateRequest.single(prompt=spec.prompt, negative_prompt=spec.negative_prompt, width=spec.width,
                                     height=spec.height, steps=spec.steps, guidance=spec.guidance, seed=spec.seed)
    images = family.generate(pipe, request, lambda i, n, lat: steps.append((i, n)))
    assert steps == [(1, 1)] and images[0].size == (64, 64)


def test_a_one_step_img2img_with_no_step_left_is_a_clear_error(loaded: dict[str, Any]) -> None:
    red = Image.new("RGB", (64, 96), (200, 40, 40))
    with pytest.raises(ValueError, match="steps x strength"):
        get_family("sd2").generate(loaded["sd2"], _request(count=1, steps=1, kind="img2img", image=red,
                                                           strength=0.75), _quiet)
    # SD-Turbo's own advice: 2 steps at strength 0.5 run one.
    steps: list[int] = []
    get_family("sd2").generate(loaded["sd2"], _request(count=1, steps=2, guidance=0.0, kind="img2img", image=red,
                                                       strength=0.5), lambda i, n, lat: steps.append(n))
    assert steps == [1]


# --------------------------------------------------------------------------- #
# through a real atelier


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


async def _job(client: Any, spec: JobSpec, inputs: JobInputs | None = None) -> list[Any]:
    await client.submit(spec, inputs=inputs)
    return [event async for event in client.events(spec.id, timeout=120)]


def _images(result: JobResult) -> list[Image.Image]:
    assert result.job.state is JobState.done, result.job.reason
    images = []
    for artifact in result.outputs:
        assert artifact.media_type == "image/png"
        image = Image.open(io.BytesIO(bytes(artifact.data)))
        assert image.format == "PNG" and (artifact.width, artifact.height) == image.size
        images.append(image)
    return images


@pytest.mark.parametrize("family_name", MODELS)
def test_end_to_end(shared_cluster: Any, family_name: str) -> None:
    model = MODELS[family_name]
    txt2img = JobSpec(model=model, prompt="a lighthouse", width=64, height=96, steps=3, seed=5, count=2)
    img2img = JobSpec(model=model, prompt="a lighthouse", kind="img2img", strength=0.5, steps=4, seed=5)
    bad = {"sd2": (JobSpec(model=model, prompt="x", width=1024), "width"),
           "sd3": (JobSpec(model=model, prompt="x", frames=8), "frames"),
           "flux": (JobSpec(model=model, prompt="x", kind="img2img"), "image")}[family_name]

    async def go() -> tuple[list[Any], list[Any], RemoteError]:
        async with shared_cluster.client() as client:
            made = await _job(client, txt2img)
            edited = await _job(client, img2img, JobInputs(image=_png(80, 48)))
            with pytest.raises(RemoteError) as refused:
                await client.submit(bad[0])
            return made, edited, refused.value

    made, edited, refused = run(go(), timeout=240)
    images = _images(made[-1])
    assert [im.size for im in images] == [(64, 96)] * 2 and images[0].tobytes() != images[1].tobytes()
    assert "Seed: 5" in images[0].info["parameters"]
    assert [e.step for e in made if isinstance(e, Progress)] == [1, 2, 3]
    previews = [e for e in made if isinstance(e, Preview)]
    assert previews and (previews[-1].width, previews[-1].height) == (64, 96)
    assert Image.open(io.BytesIO(bytes(previews[-1].image))).size == (64, 96)
    # An input image keeps its size; half the way from it is half the steps.
    assert [im.size for im in _images(edited[-1])] == [(80, 48)]
    assert [e.step for e in edited if isinstance(e, Progress)] == [1, 2]
    assert refused.error.field == bad[1]
