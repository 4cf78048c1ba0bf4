"""Trainer: a masked auto-encoder (He et al. 2022) on the images of a MeMa-layout folder -- the
Tab. 10 "ViT (MAE)" medical encoder.

The model is ``models.vit.MAE``: each step masks ``config.mae.mask_ratio`` of every image's patches
at random (the noise is drawn from the step's RNG, a function of (seed, step), so a resumed run
masks exactly as the uninterrupted one), encodes the visible patches with the ViT, decodes all of
them, and minimises the MSE over the masked patches (per-patch normalised targets when
``config.mae.norm_pix_loss``, MAE's default).  No labels are used.  Evaluation: the same loss on
``config.eval_split`` with a fixed mask per image (noise from ``config.eval_mask_seed`` and the
image's row, so it does not depend on the batch size), averaged over images.  At the end the
encoder alone is written to ``<workdir>/encoder/`` (config.json + params.safetensors) for
``models.vit.load_vit_encoder``.  Run it through ``launch.main`` (configs/vit_encoder.py).
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mema_jax.core import loop
from mema_jax.core import train_state as ts
from mema_jax.core.compile import jit
from mema_jax.data import pipeline
from mema_jax.models import vit
from mema_jax.trainers import common

ENCODER_DIR = common.ENCODER_DIR


def make_model(config, precision: ts.Precision) -> vit.MAE:
    m = config.mae
    return vit.MAE(
        vit.encoder_config_of(config.model.encoder, config.data.image_size),
        vit.MAEConfig(mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss, decoder_width=m.decoder_width,
                      decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads, decoder_mlp_dim=m.decoder_mlp_dim),
        attention_impl=config.model.attention_impl, remat=config.model.remat,
        dtype=precision.compute_dtype, param_dtype=precision.param_dtype)


def mae_loss(model: vit.MAE, params, frozen, batch, rng):
    del frozen
    noise = jax.random.uniform(rng, (batch["image"].shape[0], model.config.num_patches))
    out = model.apply({"params": params}, batch["image"], noise)
    return out["loss"], {"masked_fraction": jnp.mean(out["mask"])}


def eval_noise(seed: int, index, num_patches: int):
    """Masking noise (B, N) that depends only on (seed, each image's row index)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(base, i), (num_patches,)))(index)


def make_evaluator(model: vit.MAE, dataset, config, mesh, rules, params_shardings, batch_shardings):
    """``evaluate(state)``: the masked-patch loss on ``config.eval_split`` at fixed masks."""
    shardings = {k: batch_shardings[k] for k in ("image", "index")}
    per_sample = loop.in_mesh(jit(
        lambda p, images, index: model.apply({"params": p}, images,
                                             eval_noise(config.eval_mask_seed, index, model.config.num_patches))
        ["per_sample"], in_shardings=(params_shardings, shardings["image"], shardings["index"])), mesh, rules)

    def evaluate(state: ts.TrainState) -> dict:
        params = common.eval_params(state)
        loader = pipeline.make_loader(dataset, config.eval_split, global_batch_size=config.batch_size,
                                      image_size=config.data.image_size, seed=0, shuffle=False, num_epochs=1,
                                      augment=False, drop_remainder=False)
        losses = [loop.fetch(per_sample(params, b["image"], b["index"]))[rows]
                  for b, rows, _ in loop.padded_batches(loader, shardings, config.batch_size)]
        return {"eval/masked_patch_loss": float(np.mean(np.concatenate(losses).astype(np.float64)))}

    return evaluate


def build(config, mesh, rules) -> common.Built:
    """Everything a run needs on ``mesh``: the model, its sharded state, the jitted step, the batch shardings."""
    model = make_model(config, ts.Precision.from_config(config.precision))
    noise = jnp.zeros((1, model.config.num_patches))
    return common.build(config, mesh, rules, model, mae_loss, (common.zero_images(config), noise))


def export_encoder(folder: Path, model: vit.MAE, state: ts.TrainState) -> None:
    """The encoder alone (no decoder) as a ``load_vit_encoder`` folder (``common.export_vit_encoder``)."""
    common.export_vit_encoder(folder, model.config, state, {"trained_as": "mae", "mask_ratio": model.mae.mask_ratio})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    mesh, rules = loop.mesh_and_rules(config)
    built = build(config, mesh, rules)
    return common.run(config, workdir, built, common.open_dataset(config), make_evaluator,
                      console_keys=("loss", "masked_patch_loss"),
                      on_finish=lambda state: export_encoder(Path(workdir) / ENCODER_DIR, built.model, state))
