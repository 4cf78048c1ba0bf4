"""Tumour segmentation (Tab. 3): nnU-Net v2 raw-format conversion, its commands, Dice and Jaccard."""
import importlib.util
import json
import multiprocessing.dummy
import shlex
import types

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score, jaccard_score

from eval.medical.segmentation import (
    CHANNEL_SUFFIX,
    NnUNetFolders,
    convert_to_nnunet_raw,
    dice_jaccard,
    main,
    predict_command,
    score_mask_folders,
    training_commands,
    write_split_inputs,
)
from conftest import skip_unless_required
from mema_jax.data.layout import MeMaFormatError, Record, write_labels, write_png

SIZE = 48
SPLIT_SIZES = {"train": 3, "select": 1, "val": 2}


def _disk(cy, cx, r, size=SIZE):
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.fixture
def mema_seg(tmp_path):
    """A MeMa folder: masked SCC images in every split plus one image without a mask (not part of MeMa-Seg)."""
    root = tmp_path / "mema"
    rng = np.random.default_rng(0)
    records = []
    for split, n in SPLIT_SIZES.items():
        for k in range(n):
            image_id = f"{split}{k}"
            mask = _disk(*rng.integers(15, 33, 2), rng.integers(4, 10))
            image = rng.integers(150, 220, (SIZE, SIZE, 3), dtype=np.uint8)
            image[mask] = (120, 40, 40)
            write_png(root / "images" / f"{image_id}.png", image)
            write_png(root / "masks" / f"{image_id}.png", (mask * 255).astype(np.uint8))
            records.append(Record(image_id, f"images/{image_id}.png", "SCC", "", 60, "male", split, "",
                                  f"masks/{image_id}.png"))
    write_png(root / "images" / "plain.png", rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    records.append(Record("plain", "images/plain.png", "Normal", "", 30, "female", "train", "", ""))
    write_labels(root, records)
    return root


def _read(path):
    with Image.open(path) as im:
        return np.asarray(im)


def test_dice_and_jaccard_match_hand_computation():
    pred = np.array([[1, 1, 0], [0, 1, 0]], bool)
    true = np.array([[1, 0, 0], [0, 1, 1]], bool)
    # |P| = 3, |T| = 3, |P & T| = 2, |P | T| = 4: Dice = 4/6, Jaccard = 2/4.
    dice, jaccard = dice_jaccard(pred, true)
    assert dice == pytest.approx(2 / 3, abs=1e-12)
    assert jaccard == pytest.approx(0.5, abs=1e-12)


def test_dice_and_jaccard_agree_with_sklearn_f1_and_jaccard_on_random_masks():
    rng = np.random.default_rng(1)
    pred, true = rng.random((32, 32)) < 0.3, rng.random((32, 32)) < 0.4
    dice, jaccard = dice_jaccard(pred, true)
    assert dice == pytest.approx(f1_score(true.ravel(), pred.ravel()), abs=1e-12)  # binary F1 is Dice
    assert jaccard == pytest.approx(jaccard_score(true.ravel(), pred.ravel()), abs=1e-12)


def test_empty_versus_empty_scores_one_and_one_sided_emptiness_scores_zero():
    empty, tumour = np.zeros((4, 4), bool), np.eye(4, dtype=bool)
    assert dice_jaccard(empty, empty) == (1.0, 1.0)
    assert dice_jaccard(empty, tumour) == (0.0, 0.0)
    assert dice_jaccard(tumour, empty) == (0.0, 0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        dice_jaccard(empty, np.zeros((4, 5), bool))


def _write_masks(folder, masks):
    for case, mask in masks.items():
        write_png(folder / f"{case}.png", mask.astype(np.uint8))  # nnU-Net writes labels 0/1


def test_folder_scores_are_per_image_means(tmp_path):
    true = {"a": _disk(10, 10, 5, 24), "b": _disk(12, 12, 6, 24), "c": np.zeros((24, 24), bool)}
    pred = {"a": true["a"], "b": _disk(12, 14, 6, 24), "c": np.zeros((24, 24), bool)}
    _write_masks(tmp_path / "true", {k: v * 255 for k, v in true.items()})  # ground truth as 0/255 masks
    _write_masks(tmp_path / "pred", pred)
    scores = score_mask_folders(tmp_path / "pred", tmp_path / "true")
    expected = {k: dice_jaccard(pred[k], true[k]) for k in true}
    assert scores.per_image == expected  # the PNG round trip is lossless
    assert expected["a"] == (1.0, 1.0) and expected["c"] == (1.0, 1.0) and expected["b"][0] < 1.0
    assert scores.dice == pytest.approx(np.mean([d for d, _ in expected.values()]), abs=1e-12)
    assert scores.jaccard == pytest.approx(np.mean([j for _, j in expected.values()]), abs=1e-12)


def test_folder_scores_name_missing_and_unexpected_cases(tmp_path):
    _write_masks(tmp_path / "true", {"a": np.eye(8, dtype=bool), "b": np.eye(8, dtype=bool)})
    _write_masks(tmp_path / "pred", {"a": np.eye(8, dtype=bool), "z": np.eye(8, dtype=bool)})
    with pytest.raises(FileNotFoundError, match=r"missing \['b'\], unexpected \['z'\]"):
        score_mask_folders(tmp_path / "pred", tmp_path / "true")


def test_folder_scores_reject_a_prediction_of_the_wrong_size(tmp_path):
    _write_masks(tmp_path / "true", {"a": np.eye(8, dtype=bool)})
    _write_masks(tmp_path / "pred", {"a": np.eye(6, dtype=bool)})
    with pytest.raises(ValueError, match="a.png: predicted mask is 6x6"):
        score_mask_folders(tmp_path / "pred", tmp_path / "true")


def test_conversion_writes_nnunet_raw_layout_with_lossless_images_and_01_labels(mema_seg, tmp_path):
    folder = convert_to_nnunet_raw(mema_seg, tmp_path / "raw", dataset_id=501)
    assert folder == tmp_path / "raw" / "Dataset501_MeMaSeg"
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert dataset_json["labels"] == {"background": 0, "tumour": 1}
    assert dataset_json["file_ending"] == ".png"
    assert dataset_json["numTraining"] == SPLIT_SIZES["train"] + SPLIT_SIZES["select"]
    train_cases = ["select0", "train0", "train1", "train2"]  # "plain" has no mask: not in MeMa-Seg
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"{c}_0000.png" for c in train_cases]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{c}.png" for c in train_cases]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == ["val0_0000.png", "val1_0000.png"]
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == ["val0.png", "val1.png"]
    for case in train_cases:
        np.testing.assert_array_equal(_read(folder / "imagesTr" / f"{case}_0000.png"),
                                      _read(mema_seg / "images" / f"{case}.png"))
        label = _read(folder / "labelsTr" / f"{case}.png")
        assert label.dtype == np.uint8 and label.ndim == 2
        np.testing.assert_array_equal(label, (_read(mema_seg / "masks" / f"{case}.png") > 0).astype(np.uint8))
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name.startswith(".")]  # no temp folder left


def _require_nnunet() -> None:
    """nnU-Net v2 is in the dev extra: skipped without it, a failure under CI (MEMA_REQUIRE_ALL=1)."""
    if importlib.util.find_spec("nnunetv2") is None:
        skip_unless_required("nnunetv2 is not installed (pip install nnunetv2)")


def test_converted_dataset_passes_nnunet_v2_own_integrity_check_and_reader(mema_seg, tmp_path, monkeypatch):
    _require_nnunet()
    from nnunetv2.experiment_planning import verify_dataset_integrity as integrity
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    folder = convert_to_nnunet_raw(mema_seg, tmp_path / "raw", dataset_id=502)
    # nnU-Net's checker runs its per-case checks in a spawned process pool; run the same checks in threads
    # so the test does not pay for starting interpreters.
    monkeypatch.setattr(integrity, "multiprocessing",
                        types.SimpleNamespace(get_context=lambda method: multiprocessing.dummy))
    integrity.verify_dataset_integrity(str(folder), num_processes=1)  # raises on any problem

    dataset_json = json.loads((folder / "dataset.json").read_text())
    reader = determine_reader_writer_from_dataset_json(dataset_json, str(folder / "imagesTr" / "train0_0000.png"))
    assert reader is NaturalImage2DIO
    images, _ = reader().read_images([str(folder / "imagesTr" / "train0_0000.png")])
    seg, _ = reader().read_seg(str(folder / "labelsTr" / "train0.png"))
    assert images.shape == (3, 1, SIZE, SIZE)  # R, G, B channels of one 2D slice
    assert seg.shape == (1, 1, SIZE, SIZE) and set(np.unique(seg)) == {0.0, 1.0}


def test_nnunet_integrity_check_catches_a_broken_conversion(mema_seg, tmp_path, monkeypatch):
    _require_nnunet()
    from nnunetv2.experiment_planning import verify_dataset_integrity as integrity

    folder = convert_to_nnunet_raw(mema_seg, tmp_path / "raw", dataset_id=503)
    write_png(folder / "labelsTr" / "train1.png", np.full((SIZE, SIZE), 255, np.uint8))  # label 255 is not declared
    monkeypatch.setattr(integrity, "multiprocessing",
                        types.SimpleNamespace(get_context=lambda method: multiprocessing.dummy))
    with pytest.raises(RuntimeError, match="unexpected labels"):
        integrity.verify_dataset_integrity(str(folder), num_processes=1)


def test_conversion_rejects_a_mask_of_the_wrong_size_and_leaves_nothing_behind(mema_seg, tmp_path):
    write_png(mema_seg / "masks" / "train2.png", np.zeros((SIZE, SIZE + 1), np.uint8))
    with pytest.raises(MeMaFormatError, match=r"train2.png: mask is 49x48 but image .*train2.png is 48x48"):
        convert_to_nnunet_raw(mema_seg, tmp_path / "raw")
    assert list((tmp_path / "raw").iterdir()) == []


def test_conversion_refuses_a_dataset_id_already_in_use(mema_seg, tmp_path):
    (tmp_path / "raw" / "Dataset501_Other").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="id 501 is already used"):
        convert_to_nnunet_raw(mema_seg, tmp_path / "raw", dataset_id=501)


def test_prediction_inputs_hold_the_split_images_in_nnunet_naming(mema_seg, tmp_path):
    folder = write_split_inputs(mema_seg, tmp_path / "inputs", split="val")
    assert sorted(p.name for p in folder.iterdir()) == [f"val0{CHANNEL_SUFFIX}.png", f"val1{CHANNEL_SUFFIX}.png"]
    np.testing.assert_array_equal(_read(folder / "val1_0000.png"), _read(mema_seg / "images" / "val1.png"))
    with pytest.raises(FileExistsError, match="already exists"):
        write_split_inputs(mema_seg, tmp_path / "inputs", split="val")


def test_commands_set_nnunet_folders_and_use_v2_entry_points(tmp_path):
    folders = NnUNetFolders(tmp_path / "raw dir", tmp_path / "pre", tmp_path / "res")
    lines = training_commands(folders, 501, folds=(0, 1))
    words = [shlex.split(line) for line in lines]
    env = [f"nnUNet_raw={tmp_path / 'raw dir'}", f"nnUNet_preprocessed={tmp_path / 'pre'}",
           f"nnUNet_results={tmp_path / 'res'}"]
    assert words[0] == env + ["nnUNetv2_plan_and_preprocess", "-d", "501", "--verify_dataset_integrity"]
    assert words[1] == env + ["nnUNetv2_train", "501", "2d", "0"]
    assert words[2] == env + ["nnUNetv2_train", "501", "2d", "1"]
    predict = shlex.split(predict_command(folders, tmp_path / "in", tmp_path / "out", 501, device="cpu"))
    assert predict == env + ["nnUNetv2_predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "501",
                             "-c", "2d", "-f", "0", "1", "2", "3", "4", "-device", "cpu"]
    with pytest.raises(ValueError, match="devices"):
        predict_command(folders, "in", "out", device="gpu")


def test_cli_converts_and_scores(mema_seg, tmp_path, capsys):
    main(["convert", "--data", str(mema_seg), "--raw", str(tmp_path / "raw"), "--id", "504"])
    labels = tmp_path / "raw" / "Dataset504_MeMaSeg" / "labelsTs"
    main(["score", "--pred", str(labels), "--true", str(labels)])  # ground truth against itself
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["dice"] == 1.0 and report["jaccard"] == 1.0 and sorted(report["per_image"]) == ["val0", "val1"]
    assert report["per_image"]["val0"] == {"dice": 1.0, "jaccard": 1.0}
