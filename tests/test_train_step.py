"""The shared train step: frozen weights as an argument, several optimizers, replicated-parameter warning."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from mema_jax.core import sharding as shd
from mema_jax.core import train_state as ts

FP32_REL_TOL = 1e-5  # sharded vs unsharded: reduction order only (~1e-7 measured)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


class Generator(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
        return nn.Dense(8, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")))(jnp.tanh(h))


class Critic(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)))(x)[..., 0]


def _batch(n=8):
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, 8)).astype(np.float32)}


def _frozen_teacher(seed):
    """A frozen projection (stand-in for a frozen encoder), boxed like a model's init gives it."""
    return Generator().init(jax.random.key(seed), jnp.zeros((1, 8)))["params"]


def test_frozen_weights_are_a_step_argument_neither_donated_nor_baked_in():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    rules = shd.DEFAULT_RULES
    model = Generator()
    traces = []

    def loss_fn(params, frozen, batch, rng):
        traces.append(1)
        target = model.apply({"params": frozen}, batch["x"])
        return jnp.mean((model.apply({"params": params}, batch["x"]) - target) ** 2), {}

    tx = optax.adam(1e-2)
    spec = ts.sharded_state(lambda r: model.init(r, jnp.zeros((1, 8)))["params"], tx, mesh, rules, seed=0)
    frozen_a, frozen_shardings = ts.place_frozen(_frozen_teacher(1), mesh, rules)
    frozen_b, _ = ts.place_frozen(_frozen_teacher(2), mesh, rules)
    kernel = frozen_a["Dense_0"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)  # laid out by the rules
    before = jax.tree.map(lambda x: np.array(x), frozen_a)
    shardings = {"x": shd.batch_sharding(mesh, rules, 2, (8, 8))}
    step = ts.make_train_step(loss_fn, tx, mesh=mesh, rules=rules, state_shardings=spec.shardings,
                              batch_shardings=shardings, frozen_shardings=frozen_shardings, seed=0)
    batch = {"x": jax.device_put(_batch()["x"], shardings["x"])}
    state = spec.init()
    old_params = state.params
    state, m_a = step(state, batch, frozen_a)
    assert jax.tree.leaves(old_params)[0].is_deleted()  # the state is donated ...
    for leaf, want in zip(jax.tree.leaves(frozen_a), jax.tree.leaves(before)):  # ... the frozen tree is not
        assert not leaf.is_deleted()
        np.testing.assert_array_equal(np.asarray(leaf), want)
    n_traces = len(traces)
    _, m_b = step(state, batch, frozen_b)
    # Other frozen values, same compiled step: an argument, not a constant folded into the program.
    assert len(traces) == n_traces
    assert float(m_a["loss"]) != float(m_b["loss"])


def _gan_setup(mesh_sizes):
    mesh = shd.make_mesh(mesh_sizes, devices=jax.devices()[: int(np.prod(list(mesh_sizes.values())))])
    rules = shd.DEFAULT_RULES
    gen, critic = Generator(), Critic()

    def init(rng):
        r1, r2 = jax.random.split(rng)
        return {"gen": gen.init(r1, jnp.zeros((1, 8)))["params"], "critic": critic.init(r2, jnp.zeros((1, 8)))["params"]}

    def gen_loss(params, frozen, batch, rng):
        fake = gen.apply({"params": params["gen"]}, batch["x"])
        return -jnp.mean(critic.apply({"params": params["critic"]}, fake)) + 0.1 * jnp.mean(fake**2), {}

    def critic_loss(params, frozen, batch, rng):
        fake = gen.apply({"params": params["gen"]}, batch["x"])
        real = batch["x"] * 0.5
        return jnp.mean(critic.apply({"params": params["critic"]}, fake)) - jnp.mean(
            critic.apply({"params": params["critic"]}, real)), {"gap": jnp.float32(0.0)}

    tx = {"gen": optax.adam(1e-2, b1=0.5), "critic": optax.sgd(5e-2)}
    losses = {"gen": gen_loss, "critic": critic_loss}
    spec = ts.sharded_state(init, tx, mesh, rules, seed=4)
    shardings = {"x": shd.batch_sharding(mesh, rules, 2, (8, 8))}
    step = ts.make_train_step(losses, tx, mesh=mesh, rules=rules, state_shardings=spec.shardings,
                              batch_shardings=shardings, seed=4)
    return spec, step, shardings, tx, losses


def test_several_optimizers_update_in_order_each_only_its_own_group():
    spec, step, shardings, tx, losses = _gan_setup({"data": 1})
    state = spec.init()
    p0 = jax.device_get(state.params)
    batch = _batch()
    state, metrics = step(state, {"x": jax.device_put(batch["x"], shardings["x"])})
    assert set(metrics) == {"gen/loss", "gen/grad_norm", "critic/loss", "critic/grad_norm", "critic/gap"}

    # By hand: the generator first (critic fixed), then the critic against the updated generator.
    g_gen = jax.grad(lambda g: losses["gen"]({"gen": g, "critic": p0["critic"]}, None, batch, None)[0])(p0["gen"])
    upd, _ = tx["gen"].update(g_gen, tx["gen"].init(p0["gen"]), p0["gen"])
    gen1 = optax.apply_updates(p0["gen"], upd)
    g_critic = jax.grad(lambda c: losses["critic"]({"gen": gen1, "critic": c}, None, batch, None)[0])(p0["critic"])
    upd, _ = tx["critic"].update(g_critic, tx["critic"].init(p0["critic"]), p0["critic"])
    critic1 = optax.apply_updates(p0["critic"], upd)
    got = jax.device_get(state.params)
    for want, have in ((gen1, got["gen"]), (critic1, got["critic"])):
        for a, b in zip(jax.tree.leaves(have), jax.tree.leaves(want)):
            assert rel_err(a, b) <= 1e-6
    # Each group's optimizer state is its own optimizer's (adam moments for gen, none for sgd).
    assert set(state.opt_state) == {"gen", "critic"}
    assert int(state.opt_state["gen"][0].count) == 1


def test_several_optimizers_sharded_step_equals_the_unsharded_step():
    results = []
    for sizes in ({"data": 1}, {"data": 2, "fsdp": 4}):
        spec, step, shardings, _, _ = _gan_setup(sizes)
        state = spec.init()
        for _ in range(3):
            state, metrics = step(state, {"x": jax.device_put(_batch()["x"], shardings["x"])})
        results.append((jax.device_get(state.params), float(metrics["gen/loss"])))
    (p1, l1), (p8, l8) = results
    assert rel_err(l8, l1) <= FP32_REL_TOL
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        assert rel_err(a, b) <= FP32_REL_TOL


def test_a_large_parameter_the_rules_leave_replicated_is_logged_once_by_name(caplog):
    class Wide(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(512, name="unnamed_axes")(x)  # no logical names: replicated
            x = nn.Dense(512, name="named", kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
            # 1022 output features: the fsdp axis (4) divides no dimension this rule names.
            return nn.Dense(1022, name="odd", kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("mlp", "embed")))(x)

    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    model = Wide()
    init = lambda r: model.init(r, jnp.zeros((1, 512)))["params"]
    with caplog.at_level(logging.WARNING):
        ts.sharded_state(init, optax.sgd(0.1), mesh, shd.DEFAULT_RULES, seed=0, warn_replicated_bytes=512 * 512 * 4)
        ts.sharded_state(init, optax.sgd(0.1), mesh, shd.DEFAULT_RULES, seed=0, warn_replicated_bytes=512 * 512 * 4)
    warned = [r.getMessage() for r in caplog.records if "replicated on every device" in r.getMessage()]
    assert len(warned) == 2, warned  # once each, though the state was built twice
    odd, unnamed = sorted(warned, key=lambda m: "unnamed" in m)
    assert "unnamed_axes/kernel (512, 512)" in unnamed and "no logical axis names" in unnamed
    assert "odd/kernel (512, 1022)" in odd and "('mlp', 'embed')" in odd
    # Below the size, or sharded by the rules, or on a mesh without fsdp: no warning.
    assert shd.warn_replicated(jax.eval_shape(init, jax.random.key(0)), mesh, shd.DEFAULT_RULES,
                               min_bytes=512 * 512 * 4) == ["odd/kernel", "unnamed_axes/kernel"]
    assert shd.warn_replicated(jax.eval_shape(init, jax.random.key(0)), shd.make_mesh({"data": 8}),
                               shd.DEFAULT_RULES, min_bytes=1) == []


@pytest.mark.parametrize("bad", [{"gen": optax.sgd(1.0)}, optax.sgd(1.0)])
def test_several_optimizers_need_matching_loss_and_optimizer_dicts(bad):
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="dicts with the same keys"):
        ts.make_train_step({"gen": None, "critic": None}, bad, mesh=mesh, rules=None, state_shardings=None,
                           batch_shardings=None, seed=0)
