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

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deid_jax import export as model_folder
from deid_jax import losses
from deid_jax import medical_encoder as med_lib
from deid_jax.model import DeidConfig, MedSemDeID, PatchDiscriminator
from deid_jax.passwords import random_passwords
from mema_jax.core import loop
from mema_jax.core import train_state as ts
from mema_jax.core.compile import jit
from mema_jax.core.optim import make_optimizer
from mema_jax.data import layout, pipeline
from mema_jax.models import face_align
from mema_jax.trainers import common
from mema_jax.models.convert_iresnet import load_iresnet
from mema_jax.models.iresnet import INPUT_SIZE

CROPS = ("landmarks", "whole")


def open_dataset(config) -> layout.MeMaDataset:
    """The training folder; ``data.diseases`` keeps only those diseases (Tab. 9's M1: healthy faces)."""
    d = config.data
    dataset = common.open_dataset(config)
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


@dataclasses.dataclass(frozen=True)
class DeidParts:
    """What a MedSem-DeID step is built from."""

    config: DeidConfig
    generator: MedSemDeID
    discriminator: PatchDiscriminator
    phi: Callable                 # (frozen, images, landmarks) -> ArcFace features
    run_generator: Callable       # (params, frozen, x, rng) -> (generator outputs, f_med or None)
    generator_loss: Callable      # (params, frozen, batch, rng) -> (loss, metrics)
    discriminator_loss: Callable


def make_parts(config, med, identity) -> DeidParts:
    """The generator and discriminator modules, phi, and the loss of each."""
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

    def run_generator(params, frozen, x, rng):
        """The generator on ``x`` with a random right and wrong password per sample drawn from ``rng``."""
        r_p, r_w = jax.random.split(rng)
        password, wrong = random_passwords(r_p, x.shape[0], cfg.password_dim), random_passwords(r_w, x.shape[0], cfg.password_dim)
        f_med = med.apply(frozen["med"], x) if med is not None else None
        out = generator.apply({"params": params["generator"]}, x, f_med if cfg.med_channels else None, password, wrong)
        return out, f_med

    def generator_loss(params, frozen, batch, rng):
        x, marks = batch["image"], batch.get("landmarks")
        out, f_med = run_generator(params, frozen, x, rng)
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
        if lw.get("lambda_ae"):
            x_ae = generator.apply({"params": params["generator"]}, out.f, method=MedSemDeID.decode)
            terms["ae"] = losses.rev_loss(x, x_ae)
            total = total + lw.lambda_ae * terms["ae"]
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
        out, _ = run_generator(params, frozen, batch["image"], rng)
        fakes = jax.lax.stop_gradient(jnp.concatenate([out.x_enc, out.x_hat, out.x_wrong]))

        def d(images):
            return discriminator.apply({"params": params["discriminator"]}, images)

        loss = losses.discriminator_gan_loss(d(batch["image"]), d(fakes))
        metrics = {"gan": loss}
        if config.gan.r1:
            metrics["r1"] = losses.r1_penalty(d, batch["image"])
            loss = loss + 0.5 * config.gan.r1 * metrics["r1"]
        return loss, metrics

    return DeidParts(cfg, generator, discriminator, phi, run_generator, generator_loss, discriminator_loss)


def make_evaluator(config, parts: DeidParts, med, dataset, mesh, rules, params_shardings, batch_shardings,
                   frozen, frozen_shardings):
    """``evaluate(state)`` on the validation split with fixed passwords (the same for every
    evaluation): PSNR of X_hat and X_wrong, phi's cosine of X to X_enc / X_hat / X_wrong, and L_med.
    Compiled once."""
    keys = [k for k in ("image", "landmarks") if k in batch_shardings]
    phi = parts.phi

    def metrics(params, frozen, batch, index):
        x, marks = batch["image"], batch.get("landmarks")
        out, f_med = parts.run_generator(params, frozen, x, jax.random.fold_in(jax.random.key(4321), index))
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


def export(workdir: Path, cfg: DeidConfig, config, med, params, dataset=None) -> Path:
    """``<workdir>/model/`` (``deid_jax.export``): the generator, its settings and its medical encoder."""
    out = workdir / model_folder.MODEL_DIR
    if out.exists():
        return out
    generator = loop.fetch(params["generator"])  # every process: a gather
    if jax.process_index() != 0:
        return out
    return model_folder.save(out, cfg, generator, med, config.identity.crop,
                             None if dataset is None else face_template(dataset))


def face_template(dataset, limit: int = 500) -> np.ndarray | None:
    """The mean five points of (up to ``limit``) training faces recorded in faces.csv, as fractions of
    the image's width and height (pixel centres at integers: u = (x + 0.5) / width): the crop whole
    photos are aligned to (photos.align).  None when the data records no faces."""
    from PIL import Image

    if dataset.faces is None:
        return None
    points = []
    for r in dataset.split("train")[:limit]:
        face = dataset.face(r)
        if face is None:
            continue
        try:
            with Image.open(dataset.image_path(r)) as im:
                size = np.array(im.size, np.float64)
        except OSError:
            continue
        points.append((face.landmarks_array() + 0.5) / size)
    return np.mean(points, axis=0) if points else None


def parameter_groups(config, med, parts: DeidParts, total_steps: int):
    """(init_params(rng) -> params, optimizers, losses) of the step's parameter groups: the
    generator, and the discriminator when ``loss.lambda_gan`` > 0, each with its own Adam."""

    def init_params(rng):
        r_g, r_d = jax.random.split(rng)
        params = {"generator": model_folder.init_generator(parts.config, med, r_g)}
        if config.loss.lambda_gan:
            x = jnp.zeros((1, config.data.image_size, config.data.image_size, 3))
            params["discriminator"] = parts.discriminator.init(r_d, x)["params"]
        return params

    tx = {"generator": make_optimizer(config.optim, total_steps)}
    loss_fns = {"generator": parts.generator_loss}
    if config.loss.lambda_gan:
        tx["discriminator"] = make_optimizer(config.optim_discriminator, total_steps)
        loss_fns["discriminator"] = parts.discriminator_loss
    return init_params, tx, loss_fns


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    workdir = Path(workdir)
    mesh, rules = loop.mesh_and_rules(config)
    dataset = open_dataset(config)
    med = load_medical_encoder(config, mesh, rules)
    identity = load_iresnet(config.identity.weights, mesh=mesh, rules=rules)
    parts = make_parts(config, med, identity)
    batch = config.batch_size
    with_faces = config.identity.crop == "landmarks"

    frozen = {"identity": identity[1]}
    if med is not None:
        frozen["med"] = med.params
    frozen, frozen_shardings = ts.place_frozen(frozen, mesh, rules, loop.replicated_warning_bytes(config))

    init_params, tx, loss_fns = parameter_groups(config, med, parts, config.total_steps)
    state_spec = ts.sharded_state(init_params, tx, mesh, rules, seed=config.seed,
                                  warn_replicated_bytes=loop.replicated_warning_bytes(config))
    shapes = common.batch_shapes(config, **({"landmarks": (batch, 5, 2)} if with_faces else {}))
    shardings = loop.batch_shardings(mesh, rules, shapes)
    train_step = ts.make_train_step(loss_fns, tx, mesh=mesh, rules=rules, state_shardings=state_spec.shardings,
                                    batch_shardings=shardings, frozen_shardings=frozen_shardings, seed=config.seed,
                                    accum_steps=config.grad_accum_steps)
    loader = common.train_loader(config, dataset, with_faces=with_faces)
    evaluate = None
    if config.eval_every:
        evaluate = make_evaluator(config, parts, med, dataset, mesh, rules, state_spec.shardings.params,
                                  shardings, frozen, frozen_shardings)

    def finish(state):
        out = export(workdir, parts.config, config, med, state.params, dataset)
        if jax.process_index() == 0:
            print(f"exported the de-identifier: {out}", flush=True)

    return loop.run(config, workdir, state_spec=state_spec, train_step=train_step, data_iter=iter(loader),
                    batch_shardings=shardings, frozen=frozen, evaluate=evaluate, on_finish=finish,
                    console_keys=("loss", "psnr_rec", "deid"))
