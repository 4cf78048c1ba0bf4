"""Identity metrics on images and pair files: the glue between the models and the metrics."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from eval.identity.base import IdentityModel
from eval.identity.faces import load_rgb
from eval.identity.metrics import IDDistance, Verification, id_distance, verification_accuracy

EMBED_CHUNK = 64  # images decoded at a time, so a pairs file of thousands of photos fits in memory


def id_distance_of_images(model: IdentityModel, originals: Sequence[np.ndarray], others: Sequence[np.ndarray],
                          *, faces_from_originals: bool = False) -> IDDistance:
    """ID-Dis between each original and its de-identified (or recovered) image. By default the
    face is detected in each image; ``faces_from_originals`` embeds each other image at the face
    (box and landmarks) found on its original, so an undetectable output is still scored."""
    if len(originals) != len(others):
        raise ValueError(f"{len(originals)} originals but {len(others)} images to compare")
    if faces_from_originals:
        faces = [model.locate(image) for image in originals]
        return id_distance(model.embed(originals, faces), model.embed(others, faces))
    return id_distance(model.embed(originals), model.embed(others))


@dataclass(frozen=True)
class FacePair:
    first: Path
    second: Path
    same: bool


def read_pairs_csv(path: str | Path, image_root: str | Path | None = None) -> list[FacePair]:
    """A pairs file with columns ``file_x,file_y,Decision`` (Decision Yes = same person, No =
    different), file names relative to ``image_root`` (default: the csv's folder)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"file_x", "file_y", "Decision"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns file_x,file_y,Decision, got {reader.fieldnames}")
        pairs = []
        for line, row in enumerate(reader, start=2):
            if row["Decision"] not in ("Yes", "No"):
                raise ValueError(f"{path}:{line}: Decision must be Yes or No, got {row['Decision']!r}")
            pairs.append(FacePair(root / row["file_x"], root / row["file_y"], row["Decision"] == "Yes"))
    return pairs


def identity_pairs(identities: Sequence[str], *, per_kind: int = 480, seed: int = 0):
    """Same-person and different-person pairs of images labelled with ``identities`` ('' = unknown,
    left out): up to ``per_kind`` same-person pairs drawn with ``seed``, then as many
    different-person pairs.  Returns ``(pairs (N, 2) indices, same (N,) bool)``, same pairs first;
    ValueError with fewer than two people or no person with two images."""
    import itertools

    by_id: dict[str, list[int]] = {}
    for i, identity in enumerate(identities):
        if identity:
            by_id.setdefault(identity, []).append(i)
    same = [(a, b) for rows in by_id.values() for a, b in itertools.combinations(rows, 2)]
    people = sorted(by_id)
    if not same or len(people) < 2:
        raise ValueError("too few identities with two images to make same/different pairs")
    rng = np.random.default_rng(seed)
    same = [same[i] for i in rng.permutation(len(same))[:per_kind]]
    different = []
    while len(different) < len(same):
        a, b = rng.choice(len(people), 2, replace=False)
        different.append((by_id[people[a]][int(rng.integers(len(by_id[people[a]])))],
                          by_id[people[b]][int(rng.integers(len(by_id[people[b]])))]))
    return np.asarray(same + different), np.r_[np.ones(len(same), bool), np.zeros(len(different), bool)]


def read_lfw_pairs(pairs_txt: str | Path, lfw_root: str | Path) -> list[FacePair]:
    """LFW's ``pairs.txt``: a header line, then ``name i j`` (same person) or ``name i other j``
    (different), images at ``<lfw_root>/<name>/<name>_<i:04d>.jpg``."""
    pairs_txt, root = Path(pairs_txt), Path(lfw_root)

    def image(name: str, number: str) -> Path:
        return root / name / f"{name}_{int(number):04d}.jpg"

    pairs = []
    with open(pairs_txt) as handle:
        lines = handle.read().splitlines()
    for line_number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if len(fields) == 3:
            pairs.append(FacePair(image(fields[0], fields[1]), image(fields[0], fields[2]), True))
        elif len(fields) == 4:
            pairs.append(FacePair(image(fields[0], fields[1]), image(fields[2], fields[3]), False))
        elif fields:
            raise ValueError(f"{pairs_txt}:{line_number}: expected 3 or 4 fields, got {line!r}")
    return pairs


def load_image(path: Path, max_side: int | None = None) -> np.ndarray:
    """An RGB image, shrunk (Lanczos) so that its longer side is at most ``max_side``."""
    image = load_rgb(path)
    if max_side is not None and max(image.shape[:2]) > max_side:
        shrunk = Image.fromarray(image)
        shrunk.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        image = np.asarray(shrunk)
    return image


@dataclass(frozen=True)
class PairVerification:
    distances: np.ndarray
    verification: Verification


def verify_pairs(model: IdentityModel, pairs: Sequence[FacePair], *, max_side: int | None = None,
                 n_folds: int = 10, shuffle: bool = False, seed: int = 0) -> PairVerification:
    """Embed every image of ``pairs`` once (shrunk to ``max_side`` if given), then score the LFW
    protocol on the pair distances (pairs with a faceless side are skipped and counted). Folds are
    consecutive blocks, as LFW's pairs.txt is laid out; pass ``shuffle=True`` for a file sorted by
    label (such as a deepface-style master.csv)."""
    files = sorted({pair.first for pair in pairs} | {pair.second for pair in pairs})
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} pair images not found, first: {missing[:5]}")
    features = np.concatenate([model.embed([load_image(f, max_side) for f in files[i:i + EMBED_CHUNK]])
                               for i in range(0, len(files), EMBED_CHUNK)])
    row = {f: i for i, f in enumerate(files)}
    first = features[[row[p.first] for p in pairs]]
    second = features[[row[p.second] for p in pairs]]
    distances = id_distance(first, second).per_pair
    same = np.array([p.same for p in pairs])
    return PairVerification(distances, verification_accuracy(distances, same, n_folds=n_folds,
                                                             shuffle=shuffle, seed=seed))
