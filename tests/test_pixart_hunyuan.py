"""PixArt-α, PixArt-Σ and HunyuanDiT: the tiny models through their adapters, and through a running atelier."""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# Before anything imports huggingface_hub: nothing here may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from PIL import Image  # noqa: E402

from actors.actor import RemoteError  # noqa: E402
from actors.messages import JobResult, Preview, Progress
from atelier import staging  # noqa: E402
from atelier.families import GenerateRequest, get_family  # noqa: E402
from atelier.families.loaded import LoadRequest  # noqa: E402
from atelier.jobs import JobInputs, JobKind, JobSpec, JobState
from atelier.tiny_models import ensure_builtin  # noqa: E402
from tests.conftest import run  # noqa: E402

pytestmark = pytest.mark.timeout(180)

MODELS = ["tiny-pixart-alpha", "tiny-pixart-sigma", "tiny-hunyuan-dit"]


def _request(seed: int = 1, steps: int = 2, count: int = 2, width: int = 64, height: int = 64,
             prompt: str = "a red cube") -> GenerateRequest:
    return GenerateRequest.single(prompt=prompt, negative_prompt="blurry", width=width, height=height, steps=steps,
                                  guidance=4.5, seed=seed, count=count)


def _ignore(*_: Any) -> None:
    pass


@pytest.fixture(scope="module")
def models(atelier_home: Path) -> Path:
    return atelier_home / "models"  # where the session's atelier keeps them too: each is built once


@pytest.fixture(params=MODELS)
def loaded(request: pytest.FixtureRequest, tiny_model: Any) -> tuple[Any, Any, Path]:
    return tiny_model(request.param)


def test_images_come_at_the_size_asked_with_steps_previews_and_seeds(loaded: tuple[Any, Any, Path]) -> None:
    family, pipe, _ = loaded
    seen: list[tuple[int, int, Any]] = []
    # 72x40 is no multiple of the transformers' 16 px: generated at 80x48, cropped to the size asked.
    request = _request(seed=7, steps=3, width=72, height=40)
    images = family.generate(pipe, request, lambda i, n, lat: seen.append((i, n, lat.clone())))

    assert [(im.size, im.mode) for im in images] == [((72, 40), "RGB")] * 2
    assert [(i, n) for i, n, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert seen[-1][2].shape == (2, 4, 48 // 8, 80 // 8)
    rgb = family.preview(seen[-1][2], 1)
    assert rgb.dtype == np.uint8 and rgb.shape == (48, 80, 3)

    again = family.generate(pipe, request, _ignore)
    assert [im.tobytes() for im in again] == [im.tobytes() for im in images]
    assert images[0].tobytes() != images[1].tobytes()  # seeds 7 and 8


@pytest.mark.skipif(staging.SHM_ROOT is None, reason="needs /dev/shm")
def test_a_staged_load_gives_the_same_images_bit_for_bit(loaded: tuple[Any, Any, Path], tmp_path: Path) -> None:
    family, disk, path = loaded
    segment = staging.SHM_ROOT / f"atelier-test-{tmp_path.name}"
    try:
        table = staging.stage(path, segment)
        assert {"transformer", "vae", "text_encoder"} <= {f.component for f in table}
        staged = family.load(LoadRequest(path, weights=staging.state_dicts(staging.map_segment(segment), table)))
    finally:
        segment.unlink(missing_ok=True)
    request = _request(seed=11, steps=2, prompt="a lighthouse")
    from_staged = family.generate(staged, request, _ignore)
    from_disk = family.generate(disk, request, _ignore)
    assert [i.tobytes() for i in from_staged] == [i.tobytes() for i in from_disk]


@pytest.mark.skipif(staging.SHM_ROOT is None, reason="needs /dev/shm")
def test_a_staged_float16_load_keeps_what_from_pretrained_keeps_in_float32(models: Path, tmp_path: Path) -> None:
    # On a GPU float16 is the default; T5 (PixArt's encoder, HunyuanDiT's mT5) overflows in float16 there.
    import torch

    path = ensure_builtin("tiny-pixart-sigma", models)
    family = get_family("pixart-sigma")
    segment = staging.SHM_ROOT / f"atelier-test-{tmp_path.name}"
    try:
        table = staging.stage(path, segment)
        staged = family.load(LoadRequest(path, device="cpu", dtype_name="float16",
                                         weights=staging.state_dicts(staging.map_segment(segment), table)))
    finally:
        segment.unlink(missing_ok=True)
    disk = family.load(LoadRequest(path, device="cpu", dtype_name="float16"))
    kept = {n for n, p in disk.pipe.text_encoder.named_parameters() if p.dtype == torch.float32}
    assert kept and kept == {n for n, p in staged.pipe.text_encoder.named_parameters() if p.dtype == torch.float32}


def test_pixart_bins_the_resolution_of_a_model_that_has_a_table(tmp_path: Path) -> None:
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_256_BIN

    from atelier.tiny.pixart_hunyuan import build_tiny_pixart_alpha

    # Sample size 32: the pipeline's 256 px table. 64x48 is generated at the table's size nearest its
    # aspect ratio and resized back; without binning, at the size asked.
    path = build_tiny_pixart_alpha(tmp_path / "binned", sample_size=32)
    family = get_family("pixart-alpha")
    shapes: dict[bool, tuple[int, ...]] = {}
    for binning in (True, False):
        pipe = family.load(LoadRequest(path, device="cpu", options={"resolution_binning": binning}))
        images = family.generate(pipe, _request(count=1, width=64, height=48),
                                 lambda i, n, lat, b=binning: shapes.__setitem__(b, tuple(lat.shape)))
        assert images[0].size == (64, 48)
    binned = pipe.pipe.image_processor.classify_height_width_bin(48, 64, ratios=ASPECT_RATIO_256_BIN)
    assert min(binned) >= 128  # a size of the table, far from the one asked
    assert shapes[True] == (1, 4, binned[0] // 8, binned[1] // 8)
    assert shapes[False] == (1, 4, 6, 8)


@pytest.mark.parametrize("family_name, options, message", [
    ("pixart-alpha", {"compile": True}, "compile"),
    ("pixart-sigma", {"resolution_binning": "yes"}, "resolution_binning"),
    ("hunyuan-dit", {"resolution_binning": False}, "resolution_binning"),  # its binning changes the size
])
def test_options_are_checked_at_load(models: Path, family_name: str, options: dict, message: str) -> None:
    path = ensure_builtin(f"tiny-{family_name}", models)
    with pytest.raises(ValueError, match=message):
        get_family(family_name).load(LoadRequest(path, device="cpu", options=options))


@pytest.mark.skipif(importlib.util.find_spec("bs4") is not None and importlib.util.find_spec("ftfy") is not None,
                    reason="caption cleaning's packages are installed")
def test_caption_cleaning_without_its_packages_is_refused_at_load(models: Path) -> None:
    path = ensure_builtin("tiny-pixart-alpha", models)
    with pytest.raises(ValueError, match="clean_caption.*(beautifulsoup4|ftfy)"):
        get_family("pixart-alpha").load(LoadRequest(path, device="cpu", options={"clean_caption": True}))


def test_one_step(tiny_model: Any) -> None:
    # PixArt-α's pipeline takes a one-step result from the scheduler's x0 prediction, which DPM-Solver
    # does not return: refused by name, not an IndexError from inside diffusers. PixArt-Σ has no such path.
    alpha, alpha_pipe, _ = tiny_model("tiny-pixart-alpha")
    with pytest.raises(ValueError, match="steps"):
        alpha.generate(alpha_pipe, _request(steps=1, count=1), _ignore)
    sigma, sigma_pipe, _ = tiny_model("tiny-pixart-sigma")
    assert sigma.generate(sigma_pipe, _request(steps=1, count=1), _ignore)[0].size == (64, 64)


def test_hunyuan_reads_chinese_prompts(tiny_model: Any) -> None:
    family, pipe, _ = tiny_model("tiny-hunyuan-dit")
    ids = pipe.pipe.tokenizer("一个宇航员在骑马").input_ids
    assert pipe.pipe.tokenizer.unk_token_id not in ids and len(ids) == 8 + 2  # a token a character, [CLS] and [SEP]
    english, chinese = (family.generate(pipe, _request(count=1, prompt=p), _ignore)[0]
                        for p in ("an astronaut riding a horse", "一个宇航员在骑马"))
    assert english.tobytes() != chinese.tobytes()


# --------------------------------------------------------------------------- #
# through a running atelier: what a user receives


@pytest.mark.parametrize("model, bad, field, says", [
    ("tiny-pixart-alpha", dict(kind=JobKind.img2img), "kind", "does not do img2img"),  # sent with its image
    ("tiny-pixart-sigma", dict(frames=8), "frames", "makes image, not video"),
    ("tiny-hunyuan-dit", dict(count=5), "count", "limit of 4"),
])
def test_a_job_end_to_end(shared_cluster, model: str, bad: dict, field: str, says: str) -> None:
    spec = JobSpec(model=model, prompt="a lighthouse at dusk", width=72, height=40, steps=3, seed=5, count=2)

    async def go():
        async with shared_cluster.client() as client:
            await client.submit(spec)
            events = [event async for event in client.events(spec.id, timeout=150)]
            refused = JobSpec(**{**spec.model_dump(exclude={"id"}), **bad})
            inputs = JobInputs(image=_png(72, 40)) if bad.get("kind") is JobKind.img2img else None
            with pytest.raises(RemoteError) as caught:
                await client.submit(refused, inputs=inputs)
            return events, caught.value.error

    events, error = run(go(), timeout=170)
    result = events[-1]
    assert isinstance(result, JobResult) and result.job.state is JobState.done, result.job.reason
    images = [Image.open(io.BytesIO(artifact.data)) for artifact in result.outputs]
    assert [(im.format, im.size, im.mode) for im in images] == [("PNG", (72, 40), "RGB")] * 2
    assert [a.media_type for a in result.outputs] == ["image/png"] * 2
    assert images[0].tobytes() != images[1].tobytes()  # seeds 5 and 6
    assert [e.step for e in events if isinstance(e, Progress)][-1] == 3
    previews = [e for e in events if isinstance(e, Preview)]
    assert previews and bytes(previews[0].image[:2]) == b"\xff\xd8"
    assert max(previews[0].width, previews[0].height) <= 256

    assert error.field is not None and error.field.split(".")[-1] == field and says in error.message, error


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, format="PNG")
    return buffer.getvalue()
