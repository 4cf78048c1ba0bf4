"""UNet weights: diffusers folders/files <-> our parameter tree, and the LDM (original SD
checkpoint) key names.

``load_unet(path)`` reads a diffusers ``unet/`` folder (config.json + weights in any format
``weights.read_state_dict`` knows), or a single weight file with its config; a state dict with
LDM names (``model.diffusion_model.*``) is recognised and mapped as well.
``save_unet(folder, module, params)`` writes the diffusers format back.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mema_jax.models import weights
from mema_jax.models.unet import UNet2DConditionModel, UNetConfig, init_params

LDM_UNET_PREFIX = "model.diffusion_model."
_LIST_SEGMENT = re.compile(r"(down_blocks|up_blocks|resnets|attentions|transformer_blocks|downsamplers|upsamplers)_(\d+)")


def diffusers_key(path: str) -> str:
    """Our parameter path -> the diffusers state-dict key (UNet and VAE share these names)."""
    segments = []
    for seg in path.split("/"):
        m = _LIST_SEGMENT.fullmatch(seg)
        segments.append(f"{m[1]}.{m[2]}" if m else seg)
    if segments[-1] in ("kernel", "scale"):
        segments[-1] = "weight"
    key = "." + ".".join(segments)
    key = key.replace(".ff.proj_in.", ".ff.net.0.proj.").replace(".ff.proj_out.", ".ff.net.2.")
    return key.replace(".to_out.", ".to_out.0.")[1:]


def unet_key_map(abstract_params, config: UNetConfig) -> list[weights.KeyMapping]:
    """Key map to the diffusers UNet state dict.  With use_linear_projection=False the
    transformers' proj_in/proj_out are 1x1 convs in torch and Dense layers here."""

    def transform(path, shape):
        if not config.use_linear_projection and re.search(r"attentions_\d+/proj_(in|out)/kernel$", path):
            return weights.CONV1X1_AS_LINEAR
        return weights.standard_transform(path, shape)

    return weights.key_map_from_params(abstract_params, diffusers_key, transform)


_LDM_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def ldm_unet_prefixes(config: UNetConfig) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is_resnet) for every module of the UNet: the original
    ``openaimodel.UNetModel`` numbers input/output blocks consecutively (a downsampler is an
    input block of its own; an upsampler sits inside the last output block of a level)."""
    n = len(config.block_out_channels)
    table = [
        ("time_embedding.linear_1.", "time_embed.0.", False),
        ("time_embedding.linear_2.", "time_embed.2.", False),
        ("conv_in.", "input_blocks.0.0.", False),
        ("conv_norm_out.", "out.0.", False),
        ("conv_out.", "out.2.", False),
    ]
    index = 1
    for i in range(n):
        for j in range(config.layers_per_block[i]):
            table.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{index}.0.", True))
            table.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{index}.1.", False))
            index += 1
        if i < n - 1:
            table.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.", False))
            index += 1
    table += [
        ("mid_block.resnets.0.", "middle_block.0.", True),
        ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.1.", "middle_block.2.", True),
    ]
    index = 0
    for i in range(n):
        num_layers = config.layers_per_block[n - 1 - i] + 1
        has_attention = config.up_block_types[i] == "CrossAttnUpBlock2D"
        for j in range(num_layers):
            table.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{index}.0.", True))
            table.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{index}.1.", False))
            if j == num_layers - 1 and i < n - 1:
                table.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{index}.{2 if has_attention else 1}.conv.", False))
            index += 1
    return table


def rename_by_prefix(key: str, table, inner_names: Mapping[str, str]) -> str:
    """Replace the longest matching prefix; for resnet modules also rename the layer inside."""
    best = max((row for row in table if key.startswith(row[0])), key=lambda row: len(row[0]), default=None)
    if best is None:
        raise KeyError(f"no LDM name for {key}")
    prefix, new_prefix, is_resnet = best
    rest = key[len(prefix):]
    if is_resnet:
        layer, _, leaf = rest.partition(".")
        rest = f"{inner_names.get(layer, layer)}.{leaf}"
    return new_prefix + rest


def ldm_unet_key_map(abstract_params, config: UNetConfig, prefix: str = LDM_UNET_PREFIX) -> list[weights.KeyMapping]:
    """Key map to the UNet inside an original SD checkpoint (``model.diffusion_model.*``)."""
    table = ldm_unet_prefixes(config)
    return weights.renamed(unet_key_map(abstract_params, config), lambda k: prefix + rename_by_prefix(k, table, _LDM_RESNET_NAMES))


def abstract_unet_params(module: UNet2DConditionModel):
    n = len(module.config.block_out_channels)
    size = 2 ** n
    return jax.eval_shape(functools.partial(init_params, module, sample_shape=(1, size, size)), jax.random.PRNGKey(0))


def unet_params_from_state_dict(module: UNet2DConditionModel, flat: Mapping[str, np.ndarray], *, source: str,
                                mesh=None, rules=None, ldm_prefix: str | None = None):
    """Params from a state dict with diffusers names, or LDM names under ``ldm_prefix``."""
    abstract = abstract_unet_params(module)
    if ldm_prefix is None:
        key_map = unet_key_map(abstract, module.config)
    else:
        key_map = ldm_unet_key_map(abstract, module.config, ldm_prefix)
    return weights.load_into(abstract, flat, key_map, source=source, mesh=mesh, rules=rules)


def load_unet(path, *, config=None, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl: str = "xla",
              remat: str = "none", mesh=None, rules=None):
    """-> (UNet2DConditionModel, params).  ``path``: a diffusers unet folder, or a weight file
    (diffusers or LDM names) with ``config`` (a dict or a config.json path; default: the
    config.json beside the file).  ``dtype``: compute dtype; ``param_dtype``: stored dtype."""
    return load_component(
        path, config, UNetConfig.from_dict,
        lambda c: UNet2DConditionModel(c, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                                       remat=remat),
        LDM_UNET_PREFIX, unet_params_from_state_dict, mesh=mesh, rules=rules)


def load_component(path, config, parse_config, make_module, ldm_prefix: str, params_from_state_dict, *,
                   mesh=None, rules=None):
    """The loading steps every diffusers component shares: config -> module -> state dict (diffusers
    names, or LDM names under ``ldm_prefix`` when the file has them) -> params."""
    path = os.fspath(path)
    try:
        model_config = parse_config(_read_config(path, config))
    except ValueError as err:
        if isinstance(err, weights.WeightsError):
            raise
        raise weights.WeightsError(f"{path}: {err}") from err
    module = make_module(model_config)
    flat = weights.read_state_dict(path)
    prefix = ldm_prefix if any(k.startswith(ldm_prefix) for k in flat) else None
    if prefix is not None:
        flat = {k: v for k, v in flat.items() if k.startswith(prefix)}
    return module, params_from_state_dict(module, flat, source=path, mesh=mesh, rules=rules, ldm_prefix=prefix)


def _read_config(path: str, config) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if config is None:
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        config = os.path.join(folder, "config.json")
    try:
        with open(config) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise weights.WeightsError(f"{path}: cannot read the model config {config}: {err}") from err


def save_unet(folder, module: UNet2DConditionModel, params) -> None:
    """Writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` (diffusers format)."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors = weights.export_state_dict(params, unet_key_map(params, module.config))
    weights.write_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"), tensors, {"format": "pt"})
    weights.write_json(os.path.join(folder, "config.json"), module.config.to_dict())
