"""IResNet weights: arcface_torch ``backbone.pth`` and insightface ONNX files in, ``.pth`` out.

* ``backbone.pth`` (arcface_torch's ``torch.save(backbone.state_dict())``): read with
  ``weights.read_state_dict``; our names are the torch names with ``layer1.0`` written
  ``layer1_0``, ``downsample.0/1`` written ``downsample_conv/bn`` and flax leaf names
  (``kernel``, ``scale``, ``alpha``; BatchNorm statistics ``mean``/``var`` in ``batch_stats``).
* ONNX (insightface's ``w600k_r50.onnx``, ``glintr100.onnx``: arcface_torch graphs exported by
  ``torch.onnx.export``): initializer names cannot be trusted -- the exporter folds each
  BatchNorm that follows a convolution into that convolution (new names ``onnx::Conv_N``),
  reshapes PReLU slopes (``onnx::PRelu_N``) and merges equal constants behind Identity nodes --
  so the graph is read by structure: its Conv / BatchNormalization / PRelu / Gemm nodes in
  execution order are matched to arcface_torch's modules (the depth is the one whose number of
  convolutions the graph has); unfolded exports (BatchNorms as nodes, slopes behind Unsqueeze
  nodes) read the same way.  A folded BatchNorm comes back as the fused convolution kernel
  and a BatchNorm with unit scale, zero mean, the fused bias and variance ``1 - eps``: the same
  function in evaluation mode, not the training-time statistics.  A leading Sub 127.5 / Mul k
  (graphs that take 0..255 pixels) is absorbed into the stem convolution (scaled by 127.5 k).
* ``save_iresnet_pth``: arcface_torch's key names, order and layout, written without torch
  (``mema_jax.models.pth``), loadable by ``eval.identity.load_identity_model("arcface_r18", ...)``.

A file that does not fit (missing, extra or mis-shaped keys; another depth or width than asked;
a graph that is not an iresnet) is one ``WeightsError`` naming the file and the keys or nodes.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax
import numpy as np

from mema_jax.models import weights
from mema_jax.models.iresnet import LAYERS, STAGE_WIDTHS, IResNet, IResNetConfig, init_variables
from mema_jax.models.pth import write_pth
from mema_jax.models.weights import WeightsError

BN_EPS = 1e-5
_LEAF = {"kernel": "weight", "scale": "weight", "alpha": "weight", "bias": "bias", "mean": "running_mean",
         "var": "running_var"}
_BLOCK = re.compile(r"layer(\d)_(\d+)")


# ---------------------------------------------------------------------------------------------- names

def torch_key(path: str) -> str:
    """``params/layer1_0/downsample_conv/kernel`` -> ``layer1.0.downsample.0.weight``."""
    _, *modules, leaf = path.split("/")
    names = []
    for m in modules:
        block = _BLOCK.fullmatch(m)
        names.append(f"layer{block[1]}.{block[2]}" if block else
                     {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(m, m))
    return ".".join(names + [_LEAF[leaf]])


def _transform(path: str, shape) -> weights.Transform:
    if path.endswith("kernel"):
        return weights.CONV if len(shape) == 4 else weights.LINEAR
    return weights.IDENTITY


def key_map(abstract_variables) -> list[weights.KeyMapping]:
    """One mapping per leaf of ``{"params": ..., "batch_stats": ...}``."""
    return weights.key_map_from_params(abstract_variables, torch_key, _transform)


def official_keys(config: IResNetConfig) -> list[str]:
    """arcface_torch's ``state_dict()`` keys in its order (num_batches_tracked included)."""
    def bn(p):
        return [f"{p}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]

    keys = ["conv1.weight", *bn("bn1"), "prelu.weight"]
    for stage, blocks in enumerate(LAYERS[config.depth], start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            keys += [*bn(f"{p}.bn1"), f"{p}.conv1.weight", *bn(f"{p}.bn2"), f"{p}.prelu.weight",
                     f"{p}.conv2.weight", *bn(f"{p}.bn3")]
            if b == 0:
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
    return keys + [*bn("bn2"), "fc.weight", "fc.bias", *bn("features")]


# ---------------------------------------------------------------------------------------------- reading

def config_of_state_dict(flat: Mapping[str, np.ndarray], source: str) -> IResNetConfig:
    """Depth (blocks per stage), width (stem channels / 64) and feature size of an arcface_torch
    state dict."""
    blocks = [len({m[1] for k in flat if (m := re.match(rf"layer{s}\.(\d+)\.", k))}) for s in (1, 2, 3, 4)]
    depth = next((d for d, layers in LAYERS.items() if tuple(blocks) == layers), None)
    stem = flat.get("conv1.weight")
    fc = flat.get("fc.weight")
    if depth is None or stem is None or np.ndim(stem) != 4 or fc is None or np.ndim(fc) != 2:
        raise WeightsError(f"{source}: not an arcface_torch iresnet state dict (blocks per stage {blocks}, "
                           f"expected one of {dict(LAYERS)}; conv1.weight {None if stem is None else np.shape(stem)}, "
                           f"fc.weight {None if fc is None else np.shape(fc)})")
    return IResNetConfig(depth=depth, width=stem.shape[0] / STAGE_WIDTHS[0], num_features=_num_features(flat))


def _num_features(flat: Mapping[str, np.ndarray]) -> int:
    """The feature size, from the fc bias (a transposed fc weight is then reported as mis-shaped)."""
    bias = flat.get("fc.bias")
    return int(np.shape(bias)[0]) if bias is not None and np.ndim(bias) == 1 else 512


def read_iresnet_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """arcface_torch-named tensors of a ``.pth`` (or any ``weights.read_state_dict`` file) or an
    ``.onnx`` recognition model."""
    path = os.fspath(path)
    if path.endswith(".onnx"):
        return read_onnx_state_dict(path)
    return weights.read_state_dict(path)


def load_iresnet(path: str | os.PathLike, *, depth: str | None = None, width: float | None = None,
                 remat: str = "none", dtype=None, mesh=None, rules=None) -> tuple[IResNet, dict]:
    """(module, ``{"params": ..., "batch_stats": ...}``) from a ``backbone.pth`` or ONNX file.

    ``depth`` / ``width``: what the caller expects (a file of another architecture is then a
    WeightsError listing the keys that differ); None reads them from the file.  ``dtype``: the
    compute dtype (parameters stay float32).  With ``mesh`` the arrays are created sharded.
    """
    import jax.numpy as jnp

    source = os.fspath(path)
    flat = read_iresnet_state_dict(source)
    found = config_of_state_dict(flat, source) if depth is None or width is None else None
    config = IResNetConfig(depth=depth or found.depth, width=found.width if width is None else width,
                           num_features=_num_features(flat))
    model = IResNet(config, remat=remat, dtype=dtype or jnp.float32)
    abstract = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    variables = weights.load_into(abstract, flat, key_map(abstract), source=source, mesh=mesh, rules=rules,
                                  ignore=(r".*num_batches_tracked",))
    return model, variables


# ---------------------------------------------------------------------------------------------- writing

def iresnet_state_dict(variables, config: IResNetConfig, num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """arcface_torch's state dict (its key order; float32; ``num_batches_tracked`` as given)."""
    tensors = weights.export_state_dict(variables, key_map(variables))
    out = {}
    for key in official_keys(config):
        if key.endswith("num_batches_tracked"):
            out[key] = np.array(num_batches_tracked, np.int64)
        else:
            out[key] = np.asarray(tensors.pop(key), np.float32)
    if tensors:  # a key map / official_keys mismatch is a bug here, not in any file
        raise AssertionError(f"exported keys missing from official_keys: {sorted(tensors)}")
    return out


def save_iresnet_pth(path: str | os.PathLike, variables, config: IResNetConfig, num_batches_tracked: int = 0) -> None:
    """Writes ``variables`` as an arcface_torch ``backbone.pth`` (atomically, without torch)."""
    write_pth(path, iresnet_state_dict(variables, config, num_batches_tracked))


# ---------------------------------------------------------------------------------------------- ONNX

def _module_sequence(config: IResNetConfig) -> list[tuple[str, str]]:
    """(kind, torch name) of every parameterised module in forward order."""
    seq = [("conv", "conv1"), ("bn", "bn1"), ("prelu", "prelu")]
    for stage, blocks in enumerate(LAYERS[config.depth], start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            seq += [("bn", f"{p}.bn1"), ("conv", f"{p}.conv1"), ("bn", f"{p}.bn2"), ("prelu", f"{p}.prelu"),
                    ("conv", f"{p}.conv2"), ("bn", f"{p}.bn3")]
            if b == 0:
                seq += [("conv", f"{p}.downsample.0"), ("bn", f"{p}.downsample.1")]
    return seq + [("bn", "bn2"), ("fc", "fc"), ("bn", "features")]


def read_onnx_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arcface_torch state dict (float32, no num_batches_tracked) an ONNX iresnet computes."""
    import onnx  # only here: reading ONNX files

    source = os.fspath(path)
    if not os.path.isfile(source):
        raise WeightsError(f"{source}: no such weight file")
    try:
        graph = onnx.load(source).graph
    except Exception as err:  # onnx raises DecodeError and others for a file that is not a model
        raise WeightsError(f"{source}: cannot read as an ONNX model: {err}") from err

    values, consumers = _onnx_constants(graph)

    def value(node, index):
        name = node.input[index] if index < len(node.input) else ""
        if name not in values:
            raise WeightsError(f"{source}: node {node.name!r} ({node.op_type}) input {index} {name!r} is not a constant")
        return np.asarray(values[name], np.float32)

    def attr(node, name, default):
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    ops = [n for n in graph.node if n.op_type in ("Conv", "BatchNormalization", "PRelu", "Gemm", "MatMul")]
    n_convs = sum(n.op_type == "Conv" for n in ops)
    depth = next((d for d, layers in LAYERS.items() if 1 + 2 * sum(layers) + 4 == n_convs), None)
    if depth is None or not ops or ops[0].op_type != "Conv":
        raise WeightsError(f"{source}: not an arcface_torch iresnet graph ({n_convs} Conv nodes; iresnet18/34/50/100 "
                           f"have {[1 + 2 * sum(v) + 4 for v in LAYERS.values()]})")
    stem_scale = _input_scale(graph, ops[0], values, source)
    width = value(ops[0], 1).shape[0] / STAGE_WIDTHS[0]
    expected = _module_sequence(IResNetConfig(depth=depth, width=width))

    flat: dict[str, np.ndarray] = {}

    def set_bn(name, scale, bias, mean, var):
        flat.update({f"{name}.weight": scale, f"{name}.bias": bias, f"{name}.running_mean": mean,
                     f"{name}.running_var": var})

    i = 0  # position in ``expected``
    for node in ops:
        if i >= len(expected):
            raise WeightsError(f"{source}: node {node.name!r} ({node.op_type}) after the iresnet's last module")
        kind, name = expected[i]
        want = {"conv": ("Conv",), "bn": ("BatchNormalization",), "prelu": ("PRelu",), "fc": ("Gemm", "MatMul")}[kind]
        if node.op_type not in want:
            raise WeightsError(f"{source}: node {node.name!r} is a {node.op_type} where arcface_torch has "
                               f"{name} ({kind}); not an arcface_torch iresnet graph")
        i += 1
        if kind == "conv":
            flat[f"{name}.weight"] = value(node, 1) * (stem_scale if name == "conv1" else 1.0)
            # Every iresnet convolution is followed by its BatchNorm: a bias means that BN was folded in.
            if len(node.input) > 2 and node.input[2]:
                if any(c.op_type == "BatchNormalization" for c in consumers.get(node.output[0], [])):
                    raise WeightsError(f"{source}: Conv {node.name!r} has a bias that arcface_torch's {name} has not")
                bias = value(node, 2)
                channels = bias.shape[0]
                set_bn(expected[i][1], np.ones(channels, np.float32), bias, np.zeros(channels, np.float32),
                       np.full(channels, 1.0 - BN_EPS, np.float32))
                i += 1
        elif kind == "bn":
            eps = float(attr(node, "epsilon", 1e-5))
            # Another epsilon is the same function with the variance shifted by the difference.
            set_bn(name, value(node, 1), value(node, 2), value(node, 3), value(node, 4) + np.float32(eps - BN_EPS))
        elif kind == "prelu":
            flat[f"{name}.weight"] = value(node, 1).reshape(-1)
        else:
            flat["fc.weight"], flat["fc.bias"] = _fc_weights(node, value, attr, consumers, source)
    if i != len(expected):
        raise WeightsError(f"{source}: the graph ends before arcface_torch's {expected[i][1]} ({expected[i][0]})")
    return flat


_SHAPE_OPS = ("Identity", "Unsqueeze", "Squeeze", "Reshape")


def _onnx_constants(graph) -> tuple[dict, dict]:
    """(every constant tensor by name: initializers, Constant nodes, reshapes of them; each tensor's
    consuming nodes)."""
    import onnx
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        if node.op_type == "Constant" and node.attribute:
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type in _SHAPE_OPS and node.input[0] in values:
            # Unfolded exports reach a weight through these (a PRelu slope through Unsqueeze).
            shaped = _shape_op(node, values, onnx.helper.get_attribute_value)
            if shaped is not None:
                values[node.output[0]] = shaped
    return values, consumers


def _fc_weights(node, value, attr, consumers, source: str) -> tuple[np.ndarray, np.ndarray]:
    """arcface_torch's fc (weight (out, in), bias) from a Gemm, or a MatMul followed by its bias Add."""
    w = value(node, 1)
    if node.op_type == "Gemm":
        if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0:
            raise WeightsError(f"{source}: Gemm {node.name!r} has transA/alpha/beta other than 0/1/1")
        return (w if attr(node, "transB", 0) else w.T), value(node, 2)
    adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
    if len(adds) != 1:
        raise WeightsError(f"{source}: MatMul {node.name!r} is not followed by its bias Add")
    other = 1 if adds[0].input[0] == node.output[0] else 0
    return w.T, value(adds[0], other)


def _shape_op(node, values, attribute_value) -> np.ndarray | None:
    """The constant output of a shape-only node on a constant input (None if its shape or axes
    input is not constant)."""
    x = np.asarray(values[node.input[0]])
    if node.op_type == "Identity":
        return x
    attrs = {a.name: attribute_value(a) for a in node.attribute}
    second = node.input[1] if len(node.input) > 1 and node.input[1] else None
    if second is not None and second not in values:
        return None
    arg = [int(v) for v in np.asarray(values[second]).reshape(-1)] if second else list(attrs.get("axes", []))
    if node.op_type == "Unsqueeze":
        for axis in sorted(a % (x.ndim + len(arg)) for a in arg):
            x = np.expand_dims(x, axis)
        return x
    if node.op_type == "Squeeze":
        return np.squeeze(x, axis=tuple(a % x.ndim for a in arg)) if arg else np.squeeze(x)
    shape = [x.shape[i] if d == 0 else d for i, d in enumerate(arg)]  # Reshape: 0 keeps that dim
    return x.reshape(shape)


def _input_scale(graph, first_conv, values, source) -> float:
    """1.0 for a graph fed (x - 127.5) / 127.5; 127.5 k for one that computes (x - 127.5) * k itself
    (Sub / Mul or Div nodes before the first Conv).  Anything else before it is refused."""
    scale, before = 1.0, []
    for node in graph.node:
        if node is first_conv:
            break
        if node.op_type in ("Sub", "Mul", "Div"):
            before.append(node)
    if not before:
        return 1.0
    for node in before:
        const = next((np.asarray(values[n], np.float64) for n in node.input if n in values), None)
        if const is None or not np.all(const == const.reshape(-1)[0]):
            raise WeightsError(f"{source}: input normalisation node {node.name!r} ({node.op_type}) has no scalar constant")
        c = float(const.reshape(-1)[0])
        if node.op_type == "Sub" and abs(c - 127.5) > 1e-3:
            raise WeightsError(f"{source}: the graph subtracts {c} from its input; arcface_torch's models use 127.5")
        if node.op_type == "Mul":
            scale *= 127.5 * c
        if node.op_type == "Div":
            scale *= 127.5 / c
    return scale
