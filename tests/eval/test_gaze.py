"""L2CS-Net: the official state-dict keys load through the user path; bins decode to degrees."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from eval.gaze import GazeEstimator, L2CS, angle_difference, decode_bins, preprocess_face
from eval.inputs import load_rgb
from eval.landmarks import detect_face

REPO = Path(__file__).resolve().parents[2]
FACE = REPO.parent / "shared" / "data" / "faces_landmarks" / "2008_001009.jpg"


def _official_state_dict(num_bins: int = 90) -> dict[str, torch.Tensor]:
    """Random weights under the keys of the official L2CSNet_gaze360.pkl: torchvision's ResNet-50
    names without ``fc``, plus the gaze heads and the vestigial fc_finetune (official model.py)."""
    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.resnet50(weights=None).state_dict().items() if not k.startswith("fc.")}
    state["fc_yaw_gaze.weight"] = torch.randn(num_bins, 2048) * 0.01
    state["fc_yaw_gaze.bias"] = torch.randn(num_bins)
    state["fc_pitch_gaze.weight"] = torch.randn(num_bins, 2048) * 0.01
    state["fc_pitch_gaze.bias"] = torch.randn(num_bins)
    state["fc_finetune.weight"] = torch.randn(3, 2051)
    state["fc_finetune.bias"] = torch.randn(3)
    return state


def test_official_keys_load_through_the_user_path_and_predict_angles(tmp_path):
    state = _official_state_dict()
    path = tmp_path / "L2CSNet_gaze360.pkl"
    torch.save(state, path)
    estimator = GazeEstimator(path)
    loaded = estimator.model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    image = load_rgb(FACE)
    box = detect_face(image)
    pitch, yaw = estimator.predict([image, image], [box, box])
    assert pitch.shape == (2,) and yaw.shape == (2,)
    assert np.all(np.abs(pitch) <= 180) and np.all(np.abs(yaw) <= 180)
    # Tolerance: fp32 convolutions of a batch of 2 and of 1 sum in different orders; 1e-3 degrees
    # is far below the 4-degree bin width, and swapping the heads would differ by degrees.
    assert pitch[0] == pytest.approx(pitch[1], abs=1e-3)
    # The head named fc_yaw_gaze is the pitch head (official training and Pipeline unpack it so).
    x = preprocess_face(image, box)[None]
    with torch.no_grad():
        first, second = estimator.model(x)
    assert pitch[0] == pytest.approx(float(decode_bins(first)[0]), abs=1e-3)
    assert yaw[0] == pytest.approx(float(decode_bins(second)[0]), abs=1e-3)
    assert abs(pitch[0] - yaw[0]) > 0.1


def test_dataparallel_prefixed_checkpoint_loads(tmp_path):
    path = tmp_path / "L2CSNet_gaze360.pkl"
    torch.save({f"module.{k}": v for k, v in _official_state_dict().items()}, path)
    assert isinstance(GazeEstimator(path).model, L2CS)


def test_missing_weights_name_the_file_and_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="L2CSNet_gaze360.pkl.*Ahmednull/L2CS-Net"):
        GazeEstimator(tmp_path / "absent.pkl")


def test_a_file_with_other_keys_is_rejected(tmp_path):
    path = tmp_path / "L2CSNet_gaze360.pkl"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="not an L2CS-Net"):
        GazeEstimator(path)


def test_bin_decoding_by_hand():
    logits = torch.full((3, 90), -1e4)
    logits[0, 45] = 0.0                       # all mass on bin 45: 45 * 4 - 180 = 0 degrees
    logits[1, 10] = logits[1, 11] = 0.0       # half on bins 10 and 11: 10.5 * 4 - 180 = -138
    logits[2] = 0.0                           # uniform: mean index 44.5 -> -2 degrees
    assert decode_bins(logits).tolist() == pytest.approx([0.0, -138.0, -2.0], abs=1e-4)
    # Softmax weights e/(1+e) and 1/(1+e) on bins 1 and 0: (e/(1+e)) * 4 - 180.
    two = torch.full((1, 90), -1e4)
    two[0, 0], two[0, 1] = 0.0, 1.0
    assert float(decode_bins(two)[0]) == pytest.approx(math.e / (1 + math.e) * 4 - 180, abs=1e-4)


def test_preprocessing_makes_a_normalised_448_crop():
    image = np.zeros((100, 120, 3), np.uint8)
    image[..., 0] = round(0.485 * 255)   # red at the ImageNet mean
    from eval.landmarks import FaceBox
    x = preprocess_face(image, FaceBox(10, 20, 60, 90))
    assert x.shape == (3, 448, 448)
    assert float(x[0].abs().max()) < 0.01
    assert float(x[1].mean()) == pytest.approx(-0.456 / 0.224, abs=1e-4)


def test_angle_difference_goes_the_short_way_round():
    assert angle_difference(170.0, -170.0) == pytest.approx(20.0)
    assert angle_difference(-5.0, 10.0) == pytest.approx(15.0)
