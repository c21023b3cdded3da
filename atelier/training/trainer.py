"""The LoRA training loop, on a pipeline already resident (sd1, sd2, sdxl, flux).

The trainer adds one peft adapter (``ADAPTER``) to the caller's pipeline in place, trains only its
parameters, and takes it away again on ``close``: the base weights are never copied or reloaded.
Every random draw (latent samples, noise, timesteps, data order) comes from a generator the trainer
owns, so a checkpoint holds all the loop's state and a restored trainer continues bit for bit.
Between ``train_step`` and ``sample`` calls the adapter is switched off, so the pipeline can serve
other jobs (with their own LoRAs) at a step boundary without seeing the half-trained one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from atelier.jobs import TrainSpec
from atelier.training import state as ckpt

ADAPTER = "atelier-training"
UNET_FAMILIES = ("sd1", "sd2", "sdxl")
FAMILIES = (*UNET_FAMILIES, "flux")
_FORMAT = 1

# The target modules of diffusers' own train_dreambooth_lora scripts (UNet, CLIP, FLUX).
_UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
_FLUX_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                 "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                 "ff_context.net.2"]
_FLUX_GUIDANCE = 3.5  # train_dreambooth_lora_flux's default guidance for FLUX.1-dev's guidance embedding
_MAX_GRAD_NORM = 1.0  # as the diffusers scripts clip


def square(image: Image.Image, size: int) -> Image.Image:
    """The image scaled so its shorter side is ``size``, then its centre ``size`` x ``size``."""
    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def make_class_images(pipe: Any, prompt: str, count: int, seed: int, resolution: int, *,
                      steps: int = 30) -> list[Image.Image]:
    """Prior preservation's class images, made by the base model itself (image i from seed + i).

    Call it before the trainer exists (or after ``close``): with LoRAs switched on they would not
    be the base model's images.
    """
    images = []
    for index in range(count):
        generator = torch.Generator("cpu").manual_seed(seed + index)
        images.append(pipe(prompt=prompt, height=resolution, width=resolution, num_inference_steps=steps,
                           generator=generator).images[0])
    return images


class _Order:
    """Epochs of a random permutation of ``n`` examples, from the trainer's generator."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator
        self.perm = self._shuffle()
        self.position = 0

    def _shuffle(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=self.generator, device=self.generator.device).cpu()

    def next(self) -> int:
        if self.position >= self.n:
            self.perm, self.position = self._shuffle(), 0
        self.position += 1
        return int(self.perm[self.position - 1])


class LoraTrainer:
    """Trains a LoRA on ``pipe`` (the resident diffusers pipeline) from ``instance`` (image, caption) pairs.

    ``train_text_encoder`` puts adapters on the CLIP text encoder(s) too, for the UNet families only:
    for FLUX it is refused (ValueError), as diffusers' FLUX script trains only CLIP and atelier's
    FLUX LoRA path is the transformer's. ``class_images`` (with ``spec.class_prompt``) turn on prior
    preservation: each step adds ``prior_loss_weight`` times the loss on as many class images.
    """

    def __init__(self, pipe: Any, family: str, spec: TrainSpec, instance: list[tuple[Image.Image, str]], *,
                 device: str, seed: int, class_images: list[Image.Image] | None = None):
        if family not in FAMILIES:
            raise ValueError(f"LoRA training takes the families {', '.join(FAMILIES)}, not {family!r}")
        if not instance:
            raise ValueError("no instance images: a training needs at least one image")
        if class_images and not spec.class_prompt:
            raise ValueError("class images without a class_prompt: set class_prompt or send no class images")
        if family == "flux" and spec.train_text_encoder:
            raise ValueError("train_text_encoder is for the UNet families (sd1, sd2, sdxl); FLUX trains the "
                             "transformer only: set train_text_encoder false")
        if family == "flux" and spec.resolution % 16:
            raise ValueError(f"FLUX packs latents 2x2: resolution {spec.resolution} must be a multiple of 16")
        self.pipe, self.family, self.spec, self.device = pipe, family, spec, device
        self.flux = family == "flux"
        self.step = 0
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.denoiser = pipe.transformer if self.flux else pipe.unet
        self._prefix = "transformer" if self.flux else "unet"
        self.text_encoders: dict[str, Any] = {}
        if spec.train_text_encoder:
            for name in ("text_encoder", "text_encoder_2"):
                if getattr(pipe, name, None) is not None:
                    self.text_encoders[name] = getattr(pipe, name)
        if ADAPTER in (getattr(self.denoiser, "peft_config", None) or {}):
            raise ValueError("this pipeline already has a training's adapter: close that trainer first")
        self._others = bool(getattr(self.denoiser, "peft_config", None))  # LoRAs loaded before ours

        self._add_adapters(seed)
        self._named = [(f"{prefix}.{name}", param) for prefix, model in self._models()
                       for name, param in model.named_parameters() if f".{ADAPTER}." in name]
        # LoRA parameters train in float32 whatever the base's dtype, as diffusers' cast_training_params.
        for _, param in self._named:
            param.data = param.data.float()
        self.params = [param for _, param in self._named]
        self.optimizer = torch.optim.AdamW(self.params, lr=spec.learning_rate)
        if not self.flux:
            from diffusers import DDPMScheduler

            self.schedule = DDPMScheduler.from_config(pipe.scheduler.config)
            self.prediction = self.schedule.config.prediction_type

        self.instance = self._latents([image for image, _ in instance])
        self.captions = [caption for _, caption in instance]
        self.classes = self._latents(class_images) if class_images else None
        self._cache: dict[str, dict[str, Any]] = {}
        self.orders = {"instance": _Order(len(instance), self.generator)}
        if self.classes is not None:
            self.orders["class"] = _Order(len(class_images), self.generator)
        self._deactivate()

    # -- adapters

    def _models(self) -> list[tuple[str, Any]]:
        return [(self._prefix, self.denoiser), *self.text_encoders.items()]

    def _add_adapters(self, seed: int) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        self._configs: dict[str, LoraConfig] = {}
        # peft's gaussian init draws from torch's global RNG: fork it so the caller's is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for prefix, model in self._models():
                targets = _FLUX_TARGETS if self.flux else _UNET_TARGETS if prefix == "unet" else _TEXT_TARGETS
                config = LoraConfig(r=self.spec.rank, lora_alpha=self.spec.alpha_value, init_lora_weights="gaussian",
                                    target_modules=targets)
                self._configs[prefix] = config
                if hasattr(model, "delete_adapters"):  # diffusers' models keep their peft_config
                    model.add_adapter(config, adapter_name=ADAPTER)
                else:
                    # transformers' add_adapter demands peft >= 0.22 (not released when written): peft itself.
                    inject_adapter_in_model(config, model, adapter_name=ADAPTER)

    def _layers(self, model: Any) -> list[Any]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]

    def _activate(self) -> None:
        # Another job may have switched adapters since (atelier's use_loras): ours alone, on, trainable.
        self.pipe.disable_lora()
        for _, model in self._models():
            for layer in self._layers(model):
                layer.enable_adapters(True)
                layer.set_adapter([ADAPTER])
            model.requires_grad_(False)
        for _, param in self._named:
            param.requires_grad_(True)

    def _deactivate(self) -> None:
        for _, model in self._models():
            for layer in self._layers(model):
                layer.enable_adapters(False)
            model.eval()
            model.requires_grad_(False)

    # -- data

    @torch.no_grad()
    def _latents(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's VAE latent distribution (mean, std), encoded once; a step samples from it."""
        vae = self.pipe.vae
        means, stds = [], []
        for image in images:
            array = np.asarray(square(image, self.spec.resolution), dtype=np.float32) / 127.5 - 1.0
            pixels = torch.from_numpy(array).permute(2, 0, 1)[None].to(self.device, vae.dtype)
            dist = vae.encode(pixels).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        return torch.cat(means), torch.cat(stds)

    def _sample_latents(self, dist: tuple[torch.Tensor, torch.Tensor], indices: list[int]) -> torch.Tensor:
        mean, std = dist[0][indices], dist[1][indices]
        latents = mean + std * torch.randn(mean.shape, generator=self.generator, device=mean.device)
        config = self.pipe.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return ((latents - shift) * config.scaling_factor).to(self.denoiser.dtype)

    def _encode(self, prompts: list[str]) -> dict[str, Any]:
        pipe, device = self.pipe, self.device
        if self.flux:
            embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None, device=device)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}
        if self.family == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            size = self.spec.resolution
            # SDXL's micro-conditioning: original size, crop top-left, target size (a centre crop to size).
            time_ids = torch.tensor([[size, size, 0, 0, size, size]] * len(prompts), device=device,
                                    dtype=embeds.dtype)
            return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return {"encoder_hidden_states": embeds}

    def _condition(self, prompts: list[str]) -> dict[str, Any]:
        if self.text_encoders:
            return self._encode(prompts)  # with gradients, through the encoders' adapters
        for prompt in prompts:
            if prompt not in self._cache:
                with torch.no_grad():
                    self._cache[prompt] = self._encode([prompt])
        parts = [self._cache[prompt] for prompt in prompts]
        return _cat(parts)

    # -- the loop

    def _predict(self, latents: torch.Tensor, condition: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        n = latents.shape[0]
        noise = torch.randn(latents.shape, generator=self.generator, device=latents.device, dtype=latents.dtype)
        if self.flux:
            return self._predict_flow(latents, noise, condition)
        steps = self.schedule.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (n,), generator=self.generator, device=latents.device)
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        pred = self.denoiser(noisy, timesteps, return_dict=False, **condition)[0]
        if self.prediction == "epsilon":
            target = noise
        elif self.prediction == "v_prediction":
            target = self.schedule.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"cannot train a model predicting {self.prediction!r} (epsilon or v_prediction)")
        return pred, target

    def _predict_flow(self, latents: torch.Tensor, noise: torch.Tensor,
                      condition: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        pipe = self.pipe
        n, channels, height, width = latents.shape
        sigmas = torch.rand((n,), generator=self.generator, device=latents.device)
        config = pipe.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            # The scheduler's training table is shifted when the shift is static (FLUX.1-schnell's).
            shift = config.get("shift", 1.0)
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        s = sigmas.view(n, 1, 1, 1).to(latents.dtype)
        noisy = (1 - s) * latents + s * noise
        packed = pipe._pack_latents(noisy, n, channels, height, width)
        image_ids = pipe._prepare_latent_image_ids(n, height // 2, width // 2, latents.device, latents.dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((n,), _FLUX_GUIDANCE, device=latents.device, dtype=latents.dtype)
        pred = self.denoiser(hidden_states=packed, timestep=sigmas.to(latents.dtype), guidance=guidance,
                             img_ids=image_ids, return_dict=False, **condition)[0]
        target = pipe._pack_latents(noise - latents, n, channels, height, width)
        return pred, target

    def train_step(self) -> float:
        """One optimizer step over ``spec.batch_size`` instance examples (and as many class ones); its loss."""
        spec = self.spec
        self._activate()
        try:
            for _, model in self._models():
                model.train()
            indices = [self.orders["instance"].next() for _ in range(spec.batch_size)]
            latents = self._sample_latents(self.instance, indices)
            prompts = [self.captions[i] for i in indices]
            if self.classes is not None:
                extra = [self.orders["class"].next() for _ in range(spec.batch_size)]
                latents = torch.cat([latents, self._sample_latents(self.classes, extra)])
                prompts += [spec.class_prompt] * len(extra)
            pred, target = self._predict(latents, self._condition(prompts))
            pred, target = pred.float(), target.float()
            n = spec.batch_size
            loss = F.mse_loss(pred[:n], target[:n])
            if self.classes is not None:
                loss = loss + spec.prior_loss_weight * F.mse_loss(pred[n:], target[n:])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, _MAX_GRAD_NORM)
            self.optimizer.step()
            self.step += 1
            return float(loss.detach())
        finally:
            self._deactivate()

    def sample(self, prompt: str, seed: int, steps: int) -> Image.Image:
        """A progress image at ``spec.resolution`` with the training adapter on (the pipeline's defaults else)."""
        self._activate()
        try:
            for _, model in self._models():
                model.eval()
            generator = torch.Generator("cpu").manual_seed(seed)
            size = self.spec.resolution
            with torch.no_grad():
                return self.pipe(prompt=prompt, height=size, width=size, num_inference_steps=steps,
                                 generator=generator).images[0]
        finally:
            self._deactivate()

    # -- checkpoints

    def _settings(self) -> dict[str, Any]:
        spec = self.spec
        return {"family": self.family, "rank": spec.rank, "alpha": spec.alpha_value,
                "train_text_encoder": spec.train_text_encoder, "batch_size": spec.batch_size,
                "resolution": spec.resolution, "instance_images": self.orders["instance"].n,
                "class_images": self.orders["class"].n if "class" in self.orders else 0}

    def checkpoint(self) -> bytes:
        """Everything the loop needs to continue exactly, as one safetensors file (no pickle)."""
        tensors = {f"lora.{name}": param for name, param in self._named}
        optim, optim_meta = ckpt.optimizer_tensors(self.optimizer)
        tensors.update(optim)
        tensors["rng.generator"] = self.generator.get_state()
        for name, order in self.orders.items():
            tensors[f"order.{name}"] = order.perm
        meta = {"format": _FORMAT, "step": self.step, "settings": self._settings(), "optimizer": optim_meta,
                "positions": {name: order.position for name, order in self.orders.items()}}
        return ckpt.pack(tensors, meta)

    def restore(self, data: bytes) -> None:
        """Continues from ``checkpoint()``'s bytes, made by a trainer of the same model, settings and images."""
        tensors, meta = ckpt.unpack(data)
        if meta.get("format") != _FORMAT:
            raise ValueError(f"training checkpoint format {meta.get('format')!r}; this atelier reads {_FORMAT}")
        if meta["settings"] != self._settings():
            raise ValueError(f"the checkpoint was made with other settings ({meta['settings']}) than this "
                             f"training's ({self._settings()}): restart the training instead")
        names = {name[len("lora."):] for name in tensors if name.startswith("lora.")}
        if names != {name for name, _ in self._named}:
            raise ValueError("the checkpoint's LoRA parameters are not this model's: was it made on another model?")
        with torch.no_grad():
            for name, param in self._named:
                param.copy_(tensors[f"lora.{name}"])
        ckpt.load_optimizer(self.optimizer, tensors, meta["optimizer"])
        self.generator.set_state(tensors["rng.generator"])
        for name, order in self.orders.items():
            order.perm, order.position = tensors[f"order.{name}"], meta["positions"][name]
        self.step = meta["step"]

    # -- files

    def _peft_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under peft's names (``….lora_A.weight``), as get_peft_model_state_dict gives."""
        tag = f".{ADAPTER}"
        return {name[len(prefix) + 1:].replace(tag, ""): param.detach() for name, param in self._named
                if name.startswith(f"{prefix}.")}

    def lora_file(self) -> bytes:
        """The LoRA as ``save_lora_weights`` writes it (diffusers' format), for ``load_lora_weights``."""
        from diffusers.utils import convert_state_dict_to_diffusers

        kwargs = {}
        for prefix, _ in self._models():
            kwargs[f"{prefix}_lora_layers"] = convert_state_dict_to_diffusers(self._peft_state(prefix))
            # The adapter's config (its alpha, when it is not the rank) travels in the file's metadata.
            kwargs[f"{prefix}_lora_adapter_metadata"] = self._configs[prefix].to_dict()
        with tempfile.TemporaryDirectory(prefix="atelier-lora-") as folder:
            type(self.pipe).save_lora_weights(folder, weight_name="lora.safetensors", **kwargs)
            return (Path(folder) / "lora.safetensors").read_bytes()

    def kohya_file(self) -> bytes:
        """The LoRA in kohya's format (``lora_unet_…``/``lora_te1_…``, with ``.alpha``), for other tools.

        UNet families only: diffusers converts PEFT state to kohya's names for UNets and CLIP, not for
        FLUX's transformer (NotImplementedError).
        """
        from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
        from safetensors.torch import save

        if self.flux:
            raise NotImplementedError("FLUX LoRAs are written in diffusers' format only (lora_file)")
        state = {f"{prefix}.{key}": value for prefix, _ in self._models()
                 for key, value in self._peft_state(prefix).items()}
        kohya = convert_state_dict_to_kohya(state)
        alpha = torch.tensor(self.spec.alpha_value, dtype=torch.float32)
        # diffusers writes alpha = rank whatever the adapter's alpha was: the real one instead.
        kohya = {key: alpha.clone() if key.endswith(".alpha") else value.detach().contiguous()
                 for key, value in kohya.items()}
        return save(kohya, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(self.spec.rank),
                                     "ss_network_alpha": str(self.spec.alpha_value)})

    def close(self) -> None:
        """Takes the training adapter out of every model it was added to; the pipeline is as before.

        A model that had no other LoRAs loses peft's wrapper layers too; one that had keeps them, with
        every adapter off (atelier's state for loaded LoRAs until a job chooses some).
        """
        from diffusers.utils import recurse_remove_peft_layers
        from diffusers.utils.peft_utils import delete_adapter_layers

        for prefix, model in self._models():
            if prefix in ("unet", "transformer"):
                model.delete_adapters(ADAPTER)
                if not self._others:
                    model.unload_lora()
            elif self._layers(model) and all(not layer.lora_A.keys() - {ADAPTER} for layer in self._layers(model)):
                recurse_remove_peft_layers(model)  # only ours was there: the encoder as it loaded
            else:  # transformers' text encoders, as diffusers' pipelines delete theirs
                delete_adapter_layers(model, ADAPTER)
            model.eval()
            model.requires_grad_(False)
        if self._others:
            self.pipe.disable_lora()
        self.optimizer = None
        self._cache.clear()

def _cat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in parts[0].items():
        if isinstance(value, dict):
            out[key] = _cat([part[key] for part in parts])
        elif key == "txt_ids":  # FLUX's text positions: one copy for the whole batch
            out[key] = value
        else:
            out[key] = torch.cat([part[key] for part in parts])
    return out
