"""Speed and memory settings of a catalog entry, the same way for every diffusers family.

``Family.load`` builds a model, its LoRAs and conditioning, then ``apply`` turns on what the entry asks,
on the model's denoiser (its ``unet`` or ``transformer``):

- ``quantize``: its linear layers' weights in int8, int8 with int8 activations, fp8 or int4 (torchao);
- ``cache``: skip work between denoising steps: diffusers' First Block Cache or TaylorSeer for
  transformers, DeepCache for the SD UNets;
- ``offload``: the weights stay in RAM and move to the GPU a model (or a layer) at a time;
- ``compile``: torch.compile of the denoiser.

Before every pipeline call ``LoadedModel.before_call`` resets the cache: caches keep state between steps,
which must never leak from one generation into the next (another batch size, a cancelled call).

Torch-free at import; the libraries load on use. The settings' values and which of them go together
are the config's to check (atelier/tuning.py); what is checked here needs the model or the device.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from atelier.tuning import CACHES, TRANSFORMER_CACHES

if TYPE_CHECKING:
    import torch

    from atelier.config import ModelEntry
    from atelier.families.loaded import LoadedModel

# The attention modules of a transformer's blocks, whose outputs TaylorSeer predicts on its cached steps.
_ATTENTIONS = r"(transformer_blocks|single_transformer_blocks|blocks)\.\d+\.attn\d?"


def load_device(entry: ModelEntry, device: str) -> str:
    """Where ``family.load`` puts the model: with offload, the CPU (``apply`` then hands the GPU the parts
    it needs, when it needs them); otherwise the runner's device."""
    if entry.offload is None:
        return device
    if not device.startswith("cuda"):
        raise ValueError(f"offload = {entry.offload!r} needs a CUDA device; this runner has {device}")
    return "cpu"


def apply(model: LoadedModel, entry: ModelEntry, device: str) -> None:
    """Turns on the entry's settings on a loaded model (on ``load_device``); ``device`` is the runner's."""
    if not (entry.quantize or entry.cache or entry.offload or entry.compile):
        return
    pipe = model.pipe
    name = f"{entry.family} model"
    denoiser = _denoiser(pipe, name) if entry.quantize or entry.cache or entry.compile else None
    if entry.quantize:
        quantize(denoiser, entry.quantize, device)
    if entry.cache:
        model.reset_cache = enable_cache(pipe, denoiser, entry.cache, threshold=entry.cache_threshold,
                                         interval=entry.cache_interval)
    if entry.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif entry.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    model.offload = entry.offload
    if entry.compile:
        mode = "default" if entry.compile is True else entry.compile
        check_compiler(device)
        # In place: the pipeline keeps the same module object, compiled on its first call.
        denoiser.compile(mode=None if mode == "default" else mode)


# -- quantization ------------------------------------------------------------------------------------ #

def quantize(denoiser: torch.nn.Module, kind: str, device: str) -> None:
    """Quantizes the weights of the denoiser's linear layers in place (torchao), LoRA layers excepted."""
    import torch

    # torchao's wheel carries CUDA kernels whose loading fails, harmlessly, without CUDA: not worth a warning.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        from torchao.quantization import (
            Float8WeightOnlyConfig,
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError:
        raise ValueError("quantize needs torchao: pip install 'atelier[accel]'") from None
    if kind == "int4":
        # torchao's int4 kernel (tinygemm) is CUDA-only and takes bfloat16.
        if not device.startswith("cuda"):
            raise ValueError(f"quantize = \"int4\" needs a CUDA device; this runner has {device} (int8 works there)")
        if denoiser.dtype != torch.bfloat16:
            raise ValueError(f"quantize = \"int4\" needs dtype = \"bfloat16\", not {str(denoiser.dtype)[6:]}")
    # set_inductor_config=False: torchao's default retunes inductor for the whole process (coordinate
    # descent and more), which would slow every later model's compile, quantized or not.
    configs: dict[str, Callable[[], Any]] = {
        "int8": lambda: Int8WeightOnlyConfig(set_inductor_config=False),
        "int8-dynamic": lambda: Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
        "fp8": lambda: Float8WeightOnlyConfig(set_inductor_config=False),
        "int4": lambda: Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d",
                                             set_inductor_config=False),
    }
    if kind not in configs:
        raise ValueError(f"quantize {kind!r} is not one of {', '.join(configs)}")

    def wanted(module: torch.nn.Module, name: str) -> bool:
        # A LoRA's own small layers stay as they are: they are switched and scaled per job.
        return isinstance(module, torch.nn.Linear) and "lora_" not in name

    quantize_(denoiser, configs[kind](), filter_fn=wanted)


# -- caches ------------------------------------------------------------------------------------------- #

def enable_cache(pipe: Any, denoiser: torch.nn.Module, kind: str, *, threshold: float | None = None,
                 interval: int | None = None) -> Callable[[], None]:
    """Turns a cache on; returns what resets it before each pipeline call (``LoadedModel.before_call``)."""
    from diffusers import ModelMixin, UNet2DConditionModel

    unet = hasattr(denoiser, "down_blocks") and hasattr(denoiser, "up_blocks")
    if kind == "deepcache":
        if not isinstance(denoiser, UNet2DConditionModel):
            raise ValueError(f"cache = \"deepcache\" is for the SD UNets (sd1, sd2, sdxl), not a "
                             f"{type(denoiser).__name__}; transformers take {' or '.join(TRANSFORMER_CACHES)}")
        return _deepcache(pipe, interval or 3)
    if kind not in TRANSFORMER_CACHES:
        raise ValueError(f"cache {kind!r} is not one of {', '.join(CACHES)}")
    if unet or not isinstance(denoiser, ModelMixin):
        raise ValueError(f"cache = {kind!r} is for transformer denoisers, not a {type(denoiser).__name__}"
                         + ("; UNets take \"deepcache\"" if unet else ""))
    return _transformer_cache(denoiser, kind, threshold, interval)


def _transformer_cache(denoiser: torch.nn.Module, kind: str, threshold: float | None,
                       interval: int | None) -> Callable[[], None]:
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        HookRegistry,
        ModelHook,
        TaylorSeerCacheConfig,
        apply_first_block_cache,
        apply_taylorseer_cache,
    )
    from diffusers.hooks._helpers import TransformerBlockRegistry
    from diffusers.models.cache_utils import CacheMixin

    if kind == "first_block":
        # Its hooks need to know each block's outputs; diffusers lists the block classes it knows.
        blocks = [block for name, child in denoiser.named_children()
                  if name in ("transformer_blocks", "single_transformer_blocks", "blocks")
                  for block in child]
        try:
            for block in blocks:
                TransformerBlockRegistry.get(type(block))
        except ValueError:
            raise ValueError(f"cache = \"first_block\" does not know the blocks of a {type(denoiser).__name__} "
                             "(diffusers has no metadata for them); try \"taylorseer\"") from None
        if len(blocks) < 2:
            raise ValueError(f"cache = \"first_block\" needs a transformer of two blocks or more, not "
                             f"{len(blocks)}")
        if getattr(blocks[-1], "context_pre_only", False):
            # SD3's last block returns no text states, which the cache's tail residual needs.
            raise ValueError(f"cache = \"first_block\" cannot cache a {type(denoiser).__name__} (its last block "
                             "returns no text states); try \"taylorseer\"")
        config: Any = FirstBlockCacheConfig(threshold=0.05 if threshold is None else threshold)
        hooks: Callable[[torch.nn.Module, Any], None] = apply_first_block_cache
    else:
        # Every attention of every block (diffusers' default patterns miss PixArt's and HunyuanDiT's attn1, attn2).
        if not any(re.fullmatch(_ATTENTIONS, name) for name, _ in denoiser.named_modules()):
            raise ValueError(f"cache = \"taylorseer\" finds no attention blocks in a {type(denoiser).__name__}")
        # Taylor factors in the model's own dtype: diffusers' default, bfloat16, would lose float32's precision.
        config = TaylorSeerCacheConfig(cache_interval=interval or 5, taylor_factors_dtype=None,
                                       cache_identifiers=[_ATTENTIONS])
        hooks = apply_taylorseer_cache
    if isinstance(denoiser, CacheMixin):  # FLUX's transformer; its pipeline names each call's context
        denoiser.enable_cache(config)
    else:
        # SD3's, PixArt's and HunyuanDiT's transformers lack the mixin but take the same hooks.
        hooks(denoiser, config)
        # Pipelines of models without the mixin never say which call is which; CFG batches the
        # unconditional half with the conditional one, so one context serves every call.
        class OneContext(ModelHook):
            def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
                with CacheMixin.cache_context(module, "denoise"):
                    return self.fn_ref.original_forward(*args, **kwargs)

        HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(OneContext(), "atelier_cache_context")
    return lambda: CacheMixin._reset_stateful_cache(denoiser)


def _deepcache(pipe: Any, interval: int) -> Callable[[], None]:
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        raise ValueError("cache = \"deepcache\" needs DeepCache: pip install 'atelier[accel]'") from None
    helper = DeepCacheSDHelper(pipe=pipe)
    # Branch 0: only the outermost blocks run on a cached step, the rest comes from the last full one.
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()

    def reset() -> None:
        # The helper counts steps from the first it saw and keeps the last outputs; a new call restarts both.
        helper.start_timestep = None
        helper.cached_output = {}

    return reset


# -- memory ------------------------------------------------------------------------------------------- #

def tensor_bytes(tensor: Any) -> int:
    """Bytes a tensor holds: a quantized one (a tensor subclass) by its inner tensors, not its logical dtype."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def module_bytes(pipe: Any, extra: list[Any] | tuple = ()) -> int:
    """Bytes of every parameter and buffer of a pipeline's modules and of ``extra`` modules it keeps
    beside them (0 for one without modules), or the size a pipeline declares (the cost model stands in
    for weights it does not hold). A tensor two modules share counts once."""
    if hasattr(pipe, "nbytes"):
        return int(pipe.nbytes)
    seen: set[int] = set()
    total = 0
    for component in [*getattr(pipe, "components", {}).values(), *extra]:
        for tensor in [*getattr(component, "parameters", list)(), *getattr(component, "buffers", list)()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor_bytes(tensor)  # a quantized tensor by what it holds
    return total


def offloaded_bytes(pipe: Any, offload: str) -> int:
    """Weight bytes an offloaded model needs on the GPU at once: its largest component (model offload),
    or its largest layer (sequential). Its whole size stays in RAM."""
    import torch

    def own(module: torch.nn.Module, recurse: bool) -> int:
        return sum(tensor_bytes(t) for t in [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)])

    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    if offload == "model":
        return max((own(m, True) for m in modules), default=0)
    return max((own(sub, False) for m in modules for sub in m.modules()), default=0)


# -- helpers ------------------------------------------------------------------------------------------ #

def _denoiser(pipe: Any, name: str) -> torch.nn.Module:
    components = getattr(pipe, "components", {})
    for key in ("transformer", "unet"):
        if components.get(key) is not None:
            return components[key]
    raise ValueError(f"a {name} has no denoiser (unet or transformer) to quantize, cache or compile")


def check_compiler(device: str) -> None:
    """torch.compile builds code at the first call: refused at load, rather than failing deep inside the
    first job, on a host without the compiler it needs. On the CPU inductor compiles C++; on CUDA Triton
    builds its kernel launchers with a C compiler."""
    if device.startswith("cuda"):
        if not _c_compiler():
            raise ValueError("compile on CUDA needs a C compiler for Triton (gcc or clang; $CC) on this host")
    elif not _cxx_compiler():
        raise ValueError("compile on the CPU needs a C++ compiler (g++ or clang++; $CXX) on this host")


def _c_compiler() -> str | None:
    """Triton's C compiler, where it looks (triton/runtime/build.py): $CC, else gcc, else clang."""
    return next((path for name in (os.environ.get("CC"), "gcc", "clang") if name
                 for path in [shutil.which(name)] if path), None)


def _cxx_compiler() -> str | None:
    """Inductor's C++ compiler on this host, where it looks: $CXX, else g++ (clang++ on macOS)."""
    return next((path for name in (os.environ.get("CXX"), "g++", "clang++", "c++") if name
                 for path in [shutil.which(name)] if path), None)
