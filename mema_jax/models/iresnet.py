"""ArcFace's backbone: arcface_torch's IResNet (iresnet18/34/50/100) in Flax linen.

The same network as insightface's ``recognition/arcface_torch/backbones/iresnet.py``:

  stem     conv3x3(3 -> 64) - BN - PReLU                                   (112 x 112)
  layer1-4 IBasicBlocks, the first of each stage with stride 2 and a 1x1-conv + BN shortcut;
           block = BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the shortcut
  head     BN2d - flatten (in torch's channel-major order) - dropout - fc(512 * 7 * 7 -> 512)
           - BatchNorm1d ``features`` (its weight fixed at 1.0 and not trained in arcface_torch)

Input: (B, 112, 112, 3) NHWC RGB in [-1, 1] ((x - 127.5) / 127.5, as arcface_torch); output: the
``features`` vector (B, num_features), not normalised.  ``width`` scales every channel count
(1.0 = arcface_torch's 64/128/256/512; a small model for CPU training uses 0.25).

BatchNorm keeps running statistics in the ``batch_stats`` collection: ``train=True`` normalises
with batch statistics and updates them (apply with ``mutable=["batch_stats"]``), as torch does
(momentum 0.1, unbiased variance in the running estimate); ``train=False`` uses them.
Parameters carry logical axis names (conv kernels ``CONV_KERNEL_AXES``, the fc ``(embed, mlp)``,
per-channel vectors ``norm``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mema_jax.core.sharding import constrain
from mema_jax.models.layers.axes import IMAGE_AXES
from mema_jax.models.layers.linear import conv2d, dense
from mema_jax.models.layers.remat import remat_block

LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)  # at width 1.0
INPUT_SIZE = 112
FINAL_MAP = 7  # 112 halved four times


@dataclasses.dataclass(frozen=True)
class IResNetConfig:
    depth: str = "r50"
    width: float = 1.0  # channel multiplier; stage widths are round(64 * width) * (1, 2, 4, 8)
    num_features: int = 512
    dropout: float = 0.0

    def __post_init__(self):
        if self.depth not in LAYERS:
            raise ValueError(f"unknown iresnet depth {self.depth!r}; expected one of {list(LAYERS)}")
        if self.base_channels < 1:
            raise ValueError(f"width {self.width} leaves no channels")

    @property
    def base_channels(self) -> int:
        return int(round(STAGE_WIDTHS[0] * self.width))

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * (w // STAGE_WIDTHS[0]) for w in STAGE_WIDTHS)


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm1d/2d over the last axis, in float32.

    Training: batch mean and biased variance normalise; the running estimates move by
    ``momentum`` towards the batch mean and the *unbiased* batch variance (torch's rule).
    Evaluation: the running estimates normalise.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        channels = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (channels,),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (channels,),
                          self.param_dtype)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        xf = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            if not self.is_initializing():
                n = xf.size // channels
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean
                running_var.value = (1 - m) * running_var.value + m * var * (n / max(n - 1, 1))
        else:
            mean, var = running_mean.value, running_var.value
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class PReLU(nn.Module):
    """torch.nn.PReLU(channels): one negative slope per channel (last axis), initialised 0.25."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        alpha = self.param("alpha", nn.with_logical_partitioning(nn.initializers.constant(0.25), ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        return jnp.where(x >= 0, x, alpha.astype(x.dtype) * x)


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the input (1x1 conv + BN when strided)."""

    channels: int
    stride: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out = BatchNorm(name="bn1", **kw)(x, train)
        out = conv2d(self.channels, 3, use_bias=False, name="conv1", **kw)(out)
        out = PReLU(param_dtype=self.param_dtype, name="prelu")(BatchNorm(name="bn2", **kw)(out, train))
        out = conv2d(self.channels, 3, stride=self.stride, use_bias=False, name="conv2", **kw)(out)
        out = BatchNorm(name="bn3", **kw)(out, train)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.channels:
            shortcut = conv2d(self.channels, 1, stride=self.stride, padding=0, use_bias=False,
                              name="downsample_conv", **kw)(x)
            shortcut = BatchNorm(name="downsample_bn", **kw)(shortcut, train)
        return out + shortcut


class IResNet(nn.Module):
    """Images (B, 112, 112, 3) in [-1, 1] -> ``features`` (B, num_features), float32."""

    config: IResNetConfig = IResNetConfig()
    remat: str = "none"  # mema_jax.models.layers.remat.REMAT_POLICIES, per block
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        c = self.config
        if images.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"IResNet expects (B, {INPUT_SIZE}, {INPUT_SIZE}, 3) images, got {images.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = images.astype(self.dtype)
        x = conv2d(c.base_channels, 3, use_bias=False, name="conv1", **kw)(x)
        x = PReLU(param_dtype=self.param_dtype, name="prelu")(BatchNorm(name="bn1", **kw)(x, train))
        block = remat_block(IBasicBlock, self.remat, static_argnums=(2,))  # ``train`` is a Python bool
        for stage, (blocks, channels) in enumerate(zip(LAYERS[c.depth], c.stage_channels), start=1):
            for b in range(blocks):
                x = block(channels, 2 if b == 0 else 1, name=f"layer{stage}_{b}", **kw)(x, train)
                x = constrain(x, IMAGE_AXES)
        x = BatchNorm(name="bn2", **kw)(x, train)
        # torch.flatten on NCHW: channel-major, so the fc kernel is torch's weight transposed as is.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = nn.Dropout(c.dropout, deterministic=not train or c.dropout == 0.0)(x)
        x = dense(c.num_features, ("embed", "mlp"), name="fc", **kw)(x)
        return BatchNorm(name="features", **kw)(x, train).astype(jnp.float32)


def init_variables(model: IResNet, rng: jax.Array) -> dict:
    """``{"params": ..., "batch_stats": ...}`` (params boxed with their logical names)."""
    return model.init(rng, jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32), train=False)


# arcface_torch fixes ``features.weight`` at 1.0 (requires_grad=False): trainers keep it out of the optimizer.
FIXED_PARAMS = ("features/scale",)
