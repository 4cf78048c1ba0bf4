"""Age and gender of the faces of a public-face folder, with insightface's ``genderage.onnx``.

The paper labels FFHQ faces with age and gender and then draws IP-Adapter reference faces that
match a sampled age band and gender.  This command writes those labels::

    python -m eval.face_attributes --faces DIR --model genderage.onnx --out META.csv \\
        [--detector auto|dlib|dlib_cnn|mtcnn] [--overwrite]

``META.csv`` has the columns ``image,age,gender``: ``image`` is the path relative to DIR with
forward slashes, ``age`` an integer clipped to 0..130, ``gender`` one of
:data:`mema_jax.data.layout.GENDERS`.  Images in which no face is found are not in it; they are
listed (column ``image``) in ``META.no_face.csv`` beside it.  Both files are written atomically
(temp file + rename; the no-face list first, so ``META.csv`` existing means the run finished),
nothing is written inside DIR unless ``--out`` points there, and an existing ``--out`` is only
replaced with ``--overwrite``.

Images: every ``.png``/``.jpg``/``.jpeg`` under DIR (recursive, any case, sorted by relative
path).  When DIR is a MeMa-layout folder (``labels.csv``), its listed images instead, and their
face boxes come from its ``faces.csv`` when it has one and no ``--detector`` is given (an image
without a row there has no face).  Otherwise the boxes are the largest face of
:func:`eval.identity.faces.make_face_finder` (``auto``: MTCNN when facenet-pytorch is installed,
dlib HOG otherwise).

The model is read and run exactly as insightface's ``model_zoo/attribute.py`` (``Attribute``,
the ``genderage`` task of ``buffalo_l``/``antelopev2``) and ``utils/face_align.py``
(``transform``) do:

- input (N, 3, 96, 96) float, one output (N, 3), read from the onnxruntime session;
- normalisation: when among the first 8 graph nodes one is *named* ``Sub*``/``_minus*`` and one
  ``Mul*``/``_mul*`` (or one of the first 3 is named ``bn_data``) the graph normalises itself
  (an MXNet export): mean 0, std 1; otherwise mean 127.5, std 128.  insightface tests node
  names, not op types, and so does this module;
- crop: centre = box centre, scale = 96 / (1.5 * max(w, h)), rotation 0: the similarity
  ``[[s, 0, 48 - s cx], [0, s, 48 - s cy]]`` warped to 96x96 (bilinear, black outside the
  image), so the crop spans the box centre +- 0.75 max(w, h);
- channels: insightface's image is BGR (OpenCV) and ``cv2.dnn.blobFromImage(..., swapRB=True)``
  turns it into RGB, so the network's channel 0 is red.  Our images are RGB already: they are
  fed unswapped, ``(pixel - mean) / std`` in R, G, B order, NCHW float32;
- decode: ``argmax(pred[:2])`` is the gender (0 female, 1 male: insightface's ``Face.sex`` is
  'M' for 1), ``age = round(pred[2] * 100)`` (numpy rounding, half to even), then clipped here
  to 0..130 (the range of MeMa's ``age`` column; insightface does not clip).

Boxes are (left, top, right, bottom) pixels.  insightface's boxes come from its SCRFD detector;
dlib's HOG boxes are tighter (brow to chin) and MTCNN's close to SCRFD's, so the crop's scale and
with it the estimates depend on the detector.  The crop is taken with PIL (bilinear, like
``cv2.warpAffine``'s default; values may differ from OpenCV's fixed-point interpolation by one
grey level).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from PIL import Image

from eval.identity.faces import make_face_finder, warp_affine
from mema_jax.data import layout
from mema_jax.data.layout import GENDERS
from mema_jax.errors import InputError
from mema_jax.fileio import atomic_write_bytes, csv_bytes

INPUT_SIZE = 96
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
AGE_RANGE = (0, 130)
COLUMNS = ("image", "age", "gender")
NO_FACE_COLUMNS = ("image",)
DETECTORS = ("auto", "dlib", "dlib_cnn", "mtcnn")
PROG = "eval.face_attributes"


class GenderAgeModelError(InputError, ValueError):
    """The model file is not a genderage ONNX model; the message names the file and the problem."""


class FaceAttributesError(InputError, ValueError):
    """Bad folder, image or output path; the message names the file and the problem."""


def normalisation_of(graph: onnx.GraphProto) -> tuple[float, float]:
    """(input_mean, input_std) by insightface's rule on the graph's first node names."""
    find_sub = find_mul = False
    for index, node in enumerate(graph.node[:8]):
        if node.name.startswith(("Sub", "_minus")):
            find_sub = True
        if node.name.startswith(("Mul", "_mul")):
            find_mul = True
        if index < 3 and node.name == "bn_data":
            find_sub = find_mul = True
    return (0.0, 1.0) if find_sub and find_mul else (127.5, 128.0)


def crop_matrix(box: Sequence[float], size: int = INPUT_SIZE) -> np.ndarray:
    """The 2x3 map from image to crop pixels of insightface's ``face_align.transform`` with
    centre = box centre, scale = size / (1.5 max(w, h)) and rotation 0."""
    left, top, right, bottom = (float(v) for v in box)
    scale = size / (max(right - left, bottom - top) * 1.5)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    return np.array([[scale, 0.0, size / 2 - scale * cx], [0.0, scale, size / 2 - scale * cy]])


def decode(pred: Sequence[float]) -> tuple[str, int]:
    """(gender, age) from the model's three outputs: argmax of the first two (female, male) and
    round(100 x the third), clipped to AGE_RANGE."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    if pred.shape != (3,) or not np.all(np.isfinite(pred)):
        raise ValueError(f"a genderage prediction is three finite numbers, got {pred.tolist()}")
    gender = GENDERS[int(np.argmax(pred[:2]))]
    age = int(np.clip(int(np.round(pred[2] * 100)), *AGE_RANGE))
    return gender, age


def _dims(shape) -> str:
    return "(" + ", ".join(str(d) if d is not None else "?" for d in shape) + ")"


class GenderAge:
    """insightface's genderage ONNX model: ``predict(image, box) -> (gender, age)`` on an RGB
    uint8 image and a face box (left, top, right, bottom)."""

    def __init__(self, path, providers: Sequence[str] = ("CPUExecutionProvider",)):
        path = Path(path)
        self.path = path
        if not path.is_file():
            raise GenderAgeModelError(f"{path}: no such model file (insightface's genderage.onnx)")
        try:
            model = onnx.load(str(path))
            self.session = onnxruntime.InferenceSession(model.SerializeToString(), providers=list(providers))
        except Exception as error:  # protobuf, onnx and onnxruntime each raise their own types
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise GenderAgeModelError(f"{path}: not a loadable ONNX model ({type(error).__name__}: {message})") from None
        self.input_mean, self.input_std = normalisation_of(model.graph)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise GenderAgeModelError(f"{path}: a genderage model has one input and one output, this one has "
                                      f"{len(inputs)} inputs and {len(outputs)} outputs")
        shape_in, shape_out = list(inputs[0].shape), list(outputs[0].shape)
        batch = shape_in[0] if shape_in else None
        if (len(shape_in) != 4 or shape_in[1:] != [3, INPUT_SIZE, INPUT_SIZE]
                or (isinstance(batch, int) and batch != 1)):
            raise GenderAgeModelError(f"{path}: input {inputs[0].name!r} has shape {_dims(shape_in)}, expected "
                                      f"(N, 3, {INPUT_SIZE}, {INPUT_SIZE}) (insightface's genderage input)")
        if inputs[0].type != "tensor(float)":
            raise GenderAgeModelError(f"{path}: input {inputs[0].name!r} is {inputs[0].type}, expected tensor(float)")
        if len(shape_out) != 2 or shape_out[1] != 3:
            raise GenderAgeModelError(f"{path}: output {outputs[0].name!r} has shape {_dims(shape_out)}, expected "
                                      "(N, 3) (female and male scores, age / 100)")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.input_size = (INPUT_SIZE, INPUT_SIZE)

    def crop(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """The 96x96 RGB crop the model sees (box centre +- 0.75 max(w, h))."""
        return warp_affine(image, crop_matrix(box, INPUT_SIZE), self.input_size)

    def blob(self, crop: np.ndarray) -> np.ndarray:
        """``cv2.dnn.blobFromImage(bgr, 1/std, size, (mean,)*3, swapRB=True)`` of the BGR version of
        this RGB crop: (1, 3, 96, 96) float32, channels R, G, B, ``(pixel - mean) / std``."""
        pixels = np.asarray(crop, dtype=np.float32)
        return ((pixels - np.float32(self.input_mean)) * np.float32(1.0 / self.input_std)).transpose(2, 0, 1)[None]

    def raw(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """The model's three outputs for the face in ``box``."""
        blob = self.blob(self.crop(image, box))
        return self.session.run([self.output_name], {self.input_name: blob})[0][0]

    def predict(self, image: np.ndarray, box: Sequence[float]) -> tuple[str, int]:
        return decode(self.raw(image, box))


@dataclass(frozen=True)
class Summary:
    rows: tuple[tuple[str, int, str], ...]   # (image, age, gender) of each image with a face
    no_face: tuple[str, ...]
    out: Path
    no_face_file: Path
    face_source: str

    def line(self) -> str:
        counts = ", ".join(f"{sum(r[2] == g for r in self.rows)} {g}" for g in GENDERS)
        return (f"wrote {len(self.rows)} faces ({counts}; faces from {self.face_source}) to {self.out}; "
                f"{len(self.no_face)} images without a face listed in {self.no_face_file}")


def no_face_path(out) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.no_face.csv")


def list_images(folder: Path) -> list[str]:
    """Relative '/'-paths of the images under ``folder`` (IMAGE_EXTENSIONS, recursive, sorted)."""
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*")
             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(names)


def _load_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as error:  # PIL raises many types for truncated or foreign files
        raise FaceAttributesError(f"{path}: cannot be read as an image ({type(error).__name__}: {error})") from None



def estimate_folder(faces_dir, model: GenderAge | str | Path, out, *, detector: str | None = None,
                    overwrite: bool = False, progress_every: int = 1000) -> Summary:
    """Estimates age and gender of every image of ``faces_dir`` and writes ``out`` and its no-face
    list (see the module docstring).  ``detector`` None: a MeMa folder's faces.csv when it has one,
    else ``"auto"``."""
    folder, out = Path(faces_dir), Path(out)
    if not folder.is_dir():
        raise FaceAttributesError(f"{folder}: no such folder of face images")
    if out.is_dir():
        raise FaceAttributesError(f"{out}: is a folder; --out is the metadata CSV file to write")
    if out.exists() and not overwrite:
        raise FaceAttributesError(f"{out}: already exists; pass --overwrite to replace it")
    recorded = None
    if (folder / layout.LABELS_FILE).is_file():
        dataset = layout.read_dataset(folder, verify_images=False)
        names = sorted(dataset.image_path(rec).relative_to(folder).as_posix() for rec in dataset.records)
        if detector is None and dataset.faces is not None:
            by_name = {dataset.image_path(rec).relative_to(folder).as_posix(): dataset.face(rec)
                       for rec in dataset.records}
            recorded = {name: (None if face is None else face.box) for name, face in by_name.items()}
    else:
        names = list_images(folder)
    if not names:
        raise FaceAttributesError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    if not isinstance(model, GenderAge):
        model = GenderAge(model)
    if recorded is not None:
        source, finder = f"{folder / layout.FACES_FILE}", None
    else:
        source = f"detector {detector or 'auto'}"
        try:
            finder = make_face_finder(detector or "auto")
        except ImportError as error:
            raise FaceAttributesError(f"--detector {detector}: {error}") from None
    rows, no_face = [], []
    for index, name in enumerate(names, start=1):
        image = _load_rgb(folder / name)
        if finder is None:
            box = recorded[name]
        else:
            face = finder(image)
            box = None if face is None else face.box
        if box is None or not (box[2] > box[0] and box[3] > box[1]):
            no_face.append(name)
        else:
            gender, age = model.predict(image, box)
            rows.append((name, age, gender))
        if progress_every and index % progress_every == 0:
            print(f"{PROG}: {index}/{len(names)} images", file=sys.stderr, flush=True)
    no_face_file = no_face_path(out)
    atomic_write_bytes(no_face_file, csv_bytes(NO_FACE_COLUMNS, [(n,) for n in no_face]))
    atomic_write_bytes(out, csv_bytes(COLUMNS, rows))
    return Summary(tuple(rows), tuple(no_face), out, no_face_file, source)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}",
                                     description="Write the age/gender metadata CSV (image,age,gender) of a "
                                                 "public-face folder with insightface's genderage.onnx.")
    parser.add_argument("--faces", required=True, help="folder of face images (png/jpg/jpeg, recursive) or a "
                                                       "MeMa-layout folder")
    parser.add_argument("--model", required=True, help="insightface's genderage.onnx (e.g. from buffalo_l)")
    parser.add_argument("--out", required=True, help="metadata CSV to write; images without a face go to "
                                                     "<out stem>.no_face.csv beside it")
    parser.add_argument("--detector", choices=DETECTORS, default=None,
                        help="face finder (default: a MeMa folder's faces.csv when it has one, else auto = "
                             "MTCNN when facenet-pytorch is installed, dlib HOG otherwise)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        summary = estimate_folder(args.faces, args.model, args.out, detector=args.detector, overwrite=args.overwrite)
    except InputError as error:  # its message names the file and the problem: one line, no traceback
        print(f"{PROG}: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(summary.line(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
