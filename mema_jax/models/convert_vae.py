"""VAE weights: diffusers folders/files <-> our parameter tree, and the LDM (original SD
checkpoint) key names (``first_stage_model.*``)."""
from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mema_jax.models import patch_vae, weights
from mema_jax.models.convert_diffusers import diffusers_key, load_component, rename_by_prefix, save_component
from mema_jax.models.vae import AutoencoderKL, VAEConfig, init_params

LDM_VAE_PREFIX = "first_stage_model."

# LDM's VAE attention stores q/k/v/proj_out as 1x1 convs (O, I, 1, 1); some re-saved checkpoints
# hold them squeezed to (O, I).  Both are the same linear map; we write the original 4-d form.
LINEAR_FROM_CONV1X1_OR_LINEAR = weights.Transform(
    "linear_from_conv1x1_or_linear",
    lambda w: np.transpose(w.reshape(w.shape[:2])) if w.ndim == 4 and w.shape[2:] == (1, 1) else np.transpose(w),
    lambda w: np.transpose(w)[:, :, None, None],
)


def vae_diffusers_key(path: str) -> str:
    # Our mid-block attention nests its projections one level deeper ("attentions_0/attention/to_q").
    return diffusers_key(path).replace(".attention.", ".")


def vae_key_map(abstract_params) -> list[weights.KeyMapping]:
    return weights.key_map_from_params(abstract_params, vae_diffusers_key)


_LDM_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
_LDM_ATTENTION_NAMES = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def ldm_vae_prefixes(config: VAEConfig) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is_resnet); LDM numbers the decoder levels from the
    lowest resolution up, i.e. in reverse order of diffusers' up_blocks."""
    n = len(config.block_out_channels)
    table = [
        ("quant_conv.", "quant_conv.", False),
        ("post_quant_conv.", "post_quant_conv.", False),
    ]
    for part in ("encoder", "decoder"):
        table += [
            (f"{part}.conv_in.", f"{part}.conv_in.", False),
            (f"{part}.conv_out.", f"{part}.conv_out.", False),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", False),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", True),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", True),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", False),
        ]
    for i in range(n):
        for j in range(config.layers_per_block):
            table.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", True))
        table.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", False))
        for j in range(config.layers_per_block + 1):
            table.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", True))
        table.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n - 1 - i}.upsample.conv.", False))
    return table


def ldm_vae_key_map(abstract_params, config: VAEConfig, prefix: str = LDM_VAE_PREFIX) -> list[weights.KeyMapping]:
    table = ldm_vae_prefixes(config)
    out = []
    for m in vae_key_map(abstract_params):
        key = rename_by_prefix(m.torch, table, _LDM_RESNET_NAMES)
        transform = m.transform
        if ".mid.attn_1." in key:
            for old, new in _LDM_ATTENTION_NAMES.items():
                head, sep, leaf = key.rpartition(".mid.attn_1.")
                if leaf.startswith(old):
                    key = f"{head}{sep}{new}{leaf[len(old):]}"
                    if transform is weights.LINEAR:
                        transform = LINEAR_FROM_CONV1X1_OR_LINEAR
                    break
        out.append(weights.KeyMapping(m.ours, prefix + key, transform))
    return out


def abstract_vae_params(module: AutoencoderKL):
    return jax.eval_shape(functools.partial(init_params, module), jax.random.PRNGKey(0))


def vae_params_from_state_dict(module: AutoencoderKL, flat: Mapping[str, np.ndarray], *, source: str,
                               mesh=None, rules=None, ldm_prefix: str | None = None):
    abstract = abstract_vae_params(module)
    key_map = vae_key_map(abstract) if ldm_prefix is None else ldm_vae_key_map(abstract, module.config, ldm_prefix)
    return weights.load_into(abstract, flat, key_map, source=source, mesh=mesh, rules=rules)


def vae_from_config(config: Mapping, **kw):
    """The VAE module a config dict describes: ``PatchAutoencoder`` (the offline generator's
    lossless patches, mema_jax.models.patch_vae) or diffusers' ``AutoencoderKL``."""
    if config.get("_class_name") == patch_vae.CLASS_NAME:
        return patch_vae.PatchAutoencoder(patch_vae.PatchConfig.from_dict(config), dtype=kw.get("dtype", jnp.float32))
    return AutoencoderKL(VAEConfig.from_dict(config), **kw)


def load_vae(path, *, config=None, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl: str = "xla",
             remat: str = "none", mesh=None, rules=None):
    """-> (AutoencoderKL, params) from a diffusers vae folder or a weight file (+ ``config``);
    (PatchAutoencoder, {}) from a folder whose config.json names it (it has no weights)."""
    raw = weights.read_config(path, config)
    if raw.get("_class_name") == patch_vae.CLASS_NAME:
        try:
            return patch_vae.PatchAutoencoder(patch_vae.PatchConfig.from_dict(raw), dtype=dtype), {}
        except ValueError as err:
            raise weights.WeightsError(f"{path}: {err}") from err
    return load_component(
        path, config, VAEConfig.from_dict,
        lambda c: AutoencoderKL(c, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, remat=remat),
        LDM_VAE_PREFIX, vae_params_from_state_dict, mesh=mesh, rules=rules)


def save_vae(folder, module: AutoencoderKL, params) -> None:
    """Writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` (diffusers format) into
    ``folder``; refuses to overwrite either (FileExistsError), as every saver here does.  A
    ``PatchAutoencoder`` has no weights: its folder is the config.json alone."""
    if isinstance(module, patch_vae.PatchAutoencoder):
        weights.write_model_folder(folder, None, {}, module.config.to_dict())
        return
    save_component(folder, module.config.to_dict(), params, vae_key_map(params))
