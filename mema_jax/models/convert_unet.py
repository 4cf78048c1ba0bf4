"""UNet weights: diffusers folders/files <-> our parameter tree, and the LDM (original SD
checkpoint) key names.

``load_unet(path)`` reads a diffusers ``unet/`` folder (config.json + weights in any format
``weights.read_state_dict`` knows), or a single weight file with its config; a state dict with
LDM names (``model.diffusion_model.*``) is recognised and mapped as well.
``save_unet(folder, module, params)`` writes the diffusers format back.
"""
from __future__ import annotations

import functools
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mema_jax.models import weights
from mema_jax.models.convert_diffusers import diffusers_key, load_component, rename_by_prefix, save_component
from mema_jax.models.unet import UNet2DConditionModel, UNetConfig, init_params

LDM_UNET_PREFIX = "model.diffusion_model."


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


def save_unet(folder, module: UNet2DConditionModel, params) -> None:
    """Writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` (diffusers format) into
    ``folder``; refuses to overwrite either (FileExistsError), as every saver here does."""
    save_component(folder, module.config.to_dict(), params, unet_key_map(params, module.config))
