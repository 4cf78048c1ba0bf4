"""Multi-head attention: the attention function (switchable implementation) and the projection
module used by the UNet transformer blocks, the VAE mid-block, and CLIP."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

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
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        inner = self.heads * self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.to_q = dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, **kw)
        self.to_k = dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, **kw)
        self.to_v = dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, **kw)
        self.to_out = dense(self.out_features, ("heads", "embed"), **kw)

    def heads_of(self, x):
        """(B, L, H*D) -> (B, L, H, D)"""
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_dim)

    def attend(self, query, key, value, mask=None):
        return dot_product_attention(query, key, value, impl=self.attention_impl, mask=mask)

    def __call__(self, x, context=None, mask=None):
        context = x if context is None else context
        out = self.attend(self.heads_of(self.to_q(x)), self.heads_of(self.to_k(context)), self.heads_of(self.to_v(context)),
                          mask)
        out = out.reshape(out.shape[0], out.shape[1], self.heads * self.head_dim)
        return self.to_out(out)


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
