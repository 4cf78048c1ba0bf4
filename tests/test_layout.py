"""The MeMa layout reader: a malformed folder fails with one error naming the file and the problem."""
import csv

import pytest
from conftest import rewrite_csv

from mema_jax.data import layout


@pytest.fixture
def folder(synth_folder_copy):
    return synth_folder_copy


def rewrite_labels(root, change):
    return rewrite_csv(root / layout.LABELS_FILE, change)


def test_a_valid_folder_reads_back_what_was_written(folder):
    ds = layout.read_dataset(folder)
    assert len(ds) == 160
    rec = ds.records[0]
    assert ds.load_image(rec).shape == (32, 32, 3)
    assert set(r.split for r in ds.records) <= set(layout.SPLITS)
    layout.write_labels(folder, ds.records)
    assert layout.read_dataset(folder).records == ds.records


def test_missing_image_is_named(folder):
    victim = layout.read_dataset(folder).records[7]
    (folder / victim.image).unlink()
    with pytest.raises(layout.MeMaFormatError, match=rf"{victim.image_id}\.png: image file is missing"):
        layout.read_dataset(folder)


def test_corrupt_image_is_named(folder):
    victim = layout.read_dataset(folder).records[3]
    (folder / victim.image).write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(layout.MeMaFormatError, match=rf"{victim.image_id}\.png: image is not a readable image"):
        layout.read_dataset(folder)


def test_unknown_disease_label_is_named_with_its_line(folder):
    rewrite_labels(folder, lambda rows: rows[4].update(disease="Glaucoma"))
    with pytest.raises(layout.MeMaFormatError, match=r"labels.csv line 6: unknown disease 'Glaucoma'"):
        layout.read_dataset(folder)


def test_bad_split_name_is_named_with_its_line(folder):
    rewrite_labels(folder, lambda rows: rows[0].update(split="validation"))
    with pytest.raises(layout.MeMaFormatError, match=r"labels.csv line 2: unknown split 'validation'"):
        layout.read_dataset(folder)


def test_missing_column_and_missing_table_are_named(folder, tmp_path):
    rows = list(csv.DictReader(open(folder / layout.LABELS_FILE)))
    with open(folder / layout.LABELS_FILE, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c for c in rows[0] if c != "gender"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(layout.MeMaFormatError, match=r"labels.csv: missing columns \['gender'\]"):
        layout.read_dataset(folder)
    with pytest.raises(layout.MeMaFormatError, match="labels table is missing"):
        layout.read_dataset(tmp_path / "nowhere")


def test_bad_age_duplicate_id_and_escaping_path_are_named(folder):
    rewrite_labels(folder, lambda rows: rows[1].update(age="forty"))
    with pytest.raises(layout.MeMaFormatError, match="line 3: age 'forty'"):
        layout.read_dataset(folder)
    rewrite_labels(folder, lambda rows: (rows[1].update(age="40"), rows[2].update(image_id=rows[0]["image_id"])))
    with pytest.raises(layout.MeMaFormatError, match="line 4: image_id .* repeats line 2"):
        layout.read_dataset(folder)
    rewrite_labels(folder, lambda rows: (rows[2].update(image_id="x"), rows[5].update(image="../outside.png")))
    with pytest.raises(layout.MeMaFormatError, match="line 7: path '../outside.png' must be relative"):
        layout.read_dataset(folder)
