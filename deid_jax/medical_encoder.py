"""Enc_med, the frozen medical semantics encoder: image -> f_med (B, h, w, C).

``diffusion`` (the paper's): a diffusion model trained on MeMa by ``mema_jax.trainers.diffusion``
(a pipeline folder; a LoRA file merged into its UNet if given).  The image is VAE-encoded (or
used as pixels by a pixel-space model), noised to ``timestep`` with a fixed noise pattern (the
same for X and X_enc, so L_med compares semantics, not noise draws), and passed through the UNet's
conv_in and first ``num_down_blocks`` down blocks with the empty prompt as text context:
320 x H/16 x W/16 for SD1.5 at N = 1.  Only those blocks' weights are kept.

``vit``: Tab. 10's alternatives, a ViT trained here supervised on disease labels or as an MAE
(``mema_jax.models.vit``): its patch tokens on their grid.

Every kind is one ``MedicalEncoder``: a pure ``apply(params, images)`` and its frozen ``params``,
so the trainer passes the weights to its jitted step as an argument.  ``save`` writes the kept
weights and settings into a folder that ``load`` reads back (the de-identifier ships with it).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mema_jax.fileio import atomic_folder, atomic_write_bytes
from mema_jax.models import lora, param_tree, weights
from mema_jax.models.convert_clip import load_clip_text, load_tokenizer, tokenize
from mema_jax.models.convert_unet import load_unet
from mema_jax.models.convert_vae import load_vae, vae_from_config
from mema_jax.models.unet import UNet2DConditionModel, UNetConfig
from mema_jax.models.vae import AutoencoderKL
from mema_jax.schedulers import DDPMConfig, ddpm, read_scheduler_config

KINDS = ("diffusion", "vit")
SETTINGS_FILE = "medical_encoder.json"
PARAMS_FILE = "params.safetensors"
NOISE_SEED = 20240701  # the fixed noise pattern of the diffusion encoder


@dataclasses.dataclass
class MedicalEncoder:
    kind: str
    apply: Callable[[Any, Any], Any]  # (params, images in [-1, 1]) -> (B, h, w, channels)
    params: Any
    channels: int
    settings: dict  # what ``save`` writes (architecture and options)


def _diffusion_apply(unet: UNet2DConditionModel, vae: AutoencoderKL | None, num_down_blocks: int, timestep: int,
                     alphas_cumprod: np.ndarray):
    signal = float(np.sqrt(alphas_cumprod[timestep]))
    sigma = float(np.sqrt(1.0 - alphas_cumprod[timestep]))

    def apply(params, images):
        x = images
        if vae is not None:
            x = vae.apply({"params": params["vae"]}, images, method="encode").mode() * vae.config.scaling_factor
        noise = jax.random.normal(jax.random.key(NOISE_SEED), x.shape[1:], x.dtype)
        x = signal * x + sigma * noise[None]
        context = jnp.broadcast_to(params["context"], (x.shape[0],) + params["context"].shape[1:])
        t = jnp.full((x.shape[0],), timestep, jnp.int32)
        return unet.apply({"params": params["unet"]}, x, t, context, num_down_blocks=num_down_blocks,
                          method=UNet2DConditionModel.encode_features)

    return apply


def _kept_unet(params, num_down_blocks: int) -> dict:
    keep = {"conv_in", "time_embedding", *(f"down_blocks_{i}" for i in range(num_down_blocks))}
    return {k: v for k, v in params.items() if k in keep}


def diffusion_encoder(model_folder, *, num_down_blocks: int = 1, timestep: int = 50, lora_file=None,
                      mesh=None, rules=None) -> MedicalEncoder:
    """Enc_med from a diffusion pipeline folder (unet/, text_encoder/, tokenizer/, scheduler/[, vae/])."""
    folder = Path(model_folder)
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        if not (folder / part).is_dir():
            raise weights.WeightsError(f"{folder}: not a diffusion model folder (no {part}/ inside); the medical "
                                       "encoder is built from the diffusion trainer's export")
    unet, unet_params = load_unet(folder / "unet")
    if not 1 <= num_down_blocks <= len(unet.config.block_out_channels):
        raise ValueError(f"num_down_blocks must be in [1, {len(unet.config.block_out_channels)}]")
    if lora_file:
        adapter, scales = lora.load_lora(lora_file, unet_params, unet.config)
        unet_params = lora.merge(unet_params, adapter, scales)
    text, text_params = load_clip_text(folder / "text_encoder")
    ids = tokenize(load_tokenizer(folder / "tokenizer"), [""], max_length=text.config.max_position_embeddings)
    context = np.asarray(text.apply({"params": text_params}, jnp.asarray(ids)).last_hidden_state)
    vae = vae_params = None
    if (folder / "vae").is_dir():
        vae, vae_params = load_vae(folder / "vae")
        vae_params = {k: v for k, v in vae_params.items() if k in ("encoder", "quant_conv")}
    schedule = read_scheduler_config(folder / "scheduler")
    ddpm_keys = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas"}
    acp = ddpm.alphas_cumprod(DDPMConfig.from_config({k: v for k, v in schedule.items() if k in ddpm_keys}))
    if not 0 <= timestep < len(acp):
        raise ValueError(f"timestep {timestep} outside the model's [0, {len(acp)})")
    params = {"unet": _kept_unet(unet_params, num_down_blocks), "context": context}
    if vae is not None:
        params["vae"] = vae_params
    settings = {"kind": "diffusion", "num_down_blocks": num_down_blocks, "timestep": timestep,
                "unet": unet.config.to_dict(), "vae": None if vae is None else vae.config.to_dict(),
                "alphas_cumprod": [float(a) for a in acp], "source": str(folder), "lora": str(lora_file or "")}
    return _place(_build(settings, params), mesh, rules)


def vit_encoder(folder, *, mesh=None, rules=None) -> MedicalEncoder:
    """Enc_med from a ViT encoder exported by configs/vit_encoder.py (supervised or MAE)."""
    from mema_jax.models.vit import load_vit_encoder

    module, params = load_vit_encoder(folder)
    settings = {"kind": "vit", "source": str(folder), "vit": _read_json(Path(folder) / "config.json")}
    return _place(MedicalEncoder("vit", _vit_apply(module), params, module.config.width, settings), mesh, rules)


def _vit_apply(module):
    def apply(params, images):
        return module.apply({"params": params}, images, method=type(module).features)

    return apply


def _build(settings: dict, params) -> MedicalEncoder:
    if settings["kind"] == "diffusion":
        unet = UNet2DConditionModel(UNetConfig.from_dict(settings["unet"]))
        vae = None if settings["vae"] is None else vae_from_config(settings["vae"])
        apply = _diffusion_apply(unet, vae, settings["num_down_blocks"], settings["timestep"],
                                 np.asarray(settings["alphas_cumprod"], np.float32))
        channels = unet.config.block_out_channels[settings["num_down_blocks"] - 1]
        return MedicalEncoder("diffusion", apply, params, channels, settings)
    if settings["kind"] == "vit":
        from mema_jax.models.vit import ViTConfig, ViTEncoder

        module = ViTEncoder(ViTConfig.from_dict(settings["vit"]))
        return MedicalEncoder("vit", _vit_apply(module), params, module.config.width, settings)
    raise ValueError(f"unknown medical encoder kind {settings['kind']!r}; choose one of {KINDS}")


def _place(encoder: MedicalEncoder, mesh, rules) -> MedicalEncoder:
    if mesh is not None:
        from mema_jax.core import train_state

        encoder.params, _ = train_state.place_frozen(encoder.params, mesh, rules)
    return encoder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise weights.WeightsError(f"{path}: cannot read ({e})") from None


def save(encoder: MedicalEncoder, folder) -> Path:
    """The kept weights (safetensors, our parameter paths) and the settings, atomically."""
    folder = Path(folder)
    flat = {k: np.asarray(jax.device_get(v)) for k, v in param_tree.flatten(encoder.params).items()}
    with atomic_folder(folder) as tmp:
        weights.write_safetensors(tmp / PARAMS_FILE, flat)
        atomic_write_bytes(tmp / SETTINGS_FILE, (json.dumps(encoder.settings, indent=2) + "\n").encode())
    return folder


def load(folder, *, mesh=None, rules=None) -> MedicalEncoder:
    folder = Path(folder)
    settings = _read_json(folder / SETTINGS_FILE)
    flat = weights.read_state_dict(os.fspath(folder / PARAMS_FILE))
    params = jax.tree.map(jnp.asarray, param_tree.unflatten(flat))
    return _place(_build(settings, params), mesh, rules)
