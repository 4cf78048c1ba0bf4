"""The models a report scores with, loaded once from the config; what is not configured is left
out with a note saying how to configure it.

Notes are kept by topic (``TOPICS``: the tool or input a table lacks); each table takes the notes
of the tools it uses (``Notes.on``), so a new table needs no change here.
"""
from __future__ import annotations

import dataclasses

from eval import landmarks
from eval.gaze import GazeEstimator
from eval.identity import load_identity_model
from eval.inputs import Originals
from eval.reconstruction import LPIPS

LANDMARKS = "landmarks"
GAZE = "gaze"
IDENTITY_WEIGHTS = "identity_weights"     # one note per identity model without weights
IDENTITY_MODELS = "identity_models"       # config.identity.models is empty
LPIPS_BACKBONE = "lpips"
DISEASE_LABELS = "disease_labels"         # a classifier is configured but the originals have no labels
CLASSIFIER = "classifier"
TOPICS = (LANDMARKS, GAZE, IDENTITY_WEIGHTS, IDENTITY_MODELS, LPIPS_BACKBONE, DISEASE_LABELS, CLASSIFIER)
IDENTITY = (IDENTITY_WEIGHTS, IDENTITY_MODELS)   # what a table of identity metrics says it lacks


class Notes:
    """What was left out and why, by topic, collected while loading; tables read them with ``on``."""

    def __init__(self):
        self._by_topic: dict[str, list[str]] = {}

    def add(self, topic: str, text: str) -> None:
        _check_topics([topic])
        self._by_topic.setdefault(topic, []).append(text)

    def on(self, *topics: str) -> list[str]:
        """The notes of ``topics``, in that order (a new list: a table appends its own to it)."""
        _check_topics(topics)
        return [n for t in topics for n in self._by_topic.get(t, [])]


def _check_topics(topics) -> None:
    unknown = [t for t in topics if t not in TOPICS]
    if unknown:
        raise KeyError(f"unknown note topic(s) {unknown}; expected some of {TOPICS}")


@dataclasses.dataclass
class Tools:
    landmarker: object = None
    gaze: object = None
    identity: dict = dataclasses.field(default_factory=dict)   # name -> IdentityModel, sorted by name
    lpips: object = None
    classifier: object = None


def load_tools(config, originals: Originals, notes: Notes) -> Tools:
    """Every configured model (a configured weight file that does not exist raises FileNotFoundError);
    a note for each one that is not configured."""
    tools = Tools()
    if config.landmarks.enabled:
        tools.landmarker = landmarks.Landmarker(config.landmarks.predictor or None)
    else:
        notes.add(LANDMARKS, "landmark error left out: config.landmarks.enabled is False.")
    if config.gaze.weights:
        tools.gaze = GazeEstimator(config.gaze.weights, device=config.device)
    else:
        notes.add(GAZE, "gaze error left out: no L2CS-Net weights configured (set config.gaze.weights to "
                        "L2CSNet_gaze360.pkl from github.com/Ahmednull/L2CS-Net).")
    if config.identity.models:
        for name, entry in sorted(config.identity.models.items()):
            if not entry.weights and name != "dlib":
                notes.add(IDENTITY_WEIGHTS,
                          f"{name} left out: no weights configured (config.identity.models.{name}.weights).")
                continue
            tools.identity[name] = load_identity_model(name, entry.weights or None, device=config.device,
                                                       detector=config.identity.detector)
    else:
        notes.add(IDENTITY_MODELS, "identity metrics left out: config.identity.models is empty.")
    if config.reconstruction.lpips_backbone:
        tools.lpips = LPIPS(config.reconstruction.lpips_backbone, net=config.reconstruction.lpips_net,
                            device=config.device)
    else:
        notes.add(LPIPS_BACKBONE, "LPIPS left out: no backbone weights configured (config.reconstruction."
                                  "lpips_backbone: torchvision's alexnet-owt-7be5be79.pth).")
    if config.medical.classifier:
        if originals.dataset is None:
            notes.add(DISEASE_LABELS,
                      "disease accuracy left out: the originals are a plain folder without disease labels.")
        else:
            from eval.medical.classification import load_classifier   # imports transformers: only when asked
            tools.classifier = load_classifier(config.medical.classifier, device=config.device)
    else:
        notes.add(CLASSIFIER, "disease accuracy left out: no fine-tuned classifier configured "
                              "(config.medical.classifier; train one with "
                              "`python -m eval.medical.classification train`).")
    return tools
