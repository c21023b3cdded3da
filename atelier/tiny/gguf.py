"""Tiny GGUF transformers: a tiny model's transformer written as a real ``.gguf`` file, quantized.

What city96 publishes for FLUX.1 and SD3 (flux1-dev-Q8_0.gguf, …) is the transformer alone, its
linear layers' weights in a GGML block quantization and the rest as floats; the rest of the
pipeline comes from the ordinary diffusers folder. This writes the same kind of file with the
``gguf`` package (GGUFWriter, gguf.quants) from a tiny model's folder.

The tensors keep diffusers' names. A real FLUX.1 file has the original (BFL) names, which diffusers
converts on load, but its converter assumes FLUX.1's width (3072) when it splits the fused
attention weights, so a tiny FLUX can only be read in diffusers' layout, which diffusers takes as
it is (a file whose names are exactly the model's is not converted).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# A built-in GGUF file's name -> the built-in model whose transformer it holds, and its quantization.
BUILTIN_GGUF: dict[str, tuple[str, str]] = {"tiny-flux-Q8_0.gguf": ("tiny-flux", "Q8_0")}
# What gguf.quants can write (it reads the K-quants, Q4_K and such, but does not make them).
QUANTS = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
_ARCH = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}


def write_gguf(folder: Path, out: Path, quant: str = "Q8_0") -> Path:
    """Writes the transformer of the diffusers folder ``folder`` to ``out`` as a GGUF file: each linear
    layer's weight in ``quant`` where its rows split into the quantization's blocks, as float16 where
    they do not, and every other tensor (biases, norms, embeddings) as float32."""
    import gguf
    import torch
    from safetensors.torch import load_file

    if quant not in QUANTS:
        raise ValueError(f"quant {quant!r}: gguf can write {', '.join(QUANTS)}")
    qtype = gguf.GGMLQuantizationType[quant]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    sub = Path(folder) / "transformer"
    files = sorted(sub.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{sub} has no safetensors weights to write")
    weights = {name: t for f in files for name, t in load_file(f).items()}
    linear = _linear_weights(sub)
    writer = gguf.GGUFWriter(str(out), arch=_ARCH.get(_class_name(sub), "unknown"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name in sorted(weights):
        data = weights[name].to(torch.float32).numpy()
        if name in linear and data.shape[-1] % block == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        elif name in linear:
            writer.add_tensor(name, data.astype("float16"))
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out)


def ensure_builtin_gguf(name: str, cache_dir: Path) -> Path:
    """``cache_dir / name``, written on first use from its built-in model (built too if need be).

    Written aside and renamed into place, so a file under the name is complete; two processes
    writing it at once write the same bytes (quantization is deterministic), and the last rename wins.
    """
    from atelier.tiny_models import ensure_builtin

    if name not in BUILTIN_GGUF:
        raise KeyError(f"unknown built-in GGUF file {name!r}; known: {sorted(BUILTIN_GGUF)}")
    target = Path(cache_dir) / name
    if target.is_file():
        return target
    model, quant = BUILTIN_GGUF[name]
    folder = ensure_builtin(model, cache_dir)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=cache_dir)
    os.close(fd)
    try:
        write_gguf(folder, Path(tmp), quant)
        os.chmod(tmp, 0o644)  # mkstemp's 0o600; the cache may be shared
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _linear_weights(sub: Path) -> set[str]:
    """The names of the weights of the model's nn.Linear layers: the ones diffusers runs quantized
    (a quantized weight of any other layer, a convolution, would not run)."""
    import diffusers
    import torch
    from accelerate import init_empty_weights

    cls = getattr(diffusers, _class_name(sub))
    with init_empty_weights():
        model = cls.from_config(cls.load_config(sub))
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def _class_name(sub: Path) -> str:
    import json

    return json.loads((sub / "config.json").read_text())["_class_name"]
