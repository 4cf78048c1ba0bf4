"""Train state, sharded creation, precision policy and the generic jitted train step.

Every trainer (the MeMa classifier and diffusion trainers, MedSem-DeID) builds on these:
  * ``sharded_state``: parameters and optimizer state are created *already sharded*
    (``jit`` with ``out_shardings`` from the logical rules), never whole on one device first;
  * ``make_train_step``: a jitted step with explicit in/out shardings, donated state, gradient
    accumulation by ``lax.scan`` over micro-batches, optional EMA, and per-step randomness
    derived from (seed, step) so a resumed run draws exactly what the uninterrupted one drew.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from mema_jax.core import sharding as shd


@dataclasses.dataclass(frozen=True)
class Precision:
    """Parameters are kept in ``param_dtype``; model arithmetic runs in ``compute_dtype``."""

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.bfloat16

    @classmethod
    def from_config(cls, cfg) -> Precision:
        return cls(param_dtype=jnp.dtype(cfg.param_dtype), compute_dtype=jnp.dtype(cfg.compute_dtype))


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None


def step_rng(seed: int, step) -> jax.Array:
    """The PRNG key of one step: a pure function of (seed, step)."""
    return jax.random.fold_in(jax.random.key(seed), step)


@dataclasses.dataclass
class ShardedState:
    """How to build a train state in its sharded layout, without building it yet.

    ``abstract`` (shapes, dtypes, shardings) is the restore target for checkpoints; ``init()``
    creates fresh parameters and optimizer state directly in ``shardings``: one jitted function
    with ``out_shardings``, so no array is ever built whole on one device first.
    """

    shardings: Any
    abstract: Any
    init: Callable[[], TrainState]


def sharded_state(
    init_params: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules,
    *,
    seed: int,
    use_ema: bool = False,
) -> ShardedState:
    """``init_params(rng)`` returns parameters whose leaves may be flax ``Partitioned`` boxes."""

    def boxed_state(rng):
        params = init_params(rng)
        # optax maps over the boxes, so moments carry their parameter's logical names.
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          ema_params=params if use_ema else None)

    rng = jax.random.key(seed)
    boxed = jax.eval_shape(boxed_state, rng)
    shardings = shd.tree_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shd.unbox(boxed), shardings)
    jitted = jax.jit(lambda r: shd.unbox(boxed_state(r)), out_shardings=shardings)
    return ShardedState(shardings=shardings, abstract=abstract, init=lambda: jitted(rng))


def make_train_step(
    loss_fn: Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]],
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh,
    rules,
    state_shardings,
    batch_shardings,
    seed: int,
    accum_steps: int = 1,
    ema_decay: float | None = None,
):
    """Returns a jitted ``step(state, batch) -> (state, metrics)``.

    ``loss_fn(params, micro_batch, rng) -> (loss, metrics)``.  With ``accum_steps > 1`` the batch
    is split into that many micro-batches along axis 0 and gradients are averaged (one optimizer
    update per step).  The state argument is donated.
    """
    rules = shd.normalize_rules(rules)

    def step(state: TrainState, batch: dict):
        rng = step_rng(seed, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        if accum_steps == 1:
            (loss, metrics), grads = grad_fn(state.params, batch, rng)
        else:
            micro = jax.tree.map(lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]), batch)

            def body(carry, xs):
                i, mb = xs
                (l, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                acc = jax.tree.map(jnp.add, carry, (g, l, m))
                return acc, None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (_, m0) = jax.eval_shape(lambda: loss_fn(state.params, jax.tree.map(lambda x: x[0], micro), rng))
            init = (zeros, jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0))
            (grads, loss, metrics), _ = jax.lax.scan(body, init, (jnp.arange(accum_steps), micro))
            grads, loss, metrics = jax.tree.map(lambda x: x / accum_steps, (grads, loss, metrics))

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = optax.incremental_update(params, ema, 1.0 - ema_decay)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, shd.replicated(mesh)),
        donate_argnums=0,
    )

    def run(state, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, batch)

    return run
