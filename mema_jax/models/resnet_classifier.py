"""A small ResNet image classifier (GroupNorm, no batch statistics), with logical axis names.

Used by the MeMa disease/severity classifier trainer, the quickstart model, and as a supervised
medical-encoder baseline (the paper's Tab. 10 compares supervised encoders).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from mema_jax.core.sharding import constrain
from mema_jax.models.layers.axes import IMAGE_AXES
from mema_jax.models.layers.linear import CONV_KERNEL_AXES
from mema_jax.models.layers.remat import remat_block


def conv(features: int, kernel: int, stride: int, dtype, param_dtype, name: str | None = None) -> nn.Conv:
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=kernel // 2, use_bias=False, dtype=dtype,
        param_dtype=param_dtype, kernel_init=nn.with_logical_partitioning(nn.initializers.he_normal(), CONV_KERNEL_AXES),
        name=name,
    )


def group_norm(groups: int, dtype, param_dtype, name: str | None = None) -> nn.GroupNorm:
    return nn.GroupNorm(
        num_groups=groups, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
    )


class ResidualBlock(nn.Module):
    features: int
    stride: int = 1
    groups: int = 8
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        residual = x
        y = conv(self.features, 3, self.stride, self.dtype, self.param_dtype)(x)
        y = nn.silu(group_norm(self.groups, self.dtype, self.param_dtype)(y))
        y = conv(self.features, 3, 1, self.dtype, self.param_dtype)(y)
        y = group_norm(self.groups, self.dtype, self.param_dtype)(y)
        if residual.shape != y.shape:
            residual = conv(self.features, 1, self.stride, self.dtype, self.param_dtype, name="shortcut")(residual)
        return nn.silu(y + residual)


class ResNetClassifier(nn.Module):
    """Images (N, H, W, 3) in [-1, 1] -> logits for each head, e.g. {"disease": 8, "severity": 3}."""

    widths: Sequence[int] = (32, 64, 128)
    blocks_per_stage: int = 1
    heads: tuple[tuple[str, int], ...] = (("disease", 8),)
    groups: int = 8
    remat: str = "none"  # mema_jax.models.layers.remat.REMAT_POLICIES
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, *, return_features: bool = False):
        x = images.astype(self.dtype)
        x = conv(self.widths[0], 3, 1, self.dtype, self.param_dtype, name="stem")(x)
        block_cls = remat_block(ResidualBlock, self.remat)
        for stage, width in enumerate(self.widths):
            for b in range(self.blocks_per_stage):
                stride = 2 if (b == 0 and stage > 0) else 1
                x = block_cls(width, stride, self.groups, self.dtype, self.param_dtype, name=f"stage{stage}_block{b}")(x)
                x = constrain(x, IMAGE_AXES)
        features = jnp.mean(x, axis=(1, 2))
        logits = {}
        for name, n in self.heads:
            logits[name] = nn.Dense(
                n, dtype=self.dtype, param_dtype=self.param_dtype, name=f"head_{name}",
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
            )(features).astype(jnp.float32)
        return (logits, features) if return_features else logits
