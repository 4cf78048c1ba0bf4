"""DDPM (diffusers ``DDPMScheduler``): the forward process for training and the ancestral sampling step.

Functional: ``DDPMConfig`` mirrors the diffusers config; ``alphas_cumprod(config)`` is the frozen
noise schedule used by ``add_noise`` / ``get_velocity`` / ``training_target``;
``set_timesteps(config, n)`` gives a ``DDPMState`` whose per-step coefficients were computed in
numpy float32 with the same scalar operations diffusers performs in torch, and ``step`` indexes
them with a (possibly traced) step index, so it runs inside ``jax.lax.scan``/``fori_loop``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from mema_jax.schedulers.common import (
    SchedulerConfigError,
    check_noise_schedule,
    cumulative_alphas,
    make_betas,
    parse_config,
    spaced_timesteps,
)

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@dataclasses.dataclass(frozen=True)
class DDPMConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    def __post_init__(self):
        check_noise_schedule(self)
        if self.variance_type not in VARIANCE_TYPES:
            raise SchedulerConfigError(f"variance_type {self.variance_type!r} is not supported; use one of {VARIANCE_TYPES}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DDPMConfig:
        return parse_config(
            cls, "DDPMScheduler", config,
            fixed={"thresholding": False, "rescale_betas_zero_snr": False},
            inert=("dynamic_thresholding_ratio", "sample_max_value"),
        )


def alphas_cumprod(config: DDPMConfig) -> np.ndarray:
    """float32 (num_train_timesteps,) cumulative product of alphas."""
    betas = make_betas(config.num_train_timesteps, config.beta_start, config.beta_end, config.beta_schedule,
                       config.trained_betas)
    return cumulative_alphas(betas)


def _signal_and_noise_scales(alphas_cumprod, timesteps, like):
    # diffusers casts alphas_cumprod to the sample dtype before taking roots; so do we.
    ac = jnp.asarray(alphas_cumprod).astype(like.dtype)[jnp.asarray(timesteps)]
    shape = (-1,) + (1,) * (like.ndim - 1)
    return jnp.sqrt(ac).reshape(shape), jnp.sqrt(1 - ac).reshape(shape)


def add_noise(alphas_cumprod, original_samples, noise, timesteps):
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise; ``timesteps`` has one entry per batch element."""
    signal, sigma = _signal_and_noise_scales(alphas_cumprod, timesteps, original_samples)
    return signal * original_samples + sigma * noise


def get_velocity(alphas_cumprod, sample, noise, timesteps):
    """v = sqrt(a_t) noise - sqrt(1 - a_t) x_0 (Imagen Video, sec. 2.4)."""
    signal, sigma = _signal_and_noise_scales(alphas_cumprod, timesteps, sample)
    return signal * noise - sigma * sample


def training_target(prediction_type: str, alphas_cumprod, original_samples, noise, timesteps):
    """What the model learns to predict: the noise, the velocity or the clean sample."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return get_velocity(alphas_cumprod, original_samples, noise, timesteps)
    if prediction_type == "sample":
        return original_samples
    raise SchedulerConfigError(f"prediction_type {prediction_type!r} is not supported")


@struct.dataclass
class DDPMState:
    """Per inference step: the timestep and the float32 scalars of diffusers' ``DDPMScheduler.step``."""

    timesteps: np.ndarray  # (n,) int32, descending
    alpha_prod_t: np.ndarray  # (n,)
    pred_original_sample_coeff: np.ndarray  # (n,)
    current_sample_coeff: np.ndarray  # (n,)
    noise_std: np.ndarray  # (n,) 0 at t == 0, where diffusers adds no noise
    config: DDPMConfig = struct.field(pytree_node=False)


def set_timesteps(config: DDPMConfig, num_inference_steps: int) -> DDPMState:
    ac = alphas_cumprod(config)
    timesteps = spaced_timesteps(config.timestep_spacing, config.num_train_timesteps, num_inference_steps,
                                 config.steps_offset)
    one = np.float32(1.0)
    alpha_prod_t = ac[timesteps]
    # The previous timestep is the next one of the schedule; after the last, alpha_prod is 1.
    alpha_prod_t_prev = np.concatenate([ac[timesteps[1:]], [one]]).astype(np.float32)
    beta_prod_t = one - alpha_prod_t
    beta_prod_t_prev = one - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = one - current_alpha_t
    pred_original_sample_coeff = np.sqrt(alpha_prod_t_prev) * current_beta_t / beta_prod_t
    current_sample_coeff = np.sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t

    variance = np.maximum((one - alpha_prod_t_prev) / (one - alpha_prod_t) * current_beta_t, np.float32(1e-20))
    if config.variance_type == "fixed_small":
        noise_std = np.sqrt(variance)
    elif config.variance_type == "fixed_small_log":
        noise_std = np.exp(np.float32(0.5) * np.log(variance))
    else:  # fixed_large
        noise_std = np.sqrt(current_beta_t)
    noise_std = np.where(timesteps > 0, noise_std, np.float32(0.0)).astype(np.float32)
    return DDPMState(
        timesteps=timesteps.astype(np.int32),
        alpha_prod_t=alpha_prod_t,
        pred_original_sample_coeff=pred_original_sample_coeff.astype(np.float32),
        current_sample_coeff=current_sample_coeff.astype(np.float32),
        noise_std=noise_std,
        config=config,
    )


def predicted_original_sample(prediction_type: str, model_output, sample, alpha_prod_t):
    """x_0 from the model output at a timestep with cumulative alpha ``alpha_prod_t``."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - jnp.sqrt(beta_prod_t) * model_output) / jnp.sqrt(alpha_prod_t)
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return jnp.sqrt(alpha_prod_t) * sample - jnp.sqrt(beta_prod_t) * model_output
    raise SchedulerConfigError(f"prediction_type {prediction_type!r} is not supported")


def step(state: DDPMState, model_output, step_index, sample, noise):
    """One ancestral step x_t -> x_{t-1}; ``noise`` is standard normal like ``sample``.

    Returns (prev_sample, pred_original_sample), computed in float32 and cast to the sample dtype.
    """
    config = state.config
    dtype = sample.dtype
    sample = sample.astype(jnp.float32)
    model_output = model_output.astype(jnp.float32)
    pred_original_sample = predicted_original_sample(
        config.prediction_type, model_output, sample, jnp.asarray(state.alpha_prod_t)[step_index]
    )
    if config.clip_sample:
        pred_original_sample = jnp.clip(pred_original_sample, -config.clip_sample_range, config.clip_sample_range)
    prev_sample = (jnp.asarray(state.pred_original_sample_coeff)[step_index] * pred_original_sample
                   + jnp.asarray(state.current_sample_coeff)[step_index] * sample)
    prev_sample = prev_sample + jnp.asarray(state.noise_std)[step_index] * noise.astype(jnp.float32)
    return prev_sample.astype(dtype), pred_original_sample.astype(dtype)
