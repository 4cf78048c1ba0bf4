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

from pathlib import Path

import ml_collections

from mema_jax.core import loop
from mema_jax.core import train_state as ts
from mema_jax.data import layout
from mema_jax.models import vit
from mema_jax.trainers import common
from mema_jax.trainers.classifier import classification_loss, make_evaluator

ENCODER_DIR = common.ENCODER_DIR


def make_model(config, precision: ts.Precision) -> vit.ViTClassifier:
    return vit.ViTClassifier(
        vit.encoder_config_of(config.model.encoder, config.data.image_size),
        heads=(("disease", len(layout.DISEASES)), ("severity", len(layout.SEVERITIES))),
        attention_impl=config.model.attention_impl, remat=config.model.remat,
        dtype=precision.compute_dtype, param_dtype=precision.param_dtype)


def build(config, mesh, rules) -> common.Built:
    """Everything a run needs on ``mesh``: the model, its sharded state, the jitted step, the batch shardings."""
    model = make_model(config, ts.Precision.from_config(config.precision))
    return common.build(config, mesh, rules, model, classification_loss, (common.zero_images(config),))


def export_encoder(folder: Path, model: vit.ViTClassifier, state: ts.TrainState) -> None:
    """The encoder alone (no heads) as a ``load_vit_encoder`` folder (``common.export_vit_encoder``)."""
    common.export_vit_encoder(folder, model.config, state, {"trained_as": "supervised"})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    mesh, rules = loop.mesh_and_rules(config)
    built = build(config, mesh, rules)
    return common.run(config, workdir, built, common.open_dataset(config), make_evaluator,
                      console_keys=("loss", "accuracy"),
                      on_finish=lambda state: export_encoder(Path(workdir) / ENCODER_DIR, built.model, state))
