"""The table command on small fixtures of real photos: every table, per-image CSVs and grids, the
command line with config overrides, and the strength check on dlib ID-Dis and landmark error."""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from transformers import Dinov2Config, Dinov2Model

from configs.eval_base import base_config, identity_model, leakage_row, method, reference
from eval import report
from eval.grid import LABEL_HEIGHT
from eval.agreement import cohen_kappa, label_distribution_distances
from eval.inputs import InputMismatchError, load_rgb
from eval.reconstruction import psnr
from mema_jax.data import layout

REPO = Path(__file__).resolve().parents[2]
FACES = REPO.parent / "shared" / "data" / "faces_labelled"
PEOPLE = ("celeba_0", "celeba_1")
DISEASES = ("BCC", "Ptosis", "TAO")


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    """A MeMa root of 8 real photos of 2 people (2 train, 6 val) and a toy reversible method."""
    tmp = tmp_path_factory.mktemp("report")
    root = tmp / "mema"
    records = []
    for p, person in enumerate(PEOPLE):
        for k, path in enumerate(sorted((FACES / person).glob("*.jpg"))[:4]):
            image_id = f"{person}_{k}"
            layout.write_png(root / "images" / f"{image_id}.png", load_rgb(path))
            split = "train" if k == 0 else "val"
            records.append(layout.Record(image_id, f"images/{image_id}.png", DISEASES[(p + k) % 3], "", 30 + 10 * k,
                                         ("female", "male")[p], split, person, ""))
    layout.write_labels(root, records)
    val = [r for r in records if r.split == "val"]

    # A toy reversible method: inverted colours as de-identification, the original plus noise as recovery.
    rng = np.random.default_rng(0)
    toy = tmp / "toy"
    seg_truth = tmp / "labelsTs"
    for rec in val:
        image = load_rgb(root / rec.image)
        layout.write_png(toy / "deid" / f"{rec.image_id}.png", 255 - image)
        noisy = np.clip(image.astype(int) + rng.integers(-3, 4, image.shape), 0, 255).astype(np.uint8)
        layout.write_png(toy / "recovered" / f"{rec.image_id}.png", noisy)
        mask = np.zeros(image.shape[:2], np.uint8)
        mask[50:90, 40:120] = 1
        layout.write_png(seg_truth / f"{rec.image_id}.png", mask)
        layout.write_png(toy / "segmentation" / f"{rec.image_id}.png", mask)
    (toy / "diagnoses.csv").write_text("image,diagnosis\n" + "".join(
        f"{r.image_id}.png,{DISEASES[i % 2]}\n" for i, r in enumerate(val)))
    (tmp / "diagnoses_original.csv").write_text("image,diagnosis\n" + "".join(
        f"{r.image_id}.png,{r.disease}\n" for r in val))

    # A second label set for Tab. 2: the first person only.
    other = tmp / "other"
    (other / "images").mkdir(parents=True)
    for rec in records[:4]:
        shutil.copy(root / rec.image, other / rec.image)
    layout.write_labels(other, records[:4])

    # Weight files in their official formats, random values.
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), tmp / "alexnet-owt-7be5be79.pth")
    backbone = tmp / "dinov2"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(backbone)
    from eval.medical.classification import train_classifier
    train_classifier(root, backbone, tmp / "classifier", epochs=1, batch_size=4, image_size=28, device="cpu")

    c = base_config()
    c.originals.root = str(root)
    c.originals.split = "val"
    c.batch_size = 4
    c.methods["toy"] = method(str(toy), reversible=True)
    c.reference_methods["blur"] = reference("blur", 0.1)
    c.identity.models["dlib"] = identity_model()
    c.identity.models["facenet_vggface2"] = identity_model()   # no weights: left out with a note
    c.reconstruction.lpips_backbone = str(tmp / "alexnet-owt-7be5be79.pth")
    c.medical.classifier = str(tmp / "classifier")
    c.medical.segmentation_truth = str(seg_truth)
    c.agreement.diagnoses_original = str(tmp / "diagnoses_original.csv")
    c.label_distances["mema_vs_first_person"] = {"a": str(root), "b": str(other), "age_scale": 100.0}
    c.grid.num_examples = 2
    c.grid.cell_height = 64

    # Tab. 1: copies of gallery photos (one not among the originals) must leak; other people and
    # blank images must not. dlib's same-person threshold is ~0.6: 0.4 is strict but leaves copies at 0.
    c.identity.models["dlib"].match_threshold = 0.4
    copies, strangers = tmp / "copies", tmp / "strangers"
    copies.mkdir()
    for image_id in ("celeba_0_0", "celeba_0_1", "celeba_1_2"):   # celeba_0_0 is train: not an original
        shutil.copy(root / "images" / f"{image_id}.png", copies / f"{image_id}.png")
    strangers.mkdir()
    for person in ("obama", "biden", "rose_leslie"):
        shutil.copy(sorted((FACES / person).glob("*.jpg"))[0], strangers / f"{person}.jpg")
    for k in range(2):
        layout.write_png(strangers / f"blank_{k}.png", np.full((120, 100, 3), 128, np.uint8))
    c.leakage.gallery = str(root)
    c.leakage.rows["copies"] = leakage_row(generated=str(copies))
    c.leakage.rows["strangers"] = leakage_row(generated=str(strangers))
    c.leakage.rows["blur_method"] = leakage_row(method="blur")
    out = tmp / "out"
    return {"tmp": tmp, "root": root, "other": other, "toy": toy, "val": val, "records": records,
            "tables": report.run(c, out), "out": out}


# Every table of tables.md, in order: its CSV's name and its section title.
TITLES = {
    "tab1_leakage": "Tab. 1: identity leakage of generated images (% whose nearest real patient is within the "
                    "threshold; lower = better)",
    "tab2_wasserstein": "Tab. 2: Wasserstein distance between label distributions (lower = closer)",
    "tab3_medical": "Tab. 3: medical utility (disease accuracy on de-identified images, segmentation)",
    "tab4_kappa": "Tab. 4: Cohen's kappa of diagnoses, original vs de-identified",
    "tab5_id_dis": "Tab. 5: ID-Dis (original vs de-identified; higher = better de-identified)",
    "tab6_matching": "Tab. 6: face-matching rate of de-identified images (lower = better)",
    "tab7_landmark_gaze": "Tab. 7: landmark error (pixels) and gaze error (degrees)",
    "tab8_reversibility": "Tab. 8: recovered images of reversible methods (ID-Dis and LPIPS: lower = better)",
    "verification": "Identity models on labelled pairs (LFW protocol, 10-fold threshold)",
}


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def _section(markdown: str, key: str) -> str:
    """One table's section of tables.md after its title line: its rows and notes."""
    return markdown.split(f"\n## {TITLES[key]}\n")[1].split("\n## ")[0]


def test_writes_markdown_csv_grid_and_per_image_files(fixture):
    out = fixture["out"]
    markdown = (out / "tables.md").read_text()
    assert markdown.startswith(f"# De-identification report\n\nOriginals: {fixture['root']} (6 images, split val). "
                               "Methods: blur, toy. Time: ")
    assert [line[3:] for line in markdown.splitlines() if line.startswith("## ")] == list(TITLES.values())
    val = fixture["val"]
    kappa_classes = sorted(set(cohen_kappa([r.disease for r in val], [DISEASES[i % 2] for i in range(len(val))]))
                           - {"All"})
    assert {key: _csv_header(out / f"{key}.csv") for key in TITLES} == {
        "tab1_leakage": ["Row", "dlib", "Average"],
        "tab2_wasserstein": ["Rows", "Disease", "Age", "Gender"],
        "tab3_medical": ["Method", "Rev", "All", "Top1", *layout.DISEASES, "Dice", "Jaccard"],
        "tab4_kappa": ["Method", "All", *kappa_classes],
        "tab5_id_dis": ["Method", "Rev", "dlib"],
        "tab6_matching": ["Method", "dlib"],
        "tab7_landmark_gaze": ["Method", "Rev", "Landmark all", "Landmark eye", "Landmark mouth", "Landmark nose",
                               "Gaze pitch", "Gaze yaw"],
        "tab8_reversibility": ["Method", "ID-Dis dlib", "Same person dlib", "PSNR (dB)", "LPIPS", "Med-Class"],
        "verification": ["Model", "Accuracy", "Std", "Pairs", "Skipped", "Mean dist same", "Mean dist different"],
    }
    assert list(fixture["tables"]) == list(TITLES)
    assert [r["Method"] for r in _read_csv(out / "tab5_id_dis.csv")] == ["blur", "toy"]
    assert [r["Method"] for r in _read_csv(out / "tab7_landmark_gaze.csv")] == ["blur", "toy"]
    assert len(_read_csv(out / "per_image" / "toy.csv")) == len(fixture["val"])
    toy_grid, blur_grid = Image.open(out / "grids" / "toy.png"), Image.open(out / "grids" / "blur.png")
    assert toy_grid.height == blur_grid.height == LABEL_HEIGHT + 2 * 64
    assert toy_grid.width > 1.4 * blur_grid.width   # three columns (with recovered) against two
    assert (out / "reference" / "blur" / "deid").is_dir()


def test_unconfigured_weights_are_left_out_with_a_note(fixture):
    markdown = (fixture["out"] / "tables.md").read_text()
    note = ("- Note: facenet_vggface2 left out: no weights configured "
            "(config.identity.models.facenet_vggface2.weights).")
    # In every table of identity metrics, and only there.
    with_note = {key for key in TITLES if note in _section(markdown, key).splitlines()}
    assert with_note == {"tab1_leakage", "tab5_id_dis", "tab6_matching", "tab8_reversibility", "verification"}
    assert "facenet_vggface2" not in _read_csv(fixture["out"] / "tab5_id_dis.csv")[0]
    assert (f"- Note: blur: no diagnoses.csv in {fixture['out'] / 'reference' / 'blur'}; left out."
            in _section(markdown, "tab4_kappa").splitlines())


def test_leakage_table_counts_copies_of_patients_and_not_strangers_or_blank_images(fixture):
    rows = {r["Row"]: r for r in _read_csv(fixture["out"] / "tab1_leakage.csv")}
    assert list(_read_csv(fixture["out"] / "tab1_leakage.csv")[0]) == ["Row", "dlib", "Average"]
    assert set(rows) == {"copies", "strangers", "blur_method"}
    assert float(rows["copies"]["dlib"]) == 100.0 and float(rows["copies"]["Average"]) == 100.0
    assert float(rows["strangers"]["dlib"]) == 0.0
    assert 0.0 <= float(rows["blur_method"]["dlib"]) <= 100.0
    section = _section((fixture["out"] / "tables.md").read_text(), "tab1_leakage")
    assert "| copies | 100.00% | 100.00% |" in section
    assert "strangers, dlib: 2 of 5 generated images without a face" in section
    assert "facenet_vggface2 left out: no weights configured" in section
    assert "dlib 0.4000" in section


def _leakage_run(tmp_path, pairs: Path | None) -> tuple[list[dict], str]:
    """A small run whose dlib has no match_threshold: Tab. 1 needs the pairs file or leaves dlib out."""
    photos = tmp_path / "photos"
    for person in ("celeba_0", "celeba_1"):
        (photos / person).mkdir(parents=True)
        for path in sorted((FACES / person).glob("*.jpg"))[:3]:
            shutil.copy(path, photos / person / path.name)
    c = base_config()
    c.originals.root = str(photos)
    c.max_images = 2
    c.landmarks.enabled = False
    c.reference_methods["black"] = reference("mask", 1.0)
    c.identity.models["dlib"] = identity_model()
    c.identity.pairs = str(pairs) if pairs else ""
    c.leakage.gallery = str(photos)
    c.leakage.rows["copies"] = leakage_row(generated=str(photos / "celeba_1"))
    c.grid.num_examples = 0
    report.run(c, tmp_path / "out")
    return _read_csv(tmp_path / "out" / "tab1_leakage.csv"), (tmp_path / "out" / "tables.md").read_text()


def test_leakage_without_a_threshold_leaves_the_model_out_with_a_note(tmp_path):
    rows, markdown = _leakage_run(tmp_path, None)
    assert rows == []
    section = _section(markdown, "tab1_leakage")
    assert "dlib left out: no decision threshold" in section and "config.identity.pairs is empty" in section
    assert "| dlib |" not in section


def test_leakage_threshold_comes_from_the_pairs_file_when_unset(tmp_path):
    from eval.identity import load_identity_model
    from eval.identity.metrics import best_threshold, id_distance
    pairs_dir = tmp_path / "pairs"
    pairs_dir.mkdir()
    files = []
    for person in ("celeba_2", "celeba_3"):
        for path in sorted((FACES / person).glob("*.jpg"))[:4]:
            shutil.copy(path, pairs_dir / f"{person}_{path.name}")
            files.append(pairs_dir / f"{person}_{path.name}")
    pairs = [(a, b) for i, a in enumerate(files) for b in files[i + 1:]][:14]
    same = np.array([a.name.split("_")[1] == b.name.split("_")[1] for a, b in pairs])
    (pairs_dir / "pairs.csv").write_text("file_x,file_y,Decision\n" + "".join(
        f"{a.name},{b.name},{'Yes' if s else 'No'}\n" for (a, b), s in zip(pairs, same)))
    dlib = load_identity_model("dlib")
    features = {f: row for f, row in zip(files, dlib.embed([load_rgb(f) for f in files]))}
    distances = id_distance(np.stack([features[a] for a, _ in pairs]), np.stack([features[b] for _, b in pairs]))
    expected = best_threshold(distances.per_pair, same)

    rows, markdown = _leakage_run(tmp_path, pairs_dir / "pairs.csv")
    assert [r["Row"] for r in rows] == ["copies"] and float(rows[0]["dlib"]) == 100.0
    section = _section(markdown, "tab1_leakage")
    assert f"dlib: no match_threshold configured; using {expected:.4f}" in section
    assert f"dlib {expected:.4f}" in section


def test_identity_and_landmark_columns_are_filled(fixture):
    rows = {r["Method"]: r for r in _read_csv(fixture["out"] / "tab5_id_dis.csv")}
    assert 0.0 < float(rows["blur"]["dlib"]) <= 2.0 and 0.0 < float(rows["toy"]["dlib"]) <= 2.0
    rows = {r["Method"]: r for r in _read_csv(fixture["out"] / "tab7_landmark_gaze.csv")}
    for name in ("blur", "toy"):
        assert float(rows[name]["Landmark all"]) > 0.0
        assert rows[name]["Gaze pitch"] == ""   # no L2CS weights in this fixture
    rates = _read_csv(fixture["out"] / "tab6_matching.csv")
    assert all(0.0 <= float(r["dlib"]) <= 1.0 for r in rates)


def test_reversibility_row_matches_the_recovered_images(fixture):
    rows = _read_csv(fixture["out"] / "tab8_reversibility.csv")
    assert [r["Method"] for r in rows] == ["toy"]
    expected = np.mean([psnr(load_rgb(fixture["root"] / r.image), load_rgb(fixture["toy"] / "recovered" /
                                                                             f"{r.image_id}.png"))
                        for r in fixture["val"]])
    assert float(rows[0]["PSNR (dB)"]) == pytest.approx(expected, rel=1e-6)
    assert 0.0 < float(rows[0]["LPIPS"]) < 1.0
    deid = {r["Method"]: float(r["dlib"]) for r in _read_csv(fixture["out"] / "tab5_id_dis.csv")}
    assert float(rows[0]["ID-Dis dlib"]) < deid["toy"]   # recovery restores identity
    # The original plus +-3 noise is its person at dlib's threshold 0.4 (copies' distances are ~0.01).
    assert float(rows[0]["Same person dlib"]) == 1.0
    assert 0.0 <= float(rows[0]["Med-Class"]) <= 1.0


def test_medical_kappa_and_label_distance_tables_use_the_given_labels(fixture):
    medical = {r["Method"]: r for r in _read_csv(fixture["out"] / "tab3_medical.csv")}
    assert set(medical) == {"original (not de-identified)", "blur", "toy"}  # the yardstick's own row first
    assert next(iter(medical)) == "original (not de-identified)"
    original = medical["original (not de-identified)"]
    assert original["Rev"] == "-" and original["Dice"] == "" and 0.0 <= float(original["All"]) <= 1.0
    assert float(medical["toy"]["Dice"]) == 1.0 and float(medical["toy"]["Jaccard"]) == 1.0
    assert medical["blur"]["Dice"] == ""
    assert 0.0 <= float(medical["blur"]["All"]) <= 1.0

    val = fixture["val"]
    expected = cohen_kappa([r.disease for r in val], [DISEASES[i % 2] for i in range(len(val))])
    rows = _read_csv(fixture["out"] / "tab4_kappa.csv")
    assert [r["Method"] for r in rows] == ["toy"]
    assert float(rows[0]["All"]) == pytest.approx(expected["All"])
    assert float(rows[0]["BCC"]) == pytest.approx(expected["BCC"])

    distances = label_distribution_distances(fixture["records"], fixture["records"][:4], age_scale=100.0)
    row = _read_csv(fixture["out"] / "tab2_wasserstein.csv")[0]
    assert row["Rows"] == "mema_vs_first_person"
    assert float(row["Disease"]) == pytest.approx(distances["Disease"])
    assert float(row["Age"]) == pytest.approx(distances["Age"])
    assert float(row["Gender"]) == pytest.approx(0.5)


def _l2cs_file(path: Path) -> Path:
    """Random weights under the official L2CSNet_gaze360.pkl keys (see test_gaze.py)."""
    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.resnet50(weights=None).state_dict().items() if not k.startswith("fc.")}
    state.update({"fc_yaw_gaze.weight": torch.randn(90, 2048) * 0.01, "fc_yaw_gaze.bias": torch.zeros(90),
                  "fc_pitch_gaze.weight": torch.randn(90, 2048) * 0.01, "fc_pitch_gaze.bias": torch.zeros(90),
                  "fc_finetune.weight": torch.randn(3, 2051), "fc_finetune.bias": torch.zeros(3)})
    torch.save(state, path)
    return path


def test_gaze_columns_come_from_the_configured_l2cs_weights(tmp_path):
    # One photo keeps this affordable: L2CS is a ResNet-50 at 448 px (seconds per image on 2 cores).
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(sorted((FACES / "celeba_3").glob("*.jpg"))[0], photos / "a.jpg")
    c = base_config()
    c.originals.root = str(photos)
    c.landmarks.enabled = False
    c.gaze.weights = str(_l2cs_file(tmp_path / "L2CSNet_gaze360.pkl"))
    c.reference_methods["same"] = reference("blur", 0.0)
    c.reference_methods["black"] = reference("mask", 1.0)
    c.grid.num_examples = 0
    rows = {r[0]: r for r in report.run(c, tmp_path / "out")["tab7_landmark_gaze"].rows}
    pitch, yaw = -2, -1
    assert rows["same"][pitch] == 0.0 and rows["same"][yaw] == 0.0
    assert rows["black"][pitch] + rows["black"][yaw] > 0.0
    assert "landmark error left out" in (tmp_path / "out" / "tables.md").read_text()


def test_a_method_folder_with_missing_files_stops_before_scoring_and_names_them(fixture, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(fixture["toy"], broken)
    victim = fixture["val"][1].image_id
    (broken / "deid" / f"{victim}.png").unlink()
    c = base_config()
    c.originals.root = str(fixture["root"])
    c.originals.split = "val"
    c.methods["broken"] = method(str(broken), reversible=True)
    with pytest.raises(InputMismatchError, match=f"broken deid/{victim}.png: missing"):
        report.run(c, tmp_path / "out")
    assert not (tmp_path / "out" / "tables.md").exists()


@pytest.mark.parametrize("entry, value, expected", [
    ("gaze.weights", "L2CSNet_gaze360.pkl", "L2CSNet_gaze360.pkl.*Ahmednull/L2CS-Net"),
    ("reconstruction.lpips_backbone", "alexnet.pth", "alexnet-owt-7be5be79.pth"),
    ("landmarks.predictor", "shape.dat", "shape_predictor_68_face_landmarks.dat"),
])
def test_a_configured_weight_file_that_is_missing_stops_the_run_before_any_work(tmp_path, entry, value, expected):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(sorted((FACES / "celeba_2").glob("*.jpg"))[0], photos / "a.jpg")
    c = base_config()
    c.originals.root = str(photos)
    c.reference_methods["blur"] = reference("blur", 0.05)
    group, key = entry.split(".")
    c[group][key] = str(tmp_path / "absent" / value)
    with pytest.raises(FileNotFoundError, match=expected):
        report.run(c, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry, error, expected", [
    ("identity.gallery", report.ReportConfigError, "config.identity.gallery .*<identity>/ sub-folders"),
    ("identity.pairs", FileNotFoundError, "1 pair images not found"),
])
def test_a_bad_gallery_or_pairs_file_stops_the_run_before_any_work(tmp_path, entry, error, expected):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(sorted((FACES / "celeba_2").glob("*.jpg"))[0], photos / "a.jpg")   # no <identity>/ folder
    (photos / "pairs.csv").write_text("file_x,file_y,Decision\na.jpg,absent.jpg,No\n")
    c = base_config()
    c.originals.root = str(photos)
    c.reference_methods["blur"] = reference("blur", 0.05)
    c.identity.models["dlib"] = identity_model()
    group, key = entry.split(".")
    c[group][key] = str(photos / "pairs.csv") if key == "pairs" else str(photos)
    with pytest.raises(error, match=expected):
        report.run(c, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_command_line_runs_a_config_file_with_overrides(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted((FACES / "celeba_2").glob("*.jpg"))[:3]:
        shutil.copy(path, photos / path.name)
    config = tmp_path / "eval_tiny.py"
    config.write_text(
        "from configs.eval_base import base_config, reference\n"
        "def get_config(arg=None):\n"
        "    c = base_config()\n"
        f"    c.originals.root = {str(photos)!r}\n"
        "    c.reference_methods['pix'] = reference('pixelate', 0.1)\n"
        "    return c\n")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "eval.report", f"--config={config}", f"--out={out}",
                          "--config.max_images=2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(_read_csv(out / "per_image" / "pix.csv")) == 2
    assert "| pix | no |" in (out / "tables.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "eval.report", f"--config={config}", f"--out={out}",
                          "--config.no_such_key=1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no_such_key" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "eval.report", f"--config={config}", f"--out={out}",
                              "--config.gaze.weights=absent.pkl"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 1 and "L2CSNet_gaze360.pkl" in missing.stderr and "Traceback" not in missing.stderr


def test_dlib_id_dis_and_landmark_error_grow_with_reference_strength(tmp_path):
    """The CEO's check on real photos, small: 5 people x 5 photos, blur and pixelate at 3 strengths."""
    photos = tmp_path / "photos"
    for person in ("celeba_0", "celeba_1", "celeba_2", "celeba_3", "celeba_4"):
        (photos / person).mkdir(parents=True)
        for path in sorted((FACES / person).glob("*.jpg"))[:5]:
            shutil.copy(path, photos / person / path.name)
    c = base_config()
    c.originals.root = str(photos)
    # Below the saturation of dlib's ID-Dis (~0.56, the level of two different people), as in
    # configs/eval_real_photos.py. Measured: ID-Dis blur 0.16 / 0.35 / 0.52, pixelate 0.13 / 0.35 / 0.55;
    # landmark error (px) blur 0.8 / 2.2 / 4.6, pixelate 1.0 / 2.0 / 5.5.
    strengths = {"blur": (0.01, 0.03, 0.08), "pixelate": (0.02, 0.04, 0.08)}
    for name, values in strengths.items():
        for i, s in enumerate(values):
            c.reference_methods[f"{name}{i}"] = reference(name, s)
    c.identity.models["dlib"] = identity_model()
    c.grid.num_examples = 0
    tables = report.run(c, tmp_path / "out")
    id_dis = {row[0]: row[2] for row in tables["tab5_id_dis"].rows}
    landmark = {row[0]: row[2] for row in tables["tab7_landmark_gaze"].rows}
    for name in strengths:
        assert id_dis[f"{name}0"] < id_dis[f"{name}1"] < id_dis[f"{name}2"], id_dis
        assert landmark[f"{name}0"] < landmark[f"{name}1"] < landmark[f"{name}2"], landmark


def test_eval_configs_build_and_check_their_arguments(tmp_path):
    from configs import eval_mema, eval_real_photos
    (tmp_path / "rev" / "recovered").mkdir(parents=True)
    c = eval_mema.get_config(f"ours={tmp_path / 'rev'},other={tmp_path / 'plain'}")
    assert c.methods.ours.reversible and not c.methods.other.reversible
    assert sorted(c.reference_methods) == ["blur", "blur_keep_eyes", "mask", "pixelate"]
    with pytest.raises(ValueError, match="name=method_folder"):
        eval_mema.get_config("ours")
    full, quick = eval_real_photos.get_config(), eval_real_photos.get_config("quick")
    assert len(full.reference_methods) == 10 and len(quick.reference_methods) == 4
    assert all("." not in name for name in full.reference_methods)   # names must work as --config.x.y keys
    with pytest.raises(ValueError, match="variant"):
        eval_real_photos.get_config("huge")


def test_the_report_package_does_not_import_jax():
    code = ("import sys, eval.report, eval.report.__main__; "
            "sys.exit(any(m == 'jax' or m.startswith('jax.') for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
