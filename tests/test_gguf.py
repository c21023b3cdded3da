"""GGUF transformers (a catalog entry's `transformer`): read quantized, staged in place of the float one,
refused with the field named, and served end to end as the built-in tiny-flux-gguf."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

# Before anything imports huggingface_hub: nothing here may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

gguf = pytest.importorskip("gguf")

from atelier import sources, staging  # noqa: E402
from atelier.config import ModelEntry, builtin_models  # noqa: E402
from atelier.families import GenerateRequest, accel, get_family  # noqa: E402
from atelier.families.accel import module_bytes  # noqa: E402
from atelier.families.loaded import LoadedModel, LoadRequest  # noqa: E402
from atelier.jobs import JobSpec, JobState  # noqa: E402
from atelier.tiny.gguf import write_gguf  # noqa: E402
from atelier.tiny_models import ensure_builtin  # noqa: E402
from tests.conftest import run  # noqa: E402

pytestmark = pytest.mark.timeout(180)

FLUX = "flux"


@pytest.fixture(scope="module")
def cache(atelier_home: Path) -> Path:
    return atelier_home / "models"  # the session's: the built-in atelier below finds the models built


@pytest.fixture(scope="module")
def builtin(cache: Path) -> tuple[Path, Path]:
    """The built-in tiny-flux-gguf entry resolved as a node does: (diffusers folder, GGUF file)."""
    entry = builtin_models()["tiny-flux-gguf"]
    return sources.resolve("tiny-flux-gguf", entry, cache), sources.transformer_file(entry, cache)


@pytest.fixture(scope="module")
def files(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """(family, quantization) -> (the tiny model's folder, its transformer as a GGUF file)."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for family, quant in ((FLUX, "Q4_0"), ("sd3", "Q8_0")):
        folder = ensure_builtin(f"tiny-{family}", cache)
        out[family, quant] = folder, write_gguf(folder, root / f"{family}-{quant}.gguf", quant)
    return out


@pytest.fixture(scope="module")
def flux_pipes(builtin: tuple[Path, Path]) -> tuple[Any, Any]:
    """tiny-flux with its transformer from the built-in Q8_0 file, and as it is (float32)."""
    folder, file = builtin
    return (get_family(FLUX).load(LoadRequest(folder, device="cpu", transformer=file)).pipe,
            get_family(FLUX).load(LoadRequest(folder, device="cpu")).pipe)


def _image(pipe: Any, family: str, seed: int, prompt: str = "a red cube", steps: int = 2) -> np.ndarray:
    request = GenerateRequest.single(prompt=prompt, negative_prompt=None, width=64, height=96, steps=steps,
                                     guidance=3.5, seed=seed, count=1)
    (image,) = get_family(family).generate(LoadedModel(pipe, get_family(family)), request, lambda *_: None)
    assert image.size == (64, 96)
    return np.asarray(image, dtype=np.int16)


def _transformer_bytes(pipe: Any) -> int:
    return sum(accel.tensor_bytes(t) for t in [*pipe.transformer.parameters(), *pipe.transformer.buffers()])


def test_the_files_are_real_gguf_with_linear_weights_quantized(builtin, files) -> None:
    reader = gguf.GGUFReader(builtin[1])
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert reader.get_field("general.architecture").contents() == "flux"
    assert types["transformer_blocks.0.attn.to_q.weight"] == "Q8_0"
    # Biases and norms stay float32, as in city96's files.
    assert types["transformer_blocks.0.attn.to_q.bias"] == types["transformer_blocks.0.attn.norm_q.weight"] == "F32"

    reader = gguf.GGUFReader(files["sd3", "Q8_0"][1])
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert reader.get_field("general.architecture").contents() == "sd3"
    # Rows of 80 (the pooled CLIP-L and CLIP-G widths) do not split into blocks of 32: float16.
    assert types["time_text_embed.text_embedder.linear_1.weight"] == "F16"
    assert types["pos_embed.proj.weight"] == "F32"  # a convolution's: diffusers runs only linear layers quantized


@pytest.mark.parametrize("case", ["flux-Q8_0", "flux-Q4_0", "sd3-Q8_0"])
def test_a_gguf_transformer_loads_quantized_and_its_images_are_close_to_the_float_ones(case, files, flux_pipes):
    family, quant = case.split("-")
    if case == "flux-Q8_0":
        quantized, full = flux_pipes
    else:
        folder, file = files[family, quant]
        quantized = get_family(family).load(LoadRequest(folder, device="cpu", transformer=file)).pipe
        full = flux_pipes[1] if family == FLUX else get_family(family).load(LoadRequest(folder, device="cpu")).pipe

    weight = quantized.transformer.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__name__ == "GGUFParameter" and str(weight.dtype) == "torch.uint8"  # the blocks, as bytes
    assert weight.quant_type.name == quant and type(quantized.transformer.transformer_blocks[0].attn.to_q).__name__ \
        == "GGUFLinear"
    # What the runner's device budget counts (module_bytes) is the quantized size: each quantized weight
    # saves its float32 bytes less its blocks' bytes, and nothing else changes.
    blocks = [p for p in quantized.transformer.parameters() if type(p).__name__ == "GGUFParameter"]
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant]]
    elements = sum(int(np.prod(p.quant_shape)) for p in blocks)
    assert sum(accel.tensor_bytes(p) for p in blocks) == elements * size // block
    assert module_bytes(full) - module_bytes(quantized) == elements * 4 - elements * size // block
    if family == FLUX:  # all but its biases and norms are linear weights
        assert _transformer_bytes(quantized) < 0.4 * _transformer_bytes(full)

    same_seed = np.abs(_image(quantized, family, 5) - _image(full, family, 5))
    other_seed = np.abs(_image(full, family, 6) - _image(full, family, 5)).mean()
    assert same_seed.max() > 0  # really computed from the quantized weights
    # Close: a small fraction of what another seed changes (Q4_0 keeps 4 bits a weight, Q8_0 eight).
    assert same_seed.mean() < (0.02 if quant == "Q8_0" else 0.1) * other_seed


def test_staged_it_is_the_gguf_bytes_in_place_of_the_float_transformer_and_the_same_image(builtin, tmp_path):
    if staging.SHM_ROOT is None:
        pytest.skip("needs /dev/shm")
    folder, file = builtin
    segment = staging.SHM_ROOT / f"atelier-test-gguf-{tmp_path.name}"
    try:
        table = staging.stage(folder, segment, None, file)
        mapping = staging.map_segment(segment)
    finally:
        segment.unlink(missing_ok=True)
    transformer = [(e.name, e.length) for e in table if e.component == "transformer"]
    assert transformer == [(file.name, file.stat().st_size)]  # the float safetensors are not staged
    assert staging.segment_bytes(table) < staging.planned_bytes(staging.plan(folder))

    # Neither load reads the folder's float transformer: a folder without its weights does (as one
    # downloaded without them, beside the GGUF file).
    lean = shutil.copytree(folder, tmp_path / "lean", ignore=lambda where, names: [
        n for n in names if Path(where).name == "transformer" and n.endswith(".safetensors")])
    adapter = get_family(FLUX)
    staged = adapter.load(LoadRequest(lean, weights=staging.state_dicts(mapping, table), transformer=file)).pipe
    from_disk = adapter.load(LoadRequest(lean, device="cpu", transformer=file)).pipe
    assert type(staged.transformer.x_embedder.weight).__name__ == "GGUFParameter"
    assert _image(staged, FLUX, 3).tobytes() == _image(from_disk, FLUX, 3).tobytes()

    # A file rewritten after staging (requantized) no longer fits the staged bytes: the file is read as it is
    # now, never the staged bytes through its new offsets.
    changed = tmp_path / file.name
    write_gguf(folder, changed, "Q4_0")
    again = adapter.load(LoadRequest(lean, weights=staging.state_dicts(mapping, table), transformer=changed)).pipe
    assert again.transformer.x_embedder.weight.quant_type.name == "Q4_0"


@pytest.mark.parametrize("fields, expected", [
    (dict(family="flux", transformer="/models/flux1-dev.safetensors"), "transformer .* is not a .gguf file"),
    (dict(family="sd1", transformer="/models/x.gguf"), "transformer: family 'sd1' has no transformer"),
    (dict(family="pixart-sigma", transformer="/models/x.gguf"), "transformer: diffusers cannot read a pixart-sigma"),
    (dict(family="hunyuan-dit", transformer="/models/x.gguf"), "transformer: diffusers cannot read a hunyuan-dit"),
    (dict(family="flux", transformer="/models/x.gguf", quantize="int8"), "transformer: .*quantized already"),
])
def test_the_catalog_refuses_what_cannot_be_a_gguf_transformer(fields, expected) -> None:
    with pytest.raises(ValidationError, match=expected):
        ModelEntry(source="/models/folder", **fields)


def test_a_missing_or_foreign_file_is_refused_when_the_model_is_resolved(builtin, tmp_path) -> None:
    folder, file = builtin
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf at all")
    cases = {tmp_path / "nowhere.gguf": "transformer: .*nowhere.gguf does not exist on this host",
             fake: "transformer: fake.gguf is not a GGUF file"}
    for path, expected in cases.items():
        entry = ModelEntry(family=FLUX, source=str(folder), transformer=str(path))
        with pytest.raises(sources.ModelSourceError, match=f"model m: {expected}"):
            sources.resolve("m", entry, tmp_path)


def test_a_gguf_that_does_not_fit_the_models_transformer_is_refused(builtin, files, tmp_path) -> None:
    folder, file = builtin
    sd3_folder, _ = files["sd3", "Q8_0"]
    with pytest.raises(ValueError, match=r"transformer: tiny-flux-Q8_0.gguf is not a sd3 transformer of this "
                                         r"model's shape \(missing: pos_embed"):
        get_family("sd3").load(LoadRequest(sd3_folder, device="cpu", transformer=file))

    # Names of neither layout: diffusers' converter from the original one finds nothing it knows.
    foreign = tmp_path / "foreign.gguf"
    writer = gguf.GGUFWriter(str(foreign), arch="flux")
    writer.add_tensor("model.something.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="transformer: foreign.gguf is not a flux transformer .*neither "
                                         "diffusers' layout nor the original one"):
        get_family(FLUX).load(LoadRequest(folder, device="cpu", transformer=foreign))

    # A FLUX folder whose transformer has one more single block than the file holds.
    bigger = tmp_path / "bigger"
    shutil.copytree(folder, bigger)
    config = bigger / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_single_layers": 3}))
    with pytest.raises(ValueError, match=r"transformer: .* is not a flux transformer .*missing: "
                                         r"single_transformer_blocks\.2\."):
        get_family(FLUX).load(LoadRequest(bigger, device="cpu", transformer=file))


def test_a_flux1_file_in_the_original_layout_fits_on_shapes_alone() -> None:
    # city96's FLUX.1 files name tensors as Black Forest Labs did (double_blocks.0.img_attn.qkv, …), which
    # diffusers converts; a tiny file cannot be in that layout (the converter assumes FLUX.1's width), so
    # the check is shown on shapes: a FLUX.1-dev-wide transformer of one block of each kind, on meta.
    import torch
    from diffusers import FluxTransformer2DModel

    from atelier.families.gguf import check_fits

    width, text, pooled, channels = 3072, 4096, 768, 64

    def t(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device="meta")

    original = {"txt_in.weight": t(width, text), "txt_in.bias": t(width), "img_in.weight": t(width, channels),
                "img_in.bias": t(width), "final_layer.linear.weight": t(channels, width),
                "final_layer.linear.bias": t(channels), "final_layer.adaLN_modulation.1.weight": t(2 * width, width),
                "final_layer.adaLN_modulation.1.bias": t(2 * width)}
    for embedder, inputs in (("time_in", 256), ("vector_in", pooled), ("guidance_in", 256)):
        original |= {f"{embedder}.in_layer.weight": t(width, inputs), f"{embedder}.in_layer.bias": t(width),
                     f"{embedder}.out_layer.weight": t(width, width), f"{embedder}.out_layer.bias": t(width)}
    for stream in ("img", "txt"):
        for name, (rows, columns) in {"mod.lin": (6, 1), "attn.qkv": (3, 1), "attn.proj": (1, 1), "mlp.0": (4, 1),
                                      "mlp.2": (1, 4)}.items():
            key = f"double_blocks.0.{stream}_{name}"
            original |= {f"{key}.weight": t(rows * width, columns * width), f"{key}.bias": t(rows * width)}
        original |= {f"double_blocks.0.{stream}_attn.norm.{n}_norm.scale": t(128) for n in ("query", "key")}
    for name, (rows, columns) in {"modulation.lin": (3, 1), "linear1": (7, 1), "linear2": (1, 5)}.items():
        original |= {f"single_blocks.0.{name}.weight": t(rows * width, columns * width),
                     f"single_blocks.0.{name}.bias": t(rows * width)}
    original |= {f"single_blocks.0.norm.{n}_norm.scale": t(128) for n in ("query", "key")}
    config = dict(patch_size=1, in_channels=channels, num_layers=1, num_single_layers=1, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=text, pooled_projection_dim=pooled,
                  guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    file = Path("flux1-dev-Q8_0.gguf")

    check_fits(FLUX, FluxTransformer2DModel, config, {f"model.diffusion_model.{k}": v for k, v in original.items()},
               file)
    del original["single_blocks.0.linear2.bias"]
    with pytest.raises(ValueError, match="transformer: flux1-dev-Q8_0.gguf .*single_blocks.0.linear2.bias"):
        check_fits(FLUX, FluxTransformer2DModel, config, original, file)


def test_end_to_end_the_user_gets_the_image_and_the_runner_holds_the_quantized_size(shared_cluster, builtin,
                                                                                  flux_pipes) -> None:
    spec = JobSpec(model="tiny-flux-gguf", prompt="a lighthouse", width=64, height=96, steps=3, guidance=3.5, seed=5)

    async def go() -> tuple[Any, Any]:
        async with shared_cluster.client() as client:
            await client.submit(spec)
            result = [e async for e in client.events(spec.id, timeout=120)][-1]
            return result, await client.status()

    result, status = run(go(), timeout=240)
    assert result.job.state is JobState.done, result.job.reason
    (artifact,) = result.outputs
    image = Image.open(io.BytesIO(bytes(artifact.data)))
    assert artifact.media_type == "image/png" and image.format == "PNG" and image.size == (64, 96)
    assert "Seed: 5" in image.info["parameters"]
    # The picture this process makes from the same file and request (threads may round differently).
    quantized, full = flux_pipes
    served = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert np.abs(served - _image(quantized, FLUX, 5, "a lighthouse", steps=3)).mean() < 1.0

    # The runner counts the quantized pipeline against its device budget; the loader staged the GGUF
    # file in place of the float transformer.
    resident = {m: b for r in status.runners for m, b in r.capabilities.resident.items()}
    staged = {m: b for loader in status.loaders for m, b in loader.staged.items()}
    folder, file = builtin
    assert resident["tiny-flux-gguf"] == module_bytes(quantized) < module_bytes(full)
    assert staged["tiny-flux-gguf"] == staging.planned_bytes(staging.plan(folder, None, file)) \
        < staging.planned_bytes(staging.plan(folder))
