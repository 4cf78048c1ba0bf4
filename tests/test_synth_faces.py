"""MeMa-Synth records each face as it draws it (faces.csv); the layout reader validates the table."""

import numpy as np
import pytest
from conftest import rewrite_csv

from mema_jax.data import layout, synth


def test_faces_csv_lists_every_image_and_is_deterministic(tmp_path):
    spec = synth.SynthSpec(num_images=24, images_per_identity=3, resolution=64, seed=5)
    a = synth.generate(tmp_path / "a", spec)
    b = synth.generate(tmp_path / "b", spec, workers=2)
    assert (a.root / layout.FACES_FILE).read_bytes() == (b.root / layout.FACES_FILE).read_bytes()
    assert sorted(a.faces) == sorted(r.image_id for r in a.records)
    for rec in a.records:
        face = a.face(rec)
        (x0, y0, x1, y1), points = face.box, face.landmarks_array()
        left_eye, right_eye, nose, mouth_left, mouth_right = points
        assert left_eye[0] < nose[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
        assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
        assert x0 < points[:, 0].min() and points[:, 0].max() < x1 and y0 < points[:, 1].min() and points[:, 1].max() < y1


@pytest.mark.parametrize("resolution", [128, 256])
def test_recorded_eye_centres_sit_on_the_drawn_pupils(resolution):
    # Normal eyes have the iris centred in the opening and a black pupil (radius >= 1.3 px at
    # 128 px) at its centre: the pixel nearest each recorded eye centre is that pupil.
    spec = synth.SynthSpec(num_images=64, images_per_identity=4, resolution=resolution, seed=2)
    normal = [im for im in synth.plan(spec) if im.identity.disease == "Normal"]
    assert len(normal) == 8
    for image in normal:
        rgb, _, face = synth.render_with_face(image, resolution)
        for x, y in face.landmarks[:2]:
            assert rgb[round(y), round(x)].max() < 60, (image.image_id, x, y, rgb[round(y), round(x)])


def test_a_folder_rendered_before_faces_reads_without_faces_and_gets_them_back(tmp_path):
    spec = synth.SynthSpec(num_images=24, images_per_identity=3, resolution=64, seed=5)
    ds = synth.generate(tmp_path / "old", spec)
    written = (ds.root / layout.FACES_FILE).read_bytes()
    (ds.root / layout.FACES_FILE).unlink()  # as a folder rendered by the earlier MeMa-Synth
    old = layout.read_dataset(ds.root)
    assert old.faces is None and old.face(old.records[0]) is None and old.records == ds.records
    with pytest.raises(ValueError, match="rendered with another spec"):
        synth.add_faces(ds.root, synth.SynthSpec(num_images=24, images_per_identity=3, resolution=64, seed=6))
    restored = synth.add_faces(ds.root, spec)
    assert (ds.root / layout.FACES_FILE).read_bytes() == written and restored.faces == ds.faces


# ---------------------------------------------------------------- validation

@pytest.fixture
def folder(synth_folder_copy):
    return synth_folder_copy


def rewrite_faces(root, change):
    rewrite_csv(root / layout.FACES_FILE, change)


def test_faces_round_trip_through_write_faces(folder):
    ds = layout.read_dataset(folder)
    layout.write_faces(folder, ds.faces.values())
    assert layout.read_dataset(folder).faces == ds.faces


@pytest.mark.parametrize("change,problem", [
    (lambda rows: rows[3].update(nose_x="n/a"), r"line 5: nose_x 'n/a' is not a number"),
    (lambda rows: rows[0].update(x1=rows[0]["x0"]), r"line 2: box .* is empty"),
    (lambda rows: rows[6].update(mouth_left_y="inf"), r"line 8: mouth_left_y 'inf' is not finite"),
    (lambda rows: rows[2].update(image_id="nobody"), r"line 4: image_id 'nobody' is not in labels.csv"),
    (lambda rows: rows[9].update(image_id=rows[1]["image_id"]), r"line 11: image_id '.*' repeats line 3"),
])
def test_a_bad_faces_row_is_named_with_its_file_and_line(folder, change, problem):
    rewrite_faces(folder, change)
    with pytest.raises(layout.MeMaFormatError, match=rf"{folder / layout.FACES_FILE} {problem}"):
        layout.read_dataset(folder)


def test_a_faces_table_without_a_column_is_named(folder):
    def drop(rows):
        for row in rows:
            del row["nose_y"]

    rewrite_faces(folder, drop)
    with pytest.raises(layout.MeMaFormatError, match=r"faces.csv: missing columns \['nose_y'\]"):
        layout.read_dataset(folder)


def test_an_image_without_a_row_has_no_recorded_face(folder):
    rewrite_faces(folder, lambda rows: rows.pop(0))
    ds = layout.read_dataset(folder)
    assert ds.face(ds.records[0]) is None and ds.face(ds.records[1]) is not None
    assert np.isfinite(ds.face(ds.records[1]).landmarks_array()).all()
