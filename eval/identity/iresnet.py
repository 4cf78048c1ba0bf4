"""ArcFace / CosFace: insightface's iresnet18 / 34 / 50 / 100, from arcface_torch ``backbone.pth``
files or from insightface ONNX recognition models (512-d).

Protocol (insightface's ``norm_crop`` + arcface_torch's ``inference.py`` / insightface's
``ArcFaceONNX``):

- detection: five points from facenet-pytorch's MTCNN when installed (insightface itself uses its
  RetinaFace, not available here), else (``detector="dlib"``) the five points derived from dlib's
  68-point predictor (see :mod:`eval.identity.faces`); the largest face;
- alignment: least-squares similarity transform of the five points onto insightface's template
  [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
  [70.7299, 92.2041]], warped (bilinear, black border) to 112x112;
- input: RGB, (x / 255 - 0.5) / 0.5 = (x - 127.5) / 127.5. For an ONNX model whose graph starts
  with its own Sub and Mul nodes (older insightface exports), the input is the raw 0..255 pixels,
  as insightface decides;
- output: the 512-d ``features`` (BatchNorm1d) output, L2-normalised.

Weights: arcface_torch's ``backbone.pth`` state dicts (insightface model zoo,
recognition/arcface_torch, e.g. ms1mv3_arcface_r18_fp16 / r34 / r50 / r100 for ArcFace,
glint360k_cosface_r50_fp16_0.1 / glint360k_cosface_r100_fp16_0.1 for CosFace), or an insightface
ONNX model such as ``w600k_r50.onnx`` (model pack buffalo_l) or ``glintr100.onnx`` (antelopev2).
The depth comes from the name; the channel width (a narrower iresnet, e.g. one trained here by
``mema_jax.trainers.identity`` at width 0.25) and the feature size are read from the file's shapes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from eval.identity.base import IdentityModel, TorchIdentityModel
from eval.identity.faces import ARCFACE_TEMPLATE_112, Face, align_to_template, make_face_finder
from eval.identity.weights import WeightFile, load_official_state_dict, read_official_state_dict

LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}
_ZOO = "the insightface model zoo (github.com/deepinsight/insightface, recognition/arcface_torch)"
ARCFACE_WEIGHTS = {
    "arcface_r18": WeightFile("arcface_r18", "backbone.pth (ms1mv3_arcface_r18_fp16)", _ZOO),
    "arcface_r34": WeightFile("arcface_r34", "backbone.pth (ms1mv3_arcface_r34_fp16)", _ZOO),
    "arcface_r50": WeightFile("arcface_r50", "backbone.pth (ms1mv3_arcface_r50_fp16)", _ZOO),
    "arcface_r100": WeightFile("arcface_r100", "backbone.pth (ms1mv3_arcface_r100_fp16)", _ZOO),
    "cosface_r50": WeightFile("cosface_r50", "backbone.pth (glint360k_cosface_r50_fp16_0.1)", _ZOO),
    "cosface_r100": WeightFile("cosface_r100", "backbone.pth (glint360k_cosface_r100_fp16_0.1)", _ZOO),
}
ONNX_WEIGHTS = WeightFile(
    "arcface_onnx", "an insightface ONNX recognition model, e.g. w600k_r50.onnx",
    "the insightface model packs (buffalo_l has w600k_r50.onnx, antelopev2 has glintr100.onnx)")


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN - conv - BN - PReLU - conv(stride) - BN, plus the (downsampled) input."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """arcface_torch's IResNet (same module names) for 112x112 input; returns the output of
    ``features`` (512-d in arcface_torch). ``base_channels`` is the stem width (64 in
    arcface_torch); the stages have 1, 2, 4 and 8 times as many channels."""

    def __init__(self, layers: tuple[int, int, int, int], num_features: int = 512, base_channels: int = 64):
        super().__init__()
        widths = [base_channels * k for k in (1, 2, 4, 8)]
        self.inplanes = base_channels
        self.conv1 = nn.Conv2d(3, base_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels, eps=1e-05)
        self.prelu = nn.PReLU(base_channels)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1])
        self.layer3 = self._make_layer(widths[2], layers[2])
        self.layer4 = self._make_layer(widths[3], layers[3])
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-05)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(widths[3] * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)

    def _make_layer(self, planes, blocks):
        # Every stage halves the resolution and changes the width, so each has a downsample.
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=2, bias=False),
                                   nn.BatchNorm2d(planes, eps=1e-05))
        stage = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        stage += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        self.inplanes = planes
        return nn.Sequential(*stage)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet(depth: str, num_features: int = 512, base_channels: int = 64) -> IResNet:
    """``"r18"``, ``"r34"``, ``"r50"`` or ``"r100"`` (arcface_torch's iresnet18 ... iresnet100)."""
    return IResNet(LAYERS[depth], num_features=num_features, base_channels=base_channels)


def iresnet_shape_of(state: dict) -> dict:
    """``num_features`` and ``base_channels`` of an arcface_torch state dict, read from the stem
    and fc shapes (the defaults where those keys are absent: the loader then names them)."""
    shape = {}
    if "conv1.weight" in state and state["conv1.weight"].ndim == 4:
        shape["base_channels"] = int(state["conv1.weight"].shape[0])
    if "fc.weight" in state and state["fc.weight"].ndim == 2:
        shape["num_features"] = int(state["fc.weight"].shape[0])
    return shape


class ArcFace(TorchIdentityModel):
    """iresnet18/34/50/100 from an arcface_torch ``backbone.pth`` (ArcFace or CosFace weights)."""

    dim = 512
    input_size = (112, 112)
    mean = 127.5
    std = 127.5
    colour_order = "RGB"

    def __init__(self, name: str, weights: str | Path | None, device: str = "cpu", detector: str = "auto"):
        path = ARCFACE_WEIGHTS[name].resolve(weights)
        state = read_official_state_dict(path)
        network = iresnet(name.rsplit("_", 1)[1], **iresnet_shape_of(state))
        load_official_state_dict(network, path, state=state)
        self.name = name
        self.dim = network.fc.out_features
        super().__init__(network, make_face_finder(detector, device=device), device)

    def align(self, image: np.ndarray, face: Face) -> np.ndarray:
        return align_to_template(image, face, ARCFACE_TEMPLATE_112, self.input_size)


def onnx_input_normalisation(path: Path) -> tuple[float, float]:
    """insightface's rule: a graph whose first 8 nodes include Sub and Mul nodes normalises its
    input itself (mean 0, std 1); otherwise mean = std = 127.5."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node[:8]
    has_sub = any(n.name.startswith(("Sub", "_minus")) for n in nodes)
    has_mul = any(n.name.startswith(("Mul", "_mul")) for n in nodes)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


class ArcFaceONNX(IdentityModel):
    """An insightface ONNX recognition model run with onnxruntime (same protocol as ArcFace)."""

    name = "arcface_onnx"
    input_size = (112, 112)

    def __init__(self, weights: str | Path | None, device: str = "cpu", detector: str = "auto"):
        import onnxruntime

        path = ONNX_WEIGHTS.resolve(weights)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") \
            else ["CPUExecutionProvider"]
        try:
            self._session = onnxruntime.InferenceSession(str(path), providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types for a bad file
            raise ValueError(f"{path}: cannot be loaded as an ONNX model ({error})") from error
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or list(inputs[0].shape[1:]) != [3, 112, 112]:
            raise ValueError(f"{path}: expected one input of shape (N, 3, 112, 112), "
                             f"got {[i.shape for i in inputs]}")
        self._input_name = inputs[0].name
        self.dim = outputs[0].shape[-1]
        if not isinstance(self.dim, int):  # a symbolic size: read it off one forward pass
            self.dim = self._session.run(None, {self._input_name: np.zeros((1, 3, 112, 112), np.float32)})[0].shape[-1]
        self.mean, self.std = onnx_input_normalisation(path)
        super().__init__(make_face_finder(detector, device=device))

    def align(self, image: np.ndarray, face: Face) -> np.ndarray:
        return align_to_template(image, face, ARCFACE_TEMPLATE_112, self.input_size)

    def _raw_features(self, crops: np.ndarray) -> np.ndarray:
        blob = ((crops.astype(np.float32) - self.mean) / self.std).transpose(0, 3, 1, 2)
        return self._session.run(None, {self._input_name: np.ascontiguousarray(blob)})[0]
