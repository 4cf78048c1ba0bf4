"""The eval bridge embeds at given faces: MeMa-Synth's recorded boxes and five points replace
detection, each model aligning by its own protocol (dlib: its own predictor inside the box)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.identity import face_found, load_identity_model
from eval.identity.faces import (
    ARCFACE_TEMPLATE_112,
    DLIB5,
    EYES_NOSE_MOUTH5,
    DlibFaceFinder,
    Face,
    align_to_template,
    recorded_faces,
)
from eval.identity.iresnet import iresnet
from eval.identity.metrics import verification_accuracy
from eval.inputs import load_rgb, read_originals
from mema_jax.data import layout, synth


@pytest.fixture(scope="module")
def dlib_model():
    return load_identity_model("dlib")


def synth_folder(tmp_path_factory, resolution, n):
    root = tmp_path_factory.mktemp(f"synth_{resolution}")
    synth.generate(root, synth.SynthSpec(num_images=n, images_per_identity=4, resolution=resolution, seed=0))
    originals = read_originals(root)
    return originals, [load_rgb(o.path) for o in originals], recorded_faces(originals)


def same_and_different_pairs(identities, seed=0):
    """Every same-identity pair and as many different-identity pairs, drawn with ``seed``."""
    same, different = [], []
    for i in range(len(identities)):
        for j in range(i + 1, len(identities)):
            (same if identities[i] == identities[j] else different).append((i, j))
    chosen = np.random.default_rng(seed).choice(len(different), len(same), replace=False)
    pairs = np.array(same + [different[k] for k in chosen])
    return pairs, np.arange(len(pairs)) < len(same)


@pytest.mark.parametrize("resolution,n", [(64, 96), (128, 96)])
def test_dlib_embeds_every_synth_image_at_its_recorded_face_and_separates_identities(
        dlib_model, tmp_path_factory, resolution, n):
    originals, images, faces = synth_folder(tmp_path_factory, resolution, n)
    features = dlib_model.embed(images, faces)
    assert face_found(features).all()  # detection would find 38% (64 px) to 51% (128 px) of them
    pairs, same = same_and_different_pairs([o.identity for o in originals])
    distances = np.linalg.norm(features[pairs[:, 0]] - features[pairs[:, 1]], axis=1)
    # Measured on 400 images (100 identities; 576 same / 576 different pairs): mean distance same
    # 0.219 vs different 0.372, 10-fold verification accuracy 93.3% at 64 px; 0.164 vs 0.356,
    # 96.4% at 128 px.  Here on 96 images; chance is 50%.
    assert distances[same].mean() + 0.1 < distances[~same].mean()
    assert verification_accuracy(distances, same, shuffle=True, seed=0).accuracy >= 0.85


def test_dlib_at_a_given_face_runs_its_own_predictor_in_the_given_box(dlib_model, tmp_path_factory):
    originals, images, faces = synth_folder(tmp_path_factory, 64, 8)
    own = DlibFaceFinder(DLIB5, "hog").landmarks_in_box(images[0], faces[0].box)
    converted = dlib_model.face_at(images[0], faces[0])
    assert converted.scheme == DLIB5 and converted.box == faces[0].box
    np.testing.assert_array_equal(converted.landmarks, own)
    np.testing.assert_array_equal(dlib_model.embed(images[:1], faces[:1]),
                                  dlib_model.embed(images[:1], [converted]))


def test_recorded_synth_boxes_are_shaped_like_dlib_detections(tmp_path_factory):
    # dlib's 5-point predictor was trained on its detector's boxes, so the recorded box imitates
    # them. Measured on 200 images at 256 px (113 detected): IoU mean 0.84, minimum 0.59.
    originals, images, faces = synth_folder(tmp_path_factory, 256, 32)
    finder = DlibFaceFinder(DLIB5, "hog")
    ious = []
    for image, face in zip(images, faces):
        found = finder(image)
        if found is None:
            continue
        (a0, b0, a1, b1), (c0, d0, c1, d1) = found.box, face.box
        inter = max(min(a1, c1) - max(a0, c0), 0) * max(min(b1, d1) - max(b0, d0), 0)
        ious.append(inter / ((a1 - a0) * (b1 - b0) + (c1 - c0) * (d1 - d0) - inter))
    assert len(ious) >= 10 and np.mean(ious) >= 0.75 and min(ious) >= 0.5


def test_arcface_at_a_given_face_aligns_the_given_points(tmp_path, tmp_path_factory):
    originals, images, faces = synth_folder(tmp_path_factory, 64, 8)
    torch.save(iresnet("r18", base_channels=16).state_dict(), tmp_path / "backbone.pth")
    model = load_identity_model("arcface_r18", weights=tmp_path / "backbone.pth", detector="dlib")
    crops = [align_to_template(im, f, ARCFACE_TEMPLATE_112, (112, 112)) for im, f in zip(images, faces)]
    np.testing.assert_array_equal(model.embed(images, faces), model.embed_aligned(crops))
    with pytest.raises(ValueError, match="face 0: arcface_r18 needs 'eyes_nose_mouth5' landmarks, got 'dlib5'"):
        model.embed(images[:1], [Face(faces[0].box, np.zeros((5, 2)), DLIB5)])


def test_a_folder_without_faces_csv_records_no_faces(tmp_path_factory):
    originals, _, faces = synth_folder(tmp_path_factory, 64, 8)
    assert len(faces) == len(originals) and all(f.scheme == EYES_NOSE_MOUTH5 for f in faces)
    (originals.root / layout.FACES_FILE).unlink()
    assert recorded_faces(read_originals(originals.root)) is None
    plain = tmp_path_factory.mktemp("plain")
    (plain / "a.png").write_bytes((originals.root / originals.items[0].path.relative_to(originals.root)).read_bytes())
    assert recorded_faces(read_originals(plain)) is None
