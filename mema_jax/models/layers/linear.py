"""Dense and convolution layers with logical axis names on their parameters.

They are plain flax ``nn.Dense`` / ``nn.Conv`` (so a parameter sits at ``<name>/kernel`` and
``<name>/bias``); only the initializers are wrapped to carry the names the sharding rules use, and
the convolutions are lowered per ``conv_impl`` (``mema_jax.models.layers.conv``: im2col + matmul
on CPU for small maps, ``lax.conv_general_dilated`` otherwise).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from mema_jax.models.layers.conv import Conv

CONV_KERNEL_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


def dense(
    features: int,
    axes: tuple[str, str],
    *,
    use_bias: bool = True,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    name: str | None = None,
) -> nn.Dense:
    """A Dense layer whose kernel has logical names ``axes`` (in, out) and bias ``(axes[1],)``."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


def conv2d(
    features: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    padding: int | tuple[tuple[int, int], tuple[int, int]] = 1,
    use_bias: bool = True,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    conv_impl: str | None = None,
    upsample: int = 1,
    name: str | None = None,
) -> nn.Conv:
    """A 2-D NHWC convolution with torch-style symmetric integer padding (or explicit (lo, hi) pairs
    per spatial axis).  ``conv_impl``: how it is lowered ("auto" / "xla" / "im2col"; None: the
    module-wide default, see ``mema_jax.models.layers.conv.set_default_conv_impl``).  ``upsample=2``:
    of the input upsampled x2 nearest first (folded into the convolution where that pays)."""
    return Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)) if isinstance(padding, int) else padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_KERNEL_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        conv_impl=conv_impl,
        upsample=upsample,
        name=name,
    )
