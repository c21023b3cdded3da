"""ControlNets and IP-Adapters from the frontends: the CLI here; the web page in test_web.py and
Discord in test_discord.py, all on the shared atelier's "guided-sd" (tests/catalog.py).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from atelier.jobs import JobInputs, JobSpec
from tests.conftest import run

pytestmark = pytest.mark.timeout(180)


def png(seed: int, size: int = 64) -> bytes:
    """A random RGB picture, PNG-encoded: a control or reference image as a user would send one."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_the_cli_sends_a_control_image_and_a_reference_image(shared_cluster, tmp_path):
    edges, look = tmp_path / "edges.png", tmp_path / "look.png"
    edges.write_bytes(png(1))
    look.write_bytes(png(2, 48))
    listed = shared_cluster.cli("models")
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith("guided-sd "))
    assert line.endswith("; ControlNets: canny, depth; IP-Adapter")
    assert "ControlNet" not in next(line for line in listed.stdout.splitlines() if line.startswith("tiny-sd "))

    made = shared_cluster.cli("generate", "a red cube", "--model", "guided-sd", "--seed", "7", "--controlnet", "canny",
                      "--control-image", str(edges), "--controlnet-scale", "0.5", "--ip-adapter-image", str(look),
                      "--ip-adapter-scale", "0.8", "-o", str(tmp_path / "out"))
    assert made.returncode == 0, made.stderr
    (path,) = made.stdout.split()
    with Image.open(path) as image:
        assert image.size == (64, 64)
        pixels, parameters = image.tobytes(), image.info["parameters"]
    assert "ControlNet: canny, ControlNet weight: 0.5" in parameters and "IP-Adapter weight: 0.8" in parameters

    # The same job with the same files, submitted directly: the CLI sent exactly those images.
    async def directly() -> bytes:
        spec = JobSpec(model="guided-sd", prompt="a red cube", seed=7, controlnet="canny", controlnet_scale=0.5,
                       ip_adapter_scale=0.8)
        async with shared_cluster.client() as client:
            record = await client.submit(spec, inputs=JobInputs(control_image=png(1), ip_adapter_image=png(2, 48)))
            return bytes((await client.wait(record.spec.id, timeout=120)).outputs[0].data)

    assert Image.open(io.BytesIO(run(directly(), timeout=150))).tobytes() == pixels


def test_the_cli_refuses_a_control_image_without_a_controlnet_and_a_missing_file(shared_cluster, tmp_path):
    edges = tmp_path / "edges.png"
    edges.write_bytes(png(1))
    unread = shared_cluster.cli("generate", "x", "--model", "guided-sd", "--control-image", str(edges))
    said = " ".join(unread.stderr.split())  # as the terminal wraps it
    assert unread.returncode == 2
    assert said == "error: controlnet: a control_image needs a controlnet to read it (it has: canny, depth)"
    missing = shared_cluster.cli("generate", "x", "--model", "guided-sd", "--ip-adapter-image",
                                 str(tmp_path / "gone.png"))
    said = " ".join(missing.stderr.split())
    assert missing.returncode == 2 and f"error: --ip-adapter-image {tmp_path / 'gone.png'}: No such file" in said
