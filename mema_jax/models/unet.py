"""Stable Diffusion 1.x/2.x conditional UNet (diffusers ``UNet2DConditionModel``) in flax.linen, NHWC.

Built from a diffusers ``config.json`` dict (``UNetConfig.from_dict``); the same code builds the
SD1.5 UNet and the tiny test configs.  Options not used by SD1.x/SD2.x configs are rejected with
an error naming them rather than silently ignored.  ``upcast_attention`` (True in SD2.x) asks for
float32 attention logits and softmax, which every attention here computes, whatever the setting.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
from flax import linen as nn

from mema_jax.core.sharding import constrain
from mema_jax.models.diffusers_config import check_class_and_options, frozen_items, thawed
from mema_jax.models.layers.attention import CrossAttentionContext, check_attention_impl
from mema_jax.models.layers.axes import IMAGE_AXES, TOKEN_AXES
from mema_jax.models.layers.embeddings import TimestepEmbedding, timestep_embedding
from mema_jax.models.layers.linear import conv2d
from mema_jax.models.layers import remat as layers_remat
from mema_jax.models.layers.norm import GroupNorm
from mema_jax.models.layers.remat import REMAT_POLICIES  # noqa: F401  (the UNet's accepted policies)
from mema_jax.models.layers.resnet_block import Downsample2D, ResnetBlock2D, Upsample2D
from mema_jax.models.layers.transformer import Transformer2D

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# Options SD1.x/SD2.x configs leave at these values; anything else is not implemented here.
_FIXED_OPTIONS = {
    "act_fn": "silu",
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}
# Accepted and without effect on the network.
_IGNORED_OPTIONS = ("sample_size", "addition_embed_type_num_heads")


def _per_block(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet config: {name} has {len(value)} entries for {n} down blocks")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The supported subset of diffusers' UNet2DConditionModel config, per-block values expanded."""

    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: tuple[int, ...] = (768,) * 4
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # diffusers: num_attention_heads or attention_head_dim
    use_linear_projection: bool = False
    # diffusers: q.k and softmax in float32.  Our attention always does that (layers.attention), so
    # True holds by construction and False keeps float32 too (as diffusers' default SDPA processor).
    upcast_attention: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    sample_size: Any = None
    raw: tuple = ()  # the original config items, written back by save_unet

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "UNetConfig":
        config = dict(config)
        known = {f.name for f in dataclasses.fields(cls)} - {"num_heads", "raw"}
        known |= {"attention_head_dim", "num_attention_heads", "only_cross_attention", "mid_block_only_cross_attention"}
        check_class_and_options(config, what="UNet config", class_name="UNet2DConditionModel",
                                known=known | set(_FIXED_OPTIONS) | set(_IGNORED_OPTIONS))
        unsupported = {k: config[k] for k, v in _FIXED_OPTIONS.items() if k in config and config[k] != v}
        for key in ("only_cross_attention", "mid_block_only_cross_attention"):
            value = config.get(key)
            if value not in (None, False) and not (isinstance(value, (list, tuple)) and not any(value)):
                unsupported[key] = value
        if config.get("norm_num_groups", 32) is None:
            unsupported["norm_num_groups"] = None
        if unsupported:
            raise ValueError(f"UNet config: unsupported option values {unsupported} (supported: {_FIXED_OPTIONS})")

        down = tuple(config.get("down_block_types", cls.down_block_types))
        up = tuple(config.get("up_block_types", cls.up_block_types))
        mid = config.get("mid_block_type", cls.mid_block_type)
        bad = [t for t in down if t not in DOWN_BLOCK_TYPES] + [t for t in up if t not in UP_BLOCK_TYPES]
        if mid not in MID_BLOCK_TYPES:
            bad.append(mid)
        if bad:
            raise ValueError(f"UNet config: unsupported block types {bad}; supported {DOWN_BLOCK_TYPES + UP_BLOCK_TYPES + MID_BLOCK_TYPES}")
        channels = tuple(int(c) for c in config.get("block_out_channels", cls.block_out_channels))
        n = len(channels)
        if len(down) != n or len(up) != n:
            raise ValueError(f"UNet config: {len(down)} down and {len(up)} up block types for {n} block_out_channels")
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        num_heads = tuple(int(h) for h in _per_block(heads, n, "attention heads"))
        for c, h, t in zip(channels, num_heads, down):
            if t.startswith("CrossAttn") and c % h:
                raise ValueError(f"UNet config: {c} channels are not divisible into {h} attention heads")
        layers = config.get("transformer_layers_per_block", 1)
        if isinstance(layers, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in layers):
            raise ValueError("UNet config: per-layer transformer_layers_per_block (nested lists) is not supported")
        return cls(
            in_channels=int(config.get("in_channels", 4)),
            out_channels=int(config.get("out_channels", 4)),
            center_input_sample=bool(config.get("center_input_sample", False)),
            flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
            freq_shift=config.get("freq_shift", 0),
            down_block_types=down,
            mid_block_type=mid,
            up_block_types=up,
            block_out_channels=channels,
            layers_per_block=tuple(int(v) for v in _per_block(config.get("layers_per_block", 2), n, "layers_per_block")),
            downsample_padding=int(config.get("downsample_padding", 1)),
            mid_block_scale_factor=float(config.get("mid_block_scale_factor", 1.0)),
            dropout=float(config.get("dropout", 0.0)),
            norm_num_groups=int(config.get("norm_num_groups", 32)),
            norm_eps=float(config.get("norm_eps", 1e-5)),
            cross_attention_dim=tuple(int(v) for v in _per_block(config.get("cross_attention_dim", 1280), n, "cross_attention_dim")),
            transformer_layers_per_block=tuple(int(v) for v in _per_block(layers, n, "transformer_layers_per_block")),
            num_heads=num_heads,
            use_linear_projection=bool(config.get("use_linear_projection", False)),
            upcast_attention=bool(config.get("upcast_attention", False)),
            resnet_out_scale_factor=float(config.get("resnet_out_scale_factor", 1.0)),
            time_embedding_dim=config.get("time_embedding_dim"),
            conv_in_kernel=int(config.get("conv_in_kernel", 3)),
            conv_out_kernel=int(config.get("conv_out_kernel", 3)),
            sample_size=config.get("sample_size"),
            raw=frozen_items(config),
        )

    def to_dict(self) -> dict[str, Any]:
        """A diffusers config.json dict (the loaded one, or one built from these fields)."""
        if self.raw:
            out = thawed(self.raw)
        else:
            out = {
                "in_channels": self.in_channels, "out_channels": self.out_channels,
                "center_input_sample": self.center_input_sample, "flip_sin_to_cos": self.flip_sin_to_cos,
                "freq_shift": self.freq_shift, "down_block_types": list(self.down_block_types),
                "mid_block_type": self.mid_block_type, "up_block_types": list(self.up_block_types),
                "block_out_channels": list(self.block_out_channels), "layers_per_block": list(self.layers_per_block),
                "downsample_padding": self.downsample_padding, "mid_block_scale_factor": self.mid_block_scale_factor,
                "dropout": self.dropout, "norm_num_groups": self.norm_num_groups, "norm_eps": self.norm_eps,
                "cross_attention_dim": list(self.cross_attention_dim),
                "transformer_layers_per_block": list(self.transformer_layers_per_block),
                "attention_head_dim": list(self.num_heads), "use_linear_projection": self.use_linear_projection,
                "upcast_attention": self.upcast_attention, "resnet_out_scale_factor": self.resnet_out_scale_factor,
                "time_embedding_dim": self.time_embedding_dim, "conv_in_kernel": self.conv_in_kernel,
                "conv_out_kernel": self.conv_out_kernel, "sample_size": self.sample_size,
            }
        out["_class_name"] = "UNet2DConditionModel"
        return out

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4


def remat_block(cls, policy: str):
    """The block class itself, or wrapped in nn.remat (``deterministic`` is positional arg 3)."""
    return layers_remat.remat_block(cls, policy, static_argnums=(3,))


@dataclasses.dataclass(frozen=True)
class _BlockOptions:
    norm_num_groups: int
    norm_eps: float
    dropout: float
    attention_impl: str
    remat: str
    dtype: Any
    param_dtype: Any
    ip_adapter: bool = False

    @property
    def kw(self):
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def resnet(self, out_channels, name, output_scale_factor=1.0):
        block = remat_block(ResnetBlock2D, self.remat)
        return block(out_channels, self.norm_num_groups, self.norm_eps, self.dropout, output_scale_factor, name=name, **self.kw)

    def transformer(self, channels, heads, num_layers, name):
        block = remat_block(Transformer2D, self.remat)
        return block(heads, channels // heads, num_layers, self.norm_num_groups, self.dropout, self.attention_impl,
                     self.ip_adapter, name=name, **self.kw)


class _UNetLevelBlock(nn.Module):
    """What a down and an up block share: N resnets, each followed by a transformer when
    ``has_attention`` (the CrossAttn* block types)."""

    out_channels: int
    num_layers: int
    has_attention: bool
    heads: int
    transformer_layers: int
    resnet_scale: float
    options: _BlockOptions

    def setup(self):
        o = self.options
        self.resnets = [o.resnet(self.out_channels, f"resnets_{i}", self.resnet_scale) for i in range(self.num_layers)]
        if self.has_attention:
            self.attentions = [o.transformer(self.out_channels, self.heads, self.transformer_layers, f"attentions_{i}")
                               for i in range(self.num_layers)]

    def layer(self, i, x, temb, context, deterministic):
        x = self.resnets[i](x, temb, deterministic)
        return self.attentions[i](x, context, deterministic) if self.has_attention else x


class UNetDownBlock(_UNetLevelBlock):
    """CrossAttnDownBlock2D (``has_attention``) or DownBlock2D: [resnet, (transformer)] x N, downsample."""

    add_downsample: bool
    downsample_padding: int

    def setup(self):
        super().setup()
        if self.add_downsample:
            self.downsamplers_0 = Downsample2D(self.out_channels, self.downsample_padding, **self.options.kw)

    def __call__(self, x, temb, context, deterministic):
        states = []
        for i in range(self.num_layers):
            x = self.layer(i, x, temb, context, deterministic)
            states.append(x)
        if self.add_downsample:
            x = self.downsamplers_0(x)
            states.append(x)
        return x, states


class UNetMidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, [transformer, resnet] x transformer blocks."""

    channels: int
    heads: int
    transformer_layers: int
    output_scale_factor: float
    options: _BlockOptions

    def setup(self):
        o = self.options
        self.resnets = [o.resnet(self.channels, f"resnets_{i}", self.output_scale_factor) for i in range(2)]
        self.attentions = [o.transformer(self.channels, self.heads, self.transformer_layers, "attentions_0")]

    def __call__(self, x, temb, context, deterministic):
        x = self.resnets[0](x, temb, deterministic)
        x = self.attentions[0](x, context, deterministic)
        return self.resnets[1](x, temb, deterministic)


class UNetUpBlock(_UNetLevelBlock):
    """CrossAttnUpBlock2D or UpBlock2D: [concat skip, resnet, (transformer)] x N, upsample."""

    add_upsample: bool

    def setup(self):
        super().setup()
        if self.add_upsample:
            self.upsamplers_0 = Upsample2D(self.out_channels, **self.options.kw)

    def __call__(self, x, skips, temb, context, deterministic, upsample_size=None):
        for i in range(self.num_layers):
            x = self.layer(i, jnp.concatenate([x, skips[-1 - i]], axis=-1), temb, context, deterministic)
        if self.add_upsample:
            x = self.upsamplers_0(x, upsample_size)
        return x


class UNet2DConditionModel(nn.Module):
    """``__call__(sample (B, H, W, C), timesteps (B,) or scalar, encoder_hidden_states (B, L, D))``
    -> (B, H, W, out_channels).  ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype;
    ``remat`` in {"none", "full", "dots"} checkpoints each resnet/transformer block;
    ``attention_impl`` in {"xla", "dot_product"}.

    ``ip_adapter=True`` adds IP-Adapter's ``to_k_ip`` / ``to_v_ip`` to every cross-attention: the
    parameter tree is then the base tree plus those layers (``mema_jax.models.ip_adapter`` keeps
    them as a tree of their own), and ``__call__`` takes ``ip_tokens`` (B, N, cross_attention_dim)
    with ``ip_scale`` (scalar or (B,)).  Without ``ip_tokens`` it is the plain UNet."""

    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "xla"
    remat: str = "none"
    ip_adapter: bool = False

    def setup(self):
        c = self.config
        check_attention_impl(self.attention_impl)
        o = _BlockOptions(c.norm_num_groups, c.norm_eps, c.dropout, self.attention_impl, self.remat, self.dtype,
                          self.param_dtype, self.ip_adapter)
        kw = o.kw
        n = len(c.block_out_channels)
        self.conv_in = conv2d(c.block_out_channels[0], c.conv_in_kernel, padding=(c.conv_in_kernel - 1) // 2, **kw)
        self.time_embedding = TimestepEmbedding(c.time_embed_dim, **kw)

        def level(index: int, block_type: str, extra_layers: int) -> dict:
            """The arguments of a down or up block at resolution level ``index``."""
            return dict(out_channels=c.block_out_channels[index], num_layers=c.layers_per_block[index] + extra_layers,
                        has_attention=block_type.startswith("CrossAttn"), heads=c.num_heads[index],
                        transformer_layers=c.transformer_layers_per_block[index],
                        resnet_scale=c.resnet_out_scale_factor, options=o)

        self.down_blocks = [
            UNetDownBlock(**level(i, c.down_block_types[i], 0), add_downsample=i < n - 1,
                          downsample_padding=c.downsample_padding, name=f"down_blocks_{i}")
            for i in range(n)
        ]
        if c.mid_block_type is not None:
            self.mid_block = UNetMidBlock(
                c.block_out_channels[-1], c.num_heads[-1], c.transformer_layers_per_block[-1], c.mid_block_scale_factor, o
            )
        # Up block i mirrors level n-1-i with one resnet more: it also takes the skip of that level's
        # downsampler (or of conv_in).
        self.up_blocks = [
            UNetUpBlock(**level(n - 1 - i, c.up_block_types[i], 1), add_upsample=i < n - 1, name=f"up_blocks_{i}")
            for i in range(n)
        ]
        self.conv_norm_out = GroupNorm(c.norm_num_groups, c.norm_eps, **kw)
        self.conv_out = conv2d(c.out_channels, c.conv_out_kernel, padding=(c.conv_out_kernel - 1) // 2, **kw)

    def _embed_inputs(self, sample, timesteps, encoder_hidden_states, ip_tokens=None, ip_scale=1.0):
        c = self.config
        sample = sample.astype(self.dtype)
        if c.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (sample.shape[0],))
        t_emb = timestep_embedding(
            timesteps, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift
        )
        temb = self.time_embedding(t_emb.astype(self.dtype))
        context = None
        if encoder_hidden_states is not None:
            context = constrain(encoder_hidden_states.astype(self.dtype), TOKEN_AXES)
        if ip_tokens is not None:
            if not self.ip_adapter:
                raise ValueError("ip_tokens given, but this UNet was built without ip_adapter=True")
            ip_tokens = constrain(ip_tokens.astype(self.dtype), TOKEN_AXES)
            context = CrossAttentionContext(context, ip_tokens, jnp.asarray(ip_scale, jnp.float32))
        x = constrain(self.conv_in(sample), IMAGE_AXES)
        return x, temb, context

    def __call__(self, sample, timesteps, encoder_hidden_states, *, train: bool = False, added_cond_kwargs=None,
                 ip_tokens=None, ip_scale=1.0):
        if added_cond_kwargs:
            raise ValueError(
                f"added_cond_kwargs {sorted(added_cond_kwargs)} given, but this UNet has no addition embedding "
                "(addition_embed_type is None)"
            )
        deterministic = not train
        x, temb, context = self._embed_inputs(sample, timesteps, encoder_hidden_states, ip_tokens, ip_scale)
        skips = [x]
        for block in self.down_blocks:
            x, states = block(x, temb, context, deterministic)
            skips.extend(states)
        if self.config.mid_block_type is not None:
            x = self.mid_block(x, temb, context, deterministic)
        for block in self.up_blocks:
            block_skips = skips[-block.num_layers:]
            skips = skips[: -block.num_layers]
            # Upsample to the next skip's size so odd spatial sizes work (diffusers' upsample_size).
            size = tuple(skips[-1].shape[1:3]) if block.add_upsample else None
            x = block(x, block_skips, temb, context, deterministic, size)
        x = nn.silu(self.conv_norm_out(x))
        return self.conv_out(x)

    def encode_features(self, sample, timesteps, encoder_hidden_states, *, num_down_blocks: int, train: bool = False):
        """conv_in and the first ``num_down_blocks`` down blocks only (same parameter tree):
        the features after the last of them, e.g. 320 channels at latent/2 for SD1.5 and N=1."""
        if not 1 <= num_down_blocks <= len(self.down_blocks):
            raise ValueError(f"num_down_blocks must be in [1, {len(self.down_blocks)}], got {num_down_blocks}")
        x, temb, context = self._embed_inputs(sample, timesteps, encoder_hidden_states)
        for block in self.down_blocks[:num_down_blocks]:
            x, _ = block(x, temb, context, not train)
        return x


def init_params(module: UNet2DConditionModel, rng, *, sample_shape: Sequence[int] = (1, 8, 8), context_len: int = 8):
    """Random (boxed) parameters; ``jax.eval_shape`` of this gives the abstract tree for loading."""
    c = module.config
    sample = jnp.zeros((1, *sample_shape[1:], c.in_channels), module.dtype)
    context = jnp.zeros((1, context_len, c.cross_attention_dim[0]), module.dtype)
    return module.init(rng, sample, jnp.zeros((1,), jnp.float32), context)["params"]
