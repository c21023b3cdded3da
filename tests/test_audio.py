"""Sound families on their tiny builtin models: the adapter on its own, then through a running atelier."""

from __future__ import annotations

import io
import json
import os
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# Before anything imports huggingface_hub: nothing here may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from actors.actor import RemoteError  # noqa: E402
from actors.messages import JobResult, Preview, Progress
from atelier import staging  # noqa: E402
from atelier.families import GenerateRequest, get_family  # noqa: E402
from atelier.families.loaded import LoadRequest  # noqa: E402
from atelier.jobs import JobSpec, JobState
from atelier.media import Audio  # noqa: E402
from atelier.preview import encode_jpeg  # noqa: E402
from atelier.tiny.audio import AUDIOLDM2_RATE, STABLE_AUDIO_LATENTS, STABLE_AUDIO_RATE  # noqa: E402
from atelier.tiny_models import ensure_builtin  # noqa: E402
from tests.conftest import run  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def _request(seed: int = 1, steps: int = 3, count: int = 2, duration_s: float = 1.0,
             negative_prompt: str | None = None) -> GenerateRequest:
    return GenerateRequest.single(prompt="rain on a tin roof", negative_prompt=negative_prompt, width=8, height=8,
                                  steps=steps, guidance=7.0, seed=seed, count=count, kind="txt2audio",
                                  duration_s=duration_s)


def _ignore_steps(*_: Any) -> None:
    pass


def _samples(sounds: list[Audio]) -> list[np.ndarray]:
    return [np.asarray(sound.samples) for sound in sounds]


# What each tiny model makes: its family, rate, channels, and its latents' shape for 1.5 s.
SOUNDS = {
    "tiny-stable-audio": ("stable-audio", STABLE_AUDIO_RATE, 2, (8, STABLE_AUDIO_LATENTS)),  # the whole window
    "tiny-audioldm2": ("audioldm2", AUDIOLDM2_RATE, 1, (8, 38, 16)),  # 150 mel frames (152: 4 | it) / 4, 64 bins / 4
}


@pytest.fixture(scope="module", params=sorted(SOUNDS))
def model(request: pytest.FixtureRequest, tiny_model) -> tuple[str, Path, Any, Any]:
    family, pipe, folder = tiny_model(request.param)
    return request.param, folder, family, pipe


@pytest.fixture(scope="module")
def stable_audio(tiny_model) -> tuple[Any, Any]:
    family, pipe, _ = tiny_model("tiny-stable-audio")
    return family, pipe


def test_sounds_have_the_asked_duration_at_the_models_rate(model: tuple[str, Path, Any, Any]) -> None:
    name, _, family, pipe = model
    _, rate, channels, latent_shape = SOUNDS[name]
    seen: list[tuple[int, int, Any]] = []
    sounds = family.generate(pipe, _request(duration_s=1.5), lambda i, n, lat: seen.append((i, n, lat.clone())))

    assert len(sounds) == 2
    for sound in sounds:
        assert isinstance(sound, Audio) and sound.sample_rate == rate
        assert sound.channels_first.shape == (channels, int(1.5 * rate))
        assert sound.duration_s == pytest.approx(1.5)
        assert np.isfinite(sound.samples).all() and np.abs(sound.samples).max() <= 1.0
        assert np.abs(sound.samples).max() > 1e-3  # a sound, not silence: a 16-bit file would hold it
    assert [(i, n) for i, n, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    latents = seen[-1][2]
    assert latents.shape == (2, *latent_shape)

    rgb = family.preview(latents, 1)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and max(rgb.shape[:2]) <= 256
    assert encode_jpeg(rgb).startswith(b"\xff\xd8")
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) == 2  # bars on a background, not a flat image


def test_same_seed_same_sound(model: tuple[str, Path, Any, Any]) -> None:
    _, _, family, pipe = model
    first = _samples(family.generate(pipe, _request(seed=7), _ignore_steps))
    again = _samples(family.generate(pipe, _request(seed=7), _ignore_steps))
    other = _samples(family.generate(pipe, _request(seed=8, count=1), _ignore_steps))

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    np.testing.assert_allclose(first[1], other[0], atol=1e-4)  # image 1 of seed 7 is seed 8's image 0
    assert not np.allclose(first[0], first[1], atol=1e-3)


def test_audioldm2_checkpoint_with_a_bare_gpt2_model_loads_and_makes_the_same_sound(atelier_home: Path,
                                                                                     tmp_path: Path) -> None:
    # Some AudioLDM 2 checkpoints list GPT2Model, whose generation helpers transformers 5 dropped.
    import shutil

    from transformers import GPT2LMHeadModel

    folder = ensure_builtin("tiny-audioldm2", atelier_home / "models")
    bare = Path(shutil.copytree(folder, tmp_path / "bare"))
    shutil.rmtree(bare / "language_model")
    head = GPT2LMHeadModel.from_pretrained(folder / "language_model")
    head.transformer.config.max_new_tokens = 8
    head.transformer.save_pretrained(bare / "language_model")
    index = json.loads((bare / "model_index.json").read_text())
    index["language_model"] = ["transformers", "GPT2Model"]
    (bare / "model_index.json").write_text(json.dumps(index))

    family = get_family("audioldm2")
    wrapped = family.load(LoadRequest(bare, device="cpu"))
    assert type(wrapped.pipe.language_model).__name__ == "GPT2LMHeadModel"
    request = _request(seed=5, count=1)
    expected = _samples(family.generate(family.load(LoadRequest(folder, device="cpu")), request, _ignore_steps))
    assert _samples(family.generate(wrapped, request, _ignore_steps))[0].tobytes() == expected[0].tobytes()


def test_staged_weights_give_the_same_sound_bit_for_bit(model: tuple[str, Path, Any, Any], tmp_path: Path) -> None:
    if staging.SHM_ROOT is None:
        pytest.skip("needs /dev/shm")
    _, folder, family, disk = model
    segment = staging.SHM_ROOT / f"atelier-test-audio-{tmp_path.name}"
    try:
        table = staging.stage(folder, segment)
        staged = family.load(LoadRequest(folder, weights=staging.state_dicts(staging.map_segment(segment), table)))
    finally:
        segment.unlink(missing_ok=True)
    request = _request(seed=11, negative_prompt="hiss")
    from_staged = _samples(family.generate(staged, request, _ignore_steps))
    from_disk = _samples(family.generate(disk, request, _ignore_steps))
    assert [a.tobytes() for a in from_staged] == [a.tobytes() for a in from_disk]


def test_unknown_options_are_refused(model: tuple[str, Path, Any, Any]) -> None:
    _, folder, family, _ = model
    with pytest.raises(ValueError, match="vae_tiling"):
        family.load(LoadRequest(folder, device="cpu", options={"vae_tiling": True}))


def test_stable_audio_refuses_a_duration_past_its_window(stable_audio: tuple[Any, Any]) -> None:
    family, pipe = stable_audio
    with pytest.raises(ValueError, match="longer than the model maximum"):
        family.generate(pipe, _request(duration_s=3.0, count=1), _ignore_steps)


# --------------------------------------------------------------------------- #
# through a running atelier


def _wav(data: bytes) -> tuple[int, int, float]:
    with wave.open(io.BytesIO(data)) as sound:
        return sound.getnchannels(), sound.getframerate(), sound.getnframes() / sound.getframerate()


def _flac(data: bytes) -> tuple[int, int, float]:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name == "flac"
        samples = sum(frame.samples for frame in container.decode(stream))
        rate = stream.codec_context.sample_rate
        return stream.codec_context.channels, rate, samples / rate


# name -> (the catalog's default and longest duration, channels, rate)
CATALOG = {"tiny-stable-audio": (1.0, 2.0, 2, STABLE_AUDIO_RATE), "tiny-audioldm2": (1.0, 4.0, 1, AUDIOLDM2_RATE)}


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_through_atelier_wav_flac_and_refusals(shared_cluster, name: str) -> None:
    default_s, longest_s, channels, rate = CATALOG[name]

    async def go():
        async with shared_cluster.client() as client:
            spec = JobSpec(model=name, kind="txt2audio", prompt="a lighthouse foghorn", seed=3)
            await client.submit(spec)
            events = [event async for event in client.events(spec.id, timeout=120)]
            flac = await client.generate(JobSpec(model=name, kind="txt2audio", prompt="surf", duration_s=1.5,
                                                 count=2, output_format="flac", seed=4), timeout=120)
            refusals = []
            for bad in (dict(duration_s=longest_s + 1), dict(frames=8)):
                with pytest.raises(RemoteError) as caught:
                    await client.submit(JobSpec(model=name, kind="txt2audio", prompt="x", **bad))
                refusals.append(caught.value.error)
            return events, flac, refusals

    events, flac, refusals = run(go(), timeout=240)
    wav = events[-1]
    assert isinstance(wav, JobResult) and wav.job.state is JobState.done, wav.job.reason
    (artifact,) = wav.outputs
    assert artifact.media_type == "audio/wav"
    assert artifact.sample_rate == rate and artifact.duration_s == pytest.approx(default_s)
    assert _wav(bytes(artifact.data)) == (channels, rate, pytest.approx(default_s))  # the catalog's default
    progress = [event.step for event in events if isinstance(event, Progress)]
    assert progress == [1, 2, 3, 4]  # the tiny model's default steps
    previews = [event for event in events if isinstance(event, Preview)]
    assert previews and bytes(previews[-1].image[:2]) == b"\xff\xd8"

    assert flac.job.state is JobState.done, flac.job.reason
    assert [a.media_type for a in flac.outputs] == ["audio/flac"] * 2
    for artifact in flac.outputs:
        assert _flac(bytes(artifact.data)) == (channels, rate, pytest.approx(1.5))
    assert bytes(flac.outputs[0].data) != bytes(flac.outputs[1].data)

    too_long, frames = refusals
    assert too_long.field is not None and too_long.field.split(".")[-1] == "duration_s", too_long
    assert str(longest_s) in too_long.message
    assert frames.field is not None and frames.field.split(".")[-1] == "frames", frames
