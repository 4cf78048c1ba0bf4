"""Identity metrics of the paper on feature arrays (rows = L2-normalised features; a NaN row =
no face found). Every metric skips faceless rows and reports how many it skipped.

- ID-Dis (Tab. 5, 8, 9): Euclidean distance between the L2-normalised features of two images of a
  pair (original vs de-identified or recovered), per pair and mean over pairs with a face on both
  sides; in [0, 2], 0 = same features.
- identity-leakage rate (Tab. 1) and face-matching rate (Tab. 6): nearest neighbour of each query
  in a gallery of known identities, counted when within a distance threshold (and, when the
  query's true identity is known, when the nearest gallery identity is that one).
- LFW-style verification accuracy: on labelled pairs, "same person" iff distance <= threshold;
  the threshold that maximises accuracy on 9 folds is scored on the 10th (sklearn KFold); mean and
  standard deviation over folds.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import cdist

from eval.identity.base import face_found


def _normalised(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, dim), got shape {features.shape}")
    return features / np.linalg.norm(features, axis=1, keepdims=True)


@dataclass(frozen=True)
class IDDistance:
    """``per_pair``: distance of each pair (NaN where a side has no face); ``mean`` over the
    ``n_pairs`` pairs with a face on both sides; ``n_skipped`` pairs without."""

    per_pair: np.ndarray
    mean: float
    n_pairs: int
    n_skipped: int


def id_distance(features_a: np.ndarray, features_b: np.ndarray) -> IDDistance:
    """ID-Dis between row i of ``features_a`` and row i of ``features_b``."""
    a, b = _normalised(features_a), _normalised(features_b)
    if a.shape != b.shape:
        raise ValueError(f"paired features differ in shape: {a.shape} vs {b.shape}")
    per_pair = np.linalg.norm(a - b, axis=1)
    valid = ~np.isnan(per_pair)
    mean = float(per_pair[valid].mean()) if valid.any() else float("nan")
    return IDDistance(per_pair, mean, int(valid.sum()), int((~valid).sum()))


@dataclass(frozen=True)
class GalleryMatch:
    """Per query: identity and distance of its nearest gallery image (None / NaN without a face)
    and whether it counts as matched. ``rate`` = matched / queries with a face; ``rate_all`` =
    matched / all queries (a faceless query counted as not matched)."""

    nearest_identity: tuple
    nearest_distance: np.ndarray
    matched: np.ndarray
    n_matched: int
    n_queries: int
    n_skipped: int
    n_gallery_skipped: int

    @property
    def rate(self) -> float:
        return self.n_matched / self.n_queries if self.n_queries else float("nan")

    @property
    def rate_all(self) -> float:
        total = self.n_queries + self.n_skipped
        return self.n_matched / total if total else float("nan")


def match_gallery(query_features: np.ndarray, gallery_features: np.ndarray, gallery_ids: Sequence[Hashable],
                  *, query_ids: Sequence[Hashable] | None = None, threshold: float | None = None) -> GalleryMatch:
    """Nearest gallery image of each query; matched when its distance is <= ``threshold`` (if
    given) and its identity equals the query's (if ``query_ids`` is given). With no face in the
    gallery nothing matches."""
    query, gallery = _normalised(query_features), _normalised(gallery_features)
    if len(gallery_ids) != len(gallery):
        raise ValueError(f"{len(gallery_ids)} gallery identities for {len(gallery)} gallery features")
    if query_ids is not None and len(query_ids) != len(query):
        raise ValueError(f"{len(query_ids)} query identities for {len(query)} query features")
    # A query matches nothing when no gallery image has a face.
    query_ok, gallery_ok = face_found(query), face_found(gallery)
    usable_ids = [gallery_ids[i] for i in np.flatnonzero(gallery_ok)]
    nearest_identity: list = [None] * len(query)
    nearest_distance = np.full(len(query), np.nan)
    matched = np.zeros(len(query), dtype=bool)
    if query_ok.any() and gallery_ok.any():
        distances = cdist(query[query_ok], gallery[gallery_ok])
        nearest = distances.argmin(axis=1)
        for row, (index, column) in enumerate(zip(np.flatnonzero(query_ok), nearest)):
            nearest_identity[index] = usable_ids[column]
            nearest_distance[index] = distances[row, column]
            close = threshold is None or distances[row, column] <= threshold
            right = query_ids is None or usable_ids[column] == query_ids[index]
            matched[index] = close and right
    return GalleryMatch(tuple(nearest_identity), nearest_distance, matched, int(matched.sum()),
                        int(query_ok.sum()), int((~query_ok).sum()), int((~gallery_ok).sum()))


def identity_leakage_rate(query_features: np.ndarray, gallery_features: np.ndarray, gallery_ids: Sequence[Hashable],
                          threshold: float, query_ids: Sequence[Hashable] | None = None) -> GalleryMatch:
    """Tab. 1: the fraction of generated images (queries) whose nearest real patient (gallery) is
    within ``threshold``: the patient's identity is found. With ``query_ids`` (the patient each
    query stems from), only a nearest identity equal to it counts."""
    return match_gallery(query_features, gallery_features, gallery_ids, query_ids=query_ids, threshold=threshold)


def face_matching_rate(query_features: np.ndarray, gallery_features: np.ndarray, gallery_ids: Sequence[Hashable],
                       query_ids: Sequence[Hashable], threshold: float | None = None) -> GalleryMatch:
    """Tab. 6: the fraction of de-identified photos (queries) whose nearest ID photo (gallery) is
    the right person, within ``threshold`` if given (None = plain rank-1 identification)."""
    return match_gallery(query_features, gallery_features, gallery_ids, query_ids=query_ids, threshold=threshold)


def best_threshold(distances: np.ndarray, same: np.ndarray) -> float:
    """The threshold t maximising the accuracy of "same iff distance <= t" on these pairs; cuts
    lie midway between consecutive distinct distances; ties go to the smallest t."""
    distances, same = np.asarray(distances, dtype=np.float64), np.asarray(same, dtype=bool)
    order = np.argsort(distances, kind="stable")
    sorted_distances, sorted_same = distances[order], same[order]
    # Cutting after the k smallest distances (k = 0..N): the k are called same, the rest different.
    same_below = np.concatenate([[0], np.cumsum(sorted_same)])
    different_above = (~sorted_same).sum() - np.concatenate([[0], np.cumsum(~sorted_same)])
    correct = same_below + different_above
    cut_allowed = np.ones(len(correct), dtype=bool)
    cut_allowed[1:-1] = sorted_distances[1:] > sorted_distances[:-1]
    k = int(np.flatnonzero(cut_allowed)[np.argmax(correct[cut_allowed])])
    if k == 0:
        return float(np.nextafter(sorted_distances[0], -np.inf))
    if k == len(sorted_distances):
        return float(sorted_distances[-1])
    return float((sorted_distances[k - 1] + sorted_distances[k]) / 2)


@dataclass(frozen=True)
class Verification:
    """Accuracy mean and std (population std, as the LFW scripts) over folds, each fold's accuracy
    and threshold, the pairs scored and those skipped (a side without a face)."""

    accuracy: float
    accuracy_std: float
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray
    n_pairs: int
    n_skipped: int


def verification_accuracy(distances: np.ndarray, same: np.ndarray, *, n_folds: int = 10,
                          shuffle: bool = False, seed: int = 0) -> Verification:
    """LFW protocol on pair distances (NaN = skipped) and labels. Folds are consecutive blocks
    (LFW's pairs.txt lists its 10 folds in order); ``shuffle`` for files sorted by label."""
    distances, same = np.asarray(distances, dtype=np.float64), np.asarray(same, dtype=bool)
    if distances.shape != same.shape or distances.ndim != 1:
        raise ValueError(f"distances {distances.shape} and labels {same.shape} must be matching 1-d arrays")
    valid = ~np.isnan(distances)
    distances, same = distances[valid], same[valid]
    if len(distances) < n_folds:
        raise ValueError(f"{len(distances)} pairs with faces on both sides; need at least {n_folds} for {n_folds} folds")
    from sklearn.model_selection import KFold  # here: 2 s of import that id_distance alone never needs

    folds = KFold(n_splits=n_folds, shuffle=shuffle, random_state=seed if shuffle else None)
    accuracies, thresholds = [], []
    for train, test in folds.split(distances):
        threshold = best_threshold(distances[train], same[train])
        accuracies.append(np.mean((distances[test] <= threshold) == same[test]))
        thresholds.append(threshold)
    accuracies = np.array(accuracies)
    return Verification(float(accuracies.mean()), float(accuracies.std()), accuracies, np.array(thresholds),
                        int(valid.sum()), int((~valid).sum()))
