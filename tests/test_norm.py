"""layers.norm.GroupNorm equals torch.nn.GroupNorm on channels-last input, values and gradients.

Two rules (tests/parity.py):
* inputs of mean ~0: relative 1e-5 of the largest |value| against PyTorch fp32 (both sum
  ~H*W*C/G = 1k-16k terms in fp32 in different orders: ~sqrt(n) * 2**-24 ~ 1e-6 on the statistics);
* inputs offset by 50 standard deviations, where every fp32 GroupNorm loses digits to
  cancellation (PyTorch's own gradient too): against PyTorch run in float64, our error at most
  twice PyTorch's fp32 error (floor 1e-6).  A one-pass E[x^2] - E[x]^2 variance would miss by
  ~2500 x 6e-8 relative there and fail; a wrong grouping or axis fails by O(1)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mema_jax.models.layers.norm import GroupNorm
from parity import assert_float64_parity

TOL = 1e-5


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _run(shape, groups, offset, dtype):
    rng = np.random.default_rng(0)
    x = (offset + rng.standard_normal(shape)).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32)
    bias = rng.standard_normal(shape[-1]).astype(np.float32)
    cotangent = rng.standard_normal(shape).astype(np.float32)
    module = GroupNorm(groups)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}

    def loss(p, x):
        return jnp.sum(module.apply(p, x) * cotangent)

    y = module.apply(params, jnp.asarray(x))
    grad_p, grad_x = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
    ours = {"y": y, "dx": grad_x, "dscale": grad_p["params"]["scale"], "dbias": grad_p["params"]["bias"]}

    ref = torch.nn.GroupNorm(groups, shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(scale))
        ref.bias.copy_(torch.from_numpy(bias))
    xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy()).to(dtype).requires_grad_(True)  # channels first
    yt = ref(xt)
    (yt * torch.from_numpy(np.moveaxis(cotangent, -1, 1).copy()).to(dtype)).sum().backward()
    theirs = {"y": np.moveaxis(yt.detach().double().numpy(), 1, -1), "dx": np.moveaxis(xt.grad.double().numpy(), 1, -1),
              "dscale": ref.weight.grad.double().numpy(), "dbias": ref.bias.grad.double().numpy()}
    return ours, theirs


SHAPES = [((2, 16, 16, 64), 32), ((1, 9, 7, 32), 8), ((3, 4, 4, 512), 32), ((2, 5, 40), 4)]


@pytest.mark.parametrize("shape,groups", SHAPES)
def test_group_norm_matches_torch(shape, groups):
    ours, theirs = _run(shape, groups, 0.0, torch.float32)
    for name in ours:
        assert max_rel(ours[name], theirs[name]) <= TOL, name


@pytest.mark.parametrize("shape,groups", SHAPES)
def test_group_norm_far_from_zero_is_as_accurate_as_torch(shape, groups):
    ours, theirs32 = _run(shape, groups, 50.0, torch.float32)
    _, ref64 = _run(shape, groups, 50.0, torch.float64)
    for name in ours:
        assert_float64_parity(f"GroupNorm {shape} {name}", ours[name], theirs32[name], ref64[name])


def test_group_norm_rejects_channels_not_divisible():
    with pytest.raises(ValueError, match="not divisible into 32 groups"):
        GroupNorm(32).init(jax.random.key(0), jnp.zeros((1, 4, 4, 48)))


def test_group_norm_keeps_the_input_dtype_policy():
    """bf16 in -> statistics in fp32 -> the module's dtype out (as torch upcasts for bf16)."""
    x = (100.0 + jax.random.normal(jax.random.key(0), (2, 8, 8, 64))).astype(jnp.bfloat16)
    module = GroupNorm(32, dtype=jnp.bfloat16)
    y = module.apply(module.init(jax.random.key(1), x), x)
    assert y.dtype == jnp.bfloat16
    xf = np.asarray(x, np.float32).reshape(2, -1, 32, 2)
    want = ((xf - xf.mean(axis=(1, 3), keepdims=True)) / np.sqrt(xf.var(axis=(1, 3), keepdims=True) + 1e-5)).reshape(y.shape)
    assert np.max(np.abs(np.asarray(y, np.float32) - want)) <= 2 ** -7 * np.max(np.abs(want)) * 2  # bf16 rounding


def test_group_norm_second_order_gradients_equal_autodiff_of_the_textbook_form():
    """GroupNorm's gradient is its own rule; differentiated again (an R1 penalty through the
    discriminator's GroupNorms) it must give what autodiff of the textbook formula gives.
    Tolerance: relative 1e-4 (second derivatives chain ~3x more fp32 roundings than values)."""
    from mema_jax.models.layers.norm import group_norm

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 12, 16)), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 16), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(16), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 12, 16)), jnp.float32)

    def textbook(x, scale, bias):
        g = x.reshape(2, 12, 4, 4)
        mean = g.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
        return ((g - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape) * scale + bias

    def penalty(norm):
        inner = jax.grad(lambda x, s, b: jnp.sum(jnp.tanh(norm(x, s, b)) * w))
        return lambda x, s, b: jnp.sum(jnp.square(inner(x, s, b)))

    ours = jax.grad(penalty(lambda x, s, b: group_norm(x, s, b, 4, 1e-5)), argnums=(0, 1, 2))(x, scale, bias)
    ref = jax.grad(penalty(textbook), argnums=(0, 1, 2))(x, scale, bias)
    for a, b in zip(ours, ref):
        assert max_rel(a, b) <= 1e-4
