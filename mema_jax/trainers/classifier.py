"""Trainer: a disease (and severity) classifier on a MeMa-layout folder.

The quickstart model, the Med-Class yardstick of the offline tables, and a supervised medical
encoder (the paper's Tab. 10 "ViT (Supervised)" row compares such encoders).  It supplies its
model, loss and evaluation; ``mema_jax.core.loop`` does the rest.  Run it through ``launch.main``.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mema_jax.core import loop
from mema_jax.core import train_state as ts
from mema_jax.core.compile import jit
from mema_jax.data import layout, pipeline
from mema_jax.models.resnet_classifier import ResNetClassifier
from mema_jax.trainers import common


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


def classification_loss(model, params, frozen, batch, rng):
    del frozen, rng  # nothing frozen, and the model is deterministic
    logits = model.apply({"params": params}, batch["image"])
    disease = optax.softmax_cross_entropy_with_integer_labels(logits["disease"], batch["label"]).mean()
    has_sev = batch["severity"] >= 0
    sev_ce = optax.softmax_cross_entropy_with_integer_labels(logits["severity"], jnp.maximum(batch["severity"], 0))
    severity = jnp.sum(sev_ce * has_sev) / jnp.maximum(has_sev.sum(), 1)
    accuracy = jnp.mean(jnp.argmax(logits["disease"], -1) == batch["label"])
    return disease + 0.5 * severity, {"disease_ce": disease, "severity_ce": severity, "accuracy": accuracy}


def make_evaluator(model, dataset, config, mesh, rules, params_shardings, batch_shardings):
    """``evaluate(state)``: top-1 disease accuracy (overall and per class) on ``config.eval_split``.
    The prediction function is compiled once, on the first call."""
    image_sharding = {"image": batch_shardings["image"]}
    predict = loop.in_mesh(jit(
        lambda p, images: jnp.argmax(model.apply({"params": p}, images)["disease"], -1),
        in_shardings=(params_shardings, batch_shardings["image"])), mesh, rules)

    def evaluate(state: ts.TrainState) -> dict:
        params = common.eval_params(state)
        loader = pipeline.make_loader(dataset, config.eval_split, global_batch_size=config.batch_size,
                                      image_size=config.data.image_size, seed=0, shuffle=False, num_epochs=1,
                                      augment=False, drop_remainder=False)
        preds, labels = [], []
        for batch, rows, host in loop.padded_batches(loader, image_sharding, config.batch_size):
            preds.append(loop.fetch(predict(params, batch["image"]))[rows])
            labels.append(host["label"][rows])
        preds, labels = np.concatenate(preds), np.concatenate(labels)
        out = {"eval/accuracy": float(np.mean(preds == labels))}
        for i, name in enumerate(layout.DISEASES):
            if (labels == i).any():
                out[f"eval/accuracy_{name}"] = float(np.mean(preds[labels == i] == i))
        return out

    return evaluate


def build(config, mesh, rules) -> common.Built:
    """Everything a run needs on ``mesh``: the model, its sharded state, the jitted step, the batch shardings."""
    model = make_model(config, ts.Precision.from_config(config.precision))
    return common.build(config, mesh, rules, model, classification_loss, (common.zero_images(config),))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    mesh, rules = loop.mesh_and_rules(config)
    return common.run(config, workdir, build(config, mesh, rules), common.open_dataset(config), make_evaluator,
                      console_keys=("loss", "accuracy"))
