"""What every diffusers family does to load a model: the dtype by name, the pipeline from a folder
or from staged memory, the upload to the device, and the catalog's options checked on the way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from atelier.registry import is_cpu
from atelier.staging import build_pipeline

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def torch_dtype(name: str) -> torch.dtype:
    """The dtype a catalog entry names; any other name is an error that lists the choices."""
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


def upload(pipe: DiffusionPipeline, device: str) -> None:
    """Moves every module to ``device`` tensor by tensor; from pinned (staged) memory the copies
    are asynchronous DMA that overlap each other, and one synchronise waits for them all."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.to(device, non_blocking=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def seeded_generators(pipe: DiffusionPipeline, seeds: Iterable[int]) -> list[torch.Generator]:
    """One generator per seed, so that an image's noise depends on its own seed, not on its batch; on
    the device diffusers draws the noise on. Under offload ``pipe.device`` is the CPU (model offload: a
    CPU generator's mt19937 noise differs from CUDA's Philox for the same seed) or ``meta`` (sequential:
    no generator can live there); the execution device is the GPU the offload hooks run on."""
    device = pipe._execution_device
    return [torch.Generator(device=device).manual_seed(seed) for seed in seeds]


@contextmanager
def call_cleanup(pipe: DiffusionPipeline, *, variant: bool = False) -> Iterator[None]:
    """Around a pipeline call on ``pipe`` (or, ``variant``, on a from_pipe variant of it): puts back
    what a call that fails half-way, or a variant's call, leaves behind.

    - The VAE's dtype: SDXL (and its variants, the x4 upscaler, SVD) upcast a float16 VAE to float32
      for the decode and cast it back only when the decode succeeds; after an OOM there, every later
      call of the resident model would fail on mixed dtypes.
    - Under model offload, the last model it ran stays on the GPU: after a failure (the call never
      reaches its own ``maybe_free_model_hooks``), and after every variant call (a variant made by
      from_pipe has no hooks list of its own, so its ``maybe_free_model_hooks`` does nothing)."""
    vae = getattr(pipe, "vae", None)
    vae_dtype = vae.dtype if isinstance(vae, torch.nn.Module) else None
    failed = True
    try:
        yield
        failed = False
    finally:
        if vae_dtype is not None and pipe.vae.dtype != vae_dtype:
            pipe.vae.to(vae_dtype)
        if failed or variant:
            pipe.maybe_free_model_hooks()


# An option's check: takes the value given in the catalog, returns it as used, or raises ValueError.
Check = Callable[[Any], Any]


def whole(low: int, high: int | None = None) -> Check:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            raise ValueError(f"a whole number {f'from {low} to {high}' if high is not None else f'of {low} or more'}")
        return value

    return check


def number(low: float, high: float) -> Check:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError(f"a number from {low} to {high}")
        return float(value)

    return check


def switch(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def folder(value: Any) -> Path:
    if not isinstance(value, str) or not (Path(value) / "config.json").is_file():
        raise ValueError("a local diffusers model folder (with a config.json)")
    return Path(value)


def checked_options(family: str, options: Mapping[str, Any] | None, checks: Mapping[str, Check]) -> dict[str, Any]:
    """The catalog's options, each checked: an unknown or misspelt one fails here, naming it, rather than
    being ignored or failing inside the pipeline."""
    options = dict(options or {})
    unknown = set(options) - set(checks)
    if unknown:
        raise ValueError(f"unknown options for family {family!r}: {sorted(unknown)}; it takes {sorted(checks)}")
    out = {}
    for name, value in options.items():
        try:
            out[name] = checks[name](value)
        except ValueError as exc:
            raise ValueError(f"option {name!r} of family {family!r}: {value!r} is not {exc}") from None
    return out


def load_folder(family: str, pipeline_class: type[DiffusionPipeline], path: Path | None, *, device: str,
                dtype_name: str, weights: dict[str, dict[str, Any]] | None, config: Path | None,
                variant: str | None = None, prepare: Callable[[DiffusionPipeline], None] | None = None,
                **components: Any) -> DiffusionPipeline:
    """A diffusers folder's pipeline: from its files, or with ``weights`` from staged memory (the same
    pipeline bit for bit); on ``device``. ``components`` replace or (None) leave out folder components;
    ``prepare`` fits the pipeline on the CPU, before the upload."""
    if path is None:
        raise ValueError(f"family {family!r} needs a model path")
    if config is not None:
        raise ValueError(f"family {family!r} loads diffusers folders only, not single-file checkpoints")
    dtype = torch_dtype(dtype_name)
    if weights is not None:
        given = {name: part for name, part in components.items() if part is not None}
        # Given parts are not built from the folder first (a GGUF transformer's float one would be read for nothing).
        pipe = build_pipeline(path, weights, dtype=dtype, given=given, device=device)  # a cast on CUDA: on the GPU
        # e.g. an SD 1.5 folder and a motion adapter. Not otherwise: from_pipe casts every part to one dtype,
        # which diffusers refuses for a quantized one (a GGUF transformer). That dtype is float32 unless
        # given: a float16 AnimateDiff would load at float32, twice the memory and not what was asked.
        if not isinstance(pipe, pipeline_class) or any(pipe.components.get(n) is not p for n, p in given.items()):
            pipe = pipeline_class.from_pipe(pipe, dtype=dtype, **given)
        for name in components.keys() - given.keys():
            pipe.register_modules(**{name: None})
    else:
        # local_files_only: a path that is not a local folder must fail here, never be mistaken for a hub
        # repo id and trigger a download. use_safetensors: a component with only pickled (.bin) weights
        # is refused, never unpickled (sources.resolve says so first, naming the component).
        pipe = pipeline_class.from_pretrained(path, dtype=dtype, local_files_only=True, variant=variant,
                                              use_safetensors=True, **components)
    if prepare is not None:
        prepare(pipe)
    return ready(pipe, device)


def ready(pipe: DiffusionPipeline, device: str) -> DiffusionPipeline:
    """A freshly built pipeline on ``device``, quiet (a server loads models all day)."""
    if not is_cpu(device):  # "cpu:N" (a gang's CPU stand-in) is the CPU too
        upload(pipe, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
