"""What atelier knows about each model family, in one table: one row per family.

A row names the family's adapter (imported only by ``atelier.families.get_family``, on first use:
adapters need torch), its limits and defaults, what it makes, which of a catalog entry's extras it
takes (a TAESD preview decoder, a GGUF transformer) and its built-in tiny model. Everything else
that asks about a family (the config, the scheduler, the tiny builders, the preview decoders)
reads it from here.

Torch-free and below the config: the config validates catalog entries against this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# The output formats a job may ask for, by what its model makes; the first is the default.
FORMATS: dict[str, tuple[str, ...]] = {"image": ("png", "webp"), "video": ("mp4", "webp", "gif"),
                                       "audio": ("wav", "flac")}

_EDITS = frozenset({"txt2img", "img2img"})
# The families a LoRA can be trained for (atelier/training/): they also take training jobs.
_TRAINABLE = _EDITS | {"train"}

# Gangs (one job across several devices): the degrees of a catalog entry's ``parallel`` layout
# (atelier.config.ParallelLayout) each backend can split a family's pipeline by. From xDiT's README
# ("Supported DiTs") and its pipeline wrappers (xfuser/model_executor/pipelines/), and from diffusers
# 0.42.1's models that carry a context-parallel plan (``_cp_plan``).
PARALLEL_BACKENDS = ("xfuser", "diffusers")
PARALLEL_DEGREES = ("ulysses_degree", "ring_degree", "pipefusion_degree", "cfg_degree")
_SEQUENCE = frozenset({"ulysses_degree", "ring_degree"})  # USP: Ulysses and ring attention
_XDIT = _SEQUENCE | {"cfg_degree"}  # what atelier takes of xDiT's degrees
# Degrees no family is offered yet, and why (a family's own note comes first).
PARALLEL_UNOFFERED = {
    ("xfuser", "pipefusion_degree"): "xDiT's PipeFusion calls the step callback only on its last pipeline stage "
    "(its PixArt wrappers refuse one), while a gang's ranks keep in step at every step through it (one cancel, "
    "one progress); PipeFusion is not offered yet"}
# Where the UNet families' single-file checkpoints keep their UNet and VAE.
_LDM_UNET = ("model.diffusion_model.",)
_LDM_VAE = ("first_stage_model.", "vae.")


@dataclass(frozen=True, kw_only=True)
class FamilyLimits:
    # Every family states its pipeline's own defaults; the rest default to what most families share.
    default_steps: int
    default_guidance: float
    max_width: int = 2048
    max_height: int = 2048
    default_width: int = 1024
    default_height: int = 1024
    max_count: int = 4
    # Steps a job may ask for: well above any sampler's useful count (a model's catalog entry may say
    # fewer, a turbo model's 8, say).
    max_steps: int = 150
    # Images in one pipeline call, by default, on a GPU and on the CPU (a model's catalog entry
    # may say otherwise). Small models leave a GPU idle at batch 1, so batching pays there.
    max_batch: int = 4
    max_batch_cpu: int = 2
    # What it makes from what (JobKind values: plain strings keep this module free of the records),
    # and whether an img2img job may bring a mask (inpainting).
    kinds: frozenset[str] = frozenset({"txt2img"})
    media: Literal["image", "video", "audio"] = "image"
    inpaint: bool = False
    # Video and audio: defaults and bounds of what a job may ask for.
    default_frames: int | None = None
    max_frames: int | None = None
    default_fps: int | None = None
    default_duration_s: float | None = None
    max_duration_s: float | None = None

    @property
    def formats(self) -> tuple[str, ...]:
        return FORMATS[self.media]


@dataclass(frozen=True, kw_only=True)
class FamilySpec:
    name: str
    adapter: str  # "module:Class" of its atelier.families.Family
    limits: FamilyLimits
    # What its pipeline denoises with; None for the stand-ins that run no diffusion.
    denoiser: Literal["unet", "transformer"] | None
    # Whether its step latents are a picture's (a video's: one frame's) in its VAE's latent space,
    # which a catalog entry's ``preview_decoder`` (a TAESD) can decode.
    preview_decoder: bool = True
    # The diffusers class that reads its transformer from a GGUF file (a catalog entry's
    # ``transformer``); None where diffusers has no single-file loader for it.
    gguf_transformer: str | None = None
    # A single .safetensors checkpoint in the original (LDM) layout, as A1111 and ComfyUI users have
    # them: each part diffusers' single-file loader converts, and the key prefixes it reads it from
    # (a file with nothing under one of them is not this family's). Empty: folders only.
    single_file_parts: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Its built-in tiny random-weight model ("builtin:<name>" in a catalog), and the "module:function"
    # that writes it (imported on first use: builders need torch and diffusers).
    tiny_model: str | None = None
    tiny_builder: str | None = None
    # Whether dtype = "auto" means bfloat16 on a GPU that has it (sm80 and later; ``auto_dtype``):
    # families whose float16 overflows, at float16's range of +-65504 (FLUX's activations and text
    # encoders; the SDXL VAE that PixArt-Sigma and HunyuanDiT decode with and never upcast: black
    # images) or whose checkpoints are bfloat16 (FLUX, SD3).
    bfloat16_auto: bool = False
    # Gangs: backend ("xfuser", "diffusers") -> the degrees (PARALLEL_DEGREES) it may split this family's
    # pipeline by; a backend absent here does not run the family at all. Empty: single devices only.
    parallel: dict[str, frozenset[str]] = field(default_factory=dict)
    # Why a degree or backend is not in ``parallel``, for the config's refusal: (backend or "*",
    # degree or "*") -> the reason, e.g. FLUX's missing CFG.
    parallel_notes: dict[tuple[str, str], str] = field(default_factory=dict)
    # Whether xDiT's parallel VAE (``parallel_vae``, distvae's patch-parallel decoder) is wired into
    # its pipeline wrapper for this family.
    parallel_vae: bool = False
    # Which of atelier/samplers.py's tables a job's sampler comes from: "discrete" (noise or velocity
    # on discrete timesteps), "flow" (flow matching); None: the model's own scheduler only.
    samplers: Literal["discrete", "flow"] | None = None

    def __post_init__(self) -> None:
        if (self.tiny_model is None) != (self.tiny_builder is None):
            raise ValueError(f"family {self.name!r}: a tiny model and its builder go together")
        for backend, degrees in self.parallel.items():
            if backend not in PARALLEL_BACKENDS or not degrees <= set(PARALLEL_DEGREES):
                raise ValueError(f"family {self.name!r}: parallel {backend!r}: {sorted(degrees)}")


# Diffusion transformers whose diffusers model has no context-parallel plan in 0.42.1.
_NO_DIFFUSERS_CP = {("diffusers", "*"): "diffusers 0.42.1 has no context parallelism for this family (its "
                    "transformer has no _cp_plan, and its attention processors bypass diffusers' attention "
                    "dispatch); use backend = \"xfuser\""}
# The video families: xDiT parallelises none of atelier's (its video pipelines are CogVideoX, Latte,
# ConsisID, HunyuanVideo, Wan, LTX, StepVideo, Mochi: all transformers; SVD and AnimateDiff are UNets
# it has no wrapper for), and diffusers has no context-parallel plan for their UNets.


def _sound(**own: Any) -> FamilyLimits:
    """A sound family's limits: made from text, and of no size (8 px stands in)."""
    return FamilyLimits(max_width=8, max_height=8, default_width=8, default_height=8, kinds=frozenset({"txt2audio"}),
                        media="audio", **own)


_ROWS = (
    FamilySpec(name="sd1", samplers="discrete", adapter="atelier.families.sd:SD15Family", denoiser="unet",
               limits=FamilyLimits(default_steps=30, default_guidance=7.5, max_width=1024, max_height=1024,
                                   default_width=512, default_height=512, max_count=8, max_batch=8,
                                   max_batch_cpu=4, kinds=_TRAINABLE, inpaint=True),
               single_file_parts=(("UNet", _LDM_UNET), ("VAE", _LDM_VAE),
                                  ("text encoder", ("cond_stage_model.transformer.",))),
               tiny_model="tiny-sd", tiny_builder="atelier.tiny_models:build_tiny_sd"),
    FamilySpec(name="sdxl", samplers="discrete", adapter="atelier.families.sd:SDXLFamily", denoiser="unet",
               limits=FamilyLimits(default_steps=30, default_guidance=5.0, kinds=_TRAINABLE, inpaint=True),
               single_file_parts=(("UNet", _LDM_UNET), ("VAE", _LDM_VAE),
                                  ("first text encoder", ("conditioner.embedders.0.",)),
                                  ("second text encoder", ("conditioner.embedders.1.",))),
               # xDiT's SDXL wrapper: CFG parallel only (the UNet has no sequence to split); its __call__
               # refuses sequence and PipeFusion parallel, and it has no parallel-VAE path of its own.
               parallel={"xfuser": frozenset({"cfg_degree"})},
               parallel_notes={("xfuser", "*"): "xDiT runs SDXL with CFG parallel only (cfg_degree = 2): its "
                               "UNet has no token sequence to split",
                               ("diffusers", "*"): "diffusers' context parallelism is for transformers; SDXL "
                               "denoises with a UNet"},
               tiny_model="tiny-sdxl", tiny_builder="atelier.tiny_models:build_tiny_sdxl"),
    # SD 2.x: 768 px (the v-prediction models; the 512 px base ones set their size in the catalog).
    FamilySpec(name="sd2", samplers="discrete", adapter="atelier.families.sd:SD2Family", denoiser="unet",
               limits=FamilyLimits(default_steps=30, default_guidance=7.5, max_width=1536, max_height=1536,
                                   default_width=768, default_height=768, max_count=8, kinds=_TRAINABLE,
                                   inpaint=True),
               tiny_model="tiny-sd2", tiny_builder="atelier.tiny.sd2_sd3_flux:build_tiny_sd2"),
    # Defaults are diffusers' own for these pipelines. SD3 medium's position embeddings end at
    # 1536 px (SD 3.5 large's go further: raise it in the catalog).
    FamilySpec(name="sd3", samplers="flow",
               bfloat16_auto=True, adapter="atelier.families.sd3_flux:SD3Family", denoiser="transformer",
               limits=FamilyLimits(default_steps=28, default_guidance=7.0, max_width=1536, max_height=1536,
                                   kinds=_EDITS, inpaint=True),
               gguf_transformer="SD3Transformer2DModel",
               # xDiT: CFG and sequence (USP) parallel. diffusers: Ulysses only, through atelier's
               # plan and attention processor (atelier/families/parallel.py _sd3_plan: diffusers 0.42.1 ships
               # neither for SD3), in its "ulysses_anything" mode, since SD3's text is 77 CLIP + 256 T5
               # tokens by default, which splits evenly over no even degree; ring attention needs equal shards.
               parallel={"xfuser": _XDIT, "diffusers": frozenset({"ulysses_degree"})}, parallel_vae=True,
               parallel_notes={("diffusers", "ring_degree"): "SD3's joint sequence (77 CLIP + 256 T5 text tokens "
                               "by default) splits unevenly, which diffusers takes for Ulysses only, not for ring "
                               "attention"},
               tiny_model="tiny-sd3", tiny_builder="atelier.tiny.sd2_sd3_flux:build_tiny_sd3"),
    # guidance is FLUX.1-dev's distilled guidance embedding (schnell ignores it), not CFG.
    FamilySpec(name="flux", samplers="flow",
               bfloat16_auto=True, adapter="atelier.families.sd3_flux:FluxFamily", denoiser="transformer",
               limits=FamilyLimits(default_steps=28, default_guidance=3.5, kinds=_TRAINABLE, inpaint=True),
               gguf_transformer="FluxTransformer2DModel",
               # xDiT: USP; no CFG parallel, FLUX.1 has no CFG. diffusers: context parallelism
               # (FluxTransformer2DModel's _cp_plan), Ulysses and ring.
               parallel={"xfuser": _SEQUENCE, "diffusers": _SEQUENCE}, parallel_vae=True,
               parallel_notes={("*", "cfg_degree"): "FLUX has no classifier-free guidance to split (its guidance "
                               "is a distilled embedding, one pass per step)"},
               tiny_model="tiny-flux", tiny_builder="atelier.tiny.sd2_sd3_flux:build_tiny_flux"),
    # Diffusion transformers over an SD-style VAE, at the pipelines' own defaults (PixArt: DPM-Solver++,
    # 20 steps, guidance 4.5; HunyuanDiT: DDPM, 50 steps, guidance 5). Sizes come in steps of 16 px (2x2
    # patches of the 8x latents): the adapter generates a size between steps at the next one and crops.
    FamilySpec(name="pixart-alpha", samplers="discrete", adapter="atelier.families.pixart_hunyuan:PixArtAlphaFamily",
               denoiser="transformer", limits=FamilyLimits(default_steps=20, default_guidance=4.5),
               parallel={"xfuser": _XDIT}, parallel_vae=True, parallel_notes=_NO_DIFFUSERS_CP,
               tiny_model="tiny-pixart-alpha", tiny_builder="atelier.tiny.pixart_hunyuan:build_tiny_pixart_alpha"),
    FamilySpec(name="pixart-sigma", samplers="discrete",
               bfloat16_auto=True, adapter="atelier.families.pixart_hunyuan:PixArtSigmaFamily",
               denoiser="transformer", limits=FamilyLimits(default_steps=20, default_guidance=4.5),
               parallel={"xfuser": _XDIT}, parallel_vae=True, parallel_notes=_NO_DIFFUSERS_CP,
               tiny_model="tiny-pixart-sigma", tiny_builder="atelier.tiny.pixart_hunyuan:build_tiny_pixart_sigma"),
    FamilySpec(name="hunyuan-dit", samplers="discrete",
               bfloat16_auto=True, adapter="atelier.families.pixart_hunyuan:HunyuanDiTFamily",
               denoiser="transformer", limits=FamilyLimits(default_steps=50, default_guidance=5.0),
               parallel={"xfuser": _XDIT}, parallel_vae=True, parallel_notes=_NO_DIFFUSERS_CP,
               tiny_model="tiny-hunyuan-dit", tiny_builder="atelier.tiny.pixart_hunyuan:build_tiny_hunyuan_dit"),
    # Stable Audio Open 1.0: 44.1 kHz stereo, up to 47.55 s (1024 latents of 2048 samples), 100 steps at
    # guidance 7 as in diffusers' pipeline. Every call makes the whole window (a shorter sound is cut
    # from it), so a batch costs the same whatever its duration.
    FamilySpec(name="stable-audio", adapter="atelier.families.audio:StableAudioFamily", denoiser="transformer",
               limits=_sound(default_steps=100, default_guidance=7.0, default_duration_s=10.0, max_duration_s=47.0),
               preview_decoder=False,
               tiny_model="tiny-stable-audio", tiny_builder="atelier.tiny.audio:build_tiny_stable_audio"),
    # AudioLDM 2: 16 kHz mono from mel frames, trained on 10.24 s (its pipeline's default), 200 steps at
    # guidance 3.5 as its model card runs it. Its UNet is convolutional: any length runs, the cost
    # growing with it, and well past its training window the sound wanders.
    FamilySpec(name="audioldm2", adapter="atelier.families.audio:AudioLDM2Family", denoiser="unet",
               limits=_sound(default_steps=200, default_guidance=3.5, default_duration_s=10.24, max_duration_s=30.0,
                             max_steps=400),
               preview_decoder=False,
               tiny_model="tiny-audioldm2", tiny_builder="atelier.tiny.audio:build_tiny_audioldm2"),
    # The SD x4 upscaler: width and height are the input's (up to 512 px, a 2048 px output); the output
    # is 4x. 75 steps at guidance 9 are diffusers' defaults for it. Its latents are its own 4x VAE's,
    # for which no TAESD exists.
    FamilySpec(name="sd-upscaler", adapter="atelier.families.upscale:SDUpscalerFamily", denoiser="unet",
               limits=FamilyLimits(default_steps=75, default_guidance=9.0, max_width=512, max_height=512,
                                   default_width=128, default_height=128, max_batch=2, max_batch_cpu=1,
                                   kinds=frozenset({"upscale"})),
               preview_decoder=False,
               tiny_model="tiny-sd-upscaler", tiny_builder="atelier.tiny.video:build_tiny_sd_upscaler"),
    # Stable Video Diffusion: 1024x576 clips of 14 frames (SVD-XT: 25, set in its catalog entry), 25
    # steps; guidance is the last frame's (it ramps up from 1 over the clip); fps conditions the motion.
    FamilySpec(name="svd", adapter="atelier.families.video:SVDFamily", denoiser="unet",
               limits=FamilyLimits(default_steps=25, default_guidance=3.0, max_width=1024, max_height=1024,
                                   default_height=576, max_count=2, max_batch=1, max_batch_cpu=1,
                                   kinds=frozenset({"img2vid"}), media="video", default_frames=14,
                                   max_frames=25, default_fps=7),
               tiny_model="tiny-svd", tiny_builder="atelier.tiny.video:build_tiny_svd"),
    # AnimateDiff over SD 1.5: 16 frames at 512 px; its motion modules see at most 32 frames.
    FamilySpec(name="animatediff", adapter="atelier.families.video:AnimateDiffFamily", denoiser="unet",
               limits=FamilyLimits(default_steps=25, default_guidance=7.5, max_width=1024, max_height=1024,
                                   default_width=512, default_height=512, max_batch=2, max_batch_cpu=1,
                                   kinds=frozenset({"txt2vid"}), media="video", default_frames=16,
                                   max_frames=32, default_fps=8),
               tiny_model="tiny-animatediff", tiny_builder="atelier.tiny.video:build_tiny_animatediff"),
    # No diffusion at all: atelier's own cost (its catalog entry needs no weights).
    FamilySpec(name="noop", adapter="atelier.families.noop:NoopFamily", denoiser=None, preview_decoder=False,
               # Sizes a test or a benchmark needs, and no more: its images are real, in the runner's memory.
               limits=FamilyLimits(default_steps=4, default_guidance=0.0, max_width=1024, max_height=1024,
                                   default_width=64, default_height=64, max_count=16, max_batch=64,
                                   max_batch_cpu=64, max_steps=500)),
    # A GPU's costs without the GPU (benchmarks of the scheduling): sizes as a real model's, and its CPU
    # batch a GPU's, since it stands in for a GPU wherever its runner is.
    FamilySpec(name="costmodel", adapter="atelier.families.costmodel:CostModelFamily", denoiser=None,
               preview_decoder=False,
               # A gang's costs without the gang (bench/multigpu.py): its parallelize sleeps the profile's
               # gang_step_s of the gang's size; Ulysses under the backend that runs on the CPU.
               parallel={"diffusers": frozenset({"ulysses_degree"})},
               limits=FamilyLimits(default_steps=30, default_guidance=5.0, max_count=8, max_batch=8,
                                   max_batch_cpu=8, max_steps=500)),
)

FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in _ROWS}


def gang_families(backend: str) -> frozenset[str]:
    """The families a gang runs with ``backend`` ("xfuser", "diffusers")."""
    return frozenset(name for name, spec in FAMILIES.items() if backend in spec.parallel)


def is_cpu(device: str) -> bool:
    """Whether a device name is the CPU: "cpu", or "cpu:N", a CPU stand-in for one device of a gang
    (torch sees every "cpu:N" as the one CPU)."""
    return device == "cpu" or device.startswith("cpu:")


def auto_dtype(family: str, device: str, capability: tuple[int, int] | None = None) -> str:
    """What a catalog entry's dtype = "auto" is for ``family`` on a runner's ``device``, a CUDA one of
    compute ``capability`` (major, minor): float32 on the CPU (float16 is slow or missing there),
    bfloat16 where the family wants it and the GPU has it, float16 otherwise."""
    if is_cpu(device):
        return "float32"
    if FAMILIES[family].bfloat16_auto and capability is not None and capability >= (8, 0):
        return "bfloat16"
    return "float16"
# Each family's limits, for the callers that need nothing else of a row.
FAMILY_LIMITS: dict[str, FamilyLimits] = {name: spec.limits for name, spec in FAMILIES.items()}
