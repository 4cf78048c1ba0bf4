"""LoRA for the UNet: a separate tree merged into the base, and files diffusers / kohya users have.

Models are the tiny diffusers pipeline of conftest.py (conv 1x1 proj_in/out, a plain and a
cross-attention level) with random weights.  Tolerance: fp32 relative error <= 1e-5 (both sides
compute in fp32 on the CPU; the remaining difference is summation order, measured ~1e-6; merging
into the weights here vs peft's unmerged x @ A @ B branch adds one rounding per weight).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import FP32_TOL, rel_err
from safetensors.numpy import save_file

from mema_jax.models import lora
from mema_jax.models.convert_unet import load_unet
from mema_jax.models.weights import WeightsError

RANK, ALPHA = 4, 8.0  # alpha != rank: the scale (2.0) must travel with the file


@pytest.fixture(scope="module")
def unet_and_inputs(tiny_sd):
    folder, latents = tiny_sd
    unet, params = load_unet(os.path.join(folder, "unet"))
    rng = np.random.default_rng(0)
    context = rng.normal(size=(2, 7, unet.config.cross_attention_dim[0])).astype(np.float32)
    return folder, unet, params, latents, context


def ours(unet, params, latents, context, t=500):
    x = jnp.asarray(latents.numpy().transpose(0, 2, 3, 1))
    out = unet.apply({"params": params}, x, jnp.array([t, t]), jnp.asarray(context))
    return np.asarray(out).transpose(0, 3, 1, 2)


def diffusers_unet_output(pipe, latents, context, t=500):
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([t, t]), torch.from_numpy(context)).sample.numpy()


def random_lora(params, targets, seed=1):
    """A LoRA whose up matrices are non-zero (a trained one), as the trainer would hold it."""
    tree = jax.tree.map(np.asarray, jax.device_get(lora.init_lora(jax.random.key(seed), params, RANK, targets)))
    tree = lora.param_tree.flatten(jax.tree.map(lambda b: b.value, tree, is_leaf=lambda x: hasattr(x, "names")))
    rng = np.random.default_rng(seed)
    return lora.param_tree.unflatten({p: (v if p.endswith("lora_down") else rng.normal(0, 0.05, v.shape)).astype(np.float32)
                                      for p, v in tree.items()})


def diffusers_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def test_fresh_lora_leaves_the_unet_exactly_the_base(unet_and_inputs):
    _, unet, params, latents, context = unet_and_inputs
    fresh = lora.init_lora(jax.random.key(0), params, RANK, ("attention", "feed_forward", "conv"))
    merged = lora.merge(params, jax.tree.map(lambda b: b.value, fresh, is_leaf=lambda x: hasattr(x, "names")), ALPHA / RANK)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(ours(unet, merged, latents, context), ours(unet, params, latents, context))


def test_targets_select_attention_projections_by_default_and_more_on_request(unet_and_inputs):
    _, _, params, _, _ = unet_and_inputs
    attention = lora.target_modules(params)
    assert attention and all(m.rsplit("/", 1)[-1] in ("to_q", "to_k", "to_v", "to_out") for m in attention)
    assert {m.rsplit("/", 2)[-2] for m in attention} == {"attn1", "attn2"}
    everything = lora.target_modules(params, ("attention", "feed_forward", "conv"))
    assert set(attention) < set(everything)
    assert any(m.endswith("resnets_0/conv1") for m in everything) and any(m.endswith("ff/proj_in") for m in everything)
    with pytest.raises(ValueError, match="unknown LoRA target group 'mlp'"):
        lora.target_modules(params, ("mlp",))


def test_our_lora_file_loaded_by_diffusers_gives_our_unet_output(unet_and_inputs, tmp_path):
    folder, unet, params, latents, context = unet_and_inputs
    adapter = random_lora(params, ("attention", "feed_forward", "conv"))
    path = lora.save_lora(tmp_path / "lora", adapter, unet.config, alpha=ALPHA)
    assert path.endswith("pytorch_lora_weights.safetensors")
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == RANK and meta["unet.lora_alpha"] == ALPHA

    want = ours(unet, lora.merge(params, adapter, ALPHA / RANK), latents, context)
    pipe = diffusers_pipeline(folder)
    base = diffusers_unet_output(pipe, latents, context)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    got = diffusers_unet_output(pipe, latents, context)
    assert rel_err(want, base) > 1e-2  # the LoRA changes the output ...
    assert rel_err(got, want) <= FP32_TOL  # ... and diffusers sees the same change, at scale alpha/r
    # Read back: the same tree and scales.
    back, scales = lora.load_lora(path, params, unet.config)
    assert set(scales.values()) == {ALPHA / RANK}
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(adapter)):
        np.testing.assert_array_equal(a, b)


def test_a_lora_that_diffusers_wrote_loads_into_ours(unet_and_inputs, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder, unet, params, latents, context = unet_and_inputs
    pipe = diffusers_pipeline(folder)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    want = diffusers_unet_output(pipe, latents, context)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())
    adapter, scales = lora.load_lora(tmp_path / "pytorch_lora_weights.safetensors", params, unet.config)
    assert set(scales.values()) == {ALPHA / RANK}
    assert rel_err(ours(unet, lora.merge(params, adapter, scales), latents, context), want) <= FP32_TOL


def test_a_kohya_file_loads_into_ours_as_diffusers_loads_it(unet_and_inputs, tmp_path):
    folder, unet, params, latents, context = unet_and_inputs
    adapter = random_lora(params, ("attention", "conv"), seed=5)
    tensors = {}
    for module, (down, up) in lora.lora_modules(adapter).items():
        name = lora.kohya_module_name(module)
        a, b = lora._to_torch(down, up, lora._torch_is_conv(module, down.ndim, unet.config))
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
        tensors[f"{name}.alpha"] = np.array(2.0 if "attn" in module else 6.0, np.float32)  # per-module alpha
    path = str(tmp_path / "kohya.safetensors")
    save_file(tensors, path)
    back, scales = lora.load_lora(path, params, unet.config)
    assert {round(s, 6) for s in scales.values()} == {0.5, 1.5}

    pipe = diffusers_pipeline(folder)
    pipe.load_lora_weights(path)
    want = diffusers_unet_output(pipe, latents, context)
    assert rel_err(ours(unet, lora.merge(params, back, scales), latents, context), want) <= FP32_TOL


def test_merge_then_unmerge_returns_the_base_within_one_rounding(unet_and_inputs):
    _, _, params, _, _ = unet_and_inputs
    adapter = random_lora(params, ("attention", "feed_forward", "conv"))
    merged = lora.param_tree.flatten(lora.merge(params, adapter, ALPHA / RANK))
    back = lora.param_tree.flatten(lora.unmerge(lora.param_tree.unflatten(merged), adapter, ALPHA / RANK))
    eps = np.finfo(np.float32).eps
    changed = 0
    for path, base in lora.param_tree.flatten(params).items():
        w, m, b = np.asarray(base), np.asarray(merged[path]), np.asarray(back[path])
        # (w + d) - d: two fp32 roundings, each at most half an ulp of its result.
        assert np.all(np.abs(b - w) <= eps * (np.abs(m) + np.abs(w))), path
        changed += not np.array_equal(m, w)
    assert changed == len(lora.lora_modules(adapter))


def test_a_lora_for_another_base_model_is_one_error_listing_modules_and_shapes(unet_and_inputs, tmp_path):
    _, unet, params, _, _ = unet_and_inputs
    adapter = random_lora(params, ("attention",))
    flat = lora.param_tree.flatten(adapter)
    first = sorted(p for p in flat if p.endswith("lora_down"))[0]
    flat[first] = np.zeros((flat[first].shape[0] + 8, RANK), np.float32)  # another width
    path = lora.save_lora(tmp_path / "other", lora.param_tree.unflatten(flat), unet.config, alpha=ALPHA)
    tensors, meta = lora.read_lora_file(path)
    tensors["unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"] = np.zeros((RANK, 8), np.float32)
    tensors["unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"] = np.zeros((8, RANK), np.float32)
    save_file(tensors, path, metadata=meta)
    with pytest.raises(WeightsError, match="made for another base model") as err:
        lora.load_lora(path, params, unet.config)
    text = str(err.value)
    assert path in text and "down_blocks.7.attentions.0" in text and "shape mismatch" in text
    assert lora.diffusers_module_name(first.rsplit("/", 1)[0]) in text


def test_text_encoder_lora_tensors_are_named_not_silently_dropped(unet_and_inputs, tmp_path):
    _, unet, params, _, _ = unet_and_inputs
    path = lora.save_lora(tmp_path / "te", random_lora(params, ("attention",)), unet.config, alpha=ALPHA)
    tensors, meta = lora.read_lora_file(path)
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = np.zeros((RANK, 32), np.float32)
    save_file(tensors, path, metadata=meta)
    with pytest.raises(WeightsError, match="1 text-encoder LoRA tensors"):
        lora.load_lora(path, params, unet.config)
    _, scales = lora.load_lora(path, params, unet.config, skip_text_encoder=True)
    assert scales
