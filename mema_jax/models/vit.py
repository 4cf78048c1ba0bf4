"""A plain ViT and a masked auto-encoder (MAE): the paper's Tab. 10 alternative medical encoders.

The paper's Enc_med is the first blocks of a diffusion UNet trained on MeMa; Tab. 10 swaps in "a
ViT trained supervised on disease labels, and one trained as an MAE".  Both are this ``ViT``:

* ``ViT``: patch embedding (a p x p convolution with stride p), a class token, learned position
  embeddings (1 + N, width), pre-LayerNorm Transformer blocks (``layers.attention.Attention``,
  biases on q/k/v/out; an exact-GELU MLP), a final LayerNorm (eps 1e-6 as timm's ViT).  NHWC input
  in [-1, 1].  ``features(images) -> (B, H/p, W/p, width)``: the patch tokens after the final
  LayerNorm laid back on the grid, row-major -- what Enc_med returns to the de-identifier.
* ``ViTClassifier``: a ``ViT`` named ``encoder`` plus one linear head per label on the class token
  after the final LayerNorm (timm's ``global_pool="token"``): the supervised variant.
* ``MAE`` (He et al. 2022): per sample, the ``mask_ratio`` of the patches with the largest noise
  values is masked (``random_masking``: MAE's argsort-of-uniform-noise shuffle, keeping
  ``floor(N (1 - mask_ratio))`` patches); the ``encoder`` sees only the visible patches (and the
  class token); a light decoder (a linear map to its width, a shared learned mask token, its own
  learned position embeddings, a few blocks, LayerNorm, a linear map to p*p*3 pixels) predicts
  every patch, and the loss is the mean squared error over the *masked* patches only.  Targets:
  ``norm_pix_loss=True`` (the MAE paper's default and its released code's recommended setting)
  normalises each target patch by its own mean and (unbiased, as torch's ``var``) variance,
  eps 1e-6.  Differences from MAE's code: position embeddings are learned (normal(0.02) init)
  rather than fixed 2-D sin-cos, so the encoder is the very ViT the supervised variant trains;
  Dense kernels use this project's ``layers.linear.dense`` init (LeCun normal, not Xavier).

Both variants export the encoder alone -- ``params["encoder"]`` -- with ``save_vit_encoder`` into a
folder holding ``config.json`` (the architecture, ``ViTConfig``) and ``params.safetensors`` (keys
are our parameter paths, e.g. ``blocks_0/attn/to_q/kernel``, values in our layout).
``load_vit_encoder(folder) -> (ViT, params)`` reads it strictly through ``weights.load_into``: a
missing, extra or mis-shaped tensor is one ``WeightsError`` naming the file and the keys.
Pre-trained ViT checkpoints (timm, MAE's releases) use other key names and 224 px position tables;
loading one needs a converter (key map + position-embedding interpolation), not written here.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mema_jax.core.sharding import constrain
from mema_jax.fileio import atomic_folder
from mema_jax.models import weights
from mema_jax.models.layers.attention import Attention, check_attention_impl
from mema_jax.models.layers.axes import IMAGE_AXES, TOKEN_AXES
from mema_jax.models.layers.linear import conv2d, dense
from mema_jax.models.layers.norm import LayerNorm
from mema_jax.models.layers.remat import remat_block

MODEL_TYPE = "mema_vit"
WEIGHTS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
# config.json keys that describe the file, not the architecture.
METADATA_KEYS = ("model_type", "training")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of the ViT encoder (defaults: ViT-B/16 at 224 px)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    layer_norm_eps: float = 1e-6
    channels: int = 3

    def __post_init__(self):
        for name in ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim", "channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ViTConfig: {name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"ViTConfig: width {self.width} is not a multiple of heads {self.heads}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "config") -> ViTConfig:
        """From ``to_dict``'s output (a config.json); any other key or bad value is a WeightsError."""
        found = config.get("model_type")
        if found != MODEL_TYPE:
            raise weights.WeightsError(f"{source}: model_type is {found!r}, expected {MODEL_TYPE!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields - set(METADATA_KEYS))
        if unknown:
            raise weights.WeightsError(f"{source}: unknown ViT config keys {unknown}")
        try:
            return cls(**{k: v for k, v in config.items() if k in fields})
        except (TypeError, ValueError) as err:
            raise weights.WeightsError(f"{source}: bad ViT config: {err}") from err


@dataclasses.dataclass(frozen=True)
class MAEConfig:
    """The MAE's masking, decoder and target (defaults: the MAE paper's ViT-B decoder)."""

    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_dim: int = 2048

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"MAEConfig: mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.decoder_width % self.decoder_heads:
            raise ValueError(f"MAEConfig: decoder_width {self.decoder_width} is not a multiple of "
                             f"decoder_heads {self.decoder_heads}")


def _embedding_init(names):
    return nn.with_logical_partitioning(nn.initializers.normal(0.02), names)


class MLP(nn.Module):
    hidden: int
    out: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = jax.nn.gelu(dense(self.hidden, ("embed", "mlp"), name="fc1", **kw)(x), approximate=False)
        return dense(self.out, ("mlp", "embed"), name="fc2", **kw)(h)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    width: int
    heads: int
    mlp_dim: int
    layer_norm_eps: float = 1e-6
    attention_impl: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = LayerNorm(self.layer_norm_eps, name="norm1", **kw)(x)
        x = x + Attention(self.heads, self.width // self.heads, self.width, qkv_bias=True,
                          attention_impl=self.attention_impl, name="attn", **kw)(h)
        x = constrain(x, TOKEN_AXES)
        h = LayerNorm(self.layer_norm_eps, name="norm2", **kw)(x)
        x = x + MLP(self.mlp_dim, self.width, name="mlp", **kw)(h)
        return constrain(x, TOKEN_AXES)


def _blocks(n, width, heads, mlp_dim, eps, attention_impl, remat, dtype, param_dtype):
    cls = remat_block(Block, remat)
    return [cls(width, heads, mlp_dim, eps, attention_impl, dtype, param_dtype) for _ in range(n)]


class ViT(nn.Module):
    """``__call__(images) -> (B, 1 + N, width)`` tokens after the final LayerNorm (class token first);
    ``features(images) -> (B, H/p, W/p, width)``; ``encode(images, keep)`` runs the visible patches
    ``keep`` (B, K) only (the MAE encoder)."""

    config: ViTConfig
    attention_impl: str = "xla"
    remat: str = "none"  # mema_jax.models.layers.remat.REMAT_POLICIES
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        check_attention_impl(self.attention_impl)
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        self.patch_embed = conv2d(c.width, c.patch_size, stride=c.patch_size, padding=0, **kw)
        self.cls_token = self.param("cls_token", _embedding_init(("embed",)), (c.width,), self.param_dtype)
        self.pos_embed = self.param("pos_embed", _embedding_init((None, "embed")), (1 + c.num_patches, c.width),
                                    self.param_dtype)
        self.blocks = _blocks(c.depth, c.width, c.heads, c.mlp_dim, c.layer_norm_eps, self.attention_impl, self.remat,
                              self.dtype, self.param_dtype)
        self.norm = LayerNorm(c.layer_norm_eps, **kw)

    def patch_tokens(self, images):
        """(B, H, W, C) -> (B, N, width): embedded patches plus their position embeddings (no class token)."""
        c = self.config
        if tuple(images.shape[1:]) != (c.image_size, c.image_size, c.channels):
            raise ValueError(f"images of shape {tuple(images.shape)} do not match the ViT's "
                             f"(B, {c.image_size}, {c.image_size}, {c.channels}) NHWC input")
        x = self.patch_embed(images.astype(self.dtype)).reshape(images.shape[0], c.num_patches, c.width)
        return x + self.pos_embed[1:].astype(self.dtype)

    def encode(self, images, keep=None):
        """Tokens after the final LayerNorm, (B, 1 + K, width): the class token, then the patches
        ``keep`` (B, K) int indices in the given order (all N patches, row-major, if None)."""
        x = self.patch_tokens(images)
        if keep is not None:
            x = jnp.take_along_axis(x, keep[:, :, None], axis=1)
        cls = (self.cls_token + self.pos_embed[0]).astype(self.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)
        x = constrain(x, TOKEN_AXES)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def __call__(self, images):
        return self.encode(images)

    def features(self, images):
        """The medical-encoder output: patch tokens after the final LayerNorm on the (H/p, W/p) grid."""
        g = self.config.grid
        tokens = self.encode(images)[:, 1:]
        return constrain(tokens.reshape(tokens.shape[0], g, g, tokens.shape[-1]), IMAGE_AXES)


# The name deid_jax.medical_encoder uses for the module load_vit_encoder returns.
ViTEncoder = ViT


class ViTClassifier(nn.Module):
    """Images -> {head name: logits (B, n) float32} from the class token (the ``encoder``'s final
    LayerNorm applied), e.g. heads (("disease", 8), ("severity", 3))."""

    config: ViTConfig
    heads: tuple[tuple[str, int], ...] = (("disease", 8),)
    attention_impl: str = "xla"
    remat: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        encoder = ViT(self.config, self.attention_impl, self.remat, self.dtype, self.param_dtype, name="encoder")
        cls = encoder(images)[:, 0]
        return {name: dense(n, ("embed", None), name=f"head_{name}", dtype=self.dtype,
                            param_dtype=self.param_dtype)(cls).astype(jnp.float32) for name, n in self.heads}


# ---------------------------------------------------------------------------------------------- MAE

def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches the MAE encoder sees: floor(N (1 - ratio)) (MAE's ``int(L * (1 - mask_ratio))``,
    guarded against float rounding just below an integer)."""
    keep = int(math.floor(num_patches * (1.0 - mask_ratio) + 1e-9))
    if not 1 <= keep < num_patches:
        raise ValueError(f"mask_ratio {mask_ratio} on {num_patches} patches leaves {keep} visible; need 1..{num_patches - 1}")
    return keep


def random_masking(noise, mask_ratio: float):
    """MAE's per-sample random masking from ``noise`` (B, N) (uniform values): the patches with the
    smallest noise stay visible.  Returns (keep (B, K) int32 indices of the visible patches in
    ascending-noise order, mask (B, N) float32 with 1 = masked, restore (B, N) int32: each patch's
    position in the shuffled order ``[visible..., masked...]``, which un-shuffles the decoder input)."""
    n = noise.shape[1]
    k = num_visible(n, mask_ratio)
    shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
    restore = jnp.argsort(shuffle, axis=1).astype(jnp.int32)
    mask = jnp.concatenate([jnp.zeros((noise.shape[0], k), jnp.float32), jnp.ones((noise.shape[0], n - k), jnp.float32)], 1)
    return shuffle[:, :k], jnp.take_along_axis(mask, restore, axis=1), restore


def patchify(images, patch_size: int):
    """(B, H, W, C) -> (B, N, p*p*C): row-major patches, each flattened (row, column, channel), as MAE's."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def patch_targets(patches, norm_pix_loss: bool, eps: float = 1e-6):
    """Reconstruction targets: each patch normalised by its own mean and unbiased variance
    (MAE's ``norm_pix_loss``), or the pixels as they are."""
    patches = patches.astype(jnp.float32)
    if not norm_pix_loss:
        return patches
    mean = patches.mean(-1, keepdims=True)
    var = patches.var(-1, keepdims=True, ddof=1)
    return (patches - mean) / jnp.sqrt(var + eps)


def masked_patch_loss(pred, target, mask):
    """(scalar loss, per-sample loss (B,)): the mean over patches and pixels of (pred - target)^2,
    counting the masked patches (mask == 1) only."""
    per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
    per_sample = jnp.sum(per_patch * mask, -1) / jnp.sum(mask, -1)
    return jnp.sum(per_patch * mask) / jnp.sum(mask), per_sample


class MAE(nn.Module):
    """``__call__(images, noise (B, N)) -> {"loss", "per_sample" (B,), "pred" (B, N, p*p*C),
    "mask" (B, N)}``; the ``encoder`` is a ``ViT`` (exported alone)."""

    config: ViTConfig
    mae: MAEConfig = MAEConfig()
    attention_impl: str = "xla"
    remat: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c, m = self.config, self.mae
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        self.encoder = ViT(c, self.attention_impl, self.remat, self.dtype, self.param_dtype)
        self.decoder_embed = dense(m.decoder_width, ("embed", "embed"), **kw)
        self.mask_token = self.param("mask_token", _embedding_init(("embed",)), (m.decoder_width,), self.param_dtype)
        self.decoder_pos_embed = self.param("decoder_pos_embed", _embedding_init((None, "embed")),
                                            (1 + c.num_patches, m.decoder_width), self.param_dtype)
        self.decoder_blocks = _blocks(m.decoder_depth, m.decoder_width, m.decoder_heads, m.decoder_mlp_dim,
                                      c.layer_norm_eps, self.attention_impl, self.remat, self.dtype, self.param_dtype)
        self.decoder_norm = LayerNorm(c.layer_norm_eps, **kw)
        self.decoder_pred = dense(c.patch_size**2 * c.channels, ("embed", None), **kw)

    def decode(self, latent, restore):
        """Encoder tokens (B, 1 + K, width) of the visible patches -> predicted patches (B, N, p*p*C)."""
        x = self.decoder_embed(latent)
        b, n = restore.shape
        masked = jnp.broadcast_to(self.mask_token.astype(self.dtype), (b, n - (x.shape[1] - 1), x.shape[-1]))
        patches = jnp.take_along_axis(jnp.concatenate([x[:, 1:], masked], 1), restore[:, :, None], axis=1)
        x = jnp.concatenate([x[:, :1], patches], 1) + self.decoder_pos_embed.astype(self.dtype)
        x = constrain(x, TOKEN_AXES)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def __call__(self, images, noise):
        keep, mask, restore = random_masking(noise, self.mae.mask_ratio)
        pred = self.decode(self.encoder.encode(images, keep), restore)
        target = patch_targets(patchify(images, self.config.patch_size), self.mae.norm_pix_loss)
        loss, per_sample = masked_patch_loss(pred, target, mask)
        return {"loss": loss, "per_sample": per_sample, "pred": pred, "mask": mask}


# ---------------------------------------------------------------------------------------------- export / load

def encoder_key_map(params) -> list[weights.KeyMapping]:
    """File keys are our parameter paths; values are stored in our layout (no transform)."""
    return weights.key_map_from_params(params, lambda path: path, lambda path, shape: weights.IDENTITY)


def abstract_params(module: ViT):
    """The boxed abstract parameter tree of ``module`` (shapes, dtypes, logical names)."""
    c = module.config
    images = jnp.zeros((1, c.image_size, c.image_size, c.channels), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), images)["params"]


def save_vit_encoder(folder: str | os.PathLike, config: ViTConfig, params, training: Mapping[str, Any] | None = None):
    """Writes ``folder`` (config.json + params.safetensors) atomically: it appears complete or not
    at all, and an existing folder is never overwritten (FileExistsError).  ``params``: the ViT's
    own tree (``params["encoder"]`` of a ViTClassifier or MAE).  ``training``: free-form metadata
    stored in config.json (what trained it, at which step)."""
    host = jax.device_get(params)
    tensors = weights.export_state_dict(host, encoder_key_map(host))
    config_dict = dict(config.to_dict(), **({"training": dict(training)} if training else {}))
    with atomic_folder(folder) as tmp:
        weights.write_model_folder(tmp, WEIGHTS_FILE, tensors, config_dict)


def load_vit_encoder(folder: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                     mesh=None, rules=None, attention_impl: str = "xla", remat: str = "none") -> tuple[ViT, dict]:
    """A folder written by ``save_vit_encoder`` -> (ViT module, params).  Call the medical encoder as
    ``module.apply({"params": params}, images, method=module.features)`` (images NHWC in [-1, 1] at
    ``module.config.image_size``).  With ``mesh`` each parameter is created directly in its sharding."""
    folder = os.fspath(folder)
    config = ViTConfig.from_dict(weights.read_config(folder), source=os.path.join(folder, CONFIG_FILE))
    module = ViT(config, attention_impl=attention_impl, remat=remat, dtype=dtype, param_dtype=param_dtype)
    path = os.path.join(folder, WEIGHTS_FILE)
    abstract = abstract_params(module)
    params = weights.load_into(abstract, weights.read_state_dict(path), encoder_key_map(abstract), source=path,
                               mesh=mesh, rules=rules, dtype=param_dtype)
    return module, params


def encoder_config_of(module_config: Mapping[str, Any], image_size: int) -> ViTConfig:
    """A ``ViTConfig`` from a trainer config's ``model.encoder`` block and the data's image size."""
    return ViTConfig(image_size=int(image_size), **dict(module_config))

