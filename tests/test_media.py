"""The files a user receives: each output format, read back with the tools that play it."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from atelier.jobs import JobSpec
from atelier.media import Audio, Video, encode

SPEC = JobSpec(model="m", prompt="a lighthouse", width=64, height=48, steps=2, guidance=1.0, seed=7)


def test_images_as_png_with_their_parameters_and_as_webp():
    image = Image.new("RGB", (64, 48), (10, 200, 30))
    png = encode(image, SPEC.model_copy(update={"output_format": "png"}), 7)
    webp = encode(image, SPEC.model_copy(update={"output_format": "webp"}), 7)
    with Image.open(io.BytesIO(png.data)) as read:
        assert read.format == "PNG" and read.size == (64, 48)
        assert "Seed: 7" in read.text["parameters"] and read.text["parameters"].startswith("a lighthouse")
    with Image.open(io.BytesIO(webp.data)) as read:
        assert read.format == "WEBP" and np.array_equal(np.asarray(read.convert("RGB")), np.asarray(image))
    assert (png.media_type, webp.media_type) == ("image/png", "image/webp")


def test_png_parameters_name_the_inputs_that_shaped_the_image():
    spec = SPEC.model_copy(update={"inputs": ["image", "mask", "control_image", "ip_adapter_image"], "strength": 0.6,
                                   "controlnet": "canny", "controlnet_scale": 0.5, "loras": {"ink": 0.8}})
    text = Image.open(io.BytesIO(encode(Image.new("RGB", (64, 48)), spec, 7).data)).text["parameters"]
    assert text.startswith("a lighthouse <lora:ink:0.8>\nNegative prompt: \nSteps: 2, CFG scale: 1.0, Seed: 7")
    assert text.endswith("Model: m, Denoising strength: 0.6, Inpainted: true, ControlNet: canny, "
                         "ControlNet weight: 0.5, IP-Adapter weight: 1")
    plain = Image.open(io.BytesIO(encode(Image.new("RGB", (64, 48)), SPEC, 7).data)).text["parameters"]
    assert plain.endswith("Size: 64x48, Model: m")


@pytest.mark.parametrize("fmt", ["mp4", "webp", "gif"])
def test_video_in_each_format_has_its_frames_and_rate(fmt):
    frames = [Image.new("RGB", (65, 48), (i * 30, 0, 255 - i * 30)) for i in range(8)]  # an odd width too
    artifact = encode(Video(frames, fps=8), SPEC.model_copy(update={"output_format": fmt}), 7)
    assert (artifact.frames, artifact.fps, artifact.duration_s) == (8, 8, 1.0)
    if fmt == "mp4":
        with av.open(io.BytesIO(artifact.data)) as container:
            stream = container.streams.video[0]
            decoded = list(container.decode(stream))
            assert len(decoded) == 8 and (stream.width, stream.height) == (64, 48)  # H.264 wants even sides
            assert float(stream.average_rate) == 8
    else:
        with Image.open(io.BytesIO(artifact.data)) as read:
            assert read.n_frames == 8 and read.size == (65, 48)


@pytest.mark.parametrize("fmt", ["wav", "flac"])
@pytest.mark.parametrize("channels", [1, 2])
def test_audio_in_each_format_has_its_duration_and_sample_rate(fmt, channels):
    tone = np.sin(np.linspace(0, 2 * np.pi * 440 * 1.5, 24_000)) * 0.5
    samples = tone if channels == 1 else np.stack([tone, -tone])
    artifact = encode(Audio(samples, 16_000), SPEC.model_copy(update={"output_format": fmt}), 7)
    assert artifact.duration_s == pytest.approx(1.5) and artifact.sample_rate == 16_000
    with av.open(io.BytesIO(artifact.data)) as container:
        stream = container.streams.audio[0]
        decoded = sum(frame.samples for frame in container.decode(stream))
        assert (stream.rate, stream.channels, decoded) == (16_000, channels, 24_000)
