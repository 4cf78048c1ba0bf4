"""IP-Adapter: the ip-adapter_sd15 file layout, parity with diffusers' IP-Adapter path, scale 0.

Random adapter weights in the release layout (.safetensors and .bin) on the tiny diffusers
pipeline of conftest.py; diffusers loads the same file with ``load_ip_adapter``.  Tolerance: fp32
relative error <= 1e-5 (summation order only).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import FP32_TOL, rel_err
from safetensors.numpy import save_file

from mema_jax.models import ip_adapter, param_tree
from mema_jax.models.convert_unet import load_unet
from mema_jax.models.weights import WeightsError

EMBED_DIM, TOKENS = 48, 4


def release_layout_tensors(unet_torch, seed=0):
    """What the original ip-adapter_sd15 file holds, with random values, for a diffusers UNet."""
    rng = np.random.default_rng(seed)
    cross = unet_torch.config.cross_attention_dim
    t = {"image_proj.proj.weight": rng.normal(0, 0.1, (TOKENS * cross, EMBED_DIM)),
         "image_proj.proj.bias": rng.normal(0, 0.1, (TOKENS * cross,)),
         "image_proj.norm.weight": 1 + rng.normal(0, 0.1, (cross,)),
         "image_proj.norm.bias": rng.normal(0, 0.1, (cross,))}
    key_id = 1
    for name, module in unet_torch.attn_processors.items():
        if name.endswith("attn2.processor"):
            hidden = unet_torch.get_submodule(name[: -len(".processor")]).to_q.out_features
            t[f"ip_adapter.{key_id}.to_k_ip.weight"] = rng.normal(0, 0.2, (hidden, cross))
            t[f"ip_adapter.{key_id}.to_v_ip.weight"] = rng.normal(0, 0.2, (hidden, cross))
            key_id += 2
    return {k: v.astype(np.float32) for k, v in t.items()}


@pytest.fixture(scope="module")
def setup(tiny_sd, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    folder, latents = tiny_sd
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    tensors = release_layout_tensors(pipe.unet)
    files = tmp_path_factory.mktemp("ip_adapter")
    save_file(tensors, str(files / "ip-adapter_sd15.safetensors"))
    torch.save({"image_proj": {k[len("image_proj."):]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("image_proj.")},
                "ip_adapter": {k[len("ip_adapter."):]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("ip_adapter.")}},
               files / "ip-adapter_sd15.bin")
    unet, params = load_unet(os.path.join(folder, "unet"))
    rng = np.random.default_rng(1)
    context = rng.normal(size=(2, 7, unet.config.cross_attention_dim[0])).astype(np.float32)
    embeds = rng.normal(size=(2, EMBED_DIM)).astype(np.float32)
    return pipe, files, unet, params, latents, context, embeds


def ours(unet, params, adapter, latents, context, embeds, scale, t=400):
    x = jnp.asarray(latents.numpy().transpose(0, 2, 3, 1))
    tokens = ip_adapter.image_tokens(adapter, jnp.asarray(embeds), TOKENS, unet.config.cross_attention_dim[0])
    out = ip_adapter.ip_unet(unet).apply({"params": ip_adapter.unet_params(params, adapter)}, x, jnp.array([t, t]),
                                         jnp.asarray(context), ip_tokens=tokens, ip_scale=scale)
    return np.asarray(out).transpose(0, 3, 1, 2)


def diffusers_output(pipe, latents, context, embeds, scale, t=400):
    pipe.set_ip_adapter_scale(scale)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([t, t]), torch.from_numpy(context),
                         added_cond_kwargs={"image_embeds": [torch.from_numpy(embeds)[:, None]]}).sample.numpy()


@pytest.mark.parametrize("weight_name", ["ip-adapter_sd15.safetensors", "ip-adapter_sd15.bin"])
def test_release_layout_file_matches_diffusers_ip_adapter_path(setup, weight_name):
    pipe, files, unet, params, latents, context, embeds = setup
    adapter, embed_dim, tokens = ip_adapter.load_adapter(files / weight_name, unet)
    assert (embed_dim, tokens) == (EMBED_DIM, TOKENS)
    pipe.load_ip_adapter(str(files), subfolder="", weight_name=weight_name, image_encoder_folder=None)
    try:
        for scale in (0.3, 1.0):
            want = diffusers_output(pipe, latents, context, embeds, scale)
            assert rel_err(ours(unet, params, adapter, latents, context, embeds, scale), want) <= FP32_TOL
    finally:
        pipe.unload_ip_adapter()


def test_scale_zero_is_the_plain_unet_and_scales_are_per_sample(setup):
    _, files, unet, params, latents, context, embeds = setup
    adapter, _, _ = ip_adapter.load_adapter(files / "ip-adapter_sd15.safetensors", unet)
    x = jnp.asarray(latents.numpy().transpose(0, 2, 3, 1))
    plain = np.asarray(unet.apply({"params": params}, x, jnp.array([400, 400]), jnp.asarray(context))).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(ours(unet, params, adapter, latents, context, embeds, 0.0), plain)
    mixed = ours(unet, params, adapter, latents, context, embeds, jnp.array([0.0, 0.4]))
    np.testing.assert_array_equal(mixed[0], plain[0])
    np.testing.assert_allclose(mixed[1], ours(unet, params, adapter, latents, context, embeds, 0.4)[1], rtol=0, atol=1e-6)
    assert rel_err(mixed[1], plain[1]) > 1e-3


def test_write_back_round_trips_and_diffusers_reads_our_file(setup, tmp_path):
    pipe, files, unet, params, latents, context, embeds = setup
    adapter, _, _ = ip_adapter.load_adapter(files / "ip-adapter_sd15.safetensors", unet)
    path = ip_adapter.save_adapter(str(tmp_path / "ours.safetensors"), adapter)
    with pytest.raises(FileExistsError):
        ip_adapter.save_adapter(path, adapter)
    back, _, _ = ip_adapter.load_adapter(path, unet)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(adapter)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_from_base_copies_the_text_branch_and_the_tree_is_only_adapter_layers(setup):
    _, _, unet, params, _, _, _ = setup
    adapter = ip_adapter.init_from_base(ip_adapter.init_adapter(jax.random.key(0), unet, EMBED_DIM), params)
    flat = param_tree.flatten(adapter["layers"])
    assert flat and all(p.rsplit("/", 2)[-2] in ("to_k_ip", "to_v_ip") for p in flat)
    base = param_tree.flatten(params)
    for path, leaf in flat.items():
        np.testing.assert_array_equal(np.asarray(leaf.value), np.asarray(base[path.replace("_ip/", "/")]))
    assert len(flat) == 2 * len(ip_adapter.attn2_paths(params))


def test_a_file_for_another_base_model_is_one_error_naming_file_and_keys(setup, tmp_path):
    pipe, files, unet, params, _, _, _ = setup
    tensors = release_layout_tensors(pipe.unet)
    del tensors["ip_adapter.3.to_v_ip.weight"]
    tensors["ip_adapter.1.to_k_ip.weight"] = tensors["ip_adapter.1.to_k_ip.weight"][:, :-2]
    path = str(tmp_path / "other.safetensors")
    save_file(tensors, path)
    with pytest.raises(WeightsError) as err:
        ip_adapter.load_adapter(path, unet)
    text = str(err.value)
    assert path in text and "ip_adapter.3.to_v_ip.weight" in text and "ip_adapter.1.to_k_ip.weight" in text
    plus = {k: v for k, v in tensors.items() if not k.startswith("image_proj.proj")}
    save_file(plus, path)
    with pytest.raises(WeightsError, match="only the plain IP-Adapter"):
        ip_adapter.load_adapter(path, unet)
