"""Identity models (each with its own detection and alignment protocol) and identity metrics."""

from eval.identity.base import IdentityModel, face_found
from eval.identity.registry import IDENTITY_MODELS, load_identity_model
from eval.identity.weights import MissingWeightsError

__all__ = ["IDENTITY_MODELS", "IdentityModel", "MissingWeightsError", "face_found", "load_identity_model"]
