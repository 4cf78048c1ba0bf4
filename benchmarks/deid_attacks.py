r"""Wrong passwords and an inversion attack on a trained MedSem-DeID, on MeMa-Synth validation faces.

  python benchmarks/deid_attacks.py --model runs/deid_tables/full/model [--passphrases 1000] [--images 16]
  python benchmarks/deid_attacks.py --model runs/pipeline/deid/model --identity runs/pipeline/eval_identity/backbone.pth

Identity is scored by an ArcFace that no de-identifier was trained against: configs/identity.py:synth
with another seed (the losses' ArcFace is seed 0): ``--identity`` (the quickstart's eval_identity
stage is one), else trained here into <runs>/identity_eval on first use.  Faces are aligned from faces.csv; the match threshold is the cosine that best separates the
validation split's same- and different-identity pairs (its pair accuracy is reported).

1. Wrong passwords: each of N random passphrases (through the real scrypt KDF, at a lower cost
   than the CLI's, log2_n = 10, which changes nothing but speed) decrypts the images' f_enc; the
   fraction of X_wrong within the threshold of the original, and the cosine distribution.
2. Inversion attack: a conv encoder-decoder (deid_jax.model's encoder and decoder) trained with L1
   on (X_enc, X) pairs of the train split, each made with a fresh random passphrase, as an attacker
   with the trained de-identifier but no key would; scored on the validation images next to X_enc
   itself, a Gaussian blur of X (sigma 2 px) and the right password's recovery.

Writes <runs>/attacks.md (Markdown) and prints it.
"""
from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image, ImageFilter

from deid_jax import passwords
from deid_jax.deidentify import Deidentifier
from deid_jax.model import ConvEncoder, ImageDecoder
from mema_jax.data import layout
from mema_jax.fileio import atomic_write_bytes
from mema_jax.models import face_align
from mema_jax.models.convert_iresnet import load_iresnet


def load_split(root: Path, split: str, limit: int = 0):
    dataset = layout.read_dataset(root, verify_images=False)
    records = [r for r in dataset.records if r.split == split and dataset.face(r) is not None]
    records = records[:limit] if limit else records
    images = np.stack([np.asarray(Image.open(root / r.image).convert("RGB")) for r in records])
    marks = np.stack([dataset.face(r).landmarks_array() for r in records]).astype(np.float32)
    return records, images, marks


def identity_model(path: Path):
    module, variables = load_iresnet(path)

    @jax.jit
    def embed(images_uint8, marks):
        x = images_uint8.astype(jnp.float32) / 127.5 - 1.0
        e = module.apply(variables, face_align.align_faces(x, marks, fill=-1.0), train=False)
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

    def run(images, marks, batch=64):
        return np.concatenate([np.asarray(embed(images[i:i + batch], marks[i:i + batch]))
                               for i in range(0, len(images), batch)])
    return run


def best_threshold(embeddings, identities):
    """(threshold, pair accuracy) over all same pairs and as many different pairs."""
    sims = embeddings @ embeddings.T
    ids = np.asarray(identities)
    iu = np.triu_indices(len(ids), 1)
    same = ids[iu[0]] == ids[iu[1]]
    s_same, s_diff = sims[iu][same], sims[iu][~same]
    s_diff = np.random.default_rng(0).choice(s_diff, size=min(len(s_diff), max(len(s_same), 1)), replace=False)
    candidates = np.unique(np.concatenate([s_same, s_diff]))
    acc = [(np.mean(s_same >= t) + np.mean(s_diff < t)) / 2 for t in candidates]
    i = int(np.argmax(acc))
    return float(candidates[i]), float(acc[i]), len(s_same)


def row(name, cos, threshold):
    cos = np.asarray(cos)
    return (f"| {name} | {np.mean(cos >= threshold):.3f} | {np.mean(cos):.3f} | {np.percentile(cos, 5):.3f} | "
            f"{np.median(cos):.3f} | {np.percentile(cos, 95):.3f} | {np.max(cos):.3f} |")


def train_attacker(model: Deidentifier, images, steps: int, batch: int, seed: int = 0):
    cfg = model.config
    enc = ConvEncoder(cfg.encoder_widths, cfg.face_channels, cfg.norm_groups)
    dec = ImageDecoder(cfg.decoder_widths, cfg.norm_groups)

    def apply(params, x):
        return dec.apply({"params": params["dec"]}, enc.apply({"params": params["enc"]}, x))

    x0 = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"enc": enc.init(k1, x0)["params"]}
    params["dec"] = dec.init(k2, enc.apply({"params": params["enc"]}, x0))["params"]
    tx = optax.adam(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x_enc, x):
        loss, g = jax.value_and_grad(lambda p: jnp.mean(jnp.abs(apply(p, x_enc) - x)))(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    rng = np.random.default_rng(seed)
    for i in range(steps):
        idx = rng.choice(len(images), batch, replace=False)
        x = images[idx]
        keys = rng.standard_normal((batch, model.config.password_dim)).astype(np.float32)  # a fresh key per image
        x_enc = np.stack([model.deidentify(x[j:j + 1], keys[j])[0][0] for j in range(batch)])
        params, opt, loss = step(params, opt, jnp.asarray(x_enc, jnp.float32) / 127.5 - 1,
                                 jnp.asarray(x, jnp.float32) / 127.5 - 1)
        if (i + 1) % 50 == 0:
            print(f"attacker step {i + 1}/{steps}: L1 {float(loss):.4f}", flush=True)

    def invert(x_enc):
        y = jax.jit(apply)(params, jnp.asarray(x_enc, jnp.float32) / 127.5 - 1)
        return np.asarray(jnp.clip(jnp.round((y + 1) * 127.5), 0, 255).astype(jnp.uint8))
    return invert


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="data/mema_synth_64_3k")
    p.add_argument("--runs", default="runs/deid_attacks")
    p.add_argument("--passphrases", type=int, default=1000)
    p.add_argument("--images", type=int, default=16, help="validation images per wrong passphrase")
    p.add_argument("--attack-steps", type=int, default=300)
    p.add_argument("--attack-batch", type=int, default=16)
    p.add_argument("--identity", default="", help="an evaluation-only ArcFace backbone.pth (default: train one)")
    args = p.parse_args()
    runs, data = Path(args.runs), Path(args.data)
    backbone = Path(args.identity) if args.identity else runs / "identity_eval" / "backbone.pth"
    if args.identity and not backbone.is_file():
        p.error(f"--identity {backbone}: no such file")
    if not backbone.exists():
        subprocess.run([sys.executable, "-m", "launch.main", "--config=configs/identity.py:synth",
                        f"--workdir={runs / 'identity_eval'}", f"--config.data.root={data}", "--config.seed=1",
                        "--config.total_steps=100"], check=True)
    t0 = time.time()
    model = Deidentifier.load(args.model)
    embed = identity_model(backbone)
    val_records, val, val_marks = load_split(data, "val")
    threshold, pair_acc, n_same = best_threshold(embed(val, val_marks), [r.identity for r in val_records])
    key = passwords.KeyParams.new(log2_n=10)
    right = passwords.password_vector("the right passphrase", key)

    x, marks = val[: args.images], val_marks[: args.images]
    phi_x = embed(x, marks)
    x_enc, f_enc = model.deidentify(x, right)
    encrypted = x_enc if model.recovers_from_image else f_enc
    x_hat = model.recover(encrypted, right)
    wrong_cos = []
    for i in range(args.passphrases):
        x_wrong = model.recover(encrypted, passwords.password_vector(secrets.token_urlsafe(12), key))
        wrong_cos.append(np.sum(embed(x_wrong, marks) * phi_x, -1))
        if (i + 1) % 100 == 0:
            print(f"wrong passphrases: {i + 1}/{args.passphrases}", flush=True)
    wrong_cos = np.concatenate(wrong_cos)

    _, train, _ = load_split(data, "train")
    invert = train_attacker(model, train, args.attack_steps, args.attack_batch)
    x_enc_all, f_enc_all = model.deidentify(val, right)
    attacked = invert(x_enc_all)
    blurred = np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(2))) for im in val])
    phi_val = embed(val, val_marks)

    def cos_to_val(images):
        return np.sum(embed(images, val_marks) * phi_val, -1)

    lines = [
        f"MedSem-DeID attacks: model {args.model}, identity scored by {backbone} (never a training loss);",
        f"match threshold cosine {threshold:.3f} (pair accuracy {pair_acc:.3f} on {n_same} same + as many different "
        f"validation pairs). {time.time() - t0:.0f} s.",
        "",
        "| images | fraction matched to the original | mean cos | p5 | median | p95 | max |",
        "|---|---|---|---|---|---|---|",
        row(f"X_wrong: {args.passphrases} random passphrases x {len(x)} images", wrong_cos, threshold),
        row(f"X_hat: the right passphrase ({len(x)} images)", np.sum(embed(x_hat, marks) * phi_x, -1), threshold),
        row(f"inversion attack on X_enc ({len(val)} val images, {args.attack_steps} steps)", cos_to_val(attacked),
            threshold),
        row("X_enc itself", cos_to_val(x_enc_all), threshold),
        row("blur reference (Gaussian, sigma 2 px)", cos_to_val(blurred), threshold),
    ]
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(runs / "attacks.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
