"""Model weights in shared memory: staged once per node, mapped by every runner on it.

The loader copies a diffusers folder's ``.safetensors`` files, byte for byte, into
one file on a RAM-backed file system (``/dev/shm``): a *segment*. A runner maps the
segment and turns each tensor into a view of the mapping with ``torch.frombuffer``:
no parse into Python objects, no copy. On the CPU the mapping is private
copy-on-write, so a model that changes a weight in place (fusing a LoRA, say)
gets its own copy of that page and never corrupts its neighbours'. On CUDA the
runner pins the mapping and uploads tensor by tensor, DMA from pinned memory.

The pipeline itself is assembled from the folder's configs with empty (meta)
weights that then take the mapped tensors (``load_state_dict(assign=True)``),
so the same folder gives the same pipeline, bit for bit, as ``from_pretrained``.

A single-file checkpoint (the original "LDM" layout) is staged the same way, as
one file under the component name ``CHECKPOINT``; diffusers' own converters then
build each component from its tensors, as ``from_single_file`` does from the file.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import inspect
import json
import logging
import math
import mmap
import os
import re
import secrets
import struct
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atelier.jobs import StagedFile

log = logging.getLogger("atelier.staging")

ALIGN = 64  # every file starts on a cache line, so every tensor is aligned for its dtype
CHECKPOINT = "checkpoint"  # the component a single-file checkpoint is staged as: it holds them all
# A folder that stands in for weights it does not hold: {"bytes": N, "read_s": T}. Benchmarks of
# the scheduling use it (the cost-model family) to stage models of real sizes without the memory.
STAND_IN = "stand_in.json"
# A GGUF transformer (a catalog entry's `transformer`) is staged as its file's bytes, under the component
# "transformer"; the runner gets them as one uint8 tensor under this name (atelier/families/gguf.py).
GGUF_FILE = "gguf_file"
SHM_ROOT = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)  # Python 3.13 names it


class StagingError(Exception):
    """The folder cannot be staged (no safetensors weights, a damaged file, …)."""


# --------------------------------------------------------------------------- #
# the loader's side


def plan(folder: Path, variant: str | None = None, transformer: Path | None = None) -> list[tuple[str, Path]]:
    """The weight files from_pretrained would read, as (component, file) pairs; a single file is one.
    ``transformer``: a GGUF file staged in place of the folder's transformer, whose weights are not read."""
    if folder.is_file():
        if folder.suffix != ".safetensors":
            raise StagingError(f"{folder.name} is not a safetensors file; only safetensors weights are staged")
        return [(CHECKPOINT, folder)]
    if (folder / STAND_IN).is_file():
        return [("stand_in", folder / STAND_IN)]
    components = variant_components(folder, variant)
    if variant is not None and not components:
        raise StagingError(f"{folder} has no weight files of the variant {variant!r} "
                           f"(such as unet/diffusion_pytorch_model.{variant}.safetensors)")
    files = []
    for component in model_components(folder):
        sub = folder / component
        if not sub.is_dir() or (component == "transformer" and transformer is not None):
            continue
        # As from_pretrained: a component with files of the variant loads those, any other its plain files.
        wanted = variant if component in components else None
        chosen = [p for p in sorted(sub.glob("*.safetensors")) if _variant_of(p) == wanted]
        if not chosen and any(sub.glob("*.bin")):
            raise StagingError(f"{sub} has only .bin (pickle) weights; convert them to safetensors to stage them")
        files += [(component, p) for p in chosen]
    if transformer is not None:
        files.append(("transformer", transformer))
    if not files:
        raise StagingError(f"{folder} has no safetensors weights to stage")
    return files


def model_components(folder: Path) -> list[str]:
    """The components a diffusers folder's model_index.json lists (each a subfolder of it, if it has files)."""
    return [component for component, value in _model_index(folder).items()
            if not component.startswith("_") and isinstance(value, list) and value[0] is not None]


def variant_components(folder: Path, variant: str | None) -> set[str]:
    """The components of a diffusers folder that from_pretrained(variant=...) reads variant files of:
    those with a file named ``<name>.<variant>…`` (diffusers' own test, _identify_model_variants)."""
    if variant is None:
        return set()
    listed = _model_index(folder)
    return {sub.name for sub in folder.iterdir() if sub.is_dir() and sub.name in listed
            and any(len(parts := f.name.split(".")) > 1 and parts[1].startswith(variant) for f in sub.iterdir())}


def stage(folder: Path, segment: Path, variant: str | None = None,
          transformer: Path | None = None) -> list[StagedFile]:
    """Copies the folder's weight files (or the single file) into ``segment``; returns where each one lies in it.

    The segment appears under its name only when complete (written aside, then renamed).
    """
    files = plan(folder, variant, transformer)
    if files[0][1].name == STAND_IN:
        return _stage_stand_in(files[0][1], segment)
    table: list[StagedFile] = []
    offset = 0
    for component, path in files:
        length = path.stat().st_size
        table.append(StagedFile(component=component, name=path.name, offset=offset, length=length))
        offset = _aligned(offset + length)
    partial = _partial(segment)
    fd = _create(partial)
    try:
        allocate(fd, max(offset, 1), segment)
        with mmap.mmap(fd, max(offset, 1)) as mapping:
            view = memoryview(mapping)
            try:
                for entry, (_, path) in zip(table, files, strict=True):
                    _read_into(path, view[entry.offset:entry.offset + entry.length])
            finally:
                view.release()
        os.replace(partial, segment)
    except BaseException:
        remove_own(partial)
        raise
    finally:
        os.close(fd)
    return table


def allocate(fd: int, size: int, segment: Path) -> None:
    """Gives the file its ``size`` in memory now: a tmpfs that runs out while a mapping of it is written
    kills the writer with SIGBUS; here it is a StagingError, naming the folder and what it lacks."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a file system without it
            os.ftruncate(fd, size)
            return
        if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise
        raise StagingError(f"{segment.parent} has no room for {size:,} bytes of weights "
                           f"({exc.strerror}); make it larger (docker run --shm-size) or lower "
                           "[node] stage_budget_bytes") from None


def shm_bytes(root: Path) -> int | None:
    """The size of the file system staged weights live on (/dev/shm), or None where it cannot be read."""
    try:
        stats = os.statvfs(root)
    except OSError:
        return None
    return stats.f_blocks * stats.f_frsize


def _partial(segment: Path) -> Path:
    # Random: in a folder every local user writes to (/dev/shm), a name nobody can guess is one
    # nobody can have made ready (a symlink, a file of theirs) for us to write through or trip on.
    return segment.with_name(f"{segment.name}.{secrets.token_hex(8)}.partial")


def _create(path: Path) -> int:
    """A new file only: never one that is there already, nor through a symlink."""
    return os.open(path, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_RDWR | os.O_CLOEXEC, 0o600)


def remove_own(path: Path) -> bool:
    """Unlinks ``path`` if it is this user's own (a segment or part of one); whether it did. Another
    user's file of the same name in /dev/shm is theirs, and never a reason to fail."""
    try:
        if path.lstat().st_uid != os.getuid():
            log.warning("not removing %s: it belongs to uid %d", path, path.lstat().st_uid)
            return False
        path.unlink()
    except OSError:
        return False  # gone already, or not ours to remove
    return True


def segment_bytes(table: Iterable[StagedFile]) -> int:
    return sum(entry.length for entry in table)


def planned_bytes(files: Iterable[tuple[str, Path]]) -> int:
    """What staging ``files`` will take: their sizes, or the size a stand-in declares."""
    return sum(_stand_in(path)[0] if path.name == STAND_IN else path.stat().st_size for _, path in files)


def _stand_in(path: Path) -> tuple[int, float]:
    try:
        spec = json.loads(path.read_text())
        return int(spec["bytes"]), float(spec.get("read_s", 0.0))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StagingError(f"{path}: not a stand-in description ({exc})") from None


def _stage_stand_in(path: Path, segment: Path) -> list[StagedFile]:
    """A segment of the declared size after the time reading it would take. Only its header (an
    empty safetensors table) is written: the rest is a hole, which takes no memory."""
    size, read_s = _stand_in(path)
    time.sleep(read_s)
    header = b"{}"
    partial = _partial(segment)
    try:
        with os.fdopen(_create(partial), "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.truncate(max(size, 8 + len(header)))
        os.replace(partial, segment)
    except BaseException:
        remove_own(partial)
        raise
    return [StagedFile(component="stand_in", name=STAND_IN, offset=0, length=size)]


# --------------------------------------------------------------------------- #
# the runner's side


def map_segment(segment: Path, *, shared: bool = False) -> mmap.mmap:
    """Maps a staged segment: private copy-on-write by default, shared for pinning on CUDA."""
    fd = os.open(segment, os.O_RDWR if shared else os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if shared:
            return mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)
        # Private, and without reserving memory for a copy of every page: a runner writes to few or
        # none of them, and the kernel would otherwise refuse to map a model larger than what is free.
        return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)  # the mapping keeps the memory; the name may go away now


def pin(mapping: mmap.mmap) -> tuple[int, Any]:
    """Page-locks a shared mapping for DMA (cudaHostRegister); returns the handle for ``unpin``."""
    import ctypes

    import torch

    anchor = ctypes.c_char.from_buffer(mapping)  # keeps the mapping open while it is pinned
    pointer = ctypes.addressof(anchor)
    status = torch.cuda.cudart().cudaHostRegister(pointer, len(mapping), 0)
    if int(status) != 0:
        raise StagingError(f"cudaHostRegister of {len(mapping):,} bytes failed with CUDA error {int(status)}")
    return pointer, anchor


def unpin(handle: tuple[int, Any], device: str | None = None) -> None:
    """Unregisters a ``pin``; first waits for ``device`` (default: the current one), since copies out of the
    mapping may still be in flight when a load failed midway."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.cudart().cudaHostUnregister(handle[0])


def state_dicts(mapping: mmap.mmap, table: Iterable[StagedFile]) -> dict[str, dict[str, Any]]:
    """Every tensor of every staged file, as views of ``mapping`` (no copy), by component."""
    out: dict[str, dict[str, Any]] = {}
    for entry in table:
        if entry.name.lower().endswith(".gguf"):  # not safetensors: its family's loader reads the bytes (GGUF_FILE)
            import torch

            out[entry.component] = {GGUF_FILE: torch.frombuffer(mapping, dtype=torch.uint8, count=entry.length,
                                                                offset=entry.offset)}
            continue
        where = f"{entry.component}/{entry.name}"
        if entry.offset < 0 or entry.length < 0 or entry.offset + entry.length > len(mapping):
            raise StagingError(f"{where}: lies outside the segment")
        try:
            length = header_length(mapping[entry.offset:entry.offset + 8], entry.length)
            header = parse_header(mapping[entry.offset + 8:entry.offset + 8 + length], entry.length - 8 - length)
        except StagingError as exc:
            raise StagingError(f"{where}: {exc}") from None
        data = entry.offset + 8 + length
        tensors = out.setdefault(entry.component, {})
        for name, info in header.items():
            import torch  # here, not above: a stand-in holds no tensors, and its runner needs no torch

            dtype = _TORCH_DTYPES.get(info.dtype)
            if dtype is None:
                raise StagingError(f"{where}: unsupported dtype {info.dtype} (this torch has no such type)")
            if info.begin == info.end:
                tensors[name] = torch.empty(info.shape, dtype=dtype)
                continue
            count = (info.end - info.begin) // dtype.itemsize
            tensors[name] = torch.frombuffer(mapping, dtype=dtype, count=count,
                                             offset=data + info.begin).view(info.shape)
    return out


# --------------------------------------------------------------------------- #
# safetensors headers: the one reader of them (staging, and sources' check of a single file)

MAX_HEADER = 100 << 20  # safetensors' own limit on a header
# The dtypes safetensors names that atelier reads: torch's name for each, and its bytes per element.
DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
          "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
          "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1)}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # bytes, from the start of the data (after the header)
    end: int


def header_length(head: bytes, file_size: int) -> int:
    """The header's length, from a safetensors file's first 8 bytes; refused past the file or the cap."""
    if len(head) < 8:
        raise StagingError("shorter than a safetensors header")
    (length,) = struct.unpack("<Q", head)
    if length > min(file_size - 8, MAX_HEADER):
        raise StagingError(f"a header of {length} bytes runs past the end of the file or the "
                           f"{MAX_HEADER >> 20} MiB cap")
    return length


def parse_header(raw: bytes, data_size: int) -> dict[str, TensorInfo]:
    """A safetensors header's tensors, each checked: a known dtype, a shape of whole numbers, and bytes
    that lie within the ``data_size`` bytes after the header and hold exactly that shape."""
    try:
        header = json.loads(raw)
    except ValueError:  # not JSON, or not UTF-8
        raise StagingError("the header is not JSON") from None
    if not isinstance(header, dict):
        raise StagingError("the header is not a table of tensors")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise StagingError(f"{name}: not a tensor's entry (dtype, shape, data_offsets)")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise StagingError(f"{name}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_whole(n) for n in shape):
            raise StagingError(f"{name}: shape {shape!r} is not a list of whole numbers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(n) for n in offsets):
            raise StagingError(f"{name}: data_offsets {offsets!r} are not two whole numbers")
        begin, end = offsets
        if not begin <= end <= data_size:
            raise StagingError(f"{name}: bytes {begin}..{end} are not within the file's {data_size} bytes of data")
        if end - begin != math.prod(shape) * DTYPES[dtype][1]:
            raise StagingError(f"{name}: {end - begin} bytes do not hold a {dtype} tensor of shape {shape}")
        tensors[name] = TensorInfo(dtype, tuple(shape), begin, end)
    return tensors


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def build_pipeline(folder: Path, weights: dict[str, dict[str, Any]], *, dtype: Any = None,
                   given: dict[str, Any] | None = None, device: str | None = None) -> Any:
    """Assembles the folder's pipeline from its configs, its weights taken from ``weights``.

    Components without weights (tokenizers, schedulers) are small and read from the folder;
    ``given`` ones (a GGUF transformer, say) are taken as they are. ``device``: a CUDA device a
    component whose weights are not of ``dtype`` is converted on, on its way there (see ``_convert``).
    """
    import diffusers
    from diffusers import pipelines

    def part(name: str, library: str, class_name: str) -> Any:
        # A model defined in a pipeline's own module is listed by that module's name alone
        # ("stable_audio", "audioldm2"); diffusers finds it in diffusers.pipelines, and so does this.
        if hasattr(pipelines, library):
            library = f"{pipelines.__name__}.{library}"
        if given and name in given:
            return given[name]
        cls = getattr(importlib.import_module(library), class_name)
        if name in weights:
            return _module_from_weights(cls, folder / name, weights[name], dtype, device)
        return cls.from_pretrained(folder / name)

    return _assemble(getattr(diffusers, _model_index(folder)["_class_name"]), folder, part)


def build_from_checkpoint(pipeline_cls: type, configs: Path, checkpoint: dict[str, Any], *, dtype: Any = None) -> Any:
    """Assembles ``pipeline_cls`` from a single-file checkpoint's tensors and a diffusers folder of configs.

    The same pipeline, bit for bit, as ``from_single_file(file, config=configs)``: every component
    goes through the function that one calls (which converts a model's weights from the
    checkpoint's names, or reads a tokenizer or scheduler from ``configs``); only reading the file
    is left out.
    """
    from diffusers import pipelines
    from diffusers.loaders.single_file import SINGLE_FILE_OPTIONAL_COMPONENTS, load_single_file_sub_model

    def part(name: str, library: str, class_name: str) -> Any:
        if name in SINGLE_FILE_OPTIONAL_COMPONENTS:  # the safety checker, which from_single_file leaves out
            return None
        return load_single_file_sub_model(
            library_name=library, class_name=class_name, name=name, checkpoint=checkpoint, pipelines=pipelines,
            is_pipeline_module=hasattr(pipelines, library), cached_model_config_path=str(configs),
            torch_dtype=dtype, local_files_only=True)

    return _assemble(pipeline_cls, configs, part)


def _assemble(pipeline_cls: type, folder: Path, part: Callable[[str, str, str], Any]) -> Any:
    """``pipeline_cls`` with the components ``folder`` lists, each made by ``part(name, library, class)``."""
    accepted = inspect.signature(pipeline_cls.__init__).parameters
    parts: dict[str, Any] = {}
    for name, value in _model_index(folder).items():
        if name.startswith("_") or name not in accepted:
            continue
        if not isinstance(value, list):
            parts[name] = value  # a plain setting, e.g. requires_safety_checker
            continue
        library, class_name = value
        parts[name] = None if library is None else part(name, library, class_name)
    return pipeline_cls(**parts)


def _module_from_weights(cls: type, folder: Path, weights: dict[str, Any], dtype: Any,
                         device: str | None = None) -> Any:
    from accelerate import init_empty_weights

    # Parameters on the meta device (nothing allocated), and the libraries' own switch that skips
    # random initialisation: the weights are replaced at once, and initialising them anyway,
    # even on meta tensors, was more than half of a staged load.
    with init_empty_weights(), _no_init_weights():
        if hasattr(cls, "load_config"):  # a diffusers model
            module = cls.from_config(cls.load_config(folder))
        else:  # a transformers model
            module = cls._from_config(cls.config_class.from_pretrained(folder))
    missing, unexpected = module.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in missing if k not in _tied_keys(module)]
    if missing or unexpected:
        raise StagingError(f"{folder.name}: weights do not match the config "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    leftovers = [n for n, p in module.named_parameters() if p.is_meta]
    if leftovers:
        raise StagingError(f"{folder.name}: no weights for {leftovers[:5]}")
    if dtype is not None and any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        _convert(module, dtype, device)
    return module.eval()


def _convert(module: Any, dtype: Any, device: str | None) -> None:
    """Casts ``module``'s floating-point weights to ``dtype`` in place, except what from_pretrained keeps
    in float32 at that dtype (T5's feed-forward outputs overflow in float16), which is cast from the
    file's values straight to float32, as from_pretrained does, never through ``dtype``.

    With a CUDA ``device`` each tensor is converted there, from the mapping: a non-blocking copy from
    pinned memory is DMA and the conversion runs on the GPU, where a cast on the CPU would make a
    pageable copy of the whole model first, which the upload then copies synchronously."""
    import torch

    keep = _kept_in_float32(module, dtype)
    cuda = device is not None and device.startswith("cuda")
    for name, part in module.named_modules():
        target = torch.float32 if keep.intersection(name.split(".")) else dtype

        def cast(tensor: Any, target: Any = target) -> Any:
            wanted = target if tensor.is_floating_point() else None
            return tensor.to(device if cuda else None, wanted, non_blocking=cuda)

        part._apply(cast, recurse=False)  # its own tensors only: each submodule gets its own target


def _kept_in_float32(module: Any, dtype: Any) -> set[str]:
    """Names of the submodules the libraries keep in float32 when a model is loaded at ``dtype``."""
    import torch

    keep: set[str] = set()
    if dtype == torch.float16:
        keep.update(getattr(module, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep.update(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    return keep


@contextlib.contextmanager
def _no_init_weights():
    from diffusers.models.modeling_utils import no_init_weights as diffusers_no_init

    try:
        from transformers.initialization import no_init_weights as transformers_no_init
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights as transformers_no_init
    with diffusers_no_init(), transformers_no_init():
        yield


def _tied_keys(module: Any) -> set[str]:
    tied = getattr(module, "_tied_weights_keys", None) or []
    return set(tied if isinstance(tied, (list, tuple, set)) else tied.keys())


def _model_index(folder: Path) -> dict[str, Any]:
    path = folder / "model_index.json"
    if not path.is_file():
        raise StagingError(f"{folder} is not a diffusers folder (no model_index.json)")
    return json.loads(path.read_text())


def _variant_of(path: Path) -> str | None:
    # diffusion_pytorch_model.fp16.safetensors -> "fp16"; a shard's number is no part of its variant
    # (diffusion_pytorch_model.fp16-00001-of-00002.safetensors -> "fp16", model-00001-of-00002 -> None)
    parts = path.name[: -len(".safetensors")].split(".")
    return re.sub(r"-\d+-of-\d+$", "", parts[1]) if len(parts) > 1 else None


def _aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def _read_into(path: Path, target: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < len(target):
            n = f.readinto(target[done:])
            if not n:
                raise StagingError(f"{path} is shorter than it was a moment ago")
            done += n


def _torch_dtypes() -> dict[str, Any]:
    import torch

    return {k: getattr(torch, name) for k, (name, _) in DTYPES.items() if hasattr(torch, name)}


class _LazyDtypes(dict):
    """The safetensors dtype table, filled on first use so that importing this module needs no torch."""

    def get(self, key, default=None):
        if not self:
            self.update(_torch_dtypes())
        return super().get(key, default)


_TORCH_DTYPES = _LazyDtypes()
