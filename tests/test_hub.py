"""Hub ids as catalog sources: found in the Hugging Face cache that `huggingface-cli download` fills,
fetched only where a node allows downloads, and never a pickle."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Before anything imports huggingface_hub: nothing here may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from atelier import hub, sources, tiny_models  # noqa: E402
from atelier.config import ModelEntry  # noqa: E402

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache: Path, repo_id: str, folder: Path) -> Path:
    """``folder`` as the Hugging Face cache holds a downloaded repository: a snapshot per revision and a
    ref naming the revision of ``main``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(folder, snapshot)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    return cache


def test_what_counts_as_a_hub_id(tmp_path: Path) -> None:
    assert hub.is_hub_id("stabilityai/sdxl-turbo") and hub.is_hub_id("black-forest-labs/FLUX.1-schnell")
    for not_one in ("sdxl-turbo", "/models/sdxl", "./sdxl/turbo", "a/b/c", "../x/y", "builtin:tiny-sd"):
        assert not hub.is_hub_id(not_one), not_one
    (tmp_path / "org" / "name").mkdir(parents=True)
    os.chdir(tmp_path)
    try:
        assert not hub.is_hub_id("org/name")  # a folder that exists here is a folder
    finally:
        os.chdir(Path(__file__).parent.parent)


def test_a_cached_repo_is_found_without_downloads(hub_cache: Path, atelier_home: Path) -> None:
    folder = tiny_models.ensure_builtin("tiny-sd", atelier_home / "models")
    snapshot = _cache_repo(hub_cache, "atelier-test/tiny-sd", folder)
    entry = ModelEntry(family="sd1", source="atelier-test/tiny-sd")
    assert sources.resolve("hubbed", entry, atelier_home / "models") == snapshot


def test_an_uncached_repo_says_how_to_get_it(hub_cache: Path, tmp_path: Path) -> None:
    entry = ModelEntry(family="sd1", source="atelier-test/nowhere")
    with pytest.raises(sources.ModelSourceError) as refused:
        sources.resolve("missing", entry, tmp_path)
    assert "not in this host's Hugging Face cache" in str(refused.value)
    assert "huggingface-cli download atelier-test/nowhere" in str(refused.value)
    assert "downloads = true" in str(refused.value)
    with pytest.raises(sources.ModelSourceError, match="the hub cannot be reached"):
        sources.resolve("missing", entry, tmp_path, downloads=True)  # allowed, but this host is offline


def test_a_cached_repo_that_is_not_a_pipeline_is_refused(hub_cache: Path, tmp_path: Path) -> None:
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "config.json").write_text("{}")
    _cache_repo(hub_cache, "atelier-test/a-unet", lone)
    entry = ModelEntry(family="sd1", source="atelier-test/a-unet")
    with pytest.raises(sources.ModelSourceError, match="not a diffusers pipeline"):
        sources.resolve("unet", entry, tmp_path)


def test_only_safe_files_are_ever_fetched() -> None:
    assert "*.safetensors" in hub.FILES and "*.json" in hub.FILES
    assert not any(pattern.endswith((".bin", ".ckpt", ".pt", ".pth", "*")) for pattern in hub.FILES)


# A repository as the hub lists it: fp32, fp16 and EMA weights side by side, a sharded transformer, a VAE
# without an fp16 file, and the pickles older tools left beside them.
LISTING = [
    "model_index.json", "README.md", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
    "tokenizer/merges.txt", "tokenizer_2/spiece.model",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.ema.safetensors", "unet/diffusion_pytorch_model.fp16.bin",
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json",
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.fp16.json",
    "transformer/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
    "transformer/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "sd_xl_base_1.0.safetensors",
]
CONFIGS = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
           "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer_2/spiece.model", "transformer/config.json",
           "transformer/diffusion_pytorch_model.safetensors.index.fp16.json",
           "transformer/diffusion_pytorch_model.safetensors.index.json", "unet/config.json", "vae/config.json"]


def test_a_download_takes_only_the_variants_weights() -> None:
    fp16 = set(hub.wanted(LISTING, "fp16"))
    assert fp16 == {*CONFIGS, "text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                    "transformer/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
                    "transformer/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
                    "vae/diffusion_pytorch_model.safetensors"}  # no fp16 VAE: its plain one, as diffusers does
    plain = set(hub.wanted(LISTING, None))
    assert plain == {*CONFIGS, "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                     "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
                     "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
                     "vae/diffusion_pytorch_model.safetensors"}
    # Never a pickle, nor the single-file copy of the whole model at the top.
    assert not any(f.endswith((".bin", ".md")) or "/" not in f and f.endswith(".safetensors") for f in fp16 | plain)


def test_a_downloading_node_that_is_offline_uses_its_cache(hub_cache: Path, atelier_home: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_models.ensure_builtin("tiny-sd", atelier_home / "models")
    snapshot = _cache_repo(hub_cache, "atelier-test/tiny-sd", folder)
    entry = ModelEntry(family="sd1", source="atelier-test/tiny-sd")
    assert sources.resolve("hubbed", entry, atelier_home / "models", downloads=True) == snapshot
