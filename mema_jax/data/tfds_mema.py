"""A TFDS builder for the MeMa folder layout: ArrayRecord shards the grain pipeline reads like folders.

Build (offline: it reads the folder, downloads nothing, never writes into it)::

    python -m mema_jax.data.tfds_mema build --root MEMA_DIR --data-dir OUT [--shards N] [--overwrite]

writes ``OUT/mema/1.0.0/``: ``mema-{train,select,val}.array_record-XXXXX-of-NNNNN`` (one ``tf.train.Example``
per image, random access), ``dataset_info.json``, ``features.json`` and ``metadata.json`` (the labels and
faces tables, and the SHA-256 of the labels.csv / faces.csv they came from, so the records are known without
reading the shards). The build is written into a temp folder inside OUT and renamed into place when complete:
a crashed build leaves no half-written ``mema/1.0.0``, and ``--overwrite`` swaps the old build for the new one
only at the end.
Features:

  image      PNG, H x W x 3 uint8 (the folder's file, bytes unchanged when it is an 8-bit RGB PNG;
             any other image is stored as the PNG of PIL's ``convert("RGB")``, which is what the
             folder reader decodes)
  image_id   text
  disease    ClassLabel over layout.DISEASES
  severity   int32: index into layout.SEVERITIES, -1 none
  age        int32: years, -1 unknown
  gender     int32: index into layout.GENDERS, -1 unknown
  identity   text, "" unknown
  mask       PNG, H x W x 1 uint8 (255 = tumour, as the folder reader's ``> 0``); all zero, at the
             image's size, when the image has none
  has_mask   bool
  face_box   float64 (4,), stored as bytes (exact): x0, y0, x1, y1 in pixels (faces.csv); zeros without a face
  landmarks  float64 (5, 2), stored as bytes: the five points (layout.LANDMARK_NAMES); zeros without a face
  has_face   bool

Splits: the layout's train / select / val (a split without images is left out).  Examples are
stored in the folder's order within each split (``disable_shuffling``), so index i of a split is
the i-th record of ``MeMaDataset.split(name)``: the same ``index`` the folder pipeline yields.

Reading: ``open_arrayrecord(OUT)`` gives an ``ArrayRecordDataset``, a ``layout.MeMaDataset`` whose records and
faces come from metadata.json and whose ``load_image`` / ``load_mask`` decode the shards' PNGs (tfds'
ArrayRecord data source, thread-safe random access, read as raw records whose tf.train.Example is parsed with
tfds' proto for just the image, mask and image_id: tfds' full decode of all twelve features costs more than
the PNG; ``example(rec)`` gives that full decode). The dataset pickles, so grain's worker processes open their
own readers. ``pipeline.make_loader`` takes it wherever it takes a folder's dataset and yields the same
examples (keys, dtypes, shapes, values: the same decode, resize and augmentation code runs) in the same order,
with the same checkpointable iterator state. Opening checks every shard file is there and holds the records
dataset_info.json lists; a damaged record is reported, naming its shard, when it is read.

Config switch (what the trainers call: ``open_configured_dataset``)::

    data.format = "folder"          # or "arrayrecord"; absent = "folder"
    data.arrayrecord_dir = ""       # the build's data dir (OUT above); "" = <data.root>_arrayrecord

With "arrayrecord", ``ensure_arrayrecord`` opens the build when it exists (the folder need not be on that
machine; when it is, its labels.csv and faces.csv must be the ones the build was made from), otherwise it
renders MeMa-Synth into data.root when asked (as ``pipeline.ensure_dataset``) and builds from the folder:
process 0 builds, the others wait for the finished build.

tensorflow-datasets and array_record (the ``tfds`` extra) are imported only when an ArrayRecord
build is written or read: the folder path needs neither.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mema_jax.data import layout
from mema_jax.errors import InputError

NAME = "mema"
VERSION = "1.0.0"
RELEASE_NOTES = {
    "1.0.0": "First release: image, labels, tumour mask (+ has_mask), face box and five landmarks "
             "(+ has_face); the layout's train/select/val splits in folder order; ArrayRecord shards.",
}
METADATA_FORMAT = 1  # the layout of metadata.json below
FORMATS = ("folder", "arrayrecord")  # data.format
DEFAULT_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"  # tfds' shard file names


class ArrayRecordFormatError(layout.MeMaFormatError):
    """A folder that holds no (or another, or a damaged) MeMa ArrayRecord build; the message names it."""


class DataFormatError(InputError, ValueError):
    """``data.format`` names no known input format."""


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"data.format='arrayrecord' needs tensorflow-datasets and array_record: "
                          f"pip install -e '.[tfds]' ({e})") from e
    return tfds


def features():
    tfds = _tfds()
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format="png"),
        "image_id": tfds.features.Text(),
        "disease": tfds.features.ClassLabel(names=list(layout.DISEASES)),
        "severity": tfds.features.Scalar(dtype=np.int32, doc="index into SEVERITIES, -1 none"),
        "age": tfds.features.Scalar(dtype=np.int32, doc="years, -1 unknown"),
        "gender": tfds.features.Scalar(dtype=np.int32, doc="index into GENDERS, -1 unknown"),
        "identity": tfds.features.Text(doc="patient identity, empty when unknown"),
        "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png"),
        "has_mask": tfds.features.Scalar(dtype=np.bool_),
        # float64 as raw bytes: a tf.train.Example float_list would round it to float32.
        "face_box": tfds.features.Tensor(shape=(4,), dtype=np.float64, encoding=tfds.features.Encoding.BYTES),
        "landmarks": tfds.features.Tensor(shape=(5, 2), dtype=np.float64, encoding=tfds.features.Encoding.BYTES),
        "has_face": tfds.features.Scalar(dtype=np.bool_),
    })


# ----------------------------------------------------------------------------- writing


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _image_png(path: Path) -> tuple[bytes, tuple[int, int]]:
    """The PNG bytes to store for the image at ``path`` (what the folder reader decodes) and its (H, W)."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "PNG" and im.mode == "RGB":
                im.load()  # a truncated file fails here, as it would in the folder reader
                return data, (im.height, im.width)
            rgb = np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises many types for truncated/corrupt files
        raise layout.MeMaFormatError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    return _png(rgb), rgb.shape[:2]


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _metadata(dataset: layout.MeMaDataset) -> dict:
    faces = None if dataset.faces is None else {
        k: [*f.box, *(v for point in f.landmarks for v in point)] for k, f in dataset.faces.items()}
    return {
        "mema_metadata_format": METADATA_FORMAT,
        "root": str(dataset.root),
        "labels_sha256": _sha256(dataset.root / layout.LABELS_FILE),
        "faces_sha256": _sha256(dataset.root / layout.FACES_FILE),
        "records": [dataclasses.asdict(r) for r in dataset.records],
        "faces": faces,
    }


def _example(dataset: layout.MeMaDataset, rec: layout.Record) -> dict:
    image, (h, w) = _image_png(dataset.image_path(rec))
    mask = dataset.load_mask(rec) if rec.mask else np.zeros((h, w), bool)
    face = dataset.face(rec)
    return {
        "image": image,
        "image_id": rec.image_id,
        "disease": rec.label,
        "severity": layout.SEVERITIES.index(rec.severity) if rec.severity else -1,
        "age": -1 if rec.age is None else rec.age,
        "gender": layout.GENDERS.index(rec.gender) if rec.gender else -1,
        "identity": rec.identity,
        "mask": _png(mask.astype(np.uint8) * 255),
        "has_mask": bool(rec.mask),
        "face_box": np.asarray(face.box if face else np.zeros(4), np.float64),
        "landmarks": face.landmarks_array() if face else np.zeros((5, 2), np.float64),
        "has_face": face is not None,
    }


_BUILDER_CLASS = None


def builder_class():
    """The tfds builder class (defined, and registered as "mema", on first use: tfds is imported then)."""
    global _BUILDER_CLASS
    if _BUILDER_CLASS is not None:
        return _BUILDER_CLASS
    tfds = _tfds()

    class MeMaBuilder(tfds.core.GeneratorBasedBuilder):
        """MeMa (or MeMa-Synth) from its folder layout; ``root`` or the download config's manual_dir."""

        name = NAME
        VERSION = tfds.core.Version(VERSION)
        RELEASE_NOTES = RELEASE_NOTES
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            "Pass the MeMa folder (labels.csv, images/, masks/, optional faces.csv) as `root=` or as the "
            "download config's manual_dir; nothing is downloaded.")

        def __init__(self, *, root=None, dataset: layout.MeMaDataset | None = None, verify_images: bool = True,
                     **kwargs):
            self._root = None if root is None else Path(root)
            self._dataset = dataset
            self._verify_images = verify_images
            kwargs.setdefault("file_format", tfds.core.FileFormat.ARRAY_RECORD)
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="MeMa: facial photographs of eight eye and periocular diseases (or MeMa-Synth), "
                            "with tumour masks for the segmentation subset and recorded faces.",
                features=features(),
                supervised_keys=("image", "disease"),
                disable_shuffling=True,  # folder order: index i of a split is the folder pipeline's index i
                metadata=tfds.core.MetadataDict(),
            )

        def _read(self, dl_manager) -> layout.MeMaDataset:
            if self._dataset is None:
                root = self._root if self._root is not None else dl_manager.manual_dir
                self._dataset = layout.read_dataset(root, verify_images=self._verify_images)
            return self._dataset

        def _split_generators(self, dl_manager):
            dataset = self._read(dl_manager)
            self.info.metadata.update(_metadata(dataset))
            return {split: self._generate_examples(dataset, split) for split in layout.SPLITS
                    if dataset.split(split)}

        def _generate_examples(self, dataset: layout.MeMaDataset, split: str):
            for i, rec in enumerate(dataset.split(split)):
                yield i, _example(dataset, rec)

    MeMaBuilder.__qualname__ = "MeMaBuilder"
    _BUILDER_CLASS = MeMaBuilder
    return MeMaBuilder


def __getattr__(name):  # tfds_mema.MeMaBuilder, defined lazily
    if name == "MeMaBuilder":
        return builder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def builder_dir(data_dir) -> Path:
    """Where a build into ``data_dir`` lies (``data_dir`` may also be that folder itself)."""
    data_dir = Path(data_dir)
    return data_dir if (data_dir / "dataset_info.json").is_file() else data_dir / NAME / VERSION


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def build(root, data_dir, *, shards: int | None = None, overwrite: bool = False,
          verify_images: bool = True) -> ArrayRecordDataset:
    """Writes the ArrayRecord build of the MeMa folder ``root`` (a path or a read MeMaDataset) into
    ``data_dir`` (as ``data_dir/mema/1.0.0``) and opens it.  An existing build is kept when it was
    built from this folder's labels.csv and faces.csv, replaced with ``overwrite``, and refused
    otherwise.  ``shards``: shards per split (None: tfds decides by size).  The folder is only read."""
    if shards is not None and shards < 1:
        raise InputError(f"--shards {shards}: needs at least one shard per split")
    dataset = root if isinstance(root, layout.MeMaDataset) else layout.read_dataset(root, verify_images=verify_images)
    data_dir = Path(data_dir)
    if _inside(data_dir, dataset.root):
        raise InputError(f"{data_dir}: the data dir lies inside the MeMa folder {dataset.root}, which a build "
                         f"never writes into; choose a data dir outside it")
    out = data_dir / NAME / VERSION
    if out.exists() and not overwrite:
        return _check_same(open_arrayrecord(out), dataset.root)
    tfds = _tfds()
    tfds.disable_progress_bar()
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=data_dir, prefix=f".{NAME}-build-", suffix=".tmp"))
    try:
        builder = builder_class()(root=dataset.root, dataset=dataset, data_dir=tmp / "data")
        config = tfds.download.DownloadConfig(num_shards=shards)
        builder.download_and_prepare(download_dir=tmp / "downloads", download_config=config)  # downloads nothing
        built = Path(builder.data_dir)
        open_arrayrecord(built)  # what is moved into place opens
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            if not overwrite:  # another process finished first: keep its build
                return _check_same(open_arrayrecord(out), dataset.root)
            os.rename(out, tmp / "replaced")
        os.rename(built, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_arrayrecord(out)


# ----------------------------------------------------------------------------- reading


def _shard_files(path: Path, split: dict) -> list[tuple[Path, int]]:
    """(file, number of records) of each shard of one split entry of dataset_info.json."""
    lengths = [int(n) for n in split.get("shardLengths", [])]
    template = split.get("filepathTemplate") or DEFAULT_TEMPLATE
    name = (template.replace("{DATASET}", NAME).replace("{SPLIT}", split["name"])
            .replace("{FILEFORMAT}", "array_record"))
    return [(path / name.replace("{SHARD_X_OF_Y}", f"{i:05d}-of-{len(lengths):05d}"), n)
            for i, n in enumerate(lengths)]


def _check_shards(path: Path, shards: dict[str, list[tuple[Path, int]]]) -> None:
    from array_record.python import array_record_module

    for files in shards.values():
        for file, want in files:
            if not file.is_file():
                raise ArrayRecordFormatError(f"{file}: shard is missing (listed in {path / 'dataset_info.json'}); "
                                             f"the build is damaged: rebuild it with --overwrite")
            try:
                reader = array_record_module.ArrayRecordReader(str(file), "readahead_buffer_size:0")
                have = reader.num_records() if reader.ok() else None
                reader.close()
            except Exception as e:
                raise ArrayRecordFormatError(f"{file}: not a readable ArrayRecord shard ({type(e).__name__}: {e}); "
                                             f"the build is damaged: rebuild it with --overwrite") from None
            if have != want:
                raise ArrayRecordFormatError(
                    f"{file}: shard holds {'no readable' if have is None else have} records, dataset_info.json "
                    f"lists {want}; the shard is truncated or damaged: rebuild it with --overwrite")


class ArrayRecordDataset(layout.MeMaDataset):
    """A MeMa build in ArrayRecord shards, as a ``layout.MeMaDataset``: the records and faces of the
    folder it was built from, images and masks decoded from the shards (as the folder reader
    decodes files).  ``root`` is that folder's path (paths under it are only names here)."""

    def __init__(self, path, root, records, faces, info: dict, shards: dict[str, list[tuple[Path, int]]]):
        super().__init__(Path(root), records, faces)
        self.builder_dir = Path(path)
        self.info = info  # labels_sha256, faces_sha256, split_sizes
        self.shards = shards  # split -> [(file, records)]
        self._where: dict[str, tuple[str, int]] = {}
        for split in layout.SPLITS:
            for i, rec in enumerate(self.split(split)):
                self._where[rec.image_id] = (split, i)
        self._init_readers()

    def _init_readers(self) -> None:
        # Everything tfds is imported and opened here, in the thread that makes (or unpickles) the
        # dataset: tfds' lazily imported modules, first touched from grain's reader threads at once,
        # can deadlock (seen with 4 grain workers).
        tfds = _tfds()
        from tensorflow_datasets.proto import tf_example_pb2

        self._example_proto = tf_example_pb2.Example
        self._skip = tfds.decode.SkipDecoding()
        raw = tfds.decode.DeserializeMethod.RAW_BYTES
        try:
            self._builder = tfds.builder_from_directory(self.builder_dir)
            # tfds' ArrayRecord data sources (thread-safe random access), yielding serialized tf.train.Examples.
            self._sources = {split: self._builder.as_data_source(split, deserialize_method=raw)
                             for split in self.shards}
        except Exception as e:
            raise ArrayRecordFormatError(f"{self.builder_dir}: tfds cannot open this build ({type(e).__name__}: {e}); "
                                         f"rebuild it with --overwrite") from None
        self._last = threading.local()  # the last example each thread read: image then mask, one read

    def __getstate__(self):  # grain's worker processes: readers are opened again there
        state = self.__dict__.copy()
        for key in ("_example_proto", "_skip", "_builder", "_sources", "_last"):
            del state[key]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_readers()

    def __repr__(self) -> str:
        return f"ArrayRecordDataset({self.builder_dir}, root={self.root}, n={len(self.records)})"

    def shard_of(self, split: str, index: int) -> tuple[Path, int]:
        """The shard file holding example ``index`` of ``split``, and its position there."""
        for file, n in self.shards.get(split, []):
            if index < n:
                return file, index
            index -= n
        raise IndexError(f"{self.builder_dir}: split {split!r} has no example {index}")

    def _raw(self, rec: layout.Record) -> tuple[str, int, bytes]:
        if rec.image_id not in self._where:
            raise KeyError(f"{self.builder_dir}: no image {rec.image_id!r}")
        split, i = self._where[rec.image_id]
        try:
            return split, i, self._sources[split][i]
        except Exception as e:
            file, j = self.shard_of(split, i)
            raise ArrayRecordFormatError(f"{file}: cannot read record {j} (image {rec.image_id!r}) "
                                         f"({type(e).__name__}: {e}); the shard is damaged: rebuild it "
                                         f"with --overwrite") from None

    def _pngs(self, rec: layout.Record) -> dict[str, bytes]:
        """The stored image and mask PNGs of ``rec``: the record's tf.train.Example read with tfds'
        proto, only these features taken (tfds' full decode of every feature costs more than the PNG)."""
        last = getattr(self._last, "value", None)
        if last is not None and last[0] == rec.image_id:
            return last[1]
        split, i, raw = self._raw(rec)
        try:
            feature = self._example_proto.FromString(raw).features.feature
            stored = feature["image_id"].bytes_list.value[0].decode()
            out = {key: feature[key].bytes_list.value[0] for key in ("image", "mask")}
        except Exception as e:
            file, j = self.shard_of(split, i)
            raise ArrayRecordFormatError(f"{file}: record {j} (image {rec.image_id!r}) is not a MeMa example "
                                         f"({type(e).__name__}: {e}); rebuild it with --overwrite") from None
        if stored != rec.image_id:
            file, j = self.shard_of(split, i)
            raise ArrayRecordFormatError(f"{file}: record {j} is image {stored!r}, {self.builder_dir / 'metadata.json'}"
                                         f" says {rec.image_id!r}; the build is damaged: rebuild it with --overwrite")
        self._last.value = (rec.image_id, out)
        return out

    def example(self, rec: layout.Record) -> dict:
        """The stored example of ``rec``, every feature decoded by tfds except image and mask (PNG bytes)."""
        _, _, raw = self._raw(rec)
        return self._builder.info.features.deserialize_example_np(raw, decoders={"image": self._skip, "mask": self._skip})

    def _decode(self, rec: layout.Record, key: str, mode: str) -> np.ndarray:
        data = self._pngs(rec)[key]
        try:
            with Image.open(io.BytesIO(data)) as im:
                return np.asarray(im.convert(mode))
        except Exception as e:
            file, j = self.shard_of(*self._where[rec.image_id])
            raise ArrayRecordFormatError(f"{file}: cannot decode the {key} of record {j} (image {rec.image_id!r}) "
                                         f"({type(e).__name__}: {e}); rebuild it with --overwrite") from None

    def load_image(self, rec: layout.Record) -> np.ndarray:
        return self._decode(rec, "image", "RGB")

    def load_mask(self, rec: layout.Record) -> np.ndarray:
        if not rec.mask:
            raise ValueError(f"record {rec.image_id} has no mask")
        return self._decode(rec, "mask", "L") > 0


def _faces_from(table: dict | None) -> dict[str, layout.FaceRecord] | None:
    if table is None:
        return None
    return {k: layout.FaceRecord(k, tuple(v[:4]), tuple((v[i], v[i + 1]) for i in range(4, 14, 2)))
            for k, v in table.items()}


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ArrayRecordFormatError(f"{file}: not readable JSON ({type(e).__name__}: {e}); the build is damaged: "
                                     f"rebuild it with --overwrite") from None


def open_arrayrecord(data_dir, *, check_shards: bool = True) -> ArrayRecordDataset:
    """Opens a build (``data_dir`` as given to ``build``, or its ``mema/1.0.0`` folder).
    ``check_shards``: check every shard file is there and holds the records dataset_info.json lists."""
    path = builder_dir(data_dir)
    meta_file = path / "metadata.json"
    if not (path / "dataset_info.json").is_file() or not meta_file.is_file():
        raise ArrayRecordFormatError(
            f"{path}: no MeMa ArrayRecord build here (dataset_info.json, metadata.json); build one with "
            f"`python -m mema_jax.data.tfds_mema build --root MEMA_DIR --data-dir {data_dir}`")
    info = _read_json(path / "dataset_info.json")
    if info.get("name") != NAME or str(info.get("fileFormat", "")).lower() not in ("array_record", "array-record"):
        raise ArrayRecordFormatError(f"{path / 'dataset_info.json'}: dataset {info.get('name')!r} in format "
                                     f"{info.get('fileFormat')!r}, not {NAME!r} in ArrayRecord")
    meta = _read_json(meta_file)
    if meta.get("mema_metadata_format") != METADATA_FORMAT:
        raise ArrayRecordFormatError(f"{meta_file}: metadata format {meta.get('mema_metadata_format')!r}, "
                                     f"this reader reads {METADATA_FORMAT}; rebuild it")
    try:
        records = [layout.Record(**row) for row in meta["records"]]
        faces = _faces_from(meta["faces"])
        extra = {"labels_sha256": meta["labels_sha256"], "faces_sha256": meta["faces_sha256"]}
    except (KeyError, TypeError, IndexError) as e:
        raise ArrayRecordFormatError(f"{meta_file}: malformed ({type(e).__name__}: {e}); rebuild it") from None
    shards = {s["name"]: _shard_files(path, s) for s in info.get("splits", [])}
    sizes = {name: sum(n for _, n in files) for name, files in shards.items()}
    for split in layout.SPLITS:
        want = sum(r.split == split for r in records)
        if sizes.get(split, 0) != want:
            raise ArrayRecordFormatError(f"{path / 'dataset_info.json'}: split {split!r} holds {sizes.get(split, 0)} "
                                         f"examples, {meta_file} lists {want}; the build is damaged (rebuild it)")
    if check_shards:
        _check_shards(path, shards)
    extra["split_sizes"] = sizes
    return ArrayRecordDataset(path, meta["root"], records, faces, extra, shards)


def _check_same(ar: ArrayRecordDataset, root) -> ArrayRecordDataset:
    """``ar`` when it was built from the labels.csv and faces.csv now at ``root`` (when they are there)."""
    root = Path(root)
    if not (root / layout.LABELS_FILE).is_file():
        return ar
    for name, key in ((layout.LABELS_FILE, "labels_sha256"), (layout.FACES_FILE, "faces_sha256")):
        if _sha256(root / name) != ar.info[key]:
            raise ArrayRecordFormatError(
                f"{ar.builder_dir}: built from another {name} than {root / name} (the build's folder: {ar.root}); "
                f"rebuild it (`python -m mema_jax.data.tfds_mema build --root {root} "
                f"--data-dir {ar.builder_dir.parent.parent} --overwrite`) or choose another data dir")
    return ar


def ensure_arrayrecord(data_dir, root=None, synth_config=None, *, verify_images: bool = True,
                       shards: int | None = None, timeout_s: float = 3600) -> ArrayRecordDataset:
    """Opens the build in ``data_dir``; builds it from the folder ``root`` first when it is absent
    (rendering MeMa-Synth there when asked, as ``pipeline.ensure_dataset``).  Only process 0
    renders and builds; the others wait for the finished build (moved into place in one rename)."""
    import jax

    out = Path(data_dir) / NAME / VERSION
    if (builder_dir(data_dir) / "dataset_info.json").is_file():
        ar = open_arrayrecord(data_dir)
        return _check_same(ar, root) if root is not None else ar
    if root is None or (synth_config is None and not (Path(root) / layout.LABELS_FILE).is_file()):
        where = "no folder given" if root is None else f"{Path(root) / layout.LABELS_FILE} is missing"
        raise ArrayRecordFormatError(f"{out}: no MeMa ArrayRecord build here, and nothing to build one from "
                                     f"({where}); build it with `python -m mema_jax.data.tfds_mema build "
                                     f"--root MEMA_DIR --data-dir {data_dir}`")
    if jax.process_index() == 0:
        from mema_jax.data import pipeline

        dataset = pipeline.ensure_dataset(root, synth_config, verify_images=verify_images)
        print(f"building the MeMa ArrayRecord shards of {root} into {out}", flush=True)
        return build(dataset, data_dir, shards=shards)
    start = time.time()
    while not (out / "dataset_info.json").is_file():
        if time.time() - start > timeout_s:
            raise TimeoutError(f"{out} did not appear within {timeout_s}s (process 0 builds it)")
        time.sleep(1)
    return _check_same(open_arrayrecord(out), root)


def arrayrecord_dir(data_config) -> str:
    """``data.arrayrecord_dir``, or ``<data.root>_arrayrecord`` when it is empty or absent."""
    out = data_config.get("arrayrecord_dir", "") or ""
    if out:
        return out
    root = str(data_config.get("root", "") or "").rstrip("/")
    if not root:
        raise DataFormatError("data.format='arrayrecord' needs data.arrayrecord_dir (or data.root to derive it)")
    return f"{root}_arrayrecord"


def open_configured_dataset(data_config, synth_config=None, verify_images: bool = True) -> layout.MeMaDataset:
    """The training dataset a config's ``data`` names: ``data.format`` "folder" (the default) reads
    ``data.root`` (``pipeline.ensure_dataset``); "arrayrecord" reads the build in
    ``data.arrayrecord_dir``, building it from ``data.root`` first when absent (``ensure_arrayrecord``)."""
    fmt = data_config.get("format", "folder")
    if fmt == "folder":
        from mema_jax.data import pipeline

        return pipeline.ensure_dataset(data_config.root, synth_config, verify_images=verify_images)
    if fmt == "arrayrecord":
        root = data_config.get("root", "") or None
        return ensure_arrayrecord(arrayrecord_dir(data_config), root, synth_config, verify_images=verify_images)
    raise DataFormatError(f"data.format {fmt!r}: unknown input format; choose one of {list(FORMATS)}")


def shard_files(ar: ArrayRecordDataset) -> list[Path]:
    return [file for split in layout.SPLITS for file, _ in ar.shards.get(split, [])]


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mema_jax.data.tfds_mema",
                                 description="TFDS ArrayRecord shards of a MeMa folder (offline).")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the shards of a MeMa folder")
    b.add_argument("--root", required=True, help="the MeMa folder (labels.csv, images/, masks/, faces.csv)")
    b.add_argument("--data-dir", required=True, help="tfds data dir; the build goes to DATA_DIR/mema/1.0.0")
    b.add_argument("--shards", type=int, default=None, help="shards per split (default: tfds decides by size)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing build")
    b.add_argument("--no-verify-images", action="store_true", help="skip the PIL check of every file first")
    a = ap.parse_args(argv)
    try:
        ar = build(a.root, a.data_dir, shards=a.shards, overwrite=a.overwrite, verify_images=not a.no_verify_images)
    except InputError as e:  # its message names the file and the problem: no traceback
        print(f"{ap.prog}: {e}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{s} {n}" for s, n in ar.info["split_sizes"].items())
    files = shard_files(ar)
    print(f"wrote {len(ar)} images ({sizes}) in {len(files)} ArrayRecord shards to {ar.builder_dir}")
    for f in files:
        print(f"  {f}")
    return 0


if __name__ == "__main__":  # the imported module's main: its builder class is the one registered
    from mema_jax.data import tfds_mema

    sys.exit(tfds_mema.main())
