"""LoRAs: loaded with the model from its catalog entry, chosen per job with a scale, switched
without reloading the model; through the adapter alone, then through a real atelier."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

# Before anything imports huggingface_hub: nothing here may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from actors.actor import RemoteError  # noqa: E402
from actors.messages import JobResult
from atelier.config import ModelEntry  # noqa: E402
from atelier.families import (  # noqa: E402
    GenerateRequest,
    get_family,  # noqa: E402
)
from atelier.families.loaded import LoadedModel, LoadRequest  # noqa: E402
from atelier.jobs import JobSpec, JobState
from tests.conftest import Cluster, run  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def _quiet(*_: Any) -> None:
    pass


@pytest.fixture(scope="module")
def files(lora_files) -> dict[str, Path]:
    return lora_files  # those of the shared atelier's lora-sd


def _image(model: LoadedModel, chosen: tuple[tuple[str, float], ...], available: list[str]) -> bytes:
    assert list(model.loras) == available
    request = GenerateRequest.single(prompt="a lighthouse", negative_prompt=None, width=64, height=64, steps=3,
                                     guidance=5.0, seed=7, count=1, loras=chosen)
    return model.generate(request, _quiet)[0].tobytes()  # the chosen LoRAs switched on first


def _with_loras(model: Path, loras: dict[str, str]) -> LoadRequest:
    return LoadRequest(model, device="cpu", entry=ModelEntry(family="sd1", source=str(model), loras=loras))


def test_a_lora_changes_the_image_and_switching_is_exact(files: dict[str, Path]) -> None:
    base = _image(get_family("sd1").load(LoadRequest(files["model"], device="cpu")), (), [])
    # a file, a folder
    pipe = get_family("sd1").load(_with_loras(files["model"], {"ink": str(files["ink"]),
                                                                "moss": str(files["moss"].parent)}))
    names = ["ink", "moss"]

    assert _image(pipe, (), names) == base  # loaded but not chosen: the model as it was
    ink = _image(pipe, (("ink", 1.0),), names)
    assert ink != base
    assert _image(pipe, (("ink", 0.0),), names) == base  # scale 0 is no LoRA at all
    moss = _image(pipe, (("moss", 1.0),), names)
    assert moss not in (base, ink)
    both = _image(pipe, (("ink", 1.0), ("moss", 1.0)), names)
    assert both not in (base, ink, moss)
    assert _image(pipe, (("ink", 0.5),), names) not in (base, ink)
    # Back and forth on the one loaded model: each choice gives exactly its image again.
    assert _image(pipe, (("ink", 1.0),), names) == ink
    assert _image(pipe, (), names) == base


def test_loras_that_cannot_be_loaded_are_refused_with_their_name(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="LoRA gone"):
        get_family("sd1").load(_with_loras(files["model"], {"gone": str(tmp_path / "nowhere.safetensors")}))
    pickled = tmp_path / "lora.ckpt"
    pickled.write_bytes(b"not read")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        get_family("sd1").load(_with_loras(files["model"], {"old": str(pickled)}))


def test_jobs_choose_loras_through_atelier(shared_cluster: Cluster) -> None:
    def spec(**loras: float) -> JobSpec:
        return JobSpec(model="lora-sd", prompt="a lighthouse", seed=7, loras=loras)

    async def go() -> tuple[list[JobResult], dict[str, int], RemoteError, RemoteError]:
        async with shared_cluster.client() as client:
            results = []
            for job in (spec(), spec(ink=1.0), spec(moss=0.8, ink=1.0), spec(), spec(ink=1.0)):
                record = await client.submit(job)
                results.append(await client.wait(record.spec.id, timeout=120))
            loads = (await client.status()).stats.models["lora-sd"].loads
            with pytest.raises(RemoteError) as unknown:
                await client.submit(spec(sparkle=1.0))
            with pytest.raises(RemoteError) as elsewhere:
                await client.submit(JobSpec(model="tiny-sd", prompt="x", loras={"ink": 1.0}))
            return results, loads, unknown.value, elsewhere.value

    results, loads, unknown, elsewhere = run(go(), timeout=240)
    assert [r.job.state for r in results] == [JobState.done] * 5
    images = [Image.open(io.BytesIO(bytes(r.outputs[0].data))) for r in results]
    plain, ink, both, plain_again, ink_again = (image.tobytes() for image in images)
    assert len({plain, ink, both}) == 3
    assert plain_again == plain and ink_again == ink  # the same choice, the same image, in any order
    # Only the first job loaded the model: choosing LoRAs never reloads it.
    assert sum(loads.values()) == 1
    assert images[2].info["parameters"].startswith("a lighthouse <lora:ink:1> <lora:moss:0.8>\n")
    assert unknown.error.field == "loras" and "'sparkle'" in unknown.error.message
    assert "ink, moss" in unknown.error.message
    assert elsewhere.error.field == "loras" and "has: none" in elsewhere.error.message
