"""The learning objective of MedSem-DeID (paper, "Learning Objectives"):

    L = L_deid + L_rev-id + L_wrong + lambda_med L_med + lambda_rev L_rev + L_GAN

    L_deid   = cos(phi(X), phi(X_enc))        identity of the de-identified image away from X
    L_rev-id = -cos(phi(X), phi(X_hat))       the recovered image keeps X's identity
    L_wrong  = cos(phi(X), phi(X_wrong))      a wrong password does not recover it
    L_med    = l2(f_med, Enc_med(X_enc))      medical semantics kept (mean squared error)
    L_rev    = l1(X, X_hat)                   the recovered image looks like X (mean absolute error)
    L_GAN    non-saturating logistic GAN loss on X_enc, X_hat and X_wrong ("all images")

and one term of ours (weight ``lambda_sep``, see ``separation_loss``):

    L_sep    = relu(m - l1(X_hat, X_wrong)) + relu(m + l1(X, X_hat) - l1(X, X_wrong))
             a wrong password must change the output, away from X

phi is the frozen ArcFace; cos is the cosine similarity of its features, averaged over the batch.
Each function takes plain arrays, so each term can be checked against a hand computation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cosine(a, b, eps: float = 1e-8):
    """Per-row cosine similarity of (B, D) features."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + eps)


def deid_loss(phi_x, phi_enc):
    return jnp.mean(cosine(phi_x, phi_enc))


def rev_id_loss(phi_x, phi_hat):
    return -jnp.mean(cosine(phi_x, phi_hat))


def wrong_loss(phi_x, phi_wrong):
    return jnp.mean(cosine(phi_x, phi_wrong))


def med_loss(f_med, f_med_enc):
    return jnp.mean(jnp.square(f_med.astype(jnp.float32) - f_med_enc.astype(jnp.float32)))


def rev_loss(x, x_hat):
    return jnp.mean(jnp.abs(x.astype(jnp.float32) - x_hat.astype(jnp.float32)))


def separation_loss(x, x_hat, x_wrong, margin: float):
    """Per-image hinges that make a wrong password change the output, and change it away from X.

    Why it is needed: at a decryptor that ignores its password, X_hat and X_wrong are one image, so
    L_rev-id and L_wrong cancel and, with passwords drawn at random, every first-order gradient toward
    using the password averages to zero (measured: psnr_wrong = psnr_rec to 0.1 dB after training).
      relu(margin - l1(X_hat, X_wrong)): an L1 distance is sharp at zero, so its gradient grows any
          difference the password makes, with no part that moves X_hat and X_wrong together;
      relu(margin + l1(X, X_hat) - l1(X, X_wrong)): the wrong output must be farther from X than the
          right one by the margin (without it X_wrong drifts as close to X as X_hat is).
    l1 is the mean absolute difference of [-1, 1] images."""
    def l1(a, b):
        return jnp.mean(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(1, 2, 3))

    apart = jax.nn.relu(margin - l1(x_hat, x_wrong))
    farther = jax.nn.relu(margin + l1(x, x_hat) - l1(x, x_wrong))
    return jnp.mean(apart + farther)


def generator_gan_loss(fake_logits):
    """-log D(fake): the generator wants its images judged real."""
    return jnp.mean(jax.nn.softplus(-fake_logits.astype(jnp.float32)))


def discriminator_gan_loss(real_logits, fake_logits):
    """-log D(real) - log(1 - D(fake))."""
    return jnp.mean(jax.nn.softplus(-real_logits.astype(jnp.float32))) + jnp.mean(
        jax.nn.softplus(fake_logits.astype(jnp.float32)))


def r1_penalty(discriminator_fn, real):
    """R1 (Mescheder et al. 2018): the squared gradient norm of D at real images, which keeps a
    small-data discriminator from overfitting (optional; weight ``gan.r1``)."""
    grad = jax.grad(lambda x: jnp.sum(discriminator_fn(x)))(real)
    return jnp.mean(jnp.sum(jnp.square(grad), axis=(1, 2, 3)))


def psnr(x, y, data_range: float = 2.0):
    """Per-image PSNR in dB of images in [-1, 1] (range 2)."""
    mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-10))
