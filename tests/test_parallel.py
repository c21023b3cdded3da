"""Gangs below the actors: catalog layouts refused at load naming the field, and real two-rank gloo
gangs (diffusers' context parallelism, tests/parallel_rank.py) against one plain process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from atelier.config import Config, ParallelLayout
from atelier.registry import FAMILIES, auto_dtype, gang_families, is_cpu

ROOT = Path(__file__).resolve().parent.parent


def _config(models: dict, node: dict | None = None) -> Config:
    return Config.model_validate({"builtin_models": False, "models": models, **({"node": node} if node else {})})


def _refused(models: dict, node: dict | None = None) -> str:
    with pytest.raises(ValidationError) as caught:
        _config(models, node)
    return str(caught.value)


def _entry(family: str, **layout) -> dict:
    return {"family": family, "source": "/m", "parallel": layout}


@pytest.mark.parametrize("models, node, words", [
    ({"flux-dev": _entry("flux", backend="xfuser", cfg_degree=2)}, None,
     "models.flux-dev.parallel.cfg_degree: FLUX has no classifier-free guidance"),
    ({"flux-dev": _entry("flux", backend="diffusers", cfg_degree=2)}, None, "models.flux-dev.parallel.cfg_degree"),
    ({"xl": _entry("sdxl", backend="xfuser", ulysses_degree=2)}, None,
     "models.xl.parallel.ulysses_degree: xfuser does not split family 'sdxl' by ulysses_degree; xfuser takes "
     "cfg_degree"),
    ({"xl": _entry("sdxl", backend="diffusers", cfg_degree=2)}, None, "models.xl.parallel.backend"),
    ({"f": _entry("flux", backend="xfuser", ulysses_degree=2, ring_degree=2)}, {"gangs": [["cuda:0", "cuda:1"]]},
     "models.f.parallel: its size is 4 (ulysses_degree 2 x ring_degree 2), and no gang of [node] gangs has that "
     "many devices (their sizes: 2)"),
    ({"sd": _entry("sd1", backend="xfuser", ulysses_degree=2)}, None,
     "models.sd.parallel: family 'sd1' runs on single devices only"),
    ({"sd": _entry("sd1", backend="diffusers", ulysses_degree=2)}, None, "models.sd.parallel: family 'sd1'"),
    ({"m": _entry("sd3", backend="diffusers", ulysses_degree=2)}, None,
     "models.m.parallel.backend: diffusers 0.42.1 has no context parallelism for SD3"),
    ({"p": _entry("pixart-sigma", backend="diffusers", ulysses_degree=2)}, None, "models.p.parallel.backend"),
    ({"f": _entry("flux", backend="magic", ulysses_degree=2)}, None, "models.f.parallel.backend"),
    ({"f": _entry("flux", backend="diffusers", ulysses_degree=2, parallel_vae=True)}, None,
     "models.f.parallel.parallel_vae"),
    ({"f": _entry("flux", backend="diffusers")}, None, "models.f.parallel: every degree is 1"),
    ({"s": _entry("sd3", backend="xfuser", cfg_degree=3)}, None, "models.s.parallel.cfg_degree"),
    ({}, {"gangs": [["cuda:0", "cuda:0"]]}, "device 'cuda:0' is twice in it"),
    ({}, {"gangs": [["cuda:0", "cuda:1"], ["cuda:1", "cuda:2"]]}, "device 'cuda:1' is also in gang 0"),
    ({}, {"gangs": [["cuda:0"]]}, "a gang is 2 or more devices"),
    ({}, {"gangs": [["cuda:0", "gpu1"]]}, "device 'gpu1'"),
    ({}, {"devices": ["tpu:0"]}, "node.devices"),
])
def test_a_layout_that_does_not_fit_is_refused_naming_the_field(models, node, words):
    assert words in _refused(models or {"x": {"family": "sd1", "source": "/m"}}, node)


def test_layouts_that_fit_load():
    config = _config({"flux-dev": _entry("flux", backend="xfuser", ulysses_degree=2, pipefusion_degree=2),
                      "flux-cp": _entry("flux", backend="diffusers", ulysses_degree=2, ring_degree=2),
                      "sd3": _entry("sd3", backend="xfuser", ulysses_degree=2, cfg_degree=2, parallel_vae=True),
                      "xl": _entry("sdxl", backend="xfuser", cfg_degree=2, ulysses_degree=1),
                      "px": _entry("pixart-alpha", backend="xfuser", pipefusion_degree=2, warmup_steps=2,
                                   ring_degree=2),
                      "plain": {"family": "sd1", "source": "/m"}},
                     {"devices": ["cpu:0", "cuda:1", "cpu"], "gangs": [["cuda:0", "cuda:1", "cuda:2", "cuda:3"],
                                                                       ["cpu:0", "cpu:1"]]})
    assert config.models["flux-dev"].parallel.size == 4
    assert config.models["xl"].parallel.size == 2
    assert config.models["plain"].parallel is None
    assert config.node.gangs[1] == ["cpu:0", "cpu:1"]
    assert gang_families("diffusers") == {"flux"}
    assert gang_families("xfuser") == {"flux", "sd3", "pixart-alpha", "pixart-sigma", "hunyuan-dit", "sdxl"}
    # The video families run on single devices only (xDiT has no wrapper for SVD's or AnimateDiff's UNet).
    assert not FAMILIES["svd"].parallel and not FAMILIES["animatediff"].parallel
    assert is_cpu("cpu:3") and is_cpu("cpu") and not is_cpu("cuda:0")
    assert auto_dtype("flux", "cpu:1") == "float32"


def test_parallelize_refuses_what_the_gang_cannot_run(tiny_model):
    from atelier.families.parallel import output_rank, parallelize

    _, sd3, _ = tiny_model("tiny-sd3")
    with pytest.raises(ValueError, match="parallel.backend: diffusers 0.42.1 has no context parallelism for SD3"):
        parallelize(sd3, ParallelLayout(backend="diffusers", ulysses_degree=2), rank=0, world=2, device="cpu:0")
    _, flux, _ = tiny_model("tiny-flux")
    with pytest.raises(ValueError, match="parallel.ring_degree: ring attention does not run on the CPU"):
        parallelize(flux, ParallelLayout(backend="diffusers", ring_degree=2), rank=0, world=2, device="cpu:0")
    with pytest.raises(ValueError, match="spans 2 devices .* this gang has 4"):
        parallelize(flux, ParallelLayout(backend="diffusers", ulysses_degree=2), rank=0, world=4, device="cpu:0")
    with pytest.raises(RuntimeError, match="process group"):
        parallelize(flux, ParallelLayout(backend="diffusers", ulysses_degree=2), rank=0, world=2, device="cpu:0")
    assert output_rank(ParallelLayout(backend="diffusers", ulysses_degree=2), 2) == 0
    assert output_rank(ParallelLayout(backend="xfuser", ulysses_degree=2, cfg_degree=2), 4) == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(specs: list[dict], timeout: float = 150) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.parallel_rank", json.dumps(spec)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for spec in specs]
    try:
        outputs = [p.communicate(timeout=timeout)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]


# 64x64, 64x32 and 96x32: 16, 8 and 12 image tokens, split 2 ways. 48x48 (9 tokens) does not split evenly:
# refused on every rank alike, and the gang goes on.
_SIZES = [[64, 64], [48, 48], [64, 32], [96, 32]]


def test_a_two_rank_flux_gang_matches_one_process(tmp_path, atelier_home):
    """Two gloo ranks with diffusers' context parallelism (Ulysses 2) on the tiny FLUX serve requests of
    three sizes in a row on one process group, then a second model (a fresh load) on the same group and
    device mesh, and match a plain process."""
    from atelier.tiny_models import ensure_builtin

    path = ensure_builtin("tiny-flux", atelier_home / "models")
    base = {"world": 2, "port": _free_port(), "family": "flux", "path": str(path), "out": str(tmp_path),
            "requests": _SIZES, "steps": 2, "switch": True}
    layout = {"backend": "diffusers", "ulysses_degree": 2}
    _ranks([{**base, "rank": r, "layout": layout, "device": f"cpu:{r}"} for r in range(2)]
           + [{**base, "rank": 9, "world": 1, "layout": None}])
    reports = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1, 9)}
    for r in (0, 1):
        report = reports[r]
        assert report["groups_formed"] == 1 and len(report["times"]) == 3
        assert report["steps"] == [[1, 2]] * 3  # every rank's callback sees every step
        assert [index for index, _ in report["refused"]] == [1]
        assert "9 image tokens do not split evenly over this gang's 2 ranks" in report["refused"][0][1]
        # The first block sees half the image's tokens (the split is real), the plain process all of them.
        assert report["tokens"] == [8, 8, 4, 4, 6, 6, 8, 8]
        assert report["new_groups_on_switch"] == 0 and report["meshes"] == 1
    assert reports[9]["tokens"][:2] == [16, 16] and not reports[9]["refused"]
    for index in (0, 2, 3, "switch"):
        plain = np.load(tmp_path / f"rank9-{index}.npy")
        for r in (0, 1):
            images = np.load(tmp_path / f"rank{r}-{index}.npy")
            assert images.shape == plain.shape
            pixels = float(np.abs(images - plain).max())
            print(f"request {index} rank {r}: max abs pixel difference {pixels} (0-255)")
            assert pixels <= 1.0
            if index != "switch":
                latents = np.load(tmp_path / f"rank{r}-{index}-latents.npy")
                drift = float(np.abs(latents - np.load(tmp_path / f"rank9-{index}-latents.npy")).max())
                print(f"request {index} rank {r}: max abs latent difference {drift:.2e}")
                assert drift < 1e-4


def _xfuser_importable() -> bool:
    try:
        import xfuser  # noqa: F401
    except Exception:  # ImportError, or its own import failing without CUDA/triton
        return False
    return True


@pytest.mark.gpu
def test_xfuser_one_rank_matches_plain_diffusers(tmp_path, atelier_home):
    """xfuser with one rank (world 1: xDiT runs the pipeline as it is) on the tiny FLUX, on CUDA, against
    plain diffusers on the same GPU."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not _xfuser_importable():
        pytest.skip("xfuser is not installed (the multigpu extra)")
    from atelier.tiny_models import ensure_builtin

    path = ensure_builtin("tiny-flux", atelier_home / "models")
    base = {"world": 1, "port": _free_port(), "family": "flux", "path": str(path), "out": str(tmp_path),
            "requests": [[64, 64], [64, 32]], "steps": 2, "device": "cuda:0"}
    _ranks([{**base, "rank": 0, "layout": {"backend": "xfuser"}}], timeout=300)
    (tmp_path / "plain").mkdir()
    _ranks([{**base, "rank": 0, "layout": None, "out": str(tmp_path / "plain")}], timeout=300)
    for index in (0, 1):
        pixels = float(np.abs(np.load(tmp_path / f"rank0-{index}.npy")
                              - np.load(tmp_path / "plain" / f"rank0-{index}.npy")).max())
        print(f"request {index}: xfuser against diffusers, max abs pixel difference {pixels}")
        assert pixels <= 2.0
