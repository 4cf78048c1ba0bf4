"""MeMa Step 3: the generated folder without the images that leak a real patient (see
``eval.leakage_filter`` for every decision and what the output holds)."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from eval.identity import IdentityModel
from mema_jax.data import layout
from mema_jax.fileio import atomic_write_bytes, csv_bytes
from eval.leakage.decision import UNION_RULE, Leakage, leakage, load_and_resolve, prepare_inputs
from eval.leakage.embedding import EmbeddingCache, embed_set, read_set
from eval.leakage.folders import check_out, publish

GENERATION_FILE = "generation.csv"
LEAKAGE_FILE = "leakage.csv"
NO_FACE_FILE = "no_face.csv"
SUMMARY_FILE = "summary.json"
def _filter_csv(source: Path, target: Path, keep: set[str]) -> int | None:
    """The rows of ``source`` whose image_id is in ``keep`` (header and every column as they are)
    written to ``target``; None (nothing written) when ``source`` has no image_id column."""
    with open(source, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or "image_id" not in rows[0]:
        return None
    column = rows[0].index("image_id")
    kept = [row for row in rows[1:] if len(row) > column and row[column].strip() in keep]
    atomic_write_bytes(target, csv_bytes(rows[0], kept))
    return len(kept)


def _distance_text(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"


def _leakage_rows(result: Leakage, kept: np.ndarray):
    header = ["image_id", "image"]
    for m in result.models:
        header += [f"{m}_face", f"{m}_nearest_image_id", f"{m}_nearest_identity", f"{m}_distance", f"{m}_flagged"]
    header += ["flagged", "no_face", "kept"]
    rows = []
    flagged, no_face = result.flagged, result.no_face
    for i, record in enumerate(result.images.records):
        row = [record.image_id, record.image]
        for m in result.models:
            match, nearest = result.matches[m], result.nearest(m, i)
            if nearest is None:
                row += ["0", "", "", "", ""]
            else:
                row += ["1", nearest.image_id, nearest.identity, _distance_text(float(match.nearest_distance[i])),
                        str(int(match.matched[i]))]
        rows.append(row + [str(int(flagged[i])), str(int(no_face[i])), str(int(kept[i]))])
    return header, rows


def _no_face_rows(result: Leakage, kept: np.ndarray):
    rows = []
    for i in np.flatnonzero(result.no_face):
        record = result.images.records[i]
        models = ";".join(m for m in result.models if result.faceless(m)[i])
        rows.append([record.image_id, record.image, models, str(int(result.flagged[i])), str(int(kept[i]))])
    return ["image_id", "image", "models_without_face", "flagged", "kept"], rows


def summarise(result: Leakage, kept: np.ndarray, *, keep_faceless: bool, faces: str,
              models: Mapping[str, IdentityModel] | None = None) -> dict:
    """The counts, thresholds and per-model leakage behind a filter run, as summary.json holds them."""
    gallery = result.gallery
    per_model = {}
    for m in result.models:
        match = result.matches[m]
        per_model[m] = {
            "threshold": result.thresholds[m].value,
            "threshold_source": result.thresholds[m].source,
            "threshold_how": result.thresholds[m].how,
            "detector": None if models is None else getattr(models[m], "detector", None),
            "n_with_face": match.n_queries,
            "n_no_face": match.n_skipped,
            "n_flagged": match.n_matched,
            "leakage_percent": None if match.n_queries == 0 else 100 * match.rate,
            "gallery_no_face": gallery.n_faceless(m),
        }
    flagged, no_face = result.flagged, result.no_face
    faceless_unflagged = no_face & ~flagged
    policy = ("kept (--keep-faceless): images no model could fully check are kept" if keep_faceless else
              "not kept (privacy first; --keep-faceless keeps them)")
    return {
        "generated": str(result.images.root),
        "real": str(gallery.images.root),
        "real_split": gallery.images.split or "all",
        "faces": faces,
        "rule": UNION_RULE,
        "faceless_policy": f"images in which some model finds no face: {policy}",
        "n_generated": len(result.images),
        "n_gallery": len(gallery.images),
        "n_gallery_people": gallery.images.n_people,
        "n_flagged": int(flagged.sum()),
        "n_no_face": int(no_face.sum()),
        "n_no_face_not_flagged": int(faceless_unflagged.sum()),
        "n_kept": int(kept.sum()),
        "n_kept_without_face": int((kept & no_face).sum()),
        "models": per_model,
    }


@dataclasses.dataclass(frozen=True)
class FilterResult:
    out: Path
    leakage: Leakage
    kept: np.ndarray          # per generated image
    summary: dict


def filter_folder(generated, real, out, models, *, real_split: str = "", thresholds=None, pairs=None,
                  pairs_max_side: int | None = None, faces: str = "detect", detector: str = "auto",
                  keep_faceless: bool = False, overwrite: bool = False, embedding_cache=None) -> FilterResult:
    """Step 3: writes ``out``, the generated MeMa folder without the images that leak a real patient.

    ``models``: ``NAME[=WEIGHTS]`` specs or a mapping name -> loaded IdentityModel.
    ``thresholds``: {name: T} or ``NAME=T`` strings; models without one take the best threshold
    on ``pairs``. ``embedding_cache``: a folder of features already computed (``EmbeddingCache``).
    See ``eval.leakage_filter``'s docstring for every decision and what ``out`` holds.
    """
    cache = None if embedding_cache is None else EmbeddingCache(embedding_cache)
    out = Path(out)
    names, given, real_set, mean = prepare_inputs(models, real, real_split, thresholds, pairs, faces)
    generated_set = read_set(generated, "generated")
    check_out(out, overwrite, [generated_set.root, real_set.root])
    loaded, resolved, gallery = load_and_resolve(models, detector, given, pairs, pairs_max_side, real_set, faces,
                                                 cache)
    features = embed_set(loaded, generated_set, mean if mean is not None else "detect", cache)
    result = leakage(features, generated_set, gallery, resolved)
    kept = result.kept(keep_faceless)
    summary = summarise(result, kept, keep_faceless=keep_faceless, faces=faces, models=loaded)
    summary["out"] = str(out)
    if mean is not None:
        summary["mean_face"] = {"n_faces": mean.n_faces, "box_relative": list(mean.box),
                                "landmarks_relative": mean.landmarks.tolist()}
    kept_records = [r for r, k in zip(generated_set.records, kept) if k]
    notes = []
    if not kept_records:
        notes.append("no image was kept: labels.csv holds the header only (not a readable MeMa folder)")

    def fill(tmp: Path) -> None:
        source = generated_set.dataset
        for record in kept_records:
            for relative in (record.image, record.mask):
                if relative:
                    target = tmp / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source.root / relative, target)
        keep_ids = {r.image_id for r in kept_records}
        _filter_csv(generated_set.root / layout.LABELS_FILE, tmp / layout.LABELS_FILE, keep_ids)
        if (generated_set.root / layout.FACES_FILE).is_file():
            _filter_csv(generated_set.root / layout.FACES_FILE, tmp / layout.FACES_FILE, keep_ids)
        generation = generated_set.root / GENERATION_FILE
        if generation.is_file():
            if _filter_csv(generation, tmp / GENERATION_FILE, keep_ids) is None:
                notes.append(f"{generation} has no image_id column: not copied")
        atomic_write_bytes(tmp / LEAKAGE_FILE, csv_bytes(*_leakage_rows(result, kept)))
        atomic_write_bytes(tmp / NO_FACE_FILE, csv_bytes(*_no_face_rows(result, kept)))
        summary["notes"] = notes
        atomic_write_bytes(tmp / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
        if kept_records:
            layout.read_dataset(tmp)   # the kept folder is a valid MeMa folder before it is published

    publish(out, overwrite, fill)
    return FilterResult(out, result, kept, summary)


