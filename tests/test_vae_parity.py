"""The Flax AutoencoderKL equals diffusers' AutoencoderKL on the same weights.

Tiny diffusers VAEs with random (perturbed) weights are written by ``save_pretrained`` and read
back through ``load_vae``.

Tolerances (the rules are in tests/parity.py):

* tiny VAEs, fp32 against diffusers fp32: relative error <= 1e-5 (fp32 on CPU on both sides;
  summation order is the only difference, measured ~1e-6).
* the full-size SD1.5 VAE (fp32) and the bf16 checks: against diffusers run in float64, our
  error must be at most 2x diffusers' own error at that precision, or a floor (1e-6 for fp32,
  2**-8 for bf16).  diffusers' own fp32 decode error on the full-size VAE is ~6e-6, so a fixed
  1e-5 there passed or failed with the CPU's kernels.
"""
import copy
import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import BF16_FLOOR, FP32_TOL, as_float64, assert_float64_parity, rel_err
from tiny_models import SD15_VAE, TINY_VAE, TINY_VAE_VARIANT, make_diffusers_vae

from mema_jax.models.convert_vae import load_vae
from mema_jax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

REPO = Path(__file__).resolve().parents[1]


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    """torch NCHW (any float dtype) -> float32 numpy NHWC, our models' input."""
    return t.detach().float().numpy().transpose(0, 2, 3, 1)


def nhwc64(t):
    """torch NCHW -> float64 numpy NHWC, for the float64 references."""
    return as_float64(t).transpose(0, 2, 3, 1)


def images(seed: int, batch=2, size=32):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module", params=["default", "variant"])
def vae_pair(request, tmp_path_factory):
    config = {"default": TINY_VAE, "variant": TINY_VAE_VARIANT}[request.param]
    folder = tmp_path_factory.mktemp(f"vae_{request.param}")
    return request.param, make_diffusers_vae(config, folder), folder


def test_fp32_encode_and_decode_match_diffusers(vae_pair):
    name, model, folder = vae_pair
    module, params = load_vae(folder)
    x = images(0)
    with torch.no_grad():
        posterior = model.encode(nchw(x)).latent_dist
        decoded = model.decode(posterior.mean).sample
    ours = jax.jit(lambda p, x: module.apply({"params": p}, x, method=AutoencoderKL.encode))(params, x)
    ours_decoded = jax.jit(lambda p, z: module.apply({"params": p}, z, method=AutoencoderKL.decode))(params, nhwc(posterior.mean))
    errors = (rel_err(ours.mean, nhwc(posterior.mean)), rel_err(ours.logvar, nhwc(posterior.logvar)),
              rel_err(ours_decoded, nhwc(decoded)))
    print(f"{name} fp32 relative errors mean/logvar/decode: " + " ".join(f"{e:.2e}" for e in errors))
    assert max(errors) <= FP32_TOL
    factor = 2 ** (len(module.config.block_out_channels) - 1)
    assert ours.mean.shape == (2, 32 // factor, 32 // factor, module.config.latent_channels)


def test_fp32_full_forward_matches_diffusers(vae_pair):
    """__call__ = decode(mode of the posterior), diffusers' forward(sample_posterior=False)."""
    _, model, folder = vae_pair
    module, params = load_vae(folder)
    x = images(1, batch=1)
    with torch.no_grad():
        ref = model(nchw(x)).sample
    assert rel_err(jax.jit(module.apply)({"params": params}, x), nhwc(ref)) <= FP32_TOL


def test_config_factors_are_exposed(vae_pair):
    name, model, folder = vae_pair
    module, _ = load_vae(folder)
    assert module.scaling_factor == model.config.scaling_factor
    assert module.shift_factor == model.config.shift_factor


def test_bf16_compute_error_is_bf16_sized(vae_pair):
    """bf16 compute (fp32 params) decode against diffusers in float64.  Unit roundoff 2**-8 = 3.9e-3;
    bound: the float64 rule (2x diffusers' own bf16 error)."""
    name, model, folder = vae_pair
    module, params = load_vae(folder, dtype=jnp.bfloat16)
    z = np.random.default_rng(2).standard_normal((2, 8, 8, module.config.latent_channels)).astype(np.float32)
    with torch.no_grad():
        ref64 = nhwc64(copy.deepcopy(model).double().decode(nchw(z).double()).sample)
        torch_bf16 = nhwc(copy.deepcopy(model).to(torch.bfloat16).decode(nchw(z).bfloat16()).sample)
    ours = jax.jit(lambda p, z: module.apply({"params": p}, z, method=AutoencoderKL.decode))(params, z)
    assert_float64_parity(f"{name} VAE bf16 decode", ours, torch_bf16, ref64, floor=BF16_FLOOR)


def test_posterior_sample_kl_and_mode_follow_diffusers():
    rng = np.random.default_rng(3)
    moments = rng.standard_normal((2, 4, 4, 8)).astype(np.float32) * 4  # logvar beyond the clip range too
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    ref = DiagonalGaussianDistribution(nchw(moments))
    ours = DiagonalGaussian.from_moments(jnp.asarray(moments))
    assert rel_err(ours.logvar, nhwc(ref.logvar)) <= 1e-7
    assert rel_err(ours.mode(), nhwc(ref.mode())) == 0.0
    assert rel_err(ours.kl(), ref.kl().numpy()) <= 1e-6
    key = jax.random.PRNGKey(0)
    noise = np.asarray(jax.random.normal(key, ours.mean.shape, jnp.float32))
    expected = nhwc(ref.mean) + nhwc(ref.std) * noise
    assert rel_err(ours.sample(key), expected) <= 1e-6


def test_unsupported_or_unknown_config_options_are_rejected():
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_dict({**TINY_VAE, "down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")})
    with pytest.raises(ValueError, match="unknown options.*norm_type"):
        VAEConfig.from_dict({**TINY_VAE, "norm_type": "spatial"})
    with pytest.raises(ValueError, match="_class_name"):
        VAEConfig.from_dict({**TINY_VAE, "_class_name": "AsymmetricAutoencoderKL"})


SHARDED_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from flax import linen as nn
    from mema_jax.core import sharding
    from mema_jax.models.convert_vae import load_vae
    folder = sys.argv[1]
    assert jax.device_count() == 8, jax.devices()
    x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    module, params = load_vae(folder)
    ref = np.asarray(jax.jit(module.apply)({"params": params}, x))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.DEFAULT_RULES
    module_s, params_s = load_vae(folder, mesh=mesh, rules=rules)
    kernel = params_s["decoder"]["up_blocks_0"]["resnets_0"]["conv1"]["kernel"]  # (3, 3, 32, 32)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp", "tensor"), kernel.sharding.spec
    assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 16, 16)}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(module_s.apply)({"params": params_s}, jax.device_put(x, sharding.batch_sharding(mesh, rules, 4, x.shape)))
    err = float(np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref))
    print("sharded relative error", err)
    assert err <= 1e-5, err  # only the summation order differs (split conv/dot reductions)
    print("OK")
    """
)


def test_sharded_load_and_forward_on_8_devices_equals_unsharded(tmp_path):
    """Runs in a subprocess so that the 8 emulated CPU devices are set before jax starts."""
    make_diffusers_vae(TINY_VAE, tmp_path)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    print(proc.stdout[-2000:], proc.stderr[-4000:])
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK")


@pytest.mark.slow
def test_full_sd15_vae_matches_diffusers(tmp_path):
    """The real SD1.5 VAE size (84M parameters, random weights): encode a 64 px image, decode an
    8x8 latent (64 px), against diffusers in float64 (the float64 rule of tests/parity.py).  All
    three decode the same latent, diffusers' fp32 posterior mean."""
    from diffusers import AutoencoderKL as TorchVAE

    torch.manual_seed(0)
    model = TorchVAE(**SD15_VAE).eval()
    model.save_pretrained(tmp_path)
    x = images(4, batch=1, size=64)
    with torch.no_grad():
        torch_mean = model.encode(nchw(x)).latent_dist.mean
        torch_decoded = model.decode(torch_mean).sample
        model.double()  # in place
        ref_mean = model.encode(nchw(x).double()).latent_dist.mean
        ref_decoded = model.decode(torch_mean.double()).sample
    del model
    gc.collect()
    module, params = load_vae(tmp_path)
    ours = jax.jit(lambda p, x: module.apply({"params": p}, x, method=AutoencoderKL.encode))(params, x)
    ours_decoded = jax.jit(lambda p, z: module.apply({"params": p}, z, method=AutoencoderKL.decode))(params, nhwc(torch_mean))
    assert_float64_parity("SD1.5 VAE fp32 encode mean", ours.mean, nhwc64(torch_mean), nhwc64(ref_mean))
    assert_float64_parity("SD1.5 VAE fp32 decode", ours_decoded, nhwc64(torch_decoded), nhwc64(ref_decoded))
