"""The runner's CUDA paths (issue 14, the review's F3, F5-F8, F11, F13-F15, F17, F18): what reproduces
on the CPU is checked here with fakes for CUDA (an OutOfMemoryError, a pin), the rest in gpu tests."""

from __future__ import annotations

import asyncio
import gc
import os
import struct
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

# Before anything imports huggingface_hub: nothing here may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from actors import loader as loader_module  # noqa: E402
from actors import runner as runner_module  # noqa: E402
from actors.messages import BatchItem, Staged  # noqa: E402
from actors.runner import ActiveBatch, BatchTiming, Runner, _is_cuda_oom  # noqa: E402
from atelier import staging, topology  # noqa: E402
from atelier.config import Config, ModelEntry  # noqa: E402
from atelier.families import accel  # noqa: E402
from atelier.jobs import JobFailed, JobSpec, StagedFile  # noqa: E402
from atelier.resident import ResidentSet  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

pytestmark = pytest.mark.timeout(120)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MiB = 1 << 20


def _config(**models: dict[str, Any]) -> Config:
    return Config(models={name: {"family": "noop", "source": "builtin:noop", **settings}
                          for name, settings in models.items()}, default_model=next(iter(models)))


def _runner(config: Config, monkeypatch: pytest.MonkeyPatch) -> Runner:
    runner = Runner(config, "tcp://127.0.0.1:9", node="cuda-test")

    async def quiet(*args: Any, **kwargs: Any) -> None:
        return None

    monkeypatch.setattr(runner, "send", quiet)
    monkeypatch.setattr(runner, "_report", quiet)
    monkeypatch.setattr(runner, "publish_threadsafe", lambda event: None)
    return runner


def _oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


# -- F3: each runner its own GPU ------------------------------------------------------------------------ #

def test_f3_each_runner_sees_only_its_own_gpu_and_keeps_the_nodes_name_for_it(monkeypatch) -> None:
    place = topology.Place(router="ipc:///x", node="n", devices=["cuda:0", "cuda:1"])
    runners = topology.specs(topology.NODE[1], place)
    assert [spec.argv[spec.argv.index("--device") + 1] for spec in runners] == ["cuda:0", "cuda:1"]

    environ: dict[str, str] = {}
    assert runner_module.own_gpu("cuda:1", environ) == "cuda:0" and environ == {"CUDA_VISIBLE_DEVICES": "1"}
    environ = {"CUDA_VISIBLE_DEVICES": "4, GPU-abc,6"}  # the node's own view: its cuda:1 is GPU-abc
    assert runner_module.own_gpu("cuda:1", environ) == "cuda:0" and environ["CUDA_VISIBLE_DEVICES"] == "GPU-abc"
    environ = {"CUDA_VISIBLE_DEVICES": "3"}
    with pytest.raises(ValueError, match=r"--device cuda:2: CUDA_VISIBLE_DEVICES='3' shows 1 GPU"):
        runner_module.own_gpu("cuda:2", environ)
    assert runner_module.own_gpu("cpu", environ) == "cpu" and environ == {"CUDA_VISIBLE_DEVICES": "3"}

    # What a runner process does with the node's argv: hides the other GPUs before anything opens CUDA,
    # names itself by the node's device, and loads onto the one it sees.
    made: dict[str, Any] = {}

    class Made:
        def __init__(self, config: Config, router: str, **kwargs: Any):
            made.update(kwargs, env=os.environ.get("CUDA_VISIBLE_DEVICES"))

        async def run(self, stop: asyncio.Event) -> None:
            return None

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(runner_module, "Runner", Made)
    args = SimpleNamespace(router="ipc:///x", node="n", device="cuda:1")
    asyncio.run(runner_module.serve(args, _config(a={}), asyncio.Event()))
    assert (made["device"], made["torch_device"], made["env"]) == ("cuda:1", "cuda:0", "1")


# -- F5, F15: out of memory ----------------------------------------------------------------------------- #

class _Loaded:
    previewer = None

    def __init__(self, nbytes: int = 10, generate: Any = None):
        self.nbytes = nbytes
        self._generate = generate

    def device_bytes(self) -> int:
        return self.nbytes

    def unreadable(self, texts: list[str]) -> None:
        return None

    def generate(self, request: Any, on_step: Any) -> list[Any]:
        return self._generate()


def test_f5_an_oom_while_loading_with_one_other_model_resident_evicts_it_and_loads_again(monkeypatch) -> None:
    runner = _runner(_config(big={}, other={}), monkeypatch)
    runner.models.add("other", _Loaded(), 10)
    calls: list[str] = []
    freed_with: list[bool] = []
    big: list[weakref.ref] = []

    def load(request: Any) -> _Loaded:
        calls.append(request.entry.family)
        if len(calls) == 1:
            half_uploaded = torch.zeros(MiB)  # what a failed upload leaves in its frame
            big.append(weakref.ref(half_uploaded))
            raise _oom()
        return _Loaded(20)

    async def stage(model: str) -> Staged:
        return Staged(model=model, path="", bytes=0)  # the loader is down: nothing to make room by

    def free_memory() -> None:
        gc.collect()
        freed_with.append(big[0]() is None)

    monkeypatch.setattr(runner_module, "get_family", lambda name: SimpleNamespace(load=load))
    monkeypatch.setattr(runner, "_stage", stage)
    monkeypatch.setattr(runner, "_free_memory", free_memory)
    loaded = asyncio.run(runner._load("big", BatchTiming(images=1)))
    assert len(calls) == 2 and loaded.nbytes == 20
    assert runner.models.bytes == {"big": 20}  # the other one went, the model that did not fit is in
    assert freed_with == [True]  # F15: the failed load's tensors were gone when the memory was freed


def test_f5_an_oom_while_loading_alone_is_not_tried_again(monkeypatch) -> None:
    runner = _runner(_config(big={}), monkeypatch)
    calls = []

    def load(request: Any) -> _Loaded:
        calls.append(1)
        raise _oom()

    async def stage(model: str) -> Staged:
        return Staged(model=model, path="", bytes=0)

    monkeypatch.setattr(runner_module, "get_family", lambda name: SimpleNamespace(load=load))
    monkeypatch.setattr(runner, "_stage", stage)
    with pytest.raises(torch.OutOfMemoryError):
        asyncio.run(runner._load("big", BatchTiming(images=1)))
    assert len(calls) == 1


def test_f15_memory_is_freed_after_a_generation_oom_once_its_frames_are_gone(monkeypatch) -> None:
    runner = _runner(_config(a={}, b={}), monkeypatch)
    big: list[weakref.ref] = []

    def generate() -> list[Any]:
        activations = torch.zeros(MiB)
        big.append(weakref.ref(activations))
        raise _oom()

    runner.models.add("a", _Loaded(), 10)
    runner.models.add("b", _Loaded(generate=generate), 10)
    freed_with: list[bool] = []

    def free_memory() -> None:
        gc.collect()
        freed_with.append(big[0]() is None)

    monkeypatch.setattr(runner, "_free_memory", free_memory)
    reports: list[Any] = []

    async def report(dst: str, outcome: Any) -> None:
        reports.append(outcome)

    monkeypatch.setattr(runner, "_report", report)
    spec = JobSpec(model="b", prompt="a lighthouse", width=64, height=64, steps=2, count=1, seed=1)
    batch = ActiveBatch("batch-1", [BatchItem(job=spec, attempt=1)])
    runner.active = batch
    asyncio.run(runner._execute(batch, "scheduler"))
    [outcome] = reports[0].outcomes
    assert isinstance(outcome, JobFailed) and outcome.retryable and "out of GPU memory" in outcome.reason
    assert runner.models.bytes == {"b": 10}
    assert freed_with == [True]


def test_minor_cublas_and_cudnn_allocation_failures_are_out_of_memory() -> None:
    assert _is_cuda_oom(_oom())
    assert _is_cuda_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert _is_cuda_oom(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not _is_cuda_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))


# -- F14: room by the device's free memory ----------------------------------------------------------- #

def test_f14_room_is_made_until_free_memory_and_the_evicted_cover_the_model_and_a_reserve() -> None:
    models = ResidentSet(budget=100, max_models=5)
    for name in ("a", "b", "c"):
        models.add(name, object(), 20)
    # The budget alone has room (60 + 30 <= 100), but the device has only 5 free (contexts, graph pools,
    # another process): a and b must go, 5 + 20 + 20 covering 30 and a reserve of 10.
    assert models.make_room("d", 30, keep_slot=True) == []
    assert models.make_room("d", 30, keep_slot=True, free=5, reserve=10) == ["a", "b"]
    assert models.bytes == {"c": 20}
    assert models.make_room("d", 30, keep_slot=True, free=45, reserve=10) == []
    # Even with all gone it would not be enough: all go, and the load tries (an OOM is handled there).
    assert models.make_room("d", 30, keep_slot=True, free=0, reserve=10) == ["c"]


# -- F6, F11, F7: settings that cannot work ------------------------------------------------------------ #

def _entry(**settings: Any) -> ModelEntry:
    return ModelEntry(family="sd1", source="unused", **settings)


def test_f6_int4_with_offload_is_refused_when_the_catalog_is_read() -> None:
    for offload in ("model", "sequential"):
        with pytest.raises(ValidationError, match=r"quantize = \"int4\" cannot go with offload"):
            _entry(dtype="bfloat16", quantize="int4", offload=offload)
    assert _entry(quantize="int8", offload="model").offload == "model"
    assert _entry(dtype="bfloat16", quantize="int4").quantize == "int4"


def test_f11_cuda_graph_compile_modes_with_a_cache_are_refused() -> None:
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValidationError, match=f"compile = '{mode}' captures CUDA graphs"):
            _entry(cache="deepcache", compile=mode)
    for mode in (True, "default", "max-autotune-no-cudagraphs"):
        assert _entry(cache="deepcache", compile=mode).compile == mode
    assert _entry(compile="reduce-overhead").compile == "reduce-overhead"


def test_f11_evicting_the_last_compiled_model_resets_torch_compile(monkeypatch) -> None:
    runner = _runner(_config(compiled={"compile": "max-autotune-no-cudagraphs"}, also={"compile": True}, plain={}),
                     monkeypatch)
    resets: list[int] = []
    monkeypatch.setattr(runner_module, "reset_compiled", lambda: resets.append(1))

    for resident, evicted in ([("plain",), ("plain",)], [("compiled", "also"), ("compiled",)],
                              [("compiled", "plain"), ("compiled",)]):
        runner.models.clear()
        for name in resident:
            runner.models.add(name, object(), 1)
        for name in evicted:
            runner.models._items.pop(name)
        runner._evicted("x", list(evicted))
        runner._worker.submit(lambda: None).result()  # the reset runs on the worker
    # plain: nothing compiled; compiled with `also` still resident: not safe; compiled, the last: reset.
    assert resets == [1]


def test_f7_compile_on_cuda_without_a_c_compiler_is_refused_at_load(monkeypatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(accel.shutil, "which", lambda name: None)
    denoiser = torch.nn.Linear(4, 4)
    model = SimpleNamespace(pipe=SimpleNamespace(components={"unet": denoiser}))
    with pytest.raises(ValueError, match=r"compile on CUDA needs a C compiler for Triton \(gcc or clang; \$CC\)"):
        accel.apply(model, _entry(compile=True), "cuda:0")  # type: ignore[arg-type]
    assert denoiser._compiled_call_impl is None
    monkeypatch.setattr(accel.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "gcc" else None)
    accel.check_compiler("cuda:0")


def test_minor_quantizing_leaves_inductors_settings_alone() -> None:
    import torch._inductor.config as inductor

    keys = ("coordinate_descent_tuning", "coordinate_descent_check_all_directions", "force_fuse_int_mm_with_mul",
            "fx_graph_cache")
    before = {key: getattr(inductor, key) for key in keys}
    try:
        accel.quantize(torch.nn.Sequential(torch.nn.Linear(64, 64)), "int8", "cpu")
        assert {key: getattr(inductor, key) for key in keys} == before
    finally:
        for key, value in before.items():
            setattr(inductor, key, value)


# -- F13, F17: pinning ------------------------------------------------------------------------------- #

@pytest.fixture
def segment_file(tmp_path: Path) -> Path:
    path = tmp_path / "segment"
    path.write_bytes((struct.pack("<Q", 2) + b"{}").ljust(4096, b"\0"))  # an empty safetensors table, as a stand-in's
    return path


def _pins(monkeypatch, pin: Any = None) -> list[str]:
    events: list[str] = []
    monkeypatch.setattr(staging, "pin", pin or (lambda mapping: events.append("pin") or (1, None)))
    monkeypatch.setattr(staging, "unpin", lambda handle, device=None: events.append(f"unpin {device}"))
    return events


def test_f13_a_damaged_segment_is_unpinned_before_the_error_goes_on(monkeypatch, segment_file) -> None:
    runner = _runner(_config(a={}), monkeypatch)
    events = _pins(monkeypatch)
    table = [StagedFile(component="unet", name="model.safetensors", offset=0, length=8192)]  # past the end
    with pytest.raises(staging.StagingError, match="lies outside the segment"):
        runner_module.map_staged(Staged(model="a", path="x", bytes=8192, segment=str(segment_file), files=table),
                                 "cuda:0", runner.torch_device, runner.name)
    assert events == ["pin", "unpin cpu"]


def test_f13_a_failed_pin_uploads_unpinned(monkeypatch, segment_file, caplog) -> None:
    runner = _runner(_config(a={}), monkeypatch)

    def refuse(mapping: Any) -> Any:
        raise staging.StagingError("cudaHostRegister of 4,096 bytes failed with CUDA error 712")

    _pins(monkeypatch, refuse)
    weights, pinned = runner_module.map_staged(Staged(model="a", path="x", bytes=0, segment=str(segment_file),
                                                      files=[]), "cuda:0", runner.torch_device, runner.name)
    assert weights == {} and pinned is None
    assert "CUDA error 712; uploading from pageable memory" in caplog.text


def test_f13_unpin_waits_for_the_device_first(monkeypatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(f"synchronize {device}"))
    monkeypatch.setattr(torch.cuda, "cudart", lambda: SimpleNamespace(
        cudaHostUnregister=lambda pointer: events.append(f"unregister {pointer}")))
    staging.unpin((1234, None), "cuda:0")
    assert events == ["synchronize cuda:0", "unregister 1234"]


def test_f17_a_stand_in_segment_is_never_pinned(monkeypatch, segment_file) -> None:
    runner = _runner(_config(a={}), monkeypatch)
    events = _pins(monkeypatch)
    table = [StagedFile(component="stand_in", name=staging.STAND_IN, offset=0, length=4096)]
    runner_module.map_staged(Staged(model="a", path="x", bytes=4096, segment=str(segment_file), files=table),
                             "cuda:0", runner.torch_device, runner.name)
    assert events == []


# -- F18: a small /dev/shm -------------------------------------------------------------------------- #

@pytest.fixture
def small_tmpfs(tmp_path: Path):
    where = tmp_path / "shm"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_f18_staging_into_a_full_shm_is_an_error_not_a_sigbus(small_tmpfs: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(3 * MiB)}, weights)  # 12 MiB into 8
    script = ("import sys; from pathlib import Path; from atelier import staging\n"
              "try:\n    staging.stage(Path(sys.argv[1]), Path(sys.argv[2]))\n"
              "except staging.StagingError as exc:\n    print(exc); sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", script, str(weights), str(small_tmpfs / "segment")],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=60)
    assert done.returncode == 3, (done.returncode, done.stderr)  # a SIGBUS is -7
    assert f"{small_tmpfs} has no room for" in done.stdout and "--shm-size" in done.stdout
    assert list(small_tmpfs.iterdir()) == []  # nothing half-written left behind


def test_f18_the_staging_budget_is_bounded_by_the_shm_size(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_blocks=16, f_frsize=4 * MiB))
    assert loader_module.stage_budget(None, tmp_path) == 64 * MiB
    assert loader_module.stage_budget(32 * MiB, tmp_path) == 32 * MiB
    assert loader_module.stage_budget(128 * MiB, None) == 128 * MiB


# -- F8: the cast on the GPU ------------------------------------------------------------------------- #

@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(staging.SHM_ROOT is None, reason="needs /dev/shm")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_f8_a_staged_cast_is_made_on_the_gpu_from_pinned_memory_bit_for_bit(atelier_home: Path, tmp_path: Path,
                                                                             dtype: str) -> None:
    from atelier.families import get_family
    from atelier.families.loaded import LoadRequest
    from atelier.tiny_models import ensure_builtin

    folder = ensure_builtin("tiny-sd", atelier_home / "models")
    segment = staging.SHM_ROOT / f"atelier-test-f8-{tmp_path.name}"
    try:
        table = staging.stage(folder, segment)
        mapping = staging.map_segment(segment, shared=True)
        weights = staging.state_dicts(mapping, table)
        assert any(t.dtype == torch.float32 for part in weights.values() for t in part.values())  # a cast is due
        pinned = staging.pin(mapping)
        assert next(iter(weights["unet"].values())).is_pinned()
        built = staging.build_pipeline(folder, weights, dtype=getattr(torch, dtype), device="cuda:0")
        staging.unpin(pinned, "cuda:0")
        assert {p.device.type for p in built.unet.parameters()} == {"cuda"}  # converted on its way there
        family = get_family("sd1")
        staged = family.load(LoadRequest(folder, device="cuda:0", dtype_name=dtype, weights=weights))
        disk = family.load(LoadRequest(folder, device="cuda:0", dtype_name=dtype))
        for name in ("unet", "vae", "text_encoder"):
            ours, theirs = staged.pipe.components[name].state_dict(), disk.pipe.components[name].state_dict()
            assert ours.keys() == theirs.keys()
            for key in ours:
                assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), (name, key)
    finally:
        segment.unlink(missing_ok=True)


@pytest.mark.gpu
@needs_cuda
def test_f14_a_cuda_runner_reads_the_devices_free_memory_and_logs_what_torch_holds(monkeypatch) -> None:
    runner = Runner(_config(a={}), "tcp://127.0.0.1:9", node="cuda-test", device="cuda:0")
    free = runner._worker.submit(runner._device_free).result()
    total = torch.cuda.get_device_properties(0).total_memory
    assert free is not None and 0 < free <= total
    held = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda:0")
    assert runner._worker.submit(runner._device_free).result() <= free - 200 * MiB
    assert "GiB reserved on cuda:0" in runner._memory_note()
    del held


def test_f11_the_watchdog_gives_a_compiled_models_first_step_time_to_compile(monkeypatch) -> None:
    runner = _runner(_config(compiled={"compile": True}, plain={}), monkeypatch)
    grace: dict[str, float] = {}

    def generate(name: str) -> Any:
        def step() -> list[Any]:
            grace[name] = runner.active.quiet_allowed(600.0)  # while the pipeline runs, before a step
            return []
        return step

    for name in ("compiled", "plain"):
        runner.models.add(name, _Loaded(generate=generate(name)), 1)
        spec = JobSpec(model=name, prompt="a lighthouse", width=64, height=64, steps=2, count=1, seed=1)
        runner.active = ActiveBatch(f"batch-{name}", [BatchItem(job=spec, attempt=1)])
        asyncio.run(runner._execute(runner.active, "scheduler"))
    assert grace == {"compiled": 600.0 + runner_module.COMPILE_GRACE_S, "plain": 600.0}
    batch = ActiveBatch("stepped", [], first_step_grace=runner_module.COMPILE_GRACE_S, stepped=True)
    assert batch.quiet_allowed(600.0) == 600.0  # after its first step, the usual limit


@pytest.mark.skipif(staging.SHM_ROOT is None, reason="needs /dev/shm")
def test_f8_a_staged_cast_keeps_t5s_float32_parts_at_the_files_values(atelier_home: Path, tmp_path: Path) -> None:
    # The cast F8 moves onto the GPU, here on the CPU: T5's kept-in-float32 weights ("wo") are cast from
    # the file's float32 straight to float32, as from_pretrained does; through float16 they lost bits.
    import diffusers

    from atelier.tiny_models import ensure_builtin

    folder = ensure_builtin("tiny-pixart-alpha", atelier_home / "models")
    segment = staging.SHM_ROOT / f"atelier-test-f8-cpu-{tmp_path.name}"
    try:
        table = staging.stage(folder, segment)
        weights = staging.state_dicts(staging.map_segment(segment), table)
        built = staging.build_pipeline(folder, weights, dtype=torch.float16)
    finally:
        segment.unlink(missing_ok=True)
    disk = diffusers.DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16, local_files_only=True)
    ours, theirs = built.text_encoder.state_dict(), disk.text_encoder.state_dict()
    kept = [key for key in ours if ".wo." in key]
    assert kept and all(ours[key].dtype == torch.float32 for key in kept)
    assert [key for key in ours if ours[key].dtype != theirs[key].dtype or not torch.equal(ours[key], theirs[key])] \
        == []
