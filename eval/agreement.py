"""Agreement statistics: Cohen's kappa of diagnoses (the paper's Tab. 4) and Wasserstein distances between label
distributions (Tab. 2).

Tab. 4 compares the diagnoses physicians gave on original images with those given on the same images after
de-identification: one kappa per disease (that disease against all others, as the paper reports it per disease)
and one over all classes together.

Tab. 2 compares the disease, age and gender distributions of generated images with those of real patients by the
1-Wasserstein distance W1 (earth mover's distance):
- age is numeric: W1 between the two empirical distributions on the real line (scipy), in years unless rescaled;
  the paper does not give its unit (its 0.143 for random sampling suggests ages scaled to [0, 1], e.g. years / 100);
- disease and gender are categorical, with no order between classes, so the ground distance is the discrete metric:
  every two different classes are 1 apart. W1 is then the total variation distance 1/2 * sum_c |p(c) - q(c)|
  (the cheapest plan leaves min(p, q) in place and moves the rest one unit). Treating class indices as points on
  a line (W1 with |i - j| ground distance) was rejected: its value would change with the arbitrary class order.
  For two classes (gender) both choices give |p(female) - q(female)|.
"""
from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence

import numpy as np
from scipy.stats import wasserstein_distance
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import cohen_kappa_score

from mema_jax.data.layout import DISEASES, GENDERS, Record


def _check_labels(original: Sequence, deidentified: Sequence, classes: Sequence) -> None:
    if len(original) != len(deidentified) or len(original) == 0:
        raise ValueError(f"need two equally long, non-empty lists of diagnoses; got {len(original)} and "
                         f"{len(deidentified)}")
    known = set(classes)
    unknown = sorted({str(d) for d in [*original, *deidentified] if d not in known})
    if unknown:
        raise ValueError(f"diagnoses {unknown} are not among the classes {list(classes)}")


def cohen_kappa(original: Sequence[Hashable], deidentified: Sequence[Hashable],
                classes: Sequence[Hashable] | None = None) -> dict:
    """Cohen's kappa between diagnoses of the original and the de-identified images (one diagnosis per image).

    Returns ``{"All": kappa over all classes, <class>: one-vs-rest kappa, ...}``. A kappa is NaN where it is
    undefined: both lists give the same single answer for every image (chance agreement 1), e.g. a class that
    neither list ever uses. ``classes`` defaults to the labels that occur, in sorted order.
    """
    original, deidentified = list(original), list(deidentified)
    classes = list(classes) if classes is not None else sorted(set(original) | set(deidentified), key=str)
    _check_labels(original, deidentified, classes)
    with warnings.catch_warnings():  # an undefined kappa is reported as NaN, as documented
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        kappas = {"All": float(cohen_kappa_score(original, deidentified, labels=classes))}
        for c in classes:
            kappas[c] = float(cohen_kappa_score([d == c for d in original], [d == c for d in deidentified],
                                                labels=[False, True]))
    return kappas


def category_frequencies(values: Sequence[Hashable], categories: Sequence[Hashable]) -> np.ndarray:
    """Relative frequency of each category, in the order of ``categories``."""
    values = list(values)
    if not values:
        raise ValueError("no values to make a distribution from")
    known = set(categories)
    unknown = sorted({str(v) for v in values if v not in known})
    if unknown:
        raise ValueError(f"values {unknown} are not among the categories {list(categories)}")
    counts = np.array([sum(v == c for v in values) for c in categories], dtype=np.float64)
    return counts / counts.sum()


def wasserstein_categorical(a: Sequence[Hashable], b: Sequence[Hashable], categories: Sequence[Hashable]) -> float:
    """W1 between the category distributions of samples ``a`` and ``b`` under the discrete metric (see module doc)."""
    p, q = category_frequencies(a, categories), category_frequencies(b, categories)
    return float(0.5 * np.abs(p - q).sum())


def wasserstein_numeric(a: Sequence[float], b: Sequence[float], *, scale: float = 1.0) -> float:
    """W1 between the empirical distributions of samples ``a`` and ``b`` of a number, after dividing by ``scale``."""
    if len(a) == 0 or len(b) == 0:
        raise ValueError("both samples must be non-empty")
    return float(wasserstein_distance(np.asarray(a, dtype=np.float64) / scale, np.asarray(b, dtype=np.float64) / scale))


def label_distribution_distances(records_a: Sequence[Record], records_b: Sequence[Record], *,
                                 age_scale: float = 1.0) -> dict[str, float]:
    """Tab. 2's row for two sets of MeMa records: W1 of disease, age (years / ``age_scale``) and gender.

    Records without an age or gender (empty in labels.csv) are left out of that attribute's distribution.
    """
    def known_values(records, attribute, missing):
        values = [getattr(r, attribute) for r in records if getattr(r, attribute) != missing]
        if not values:
            raise ValueError(f"no record has a known {attribute}")
        return values

    ages_a, ages_b = known_values(records_a, "age", None), known_values(records_b, "age", None)
    genders_a, genders_b = known_values(records_a, "gender", ""), known_values(records_b, "gender", "")
    return {
        "Disease": wasserstein_categorical([r.disease for r in records_a], [r.disease for r in records_b], DISEASES),
        "Age": wasserstein_numeric(ages_a, ages_b, scale=age_scale),
        "Gender": wasserstein_categorical(genders_a, genders_b, GENDERS),
    }
