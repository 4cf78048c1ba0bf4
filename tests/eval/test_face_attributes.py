"""Age and gender of a public-face folder with insightface's genderage.onnx format.

No genderage weights ship offline, so the models here are built with onnx.helper in that format
(input "data" (N, 3, 96, 96) float, output "fc1" (N, 3)): one with random weights, run through
the command line on real photos like a user would, and ones with designed weights whose outputs
are known functions of the crop, so that the crop, the channel order, the normalisation and the
decode are checked against numbers computed here independently.
"""
from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from eval import face_attributes as fa
from mema_jax.data import layout

REPO = Path(__file__).resolve().parents[2]
FACES = REPO.parent / "shared" / "data" / "faces_labelled"
SMALL = 400  # photos are shrunk to this longer side: dlib HOG still finds their faces, in ~30 ms each
# Photos in which dlib HOG finds a face at that size (checked when this test was written).
FACE_PHOTOS = ("obama/obama.jpg", "obama/obama2.jpg", "biden/biden2.jpg", "rose_leslie/img2.jpg",
               "celeba_1/003039.jpg")
# The designed model: pred = [mean R, mean B, 0.3 + 0.2 mean G] of the normalised crop.
AGE_BIAS, AGE_GAIN = 0.3, 0.2


# ---------------------------------------------------------------- genderage-format ONNX models

def save_model(path: Path, nodes, initializers, *, input_shape=("N", 3, 96, 96), outputs=3) -> Path:
    graph = helper.make_graph(
        nodes, "genderage",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", outputs])],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), name) for name, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def random_model(path: Path, seed: int = 0, *, input_shape=("N", 3, 96, 96), outputs=3) -> Path:
    """Conv 3x3/2 -> PRelu -> GlobalAveragePool -> Flatten -> Gemm, random weights."""
    rng = np.random.default_rng(seed)
    channels = input_shape[1]
    nodes = [helper.make_node("Conv", ["data", "conv_w", "conv_b"], ["c"], name="conv0", kernel_shape=[3, 3],
                              strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("PRelu", ["c", "slope"], ["r"], name="relu0"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool0"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten0"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["fc1"], name="fc1", transB=1)]
    weights = {"conv_w": rng.normal(0, 0.3, (8, channels, 3, 3)), "conv_b": rng.normal(0, 0.1, 8),
               "slope": np.full((8, 1, 1), 0.25), "fc_w": rng.normal(0, 0.5, (outputs, 8)),
               "fc_b": np.r_[0.0, 0.0, 0.35][:outputs] if outputs == 3 else np.zeros(outputs)}
    return save_model(path, nodes, weights, input_shape=input_shape, outputs=outputs)


def designed_model(path: Path, normalise_in_graph: str = "") -> Path:
    """pred = [mean of channel 0, mean of channel 2, AGE_BIAS + AGE_GAIN * mean of channel 1] of the
    network input.  ``normalise_in_graph``: "" feeds the input straight in; otherwise the graph
    starts with x - 127.5 and x / 128 nodes, named as an MXNet export names them ("mxnet":
    ``_minus0``/``_mul0``) or with other names ("other")."""
    nodes, first = [], "data"
    weights = {"fc_w": [[1, 0, 0], [0, 0, 1], [0, AGE_GAIN, 0]], "fc_b": [0, 0, AGE_BIAS]}
    if normalise_in_graph:
        sub, mul = ("_minus0", "_mul0") if normalise_in_graph == "mxnet" else ("norm_shift", "norm_scale")
        nodes += [helper.make_node("Sub", ["data", "mean"], ["centred"], name=sub),
                  helper.make_node("Mul", ["centred", "scale"], ["normalised"], name=mul)]
        weights |= {"mean": [127.5], "scale": [1 / 128]}
        first = "normalised"
    nodes += [helper.make_node("GlobalAveragePool", [first], ["p"], name="pool0"),
              helper.make_node("Flatten", ["p"], ["f"], name="flatten0"),
              helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["fc1"], name="fc1", transB=1)]
    return save_model(path, nodes, weights)


def expected_from_crop(crop: np.ndarray) -> tuple[np.ndarray, str, int]:
    """The designed model's prediction for an RGB crop, by hand: channel 0 = red (insightface's
    BGR image after blobFromImage's swapRB), (pixel - 127.5) / 128, argmax order (female, male),
    age = round(100 * pred[2])."""
    red, green, blue = (((crop.astype(np.float64)[..., k] - 127.5) / 128).mean() for k in range(3))
    pred = np.array([red, blue, AGE_BIAS + AGE_GAIN * green])
    return pred, ("female" if red >= blue else "male"), int(np.round(100 * pred[2]))


# ---------------------------------------------------------------- helpers

def hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or ()), list(reader)


def noisy_image(rng, mean_rgb, size=(160, 200)) -> np.ndarray:
    """An RGB image (H, W) = size: the given channel means plus uniform noise of +-40."""
    noise = rng.integers(-40, 41, (*size, 3))
    return np.clip(np.asarray(mean_rgb) + noise, 0, 255).astype(np.uint8)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eval.face_attributes", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def run_main(capsys, *args) -> tuple[int, str, str]:
    try:
        code = fa.main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """A few identities of faces_labelled, shrunk, in sub-folders; a PNG and an upper-case .JPG
    among them; two face-less images and a text file that is not an image."""
    folder = tmp_path_factory.mktemp("public_faces")
    for i, name in enumerate(FACE_PHOTOS):
        image = Image.open(FACES / name).convert("RGB")
        image.thumbnail((SMALL, SMALL))
        target = folder / name
        target = target.with_suffix({1: ".png", 2: ".JPG"}.get(i, target.suffix))
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)
    Image.new("RGB", (200, 200), (128, 128, 128)).save(folder / "blank.png")
    (folder / "noise").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 150, 3), dtype=np.uint8)).save(
        folder / "noise" / "noise.jpg")
    (folder / "README.txt").write_text("not an image\n")
    return folder


# ---------------------------------------------------------------- the command on real photos

def test_cli_writes_one_row_per_face_lists_the_rest_and_never_touches_the_folder(photo_folder, tmp_path, capsys):
    model = random_model(tmp_path / "genderage.onnx")
    out = tmp_path / "meta" / "public_faces.csv"
    before = hashes(photo_folder)

    done = cli("--faces", str(photo_folder), "--model", str(model), "--out", str(out), "--detector", "dlib")

    assert done.returncode == 0, done.stderr
    faces = sorted(str(Path(n).with_suffix({1: ".png", 2: ".JPG"}.get(i, Path(n).suffix)).as_posix())
                   for i, n in enumerate(FACE_PHOTOS))
    header, rows = read_csv(out)
    assert header == ["image", "age", "gender"]
    assert [r["image"] for r in rows] == faces            # sorted, relative, forward slashes, one per face
    for row in rows:
        assert row["age"].isdigit() and 0 <= int(row["age"]) <= 130
        assert row["gender"] in layout.GENDERS
    no_face_file = out.with_name("public_faces.no_face.csv")
    header, rows = read_csv(no_face_file)
    assert header == ["image"] and [r["image"] for r in rows] == ["blank.png", "noise/noise.jpg"]
    assert f"wrote {len(faces)} faces" in done.stdout and "2 images without a face" in done.stdout
    # the input folder is byte for byte as it was, with nothing added; no temp file is left beside the output
    assert hashes(photo_folder) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["public_faces.csv", "public_faces.no_face.csv"]

    # a second run refuses to replace the output without --overwrite, and leaves it as it was
    written = out.read_bytes(), no_face_file.read_bytes()
    again = cli("--faces", str(photo_folder), "--model", str(model), "--out", str(out), "--detector", "dlib")
    assert again.returncode == 1
    assert again.stderr.strip().count("\n") == 0 and str(out) in again.stderr and "--overwrite" in again.stderr
    assert (out.read_bytes(), no_face_file.read_bytes()) == written

    # with --overwrite it runs again, to the same result (deterministic), and replaces the files by a
    # rename (new inodes; a reader of the old file never sees a half-written one), leaving no temp file
    inodes = out.stat().st_ino, no_face_file.stat().st_ino
    code, stdout, _ = run_main(capsys, "--faces", photo_folder, "--model", model, "--out", out,
                               "--detector", "dlib", "--overwrite")
    assert code == 0 and (out.read_bytes(), no_face_file.read_bytes()) == written
    assert out.stat().st_ino != inodes[0] and no_face_file.stat().st_ino != inodes[1]
    assert sorted(p.name for p in out.parent.iterdir()) == ["public_faces.csv", "public_faces.no_face.csv"]
    assert hashes(photo_folder) == before


def test_an_unreadable_image_stops_the_run_naming_it_and_leaves_no_output(tmp_path, capsys):
    folder = tmp_path / "faces"
    folder.mkdir()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(folder / "a.png")
    (folder / "b.jpg").write_bytes(b"\xff\xd8 this is no JPEG")
    model = random_model(tmp_path / "genderage.onnx")
    out = tmp_path / "out" / "meta.csv"

    code, _, err = run_main(capsys, "--faces", folder, "--model", model, "--out", out, "--detector", "dlib")
    assert code == 1 and str(folder / "b.jpg") in err and err.strip().count("\n") == 0
    assert not out.parent.exists() or list(out.parent.iterdir()) == []   # no output, no no-face list, no temp

    # replacing an existing output is atomic too: a failed --overwrite run keeps the old file
    out.parent.mkdir(exist_ok=True)
    out.write_text("image,age,gender\nold.png,30,male\n")
    code, _, _ = run_main(capsys, "--faces", folder, "--model", model, "--out", out, "--detector", "dlib",
                          "--overwrite")
    assert code == 1 and out.read_text() == "image,age,gender\nold.png,30,male\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["meta.csv"]


# ---------------------------------------------------------------- crop, channels, normalisation, decode

@pytest.mark.parametrize("box", [(100, 80, 180, 140), (130, 60, 170, 160), (-20, -20, 40, 40)],
                         ids=["wide", "tall", "past-the-corner"])
def test_crop_spans_box_centre_plus_minus_three_quarters_of_the_longer_side(tmp_path, box):
    """On an image whose red and green values are linear in x and y (bilinear sampling is exact on
    it), crop pixel (u, v) must hold the image at box centre + (u - 48, v - 48) * 1.5 max(w, h) / 96,
    so pixel 0 sits at centre - 0.75 max(w, h); black where that falls outside the image (cv2's
    borderValue 0).  Tolerance 1.5 grey levels (uint8 rounding of the image and of the crop)."""
    height, width = 240, 320
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.stack([np.round(0.6 * xs), np.round(0.8 * ys), np.full_like(xs, 50)], axis=-1).astype(np.uint8)
    crop = fa.GenderAge(designed_model(tmp_path / "designed.onnx")).crop(image, box)
    assert crop.shape == (96, 96, 3) and crop.dtype == np.uint8

    left, top, right, bottom = box
    longer = max(right - left, bottom - top)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    step = 1.5 * longer / 96
    u = np.arange(96)
    source_x, source_y = np.meshgrid(cx + (u - 48) * step, cy + (u - 48) * step)
    assert (source_x[0, 0], source_y[0, 0]) == (cx - 0.75 * longer, cy - 0.75 * longer)
    inside = (source_x >= 0) & (source_x <= width - 1) & (source_y >= 0) & (source_y <= height - 1)
    outside = (source_x < -1) | (source_y < -1) | (source_x > width) | (source_y > height)
    assert inside.any()
    expected = np.stack([0.6 * source_x, 0.8 * source_y, np.full_like(source_x, 50)], axis=-1)
    assert np.abs(crop[inside] - expected[inside]).max() <= 1.5
    assert (crop[outside] == 0).all() and outside.any() == (box[0] < 0)


def test_designed_model_checks_channel_order_normalisation_and_decode(tmp_path):
    """pred = [mean R, mean B, 0.3 + 0.2 mean G] of the (pixel - 127.5) / 128 crop: a red face is
    female, a blue one male, and the age is round(100 pred[2]); computed here from the crop.
    Tolerance: the raw prediction to 1e-5 (float32), the decoded gender and age exactly."""
    model = fa.GenderAge(designed_model(tmp_path / "designed.onnx"))
    assert (model.input_mean, model.input_std) == (127.5, 128.0)
    assert (model.input_name, model.output_name, model.input_size) == ("data", "fc1", (96, 96))
    rng = np.random.default_rng(1)
    box = (60, 50, 140, 130)
    seen = set()
    for colour in [(200, 210, 60), (60, 30, 200), (170, 120, 90), (90, 160, 180)]:
        image = noisy_image(rng, colour)
        pred, gender, age = expected_from_crop(model.crop(image, box))
        assert np.allclose(model.raw(image, box), pred, atol=1e-5)
        assert model.predict(image, box) == (gender, age)
        seen.add((gender, age))
    # the four designed faces cover both genders and four different ages
    assert {g for g, _ in seen} == {"female", "male"} and len({a for _, a in seen}) == 4


@pytest.mark.parametrize("names, mean_std", [("mxnet", (0.0, 1.0)), ("other", (127.5, 128.0))])
def test_normalisation_follows_insightfaces_node_name_rule(tmp_path, names, mean_std):
    """A graph whose first nodes are named _minus*/_mul* (an MXNet export) normalises itself: it is
    fed raw pixels (mean 0, std 1), and then predicts exactly what the plain model predicts on
    (pixel - 127.5) / 128.  insightface tests node names, not op types: the same Sub and Mul under
    other names leave the default 127.5 / 128."""
    model = fa.GenderAge(designed_model(tmp_path / "embedded.onnx", normalise_in_graph=names))
    assert (model.input_mean, model.input_std) == mean_std
    if names == "mxnet":
        plain = fa.GenderAge(designed_model(tmp_path / "plain.onnx"))
        image, box = noisy_image(np.random.default_rng(2), (150, 100, 80)), (50, 40, 150, 140)
        assert np.allclose(model.raw(image, box), plain.raw(image, box), atol=1e-5)


def test_decode_is_argmax_female_male_and_age_times_100_rounded_and_clipped():
    assert fa.decode([0.9, 0.1, 0.314]) == ("female", 31)
    assert fa.decode([0.1, 0.9, 0.316]) == ("male", 32)
    assert fa.decode([0.5, 0.5, 0.2]) == ("female", 20)       # a tie: numpy's argmax takes the first
    assert fa.decode([0.0, 1.0, 0.245]) == ("male", 24)       # 24.5 -> 24: numpy rounds half to even
    assert fa.decode([0.0, 1.0, -0.3]) == ("male", 0)         # clipped to 0..130
    assert fa.decode([1.0, 0.0, 1.7]) == ("female", 130)


def test_mema_folder_takes_its_boxes_from_faces_csv(tmp_path, capsys):
    """A MeMa-layout folder: its listed images, boxes from faces.csv (no detector), an image without
    a row there counted as no face; ages and genders as computed here from the crops."""
    root = tmp_path / "mema"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(3)
    colours = {"p0": (210, 200, 40), "p1": (40, 60, 220), "p2": (120, 120, 120)}
    boxes = {"p0": (40.0, 30.0, 120.0, 130.0), "p1": (70.0, 60.0, 130.0, 110.0)}   # p2 has no row
    records, images = [], {}
    for image_id, colour in colours.items():
        images[image_id] = noisy_image(rng, colour)
        Image.fromarray(images[image_id]).save(root / "images" / f"{image_id}.png")
        records.append(layout.Record(image_id, f"images/{image_id}.png", "Normal", "", None, "", "train", "", ""))
    layout.write_labels(root, records)
    layout.write_faces(root, [layout.FaceRecord(i, b, ((0.0, 0.0),) * 5) for i, b in boxes.items()])
    model_path = designed_model(tmp_path / "designed.onnx")
    out = tmp_path / "meta.csv"

    code, stdout, err = run_main(capsys, "--faces", root, "--model", model_path, "--out", out)

    assert code == 0, err
    assert "faces.csv" in stdout
    crop = fa.GenderAge(model_path).crop
    expected = []
    for image_id, box in boxes.items():
        _, gender, age = expected_from_crop(crop(images[image_id], box))
        expected.append({"image": f"images/{image_id}.png", "age": str(age), "gender": gender})
    assert read_csv(out) == (["image", "age", "gender"], expected)
    assert {r["gender"] for r in expected} == {"female", "male"}
    assert read_csv(tmp_path / "meta.no_face.csv") == (["image"], [{"image": "images/p2.png"}])


# ---------------------------------------------------------------- bad input: one clear error

def test_a_file_that_is_not_onnx_is_one_error_naming_it(tmp_path, capsys):
    folder = tmp_path / "faces"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    not_onnx = tmp_path / "genderage.onnx"
    not_onnx.write_text("<html>404 Not Found</html>\n")
    code, _, err = run_main(capsys, "--faces", folder, "--model", not_onnx, "--out", tmp_path / "m.csv")
    assert code == 1 and err.strip().count("\n") == 0
    assert str(not_onnx) in err and "not a loadable ONNX model" in err
    assert not (tmp_path / "m.csv").exists()


@pytest.mark.parametrize("input_shape, outputs, problem", [
    (("N", 3, 112, 112), 3, "input 'data' has shape (N, 3, 112, 112), expected (N, 3, 96, 96)"),
    (("N", 1, 96, 96), 3, "input 'data' has shape (N, 1, 96, 96)"),
    (("N", 3, 96, 96), 202, "output 'fc1' has shape (N, 202), expected (N, 3)"),
], ids=["arcface-size", "grey", "old-202-outputs"])
def test_an_onnx_of_the_wrong_shape_is_one_error_naming_file_and_shape(tmp_path, input_shape, outputs, problem):
    path = random_model(tmp_path / "wrong.onnx", input_shape=input_shape, outputs=outputs)
    with pytest.raises(fa.GenderAgeModelError) as error:
        fa.GenderAge(path)
    assert str(error.value).startswith(f"{path}: ") and problem in str(error.value)
    assert isinstance(error.value, ValueError)


def test_an_empty_folder_is_one_error_naming_it(tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here\n")
    code, _, err = run_main(capsys, "--faces", folder, "--model", tmp_path / "unused.onnx", "--out",
                            tmp_path / "m.csv")
    assert code == 1 and err.strip().count("\n") == 0
    assert f"{folder}: no images" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
