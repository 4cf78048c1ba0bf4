"""The diffusion trainer (configs/mema_lora.py) through launch.main, as a user runs it.

Runs are the :tiny variant (32 px MeMa-Synth, a two-level pixel-space UNet, a random frozen text
tower) in subprocesses; each takes seconds after a ~20 s compile.
"""
import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, made_once
from parity import rel_err
from training_runs import kill_at_step, metric, restored_state, run_env

from mema_jax.models import ip_adapter, lora
from mema_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
from mema_jax.models.convert_clip import save_clip_vision
from mema_jax.models.convert_unet import load_unet


def launch_command(workdir, data_root, *overrides):
    return [sys.executable, "-m", "launch.main", "--config=configs/mema_lora.py:tiny", f"--workdir={workdir}",
            f"--config.data.root={data_root}", *overrides]


def launch(workdir, data_root, *overrides, devices=1, check=True):
    result = subprocess.run(launch_command(workdir, data_root, *overrides), cwd=REPO, env=run_env(devices),
                            capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def final_params(workdir, step):
    return restored_state(workdir, step)["params"]


def folder_digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def base_model(tiny_diffusion_model):
    """A tiny UNet trained in full (mode=full; conftest's run, shared): its workdir, whose exported
    pipeline folder is the LoRA base."""
    workdir = tiny_diffusion_model.parent
    assert "exported full:" in (workdir / "launch.stdout").read_text()
    return workdir


def test_full_run_exports_a_pipeline_folder_and_sample_grids(base_model):
    model = base_model / "model"
    assert sorted(os.listdir(model)) == ["scheduler", "text_encoder", "tokenizer", "unet"]
    unet, _ = load_unet(model / "unet")
    assert unet.config.in_channels == 3  # pixel space
    from PIL import Image

    grid = np.asarray(Image.open(base_model / "samples" / "step_000024.png"))
    assert grid.shape == (8 * 32, 1 * 32, 3)  # one row per disease prompt, one column per seed
    mse = metric(base_model, "eval/denoise_mse")
    assert sorted(mse) == [0, 12, 24] and mse[24] < mse[0]


def test_lora_lowers_the_denoising_loss_below_the_frozen_base_and_leaves_the_base_untouched(base_model, tmp_path,
                                                                                            synth_dataset_32):
    model = base_model / "model"
    before = folder_digest(model)
    workdir = tmp_path / "lora"
    launch(workdir, synth_dataset_32.root, "--config.mode=lora", f"--config.model.pretrained={model}",
           "--config.lora.rank=4", "--config.lora.alpha=8", "--config.total_steps=64", "--config.eval_every=64",
           "--config.checkpoint_every=64", "--config.optim.lr=1e-2", "--config.ema_decay=0")
    mse = metric(workdir, "eval/denoise_mse")
    # Step 0 is the frozen base itself (LoRA up = 0).  Measured: 0.553 -> 0.533 (0.963x) at step 60.
    assert mse[64] < 0.97 * mse[0], mse
    assert folder_digest(model) == before
    # Only LoRA leaves were trained; the exported file is them, at scale alpha / r.
    params = final_params(workdir, 64)
    assert {p.rsplit("/", 1)[-1] for p in lora.param_tree.flatten(params)} == {"lora_down", "lora_up"}
    unet, base = load_unet(model / "unet")
    adapter, scales = lora.load_lora(workdir / "lora" / "pytorch_lora_weights.safetensors", base, unet.config)
    assert set(scales.values()) == {2.0}
    for a, b in zip(jax.tree.leaves(adapter), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


LORA = ("--config.mode=lora", "--config.lora.rank=4", "--config.eval_every=0", "--config.ema_decay=0.9",
        "--config.grad_accum_steps=2")
STRAIGHT_STEPS = 24


@pytest.fixture(scope="module")
def straight_lora(base_model, tmp_path_factory, synth_dataset_32):
    """One uninterrupted one-device LoRA run (EMA, gradient accumulation), checkpoints at every 4th
    step all kept, made once for both xdist workers: the reference of the sharded and the killed runs."""
    return made_once(tmp_path_factory, "diffusion_trainer/straight_lora", lambda workdir: launch(
        workdir, synth_dataset_32.root, *LORA, f"--config.model.pretrained={base_model / 'model'}",
        f"--config.total_steps={STRAIGHT_STEPS}", "--config.checkpoint_every=4", "--config.keep_checkpoints=6"))


def test_lora_step_on_8_devices_equals_one_device(base_model, straight_lora, tmp_path, synth_dataset_32):
    launch(tmp_path / "eight", synth_dataset_32.root, *LORA, f"--config.model.pretrained={base_model / 'model'}",
           "--config.total_steps=4", "--config.mesh.data=2", "--config.mesh.fsdp=4", devices=8)
    one, eight = final_params(straight_lora, 4), final_params(tmp_path / "eight", 4)
    # fp32: only the order of the batch and gradient reductions differs (~1e-7 measured).
    for a, b in zip(jax.tree.leaves(eight), jax.tree.leaves(one), strict=True):
        assert rel_err(np.asarray(a), np.asarray(b)) <= 1e-5


def test_killed_lora_run_resumes_bit_for_bit(base_model, straight_lora, tmp_path, synth_dataset_32):
    args = (*LORA, f"--config.model.pretrained={base_model / 'model'}", f"--config.total_steps={STRAIGHT_STEPS}",
            "--config.checkpoint_every=4", "--config.keep_checkpoints=6")
    kill_at_step(launch_command(tmp_path / "killed", synth_dataset_32.root, *args), 12)
    restart = launch(tmp_path / "killed", synth_dataset_32.root, *args)
    assert "resumed from step" in restart.stdout
    for a, b in zip(jax.tree.leaves(final_params(tmp_path / "killed", STRAIGHT_STEPS)),
                    jax.tree.leaves(final_params(straight_lora, STRAIGHT_STEPS)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def write_image_encoder(folder):
    """A tiny random CLIP vision tower (32 px), saved in transformers' format."""
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                             num_attention_heads=2, image_size=32, patch_size=8,
                                                             projection_dim=24))
    params = encoder.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    save_clip_vision(folder, encoder, jax.tree.map(lambda b: b.value, params, is_leaf=lambda x: hasattr(x, "names")))
    return folder


def test_ip_adapter_training_changes_only_its_own_weights(base_model, tmp_path, synth_dataset_32):
    write_image_encoder(tmp_path / "image_encoder")
    model = base_model / "model"
    before = folder_digest(model)
    workdir = tmp_path / "ip"
    launch(workdir, synth_dataset_32.root, "--config.mode=ip_adapter", f"--config.model.pretrained={model}",
           f"--config.ip_adapter.image_encoder={tmp_path / 'image_encoder'}", "--config.total_steps=8",
           "--config.eval_every=0", "--config.ema_decay=0", "--config.optim.lr=1e-2", "--config.sample.every=8")
    assert folder_digest(model) == before
    trained = final_params(workdir, 8)
    assert set(trained) == {"image_proj", "layers"}
    assert {p.rsplit("/", 2)[-2] for p in lora.param_tree.flatten(trained["layers"])} == {"to_k_ip", "to_v_ip"}
    unet, base = load_unet(model / "unet")
    adapter, embed_dim, tokens = ip_adapter.load_adapter(workdir / "ip_adapter" / "ip-adapter.safetensors", unet)
    assert (embed_dim, tokens) == (24, 4)
    flat, base_flat = lora.param_tree.flatten(adapter["layers"]), lora.param_tree.flatten(base)
    # Initialised as copies of the text branch, then trained away from it.
    moved = [rel_err(np.asarray(v), np.asarray(base_flat[p.replace("_ip/", "/")])) for p, v in flat.items()]
    assert min(moved) > 0
    assert (workdir / "samples" / "step_000008.png").is_file()


def test_bad_inputs_are_one_line_naming_the_file(tmp_path, synth_dataset_32):
    empty = tmp_path / "no_labels"
    empty.mkdir()
    result = launch(tmp_path / "a", empty, "--config.data.generate_if_missing=false", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"launch.main: {empty / 'labels.csv'}: labels table is missing" in result.stderr
    result = launch(tmp_path / "b", synth_dataset_32.root, "--config.mode=lora", f"--config.model.pretrained={empty}",
                    check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"launch.main: {empty}: not a diffusion model folder (no unet/ inside" in result.stderr


def test_lora_on_a_latent_model_trains_through_its_vae_and_diffusers_loads_the_file(tiny_sd, tmp_path, synth_dataset_32):
    """SD1.5's path: VAE latents encoded in the step, the pipeline's own text tower and tokenizer."""
    import torch
    from diffusers import StableDiffusionPipeline

    folder, latents = tiny_sd
    workdir = tmp_path / "latent_lora"
    launch(workdir, synth_dataset_32.root, "--config.mode=lora", f"--config.model.pretrained={folder}",
           "--config.lora.rank=4", "--config.lora.alpha=4", "--config.total_steps=8", "--config.eval_every=8",
           "--config.optim.lr=1e-2", "--config.ema_decay=0", "--config.batch_size=4")
    mse = metric(workdir, "eval/denoise_mse")
    assert sorted(mse) == [0, 8] and all(np.isfinite(v) for v in mse.values())
    unet, base = load_unet(os.path.join(folder, "unet"))
    adapter, scales = lora.load_lora(workdir / "lora", base, unet.config)
    context = np.random.default_rng(0).normal(size=(2, 7, 32)).astype(np.float32)
    x = jnp.asarray(latents.numpy().transpose(0, 2, 3, 1))
    ours = np.asarray(unet.apply({"params": lora.merge(base, adapter, scales)}, x, jnp.array([300, 300]),
                                 jnp.asarray(context))).transpose(0, 3, 1, 2)
    plain = np.asarray(unet.apply({"params": base}, x, jnp.array([300, 300]), jnp.asarray(context))).transpose(0, 3, 1, 2)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(workdir / "lora"))
    with torch.no_grad():
        theirs = pipe.unet(latents, torch.tensor([300, 300]), torch.from_numpy(context)).sample.numpy()
    assert rel_err(ours, plain) > 1e-4  # trained: the LoRA moved the output ...
    assert rel_err(theirs, ours) <= 1e-5  # ... and diffusers, loading our file, moves it the same way


def _rms_to_nearest(samples, references):
    """Per sample: the RMS pixel difference ([0, 1] scale) to its nearest reference image."""
    d = samples.reshape(len(samples), 1, -1) - references.reshape(1, len(references), -1)
    return np.sqrt(np.mean(np.square(d), axis=-1)).min(axis=1)


def test_tiny_generator_on_patches_draws_nearer_its_data_than_at_step_0(tmp_path, synth_dataset_32):
    """configs/mema_lora.py:tiny_generator, the offline MeMa generator's design at 32 px (a UNet on
    lossless 4x4 patches, x0-prediction, clip(SNR, 1, 5) weights), 60 steps: its export is a pipeline
    folder whose vae/ is the patch transform, and its DDIM samples lie nearer the training images
    than the same sampler's with the untrained weights it started from.  Figure: each sample's RMS
    distance to its nearest training image, averaged.  Measured: 0.124 trained vs 0.273 at step 0;
    asked: 25% nearer (a 60-step run draws face-coloured shapes on the right background, not noise).
    Then, as launch.mema_pipeline does next, an IP-Adapter trains on it and samples through the patches."""
    from flax import linen as nn

    from mema_jax.data import captions, layout
    from mema_jax.models.unet import init_params
    from mema_jax.pipelines.text_to_image import StableDiffusionPipeline

    result = subprocess.run([sys.executable, "-m", "launch.main", "--config=configs/mema_lora.py:tiny_generator",
                             f"--workdir={tmp_path}", f"--config.data.root={synth_dataset_32.root}"],
                            cwd=REPO, env=run_env(1), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = tmp_path / "model"
    assert json.loads((folder / "vae" / "config.json").read_text())["_class_name"] == "PatchAutoencoder"
    pipe = StableDiffusionPipeline.from_folder(folder)
    prompts = [captions.caption(d) for d in layout.DISEASES] * 2
    kw = dict(num_inference_steps=10, guidance_scale=2.0, seed=0, height=32, width=32, output_type="float")
    trained = pipe(prompts, **kw)
    pipe.unet_params = nn.unbox(init_params(pipe.unet, jax.random.key(0), sample_shape=(1, 8, 8)))
    untrained = pipe(prompts, **kw)
    from PIL import Image

    train = np.stack([np.asarray(Image.open(synth_dataset_32.root / r.image).convert("RGB"), np.float32) / 255
                      for r in synth_dataset_32.split("train")])
    near_trained, near_untrained = _rms_to_nearest(trained, train).mean(), _rms_to_nearest(untrained, train).mean()
    assert near_trained < 0.75 * near_untrained, (near_trained, near_untrained)
    # launch.mema_pipeline's next stage: its IP-Adapter trains on the patch model (same config, mode=ip_adapter)
    ip = subprocess.run([sys.executable, "-m", "launch.main", "--config=configs/mema_lora.py:tiny_generator",
                         f"--workdir={tmp_path / 'ip'}", f"--config.data.root={synth_dataset_32.root}",
                         "--config.mode=ip_adapter", f"--config.model.pretrained={folder}", "--config.total_steps=2",
                         f"--config.ip_adapter.image_encoder={write_image_encoder(tmp_path / 'image_encoder')}",
                         "--config.sample.every=2"], cwd=REPO, env=run_env(1), capture_output=True, text=True, timeout=900)
    assert ip.returncode == 0, ip.stdout[-3000:] + ip.stderr[-3000:]
    assert (tmp_path / "ip" / "ip_adapter" / "ip-adapter.safetensors").is_file()
    assert (tmp_path / "ip" / "samples" / "step_000002.png").is_file()  # sampled through the patches with injection


def test_x0_loss_weights_are_snr_clipped_to_1_and_gamma():
    """x0-prediction's weights (the generator's): clip(SNR, 1, γ); γ = 0 leaves every step at 1;
    epsilon keeps min-SNR-γ's min(SNR, γ) / SNR."""
    from mema_jax.schedulers import DDPMConfig, ddpm
    from mema_jax.trainers.diffusion import SD15_SCHEDULER, snr_weights

    acp = jnp.asarray(ddpm.alphas_cumprod(DDPMConfig.from_config(
        {k: v for k, v in SD15_SCHEDULER.items() if k in ("num_train_timesteps", "beta_start", "beta_end",
                                                          "beta_schedule")})))
    t = jnp.arange(1000)
    snr = np.asarray(acp / (1 - acp))
    w = np.asarray(snr_weights(acp, t, "sample", 5.0))
    np.testing.assert_allclose(w, np.clip(snr, 1.0, 5.0), rtol=1e-6)
    assert w[0] == 5.0 and w[-1] == 1.0  # the quietest step counts 5x, the noisiest once
    np.testing.assert_array_equal(np.asarray(snr_weights(acp, t, "sample", 0.0)), np.ones(1000))
    np.testing.assert_allclose(np.asarray(snr_weights(acp, t, "epsilon", 5.0)), np.minimum(snr, 5.0) / snr, rtol=1e-6)
