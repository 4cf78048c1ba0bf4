"""Which generated images leak: each one's nearest real image per model, within that model's
threshold or not, and the union of the models' decisions; and the checks and loading that come
before it (models, thresholds, the embedded gallery)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from eval.identity.metrics import GalleryMatch, identity_leakage_rate
from mema_jax.data import layout
from eval.leakage.embedding import (FACE_MODES, Gallery, ImageSet, LeakageFilterError, embed_gallery, held_out_pairs,
                                     loaded_models, mean_face, model_names, read_set)
from eval.leakage.thresholds import (Threshold, check_thresholds, parse_threshold_specs, resolve_thresholds,
                                      split_pair_thresholds)

UNION_RULE = ("an image is flagged when any identity model's nearest real image is within that model's threshold "
              "(the union: a leak one model sees is a leak)")
# ---------------------------------------------------------------------------------------- leakage

@dataclasses.dataclass(frozen=True)
class Leakage:
    """Per model, the gallery match of every generated image (``nearest_identity`` holds the
    nearest gallery row), and the union decisions."""

    images: ImageSet
    gallery: Gallery
    thresholds: dict[str, Threshold]
    matches: dict[str, GalleryMatch]

    @property
    def models(self) -> list[str]:
        return list(self.matches)

    def faceless(self, model: str) -> np.ndarray:
        return np.isnan(self.matches[model].nearest_distance)

    @property
    def flagged(self) -> np.ndarray:
        """Within the threshold of at least one model (the union)."""
        return np.logical_or.reduce([m.matched for m in self.matches.values()])

    @property
    def no_face(self) -> np.ndarray:
        """Some model found no face, so that model could not check the image."""
        return np.logical_or.reduce([self.faceless(m) for m in self.matches])

    def kept(self, keep_faceless: bool = False) -> np.ndarray:
        return ~self.flagged & (keep_faceless | ~self.no_face)

    def percent(self, model: str) -> float:
        """Tab. 1's value: flagged by ``model`` / images where ``model`` found a face, in percent."""
        return 100 * self.matches[model].rate

    def nearest(self, model: str, index: int) -> layout.Record | None:
        row = self.matches[model].nearest_identity[index]
        return None if row is None else self.gallery.images.records[row]


def leakage(features: Mapping[str, np.ndarray], images: ImageSet, gallery: Gallery,
            thresholds: Mapping[str, Threshold | float]) -> Leakage:
    """Nearest gallery image of each generated image per model, within that model's threshold or not."""
    thresholds = {m: t if isinstance(t, Threshold) else Threshold(float(t), "given", f"{m}: {float(t):.4f} (given)")
                  for m, t in thresholds.items()}
    rows = list(range(len(gallery.images)))   # gallery row as its "identity": nearest image and its identity
    matches = {m: identity_leakage_rate(features[m], gallery.features[m], rows, thresholds[m].value)
               for m in features}
    return Leakage(images, gallery, {m: thresholds[m] for m in features}, matches)


def prepare_inputs(models, real, real_split, thresholds, pairs, faces):
    """What is cheap to check, before anything slow: models, thresholds, the real folder (and its mean face)."""
    names = model_names(models)
    given = parse_threshold_specs(thresholds) if isinstance(thresholds, (list, tuple)) else dict(thresholds or {})
    check_thresholds(names, given, pairs)
    if faces not in FACE_MODES:
        raise LeakageFilterError(f"--faces {faces}: expected one of {', '.join(FACE_MODES)}")
    real_set = read_set(real, "real", real_split)
    mean = mean_face(real_set) if faces == "real-mean" else None
    return names, given, real_set, mean


def load_and_resolve(models, detector, given, pairs, pairs_max_side, real_set, faces, cache=None):
    """The loaded models, each one's threshold and the embedded gallery (the slow part of both commands)."""
    loaded = loaded_models(models, detector)
    held_out_spec = held_out_pairs(pairs)
    if held_out_spec and any(n not in given for n in loaded):
        folder, split = held_out_spec
        held_out = (read_set(real_set.root, "real", split) if folder == "real"
                    else read_set(folder, "--pairs", split))
        chosen = split_pair_thresholds({n: m for n, m in loaded.items() if n not in given}, held_out, faces,
                                       cache=cache)
        resolved = {n: Threshold(float(given[n]), "given", f"{n}: {float(given[n]):.4f} (given)") if n in given
                    else chosen[n] for n in loaded}
    else:
        resolved = resolve_thresholds(loaded, given, pairs, pairs_max_side)
    gallery = embed_gallery(loaded, real_set, faces, cache)
    return loaded, resolved, gallery


