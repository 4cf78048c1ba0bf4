"""Identity metrics against hand-computed cases, and the pair-file readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eval.identity.evaluate import read_lfw_pairs, read_pairs_csv
from eval.identity.metrics import (
    best_threshold,
    face_matching_rate,
    id_distance,
    identity_leakage_rate,
    match_gallery,
    verification_accuracy,
)

REPO = Path(__file__).resolve().parents[2]
NAN = np.nan


def unit(degrees: float) -> list[float]:
    return [np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))]


def test_id_distance_is_euclidean_between_normalised_features_and_skips_faceless_pairs():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [NAN, NAN], [3.0, 4.0]])
    b = np.array([[0.0, 1.0], [0.0, 2.0], [1.0, 0.0], [-3.0, -4.0]])
    result = id_distance(a, b)
    # orthogonal -> sqrt(2); same direction (after normalising) -> 0; opposite -> 2
    np.testing.assert_allclose(result.per_pair, [np.sqrt(2), 0.0, NAN, 2.0])
    assert result.mean == pytest.approx((np.sqrt(2) + 0 + 2) / 3)
    assert (result.n_pairs, result.n_skipped) == (3, 1)


def test_id_distance_rejects_unpaired_features():
    with pytest.raises(ValueError, match="differ in shape"):
        id_distance(np.ones((2, 4)), np.ones((3, 4)))


@pytest.fixture
def gallery():
    # Gallery A at 0 deg, B at 90 deg, C at 180 deg. Queries at 10, 80, 60 deg and one without a face.
    features = np.array([unit(0), unit(90), unit(180)])
    queries = np.array([unit(10), unit(80), unit(60), [NAN, NAN]])
    return features, ["A", "B", "C"], queries


def test_nearest_gallery_identity_and_distance(gallery):
    features, ids, queries = gallery
    result = match_gallery(queries, features, ids)
    assert result.nearest_identity == ("A", "B", "B", None)
    # chord length between unit vectors d degrees apart: 2 sin(d / 2)
    chord = lambda d: 2 * np.sin(np.deg2rad(d) / 2)
    np.testing.assert_allclose(result.nearest_distance, [chord(10), chord(10), chord(30), NAN])


def test_identity_leakage_rate_counts_queries_within_the_threshold(gallery):
    features, ids, queries = gallery
    result = identity_leakage_rate(queries, features, ids, threshold=0.3)  # chord(10)=0.174, chord(30)=0.518
    assert result.matched.tolist() == [True, True, False, False]
    assert (result.n_matched, result.n_queries, result.n_skipped) == (2, 3, 1)
    assert result.rate == pytest.approx(2 / 3) and result.rate_all == pytest.approx(2 / 4)


def test_identity_leakage_with_known_identities_needs_the_true_identity(gallery):
    features, ids, queries = gallery
    result = identity_leakage_rate(queries, features, ids, threshold=0.3, query_ids=["A", "A", "B", "B"])
    assert result.matched.tolist() == [True, False, False, False] and result.rate == pytest.approx(1 / 3)


def test_face_matching_rate_is_rank1_identification_with_optional_threshold(gallery):
    features, ids, queries = gallery
    truth = ["A", "A", "B", "B"]
    assert face_matching_rate(queries, features, ids, truth).matched.tolist() == [True, False, True, False]
    assert face_matching_rate(queries, features, ids, truth).rate == pytest.approx(2 / 3)
    assert face_matching_rate(queries, features, ids, truth, threshold=0.3).rate == pytest.approx(1 / 3)


def test_gallery_images_without_a_face_are_left_out_and_counted(gallery):
    features, ids, queries = gallery
    with_hole = np.vstack([features, [[NAN, NAN]]])
    result = match_gallery(queries, with_hole, ids + ["D"])
    assert result.n_gallery_skipped == 1 and result.nearest_identity == ("A", "B", "B", None)
    nobody = match_gallery(queries, np.full((2, 2), NAN), ["A", "B"])
    assert (nobody.n_matched, nobody.n_queries, nobody.n_gallery_skipped) == (0, 3, 2)
    assert nobody.nearest_identity == (None,) * 4 and nobody.rate == 0.0


def test_best_threshold_lies_midway_between_the_classes():
    assert best_threshold(np.array([0.1, 0.2, 0.3, 0.4]), np.array([1, 1, 0, 0], bool)) == pytest.approx(0.25)
    # Order of the input does not matter.
    assert best_threshold(np.array([0.4, 0.1, 0.3, 0.2]), np.array([0, 1, 0, 1], bool)) == pytest.approx(0.25)


def test_best_threshold_never_splits_equal_distances():
    # Cuts: below 0.2 -> 2/3 right; between 0.2 and 0.5 -> 2/3 right; above 0.5 -> 1/3. Ties go to
    # the smallest threshold, i.e. just below 0.2 (nothing called "same").
    threshold = best_threshold(np.array([0.2, 0.2, 0.5]), np.array([1, 0, 0], bool))
    assert threshold < 0.2 and threshold == pytest.approx(0.2)


def hand_case():
    """20 pairs = 10 folds of 2: even pairs same (0.2), odd different (0.8); pair 0 is a same pair
    at 0.9. Fold 0 trains without the outlier (threshold 0.5) and gets pair 0 wrong: 1/2. Every
    other fold trains with it (it is wrong at any threshold that keeps the rest right, so 0.5)
    and scores 2/2. Mean = (0.5 + 9) / 10 = 0.95; population std = sqrt(0.925 - 0.95^2) = 0.15."""
    distances = np.where(np.arange(20) % 2 == 0, 0.2, 0.8)
    distances[0] = 0.9
    return distances, np.arange(20) % 2 == 0


def test_verification_accuracy_ten_folds_by_hand():
    distances, same = hand_case()
    result = verification_accuracy(distances, same)
    np.testing.assert_allclose(result.fold_accuracies, [0.5] + [1.0] * 9)
    np.testing.assert_allclose(result.fold_thresholds, 0.5)
    assert result.accuracy == pytest.approx(0.95) and result.accuracy_std == pytest.approx(0.15)
    assert (result.n_pairs, result.n_skipped) == (20, 0)


def test_verification_skips_pairs_without_faces():
    distances, same = hand_case()
    result = verification_accuracy(np.append(distances, NAN), np.append(same, True))
    assert result.accuracy == pytest.approx(0.95) and (result.n_pairs, result.n_skipped) == (20, 1)
    with pytest.raises(ValueError, match="need at least 10"):
        verification_accuracy(np.full(12, NAN), np.ones(12, bool))


def test_verification_of_random_distances_is_near_chance():
    rng = np.random.default_rng(0)
    result = verification_accuracy(rng.random(600), rng.random(600) < 0.5, shuffle=True)
    # Labels independent of distances: accuracy ~ 0.5, +-0.07 is over 3 standard errors of 600 pairs
    # (threshold selection on 540 pairs overfits a little upward).
    assert abs(result.accuracy - 0.5) < 0.07


def test_read_pairs_csv_on_the_real_pairs_file():
    pairs = read_pairs_csv(REPO.parent / "shared" / "data" / "faces_pairs" / "master.csv")
    assert len(pairs) == 300 and sum(p.same for p in pairs) == 38
    assert pairs[0].first.name == "img20.jpg" and pairs[0].second.name == "img21.jpg" and pairs[0].same


def test_read_pairs_csv_names_the_bad_line(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("file_x,file_y,Decision\na.jpg,b.jpg,Yes\na.jpg,c.jpg,Maybe\n")
    with pytest.raises(ValueError, match=r"pairs.csv:3: Decision must be Yes or No"):
        read_pairs_csv(path)
    path.write_text("x,y\na,b\n")
    with pytest.raises(ValueError, match="expected columns file_x,file_y,Decision"):
        read_pairs_csv(path)


def test_read_lfw_pairs(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("10\t300\nAaron_Peirsol\t1\t2\nAJ_Cook\t1\tMarsha_Thomason\t1\n")
    pairs = read_lfw_pairs(path, tmp_path / "lfw")
    assert pairs[0].first == tmp_path / "lfw" / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg" and pairs[0].same
    assert pairs[1].second == tmp_path / "lfw" / "Marsha_Thomason" / "Marsha_Thomason_0001.jpg"
    assert not pairs[1].same
    path.write_text("10\t300\nonly_two\t1\n")
    with pytest.raises(ValueError, match="pairs.txt:2: expected 3 or 4 fields"):
        read_lfw_pairs(path, tmp_path)
