"""The MedSem-DeID networks (paper, Fig. 5), NHWC, images in [-1, 1].

    X --image encoder--> f_face (C x H/s x W/s)          [paper: 512 x H/32]
    X --Enc_med (frozen)--> f_med --resized to H/s--> concat --> 3 residual blocks --> f
    f --tokens + password P--> ID-Encryptor (Transformer) --> f_enc --image decoder--> X_enc
    f_enc (or re-encode(quantise(X_enc))) --> ID-Decryptor (Transformer, P) --> f_hat --decoder--> X_hat
    the same with a wrong password --> X_wrong

How the password enters the Transformers (``password_mode``; the paper: "concatenate [the
flattened f] with the password vector P"):
  * ``token``: P projected to one extra token in front of the feature tokens (the paper's words);
  * ``cross_attention``: every block attends to P projected to a few memory tokens (as RiDDLE's
    mapper attends to its password);
  * ``modulation``: every block's LayerNorms are scaled and shifted by P (FiLM / adaLN).
``password_key``: ``sign_mask`` (default) also multiplies f_enc by a +-1 pattern drawn from P (a
keyed sign pad, ``sign_mask``), which the decryptor multiplies back with the password it is given:
with the right one its input is the encryptor's output, with a wrong one half its signs are
flipped.  The pad is on the stored payload only: X_enc is decoded from the encryptor's output
itself (decoding the padded features, as an earlier version did, handed the decoder a
sign-scrambled map and gave noise-textured blobs with no disease in them).  Why: with the password only concatenated, a decryptor that ignores it is a saddle the
training does not leave (with random passwords every first-order gradient toward using it
averages to zero; measured on MeMa-Synth: psnr_wrong within 0.4 dB of psnr_rec after training,
in every ``password_mode``).  The pad makes the decryptor's input depend on the password by
construction; the privacy is still that of the learned networks (the magnitudes are not padded).
``none`` is the paper's architecture as written.
``recover_from``: ``features`` (the paper: the decryptor reads f_enc) or ``image`` (a re-encoder
reads the 8-bit de-identified image, so the PNG alone and the passphrase recover the original).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from mema_jax.core.sharding import constrain
from mema_jax.models.layers.attention import Attention
from mema_jax.models.layers.axes import IMAGE_AXES, TOKEN_AXES
from mema_jax.models.layers.linear import conv2d, dense
from mema_jax.models.layers.norm import GroupNorm, LayerNorm
from mema_jax.models.layers.remat import remat_block
from mema_jax.models.layers.resnet_block import Downsample2D, ResnetBlock2D, Upsample2D

PASSWORD_MODES = ("token", "cross_attention", "modulation")
PASSWORD_KEYS = ("sign_mask", "none")
RECOVER_FROM = ("features", "image")


@dataclasses.dataclass(frozen=True)
class DeidConfig:
    image_size: int = 512
    encoder_widths: tuple[int, ...] = (64, 128, 256, 512, 512, 512)  # one stride-2 stage per entry after the first
    face_channels: int = 512  # f_face channels (paper: 512)
    med_channels: int = 320  # f_med channels (SD1.5 UNet, first down block: 320); 0 = no f_med (Tab. 9 M2/M4)
    fusion_blocks: int = 3
    width: int = 512  # token width of the Transformers
    depth: int = 4  # blocks of each of the ID-Encryptor and ID-Decryptor
    heads: int = 8
    mlp_ratio: int = 4
    password_dim: int = 512
    password_mode: str = "token"
    password_tokens: int = 4  # memory tokens (cross_attention)
    password_key: str = "sign_mask"
    decoder_widths: tuple[int, ...] = (512, 512, 512, 256, 128, 64)  # mirror of the encoder
    recover_from: str = "features"
    norm_groups: int = 32
    remat: str = "none"

    def __post_init__(self):
        if self.password_mode not in PASSWORD_MODES:
            raise ValueError(f"password_mode {self.password_mode!r}; choose one of {PASSWORD_MODES}")
        if self.password_key not in PASSWORD_KEYS:
            raise ValueError(f"password_key {self.password_key!r}; choose one of {PASSWORD_KEYS}")
        if self.recover_from not in RECOVER_FROM:
            raise ValueError(f"recover_from {self.recover_from!r}; choose one of {RECOVER_FROM}")
        if len(self.decoder_widths) != len(self.encoder_widths):
            raise ValueError("decoder_widths needs one entry per encoder stage")
        if self.image_size % self.stride:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the encoder stride {self.stride}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible into {self.heads} heads")

    @property
    def stride(self) -> int:
        return 2 ** (len(self.encoder_widths) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.stride

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeidConfig:
        d = dict(d)
        for k in ("encoder_widths", "decoder_widths"):
            if k in d:
                d[k] = tuple(d[k])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown de-identifier options {unknown}")
        return cls(**d)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _groups(channels: int, wanted: int) -> int:
    g = min(wanted, channels)
    while channels % g:
        g -= 1
    return g


class ConvEncoder(nn.Module):
    """Stem conv, then per stage a stride-2 conv and a residual block; a 1x1 conv to ``out_channels``."""

    widths: tuple[int, ...]
    out_channels: int
    norm_groups: int = 32
    remat: str = "none"

    @nn.compact
    def __call__(self, x):
        block = remat_block(ResnetBlock2D, self.remat)
        x = conv2d(self.widths[0], name="stem")(x)
        for i, w in enumerate(self.widths):
            if i:
                x = Downsample2D(w, name=f"down_{i}")(x)
            x = block(w, _groups(w, self.norm_groups), name=f"block_{i}")(x)
        x = nn.silu(GroupNorm(_groups(self.widths[-1], self.norm_groups), name="norm_out")(x))
        return constrain(conv2d(self.out_channels, 1, padding=0, name="proj")(x), IMAGE_AXES)


class ImageDecoder(nn.Module):
    """Features at H/s -> image: per stage a residual block and a x2 upsampling; tanh output."""

    widths: tuple[int, ...]
    norm_groups: int = 32
    remat: str = "none"

    @nn.compact
    def __call__(self, f):
        block = remat_block(ResnetBlock2D, self.remat)
        x = conv2d(self.widths[0], name="conv_in")(f)
        for i, w in enumerate(self.widths):
            x = block(w, _groups(w, self.norm_groups), name=f"block_{i}")(x)
            if i < len(self.widths) - 1:
                x = Upsample2D(self.widths[i + 1], name=f"up_{i}")(x)
        x = nn.silu(GroupNorm(_groups(self.widths[-1], self.norm_groups), name="norm_out")(x))
        return jnp.tanh(conv2d(3, name="conv_out")(x))


class Fusion(nn.Module):
    """concat(f_face, f_med resized to f_face's grid) -> 1x1 conv -> residual blocks -> f."""

    channels: int
    num_blocks: int = 3
    norm_groups: int = 32

    @nn.compact
    def __call__(self, f_face, f_med=None):
        x = f_face
        if f_med is not None:
            b, h, w, _ = f_face.shape
            f_med = jax.image.resize(f_med.astype(x.dtype), (b, h, w, f_med.shape[-1]), "linear", antialias=True)
            x = jnp.concatenate([x, f_med], axis=-1)
        x = conv2d(self.channels, 1, padding=0, name="proj")(x)
        for i in range(self.num_blocks):
            x = ResnetBlock2D(self.channels, _groups(self.channels, self.norm_groups), name=f"block_{i}")(x)
        return x


class PasswordBlock(nn.Module):
    """Pre-LN Transformer block over the feature tokens, keyed by the password ``p`` (B, width)."""

    width: int
    heads: int
    mlp_ratio: int
    password_mode: str

    @nn.compact
    def __call__(self, x, p, memory=None):
        def norm(name, h):
            h = LayerNorm(name=name)(h)
            if self.password_mode == "modulation":
                scale_shift = dense(2 * self.width, ("embed", "mlp"), name=f"{name}_film")(p)
                scale, shift = jnp.split(scale_shift[:, None, :], 2, axis=-1)
                h = h * (1 + scale) + shift
            return h

        head_dim = self.width // self.heads
        x = x + Attention(self.heads, head_dim, self.width, name="self_attn")(norm("norm1", x))
        if self.password_mode == "cross_attention":
            x = x + Attention(self.heads, head_dim, self.width, name="password_attn")(norm("norm_p", x), memory)
        h = dense(self.width * self.mlp_ratio, ("embed", "mlp"), name="mlp_in")(norm("norm2", x))
        x = x + dense(self.width, ("mlp", "embed"), name="mlp_out")(nn.gelu(h))
        return constrain(x, TOKEN_AXES)


class PasswordTransformer(nn.Module):
    """The ID-Encryptor / ID-Decryptor: feature map (B, h, w, C) + password (B, P) -> feature map."""

    width: int
    depth: int
    heads: int
    mlp_ratio: int
    password_mode: str
    password_tokens: int = 4
    remat: str = "none"

    @nn.compact
    def __call__(self, f, password):
        b, h, w, c = f.shape
        x = dense(self.width, ("embed", "mlp"), name="tokens_in")(f.reshape(b, h * w, c))
        pos = self.param("position", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("norm", "embed")),
                         (h * w, self.width))
        x = x + pos[None].astype(x.dtype)
        p = dense(self.width, ("embed", "mlp"), name="password_in")(password.astype(x.dtype))
        memory = None
        if self.password_mode == "token":
            x = jnp.concatenate([p[:, None], x], axis=1)
        elif self.password_mode == "cross_attention":
            memory = dense(self.password_tokens * self.width, ("embed", "mlp"), name="password_memory")(p)
            memory = memory.reshape(b, self.password_tokens, self.width)
        block = remat_block(PasswordBlock, self.remat)
        for i in range(self.depth):
            x = block(self.width, self.heads, self.mlp_ratio, self.password_mode, name=f"block_{i}")(x, p, memory)
        if self.password_mode == "token":
            x = x[:, 1:]
        x = dense(c, ("mlp", "embed"), name="tokens_out")(LayerNorm(name="norm_out")(x))
        return f + x.reshape(b, h, w, c)  # residual: starts near the identity map


# Odd multipliers of the password hash (fixed: a saved model's pads must never change).
_HASH_MULTIPLIERS = (np.random.default_rng(20261201).integers(0, 2**31, size=(2, 4096), dtype=np.uint64) * 2 + 1
                     ).astype(np.uint32)


def sign_mask(password, shape):
    """A +-1 array of ``shape`` per password (B, P): the password's float32 bits hashed to a
    threefry key, which draws the pattern.  Deterministic; another password gives an unrelated one."""
    words = jax.lax.bitcast_convert_type(jax.lax.stop_gradient(password).astype(jnp.float32), jnp.uint32)
    mult = jnp.asarray(_HASH_MULTIPLIERS[:, : words.shape[-1]])
    hashes = jnp.sum(words[:, None, :] * mult[None], axis=-1, dtype=jnp.uint32)  # (B, 2), wraps mod 2^32
    keys = jax.random.wrap_key_data(hashes, impl="threefry2x32")
    return jax.vmap(lambda k: jax.random.rademacher(k, shape, jnp.float32))(keys)


def quantize_8bit(x):
    """[-1, 1] -> the nearest of the 256 levels a PNG stores, with a straight-through gradient."""
    q = jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0
    return x + jax.lax.stop_gradient(q - x)


@struct.dataclass
class Outputs:
    f: Any
    f_enc: Any
    x_enc: Any
    x_hat: Any
    x_wrong: Any


class MedSemDeID(nn.Module):
    """The generator.  Methods: ``deidentify(x, f_med, p) -> (x_enc, f_enc)``, ``recover(f_enc or
    x_enc, p) -> x_hat``, and ``__call__(x, f_med, p, p_wrong) -> Outputs`` (training)."""

    config: DeidConfig

    def setup(self):
        c = self.config
        self.image_encoder = ConvEncoder(c.encoder_widths, c.face_channels, c.norm_groups, c.remat)
        self.fusion = Fusion(c.face_channels, c.fusion_blocks, c.norm_groups)
        kw = dict(width=c.width, depth=c.depth, heads=c.heads, mlp_ratio=c.mlp_ratio, password_mode=c.password_mode,
                  password_tokens=c.password_tokens, remat=c.remat)
        self.encryptor = PasswordTransformer(**kw)
        self.decryptor = PasswordTransformer(**kw)
        self.decoder = ImageDecoder(c.decoder_widths, c.norm_groups, c.remat)
        if c.recover_from == "image":
            self.reencoder = ConvEncoder(c.encoder_widths, c.face_channels, c.norm_groups, c.remat)

    def features(self, x, f_med=None):
        return self.fusion(self.image_encoder(x), f_med if self.config.med_channels else None)

    def _pad(self, f, password):
        if self.config.password_key == "none":
            return f
        return f * sign_mask(password, f.shape[1:]).astype(f.dtype)

    def deidentify(self, x, f_med, password):
        """-> (X_enc, f_enc): X_enc is decoded from the ID-Encryptor's output itself; f_enc, what
        is stored for recovery, is that output under the password's sign pad."""
        f_encrypted = self.encryptor(self.features(x, f_med), password)
        return self.decoder(f_encrypted), self._pad(f_encrypted, password)

    def decode(self, f):
        """The image decoder alone (the auxiliary autoencoder term, ``loss.lambda_ae``, decodes f)."""
        return self.decoder(f)

    def recover(self, encrypted, password):
        """``encrypted``: f_enc (recover_from="features") or the de-identified image ("image")."""
        if self.config.recover_from == "image":
            encrypted = self.reencoder(quantize_8bit(encrypted))
        return self.decoder(self.decryptor(self._pad(encrypted, password), password))

    def __call__(self, x, f_med, password, wrong_password) -> Outputs:
        """The training forward: ``deidentify`` and ``recover`` with both passwords, batched.

        The two recoveries go through the ID-Decryptor as one batch, and (``recover_from=features``)
        the de-identified and both recovered images through the decoder as one batch of 3B: every
        layer is per-sample (GroupNorm, attention within an image), so the values are those of
        three separate calls, and on CPU the step is faster (bigger convolutions, one kernel
        gradient per decoder layer instead of three)."""
        n = x.shape[0]
        f = self.features(x, f_med)
        f_encrypted = self.encryptor(f, password)
        f_enc = self._pad(f_encrypted, password)
        passwords = jnp.concatenate([password, wrong_password])
        if self.config.recover_from == "image":
            x_enc = self.decoder(f_encrypted)
            encrypted = self.reencoder(quantize_8bit(x_enc))
            both = jnp.concatenate([encrypted, encrypted])
            recovered = self.decoder(self.decryptor(self._pad(both, passwords), passwords))
            return Outputs(f, f_enc, x_enc, recovered[:n], recovered[n:])
        both = jnp.concatenate([f_enc, f_enc])
        decrypted = self.decryptor(self._pad(both, passwords), passwords)
        images = self.decoder(jnp.concatenate([f_encrypted, decrypted]))
        return Outputs(f, f_enc, images[:n], images[n:2 * n], images[2 * n:])


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix): a logit per ~70 px patch at 512 px (per 16 px patch at 64 px): it judges
    local texture and shape, where the eye-region signs are, and is cheap."""

    widths: tuple[int, ...] = (64, 128, 256, 512)
    norm_groups: int = 32

    @nn.compact
    def __call__(self, x):
        for i, w in enumerate(self.widths):
            x = conv2d(w, 4, stride=2 if i < len(self.widths) - 1 else 1, padding=1, name=f"conv_{i}")(x)
            if i:
                x = GroupNorm(_groups(w, self.norm_groups), name=f"norm_{i}")(x)
            x = nn.leaky_relu(x, 0.2)
        return conv2d(1, 4, padding=1, name="logits")(x)[..., 0]
