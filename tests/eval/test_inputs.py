"""Originals (MeMa root or plain folder) and method folders matched to them by name."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from eval.inputs import InputMismatchError, load_rgb, match_method_folder, read_originals
from mema_jax.data import layout


def _save(path, width=8, height=6, value=100, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path, format=fmt)


def _mema_root(root):
    records = []
    for i, split in enumerate(["train", "val", "val"]):
        _save(root / "images" / f"{i:06d}.png", value=10 * i)
        records.append(layout.Record(f"{i:06d}", f"images/{i:06d}.png", "BCC", "", 40, "female", split, f"p{i}", ""))
    layout.write_labels(root, records)
    return root


def test_plain_folder_names_are_relative_paths_and_first_subfolder_is_the_identity(tmp_path):
    _save(tmp_path / "alice" / "a1.jpg")
    _save(tmp_path / "alice" / "a2.jpg")
    _save(tmp_path / "loose.png")
    (tmp_path / "notes.txt").write_text("not an image")
    originals = read_originals(tmp_path)
    assert [o.name for o in originals] == ["alice/a1.jpg", "alice/a2.jpg", "loose.png"]
    assert [o.identity for o in originals] == ["alice", "alice", ""]
    assert originals.dataset is None


def test_mema_root_names_are_relative_to_images_and_split_filters_records(tmp_path):
    root = _mema_root(tmp_path / "mema")
    everything = read_originals(root)
    assert [o.name for o in everything] == ["000000.png", "000001.png", "000002.png"]
    val = read_originals(root, split="val")
    assert [o.name for o in val] == ["000001.png", "000002.png"]
    assert [o.record.split for o in val] == ["val", "val"]
    assert val.items[0].identity == "p1"


def test_split_on_a_plain_folder_is_an_error(tmp_path):
    _save(tmp_path / "x.png")
    with pytest.raises(ValueError, match="plain folder"):
        read_originals(tmp_path, split="val")


def test_outputs_match_by_name_even_when_the_extension_differs(tmp_path):
    _save(tmp_path / "orig" / "alice" / "a1.jpg", fmt="JPEG")
    _save(tmp_path / "orig" / "b.png")
    _save(tmp_path / "method" / "deid" / "alice" / "a1.png", value=7)
    _save(tmp_path / "method" / "deid" / "b.png", value=9)
    _save(tmp_path / "method" / "deid" / "extra.png")   # outputs for other images are ignored
    pairs = match_method_folder(read_originals(tmp_path / "orig"), tmp_path / "method")
    assert [(p.name, p.output.relative_to(tmp_path / "method").as_posix()) for p in pairs] == [
        ("alice/a1.jpg", "deid/alice/a1.png"), ("b.png", "deid/b.png")]
    assert load_rgb(pairs[1].output)[0, 0, 0] == 9


def test_missing_unreadable_and_resized_outputs_are_all_named_in_one_error(tmp_path):
    for name in ("ok.png", "gone.png", "broken.png", "small.png"):
        _save(tmp_path / "orig" / name)
    _save(tmp_path / "method" / "recovered" / "ok.png")
    (tmp_path / "method" / "recovered" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _save(tmp_path / "method" / "recovered" / "small.png", width=4)
    with pytest.raises(InputMismatchError) as info:
        match_method_folder(read_originals(tmp_path / "orig"), tmp_path / "method", "recovered")
    problems = info.value.problems
    assert set(problems) == {"gone.png", "broken.png", "small.png"}
    assert "missing" in problems["gone.png"]
    assert "not a readable image" in problems["broken.png"]
    assert "size differs" in problems["small.png"] and "4x6" in problems["small.png"]
    for name in problems:
        assert name in str(info.value)


def test_two_outputs_for_one_original_are_reported_as_ambiguous(tmp_path):
    _save(tmp_path / "orig" / "a.jpg", fmt="JPEG")
    _save(tmp_path / "method" / "deid" / "a.png")
    _save(tmp_path / "method" / "deid" / "a.bmp", fmt="BMP")
    with pytest.raises(InputMismatchError, match="several outputs match"):
        match_method_folder(read_originals(tmp_path / "orig"), tmp_path / "method")


def test_a_method_without_its_output_folder_is_a_clear_error(tmp_path):
    _save(tmp_path / "orig" / "a.png")
    with pytest.raises(FileNotFoundError, match="recovered"):
        match_method_folder(read_originals(tmp_path / "orig"), tmp_path / "method", "recovered")
