"""L2CS-Net gaze estimation and the gaze error of paper Tab. 7.

Architecture and weights: L2CS-Net (Abdelrahman et al. 2023, github.com/Ahmednull/L2CS-Net), a
ResNet-50 with two 90-bin heads, trained on Gaze360; the official file is ``L2CSNet_gaze360.pkl``
(a plain ``torch.save(model.state_dict())``; download link in the official README, "Gaze360"
pretrained model). Module names here equal the official ones, so the file loads unchanged.

Head order: the official ``forward`` returns ``(fc_yaw_gaze(x), fc_pitch_gaze(x))`` but training
and the official ``Pipeline`` unpack it as ``pitch, yaw = model(img)``: the head NAMED
``fc_yaw_gaze`` is the one trained on pitch labels. We follow the trained behaviour.

Decoding (Gaze360, 90 bins of 4 degrees): angle = sum(softmax(logits) * bin_index) * 4 - 180 degrees.

Pre-processing as the official Pipeline: crop the face box, resize the crop to 224x224, then
torchvision Resize(448), ToTensor, ImageNet mean/std normalisation. The official pipeline gets the
box from RetinaFace; here it is dlib's HOG face box detected on the ORIGINAL image
(eval.landmarks.detect_face), used for both the original and the de-identified image, as for the
landmark error. Gaze error = mean absolute difference of pitch and of yaw, in degrees, between
the original and the de-identified image (no ground-truth gaze exists for MeMa).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from eval.landmarks import FaceBox

GAZE360_BINS = 90
GAZE360_BIN_WIDTH_DEG = 4.0
GAZE360_OFFSET_DEG = 180.0
CROP_SIZE = 224
INPUT_SIZE = 448
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FILE = "L2CSNet_gaze360.pkl"
_WHERE_TO_GET = ("get L2CSNet_gaze360.pkl from the official L2CS-Net repository "
                 "(github.com/Ahmednull/L2CS-Net, README 'Gaze360' pretrained model link) and pass its path")


class L2CS(nn.Module):
    """L2CS-Net with a ResNet-50 backbone; parameter names equal the official model.py."""

    def __init__(self, num_bins: int = GAZE360_BINS):
        import torchvision  # here, not at import: scoring imports angle_difference alone (2.6 s saved)

        super().__init__()
        resnet = torchvision.models.resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.avgpool = resnet.avgpool
        features = resnet.fc.in_features
        self.fc_yaw_gaze = nn.Linear(features, num_bins)     # trained on PITCH labels, see module docstring
        self.fc_pitch_gaze = nn.Linear(features, num_bins)   # trained on YAW labels
        self.fc_finetune = nn.Linear(features + 3, 3)        # unused, kept so the official file loads strictly

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pitch logits, yaw logits), each (N, num_bins)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc_yaw_gaze(x), self.fc_pitch_gaze(x)


def load_l2cs(weights_path) -> L2CS:
    """L2CS-Net from the official ``L2CSNet_gaze360.pkl`` state dict (or any file with its keys)."""
    path = Path(weights_path) if weights_path else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{path}: L2CS-Net weights ({WEIGHTS_FILE}) not found; {_WHERE_TO_GET}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict saved with torch.save(model.state_dict()), "
                         f"got {type(state).__name__}")
    # Checkpoints saved from nn.DataParallel carry a 'module.' prefix.
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = L2CS(num_bins=state["fc_yaw_gaze.weight"].shape[0] if "fc_yaw_gaze.weight" in state else GAZE360_BINS)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: not an L2CS-Net ResNet-50 state dict; missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:   # right names, wrong shapes
        raise ValueError(f"{path}: not an L2CS-Net ResNet-50 state dict: {e}") from None
    return model.eval()


def decode_bins(logits: torch.Tensor, bin_width: float = GAZE360_BIN_WIDTH_DEG,
                offset: float = GAZE360_OFFSET_DEG) -> torch.Tensor:
    """Expected angle in degrees of per-bin logits (N, bins): sum(softmax * index) * width - offset."""
    idx = torch.arange(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    return (torch.softmax(logits, dim=-1) * idx).sum(dim=-1) * bin_width - offset


def preprocess_face(image: np.ndarray, box: FaceBox) -> torch.Tensor:
    """(3, 448, 448) normalised tensor of the face crop, as the official Pipeline builds it."""
    box = box.clipped(image.shape)
    crop = torch.from_numpy(np.array(image[box.top:box.bottom, box.left:box.right], dtype=np.float32))
    # cv2.resize(img, (224, 224)) of the official Pipeline: bilinear, half-pixel centres, no
    # anti-aliasing, rounded back to uint8; then torchvision's PIL Resize(448) as in its transform.
    crop = F.interpolate(crop.permute(2, 0, 1)[None], size=(CROP_SIZE, CROP_SIZE), mode="bilinear",
                         align_corners=False, antialias=False)[0]
    crop = Image.fromarray(crop.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    from torchvision.transforms import functional as TF

    x = TF.to_tensor(TF.resize(crop, INPUT_SIZE))
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


class GazeEstimator:
    def __init__(self, weights_path, device: str = "cpu"):
        self.device = torch.device(device)
        self.model = load_l2cs(weights_path).to(self.device)

    @torch.no_grad()
    def predict(self, images: list[np.ndarray], boxes: list[FaceBox]) -> tuple[np.ndarray, np.ndarray]:
        """(pitch, yaw) in degrees for each image's face box."""
        x = torch.stack([preprocess_face(im, b) for im, b in zip(images, boxes)]).to(self.device)
        pitch_logits, yaw_logits = self.model(x)
        return decode_bins(pitch_logits).cpu().numpy(), decode_bins(yaw_logits).cpu().numpy()


def angle_difference(a, b) -> np.ndarray:
    """|a - b| in degrees, taken the short way round the circle."""
    return np.abs((np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0)
