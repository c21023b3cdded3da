"""Gangs below the actors: catalog layouts refused at load naming the field, and real two-rank gloo
gangs (diffusers' context parallelism, tests/parallel_rank.py) against one plain process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
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
    ({"m": _entry("sd3", backend="diffusers", ring_degree=2)}, None,
     "models.m.parallel.ring_degree: SD3's joint sequence (77 CLIP + 256 T5 text tokens by default) splits "
     "unevenly"),
    ({"p": _entry("pixart-sigma", backend="diffusers", ulysses_degree=2)}, None, "models.p.parallel.backend"),
    ({"f": _entry("flux", backend="magic", ulysses_degree=2)}, None, "models.f.parallel.backend"),
    ({"f": _entry("flux", backend="diffusers", ulysses_degree=2, parallel_vae=True)}, None,
     "models.f.parallel.parallel_vae"),
    ({"f": _entry("flux", backend="diffusers")}, None, "models.f.parallel: every degree is 1"),
    ({"px": _entry("pixart-alpha", backend="xfuser", pipefusion_degree=2, warmup_steps=2)}, None,
     "models.px.parallel.pipefusion_degree: xDiT's PipeFusion calls the step callback only on its last pipeline stage"),
    ({"s": _entry("sd3", backend="xfuser", cfg_degree=3)}, None, "models.s.parallel.cfg_degree"),
    ({"f": {**_entry("flux", backend="xfuser", ulysses_degree=2), "offload": "model"}}, None,
     "models.f.parallel: offload = 'model' does not go with a gang"),
    ({"f": {**_entry("flux", backend="diffusers", ulysses_degree=2), "cache": "first_block"}}, None,
     "models.f.parallel: cache = 'first_block' does not go with a gang"),
    ({}, {"gangs": [["cuda:0", "cuda:0"]]}, "device 'cuda:0' is twice in it"),
    ({}, {"gangs": [["cuda:0", "cuda:1"], ["cuda:1", "cuda:2"]]}, "device 'cuda:1' is also in gang 0"),
    ({}, {"gangs": [["cuda:0"]]}, "a gang is 2 or more devices"),
    ({}, {"gangs": [["cuda:0", "gpu1"]]}, "device 'gpu1'"),
    ({}, {"devices": ["tpu:0"]}, "node.devices"),
])
def test_a_layout_that_does_not_fit_is_refused_naming_the_field(models, node, words):
    assert words in _refused(models or {"x": {"family": "sd1", "source": "/m"}}, node)


def test_layouts_that_fit_load():
    config = _config({"flux-dev": _entry("flux", backend="xfuser", ulysses_degree=2, ring_degree=2),
                      "flux-cp": _entry("flux", backend="diffusers", ulysses_degree=2, ring_degree=2),
                      "sd3-cp": _entry("sd3", backend="diffusers", ulysses_degree=4),
                      "sd3": _entry("sd3", backend="xfuser", ulysses_degree=2, cfg_degree=2, parallel_vae=True),
                      "xl": _entry("sdxl", backend="xfuser", cfg_degree=2, ulysses_degree=1),
                      "px": _entry("pixart-alpha", backend="xfuser", cfg_degree=2, ring_degree=2),
                      "plain": {"family": "sd1", "source": "/m"}},
                     {"devices": ["cpu:0", "cuda:1", "cpu"], "gangs": [["cuda:0", "cuda:1", "cuda:2", "cuda:3"],
                                                                       ["cpu:0", "cpu:1"]]})
    assert config.models["flux-dev"].parallel.size == 4
    assert config.models["xl"].parallel.size == 2
    assert config.models["plain"].parallel is None
    assert config.node.gangs[1] == ["cpu:0", "cpu:1"]
    assert gang_families("diffusers") == {"flux", "sd3", "costmodel"}  # the cost model: bench/multigpu.py
    assert gang_families("xfuser") == {"flux", "sd3", "pixart-alpha", "pixart-sigma", "hunyuan-dit", "sdxl"}
    # The video families run on single devices only (xDiT has no wrapper for SVD's or AnimateDiff's UNet).
    assert not FAMILIES["svd"].parallel and not FAMILIES["animatediff"].parallel
    assert is_cpu("cpu:3") and is_cpu("cpu") and not is_cpu("cuda:0")
    assert auto_dtype("flux", "cpu:1") == "float32"


def test_parallelize_refuses_what_the_gang_cannot_run(tiny_model):
    from atelier.families.parallel import output_rank, parallelize

    _, flux, _ = tiny_model("tiny-flux")
    with pytest.raises(ValueError, match="parallel.cfg_degree: FLUX has no classifier-free guidance"):
        parallelize(flux, ParallelLayout(backend="xfuser", cfg_degree=2), rank=0, world=2, device="cuda:0")
    with pytest.raises(ValueError, match="parallel.ring_degree: ring attention does not run on the CPU"):
        parallelize(flux, ParallelLayout(backend="diffusers", ring_degree=2), rank=0, world=2, device="cpu:0")
    with pytest.raises(ValueError, match="spans 2 devices .* this gang has 4"):
        parallelize(flux, ParallelLayout(backend="diffusers", ulysses_degree=2), rank=0, world=4, device="cpu:0")
    with pytest.raises(RuntimeError, match="process group"):
        parallelize(flux, ParallelLayout(backend="diffusers", ulysses_degree=2), rank=0, world=2, device="cpu:0")
    assert output_rank(ParallelLayout(backend="diffusers", ulysses_degree=2), 2) == 0
    assert output_rank(ParallelLayout(backend="xfuser", ulysses_degree=2, cfg_degree=2), 4) == 3
    # With xDiT's parallel VAE the decode is gathered on rank 0 (is_dp_last_group, xfuser 0.7).
    assert output_rank(ParallelLayout(backend="xfuser", ulysses_degree=2, parallel_vae=True), 2) == 0


def test_xfusers_step_callback_reaches_atelier_once_per_step_numbered_from_0():
    """xDiT's pipelines restart the step index after their warm-up steps and call once per patch (PipeFusion):
    atelier's callback must see each step once, in order, numbered 0 … n-1."""
    from atelier.families.parallel import _once_per_step

    seen = []
    once = _once_per_step(lambda pipe, index, timestep, tensors: seen.append((index, timestep)) or {})
    timesteps = [999.0, 750.0, 500.0, 250.0]
    for index, t in enumerate(timesteps[:1]):  # one warm-up step
        once(None, index, t, {})
    for index, t in enumerate(timesteps[1:]):  # the pipelined loop: from 0 again, two patches a step
        for _ in range(2):
            once(None, index, t, {})
    assert seen == list(enumerate(timesteps))


def test_a_flux_preview_unpacks_a_ranks_shard_of_the_sequence():
    """Under xDiT's sequence parallelism a rank's step latents are whole rows of the token sequence."""
    import types

    import torch

    from atelier.families import GenerateRequest, get_family

    flux = get_family("flux")
    pipe = types.SimpleNamespace(vae_scale_factor=8)
    request = GenerateRequest.single(prompt="p", negative_prompt=None, width=64, height=64, steps=2, guidance=3.5,
                                     seed=1)
    whole = flux._spatial(pipe, torch.zeros(1, 16, 64), request)  # 4x4 patches of 16 px
    half = flux._spatial(pipe, torch.zeros(1, 8, 64), request)  # the first two rows of them
    assert whole.shape[-2:] == (8, 8) and half.shape[-2:] == (4, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(specs: list[dict], timeout: float = 150, meanwhile=None) -> None:
    """Runs a process per spec (tests/parallel_rank.py) and waits for them all; ``meanwhile()`` runs here
    while they do. Their output goes to files (a pipe one of them filled would block it in a collective,
    and the others with it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    logs = [Path(spec["out"]) / f"rank{spec['rank']}.log" for spec in specs]
    procs = []
    for spec, log in zip(specs, logs, strict=True):
        with open(log, "wb") as sink:
            procs.append(subprocess.Popen([sys.executable, "-m", "tests.parallel_rank", json.dumps(spec)], cwd=ROOT,
                                          env=env, stdout=sink, stderr=subprocess.STDOUT))
    try:
        if meanwhile is not None:
            meanwhile()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log.read_text(errors="replace")[-4000:]


# 64x64, 64x32 and 96x32: 16, 8 and 12 image tokens (FLUX and SD3 alike: one per 16x16 px), split 2 ways.
# 48x48 (9 tokens) does not split evenly: refused on every rank alike, and the gang goes on.
_SIZES = [[64, 64], [48, 48], [64, 32], [96, 32]]


def test_a_two_rank_gang_matches_one_process_across_sizes_and_models(tmp_path, tiny_model):
    """Two gloo ranks with diffusers' context parallelism (Ulysses 2) serve the tiny FLUX at three sizes in
    a row, then the tiny SD3, then FLUX again (model switches inside the gang), on one process group and
    one device mesh, and match the same requests on the session's plain models, run here meanwhile."""
    from tests.parallel_rank import serve

    (_, flux, flux_path), (_, sd3, sd3_path) = tiny_model("tiny-flux"), tiny_model("tiny-sd3")
    models = [{"family": "flux", "path": str(flux_path), "requests": _SIZES},
              {"family": "sd3", "path": str(sd3_path), "requests": _SIZES},
              {"family": "flux", "path": str(flux_path), "requests": _SIZES[:1]}]
    base = {"world": 2, "port": _free_port(), "out": str(tmp_path), "models": models, "steps": 2,
            "layout": {"backend": "diffusers", "ulysses_degree": 2}}
    plain: dict = {"times": [], "steps": [], "refused": [], "tokens": []}

    def reference() -> None:
        for i, (model, entry) in enumerate(zip([flux, sd3, flux], models, strict=True)):
            serve(model, i, entry["requests"], 2, tmp_path, "rank9", plain)

    _ranks([{**base, "rank": r, "device": f"cpu:{r}"} for r in range(2)], meanwhile=reference)
    reports = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)} | {9: plain}
    for r in (0, 1):
        report = reports[r]
        assert report["steps"] == [[1, 2]] * 7  # every rank's callback sees every step
        assert [(i, j) for i, j, _ in report["refused"]] == [(0, 1), (1, 1)]
        assert "9 image tokens do not split evenly over this gang's 2 ranks" in report["refused"][0][2]
        # The first block sees half the image's tokens (the split is real); the plain process all of them.
        halves = [tokens for _, tokens in report["tokens"]]
        assert halves == [8, 8, 4, 4, 6, 6] * 2 + [8, 8]
        assert report["new_groups_after_first"] == 0 and report["meshes"] == 1
    assert [tokens for _, tokens in reports[9]["tokens"]][:2] == [16, 16] and not reports[9]["refused"]
    for i, j in [(0, 0), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3), (2, 0)]:
        plain = np.load(tmp_path / f"rank9-{i}-{j}.npy")
        plain_latents = np.load(tmp_path / f"rank9-{i}-{j}-latents.npy")
        for r in (0, 1):
            images = np.load(tmp_path / f"rank{r}-{i}-{j}.npy")
            assert images.shape == plain.shape
            pixels = float(np.abs(images - plain).max())
            drift = float(np.abs(np.load(tmp_path / f"rank{r}-{i}-{j}-latents.npy") - plain_latents).max())
            print(f"{models[i]['family']} {_SIZES[j]} rank {r}: max abs difference {pixels} in pixels (0-255), "
                  f"{drift:.1e} in the last latents")
            assert pixels <= 1.0 and drift < 1e-4


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
    base = {"world": 1, "port": _free_port(), "out": str(tmp_path), "steps": 2, "device": "cuda:0",
            "models": [{"family": "flux", "path": str(path), "requests": [[64, 64], [64, 32]]}]}
    _ranks([{**base, "rank": 0, "layout": {"backend": "xfuser"}}], timeout=300)
    (tmp_path / "plain").mkdir()
    _ranks([{**base, "rank": 0, "layout": None, "out": str(tmp_path / "plain")}], timeout=300)
    for index in (0, 1):
        pixels = float(np.abs(np.load(tmp_path / f"rank0-0-{index}.npy")
                              - np.load(tmp_path / "plain" / f"rank0-0-{index}.npy")).max())
        print(f"request {index}: xfuser against diffusers, max abs pixel difference {pixels}")
        assert pixels <= 2.0
