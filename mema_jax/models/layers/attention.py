"""Multi-head attention: the attention function (switchable implementation) and the projection
module used by the UNet transformer blocks, the VAE mid-block, and CLIP."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from mema_jax.core.sharding import constrain
from mema_jax.models.layers.axes import IMAGE_AXES
from mema_jax.models.layers.linear import dense
from mema_jax.models.layers.norm import GroupNorm

ATTENTION_IMPLS = ("xla", "dot_product")


def check_attention_impl(impl: str) -> None:
    """Models call this at construction, so a typo fails before any tracing."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {ATTENTION_IMPLS}")


def dot_product_attention(query, key, value, *, impl: str = "xla", scale: float | None = None, mask=None):
    """softmax(q k^T * scale) v for q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D).

    ``impl="xla"``: plain einsums, logits and softmax in float32, probabilities cast back to the
    value dtype (what torch's fused kernels do for half precision).
    ``impl="dot_product"``: ``jax.nn.dot_product_attention``; on GPU with fp16/bf16 it asks for the
    cuDNN flash kernel and falls back to XLA where cuDNN refuses the shape (the check happens at
    trace time); elsewhere it is the XLA implementation.
    ``mask``: optional boolean, broadcastable to (B, H, Lq, Lk), True = attend.

    Either way the logits q.k are accumulated in float32 and the softmax runs in float32 (so do
    jax.nn's XLA path and cuDNN's kernel): diffusers' ``upcast_attention=True`` holds for every
    model.  Products of bf16/fp16 numbers are exact in float32, so this equals upcasting q and k.
    """
    head_dim = query.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    if impl == "xla":
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32) * scale
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, value)
    if impl == "dot_product":
        half = query.dtype in (jnp.bfloat16, jnp.float16)
        if half and jax.default_backend() == "gpu":
            try:
                return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale, implementation="cudnn")
            except NotImplementedError:
                pass
        return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale)
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {ATTENTION_IMPLS}")


class Attention(nn.Module):
    """q/k/v projections, multi-head attention, output projection (diffusers ``Attention``).

    ``context`` (cross-attention keys/values) defaults to ``x`` (self-attention).  ``mask``
    (optional, boolean, broadcastable to (B, H, Lq, Lk), True = attend) serves CLIP's causal text
    tower.  The steps are separate methods so that an extension (e.g. IP-Adapter's extra
    image-token keys/values) can reuse ``heads_of`` / ``attend`` and add its own projections.
    """

    heads: int
    head_dim: int
    out_features: int
    qkv_bias: bool = False
    attention_impl: str = "xla"
    ip_adapter: bool = False  # adds to_k_ip / to_v_ip: IP-Adapter's decoupled image cross-attention
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        inner = self.heads * self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.to_q = dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, **kw)
        self.to_k = dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, **kw)
        self.to_v = dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, **kw)
        self.to_out = dense(self.out_features, ("heads", "embed"), **kw)
        if self.ip_adapter:
            self.to_k_ip = dense(inner, ("embed", "heads"), use_bias=False, **kw)
            self.to_v_ip = dense(inner, ("embed", "heads"), use_bias=False, **kw)

    def heads_of(self, x):
        """(B, L, H*D) -> (B, L, H, D)"""
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_dim)

    def attend(self, query, key, value, mask=None):
        return dot_product_attention(query, key, value, impl=self.attention_impl, mask=mask)

    def __call__(self, x, context=None, mask=None):
        """``context``: key/value tokens (B, L, D), None for self-attention, or a
        ``CrossAttentionContext`` carrying IP-Adapter image tokens and their per-sample scale:
        out = attn(q, text) + scale * attn(q, image tokens), as diffusers' IPAdapterAttnProcessor."""
        tokens, ip_tokens, ip_scale = CrossAttentionContext.unpack(context)
        tokens = x if tokens is None else tokens
        query = self.heads_of(self.to_q(x))
        out = self.attend(query, self.heads_of(self.to_k(tokens)), self.heads_of(self.to_v(tokens)), mask)
        if ip_tokens is not None:
            if not self.ip_adapter:
                raise ValueError("IP-Adapter image tokens given to an attention layer built without ip_adapter=True")
            image = self.attend(query, self.heads_of(self.to_k_ip(ip_tokens)), self.heads_of(self.to_v_ip(ip_tokens)))
            scale = jnp.broadcast_to(jnp.asarray(ip_scale, image.dtype).reshape(-1), (image.shape[0],))
            out = out + scale[:, None, None, None] * image
        out = out.reshape(out.shape[0], out.shape[1], self.heads * self.head_dim)
        return self.to_out(out)


@struct.dataclass
class CrossAttentionContext:
    """What cross-attention attends to: the text tokens, plus (IP-Adapter) image tokens (B, N, D)
    and their scale (scalar or (B,): one injection strength per sample)."""

    tokens: Any
    ip_tokens: Any = None
    ip_scale: Any = None

    @staticmethod
    def unpack(context):
        if isinstance(context, CrossAttentionContext):
            return context.tokens, context.ip_tokens, context.ip_scale
        return context, None, None


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention: GroupNorm, single-head self-attention over all pixels, residual."""

    num_groups: int
    epsilon: float = 1e-6
    attention_impl: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, height, width, channels = x.shape
        h = GroupNorm(self.num_groups, self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name="group_norm")(x)
        h = h.reshape(batch, height * width, channels)
        h = Attention(
            heads=1,
            head_dim=channels,
            out_features=channels,
            qkv_bias=True,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attention",
        )(h)
        out = x + h.reshape(batch, height, width, channels)
        return constrain(out, IMAGE_AXES)
