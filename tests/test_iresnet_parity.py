"""ArcFace's iresnet in Flax equals the eval bridge's PyTorch iresnet (arcface_torch's network).

Random torch weights with perturbed BatchNorm statistics are saved the two ways users bring
them -- an arcface_torch ``backbone.pth`` and an ONNX graph from ``torch.onnx.export`` (which
folds BatchNorms into convolutions and renames their weights) -- and loaded into ours.
Bound: fp32 relative error ||ours - torch|| / ||torch|| <= 1e-5 on the 512-d features (measured
6e-7 for r18, 1.2e-6 for r50: the same float32 arithmetic summed in another order).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import FP32_TOL, rel_err
from tiny_models import randomise_

from eval.identity import load_identity_model
from eval.identity.iresnet import iresnet
from mema_jax.models.convert_iresnet import (
    iresnet_state_dict,
    load_iresnet,
    official_keys,
    read_onnx_state_dict,
    save_iresnet_pth,
)
from mema_jax.core.sharding import unbox
from mema_jax.models.iresnet import IResNet, IResNetConfig, init_variables
from mema_jax.models.weights import WeightsError


def nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def our_features(model, variables, x: torch.Tensor) -> np.ndarray:
    return np.asarray(jax.jit(lambda v, i: model.apply(v, i))(variables, nhwc(x)))


INPUTS = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(7)) * 2 - 1  # in [-1, 1]


def export_onnx(network, path):
    torch.onnx.export(network, (torch.zeros(1, 3, 112, 112),), str(path), dynamo=False,
                      input_names=["input.1"], output_names=["embedding"], dynamic_axes={"input.1": {0: "batch"}})


class RawPixels(torch.nn.Module):
    """insightface's older graphs: 0..255 pixels in, Sub 127.5 and Mul 1/128 inside the graph."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, x):
        return self.network((x - 127.5) * 0.0078125)


CASES = [pytest.param(("r18", 64), id="r18"), pytest.param(("r18", 16), id="r18_width0.25"),
         pytest.param(("r50", 64), id="r50"), pytest.param(("r100", 64), id="r100", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=CASES)
def torch_iresnet(request, tmp_path_factory):
    """(depth, torch network, backbone.pth, .onnx, torch features of INPUTS)."""
    depth, base = request.param
    network = randomise_(iresnet(depth, base_channels=base), seed=base + len(depth))
    folder = tmp_path_factory.mktemp(f"{depth}_{base}")
    torch.save(network.state_dict(), folder / "backbone.pth")
    export_onnx(network, folder / "model.onnx")
    with torch.no_grad():
        reference = network(INPUTS).numpy()
    return depth, network, folder / "backbone.pth", folder / "model.onnx", reference


def test_backbone_pth_loads_and_gives_torch_features(torch_iresnet):
    depth, network, pth, _, reference = torch_iresnet
    model, variables = load_iresnet(pth)
    assert model.config.depth == depth and model.config.base_channels == network.conv1.out_channels
    assert rel_err(our_features(model, variables, INPUTS), reference) <= FP32_TOL


def test_onnx_export_with_folded_batchnorms_loads_and_gives_torch_features(torch_iresnet):
    import onnx

    depth, network, _, onnx_path, reference = torch_iresnet
    graph = onnx.load(str(onnx_path)).graph
    # The exporter folded the BatchNorms that follow convolutions: the structural reader is exercised.
    assert any(t.name.startswith("onnx::Conv_") for t in graph.initializer)
    assert sum(n.op_type == "BatchNormalization" for n in graph.node) < sum(n.op_type == "Conv" for n in graph.node)
    model, variables = load_iresnet(onnx_path, depth=depth)
    assert rel_err(our_features(model, variables, INPUTS), reference) <= FP32_TOL


def test_onnx_export_without_constant_folding_loads_too(tmp_path):
    # Every BatchNorm stays a node and each PRelu slope comes through an Unsqueeze node.
    import onnx

    network = randomise_(iresnet("r18", base_channels=16), seed=4)
    torch.onnx.export(network, (torch.zeros(1, 3, 112, 112),), str(tmp_path / "unfolded.onnx"), dynamo=False,
                      do_constant_folding=False)
    graph = onnx.load(str(tmp_path / "unfolded.onnx")).graph
    assert sum(n.op_type == "BatchNormalization" for n in graph.node) == 31
    with torch.no_grad():
        reference = network(INPUTS).numpy()
    model, variables = load_iresnet(tmp_path / "unfolded.onnx")
    assert rel_err(our_features(model, variables, INPUTS), reference) <= FP32_TOL


def test_onnx_graph_normalising_its_own_0_255_input_is_absorbed(tmp_path):
    network = randomise_(iresnet("r18", base_channels=16), seed=3)
    export_onnx(RawPixels(network).eval(), tmp_path / "raw.onnx")
    pixels = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        reference = network((pixels - 127.5) * 0.0078125).numpy()
    model, variables = load_iresnet(tmp_path / "raw.onnx")
    assert rel_err(our_features(model, variables, (pixels - 127.5) / 127.5), reference) <= FP32_TOL


def test_write_back_reproduces_the_backbone_pth_bit_for_bit(torch_iresnet, tmp_path):
    depth, network, pth, _, _ = torch_iresnet
    model, variables = load_iresnet(pth)
    save_iresnet_pth(tmp_path / "backbone.pth", variables, model.config, num_batches_tracked=11)
    original = torch.load(pth, weights_only=True)
    written = torch.load(tmp_path / "backbone.pth", weights_only=True)
    assert list(written) == list(original) == official_keys(model.config)  # arcface_torch's names and order
    for key, tensor in original.items():
        if key.endswith("num_batches_tracked"):
            assert written[key].dtype == torch.int64 and int(written[key]) == 11  # written as given, not carried
        else:
            assert written[key].dtype == torch.float32 and torch.equal(written[key], tensor), key


def test_onnx_reads_back_the_state_dict_where_nothing_was_folded(torch_iresnet):
    # The BatchNorms that stay nodes (before a conv, after the last block, on the features) keep
    # their names and values exactly; the fc is torch's weight as is.
    _, network, _, onnx_path, _ = torch_iresnet
    flat = read_onnx_state_dict(onnx_path)
    state = network.state_dict()
    for key in ("layer1.0.bn1.running_var", "bn2.running_mean", "features.weight", "fc.weight", "fc.bias",
                "layer2.1.prelu.weight"):
        np.testing.assert_array_equal(flat[key], state[key].numpy(), err_msg=key)


def test_train_mode_batchnorm_follows_torch_batch_statistics_and_running_updates(tmp_path):
    network = randomise_(iresnet("r18", base_channels=16), seed=5)
    torch.save(network.state_dict(), tmp_path / "backbone.pth")
    model, variables = load_iresnet(tmp_path / "backbone.pth")
    x = torch.randn(6, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    network.train()
    with torch.no_grad():
        reference = network(x).numpy()
    ours, updated = jax.jit(lambda v, i: model.apply(v, i, train=True, mutable=["batch_stats"]))(variables, nhwc(x))
    assert rel_err(ours, reference) <= FP32_TOL
    # torch's running estimates after one step: momentum 0.1 towards the batch mean and unbiased variance.
    written = iresnet_state_dict({**variables, **updated}, model.config)
    for key, tensor in network.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            assert rel_err(written[key], tensor.numpy()) <= FP32_TOL, key


def test_a_jax_model_written_as_pth_is_read_by_the_eval_bridge_with_its_width(tmp_path):
    config = IResNetConfig(depth="r18", width=0.25, num_features=128)
    model = IResNet(config)
    variables = dict(unbox(init_variables(model, jax.random.key(0))))
    rng = np.random.default_rng(0)  # non-trivial statistics, so evaluation mode is really checked
    variables["batch_stats"] = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32),
                                            variables["batch_stats"])
    save_iresnet_pth(tmp_path / "backbone.pth", variables, config)
    # dlib, not MTCNN: in this venv torchvision (which MTCNN needs) imported after TensorFlow (clu) crashes.
    bridge = load_identity_model("arcface_r18", weights=tmp_path / "backbone.pth", detector="dlib")
    assert bridge.dim == 128 and bridge.network.conv1.out_channels == 16
    crops = np.random.default_rng(1).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    with torch.no_grad():
        theirs = bridge.network(bridge.preprocess(crops)).numpy()
    pixels = torch.from_numpy((crops.astype(np.float32) - 127.5) / 127.5).permute(0, 3, 1, 2)
    ours = our_features(model, variables, pixels)
    assert rel_err(ours, theirs) <= FP32_TOL


# ---------------------------------------------------------------- wrong files

@pytest.fixture(scope="module")
def small_state(tmp_path_factory):
    return randomise_(iresnet("r18", base_channels=16), seed=9).state_dict()


def test_missing_and_mis_shaped_keys_are_one_error_naming_the_file_and_keys(small_state, tmp_path):
    state = dict(small_state)
    del state["layer2.0.bn3.running_var"]
    state["fc.weight"] = state["fc.weight"].T.contiguous()
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(WeightsError) as err:
        load_iresnet(tmp_path / "broken.pth")
    message = str(err.value)
    assert str(tmp_path / "broken.pth") in message
    assert "missing keys (1): ['layer2.0.bn3.running_var']" in message
    assert "mis-shaped keys (1): ['fc.weight: shape (6272, 512), expected (512, 6272)']" in message


def test_a_file_of_another_architecture_names_the_keys_that_differ(small_state, tmp_path):
    torch.save(small_state, tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match=r"r18\.pth: weights do not match the model") as err:
        load_iresnet(tmp_path / "r18.pth", depth="r34")
    assert "missing keys (" in str(err.value) and "'layer1.2.conv1.weight'" in str(err.value)
    wider = r"mis-shaped keys .*conv1\.weight: shape \(16, 3, 3, 3\), expected \(32, 3, 3, 3\)"
    with pytest.raises(WeightsError, match=wider):
        load_iresnet(tmp_path / "r18.pth", depth="r18", width=0.5)
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3), "head.weight": torch.zeros(8, 64)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match=r"other\.pth: not an arcface_torch iresnet state dict"):
        load_iresnet(tmp_path / "other.pth")


def test_a_file_that_is_not_onnx_or_not_an_iresnet_graph_is_named(tmp_path):
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    with pytest.raises(WeightsError, match=r"garbage\.onnx: cannot read as an ONNX model"):
        load_iresnet(tmp_path / "garbage.onnx")
    not_iresnet = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 110 * 110, 4))
    export_onnx(not_iresnet.eval(), tmp_path / "small.onnx")
    with pytest.raises(WeightsError, match=r"small\.onnx: not an arcface_torch iresnet graph \(1 Conv nodes"):
        load_iresnet(tmp_path / "small.onnx")
