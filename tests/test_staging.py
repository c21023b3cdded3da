"""Weights staged in shared memory: same images as from_pretrained, no copies, a budget that holds."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import pytest

from actors.loader import LEASE_S, BudgetError, StagedSet
from actors.messages import Staged
from atelier import staging
from atelier.families import GenerateRequest, get_family
from atelier.families.loaded import LoadRequest  # noqa: E402
from atelier.tiny_models import ensure_builtin

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(staging.SHM_ROOT is None, reason="needs /dev/shm")]


@pytest.fixture(scope="module")
def tiny_sd(atelier_home) -> Path:
    return ensure_builtin("tiny-sd", atelier_home / "models")


@pytest.fixture
def segment(tmp_path):
    path = staging.SHM_ROOT / f"atelier-test-{tmp_path.name}"
    yield path
    path.unlink(missing_ok=True)


def test_staged_model_gives_the_same_image_bit_for_bit(tiny_sd, segment):
    table = staging.stage(tiny_sd, segment)
    assert {f.component for f in table} == {"unet", "vae", "text_encoder"}
    weights = staging.state_dicts(staging.map_segment(segment), table)
    family = get_family("sd1")
    staged = family.load(LoadRequest(tiny_sd, device="cpu", weights=weights))
    disk = family.load(LoadRequest(tiny_sd, device="cpu"))
    request = GenerateRequest.single(prompt="a lighthouse", negative_prompt="fog", width=64, height=64, steps=3,
                              guidance=7.5, seed=11, count=2)
    from_staged = family.generate(staged, request, lambda *_: None)
    from_disk = family.generate(disk, request, lambda *_: None)
    assert [i.tobytes() for i in from_staged] == [i.tobytes() for i in from_disk]


def test_tensors_are_views_of_the_segment_and_writes_stay_private(tiny_sd, segment):
    table = staging.stage(tiny_sd, segment)
    mapping = staging.map_segment(segment)
    start = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    unet = staging.state_dicts(mapping, table)["unet"]
    weight = next(iter(unet.values()))
    assert start <= weight.data_ptr() < start + len(mapping)  # no copy was made
    before = weight.flatten()[0].item()
    weight.flatten()[0] = before + 1  # e.g. fusing a LoRA into this runner's copy
    again = staging.state_dicts(staging.map_segment(segment), table)["unet"]
    assert next(iter(again.values())).flatten()[0].item() == before  # the shared copy is untouched


def test_a_damaged_file_is_a_clear_error(tiny_sd, segment, tmp_path):
    table = staging.stage(tiny_sd, segment)
    bad = [f.model_copy(update={"length": 16}) if f.component == "unet" else f for f in table]
    with pytest.raises(staging.StagingError, match="unet"):
        staging.state_dicts(staging.map_segment(segment), bad)
    pickled = tmp_path / "pickled"
    (pickled / "unet").mkdir(parents=True)
    (pickled / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", '
                                              '"unet": ["diffusers", "UNet2DConditionModel"]}')
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(staging.StagingError, match="pickle"):
        staging.plan(pickled)


def staged(model: str, size: int) -> Staged:
    return Staged(model=model, path="/m/" + model, bytes=size, segment=None)


def test_budget_evicts_least_recently_used_and_spares_leased_models():
    held = StagedSet(budget=100)
    now = 1000.0
    held.add(staged("a", 40), now)
    held.add(staged("b", 40), now)
    later = now + LEASE_S + 1  # both leases over
    held.get("a", later)  # a was used since: b is the older
    evicted = held.make_room("c", 40, later)
    assert [e.model for e in evicted] == ["b"]
    held.add(staged("c", 40), later)
    assert held.used == 80 <= held.budget
    # c is leased again (a runner is mapping it right now): d cannot fit without it, and the
    # refusal costs no one their segment.
    again = later + LEASE_S + 1
    held.get("c", again)
    with pytest.raises(BudgetError, match="loading now"):
        held.make_room("d", 70, again)
    assert set(held.items) == {"a", "c"}
    # Once the runner has built its model from c, the name may go.
    held.release("c")
    assert {e.model for e in held.make_room("d", 70, again)} == {"a", "c"}


def test_a_model_larger_than_the_budget_names_both_sizes():
    with pytest.raises(BudgetError) as caught:
        StagedSet(budget=1_000).make_room("huge", 5_000, time.monotonic())
    assert "5,000" in str(caught.value) and "1,000" in str(caught.value)


MAPPER = """
import sys, time
from pathlib import Path
from actors.messages import StagedFile
from atelier import staging
table = [StagedFile.model_validate_json(line) for line in sys.argv[2:]]
weights = staging.state_dicts(staging.map_segment(Path(sys.argv[1])), table)
total = sum(float(t.double().sum()) for sd in weights.values() for t in sd.values())  # touch every page
print("mapped", flush=True)
sys.stdin.readline()  # hold the mapping until the test has measured
"""


def _pss_shmem_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss_Shmem:"):
            return int(line.split()[1])
    pytest.skip("this kernel reports no Pss_Shmem")


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs /proc/<pid>/smaps_rollup")
def test_two_runners_share_one_staged_copy(tmp_path, segment):
    import subprocess
    import sys

    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "big"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", '
                                             '"unet": ["diffusers", "UNet2DConditionModel"]}')
    save_file({"w": torch.ones(32 << 20, dtype=torch.float32)}, folder / "unet" / "diffusion_pytorch_model.safetensors")
    table = staging.stage(folder, segment)
    size_kib = staging.segment_bytes(table) // 1024
    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-c", MAPPER, str(segment), *(f.model_dump_json() for f in table)]
    mappers = [subprocess.Popen(argv, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    try:
        for m in mappers:
            assert m.stdout.readline().strip() == "mapped"
        shares = [_pss_shmem_kib(m.pid) for m in mappers]
    finally:
        for m in mappers:
            m.communicate("\n", timeout=30)
    # Each of the two maps all 128 MiB, and is charged half: the memory exists once.
    for share in shares:
        assert 0.4 * size_kib <= share <= 0.6 * size_kib, (shares, size_kib)


def test_a_loader_removes_only_the_segments_of_dead_loaders_of_its_node(tmp_path):
    import subprocess
    import sys

    from actors.loader import Loader
    from atelier.config import Config

    if staging.SHM_ROOT is None:
        pytest.skip("no /dev/shm on this system")
    node = f"test-orphans-{os.getpid()}"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    names = {"dead": f"atelier-{node}-{dead}-tiny-sd", "live": f"atelier-{node}-{os.getppid()}-tiny-sd",
             "other node": f"atelier-{node}x-{dead}-tiny-sd"}
    for name in names.values():
        (staging.SHM_ROOT / name).write_bytes(b"x")
    try:
        loader = Loader(Config.model_validate({"home": str(tmp_path)}), "tcp://127.0.0.1:9", node=node)
        loader._remove_orphans()
        left = {label for label, name in names.items() if (staging.SHM_ROOT / name).exists()}
        loader.ctx.term()
    finally:
        for name in names.values():
            (staging.SHM_ROOT / name).unlink(missing_ok=True)
    assert left == {"live", "other node"}  # another atelier's, and another node's, are not its to remove
