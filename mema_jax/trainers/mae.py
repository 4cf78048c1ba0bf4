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

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mema_jax.core import loop
from mema_jax.core import train_state as ts
from mema_jax.core.compile import jit
from mema_jax.core.optim import make_optimizer
from mema_jax.data import pipeline, tfds_mema
from mema_jax.models import vit

ENCODER_DIR = "encoder"


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
        params = state.ema_params if state.ema_params is not None else state.params
        loader = pipeline.make_loader(dataset, config.eval_split, global_batch_size=config.batch_size,
                                      image_size=config.data.image_size, seed=0, shuffle=False, num_epochs=1,
                                      augment=False, drop_remainder=False)
        losses = [loop.fetch(per_sample(params, b["image"], b["index"]))[rows]
                  for b, rows, _ in loop.padded_batches(loader, shardings, config.batch_size)]
        return {"eval/masked_patch_loss": float(np.mean(np.concatenate(losses).astype(np.float64)))}

    return evaluate


def build(config, mesh, rules) -> dict:
    """Everything a run needs on ``mesh``: dict(model, state_spec, train_step, shardings)."""
    model = make_model(config, ts.Precision.from_config(config.precision))
    tx = make_optimizer(config.optim, config.total_steps)
    size, batch, n = config.data.image_size, config.batch_size, model.config.num_patches
    state_spec = ts.sharded_state(
        lambda rng: model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), jnp.zeros((1, n)))["params"],
        tx, mesh, rules, seed=config.seed, use_ema=config.ema_decay > 0,
        warn_replicated_bytes=loop.replicated_warning_bytes(config))
    shardings = loop.batch_shardings(mesh, rules, {"image": (batch, size, size, 3), "label": (batch,),
                                                   "severity": (batch,), "index": (batch,)})
    train_step = ts.make_train_step(functools.partial(mae_loss, model), tx, mesh=mesh, rules=rules,
                                    state_shardings=state_spec.shardings, batch_shardings=shardings, seed=config.seed,
                                    accum_steps=config.grad_accum_steps, ema_decay=config.ema_decay or None)
    return dict(model=model, state_spec=state_spec, train_step=train_step, shardings=shardings)


def export_encoder(folder: Path, model: vit.MAE, state: ts.TrainState) -> None:
    """The state's encoder (EMA weights if kept) as a ``load_vit_encoder`` folder; an existing
    complete folder is left as it is (a finished run started again).  Every process calls it."""
    if (folder / vit.CONFIG_FILE).exists():
        return
    params = (state.ema_params if state.ema_params is not None else state.params)["encoder"]
    if jax.process_count() > 1:  # each process holds only its shards; a collective, so all take part
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        vit.save_vit_encoder(folder, model.config, params, {"trained_as": "mae", "mask_ratio": model.mae.mask_ratio,
                                                            "step": int(jax.device_get(state.step))})
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
                    console_keys=("loss", "masked_patch_loss"))
