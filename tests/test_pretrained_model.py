"""The MedSem-DeID shipped in pretrained/ (the quickstart evaluates it; pretrained/medsem_deid_synth64/MODEL.md
says how it was made) loads through the user's path and still does its job on 16 MeMa-Synth validation faces,
rendered here by the data set's own renderer (the same pixels as data/mema_synth_64_3k, which the test does not
need). Floors, below the figures MODEL.md gives for these 16 faces so that a changed loader, layer or
preprocessing fails while float noise does not:
  * recovery with the right password >= 25 dB mean PSNR (measured 26-27 dB);
  * a wrong password's output is another image: < 16 dB (measured ~11 dB), and below every recovery;
  * the medical features (the frozen Enc_med the model ships with) of each de-identified face are nearest to its own
    original's among the 16 (measured 16 of 16; required 14), and on average 4x closer than to the others'.
Identity is scored by the quickstart's report with an evaluation-only ArcFace; no such 64 px model is in the suite."""
import numpy as np
import pytest

from deid_jax.deidentify import Deidentifier
from launch.pipeline import PRETRAINED_MODEL
from mema_jax.data import synth

# data/mema_synth_64_3k: the quickstart's MeMa-Synth (configs' data.synth block).
SPEC = synth.SynthSpec(num_images=3000, images_per_identity=4, resolution=64, seed=0)
FACES = 16


def psnr(a, b):
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def outputs():
    model = Deidentifier.load(PRETRAINED_MODEL)
    assert model.size == SPEC.resolution
    val = [image for image in synth.plan(SPEC) if image.split == "val"][:FACES]
    originals = np.stack([synth.render(image, SPEC.resolution)[0] for image in val])
    rng = np.random.default_rng(0)
    password, wrong = (rng.standard_normal(512).astype(np.float32) for _ in range(2))
    deidentified, encrypted = model.deidentify(originals, password)
    return {"model": model, "x": originals, "x_enc": deidentified, "x_hat": model.recover(encrypted, password),
            "x_wrong": model.recover(encrypted, wrong)}


def test_the_right_password_recovers_and_a_wrong_one_does_not(outputs):
    recovered, wrong = psnr(outputs["x_hat"], outputs["x"]), psnr(outputs["x_wrong"], outputs["x"])
    assert recovered.mean() >= 25.0, recovered
    assert wrong.mean() < 16.0 and wrong.max() < recovered.min(), (wrong, recovered)


def test_the_deidentified_face_keeps_its_medical_features(outputs):
    import jax.numpy as jnp

    medical = outputs["model"].medical

    def features(images):
        return np.asarray(medical.apply(medical.params, jnp.asarray(images, jnp.float32) / 127.5 - 1.0)).reshape(FACES, -1)

    ours, originals = features(outputs["x_enc"]), features(outputs["x"])
    distance = ((ours[:, None] - originals[None]) ** 2).mean(-1)  # (de-identified i, original j)
    own, others = np.diag(distance), distance[~np.eye(FACES, dtype=bool)]
    assert (distance.argmin(1) == np.arange(FACES)).sum() >= 14, distance.argmin(1)
    assert own.mean() * 4 < others.mean(), (own.mean(), others.mean())
