"""The report on small synthetic faces: ``identity.faces = "recorded"`` embeds every original at its
faces.csv face (dlib's detector finds none of MeMa-Synth's 32 px faces, so with "detect" every pair
is left out), and ``identity.pairs = "originals"`` checks each identity model on same/different pairs
of the originals' own people; a folder that cannot give either is one error before any work."""
from __future__ import annotations

import csv
import shutil

import pytest

from configs.eval_base import base_config, identity_model, reference
from eval import report

IMAGES = 24  # 6 people x 4 images of the val split: 36 same-person pairs


def _config(root, faces: str, pairs: str):
    c = base_config()
    c.originals.root = str(root)
    c.originals.split = "val"
    c.max_images = IMAGES
    c.landmarks.enabled = False
    c.reference_methods["blur"] = reference("blur", 0.05)
    c.identity.models["dlib"] = identity_model()
    c.identity.faces = faces
    c.identity.pairs = pairs
    return c


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_recorded_faces_embed_every_small_face_and_the_originals_pairs_verify_the_model(synth_dataset_32, tmp_path):
    report.run(_config(synth_dataset_32.root, "recorded", "originals"), tmp_path / "recorded")
    report.run(_config(synth_dataset_32.root, "detect", ""), tmp_path / "detected")
    recorded = (tmp_path / "recorded" / "tables.md").read_text()
    detected = (tmp_path / "detected" / "tables.md").read_text()
    assert "pairs without a face left out" not in recorded.split("## Tab. 5")[1].split("## Tab. 6")[0]
    assert f"blur, dlib: {IMAGES} of {IMAGES} pairs without a face left out of the mean" in detected
    assert float(_rows(tmp_path / "recorded" / "tab5_id_dis.csv")[0]["dlib"]) > 0
    [row] = _rows(tmp_path / "recorded" / "verification.csv")
    people = {r.identity for r in synth_dataset_32.split("val")[:IMAGES]}
    counts = [sum(1 for r in synth_dataset_32.split("val")[:IMAGES] if r.identity == p) for p in people]
    same_pairs = sum(k * (k - 1) // 2 for k in counts)
    assert row["Model"] == "dlib" and int(row["Pairs"]) == 2 * same_pairs and int(row["Skipped"]) == 0
    assert 0.0 <= float(row["Accuracy"].rstrip("%")) <= 100.0
    assert float(row["Mean dist same"]) < float(row["Mean dist different"])  # dlib tells MeMa-Synth people apart
    assert f"{same_pairs} same-person and {same_pairs} different-person pairs of the originals' own people" in recorded


def test_recorded_faces_without_faces_csv_and_pairs_without_people_stop_before_any_work(synth_dataset_32, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(synth_dataset_32.root / "images", plain)
    c = _config(plain, "recorded", "")
    c.originals.split = ""
    with pytest.raises(report.ReportConfigError, match=f"identity.faces = 'recorded': the originals {plain} record no faces"):
        report.run(c, tmp_path / "out1")
    c = _config(plain, "detect", "originals")
    c.originals.split = ""
    with pytest.raises(report.ReportConfigError, match="identity.pairs = 'originals'.*too few identities"):
        report.run(c, tmp_path / "out2")
    with pytest.raises(report.ReportConfigError, match="identity.faces = 'landmarks': expected one of detect, recorded"):
        report.run(_config(synth_dataset_32.root, "landmarks", ""), tmp_path / "out3")
    assert not any((tmp_path / f"out{i}").exists() for i in (1, 2, 3))
