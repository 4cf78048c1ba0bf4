"""DDIM sampling (diffusers ``DDIMScheduler``), functional and jit-friendly.

``set_timesteps(config, n)`` freezes the timesteps and the cumulative alphas of each step and of
its predecessor (numpy float32, as diffusers indexes its float32 ``alphas_cumprod``); ``step``
indexes them with a possibly traced step index.  Like diffusers, the predecessor of timestep t is
``t - num_train_timesteps // n`` for every spacing, and a negative predecessor uses
``final_alpha_cumprod`` (1 with ``set_alpha_to_one``, else alphas_cumprod[0]).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from mema_jax.schedulers.common import check_noise_schedule, parse_config, spaced_timesteps
from mema_jax.schedulers.ddpm import alphas_cumprod, predicted_original_sample


@dataclasses.dataclass(frozen=True)
class DDIMConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"

    def __post_init__(self):
        check_noise_schedule(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DDIMConfig:
        return parse_config(
            cls, "DDIMScheduler", config,
            fixed={"thresholding": False, "rescale_betas_zero_snr": False},
            inert=("dynamic_thresholding_ratio", "sample_max_value"),
        )


@struct.dataclass
class DDIMState:
    timesteps: np.ndarray  # (n,) int32, descending
    alpha_prod_t: np.ndarray  # (n,) float32
    alpha_prod_t_prev: np.ndarray  # (n,) float32
    config: DDIMConfig = struct.field(pytree_node=False)


def set_timesteps(config: DDIMConfig, num_inference_steps: int) -> DDIMState:
    ac = alphas_cumprod(config)
    final_alpha_cumprod = np.float32(1.0) if config.set_alpha_to_one else ac[0]
    timesteps = spaced_timesteps(config.timestep_spacing, config.num_train_timesteps, num_inference_steps,
                                 config.steps_offset)
    prev_timesteps = timesteps - config.num_train_timesteps // num_inference_steps
    alpha_prod_t_prev = np.where(prev_timesteps >= 0, ac[np.maximum(prev_timesteps, 0)], final_alpha_cumprod)
    return DDIMState(
        timesteps=timesteps.astype(np.int32),
        alpha_prod_t=ac[timesteps],
        alpha_prod_t_prev=alpha_prod_t_prev.astype(np.float32),
        config=config,
    )


def step(state: DDIMState, model_output, step_index, sample, *, eta: float = 0.0, noise=None,
         use_clipped_model_output: bool = False):
    """One DDIM step (eq. 12 of arXiv:2010.02502); returns (prev_sample, pred_original_sample).

    ``eta`` is a python float (0: deterministic DDIM, 1: DDPM-like); with eta > 0, ``noise``
    (standard normal, shaped like ``sample``) scales the added variance.  Computed in float32,
    cast back to the sample dtype.
    """
    config = state.config
    dtype = sample.dtype
    sample = sample.astype(jnp.float32)
    model_output = model_output.astype(jnp.float32)
    alpha_prod_t = jnp.asarray(state.alpha_prod_t)[step_index]
    alpha_prod_t_prev = jnp.asarray(state.alpha_prod_t_prev)[step_index]
    beta_prod_t = 1 - alpha_prod_t

    pred_original_sample = predicted_original_sample(config.prediction_type, model_output, sample, alpha_prod_t)
    if config.prediction_type == "epsilon":
        pred_epsilon = model_output
    elif config.prediction_type == "sample":
        pred_epsilon = (sample - jnp.sqrt(alpha_prod_t) * pred_original_sample) / jnp.sqrt(beta_prod_t)
    else:  # v_prediction
        pred_epsilon = jnp.sqrt(alpha_prod_t) * model_output + jnp.sqrt(beta_prod_t) * sample

    if config.clip_sample:
        pred_original_sample = jnp.clip(pred_original_sample, -config.clip_sample_range, config.clip_sample_range)

    variance = ((1 - alpha_prod_t_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * jnp.sqrt(variance)
    if use_clipped_model_output:
        pred_epsilon = (sample - jnp.sqrt(alpha_prod_t) * pred_original_sample) / jnp.sqrt(beta_prod_t)

    pred_sample_direction = jnp.sqrt(1 - alpha_prod_t_prev - std_dev_t**2) * pred_epsilon
    prev_sample = jnp.sqrt(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction
    if eta > 0:
        if noise is None:
            raise ValueError("DDIM with eta > 0 adds noise: pass `noise` shaped like the sample")
        prev_sample = prev_sample + std_dev_t * noise.astype(jnp.float32)
    return prev_sample.astype(dtype), pred_original_sample.astype(dtype)
