"""Train state, sharded creation, precision policy and the generic jitted train step.

Every trainer (the MeMa classifier and diffusion trainers, MedSem-DeID) builds on these:
  * ``sharded_state``: parameters and optimizer state are created *already sharded*
    (``jit`` with ``out_shardings`` from the logical rules), never whole on one device first;
  * ``place_frozen``: frozen weights laid out by the same rules, kept out of the train state;
  * ``make_train_step``: a jitted step with explicit in/out shardings, donated state, frozen
    weights as a separate non-donated argument, one or several optimizers, gradient
    accumulation by ``lax.scan`` over micro-batches, optional EMA, and per-step randomness
    derived from (seed, step) so a resumed run draws exactly what the uninterrupted one drew.
  * a *state group*: a parameter group the forward pass updates and no optimizer trains
    (BatchNorm running statistics), part of ``TrainState.params`` so it is sharded, checkpointed
    and restored bit for bit with everything else (``state_group=`` below).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

from mema_jax.core import sharding as shd
from mema_jax.core.compile import jit


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
    tx,
    mesh: Mesh,
    rules,
    *,
    seed: int,
    use_ema: bool = False,
    state_group: str | None = None,
    warn_replicated_bytes: int = shd.DEFAULT_REPLICATED_WARNING_BYTES,
    init_args: tuple = (),
) -> ShardedState:
    """``init_params(rng, *init_args)`` returns parameters whose leaves may be flax ``Partitioned``
    boxes.  ``init_args`` (e.g. loaded pretrained weights to start from) enter the init function
    as arguments, so they are not baked into it as constants.

    ``tx`` is one optax transformation, or a dict of them keyed like the parameter groups of
    ``init_params``'s result (see ``make_train_step``).  ``state_group``: the name of a group of
    ``init_params``'s dict that no optimizer sees (see ``make_train_step``).
    """

    def boxed_state(rng, *args):
        params = init_params(rng, *args)
        # optax maps over the boxes, so moments carry their parameter's logical names.
        if isinstance(tx, Mapping):  # several optimizers: one state per parameter group
            opt_state = {group: t.init(params[group]) for group, t in tx.items()}
        else:
            opt_state = tx.init(_without(params, state_group))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                          ema_params=params if use_ema else None)

    rng = jax.random.key(seed)
    boxed = jax.eval_shape(boxed_state, rng, *init_args)
    shd.warn_replicated(boxed.params, mesh, rules, warn_replicated_bytes)
    shardings = shd.tree_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shd.unbox(boxed), shardings)
    jitted = jit(lambda r, *a: shd.unbox(boxed_state(r, *a)), out_shardings=shardings)
    return ShardedState(shardings=shardings, abstract=abstract, init=lambda: jitted(rng, *init_args))


def place_frozen(tree, mesh: Mesh, rules, warn_replicated_bytes: int = shd.DEFAULT_REPLICATED_WARNING_BYTES):
    """Frozen weights -> (arrays laid out by the rules, their shardings).

    Boxed leaves (``Partitioned``, as ``init`` gives them) follow their logical names; arrays
    already laid out on ``mesh`` (a loader called with ``mesh=``) keep their layout; other plain
    leaves are replicated.  Pass both results to ``make_train_step`` and its step: frozen weights
    are an argument of the step, never part of the state.
    """
    shd.warn_replicated(tree, mesh, rules, warn_replicated_bytes)

    def sharding(x, by_rules):
        placed = isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        return x.sharding if placed else by_rules

    shardings = jax.tree.map(sharding, shd.unbox(tree), shd.tree_shardings(tree, mesh, rules))
    return jax.device_put(shd.unbox(tree), shardings), shardings


def make_train_step(
    loss_fn,
    tx,
    *,
    mesh: Mesh,
    rules,
    state_shardings,
    batch_shardings,
    frozen_shardings=None,
    seed: int,
    accum_steps: int = 1,
    ema_decay: float | None = None,
    state_group: str | None = None,
):
    """Returns ``step(state, batch, frozen=None) -> (state, metrics)``, one jitted function.

    ``loss_fn(params, frozen, batch, rng) -> (loss, metrics)``.  ``frozen`` holds weights that are
    used but never trained (a frozen UNet, VAE, text encoder, ArcFace, medical encoder): it enters
    as an argument laid out by ``frozen_shardings``, so it is neither baked into the compiled
    program as a constant nor donated; only ``state`` is donated.

    Several optimizers (e.g. a generator and its discriminator): ``params`` is a dict of parameter
    groups and ``tx`` and ``loss_fn`` are dicts with the same keys.  The updates run one after
    another in the dicts' order, each taking gradients of its own loss with respect to its own
    group only, and each seeing the groups updated before it (the usual alternating GAN step).
    Their metrics are reported as ``<group>/<name>``.

    With ``accum_steps > 1`` the batch is split into that many micro-batches along axis 0 and
    gradients are averaged (one optimizer update per step).  Randomness is ``step_rng(seed, step)``
    (folded with the update's index and the micro-batch index).

    ``state_group`` (one optimizer only): ``params[state_group]`` is model state the forward pass
    updates and no optimizer trains -- BatchNorm running statistics, ``params = {"params": ...,
    "batch_stats": ...}``.  The loss sees all of ``params`` and returns ``(loss, (metrics,
    new_state))``; gradients, ``tx`` and EMA cover the other groups only, and the group becomes
    ``new_state`` (micro-batches pass it on in order, as torch updates running statistics).
    """
    multi = isinstance(tx, Mapping)
    if multi != isinstance(loss_fn, Mapping) or (multi and list(tx) != list(loss_fn)):
        raise ValueError("with several optimizers, tx and loss_fn are dicts with the same keys in the same order")
    if multi and state_group is not None:
        raise ValueError("state_group works with one optimizer; with several, each would update the state in turn")
    if multi:
        step = multi_optimizer_step(loss_fn, tx, seed=seed, accum_steps=accum_steps, ema_decay=ema_decay)
    else:
        step = single_optimizer_step(loss_fn, tx, seed=seed, accum_steps=accum_steps, ema_decay=ema_decay,
                                     state_group=state_group)
    return compile_step(step, mesh=mesh, rules=rules, state_shardings=state_shardings, batch_shardings=batch_shardings,
                        frozen_shardings=frozen_shardings)


def single_optimizer_step(loss_fn, tx, *, seed: int, accum_steps: int = 1, ema_decay: float | None = None,
                          state_group: str | None = None):
    """The pure ``step(state, batch, frozen) -> (state, metrics)`` of one optimizer over ``params``
    (all of it, or all but the ``state_group`` that the forward pass updates); see make_train_step."""

    def step(state: TrainState, batch: dict, frozen):
        if state_group is None:
            trained, model_state = state.params, None

            def loss(p, micro_batch, rng, _):
                value, metrics = loss_fn(p, frozen, micro_batch, rng)
                return value, (metrics, None)
        else:
            trained, model_state = _without(state.params, state_group), state.params[state_group]

            def loss(p, micro_batch, rng, model_state):
                return loss_fn(dict(p, **{state_group: model_state}), frozen, micro_batch, rng)

        grads, value, metrics, model_state = _accumulated_grads(loss, trained, batch, step_rng(seed, state.step),
                                                                accum_steps, model_state)
        trained, opt_state = _apply_updates(tx, grads, state.opt_state, trained)
        params = trained if state_group is None else dict(trained, **{state_group: model_state})
        metrics = dict(metrics, loss=value, grad_norm=optax.tree.norm(grads))
        return _advanced(state, params, opt_state, ema_decay, state_group), metrics

    return step


def multi_optimizer_step(loss_fns: Mapping, txs: Mapping, *, seed: int, accum_steps: int = 1,
                         ema_decay: float | None = None):
    """The pure ``step(state, batch, frozen) -> (state, metrics)`` of several optimizers, one per
    parameter group, updated in turn (each sees the groups updated before it); see make_train_step."""

    def step(state: TrainState, batch: dict, frozen):
        rng = step_rng(seed, state.step)
        params, opt_states, metrics = state.params, dict(state.opt_state), {}
        for i, group in enumerate(txs):
            def loss(p, micro_batch, r, _, group=group, params=params):
                value, group_metrics = loss_fns[group](dict(params, **{group: p}), frozen, micro_batch, r)
                return value, (group_metrics, None)

            grads, value, group_metrics, _ = _accumulated_grads(loss, params[group], batch,
                                                                jax.random.fold_in(rng, i), accum_steps)
            own, opt_states[group] = _apply_updates(txs[group], grads, opt_states[group], params[group])
            params = dict(params, **{group: own})
            group_metrics = dict(group_metrics, loss=value, grad_norm=optax.tree.norm(grads))
            metrics.update({f"{group}/{k}": v for k, v in group_metrics.items()})
        return _advanced(state, params, opt_states, ema_decay), metrics

    return step


def compile_step(step, *, mesh: Mesh, rules, state_shardings, batch_shardings, frozen_shardings=None):
    """``step`` jitted with its shardings, the state donated (frozen weights never are), run under
    ``mesh`` and the logical axis ``rules``; ``.jitted`` is the jitted function (for lowering)."""
    rules = shd.normalize_rules(rules)
    jitted = jit(
        step,
        training=True,
        in_shardings=(state_shardings, batch_shardings, frozen_shardings),
        out_shardings=(state_shardings, shd.replicated(mesh)),
        donate_argnums=0,
    )

    def run(state, batch, frozen=None):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, batch, frozen)

    run.jitted = jitted
    return run


def _apply_updates(tx, grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _advanced(state: TrainState, params, opt_state, ema_decay, state_group: str | None = None) -> TrainState:
    """The next step's state; the EMA of the trained groups (the averaged weights are used with the
    current ``state_group`` statistics)."""
    ema = state.ema_params
    if ema is not None:
        ema = optax.incremental_update(_without(params, state_group), _without(ema, state_group), 1.0 - ema_decay)
        if state_group is not None:
            ema = dict(ema, **{state_group: params[state_group]})
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def _without(params, group: str | None):
    return params if group is None else {k: v for k, v in params.items() if k != group}


def _accumulated_grads(loss_fn, params, batch, rng, accum_steps: int, state=None):
    """(grads, loss, metrics, state) of ``loss_fn(params, batch, rng, state) -> (loss, (metrics,
    state))``: gradients, loss and metrics averaged over micro-batches, ``state`` (None, or a
    state group's value) carried from one micro-batch to the next."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (loss, (metrics, state)), grads = grad_fn(params, batch, rng, state)
        return grads, loss, metrics, state
    micro = jax.tree.map(lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]), batch)

    def body(carry, xs):
        sums, state = carry
        i, mb = xs
        (loss, (metrics, state)), grads = grad_fn(params, mb, jax.random.fold_in(rng, i), state)
        return (jax.tree.map(jnp.add, sums, (grads, loss, metrics)), state), None

    _, (metrics_shape, _) = jax.eval_shape(lambda: loss_fn(params, jax.tree.map(lambda x: x[0], micro), rng, state))
    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
             jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape))
    (total, state), _ = jax.lax.scan(body, (zeros, state), (jnp.arange(accum_steps), micro))
    grads, loss, metrics = jax.tree.map(lambda x: x / accum_steps, total)
    return grads, loss, metrics, state
