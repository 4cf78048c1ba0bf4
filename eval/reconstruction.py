"""Reconstruction quality of recovered images (paper Tab. 8): PSNR and LPIPS.

PSNR: torchmetrics' peak_signal_noise_ratio on uint8 RGB images, data range 255, one value per
image (mean squared error over its pixels and channels); the table reports the mean over images.
Identical images give +inf.

LPIPS: the ``lpips`` package (Zhang et al. 2018, v0.1). Its linear-layer weights ship with the
package; the AlexNet / VGG-16 backbone normally comes from a torchvision download, which is not
possible here, so the backbone is read from a user file with torchvision's own key names
(``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``). Images go in as [-1, 1] RGB, full size.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

# torchvision and torchmetrics are imported where used: 6 s of imports that a PSNR-only or
# identity-only process (every report subprocess imports this module) never needs.

BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
_TORCHVISION_BUILDERS = {"alex": "alexnet", "vgg": "vgg16"}


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,)HxWx3 -> float (N,3,H,W) in 0..255."""
    x = torch.from_numpy(np.array(images, dtype=np.float32))   # a copy: PIL's arrays are read-only
    if x.ndim == 3:
        x = x[None]
    return x.permute(0, 3, 1, 2)


def psnr(original: np.ndarray, other: np.ndarray) -> float:
    """PSNR in dB of one uint8 HxWx3 image against its original (data range 255)."""
    if original.shape != other.shape:
        raise ValueError(f"PSNR needs equal shapes, got {original.shape} and {other.shape}")
    from torchmetrics.functional.image import peak_signal_noise_ratio

    value = peak_signal_noise_ratio(_to_tensor(other), _to_tensor(original), data_range=255.0,
                                    reduction="none", dim=(1, 2, 3))
    return float(value.item())


def _backbone_state(weights, net: str) -> dict[str, torch.Tensor]:
    path = Path(weights) if weights else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{path}: LPIPS {net} backbone weights not found; pass torchvision's {BACKBONE_FILES[net]} "
            f"(https://download.pytorch.org/models/{BACKBONE_FILES[net]}, or copy it from a torch hub cache "
            f"~/.cache/torch/hub/checkpoints/)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    import torchvision

    reference = getattr(torchvision.models, _TORCHVISION_BUILDERS[net])(weights=None).state_dict()
    missing = sorted(set(reference) - set(state))
    if missing:
        raise ValueError(f"{path}: not a torchvision {net} state dict ({BACKBONE_FILES[net]}); "
                         f"missing keys {missing[:5]}")
    return state


class LPIPS:
    """LPIPS distance with the package's linear layers and a user-supplied torchvision backbone."""

    def __init__(self, backbone_weights, net: str = "alex", device: str = "cpu"):
        import lpips
        if net not in BACKBONE_FILES:
            raise ValueError(f"unknown LPIPS backbone {net!r}; expected one of {list(BACKBONE_FILES)}")
        state = _backbone_state(backbone_weights, net)
        # pnet_rand: build the backbone without a download, then fill it from the user file.
        with warnings.catch_warnings():   # lpips still passes torchvision's deprecated pretrained=False
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        # lpips splits torchvision's ``features`` Sequential into slices keeping the layer index:
        # net.slice2.3.weight is torchvision's features.3.weight.
        backbone = {}
        for key in model.net.state_dict():
            _, index, param = key.split(".")
            backbone[key] = state[f"features.{index}.{param}"]
        model.net.load_state_dict(backbone, strict=True)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, original: np.ndarray, other: np.ndarray) -> float:
        if original.shape != other.shape:
            raise ValueError(f"LPIPS needs equal shapes, got {original.shape} and {other.shape}")
        a = _to_tensor(original).to(self.device) / 127.5 - 1.0
        b = _to_tensor(other).to(self.device) / 127.5 - 1.0
        return float(self.model(a, b).item())
