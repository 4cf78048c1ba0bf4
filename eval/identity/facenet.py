"""FaceNet: InceptionResnetV1 of facenet-pytorch, with its VGGFace2 or CASIA-WebFace weights (512-d).

Protocol (facenet-pytorch's ``MTCNN(image_size=160, margin=0)`` followed by the network):

- detection: facenet-pytorch's MTCNN (weights ship in that package), largest face; with
  ``detector="dlib"`` (or "auto" when facenet-pytorch is not installed) dlib's HOG box instead,
  which is tighter than MTCNN's box, so distances are not comparable across detectors;
- alignment: none beyond the box: the box (no margin) cut at integer pixels from the RGB image and
  resized to 160x160 with bilinear filtering (``extract_face`` on a PIL image);
- input: RGB, ``fixed_image_standardization`` = (x - 127.5) / 128;
- output: the 512-d ``last_bn`` embedding, L2-normalised (facenet-pytorch's ``classify=False``).

Weights: the official facenet-pytorch state dicts ``20180402-114759-vggface2.pt`` (8631-class
head) and ``20180408-102900-casia-webface.pt`` (10575-class head), release v2.2.9 of
github.com/timesler/facenet-pytorch. The ``logits`` head is not needed and is ignored.
The architecture is defined here with facenet-pytorch's module names so it works without that
package (whose pinned requirements do not match this project's torch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from eval.identity.base import TorchIdentityModel
from eval.identity.faces import Face, crop_box, make_face_finder
from eval.identity.weights import WeightFile, load_official_state_dict

FACENET_WEIGHTS = {
    "facenet_vggface2": WeightFile(
        "facenet_vggface2", "20180402-114759-vggface2.pt",
        "facenet-pytorch's GitHub release v2.2.9 (github.com/timesler/facenet-pytorch)"),
    "facenet_casia": WeightFile(
        "facenet_casia", "20180408-102900-casia-webface.pt",
        "facenet-pytorch's GitHub release v2.2.9 (github.com/timesler/facenet-pytorch)"),
}
NUM_CLASSES = {"facenet_vggface2": 8631, "facenet_casia": 10575}


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, TensorFlow's) + ReLU."""

    def __init__(self, in_planes, out_planes, kernel_size, stride, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=kernel_size, stride=stride,
                              padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_planes, eps=0.001, momentum=0.1, affine=True)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Block35(nn.Module):
    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(256, 32, kernel_size=1, stride=1)
        self.branch1 = nn.Sequential(BasicConv2d(256, 32, kernel_size=1, stride=1),
                                     BasicConv2d(32, 32, kernel_size=3, stride=1, padding=1))
        self.branch2 = nn.Sequential(BasicConv2d(256, 32, kernel_size=1, stride=1),
                                     BasicConv2d(32, 32, kernel_size=3, stride=1, padding=1),
                                     BasicConv2d(32, 32, kernel_size=3, stride=1, padding=1))
        self.conv2d = nn.Conv2d(96, 256, kernel_size=1, stride=1)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        out = torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)
        return self.relu(self.conv2d(out) * self.scale + x)


class Block17(nn.Module):
    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(896, 128, kernel_size=1, stride=1)
        self.branch1 = nn.Sequential(BasicConv2d(896, 128, kernel_size=1, stride=1),
                                     BasicConv2d(128, 128, kernel_size=(1, 7), stride=1, padding=(0, 3)),
                                     BasicConv2d(128, 128, kernel_size=(7, 1), stride=1, padding=(3, 0)))
        self.conv2d = nn.Conv2d(256, 896, kernel_size=1, stride=1)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        out = torch.cat((self.branch0(x), self.branch1(x)), 1)
        return self.relu(self.conv2d(out) * self.scale + x)


class Block8(nn.Module):
    def __init__(self, scale=1.0, noReLU=False):
        super().__init__()
        self.scale = scale
        self.noReLU = noReLU
        self.branch0 = BasicConv2d(1792, 192, kernel_size=1, stride=1)
        self.branch1 = nn.Sequential(BasicConv2d(1792, 192, kernel_size=1, stride=1),
                                     BasicConv2d(192, 192, kernel_size=(1, 3), stride=1, padding=(0, 1)),
                                     BasicConv2d(192, 192, kernel_size=(3, 1), stride=1, padding=(1, 0)))
        self.conv2d = nn.Conv2d(384, 1792, kernel_size=1, stride=1)
        if not self.noReLU:
            self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        out = torch.cat((self.branch0(x), self.branch1(x)), 1)
        out = self.conv2d(out) * self.scale + x
        return out if self.noReLU else self.relu(out)


class Mixed_6a(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch0 = BasicConv2d(256, 384, kernel_size=3, stride=2)
        self.branch1 = nn.Sequential(BasicConv2d(256, 192, kernel_size=1, stride=1),
                                     BasicConv2d(192, 192, kernel_size=3, stride=1, padding=1),
                                     BasicConv2d(192, 256, kernel_size=3, stride=2))
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)


class Mixed_7a(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch0 = nn.Sequential(BasicConv2d(896, 256, kernel_size=1, stride=1),
                                     BasicConv2d(256, 384, kernel_size=3, stride=2))
        self.branch1 = nn.Sequential(BasicConv2d(896, 256, kernel_size=1, stride=1),
                                     BasicConv2d(256, 256, kernel_size=3, stride=2))
        self.branch2 = nn.Sequential(BasicConv2d(896, 256, kernel_size=1, stride=1),
                                     BasicConv2d(256, 256, kernel_size=3, stride=1, padding=1),
                                     BasicConv2d(256, 256, kernel_size=3, stride=2))
        self.branch3 = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class InceptionResnetV1(nn.Module):
    """facenet-pytorch's InceptionResnetV1 (same module names); returns the unnormalised 512-d
    ``last_bn`` output. ``num_classes`` adds the ``logits`` head of the official files."""

    def __init__(self, num_classes: int | None = None, dropout_prob: float = 0.6):
        super().__init__()
        self.conv2d_1a = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.conv2d_2a = BasicConv2d(32, 32, kernel_size=3, stride=1)
        self.conv2d_2b = BasicConv2d(32, 64, kernel_size=3, stride=1, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = BasicConv2d(64, 80, kernel_size=1, stride=1)
        self.conv2d_4a = BasicConv2d(80, 192, kernel_size=3, stride=1)
        self.conv2d_4b = BasicConv2d(192, 256, kernel_size=3, stride=2)
        self.repeat_1 = nn.Sequential(*[Block35(scale=0.17) for _ in range(5)])
        self.mixed_6a = Mixed_6a()
        self.repeat_2 = nn.Sequential(*[Block17(scale=0.10) for _ in range(10)])
        self.mixed_7a = Mixed_7a()
        self.repeat_3 = nn.Sequential(*[Block8(scale=0.20) for _ in range(5)])
        self.block8 = Block8(noReLU=True)
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout_prob)
        self.last_linear = nn.Linear(1792, 512, bias=False)
        self.last_bn = nn.BatchNorm1d(512, eps=0.001, momentum=0.1, affine=True)
        if num_classes is not None:
            self.logits = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.conv2d_4b(self.conv2d_4a(self.conv2d_3b(self.maxpool_3a(
            self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x)))))))
        x = self.block8(self.repeat_3(self.mixed_7a(self.repeat_2(self.mixed_6a(self.repeat_1(x))))))
        x = self.dropout(self.avgpool_1a(x))
        return self.last_bn(self.last_linear(x.view(x.shape[0], -1)))


class FaceNet(TorchIdentityModel):
    dim = 512
    input_size = (160, 160)
    mean = 127.5
    std = 128.0
    colour_order = "RGB"

    def __init__(self, name: str, weights: str | Path | None, device: str = "cpu", detector: str = "auto"):
        path = FACENET_WEIGHTS[name].resolve(weights)
        network = InceptionResnetV1()
        load_official_state_dict(network, path, ignored_prefixes=("logits.",))
        self.name = name
        super().__init__(network, make_face_finder(detector, device=device), device)

    def align(self, image: np.ndarray, face: Face) -> np.ndarray:
        return crop_box(image, face.box, self.input_size[0], margin=0.0)
