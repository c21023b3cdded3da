"""Speed and memory settings of a catalog entry (quantize, cache, offload, compile): through
atelier.families.accel on tiny models, then through a real atelier. What needs CUDA (offload, int4,
running a compiled model) is checked for its clear refusal here and runs in the gpu-marked tests."""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

# Before anything imports huggingface_hub: nothing here may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from atelier import tiny_models  # noqa: E402
from atelier.config import ModelEntry  # noqa: E402
from atelier.families import GenerateRequest, accel, get_family  # noqa: E402
from atelier.families.accel import module_bytes  # noqa: E402
from atelier.families.loaded import LoadedModel, LoadRequest  # noqa: E402
from atelier.jobs import JobSpec, JobState
from tests.conftest import Cluster, run  # noqa: E402

pytestmark = pytest.mark.timeout(180)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _entry(family: str, **settings: Any) -> ModelEntry:
    return ModelEntry(family=family, source="unused", **settings)


@pytest.fixture(scope="module")
def models(atelier_home: Path) -> dict[str, Path]:
    names = ("tiny-sd", "tiny-flux", "tiny-pixart-alpha", "tiny-sd3", "tiny-hunyuan-dit")
    return {name: tiny_models.ensure_builtin(name, atelier_home / "models") for name in names}


@pytest.fixture(scope="module")
def reference(models: dict[str, Path]) -> Any:
    """A model's image without any setting, made once per module."""
    made: dict[str, np.ndarray] = {}

    def image(name: str) -> np.ndarray:
        if name not in made:
            made[name] = _images(name, _load(models, name))[0]
        return made[name]

    return image


def _load(models: dict[str, Path], name: str, device: str = "cpu", **settings: Any) -> LoadedModel:
    family = tiny_models.BUILTIN[name]
    return get_family(family).load(LoadRequest(models[name], device=device, entry=_entry(family, **settings)))


def _images(name: str, model: LoadedModel, *, count: int = 1,
            loras: tuple[tuple[str, float], ...] = ()) -> list[np.ndarray]:
    """A generation as the runner makes it (the cache reset first), as arrays of 0..255."""
    request = GenerateRequest.single(prompt="a lighthouse", negative_prompt=None, width=64, height=48, steps=4,
                                     guidance=5.0, seed=7, count=count, loras=loras)
    images = model.generate(request, lambda *_: None)
    assert [image.size for image in images] == [(64, 48)] * count
    return [np.asarray(image).astype(int) for image in images]


def _close_but_not_equal(image: np.ndarray, reference: np.ndarray) -> None:
    assert not np.array_equal(image, reference)
    assert np.abs(image - reference).mean() < 8  # of 255: the same picture, not another one


def test_catalog_settings_are_checked_when_read() -> None:
    entry = _entry("sd1", quantize="int8", cache="deepcache", cache_interval=2, compile="max-autotune-no-cudagraphs")
    assert (entry.quantize, entry.cache, entry.cache_interval, entry.compile) == ("int8", "deepcache", 2,
                                                                                  "max-autotune-no-cudagraphs")
    for settings, message in [({"quantize": "int3"}, "quantize"), ({"offload": "disk"}, "offload"),
                              ({"cache": "everything"}, "cache"), ({"compile": "fast"}, "compile"),
                              ({"cache": "taylorseer", "cache_threshold": 0.2}, "cache_threshold goes with"),
                              ({"cache": "first_block", "cache_interval": 2}, "cache_interval goes with"),
                              ({"cache_threshold": 0.0, "cache": "first_block"}, "cache_threshold")]:
        with pytest.raises(ValidationError, match=message):
            _entry("sd1", **settings)


def test_int8_quantizes_the_unet_and_keeps_loras_working(models: dict[str, Path], reference: Any,
                                                         tmp_path: Path) -> None:
    plain = get_family("sd1").load(LoadRequest(models["tiny-sd"], device="cpu"))
    lora = tiny_models.build_tiny_lora(models["tiny-sd"], tmp_path / "ink", seed=1)

    # The loading's order: LoRAs, then accel.
    model = _load(models, "tiny-sd", quantize="int8", loras={"ink": str(lora)})
    weights = Counter(type(module.weight).__name__ + (" (LoRA)" if "lora_" in name else "")
                      for name, module in model.pipe.unet.named_modules() if isinstance(module, torch.nn.Linear))
    assert weights["Int8Tensor"] == 50 and weights["Parameter (LoRA)"] > 0 and weights["Parameter"] == 0
    # the int8 weights take a quarter of the bytes
    assert module_bytes(model.pipe) < module_bytes(plain.pipe) - 1_000_000

    quantized = _images("tiny-sd", model)[0]
    _close_but_not_equal(quantized, reference("tiny-sd"))
    # the LoRA still changes the picture
    assert np.abs(_images("tiny-sd", model, loras=(("ink", 1.0),))[0] - quantized).mean() > 8


@pytest.mark.parametrize("kind", ["fp8", "int8-dynamic"])
def test_other_quantizations_run_on_the_cpu(models: dict[str, Path], reference: Any, kind: str) -> None:
    model = _load(models, "tiny-pixart-alpha", quantize=kind)
    assert {type(m.weight).__name__ for m in model.pipe.transformer.modules() if isinstance(m, torch.nn.Linear)} == \
        {"Float8Tensor" if kind == "fp8" else "Int8Tensor"}
    _close_but_not_equal(_images("tiny-pixart-alpha", model)[0], reference("tiny-pixart-alpha"))


def test_what_needs_cuda_or_a_denoiser_is_refused_on_the_cpu(models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="offload = 'model' needs a CUDA device"):
        accel.load_device(_entry("sd1", offload="model"), "cpu")
    with pytest.raises(ValueError, match="int4\" needs a CUDA device"):
        _load(models, "tiny-sd", quantize="int4")
    with pytest.raises(ValueError, match="no denoiser"):
        get_family("noop").load(LoadRequest(None, device="cpu", entry=_entry("noop", cache="first_block")))


def _count_calls(module: torch.nn.Module, suffix: str) -> Counter:
    """Calls of the submodules named ``*suffix``: layers that run only when their block really computes."""
    calls: Counter = Counter()
    for name, sub in module.named_modules():
        if name.endswith(suffix):
            sub.register_forward_hook(lambda *_, name=name: calls.update([name]))
    return calls


@pytest.mark.parametrize("name, settings", [
    ("tiny-flux", {"cache": "first_block", "cache_threshold": 5.0}),
    ("tiny-pixart-alpha", {"cache": "first_block", "cache_threshold": 5.0}),
    ("tiny-sd3", {"cache": "taylorseer", "cache_interval": 2}),
    ("tiny-hunyuan-dit", {"cache": "taylorseer", "cache_interval": 2}),
    ("tiny-sd", {"cache": "deepcache", "cache_interval": 2}),
])
def test_a_cache_skips_work_and_each_call_starts_afresh(models: dict[str, Path], reference: Any, name: str,
                                                        settings: dict[str, Any]) -> None:
    model = _load(models, name, **settings)
    denoiser = getattr(model.pipe, "transformer", None) or model.pipe.unet
    calls = _count_calls(denoiser, "resnets.0.conv1" if settings["cache"] == "deepcache" else ".to_q")
    cached = _images(name, model)[0]
    # Every step ran the denoiser, but some of its blocks ran on fewer than the four.
    assert calls and max(calls.values()) <= 4 and min(calls.values()) < 4
    _close_but_not_equal(cached, reference(name))
    # A call with another batch size in between, then the first call again: the cache kept nothing across.
    _images(name, model, count=2)
    assert np.array_equal(_images(name, model)[0], cached)


@pytest.mark.parametrize("name, settings, message", [
    ("tiny-pixart-alpha", {"cache": "deepcache"}, "deepcache\" is for the SD UNets"),
    ("tiny-sd", {"cache": "first_block"}, "is for transformer denoisers.*UNets take \"deepcache\""),
    ("tiny-sd3", {"cache": "first_block"}, "cannot cache a SD3Transformer2DModel"),
    ("tiny-hunyuan-dit", {"cache": "first_block"}, "does not know the blocks of a HunyuanDiT2DModel"),
])
def test_a_cache_that_does_not_fit_the_model_fails_its_load(models: dict[str, Path], name: str,
                                                            settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _load(models, name, **settings)


def test_compile_wraps_the_denoiser(models: dict[str, Path]) -> None:
    # Compiling happens on the first call: a minute and more for the tiny SD on this CPU, so the
    # generation itself is the gpu test's; here, that the denoiser is set to compile in place.
    model = _load(models, "tiny-pixart-alpha", compile="max-autotune-no-cudagraphs")
    assert model.pipe.transformer._compiled_call_impl is not None
    assert _load(models, "tiny-pixart-alpha").pipe.transformer._compiled_call_impl is None


# -- on a GPU ---------------------------------------------------------------------------------------- #

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_keeps_the_weights_in_ram(models: dict[str, Path], offload: str) -> None:
    on_gpu = _images("tiny-sd", _load(models, "tiny-sd", device="cuda"))[0]
    model = _load(models, "tiny-sd", device="cuda", offload=offload)
    assert np.abs(_images("tiny-sd", model)[0] - on_gpu).mean() < 8
    assert model.pipe.unet.device.type in ("cpu", "meta")  # between calls, nothing of it stays on the GPU
    assert 0 < accel.offloaded_bytes(model.pipe, offload) < module_bytes(model.pipe)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(accel._c_compiler() is None, reason="compile on CUDA needs a C compiler for Triton")
def test_int4_and_compile_on_cuda(models: dict[str, Path]) -> None:
    family = get_family("sd1")
    plain = _images("tiny-sd", family.load(LoadRequest(models["tiny-sd"], device="cuda", dtype_name="bfloat16")))[0]
    entry = _entry("sd1", dtype="bfloat16", quantize="int4", compile=True)
    model = family.load(LoadRequest(models["tiny-sd"], device="cuda", dtype_name="bfloat16", entry=entry))
    assert any("Int4" in type(m.weight).__name__ for m in model.pipe.unet.modules() if isinstance(m, torch.nn.Linear))
    assert np.abs(_images("tiny-sd", model)[0] - plain).mean() < 8


# -- through atelier ------------------------------------------------------------------------------------- #

def test_settings_apply_through_atelier(shared_cluster: Cluster) -> None:
    async def go() -> list[Any]:
        async with shared_cluster.client() as client:
            results = []
            for model in ("quick-sd", "quick-sd", "wrong-cache", "offloaded"):
                record = await client.submit(JobSpec(model=model, prompt="a lighthouse", seed=7))
                results.append(await client.wait(record.spec.id, timeout=120))
            return results

    first, again, wrong, offloaded = run(go(), timeout=240)
    assert first.job.state is JobState.done and again.job.state is JobState.done
    images = [Image.open(io.BytesIO(bytes(r.outputs[0].data))) for r in (first, again)]
    assert images[0].size == (64, 64)
    assert images[0].tobytes() == images[1].tobytes()  # the cache starts every job afresh
    assert wrong.job.state is JobState.failed and "deepcache\" is for the SD UNets" in wrong.job.reason
    assert offloaded.job.state is JobState.failed and "needs a CUDA device" in offloaded.job.reason
