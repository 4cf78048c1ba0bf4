"""The shared training core: mesh, logical rules, sharded state, the jitted train step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mema_jax.core import sharding as shd
from mema_jax.core import train_state as ts
from mema_jax.models.resnet_classifier import ResNetClassifier
from mema_jax.trainers.classifier import classification_loss

# fp32 on CPU: a sharded step sums the batch and reduces gradients in a different order than the
# unsharded one, so results agree to float32 rounding (~1e-7 relative), not bit for bit.
FP32_REL_TOL = 1e-5


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def tree_rel_err(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return max(rel_err(x, y) for x, y in zip(la, lb))


def test_make_mesh_fills_the_free_axis_with_the_remaining_devices():
    assert jax.device_count() == 8
    mesh = shd.make_mesh({"data": 2, "fsdp": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("sizes, message", [
    ({"data": 3, "fsdp": -1}, "cannot be split"),
    ({"data": -1, "fsdp": -1}, "only one mesh axis"),
    ({"data": 2, "fsdp": 2}, "needs 4 devices"),
    ({"model": 8}, "unknown mesh axes"),
])
def test_make_mesh_rejects_impossible_shapes(sizes, message):
    with pytest.raises(ValueError, match=message):
        shd.make_mesh(sizes)


def test_rules_map_logical_names_and_replicate_dims_a_mesh_axis_does_not_divide():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    rules = shd.DEFAULT_RULES
    assert shd.logical_to_spec(("conv_h", "conv_w", "conv_in", "conv_out"), (3, 3, 16, 32), mesh, rules) == \
        P(None, None, "fsdp", None)
    # 3 input channels: fsdp (4) does not divide it, so that dim stays whole.
    assert shd.logical_to_spec(("conv_h", "conv_w", "conv_in", "conv_out"), (3, 3, 3, 32), mesh, rules) == \
        P(None, None, None, None)
    assert shd.logical_to_spec(("batch", None), (16, 5), mesh, rules) == P(("data", "fsdp"), None)
    assert shd.logical_to_spec(("batch", None), (6, 5), mesh, rules) == P("data", None)


def test_rules_reject_unknown_mesh_axes():
    with pytest.raises(ValueError, match="mesh axis 'model'"):
        shd.normalize_rules([("embed", "model")])


def _setup(mesh_sizes, *, accum_steps=1, ema_decay=None, batch_size=8, seed=3, min_severity=-1):
    mesh = shd.make_mesh(mesh_sizes, devices=jax.devices()[: int(np.prod(list(mesh_sizes.values())))])
    rules = shd.DEFAULT_RULES
    model = ResNetClassifier(widths=(8, 16), heads=(("disease", 8), ("severity", 3)), groups=4)
    tx = optax.adamw(1e-2)
    spec = ts.sharded_state(lambda r: model.init(r, jnp.zeros((1, 16, 16, 3)))["params"], tx, mesh, rules,
                            seed=seed, use_ema=ema_decay is not None)
    shapes = {"image": (batch_size, 16, 16, 3), "label": (batch_size,), "severity": (batch_size,)}
    batch_shardings = {k: shd.batch_sharding(mesh, rules, len(s), s) for k, s in shapes.items()}
    step = ts.make_train_step(functools.partial(classification_loss, model), tx, mesh=mesh, rules=rules,
                              state_shardings=spec.shardings, batch_shardings=batch_shardings, seed=seed,
                              accum_steps=accum_steps, ema_decay=ema_decay)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, shapes["image"]).astype(np.float32),
             "label": rng.integers(0, 8, batch_size).astype(np.int32),
             "severity": rng.integers(min_severity, 3, batch_size).astype(np.int32)}
    put = lambda b: {k: jax.device_put(v, batch_shardings[k]) for k, v in b.items()}
    return spec, step, batch, put, mesh


def _run(mesh_sizes, steps=3, **kw):
    spec, step, batch, put, _ = _setup(mesh_sizes, **kw)
    state = spec.init()
    losses = []
    for _ in range(steps):
        state, metrics = step(state, put(batch))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state), losses


def test_sharded_train_step_equals_the_unsharded_step():
    single, single_losses = _run({"data": 1})
    sharded, sharded_losses = _run({"data": 2, "fsdp": 4})
    assert rel_err(sharded_losses, single_losses) <= FP32_REL_TOL
    assert tree_rel_err(sharded.params, single.params) <= FP32_REL_TOL
    assert tree_rel_err(sharded.opt_state, single.opt_state) <= FP32_REL_TOL
    assert int(sharded.step) == 3


def test_parameters_and_optimizer_moments_are_created_sharded_as_the_rules_say():
    spec, _, _, _, mesh = _setup({"data": 2, "fsdp": 4})
    state = spec.init()
    kernel = state.params["stage1_block0"]["Conv_0"]["kernel"]  # (3, 3, 8, 16): conv_in=8 split on fsdp
    assert kernel.sharding.spec == P(None, None, "fsdp", None)
    assert kernel.addressable_shards[0].data.shape == (3, 3, 2, 16)
    mu = state.opt_state[0].mu["stage1_block0"]["Conv_0"]["kernel"]
    assert mu.sharding == kernel.sharding
    stem = state.params["stem"]["kernel"]  # 3 input channels: replicated
    assert all(axis is None for axis in stem.sharding.spec)
    assert spec.abstract.params["stage1_block0"]["Conv_0"]["kernel"].sharding == kernel.sharding


def test_gradient_accumulation_equals_one_big_batch():
    # Every sample has a severity label, so the loss is a plain batch mean (a masked mean over a
    # batch is not the mean of micro-batch masked means).
    whole, _ = _run({"data": 1}, steps=2, min_severity=0)
    accumulated, _ = _run({"data": 1}, steps=2, accum_steps=4, min_severity=0)
    # Averaging 4 micro-batch means == the batch mean up to fp32 rounding.
    assert tree_rel_err(accumulated.params, whole.params) <= FP32_REL_TOL


def test_ema_tracks_parameters_with_the_configured_decay():
    spec, step, batch, put, _ = _setup({"data": 1}, ema_decay=0.9)
    state = spec.init()
    p0 = jax.device_get(state.params)
    state, _ = step(state, put(batch))
    p1, ema = jax.device_get(state.params), jax.device_get(state.ema_params)
    expected = jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, p0, p1)
    assert tree_rel_err(ema, expected) <= 1e-6


def test_step_randomness_is_a_function_of_seed_and_step_only():
    a = jax.random.uniform(ts.step_rng(7, 123), (4,))
    b = jax.random.uniform(ts.step_rng(7, jnp.int32(123)), (4,))
    c = jax.random.uniform(ts.step_rng(7, 124), (4,))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
