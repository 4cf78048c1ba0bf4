"""Normalization layers computed in float32 (as torch does for fp32 and upcasts for bf16)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


def _affine_params(module: nn.Module, features: int, param_dtype):
    scale = module.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (features,), param_dtype)
    bias = module.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (features,), param_dtype)
    return scale, bias


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm on channels-last input (B, ..., C): statistics per sample and group."""

    num_groups: int
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {self.num_groups} groups")
        scale, bias = _affine_params(self, channels, self.param_dtype)
        xf = x.astype(jnp.float32)
        grouped = xf.reshape(x.shape[0], -1, self.num_groups, channels // self.num_groups)
        mean = jnp.mean(grouped, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=(1, 3), keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis."""

    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale, bias = _affine_params(self, x.shape[-1], self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        normed = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)
