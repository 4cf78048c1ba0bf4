"""Stable Diffusion VAE (diffusers ``AutoencoderKL``) in flax.linen, NHWC.

``encode(x)`` -> ``DiagonalGaussian`` over latents, ``decode(z)`` -> image.  Latents are *not*
scaled here: the caller multiplies by ``scaling_factor`` (after subtracting ``shift_factor`` where
the config has one), as diffusers pipelines do.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from mema_jax.core.sharding import constrain
from mema_jax.models.diffusers_config import check_class_and_options, frozen_items, thawed
from mema_jax.models.layers.attention import SpatialSelfAttention, check_attention_impl
from mema_jax.models.layers.linear import conv2d
from mema_jax.models.layers.norm import GroupNorm
from mema_jax.models.layers.axes import IMAGE_AXES
from mema_jax.models.layers.resnet_block import Downsample2D, ResnetBlock2D, Upsample2D
from mema_jax.models.layers.remat import remat_block

_VAE_EPS = 1e-6  # diffusers' Encoder/Decoder fix every GroupNorm epsilon to 1e-6
_IGNORED_OPTIONS = ("sample_size", "latents_mean", "latents_std", "force_upcast")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    raw: tuple = ()  # the original config items, written back by save_vae

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "VAEConfig":
        config = dict(config)
        known = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        check_class_and_options(config, what="VAE config", class_name="AutoencoderKL",
                                known=known | {"down_block_types", "up_block_types", "act_fn", *_IGNORED_OPTIONS})
        channels = tuple(int(c) for c in config.get("block_out_channels", cls.block_out_channels))
        down = tuple(config.get("down_block_types", ("DownEncoderBlock2D",) * len(channels)))
        up = tuple(config.get("up_block_types", ("UpDecoderBlock2D",) * len(channels)))
        unsupported = {}
        if any(t != "DownEncoderBlock2D" for t in down) or len(down) != len(channels):
            unsupported["down_block_types"] = down
        if any(t != "UpDecoderBlock2D" for t in up) or len(up) != len(channels):
            unsupported["up_block_types"] = up
        if config.get("act_fn", "silu") != "silu":
            unsupported["act_fn"] = config["act_fn"]
        if unsupported:
            raise ValueError(
                f"VAE config: unsupported option values {unsupported} (one DownEncoderBlock2D/UpDecoderBlock2D per "
                "entry of block_out_channels, act_fn 'silu')"
            )
        return cls(
            in_channels=int(config.get("in_channels", 3)),
            out_channels=int(config.get("out_channels", 3)),
            block_out_channels=channels,
            layers_per_block=int(config.get("layers_per_block", 1)),
            latent_channels=int(config.get("latent_channels", 4)),
            norm_num_groups=int(config.get("norm_num_groups", 32)),
            scaling_factor=float(config.get("scaling_factor", 0.18215)),
            shift_factor=config.get("shift_factor"),
            use_quant_conv=bool(config.get("use_quant_conv", True)),
            use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
            raw=frozen_items(config),
        )

    def to_dict(self) -> dict[str, Any]:
        if self.raw:
            out = thawed(self.raw)
        else:
            n = len(self.block_out_channels)
            out = {
                "in_channels": self.in_channels, "out_channels": self.out_channels,
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
                "act_fn": "silu", "latent_channels": self.latent_channels, "norm_num_groups": self.norm_num_groups,
                "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "use_quant_conv": self.use_quant_conv, "use_post_quant_conv": self.use_post_quant_conv,
                "mid_block_add_attention": self.mid_block_add_attention,
            }
        out["_class_name"] = "AutoencoderKL"
        return out


@struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element (NHWC); a pytree."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments):
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        return jnp.exp(self.logvar)

    def sample(self, rng):
        noise = jax.random.normal(rng, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean

    def kl(self):
        """KL to the standard normal, summed per sample."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


def _resnet(channels: int, num_groups: int, remat: str, name: str, **kw):
    """A ResnetBlock2D without time input at the VAE's epsilon, as a function of x."""
    block = remat_block(ResnetBlock2D, remat, static_argnums=(3,))(channels, num_groups, _VAE_EPS, name=name, **kw)
    return lambda x: block(x, None, True)


class VAEMidBlock(nn.Module):
    """resnet, (self-attention), resnet: diffusers ``UNetMidBlock2D`` without a time embedding."""

    channels: int
    num_groups: int
    add_attention: bool
    attention_impl: str
    remat: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _resnet(self.channels, self.num_groups, self.remat, "resnets_0", **kw)(x)
        if self.add_attention:
            x = SpatialSelfAttention(self.num_groups, _VAE_EPS, self.attention_impl, name="attentions_0", **kw)(x)
        return _resnet(self.channels, self.num_groups, self.remat, "resnets_1", **kw)(x)


class VAEBlock(nn.Module):
    """Resnets, then ``resample``: "down" (DownEncoderBlock2D's asymmetric-padding stride-2 conv),
    "up" (UpDecoderBlock2D's nearest x2 + conv) or None (the last block of either)."""

    channels: int
    num_layers: int
    num_groups: int
    resample: str | None
    remat: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = _resnet(self.channels, self.num_groups, self.remat, f"resnets_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample2D(self.channels, padding=0, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample2D(self.channels, name="upsamplers_0", **kw)(x)
        return x


class _Coder(nn.Module):
    """What the encoder and the decoder share: their options, the mid block and the output head."""

    config: VAEConfig
    attention_impl: str = "xla"
    remat: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def kw(self):
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def mid_block(self, x):
        c = self.config
        return VAEMidBlock(c.block_out_channels[-1], c.norm_num_groups, c.mid_block_add_attention, self.attention_impl,
                           self.remat, name="mid_block", **self.kw)(x)

    def block(self, x, i: int, channels: int, num_layers: int, resample: str):
        """Block ``i`` of the stack; the last one does not resample."""
        last = i == len(self.config.block_out_channels) - 1
        return VAEBlock(channels, num_layers, self.config.norm_num_groups, None if last else resample, self.remat,
                        name=f"{resample}_blocks_{i}", **self.kw)(x)

    def output(self, x, features: int):
        x = nn.silu(GroupNorm(self.config.norm_num_groups, _VAE_EPS, name="conv_norm_out", **self.kw)(x))
        return conv2d(features, name="conv_out", **self.kw)(x)


class Encoder(_Coder):
    @nn.compact
    def __call__(self, x):
        c = self.config
        x = conv2d(c.block_out_channels[0], name="conv_in", **self.kw)(x)
        for i, channels in enumerate(c.block_out_channels):
            x = self.block(x, i, channels, c.layers_per_block, "down")
        return self.output(self.mid_block(x), 2 * c.latent_channels)


class Decoder(_Coder):
    @nn.compact
    def __call__(self, z):
        c = self.config
        x = self.mid_block(conv2d(c.block_out_channels[-1], name="conv_in", **self.kw)(z))
        for i, channels in enumerate(reversed(c.block_out_channels)):
            x = self.block(x, i, channels, c.layers_per_block + 1, "up")
        return self.output(x, c.out_channels)


class AutoencoderKL(nn.Module):
    """``encode(x (B, H, W, 3) in [-1, 1])`` -> DiagonalGaussian over (B, H/f, W/f, latent_channels);
    ``decode(z)`` -> (B, H, W, 3); ``__call__`` = decode(posterior mode, or a sample given ``rng``)."""

    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "xla"
    remat: str = "none"

    def setup(self):
        c = self.config
        check_attention_impl(self.attention_impl)
        kw = dict(attention_impl=self.attention_impl, remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(c, **kw)
        self.decoder = Decoder(c, **kw)
        ckw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if c.use_quant_conv:
            self.quant_conv = conv2d(2 * c.latent_channels, 1, padding=0, **ckw)
        if c.use_post_quant_conv:
            self.post_quant_conv = conv2d(c.latent_channels, 1, padding=0, **ckw)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float | None:
        return self.config.shift_factor

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x) -> DiagonalGaussian:
        moments = self.encoder(constrain(x.astype(self.dtype), IMAGE_AXES))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z):
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x, rng=None):
        posterior = self.encode(x)
        return self.decode(posterior.mode() if rng is None else posterior.sample(rng))


def init_params(module: AutoencoderKL, rng, *, image_size: int | None = None):
    """Random (boxed) parameters; ``jax.eval_shape`` of this gives the abstract tree for loading."""
    size = image_size or 2 ** len(module.config.block_out_channels)
    x = jnp.zeros((1, size, size, module.config.in_channels), module.dtype)
    return module.init(rng, x)["params"]
