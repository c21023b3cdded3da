"""Single-file checkpoints (the original "LDM" layout): read from disk or staged, the same images."""

from __future__ import annotations

from pathlib import Path

import pytest

from atelier import sources, staging
from atelier.config import ModelEntry
from atelier.families import get_family
from atelier.families.loaded import LoadRequest  # noqa: E402
from atelier.jobs import JobSpec, JobState
from atelier.tiny_models import build_tiny_sdxl
from tests.catalog import single_file
from tests.conftest import run

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def checkpoints(single_sd_files, tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """family -> (diffusers folder, the same model as one file, a folder of its configs without weights)."""
    root = tmp_path_factory.mktemp("single")
    # diffusers tells SDXL's two text encoders apart by width, as the real ones differ
    sdxl = build_tiny_sdxl(root / "sdxl", second_text_width=48)
    return {"sd1": single_sd_files, "sdxl": single_file(root, sdxl, "sdxl")}  # the shared atelier's sd1


def image_bytes(model) -> bytes:
    import torch

    result = model.pipe(prompt="a lighthouse", negative_prompt="fog", width=64, height=64, num_inference_steps=2,
                  guidance_scale=7.5, generator=torch.Generator().manual_seed(11), output_type="np")
    return result.images.tobytes()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_single_file_gives_the_same_image_as_its_folder(checkpoints, family):
    # Proves the tests' LDM writer right: diffusers converts its names back to the same weights.
    folder, single, configs = checkpoints[family]
    adapter = get_family(family)
    from_folder = adapter.load(LoadRequest(folder, device="cpu"))
    from_file = adapter.load(LoadRequest(single, device="cpu", config=configs))
    assert image_bytes(from_file) == image_bytes(from_folder)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_staged_single_file_gives_the_disk_image_bit_for_bit(checkpoints, family, tmp_path):
    if staging.SHM_ROOT is None:
        pytest.skip("needs /dev/shm")
    _, single, configs = checkpoints[family]
    segment = staging.SHM_ROOT / f"atelier-test-single-{tmp_path.name}"
    try:
        table = staging.stage(single, segment)
        assert [(f.component, f.name, f.length) for f in table] == [
            (staging.CHECKPOINT, single.name, single.stat().st_size)]
        adapter = get_family(family)
        from_disk = adapter.load(LoadRequest(single, device="cpu", config=configs))
        gone = tmp_path / "gone.safetensors"  # the staged build must not read the file
        weights = staging.state_dicts(staging.map_segment(segment), table)
        from_staged = adapter.load(LoadRequest(gone, device="cpu", config=configs, weights=weights))
    finally:
        segment.unlink(missing_ok=True)
    assert image_bytes(from_staged) == image_bytes(from_disk)


def entry(source: Path, family: str = "sd1", **extra) -> ModelEntry:
    return ModelEntry(family=family, source=str(source), **extra)


def test_a_single_file_without_config_is_refused_saying_what_to_add(checkpoints, tmp_path):
    _, single, configs = checkpoints["sd1"]
    with pytest.raises(sources.ModelSourceError, match=r'add config = "/path/to/folder" to \[models.m\]'):
        sources.resolve("m", entry(single), tmp_path)
    with pytest.raises(sources.ModelSourceError, match="no model_index.json"):
        sources.resolve("m", entry(single, config=str(tmp_path)), tmp_path)
    with pytest.raises(sources.ModelSourceError, match="only for a single-file source"):
        sources.resolve("m", entry(checkpoints["sd1"][0], config=str(configs)), tmp_path)
    assert sources.resolve("m", entry(single, config=str(configs)), tmp_path) == single


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_a_pickle_checkpoint_is_refused(checkpoints, tmp_path, suffix):
    pickled = tmp_path / f"model{suffix}"
    pickled.write_bytes(b"\x80\x04")  # never opened: the name is enough
    with pytest.raises(sources.ModelSourceError, match="never loads pickle"):
        sources.resolve("m", entry(pickled, config=str(checkpoints["sd1"][2])), tmp_path)


def test_a_file_that_is_not_a_checkpoint_is_refused_with_the_reason(checkpoints, tmp_path):
    import torch
    from safetensors.torch import save_file

    configs = checkpoints["sd1"][2]
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(sources.ModelSourceError, match="not a readable safetensors file"):
        sources.resolve("m", entry(noise, config=str(configs)), tmp_path)
    other = tmp_path / "other.safetensors"
    save_file({"classifier.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(sources.ModelSourceError, match="no weights for the UNet, VAE, text encoder"):
        sources.resolve("m", entry(other, config=str(configs)), tmp_path)
    with pytest.raises(sources.ModelSourceError, match="looks like a sdxl checkpoint"):
        sources.resolve("m", entry(checkpoints["sdxl"][1], config=str(configs)), tmp_path)
    # Past those checks, a file that does not fit its configs still names both.
    with pytest.raises(sources.ModelSourceError, match="does not fit the configs"):
        get_family("sdxl").load(LoadRequest(checkpoints["sd1"][1], device="cpu", config=checkpoints["sdxl"][2]))


def test_single_file_models_serve_jobs_and_a_bad_one_fails_alone(shared_cluster):
    # The shared atelier's single-sd is checkpoints["sd1"]'s file; its noise-sd a file of noise with the same configs.
    async def go():
        async with shared_cluster.client() as client:
            bad = await client.generate(JobSpec(model="noise-sd", prompt="x", seed=1), timeout=120)
            good = await client.generate(JobSpec(model="single-sd", prompt="x", seed=1), timeout=120)
            return bad, good

    bad, good = run(go())
    assert bad.job.state is JobState.failed and "not a readable safetensors file" in bad.job.reason, bad.job.reason
    assert good.job.state is JobState.done, good.job.reason
    if staging.SHM_ROOT is not None:
        assert "loaded single-sd from staged memory" in shared_cluster.log.read_text()
