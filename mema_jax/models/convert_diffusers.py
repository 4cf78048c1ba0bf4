"""What the UNet and VAE converters share: diffusers' state-dict key names, the renaming to the
original (LDM) checkpoint names by a prefix table, and the component loader and saver.

A diffusers component folder (``unet/``, ``vae/``) holds ``config.json`` and
``diffusion_pytorch_model.safetensors`` (or any weight format ``weights.read_state_dict`` knows).
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

from mema_jax.models import weights

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
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


def rename_by_prefix(key: str, table, inner_names: Mapping[str, str]) -> str:
    """A diffusers key -> its LDM name: the longest matching (diffusers prefix, LDM prefix, is_resnet)
    row of ``table`` replaces the prefix; inside a resnet the layer is renamed by ``inner_names``."""
    best = max((row for row in table if key.startswith(row[0])), key=lambda row: len(row[0]), default=None)
    if best is None:
        raise KeyError(f"no LDM name for {key}")
    prefix, new_prefix, is_resnet = best
    rest = key[len(prefix):]
    if is_resnet:
        layer, _, leaf = rest.partition(".")
        rest = f"{inner_names.get(layer, layer)}.{leaf}"
    return new_prefix + rest


def load_component(path, config, parse_config: Callable[[dict], Any], make_module: Callable[[Any], Any],
                   ldm_prefix: str, params_from_state_dict, *, mesh=None, rules=None):
    """The loading steps every diffusers component shares: config -> module -> state dict (diffusers
    names, or LDM names under ``ldm_prefix`` when the file has them) -> params.  ``config``: a dict,
    a config.json path, or None for the config.json beside ``path``."""
    path = os.fspath(path)
    try:
        model_config = parse_config(weights.read_config(path, config))
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


def save_component(folder, config: Mapping[str, Any], params, key_map: weights.KeyMap) -> None:
    """Writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` (diffusers format);
    refuses to overwrite either (``weights.write_model_folder``)."""
    weights.write_model_folder(folder, WEIGHTS_FILE, weights.export_state_dict(params, key_map), config)
