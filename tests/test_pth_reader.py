"""Reading torch ``.pth`` state dicts without torch (mema_jax.models.pth.read_pth, behind
weights.read_state_dict): the values torch.load gives, bit for bit, for every layout torch.save
writes (views with offsets and strides, shared storages, bf16, parameters, 0-d and empty tensors);
a pickle that asks for anything but tensors and plain values is refused before it can run code;
a broken archive is one error naming the file; the JAX side reads the file with torch never imported."""
from __future__ import annotations

import collections
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import REPO, skip_unless_required

from mema_jax.models import pth, weights


def torch_state_dict():
    import torch

    torch.manual_seed(0)
    base = torch.randn(5, 6)
    sd = collections.OrderedDict()
    sd["conv.weight"] = torch.randn(4, 3, 3, 3)
    sd["transposed"] = base.t()  # non-contiguous: strides (1, 6)
    sd["row_view"] = base[2, 1:5]  # offset into a storage shared with "transposed"
    sd["bf16"] = torch.randn(7).to(torch.bfloat16)
    sd["half"] = torch.randn(2, 2).half()
    sd["double"] = torch.randn(3, dtype=torch.float64)
    sd["bn.num_batches_tracked"] = torch.tensor(123456789012, dtype=torch.int64)  # 0-d
    sd["mask"] = torch.tensor([True, False, True])
    sd["bytes"] = torch.arange(5, dtype=torch.uint8)
    sd["int8"] = torch.arange(-3, 3, dtype=torch.int8)
    sd["int32"] = torch.arange(4, dtype=torch.int32).reshape(2, 2)
    sd["empty"] = torch.zeros(0, 3)
    sd["param"] = torch.nn.Parameter(torch.randn(2, 3))
    sd._metadata = collections.OrderedDict({"": {"version": 1}})  # as module.state_dict() carries
    return sd


def as_numpy(tensor):
    import ml_dtypes
    import torch

    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def test_every_tensor_layout_torch_saves_reads_back_bit_for_bit(tmp_path):
    try:
        import torch
    except ImportError:  # the core install: CI (MEMA_REQUIRE_ALL=1) has the torch extra and fails instead
        skip_unless_required("torch is not installed (pip install -e '.[torch]'): no torch.save to compare with")
    sd = torch_state_dict()
    path = tmp_path / "backbone.pth"
    torch.save(sd, path)
    ours = weights.read_state_dict(path)
    assert list(ours) == list(sd)
    for key, tensor in sd.items():
        expected = as_numpy(tensor)
        assert ours[key].dtype == expected.dtype and ours[key].shape == expected.shape, key
        assert ours[key].tobytes() == expected.tobytes(), key
        assert ours[key].flags.c_contiguous and ours[key].flags.owndata, key
    # A Lightning-style checkpoint wraps the state dict; a plain-value entry is kept out of the weights.
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "model.ckpt")
    assert sorted(weights.read_state_dict(tmp_path / "model.ckpt")) == sorted(sd)


def test_written_pth_reads_back_without_torch_and_torch_agrees(tmp_path):
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array(7, dtype=np.int64),
               "c": np.ones((2, 0), np.float16), "d": np.array([True, False])}
    pth.write_pth(tmp_path / "w.pth", tensors)
    back = pth.read_pth(tmp_path / "w.pth")
    assert list(back) == list(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def malicious_pth(path, marker):
    """A zip-format .pth whose pickle calls os.system (what a weights-only load must refuse)."""
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")


def test_a_pickle_that_asks_for_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    malicious_pth(tmp_path / "evil.pth", marker)
    with pytest.raises(weights.WeightsError, match=r"evil\.pth.*os\.system.*weights-only"):
        weights.read_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_broken_archives_are_one_error_naming_the_file(tmp_path):
    pth.write_pth(tmp_path / "good.pth", {"w": np.arange(8, dtype=np.float32)})
    with zipfile.ZipFile(tmp_path / "good.pth") as src, zipfile.ZipFile(tmp_path / "truncated.pth", "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, data[:-4] if name.endswith("data/0") else data)
    with pytest.raises(weights.WeightsError, match=r"truncated\.pth.*archive/data/0 holds 28 bytes, not 8 x 4"):
        weights.read_state_dict(tmp_path / "truncated.pth")
    with zipfile.ZipFile(tmp_path / "good.pth") as src, zipfile.ZipFile(tmp_path / "no_storage.pth", "w") as dst:
        for name in src.namelist():
            if not name.endswith("data/0"):
                dst.writestr(name, src.read(name))
    with pytest.raises(weights.WeightsError, match=r"no_storage\.pth.*archive/data/0 is not in the archive"):
        weights.read_state_dict(tmp_path / "no_storage.pth")
    (tmp_path / "text.pth").write_text("not a torch file")
    with pytest.raises(weights.WeightsError, match=r"text\.pth"):
        weights.read_state_dict(tmp_path / "text.pth")


def test_the_jax_side_reads_a_pth_with_torch_never_imported(tmp_path):
    pth.write_pth(tmp_path / "backbone.pth", {"fc.weight": np.eye(3, dtype=np.float32)})
    code = ("import sys; from mema_jax.models import weights; "
            f"w = weights.read_state_dict({str(tmp_path / 'backbone.pth')!r})['fc.weight']; "
            "assert (w == __import__('numpy').eye(3)).all(); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
