"""The generated-image scores (eval.report.generation_quality) on cases whose answer is known.

A ResNet-18 learns eight flat colours (one per disease, pixel noise on top; separable in a few
epochs).  "Generated" folders: copies of the real validation images with their labels (a perfect
generator: the yardstick's accuracy, Fréchet distance 0), the same images with every prompt moved to
the next disease (a generator that ignores its prompt: 0%), and uniform noise (far from everything).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from eval.medical.classification import load_classifier, train_classifier
from eval.report import generation_quality as gq
from flat_colours import flat_colour_rows, write_mema
from mema_jax.data.layout import DISEASES, read_dataset

SPLIT_SIZES = {"train": 6, "val": 4}  # images per class
TRAIN_ARGS = {"epochs": 8, "batch_size": 16, "lr": 2e-3, "image_size": 32, "warmup_epochs": 0.5, "seed": 0,
              "device": "cpu"}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("generation_quality")
    rng = np.random.default_rng(0)
    real = flat_colour_rows(rng, SPLIT_SIZES)
    real_root = write_mema(base / "real", real)
    train_classifier(real_root, "resnet18", base / "classifier", **TRAIN_ARGS)
    val = [row for row in real if row[3] == "val"]
    copies = write_mema(base / "copies", [(i, im, d, "train") for i, im, d, _ in val])
    shifted = write_mema(base / "ignores_prompt",
                     [(i, im, DISEASES[(DISEASES.index(d) + 1) % len(DISEASES)], "train") for i, im, d, _ in val])
    noise = write_mema(base / "noise", [(i, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), d, "train")
                                    for i, _, d, _ in val])
    classifier = load_classifier(base / "classifier")
    rows = [("copies", str(copies)), ("ignores prompt", str(shifted)), ("noise", str(noise))]
    disease, realism = gq.build(classifier, real_root, rows)
    return {"disease": {r[0]: r for r in disease.rows}, "realism": {r[0]: r for r in realism.rows},
            "base": base, "real": real_root, "classifier": classifier}


def _mean(row):
    return row[-1]


def test_copies_of_real_images_score_as_the_yardstick_and_at_distance_zero(case):
    yardstick = case["disease"]["Real val (yardstick)"]
    copies = case["disease"]["copies"]
    assert _mean(yardstick) >= 0.9  # the classifier learnt the colours; the rest of the test reads it
    assert copies[2:] == yardstick[2:]  # same images, same prompts: the same per-disease accuracies
    # Same features on both sides; sqrtm of a rank-deficient product leaves ~1e-6 of the trace (~1e2 here).
    assert abs(case["realism"]["copies"][-1]) < 1e-3 * case["realism"]["noise"][-1]


def test_a_generator_that_ignores_its_prompt_reads_near_zero(case):
    assert _mean(case["disease"]["ignores prompt"]) <= 0.1


def test_noise_is_farther_from_the_real_images_than_the_real_training_floor(case):
    realism = case["realism"]
    floor = next(v for k, v in realism.items() if k.endswith("(floor)"))
    assert floor[1] == 32  # the floor is subsampled to the largest generated set's size
    assert realism["noise"][-1] > 3 * floor[-1] > 0


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) * 2.0 + np.array([1.0, 0.0, 0.0])
    # mean term 1; covariance term per dimension 1 + 4 - 2 * 2 = 1 -> 1 + 3 = 4; sampling error ~ 0.2
    assert gq.frechet_distance(a, b) == pytest.approx(4.0, abs=0.25)
    assert gq.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_a_disease_without_images_is_not_available_rather_than_zero():
    acc = gq.per_disease_accuracy(np.array([0, 0, 1]), ["Normal", "Normal", "BCC"], DISEASES)
    assert acc["Normal"] == 1.0 and acc["BCC"] == 1.0
    assert np.isnan(acc["TAO"])


def test_the_command_writes_the_tables_and_a_bad_row_is_one_line(case, tmp_path, capsys):
    base = case["base"]
    out = tmp_path / "out"
    rc = gq.main(["--classifier", str(base / "classifier"), "--real", str(case["real"]), "--detector", "none",
                  "--row", f"copies={base / 'copies'}", "--out", str(out)])
    assert rc == 0
    assert (out / gq.FILE).is_file() and (out / f"{gq.DISEASE_KEY}.csv").is_file()
    assert "| copies | 32 |" in (out / gq.FILE).read_text()
    unknown = tmp_path / "unknown"
    shutil.copytree(base / "copies", unknown)
    labels = unknown / "labels.csv"
    labels.write_text(labels.read_text().replace(",BCC,", ",Glaucoma,", 1))
    rc = gq.main(["--classifier", str(base / "classifier"), "--real", str(case["real"]), "--detector", "none",
                  "--row", f"x={unknown}", "--out", str(tmp_path / "out2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "labels.csv" in err[0] and "Glaucoma" in err[0]
    assert read_dataset(base / "copies", verify_images=False).records  # the inputs are untouched


def test_face_rate_finds_real_faces_shrunk_to_64_px_and_none_in_noise():
    """dlib's HOG detector on CelebA photos shrunk to 64 px (faces ~30 px, below its ~40 px minimum) and
    enlarged 2x, as the command does for MeMa-Synth's 64 px images; uniform noise has no face."""
    from PIL import Image

    from conftest import SHARED_DATA
    from eval.identity.faces import make_face_finder

    photos = sorted((SHARED_DATA / "faces_labelled" / "celeba_0").iterdir())[:4]
    small = [np.asarray(Image.open(p).convert("RGB").resize((64, 78), Image.BICUBIC)) for p in photos]
    finder = make_face_finder("dlib")
    assert gq.face_rate(finder, small, upscale=2) >= 0.75
    noise = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(4)]
    assert gq.face_rate(finder, noise, upscale=2) == 0.0
