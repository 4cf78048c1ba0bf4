"""The TFDS ArrayRecord build of a MeMa folder (mema_jax/data/tfds_mema.py), as a specification.

One small MeMa-Synth folder (32 images at 32 px: 16 train / 8 select / 8 val, tumour masks and
faces) is built once per module.  Read through ``pipeline.make_loader``, the build yields exactly
the folder's examples (keys, dtypes, shapes, values) in the folder's order, in the main process
and in grain worker processes, and a checkpointed iterator resumes identically.  Building reads
the folder only; bad inputs fail with a message naming the file and the problem.  Everything is
real: tfds writes the shards, array_record reads them, grain runs the loaders.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from conftest import REPO

from mema_jax.data import layout, pipeline, synth, tfds_mema

# The tfds extra: skipped without it, except in CI (MEMA_REQUIRE_ALL=1), where a missing install fails.
try:
    import array_record  # noqa: F401
    import tensorflow_datasets  # noqa: F401
except ImportError as missing:
    if os.environ.get("MEMA_REQUIRE_ALL") == "1":
        raise
    pytest.skip(f"the tfds extra: pip install -e '.[tfds]' ({missing})", allow_module_level=True)

SPEC = synth.SynthSpec(num_images=32, images_per_identity=1, resolution=32, seed=3, split_weights=(2, 1, 1))


def snapshot(root: Path) -> dict:
    """Every file under ``root``: relative path -> (SHA-256, mode, mtime)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            st = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(root))] = (digest, st.st_mode, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("mema_folder"), SPEC)


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
    before = snapshot(folder.root)
    ar = tfds_mema.build(folder.root, tmp_path_factory.mktemp("arrayrecord"))
    return ar, before


def loader(ds, split="train", **kw):
    args = dict(global_batch_size=4, image_size=32, seed=5, with_masks=True, with_faces=True, num_epochs=1,
                drop_remainder=False)
    args.update(kw)
    return pipeline.make_loader(ds, split, **args)


def assert_same_batches(got: list, want: list) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert sorted(g) == sorted(w)
        for k in w:
            assert g[k].dtype == w[k].dtype and g[k].shape == w[k].shape, k
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_the_folder_has_every_split_masks_and_faces(folder):
    # What the other tests rely on: three splits, masks in each, a face for every image.
    assert [len(folder.split(s)) for s in layout.SPLITS] == [16, 8, 8]
    assert all(any(r.mask for r in folder.split(s)) for s in layout.SPLITS)
    assert folder.faces is not None and len(folder.faces) == len(folder)


def test_build_holds_the_folders_records_faces_pixels_and_masks(folder, built):
    ar, _ = built
    assert isinstance(ar, layout.MeMaDataset)
    assert ar.builder_dir.name == tfds_mema.VERSION and ar.builder_dir.parent.name == tfds_mema.NAME
    assert ar.root == folder.root and ar.records == folder.records and ar.faces == folder.faces
    assert ar.info["split_sizes"] == {"train": 16, "select": 8, "val": 8}
    for rec in folder.records:
        image = ar.load_image(rec)
        assert image.dtype == np.uint8
        np.testing.assert_array_equal(image, folder.load_image(rec))
        if rec.mask:
            np.testing.assert_array_equal(ar.load_mask(rec), folder.load_mask(rec))
        else:
            with pytest.raises(ValueError, match="has no mask"):
                ar.load_mask(rec)
    # A folder image stored as an 8-bit RGB PNG is stored byte for byte; the labels and face with it.
    for rec in folder.split("val"):
        ex = ar.example(rec)
        assert ex["image"] == folder.image_path(rec).read_bytes()
        assert ex["image_id"].decode() == rec.image_id and ex["identity"].decode() == rec.identity
        assert ex["disease"] == rec.label and ex["age"] == rec.age
        assert ex["severity"] == (layout.SEVERITIES.index(rec.severity) if rec.severity else -1)
        assert ex["gender"] == layout.GENDERS.index(rec.gender) and ex["has_mask"] == bool(rec.mask)
        face = folder.face(rec)
        assert ex["has_face"] and ex["face_box"].tolist() == list(face.box)
        np.testing.assert_array_equal(ex["landmarks"], face.landmarks_array())


def test_the_build_is_a_plain_tfds_dataset(folder, built):
    import tensorflow_datasets as tfds

    ar, _ = built
    builder = tfds.builder_from_directory(ar.builder_dir)
    assert builder.info.splits["train"].num_examples == 16
    source = builder.as_data_source("val")
    rec = folder.split("val")[2]
    ex = source[2]
    assert ex["image_id"].decode() == rec.image_id
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 3)
    np.testing.assert_array_equal(ex["image"], folder.load_image(rec))
    assert ex["mask"].shape == (32, 32, 1)


@pytest.mark.parametrize("split", layout.SPLITS)
def test_loader_yields_the_folder_loaders_examples_in_order(folder, built, split):
    ar, _ = built
    want = list(loader(folder, split))
    got = list(loader(ar, split))
    assert_same_batches(got, want)
    assert sorted(np.concatenate([b["index"] for b in got]).tolist()) == list(range(len(folder.split(split))))
    # Unshuffled, without augmentation: index i is the split's i-th record, in both.
    plain = list(loader(ar, split, shuffle=False, augment=False))
    assert np.concatenate([b["index"] for b in plain]).tolist() == list(range(len(folder.split(split))))
    assert_same_batches(plain, list(loader(folder, split, shuffle=False, augment=False)))


def test_iterator_state_resumes_identically_and_across_formats(folder, built):
    ar, _ = built
    straight = iter(loader(folder, num_epochs=None))
    for _ in range(3):
        next(straight)
    state = straight.get_state()
    want = [next(straight) for _ in range(5)]  # across the epoch boundary (4 batches an epoch)

    resumed = iter(loader(ar, num_epochs=None))
    for _ in range(3):
        next(resumed)
    assert resumed.get_state() == state
    ar_state = resumed.get_state()
    fresh = iter(loader(ar, num_epochs=None))
    fresh.set_state(ar_state)
    assert_same_batches([next(fresh) for _ in range(5)], want)
    # A run may switch format at a checkpoint: the folder loader's state resumes the build's loader.
    switched = iter(loader(ar, num_epochs=None))
    switched.set_state(state)
    assert_same_batches([next(switched) for _ in range(5)], want)


def test_grain_worker_processes_yield_the_folder_loaders_batches_and_resume(folder, built):
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's worker processes read its absl flags (launch.main parses them)
        flags.FLAGS.mark_as_parsed()
    ar, _ = built
    kw = dict(worker_count=2, num_epochs=None)
    # The folder's loader checkpoints after 3 batches; the build's loader resumes from that state
    # in its own worker processes and yields the folder loader's next batches, ending in its state.
    it = iter(loader(folder, **kw))
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(4)]
    want_state = it.get_state()
    del it
    resumed = iter(loader(ar, **kw))
    resumed.set_state(state)
    got = [next(resumed) for _ in range(4)]
    assert resumed.get_state() == want_state
    del resumed
    assert_same_batches(got, want)


def test_building_never_writes_into_the_folder(folder, built, tmp_path):
    _, before = built
    assert snapshot(folder.root) == before
    tfds_mema.build(folder.root, tmp_path / "again", shards=2, verify_images=False)
    tfds_mema.build(folder.root, tmp_path / "again", overwrite=True)
    assert snapshot(folder.root) == before
    with pytest.raises(tfds_mema.InputError, match="inside the MeMa folder"):
        tfds_mema.build(folder.root, folder.root / "shards")
    assert snapshot(folder.root) == before


def test_cli_builds_the_shards(folder, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "mema_jax.data.tfds_mema", "build", f"--root={folder.root}",
           f"--data-dir={tmp_path / 'cli'}", "--shards=2"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "wrote 32 images (train 16, select 8, val 8) in 6 ArrayRecord shards" in r.stdout
    ar = tfds_mema.open_arrayrecord(tmp_path / "cli")
    assert [len(ar.shards[s]) for s in layout.SPLITS] == [2, 2, 2]
    assert_same_batches(list(loader(ar, "val")), list(loader(folder, "val")))
    # Bad input: one line naming the file, no traceback, exit status 1.
    bad = subprocess.run(cmd[:4] + [f"--root={tmp_path}", f"--data-dir={tmp_path / 'x'}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert f"{tmp_path / 'labels.csv'}: labels table is missing" in bad.stderr


def test_other_images_are_stored_as_the_folder_reader_decodes_them(folder, tmp_path):
    # Any PIL-readable image: palette, grey, RGBA and 16-bit PNGs; the shards hold its RGB decode.
    from PIL import Image

    root = tmp_path / "mixed"
    shutil.copytree(folder.root, root)
    recs = folder.split("train")[:4]
    rgb = folder.load_image(recs[0])
    Image.fromarray(rgb).convert("P").save(root / recs[0].image)
    Image.fromarray(folder.load_image(recs[1])).convert("L").save(root / recs[1].image)
    Image.fromarray(folder.load_image(recs[2])).convert("RGBA").save(root / recs[2].image)
    Image.fromarray((folder.load_image(recs[3])[..., 0].astype(np.uint16) * 257)).save(root / recs[3].image)
    mixed = layout.read_dataset(root)
    ar = tfds_mema.build(mixed, tmp_path / "ar")
    for rec in recs:
        np.testing.assert_array_equal(ar.load_image(rec), mixed.load_image(rec))
    assert_same_batches(list(loader(ar)), list(loader(mixed)))


def test_not_a_mema_folder_is_refused_naming_the_file(tmp_path):
    with pytest.raises(layout.MeMaFormatError, match=f"{tmp_path / 'labels.csv'}: labels table is missing"):
        tfds_mema.build(tmp_path, tmp_path.parent / f"{tmp_path.name}_out")
    with pytest.raises(tfds_mema.ArrayRecordFormatError, match="no MeMa ArrayRecord build here"):
        tfds_mema.open_arrayrecord(tmp_path)
    with pytest.raises(tfds_mema.ArrayRecordFormatError, match="nothing to build one from"):
        tfds_mema.ensure_arrayrecord(tmp_path / "out", tmp_path)


def test_a_build_from_another_labels_table_is_refused(folder, built, tmp_path):
    ar, _ = built
    data_dir = ar.builder_dir.parent.parent
    other = tmp_path / "other"
    shutil.copytree(folder.root, other)
    labels = other / layout.LABELS_FILE
    labels.write_text(labels.read_text().replace(",val,", ",train,", 1))
    for call in (lambda: tfds_mema.build(other, data_dir), lambda: tfds_mema.ensure_arrayrecord(data_dir, other)):
        with pytest.raises(tfds_mema.ArrayRecordFormatError, match=f"built from another labels.csv than {labels}"):
            call()
    # The same tables elsewhere (a copy of the folder) are accepted; no folder at all too (another machine).
    same = tmp_path / "same"
    shutil.copytree(folder.root, same)
    assert tfds_mema.ensure_arrayrecord(data_dir, same).records == folder.records
    assert tfds_mema.ensure_arrayrecord(data_dir, tmp_path / "absent").records == folder.records
    # --overwrite replaces the build with the new folder's.
    new = tfds_mema.build(other, tmp_path / "rebuilt")
    replaced = tfds_mema.build(folder.root, tmp_path / "rebuilt", overwrite=True)
    assert new.info["labels_sha256"] != replaced.info["labels_sha256"]
    assert tfds_mema.open_arrayrecord(tmp_path / "rebuilt").records == folder.records


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbled"])
def test_a_damaged_shard_is_reported_naming_it(built, tmp_path, damage):
    ar, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(ar.builder_dir, copy)
    shard, n = ar.shards["train"][0]
    target = copy / shard.name
    data = target.read_bytes()
    if damage == "missing":
        target.unlink()
    elif damage == "truncated":
        target.write_bytes(data[: len(data) // 2])
    else:  # bytes of a record near the start (the file's end is padding): found when it is read
        garbled = bytearray(data)
        for i in range(8000, 8200):
            garbled[i] ^= 0xFF
        target.write_bytes(bytes(garbled))
    if damage != "garbled":
        with pytest.raises(tfds_mema.ArrayRecordFormatError, match=f"{target}: .*(missing|records|readable)"):
            tfds_mema.open_arrayrecord(copy)
        return
    damaged = tfds_mema.open_arrayrecord(copy)
    with pytest.raises(tfds_mema.ArrayRecordFormatError, match=f"{target}: cannot read record"):
        for rec in damaged.split("train"):
            damaged.load_image(rec)


def test_a_failed_build_leaves_no_build_and_keeps_the_old_one(folder, built, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(folder.root, root)
    bad = root / folder.records[5].image
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG; read_dataset(verify_images=False) does not look
    broken = layout.read_dataset(root, verify_images=False)
    with pytest.raises(layout.MeMaFormatError, match=f"{bad}: cannot decode image"):
        tfds_mema.build(broken, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []  # no mema/1.0.0, no temp folder
    ar, _ = built
    data_dir = tmp_path / "kept"
    shutil.copytree(ar.builder_dir.parent.parent, data_dir)
    with pytest.raises(layout.MeMaFormatError, match="cannot decode image"):
        tfds_mema.build(broken, data_dir, overwrite=True)
    assert os.listdir(data_dir) == ["mema"]
    assert tfds_mema.open_arrayrecord(data_dir).records == folder.records


def test_ensure_renders_and_builds_once_and_other_processes_wait(tmp_path, monkeypatch):
    synth_cfg = ml_collections.ConfigDict({"num_images": 8, "images_per_identity": 1, "resolution": 32, "seed": 0})
    root, out = tmp_path / "synth", tmp_path / "shards"

    # Process 1 waits for process 0's build (started a little later, in a thread), then opens it.
    def process0():
        time.sleep(1.0)
        tfds_mema.build(synth.generate(root, synth.SynthSpec(8, 1, 32, 0)), out)

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    thread = threading.Thread(target=process0)
    thread.start()
    waited = tfds_mema.ensure_arrayrecord(out, root, synth_cfg)
    thread.join()
    assert len(waited) == 8 and waited.root == root
    monkeypatch.undo()

    # Process 0 with nothing there: renders MeMa-Synth, then builds.
    root2, out2 = tmp_path / "synth2", tmp_path / "shards2"
    ar = tfds_mema.ensure_arrayrecord(out2, root2, synth_cfg)
    assert (root2 / layout.LABELS_FILE).is_file() and len(ar) == 8
    assert (out2 / "mema" / "1.0.0" / "dataset_info.json").is_file()
    assert tfds_mema.ensure_arrayrecord(out2, root2, synth_cfg).records == ar.records  # opened, not rebuilt


def test_open_configured_dataset_switches_on_data_format(folder, built, tmp_path):
    ar, _ = built
    data = ml_collections.ConfigDict({"root": str(folder.root), "verify_images": True})
    assert type(tfds_mema.open_configured_dataset(data, None, True)) is layout.MeMaDataset  # no format: folder
    data.format = "folder"
    data.arrayrecord_dir = ""
    assert type(tfds_mema.open_configured_dataset(data, None, True)) is layout.MeMaDataset
    data.format = "arrayrecord"
    data.arrayrecord_dir = str(ar.builder_dir.parent.parent)
    assert tfds_mema.open_configured_dataset(data, None, True).builder_dir == ar.builder_dir
    data.format = "tfrecord"
    with pytest.raises(ValueError, match=r"data.format 'tfrecord': unknown input format; choose one of "
                                         r"\['folder', 'arrayrecord'\]"):
        tfds_mema.open_configured_dataset(data, None, True)
    # An empty arrayrecord_dir builds beside the folder: <data.root>_arrayrecord (the folder untouched).
    data.root = str(tmp_path / "copy")
    shutil.copytree(folder.root, data.root)
    data.format, data.arrayrecord_dir = "arrayrecord", ""
    beside = tfds_mema.open_configured_dataset(data, None, False)
    assert beside.builder_dir == tmp_path / "copy_arrayrecord" / "mema" / "1.0.0"


def test_classifier_trains_from_arrayrecord_without_the_folder(built, tmp_path):
    from configs.quickstart import get_config
    from mema_jax.trainers import classifier

    ar, _ = built
    config = get_config("tiny")
    assert config.data.format == "folder"  # the default
    config.data.format = "arrayrecord"
    config.data.arrayrecord_dir = str(ar.builder_dir.parent.parent)
    config.data.root = str(tmp_path / "not_on_this_machine")  # only the shards are read
    config.data.generate_if_missing = False
    config.total_steps = 2
    config.checkpoint_every = 2
    config.log_every = 1
    config.async_checkpoints = False
    classifier.train_and_evaluate(config, str(tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    assert not (tmp_path / "not_on_this_machine").exists()
