"""Trainer: MedSem-DeID (paper, Fig. 5 and "Learning Objectives") on a MeMa-layout folder.

Run through ``launch.main`` with configs/medsem_deid.py.  The generator (image encoder, fusion,
ID-Encryptor, ID-Decryptor, decoder; ``deid_jax.model``) and a PatchGAN discriminator are two
parameter groups with their own Adam optimizers, updated in one jitted step (the generator first,
then the discriminator against the updated generator).  Frozen step arguments: the ArcFace phi
of the identity terms (an arcface_torch ``backbone.pth`` / insightface ONNX, through
``mema_jax.models.convert_iresnet``) and the medical encoder Enc_med (``deid_jax.medical_encoder``).
Each sample gets a random password and a random wrong one per step; no passphrase is ever seen
here.  Faces for phi are aligned onto ArcFace's 112 x 112 template from the dataset's five points
(faces.csv) with a differentiable warp, or the whole image is resized (``identity.crop``).

At the end ``<workdir>/model/`` holds what ``deid_jax.deidentify`` needs: ``deid_config.json``,
``generator.safetensors`` and the medical encoder's kept weights (``medical_encoder/``).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deid_jax import losses
from deid_jax import medical_encoder as med_lib
from deid_jax.model import DeidConfig, MedSemDeID, PatchDiscriminator
from deid_jax.passwords import random_passwords
from mema_jax.core import loop
from mema_jax.core import train_state as ts
from mema_jax.core.compile import jit
from mema_jax.core.optim import make_optimizer
from mema_jax.data import layout, pipeline, tfds_mema
from mema_jax.fileio import atomic_folder, atomic_write_bytes
from mema_jax.models import face_align, param_tree, weights
from mema_jax.models.convert_iresnet import load_iresnet
from mema_jax.models.iresnet import INPUT_SIZE

MODEL_DIR = "model"
CONFIG_FILE = "deid_config.json"
GENERATOR_FILE = "generator.safetensors"
MEDICAL_DIR = "medical_encoder"
CROPS = ("landmarks", "whole")


def open_dataset(config) -> layout.MeMaDataset:
    """The training folder; ``data.diseases`` keeps only those diseases (Tab. 9's M1: healthy faces)."""
    d = config.data
    dataset = tfds_mema.open_configured_dataset(d, d.synth if d.generate_if_missing else None, d.verify_images)
    if d.diseases:
        unknown = sorted(set(d.diseases) - set(layout.DISEASES))
        if unknown:
            raise ValueError(f"data.diseases: unknown {unknown}; choose from {layout.DISEASES}")
        kept = [r for r in dataset.records if r.disease in d.diseases or r.split != "train"]
        dataset = dataset.subset(kept)  # keeps its storage (folder or ArrayRecord shards)
    return dataset


def load_medical_encoder(config, mesh, rules):
    """Enc_med, or None when neither f_med (model.med_channels) nor L_med (lambda_med) uses it."""
    m = config.medical_encoder
    if not config.model.med_channels and not config.loss.lambda_med:
        return None
    if m.kind == "diffusion":
        return med_lib.diffusion_encoder(m.source, num_down_blocks=m.num_down_blocks, timestep=m.timestep,
                                         lora_file=m.lora or None, mesh=mesh, rules=rules)
    if m.kind == "vit":
        return med_lib.vit_encoder(m.source, mesh=mesh, rules=rules)
    if m.kind == "saved":
        return med_lib.load(m.source, mesh=mesh, rules=rules)
    raise ValueError(f"medical_encoder.kind is {m.kind!r}; choose diffusion, vit or saved")


def deid_config(config, med) -> DeidConfig:
    d = dict(config.model.to_dict(), image_size=config.data.image_size)
    if d["med_channels"]:
        if med is None:
            raise ValueError("model.med_channels > 0 needs a medical encoder")
        d["med_channels"] = med.channels
    return DeidConfig.from_dict(d)


def identity_inputs(images, landmarks, crop: str):
    """[-1, 1] images -> ArcFace's (B, 112, 112, 3) input (black border = -1)."""
    if crop == "landmarks":
        return face_align.align_faces(images, landmarks, fill=-1.0)
    return jax.image.resize(images, (images.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "linear", antialias=True)


def _tiled(landmarks, times: int):
    """Landmarks for a batch made of ``times`` copies of the batch (None stays None)."""
    return None if landmarks is None else jnp.concatenate([landmarks] * times)


def make_parts(config, med, identity):
    """The generator and discriminator modules and the loss of each."""
    cfg = deid_config(config, med)
    generator = MedSemDeID(cfg)
    discriminator = PatchDiscriminator(tuple(config.gan.widths))
    id_model, _ = identity
    lw = config.loss
    crop = config.identity.crop
    if crop not in CROPS:
        raise ValueError(f"identity.crop is {crop!r}; choose one of {CROPS}")

    def phi(frozen, images, landmarks):
        return id_model.apply(frozen["identity"], identity_inputs(images, landmarks, crop), train=False)

    def forward(params, frozen, batch, rng):
        x = batch["image"]
        r_p, r_w = jax.random.split(rng)
        password, wrong = random_passwords(r_p, x.shape[0], cfg.password_dim), random_passwords(r_w, x.shape[0], cfg.password_dim)
        f_med = med.apply(frozen["med"], x) if med is not None else None
        out = generator.apply({"params": params["generator"]}, x, f_med if cfg.med_channels else None, password, wrong)
        return out, f_med

    def generator_loss(params, frozen, batch, rng):
        x, marks = batch["image"], batch.get("landmarks")
        out, f_med = forward(params, frozen, batch, rng)
        phi_x = jax.lax.stop_gradient(phi(frozen, x, marks))
        fakes = jnp.concatenate([out.x_enc, out.x_hat, out.x_wrong])
        # One ArcFace batch of 3B for the three outputs (the same values as three calls; one pass).
        phi_enc, phi_hat, phi_wrong = jnp.split(phi(frozen, fakes, _tiled(marks, 3)), 3)
        terms = {
            "deid": losses.deid_loss(phi_x, phi_enc),
            "rev_id": losses.rev_id_loss(phi_x, phi_hat),
            "wrong": losses.wrong_loss(phi_x, phi_wrong),
            "rev": losses.rev_loss(x, out.x_hat),
        }
        total = terms["deid"] + terms["rev_id"] + terms["wrong"] + lw.lambda_rev * terms["rev"]
        if lw.lambda_sep:
            terms["sep"] = losses.separation_loss(x, out.x_hat, out.x_wrong, lw.sep_margin)
            total = total + lw.lambda_sep * terms["sep"]
        if lw.lambda_med:
            terms["med"] = losses.med_loss(jax.lax.stop_gradient(f_med), med.apply(frozen["med"], out.x_enc))
            total = total + lw.lambda_med * terms["med"]
        if lw.lambda_gan:
            terms["gan"] = losses.generator_gan_loss(discriminator.apply({"params": params["discriminator"]}, fakes))
            total = total + lw.lambda_gan * terms["gan"]
        terms["psnr_rec"] = jnp.mean(losses.psnr(out.x_hat, x))
        return total, terms

    def discriminator_loss(params, frozen, batch, rng):
        out, _ = forward(params, frozen, batch, rng)
        fakes = jax.lax.stop_gradient(jnp.concatenate([out.x_enc, out.x_hat, out.x_wrong]))

        def d(images):
            return discriminator.apply({"params": params["discriminator"]}, images)

        loss = losses.discriminator_gan_loss(d(batch["image"]), d(fakes))
        metrics = {"gan": loss}
        if config.gan.r1:
            metrics["r1"] = losses.r1_penalty(d, batch["image"])
            loss = loss + 0.5 * config.gan.r1 * metrics["r1"]
        return loss, metrics

    return cfg, generator, discriminator, phi, generator_loss, discriminator_loss


def make_evaluator(config, generator, phi, med, dataset, mesh, rules, params_shardings, batch_shardings,
                   frozen, frozen_shardings):
    """``evaluate(state)`` on the validation split with fixed passwords: PSNR of X_hat and X_wrong,
    phi's cosine of X to X_enc / X_hat / X_wrong, and L_med.  Compiled once."""
    cfg = generator.config
    keys = [k for k in ("image", "landmarks") if k in batch_shardings]

    def metrics(params, frozen, batch, index):
        x, marks = batch["image"], batch.get("landmarks")
        key = jax.random.fold_in(jax.random.key(4321), index)
        p, w = random_passwords(key, x.shape[0], cfg.password_dim), random_passwords(jax.random.fold_in(key, 1),
                                                                                      x.shape[0], cfg.password_dim)
        f_med = med.apply(frozen["med"], x) if med is not None else None
        out = generator.apply({"params": params["generator"]}, x, f_med if cfg.med_channels else None, p, w)
        phi_x = phi(frozen, x, marks)
        result = {"psnr_rec": losses.psnr(out.x_hat, x), "psnr_wrong": losses.psnr(out.x_wrong, x),
                  "id_cos_enc": losses.cosine(phi_x, phi(frozen, out.x_enc, marks)),
                  "id_cos_rec": losses.cosine(phi_x, phi(frozen, out.x_hat, marks)),
                  "id_cos_wrong": losses.cosine(phi_x, phi(frozen, out.x_wrong, marks))}
        if med is not None:
            result["med_l2"] = jnp.mean(jnp.square(f_med - med.apply(frozen["med"], out.x_enc)), axis=(1, 2, 3))
        return {k: jnp.mean(v) for k, v in result.items()}

    run = loop.in_mesh(jit(metrics, in_shardings=(params_shardings, frozen_shardings,
                                                       {k: batch_shardings[k] for k in keys}, None)), mesh, rules)

    def evaluate(state):
        loader = pipeline.make_loader(dataset, config.eval_split, global_batch_size=config.batch_size,
                                      image_size=config.data.image_size, seed=0, shuffle=False, num_epochs=1,
                                      augment=False, drop_remainder=True, with_faces="landmarks" in keys)
        rows = []
        for i, (batch, _, _) in enumerate(loop.padded_batches(loader, {k: batch_shardings[k] for k in keys},
                                                               config.batch_size)):
            if i >= config.eval_batches:
                break
            rows.append(loop.fetch(run(state.params, frozen, batch, jnp.int32(i))))
        return {f"eval/{k}": float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}

    return evaluate


def export(workdir: Path, cfg: DeidConfig, config, med, params) -> Path:
    """``<workdir>/model/``: the generator, its settings and the medical encoder it was trained with."""
    out = workdir / MODEL_DIR
    if out.exists():
        return out
    generator = loop.fetch(params["generator"])  # every process: a gather
    if jax.process_index() != 0:
        return out
    with atomic_folder(out) as tmp:
        weights.write_safetensors(tmp / GENERATOR_FILE, {k: np.asarray(v) for k, v in param_tree.flatten(generator).items()})
        settings = {"model": cfg.to_dict(), "identity_crop": config.identity.crop,
                    "medical_encoder": None if med is None or not cfg.med_channels else MEDICAL_DIR}
        atomic_write_bytes(tmp / CONFIG_FILE, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())
        if med is not None and cfg.med_channels:
            med_lib.save(med, tmp / MEDICAL_DIR)
    return out


def parameter_groups(config, med, generator, discriminator, g_loss, d_loss, total_steps: int):
    """(init_params(rng) -> params, optimizers, losses) of the step's parameter groups: the
    generator, and the discriminator when ``loss.lambda_gan`` > 0, each with its own Adam."""
    cfg, size = generator.config, config.data.image_size

    def init_params(rng):
        r_g, r_d = jax.random.split(rng)
        x = jnp.zeros((1, size, size, 3))
        p = jnp.zeros((1, cfg.password_dim))
        f_med = None
        if cfg.med_channels:
            f_med = jax.eval_shape(med.apply, med.params, x)
            f_med = jnp.zeros(f_med.shape, f_med.dtype)
        params = {"generator": generator.init(r_g, x, f_med, p, p)["params"]}
        if config.loss.lambda_gan:
            params["discriminator"] = discriminator.init(r_d, x)["params"]
        return params

    tx = {"generator": make_optimizer(config.optim, total_steps)}
    loss_fns = {"generator": g_loss}
    if config.loss.lambda_gan:
        tx["discriminator"] = make_optimizer(config.optim_discriminator, total_steps)
        loss_fns["discriminator"] = d_loss
    return init_params, tx, loss_fns


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    workdir = Path(workdir)
    mesh, rules = loop.mesh_and_rules(config)
    dataset = open_dataset(config)
    med = load_medical_encoder(config, mesh, rules)
    identity = load_iresnet(config.identity.weights, mesh=mesh, rules=rules)
    cfg, generator, discriminator, phi, g_loss, d_loss = make_parts(config, med, identity)
    size, batch = config.data.image_size, config.batch_size
    with_faces = config.identity.crop == "landmarks"

    frozen = {"identity": identity[1]}
    if med is not None:
        frozen["med"] = med.params
    frozen, frozen_shardings = ts.place_frozen(frozen, mesh, rules, loop.replicated_warning_bytes(config))

    init_params, tx, loss_fns = parameter_groups(config, med, generator, discriminator, g_loss, d_loss,
                                                 config.total_steps)
    state_spec = ts.sharded_state(init_params, tx, mesh, rules, seed=config.seed,
                                  warn_replicated_bytes=loop.replicated_warning_bytes(config))
    shapes = {"image": (batch, size, size, 3), "label": (batch,), "severity": (batch,), "index": (batch,)}
    if with_faces:
        shapes["landmarks"] = (batch, 5, 2)
    shardings = loop.batch_shardings(mesh, rules, shapes)
    train_step = ts.make_train_step(loss_fns, tx, mesh=mesh, rules=rules, state_shardings=state_spec.shardings,
                                    batch_shardings=shardings, frozen_shardings=frozen_shardings, seed=config.seed,
                                    accum_steps=config.grad_accum_steps)
    loader = pipeline.make_loader(dataset, "train", global_batch_size=batch, image_size=size, seed=config.seed,
                                  augment=config.data.augment, worker_count=config.data.workers, with_faces=with_faces)
    evaluate = None
    if config.eval_every:
        evaluate = make_evaluator(config, generator, phi, med, dataset, mesh, rules, state_spec.shardings.params,
                                  shardings, frozen, frozen_shardings)

    def finish(state):
        out = export(workdir, cfg, config, med, state.params)
        if jax.process_index() == 0:
            print(f"exported the de-identifier: {out}", flush=True)

    return loop.run(config, workdir, state_spec=state_spec, train_step=train_step, data_iter=iter(loader),
                    batch_shardings=shardings, frozen=frozen, evaluate=evaluate, on_finish=finish,
                    console_keys=("loss", "psnr_rec", "deid"))
