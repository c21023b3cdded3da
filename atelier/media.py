"""What families make, and the files a user receives: images, videos and sounds.

A family's ``generate`` returns one item per seed: a ``PIL.Image.Image``, a ``Video`` (frames and a
rate) or an ``Audio`` (samples and a rate). ``encode`` turns an item into an ``Artifact`` in the
job's output format: PNG (with the generation's parameters in a text chunk, where other tools
look for them) or WebP for images; MP4 (H.264), animated WebP or GIF for video; WAV or FLAC for
sound. Video and FLAC go through PyAV (FFmpeg's codecs); the rest through Pillow and the
standard library.

A job's input images come in as encoded bytes from anyone: ``open_input`` is the one door they are
decoded through, at admission and again on the runner.
"""

from __future__ import annotations

import io
import json
import re
import wave
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from atelier.jobs import Artifact, JobSpec

# The formats an input image may be in: what browsers, phones and Discord send. Pillow reads dozens
# more, some through code no one audits for hostile files (EPS runs Ghostscript, if it is installed).
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")

MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "mp4": "video/mp4", "gif": "image/gif",
               "wav": "audio/wav", "flac": "audio/flac"}


@dataclass
class Video:
    frames: list[Image.Image]
    fps: float


@dataclass
class Audio:
    samples: np.ndarray  # float, (channels, n) or (n,), in [-1, 1]
    sample_rate: int

    @property
    def channels_first(self) -> np.ndarray:
        data = np.asarray(self.samples, dtype=np.float32)
        return data[None, :] if data.ndim == 1 else data

    @property
    def duration_s(self) -> float:
        return self.channels_first.shape[1] / self.sample_rate


class InputImageError(ValueError):
    """An input image atelier will not decode, with a reason its sender can act on; ``too_large``
    when it is its size (not its bytes) that is refused."""

    def __init__(self, message: str, *, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def open_input(data: bytes, name: str, max_pixels: int, *, decode: bool = True) -> Image.Image:
    """An input image, fully decoded (``decode``), or only its header read: the size and format are
    checked before any pixel is, so that a small file that declares a huge picture costs nothing."""
    try:
        image = Image.open(io.BytesIO(bytes(data)), formats=INPUT_FORMATS)
    except Image.DecompressionBombError:  # not an OSError: Pillow's own cap, far above ours
        raise InputImageError(f"{name}: the image is larger than {max_pixels} pixels", too_large=True) from None
    except Exception as exc:  # crafted bytes make decoders raise all kinds (OSError, SyntaxError, ...)
        raise InputImageError(f"{name}: not a PNG, JPEG or WebP image ({_reason(exc)})") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise InputImageError(f"{name}: {width}x{height} is more than the {max_pixels} pixels an input image "
                              "may have; scale it down", too_large=True)
    if decode:
        try:
            image.load()  # every pixel: a truncated or corrupt file fails here, not in a batch
        except Exception as exc:
            image.close()
            raise InputImageError(f"{name}: the {image.format} image is damaged or cut short "
                                  f"({_reason(exc)})") from None
    return image


def _reason(exc: Exception) -> str:
    # Pillow's messages name no path here (the bytes came from memory), but they can be long.
    return str(exc)[:200] or type(exc).__name__


def encode(item: Any, spec: JobSpec, seed: int) -> Artifact:
    """One generated item as the file the job asked for (its ``output_format``)."""
    fmt = spec.output_format or ("mp4" if isinstance(item, Video) else "wav" if isinstance(item, Audio) else "png")
    if isinstance(item, Video):
        data = _video(item, fmt)
        first = item.frames[0]
        return Artifact(media_type=MEDIA_TYPES[fmt], data=data, width=first.width, height=first.height, seed=seed,
                        frames=len(item.frames), fps=item.fps, duration_s=len(item.frames) / item.fps)
    if isinstance(item, Audio):
        return Artifact(media_type=MEDIA_TYPES[fmt], data=_audio(item, fmt), seed=seed,
                        duration_s=item.duration_s, sample_rate=item.sample_rate)
    return Artifact(media_type=MEDIA_TYPES[fmt], data=_image(item, fmt, spec, seed), width=item.width,
                    height=item.height, seed=seed)


def parameters(spec: JobSpec, seed: int) -> str:
    """The generation's parameters in the text form image tools read (A1111's "parameters")."""
    # LoRAs as A1111 writes them, in the prompt, so that pasting the text back asks for them again.
    prompt = " ".join([spec.prompt, *(f"<lora:{name}:{scale:g}>" for name, scale in spec.loras.items())])
    fields = [f"Steps: {spec.steps}", f"CFG scale: {spec.guidance}", f"Seed: {seed}",
              f"Size: {spec.width}x{spec.height}", f"Model: {spec.model}"]
    if spec.sampler is not None:  # atelier's names (atelier/samplers.py); absent: the model's own scheduler
        fields.append(f"Sampler: {spec.sampler}")
    if spec.schedule not in (None, "default"):
        fields.append(f"Schedule type: {spec.schedule}")
    # What else shaped the image, so that the text is enough to make it again; a job's input
    # images themselves are not kept in it.
    if "image" in spec.inputs and spec.strength is not None:
        fields.append(f"Denoising strength: {spec.strength:g}")
    if "mask" in spec.inputs:
        fields.append("Inpainted: true")
    if spec.controlnet is not None and "control_image" in spec.inputs:
        scale = 1.0 if spec.controlnet_scale is None else spec.controlnet_scale
        fields.append(f"ControlNet: {spec.controlnet}, ControlNet weight: {scale:g}")
    if "ip_adapter_image" in spec.inputs:
        scale = 1.0 if spec.ip_adapter_scale is None else spec.ip_adapter_scale
        fields.append(f"IP-Adapter weight: {scale:g}")
    return f"{prompt}\nNegative prompt: {spec.negative_prompt or ''}\n" + ", ".join(fields)


# A1111's "<lora:name:weight>" (its extra networks syntax), as ``parameters`` writes a job's LoRAs.
LORA_TAG = re.compile(r"<lora:([^<>:]*)(?::([^<>]*))?>", re.IGNORECASE)
# One "Key: value" of the parameters' last line; a value with commas is quoted (JSON), as A1111 writes it.
_FIELD = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def split_loras(prompt: str) -> tuple[str, dict[str, float]]:
    """The prompt without its ``<lora:name:weight>`` tags, and the LoRAs they name (weight default 1).
    Raises ValueError naming a tag that is not a name and one number."""
    loras: dict[str, float] = {}
    for match in LORA_TAG.finditer(prompt):
        name, weight = match.group(1).strip(), (match.group(2) or "1").strip()
        try:
            loras[name] = float(weight)
        except ValueError:
            raise ValueError(f"{match.group(0)!r}: a LoRA tag is <lora:name> or <lora:name:weight>, the "
                             "weight one number") from None
        if not name:
            raise ValueError(f"{match.group(0)!r}: the LoRA tag names no LoRA")
    text = re.sub(r"\s{2,}", " ", LORA_TAG.sub(" ", prompt)).strip()
    return text, loras


def read_parameters(text: str) -> dict[str, str]:
    """``parameters``' text read back into its fields, as A1111's PNG Info does: "Prompt" (with its
    LoRA tags, see ``split_loras``), "Negative prompt", then each "Key: value" of the last line, a size
    split into "Size-1" and "Size-2". Values stay text, as in A1111."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    fields = _FIELD.findall(last)
    if len(fields) < 3:  # not the fields line (A1111's has Steps, Sampler, CFG scale… at least)
        fields = []
    if fields:
        lines = lines[:-1]
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:"):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    found = {"Prompt": "\n".join(prompt).strip(), "Negative prompt": "\n".join(negative).strip()}
    for key, value in fields:
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        size = re.fullmatch(r"(\d+)x(\d+)", value)
        if size:
            found[f"{key}-1"], found[f"{key}-2"] = size.group(1), size.group(2)
        else:
            found[key] = value
    return found


def _image(image: Image.Image, fmt: str, spec: JobSpec, seed: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "webp":
        image.save(buf, format="WEBP", lossless=True)
    else:
        info = PngInfo()
        info.add_text("parameters", parameters(spec, seed))
        image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _video(video: Video, fmt: str) -> bytes:
    frames = [frame.convert("RGB") for frame in video.frames]
    buf = io.BytesIO()
    if fmt in ("webp", "gif"):
        # Pillow writes animations itself; a frame's duration is in milliseconds.
        extra = {"lossless": True} if fmt == "webp" else {"disposal": 2}
        frames[0].save(buf, format=fmt.upper(), save_all=True, append_images=frames[1:], loop=0,
                       duration=round(1000 / video.fps), **extra)
        return buf.getvalue()
    import av

    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=round(video.fps))
        # H.264 in yuv420p wants even sides: crop the odd pixel rather than distort.
        stream.width, stream.height = frames[0].width // 2 * 2, frames[0].height // 2 * 2
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            array = np.asarray(frame)[: stream.height, : stream.width]
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _audio(audio: Audio, fmt: str) -> bytes:
    pcm = (np.clip(audio.channels_first, -1.0, 1.0) * 32767).astype("<i2")  # 16-bit, channels first
    buf = io.BytesIO()
    if fmt == "wav":
        with wave.open(buf, "wb") as out:
            out.setnchannels(pcm.shape[0])
            out.setsampwidth(2)
            out.setframerate(audio.sample_rate)
            out.writeframes(pcm.T.tobytes())  # interleaved
        return buf.getvalue()
    import av

    layout = "mono" if pcm.shape[0] == 1 else "stereo"
    with av.open(buf, mode="w", format="flac") as container:
        stream = container.add_stream("flac", rate=audio.sample_rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(pcm.T.reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = audio.sample_rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
