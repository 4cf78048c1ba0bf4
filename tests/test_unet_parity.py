"""The Flax UNet equals diffusers' UNet2DConditionModel on the same weights.

Models are tiny diffusers UNets with random (perturbed) weights written by ``save_pretrained``
and read back through ``load_unet`` -- the path real weights take.

Tolerances (the rules are in tests/parity.py):

* tiny UNets, fp32 against diffusers fp32: relative error ||ours - ref|| / ||ref|| <= 1e-5.  Both
  sides compute in fp32 on CPU (XLA's CPU dot/conv are true fp32, no TF32), so what remains is
  summation order and the ~1-ulp differences of exp/sin in the timestep embedding; measured
  values are ~1e-6.
* the full-size SD1.5 UNet (fp32) and the bf16 checks: against diffusers run in float64 (its
  timestep embedding too, see ``float64_reference``), our error must be at most 2x diffusers' own
  error at that precision, or a floor (1e-6 for fp32, 2**-8 for bf16).  Through ~300 layers fp32
  rounding alone reaches ~1e-6, so a fixed bound there would test the CPU's kernels.
"""
import contextlib
import copy
import gc
import math
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
from parity import BF16_FLOOR, FP32_TOL, assert_float64_parity, rel_err
from tiny_models import SD15_UNET, TINY_UNET_ONE_LEVEL, TINY_UNET_SD1, TINY_UNET_SD2, make_diffusers_unet

from mema_jax.models.convert_unet import load_unet
from mema_jax.models.unet import UNet2DConditionModel, UNetConfig

REPO = Path(__file__).resolve().parents[1]


def float64_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                               max_period=10000):
    """diffusers' ``get_timestep_embedding`` in float64 (diffusers always computes it in fp32)."""
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift)
    emb = scale * timesteps[:, None].double() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return torch.nn.functional.pad(emb, (0, embedding_dim % 2))


@contextlib.contextmanager
def float64_reference():
    """diffusers' timestep embedding in float64 while a ``model.double()`` reference runs.

    Without it the float64 reference would carry diffusers' own fp32 sin/exp of arguments up to
    ~1000 (an absolute error up to 3e-5 per feature), and so favour diffusers' fp32 run."""
    from diffusers.models import embeddings

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return float64_timestep_embedding(*args, **kwargs)

    original = embeddings.get_timestep_embedding
    embeddings.get_timestep_embedding = counted
    try:
        yield
    finally:
        embeddings.get_timestep_embedding = original
    assert calls, "diffusers' Timesteps no longer calls embeddings.get_timestep_embedding: update the patch"


def torch_forward(model, sample_nhwc, timesteps, context, dtype=torch.float32):
    """diffusers' forward on NHWC numpy inputs cast to ``dtype`` (the model's); NHWC float64 out."""
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(sample_nhwc.transpose(0, 3, 1, 2))).to(dtype),
                    torch.from_numpy(timesteps), torch.from_numpy(context).to(dtype)).sample
    return out.double().numpy().transpose(0, 2, 3, 1)


def torch_forward_float64(model, sample_nhwc, timesteps, context):
    """The float64 reference: ``model`` converted in place (``.double()``), timestep embedding included."""
    with float64_reference():
        return torch_forward(model.double(), sample_nhwc, timesteps, context, torch.float64)


def inputs(seed: int, batch=2, height=16, width=16, channels=4, context_len=7, context_dim=24):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, height, width, channels)).astype(np.float32)
    timesteps = np.array([999, 17, 500, 1][:batch], np.int64)
    context = rng.standard_normal((batch, context_len, context_dim)).astype(np.float32)
    return sample, timesteps, context


def jax_forward(module, params, sample, timesteps, context):
    return np.asarray(jax.jit(module.apply)({"params": params}, sample, timesteps, context))


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def unet_pair(request, tmp_path_factory):
    config = {"sd1": TINY_UNET_SD1, "sd2": TINY_UNET_SD2}[request.param]
    folder = tmp_path_factory.mktemp(f"unet_{request.param}")
    model = make_diffusers_unet(config, folder)
    return request.param, model, folder


def test_fp32_forward_matches_diffusers(unet_pair):
    name, model, folder = unet_pair
    module, params = load_unet(folder)
    sample, timesteps, context = inputs(0)
    err = rel_err(jax_forward(module, params, sample, timesteps, context), torch_forward(model, sample, timesteps, context))
    print(f"{name} fp32 relative error {err:.2e}")
    assert err <= FP32_TOL


def test_odd_latent_size_matches_diffusers(unet_pair):
    """Sizes not divisible by 2**levels: upsampling must target the skip's size (diffusers'
    forward_upsample_size path)."""
    name, model, folder = unet_pair
    module, params = load_unet(folder)
    sample, timesteps, context = inputs(1, batch=1, height=11, width=7)
    ours = jax_forward(module, params, sample, timesteps, context)
    ref = torch_forward(model, sample, timesteps, context)
    assert ours.shape == ref.shape == (1, 11, 7, 4)
    assert rel_err(ours, ref) <= FP32_TOL


@pytest.fixture(scope="module")
def one_level_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet_one_level")
    return make_diffusers_unet(TINY_UNET_ONE_LEVEL, folder, seed=1), folder


def test_scalar_timestep_broadcasts_over_batch(one_level_pair):
    model, folder = one_level_pair
    module, params = load_unet(folder)
    sample, _, context = inputs(2, height=8, width=8)
    ours = jax_forward(module, params, sample, 250, context)
    ref = torch_forward(model, sample, np.array([250, 250]), context)
    assert rel_err(ours, ref) <= FP32_TOL


def test_bf16_compute_error_is_bf16_sized(unet_pair):
    """bf16 compute (fp32 params) against diffusers in float64.  bf16 keeps 8 significant bits (unit
    roundoff 2**-8 = 3.9e-3); through ~30 normalised layers the error grows to a few times that,
    for diffusers' own bf16 run as for ours.  Bound: the float64 rule (2x diffusers' bf16 error)."""
    name, model, folder = unet_pair
    module, params = load_unet(folder, dtype=jnp.bfloat16)
    sample, timesteps, context = inputs(0)
    ours = jax_forward(module, params, sample, timesteps, context)
    torch_bf16 = torch_forward(copy.deepcopy(model).to(torch.bfloat16), sample, timesteps, context, torch.bfloat16)
    ref64 = torch_forward_float64(copy.deepcopy(model), sample, timesteps, context)
    assert_float64_parity(f"{name} UNet bf16", ours, torch_bf16, ref64, floor=BF16_FLOOR)


def test_dot_product_attention_matches_diffusers(one_level_pair):
    model, folder = one_level_pair
    module, params = load_unet(folder, attention_impl="dot_product")
    sample, timesteps, context = inputs(3, height=8, width=8)
    assert rel_err(jax_forward(module, params, sample, timesteps, context), torch_forward(model, sample, timesteps, context)) <= FP32_TOL


def test_remat_keeps_outputs_and_gradients(one_level_pair):
    _, folder = one_level_pair
    module, params = load_unet(folder)
    sample, timesteps, context = inputs(4, height=8, width=8)

    def loss_and_grad(mod):
        def loss(p):
            return jnp.mean(jnp.square(mod.apply({"params": p}, sample, timesteps, context)))

        return jax.jit(jax.value_and_grad(loss))(params)

    value, grads = loss_and_grad(module)
    for policy in ("full", "dots"):
        remat_module, _ = load_unet(folder, remat=policy)
        value_r, grads_r = loss_and_grad(remat_module)
        assert abs(float(value_r) - float(value)) <= 1e-6 * abs(float(value))
        flat, flat_r = jax.tree.leaves(grads), jax.tree.leaves(grads_r)
        assert len(flat) == len(flat_r)
        assert rel_err(np.concatenate([np.ravel(g) for g in flat_r]), np.concatenate([np.ravel(g) for g in flat])) <= 1e-5


def test_encode_features_equals_first_down_blocks_of_diffusers(unet_pair):
    """encode_features(num_down_blocks=N) is the output of diffusers' down_blocks[N-1] (same params)."""
    name, model, folder = unet_pair
    module, params = load_unet(folder)
    sample, timesteps, context = inputs(5)
    captured = {}

    def keep_output(mod, args, out):
        captured["x"] = out[0]

    hook = model.down_blocks[0].register_forward_hook(keep_output)
    try:
        torch_forward(model, sample, timesteps, context)
    finally:
        hook.remove()
    ref = captured["x"].numpy().transpose(0, 2, 3, 1)
    ours = module.apply({"params": params}, sample, timesteps, context, num_down_blocks=1,
                        method=UNet2DConditionModel.encode_features)
    first_channels = module.config.block_out_channels[0]
    assert ours.shape == (2, 8, 8, first_channels)  # one downsample: latent / 2
    assert rel_err(ours, ref) <= FP32_TOL


def test_unsupported_or_unknown_config_options_are_rejected():
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_dict({**TINY_UNET_SD1, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="unknown options.*not_an_option"):
        UNetConfig.from_dict({**TINY_UNET_SD1, "not_an_option": 1})
    with pytest.raises(ValueError, match="block types"):
        UNetConfig.from_dict({**TINY_UNET_SD1, "down_block_types": ("CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D")})
    with pytest.raises(ValueError, match="only_cross_attention"):
        UNetConfig.from_dict({**TINY_UNET_SD1, "only_cross_attention": True})


def test_added_cond_kwargs_are_rejected_without_addition_embedding(tmp_path):
    module = UNet2DConditionModel(UNetConfig.from_dict(TINY_UNET_SD2))
    sample, timesteps, context = inputs(6)
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        module.init(jax.random.PRNGKey(0), sample, timesteps, context, added_cond_kwargs={"text_embeds": sample})


def test_num_attention_heads_sets_the_head_count():
    """diffusers' UNet2DConditionModel itself refuses num_attention_heads (naming issue #2011);
    here it means what it says, and attention_head_dim is then ignored, as in diffusers' blocks."""
    config = UNetConfig.from_dict({**TINY_UNET_SD2, "num_attention_heads": (4, 8), "attention_head_dim": 3})
    assert config.num_heads == (4, 8)


SHARDED_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import linen as nn
    from mema_jax.core import sharding
    from mema_jax.models.convert_unet import load_unet
    folder, inputs_path = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 8, jax.devices()
    data = np.load(inputs_path)
    sample, timesteps, context = data["sample"], data["timesteps"], data["context"]
    module, params = load_unet(folder)
    ref = np.asarray(jax.jit(module.apply)({"params": params}, sample, timesteps, context))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.DEFAULT_RULES
    module_s, params_s = load_unet(folder, mesh=mesh, rules=rules)
    # q kernels carry ('embed', 'heads') -> ('fsdp', 'tensor'): really split four ways.
    kernel = params_s["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
    shard_shapes = {s.data.shape for s in kernel.addressable_shards}
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor"), kernel.sharding.spec
    assert shard_shapes == {(kernel.shape[0] // 2, kernel.shape[1] // 2)}, shard_shapes
    batch = sharding.batch_sharding(mesh, rules, 4, sample.shape)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(module_s.apply)({"params": params_s}, jax.device_put(sample, batch), timesteps,
                                      jax.device_put(context, sharding.batch_sharding(mesh, rules, 3, context.shape)))
    out = np.asarray(out)
    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    print("sharded relative error", err)
    assert err <= 1e-5, err  # only the summation order differs (split conv/dot reductions)
    print("OK")
    """
)


def test_sharded_load_and_forward_on_8_devices_equals_unsharded(tmp_path):
    """Runs in a subprocess so that the 8 emulated CPU devices are set before jax starts."""
    folder = tmp_path / "unet"
    make_diffusers_unet(TINY_UNET_ONE_LEVEL, folder)
    sample, timesteps, context = inputs(7, batch=4, height=8, width=8)
    np.savez(tmp_path / "inputs.npz", sample=sample, timesteps=timesteps, context=context)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(folder), str(tmp_path / "inputs.npz")],
                          env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-2000:], proc.stderr[-4000:])
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK")


@pytest.mark.slow
def test_full_sd15_unet_matches_diffusers(tmp_path):
    """The real SD1.5 UNet size (860M parameters, random weights) at a 32x32 latent, batch 1, against
    diffusers in float64 (the float64 rule of tests/parity.py)."""
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(0)
    model = TorchUNet(**SD15_UNET).eval()
    model.save_pretrained(tmp_path)
    sample, timesteps, context = inputs(8, batch=1, height=32, width=32, context_len=77, context_dim=768)
    torch32 = torch_forward(model, sample, timesteps, context)
    ref64 = torch_forward_float64(model, sample, timesteps, context)  # in place: 7 GB, the fp32 copy is freed
    del model
    gc.collect()
    module, params = load_unet(tmp_path)
    ours = jax_forward(module, params, sample, timesteps, context)
    assert_float64_parity("SD1.5 UNet fp32", ours, torch32, ref64)
