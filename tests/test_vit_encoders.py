"""Tab. 10's alternative medical encoders: a ViT trained supervised, and one trained as an MAE.

Shapes of the encoder features; MAE masking and its masked-only loss on hand-built cases; each
trainer lowers its loss; the exported encoder folder loads back to identical features and a wrong
file is one WeightsError; the MAE trainer killed and restarted through launch.main ends bit for bit
where an uninterrupted run ends; a sharded step (data=2, fsdp=4) equals the one-device step.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from parity import FP32_TOL, rel_err
from training_runs import kill_at_step, restored_state, run_env

from configs.vit_encoder import get_config
from mema_jax.core import loop
from mema_jax.core import sharding as shd
from mema_jax.data import pipeline
from mema_jax.models import vit, weights
from mema_jax.trainers import mae as mae_trainer
from mema_jax.trainers import vit_supervised

TRAINERS = {"supervised": vit_supervised, "mae": mae_trainer}
TINY = vit.ViTConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64)
TINY_MAE = vit.MAEConfig(mask_ratio=0.75, decoder_width=16, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=32)


def tiny_config(kind, data_root):
    c = get_config(f"tiny_{kind}")
    c.data.root = str(data_root)
    return c


def one_device():
    return shd.make_mesh({"data": 1}, devices=jax.devices()[:1]), shd.DEFAULT_RULES


def host_batches(dataset, config, n):
    it = iter(pipeline.make_loader(dataset, "train", global_batch_size=config.batch_size,
                                   image_size=config.data.image_size, seed=config.seed, augment=False))
    return [next(it) for _ in range(n)]


def images(n=2, size=32, seed=0):
    return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1.0, maxval=1.0)


# ---------------------------------------------------------------------------------------------- model

def test_features_are_the_patch_tokens_on_the_grid():
    model = vit.ViT(TINY)
    x = images(3)
    params = model.init(jax.random.key(0), x)["params"]
    tokens = model.apply({"params": params}, x)
    features = model.apply({"params": params}, x, method=model.features)
    assert tokens.shape == (3, 1 + 16, 32)
    assert features.shape == (3, 32 // 8, 32 // 8, 32)
    # Row-major: grid cell (i, j) is token 1 + 4 i + j.
    np.testing.assert_array_equal(np.asarray(features[:, 2, 1]), np.asarray(tokens[:, 1 + 4 * 2 + 1]))
    with pytest.raises(ValueError, match="do not match"):
        model.apply({"params": params}, images(1, size=64), method=model.features)

    classifier = vit.ViTClassifier(TINY, heads=(("disease", 8), ("severity", 3)))
    cparams = classifier.init(jax.random.key(0), x)["params"]
    assert set(cparams) == {"encoder", "head_disease", "head_severity"}
    assert jax.tree.structure(cparams["encoder"]) == jax.tree.structure(params)
    logits = classifier.apply({"params": cparams}, x)
    assert logits["disease"].shape == (3, 8) and logits["severity"].shape == (3, 3)

    mae = vit.MAE(TINY, TINY_MAE)
    out = mae.apply(mae.init(jax.random.key(0), x, jnp.zeros((3, 16))), x, jax.random.uniform(jax.random.key(1), (3, 16)))
    assert out["pred"].shape == (3, 16, 8 * 8 * 3) and out["mask"].shape == (3, 16) and out["per_sample"].shape == (3,)


@pytest.mark.parametrize("num_patches, ratio, masked", [(16, 0.75, 12), (64, 0.75, 48), (1024, 0.75, 768),
                                                        (10, 0.6, 6), (49, 0.75, 37)])
def test_random_masking_hides_exactly_the_configured_fraction(num_patches, ratio, masked):
    noise = jax.random.uniform(jax.random.key(3), (5, num_patches))
    keep, mask, restore = (np.asarray(a) for a in vit.random_masking(noise, ratio))
    # floor(N (1 - ratio)) visible, as MAE's int(L * (1 - mask_ratio)); 49 patches at 0.75: 12 visible, 37 masked.
    np.testing.assert_array_equal(mask.sum(1), masked)
    assert set(np.unique(mask)) == {0.0, 1.0}
    order = np.argsort(np.asarray(noise), axis=1)
    for b in range(5):
        visible = np.flatnonzero(mask[b] == 0)
        np.testing.assert_array_equal(np.sort(keep[b]), visible)  # keep lists exactly the visible patches,
        np.testing.assert_array_equal(np.sort(order[b, :num_patches - masked]), visible)  # the lowest-noise ones
        np.testing.assert_array_equal(order[b][restore[b]], np.arange(num_patches))  # restore inverts the shuffle
    # Each sample draws its own mask.
    assert len({tuple(m) for m in mask}) == 5


def test_masked_patch_loss_counts_only_the_masked_patches():
    # One image, four patches of two values; patches 1 and 3 masked.
    target = jnp.zeros((1, 4, 2))
    mask = jnp.array([[0.0, 1.0, 0.0, 1.0]])
    pred = jnp.array([[[100.0, -100.0], [1.0, 1.0], [50.0, 7.0], [2.0, 0.0]]])
    loss, per_sample = vit.masked_patch_loss(pred, target, mask)
    # Masked patches: mean((1, 1)^2) = 1, mean((2, 0)^2) = 2 -> 1.5; the visible patches' huge errors count nothing.
    assert float(loss) == 1.5 and float(per_sample[0]) == 1.5
    two = vit.masked_patch_loss(jnp.concatenate([pred, 2 * pred]), jnp.zeros((2, 4, 2)), jnp.concatenate([mask, mask]))
    np.testing.assert_allclose(np.asarray(two[1]), [1.5, 6.0])
    assert float(two[0]) == (1 + 2 + 4 + 8) / 4
    # norm_pix_loss: each patch minus its mean over its unbiased std (MAE's torch .var), eps 1e-6.
    patches = jnp.array([[[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]])
    normed = np.asarray(vit.patch_targets(patches, True))
    np.testing.assert_allclose(normed[0, 0], np.array([-1.0, 0.0, 1.0]) / np.sqrt(1 + 1e-6), rtol=1e-6)
    np.testing.assert_array_equal(normed[0, 1], 0.0)  # a flat patch: zero target, no division by zero
    np.testing.assert_array_equal(np.asarray(vit.patch_targets(patches, False)), np.asarray(patches))


def test_patchify_orders_patches_as_the_patch_embedding():
    x = images(2, size=32)
    patches = np.asarray(vit.patchify(x, 8))
    assert patches.shape == (2, 16, 192)
    # patch 6 = grid row 1, column 2: pixels [8:16, 16:24], flattened (row, column, channel).
    np.testing.assert_array_equal(patches[:, 6], np.asarray(x[:, 8:16, 16:24]).reshape(2, -1))


def test_mae_encoder_sees_only_the_visible_patches():
    mae = vit.MAE(TINY, TINY_MAE)
    x = images(2)
    noise = jax.random.uniform(jax.random.key(5), (2, 16))
    params = mae.init(jax.random.key(0), x, noise)
    mask = np.asarray(vit.random_masking(noise, 0.75)[1])
    masked_pixels = np.repeat(np.repeat(mask.reshape(2, 4, 4), 8, 1), 8, 2)[..., None] > 0
    changed = jnp.where(masked_pixels, -x, x)  # every masked patch altered, the visible ones kept
    a, b = mae.apply(params, x, noise), mae.apply(params, changed, noise)
    np.testing.assert_array_equal(np.asarray(a["pred"]), np.asarray(b["pred"]))  # the model never saw them...
    assert float(a["loss"]) != float(b["loss"])  # ...but they are what it is scored on
    visible_changed = jnp.where(masked_pixels, x, -x)
    assert not np.array_equal(np.asarray(mae.apply(params, visible_changed, noise)["pred"]), np.asarray(a["pred"]))


# ---------------------------------------------------------------------------------------------- trainers

@pytest.mark.parametrize("kind", list(TRAINERS))
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(kind, synth_dataset_32):
    config = tiny_config(kind, synth_dataset_32.root)
    config.optim.warmup_steps = 0
    config.optim.schedule = "constant"
    trainer = TRAINERS[kind]
    parts = trainer.build(config, *one_device())
    batch = loop.to_global(host_batches(synth_dataset_32, config, 1)[0], parts["shardings"])
    loss_fn = vit_supervised.classification_loss if kind == "supervised" else mae_trainer.mae_loss
    loss_at = jax.jit(lambda p: loss_fn(parts["model"], p, None, batch, jax.random.key(7))[0])
    state = parts["state_spec"].init()
    before = float(loss_at(state.params))
    for _ in range(10):
        state, _ = parts["train_step"](state, batch)
    after = float(loss_at(state.params))
    print(f"{kind}: loss on a fixed batch {before:.3f} -> {after:.3f} after 10 steps")
    # Measured: supervised 3.42 -> 0.70, mae 2.12 -> 1.63 (the MAE mask fixed by the key for the comparison).
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("kind", list(TRAINERS))
def test_exported_encoder_loads_back_to_identical_features(kind, tmp_path, synth_dataset_32):
    config = tiny_config(kind, synth_dataset_32.root)
    trainer = TRAINERS[kind]
    parts = trainer.build(config, *one_device())
    state = parts["state_spec"].init()
    for b in host_batches(synth_dataset_32, config, 2):
        state, _ = parts["train_step"](state, loop.to_global(b, parts["shardings"]))
    folder = tmp_path / "encoder"
    trainer.export_encoder(folder, parts["model"], state)
    assert sorted(os.listdir(folder)) == ["config.json", "params.safetensors"]
    assert json.loads((folder / "config.json").read_text())["training"]["step"] == 2

    module, params = vit.load_vit_encoder(folder)
    assert module.config == parts["model"].config
    x = images(4)
    ours = vit.ViT(module.config).apply({"params": jax.device_get(state.params)["encoder"]}, x, method=vit.ViT.features)
    loaded = module.apply({"params": params}, x, method=module.features)
    assert loaded.shape == (4, 4, 4, 32)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(ours))  # same weights, same program: bit for bit

    stamp = (folder / "params.safetensors").stat().st_mtime_ns
    trainer.export_encoder(folder, parts["model"], state)
    assert (folder / "params.safetensors").stat().st_mtime_ns == stamp  # a finished run's export is kept
    with pytest.raises(FileExistsError):
        vit.save_vit_encoder(folder, module.config, params)


def saved_tiny_encoder(folder):
    model = vit.ViT(TINY)
    params = model.init(jax.random.key(0), images(1))["params"]
    vit.save_vit_encoder(folder, TINY, shd.unbox(params))
    return weights.read_state_dict(folder / vit.WEIGHTS_FILE)


def test_a_wrong_weight_file_is_one_weights_error_naming_the_file_and_keys(tmp_path):
    good = saved_tiny_encoder(tmp_path / "good")
    bad = dict(good)
    del bad["blocks_1/attn/to_q/kernel"]
    bad["blocks_7/attn/to_q/kernel"] = good["blocks_0/attn/to_q/kernel"]
    bad["pos_embed"] = np.zeros((65, 32), np.float32)
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    weights.write_safetensors(folder / vit.WEIGHTS_FILE, bad)
    with pytest.raises(weights.WeightsError) as err:
        vit.load_vit_encoder(folder)
    message = str(err.value)
    assert str(folder / vit.WEIGHTS_FILE) in message
    assert "missing keys (1): ['blocks_1/attn/to_q/kernel']" in message
    assert "unexpected keys (1): ['blocks_7/attn/to_q/kernel']" in message
    assert "pos_embed: shape (65, 32), expected (17, 32)" in message

    # A config of a wider model than the weights: every mis-shaped tensor in the one error.
    (folder / "config.json").write_text(json.dumps(dict(TINY.to_dict(), width=64, mlp_dim=128)))
    weights.write_safetensors(folder / vit.WEIGHTS_FILE, good)
    with pytest.raises(weights.WeightsError, match="mis-shaped keys"):
        vit.load_vit_encoder(folder)
    # Another model's config, a missing folder: WeightsError naming the file.
    (folder / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "hidden_size": 32}))
    with pytest.raises(weights.WeightsError, match=r"bad/config.json: model_type is 'clip_vision_model'"):
        vit.load_vit_encoder(folder)
    (folder / "config.json").write_text(json.dumps(dict(TINY.to_dict(), dropout=0.1)))
    with pytest.raises(weights.WeightsError, match=r"unknown ViT config keys \['dropout'\]"):
        vit.load_vit_encoder(folder)
    with pytest.raises(weights.WeightsError, match="no_such_folder"):
        vit.load_vit_encoder(tmp_path / "no_such_folder")


@pytest.mark.parametrize("kind", list(TRAINERS))
def test_sharded_step_equals_the_one_device_step(kind, synth_dataset_32):
    config = tiny_config(kind, synth_dataset_32.root)
    # The attention key bias has a zero gradient in exact arithmetic (q.b_k adds one constant to a
    # query's logits, which the softmax ignores); Adam divides its rounding noise by itself into
    # +-lr steps of random sign (measured: to_k/bias 1.8 relative, all weights 5.5e-6, supervised,
    # 3 steps, eps 1e-8).  eps 1e-3 keeps that noise below 1e-5 lr, so what is compared is the
    # sharding, not noise / noise (as tests/test_identity_trainer.py does for its BatchNorm'd bias).
    config.optim.eps = 1e-3
    results = []
    for mesh in (one_device()[0], shd.make_mesh({"data": 2, "fsdp": 4})):
        parts = TRAINERS[kind].build(config, mesh, shd.DEFAULT_RULES)
        state, metrics = parts["state_spec"].init(), []
        for b in host_batches(synth_dataset_32, config, 3):
            state, m = parts["train_step"](state, loop.to_global(b, parts["shardings"]))
            metrics.append(jax.device_get(m))
        results.append((jax.device_get(state), metrics))
    (s1, m1), (s8, m8) = results
    # The same fp32 arithmetic in another reduction order (batch sums across 8 devices, fsdp-split
    # matmuls); the masking noise is the same array either way.  Bound: FP32_TOL = 1e-5 relative
    # (measured: loss ~1e-7, grad norm ~4e-7, weights ~1e-8).
    errors = {"loss": max(rel_err(b["loss"], a["loss"]) for a, b in zip(m1, m8)),
              "grad_norm": max(rel_err(b["grad_norm"], a["grad_norm"]) for a, b in zip(m1, m8))}
    flat1, flat8 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(s.params)]) for s in (s1, s8))
    errors["params"] = rel_err(flat8, flat1)
    print(f"{kind}: sharded vs one device after 3 steps: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert all(v <= FP32_TOL for v in errors.values()), errors


# ---------------------------------------------------------------------------------------------- launch.main (subprocesses)

TOTAL_STEPS = 24


def launch_cmd(workdir, data_root):
    return [sys.executable, "-m", "launch.main", "--config=configs/vit_encoder.py:tiny_mae", f"--workdir={workdir}",
            f"--config.data.root={data_root}", f"--config.total_steps={TOTAL_STEPS}", "--config.checkpoint_every=4",
            "--config.log_every=2", "--config.grad_accum_steps=2", "--config.ema_decay=0.9"]


def final_state(workdir):
    return restored_state(workdir, TOTAL_STEPS)


def test_mae_killed_and_restarted_equals_uninterrupted_bit_for_bit_and_exports_its_encoder(tmp_path, synth_dataset_32):
    data = synth_dataset_32.root
    straight = tmp_path / "straight"
    subprocess.run(launch_cmd(straight, data), cwd=REPO, env=run_env(), check=True, capture_output=True, timeout=900)

    killed = tmp_path / "killed"
    kill_at_step(launch_cmd(killed, data), TOTAL_STEPS // 2)
    assert not (killed / mae_trainer.ENCODER_DIR).exists()
    restart = subprocess.run(launch_cmd(killed, data), cwd=REPO, env=run_env(), check=True, capture_output=True,
                             text=True, timeout=900)
    resumed = [line for line in restart.stdout.splitlines() if line.startswith("resumed from step")]
    assert resumed and 0 < int(resumed[0].split()[3]) < TOTAL_STEPS, restart.stdout

    a, b = final_state(straight), final_state(killed)
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):  # weights, EMA weights, optimizer moments, step
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for name in ("config.json", "params.safetensors"):
        assert (killed / "encoder" / name).read_bytes() == (straight / "encoder" / name).read_bytes()

    # The exported encoder is the run's EMA encoder: identical features.
    module, params = vit.load_vit_encoder(straight / "encoder")
    x = images(3)
    ema_encoder = jax.tree.map(jnp.asarray, a["ema_params"]["encoder"])
    np.testing.assert_array_equal(np.asarray(module.apply({"params": params}, x, method=module.features)),
                                  np.asarray(module.apply({"params": ema_encoder}, x, method=module.features)))
