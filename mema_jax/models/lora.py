"""LoRA for the UNet: a separate parameter tree, merged with the frozen base inside the loss.

maxtext-style: the base weights stay exactly as the strict loaders read them; LoRA lives in its
own tree that mirrors the base tree's module paths, e.g.

    lora["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"] = {
        "lora_down": (in, r),  "lora_up": (r, out)}          # a Dense kernel (in, out)
    ...["resnets_0"]["conv1"] = {"lora_down": (kh, kw, in, r), "lora_up": (r, out)}   # a conv

and ``merge(base, lora, scales)`` gives ``kernel + scale * down @ up`` for every adapted module
(``scale = alpha / rank``), so only the LoRA tree is trained and kept in the optimizer state.
``lora_up`` starts at zero: at step 0 the adapted UNet equals the base exactly.

Files (``save_lora`` / ``load_lora``):
  * the diffusers / peft format (what ``StableDiffusionPipeline.save_lora_weights`` writes and
    ``load_lora_weights`` reads): ``unet.<module>.lora_A.weight`` (r, in[, kh, kw]) and
    ``.lora_B.weight`` (out, r[, 1, 1]), and the peft ``LoraConfig`` (``r``, ``lora_alpha``,
    ``target_modules``, ...) under the safetensors metadata key ``lora_adapter_metadata`` with a
    ``unet.`` prefix.  Without that metadata diffusers loads alpha = r (scale 1), so a LoRA with
    alpha != r would come back at the wrong strength: we always write it, and read it as diffusers does;
  * kohya-style files (most published SD1.5 LoRAs): ``lora_unet_<module with _>.lora_down.weight``,
    ``.lora_up.weight`` and a per-module ``.alpha`` (absent: alpha = rank), read only.
A file whose modules or shapes do not fit the UNet fails with one ``WeightsError`` listing them.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mema_jax.core import sharding
from mema_jax.models import param_tree, weights
from mema_jax.models.convert_diffusers import diffusers_key

# Named groups of target modules (regexes over the module path inside the UNet).
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    # to_q/k/v/out of self- (attn1) and cross-attention (attn2): the paper's and diffusers' default.
    "attention": (r"attn[12]/to_(q|k|v|out)",),
    "feed_forward": (r"ff/proj_(in|out)",),
    "conv": (r"resnets_\d+/conv(1|2|_shortcut)", r"(down|up)samplers_0/conv", r"attentions_\d+/proj_(in|out)"),
}
LORA_DOWN, LORA_UP = "lora_down", "lora_up"
RANK_AXIS = "lora_rank"  # logical name of the rank dimension (replicated by the default rules)
METADATA_KEY = "lora_adapter_metadata"
PEFT_PREFIX = "unet."
KOHYA_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_")


# ----------------------------------------------------------------------------------------------
# Which modules, and the LoRA tree.


def target_patterns(targets: Iterable[str]) -> tuple[str, ...]:
    patterns = []
    for name in targets:
        if name not in TARGET_GROUPS:
            raise ValueError(f"unknown LoRA target group {name!r}; choose from {sorted(TARGET_GROUPS)}")
        patterns += TARGET_GROUPS[name]
    return tuple(patterns)


def target_modules(base_params, targets: Iterable[str] = ("attention",)) -> list[str]:
    """Module paths (without ``/kernel``) of the base tree that ``targets`` select, sorted."""
    patterns = [re.compile(rf"(^|/)(?:{p})$") for p in target_patterns(targets)]
    found = []
    for path, leaf in param_tree.flatten(base_params).items():
        module, _, name = path.rpartition("/")
        shape = _shape(leaf)
        if name == "kernel" and len(shape) in (2, 4) and any(p.search(module) for p in patterns):
            found.append(module)
    if not found:
        raise ValueError(f"no module of the UNet matches the LoRA targets {list(targets)}")
    return sorted(found)


def _shape(leaf) -> tuple[int, ...]:
    value = leaf.value if sharding.is_box(leaf) else leaf
    return tuple(value.shape)


def _names(leaf, ndim: int) -> tuple:
    return tuple(leaf.names) if sharding.is_box(leaf) else (None,) * ndim


def init_lora(rng, base_params, rank: int, targets: Iterable[str] = ("attention",), dtype=jnp.float32):
    """A LoRA tree for ``base_params`` (concrete or abstract, boxed or not): ``lora_down`` drawn
    as peft does (Kaiming-uniform, bound 1/sqrt(fan_in)), ``lora_up`` zero.  Leaves are boxed with
    logical names (the base kernel's for in/out, ``lora_rank`` for the rank) so the sharding rules
    lay LoRA out like the weights it adapts."""
    flat = param_tree.flatten(base_params)
    out = {}
    for i, module in enumerate(target_modules(base_params, targets)):
        kernel = flat[f"{module}/kernel"]
        shape = _shape(kernel)
        names = _names(kernel, len(shape))
        fan_in = int(np.prod(shape[:-1]))
        bound = 1.0 / math.sqrt(fan_in)
        down = jax.random.uniform(jax.random.fold_in(rng, i), shape[:-1] + (rank,), dtype, -bound, bound)
        up = jnp.zeros((rank, shape[-1]), dtype)
        out[f"{module}/{LORA_DOWN}"] = nn.Partitioned(down, names[:-1] + (RANK_AXIS,))
        out[f"{module}/{LORA_UP}"] = nn.Partitioned(up, (RANK_AXIS, names[-1]))
    return param_tree.unflatten(out)


def lora_modules(lora) -> dict[str, tuple[Any, Any]]:
    """{module path: (lora_down, lora_up)}."""
    flat = param_tree.flatten(sharding.unbox(lora))
    modules = {}
    for path in flat:
        module, _, name = path.rpartition("/")
        if name not in (LORA_DOWN, LORA_UP):
            raise ValueError(f"LoRA tree has {path!r}; every leaf is .../{LORA_DOWN} or .../{LORA_UP}")
        modules[module] = (flat[f"{module}/{LORA_DOWN}"], flat[f"{module}/{LORA_UP}"])
    return modules


def rank_of(down) -> int:
    return int(down.shape[-1])


def delta(down, up):
    """The weight change ``down @ up`` in the base kernel's layout (dense (in, out) or conv (kh, kw, in, out))."""
    return jnp.einsum("...r,ro->...o", down, up)


def _scale_of(scales, module: str) -> float:
    return float(scales[module]) if isinstance(scales, Mapping) else float(scales)


def merge(base, lora, scales) -> dict:
    """``base`` with ``kernel + scale * down @ up`` at every LoRA module (``scales``: one float for
    all, or {module path: float}).  Differentiable in ``lora``; the base tree is not modified."""
    flat = param_tree.flatten(base)
    new = {}
    for module, (down, up) in lora_modules(lora).items():
        kernel = flat[f"{module}/kernel"]
        new[f"{module}/kernel"] = (kernel + _scale_of(scales, module) * delta(down, up).astype(kernel.dtype))
    return param_tree.replace(base, new)


def unmerge(merged, lora, scales) -> dict:
    """Inverse of ``merge`` (exact up to one fp32 rounding per element)."""
    flat = param_tree.flatten(merged)
    new = {}
    for module, (down, up) in lora_modules(lora).items():
        kernel = flat[f"{module}/kernel"]
        new[f"{module}/kernel"] = kernel - _scale_of(scales, module) * delta(down, up).astype(kernel.dtype)
    return param_tree.replace(merged, new)


# ----------------------------------------------------------------------------------------------
# Names in files.


def diffusers_module_name(module: str) -> str:
    """Our module path -> the diffusers UNet module name ("down_blocks.0.attentions.0....to_q")."""
    return diffusers_key(f"{module}/kernel")[: -len(".weight")]


def kohya_module_name(module: str) -> str:
    return KOHYA_PREFIX + diffusers_module_name(module).replace(".", "_")


def _torch_is_conv(module: str, ours_ndim: int, unet_config) -> bool:
    """Conv in torch: our convs, and the transformers' proj_in/out when they are 1x1 convs there."""
    if ours_ndim == 4:
        return True
    return (not unet_config.use_linear_projection) and re.search(r"attentions_\d+/proj_(in|out)$", module) is not None


def _to_torch(down, up, torch_conv: bool) -> tuple[np.ndarray, np.ndarray]:
    down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
    if down.ndim == 4:  # (kh, kw, in, r) -> (r, in, kh, kw)
        a = np.transpose(down, (3, 2, 0, 1))
    else:
        a = down.T if not torch_conv else down.T[:, :, None, None]
    b = up.T if not torch_conv else up.T[:, :, None, None]
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def _from_torch(a: np.ndarray, b: np.ndarray, ours_kernel_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    if len(ours_kernel_shape) == 4:
        down = np.transpose(a, (2, 3, 1, 0))
    else:
        down = (a[:, :, 0, 0] if a.ndim == 4 else a).T
    up = (b[:, :, 0, 0] if b.ndim == 4 else b).T
    return down, up


# ----------------------------------------------------------------------------------------------
# Writing.


def save_lora(path, lora, unet_config, *, alpha: float, rank: int | None = None, overwrite: bool = False) -> str:
    """Writes the diffusers/peft LoRA safetensors file (``pytorch_lora_weights.safetensors`` when
    ``path`` is a folder) with the ``lora_adapter_metadata`` diffusers reads the scale from."""
    path = os.fspath(path)
    if os.path.isdir(path) or not path.endswith(".safetensors"):
        path = os.path.join(path, "pytorch_lora_weights.safetensors")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    modules = lora_modules(jax.device_get(lora))
    ranks = {rank_of(d) for d, _ in modules.values()}
    if rank is None:
        if len(ranks) != 1:
            raise ValueError(f"LoRA modules have several ranks {sorted(ranks)}; pass rank=")
        rank = ranks.pop()
    tensors, names, rank_pattern = {}, [], {}
    for module, (down, up) in modules.items():
        name = diffusers_module_name(module)
        a, b = _to_torch(down, up, _torch_is_conv(module, np.ndim(down), unet_config))
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        names.append(name)
        if rank_of(down) != rank:
            rank_pattern[name] = rank_of(down)
    config = {"r": int(rank), "lora_alpha": float(alpha), "target_modules": sorted(names), "lora_dropout": 0.0,
              "bias": "none", "init_lora_weights": True, "use_rslora": False, "use_dora": False,
              "rank_pattern": rank_pattern, "alpha_pattern": {}}
    metadata = {"format": "pt",
                METADATA_KEY: json.dumps({f"{PEFT_PREFIX}{k}": v for k, v in config.items()}, indent=2, sort_keys=True)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    weights.write_safetensors(path, tensors, metadata)
    return path


# ----------------------------------------------------------------------------------------------
# Reading.


def read_lora_file(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, safetensors metadata) of a LoRA file (.safetensors, or a torch .bin/.pt/.ckpt)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidates = [f for f in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin") if
                      os.path.exists(os.path.join(path, f))]
        if not candidates:
            raise weights.WeightsError(f"{path}: no pytorch_lora_weights.safetensors or .bin in this folder")
        path = os.path.join(path, candidates[0])
    metadata: dict[str, str] = {}
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, "np") as f:
                metadata = dict(f.metadata() or {})
        except Exception as e:  # noqa: BLE001 - a corrupt file is reported by name
            raise weights.WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    return weights.read_state_dict(path), metadata


def load_lora(path, base_params, unet_config, *, skip_text_encoder: bool = False) -> tuple[dict, dict[str, float]]:
    """-> (LoRA tree, {module path: scale}) from a diffusers/peft or kohya file, for ``base_params``
    (concrete or abstract).  Text-encoder LoRA tensors are an error unless ``skip_text_encoder``."""
    path = os.fspath(path)
    tensors, metadata = read_lora_file(path)
    te = sorted(k for k in tensors if k.startswith(TEXT_ENCODER_PREFIXES))
    if te and not skip_text_encoder:
        raise weights.WeightsError(
            f"{path}: has {len(te)} text-encoder LoRA tensors (e.g. {te[0]}); this loader applies UNet LoRA only "
            "(pass skip_text_encoder=True to load the UNet part alone)")
    tensors = {k: v for k, v in tensors.items() if k not in set(te)}
    if any(k.startswith(KOHYA_PREFIX) for k in tensors):
        entries = _kohya_entries(path, tensors)
    else:
        entries = _peft_entries(path, tensors, metadata)
    return _to_tree(path, entries, base_params)


def _peft_entries(path, tensors, metadata):
    """{diffusers module name: (A, B, alpha or None)}; alpha from lora_adapter_metadata as diffusers reads it."""
    config = {}
    if METADATA_KEY in metadata:
        raw = json.loads(metadata[METADATA_KEY])
        config = {k[len(PEFT_PREFIX):]: v for k, v in raw.items() if k.startswith(PEFT_PREFIX)}
    entries, bad = {}, []
    for key in sorted(tensors):
        m = re.fullmatch(r"(?:unet\.)?(.+)\.lora_([AB])\.weight", key)
        if m is None:
            bad.append(key)
            continue
        entries.setdefault(m[1], {})[m[2]] = tensors[key]
    if bad:
        raise weights.WeightsError(f"{path}: tensors that are not peft LoRA weights (unet.<module>.lora_A/B.weight): "
                                   f"{bad[:10]}{' ...' if len(bad) > 10 else ''}")
    out = {}
    for name, ab in entries.items():
        if set(ab) != {"A", "B"}:
            raise weights.WeightsError(f"{path}: module {name} has lora_{''.join(ab)} but not both lora_A and lora_B")
        rank = ab["A"].shape[0]
        alpha = None
        if config:
            alpha = float(config.get("alpha_pattern", {}).get(name, config.get("lora_alpha", rank)))
            if config.get("use_rslora"):
                alpha = alpha * rank / math.sqrt(rank)  # peft: scale alpha / sqrt(r)
            if config.get("use_dora"):
                raise weights.WeightsError(f"{path}: DoRA LoRA files are not supported")
        out[name] = (ab["A"], ab["B"], alpha)
    return out


def _kohya_entries(path, tensors):
    out, bad = {}, []
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(lora_unet_.+?)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
        if m is None:
            bad.append(key)
            continue
        groups.setdefault(m[1], {})[m[2]] = value
    if bad:
        raise weights.WeightsError(f"{path}: tensors that are not kohya LoRA weights "
                                   f"(lora_unet_*.lora_down/lora_up.weight/alpha): {sorted(bad)[:10]}")
    for name, g in groups.items():
        if "lora_down.weight" not in g or "lora_up.weight" not in g:
            raise weights.WeightsError(f"{path}: module {name} lacks lora_down or lora_up")
        alpha = float(np.asarray(g["alpha"]).reshape(())) if "alpha" in g else None
        out[name] = (g["lora_down.weight"], g["lora_up.weight"], alpha)
    return out


def _to_tree(path, entries, base_params):
    flat = param_tree.flatten(base_params)
    kernels = {p[: -len("/kernel")]: _shape(v) for p, v in flat.items() if p.endswith("/kernel")}
    by_name = {}
    for module in kernels:
        by_name[diffusers_module_name(module)] = module
        by_name[kohya_module_name(module)] = module
    unknown, mismatched, tree, scales = [], [], {}, {}
    for name, (a, b, alpha) in sorted(entries.items()):
        module = by_name.get(name)
        if module is None:
            unknown.append(name)
            continue
        shape = kernels[module]
        rank = a.shape[0]
        want_a = (rank, shape[2], shape[0], shape[1]) if len(shape) == 4 else (rank, shape[0])
        want_b = (shape[-1], rank)
        got_a, got_b = tuple(a.shape), tuple(b.shape)
        if len(got_a) == 4 and len(shape) == 2:  # torch 1x1 conv for our Dense (proj_in/out)
            want_a = (rank, shape[0], 1, 1)
        if len(got_b) == 4:
            want_b = want_b + (1, 1)
        if got_a != want_a or got_b != want_b:
            mismatched.append(f"{name}: A {got_a} B {got_b}, the UNet needs A {want_a} B {want_b}")
            continue
        down, up = _from_torch(a, b, shape)
        tree[f"{module}/{LORA_DOWN}"] = down.astype(np.float32)
        tree[f"{module}/{LORA_UP}"] = up.astype(np.float32)
        scales[module] = (rank if alpha is None else alpha) / rank
    if unknown or mismatched:
        lines = [f"  no such module in this UNet: {n}" for n in unknown[:20]] + [f"  shape mismatch: {m}" for m in mismatched[:20]]
        more = len(unknown) + len(mismatched) - len(lines)
        raise weights.WeightsError(
            f"{path}: this LoRA was made for another base model ({len(unknown)} unknown modules, "
            f"{len(mismatched)} shape mismatches):\n" + "\n".join(lines) + (f"\n  ... and {more} more" if more > 0 else ""))
    if not tree:
        raise weights.WeightsError(f"{path}: no UNet LoRA tensors in this file")
    return param_tree.unflatten(tree), scales
