"""Agreement statistics (Tab. 2 and Tab. 4) against hand-computed cases."""
import math

import numpy as np
import pytest
from scipy.stats import wasserstein_distance_nd

from eval.agreement import (
    cohen_kappa,
    label_distribution_distances,
    wasserstein_categorical,
    wasserstein_numeric,
)
from mema_jax.data.layout import DISEASES, Record

# Diagnoses of six images before and after de-identification.
ORIGINAL = ["A", "A", "B", "B", "C", "C"]
DEIDENTIFIED = ["A", "B", "B", "B", "C", "A"]


def test_multiclass_kappa_matches_hand_computation():
    # Observed agreement 4/6; chance agreement sum_c p_orig(c) p_deid(c) = 1/3 (2/6 + 3/6 + 1/6) = 1/3;
    # kappa = (2/3 - 1/3) / (1 - 1/3) = 1/2.
    assert cohen_kappa(ORIGINAL, DEIDENTIFIED)["All"] == pytest.approx(0.5, abs=1e-12)


def test_per_class_kappa_is_one_vs_rest_and_matches_hand_computation():
    kappas = cohen_kappa(ORIGINAL, DEIDENTIFIED)
    # A: agree 4/6; P(A) 2/6 vs 2/6; chance 1/9 + 4/9 = 5/9; (2/3 - 5/9) / (4/9) = 1/4.
    assert kappas["A"] == pytest.approx(1 / 4, abs=1e-12)
    # B: agree 5/6; P(B) 2/6 vs 3/6; chance 1/6 + 1/3 = 1/2; (5/6 - 1/2) / (1/2) = 2/3.
    assert kappas["B"] == pytest.approx(2 / 3, abs=1e-12)
    # C: agree 5/6; P(C) 2/6 vs 1/6; chance 1/18 + 10/18 = 11/18; (15/18 - 11/18) / (7/18) = 4/7.
    assert kappas["C"] == pytest.approx(4 / 7, abs=1e-12)
    assert set(kappas) == {"All", "A", "B", "C"}


def test_identical_diagnoses_give_kappa_one_and_an_unused_class_gives_nan():
    kappas = cohen_kappa(ORIGINAL, ORIGINAL, classes=["A", "B", "C", "D"])
    assert kappas["All"] == 1.0 and kappas["A"] == kappas["B"] == kappas["C"] == 1.0
    assert math.isnan(kappas["D"])  # neither list ever says D: chance agreement is 1, kappa undefined


def test_kappa_rejects_unequal_lengths_and_unknown_diagnoses():
    with pytest.raises(ValueError, match="equally long"):
        cohen_kappa(["A", "B"], ["A"])
    with pytest.raises(ValueError, match="'X'"):
        cohen_kappa(["A", "X"], ["A", "A"], classes=["A", "B"])


def test_categorical_wasserstein_is_total_variation_and_matches_a_transport_solver():
    a = ["Normal", "Normal", "BCC", "SCC"]  # p = Normal 1/2, BCC 1/4, SCC 1/4
    b = ["Normal", "BCC", "BCC", "BCC"]  # q = Normal 1/4, BCC 3/4
    # Move 1/4 from Normal and 1/4 from SCC to BCC, each one unit: W1 = 1/2 = (1/4 + 1/2 + 1/4) / 2.
    assert wasserstein_categorical(a, b, DISEASES) == pytest.approx(0.5, abs=1e-12)
    # Same value from scipy's general optimal-transport solver with one-hot points scaled so that any two
    # different classes are exactly 1 apart (||e_i - e_j|| / sqrt(2) = 1).
    onehot = np.eye(len(DISEASES)) / np.sqrt(2)
    solver = wasserstein_distance_nd(onehot[[DISEASES.index(d) for d in a]], onehot[[DISEASES.index(d) for d in b]])
    assert wasserstein_categorical(a, b, DISEASES) == pytest.approx(solver, abs=1e-9)


def test_categorical_wasserstein_does_not_depend_on_class_order():
    rng = np.random.default_rng(0)
    a, b = rng.choice(DISEASES, 50).tolist(), rng.choice(DISEASES, 30).tolist()
    reordered = tuple(reversed(DISEASES))
    assert wasserstein_categorical(a, b, reordered) == pytest.approx(wasserstein_categorical(a, b, DISEASES), abs=1e-12)


def test_numeric_wasserstein_matches_hand_computation_and_scales():
    # Equal sizes: match sorted values, (|20 - 25| + |30 - 45|) / 2 = 10 years.
    assert wasserstein_numeric([20, 30], [45, 25]) == pytest.approx(10.0, abs=1e-12)
    assert wasserstein_numeric([20, 30], [45, 25], scale=100) == pytest.approx(0.1, abs=1e-12)
    # Unequal sizes: integral of |F - G|: 1/2 on [0, 5) and 1/2 on [5, 10) = 5.
    assert wasserstein_numeric([0, 10], [5]) == pytest.approx(5.0, abs=1e-12)


def _record(i, disease, age, gender):
    return Record(f"{i}", f"images/{i}.png", disease, "", age, gender, "train", "", "")


def test_label_distribution_distances_skip_unknown_age_and_gender():
    real = [_record(0, "BCC", 20, "female"), _record(1, "BCC", 30, "female"), _record(2, "TAO", 40, "female"),
            _record(3, "TAO", 50, "male")]
    generated = [_record(4, "BCC", 30, "female"), _record(5, "BCC", None, "male"), _record(6, "BCC", 50, ""),
                 _record(7, "TAO", 40, "")]
    distances = label_distribution_distances(real, generated, age_scale=100)
    assert distances["Disease"] == pytest.approx(0.25, abs=1e-12)  # BCC 1/2 vs 3/4
    assert distances["Gender"] == pytest.approx(0.25, abs=1e-12)  # female 3/4 vs 1/2 (two unknown left out)
    # ages {20, 30, 40, 50} vs {30, 40, 50}: |F - G| = 1/4 on [20, 30), 1/2 - 1/3 on [30, 40), 3/4 - 2/3 on
    # [40, 50): 2.5 + 10/6 + 10/12 = 5 years -> 0.05
    assert distances["Age"] == pytest.approx(0.05, abs=1e-12)


def test_label_distribution_distances_need_some_known_ages():
    with pytest.raises(ValueError, match="age"):
        label_distribution_distances([_record(0, "BCC", None, "male")], [_record(1, "BCC", 30, "male")])


def test_tab2_command_writes_generated_sets_against_the_real_split(tmp_path, capsys):
    """python -m eval.report.tab2_label_distance: one row per generated folder, against one split of
    the real folder; values equal label_distribution_distances on the same records."""
    from eval.report.tab2_label_distance import main
    from mema_jax.data import layout

    def folder(name, rows):
        root = tmp_path / name
        (root / "images").mkdir(parents=True)
        records = []
        for i, (disease, age, gender, split) in enumerate(rows):
            (root / "images" / f"{i}.png").write_bytes(b"")
            records.append(Record(str(i), f"images/{i}.png", disease, "", age, gender, split, "", ""))
        layout.write_labels(root, records)
        return root, records

    real, real_records = folder("real", [("Normal", 30, "female", "train"), ("BCC", 60, "male", "train"),
                                         ("TAO", 90, "male", "val")])
    close, close_records = folder("close", [("Normal", 31, "female", "train"), ("BCC", 59, "male", "train")])
    far, far_records = folder("far", [("TAO", 80, "female", "train"), ("TAO", 80, "female", "train")])
    out = tmp_path / "tables"
    assert main([f"--real={real}", "--real-split=train", f"--row=close={close}", f"--row=far={far}", f"--out={out}"]) == 0
    lines = (out / "tab2_wasserstein.csv").read_text().splitlines()
    assert lines[0] == "Rows,Disease,Age,Gender"
    train = real_records[:2]
    for line, records in zip(lines[1:], (close_records, far_records)):
        name, *values = line.split(",")
        want = label_distribution_distances(records, train, age_scale=100.0)
        assert [float(v) for v in values] == pytest.approx([want["Disease"], want["Age"], want["Gender"]], abs=1e-12)
    assert lines[1].startswith("close,0.0,") and float(lines[2].split(",")[1]) == 1.0
    assert "| far |" in (out / "tab2_wasserstein.md").read_text()
    capsys.readouterr()
    no_ages, _ = folder("no_ages", [("Normal", None, "female", "train")])
    assert main([f"--real={real}", f"--row=x={no_ages}", f"--out={tmp_path / 'o2'}"]) == 1
    assert "no_ages/labels.csv: no record has a known age" in capsys.readouterr().err
