"""Weight I/O shared by every model: reading PyTorch-side state dicts, writing safetensors,
and moving tensors between a state dict and a (possibly sharded) Flax parameter tree.

A model's converter describes its weights as a *key map*: a list of ``KeyMapping`` entries,
one per Flax parameter, naming the parameter's path in our tree ("down_blocks_0/resnets_0/
conv1/kernel"), the PyTorch key ("down_blocks.0.resnets.0.conv1.weight") and the transform
between the two layouts.  ``load_into`` and ``export_state_dict`` are inverse walks over that
list; every parameter must be matched, so a wrong file can never fall back to random weights.

No torch: safetensors are read through safetensors' numpy API (bf16 arrives as
``ml_dtypes.bfloat16``), ``.bin``/``.pt``/``.pth``/``.ckpt`` through ``mema_jax.models.pth``'s
weights-only reader of torch's zip format; only a legacy (torch < 1.6) pickle imports torch.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mema_jax.core import sharding as sharding_lib
from mema_jax.errors import InputError
from mema_jax.fileio import atomic_file, atomic_write_bytes
from mema_jax.models import param_tree


class WeightsError(InputError, ValueError):
    """A weight file does not fit the model; the message names the file and the offending keys."""


# ----------------------------------------------------------------------------------------------
# Transforms between the PyTorch layout and ours.


@dataclasses.dataclass(frozen=True)
class Transform:
    """A layout change: ``to_ours`` maps a torch tensor to our layout, ``to_torch`` inverts it."""

    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    torch_ndim: int | None = None  # the rank the torch tensor must have (None: any)


def _conv_to_ours(w):  # torch conv weight (O, I, kH, kW) -> flax (kH, kW, I, O)
    return np.transpose(w, (2, 3, 1, 0))


def _conv_to_torch(w):
    return np.transpose(w, (3, 2, 0, 1))


IDENTITY = Transform("identity", lambda w: w, lambda w: w)
LINEAR = Transform("linear", lambda w: np.transpose(w), lambda w: np.transpose(w), torch_ndim=2)
CONV = Transform("conv", _conv_to_ours, _conv_to_torch, torch_ndim=4)


def _conv1x1_to_dense(w):  # (O, I, 1, 1) -> (I, O); another kernel size is left as is (and fails the shape check)
    return np.transpose(w[:, :, 0, 0]) if w.shape[2:] == (1, 1) else w


# A 1x1 convolution in torch that we implement as a Dense layer (same math on channels).
CONV1X1_AS_LINEAR = Transform(
    "conv1x1_as_linear", _conv1x1_to_dense, lambda w: np.transpose(w)[:, :, None, None], torch_ndim=4
)


@dataclasses.dataclass(frozen=True)
class KeyMapping:
    ours: str  # "/"-joined path in our parameter tree (relative to the tree given to load_into)
    torch: str  # key in the PyTorch state dict
    transform: Transform = IDENTITY


KeyMap = Sequence[KeyMapping]


def standard_transform(path: str, shape: Sequence[int]) -> Transform:
    """The usual layout change for a flax parameter: conv kernels (4-d) and Dense kernels (2-d)
    are transposed from torch's (out, in, ...) order; everything else is copied."""
    if path.endswith("kernel") and len(shape) == 4:
        return CONV
    if path.endswith("kernel") and len(shape) == 2:
        return LINEAR
    return IDENTITY


def key_map_from_params(
    abstract_params,
    torch_key: Callable[[str], str],
    transform: Callable[[str, Sequence[int]], Transform] = standard_transform,
) -> list[KeyMapping]:
    """One KeyMapping per parameter of a (boxed or plain, abstract or concrete) tree, the torch key
    and the transform computed from our path (and shape) by the model's naming functions."""
    out = []
    for path, leaf in flatten_paths(abstract_params).items():
        shape = tuple(_unboxed(leaf).shape)
        out.append(KeyMapping(path, torch_key(path), transform(path, shape)))
    return out


def renamed(key_map: KeyMap, rename_torch: Callable[[str], str]) -> list[KeyMapping]:
    """The same key map with every torch key renamed (e.g. diffusers names -> LDM names)."""
    return [KeyMapping(m.ours, rename_torch(m.torch), m.transform) for m in key_map]


# ----------------------------------------------------------------------------------------------
# Reading and writing files.

_SAFETENSORS_FOLDER_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_SAFETENSORS_INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
_BIN_FOLDER_FILES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
_BIN_INDEX_FILES = ("diffusion_pytorch_model.bin.index.json", "pytorch_model.bin.index.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a weight file, or of the weights in a diffusers/transformers model folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_folder(path)
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such weight file")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith(_PICKLE_SUFFIXES):
        return _read_torch_pickle(path)
    if path.endswith(".index.json"):
        return _read_index(path)
    raise WeightsError(f"{path}: unknown weight file type (expected .safetensors, .bin, .pt, .pth, .ckpt)")


def _read_folder(folder: str) -> dict[str, np.ndarray]:
    for names in (_SAFETENSORS_FOLDER_FILES, _SAFETENSORS_INDEX_FILES, _BIN_FOLDER_FILES, _BIN_INDEX_FILES):
        for name in names:
            candidate = os.path.join(folder, name)
            if os.path.exists(candidate):
                return read_state_dict(candidate)
    listing = sorted(os.listdir(folder))
    raise WeightsError(
        f"{folder}: no weight file found (looked for "
        f"{', '.join(_SAFETENSORS_FOLDER_FILES + _SAFETENSORS_INDEX_FILES + _BIN_FOLDER_FILES + _BIN_INDEX_FILES)}); "
        f"the folder holds {listing}"
    )


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise WeightsError(f"{path}: cannot read as safetensors: {err}") from err


def _read_index(index_path: str) -> dict[str, np.ndarray]:
    """A sharded checkpoint: ``*.index.json`` with a ``weight_map`` key -> shard file."""
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise WeightsError(f"{index_path}: not a valid sharded-checkpoint index: {err}") from err
    folder = os.path.dirname(index_path)
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_tensors = read_state_dict(os.path.join(folder, shard))
        out.update(shard_tensors)
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise WeightsError(f"{index_path}: keys listed in the index but absent from the shards: {missing}")
    return out


def _read_torch_pickle(path: str) -> dict[str, np.ndarray]:
    """A torch state dict file, read without torch (``mema_jax.models.pth.read_pth``: the zip format
    every torch >= 1.6 writes, weights-only).  Only a legacy pre-1.6 pickle needs torch, when it is
    installed."""
    from mema_jax.models import pth

    try:
        obj = pth.read_pth(path)
    except pth.PthFormatError as err:
        if zipfile.is_zipfile(path):
            raise WeightsError(f"{path}: cannot load as a torch weights file with weights_only=True ({err}); "
                               "convert it to .safetensors") from err
        obj = _read_legacy_torch_pickle(path, err)
    # Lightning-style checkpoints (.ckpt) wrap the weights in "state_dict".
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict (mapping of names to tensors), got {type(obj).__name__}")
    return {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}


def _read_legacy_torch_pickle(path: str, zip_error: Exception):
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{path}: {zip_error}; reading it needs torch (pip install torch), or convert it "
                           "to .safetensors") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad or unsafe pickle
        raise WeightsError(
            f"{path}: cannot load as a torch weights file with weights_only=True ({err}); "
            "convert it to .safetensors"
        ) from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        return obj
    out = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous()
            out[key] = (value.view(torch.int16).numpy().view(_bfloat16()) if value.dtype == torch.bfloat16
                        else value.numpy())
    return out


def _bfloat16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Writes a .safetensors file atomically (temp file in the same folder, then os.replace)."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
    with atomic_file(Path(path)) as tmp:
        save_file(arrays, os.fspath(tmp), metadata=dict(metadata) if metadata else None)


def write_json(path: str | os.PathLike, obj: Any):
    """Writes a JSON file atomically (used for config.json beside the weights)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_config(path: str | os.PathLike, config: Mapping[str, Any] | str | os.PathLike | None = None) -> dict[str, Any]:
    """A model's config dict: ``config`` itself when it is a mapping, else the JSON file it names,
    else the ``config.json`` in the folder ``path`` (or beside the weight file ``path``)."""
    path = os.fspath(path)
    if isinstance(config, Mapping):
        return dict(config)
    if config is None:
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        config = os.path.join(folder, "config.json")
    try:
        with open(config) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: cannot read the model config {os.fspath(config)}: {err}") from err


def write_model_folder(folder: str | os.PathLike, weights_file: str | None, tensors: Mapping[str, np.ndarray],
                       config: Mapping[str, Any]) -> None:
    """Writes ``config.json`` and the safetensors file ``weights_file`` (None: a model without
    weights, config.json alone) into ``folder`` (created if needed): the one rule of every saver
    here.  An existing config.json or weights file is never overwritten -- FileExistsError before
    anything is written; each file is written atomically."""
    folder = os.fspath(folder)
    targets = [os.path.join(folder, name) for name in (weights_file, "config.json") if name is not None]
    taken = [t for t in targets if os.path.exists(t)]
    if taken:
        raise FileExistsError(f"{', '.join(taken)} exists; refusing to overwrite it (save into a new folder)")
    os.makedirs(folder, exist_ok=True)
    if weights_file is not None:
        write_safetensors(targets[0], tensors, {"format": "pt"})
    write_json(targets[-1], config)


# ----------------------------------------------------------------------------------------------
# State dict <-> parameter tree.


def _unboxed(leaf):
    return leaf.value if sharding_lib.is_box(leaf) else leaf


# {"a/b/c": leaf} for a nested dict (boxes count as leaves); the name the converters and tests use.
flatten_paths = param_tree.flatten


def _check_key_map(key_map: KeyMap, our_paths: Iterable[str]):
    """A key map that does not cover the model exactly is a bug in the converter, not in the file."""
    ours = [m.ours for m in key_map]
    torch_keys = [m.torch for m in key_map]
    dup_ours = sorted({p for p in ours if ours.count(p) > 1}) if len(set(ours)) != len(ours) else []
    dup_torch = sorted({k for k in torch_keys if torch_keys.count(k) > 1}) if len(set(torch_keys)) != len(torch_keys) else []
    our_paths = set(our_paths)
    unmapped = sorted(our_paths - set(ours))
    unknown = sorted(set(ours) - our_paths)
    if dup_ours or dup_torch or unmapped or unknown:
        raise ValueError(
            "key map does not match the model's parameters: "
            f"parameters without a mapping {unmapped}, mappings to no parameter {unknown}, "
            f"parameters mapped twice {dup_ours}, torch keys mapped twice {dup_torch}"
        )


def load_into(
    abstract_boxed_params,
    flat: Mapping[str, np.ndarray],
    key_map: KeyMap,
    *,
    source: str,
    mesh=None,
    rules=None,
    dtype=None,
    ignore: Sequence[str] = (),
):
    """Builds the parameter tree (plain arrays, the unboxed structure) from a state dict.

    ``abstract_boxed_params``: ``jax.eval_shape(module.init, ...)["params"]`` (leaves may be
    ``nn.Partitioned`` boxes carrying logical axis names).  Every parameter must be found in
    ``flat`` with the right shape and every key of ``flat`` must be used, except keys matching one
    of the ``ignore`` regexes (buffers such as position ids); otherwise one ``WeightsError``
    names ``source`` and lists all missing, unexpected and mis-shaped keys.  ``dtype`` overrides
    the parameter dtype (default: the dtype of the abstract parameter).  With ``mesh`` each array
    is created directly with its NamedSharding from the logical names and ``rules``, shard by
    shard, never whole on one device.
    """
    abstract_flat = flatten_paths(abstract_boxed_params)
    _check_key_map(key_map, abstract_flat)
    ignore_res = [re.compile(p) for p in ignore]

    used = {m.torch for m in key_map}
    missing = sorted(m.torch for m in key_map if m.torch not in flat)
    unexpected = sorted(k for k in flat if k not in used and not any(r.fullmatch(k) for r in ignore_res))
    misshaped = []
    converted: dict[str, np.ndarray] = {}
    for m in key_map:
        if m.torch not in flat:
            continue
        leaf = abstract_flat[m.ours]
        want = tuple(_unboxed(leaf).shape)
        tensor = np.asarray(flat[m.torch])
        if m.transform.torch_ndim is not None and tensor.ndim != m.transform.torch_ndim:
            misshaped.append(f"{m.torch}: shape {tuple(tensor.shape)}, expected a {m.transform.torch_ndim}-d tensor for {m.ours} {want}")
            continue
        value = m.transform.to_ours(tensor)
        if tuple(value.shape) != want:
            expected_torch = tuple(m.transform.to_torch(np.empty(want, np.int8)).shape)
            misshaped.append(f"{m.torch}: shape {tuple(tensor.shape)}, expected {expected_torch}")
            continue
        converted[m.ours] = value
    if missing or unexpected or misshaped:
        parts = [f"{source}: weights do not match the model"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if misshaped:
            parts.append(f"mis-shaped keys ({len(misshaped)}): {misshaped}")
        raise WeightsError("\n".join(parts))

    shardings = None
    if mesh is not None:
        shardings = flatten_paths(sharding_lib.tree_shardings(abstract_boxed_params, mesh, rules))

    placed = {}
    for path, value in converted.items():
        leaf = abstract_flat[path]
        target_dtype = dtype if dtype is not None else _unboxed(leaf).dtype
        value = np.asarray(value, dtype=target_dtype)
        if shardings is None:
            placed[path] = jnp.asarray(value)
        else:
            placed[path] = jax.make_array_from_callback(value.shape, shardings[path], lambda index, v=value: v[index])
    return param_tree.unflatten(placed)


def export_state_dict(params, key_map: KeyMap) -> dict[str, np.ndarray]:
    """The inverse of ``load_into``: a torch-layout state dict from our (unboxed or boxed) params."""
    flat = {k: _unboxed(v) for k, v in flatten_paths(params).items()}
    _check_key_map(key_map, flat)
    out = {}
    for m in key_map:
        value = np.asarray(jax.device_get(flat[m.ours]))
        out[m.torch] = np.ascontiguousarray(m.transform.to_torch(value))
    return out
