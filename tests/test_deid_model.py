"""MedSem-DeID's parts as specifications: shapes, each loss term, passwords, what gradients reach."""
import hashlib
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from deid_jax import losses, passwords, payload
from deid_jax import medical_encoder as med_lib
from deid_jax.model import DeidConfig, MedSemDeID, quantize_8bit, sign_mask


def shapes_of(cfg: DeidConfig, med_shape):
    model = MedSemDeID(cfg)
    x = jax.ShapeDtypeStruct((2, cfg.image_size, cfg.image_size, 3), jnp.float32)
    f_med = jax.ShapeDtypeStruct(med_shape, jnp.float32) if med_shape else None
    p = jax.ShapeDtypeStruct((2, cfg.password_dim), jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), None if f_med is None else
                                               jnp.zeros(f_med.shape), jnp.zeros(p.shape), jnp.zeros(p.shape)))
    f_face = jax.eval_shape(lambda v, x: model.apply(v, x, method=lambda m, x: m.image_encoder(x)), params, x)
    out = jax.eval_shape(lambda v, x, f, p: model.apply(v, x, f, p, p), params, x, f_med, p)
    return f_face, out


def test_sd15_sized_model_has_the_papers_feature_shapes_at_512_px():
    cfg = DeidConfig()  # the :paper architecture
    # SD1.5's Enc_med: VAE /8, first down block /2: 320 x H/16.
    f_face, out = shapes_of(cfg, (2, 32, 32, 320))
    assert f_face.shape == (2, 16, 16, 512)  # 512 x H/32
    assert out.f.shape == out.f_enc.shape == (2, 16, 16, 512)
    assert out.x_enc.shape == out.x_hat.shape == out.x_wrong.shape == (2, 512, 512, 3)


@pytest.mark.parametrize("mode", ["token", "cross_attention", "modulation"])
@pytest.mark.parametrize("recover_from", ["features", "image"])
def test_small_models_in_every_password_mode_and_recovery_path(mode, recover_from):
    cfg = DeidConfig(image_size=32, encoder_widths=(8, 16, 16), face_channels=16, med_channels=8, width=16, depth=1,
                     heads=2, decoder_widths=(16, 16, 8), norm_groups=4, password_mode=mode, recover_from=recover_from)
    f_face, out = shapes_of(cfg, (2, 16, 16, 8))
    assert f_face.shape == (2, 8, 8, 16) and out.f_enc.shape == (2, 8, 8, 16)
    assert out.x_hat.shape == (2, 32, 32, 3)


def assert_same(a, b):
    """fp32 values of the same per-sample computation run in batches of B and of 2B / 3B: only the
    summation order inside matmuls and convolutions may differ (~K * 2**-24 relative, K <= 576
    products here: 3e-5 worst case, ~1e-7 typical); relative 1e-5 of the largest value, while a
    mixed-up sample or password changes outputs by O(1)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))


@pytest.mark.parametrize("mode,recover_from", [("token", "features"), ("cross_attention", "image"),
                                               ("modulation", "features")])
def test_password_changes_the_encryption_and_no_f_med_model_ignores_f_med(mode, recover_from):
    cfg = DeidConfig(image_size=32, encoder_widths=(8, 16, 16), face_channels=16, med_channels=0, width=16, depth=1,
                     heads=2, decoder_widths=(16, 16, 8), norm_groups=4, password_mode=mode, recover_from=recover_from)
    model = MedSemDeID(cfg)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    p1, p2 = jnp.asarray(rng.normal(size=(2, 2, 512)), jnp.float32)
    v = model.init(jax.random.key(0), x, None, p1, p2)
    a = model.apply(v, x, None, p1, p2)
    b = model.apply(v, x, None, p2, p1)
    assert not np.allclose(a.f_enc, b.f_enc)  # another key, another encryption
    # The training forward (batched) is deidentify, then recover with each key: X_wrong is the
    # encrypted input decrypted with the other key, X_hat with the right one.
    x_enc, f_enc = model.apply(v, x, None, p1, method=MedSemDeID.deidentify)
    assert_same(a.x_enc, x_enc)
    assert_same(a.f_enc, f_enc)
    # X_enc is decoded from the encryptor's output itself; what is stored, f_enc, is that under the pad.
    assert_same(x_enc, model.apply(v, f_enc * sign_mask(p1, f_enc.shape[1:]), method=MedSemDeID.decode))
    encrypted = x_enc if recover_from == "image" else f_enc
    assert_same(a.x_wrong, model.apply(v, encrypted, p2, method=MedSemDeID.recover))
    assert_same(a.x_hat, model.apply(v, encrypted, p1, method=MedSemDeID.recover))
    assert np.max(np.abs(np.asarray(a.x_hat) - np.asarray(a.x_wrong))) > 1e-2
    ignored = model.apply(v, x, jnp.ones((2, 16, 16, 8)), p1, p2)
    np.testing.assert_array_equal(ignored.x_enc, a.x_enc)


def test_each_loss_term_against_a_hand_computation():
    phi_x = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    phi_y = np.array([[1.0, 1.0], [0.0, -3.0]], np.float32)
    cos = np.array([1 / np.sqrt(2), -1.0])
    np.testing.assert_allclose(losses.cosine(phi_x, phi_y), cos, rtol=1e-6)
    np.testing.assert_allclose(losses.deid_loss(phi_x, phi_y), cos.mean(), rtol=1e-6)
    np.testing.assert_allclose(losses.rev_id_loss(phi_x, phi_y), -cos.mean(), rtol=1e-6)
    np.testing.assert_allclose(losses.wrong_loss(phi_x, phi_y), cos.mean(), rtol=1e-6)
    a, b = np.zeros((1, 2, 2, 1), np.float32), np.array([1.0, -1.0, 2.0, 0.0], np.float32).reshape(1, 2, 2, 1)
    np.testing.assert_allclose(losses.med_loss(a, b), (1 + 1 + 4 + 0) / 4, rtol=1e-6)
    np.testing.assert_allclose(losses.rev_loss(a, b), (1 + 1 + 2 + 0) / 4, rtol=1e-6)
    logits = np.array([0.0, 2.0], np.float32)
    np.testing.assert_allclose(losses.generator_gan_loss(logits), np.mean(np.log1p(np.exp(-logits))), rtol=1e-6)
    np.testing.assert_allclose(losses.discriminator_gan_loss(logits, -logits),
                               2 * np.mean(np.log1p(np.exp(-logits))), rtol=1e-6)
    # L_sep: l1(X_hat, X_wrong) = 0.1 < margin 0.25 -> 0.15; l1(X, X_hat) = 0, l1(X, X_wrong) = 0.1 -> 0.25 - 0.1
    x_hat, x_wrong = np.zeros((1, 2, 2, 1), np.float32), np.full((1, 2, 2, 1), 0.1, np.float32)
    np.testing.assert_allclose(losses.separation_loss(x_hat, x_hat, x_wrong, 0.25), 0.15 + 0.15, rtol=1e-6)
    np.testing.assert_allclose(losses.separation_loss(x_hat, x_hat, x_wrong + 0.5, 0.25), 0.0, atol=1e-7)
    # PSNR of images in [-1, 1] (range 2): an error of 0.2 everywhere is 20 log10(2 / 0.2) = 20 dB.
    np.testing.assert_allclose(losses.psnr(a + 0.2, a), [20.0], rtol=1e-5)


def test_the_sign_pad_is_fixed_per_password_and_another_password_flips_about_half_the_signs():
    rng = np.random.default_rng(1)
    p = jnp.asarray(rng.normal(size=(3, 512)), jnp.float32)
    m = sign_mask(p, (8, 8, 16))
    assert m.shape == (3, 8, 8, 16) and set(np.unique(np.asarray(m))) == {-1.0, 1.0}
    np.testing.assert_array_equal(sign_mask(p, (8, 8, 16)), m)  # a saved model's pads never change
    np.testing.assert_array_equal(sign_mask(p[1:2], (8, 8, 16))[0], m[1])  # independent of the batch
    for i, j in ((0, 1), (0, 2), (1, 2)):
        flipped = np.mean(np.asarray(m[i]) != np.asarray(m[j]))
        assert 0.4 < flipped < 0.6, flipped  # 1024 signs: 0.5 +- 5 sigma
    near = p.at[0, 100].add(1e-3)  # any change of the password gives an unrelated pad
    assert 0.4 < np.mean(np.asarray(sign_mask(near, (8, 8, 16))[0]) != np.asarray(m[0])) < 0.6


def test_quantisation_is_what_a_png_stores_with_a_straight_through_gradient():
    x = jnp.array([-1.0, -0.3, 0.0, 0.5, 1.2])
    q = quantize_8bit(x)
    np.testing.assert_allclose(q, np.round((np.clip(x, -1, 1) + 1) * 127.5) / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(quantize_8bit(v)))(x), np.ones(5))


def test_the_same_passphrase_gives_the_same_vector_in_a_new_process_and_nothing_secret_is_stored(tmp_path):
    params = passwords.KeyParams(salt=bytes(range(16)), log2_n=12)
    here = passwords.password_vector("correct horse battery", params)
    assert here.shape == (512,) and here.dtype == np.float32
    code = ("import sys; sys.path.insert(0, %r); from deid_jax import passwords; import hashlib;"
            "v = passwords.password_vector('correct horse battery', passwords.KeyParams(salt=bytes(range(16)), log2_n=12));"
            "print(hashlib.sha256(v.tobytes()).hexdigest())" % str(REPO))
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert there == hashlib.sha256(here.tobytes()).hexdigest()
    other_salt = passwords.password_vector("correct horse battery", passwords.KeyParams(salt=b"x" * 16, log2_n=12))
    other_phrase = passwords.password_vector("correct horse batterY", params)
    assert not np.allclose(here, other_salt) and not np.allclose(here, other_phrase)
    path = params.save(tmp_path)
    text = path.read_text()
    assert "correct horse" not in text and json.loads(text)["salt"] == bytes(range(16)).hex()
    assert passwords.KeyParams.load(tmp_path) == params
    with pytest.raises(passwords.PasswordError, match="password.json: missing"):
        passwords.KeyParams.load(tmp_path / "elsewhere")
    with pytest.raises(passwords.PasswordError, match="empty"):
        passwords.password_vector("", params)


def test_a_passphrase_gives_the_vector_of_the_32_byte_derivation_and_a_separate_sealing_key():
    params = passwords.KeyParams(salt=bytes(range(16)), log2_n=12)
    secret = passwords.derive("correct horse battery", params)
    seed = hashlib.scrypt(b"correct horse battery", salt=params.salt, n=2**12, r=8, p=1, dklen=32)
    want = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "little"))).standard_normal(512)
    np.testing.assert_array_equal(secret.vector, want.astype(np.float32))  # older folders still recover
    assert len(secret.payload_key) == 32 and secret.payload_key != seed
    assert passwords.derive("correct horse batterY", params).payload_key != secret.payload_key


def test_sealed_features_open_only_with_their_key_and_image_name_and_hide_the_values():
    key, other_key = bytes(32), bytes([7] * 32)
    f_enc = np.random.default_rng(0).standard_normal((4, 4, 8)).astype(np.float32)
    blob = payload.seal(key, "images/a.png", f_enc)
    np.testing.assert_array_equal(payload.unseal(key, "images/a.png", blob, "a.sealed"), f_enc)
    assert f_enc.tobytes() not in blob and f_enc[0, 0].tobytes() not in blob
    assert payload.seal(key, "images/a.png", f_enc) != blob  # a fresh nonce each time
    tampered = blob[:-30] + bytes([blob[-30] ^ 1]) + blob[-29:]
    for k, name, b in ((other_key, "images/a.png", blob), (key, "images/b.png", blob), (key, "images/a.png", tampered)):
        with pytest.raises(payload.PayloadError, match=r"^a\.sealed: does not open with this passphrase"):
            payload.unseal(k, name, b, "a.sealed")
    with pytest.raises(payload.PayloadError, match=r"^a\.npy: not a sealed features file"):
        payload.unseal(key, "images/a.png", b"\x93NUMPY" + bytes(100), "a.npy")


def test_passphrase_sources_never_take_it_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMA_PASSPHRASE", "from the environment")
    assert passwords.read_passphrase(env="MEMA_PASSPHRASE") == "from the environment"
    secret = tmp_path / "secret.txt"
    secret.write_text("from a file\nsecond line ignored\n")
    assert passwords.read_passphrase(file=str(secret)) == "from a file"
    with pytest.raises(passwords.PasswordError, match="MISSING_VAR is not set"):
        passwords.read_passphrase(env="MISSING_VAR")


def test_medical_encoder_from_a_trained_diffusion_model_is_frozen_deterministic_and_saved(tiny_diffusion_model, tmp_path):
    enc = med_lib.diffusion_encoder(tiny_diffusion_model, num_down_blocks=1, timestep=50)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    f = enc.apply(enc.params, x)
    assert f.shape == (2, 16, 16, enc.channels)  # pixel model: conv_in + first down block = H/2
    np.testing.assert_array_equal(enc.apply(enc.params, x), f)  # a fixed noise pattern, not a fresh draw
    assert set(enc.params["unet"]) == {"conv_in", "time_embedding", "down_blocks_0"}  # only what it uses
    back = med_lib.load(med_lib.save(enc, tmp_path / "enc"))
    np.testing.assert_array_equal(back.apply(back.params, x), f)
    with pytest.raises(med_lib.weights.WeightsError, match="not a diffusion model folder"):
        med_lib.diffusion_encoder(tmp_path)


def test_discriminator_step_leaves_the_generator_alone_and_frozen_parts_get_no_update(tiny_diffusion_model,
                                                                                     tiny_identity_backbone,
                                                                                     synth_dataset_32):
    from configs.medsem_deid import get_config
    from deid_jax import train
    from mema_jax.core import sharding as shd
    from mema_jax.core import train_state as ts
    from mema_jax.data import pipeline
    from mema_jax.models.convert_iresnet import load_iresnet

    config = get_config("tiny")
    config.medical_encoder.source = str(tiny_diffusion_model)
    config.optim.lr = 0.0  # the generator's optimizer does nothing: any change would come from D's step
    config.loss.lambda_ae = 1.0  # every term of the objective, the autoencoder term of :synth too
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    med = train.load_medical_encoder(config, mesh, shd.DEFAULT_RULES)
    identity = load_iresnet(tiny_identity_backbone)
    parts = train.make_parts(config, med, identity)
    init_params, tx, loss_fns = train.parameter_groups(config, med, parts, 10)
    assert set(loss_fns) == {"generator", "discriminator"}
    spec = ts.sharded_state(init_params, tx, mesh, shd.DEFAULT_RULES, seed=0)
    frozen, frozen_shardings = ts.place_frozen({"identity": identity[1], "med": med.params}, mesh, shd.DEFAULT_RULES)
    loader = pipeline.make_loader(synth_dataset_32, "train", global_batch_size=4, image_size=32, seed=0, augment=False,
                                  with_faces=True)
    batch = {k: jnp.asarray(v) for k, v in next(iter(loader)).items()}
    step = ts.make_train_step(loss_fns, tx, mesh=mesh, rules=shd.DEFAULT_RULES,
                              state_shardings=spec.shardings, batch_shardings=None, frozen_shardings=frozen_shardings,
                              seed=0)
    frozen_before = jax.tree.map(np.array, frozen)
    state = spec.init()
    before = jax.device_get(state.params)
    state, metrics = step(state, batch, frozen)
    after = jax.device_get(state.params)
    for a, b in zip(jax.tree.leaves(after["generator"]), jax.tree.leaves(before["generator"])):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after["discriminator"]),
                                                        jax.tree.leaves(before["discriminator"])))
    assert float(metrics["generator/grad_norm"]) > 0  # the generator did get gradients: lr 0 held it
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert {"deid", "rev_id", "wrong", "rev", "med", "gan", "ae", "sep"} <= {k.split("/")[1] for k in metrics}
