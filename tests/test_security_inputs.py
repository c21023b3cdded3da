"""Security review, inputs: what a job brings (images, prompts) and what a catalog loads (weights,
headers, built-ins). Each test performs the attack through the real interface and sees it refused,
and sees the legitimate use still work."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import tomllib
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Before anything imports huggingface_hub: nothing here may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from actors.actor import RemoteError  # noqa: E402
from actors.messages import BatchDone, BatchItem  # noqa: E402
from actors.runner import ActiveBatch, Runner  # noqa: E402
from atelier import sources, staging, tiny_models  # noqa: E402
from atelier.config import Config, ModelEntry  # noqa: E402
from atelier.jobs import JobDone, JobFailed, JobInputs, JobKind, JobSpec, JobState, StagedFile  # noqa: E402
from atelier.scheduling import admission  # noqa: E402
from tests.conftest import Cluster, run  # noqa: E402

pytestmark = pytest.mark.timeout(300)


# --------------------------------------------------------------------------- #
# Hostile images


def _png(seed: int = 0, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _encoded(fmt: str, size: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(out, format=fmt)
    return out.getvalue()


def _psd() -> bytes:
    """The header of a Photoshop file (Pillow reads PSD): 8BPS, version 1, 3 channels, 64x64, 8 bits, RGB."""
    return (b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 64, 64, 8, 3) + struct.pack(">III", 0, 0, 0)
            + struct.pack(">H", 0) + bytes(64 * 64 * 3))


def _bomb(width: int, height: int) -> bytes:
    """A PNG of a few dozen KB that declares ``width`` x ``height`` 1-bit pixels, all of them there."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the row's bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


HOSTILE = {
    # name: (bytes, HTTP status, error code, words in the message)
    "truncated png": (_png(1)[:2000], 422, "bad_request", "damaged or cut short"),
    "tiff": (_encoded("TIFF"), 422, "bad_request", "not a PNG, JPEG or WebP"),
    "eps": (_encoded("EPS"), 422, "bad_request", "not a PNG, JPEG or WebP"),
    "psd": (_psd(), 422, "bad_request", "not a PNG, JPEG or WebP"),
    # Above Pillow's own cap (2 x 89 Mpx): its DecompressionBombError was answered "internal" (502).
    "bomb over pillow's cap": (_bomb(20_000, 20_000), 413, "too_large", "pixels"),
    # Below it (Pillow only warns), above atelier's: 36 Mpx of 1-bit zeros in ~5 KB.
    "bomb over the budget": (_bomb(6_000, 6_000), 413, "too_large", "scale it down"),
}


def test_m3_damaged_foreign_and_bomb_images_are_refused_at_submit(shared_cluster: Cluster) -> None:
    import aiohttp

    assert all(len(data) < 400_000 for data, *_ in HOSTILE.values())
    base = {"model": "tiny-sd", "prompt": "a lighthouse", "kind": "img2img", "width": 64, "height": 64,
            "steps": 2, "user": "sec-inputs"}

    async def go():
        answers = {}
        async with aiohttp.ClientSession() as http:
            for name, (data, *_) in HOSTILE.items():
                async with http.post(f"{shared_cluster.http}/v1/jobs", json={**base, "image": _b64(data)}) as reply:
                    answers[name] = (reply.status, await reply.json())
            # A mask is an input image like any other.
            async with http.post(f"{shared_cluster.http}/v1/jobs",
                                 json={**base, "image": _b64(_png(2)), "mask": _b64(_png(3)[:900])}) as reply:
                answers["truncated mask"] = (reply.status, await reply.json())
        async with shared_cluster.client() as client:
            with pytest.raises(RemoteError) as caught:  # the wire's submit, the same admission
                await client.submit(JobSpec(**base), inputs=JobInputs(image=HOSTILE["truncated png"][0]))
            results = []
            for fmt in ("PNG", "JPEG", "WEBP"):  # what people send still goes through
                record = await client.submit(JobSpec(**base, seed=7), inputs=JobInputs(image=_encoded(fmt, 96)))
                results.append(await client.wait(record.spec.id, timeout=120))
        return answers, caught.value, results

    answers, wire_refusal, results = run(go(), timeout=280)
    for name, (_, status, code, words) in HOSTILE.items():
        got_status, body = answers[name]
        assert (got_status, body["error"]["code"], body["error"]["field"]) == (status, code, "image"), (name, body)
        assert words in body["error"]["message"], (name, body)
    assert answers["truncated mask"][0] == 422 and answers["truncated mask"][1]["error"]["field"] == "mask"
    assert wire_refusal.error.code.value == "bad_request" and wire_refusal.error.field == "image"
    assert [r.job.state for r in results] == [JobState.done] * 3


def _runner(config: Config, loaded, monkeypatch: pytest.MonkeyPatch) -> tuple[Runner, list[BatchDone]]:
    """A runner with tiny-sd resident, whose messages to the scheduler are kept here: a batch as a
    RunBatch would bring it goes straight to its execution, past admission."""
    runner = Runner(config, "tcp://127.0.0.1:9", node="sec-inputs")
    runner.models.add("tiny-sd", loaded, 0)
    reports: list[BatchDone] = []

    async def send(dst, msg):
        return None

    async def report(dst, outcome):
        reports.append(outcome)

    monkeypatch.setattr(runner, "send", send)
    monkeypatch.setattr(runner, "_report", report)
    monkeypatch.setattr(runner, "publish_threadsafe", lambda event: None)  # progress and previews
    monkeypatch.setattr(runner.previews, "publish", lambda event: None)
    return runner, reports


def _item(config: Config, image: bytes, seed: int, user: str) -> BatchItem:
    spec = JobSpec(model="tiny-sd", kind=JobKind.img2img, prompt="a lighthouse", width=64, height=64, steps=2,
                   seed=seed, user=user)
    inputs = JobInputs(image=image)
    return BatchItem(job=admission.resolve(spec, inputs, config, random.Random(0)), attempt=1, inputs=inputs)


def test_m3_an_input_that_fails_on_the_runner_fails_only_its_job(tiny_model, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _, loaded, _ = tiny_model("tiny-sd")
    config = Config.model_validate({"home": str(tmp_path)})
    runner, reports = _runner(config, loaded, monkeypatch)
    good = _item(config, _png(1), 5, "ana")
    batch = [good, _item(config, _png(2)[:2000], 6, "ben"), _item(config, _encoded("TIFF"), 7, "cy"),
             _item(config, _bomb(6_000, 6_000), 8, "dee")]

    async def go():
        await runner._execute(ActiveBatch("mixed", batch), "scheduler")
        await runner._execute(ActiveBatch("alone", [good]), "scheduler")

    try:
        run(go(), timeout=200)
    finally:
        runner._worker.shutdown(wait=True)
    mixed, alone = (report.outcomes for report in reports)
    assert isinstance(mixed[0], JobDone) and len(mixed[0].outputs) == 1
    assert [type(o) for o in mixed[1:]] == [JobFailed] * 3
    reasons = [o.reason for o in mixed[1:]]
    assert "damaged or cut short" in reasons[0] and "not a PNG, JPEG or WebP" in reasons[1] and "pixels" in reasons[2]
    assert not any(o.retryable for o in mixed[1:])  # the same bytes fail every attempt
    # Its neighbours took nothing from the good job: the same image as when it runs alone.
    assert bytes(mixed[0].outputs[0].data) == bytes(alone[0].outputs[0].data)


# --------------------------------------------------------------------------- #
# Hostile prompts (prompt_weighting: compel's grammar)

_ATOMS = ["(", ")", "+", "-", ":", "1.5", ":0.8)", " ", "cat", ",", '"', ".and(", ".blend(", ".swap(", "0.5",
          "(red:1.2)", "\\(", "dog", "[", "]", ")1.3", "<lora:x:1>", "'", ".and()", '("a", "b").blend(0.3, 0.7)']


def test_hostile_weighted_prompts_are_refused_or_fail_alone(shared_cluster: Cluster) -> None:
    deep = "(" * 1990 + "cat" + ")" * 1990  # within the 4000 characters a prompt may have
    ten = "(" * 10 + "a lighthouse" + ")" * 10  # the deepest taken; without packrat, minutes of parsing
    broken = '("a", "b").blend(0.3, 0.7) and a lighthouse'  # compel's parser cannot read it

    def spec(prompt: str, **more) -> JobSpec:
        return JobSpec(model="guided-sd", prompt=prompt, seed=3, user="sec-prompts", **more)

    async def go():
        refused = []
        async with shared_cluster.client() as client:
            for hostile in (spec(deep), spec("a lighthouse", negative_prompt=deep)):
                with pytest.raises(RemoteError) as caught:
                    await client.submit(hostile)
                refused.append(caught.value.error)
            records = [await client.submit(s) for s in (spec(ten), spec(broken), spec("a (red:1.5) lighthouse"))]
            return refused, [await client.wait(r.spec.id, timeout=200) for r in records]

    refused, (nested, unreadable, plain) = run(go(), timeout=280)
    assert [(e.code.value, e.field) for e in refused] == [("bad_request", "prompt"), ("bad_request", "negative_prompt")]
    assert "nested 1990 deep" in refused[0].message
    assert nested.job.state is JobState.done and plain.job.state is JobState.done
    assert unreadable.job.state is JobState.failed and "compel can read" in unreadable.job.reason


def test_fuzzed_weighted_prompts_never_break_a_batch(tiny_model, atelier_home: Path) -> None:
    """Whatever admission lets through either reads, or is named unreadable before the call; the batch's
    call then never raises, and no prompt takes long."""
    import time

    from atelier.families import GenerateRequest, get_family
    from atelier.families.loaded import LoadRequest
    from atelier.families.sd import _prompts

    path = tiny_models.ensure_builtin("tiny-sd", atelier_home / "models")
    model = get_family("sd1").load(LoadRequest(path, device="cpu", options={"prompt_weighting": True}))
    config = Config.model_validate({"home": str(atelier_home),
                                    "models": {"w": {"family": "sd1", "source": str(path),
                                                     "options": {"prompt_weighting": True}}}})
    rng = random.Random(13)
    prompts = ["(" * 10 + "x" + ")" * 10, "(" * 11 + "x", "((a:1.2) b:1.1) " * 40]
    prompts += ["".join(rng.choice(_ATOMS) for _ in range(rng.randint(1, 80))) or "x" for _ in range(60)]
    readable, refused, slowest = [], 0, 0.0
    for prompt in prompts:
        try:
            admission.check(JobSpec(model="w", prompt=prompt), None, config)
        except admission.Refused as refusal:
            assert refusal.field == "prompt" and "nested" in refusal.message
            refused += 1
            continue
        started = time.monotonic()
        if model.unreadable([prompt]) is None:
            readable.append(prompt)
        slowest = max(slowest, time.monotonic() - started)
    assert refused >= 1 and len(readable) >= 20
    assert slowest < 20  # hours, for a few nested groups, before the packrat memo
    for start in range(0, len(readable), 8):  # the batch's own call, on what was let through
        chunk = tuple(readable[start:start + 8])
        _prompts(model.settings, GenerateRequest(prompts=chunk, negative_prompts=(None,) * len(chunk),
                                                 seeds=tuple(range(len(chunk))), width=64, height=64, steps=1,
                                                 guidance=5.0))


# --------------------------------------------------------------------------- #
# Weights: pickles, safetensors headers, hub revisions


def test_m10_a_folder_of_pickle_weights_is_refused_and_never_unpickled(atelier_home: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from safetensors.torch import load_file

    from atelier.families import get_family
    from atelier.families.loaded import LoadRequest

    original = tiny_models.ensure_builtin("tiny-sd", atelier_home / "models")
    folder = tmp_path / "pickled-sd"
    shutil.copytree(original, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    unpickled = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a) or real_load(*a, **k))

    entry = ModelEntry(family="sd1", source=str(folder))
    with pytest.raises(sources.ModelSourceError, match="unet has only pickle weights"):
        sources.resolve("pickled", entry, tmp_path)
    with pytest.raises(staging.StagingError, match="pickle"):
        staging.plan(folder)
    with pytest.raises(Exception) as caught:  # the family itself, asked directly
        get_family("sd1").load(LoadRequest(folder, device="cpu"))
    assert "safetensors" in str(caught.value)
    assert unpickled == []
    # The same model with its safetensors is taken as before.
    assert sources.resolve("fine", ModelEntry(family="sd1", source=str(original)), tmp_path) == original
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch>"))
    assert torch_pin.startswith("torch>=2.6")  # CVE-2025-32434: weights_only bypassed before 2.6
    assert tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6)


def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


CRAFTED = {
    "begin after end": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8)),
    "past the data": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),
    "negative offset": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, bytes(8)),
    "bytes not the shape": ({"w": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 8]}}, bytes(8)),
    "unknown dtype": ({"w": {"dtype": "Q99", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    "shape of strings": ({"w": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, bytes(8)),
    "not a table": ([1, 2, 3], b""),
}


def test_l10_crafted_safetensors_headers_are_refused_by_both_readers(tmp_path: Path) -> None:
    def staged(path: Path) -> dict:
        segment = tmp_path / f"{path.stem}.segment"
        table = staging.stage(path, segment)
        return staging.state_dicts(staging.map_segment(segment), table)

    for name, (header, data) in CRAFTED.items():
        path = _safetensors(tmp_path / f"{name.replace(' ', '-')}.safetensors", header, data)
        with pytest.raises(staging.StagingError):
            staged(path)
        with pytest.raises(sources.ModelSourceError, match="not a readable safetensors file"):
            sources._safetensors_keys("m", path)
    # A header that says it is larger than the cap is refused before anything is read (the file need not be).
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 200 << 20) + b"{}")
    with open(huge, "r+b") as f:
        f.truncate(201 << 20)  # a sparse file: it claims 200 MiB of header
    with pytest.raises(sources.ModelSourceError, match="MiB cap"):
        sources._safetensors_keys("m", huge)
    entry = StagedFile(component="checkpoint", name="huge.safetensors", offset=0, length=huge.stat().st_size)
    with open(huge, "rb") as f, pytest.raises(staging.StagingError, match="MiB cap"):
        import mmap

        staging.state_dicts(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), [entry])
    # What safetensors itself writes reads as before.
    import torch
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "empty": torch.zeros(0)}, good)
    tensors = staged(good)["checkpoint"]
    assert tensors["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and tensors["empty"].shape == (0,)
    assert sorted(sources._safetensors_keys("m", good)) == ["a", "empty"]


def test_l9_a_hub_source_is_pinned_to_its_revision(atelier_home: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache holds two commits of a repository; main moved to the newer. A pinned entry keeps the older."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    repo = cache / "models--atelier-test--pinned"
    pinned, newer = "a" * 40, "b" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(newer)
    folder = tiny_models.ensure_builtin("tiny-sd", atelier_home / "models")
    for commit in (pinned, newer):
        shutil.copytree(folder, repo / "snapshots" / commit)
    models = atelier_home / "models"
    assert sources.resolve("m", ModelEntry(family="sd1", source="atelier-test/pinned"), models) \
        == repo / "snapshots" / newer
    assert sources.resolve("m", ModelEntry(family="sd1", source="atelier-test/pinned", revision=pinned), models) \
        == repo / "snapshots" / pinned
    with pytest.raises(sources.ModelSourceError, match="not in this host's Hugging Face cache"):
        sources.resolve("m", ModelEntry(family="sd1", source="atelier-test/pinned", revision="c" * 40), models)
    with pytest.raises(sources.ModelSourceError, match="is not a hub id"):
        sources.resolve("m", ModelEntry(family="sd1", source=str(folder), revision=pinned), models)


# --------------------------------------------------------------------------- #
# Loose defaults


def test_l8_builtins_only_without_a_catalog_of_ones_own_and_steps_are_capped(shared_cluster: Cluster) -> None:
    import aiohttp

    mine = {"mine": {"family": "sdxl", "source": "/m/sdxl"}}
    assert {"tiny-sd", "noop"} <= set(Config.model_validate({}).models)  # `atelier up` with no file
    production = Config.model_validate({"models": mine})
    assert list(production.models) == ["mine"] and production.default_model == "mine"
    assert {"mine", "noop"} <= set(Config.model_validate({"builtin_models": True, "models": mine}).models)
    assert Config.model_validate({"builtin_models": False}).models == {}
    noop = Config.model_validate({}).models["noop"].limits
    assert noop.max_width * noop.max_height * noop.max_count * 3 <= 64 << 20  # was 3 GB of pixels a job
    turbo = Config.model_validate({"models": {"turbo": {"family": "sdxl", "source": "/m/t", "default_steps": 1,
                                                        "max_steps": 8}}})
    with pytest.raises(admission.Refused, match="steps 9 is above turbo's limit of 8"):
        admission.check(JobSpec(model="turbo", prompt="x", steps=9), None, turbo)
    admission.check(JobSpec(model="turbo", prompt="x", steps=8), None, turbo)
    with pytest.raises(ValueError, match="default_steps 30 is above max_steps 8"):
        ModelEntry(family="sdxl", source="/m/t", max_steps=8)

    async def go():  # through HTTP: guided-sd is an sd1 model, 150 steps at most
        async with aiohttp.ClientSession() as http:
            body = {"model": "guided-sd", "prompt": "x", "user": "sec-steps"}
            async with http.post(f"{shared_cluster.http}/v1/jobs", json={**body, "steps": 151}) as reply:
                return reply.status, await reply.json()

    status, body = run(go())
    assert status == 422 and body["error"]["field"] == "steps" and "limit of 150" in body["error"]["message"]
