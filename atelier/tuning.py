"""A catalog entry's speed and memory settings: their allowed values and which of them go together.

``quantize``, ``offload``, ``cache`` (with ``cache_threshold`` and ``cache_interval``), ``compile``
and a GGUF ``transformer``. The config types its fields with these values and calls these rules
when it reads a catalog, so a mistake is refused there, naming the field. What needs the model or
the device (a cache that does not fit the denoiser, int4 on a CPU, a GGUF file's tensors) is
checked when the model loads, in atelier/families/accel.py and gguf.py.

Torch-free and below the config.
"""

from __future__ import annotations

from typing import Literal, get_args

from atelier.registry import FAMILIES

Quantize = Literal["int8", "int8-dynamic", "fp8", "int4"]  # the denoiser's linear weights (torchao)
Offload = Literal["model", "sequential"]  # weights in RAM, on the GPU a component (or a layer) at a time
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
# Caches for transformer denoisers (diffusers' hooks) and for UNets (DeepCache).
TransformerCache = Literal["first_block", "taylorseer"]
UnetCache = Literal["deepcache"]
Cache = Literal[TransformerCache, UnetCache]

QUANTIZE: tuple[str, ...] = get_args(Quantize)
OFFLOAD: tuple[str, ...] = get_args(Offload)
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
TRANSFORMER_CACHES: tuple[str, ...] = get_args(TransformerCache)
UNET_CACHES: tuple[str, ...] = get_args(UnetCache)
CACHES: tuple[str, ...] = TRANSFORMER_CACHES + UNET_CACHES

GGUF_SUFFIX = ".gguf"
# Family -> the transformer class diffusers reads from a GGUF file.
GGUF_FAMILIES: dict[str, str] = {name: spec.gguf_transformer for name, spec in FAMILIES.items()
                                 if spec.gguf_transformer is not None}


def check_cache(cache: str | None, threshold: float | None, interval: int | None) -> None:
    """A cache's parameters go with the cache that reads them; a ValueError names the field."""
    if threshold is not None and cache != "first_block":
        raise ValueError("cache_threshold goes with cache = \"first_block\"")
    if interval is not None and cache not in ("taylorseer", "deepcache"):
        raise ValueError("cache_interval goes with cache = \"taylorseer\" or \"deepcache\"")


def check_gguf_transformer(family: str, transformer: str | None, quantize: str | None) -> None:
    """A GGUF ``transformer`` is a .gguf file, of a family diffusers reads one for, and not quantized again."""
    if transformer is None:
        return
    if not transformer.lower().endswith(GGUF_SUFFIX):
        raise ValueError(f"transformer {transformer!r} is not a .gguf file; it takes a GGUF-quantized "
                         "transformer (flux1-dev-Q8_0.gguf, say); other weights belong in `source`")
    if family not in GGUF_FAMILIES:
        if FAMILIES[family].denoiser == "transformer":
            raise ValueError(f"transformer: diffusers cannot read a {family} transformer from GGUF; "
                             f"a GGUF transformer is for the families {', '.join(sorted(GGUF_FAMILIES))}")
        raise ValueError(f"transformer: family {family!r} has no transformer a GGUF file could replace; "
                         f"it is for the families {', '.join(sorted(GGUF_FAMILIES))}")
    if quantize is not None:
        raise ValueError(f"transformer: a GGUF transformer is quantized already; remove quantize = "
                         f"{quantize!r} (it applies to a float transformer)")


# compile modes that capture CUDA graphs: a replay overwrites the previous replay's outputs, which a
# cache keeps from one step to the next (silently stale, or torch's "overwritten by a subsequent run").
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_speed(quantize: str | None, offload: str | None, cache: str | None, compile: bool | str) -> None:
    """Settings that cannot go together, whatever the model; a ValueError names them."""
    if quantize == "int4" and offload is not None:
        # With offload the denoiser is quantized on the CPU, and torchao's int4 packing has no CPU kernel.
        raise ValueError(f"quantize = \"int4\" cannot go with offload = {offload!r} (int4 packs its weights on "
                         "the GPU, and an offloaded model is quantized in RAM); use quantize = \"int8\" or "
                         "\"fp8\" with offload, or drop offload")
    if cache is not None and compile in CUDA_GRAPH_MODES:
        raise ValueError(f"compile = {compile!r} captures CUDA graphs, whose outputs the next replay overwrites, "
                         f"and cache = {cache!r} keeps outputs from one step to the next; use compile = "
                         "\"default\" or \"max-autotune-no-cudagraphs\" with a cache")
