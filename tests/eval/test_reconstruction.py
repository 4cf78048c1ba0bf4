"""PSNR against hand-computed cases; LPIPS with a torchvision-format backbone file from the user path."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision

from eval.reconstruction import LPIPS, psnr


def test_psnr_of_a_constant_offset_by_hand():
    original = np.zeros((4, 5, 3), np.uint8)
    other = np.full((4, 5, 3), 16, np.uint8)          # MSE = 256
    assert psnr(original, other) == pytest.approx(10 * math.log10(255 ** 2 / 256), rel=1e-6)   # 24.0654 dB


def test_psnr_of_one_changed_pixel_by_hand():
    original = np.full((10, 10, 3), 100, np.uint8)
    other = original.copy()
    other[3, 4] = (110, 100, 100)                      # one channel of one pixel off by 10: MSE = 100 / 300
    assert psnr(original, other) == pytest.approx(10 * math.log10(255 ** 2 / (100 / 300)), rel=1e-6)


def test_psnr_of_identical_images_is_infinite():
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert psnr(image, image) == math.inf


def _random_alexnet_file(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.alexnet(weights=None).state_dict()
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(state, path)
    return path, state


def test_lpips_loads_the_backbone_from_the_user_file_and_is_zero_on_identical_images(tmp_path):
    path, state = _random_alexnet_file(tmp_path)
    metric = LPIPS(path)
    backbone = metric.model.net.state_dict()
    # lpips keeps torchvision's layer index: slice2.3.weight is features.3.weight.
    assert torch.equal(backbone["slice2.3.weight"], state["features.3.weight"])
    assert torch.equal(backbone["slice5.10.bias"], state["features.10.bias"])
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    noisy = np.clip(image.astype(int) + rng.integers(-40, 41, image.shape), 0, 255).astype(np.uint8)
    assert metric(image, image) == 0.0
    near, far = metric(image, noisy), metric(image, 255 - image)
    assert 0.0 < near < far


def test_lpips_without_a_backbone_file_names_the_file_to_get(tmp_path):
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        LPIPS(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        LPIPS("")


def test_lpips_rejects_a_file_that_is_not_a_torchvision_alexnet(tmp_path):
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="missing keys"):
        LPIPS(path)
