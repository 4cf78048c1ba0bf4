"""DPM-Solver++ multistep (diffusers ``DPMSolverMultistepScheduler``, algorithm_type "dpmsolver++").

Order 2 ("DPM++ 2M") with the "midpoint" (default) or "heun" second-order update, or order 1.
``set_timesteps`` builds the timesteps and sigmas exactly as diffusers does and then precomputes,
in numpy float32 with diffusers' scalar operations, every coefficient a step needs.  The step is
a pure function of (state, carry, model output, step index, sample); the carry holds the previous
data prediction and how many steps were taken, which decides the order as diffusers'
``lower_order_nums`` does.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from mema_jax.schedulers.common import SchedulerConfigError, check_noise_schedule, parse_config
from mema_jax.schedulers.ddpm import alphas_cumprod


@dataclasses.dataclass(frozen=True)
class DPMSolverConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self):
        check_noise_schedule(self)
        if self.solver_order not in (1, 2):
            raise SchedulerConfigError(f"solver_order {self.solver_order} is not supported; use 1 or 2")
        if self.algorithm_type != "dpmsolver++":
            raise SchedulerConfigError(f"algorithm_type {self.algorithm_type!r} is not supported; only 'dpmsolver++'")
        if self.solver_type not in ("midpoint", "heun"):
            raise SchedulerConfigError(f"solver_type {self.solver_type!r} is not supported; use 'midpoint' or 'heun'")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise SchedulerConfigError(f"final_sigmas_type {self.final_sigmas_type!r} is not supported; use 'zero' or 'sigma_min'")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DPMSolverConfig:
        return parse_config(
            cls, "DPMSolverMultistepScheduler", config,
            fixed={
                "thresholding": False, "rescale_betas_zero_snr": False, "variance_type": None,
                "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                "use_lu_lambdas": False, "use_flow_sigmas": False, "use_dynamic_shifting": False,
            },
            inert=("dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type"),
        )


@struct.dataclass
class DPMSolverState:
    """Per inference step i (from sigma_i to sigma_{i+1}) the float32 scalars of diffusers' step."""

    timesteps: np.ndarray  # (n,) int32, descending
    alpha_s0: np.ndarray  # alpha and sigma at the current step, for the data prediction
    sigma_s0: np.ndarray
    sample_coeff: np.ndarray  # sigma_{i+1} / sigma_i
    x0_coeff: np.ndarray  # alpha_{i+1} (exp(-h) - 1)
    d1_scale: np.ndarray  # 1 / r0 (0 at step 0, which never takes a second-order step)
    d1_coeff: np.ndarray  # coefficient of D1 in the second-order update (sign included)
    first_order_only: np.ndarray  # (n,) bool: steps where diffusers forces the first-order update
    config: DPMSolverConfig = struct.field(pytree_node=False)


@struct.dataclass
class DPMSolverCarry:
    previous_x0: Any  # the data prediction of the previous step
    lower_order_nums: Any  # int32: steps taken so far, capped at solver_order


def init_carry(sample) -> DPMSolverCarry:
    return DPMSolverCarry(previous_x0=jnp.zeros(sample.shape, jnp.float32), lower_order_nums=jnp.zeros((), jnp.int32))


def _timesteps(config: DPMSolverConfig, ac: np.ndarray, num_inference_steps: int) -> np.ndarray:
    with np.errstate(divide="ignore"):
        lambda_t = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1.0) - ac))
    # Lambda clipping (for cosine schedules) shortens the usable range of timesteps.
    clipped_idx = int(np.searchsorted(lambda_t[::-1], config.lambda_min_clipped))
    last_timestep = config.num_train_timesteps - clipped_idx
    n = num_inference_steps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if config.timestep_spacing == "leading":
        step_ratio = last_timestep // (n + 1)
        timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
        return timesteps + config.steps_offset
    step_ratio = config.num_train_timesteps / n  # trailing
    return np.arange(last_timestep, 0, -step_ratio).round().copy().astype(np.int64) - 1


def set_timesteps(config: DPMSolverConfig, num_inference_steps: int) -> DPMSolverState:
    if not 0 < num_inference_steps <= config.num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {config.num_train_timesteps}], got {num_inference_steps}")
    ac = alphas_cumprod(config)
    one = np.float32(1.0)
    timesteps = _timesteps(config, ac, num_inference_steps)
    train_sigmas = np.sqrt((one - ac) / ac)
    # Like diffusers, a timestep past the end (leading spacing + steps_offset) takes the last sigma.
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    sigma_last = train_sigmas[0] if config.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
    n = len(timesteps)

    alphas = one / np.sqrt(sigmas * sigmas + one)
    sigma_ts = sigmas * alphas
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lambdas = np.log(alphas) - np.log(sigma_ts)  # +inf at a final sigma of zero
        h = lambdas[1:] - lambdas[:-1]
        exp_neg_h_minus_1 = np.exp(-h) - one
        x0_coeff = alphas[1:] * exp_neg_h_minus_1
        sample_coeff = sigma_ts[1:] / sigma_ts[:-1]
        h_0 = np.concatenate([[np.float32(np.nan)], lambdas[1:-1] - lambdas[:-2]]).astype(np.float32)
        d1_scale = one / (h_0 / h)
        if config.solver_type == "midpoint":
            d1_coeff = -(np.float32(0.5) * x0_coeff)
        else:  # heun
            d1_coeff = alphas[1:] * (exp_neg_h_minus_1 / h + one)

    is_last = np.arange(n) == n - 1
    final_first_order = config.euler_at_final or (config.lower_order_final and n < 15) or config.final_sigmas_type == "zero"
    first_order_only = np.full(n, config.solver_order == 1) | (is_last & final_first_order)
    # Second-order coefficients are unused where the step is always first order (and may be inf/nan there).
    unused = first_order_only | (np.arange(n) == 0)
    d1_scale = np.where(unused, 0, d1_scale)
    d1_coeff = np.where(unused, 0, d1_coeff)
    return DPMSolverState(
        timesteps=timesteps.astype(np.int32),
        alpha_s0=alphas[:-1],
        sigma_s0=sigma_ts[:-1],
        sample_coeff=sample_coeff.astype(np.float32),
        x0_coeff=x0_coeff.astype(np.float32),
        d1_scale=d1_scale.astype(np.float32),
        d1_coeff=d1_coeff.astype(np.float32),
        first_order_only=first_order_only,
        config=config,
    )


def data_prediction(prediction_type: str, model_output, sample, alpha_t, sigma_t):
    """The model output converted to x_0 (DPM-Solver++ integrates the data prediction)."""
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_t * sample - sigma_t * model_output
    raise SchedulerConfigError(f"prediction_type {prediction_type!r} is not supported")


def step(state: DPMSolverState, carry: DPMSolverCarry, model_output, step_index, sample):
    """One multistep update from step ``step_index``; returns (prev_sample, new carry).

    The first step after ``init_carry`` is first order, as is the last step where diffusers
    lowers the order; otherwise the update uses the previous data prediction (second order).
    """
    dtype = model_output.dtype
    sample = sample.astype(jnp.float32)
    model_output = model_output.astype(jnp.float32)

    def at(values):
        return jnp.asarray(values)[step_index]

    x0 = data_prediction(state.config.prediction_type, model_output, sample, at(state.alpha_s0), at(state.sigma_s0))
    first_order = at(state.sample_coeff) * sample - at(state.x0_coeff) * x0
    d1 = at(state.d1_scale) * (x0 - carry.previous_x0)
    second_order = first_order + at(state.d1_coeff) * d1
    use_first_order = at(state.first_order_only) | (carry.lower_order_nums < 1)
    prev_sample = jnp.where(use_first_order, first_order, second_order)
    new_carry = DPMSolverCarry(
        previous_x0=x0,
        lower_order_nums=jnp.minimum(carry.lower_order_nums + 1, state.config.solver_order),
    )
    return prev_sample.astype(dtype), new_carry
