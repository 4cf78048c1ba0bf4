"""Multi-head attention: the attention function (switchable implementation) and the projection
module used by the UNet transformer blocks, the VAE mid-block, and CLIP."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from mema_jax.core.compile import trace_platform
from mema_jax.core.sharding import constrain
from mema_jax.models.layers.axes import IMAGE_AXES
from mema_jax.models.layers.linear import dense
from mema_jax.models.layers.norm import GroupNorm

ATTENTION_IMPLS = ("xla", "dot_product")


def check_attention_impl(impl: str) -> None:
    """Models call this at construction, so a typo fails before any tracing."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {ATTENTION_IMPLS}")


# On CPU a score matrix of at least this many entries per (batch, head) is computed in query blocks.
BLOCKED_MIN_SCORES = 512 * 512
# ... of at most this many entries per block (2 MiB of float32: a core's L2 cache).
BLOCK_SCORES = 1 << 19


def dot_product_attention(query, key, value, *, impl: str = "xla", scale: float | None = None, mask=None):
    """softmax(q k^T * scale) v for q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D).

    ``impl="xla"``: ``attention_xla`` (einsums, logits and softmax in float32, probabilities cast
    to the value dtype, as torch's fused kernels do for half precision).
    ``impl="dot_product"``: ``jax.nn.dot_product_attention``; on GPU with fp16/bf16 it asks for the
    cuDNN flash kernel and falls back to XLA where cuDNN refuses the shape (the check happens at
    trace time); elsewhere it is the XLA implementation.
    ``mask``: optional boolean, broadcastable to (B, H, Lq, Lk), True = attend.

    Either way the logits q.k are accumulated in float32 and the softmax runs in float32 (so do
    jax.nn's XLA path and cuDNN's kernel): diffusers' ``upcast_attention=True`` holds for every
    model.  Products of bf16/fp16 numbers are exact in float32, so this equals upcasting q and k.
    """
    head_dim = query.shape[-1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    if impl == "xla":
        return attention_xla(query, key, value, scale, mask)
    if impl == "dot_product":
        half = query.dtype in (jnp.bfloat16, jnp.float16)
        if half and jax.default_backend() == "gpu":
            try:
                return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale, implementation="cudnn")
            except NotImplementedError:
                pass
        return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale)
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {ATTENTION_IMPLS}")


def attention_xla(query, key, value, scale: float, mask=None):
    """Attention in plain XLA ops, normalised after the value product, with its own gradient.

    e = exp(s - max s), l = sum_k e, out = (e v) / l: the division runs on the (Lq, D) output
    instead of the (Lq, Lk) probabilities, and the gradient (``_attention_bwd``) uses
    sum_k dP * P = rowsum(dO * O) (an (Lq, D) product) instead of another pass over the scores.
    The softmax is the same function (the max only shifts the exponent), so values equal the
    textbook form up to float32 rounding.  One core, fp32, ms, textbook / this (torch SDPA):
    small-UNet self-attention (2, 256, 8 heads x 4) forward 4.8 / 1.0 (0.7), with gradients 5.1 /
    2.7 (2.3); SD1.5's at 16 x 16 latents (1, 256, 8 x 40) 1.5 / 1.0 (0.7), 6.0 / 3.1 (2.5).

    Without gradients, on CPU, a score matrix of ``BLOCKED_MIN_SCORES`` or more per head is
    computed one head and one block of queries at a time (``_blocked``), each block's scores in
    the L2 cache: SD1.5 at 64 x 64 latents (1, 4096, 8 x 40) 1316 -> 238 ms (torch SDPA 157), the
    VAE's mid-block at 512 px (1, 4096, 1 x 512) 247 -> 222 ms.
    """
    return _attention(query, key, value, mask, scale)


def _scores(query, key, scale, mask):
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return logits


def _attention_fwd(query, key, value, mask, scale):
    logits = _scores(query, key, scale, mask)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    total = jnp.sum(e, axis=-1, keepdims=True)  # (B, H, Lq, 1)
    out = jnp.einsum("bhqk,bkhd->bhqd", e.astype(value.dtype), value, preferred_element_type=jnp.float32) / total
    return jnp.transpose(out, (0, 2, 1, 3)).astype(value.dtype), (query, key, value, mask, e, total, out)


def _attention_bwd(scale, residuals, d_out):
    query, key, value, mask, e, total, out = residuals
    g = jnp.transpose(d_out, (0, 2, 1, 3)).astype(jnp.float32) / total  # dO / l, (B, H, Lq, D)
    d_value = jnp.einsum("bhqk,bhqd->bkhd", e, g)
    d_probs = jnp.einsum("bhqd,bkhd->bhqk", g, value.astype(jnp.float32))  # dP / l
    d_logits = e * (d_probs - jnp.sum(g * out, axis=-1, keepdims=True)) * scale  # P (dP - rowsum(dO O))
    if mask is not None:
        d_logits = jnp.where(mask, d_logits, 0.0)
    d_query = jnp.einsum("bhqk,bkhd->bqhd", d_logits, key.astype(jnp.float32))
    d_key = jnp.einsum("bhqk,bqhd->bkhd", d_logits, query.astype(jnp.float32))
    return d_query.astype(query.dtype), d_key.astype(key.dtype), d_value.astype(value.dtype), None


def _query_block(q_len: int, k_len: int) -> int | None:
    """The largest divisor of ``q_len`` whose block of scores fits ``BLOCK_SCORES`` (None: no blocking)."""
    if q_len * k_len < BLOCKED_MIN_SCORES:
        return None
    for block in range(min(q_len, max(1, BLOCK_SCORES // k_len)), 7, -1):
        if q_len % block == 0:
            return block
    return None


def _blocked(query, key, value, scale, block):
    """Per head, per block of ``block`` queries (sequential loops: each block's scores stay in cache)."""
    b, q_len, h, d = query.shape
    k_len, dv = key.shape[1], value.shape[-1]
    per_head = lambda x, n: jnp.transpose(x, (0, 2, 1, 3)).reshape(b * h, n, x.shape[-1])
    queries = per_head(query, q_len).reshape(b * h, q_len // block, block, d)

    def one_block(q, k, v):
        logits = jnp.einsum("qd,kd->qk", q, k, preferred_element_type=jnp.float32) * scale
        e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
        out = jnp.einsum("qk,kd->qd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return out / jnp.sum(e, axis=-1, keepdims=True)

    def one_head(args):
        q, k, v = args
        return jax.lax.map(lambda qb: one_block(qb, k, v), q)

    out = jax.lax.map(one_head, (queries, per_head(key, k_len), per_head(value, k_len)))
    return jnp.transpose(out.reshape(b, h, q_len, dv), (0, 2, 1, 3)).astype(value.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(query, key, value, mask, scale):
    block = _query_block(query.shape[1], key.shape[1]) if mask is None and trace_platform() == "cpu" else None
    if block is not None:
        return _blocked(query, key, value, scale, block)
    return _attention_fwd(query, key, value, mask, scale)[0]


_attention.defvjp(_attention_fwd, _attention_bwd)


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
