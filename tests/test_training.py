"""LoRA training on a resident tiny model: it learns, resumes bit for bit from a checkpoint, writes files
diffusers (and kohya's readers) load, and leaves the pipeline as it found it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Before anything imports huggingface_hub: nothing here may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from atelier.families import get_family  # noqa: E402
from atelier.families.loaded import LoadRequest  # noqa: E402
from atelier.jobs import TrainSpec  # noqa: E402
from atelier.tiny_models import BUILTIN, ensure_builtin  # noqa: E402
from atelier.training import LoraTrainer, make_class_images  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SIZE = 32
PROMPT = "a photo of sks square"


@pytest.fixture(scope="module")
def load(atelier_home):
    """``load(name)``: a fresh load of a built-in tiny model on the CPU, (its family, its pipeline, its folder)."""
    def get(name: str):
        path = ensure_builtin(name, atelier_home / "models")
        family = BUILTIN[name]
        return family, get_family(family).load(LoadRequest(path, device="cpu")).pipe, path
    return get


def _images() -> list[tuple[Image.Image, str]]:
    # Not square, of other sizes than the resolution: the trainer crops and scales them.
    return [(Image.new("RGB", (48, 40), (220, 40, 30)), PROMPT),
            (Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[:, None, None] * 4, (1, 50, 3))), PROMPT)]


def _spec(**settings) -> TrainSpec:
    return TrainSpec(**{"name": "sks", "rank": 4, "learning_rate": 1e-2, "resolution": SIZE, **settings})


def _image(pipe, seed: int = 3) -> np.ndarray:
    return pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                output_type="np").images[0]


def _load_file(pipe, folder: Path, data: bytes, name: str) -> None:
    (folder / f"{name}.safetensors").write_bytes(data)
    pipe.load_lora_weights(str(folder), weight_name=f"{name}.safetensors", adapter_name=name)


def test_training_lowers_the_loss_and_changes_the_samples(load) -> None:
    family, pipe, _ = load("tiny-sd")
    trainer = LoraTrainer(pipe, family, _spec(), _images()[:1], device="cpu", seed=0)
    before = np.asarray(trainer.sample(PROMPT, seed=1, steps=2))
    losses = [trainer.train_step() for _ in range(20)]
    assert trainer.step == 20
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert not np.array_equal(np.asarray(trainer.sample(PROMPT, seed=1, steps=2)), before)
    trainer.close()


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_a_restored_checkpoint_continues_bit_for_bit(load, name: str) -> None:
    """N steps straight equal k steps, a checkpoint, a new trainer on a fresh load, restore, N - k steps."""
    family, pipe, _ = load(name)
    unet = family != "flux"
    # batch 3 over 2 images crosses epochs; SD also trains its text encoder, with prior preservation.
    spec = _spec(batch_size=3, train_text_encoder=unet, class_prompt="a photo of a square" if unet else None,
                 prior_loss_weight=0.5)
    classes = make_class_images(pipe, "a photo of a square", 1, seed=5, resolution=SIZE, steps=2) if unet else None

    straight = LoraTrainer(pipe, family, spec, _images(), device="cpu", seed=11, class_images=classes)
    losses = [straight.train_step() for _ in range(6)]
    final = {name: param.detach().clone() for name, param in straight._named}
    straight.close()

    _, pipe_a, _ = load(name)
    first = LoraTrainer(pipe_a, family, spec, _images(), device="cpu", seed=11, class_images=classes)
    first_losses = [first.train_step() for _ in range(2)]
    data = first.checkpoint()
    first.close()
    _, pipe_b, _ = load(name)
    second = LoraTrainer(pipe_b, family, spec, _images(), device="cpu", seed=999, class_images=classes)
    second.restore(data)
    assert second.step == 2
    resumed = first_losses + [second.train_step() for _ in range(4)]

    assert resumed == losses
    assert [name for name, _ in second._named] == list(final)
    assert all(torch.equal(param, final[name]) for name, param in second._named)
    assert data[:8] != b"\x80\x04" and b"atelier.training" in data[:4096]  # safetensors, not a pickle
    with pytest.raises(ValueError, match="close that trainer first"):
        LoraTrainer(pipe_b, family, spec, _images(), device="cpu", seed=1, class_images=classes)
    second.close()
    with pytest.raises(ValueError, match="other settings"):
        LoraTrainer(pipe_b, family, _spec(rank=2), _images(), device="cpu", seed=1).restore(data)


def test_the_lora_file_loads_in_diffusers_and_close_restores_the_base(load, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    family, pipe, path = load("tiny-sd")
    base = _image(pipe)
    # alpha twice the rank: the scale must travel in both files
    trainer = LoraTrainer(pipe, family, _spec(alpha=8, train_text_encoder=True), _images(), device="cpu", seed=2)
    for _ in range(8):
        trainer.train_step()
    diffusers_file, kohya_file = trainer.lora_file(), trainer.kohya_file()
    trainer.close()
    assert np.array_equal(_image(pipe), base)  # the resident pipeline is as before training

    _load_file(pipe, tmp_path, diffusers_file, "sks")  # used by name, the base model not reloaded
    trained = _image(pipe)
    assert not np.array_equal(trained, base)
    fresh = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    _load_file(fresh, tmp_path, diffusers_file, "sks")
    assert np.array_equal(_image(fresh), trained)

    kohya = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    _load_file(kohya, tmp_path, kohya_file, "kohya")
    assert np.allclose(_image(kohya), trained, atol=1e-5)
    from safetensors.torch import load as read

    keys = read(kohya_file)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te1_") for k in keys)
    assert all(float(v) == 8.0 for k, v in keys.items() if k.endswith(".alpha"))


@pytest.mark.parametrize("name", ["tiny-sd2", "tiny-sdxl", "tiny-flux"])
def test_each_family_trains_and_writes_a_loadable_file(load, name: str, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    family, pipe, path = load(name)
    base = _image(pipe)
    trainer = LoraTrainer(pipe, family, _spec(train_text_encoder=family != "flux"), _images(), device="cpu", seed=4)
    assert np.isfinite(trainer.train_step())
    data = trainer.lora_file()
    if family == "flux":
        with pytest.raises(NotImplementedError):
            trainer.kohya_file()
    trainer.close()
    # As it was, to float rounding: taking the adapters out again may differ in the last bit on some CPUs.
    assert np.allclose(_image(pipe), base, atol=1e-5)
    fresh = DiffusionPipeline.from_pretrained(path)
    _load_file(fresh, tmp_path, data, "sks")
    assert not np.array_equal(_image(fresh), base)


def test_impossible_trainings_are_refused(load) -> None:
    family, pipe, _ = load("tiny-flux")
    with pytest.raises(ValueError, match="train_text_encoder"):
        LoraTrainer(pipe, family, _spec(train_text_encoder=True), _images(), device="cpu", seed=0)
    with pytest.raises(ValueError, match="multiple of 16"):
        LoraTrainer(pipe, family, _spec(resolution=40), _images(), device="cpu", seed=0)
    with pytest.raises(ValueError, match="families"):
        LoraTrainer(pipe, "pixart-alpha", _spec(), _images(), device="cpu", seed=0)


def test_training_beside_loaded_loras_leaves_them_and_other_jobs_alone(load, atelier_home, tmp_path: Path) -> None:
    """A model with catalog LoRAs: jobs between steps see no training adapter, and the LoRAs stay as they were."""
    from atelier.config import ModelEntry
    from atelier.families.loras import use_loras

    family, pipe, path = load("tiny-sd")
    trainer = LoraTrainer(pipe, family, _spec(), _images(), device="cpu", seed=6)
    for _ in range(3):
        trainer.train_step()
    (tmp_path / "ink.safetensors").write_bytes(trainer.lora_file())
    trainer.close()
    entry = ModelEntry(family="sd1", source=str(path), loras={"ink": str(tmp_path / "ink.safetensors")})
    model = get_family("sd1").load(LoadRequest(path, device="cpu", entry=entry))

    def image(*chosen: tuple[str, float]) -> np.ndarray:
        use_loras(model, chosen)
        return _image(model.pipe)

    base, ink = image(), image(("ink", 1.0))
    assert not np.array_equal(base, ink)
    trainer = LoraTrainer(model.pipe, family, _spec(train_text_encoder=True), _images(), device="cpu", seed=7)
    trainer.train_step()
    assert np.array_equal(image(("ink", 1.0)), ink) and np.array_equal(image(), base)  # a job between steps
    trainer.train_step()
    assert not np.array_equal(np.asarray(trainer.sample(PROMPT, seed=3, steps=2)), np.asarray(image()))
    trainer.close()
    assert np.array_equal(image(("ink", 1.0)), ink) and np.array_equal(image(), base)
    assert list(model.pipe.unet.peft_config) == ["ink"]
