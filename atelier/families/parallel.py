"""Gangs below the actors: a catalog entry's parallel layout (``ParallelLayout``) applied to a loaded
model, in each rank (process) of a gang, with real libraries: diffusers' own context parallelism, or
xDiT (xfuser).

Every rank of the gang has joined one torch.distributed process group (all of its ranks: NCCL on CUDA,
gloo on the CPU) before a model is loaded, and keeps it for its whole life. Each rank loads the model
as a single runner does (``Family.load``), then calls ``parallelize`` with the same arguments in the
same order, and then every rank calls ``model.generate`` with identical requests. Switching models
re-wraps the new pipeline; the process group is never formed again:

- diffusers: each model gets its own ``enable_parallelism``; the device mesh (and so the process
  subgroups it makes) is made once per process and layout and shared by every model after it. FLUX
  runs on diffusers' own plan; SD3 on atelier's (``_sd3_plan``: diffusers 0.42.1 ships none for it).
- xfuser: xDiT's distributed environment is set up once on the existing default group, its model
  parallel groups once per layout (again only when a model of another layout comes).

Importing this module needs torch and diffusers (it is imported where models are); xfuser is imported
only in its own path, since it cannot even be imported without CUDA (it needs triton).
"""

from __future__ import annotations

import dataclasses
import logging
import types
from typing import TYPE_CHECKING, Any

import torch

from atelier.families.loaded import LoadedModel
from atelier.registry import is_cpu

if TYPE_CHECKING:
    from atelier.config import ParallelLayout
    from atelier.families.base import GenerateRequest, StepCallback

log = logging.getLogger(__name__)

# (device type, ring degree, ulysses degree) -> the DeviceMesh diffusers' context parallelism runs on:
# made once per process, so that models loaded one after another reuse its process subgroups
# (init_device_mesh makes new ones on every call; a mesh's flattened view is cached on the mesh).
_MESHES: dict[tuple[str, int, int], Any] = {}
# xDiT: the degrees its model parallel groups were last made for in this process (they are globals
# of xfuser's parallel_state; one set at a time).
_XFUSER_GROUPS: tuple[int, ...] | None = None


def output_rank(layout: ParallelLayout, world: int) -> int:
    """The rank whose ``generate`` returns the real output images.

    diffusers: every rank holds them (its context-parallel output hook gathers the transformer's output
    on every rank, and each decodes it); rank 0 sends. xfuser: xDiT's pipelines return the images only
    in the last data-parallel group (``is_dp_last_group``: the last rank of the sequence, CFG and
    PipeFusion groups at once); with one data-parallel group (atelier's gangs: the layout is the whole
    world) that is the world's last rank, the one whose every coordinate in xDiT's rank grid is the
    highest, whatever the grid's order.
    """
    if layout.backend == "xfuser":
        # With the parallel VAE, xDiT's is_dp_last_group is the world's rank 0 instead (base_pipeline.py
        # is_dp_last_group in xfuser 0.7): the decode is spread over every rank and gathered there.
        return 0 if layout.parallel_vae else world - 1
    return 0


def cpu_shims() -> None:
    """What diffusers needs to run context parallelism on the CPU. Idempotent; a no-op where torch has an
    accelerator.

    ``ModelMixin._resolve_parallel_config`` (diffusers 0.42.1) picks each rank's device as
    ``torch.device(accelerator type, rank % torch.accelerator.device_count())``: on a CPU-only torch the
    accelerator type is "cpu" and the count 0, a ZeroDivisionError. The CPU is one device, so the count
    answers 1. Only here, in the CPU path of a gang's rank (``parallelize`` on a "cpu"/"cpu:N" device),
    and only when torch counts no accelerator at all: a CUDA process never sees it.
    """
    if getattr(torch.accelerator.device_count, "_atelier_cpu_shim", False):
        return
    if torch.accelerator.device_count() != 0:
        return

    def device_count() -> int:
        return 1

    device_count._atelier_cpu_shim = True  # type: ignore[attr-defined]
    torch.accelerator.device_count = device_count


def parallelize(model: LoadedModel, layout: ParallelLayout, *, rank: int, world: int, device: str) -> LoadedModel:
    """Applies ``layout`` to ``model``, freshly loaded on ``device`` (this rank's), in a process whose
    default process group (all ``world`` ranks of the gang) is initialised. Every rank calls it with the
    same arguments, in the same order. Returns the model to use: the same object (diffusers) or one
    whose calls go through xDiT's pipeline wrapper (xfuser)."""
    import torch.distributed as dist

    problem = layout.problem(model.family.name)
    if problem is not None:
        field, reason = problem
        raise ValueError(f"parallel{'.' + field if field else ''}: {reason}")
    if layout.size != world:
        raise ValueError(f"parallel: the layout spans {layout.size} devices ({layout.describe()}); this gang "
                         f"has {world}")
    if layout.backend == "diffusers" and is_cpu(device) and layout.ring_degree > 1:
        # Ring attention merges partial results by their log-sum-exp; diffusers' native (SDPA) backend,
        # the only one on the CPU, cannot return it ("Native attention does not support
        # return_lse=True"). Refused here rather than failing in the first call.
        raise ValueError("parallel.ring_degree: ring attention does not run on the CPU (diffusers' native "
                         "attention returns no log-sum-exp); use ulysses_degree there")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("parallelize needs the gang's process group: join it first")
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(f"parallelize: rank {rank} of {world}, but the process group says rank "
                           f"{dist.get_rank()} of {dist.get_world_size()}")
    if model.offload:
        raise ValueError("parallel: an offloaded model cannot run on a gang (each rank keeps its shard or "
                         "replica resident); drop offload or parallel")
    log.info("rank %d of %d (%s): %s on %s, %s", rank, world, device, model.family.name, layout.backend,
             layout.describe())
    own = getattr(model.family, "parallelize", None)
    if own is not None:  # a family that applies a layout itself (the cost model: its gang's costs)
        return own(model, layout, rank=rank, world=world, device=device)
    if layout.backend == "diffusers":
        return _diffusers(model, layout, device)
    return _xfuser(model, layout, rank=rank, world=world, device=device)


# --------------------------------------------------------------------------- #
# diffusers: context parallelism (ContextParallelConfig), Ulysses and ring attention.


def _diffusers(model: LoadedModel, layout: ParallelLayout, device: str) -> LoadedModel:
    from diffusers import ContextParallelConfig

    transformer = getattr(model.pipe, "transformer", None)
    if transformer is None or not hasattr(transformer, "enable_parallelism"):
        raise ValueError(f"parallel: family {model.family.name!r} has no diffusers transformer to parallelise")
    cpu = is_cpu(device)
    if cpu:
        cpu_shims()
    split = layout.ring_degree * layout.ulysses_degree
    heads = transformer.config.num_attention_heads
    if heads % layout.ulysses_degree:
        raise ValueError(f"parallel.ulysses_degree: {layout.ulysses_degree} does not divide this transformer's "
                         f"{heads} attention heads (Ulysses gives each rank whole heads)")
    plan = None
    sd3 = model.family.name == "sd3"
    if sd3:
        plan = _sd3_plan(transformer)
    else:
        text = (model.settings or {}).get("max_sequence_length", _TEXT_TOKENS.get(model.family.name))
        if text is not None and text % split:
            raise ValueError(f"parallel: the prompt's {text} text tokens (option max_sequence_length) do not "
                             f"split evenly over {split} ranks")
    # Shards: FLUX's are equal (diffusers' default; its text is T5's 512 tokens). SD3's joint sequence
    # has 77 CLIP + 256 T5 text tokens by default, odd: it runs in diffusers' "ulysses_anything" mode,
    # shards of unequal length (an all-to-all of unequal splits, which gloo and NCCL both take). Either
    # way the transformer's output (the image's tokens) is gathered from the ranks by an all_gather,
    # which on gloo needs equal shards ("invalid tensor size" otherwise): a size whose image tokens do
    # not split evenly is refused per call (_ContextParallel).
    config = ContextParallelConfig(ulysses_degree=layout.ulysses_degree, ring_degree=layout.ring_degree,
                                   ulysses_anything=sd3,
                                   mesh=_mesh("cpu" if cpu else torch.device(device).type,
                                              layout.ring_degree, layout.ulysses_degree))
    transformer.enable_parallelism(config=config, cp_plan=plan)
    return _rewrap(model, _ContextParallel, split=split)


# The text tokens a family's pipeline pads every prompt to by default (FLUX: T5's 512), where its
# context-parallel plan splits them with the image's.
_TEXT_TOKENS = {"flux": 512}


def _sd3_plan(transformer: Any) -> dict[str, Any]:
    """SD3 under diffusers' context parallelism, which diffusers 0.42.1 does not ship: its
    SD3Transformer2DModel has no ``_cp_plan``, and its JointAttnProcessor2_0 calls
    F.scaled_dot_product_attention itself, where diffusers' context parallelism lives in its attention
    dispatch (``dispatch_attention_fn`` with the processor's ``_parallel_config``: the Ulysses all-to-all).
    So this rank's transformer gets ``_SD3Attention``, the same attention through the dispatch, and a plan
    as QwenImage's (another joint-attention MMDiT) in diffusers: the first block's image and text tokens
    split over the ranks, the output projection's gathered. Joint attention is over the image and text
    tokens together, and attention does not depend on the order of its keys, so each rank's share of
    both is all a split needs."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    transformer.set_attn_processor(_SD3Attention())
    split = {name: ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
             for name in ("hidden_states", "encoder_hidden_states")}
    return {"transformer_blocks.0": split, "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}


class _SD3Attention:
    """diffusers' JointAttnProcessor2_0 (SD3's joint attention, and SD3.5's image-only second attention),
    step for step, with the attention through diffusers' dispatch, so that its context parallelism applies.
    The (batch, tokens, heads, head_dim) layout is the dispatch's."""

    _attention_backend = None  # the active backend (native on the CPU)
    _parallel_config = None  # set by enable_parallelism

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        image_tokens = hidden_states.shape[1]
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            text_query = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
            text_key = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
            text_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=1)
            key = torch.cat([key, text_key], dim=1)
            value = torch.cat([value, text_value], dim=1)
        # JointAttnProcessor2_0 takes no mask either.
        hidden_states = dispatch_attention_fn(query, key, value, backend=self._attention_backend,
                                              parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image_tokens], hidden_states[:, image_tokens:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class _ContextParallel(LoadedModel):
    """A model under diffusers' context parallelism: the image's tokens are split in equal shards, one per
    rank, so a size whose token count does not split evenly is refused (on every rank alike) before the
    call, with the sizes that do."""

    split: int = 1

    def generate(self, request: GenerateRequest, on_step: StepCallback) -> list[Any]:
        side = self.family._size_multiple(self.pipe)  # px per token: FLUX 8x latents packed 2x2, SD3 its patches
        tokens = (request.width // side) * (request.height // side)
        if tokens % self.split:
            raise ValueError(f"width {request.width} x height {request.height}: {tokens} image tokens do not split "
                             f"evenly over this gang's {self.split} ranks; on it {self.family.name} makes sizes "
                             f"whose token count (one per {side}x{side} px) is a multiple of {self.split}, e.g. "
                             f"width and height in multiples of {side * self.split}")
        return super().generate(request, on_step)


def _rewrap(model: LoadedModel, cls: type[LoadedModel], **extra: Any) -> LoadedModel:
    """``model`` as an instance of ``cls`` (a LoadedModel of its own generate), every field carried over."""
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    wrapped = cls(**fields)
    for name, value in extra.items():
        setattr(wrapped, name, value)
    return wrapped


def _mesh(device_type: str, ring: int, ulysses: int) -> Any:
    """The process's one (ring, ulysses) device mesh for these degrees (a collective on first use)."""
    from torch.distributed.device_mesh import init_device_mesh

    key = (device_type, ring, ulysses)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device_type, (ring, ulysses), mesh_dim_names=("ring", "ulysses"))
    return _MESHES[key]


# --------------------------------------------------------------------------- #
# xfuser (xDiT). Written from xDiT's sources (github:xdit-project/xDiT at 175e0bf: xfuser/config/args.py
# xFuserArgs.create_config, xfuser/core/distributed/parallel_state.py, runtime_state.py,
# xfuser/model_executor/pipelines/base_pipeline.py and pipeline_flux.py); it cannot run on this CPU-only
# machine, and its GPU test (tests/test_parallel.py, marked gpu) is what checks it.


def _xfuser(model: LoadedModel, layout: ParallelLayout, *, rank: int, world: int, device: str) -> LoadedModel:
    if not device.startswith("cuda"):
        raise ValueError(f"parallel.backend: xfuser runs on CUDA devices only; this rank's is {device} (use "
                         "backend = \"diffusers\" on the CPU)")
    try:
        from xfuser import xFuserArgs
        from xfuser.core.distributed import parallel_state, runtime_state
        from xfuser.model_executor.pipelines.register import xFuserPipelineWrapperRegister
    except ImportError as exc:
        raise RuntimeError(f"parallel.backend: xfuser is not installed here ({exc}); install atelier's "
                           "`multigpu` extra") from None

    settings = model.settings if isinstance(model.settings, dict) else {}
    if model.family.name == "sd3" and settings.get("max_sequence_length", 256) != 256:
        # xDiT's SD3 wrapper takes no max_sequence_length: it would encode 256 T5 tokens whatever this says.
        raise ValueError("option max_sequence_length: xDiT's SD3 pipeline always pads prompts to 256 T5 tokens; "
                         "leave it out for a model on an xfuser gang")
    global _XFUSER_GROUPS
    pipe = model.pipe
    local = torch.device(device).index or 0
    # The world group on the default process group the gang formed: with it initialised, xDiT's
    # init_distributed_environment only wraps it (it calls init_process_group only when none is),
    # after setting the CUDA device to this rank's.
    parallel_state.init_distributed_environment(rank=rank, world_size=world, local_rank=local,
                                                distributed_init_method="tcp://unused")
    degrees = (layout.ulysses_degree, layout.ring_degree, layout.pipefusion_degree, layout.cfg_degree,
               int(layout.parallel_vae))
    if _XFUSER_GROUPS != degrees and parallel_state.model_parallel_is_initialized():
        # Another layout's groups: RuntimeState only makes groups when there are none.
        parallel_state.destroy_model_parallel()
    _XFUSER_GROUPS = degrees
    args = xFuserArgs(model=str(getattr(pipe, "name_or_path", "") or "atelier"),
                      ulysses_degree=layout.ulysses_degree, ring_degree=layout.ring_degree,
                      pipefusion_parallel_degree=layout.pipefusion_degree, use_cfg_parallel=layout.cfg_degree == 2,
                      warmup_steps=layout.warmup_steps, use_parallel_vae=layout.parallel_vae)
    engine_config, _ = args.create_config()  # uses the initialised group's world size
    engine_config.runtime_config.dtype = pipe.dtype  # xDiT's default is float16
    wrapper_class = xFuserPipelineWrapperRegister.get_class(pipe)
    # The wrapper replaces pipe.transformer (and the scheduler, and the VAE's decoder for parallel_vae)
    # with xDiT's in place, and makes the runtime state (a global of xfuser's, one per process).
    wrapped = wrapper_class(pipe, engine_config)
    state = runtime_state.get_runtime_state()
    model = _rewrap(model, _XFuserModel)
    model.pipe = _XFuserPipe(wrapped, state, degrees, world)
    model.variants = {}  # from_pipe variants of the unwrapped pipeline would bypass xDiT
    return model


class _XFuserPipe:
    """xDiT's pipeline wrapper as the family's ``generate`` calls a pipeline: every rank returns images
    (only ``output_rank``'s are real: xDiT returns None elsewhere, and those ranks get black
    placeholders of the request's size), and the runtime state and groups are this model's before each
    call (both are process globals of xfuser's, and another model may have been wrapped since)."""

    def __init__(self, wrapped: Any, state: Any, degrees: tuple[int, ...], world: int) -> None:
        self._wrapped = wrapped
        self._state = state
        self._degrees = degrees
        self._world = world

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)

    def __call__(self, **kwargs: Any) -> Any:
        import PIL.Image
        from xfuser.core.distributed import parallel_state, runtime_state

        global _XFUSER_GROUPS
        if _XFUSER_GROUPS != self._degrees:
            # Not verified on a GPU: a model of another layout ran since this one was wrapped.
            if self._degrees[-1]:
                # Its patch-parallel VAE decoder holds the VAE group of its own layout, which the other
                # layout's destroy_model_parallel destroyed (xfuser 0.7 parallel_state.py).
                raise RuntimeError("parallel_vae: this model's VAE holds the process groups of its layout, "
                                   "destroyed since by another model's; it must be loaded again")
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            parallel = self._state.parallel_config
            parallel_state.initialize_model_parallel(
                data_parallel_degree=parallel.dp_degree, classifier_free_guidance_degree=parallel.cfg_degree,
                sequence_parallel_degree=parallel.sp_degree, ulysses_degree=parallel.ulysses_degree,
                ring_degree=parallel.ring_degree, tensor_parallel_degree=parallel.tp_degree,
                pipeline_parallel_degree=parallel.pp_degree, fully_shard_degree=parallel.fs_degree,
                vae_parallel_size=parallel.vae_parallel_size,
                use_parallel_vae=parallel.use_parallel_vae)
            _XFUSER_GROUPS = self._degrees
        runtime_state._RUNTIME = self._state
        callback = kwargs.get("callback_on_step_end")
        if callback is not None:
            kwargs["callback_on_step_end"] = _once_per_step(callback)
        result = self._wrapped(**kwargs)
        if result is not None:
            return result
        count = len(kwargs.get("prompt") or [None])
        size = (int(kwargs["width"]), int(kwargs["height"]))
        return types.SimpleNamespace(images=[PIL.Image.new("RGB", size) for _ in range(count)])


def _once_per_step(callback: Any) -> Any:
    """The pipeline's step callback, called once per step, numbered from 0. xDiT's PipeFusion (not offered
    yet: atelier/registry.py PARALLEL_UNOFFERED) restarts the step index at 0 after its warm-up steps and
    calls once per patch: steps are counted here by timestep, which a step's patches share and which the
    schedulers xDiT wraps never repeat."""
    seen: list[float] = []

    def once(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        t = float(timestep)
        if seen and seen[-1] == t:
            return {}
        seen.append(t)
        return callback(pipe, len(seen) - 1, timestep, tensors)

    return once


class _XFuserModel(LoadedModel):
    """A model whose pipeline is xDiT's wrapper: text-to-image only (its wrappers parallelise their own
    ``__call__``; an img2img or inpainting variant from ``from_pipe`` would run the wrapped transformer
    outside them)."""

    def generate(self, request: GenerateRequest, on_step: StepCallback) -> list[Any]:
        if request.images or request.masks or request.controlnet or request.ip_adapter_images:
            raise ValueError(f"{self.family.name} on an xfuser gang makes images from text only; "
                             f"{request.kind} runs on single devices")
        return super().generate(request, on_step)
