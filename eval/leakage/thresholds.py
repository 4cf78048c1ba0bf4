"""Each identity model's decision threshold: given, or the best on same/different pairs (a pairs
file, or pairs of a held-out split of the real folder)."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from eval.identity import IdentityModel
from eval.identity.metrics import best_threshold
from mema_jax.data import layout
from eval.leakage.embedding import REAL_PAIRS, EmbeddingCache, ImageSet, LeakageFilterError, embed_set, held_out_pairs

# -------------------------------------------------------------------------------------- thresholds

@dataclasses.dataclass(frozen=True)
class Threshold:
    """A model's decision threshold (distance of L2-normalised features) and how it was chosen."""

    value: float
    source: str      # "given" or "pairs"
    how: str         # one sentence for the notes


def parse_threshold_specs(specs: Sequence[str]) -> dict[str, float]:
    """``NAME=T`` strings -> {name: T}."""
    thresholds = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not name.strip() or not math.isfinite(number):
            raise LeakageFilterError(f"--threshold {spec}: expected NAME=T with T a number, e.g. dlib=0.41")
        if name.strip() in thresholds:
            raise LeakageFilterError(f"--threshold {name.strip()} given more than once")
        thresholds[name.strip()] = number
    return thresholds


def check_thresholds(names: Sequence[str], given: Mapping[str, float], pairs) -> None:
    """Before anything slow: every model has a threshold or the pairs file to choose one."""
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise LeakageFilterError(f"--threshold {', '.join(unknown)}: no such --model (models: {', '.join(names)})")
    for name, value in given.items():
        if not 0 <= value <= 2:
            raise LeakageFilterError(f"--threshold {name}={value}: distances of L2-normalised features lie in "
                                     "[0, 2]; expected a threshold in that range")
    missing = [n for n in names if n not in given]
    if missing and pairs is None:
        raise LeakageFilterError(f"identity model {missing[0]} has no decision threshold: give --threshold "
                                 f"{missing[0]}=T or --pairs PAIRS_CSV (file_x,file_y,Decision) to choose one")
    if missing and held_out_pairs(pairs):
        split = held_out_pairs(pairs)[1]
        if split not in layout.SPLITS:
            raise LeakageFilterError(f"--pairs {pairs}: unknown split {split!r}; expected {REAL_PAIRS}SPLIT or "
                                     f"FOLDER:SPLIT with SPLIT one of {list(layout.SPLITS)}")
        return
    if missing and not Path(pairs).is_file():
        raise LeakageFilterError(f"--pairs {pairs}: file does not exist (needed for the threshold of "
                                 f"{', '.join(missing)})")


def resolve_thresholds(models: Mapping[str, IdentityModel], given: Mapping[str, float] | None = None,
                       pairs=None, pairs_max_side: int | None = None) -> dict[str, Threshold]:
    """Each model's threshold: ``given[name]``, else the best one on the ``pairs`` file (images
    shrunk to ``pairs_max_side`` if given), else a :class:`LeakageFilterError` naming the model."""
    from eval.identity.evaluate import read_pairs_csv, verify_pairs

    given = dict(given or {})
    check_thresholds(list(models), given, pairs)
    thresholds = {name: Threshold(float(v), "given", f"{name}: {float(v):.4f} (given)")
                  for name, v in given.items()}
    missing = [n for n in models if n not in given]
    if missing:
        try:
            pair_list = read_pairs_csv(pairs)
        except ValueError as error:
            raise LeakageFilterError(f"--pairs: {error}") from None
        if not pair_list:
            raise LeakageFilterError(f"--pairs {pairs}: no pairs")
        same = np.array([p.same for p in pair_list])
        for name in missing:
            try:
                result = verify_pairs(models[name], pair_list, max_side=pairs_max_side, shuffle=True, seed=0)
            except FileNotFoundError as error:
                raise LeakageFilterError(f"--pairs {pairs}: {error}") from None
            except ValueError as error:   # too few pairs with faces for the folds
                raise LeakageFilterError(f"--pairs {pairs}, identity model {name}: {error}") from None
            ok = ~np.isnan(result.distances)
            value = best_threshold(result.distances[ok], same[ok])
            thresholds[name] = Threshold(value, "pairs", (
                f"{name}: {value:.4f}, the threshold that best separates the {int(ok.sum())} pairs of {pairs} with "
                f"a face on both sides (chosen on all pairs; 10-fold verification accuracy "
                f"{100 * result.verification.accuracy:.2f}%)"))
    return {name: thresholds[name] for name in models}


def split_pair_thresholds(models: Mapping[str, IdentityModel], images: ImageSet, faces: str = "detect", *,
                          per_kind: int = 480, seed: int = 0, cache: EmbeddingCache | None = None) -> dict[str, Threshold]:
    """Each model's best threshold on same/different-person pairs of ``images`` (a real folder's
    held-out split, e.g. ``--pairs real:val``): ``per_kind`` pairs of each kind drawn with ``seed``,
    embedded as the gallery is (their recorded faces with ``--faces real-mean``)."""
    from eval.identity.metrics import id_distance, verification_accuracy

    from eval.identity.evaluate import identity_pairs

    try:
        pairs, label = identity_pairs(images.identities, per_kind=per_kind, seed=seed)
    except ValueError:
        raise LeakageFilterError(f"--pairs {images.root}:{images.split}: {images.root / layout.LABELS_FILE} has too few "
                                 "identities with two images in that split to make pairs") from None
    people = sorted({i for i in images.identities if i})
    features = embed_set(models, images, "recorded" if faces == "real-mean" else "detect", cache)
    out = {}
    for name, feats in features.items():
        distances = id_distance(feats[pairs[:, 0]], feats[pairs[:, 1]]).per_pair
        ok = ~np.isnan(distances)
        if ok.sum() < 20:
            raise LeakageFilterError(f"--pairs {images.root}:{images.split}, identity model {name}: only {int(ok.sum())} "
                                     "pairs with a face on both sides")
        value = best_threshold(distances[ok], label[ok])
        accuracy = verification_accuracy(distances[ok], label[ok], shuffle=True, seed=seed).accuracy
        out[name] = Threshold(value, "pairs", (
            f"{name}: {value:.4f}, the threshold that best separates {int(ok.sum())} same/different pairs of the "
            f"{images.split} split of {images.root} ({len(people)} people the gallery does not hold, faces "
            f"{'recorded' if faces == 'real-mean' else 'detected'}; chosen on all pairs; 10-fold verification "
            f"accuracy {100 * accuracy:.2f}%)"))
    return out


