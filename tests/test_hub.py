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
