"""CLIP text and vision towers (transformers ``CLIPTextModel`` / ``CLIPVisionModelWithProjection``).

One pre-LayerNorm transformer encoder serves both towers.  The text tower is causal and pools
the hidden state at the end-of-text token exactly as transformers 5 does; the vision tower
embeds 14x14 (or any) patches plus a class token and projects the post-LayerNorm class token.
Images are NHWC at the API, as everywhere in this project.

Every output can carry ``hidden_states``: the encoder input followed by the output of each layer,
as transformers returns them with ``output_hidden_states=True`` (IP-Adapter Plus uses the
vision tower's ``hidden_states[-2]``).

Output fields carry transformers' names (``last_hidden_state``, ``pooler_output``,
``hidden_states``, ``image_embeds``), so code written against transformers ports as it is.
Self-attention is ``layers.attention.Attention``, the UNet's, with biases on q/k/v/out and, in
the text tower, a causal mask; its parameters are ``to_q``/``to_k``/``to_v``/``to_out``, which
``convert_clip`` maps to transformers' ``q_proj``/``k_proj``/``v_proj``/``out_proj``.

SD1.5 uses the ViT-L/14 text tower (``CLIPTextConfig.sd15()``); IP-Adapter uses the ViT-H/14
vision tower with projection (``CLIPVisionConfig.vit_h14()``).  The same code builds any size.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from mema_jax.core.sharding import constrain
from mema_jax.models.layers.attention import Attention, check_attention_impl
from mema_jax.models.layers.axes import TOKEN_AXES
from mema_jax.models.layers.linear import CONV_KERNEL_AXES, dense
from mema_jax.models.layers.norm import LayerNorm
from mema_jax.models.layers.remat import remat_block

ACTIVATIONS = ("quick_gelu", "gelu")


# The CLIP image processor's per-channel mean and std (openai/clip-vit-large-patch14's preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images, size: int):
    """[-1, 1] NHWC images -> the CLIP image encoder's normalised input at ``size`` (bicubic resize)."""
    x = (images + 1.0) / 2.0
    x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bicubic")
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


class CLIPConfigError(ValueError):
    """A CLIP config.json that this implementation does not support."""


def _activation(name: str, x):
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=False)  # transformers' "gelu" is the exact erf form


def _check_common(config, kind: str):
    if config.hidden_size % config.num_attention_heads:
        raise CLIPConfigError(
            f"{kind}: hidden_size {config.hidden_size} is not a multiple of num_attention_heads {config.num_attention_heads}"
        )
    if config.hidden_act not in ACTIVATIONS:
        raise CLIPConfigError(f"{kind}: hidden_act {config.hidden_act!r} is not supported; use one of {ACTIVATIONS}")


def _from_transformers_dict(cls, config: Mapping[str, Any], model_type: str, source: str):
    """The fields of ``cls`` from a transformers config.json dict; other keys are generic HF metadata."""
    found = config.get("model_type", model_type)
    if found != model_type:
        raise CLIPConfigError(f"{source}: model_type is {found!r}, expected {model_type!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in config.items() if k in fields})
    except TypeError as e:
        raise CLIPConfigError(f"{source}: bad CLIP config: {e}") from e


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The architecture fields of transformers' ``CLIPTextConfig`` (defaults: SD1.5's ViT-L/14 text tower)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    def __post_init__(self):
        _check_common(self, "CLIPTextConfig")
        if not isinstance(self.eos_token_id, int):
            raise CLIPConfigError(f"CLIPTextConfig: eos_token_id must be one integer, got {self.eos_token_id!r}")

    @classmethod
    def sd15(cls) -> CLIPTextConfig:
        return cls()

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "config") -> CLIPTextConfig:
        return _from_transformers_dict(cls, config, "clip_text_model", source)

    def to_dict(self) -> dict:
        """A config.json that transformers' ``CLIPTextModel.from_pretrained`` reads."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The architecture fields of transformers' ``CLIPVisionConfig`` (defaults: ViT-H/14 as used by IP-Adapter)."""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 1024
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _check_common(self, "CLIPVisionConfig")
        if not (isinstance(self.image_size, int) and isinstance(self.patch_size, int)):
            raise CLIPConfigError("CLIPVisionConfig: only square images and patches (integer sizes) are supported")
        if self.image_size % self.patch_size:
            raise CLIPConfigError(f"CLIPVisionConfig: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @classmethod
    def vit_h14(cls) -> CLIPVisionConfig:
        return cls()

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "config") -> CLIPVisionConfig:
        return _from_transformers_dict(cls, config, "clip_vision_model", source)

    def to_dict(self) -> dict:
        """A config.json that transformers' ``CLIPVisionModelWithProjection.from_pretrained`` reads."""
        return {
            "architectures": ["CLIPVisionModelWithProjection"],
            "model_type": "clip_vision_model",
            **dataclasses.asdict(self),
        }


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = dense(self.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
        h = _activation(self.hidden_act, h)
        return dense(self.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: Any  # CLIPTextConfig or CLIPVisionConfig
    attention_impl: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = LayerNorm(c.layer_norm_eps, name="layer_norm1", **kw)(x)
        attention = Attention(c.num_attention_heads, c.hidden_size // c.num_attention_heads, c.hidden_size, qkv_bias=True,
                              attention_impl=self.attention_impl, name="self_attn", **kw)
        x = x + attention(h, mask=mask)
        x = constrain(x, TOKEN_AXES)
        h = LayerNorm(c.layer_norm_eps, name="layer_norm2", **kw)(x)
        x = x + CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act, name="mlp", **kw)(h)
        return constrain(x, TOKEN_AXES)


class CLIPEncoder(nn.Module):
    """The layer stack; returns the last hidden state and, on request, every layer's input/output."""

    config: Any
    attention_impl: str = "xla"
    remat: str = "none"  # mema_jax.models.layers.remat.REMAT_POLICIES
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, output_hidden_states: bool = False):
        layer_class = remat_block(CLIPEncoderLayer, self.remat)
        hidden_states = [x]
        for i in range(self.config.num_hidden_layers):
            x = layer_class(self.config, self.attention_impl, self.dtype, self.param_dtype, name=f"layers_{i}")(x, mask)
            hidden_states.append(x)
        return x, (tuple(hidden_states) if output_hidden_states else None)


def _embedding_param(name_axes):
    return nn.with_logical_partitioning(nn.initializers.normal(0.02), name_axes)


@struct.dataclass
class CLIPTextOutput:
    last_hidden_state: Any  # (B, L, hidden) after the final LayerNorm
    pooler_output: Any  # (B, hidden): the last hidden state at the end-of-text token
    hidden_states: Any = None  # tuple: embeddings, then each layer's output (before the final LayerNorm)


@struct.dataclass
class CLIPVisionOutput:
    image_embeds: Any  # (B, projection_dim)
    last_hidden_state: Any  # (B, 1 + patches, hidden), no final LayerNorm (as transformers)
    pooler_output: Any  # (B, hidden): post-LayerNorm class token (transformers' CLIPVisionModel name)
    hidden_states: Any = None  # tuple: pre-LayerNorm'd embeddings, then each layer's output


class CLIPTextModel(nn.Module):
    """``__call__(input_ids (B, L) int, attention_mask=None, output_hidden_states=False) -> CLIPTextOutput``.

    ``attention_mask`` (B, L), 1 = real token, is optional (Stable Diffusion passes none): the
    model is causal either way.
    """

    config: CLIPTextConfig
    attention_impl: str = "xla"
    remat: str = "none"  # mema_jax.models.layers.remat.REMAT_POLICIES
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False):
        check_attention_impl(self.attention_impl)
        c = self.config
        batch, length = input_ids.shape
        if length > c.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings {c.max_position_embeddings}")
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        token_embedding = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=_embedding_param(("vocab", "embed")),
                                   name="token_embedding", **kw)
        position_embedding = nn.Embed(c.max_position_embeddings, c.hidden_size,
                                      embedding_init=_embedding_param(("norm", "embed")), name="position_embedding", **kw)
        x = token_embedding(input_ids) + position_embedding(jnp.arange(length)[None, :])
        x = constrain(x, TOKEN_AXES)

        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # (1, 1, Lq, Lk)
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, None, :]
        encoder = CLIPEncoder(c, self.attention_impl, self.remat, name="encoder", **kw)
        x, hidden_states = encoder(x, mask, output_hidden_states)
        last_hidden_state = LayerNorm(c.layer_norm_eps, name="final_layer_norm", **kw)(x)

        if c.eos_token_id == 2:
            # Configs from before transformers PR #24773 carry eos_token_id 2: the end-of-text token
            # is then taken to be the highest id of each sequence.
            eos_position = jnp.argmax(input_ids, axis=-1)
        else:
            eos_position = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        pooler_output = last_hidden_state[jnp.arange(batch), eos_position]
        return CLIPTextOutput(last_hidden_state, pooler_output, hidden_states)


class CLIPVisionModelWithProjection(nn.Module):
    """``__call__(pixel_values (B, H, W, C) normalized, output_hidden_states=False) -> CLIPVisionOutput``."""

    config: CLIPVisionConfig
    attention_impl: str = "xla"
    remat: str = "none"  # mema_jax.models.layers.remat.REMAT_POLICIES
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, output_hidden_states: bool = False):
        check_attention_impl(self.attention_impl)
        c = self.config
        batch, height, width, channels = pixel_values.shape
        if (height, width, channels) != (c.image_size, c.image_size, c.num_channels):
            raise ValueError(
                f"pixel_values of shape {pixel_values.shape} do not match the model's "
                f"(B, {c.image_size}, {c.image_size}, {c.num_channels}) NHWC input"
            )
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        patches = nn.Conv(
            c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size), padding="VALID",
            use_bias=False, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_KERNEL_AXES),
            name="patch_embedding", **kw,
        )(pixel_values.astype(self.dtype))
        patches = patches.reshape(batch, -1, c.hidden_size)  # row-major patches, as torch's flatten(2)
        class_embedding = self.param("class_embedding", _embedding_param(("embed",)), (c.hidden_size,), self.param_dtype)
        class_tokens = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, c.hidden_size))
        x = jnp.concatenate([class_tokens, patches], axis=1)
        num_positions = x.shape[1]
        position_embedding = nn.Embed(num_positions, c.hidden_size, embedding_init=_embedding_param(("norm", "embed")),
                                      name="position_embedding", **kw)
        x = x + position_embedding(jnp.arange(num_positions)[None, :])
        x = constrain(x, TOKEN_AXES)

        x = LayerNorm(c.layer_norm_eps, name="pre_layrnorm", **kw)(x)  # (sic) transformers' name
        encoder = CLIPEncoder(c, self.attention_impl, self.remat, name="encoder", **kw)
        last_hidden_state, hidden_states = encoder(x, None, output_hidden_states)
        pooler_output = LayerNorm(c.layer_norm_eps, name="post_layernorm", **kw)(last_hidden_state[:, 0])
        image_embeds = dense(c.projection_dim, ("embed", "mlp"), use_bias=False, name="visual_projection", **kw)(pooler_output)
        return CLIPVisionOutput(image_embeds, last_hidden_state, pooler_output, hidden_states)
