"""MeMa-Synth: deterministic, balanced as asked, identities learnable, masks only on tumours."""
import collections

import numpy as np
import pytest

from mema_jax.data import layout, synth


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    spec = synth.SynthSpec(num_images=24, images_per_identity=3, resolution=32, seed=5)
    a = synth.generate(tmp_path / "a", spec)
    b = synth.generate(tmp_path / "b", spec, workers=2)
    c = synth.generate(tmp_path / "c", synth.SynthSpec(num_images=24, images_per_identity=3, resolution=32, seed=6))
    assert a.records == b.records
    for rec in a.records:
        assert (a.root / rec.image).read_bytes() == (b.root / rec.image).read_bytes()
    assert any((a.root / r.image).read_bytes() != (c.root / r.image).read_bytes() for r in a.records)


def test_plan_balances_classes_severities_genders_and_splits_as_asked():
    weights = [4, 1, 1, 1, 1, 2, 1, 1]
    spec = synth.SynthSpec(num_images=1200, images_per_identity=4, resolution=32, class_weights=weights,
                           female_fraction=0.25, seed=1)
    images = synth.plan(spec)
    assert len(images) == 1200
    per_class = collections.Counter(i.identity.disease for i in images)
    expected = synth.allocate(1200, weights)
    assert [per_class[d] for d in layout.DISEASES] == list(expected)
    for d in layout.DISEASES[1:]:
        sev = collections.Counter(i.severity for i in images if i.identity.disease == d)
        assert set(sev) == set(layout.SEVERITIES) and max(sev.values()) - min(sev.values()) <= 1
    assert {i.severity for i in images if i.identity.disease == "Normal"} == {""}
    identities = {i.identity.identity: i.identity for i in images}
    per_identity = collections.Counter(i.identity.identity for i in images)
    assert set(per_identity.values()) == {4}  # 1200 / 4 per class divides evenly here
    female = sum(ident.gender == "female" for ident in identities.values()) / len(identities)
    assert abs(female - 0.25) <= len(layout.DISEASES) / len(identities)  # rounding: <= 1 identity per class
    ages = np.array([ident.age for ident in identities.values()])
    assert ages.min() >= 18 and ages.max() <= 85
    split_of = {}
    for i in images:
        assert split_of.setdefault(i.identity.identity, i.split) == i.split  # no identity in two splits
    counts = collections.Counter(i.split for i in images)
    paper = np.array([layout.PAPER_SPLIT_SIZES[s] for s in layout.SPLITS], float)
    target = 1200 * paper / paper.sum()
    for s, t in zip(layout.SPLITS, target):
        # identities are split per class: at most one identity (4 images) per class off the exact share
        assert abs(counts[s] - t) <= 4 * len(layout.DISEASES), (s, counts[s], t)


def test_masks_exist_exactly_for_tumour_images_and_are_not_empty(synth_dataset_32):
    ds = synth_dataset_32
    for rec in ds.records:
        if rec.disease in synth.MASK_DISEASES:
            mask = ds.load_mask(rec)
            assert mask.shape == (32, 32) and 0 < mask.mean() < 0.3
        else:
            assert rec.mask == ""


@pytest.mark.parametrize("resolution", synth.RESOLUTIONS)
def test_renders_each_supported_resolution(resolution):
    image = synth.plan(synth.SynthSpec(num_images=16, images_per_identity=2, resolution=resolution))[3]
    rgb, _ = synth.render(image, resolution)
    assert rgb.shape == (resolution, resolution, 3) and rgb.dtype == np.uint8
    assert rgb.std() > 10


def test_images_of_one_identity_are_closer_than_images_of_different_identities():
    images = synth.plan(synth.SynthSpec(num_images=160, images_per_identity=4, resolution=64, seed=2,
                                        class_weights=[1, 0, 0, 0, 0, 0, 0, 0]))
    pix = {}
    for im in images:
        pix.setdefault(im.identity.identity, []).append(synth.render(im, 64)[0].astype(np.float32))
    same, diff = [], []
    ids = sorted(pix)
    for a, k in enumerate(ids):
        same += [np.abs(pix[k][0] - x).mean() for x in pix[k][1:]]
        diff += [np.abs(pix[k][0] - pix[ids[(a + 1) % len(ids)]][0]).mean()]
    assert np.mean(same) < 0.8 * np.mean(diff)


def test_each_disease_changes_the_eye_region_and_more_with_severity():
    base = synth.plan(synth.SynthSpec(num_images=8, images_per_identity=1, resolution=128, seed=3))[0]
    ident = base.identity
    import dataclasses

    def render(disease, severity):
        i = dataclasses.replace(base, identity=dataclasses.replace(ident, disease=disease), severity=severity)
        return synth.render(i, 128)[0].astype(np.float32)

    normal = render("Normal", "")
    for disease in layout.DISEASES[1:]:
        change = [np.abs(render(disease, s) - normal).mean() for s in layout.SEVERITIES]
        assert change[0] > 0.05, disease
        assert change[2] > change[0], (disease, change)


def test_generate_refuses_to_overwrite_an_existing_dataset(tmp_path):
    spec = synth.SynthSpec(num_images=8, images_per_identity=2, resolution=32)
    synth.generate(tmp_path, spec)
    before = (tmp_path / layout.LABELS_FILE).read_bytes()
    with pytest.raises(FileExistsError, match="labels.csv"):
        synth.generate(tmp_path, synth.SynthSpec(num_images=12, images_per_identity=2, resolution=32))
    assert (tmp_path / layout.LABELS_FILE).read_bytes() == before


def test_a_folder_rendered_from_another_spec_is_refused_not_reused(tmp_path):
    from ml_collections import ConfigDict

    from mema_jax.data import pipeline

    spec = synth.SynthSpec(num_images=8, images_per_identity=2, resolution=32)
    synth.generate(tmp_path, spec)
    asked = ConfigDict({"num_images": 8, "images_per_identity": 2, "resolution": 32, "seed": 0})
    assert len(pipeline.ensure_dataset(tmp_path, asked)) == 8
    asked.num_images = 12
    with pytest.raises(ValueError, match="synth_spec.json: this folder was rendered with another spec"):
        pipeline.ensure_dataset(tmp_path, asked)
