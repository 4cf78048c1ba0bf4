"""Weight I/O of the SD UNet and VAE: file formats, error reporting, the original single-file
(LDM) checkpoint layout, and saving back to the diffusers format."""
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import linen as nn
from safetensors import SafetensorError
from safetensors.torch import load_file as torch_load_safetensors
from safetensors.torch import save_file as torch_save_safetensors
from tiny_models import TINY_CLIP_TEXT, TINY_UNET_MIXED, TINY_VAE_SMALL, make_diffusers_unet, make_diffusers_vae, perturb_

from mema_jax.models import weights
from mema_jax.models.convert_sd import load_sd_checkpoint
from mema_jax.models.convert_unet import abstract_unet_params, ldm_unet_key_map, load_unet, save_unet
from mema_jax.models.convert_vae import abstract_vae_params, ldm_vae_key_map, load_vae, save_vae
from mema_jax.models.vae import AutoencoderKL


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    return make_diffusers_unet(TINY_UNET_MIXED, folder, seed=0), folder


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    return make_diffusers_vae(TINY_VAE_SMALL, folder, seed=1), folder


def assert_trees_equal(a, b):
    flat_a, flat_b = weights.flatten_paths(a), weights.flatten_paths(b)
    assert sorted(flat_a) == sorted(flat_b)
    for key in flat_a:
        assert np.array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key])), key


def unet_inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 8, 8, 4)).astype(np.float32), np.array([981, 3]),
            rng.standard_normal((2, 5, 24)).astype(np.float32))


def copy_config(src: Path, dst: Path):
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")


# ---------------------------------------------------------------------------------------------
# File formats


def test_bin_safetensors_and_sharded_folders_give_identical_params(unet_folder, tmp_path):
    model, folder = unet_folder
    _, params = load_unet(folder)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "bin" / "diffusion_pytorch_model.bin")
    assert os.path.exists(tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json")
    assert_trees_equal(load_unet(tmp_path / "bin")[1], params)
    assert_trees_equal(load_unet(tmp_path / "sharded")[1], params)


def test_single_weight_file_loads_with_the_config_beside_it(unet_folder):
    _, folder = unet_folder
    _, params = load_unet(folder)
    _, params_file = load_unet(folder / "diffusion_pytorch_model.safetensors")
    assert_trees_equal(params_file, params)


def test_bf16_and_fp16_weight_files_load_their_values(unet_folder, tmp_path):
    model, folder = unet_folder
    for torch_dtype in (torch.bfloat16, torch.float16):
        state = {k: v.to(torch_dtype) for k, v in model.state_dict().items()}
        copy_config(folder, tmp_path)
        torch_save_safetensors(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
        _, params = load_unet(tmp_path)
        kernel = params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
        expected = state["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"].float().numpy().T
        assert kernel.dtype == np.float32
        assert np.array_equal(np.asarray(kernel), expected)


def test_missing_unexpected_and_misshaped_keys_are_reported_together(unet_folder, tmp_path):
    model, folder = unet_folder
    state = {k: v.clone() for k, v in model.state_dict().items()}
    missing = "down_blocks.0.resnets.1.norm2.bias"
    misshaped = "up_blocks.1.attentions.0.proj_out.weight"
    del state[missing]
    state["down_blocks.0.resnets.1.extra_layer.weight"] = torch.zeros(3)
    state[misshaped] = torch.zeros(16, 15, 1, 1)
    copy_config(folder, tmp_path)
    torch_save_safetensors(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(weights.WeightsError) as err:
        load_unet(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    assert "missing keys (1)" in message and missing in message
    assert "unexpected keys (1)" in message and "down_blocks.0.resnets.1.extra_layer.weight" in message
    assert "mis-shaped keys (1)" in message and f"{misshaped}: shape (16, 15, 1, 1), expected (16, 16, 1, 1)" in message


def test_unreadable_files_and_folders_name_the_problem(unet_folder, tmp_path):
    _, folder = unet_folder
    copy_config(folder, tmp_path / "garbage")
    (tmp_path / "garbage" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(weights.WeightsError, match="garbage.*cannot read as safetensors"):
        load_unet(tmp_path / "garbage")
    copy_config(folder, tmp_path / "empty")
    with pytest.raises(weights.WeightsError, match=r"empty: no weight file found.*\['config.json'\]"):
        load_unet(tmp_path / "empty")
    (tmp_path / "no_config").mkdir()
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", tmp_path / "no_config")
    with pytest.raises(weights.WeightsError, match="no_config.*config"):
        load_unet(tmp_path / "no_config")
    with pytest.raises(weights.WeightsError, match="unknown weight file type"):
        weights.read_state_dict(folder / "config.json")


def test_unsupported_config_is_a_weights_error_naming_the_folder(unet_folder, tmp_path):
    _, folder = unet_folder
    copy_config(folder, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
    with pytest.raises(weights.WeightsError, match=f"{tmp_path}.*addition_embed_type"):
        load_unet(tmp_path)


def test_write_safetensors_is_atomic_and_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "w.safetensors"
    weights.write_safetensors(path, {"a": np.arange(3, dtype=np.float32)})
    with pytest.raises(SafetensorError, match='dtype "object"'):
        weights.write_safetensors(path, {"a": np.array([object()])})
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]
    assert np.array_equal(weights.read_state_dict(path)["a"], np.arange(3, dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# Saving in the diffusers format


def test_saved_unet_loads_in_diffusers_with_identical_values(unet_folder, tmp_path):
    from diffusers import UNet2DConditionModel

    model, folder = unet_folder
    module, params = load_unet(folder)
    save_unet(tmp_path, module, params)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    original, saved = model.state_dict(), reloaded.state_dict()
    assert sorted(original) == sorted(saved)
    for key in original:
        assert torch.equal(original[key], saved[key]), key
    sample, timesteps, context = unet_inputs()
    with torch.no_grad():
        args = (torch.from_numpy(sample.transpose(0, 3, 1, 2).copy()), torch.from_numpy(timesteps), torch.from_numpy(context))
        assert torch.equal(model(*args).sample, reloaded(*args).sample)
    assert_trees_equal(load_unet(tmp_path)[1], params)


def test_saved_vae_loads_in_diffusers_with_identical_values(vae_folder, tmp_path):
    from diffusers import AutoencoderKL as TorchVAE

    model, folder = vae_folder
    module, params = load_vae(folder)
    save_vae(tmp_path, module, params)
    reloaded = TorchVAE.from_pretrained(tmp_path).eval()
    original, saved = model.state_dict(), reloaded.state_dict()
    assert sorted(original) == sorted(saved)
    for key in original:
        assert torch.equal(original[key], saved[key]), key
    assert reloaded.config.scaling_factor == model.config.scaling_factor


# ---------------------------------------------------------------------------------------------
# Original single-file SD checkpoints (LDM names)


def ldm_checkpoint(unet_model, unet_folder, vae_model, vae_folder):
    """A state dict in the layout of ``v1-5-pruned-emaonly.safetensors``: UNet under
    ``model.diffusion_model.``, VAE under ``first_stage_model.`` (attention q/k/v/proj_out as 1x1
    convs), CLIP text under ``cond_stage_model.transformer.``, plus the scheduler buffers.

    It is written through our LDM key maps, so the test first certifies the layout with
    diffusers' own LDM->diffusers converter: it must give back exactly the diffusers weights.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_module, unet_params = load_unet(unet_folder)
    vae_module, vae_params = load_vae(vae_folder)
    ldm = weights.export_state_dict(unet_params, ldm_unet_key_map(unet_params, unet_module.config))
    ldm.update(weights.export_state_dict(vae_params, ldm_vae_key_map(vae_params, vae_module.config)))

    converted_unet = convert_ldm_unet_checkpoint(ldm, dict(unet_model.config))
    reference = {k: v.numpy() for k, v in unet_model.state_dict().items()}
    assert sorted(converted_unet) == sorted(reference)
    assert all(np.array_equal(converted_unet[k], reference[k]) for k in reference)
    converted_vae = convert_ldm_vae_checkpoint(ldm, dict(vae_model.config))
    reference = {k: v.numpy() for k, v in vae_model.state_dict().items()}
    assert sorted(converted_vae) == sorted(reference)
    for key in reference:  # diffusers squeezes the 1x1 attention convs only when loading the model
        assert np.array_equal(converted_vae[key].reshape(reference[key].shape), reference[key]), key
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4

    torch.manual_seed(2)
    clip = perturb_(CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT)).eval(), 2)
    text_state = {k: v.numpy() for k, v in clip.state_dict().items()}
    ldm.update({f"cond_stage_model.transformer.{k}": v for k, v in text_state.items()})
    ldm["alphas_cumprod"] = np.linspace(1, 0, 1000, dtype=np.float32)
    ldm["betas"] = np.linspace(0, 1, 1000, dtype=np.float32)
    return {k: torch.from_numpy(np.array(v)) for k, v in ldm.items()}, text_state


@pytest.fixture(scope="module")
def ldm_files(unet_folder, vae_folder, tmp_path_factory):
    (unet_model, unet_dir), (vae_model, vae_dir) = unet_folder, vae_folder
    state, text_state = ldm_checkpoint(unet_model, unet_dir, vae_model, vae_dir)
    folder = tmp_path_factory.mktemp("ldm")
    torch_save_safetensors(state, str(folder / "sd-tiny.safetensors"))
    torch.save({"state_dict": state, "global_step": 1}, folder / "sd-tiny.ckpt")
    return folder, text_state


@pytest.mark.parametrize("file_name", ["sd-tiny.safetensors", "sd-tiny.ckpt"])
def test_single_file_ldm_checkpoint_loads_like_the_diffusers_folders(ldm_files, unet_folder, vae_folder, file_name):
    folder, text_state = ldm_files
    (unet_model, unet_dir), (vae_model, vae_dir) = unet_folder, vae_folder
    loaded = load_sd_checkpoint(folder / file_name, dict(unet_model.config), dict(vae_model.config))
    unet_module, unet_params = load_unet(unet_dir)
    vae_module, vae_params = load_vae(vae_dir)
    assert_trees_equal(loaded["unet"][1], unet_params)
    assert_trees_equal(loaded["vae"][1], vae_params)
    sample, timesteps, context = unet_inputs(1)
    ours = loaded["unet"][0].apply({"params": loaded["unet"][1]}, sample, timesteps, context)
    ref = unet_module.apply({"params": unet_params}, sample, timesteps, context)
    assert np.array_equal(np.asarray(ours), np.asarray(ref))
    z = np.random.default_rng(2).standard_normal((1, 4, 4, 4)).astype(np.float32)
    decode = lambda m, p: np.asarray(m.apply({"params": p}, z, method=AutoencoderKL.decode))  # noqa: E731
    assert np.array_equal(decode(*loaded["vae"]), decode(vae_module, vae_params))
    assert sorted(loaded["text_encoder_state_dict"]) == sorted(text_state)
    assert all(np.array_equal(loaded["text_encoder_state_dict"][k], text_state[k]) for k in text_state)


def test_ldm_checkpoint_can_load_its_ema_copy(ldm_files, unet_folder, vae_folder, tmp_path):
    folder, _ = ldm_files
    (unet_model, _), (vae_model, _) = unet_folder, vae_folder
    state = torch_load_safetensors(str(folder / "sd-tiny.safetensors"))
    for key in [k for k in state if k.startswith("model.diffusion_model.")]:
        state["model_ema." + key[len("model."):].replace(".", "")] = state[key] * 2
    torch_save_safetensors(state, str(tmp_path / "with_ema.safetensors"))
    regular = load_sd_checkpoint(tmp_path / "with_ema.safetensors", dict(unet_model.config), dict(vae_model.config))
    ema = load_sd_checkpoint(tmp_path / "with_ema.safetensors", dict(unet_model.config), dict(vae_model.config), use_ema=True)
    doubled = jax.tree.map(lambda x: 2 * np.asarray(x), regular["unet"][1])
    assert_trees_equal(ema["unet"][1], doubled)
    with pytest.raises(weights.WeightsError, match="EMA weights are missing"):
        load_sd_checkpoint(folder / "sd-tiny.safetensors", dict(unet_model.config), dict(vae_model.config), use_ema=True)


def test_ldm_checkpoint_with_a_missing_vae_key_names_it(ldm_files, unet_folder, vae_folder, tmp_path):
    folder, _ = ldm_files
    (unet_model, _), (vae_model, _) = unet_folder, vae_folder
    state = torch_load_safetensors(str(folder / "sd-tiny.safetensors"))
    del state["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"]
    torch_save_safetensors(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(weights.WeightsError, match=r"broken.safetensors(.|\n)*first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"):
        load_sd_checkpoint(tmp_path / "broken.safetensors", dict(unet_model.config), dict(vae_model.config))


def test_abstract_params_have_logical_names_on_every_leaf(unet_folder, vae_folder):
    from mema_jax.models.unet import UNet2DConditionModel, UNetConfig
    from mema_jax.models.vae import VAEConfig

    (unet_model, _), (vae_model, _) = unet_folder, vae_folder
    trees = [abstract_unet_params(UNet2DConditionModel(UNetConfig.from_dict(dict(unet_model.config)))),
             abstract_vae_params(AutoencoderKL(VAEConfig.from_dict(dict(vae_model.config))))]
    for tree in trees:
        for path, leaf in weights.flatten_paths(tree).items():
            assert isinstance(leaf, nn.Partitioned), path
            assert len(leaf.names) == leaf.value.ndim, path
