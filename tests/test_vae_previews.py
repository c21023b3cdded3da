"""The VAE side of a catalog entry: a ``vae`` override, a weights ``variant`` (fp16 files), and previews
drawn by a ``preview_decoder`` (TAESD); through the adapters and staging, then through a real atelier."""

from __future__ import annotations

import io
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

# Before anything imports huggingface_hub: nothing here may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import AutoencoderKL, AutoencoderTiny, StableDiffusionPipeline  # noqa: E402

from actors.messages import Preview
from actors.runner import PreviewMaker  # noqa: E402
from atelier import sources, staging, tiny_models  # noqa: E402
from atelier.config import ModelEntry  # noqa: E402
from atelier.families import GenerateRequest, get_family, vae  # noqa: E402
from atelier.families.loaded import LoadedModel, LoadRequest  # noqa: E402
from atelier.jobs import JobSpec, JobState
from atelier.preview import CPU_DECODE_SIDE, MAX_PREVIEW_SIDE, DecoderPreview, encode_jpeg  # noqa: E402
from tests.conftest import Cluster, run  # noqa: E402

pytestmark = pytest.mark.timeout(180)

REQUEST = GenerateRequest.single(prompt="a lighthouse", negative_prompt=None, width=64, height=64, steps=3,
                                 guidance=5.0, seed=7)


def _quiet(*_: Any) -> None:
    pass


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _with(folder: Path, family: str = "sd1", options: dict[str, Any] | None = None, **extras: str) -> LoadRequest:
    """The request of a model loaded as its catalog entry says: with its ``vae`` or ``preview_decoder``."""
    entry = ModelEntry(family=family, source=str(folder), options=options or {}, **extras)
    return LoadRequest(folder, device="cpu", options=options or {}, entry=entry)


@pytest.fixture(scope="module")
def files(vae_files) -> dict[str, Path]:
    return vae_files  # those of the shared atelier's styled-sd, fp16-sd, no-fp16-sd and misfit-sd


# -- the VAE override ------------------------------------------------------------------------------ #


def test_a_vae_override_decodes_as_diffusers_would_with_that_vae(files: dict[str, Path]) -> None:
    family = get_family("sd1")
    plain = family.generate(family.load(LoadRequest(files["model"], device="cpu")), REQUEST, _quiet)[0]
    model = family.load(_with(files["model"], options={"vae_tiling": True}, vae=str(files["other-vae"])))
    assert model.pipe.vae.use_tiling  # the family's option holds for the new VAE (64 px fit one tile: no change)
    overridden = family.generate(model, REQUEST, _quiet)[0]
    # What diffusers itself makes with that VAE passed in: the same image, bit for bit.
    reference = StableDiffusionPipeline.from_pretrained(files["model"], local_files_only=True,
                                                        vae=AutoencoderKL.from_pretrained(files["other-vae"]))
    reference.set_progress_bar_config(disable=True)
    expected = family.generate(LoadedModel(reference, family), REQUEST, _quiet)[0]
    assert overridden.tobytes() == expected.tobytes()
    assert np.abs(_pixels(overridden) - _pixels(plain)).mean() > 5  # the override really decodes


def test_a_vae_that_does_not_fit_is_refused_naming_why(files: dict[str, Path], atelier_home: Path) -> None:
    pipe = get_family("sd1").load(LoadRequest(files["model"], device="cpu")).pipe
    with pytest.raises(ValueError, match="vae: .* its latent_channels differ"):
        vae.replace_vae(pipe, files["wide-vae"], family="sd1")
    with pytest.raises(ValueError, match="holds a AutoencoderTiny, not an AutoencoderKL"):
        vae.replace_vae(pipe, files["taesd"], family="sd1")
    with pytest.raises(ValueError, match="no config.json"):
        vae.replace_vae(pipe, files["model"], family="sd1")
    svd = get_family("svd").load(LoadRequest(tiny_models.ensure_builtin("tiny-svd", atelier_home / "models"))).pipe
    with pytest.raises(ValueError, match="decodes with AutoencoderKLTemporalDecoder, not an AutoencoderKL"):
        vae.replace_vae(svd, files["other-vae"], family="svd")
    with pytest.raises(ValueError, match="makes sound"):  # before anything of the pipeline is looked at
        vae.replace_vae(None, files["other-vae"], family="stable-audio")


# -- the variant ----------------------------------------------------------------------------------- #


def _state(pipe: Any) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)
            for key, value in part.state_dict().items()}


def _staged(folder: Path, variant: str | None, segment: Path) -> LoadedModel:
    table = staging.stage(folder, segment, variant)
    weights = staging.state_dicts(staging.map_segment(segment), table)
    return get_family("sd1").load(LoadRequest(folder, device="cpu", weights=weights))


@pytest.mark.skipif(staging.SHM_ROOT is None, reason="needs /dev/shm")
def test_a_staged_variant_is_from_pretrained_variant_bit_for_bit(files: dict[str, Path], tmp_path: Path) -> None:
    folder = files["variant"]
    names = {(component, path.name) for component, path in staging.plan(folder, "fp16")}
    assert names == {("unet", "diffusion_pytorch_model.fp16.safetensors"), ("text_encoder", "model.fp16.safetensors"),
                     ("vae", "diffusion_pytorch_model.fp16.safetensors")}
    segment = staging.SHM_ROOT / f"atelier-test-variant-{tmp_path.name}"
    try:
        staged = _staged(folder, "fp16", segment)
        disk = get_family("sd1").load(LoadRequest(folder, device="cpu", variant="fp16"))
        diffusers_own = StableDiffusionPipeline.from_pretrained(folder, variant="fp16", local_files_only=True)
        staged_state, disk_state = _state(staged.pipe), _state(disk.pipe)
        assert staged_state.keys() == disk_state.keys() == _state(diffusers_own).keys()
        assert all(torch.equal(staged_state[k], disk_state[k]) for k in staged_state)
        assert all(torch.equal(disk_state[k], v) for k, v in _state(diffusers_own).items())
        image = get_family("sd1").generate(staged, REQUEST, _quiet)[0]
        assert image.tobytes() == get_family("sd1").generate(disk, REQUEST, _quiet)[0].tobytes()
        plain = get_family("sd1").generate(_staged(folder, None, segment), REQUEST, _quiet)[0]
        assert np.abs(_pixels(image) - _pixels(plain)).mean() > 5  # the variant's files, not the plain ones

        # A component without files of the variant loads its plain ones, in staging as in diffusers.
        (folder / "text_encoder" / "model.fp16.safetensors").rename(tmp_path / "aside.safetensors")
        try:
            assert ("text_encoder", folder / "text_encoder" / "model.safetensors") in staging.plan(folder, "fp16")
            mixed = _state(_staged(folder, "fp16", segment).pipe)
            disk_state = _state(get_family("sd1").load(LoadRequest(folder, device="cpu", variant="fp16")).pipe)
            assert all(torch.equal(value, disk_state[key]) for key, value in mixed.items())
        finally:
            (tmp_path / "aside.safetensors").rename(folder / "text_encoder" / "model.fp16.safetensors")
    finally:
        segment.unlink(missing_ok=True)


def test_a_variant_the_folder_lacks_is_a_clear_error(files: dict[str, Path], tmp_path: Path) -> None:
    entry = ModelEntry(family="sd1", source=str(files["model"]), variant="fp16")
    with pytest.raises(sources.ModelSourceError, match="model plain: .* no weight files of the variant 'fp16'"):
        sources.resolve("plain", entry, tmp_path)
    with pytest.raises(staging.StagingError, match="variant 'fp16'"):
        staging.plan(files["model"], "fp16")
    with pytest.raises(ValueError, match="variant"):
        ModelEntry(family="sd1", source=str(files["model"]), variant="../fp16")
    assert staging._variant_of(Path("diffusion_pytorch_model.fp16-00001-of-00002.safetensors")) == "fp16"
    assert staging._variant_of(Path("model-00001-of-00002.safetensors")) is None


# -- previews through a decoder ------------------------------------------------------------------ #


def _expected_rgb(taesd: Path, latents: torch.Tensor) -> np.ndarray:
    """The decoder called directly, as a pipeline calls its VAE (TAESD: scale 1, shift 0), to uint8."""
    decoder = AutoencoderTiny.from_pretrained(taesd)
    with torch.no_grad():
        image = decoder.decode(latents[None] / decoder.config.scaling_factor).sample[0]
    return ((image + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_previews_are_the_decoders_output(files: dict[str, Path]) -> None:
    family = get_family("sd1")
    model = family.load(_with(files["model"], preview_decoder=str(files["taesd"])))
    previewer = model.previewer
    assert previewer is not family
    assert model.held_modules == [previewer.decoder]  # counted in the device budget with the model
    seen: list[torch.Tensor] = []
    image = family.generate(model, REQUEST, lambda i, n, latents: seen.append(latents.clone()))[0]
    plain = family.load(LoadRequest(files["model"], device="cpu"))
    assert image.tobytes() == family.generate(plain, REQUEST, _quiet)[0].tobytes()

    rgb = previewer.preview(seen[-1], 0)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8  # the image's size: 8x the latents
    assert np.array_equal(rgb, _expected_rgb(files["taesd"], seen[-1][0]))
    assert not np.array_equal(rgb, family.preview(seen[-1], 0))  # not the linear projection

    # Latents of a big image are shrunk before decoding, on a CPU (a bounded cost).
    big = torch.randn(1, 4, 96, 64)
    rgb = previewer.preview(big, 0)
    assert rgb.shape == (CPU_DECODE_SIDE, 88, 3)
    assert np.array_equal(rgb, _expected_rgb(files["taesd"], F.interpolate(big, size=(16, 11), mode="area")[0]))
    # A decoder's picture larger than a preview is shrunk to MAX_PREVIEW_SIDE (a GPU decodes whole latents).
    whole = DecoderPreview(previewer.decoder).preview(big, 0)
    assert whole.shape == (MAX_PREVIEW_SIDE, 171, 3)


@pytest.mark.parametrize("model", ["tiny-svd", "tiny-animatediff"])
def test_a_videos_preview_decodes_its_first_frame(model: str, files: dict[str, Path], atelier_home: Path) -> None:
    folder = tiny_models.ensure_builtin(model, atelier_home / "models")
    name = tiny_models.BUILTIN[model]
    family = get_family(name)
    model = family.load(_with(folder, name, preview_decoder=str(files["taesd"])))
    seen: list[torch.Tensor] = []
    extra = {"image": Image.new("RGB", (64, 48), (200, 90, 30))} if name == "svd" else {}
    request = GenerateRequest.single(prompt="a lighthouse", negative_prompt=None, width=64, height=48, steps=2,
                                     guidance=2.0, seed=3, count=2, frames=3, fps=7, **extra)
    family.generate(model, request, lambda i, n, latents: seen.append(latents.clone()))
    first_frame = seen[-1][1, 0] if name == "svd" else seen[-1][1, :, 0]  # (videos, frames, C…) or (videos, C, frames…)
    rgb = model.previewer.preview(seen[-1], 1)
    assert rgb.shape == (48, 64, 3)
    assert np.array_equal(rgb, _expected_rgb(files["taesd"], first_frame))


def test_the_runners_preview_thread_publishes_the_decoders_picture(files: dict[str, Path]) -> None:
    model = get_family("sd1").load(_with(files["model"], preview_decoder=str(files["taesd"])))
    published: list[Preview] = []
    done = threading.Event()
    maker = PreviewMaker(lambda message: (published.append(message), done.set()))
    latents = torch.randn(4, 8, 12)
    maker.offer("job-1", 3, model.previewer, latents)
    assert done.wait(30)
    preview = published[0]
    assert (preview.job_id, preview.step, preview.width, preview.height) == ("job-1", 3, 96, 64)
    assert bytes(preview.image) == encode_jpeg(_expected_rgb(files["taesd"], latents))


def test_a_preview_decoder_that_does_not_fit_is_refused(files: dict[str, Path], atelier_home: Path) -> None:
    pipe = get_family("sd1").load(LoadRequest(files["model"], device="cpu")).pipe
    with pytest.raises(ValueError, match="decodes 16-channel latents, this model makes 4"):
        vae.preview_decoder(pipe, files["taesd16"], family="sd1")
    with pytest.raises(ValueError, match="holds a AutoencoderKL, not an AutoencoderTiny"):
        vae.preview_decoder(pipe, files["other-vae"], family="sd1")
    for family in ("stable-audio", "sd-upscaler"):
        with pytest.raises(ValueError, match=f"family '{family}' is not previewed through a decoder"):
            vae.preview_decoder(None, files["taesd"], family=family)


# -- through atelier ------------------------------------------------------------------------------ #


def test_vaes_variants_and_decoded_previews_through_atelier(shared_cluster: Cluster, files: dict[str, Path]) -> None:
    async def go() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with shared_cluster.client() as client:
            for name, model, previews in (("styled", "styled-sd", True), ("styled-quiet", "styled-sd", False),
                                          ("plain", "tiny-sd", False), ("fp16", "fp16-sd", False),
                                          ("no-fp16", "no-fp16-sd", False), ("misfit", "misfit-sd", False)):
                # REQUEST's parameters, so that the adapter can make the same image below.
                spec = JobSpec(model=model, prompt="a lighthouse", seed=7, width=64, height=64, steps=3,
                               guidance=5.0, previews=previews)
                await client.submit(spec)
                seen = [event async for event in client.events(spec.id, timeout=120) if event.kind == "preview"]
                out[name] = (await client.wait(spec.id, timeout=120), seen)
            out["loads"] = (await client.status()).stats.models["fp16-sd"].loads
        return out

    results = run(go(), timeout=300)

    def image(name: str) -> np.ndarray:
        result = results[name][0]
        assert result.job.state is JobState.done, result.job.reason
        return _pixels(Image.open(io.BytesIO(bytes(result.outputs[0].data))))

    styled, previews = image("styled"), results["styled"][1]
    assert np.array_equal(styled, image("styled-quiet"))  # previews change nothing in the result
    assert np.abs(styled - image("plain")).mean() > 5  # the catalog's VAE decoded it
    assert previews and all((p.width, p.height) == (64, 64) for p in previews)  # decoded: the image's size
    assert previews[-1].step == 3  # the last step always shows

    # The variant's files were staged and read (they hold another VAE: far from the plain model's image).
    assert results["loads"] == {"staged": 1}
    reference = get_family("sd1").load(LoadRequest(files["variant"], device="cpu", variant="fp16"))
    expected = _pixels(get_family("sd1").generate(reference, REQUEST, _quiet)[0])
    assert np.abs(image("fp16") - expected).mean() < 1.0
    assert np.abs(image("fp16") - image("plain")).mean() > 5

    for name, words in (("no-fp16", "no weight files of the variant 'fp16'"),
                        ("misfit", "vae: .* latent_channels differ")):
        job_record = results[name][0].job
        assert job_record.state is JobState.failed
        assert re.search(words, job_record.reason), job_record.reason
