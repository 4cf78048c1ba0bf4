"""``upcast_attention`` (diffusers: q.k and softmax in float32; SD2.x sets it True) holds for every
model here: both attention implementations accumulate the logits and run the softmax in float32
even when q, k, v are bfloat16.  So the config value is accepted either way, kept for writing the
config back, and does not change the network."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mema_jax.models.layers.attention import ATTENTION_IMPLS, dot_product_attention
from mema_jax.models.unet import UNet2DConditionModel, UNetConfig, init_params


def _bf16_inputs_with_logits_finer_than_bf16():
    """Logits 64, 64.25, 64.5, 64.75 from bf16-exact q and k: bf16 spaces numbers near 64 by 0.5,
    so attention with bf16 logits would round them; v = identity makes the output the probabilities."""
    head_dim, length = 64, 4
    q = np.zeros((1, 1, 1, head_dim), np.float32)
    q[..., 0], q[..., 1] = 64.0, 1.0
    k = np.zeros((1, length, 1, head_dim), np.float32)
    k[:, :, 0, 0] = 1.0
    k[:, :, 0, 1] = np.arange(length) * 0.25
    v = np.zeros((1, length, 1, head_dim), np.float32)
    v[0, np.arange(length), 0, np.arange(length)] = 1.0
    return (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_attention_logits_and_softmax_are_float32_for_bf16_inputs(impl):
    q, k, v = _bf16_inputs_with_logits_finer_than_bf16()
    out = dot_product_attention(q, k, v, impl=impl, scale=1.0)
    assert out.dtype == jnp.bfloat16
    probs = np.asarray(out, np.float32)[0, 0, 0, :4]
    upcast = np.asarray(jax.nn.softmax(jnp.asarray([64.0, 64.25, 64.5, 64.75])))
    bf16_logits = np.asarray(jax.nn.softmax(jnp.asarray([64.0, 64.25, 64.5, 64.75], jnp.bfloat16).astype(jnp.float32)))
    np.testing.assert_allclose(probs, upcast, rtol=1e-2)  # bf16 output: ~0.4% per probability
    assert np.max(np.abs(bf16_logits - upcast) / upcast) > 0.1  # what half-precision logits would give


def test_unet_accepts_both_settings_keeps_them_and_computes_the_same():
    base = dict(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
                attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
    outputs = {}
    for upcast in (False, True):
        config = UNetConfig.from_dict({**base, "upcast_attention": upcast})
        assert config.upcast_attention is upcast and config.to_dict()["upcast_attention"] is upcast
        module = UNet2DConditionModel(config, dtype=jnp.bfloat16)
        params = init_params(module, jax.random.key(0), sample_shape=(1, 4, 4), context_len=3)
        sample = jax.random.normal(jax.random.key(1), (1, 4, 4, 4))
        context = jax.random.normal(jax.random.key(2), (1, 3, 8))
        outputs[upcast] = np.asarray(module.apply({"params": params}, sample, jnp.asarray([10.0]), context), np.float32)
    np.testing.assert_array_equal(outputs[False], outputs[True])
