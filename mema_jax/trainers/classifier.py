"""Trainer: a disease (and severity) classifier on a MeMa-layout folder.

The quickstart model, and a supervised medical encoder (the paper's Tab. 10 "ViT (Supervised)"
row compares such encoders).  One flat file: mesh -> data -> model -> sharded state -> resume ->
loop (train step, metrics, evaluation, checkpoints).  Run it through ``launch.main``.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from mema_jax.core import checkpoint as ckpt_lib
from mema_jax.core import metrics as metrics_lib
from mema_jax.core import sharding as shd
from mema_jax.core import train_state as ts
from mema_jax.data import layout, pipeline
from mema_jax.models.resnet import ResNetClassifier


def make_model(config, precision: ts.Precision) -> ResNetClassifier:
    return ResNetClassifier(
        widths=tuple(config.model.widths),
        blocks_per_stage=config.model.blocks_per_stage,
        heads=(("disease", len(layout.DISEASES)), ("severity", len(layout.SEVERITIES))),
        groups=config.model.groups,
        remat=config.model.remat,
        dtype=precision.compute_dtype,
        param_dtype=precision.param_dtype,
    )


def make_optimizer(config) -> optax.GradientTransformation:
    o = config.optim
    schedule = optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, max(config.total_steps, o.warmup_steps + 1))
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay),
    )


def classification_loss(model, params, batch, rng):
    del rng  # the model is deterministic; kept for the shared step signature
    logits = model.apply({"params": params}, batch["image"])
    disease = optax.softmax_cross_entropy_with_integer_labels(logits["disease"], batch["label"]).mean()
    has_sev = batch["severity"] >= 0
    sev_ce = optax.softmax_cross_entropy_with_integer_labels(logits["severity"], jnp.maximum(batch["severity"], 0))
    severity = jnp.sum(sev_ce * has_sev) / jnp.maximum(has_sev.sum(), 1)
    accuracy = jnp.mean(jnp.argmax(logits["disease"], -1) == batch["label"])
    return disease + 0.5 * severity, {"disease_ce": disease, "severity_ce": severity, "accuracy": accuracy}


def evaluate(model, params, dataset, config, mesh, rules, batch_shardings) -> dict:
    """Top-1 disease accuracy (overall and per class) on ``config.eval_split``."""
    loader = pipeline.make_loader(dataset, config.eval_split, global_batch_size=config.batch_size,
                                  image_size=config.data.image_size, seed=0, shuffle=False, num_epochs=1,
                                  augment=False, drop_remainder=False)

    @functools.partial(jax.jit, in_shardings=(None, batch_shardings["image"]))
    def predict(p, images):
        return jnp.argmax(model.apply({"params": p}, images)["disease"], -1)

    preds, labels = [], []
    for batch in loader:
        n = len(batch["label"])
        images = np.zeros((config.batch_size,) + batch["image"].shape[1:], np.float32)
        images[:n] = batch["image"]  # pad the last batch to the sharded batch size
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            pred = predict(params, jax.make_array_from_process_local_data(batch_shardings["image"], images))
        preds.append(np.asarray(jax.device_get(pred))[:n])
        labels.append(batch["label"])
    preds, labels = np.concatenate(preds), np.concatenate(labels)
    out = {"eval/accuracy": float(np.mean(preds == labels))}
    for i, name in enumerate(layout.DISEASES):
        sel = labels == i
        if sel.any():
            out[f"eval/accuracy_{name}"] = float(np.mean(preds[sel] == i))
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    workdir = Path(workdir)
    mesh = shd.make_mesh(config.mesh.to_dict())
    rules = shd.normalize_rules(config.sharding_rules)
    precision = ts.Precision.from_config(config.precision)
    logging.info("mesh %s on %d devices", dict(mesh.shape), mesh.size)

    dataset = pipeline.ensure_dataset(config.data.root, config.data.synth if config.data.generate_if_missing else None,
                                      verify_images=config.data.verify_images)
    model = make_model(config, precision)
    tx = make_optimizer(config)
    size = config.data.image_size
    state_spec = ts.sharded_state(
        lambda rng: model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32))["params"],
        tx, mesh, rules, seed=config.seed, use_ema=config.ema_decay > 0,
    )

    batch_shapes = {"image": (config.batch_size, size, size, 3), "label": (config.batch_size,),
                    "severity": (config.batch_size,), "index": (config.batch_size,)}
    batch_shardings = {k: shd.batch_sharding(mesh, rules, len(s), s) for k, s in batch_shapes.items()}
    loader = pipeline.make_loader(dataset, "train", global_batch_size=config.batch_size, image_size=size,
                                  seed=config.seed, augment=config.data.augment, worker_count=config.data.workers)
    data_iter = iter(loader)

    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", save_every=config.checkpoint_every,
                                         keep=config.keep_checkpoints, async_save=config.async_checkpoints)
    state = checkpointer.restore(state_spec.abstract, data_iter)
    if state is None:
        state = state_spec.init()
        print(f"starting from scratch in {workdir}", flush=True)
    else:
        print(f"resumed from step {int(state.step)} in {workdir}", flush=True)
    start = int(state.step)

    train_step = ts.make_train_step(
        functools.partial(classification_loss, model), tx, mesh=mesh, rules=rules,
        state_shardings=state_spec.shardings, batch_shardings=batch_shardings, seed=config.seed,
        accum_steps=config.grad_accum_steps, ema_decay=config.ema_decay or None,
    )
    writer = metrics_lib.make_writer(workdir, config.total_steps, console_keys=("loss", "accuracy"))
    if start == 0:
        writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items() if isinstance(v, (int, float, str, bool))})
    actions = metrics_lib.make_periodic_actions(workdir, config.total_steps, writer, profile_steps=config.profile_steps)

    eval_metrics: dict = {}
    for step in range(start, config.total_steps):
        batch = pipeline.to_global(next(data_iter), batch_shardings)
        state, metrics = train_step(state, batch)
        done = step + 1
        for action in actions:
            action(done)
        if done % config.log_every == 0 or done == config.total_steps:
            writer.write_scalars(done, {f"train/{k}": v for k, v in jax.device_get(metrics).items()})
        if config.eval_every and (done % config.eval_every == 0 or done == config.total_steps):
            eval_params = state.ema_params if state.ema_params is not None else state.params
            eval_metrics = evaluate(model, eval_params, dataset, config, mesh, rules, batch_shardings)
            writer.write_scalars(done, eval_metrics)
        checkpointer.save(done, state, data_iter, force=done == config.total_steps)
    checkpointer.close()
    writer.flush()
    print(f"done: {config.total_steps} steps; checkpoints in {checkpointer.directory}, "
          f"TensorBoard events in {workdir / 'tensorboard'}, metrics table {workdir / 'metrics.csv'}", flush=True)
    return eval_metrics


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
