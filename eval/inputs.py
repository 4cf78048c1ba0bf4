"""Inputs of the eval bridge: originals, and a method's output folder matched to them by name.

Originals are either a MeMa-layout root (``labels.csv`` + ``images/``, read with
``mema_jax.data.layout.read_dataset``) or a plain folder of images (sub-folders allowed; the
first sub-folder level is taken as the identity, as in ``faces_labelled/<identity>/``).

Every original has a *name*: its path relative to its image folder (``images/`` for a MeMa root,
the folder itself otherwise), e.g. ``000123.png`` or ``obama/obama2.jpg``.

A method folder holds what a de-identification method produced for those originals::

    <method_dir>/deid/<name>        de-identified image
    <method_dir>/recovered/<name>   recovered image (reversible methods only)

The extension may differ from the original's (a method may write PNG for JPEG originals); the
rest of the name must match. A missing file, an unreadable file or a file whose size differs
from its original is reported, all of them by name, in one ``InputMismatchError``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from mema_jax.data import layout

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
OUTPUT_KINDS = ("deid", "recovered")


class InputMismatchError(ValueError):
    """A method folder does not match its originals; ``problems`` maps each file name to what is wrong."""

    def __init__(self, folder: Path, problems: dict[str, str]):
        self.folder = folder
        self.problems = dict(problems)
        lines = [f"{name}: {problem}" for name, problem in sorted(self.problems.items())]
        super().__init__(f"{folder}: {len(lines)} file(s) missing or mismatched:\n  " + "\n  ".join(lines))


@dataclasses.dataclass(frozen=True)
class Original:
    name: str                        # path relative to the image folder, '/'-separated
    path: Path
    identity: str                    # '' when unknown
    record: layout.Record | None     # the MeMa record, None for a plain folder


@dataclasses.dataclass(frozen=True)
class Originals:
    root: Path
    image_dir: Path
    items: tuple[Original, ...]
    dataset: layout.MeMaDataset | None   # None for a plain folder

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


@dataclasses.dataclass(frozen=True)
class ImagePair:
    original: Original
    output: Path

    @property
    def name(self) -> str:
        return self.original.name


def load_rgb(path) -> np.ndarray:
    """uint8 HxWx3 RGB, the one image convention of the eval bridge."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def is_mema_root(root) -> bool:
    return (Path(root) / layout.LABELS_FILE).is_file()


def read_originals(root, *, split: str = "") -> Originals:
    """Originals from a MeMa root (optionally one split) or a plain folder of images."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: originals folder does not exist")
    if is_mema_root(root):
        dataset = layout.read_dataset(root, verify_images=False)
        records = dataset.split(split) if split else list(dataset.records)
        image_dir = root / "images"
        items = []
        for rec in records:
            path = dataset.image_path(rec)
            base = image_dir if path.is_relative_to(image_dir) else root
            items.append(Original(path.relative_to(base).as_posix(), path, rec.identity, rec))
        return _checked(Originals(root, image_dir, tuple(items), dataset))
    if split:
        raise ValueError(f"{root}: a split ({split!r}) was asked for but this is a plain folder without labels.csv")
    items = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        rel = path.relative_to(root)
        identity = rel.parts[0] if len(rel.parts) > 1 else ""
        items.append(Original(rel.as_posix(), path, identity, None))
    return _checked(Originals(root, root, tuple(items), None))


def _checked(originals: Originals) -> Originals:
    if not originals.items:
        raise ValueError(f"{originals.root}: no original images found")
    stems: dict[str, str] = {}
    for item in originals.items:
        stem = _stem(item.name)
        if stem in stems:
            raise ValueError(f"{originals.root}: originals {stems[stem]} and {item.name} differ only in extension; "
                             "method outputs could not be matched to them unambiguously")
        stems[stem] = item.name
    return originals


def _stem(name: str) -> str:
    return Path(name).with_suffix("").as_posix()


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()   # decode fully, so truncated files are caught here and not half-way through scoring
        return im.size


def match_method_folder(originals: Originals, method_dir, kind: str = "deid") -> list[ImagePair]:
    """Pairs every original with ``<method_dir>/<kind>/<name>``; raises InputMismatchError listing every problem."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {list(OUTPUT_KINDS)}")
    folder = Path(method_dir) / kind
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: method output folder does not exist "
                                f"(expected <method_dir>/{kind}/<original name>)")
    by_stem: dict[str, list[Path]] = {}
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            by_stem.setdefault(_stem(path.relative_to(folder).as_posix()), []).append(path)

    pairs, problems = [], {}
    for item in originals:
        candidates = by_stem.get(_stem(item.name), [])
        exact = [p for p in candidates if p.relative_to(folder).as_posix() == item.name]
        if exact:
            candidates = exact
        if not candidates:
            problems[item.name] = f"missing in {folder}"
            continue
        if len(candidates) > 1:
            problems[item.name] = "several outputs match: " + ", ".join(sorted(p.name for p in candidates))
            continue
        output = candidates[0]
        try:
            out_size = _image_size(output)
        except Exception as e:  # PIL raises many types for corrupt files
            problems[item.name] = f"{output} is not a readable image ({type(e).__name__}: {e})"
            continue
        try:
            orig_size = _image_size(item.path)
        except Exception as e:
            problems[item.name] = f"original {item.path} is not a readable image ({type(e).__name__}: {e})"
            continue
        if out_size != orig_size:
            problems[item.name] = (f"size differs: {output} is {out_size[0]}x{out_size[1]}, "
                                   f"original is {orig_size[0]}x{orig_size[1]} (width x height)")
            continue
        pairs.append(ImagePair(item, output))
    if problems:
        raise InputMismatchError(folder, problems)
    return pairs
