"""Classifier-free guidance (Ho & Salimans 2022), as diffusers' Stable Diffusion pipeline applies it."""
from __future__ import annotations

import jax.numpy as jnp


def uses_guidance(guidance_scale: float) -> bool:
    """diffusers runs the unconditional branch only for guidance_scale > 1."""
    return guidance_scale > 1.0


def classifier_free_guidance(noise_pred_uncond, noise_pred_text, guidance_scale):
    """uncond + scale * (text - uncond)."""
    return noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)


def guided_prediction(model_output_both, guidance_scale):
    """Splits a batch laid out as [unconditional; conditional] and combines the halves."""
    noise_pred_uncond, noise_pred_text = jnp.split(model_output_both, 2, axis=0)
    return classifier_free_guidance(noise_pred_uncond, noise_pred_text, guidance_scale)
