"""The training loop every trainer shares, as plain functions (big_vision style: no trainer class).

A trainer supplies its model, loss, optional frozen weights and evaluation, and calls:

    mesh, rules = loop.mesh_and_rules(config)
    state_spec = train_state.sharded_state(init_params, tx, mesh, rules, seed=config.seed, ...)
    shardings = loop.batch_shardings(mesh, rules, {"image": (B, H, W, 3), ...})
    step = train_state.make_train_step(loss_fn, tx, mesh=mesh, rules=rules, ...)
    return loop.run(config, workdir, state_spec=state_spec, train_step=step, data_iter=iter(loader),
                    batch_shardings=shardings, evaluate=..., periodic=[...])

``run`` restores the newest readable checkpoint (model, optimizer and data-iterator state) or
initialises, then steps with clu's periodic actions, logs to TensorBoard / metrics.csv / the
console, evaluates every ``config.eval_every`` steps, calls the trainer's own periodic callbacks
(sample grids, say), checkpoints every ``config.checkpoint_every`` steps and at the end, and closes.
A workdir whose checkpoint is already at ``config.total_steps`` is a finished run: it exits at once.

Config entries read here: seed, mesh, sharding_rules, replicated_warning_mib, total_steps, log_every, eval_every,
eval_at_start (optional: evaluate the starting state as step 0), checkpoint_every, keep_checkpoints,
async_checkpoints, profile_steps.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from mema_jax.core import run_files
from mema_jax.core import checkpoint as ckpt_lib
from mema_jax.core import metrics as metrics_lib
from mema_jax.core import preemption
from mema_jax.core import sharding as shd
from mema_jax.core import train_state as ts


def mesh_and_rules(config) -> tuple[Mesh, tuple]:
    mesh = shd.make_mesh(config.mesh.to_dict())
    return mesh, shd.normalize_rules(config.sharding_rules)


def replicated_warning_bytes(config) -> int:
    """``config.replicated_warning_mib`` in bytes, for ``sharded_state`` / ``place_frozen``."""
    return int(config.get("replicated_warning_mib", 4.0) * 2**20)


def batch_shardings(mesh: Mesh, rules, shapes: Mapping[str, Sequence[int]]) -> dict:
    """One sharding per batch entry: leading (batch) dim on the logical 'batch' axis."""
    return {k: shd.batch_sharding(mesh, rules, len(s), tuple(s)) for k, s in shapes.items()}


def to_global(batch: Mapping[str, Any], shardings: Mapping[str, Any]) -> dict:
    """This process's numpy part of a batch -> global jax arrays laid out by ``shardings``."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}


def fetch(tree):
    """Jitted outputs (a pytree) on this host, whole.  An array that spans other processes' devices
    is gathered from all of them: a collective, so every process must call it, not only process 0."""

    def leaf(x):
        if jax.process_count() == 1 or not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(leaf, tree)


def padded_batches(loader, shardings: Mapping[str, Any], batch_size: int) -> Iterator[tuple[dict, np.ndarray, dict]]:
    """Evaluation batches at the compiled batch size: the entries named in ``shardings`` as global
    arrays, a short last batch zero-padded.  Yields (global batch, the indices of its real rows,
    the host batch): ``fetch(f(batch))[rows]`` and ``host[k][rows]`` are the real rows, in the
    global order, on every process (with several processes, the host batch's numeric entries are
    gathered from all of them, each process's rows padded to its share)."""
    local = batch_size // jax.process_count()
    for batch in loader:
        n = len(next(iter(batch.values())))
        padded = {}
        for k, v in batch.items():
            v = np.asarray(v)
            if k in shardings or jax.process_count() > 1:
                padded[k] = np.concatenate([v, np.zeros((local - n,) + v.shape[1:], v.dtype)]) if n < local else v
        if jax.process_count() == 1:
            yield to_global({k: padded[k] for k in shardings}, shardings), np.arange(n), batch
            continue
        numeric = {k: v for k, v in padded.items() if v.dtype.kind in "biufc"}
        counts = np.asarray(multihost_utils.process_allgather(np.int32(n))).reshape(-1)
        rows = np.concatenate([p * local + np.arange(c) for p, c in enumerate(counts)])
        host = {k: np.asarray(v) for k, v in multihost_utils.process_allgather(numeric, tiled=True).items()}
        yield to_global({k: padded[k] for k in shardings}, shardings), rows, host


def in_mesh(fn: Callable, mesh: Mesh, rules) -> Callable:
    """``fn`` called under the mesh and the logical-axis rules (for a jitted model function)."""

    def call(*args, **kwargs):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return fn(*args, **kwargs)

    return call


@dataclasses.dataclass(frozen=True)
class Periodic:
    """A trainer's own callback ``fn(step, state, writer)``, every ``every`` steps and at the end."""

    every: int
    fn: Callable[[int, ts.TrainState, Any], None]


def flat_hparams(config) -> dict:
    """Scalar config entries as ``a.b.c: value`` (for TensorBoard's hparams)."""

    def flatten(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flatten(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float, str, bool)):
                yield f"{prefix}{k}", v

    return dict(flatten(config.to_dict()))


FINAL_METRICS = run_files.FINAL_METRICS_FILE


def write_final_metrics(workdir: Path, step: int, eval_metrics: Mapping[str, Any]) -> Path:
    """``<workdir>/final_metrics.json``: the step reached and the last evaluation, plus the last logged
    training scalars from metrics.csv (what ``launch.sweep collect`` tabulates)."""
    import csv
    import json

    from mema_jax.fileio import atomic_write_bytes

    last: dict = {}
    table = workdir / run_files.METRICS_TABLE
    if table.exists():
        with open(table, newline="") as f:
            for row in csv.DictReader(f):  # long format: step,name,value,time
                last[row["name"]] = float(row["value"])
    last.update({k: float(v) for k, v in jax.device_get(dict(eval_metrics)).items()})
    path = workdir / FINAL_METRICS
    atomic_write_bytes(path, (json.dumps({"step": step, "metrics": last}, indent=2, sort_keys=True) + "\n").encode())
    return path


def restore_or_init(checkpointer: ckpt_lib.Checkpointer, state_spec: ts.ShardedState, data_iter, workdir) -> ts.TrainState:
    state = checkpointer.restore(state_spec.abstract, data_iter)
    if state is None:
        print(f"starting from scratch in {workdir}", flush=True)
        return state_spec.init()
    print(f"resumed from step {int(state.step)} in {workdir}", flush=True)
    return state


def run(
    config,
    workdir,
    *,
    state_spec: ts.ShardedState,
    train_step: Callable,
    data_iter,
    batch_shardings: Mapping[str, Any],
    frozen: Any = None,
    evaluate: Callable[[ts.TrainState], Mapping[str, float]] | None = None,
    periodic: Sequence[Periodic] = (),
    on_finish: Callable[[ts.TrainState], None] | None = None,
    console_keys: Sequence[str] = ("loss",),
) -> dict:
    """Restore or init, train to ``config.total_steps``, evaluate, checkpoint, close.

    ``evaluate(state) -> {name: scalar}`` (names as written, e.g. ``eval/accuracy``).
    ``on_finish(state)`` runs once the state is at ``total_steps`` -- also when a finished run is
    started again, so an export the previous process did not complete is done then (it should
    skip what already exists).  Returns the last evaluation's metrics ({} if none ran).
    """
    workdir = Path(workdir)
    total = config.total_steps
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", save_every=config.checkpoint_every,
                                         keep=config.keep_checkpoints, async_save=config.async_checkpoints)
    state = restore_or_init(checkpointer, state_spec, data_iter, workdir)
    start = int(state.step)
    tensorboard = config.get("tensorboard", True)
    writer = metrics_lib.make_writer(workdir, total, console_keys=tuple(console_keys), tensorboard=tensorboard)
    if start == 0:
        writer.write_hparams(flat_hparams(config))
    actions = metrics_lib.make_periodic_actions(workdir, total, writer, profile_steps=config.profile_steps,
                                                tensorboard=tensorboard)

    def due(every: int, step: int) -> bool:
        return bool(every) and (step % every == 0 or step == total)

    def stop_if_preempted(step: int, state) -> None:
        """At a step boundary: if a signal asked for it (on any process), save ``step`` and raise."""
        signum = preemption.requested_anywhere()
        if signum is None:
            return
        if checkpointer.latest_step() != step:
            checkpointer.save(step, state, data_iter, force=True)
        checkpointer.close()
        writer.flush()
        preemption.clear()
        raise preemption.Preempted(step, signum)

    preemption.install()
    eval_metrics: dict = {}
    if start < total:
        stop_if_preempted(start, state)  # asked during set-up or compilation
    if evaluate is not None and start == 0 and config.get("eval_at_start", False):
        eval_metrics = dict(evaluate(state))  # the starting point (e.g. a frozen base before LoRA)
        writer.write_scalars(0, eval_metrics)
    for step in range(start, total):
        batch = to_global(next(data_iter), batch_shardings)
        state, metrics = train_step(state, batch, frozen)  # donates the previous state
        done = step + 1
        for action in actions:
            action(done)
        if due(config.log_every, done):
            writer.write_scalars(done, {f"train/{k}": v for k, v in jax.device_get(metrics).items()})
        if evaluate is not None and due(config.eval_every, done):
            eval_metrics = dict(evaluate(state))
            writer.write_scalars(done, eval_metrics)
        for callback in periodic:
            if due(callback.every, done):
                callback.fn(done, state, writer)
        checkpointer.save(done, state, data_iter, force=done == total)
        if done < total:
            stop_if_preempted(done, state)
    checkpointer.close()
    if on_finish is not None and int(state.step) == total:
        on_finish(state)
    writer.flush()
    if jax.process_index() == 0 and (start < total or not (workdir / FINAL_METRICS).exists()):
        write_final_metrics(workdir, int(state.step), eval_metrics)
    print(f"done: {total} steps; checkpoints in {checkpointer.directory}, TensorBoard events in "
          f"{workdir / 'tensorboard'}, metrics table {workdir / 'metrics.csv'}", flush=True)
    return eval_metrics
