"""A folder of whole photographs (JPEG, PNG, ..., DICOM) de-identified face by face, and recovered.

For each photo: read it upright (EXIF applied; DICOM pixels through ``photos.dicom``), find its
faces (``photos.detect``, or the boxes given in ``--boxes``), align each to the method's crop
(``photos.align``), de-identify the crops (a :class:`FaceMethod`: MedSem-DeID or a reference
method), warp each back and blend it into the photo at its own resolution.  Pixels away from the
faces keep their values.  Outputs (``out`` must lie outside the input folder; inputs are only read):

    out/deid/<name>.png | .dcm       the photo with its faces de-identified; no metadata (PNG) or a
                                     header de-identified by the PS3.15 Basic Profile (DICOM)
    out/features/<name>.sealed       what recovery needs, per face (its warp and the method's payload),
                                     sealed by the method (MedSem-DeID: AES-256-GCM under the passphrase)
    out/failures.csv                 name, reason: photos with no face (not written), faces too small for
                                     the model (hidden with the blur fallback instead), unreadable files
    out/recovered/<name>             ``recover``'s output

Each output is written atomically; a rerun skips photos whose outputs exist, so a killed run is
finished by running it again.  A face is "too small" when the crop would enlarge it more than
``max_upscale`` times (the model would invent the face at a resolution the photo does not have).
"""
from __future__ import annotations

import csv
import dataclasses
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from mema_jax.errors import InputError
from mema_jax.fileio import atomic_write_bytes, csv_bytes, write_png
from photos import align, reference
from photos.detect import Face, detect_faces, face_in_box, load_photo

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DICOM_EXTENSIONS = (".dcm", ".dicom")
FAILURES_FILE = "failures.csv"
SEALED_SUFFIX = ".sealed"
MAX_UPSCALE = 2.0


class FaceMethod(Protocol):
    """What the folder runner needs of a de-identifier working on aligned crops."""

    name: str
    template: np.ndarray
    reversible: bool

    def crop_size(self, face: Face) -> int: ...

    def deidentify(self, crops: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """De-identified crops, and per crop what recovery needs (None for irreversible methods)."""

    def seal(self, name: str, payloads: dict[str, np.ndarray]) -> bytes: ...

    def unseal(self, name: str, blob: bytes, source: str) -> dict[str, np.ndarray]: ...

    def recover(self, payloads: list[np.ndarray]) -> list[np.ndarray]: ...


@dataclasses.dataclass
class ReferenceMethod:
    """A reference de-identifier (``photos.reference``) on crops at the face's own scale."""

    name: str
    strength: float | None = None
    template: np.ndarray = dataclasses.field(default_factory=lambda: align.HEAD_TEMPLATE)
    reversible: bool = False

    def crop_size(self, face: Face) -> int:
        eyes = float(np.linalg.norm(self.template[1] - self.template[0]))
        return max(8, int(round(face.eye_distance / eyes)))

    def deidentify(self, crops):
        return [reference.deidentify_crop(c, self.name, self.strength, self.template) for c in crops], [None] * len(crops)

    def seal(self, name, payloads):  # pragma: no cover - never called: not reversible
        raise InputError(f"{self.name} is not reversible: nothing to store for recovery")

    unseal = seal

    def recover(self, payloads):
        raise InputError(f"{self.name} is not reversible: a photo de-identified with it cannot be recovered")


def _is_dicom(path: Path) -> bool:
    """A .dcm / .dicom file, or a file without extension carrying DICOM's b"DICM" at byte 128."""
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def list_photos(folder) -> tuple[list[str], dict[str, str]]:
    """(names of photos and DICOM files below ``folder``, {name: reason} for other files)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    names, others = [], {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        name = p.relative_to(folder).as_posix()
        if p.suffix.lower() in IMAGE_EXTENSIONS or _is_dicom(p):
            names.append(name)
        else:
            others[name] = "not an image or DICOM file (skipped)"
    return names, others


def output_name(name: str, is_dicom: bool) -> str:
    return str(Path(name).with_suffix(".dcm")) if is_dicom else str(Path(name).with_suffix(".png"))


def load_name_map(path) -> dict[str, str]:
    """``--name-map FILE``: original name -> opaque output name (empty when the file does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {row["original"]: row["opaque"] for row in csv.DictReader(f)}


def save_name_map(path, mapping: dict[str, str]) -> None:
    atomic_write_bytes(Path(path), csv_bytes(["original", "opaque"], sorted(mapping.items())))


FIVE_POINT_COLUMNS = tuple(f"{n}_{xy}" for n in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
                           for xy in "xy")


def read_boxes(path) -> dict[str, list[Face | tuple[float, float, float, float]]]:
    """``--boxes FILE``: a CSV with columns name,left,top,right,bottom (pixels of the upright photo),
    one row per face; with MeMa's five-point columns too (left_eye_x ... mouth_right_y, as in
    faces.csv) a row is a whole :class:`Face` and no landmark model runs for it."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = set(reader.fieldnames or ())
            missing = {"name", "left", "top", "right", "bottom"} - columns
            if missing:
                raise InputError(f"{path}: missing columns {sorted(missing)}; expected name,left,top,right,bottom")
            with_points = set(FIVE_POINT_COLUMNS) <= columns
            boxes: dict[str, list] = {}
            for i, row in enumerate(reader, start=2):
                try:
                    box = tuple(float(row[k]) for k in ("left", "top", "right", "bottom"))
                    points = (np.array([float(row[c]) for c in FIVE_POINT_COLUMNS]).reshape(5, 2)
                              if with_points and all((row[c] or "").strip() for c in FIVE_POINT_COLUMNS) else None)
                except (TypeError, ValueError):
                    raise InputError(f"{path}: line {i}: the box and points must be numbers") from None
                if box[2] <= box[0] or box[3] <= box[1]:
                    raise InputError(f"{path}: line {i}: right/bottom must exceed left/top")
                boxes.setdefault(row["name"], []).append(box if points is None else Face(box, points))
            return boxes
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e})") from None


def _check_apart(inputs: Path, out: Path) -> None:
    inputs, out = inputs.resolve(), out.resolve()
    if out == inputs or inputs in out.parents or out in inputs.parents:
        raise InputError(f"{out}: the output folder must be outside the input folder {inputs} (inputs are never written)")


def _progress(items, desc):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="photo", file=sys.stderr)


@dataclasses.dataclass
class Photo:
    pixels: np.ndarray
    dicom: object | None = None  # photos.dicom.DicomPhoto


def read_photo(path: Path) -> Photo:
    if _is_dicom(path):
        try:
            from photos import dicom
        except ImportError as e:
            raise InputError(f"{path}: reading DICOM needs pydicom and dicognito ({e}); "
                             "pip install 'mema-jax[photos]'") from None
        d = dicom.read_photo(path)
        return Photo(d.pixels, d)
    return Photo(load_photo(path))


def write_photo(path: Path, pixels: np.ndarray, source: Photo, header) -> None:
    """PNG (pixels only), or DICOM with ``header`` (a de-identified dataset)."""
    if source.dicom is None:
        write_png(path, pixels)
    else:
        from photos import dicom

        dicom.write_photo(header, pixels, path)


def process_faces(photo: np.ndarray, faces: Sequence[Face], method: FaceMethod, max_upscale: float = MAX_UPSCALE):
    """(photo with its faces de-identified, [(alignment, payload)] per de-identified face, {face index: reason}
    for faces too small, which get the blur fallback)."""
    aligned, small = [], {}
    for i, face in enumerate(faces):
        a = align.Alignment.of(face.points, method.template, method.crop_size(face))
        if a.scale > max_upscale:
            small[i] = (f"face {i + 1} ({face.describe()}): too small for the model: eye distance "
                        f"{face.eye_distance:.0f} px, its crop would enlarge it {a.scale:.1f}x (> {max_upscale:g}x); "
                        "hidden with the blur fallback instead")
        else:
            aligned.append(a)
    out = photo
    records = []
    if aligned:
        crops, payloads = method.deidentify([a.crop(photo) for a in aligned])
        for a, crop, p in zip(aligned, crops, payloads):
            out = a.paste(out, crop)
            records.append((a, p))
    fallback = ReferenceMethod("blur")
    for i in small:
        a = align.Alignment.of(faces[i].points, fallback.template, fallback.crop_size(faces[i]))
        out = a.paste(out, fallback.deidentify([a.crop(out)])[0][0])
    return out, records, small


def deidentify_photos(method: FaceMethod, inputs, out, *, boxes: dict | None = None,
                      header: Callable | None = None, detect: Callable = detect_faces,
                      max_upscale: float = MAX_UPSCALE, name_map=None) -> dict:
    """De-identifies every photo below ``inputs`` into ``out`` (module docstring).  ``header``:
    dataset -> de-identified dataset for DICOM inputs (one per run: consistent UIDs).  ``name_map``:
    a CSV path: outputs get random names (a file name may name the patient), the original -> opaque
    map is kept there and the failures, which name originals, beside it (``<stem>.failures.csv``).
    Returns {"done", "skipped", "failures": {name: reason}, "faces": int, "out", "files"}."""
    inputs, out = Path(inputs), Path(out)
    _check_apart(inputs, out)
    names, failures = list_photos(inputs)
    if not names:
        raise InputError(f"{inputs}: no photos ({', '.join(IMAGE_EXTENSIONS + DICOM_EXTENSIONS)})")
    out.mkdir(parents=True, exist_ok=True)
    opaque = load_name_map(name_map) if name_map is not None else None
    result = {"done": [], "skipped": [], "failures": failures, "faces": 0, "out": out, "files": len(names) + len(failures)}

    def written_name(name: str, is_dicom: bool) -> str:
        if opaque is None:
            return output_name(name, is_dicom)
        if name not in opaque:
            opaque[name] = f"{secrets.token_hex(8)}{'.dcm' if is_dicom else '.png'}"
        return opaque[name]

    for name in _progress(names, f"de-identifying ({method.name})"):
        source = inputs / name
        is_dicom = _is_dicom(source)
        written = written_name(name, is_dicom)
        target = out / "deid" / written
        sealed = out / "features" / (written + SEALED_SUFFIX)
        if target.exists() and (not method.reversible or sealed.exists()):
            result["skipped"].append(name)
            continue
        try:
            photo = read_photo(source)
        except InputError as e:
            failures[name] = str(e)
            continue
        if boxes is not None:
            faces = [b if isinstance(b, Face) else face_in_box(photo.pixels, b) for b in boxes.get(name, [])]
        else:
            faces = detect(photo.pixels)
        if not faces:
            failures[name] = ("no face found (not written)" if boxes is None else "no box given in --boxes (not written)")
            continue
        dataset = None
        if is_dicom:  # the header first: a header that cannot be de-identified leaves nothing behind
            try:
                if header is None:
                    raise InputError(f"{source}: no DICOM header de-identifier was given")
                dataset = header(photo.dicom.dataset)
            except InputError as e:
                failures[name] = str(e)
                continue
        pixels, records, small = process_faces(photo.pixels, faces, method, max_upscale)
        for reason in small.values():
            failures.setdefault(name, "")
            failures[name] = "; ".join(filter(None, (failures[name], reason)))
        if method.reversible and records:
            arrays = {"matrices": np.stack([a.matrix for a, _ in records]),
                      "sizes": np.array([a.size for a, _ in records]),
                      "payloads": np.stack([p for _, p in records])}
            atomic_write_bytes(sealed, method.seal(written, arrays))
        write_photo(target, pixels, photo, dataset)
        if opaque is not None:
            save_name_map(name_map, opaque)
        result["done"].append(name)
        result["faces"] += len(records) + len(small)
    if opaque is not None:  # names the map gave photos that were not written (no face) are dropped
        save_name_map(name_map, {k: v for k, v in opaque.items() if k in result["done"] or k in result["skipped"]})
    if failures:
        result["failures_file"] = (Path(name_map).with_suffix(".failures.csv") if opaque is not None
                                   else out / FAILURES_FILE)
        atomic_write_bytes(result["failures_file"], csv_bytes(["name", "reason"], sorted(failures.items())))
    return result


def recover_photos(method: FaceMethod, method_dir, *, out=None) -> dict:
    """Puts each recovered face back into its de-identified photo: ``method_dir/deid`` -> ``out``
    (default ``method_dir/recovered``).  DICOM outputs keep their de-identified header."""
    method_dir = Path(method_dir)
    deid_dir = method_dir / "deid"
    if not deid_dir.is_dir():
        raise InputError(f"{deid_dir}: missing; recover reads the de-identified photos of a method folder")
    names, _ = list_photos(deid_dir)
    out = Path(out) if out is not None else method_dir / "recovered"
    result = {"done": [], "skipped": [], "failures": {}, "out": out, "faces": 0}
    unopened = 0
    for name in _progress(names, "recovering"):
        target = out / name
        if target.exists():
            result["skipped"].append(name)
            continue
        sealed = method_dir / "features" / (name + SEALED_SUFFIX)
        try:
            if not sealed.is_file():
                raise InputError(f"{sealed}: missing (what recovery needs for this photo)")
            arrays = method.unseal(name, sealed.read_bytes(), str(sealed))
        except InputError as e:
            result["failures"][name] = str(e)
            unopened += 1
            continue
        try:
            photo = read_photo(deid_dir / name)
        except InputError as e:
            result["failures"][name] = str(e)
            continue
        crops = method.recover(list(arrays["payloads"]))
        pixels = photo.pixels
        for matrix, size, crop in zip(arrays["matrices"], arrays["sizes"], crops):
            pixels = align.Alignment(np.asarray(matrix), int(size)).paste(pixels, crop)
        header = None
        if photo.dicom is not None:
            from photos import dicom

            header = dicom.recovered_header(photo.dicom.dataset)
        write_photo(target, pixels, photo, header)
        result["done"].append(name)
        result["faces"] += len(crops)
    if unopened and not result["done"] and unopened == len(result["failures"]):
        raise InputError(f"{method_dir / 'features'}: no file opens: {next(iter(result['failures'].values()))} "
                         "(nothing was written)")
    if result["failures"]:
        result["failures_file"] = out / FAILURES_FILE
        atomic_write_bytes(result["failures_file"], csv_bytes(["name", "reason"], sorted(result["failures"].items())))
    return result
