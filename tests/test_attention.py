"""layers.attention.attention_xla equals textbook attention, softmax(q k^T * scale) v, in values and
gradients, with and without a mask; its blocked CPU path equals its one-shot path.

Tolerance: relative 1e-5 of the largest |value| / |gradient| (fp32).  The forms differ only in
where the softmax's division happens (before or after the value product) and in the order of
fp32 sums over <= 1024 keys: ~sqrt(1024) * 2**-24 ~ 2e-6 relative at most here; a dropped
scale, a transposed head or a wrong mask changes results by O(1)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mema_jax.models.layers import attention as attention_lib
from mema_jax.models.layers.attention import attention_xla

TOL = 1e-5


def textbook(q, k, v, scale, mask=None):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, -1e30)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def inputs(b, lq, lk, h, d, dv=None, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((b, lq, h, d)), jnp.float32),
            jnp.asarray(rng.standard_normal((b, lk, h, d)), jnp.float32),
            jnp.asarray(rng.standard_normal((b, lk, h, dv or d)), jnp.float32))


@pytest.mark.parametrize("shape", [(2, 16, 16, 8, 4), (2, 16, 77, 8, 4), (1, 64, 64, 1, 32, 48)])
@pytest.mark.parametrize("masked", [False, True])
def test_values_and_gradients_equal_the_textbook_form(shape, masked):
    q, k, v = inputs(*shape)
    scale = 0.7
    mask = None
    if masked:  # causal where square, else a random pattern; every row keeps at least one key
        lq, lk = q.shape[1], k.shape[1]
        mask = jnp.tril(jnp.ones((lq, lk), bool)) if lq == lk else \
            jnp.asarray(np.random.default_rng(1).random((1, 1, lq, lk)) < 0.5).at[..., 0].set(True)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape[:3] + (v.shape[-1],)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, scale, mask) * cotangent)

    assert max_rel(jax.jit(attention_xla, static_argnums=3)(q, k, v, scale, mask), textbook(q, k, v, scale, mask)) <= TOL
    ours = jax.grad(loss(attention_xla), argnums=(0, 1, 2))(q, k, v)
    theirs = jax.grad(loss(textbook), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, theirs):
        assert max_rel(a, b) <= TOL


def test_large_score_matrices_are_blocked_on_cpu_and_equal_the_one_shot_form():
    q, k, v = inputs(1, 1024, 1024, 2, 8)
    assert attention_lib._query_block(1024, 1024) == 512  # two blocks per head, 2 MiB of scores each
    assert attention_lib._query_block(256, 256) is None  # small: one shot
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention_xla(q, k, v, 0.35))(q, k, v))
    assert "scan" in jaxpr  # the blocks' loop
    blocked = attention_xla(q, k, v, 0.35)
    one_shot = attention_lib._attention_fwd(q, k, v, None, 0.35)[0]
    assert max_rel(blocked, one_shot) <= TOL
    assert max_rel(blocked, textbook(q, k, v, 0.35)) <= TOL
    # Under differentiation the one-shot forward keeps its residuals for the gradient.
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda q: jnp.sum(attention_xla(q, k, v, 0.35))))(q))
    assert "scan" not in grad_jaxpr


def test_masked_attention_is_never_blocked():
    q, k, v = inputs(1, 1024, 1024, 1, 8)
    mask = jnp.tril(jnp.ones((1024, 1024), bool))
    assert "scan" not in str(jax.make_jaxpr(lambda q, k, v: attention_xla(q, k, v, 0.35, mask))(q, k, v))

def test_other_platforms_are_never_blocked(monkeypatch):
    """Traced for a GPU (no GPU here: the platform the module reads is replaced), one shot."""
    q, k, v = inputs(1, 1024, 1024, 1, 8)
    monkeypatch.setattr(attention_lib, "trace_platform", lambda: "gpu")
    assert "scan" not in str(jax.make_jaxpr(lambda q, k, v: attention_xla(q, k, v, 0.35))(q, k, v))


def test_bf16_inputs_give_bf16_outputs_and_gradients():
    q, k, v = (x.astype(jnp.bfloat16) for x in inputs(2, 16, 16, 2, 8))
    out = attention_xla(q, k, v, 0.35)
    assert out.dtype == jnp.bfloat16
    grads = jax.grad(lambda q, k, v: jnp.sum(attention_xla(q, k, v, 0.35).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    ref = textbook(*(x.astype(jnp.float32) for x in (q, k, v)), 0.35)
    assert max_rel(out.astype(jnp.float32), ref) <= 2 ** -7  # bf16 output rounding
