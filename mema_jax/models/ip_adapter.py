"""IP-Adapter (Ye et al. 2023) for the SD UNet: a face image steers the generation.

CLIP image embeds (B, E) -> ``ImageProjection`` (Dense to N x D, LayerNorm) -> N image tokens ->
decoupled cross-attention added to every cross-attention of the UNet:
``attn(q, text) + scale * attn(q, to_k_ip(tokens), to_v_ip(tokens))`` (the UNet built with
``ip_adapter=True``; ``scale`` per sample, so a batch can draw it from U[0.2, 0.4] as MeMa does).

The adapter is a parameter tree of its own, like LoRA: the base UNet weights stay exactly as the
strict loaders read them.  ``{"image_proj": {"proj": ..., "norm": ...}, "layers": {<attn2 path>:
{"to_k_ip": ..., "to_v_ip": ...}}}``; ``unet_params(base, adapter)`` joins the layers to the base tree.

Files: the ip-adapter_sd15 layout of the original release, ``.bin`` (torch.save of
{"image_proj": {...}, "ip_adapter": {...}}) or ``.safetensors`` (flat ``image_proj.*``,
``ip_adapter.N.*``): ``image_proj.proj.weight/bias``, ``image_proj.norm.weight/bias``, and
``ip_adapter.{2i+1}.to_k_ip.weight`` / ``.to_v_ip.weight`` for the i-th cross-attention in
diffusers' processor order (down blocks, up blocks, then the mid block).
"""
from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mema_jax.core import sharding
from mema_jax.models import param_tree, weights
from mema_jax.models.layers.linear import dense
from mema_jax.models.layers.norm import LayerNorm
from mema_jax.models.unet import UNet2DConditionModel

IP_LAYER_NAMES = ("to_k_ip", "to_v_ip")
_ATTN2 = re.compile(r"(down_blocks_(\d+)|up_blocks_(\d+)|mid_block)/attentions_(\d+)/transformer_blocks_(\d+)/attn2")


class ImageProjection(nn.Module):
    """diffusers' ``ImageProjection`` / the release's ``ImageProjModel``: (B, E) -> (B, N, D)."""

    num_tokens: int
    cross_attention_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image_embeds):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(self.num_tokens * self.cross_attention_dim, ("embed", "mlp"), name="proj", **kw)(image_embeds.astype(self.dtype))
        x = x.reshape(x.shape[0], self.num_tokens, self.cross_attention_dim)
        return LayerNorm(name="norm", **kw)(x)


def attn2_paths(unet_params) -> list[str]:
    """Module paths of the cross-attentions, in diffusers' attention-processor order."""
    found = set()
    for path in param_tree.flatten(unet_params):
        m = _ATTN2.match(path)
        if m:
            found.add(m[0])

    def order(path):
        m = _ATTN2.match(path)
        group = 0 if m[2] is not None else 1 if m[3] is not None else 2
        block = int(m[2] or m[3] or 0)
        return group, block, int(m[4]), int(m[5])

    return sorted(found, key=order)


def ip_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """The same UNet with IP-Adapter's layers in every cross-attention."""
    return unet.clone(ip_adapter=True)


def abstract_adapter(unet: UNet2DConditionModel, image_embed_dim: int, num_tokens: int = 4):
    return jax.eval_shape(lambda r: init_adapter(r, unet, image_embed_dim, num_tokens), jax.random.key(0))


def init_adapter(rng, unet: UNet2DConditionModel, image_embed_dim: int, num_tokens: int = 4):
    """A fresh adapter (boxed leaves, random).  For training on a loaded base, ``init_from_base``
    then copies each cross-attention's to_k / to_v into to_k_ip / to_v_ip, as IP-Adapter does."""
    r1, r2 = jax.random.split(rng)
    c = unet.config
    cross_dim = c.cross_attention_dim[0]
    proj = ImageProjection(num_tokens, cross_dim).init(r1, jnp.zeros((1, image_embed_dim)))["params"]
    size = 2 ** len(c.block_out_channels)
    # The image tokens must flow through init, or the (lazily built) to_k_ip / to_v_ip get no parameters.
    full = ip_unet(unet).init(r2, jnp.zeros((1, size, size, c.in_channels)), jnp.zeros((1,)),
                              jnp.zeros((1, 8, cross_dim)), ip_tokens=jnp.zeros((1, num_tokens, cross_dim)))["params"]
    layers, _ = param_tree.split(full, _is_ip_leaf)
    return {"image_proj": proj, "layers": layers}


def _is_ip_leaf(path: str) -> bool:
    return path.rsplit("/", 2)[-2] in IP_LAYER_NAMES


def init_from_base(adapter, base_unet_params):
    """to_k_ip / to_v_ip := the base cross-attention's to_k / to_v (the IP-Adapter paper's init:
    the image branch starts as a copy of the text branch)."""
    flat_base = param_tree.flatten(base_unet_params)
    new = {}
    for path, leaf in param_tree.flatten(adapter["layers"]).items():
        source = path.replace("/to_k_ip/", "/to_k/").replace("/to_v_ip/", "/to_v/")
        value = flat_base[source]
        value = value.value if sharding.is_box(value) else value
        new[path] = nn.Partitioned(value, leaf.names) if sharding.is_box(leaf) else value
    return {"image_proj": adapter["image_proj"], "layers": param_tree.replace(adapter["layers"], new)}


def unet_params(base_unet_params, adapter) -> dict:
    """The parameter tree of ``ip_unet(unet)``: the base tree plus the adapter's layers."""
    return param_tree.merge(base_unet_params, adapter["layers"])


def image_tokens(adapter, image_embeds, num_tokens: int, cross_attention_dim: int):
    return ImageProjection(num_tokens, cross_attention_dim).apply({"params": adapter["image_proj"]}, image_embeds)


# ----------------------------------------------------------------------------------------------
# Files.


def key_map(abstract) -> list[weights.KeyMapping]:
    out = [
        weights.KeyMapping("image_proj/proj/kernel", "image_proj.proj.weight", weights.LINEAR),
        weights.KeyMapping("image_proj/proj/bias", "image_proj.proj.bias"),
        weights.KeyMapping("image_proj/norm/scale", "image_proj.norm.weight"),
        weights.KeyMapping("image_proj/norm/bias", "image_proj.norm.bias"),
    ]
    for i, path in enumerate(attn2_paths(abstract["layers"])):
        for name in IP_LAYER_NAMES:
            out.append(weights.KeyMapping(f"layers/{path}/{name}/kernel", f"ip_adapter.{2 * i + 1}.{name}.weight",
                                          weights.LINEAR))
    return out


def read_adapter_file(path) -> dict[str, np.ndarray]:
    """Flat ``image_proj.*`` / ``ip_adapter.*`` tensors of a .safetensors or a .bin release file."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return weights.read_state_dict(path)
    from mema_jax.models import pth  # the .bin release files are torch zip pickles of nested dicts

    try:
        obj = pth.read_pth(path)
    except (pth.PthFormatError, OSError) as e:
        raise weights.WeightsError(f"{path}: not a readable IP-Adapter file ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or not {"image_proj", "ip_adapter"} <= set(obj):
        raise weights.WeightsError(f"{path}: an IP-Adapter .bin holds the dicts 'image_proj' and 'ip_adapter'; "
                                   f"this one has {sorted(obj) if isinstance(obj, dict) else type(obj).__name__}")
    return {f"{group}.{k}": np.asarray(v, np.float32) for group in ("image_proj", "ip_adapter")
            for k, v in obj[group].items()}


def load_adapter(path, unet: UNet2DConditionModel, *, mesh=None, rules=None):
    """-> (adapter tree, image_embed_dim, num_tokens) from an ip-adapter_sd15-layout file.  A file
    for another base model (other widths, another number of cross-attentions) or another kind of
    IP-Adapter (Plus, Full Face, FaceID) is one WeightsError naming the file and the keys."""
    path = os.fspath(path)
    flat = read_adapter_file(path)
    if "image_proj.proj.weight" not in flat:
        raise weights.WeightsError(f"{path}: no image_proj.proj.weight; only the plain IP-Adapter (ImageProjModel, "
                                   f"4 tokens) is supported, this file has {sorted(k for k in flat if k.startswith('image_proj'))[:6]}")
    proj = flat["image_proj.proj.weight"]
    cross_dim = unet.config.cross_attention_dim[0]
    if proj.shape[0] % cross_dim:
        raise weights.WeightsError(f"{path}: image_proj.proj.weight {tuple(proj.shape)} does not map to tokens of "
                                   f"the UNet's cross_attention_dim {cross_dim}")
    num_tokens, embed_dim = proj.shape[0] // cross_dim, proj.shape[1]
    abstract = abstract_adapter(unet, embed_dim, num_tokens)
    adapter = weights.load_into(abstract, flat, key_map(abstract), source=path, mesh=mesh, rules=rules)
    return adapter, embed_dim, num_tokens


def save_adapter(path, adapter, *, overwrite: bool = False) -> str:
    """Writes the adapter as an ip-adapter_sd15-layout ``.safetensors`` (what diffusers'
    ``load_ip_adapter(..., weight_name=...)`` reads)."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: IP-Adapter files are written as .safetensors")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    adapter = jax.device_get(sharding.unbox(adapter))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    weights.write_safetensors(path, weights.export_state_dict(adapter, key_map(adapter)), {"format": "pt"})
    return path
