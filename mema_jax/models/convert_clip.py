"""Loading and saving the CLIP towers in the transformers folder format, and the CLIP tokenizer.

A transformers CLIP folder holds ``config.json`` and ``model.safetensors`` (or
``pytorch_model.bin``).  Text-tower weights appear with the ``text_model.`` key prefix (what
transformers 4 wrote, and what the SD1.5 ``text_encoder`` has) or without it (transformers 5's
``CLIPTextModel``); both load.  Every parameter must be matched by ``weights.load_into``:
missing, unexpected or mis-shaped keys raise one ``WeightsError`` that lists them.

``save_clip_text`` writes the ``text_model.``-prefixed layout, which transformers 4 and 5 both
load; ``save_clip_vision`` writes the ``CLIPVisionModelWithProjection`` layout.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mema_jax.models import weights
from mema_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
from mema_jax.models.tokenizer import CLIPTokenizer
from mema_jax.models.weights import CONV, IDENTITY, LINEAR, KeyMapping

TEXT_PREFIX = "text_model."
VISION_PREFIX = "vision_model."
WEIGHTS_FILE = "model.safetensors"
# Non-persistent buffers that older transformers versions still wrote into the weight files.
IGNORED_KEYS = (r"(text_model\.)?embeddings\.position_ids", r"vision_model\.embeddings\.position_ids")


def _linear(ours: str, torch: str, bias: bool = True) -> list[KeyMapping]:
    mappings = [KeyMapping(f"{ours}/kernel", f"{torch}.weight", LINEAR)]
    if bias:
        mappings.append(KeyMapping(f"{ours}/bias", f"{torch}.bias"))
    return mappings


def _layer_norm(ours: str, torch: str) -> list[KeyMapping]:
    return [KeyMapping(f"{ours}/scale", f"{torch}.weight"), KeyMapping(f"{ours}/bias", f"{torch}.bias")]


def _encoder_key_map(num_layers: int, torch_prefix: str) -> list[KeyMapping]:
    mappings = []
    for i in range(num_layers):
        ours, torch = f"encoder/layers_{i}", f"{torch_prefix}encoder.layers.{i}"
        # Our self-attention is layers.attention.Attention (to_q/to_k/to_v/to_out).
        for ours_proj, torch_proj in (("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj"), ("to_out", "out_proj")):
            mappings += _linear(f"{ours}/self_attn/{ours_proj}", f"{torch}.self_attn.{torch_proj}")
        mappings += _layer_norm(f"{ours}/layer_norm1", f"{torch}.layer_norm1")
        mappings += _layer_norm(f"{ours}/layer_norm2", f"{torch}.layer_norm2")
        mappings += _linear(f"{ours}/mlp/fc1", f"{torch}.mlp.fc1")
        mappings += _linear(f"{ours}/mlp/fc2", f"{torch}.mlp.fc2")
    return mappings


def text_key_map(config: CLIPTextConfig, torch_prefix: str = TEXT_PREFIX) -> list[KeyMapping]:
    """Our text-tower parameter paths <-> transformers keys (with ``torch_prefix``, "" or "text_model.")."""
    p = torch_prefix
    return [
        KeyMapping("token_embedding/embedding", f"{p}embeddings.token_embedding.weight"),
        KeyMapping("position_embedding/embedding", f"{p}embeddings.position_embedding.weight"),
        *_encoder_key_map(config.num_hidden_layers, p),
        *_layer_norm("final_layer_norm", f"{p}final_layer_norm"),
    ]


def vision_key_map(config: CLIPVisionConfig) -> list[KeyMapping]:
    """Our vision-tower parameter paths <-> ``CLIPVisionModelWithProjection`` keys."""
    p = VISION_PREFIX
    return [
        KeyMapping("patch_embedding/kernel", f"{p}embeddings.patch_embedding.weight", CONV),
        KeyMapping("class_embedding", f"{p}embeddings.class_embedding", IDENTITY),
        KeyMapping("position_embedding/embedding", f"{p}embeddings.position_embedding.weight"),
        *_layer_norm("pre_layrnorm", f"{p}pre_layrnorm"),
        *_encoder_key_map(config.num_hidden_layers, p),
        *_layer_norm("post_layernorm", f"{p}post_layernorm"),
        *_linear("visual_projection", "visual_projection", bias=False),
    ]


def _abstract_params(module, *inputs):
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))["params"]


def text_params_from_state_dict(module: CLIPTextModel, flat, *, source: str, mesh=None, rules=None):
    """Params from a transformers-named state dict, keys with or without ``text_model.``.

    Also serves single-file SD checkpoints: ``convert_sd.load_sd_checkpoint`` hands over the
    text-encoder tensors under ``text_model.*`` names (SD1.5's config is ``CLIPTextConfig.sd15()``).
    """
    prefix = TEXT_PREFIX if any(k.startswith(TEXT_PREFIX) for k in flat) else ""
    abstract = _abstract_params(module, jnp.zeros((1, module.config.max_position_embeddings), jnp.int32))
    return weights.load_into(abstract, flat, text_key_map(module.config, prefix), source=source, mesh=mesh,
                             rules=rules, dtype=module.param_dtype, ignore=IGNORED_KEYS)


def load_clip_text(folder: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   mesh=None, rules=None, attention_impl: str = "xla", remat: str = "none"):
    """A transformers ``CLIPTextModel`` folder -> (CLIPTextModel module, params).

    ``dtype`` is the compute dtype, ``param_dtype`` the dtype the weights are held in.  With
    ``mesh`` every parameter is created directly with its sharding (logical names + ``rules``).
    """
    folder = os.fspath(folder)
    config = CLIPTextConfig.from_dict(weights.read_config(folder), source=os.path.join(folder, "config.json"))
    module = CLIPTextModel(config, attention_impl=attention_impl, remat=remat, dtype=dtype, param_dtype=param_dtype)
    params = text_params_from_state_dict(module, weights.read_state_dict(folder), source=folder, mesh=mesh, rules=rules)
    return module, params


def load_clip_vision(folder: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                     mesh=None, rules=None, attention_impl: str = "xla", remat: str = "none"):
    """A transformers ``CLIPVisionModelWithProjection`` folder -> (module, params)."""
    folder = os.fspath(folder)
    config = CLIPVisionConfig.from_dict(weights.read_config(folder), source=os.path.join(folder, "config.json"))
    module = CLIPVisionModelWithProjection(config, attention_impl=attention_impl, remat=remat, dtype=dtype,
                                           param_dtype=param_dtype)
    flat = weights.read_state_dict(folder)
    abstract = _abstract_params(module, jnp.zeros((1, config.image_size, config.image_size, config.num_channels)))
    params = weights.load_into(abstract, flat, vision_key_map(config), source=folder, mesh=mesh, rules=rules,
                               dtype=param_dtype, ignore=IGNORED_KEYS)
    return module, params


def _save(folder: str, config_dict: dict, tensors: dict[str, np.ndarray]):
    weights.write_model_folder(folder, WEIGHTS_FILE, tensors, config_dict)  # refuses to overwrite


def save_clip_text(folder: str | os.PathLike, module: CLIPTextModel, params) -> None:
    """Writes config.json + model.safetensors that ``transformers.CLIPTextModel.from_pretrained`` loads;
    refuses to overwrite either (FileExistsError), as every saver here does."""
    _save(os.fspath(folder), module.config.to_dict(), weights.export_state_dict(params, text_key_map(module.config)))


def save_clip_vision(folder: str | os.PathLike, module: CLIPVisionModelWithProjection, params) -> None:
    """Writes the folder that ``transformers.CLIPVisionModelWithProjection.from_pretrained`` loads;
    refuses to overwrite (FileExistsError), as every saver here does."""
    _save(os.fspath(folder), module.config.to_dict(), weights.export_state_dict(params, vision_key_map(module.config)))


def load_tokenizer(folder: str | os.PathLike) -> CLIPTokenizer:
    """The CLIP tokenizer saved in a local folder (vocab.json + merges.txt, or tokenizer.json): our
    torch-free ``mema_jax.models.tokenizer.CLIPTokenizer``, which encodes as transformers' does."""
    return CLIPTokenizer.from_folder(folder)


def tokenize(tokenizer: CLIPTokenizer, prompts: str | Sequence[str], max_length: int = 77) -> np.ndarray:
    """Token ids (N, max_length) int32, padded and truncated as Stable Diffusion does."""
    return tokenizer(prompts, max_length=max_length)
