"""A state group in the train step: model state (BatchNorm running statistics) that the forward
pass updates, no optimizer touches, and the train state carries (so checkpoints hold it)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from mema_jax.core import sharding as shd
from mema_jax.core import train_state as ts
from mema_jax.models.iresnet import BatchNorm


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Dense(6, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
        return BatchNorm()(h, train).sum(-1)


NET = Net()


def init(rng):
    variables = NET.init(rng, jnp.zeros((1, 4)), train=False)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def loss_fn(params, frozen, batch, rng):
    out, updated = NET.apply(params, batch["x"], train=True, mutable=["batch_stats"])
    return jnp.mean((out - batch["y"]) ** 2), ({}, updated["batch_stats"])


def setup(accum_steps=1, ema_decay=None):
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    tx = optax.adamw(1e-2, weight_decay=0.5)  # weight decay would shrink statistics an optimizer saw
    spec = ts.sharded_state(init, tx, mesh, shd.DEFAULT_RULES, seed=0, state_group="batch_stats",
                            use_ema=ema_decay is not None)
    shardings = {k: shd.batch_sharding(mesh, shd.DEFAULT_RULES, n) for k, n in (("x", 2), ("y", 1))}
    step = ts.make_train_step(loss_fn, tx, mesh=mesh, rules=shd.DEFAULT_RULES, state_shardings=spec.shardings,
                              batch_shardings=shardings, seed=0, accum_steps=accum_steps, ema_decay=ema_decay,
                              state_group="batch_stats")
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(3.0, 2.0, (8, 4)).astype(np.float32), "y": rng.normal(size=8).astype(np.float32)}
    return spec, step, batch


def test_the_state_group_becomes_what_the_forward_pass_returned_and_no_optimizer_sees_it():
    spec, step, batch = setup()
    state = spec.init()
    before = jax.device_get(state.params)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(optax.adamw(1e-2).init(
        {"params": before["params"]}))  # optimizer state for the trained group only
    state, metrics = step(state, batch)
    _, (_, expected) = jax.jit(loss_fn)(before, None, batch, None)
    for got, want in zip(jax.tree.leaves(jax.device_get(state.params["batch_stats"])), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(got, want)
    assert float(np.abs(state.params["batch_stats"]["BatchNorm_0"]["mean"]).min()) > 0.01  # really moved
    assert not np.array_equal(state.params["params"]["Dense_0"]["kernel"], before["params"]["Dense_0"]["kernel"])


def test_micro_batches_pass_the_state_on_in_order():
    spec, step, batch = setup(accum_steps=2)
    state = spec.init()
    params = jax.device_get(state.params)
    state, _ = step(state, batch)
    first = {k: v[:4] for k, v in batch.items()}
    second = {k: v[4:] for k, v in batch.items()}
    _, (_, stats) = jax.jit(loss_fn)(params, None, first, None)
    _, (_, stats) = jax.jit(loss_fn)(dict(params, batch_stats=stats), None, second, None)
    for got, want in zip(jax.tree.leaves(jax.device_get(state.params["batch_stats"])), jax.tree.leaves(stats)):
        np.testing.assert_allclose(got, want, rtol=1e-6)  # scan vs two calls: rounding only


def test_ema_averages_the_weights_and_keeps_the_current_statistics():
    spec, step, batch = setup(ema_decay=0.9)
    state = spec.init()
    for _ in range(2):
        state, _ = step(state, batch)
    for got, want in zip(jax.tree.leaves(state.ema_params["batch_stats"]), jax.tree.leaves(state.params["batch_stats"])):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(state.ema_params["params"]["Dense_0"]["kernel"], state.params["params"]["Dense_0"]["kernel"])


def test_a_state_group_with_several_optimizers_is_refused():
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    tx = {"a": optax.sgd(0.1), "b": optax.sgd(0.1)}
    with pytest.raises(ValueError, match="state_group works with one optimizer"):
        ts.make_train_step({"a": loss_fn, "b": loss_fn}, tx, mesh=mesh, rules=shd.DEFAULT_RULES, state_shardings=None,
                           batch_shardings=None, seed=0, state_group="batch_stats")
