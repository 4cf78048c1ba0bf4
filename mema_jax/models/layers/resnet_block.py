"""ResNet block and the 2x down/up-sampling layers of the SD UNet and VAE (NHWC)."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mema_jax.core.sharding import constrain
from mema_jax.models.layers.axes import IMAGE_AXES
from mema_jax.models.layers.conv import upsample2x_nearest
from mema_jax.models.layers.linear import conv2d, dense
from mema_jax.models.layers.norm import GroupNorm


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding projection, GroupNorm-SiLU-dropout-conv, + shortcut
    (1x1 conv when the channel count changes), / output_scale_factor.  ``temb`` None: no time input."""

    out_channels: int
    num_groups: int = 32
    epsilon: float = 1e-5
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm(self.num_groups, self.epsilon, name="norm1", **kw)(x))
        h = conv2d(self.out_channels, name="conv1", **kw)(h)
        if temb is not None:
            t = dense(self.out_channels, ("embed", "conv_out"), name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(GroupNorm(self.num_groups, self.epsilon, name="norm2", **kw)(h))
        if self.dropout:
            h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv2d(self.out_channels, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv2d(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
        out = (x + h) / self.output_scale_factor if self.output_scale_factor != 1.0 else x + h
        return constrain(out, IMAGE_AXES)


class Downsample2D(nn.Module):
    """3x3 conv with stride 2.  ``padding=1`` pads both sides (UNet); ``padding=0`` pads only the
    bottom/right by one (the VAE encoder's asymmetric padding)."""

    out_channels: int
    padding: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        # The VAE's bottom/right pad goes to the convolution itself (no padded copy of the map).
        padding = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        x = conv2d(self.out_channels, 3, stride=2, padding=padding, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return constrain(x, IMAGE_AXES)


def upsample_nearest(x, size: tuple[int, int]):
    """torch ``F.interpolate(mode="nearest")`` to ``size`` on NHWC."""
    height, width = x.shape[1], x.shape[2]
    if size == (2 * height, 2 * width):
        return upsample2x_nearest(x)
    return x[:, _nearest_index(height, size[0])][:, :, _nearest_index(width, size[1])]


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    scale = np.float32(in_size) / np.float32(out_size)  # float32, as torch computes it
    return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)


class Upsample2D(nn.Module):
    """Nearest-neighbour resize (x2, or to ``size``) then a 3x3 conv."""

    out_channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, size: tuple[int, int] | None = None):
        size = (2 * x.shape[1], 2 * x.shape[2]) if size is None else tuple(size)
        doubling = size == (2 * x.shape[1], 2 * x.shape[2])
        if not doubling:
            x = upsample_nearest(x, size)
        # x2: the convolution takes the map before the upsample (folded into it where that pays).
        x = conv2d(self.out_channels, upsample=2 if doubling else 1, name="conv", dtype=self.dtype,
                   param_dtype=self.param_dtype)(x)
        return constrain(x, IMAGE_AXES)
