"""The lossless "VAE" of the offline generator: space-to-depth by ``patch_size``.

``encode(x (B, H, W, C))`` -> (B, H/p, W/p, p*p*C), ``decode`` is its exact inverse.  It stands
where SD1.5's VAE stands (the UNet works at 1/p of the image side, as SD's at 1/8), with no weights
to train and nothing lost: MeMa-Synth's signs are 1-2 px features at 64 px, and a learnt 4x
autoencoder trained in the minutes a CPU run has would blur them.  U-ViT (Bao et al. 2023) uses the
same 4x4 patches on 64 px CelebA.  Its folder is ``vae/config.json`` with
``_class_name: "PatchAutoencoder"`` and no weight file (there are none).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

CLASS_NAME = "PatchAutoencoder"


@dataclasses.dataclass(frozen=True)
class PatchConfig:
    patch_size: int = 4
    in_channels: int = 3
    scaling_factor: float = 1.0  # the image is already in [-1, 1], unit scale like SD's scaled latents

    @property
    def latent_channels(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "PatchConfig":
        if config.get("_class_name", CLASS_NAME) != CLASS_NAME:
            raise ValueError(f"_class_name is {config.get('_class_name')!r}, expected {CLASS_NAME!r}")
        c = cls(int(config.get("patch_size", 4)), int(config.get("in_channels", 3)),
                float(config.get("scaling_factor", 1.0)))
        if c.patch_size < 1 or c.in_channels < 1:
            raise ValueError(f"patch_size and in_channels must be >= 1, got {c.patch_size}, {c.in_channels}")
        return c

    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": CLASS_NAME, "patch_size": self.patch_size, "in_channels": self.in_channels,
                "latent_channels": self.latent_channels, "scaling_factor": self.scaling_factor}


@struct.dataclass
class Deterministic:
    """The encoder's "posterior": a point (``sample`` and ``mode`` both return it), shaped like
    ``vae.DiagonalGaussian``'s interface."""

    mean: jax.Array

    def sample(self, rng):
        del rng
        return self.mean

    def mode(self):
        return self.mean


def space_to_depth(x, p: int):
    b, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"image side {h}x{w} is not a multiple of the patch size {p}")
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(z, p: int):
    b, h, w, pc = z.shape
    c = pc // (p * p)
    z = z.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return z.reshape(b, h * p, w * p, c)


class PatchAutoencoder(nn.Module):
    """No parameters: apply it with ``{"params": {}}`` like any VAE."""

    config: PatchConfig
    dtype: Any = jnp.float32

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> None:
        return None

    @property
    def downsample_factor(self) -> int:
        return self.config.patch_size

    def encode(self, x) -> Deterministic:
        return Deterministic(space_to_depth(x.astype(self.dtype), self.config.patch_size))

    def decode(self, z):
        return depth_to_space(z.astype(self.dtype), self.config.patch_size)

    def __call__(self, x, rng=None):
        return self.decode(self.encode(x).mode())
