"""A catalog entry's ``transformer``: a GGUF file (city96's FLUX.1 and SD3 quantizations: Q8_0, Q4_0,
Q4_K, …) that the pipeline's transformer is read from, every other component coming from ``source``.

diffusers reads it (``from_single_file`` with a ``GGUFQuantizationConfig``): the linear layers keep
their weights quantized, as GGUFParameter tensors of the file's bytes, and dequantize each one as it
runs (torch code, so on the CPU too); the device holds the quantized size. diffusers reads GGUF
transformers of FLUX.1 and SD3 only, of the families here: PixArt's, HunyuanDiT's and Stable Audio's
transformers have no single-file loader.

Staging: the loader stages the file's bytes in the model's segment in place of the folder's
float transformer, which is neither read nor sent (``staging.plan``); the runner makes the
tensors views of the segment, as it does a safetensors file's (pinned for the upload on CUDA). So a
model switch reads no disk for its largest part, and the runner counts the quantized size before
it loads as after. GGUFReader maps a path and parses from its start, while a staged file lies at an
offset inside the segment: the header (names, types, shapes, offsets; kilobytes) is read from the
file on disk and must equal the staged bytes' (else the file was replaced since, and is read from
disk), and the data is taken from the segment.

Torch-free at import. Which families take a GGUF transformer, and with what, is the config's to check
(atelier/tuning.py); what is checked here needs the file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atelier.tuning import GGUF_FAMILIES as FAMILIES

if TYPE_CHECKING:
    import torch

log = logging.getLogger("atelier.gguf")

MAGIC = b"GGUF"


def check_file(path: Path) -> str | None:
    """Why ``path`` cannot be a GGUF transformer (missing, not a file, not GGUF), or None."""
    if not path.exists():
        return f"{path} does not exist on this host"
    if not path.is_file():
        return f"{path} is not a file"
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            return f"{path.name} is not a GGUF file (it does not start with {MAGIC!r})"
    return None


def load_transformer(family: str, folder: Path, file: Path, staged: dict[str, Any] | None,
                     dtype: torch.dtype) -> torch.nn.Module:
    """The transformer of ``family`` from the GGUF ``file``, configured by ``folder``'s transformer config,
    its linear layers computing in ``dtype``. ``staged``: the file's staged bytes (``staging.GGUF_FILE``),
    or None to read the file. A ValueError names the field when the file does not fit."""
    import diffusers
    from diffusers import GGUFQuantizationConfig

    from atelier.staging import GGUF_FILE

    try:
        import gguf  # noqa: F401  (diffusers reads the file with it)
    except ImportError:
        raise ValueError("transformer: reading a GGUF file needs the gguf package (pip install gguf)") from None

    cls = getattr(diffusers, FAMILIES[family])
    if not (folder / "transformer" / "config.json").is_file():
        raise ValueError(f"transformer: {folder} has no transformer/config.json to build the GGUF transformer with")
    config = cls.load_config(folder / "transformer")
    try:
        checkpoint = _staged_tensors(file, staged[GGUF_FILE]) if staged is not None else None
        if checkpoint is None:
            checkpoint = _file_tensors(file)
    except ValueError as exc:  # an unsupported quantization, a damaged file
        raise ValueError(f"transformer: {file.name}: {exc}") from None
    check_fits(family, cls, config, checkpoint, file)
    # A dict rather than the path: staged or read here, the same tensors go through the same loader.
    return cls.from_single_file(checkpoint, config=str(folder), subfolder="transformer", local_files_only=True,
                                quantization_config=GGUFQuantizationConfig(compute_dtype=dtype), dtype=dtype)


def _file_tensors(file: Path) -> dict[str, Any]:
    """The file's tensors as diffusers reads them from a path (copies; quantized ones as GGUFParameter)."""
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    return load_gguf_checkpoint(str(file))


def _staged_tensors(file: Path, raw: torch.Tensor) -> dict[str, Any] | None:
    """The same tensors as ``_file_tensors``, as views of the staged bytes ``raw`` (no copy); None when the
    file is no longer what was staged."""
    import gguf
    import torch
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter

    reader = gguf.GGUFReader(file)  # its header only: tensor data is mapped, never read from disk
    staged = raw.numpy()
    head = reader.data_offset
    if staged.size != reader.data.size or staged[:head].tobytes() != reader.data[:head].tobytes():
        # Replaced since (a requantized file, say): its offsets do not fit the staged bytes. The file as
        # it is now is what the entry names.
        log.warning("%s changed since it was staged; reading it from disk", file)
        return None
    plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    out: dict[str, Any] = {}
    for t in reader.tensors:
        # diffusers' own rules (load_gguf_checkpoint): floats as tensors, quantized bytes as GGUFParameter.
        if t.tensor_type not in plain and t.tensor_type not in SUPPORTED_GGUF_QUANT_TYPES:
            raise ValueError(f"{t.name} is quantized as {t.tensor_type.name}, which diffusers cannot read "
                             f"(it reads {', '.join(q.name for q in SUPPORTED_GGUF_QUANT_TYPES)})")
        view = staged[t.data_offset:t.data_offset + t.data.nbytes].view(t.data.dtype).reshape(t.data.shape)
        tensor = torch.from_numpy(view)
        out[t.name] = tensor if t.tensor_type in plain else GGUFParameter(tensor, quant_type=t.tensor_type)
    return out


def check_fits(family: str, cls: type, config: dict[str, Any], checkpoint: dict[str, Any], file: Path) -> None:
    """Refuses a file whose tensors are not those of ``config``'s transformer, in diffusers' layout or in the
    original one diffusers converts (tried on shapes alone: meta tensors). diffusers itself would load
    such a file with weights missing (left random or empty) or fail deep inside with a bare shape."""
    import torch
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    with init_empty_weights():
        model = cls.from_config(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    shapes = {name: torch.empty(_logical_shape(t), device="meta") for name, t in checkpoint.items()}
    what = f"transformer: {file.name} is not a {family} transformer of this model's shape"
    # As diffusers: converted unless the names are exactly the model's. Names that are partly the model's
    # are of diffusers' layout, and what is missing or extra says more than a failed conversion would.
    if not shapes.keys() & expected.keys():
        convert = SINGLE_FILE_LOADABLE_CLASSES[cls.__name__]["checkpoint_mapping_fn"]
        try:
            shapes = convert(config=config, checkpoint=dict(shapes))
        except (KeyError, IndexError, RuntimeError, ValueError) as exc:
            raise ValueError(f"{what}: its tensors are in neither diffusers' layout nor the original one "
                             f"({type(exc).__name__}: {exc})") from None
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    wrong = [f"{k} {tuple(shapes[k].shape)} (not {expected[k]})" for k in sorted(expected.keys() & shapes.keys())
             if tuple(shapes[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        problems = [f"{label}: {', '.join(names[:3])}{' …' if len(names) > 3 else ''}"
                    for label, names in (("missing", missing), ("unexpected", unexpected), ("shapes", wrong))
                    if names]
        raise ValueError(f"{what} ({'; '.join(problems)})")


def _logical_shape(tensor: Any) -> tuple[int, ...]:
    return tuple(getattr(tensor, "quant_shape", None) or tensor.shape)
