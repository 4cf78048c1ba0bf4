"""Reference de-identifiers change the face region as stated, keep the eyes when asked, and write
method folders without touching their inputs."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from eval import reference_methods as rm
from eval.inputs import load_rgb, match_method_folder, read_originals
from eval.landmarks import FaceBox, Landmarker, detect_face

REPO = Path(__file__).resolve().parents[2]
CELEBA = REPO.parent / "shared" / "data" / "faces_labelled" / "celeba_0"


@pytest.fixture(scope="module")
def photo():
    image = load_rgb(sorted(CELEBA.glob("*.jpg"))[0])
    return image, rm.find_regions(image, Landmarker())


def _outside(mask_box: FaceBox, shape) -> np.ndarray:
    outside = np.ones(shape[:2], bool)
    outside[mask_box.top:mask_box.bottom, mask_box.left:mask_box.right] = False
    return outside


@pytest.mark.parametrize("method", ["blur", "pixelate", "mask", "blur_keep_eyes"])
def test_each_method_changes_the_face_region_only_and_strength_zero_changes_nothing(photo, method):
    image, regions = photo
    assert regions.found_face
    out = rm.deidentify(image, method, 0.1 if method != "mask" else 1.0, regions)
    outside = _outside(regions.face, image.shape)
    assert np.array_equal(out[outside], image[outside])
    face = image[regions.face.top:regions.face.bottom, regions.face.left:regions.face.right]
    changed = out[regions.face.top:regions.face.bottom, regions.face.left:regions.face.right] != face
    assert changed.any(axis=-1).mean() > 0.3
    assert np.array_equal(rm.deidentify(image, method, 0.0, regions), image)


def test_blur_hides_more_detail_with_more_strength(photo):
    image, regions = photo
    box = regions.face

    def detail(im):   # mean absolute horizontal gradient inside the face box
        face = im[box.top:box.bottom, box.left:box.right].astype(float)
        return np.abs(np.diff(face, axis=1)).mean()

    details = [detail(rm.deidentify(image, "blur", s, regions)) for s in (0.0, 0.02, 0.05, 0.12)]
    assert details == sorted(details, reverse=True) and details[-1] < 0.5 * details[0]


def test_pixelate_makes_constant_cells(photo):
    image, regions = photo
    box = regions.face
    cell = round(0.1 * box.width)
    out = rm.deidentify(image, "pixelate", 0.1, regions)
    block = out[box.top:box.top + cell, box.left:box.left + cell].reshape(-1, 3)
    assert (block == block[0]).all()
    expected = image[box.top:box.top + cell, box.left:box.left + cell].reshape(-1, 3).mean(axis=0)
    assert np.abs(block[0].astype(float) - expected).max() <= 1.0


def test_mask_opacity_scales_the_face_box(photo):
    image, regions = photo
    box = regions.face
    solid = rm.deidentify(image, "mask", 1.0, regions)
    assert (solid[box.top:box.bottom, box.left:box.right] == 0).all()
    half = rm.deidentify(image, "mask", 0.5, regions)
    region = image[box.top:box.bottom, box.left:box.right].astype(float)
    assert np.abs(half[box.top:box.bottom, box.left:box.right] - np.round(region * 0.5)).max() <= 1


def test_blur_keep_eyes_keeps_the_eye_region_exactly(photo):
    image, regions = photo
    eyes = regions.eyes
    assert eyes is not None
    # The eye box holds both eyes' landmarks and lies inside the face region.
    points = Landmarker().landmarks(image, detect_face(image))[36:48]
    assert (points[:, 0] >= eyes.left).all() and (points[:, 0] < eyes.right).all()
    assert (points[:, 1] >= eyes.top).all() and (points[:, 1] < eyes.bottom).all()
    out = rm.deidentify(image, "blur_keep_eyes", 0.08, regions)
    plain = rm.deidentify(image, "blur", 0.08, regions)
    kept = ~_outside(eyes, image.shape)
    assert np.array_equal(out[kept], image[kept])
    assert np.array_equal(out[~kept], plain[~kept])
    assert not np.array_equal(plain[kept], image[kept])


def test_without_a_face_the_whole_image_is_treated():
    noise = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    regions = rm.find_regions(noise, Landmarker())
    assert not regions.found_face and regions.eyes is None
    assert (rm.deidentify(noise, "mask", 1.0, regions) == 0).all()


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_writes_a_method_folder_and_leaves_the_inputs_alone(tmp_path):
    data = tmp_path / "data"
    for path in sorted(CELEBA.glob("*.jpg"))[:3]:
        (data / "celeba_0").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, data / "celeba_0" / path.name)
    before = _digest(data)
    rm.main(["--data", str(data), "--method", "pixelate", "--strength", "0.1", "--out", str(tmp_path / "pix")])
    assert _digest(data) == before
    pairs = match_method_folder(read_originals(data), tmp_path / "pix")
    assert [p.output.suffix for p in pairs] == [".png"] * 3
    info = json.loads((tmp_path / "pix" / rm.METHOD_FILE).read_text())
    assert info["method"] == "pixelate" and info["strength"] == 0.1 and info["no_face"] == []
    assert not list((tmp_path / "pix").rglob(".*.tmp"))   # atomic writes leave no temp files


def test_cli_refuses_an_output_folder_inside_the_originals(tmp_path):
    (tmp_path / "data").mkdir()
    shutil.copy(sorted(CELEBA.glob("*.jpg"))[0], tmp_path / "data" / "a.jpg")
    with pytest.raises(ValueError, match="contain one another"):
        rm.main(["--data", str(tmp_path / "data"), "--method", "blur", "--strength", "0.1",
                 "--out", str(tmp_path / "data" / "blur")])
    with pytest.raises(ValueError, match="contain one another"):
        rm.main(["--data", str(tmp_path / "data"), "--method", "blur", "--strength", "0.1", "--out", str(tmp_path)])


def test_unknown_method_and_negative_strength_are_errors(photo):
    image, regions = photo
    with pytest.raises(ValueError, match="unknown reference method"):
        rm.deidentify(image, "swirl", 0.1, regions)
    with pytest.raises(ValueError, match="strength"):
        rm.deidentify(image, "blur", -1.0, regions)
