"""The spatial transformer of the SD UNet (diffusers ``Transformer2DModel`` with
``BasicTransformerBlock``s): GroupNorm, proj_in, [self-attn, cross-attn, GEGLU MLP] x N, proj_out,
residual."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from mema_jax.core.sharding import constrain
from mema_jax.models.layers.attention import Attention
from mema_jax.models.layers.axes import IMAGE_AXES, TOKEN_AXES
from mema_jax.models.layers.linear import dense
from mema_jax.models.layers.norm import GroupNorm, LayerNorm


class GEGLUFeedForward(nn.Module):
    """Linear to 2x inner, value * gelu(gate) (exact erf gelu), dropout, linear back."""

    dim: int
    mult: int = 4
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        inner = self.dim * self.mult
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(2 * inner, ("embed", "mlp"), name="proj_in", **kw)(x)
        value, gate = jnp.split(h, 2, axis=-1)
        h = value * nn.gelu(gate, approximate=False)
        if self.dropout:
            h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return dense(self.dim, ("mlp", "embed"), name="proj_out", **kw)(h)


class BasicTransformerBlock(nn.Module):
    dim: int
    heads: int
    head_dim: int
    dropout: float = 0.0
    attention_impl: str = "xla"
    ip_adapter: bool = False  # cross-attention (attn2) gets IP-Adapter's to_k_ip / to_v_ip
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, head_dim=self.head_dim, out_features=self.dim, attention_impl=self.attention_impl, **kw)
        x = x + Attention(name="attn1", **attn)(LayerNorm(name="norm1", **kw)(x))
        x = x + Attention(name="attn2", ip_adapter=self.ip_adapter, **attn)(LayerNorm(name="norm2", **kw)(x), context)
        x = x + GEGLUFeedForward(self.dim, dropout=self.dropout, name="ff", **kw)(LayerNorm(name="norm3", **kw)(x), deterministic)
        return constrain(x, TOKEN_AXES)


class Transformer2D(nn.Module):
    """proj_in/proj_out are Dense layers on channels: a torch 1x1 conv (use_linear_projection=False)
    is the same map, only the weight layout differs (handled by the key map)."""

    heads: int
    head_dim: int
    num_layers: int = 1
    num_groups: int = 32
    dropout: float = 0.0
    attention_impl: str = "xla"
    ip_adapter: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, deterministic: bool = True):
        batch, height, width, channels = x.shape
        inner = self.heads * self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.num_groups, 1e-6, name="norm", **kw)(x)
        h = dense(inner, ("embed", "mlp"), name="proj_in", **kw)(h.reshape(batch, height * width, channels))
        h = constrain(h, TOKEN_AXES)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(
                inner, self.heads, self.head_dim, self.dropout, self.attention_impl, self.ip_adapter,
                name=f"transformer_blocks_{i}", **kw
            )(h, context, deterministic)
        h = dense(channels, ("mlp", "embed"), name="proj_out", **kw)(h)
        out = x + h.reshape(batch, height, width, channels)
        return constrain(out, IMAGE_AXES)
