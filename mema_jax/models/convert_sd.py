"""Original (LDM / CompVis) single-file Stable Diffusion checkpoints, e.g.
``v1-5-pruned-emaonly.safetensors`` or ``.ckpt``: one state dict holding the UNet
(``model.diffusion_model.*``), the VAE (``first_stage_model.*``) and the CLIP text encoder
(``cond_stage_model.transformer.*``), without configs -- the caller supplies the diffusers configs.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax.numpy as jnp

from mema_jax.models import weights
from mema_jax.models.convert_unet import LDM_UNET_PREFIX, unet_params_from_state_dict
from mema_jax.models.convert_vae import LDM_VAE_PREFIX, vae_params_from_state_dict
from mema_jax.models.unet import UNet2DConditionModel, UNetConfig
from mema_jax.models.vae import AutoencoderKL, VAEConfig

LDM_TEXT_PREFIX = "cond_stage_model.transformer."
LDM_EMA_PREFIX = "model_ema."


def _ema_unet_tensors(flat: Mapping[str, Any], source: str) -> dict[str, Any]:
    """LDM keeps EMA weights as ``model_ema.<key with the dots removed>`` (e.g.
    ``model_ema.diffusion_modelinput_blocks00weight``); returned under the regular UNet names."""
    out, missing = {}, []
    for key in flat:
        if key.startswith(LDM_UNET_PREFIX):
            ema_key = LDM_EMA_PREFIX + key[len("model."):].replace(".", "")
            if ema_key in flat:
                out[key] = flat[ema_key]
            else:
                missing.append(ema_key)
    if missing or not out:
        raise weights.WeightsError(f"{source}: use_ema=True but EMA weights are missing: {sorted(missing) or 'all'}")
    return out


def load_sd_checkpoint(
    path,
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    attention_impl: str = "xla",
    mesh=None,
    rules=None,
    use_ema: bool = False,
) -> dict[str, Any]:
    """-> {"unet": (module, params), "vae": (module, params), "text_encoder_state_dict": {...}}.

    ``unet_config`` / ``vae_config``: diffusers config dicts.  The text-encoder tensors come back
    with the ``cond_stage_model.transformer.`` prefix removed, i.e. with the ``text_model.*``
    names a transformers CLIPTextModel folder has, ready for the CLIP converter.
    ``use_ema``: take the UNet from the ``model_ema.*`` copy (full, non-pruned checkpoints).
    """
    path = os.fspath(path)
    flat = weights.read_state_dict(path)
    if not any(k.startswith(LDM_UNET_PREFIX) for k in flat):
        raise weights.WeightsError(f"{path}: not an LDM Stable Diffusion checkpoint (no {LDM_UNET_PREFIX}* keys)")
    try:
        unet = UNet2DConditionModel(UNetConfig.from_dict(unet_config), dtype=dtype, param_dtype=param_dtype,
                                    attention_impl=attention_impl)
        vae = AutoencoderKL(VAEConfig.from_dict(vae_config), dtype=dtype, param_dtype=param_dtype,
                            attention_impl=attention_impl)
    except ValueError as err:
        raise weights.WeightsError(f"{path}: {err}") from err
    if use_ema:
        unet_flat = _ema_unet_tensors(flat, path)
    else:
        unet_flat = {k: v for k, v in flat.items() if k.startswith(LDM_UNET_PREFIX)}
    vae_flat = {k: v for k, v in flat.items() if k.startswith(LDM_VAE_PREFIX)}
    unet_params = unet_params_from_state_dict(unet, unet_flat, source=path, mesh=mesh, rules=rules,
                                              ldm_prefix=LDM_UNET_PREFIX)
    vae_params = vae_params_from_state_dict(vae, vae_flat, source=path, mesh=mesh, rules=rules,
                                            ldm_prefix=LDM_VAE_PREFIX)
    text = {k[len(LDM_TEXT_PREFIX):]: v for k, v in flat.items() if k.startswith(LDM_TEXT_PREFIX)}
    return {"unet": (unet, unet_params), "vae": (vae, vae_params), "text_encoder_state_dict": text}
