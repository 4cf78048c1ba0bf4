"""Noise schedules and config parsing shared by the samplers.

The schedules are built in numpy the way diffusers builds them, then held as float32: betas
come from a float64 linspace (or the float64 cosine formula) rounded to float32, and
``alphas_cumprod`` is the float32 product accumulated in float64 -- which is what
``torch.cumprod`` does on CPU.  torch's own float32 ``linspace`` can differ from the
correctly rounded value by 1-2 ulp, so betas agree with diffusers to ~2e-7 relative and
``alphas_cumprod`` to ~5e-7 (tests/test_schedulers.py measures it).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


class SchedulerConfigError(ValueError):
    """A scheduler config names an option we do not know or a value we do not implement."""


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas=None) -> np.ndarray:
    """float32 betas for diffusers' ``beta_schedule`` names (or given ``trained_betas``)."""
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float32)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64).astype(np.float32)
    if beta_schedule == "scaled_linear":
        # diffusers squares the float32 linspace of square roots ("latent diffusion" schedule).
        roots = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64).astype(np.float32)
        return roots * roots
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(num_train_timesteps)
    raise SchedulerConfigError(f"beta_schedule {beta_schedule!r} is not supported; use one of {BETA_SCHEDULES}")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """GLIDE's cosine schedule, in python floats as diffusers computes it."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_train_timesteps):
        t1 = i / num_train_timesteps
        t2 = (i + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.asarray(betas, dtype=np.float32)


def cumulative_alphas(betas: np.ndarray) -> np.ndarray:
    """float32 ``alphas_cumprod``; the product runs in float64 like torch.cumprod on CPU."""
    alphas = (np.float32(1.0) - betas).astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def spaced_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int,
                     steps_offset: int) -> np.ndarray:
    """Descending int64 timesteps for DDPM/DDIM ("leading", "trailing", "linspace" of arXiv:2305.08891)."""
    if not 0 < num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in [1, {num_train_timesteps}] (num_train_timesteps), got {num_inference_steps}"
        )
    if spacing == "linspace":
        timesteps = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        step_ratio = num_train_timesteps // num_inference_steps
        timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].copy().astype(np.int64)
        timesteps += steps_offset
    elif spacing == "trailing":
        step_ratio = num_train_timesteps / num_inference_steps
        timesteps = np.round(np.arange(num_train_timesteps, 0, -step_ratio)).astype(np.int64) - 1
    else:
        raise SchedulerConfigError(f"timestep_spacing {spacing!r} is not supported; use one of {TIMESTEP_SPACINGS}")
    check_timestep_range(timesteps, num_train_timesteps)
    return timesteps


def check_timestep_range(timesteps: np.ndarray, num_train_timesteps: int) -> None:
    """diffusers would accept e.g. 1000 steps with steps_offset=1 and then fail indexing; fail early."""
    if timesteps.min() < 0 or timesteps.max() >= num_train_timesteps:
        raise ValueError(
            f"timesteps {timesteps.min()}..{timesteps.max()} fall outside [0, {num_train_timesteps}); "
            "use fewer inference steps or a smaller steps_offset"
        )


def parse_config(config_class, diffusers_name: str, config: Mapping[str, Any], *,
                 fixed: Mapping[str, Any] = (), inert: tuple[str, ...] = ()):
    """Builds ``config_class`` (a dataclass mirroring a diffusers scheduler) from a config dict.

    * ``_``-prefixed keys are metadata; keys listed in ``_use_default_values`` were defaults of the
      class that saved the file and are dropped, as diffusers does.
    * ``fixed``: options diffusers has that we implement only at one value (e.g. thresholding=False).
    * ``inert``: options that have no effect given the fixed ones (e.g. dynamic_thresholding_ratio).
    * Values are checked by the config class itself (its ``__post_init__``).
    * A key nobody knows is an error, unless ``_class_name`` names another scheduler class:
      then, as when diffusers switches scheduler classes, the other class's own options are dropped.
    """
    config = dict(config)
    defaults_used = set(config.pop("_use_default_values", None) or ())
    class_name = config.get("_class_name", diffusers_name)
    fields = {f.name for f in dataclasses.fields(config_class)}
    known = fields | set(dict(fixed)) | set(inert)
    kwargs, unknown = {}, []
    for key, value in config.items():
        if key.startswith("_") or key in defaults_used:
            continue
        if key in fields:
            kwargs[key] = value
        elif key in dict(fixed):
            if value != dict(fixed)[key]:
                raise SchedulerConfigError(
                    f"{diffusers_name} option {key}={value!r} is not implemented (only {dict(fixed)[key]!r})"
                )
        elif key not in known:
            unknown.append(key)
    if unknown and class_name == diffusers_name:
        raise SchedulerConfigError(f"unknown {diffusers_name} options {sorted(unknown)}; known options: {sorted(known)}")
    if kwargs.get("trained_betas") is not None:
        kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
    return config_class(**kwargs)


def read_scheduler_config(path: str | os.PathLike) -> dict:
    """Reads a diffusers ``scheduler_config.json`` (a file, or a folder holding one)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "scheduler_config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SchedulerConfigError(f"{path}: cannot read the scheduler config: {e}") from e
    if not isinstance(config, dict):
        raise SchedulerConfigError(f"{path}: a scheduler config is a JSON object, got {type(config).__name__}")
    return config


def check_noise_schedule(config) -> None:
    """Checks the fields every noise schedule has."""
    if config.beta_schedule not in BETA_SCHEDULES and config.trained_betas is None:
        raise SchedulerConfigError(f"beta_schedule {config.beta_schedule!r} is not supported; use one of {BETA_SCHEDULES}")
    if config.prediction_type not in PREDICTION_TYPES:
        raise SchedulerConfigError(f"prediction_type {config.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
    if config.timestep_spacing not in TIMESTEP_SPACINGS:
        raise SchedulerConfigError(f"timestep_spacing {config.timestep_spacing!r} is not supported; use one of {TIMESTEP_SPACINGS}")
    if config.trained_betas is not None and len(config.trained_betas) != config.num_train_timesteps:
        raise SchedulerConfigError(
            f"trained_betas has {len(config.trained_betas)} values but num_train_timesteps is {config.num_train_timesteps}"
        )
