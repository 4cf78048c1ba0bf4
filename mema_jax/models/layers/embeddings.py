"""Sinusoidal timestep embedding and its MLP (diffusers ``Timesteps`` + ``TimestepEmbedding``)."""
from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mema_jax.models.layers.linear import dense


def timestep_embedding(timesteps, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
    """(B,) timesteps -> (B, dim) float32 [sin, cos] (or [cos, sin]) features.

    The frequency table is computed in float32 like torch's, except for the ``exp``, which is done
    in float64 and rounded: torch's float32 ``exp`` is within one ulp of that (it agrees on all
    but ~2% of entries), while XLA's differs more often, and timesteps up to 1000 multiply it, so
    each ulp shows as ~1e-4 in the phase.
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - freq_shift)
    freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(self.features, ("embed", "mlp"), name="linear_1", **kw)(x)
        return dense(self.features, ("mlp", "embed"), name="linear_2", **kw)(nn.silu(x))
