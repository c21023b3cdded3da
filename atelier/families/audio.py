"""Sound from text: Stable Audio Open ("stable-audio") and AudioLDM 2 ("audioldm2") over diffusers' pipelines."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AudioLDM2Pipeline, DiffusionPipeline, StableAudioPipeline
from diffusers.utils import logging as diffusers_logging

from atelier.families.base import Family, GenerateRequest, StepCallback
from atelier.families.loaded import LoadedModel, LoadRequest
from atelier.families.loading import load_folder, seeded_generators, torch_dtype
from atelier.media import Audio

diffusers_logging.disable_progress_bar()

# A preview: the sound's loudness over time so far, as a bar per column (its latents hold no picture).
PREVIEW_WIDTH, PREVIEW_HEIGHT = 256, 64
_BACKGROUND = (24, 24, 32)
_FOREGROUND = (110, 200, 255)


class _AudioFamily(Family):
    pipeline_class: type[DiffusionPipeline]
    # Nothing to tune yet: any option is a mistake, and says so.
    options: frozenset[str] = frozenset()

    def build(self, request: LoadRequest) -> LoadedModel:
        torch_dtype(request.dtype_name)  # an unknown name fails before any reading
        unknown = set(request.options) - self.options
        if unknown:
            raise ValueError(f"unknown options for family {self.name!r}: {sorted(unknown)}")
        return LoadedModel(load_folder(self.name, self.pipeline_class, request.path, device=request.load_device,
                                       dtype_name=request.dtype_name, weights=request.weights,
                                       config=request.config, variant=request.variant, prepare=self._prepare),
                           self)

    def _prepare(self, pipe: DiffusionPipeline) -> None:
        """Fits a loaded pipeline for generate (on the CPU, before any upload)."""

    def preview(self, latents: torch.Tensor, index: int = 0) -> np.ndarray:
        return loudness_bars(latents[index])


class StableAudioFamily(_AudioFamily):
    name = "stable-audio"
    pipeline_class = StableAudioPipeline

    def generate(self, model: LoadedModel, req: GenerateRequest, on_step: StepCallback) -> list[Audio]:
        pipe: StableAudioPipeline = model.pipe
        groups = _conditionings(req)
        total = req.steps * len(groups)
        batch_latents: list[torch.Tensor] = []  # the whole batch's, once a second call makes it partial
        audios: dict[int, np.ndarray] = {}
        for number, group in enumerate(groups):
            def on_group_step(index: int, t: Any, latents: torch.Tensor, group: list[int] = group,
                              offset: int = number * req.steps) -> None:
                if len(groups) > 1:  # the runner previews image i of the batch as latents[i]
                    if not batch_latents:
                        batch_latents.append(latents.new_zeros((req.count, *latents.shape[1:])))
                    batch_latents[0][group] = latents
                    latents = batch_latents[0]
                on_step(offset + index + 1, total, latents)

            audios |= dict(zip(group, self._run(pipe, req, group, on_group_step), strict=True))
        rate = int(pipe.vae.config.sampling_rate)
        return [Audio(samples=np.clip(audios[i], -1.0, 1.0), sample_rate=rate) for i in range(req.count)]

    def _run(self, pipe: StableAudioPipeline, req: GenerateRequest, group: list[int], callback: Any) -> np.ndarray:
        # One generator per sound: its noise, and the scheduler's Brownian noise, follow its own seed.
        generators = seeded_generators(pipe, [req.seeds[i] for i in group])
        negatives = [req.negative_prompts[i] for i in group]  # all or none, where they count (guidance > 1)
        # The legacy callback is this pipeline's only one; what it raises (JobCancelled) propagates.
        result = pipe(prompt=[req.prompts[i] for i in group],
                      negative_prompt=None if None in negatives else negatives,
                      audio_end_in_s=req.duration_s, num_inference_steps=req.steps, guidance_scale=req.guidance,
                      generator=generators, output_type="np", callback=callback, callback_steps=1)
        return result.audios


class AudioLDM2Family(_AudioFamily):
    name = "audioldm2"
    pipeline_class = AudioLDM2Pipeline

    def _prepare(self, pipe: AudioLDM2Pipeline) -> None:
        pipe.language_model = _with_generation_helpers(pipe.language_model)

    def generate(self, model: LoadedModel, req: GenerateRequest, on_step: StepCallback) -> list[Audio]:
        pipe: AudioLDM2Pipeline = model.pipe
        generators = seeded_generators(pipe, req.seeds)

        def callback(index: int, t: Any, latents: torch.Tensor) -> None:
            on_step(index + 1, req.steps, latents)

        # The pipeline reads no negative prompt as "".
        texts = {"prompt": list(req.prompts)}
        if req.guidance > 1.0:
            texts["negative_prompt"] = [n or "" for n in req.negative_prompts]
        result = pipe(**_text_conditioning(pipe, texts), audio_length_in_s=req.duration_s,
                      num_inference_steps=req.steps, guidance_scale=req.guidance, generator=generators,
                      output_type="np", callback=callback, callback_steps=1)
        rate = int(pipe.vocoder.config.sampling_rate)
        return [Audio(samples=np.clip(audio, -1.0, 1.0), sample_rate=rate) for audio in result.audios]


def _text_conditioning(pipe: AudioLDM2Pipeline, texts: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """The pipeline's text inputs, each text encoded on its own.

    Encoded together, T5 pads every text to the batch's longest, and GPT-2, which reads T5's states
    between CLAP's and its own, then sees that padding: a sound would change with the prompts it
    shares a batch with. Encoded alone, each text has none; only the UNet sees padding, masked."""
    device = pipe._execution_device
    with torch.no_grad():
        encoded = {text: pipe.encode_prompt([text], device, 1, False)
                   for text in dict.fromkeys(t for batch in texts.values() for t in batch)}
    length = max(embeds.shape[1] for embeds, _, _ in encoded.values())

    def padded(text: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embeds, mask, generated = encoded[text]
        short = length - embeds.shape[1]
        return F.pad(embeds, (0, 0, 0, short)), F.pad(mask, (0, short)), generated

    out = {}
    for name, batch in texts.items():
        prefix = "" if name == "prompt" else "negative_"
        embeds, masks, generated = zip(*(padded(text) for text in batch), strict=True)
        out |= {f"{prefix}prompt_embeds": torch.cat(embeds), f"{prefix}attention_mask": torch.cat(masks),
                f"{prefix}generated_prompt_embeds": torch.cat(generated)}
    return out


def _with_generation_helpers(language_model: torch.nn.Module) -> torch.nn.Module:
    """AudioLDM 2's GPT-2 as the pipeline drives it: through transformers' generation helpers, which
    transformers 5 gives GPT2LMHeadModel but not GPT2Model, what some checkpoints list (diffusers
    issue 12630). A GPT2Model is wrapped, its weights shared; the pipeline reads hidden states only."""
    if hasattr(language_model, "_update_model_kwargs_for_generation"):
        return language_model
    from transformers import GPT2LMHeadModel, GPT2Model

    if not isinstance(language_model, GPT2Model):
        raise ValueError(f"AudioLDM 2's language model must be GPT-2, not {type(language_model).__name__}")
    with torch.device("meta"):  # nothing allocated: both its parts are replaced
        head = GPT2LMHeadModel(language_model.config)
    head.transformer = language_model
    head.lm_head.weight = language_model.wte.weight
    return head.eval()


def _conditionings(req: GenerateRequest) -> list[list[int]]:
    """The batch's sounds, grouped by what their unconditional half is.

    Without a negative prompt it is all zeros, with one it is that text's embedding: one pipeline call
    cannot mix the two, so a batch of both runs one call per kind, and every sound is the one its job
    would make alone. Without guidance there is no unconditional half, and one call does.
    """
    if req.guidance <= 1.0:
        return [list(range(req.count))]
    groups = [[i for i, n in enumerate(req.negative_prompts) if (n is None) == without] for without in (True, False)]
    return [group for group in groups if group]


def loudness_bars(latents: torch.Tensor, width: int = PREVIEW_WIDTH, height: int = PREVIEW_HEIGHT) -> np.ndarray:
    """uint8 HxWx3: one sound's latents, (channels, time) or (channels, time, frequency), as a bar per
    column, as tall as their RMS there."""
    with torch.no_grad():
        power = latents.detach().float().reshape(latents.shape[0], -1).pow(2).mean(0)  # over channels
        rms = F.adaptive_avg_pool1d(power[None, None], width)[0, 0].sqrt()
        level = rms / rms.max().clamp_min(1e-6)
        rows = (torch.arange(height, device=rms.device, dtype=torch.float32) - (height - 1) / 2).abs()
        lit = rows[:, None] <= level[None, :] * height / 2
        colours = torch.tensor([_BACKGROUND, _FOREGROUND], dtype=torch.uint8, device=rms.device)
        return colours[lit.long()].cpu().numpy()
