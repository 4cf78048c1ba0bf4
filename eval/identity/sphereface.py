"""SphereFace: sphere20a of clcarwin/sphereface_pytorch (``sphere20a_20171020.pth``, 512-d).

Protocol (that repository's ``lfw_eval.py``):

- detection: MTCNN five points (the LFW landmarks SphereFace was evaluated with come from MTCNN):
  facenet-pytorch's MTCNN when installed, else (``detector="dlib"``) the five points derived from
  dlib's 68-point predictor (see :mod:`eval.identity.faces`); the largest face;
- alignment: least-squares similarity transform of the five points onto the template
  [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655],
  [62.7299, 92.2041]], warped (bilinear, black border) to a 96 wide x 112 high crop;
- input: BGR channel order (the repository reads images with OpenCV), (x - 127.5) / 128;
- output: the 512-d ``fc5`` feature (``feature=True``), L2-normalised.

Weights: ``sphere20a_20171020.pth`` (model/sphere20a_20171020.pth.zip in
github.com/clcarwin/sphereface_pytorch, unzipped), a state dict of ``sphere20a(classnum=10574)``.
Its ``fc6`` AngleLinear head is not needed and is ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from eval.identity.base import TorchIdentityModel
from eval.identity.faces import Face, SPHEREFACE_TEMPLATE_112x96, align_to_template, make_face_finder
from eval.identity.weights import WeightFile, load_official_state_dict

SPHEREFACE_WEIGHTS = WeightFile(
    "sphereface", "sphere20a_20171020.pth",
    "github.com/clcarwin/sphereface_pytorch (model/sphere20a_20171020.pth.zip, unzipped)")

# (stage, number of convolutions, output channels); the first conv of each stage has stride 2,
# the others come in residual pairs.
STAGES = ((1, 3, 64), (2, 5, 128), (3, 9, 256), (4, 3, 512))


class Sphere20a(nn.Module):
    """sphere20a with the official names ``conv{stage}_{i}`` / ``relu{stage}_{i}`` (PReLU) and
    ``fc5``; returns the 512-d ``fc5`` feature. Input B x 3 x 112 x 96."""

    def __init__(self):
        super().__init__()
        in_channels = 3
        for stage, count, channels in STAGES:
            for i in range(1, count + 1):
                stride = 2 if i == 1 else 1
                setattr(self, f"conv{stage}_{i}", nn.Conv2d(in_channels, channels, 3, stride, 1))
                setattr(self, f"relu{stage}_{i}", nn.PReLU(channels))
                in_channels = channels
        self.fc5 = nn.Linear(512 * 7 * 6, 512)

    def forward(self, x):
        for stage, count, _ in STAGES:
            x = getattr(self, f"relu{stage}_1")(getattr(self, f"conv{stage}_1")(x))
            for i in range(2, count + 1, 2):
                inner = getattr(self, f"relu{stage}_{i}")(getattr(self, f"conv{stage}_{i}")(x))
                x = x + getattr(self, f"relu{stage}_{i + 1}")(getattr(self, f"conv{stage}_{i + 1}")(inner))
        return self.fc5(x.reshape(x.shape[0], -1))


class SphereFace(TorchIdentityModel):
    name = "sphereface"
    dim = 512
    input_size = (96, 112)
    mean = 127.5
    std = 128.0
    colour_order = "BGR"

    def __init__(self, weights: str | Path | None, device: str = "cpu", detector: str = "auto"):
        path = SPHEREFACE_WEIGHTS.resolve(weights)
        network = Sphere20a()
        load_official_state_dict(network, path, ignored_prefixes=("fc6.",))
        super().__init__(network, make_face_finder(detector, device=device), device)

    def align(self, image: np.ndarray, face: Face) -> np.ndarray:
        return align_to_template(image, face, SPHEREFACE_TEMPLATE_112x96, self.input_size)
