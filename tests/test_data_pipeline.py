"""grain pipelines over the MeMa layout: batches, determinism, checkpointable iterator."""
import numpy as np

from mema_jax.data import pipeline


def loader(ds, **kw):
    args = dict(global_batch_size=8, image_size=32, seed=11, with_masks=True)
    args.update(kw)
    return pipeline.make_loader(ds, "train", **args)


def test_batches_have_the_documented_shapes_and_ranges(synth_dataset_32):
    batch = next(iter(loader(synth_dataset_32)))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].shape == (8,) and batch["mask"].shape == (8, 32, 32)
    assert set(np.unique(batch["severity"])) <= {-1, 0, 1, 2}


def test_same_seed_same_batches_and_resized_images(synth_dataset_32):
    a = [b["index"] for _, b in zip(range(3), loader(synth_dataset_32))]
    b = [b["index"] for _, b in zip(range(3), loader(synth_dataset_32))]
    c = [b["index"] for _, b in zip(range(3), loader(synth_dataset_32, seed=12))]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    big = next(iter(loader(synth_dataset_32, image_size=48)))
    assert big["image"].shape == (8, 48, 48, 3) and big["mask"].shape == (8, 48, 48)


def test_iterator_state_restores_the_exact_next_batches(synth_dataset_32):
    it = iter(loader(synth_dataset_32))
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    fresh = iter(loader(synth_dataset_32))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_augmentation_flips_image_and_mask_together_and_jitters_only_the_image():
    # Left-to-right ramp and a left-half mask: a flip is visible in both.
    image = np.tile(np.linspace(0, 255, 16, dtype=np.float32), (16, 1))[..., None].repeat(3, -1).astype(np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[:, :8] = True
    element = {"image": image, "mask": mask}
    flip_only = pipeline.Augment(brightness=0.0, contrast=0.0)
    flipped = []
    for seed in range(32):
        out = flip_only.random_map(dict(element), np.random.default_rng(seed))
        was_flipped = bool(out["mask"][0, -1])
        np.testing.assert_array_equal(out["mask"], mask[:, ::-1] if was_flipped else mask)
        np.testing.assert_array_equal(out["image"], image[:, ::-1] if was_flipped else image)
        flipped.append(was_flipped)
    assert 0 < sum(flipped) < len(flipped)  # both outcomes occur

    jitter = pipeline.Augment(flip=False, brightness=0.1, contrast=0.1)
    out = jitter.random_map(dict(element), np.random.default_rng(0))
    np.testing.assert_array_equal(out["mask"], mask)
    assert np.abs(out["image"].astype(int) - image.astype(int)).max() > 0


def test_loader_augmentation_flips_some_masks_of_a_batch(synth_dataset_32):
    plain = next(iter(loader(synth_dataset_32, augment=False, global_batch_size=16)))
    aug = next(iter(loader(synth_dataset_32, global_batch_size=16)))
    np.testing.assert_array_equal(plain["index"], aug["index"])
    asymmetric = [i for i in range(16) if not np.array_equal(plain["mask"][i], plain["mask"][i][:, ::-1])]
    assert len(asymmetric) >= 2, "the batch has too few tumour masks to show a flip"
    flips = []
    for i in asymmetric:
        m, ma = plain["mask"][i], aug["mask"][i]
        assert np.array_equal(ma, m) or np.array_equal(ma, m[:, ::-1])
        flips.append(np.array_equal(ma, m[:, ::-1]))
    assert any(flips) and not all(flips)  # seed 11: some flipped, some not (as the ramp test shows generally)
