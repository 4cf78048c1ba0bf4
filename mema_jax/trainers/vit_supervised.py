"""Trainer: a ViT disease (and severity) classifier on a MeMa-layout folder -- the Tab. 10
"ViT (Supervised)" medical encoder.

The model is ``models.vit.ViTClassifier`` (a ViT and linear heads on its class token); the loss and
the evaluation are the quickstart classifier's (``trainers.classifier``): disease cross-entropy plus
0.5 x severity cross-entropy where a severity label exists, top-1 disease accuracy (overall and per
class) on ``config.eval_split``.  At the end the encoder alone (the ViT, no heads; EMA weights when
EMA is on) is written to ``<workdir>/encoder/`` (config.json + params.safetensors), which
``models.vit.load_vit_encoder`` reads for the de-identifier.  Run it through ``launch.main``
(configs/vit_encoder.py).
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils

from mema_jax.core import loop
from mema_jax.core import train_state as ts
from mema_jax.core.optim import make_optimizer
from mema_jax.data import layout, pipeline, tfds_mema
from mema_jax.models import vit
from mema_jax.trainers.classifier import classification_loss, make_evaluator

ENCODER_DIR = "encoder"


def make_model(config, precision: ts.Precision) -> vit.ViTClassifier:
    return vit.ViTClassifier(
        vit.encoder_config_of(config.model.encoder, config.data.image_size),
        heads=(("disease", len(layout.DISEASES)), ("severity", len(layout.SEVERITIES))),
        attention_impl=config.model.attention_impl, remat=config.model.remat,
        dtype=precision.compute_dtype, param_dtype=precision.param_dtype)


def build(config, mesh, rules) -> dict:
    """Everything a run needs on ``mesh``: dict(model, state_spec, train_step, shardings)."""
    model = make_model(config, ts.Precision.from_config(config.precision))
    tx = make_optimizer(config.optim, config.total_steps)
    size, batch = config.data.image_size, config.batch_size
    state_spec = ts.sharded_state(lambda rng: model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32))["params"],
                                  tx, mesh, rules, seed=config.seed, use_ema=config.ema_decay > 0,
                                  warn_replicated_bytes=loop.replicated_warning_bytes(config))
    shardings = loop.batch_shardings(mesh, rules, {"image": (batch, size, size, 3), "label": (batch,),
                                                   "severity": (batch,), "index": (batch,)})
    train_step = ts.make_train_step(functools.partial(classification_loss, model), tx, mesh=mesh, rules=rules,
                                    state_shardings=state_spec.shardings, batch_shardings=shardings, seed=config.seed,
                                    accum_steps=config.grad_accum_steps, ema_decay=config.ema_decay or None)
    return dict(model=model, state_spec=state_spec, train_step=train_step, shardings=shardings)


def export_encoder(folder: Path, model: vit.ViTClassifier, state: ts.TrainState) -> None:
    """The state's encoder (EMA weights if kept) as a ``load_vit_encoder`` folder; an existing
    complete folder is left as it is (a finished run started again).  Every process calls it."""
    if (folder / vit.CONFIG_FILE).exists():
        return
    params = (state.ema_params if state.ema_params is not None else state.params)["encoder"]
    if jax.process_count() > 1:  # each process holds only its shards; a collective, so all take part
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        vit.save_vit_encoder(folder, model.config, params,
                             {"trained_as": "supervised", "step": int(jax.device_get(state.step))})
        print(f"wrote the encoder to {folder}", flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    mesh, rules = loop.mesh_and_rules(config)
    dataset = tfds_mema.open_configured_dataset(
        config.data, config.data.synth if config.data.generate_if_missing else None, config.data.verify_images)
    parts = build(config, mesh, rules)
    loader = pipeline.make_loader(dataset, "train", global_batch_size=config.batch_size,
                                  image_size=config.data.image_size, seed=config.seed, augment=config.data.augment,
                                  worker_count=config.data.workers)
    evaluate = None
    if config.eval_every:
        evaluate = make_evaluator(parts["model"], dataset, config, mesh, rules, parts["state_spec"].shardings.params,
                                  parts["shardings"])
    return loop.run(config, workdir, state_spec=parts["state_spec"], train_step=parts["train_step"],
                    data_iter=iter(loader), batch_shardings=parts["shardings"], evaluate=evaluate,
                    on_finish=lambda state: export_encoder(Path(workdir) / ENCODER_DIR, parts["model"], state),
                    console_keys=("loss", "accuracy"))
