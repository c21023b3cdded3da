"""The family side of the CUDA review (issue 14): what the offload hooks, float16 and from_pipe do to a
model, on the tiny built-in models. What shows on the CPU is tested here on the CPU; what only CUDA
shows is marked ``gpu`` (run by bench/gpu_check.py on a GPU machine, skipped elsewhere)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub

from atelier import staging  # noqa: E402
from atelier.config import ModelEntry  # noqa: E402
from atelier.families import GenerateRequest, get_family, vae  # noqa: E402
from atelier.families.loaded import LoadedModel, LoadRequest  # noqa: E402
from atelier.families.loading import seeded_generators  # noqa: E402
from atelier.registry import FAMILIES, auto_dtype  # noqa: E402
from atelier.tiny_models import BUILTIN, ensure_builtin  # noqa: E402

pytestmark = pytest.mark.timeout(300)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def models(atelier_home: Path) -> Path:
    return atelier_home / "models"


def _load(models: Path, name: str, *, device: str = "cpu", dtype: str = "float32", **entry: Any) -> LoadedModel:
    family = BUILTIN[name]
    settings = {"entry": ModelEntry(family=family, source="unused", **entry)} if entry else {}
    return get_family(family).load(LoadRequest(ensure_builtin(name, models), device=device, dtype_name=dtype,
                                               **settings))


def _request(seed: int = 7, **extra: Any) -> GenerateRequest:
    return GenerateRequest.single(prompt="a lighthouse", negative_prompt=None, width=64, height=48, steps=3,
                                  guidance=5.0, seed=seed, **extra)


def _pixels(model: LoadedModel, request: GenerateRequest | None = None) -> np.ndarray:
    image = model.generate(request or _request(), lambda *_: None)[0]
    return np.asarray(image, dtype=np.float64)


def _image(width: int = 64, height: int = 48) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    y = np.linspace(255, 0, height, dtype=np.uint8)[:, None, None]
    return Image.fromarray(np.concatenate(np.broadcast_arrays(x, y, x // 2 + y // 2), axis=2).copy())


def _fails_once(monkeypatch: pytest.MonkeyPatch, cls: type, method: str) -> list[int]:
    """``cls.method`` raising a CUDA OOM on its first call, then working; the list counts the calls."""
    original = getattr(cls, method)
    calls: list[int] = []

    def failing(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, failing)
    return calls


# -- F1: seeded generators on the execution device ------------------------------------------------------ #

def test_f1_generators_follow_the_execution_device_under_offload(models: Path) -> None:
    plain = _pixels(_load(models, "tiny-sd"))
    sequential = _load(models, "tiny-sd")
    sequential.pipe.enable_sequential_cpu_offload(device="cpu")  # the GPU's place taken by the CPU
    assert sequential.pipe.device.type == "meta"  # what a generator cannot be made on
    # (A whole generation under sequential offload onto the CPU fails inside accelerate, which moves the
    # weights back to meta as plain tensors: the gpu test below runs one on CUDA.)
    assert [g.device.type for g in seeded_generators(sequential.pipe, [1, 2])] == ["cpu", "cpu"]

    modelwise = _load(models, "tiny-sd")
    modelwise.pipe.enable_model_cpu_offload(device="cpu")
    assert np.array_equal(_pixels(modelwise), plain)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_f1_on_cuda_offload_gives_the_image_of_the_same_seed(models: Path, offload: str) -> None:
    on_gpu = _pixels(_load(models, "tiny-sd", device="cuda"))
    model = _load(models, "tiny-sd", device="cuda", offload=offload)
    assert [g.device.type for g in seeded_generators(model.pipe, [1])] == ["cuda"]
    # The same Philox noise: only the order of float sums may differ.
    assert np.abs(_pixels(model) - on_gpu).mean() < 1


# -- F2: the VAE's dtype after a failed decode ---------------------------------------------------------- #

def test_f2_a_failed_decode_leaves_the_sdxl_vae_in_float16(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import AutoencoderKL

    model = _load(models, "tiny-sdxl", dtype="float16")
    assert model.pipe.vae.config.force_upcast  # the pipeline upcasts the VAE to float32 for its decode
    calls = _fails_once(monkeypatch, AutoencoderKL, "decode")
    with pytest.raises(torch.OutOfMemoryError):
        _pixels(model)
    assert model.pipe.vae.dtype == torch.float16
    image = _pixels(model)  # the next job works
    assert calls and image.shape == (48, 64, 3)
    # The img2img variant shares the VAE, and is put back the same way.
    calls.clear()
    with pytest.raises(torch.OutOfMemoryError):
        _pixels(model, _request(image=_image(), strength=0.7))
    assert model.pipe.vae.dtype == torch.float16
    assert _pixels(model, _request(image=_image(), strength=0.7)).shape == (48, 64, 3)


def test_f2_a_failed_decode_leaves_the_upscalers_vae_in_float16(models: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import AutoencoderKL

    model = _load(models, "tiny-sd-upscaler", dtype="float16")
    request = GenerateRequest.single(prompt="a lighthouse", negative_prompt=None, width=32, height=24, steps=2,
                                     guidance=5.0, seed=7, image=_image(32, 24))
    _fails_once(monkeypatch, AutoencoderKL, "decode")
    with pytest.raises(torch.OutOfMemoryError):
        _pixels(model, request)
    assert model.pipe.vae.dtype == torch.float16
    assert _pixels(model, request).shape == (96, 128, 3)


def test_f2_a_failed_encode_leaves_the_svd_vae_in_float16(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import AutoencoderKLTemporalDecoder

    model = _load(models, "tiny-svd", dtype="float16")
    assert model.pipe.vae.config.force_upcast  # the pipeline upcasts the VAE to float32 for its encode
    request = GenerateRequest.single(prompt="", negative_prompt=None, width=64, height=48, steps=2, guidance=3.0,
                                     seed=7, image=_image(), frames=3, fps=7)
    _fails_once(monkeypatch, AutoencoderKLTemporalDecoder, "encode")
    with pytest.raises(torch.OutOfMemoryError):
        model.generate(request, lambda *_: None)
    assert model.pipe.vae.dtype == torch.float16
    assert len(model.generate(request, lambda *_: None)[0].frames) == 3


@pytest.mark.gpu
@needs_cuda
def test_f2_on_cuda_the_sdxl_vae_stays_float16_after_an_oom(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import AutoencoderKL

    model = _load(models, "tiny-sdxl", device="cuda", dtype="float16")
    before = _pixels(model)
    _fails_once(monkeypatch, AutoencoderKL, "decode")
    with pytest.raises(torch.OutOfMemoryError):
        _pixels(model)
    assert model.pipe.vae.dtype == torch.float16
    assert np.abs(_pixels(model) - before).mean() < 1


# -- F4: a staged AnimateDiff keeps its dtype -------------------------------------------------------------- #

def test_f4_a_staged_animatediff_with_a_motion_adapter_keeps_float16(models: Path, tmp_path: Path) -> None:
    if staging.SHM_ROOT is None:
        pytest.skip("needs /dev/shm")
    sd15 = ensure_builtin("tiny-sd", models)
    adapter = ensure_builtin("tiny-animatediff", models) / "motion_adapter"
    segment = staging.SHM_ROOT / f"atelier-test-{tmp_path.name}"
    try:
        table = staging.stage(sd15, segment)
        request = LoadRequest(sd15, device="cpu", dtype_name="float16", options={"motion_adapter": str(adapter)},
                              weights=staging.state_dicts(staging.map_segment(segment), table))
        pipe = get_family("animatediff").load(request).pipe
    finally:
        segment.unlink(missing_ok=True)
    dtypes = {name: {p.dtype for p in module.parameters()} for name, module in pipe.components.items()
              if isinstance(module, torch.nn.Module)}
    assert dtypes and all(found == {torch.float16} for found in dtypes.values()), dtypes


# -- F9: what "auto" means ------------------------------------------------------------------------------- #

def test_f9_auto_is_bfloat16_for_the_families_float16_breaks_on_an_ampere_or_later_gpu() -> None:
    wanted = {"flux", "sd3", "pixart-sigma", "hunyuan-dit"}
    assert {name for name, spec in FAMILIES.items() if spec.bfloat16_auto} == wanted
    for family in FAMILIES:
        assert auto_dtype(family, "cpu") == "float32"
        assert auto_dtype(family, "cuda:0", (9, 0)) == ("bfloat16" if family in wanted else "float16")
        assert auto_dtype(family, "cuda:1", (7, 5)) == "float16"  # a T4: no bfloat16 worth the name
    entry = ModelEntry(family="flux", source="unused")
    assert LoadRequest.for_entry(entry, None, device="cpu", model_cache=Path("/nowhere")).dtype_name == "float32"


@pytest.mark.gpu
@needs_cuda
def test_f9_on_cuda_auto_loads_flux_in_bfloat16(models: Path) -> None:
    entry = ModelEntry(family="flux", source="unused")
    request = LoadRequest.for_entry(entry, ensure_builtin("tiny-flux", models), device="cuda:0",
                                    model_cache=models)
    expected = "bfloat16" if torch.cuda.get_device_capability(0) >= (8, 0) else "float16"
    assert request.dtype_name == expected
    model = get_family("flux").load(request)
    assert model.pipe.transformer.dtype == getattr(torch, expected)
    assert np.isfinite(_pixels(model)).all()


# -- F10: offload with ControlNets ------------------------------------------------------------------------ #

def test_f10_offload_with_controlnets_is_refused_in_the_catalog() -> None:
    for offload in ("model", "sequential"):
        with pytest.raises(ValidationError, match="does not go with controlnets"):
            ModelEntry(family="sd1", source="unused", offload=offload, controlnets={"edges": "/somewhere"})
    ModelEntry(family="sd1", source="unused", controlnets={"edges": "/somewhere"})  # either alone is fine
    ModelEntry(family="sd1", source="unused", offload="model")


# -- F16: the preview decoder on the runner's device -------------------------------------------------- #

@pytest.fixture(scope="module")
def taesd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from atelier.tiny.previews import build_tiny_taesd

    return build_tiny_taesd(tmp_path_factory.mktemp("taesd") / "taesd")


def test_f16_the_preview_decoder_lives_on_the_runners_device_not_the_vaes(models: Path, taesd: Path) -> None:
    model = _load(models, "tiny-sd")
    model.pipe.enable_sequential_cpu_offload(device="cpu")  # the VAE's weights now on meta
    assert model.pipe.vae.device.type == "meta"
    vae.load_vaes(model, ModelEntry(family="sd1", source="unused", preview_decoder=str(taesd)), "cpu")
    assert {p.device.type for p in model.preview_decoder.decoder.parameters()} == {"cpu"}
    assert model.previewer.preview(torch.randn(1, 4, 6, 8), 0).dtype == np.uint8


@pytest.mark.gpu
@needs_cuda
def test_f16_on_cuda_an_offloaded_models_previews_decode_on_the_gpu(models: Path, taesd: Path) -> None:
    model = _load(models, "tiny-sd", device="cuda", dtype="float16", offload="model", preview_decoder=str(taesd))
    assert model.pipe.vae.device.type == "cpu"
    assert model.preview_decoder.decoder.device.type == "cuda"
    assert model.previewer.preview(torch.randn(1, 4, 6, 8, device="cuda"), 0).dtype == np.uint8


# -- Minor: a from_pipe variant under model offload --------------------------------------------------- #

def test_a_variant_call_under_model_offload_puts_the_models_back(models: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = _load(models, "tiny-sd")
    pipe = model.pipe
    pipe.enable_model_cpu_offload(device="cpu")
    freed: list[int] = []
    free = pipe.maybe_free_model_hooks
    monkeypatch.setattr(pipe, "maybe_free_model_hooks", lambda: (freed.append(1), free())[1])
    _pixels(model)  # the pipeline's own call frees its hooks itself, once
    assert len(freed) == 1
    freed.clear()
    _pixels(model, _request(image=_image(), strength=0.7))  # the variant's frees nothing of the base's
    assert len(freed) == 1


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_an_img2img_call_under_model_offload_leaves_the_gpu_empty(models: Path) -> None:
    model = _load(models, "tiny-sd", device="cuda", dtype="float16", offload="model")
    for request in (_request(), _request(image=_image(), strength=0.7)):
        _pixels(model, request)
        on_gpu = [name for name, module in model.pipe.components.items() if isinstance(module, torch.nn.Module)
                  and any(p.device.type == "cuda" for p in module.parameters())]
        assert on_gpu == [], f"{on_gpu} left on the GPU after a call"
