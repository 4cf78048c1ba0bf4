"""CLIP text and vision towers against transformers, through the same loaders real weights use.

Tiny random models are written with ``save_pretrained`` (transformers 5 layout) or re-keyed the
way SD1.5's ``text_encoder`` and transformers 4 store them (``text_model.`` prefix plus the old
``position_ids`` buffer), then loaded with ``load_clip_text`` / ``load_clip_vision``.

Tolerances (the rules are in tests/parity.py):

* tiny towers, fp32 against transformers fp32: relative error ||ours - ref|| / ||ref|| <= 1e-5.
  Both sides do the same float32 matmuls, LayerNorms and softmaxes in a different order; measured
  errors are ~3e-7.
* the full-size ViT-L/14 text tower (fp32) and every bf16 check (bf16 compute, fp32 weights):
  against transformers run in float64, our error must be at most 2x transformers' own error at
  that precision, or a floor (1e-6 for fp32, 2**-8 for bf16).  A fixed bound there would test the
  CPU's kernels rather than our code.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import os
import subprocess
import sys
import textwrap

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from parity import BF16_FLOOR, FP32_TOL, assert_float64_parity, rel_err
from safetensors.numpy import load_file, save_file
from tiny_models import CLIP_BOS, CLIP_EOS, SD15_CLIP_TEXT, TINY_CLIP_TEXT, TINY_CLIP_VISION, make_tokenizer_folder
from transformers import CLIPTextConfig as HFTextConfig
from transformers import CLIPTextModel as HFTextModel
from transformers import CLIPVisionConfig as HFVisionConfig
from transformers import CLIPVisionModelWithProjection as HFVisionModel

from mema_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextOutput,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    CLIPVisionOutput,
)
from mema_jax.models.convert_clip import (
    load_clip_text,
    load_clip_vision,
    load_tokenizer,
    save_clip_text,
    save_clip_vision,
    tokenize,
)
from mema_jax.models.weights import WeightsError, read_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.partial(jax.jit, static_argnames=("module", "output_hidden_states"))
def run_text(module, params, ids, attention_mask=None, output_hidden_states=False):
    """Jitted forward; tests with equal modules share the compiled code."""
    return module.apply({"params": params}, ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)


@functools.partial(jax.jit, static_argnames=("module", "output_hidden_states"))
def run_vision(module, params, pixels, output_hidden_states=False):
    return module.apply({"params": params}, pixels, output_hidden_states=output_hidden_states)


def randomize(model, seed):
    """transformers initializes LayerNorms to (1, 0); random values there make the test stricter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen) if name.endswith("weight")
                        else 0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def text_ids(batch=3, length=16, seed=0):
    """Prompts as the SD tokenizer makes them: bos, tokens, eos, then eos padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, CLIP_EOS - 1, size=(batch, length))
    ids[:, 0] = CLIP_BOS
    for row, n_tokens in enumerate(rng.integers(1, length - 1, size=batch)):
        ids[row, n_tokens + 1:] = CLIP_EOS
    return ids


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize(HFTextModel(HFTextConfig(**TINY_CLIP_TEXT)), 1)
    folder = tmp_path_factory.mktemp("clip_text")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def prefixed_text_folder(tmp_path_factory, text_folder):
    """The same weights keyed as SD1.5's text_encoder: "text_model." prefix and the position_ids buffer."""
    folder, _ = text_folder
    out = tmp_path_factory.mktemp("clip_text_prefixed")
    tensors = {"text_model." + k: v for k, v in load_file(folder / "model.safetensors").items()}
    tensors["text_model.embeddings.position_ids"] = np.arange(TINY_CLIP_TEXT["max_position_embeddings"], dtype=np.int64)[None]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text((folder / "config.json").read_text())
    return out


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize(HFVisionModel(HFVisionConfig(**TINY_CLIP_VISION)), 2)
    folder = tmp_path_factory.mktemp("clip_vision")
    model.save_pretrained(folder)
    return folder, model


# ----------------------------------------------------------------------------------------------
# Text tower


def reference_text(model, ids, attention_mask=None):
    with torch.no_grad():
        mask = None if attention_mask is None else torch.from_numpy(attention_mask)
        return model(torch.from_numpy(ids), attention_mask=mask, output_hidden_states=True)


@pytest.mark.parametrize("attention_impl", ["xla", "dot_product"])
def test_text_tower_matches_transformers_fp32(text_folder, attention_impl):
    folder, model = text_folder
    ids = text_ids()
    ref = reference_text(model, ids)
    module, params = load_clip_text(folder, attention_impl=attention_impl)
    out = run_text(module, params, jnp.asarray(ids), output_hidden_states=True)
    assert out.last_hidden_state.shape == (3, 16, 32) and out.pooler_output.shape == (3, 32)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= FP32_TOL
    assert rel_err(out.pooler_output, ref.pooler_output) <= FP32_TOL
    assert len(out.hidden_states) == len(ref.hidden_states) == TINY_CLIP_TEXT["num_hidden_layers"] + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert rel_err(ours, theirs) <= FP32_TOL


def test_text_tower_pools_at_the_first_end_of_text_token(text_folder):
    folder, _ = text_folder
    ids = text_ids()
    module, params = load_clip_text(folder)
    out = run_text(module, params, jnp.asarray(ids))
    first_eos = np.argmax(ids == CLIP_EOS, axis=1)
    np.testing.assert_array_equal(out.pooler_output, np.asarray(out.last_hidden_state)[np.arange(3), first_eos])


def test_text_tower_with_padding_mask_matches_transformers(text_folder):
    folder, model = text_folder
    ids = text_ids(seed=1)
    mask = (np.cumsum(ids == CLIP_EOS, axis=1) <= 1).astype(np.int64)  # real tokens and the first eos
    ref = reference_text(model, ids, mask)
    module, params = load_clip_text(folder)
    out = run_text(module, params, jnp.asarray(ids), jnp.asarray(mask))
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= FP32_TOL


def test_legacy_eos_token_id_2_pools_at_the_highest_id(tmp_path):
    """Configs from before transformers PR #24773 have eos_token_id=2 and pool at argmax(ids)."""
    torch.manual_seed(3)
    model = randomize(HFTextModel(HFTextConfig(**{**TINY_CLIP_TEXT, "eos_token_id": 2})), 3)
    model.save_pretrained(tmp_path)
    ids = text_ids(seed=2)
    ref = reference_text(model, ids)
    module, params = load_clip_text(tmp_path)
    out = run_text(module, params, jnp.asarray(ids))
    assert rel_err(out.pooler_output, ref.pooler_output) <= FP32_TOL


def test_text_weights_with_and_without_text_model_prefix_load_the_same(text_folder, prefixed_text_folder):
    folder, model = text_folder
    assert not any(k.startswith("text_model.") for k in read_state_dict(folder))
    _, plain = load_clip_text(folder)
    module, prefixed = load_clip_text(prefixed_text_folder)
    jax.tree.map(np.testing.assert_array_equal, plain, prefixed)
    ref = reference_text(model, text_ids())
    out = run_text(module, prefixed, jnp.asarray(text_ids()))
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= FP32_TOL


def test_text_tower_bf16_compute_error_is_bf16_sized(text_folder):
    """bf16 compute (fp32 params) against transformers in float64, bounded by transformers' own bf16 error."""
    folder, model = text_folder
    ids = text_ids()
    ref64 = reference_text(copy.deepcopy(model).double(), ids)
    torch_bf16 = reference_text(copy.deepcopy(model).to(torch.bfloat16), ids)
    module, params = load_clip_text(folder, dtype=jnp.bfloat16)
    out = run_text(module, params, jnp.asarray(ids))
    assert out.last_hidden_state.dtype == jnp.bfloat16
    assert_float64_parity("CLIP text bf16 last_hidden_state", out.last_hidden_state, torch_bf16.last_hidden_state,
                          ref64.last_hidden_state, floor=BF16_FLOOR)


def test_text_tower_remat_gives_the_same_output_and_gradient(text_folder):
    folder, _ = text_folder
    ids = jnp.asarray(text_ids())
    module, params = load_clip_text(folder)
    rematted, _ = load_clip_text(folder, remat="full")

    def loss(m):
        return lambda p: jnp.sum(m.apply({"params": p}, ids).last_hidden_state ** 2)

    g_plain, g_remat = jax.jit(jax.grad(loss(module)))(params), jax.jit(jax.grad(loss(rematted)))(params)
    # One norm over all gradients: some are zero up to rounding (k_proj biases shift every logit of
    # a query alike, which softmax ignores), so per-leaf relative errors would compare noise.
    flat_remat, _ = jax.flatten_util.ravel_pytree(g_remat)
    flat_plain, _ = jax.flatten_util.ravel_pytree(g_plain)
    assert rel_err(flat_remat, flat_plain) <= 1e-5  # recomputation may reorder float32 sums, nothing more


# ----------------------------------------------------------------------------------------------
# Vision tower


@pytest.mark.parametrize("attention_impl", ["xla", "dot_product"])
def test_vision_tower_with_projection_matches_transformers_fp32(vision_folder, attention_impl):
    folder, model = vision_folder
    pixels = np.random.default_rng(0).standard_normal((2, 3, 42, 42)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(pixels), output_hidden_states=True)
    module, params = load_clip_vision(folder, attention_impl=attention_impl)
    out = run_vision(module, params, jnp.asarray(pixels.transpose(0, 2, 3, 1)), output_hidden_states=True)
    assert out.image_embeds.shape == (2, 12) and out.last_hidden_state.shape == (2, 10, 32)
    assert rel_err(out.image_embeds, ref.image_embeds) <= FP32_TOL
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= FP32_TOL
    assert len(out.hidden_states) == len(ref.hidden_states) == TINY_CLIP_VISION["num_hidden_layers"] + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert rel_err(ours, theirs) <= FP32_TOL
    # IP-Adapter Plus reads the penultimate layer's output.
    assert rel_err(out.hidden_states[-2], ref.hidden_states[-2]) <= FP32_TOL


def test_vision_tower_bf16_compute_error_is_bf16_sized(vision_folder):
    """bf16 compute (fp32 params) against transformers in float64, bounded by transformers' own bf16 error."""
    folder, model = vision_folder
    pixels = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, 42, 42)).astype(np.float32))
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(pixels.double()).image_embeds
        torch_bf16 = copy.deepcopy(model).to(torch.bfloat16)(pixels.bfloat16()).image_embeds
    module, params = load_clip_vision(folder, dtype=jnp.bfloat16)
    out = run_vision(module, params, jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1)))
    assert_float64_parity("CLIP vision bf16 image_embeds", out.image_embeds, torch_bf16, ref64, floor=BF16_FLOOR)


def test_output_fields_are_named_as_in_transformers():
    """Code written against transformers' outputs (``.pooler_output`` and the rest) ports as it is."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

    def names(cls):
        return {f.name for f in dataclasses.fields(cls)}

    assert names(CLIPTextOutput) <= names(BaseModelOutputWithPooling)
    assert names(CLIPVisionOutput) <= names(CLIPVisionModelOutput) | names(BaseModelOutputWithPooling)
    assert "pooler_output" in names(CLIPTextOutput) & names(CLIPVisionOutput)


def test_vision_tower_rejects_images_of_the_wrong_size(vision_folder):
    module, params = load_clip_vision(vision_folder[0])
    with pytest.raises(ValueError, match="NHWC"):
        module.apply({"params": params}, jnp.zeros((1, 3, 42, 42)))


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_every_parameter_has_logical_axis_names(tower):
    if tower == "text":
        module, inputs = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT)), jnp.zeros((1, 16), jnp.int32)
    else:
        module, inputs = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_VISION)), jnp.zeros((1, 42, 42, 3))
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), inputs)["params"]
    leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    unnamed = [leaf for leaf in leaves if not isinstance(leaf, nn.Partitioned)]
    assert leaves and not unnamed
    assert all(len(leaf.names) == leaf.value.ndim for leaf in leaves)


# ----------------------------------------------------------------------------------------------
# Bad weight files and configs


def test_missing_extra_and_misshaped_keys_give_one_error_listing_them(tmp_path, text_folder):
    folder, _ = text_folder
    tensors = load_file(folder / "model.safetensors")
    del tensors["encoder.layers.1.mlp.fc2.bias"]
    tensors["encoder.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
    tensors["final_layer_norm.weight"] = np.zeros((31,), np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(WeightsError) as info:
        load_clip_text(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    for key in ("encoder.layers.1.mlp.fc2.bias", "encoder.layers.0.self_attn.extra.weight", "final_layer_norm.weight"):
        assert key in message


def test_vision_weights_missing_the_projection_are_an_error(tmp_path, vision_folder):
    folder, _ = vision_folder
    tensors = load_file(folder / "model.safetensors")
    del tensors["visual_projection.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(WeightsError, match="visual_projection.weight"):
        load_clip_vision(tmp_path)


def test_text_loader_rejects_a_vision_config(vision_folder):
    with pytest.raises(ValueError, match="clip_vision_model"):
        load_clip_text(vision_folder[0])


# ----------------------------------------------------------------------------------------------
# Saving


def test_saved_text_tower_loads_in_transformers_with_identical_outputs(tmp_path, text_folder):
    folder, _ = text_folder
    module, params = load_clip_text(folder)
    save_clip_text(tmp_path / "saved", module, params)
    reloaded = HFTextModel.from_pretrained(tmp_path / "saved").eval()
    ids = text_ids(seed=4)
    out = run_text(module, params, jnp.asarray(ids))
    assert rel_err(out.last_hidden_state, reference_text(reloaded, ids).last_hidden_state) <= FP32_TOL
    _, params_again = load_clip_text(tmp_path / "saved")
    jax.tree.map(np.testing.assert_array_equal, params, params_again)
    with pytest.raises(FileExistsError):
        save_clip_text(tmp_path / "saved", module, params)


def test_saved_vision_tower_loads_in_transformers_with_identical_weights(tmp_path, vision_folder):
    folder, model = vision_folder
    module, params = load_clip_vision(folder)
    save_clip_vision(tmp_path, module, params)
    reloaded = HFVisionModel.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(reloaded.state_dict().items())):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_from_folder_pads_and_truncates_as_stable_diffusion(tmp_path):
    vocab = make_tokenizer_folder(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    ids = tokenize(tokenizer, ["a photo", "b " * 100])
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    np.testing.assert_array_equal(ids[0, :4], [bos, vocab["a</w>"], vocab["photo</w>"], eos])
    assert np.all(ids[0, 4:] == eos)  # SD's tokenizer pads with <|endoftext|>
    assert ids[1, 0] == bos and ids[1, -1] == eos and np.all(ids[1, 1:-1] == vocab["b</w>"])  # truncated to 77


def test_tokenizer_folder_without_files_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------
# Sharded loading


SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {repo!r})
    import jax, jax.numpy as jnp, numpy as np
    from flax import linen as nn
    from mema_jax.core import sharding
    from mema_jax.models.convert_clip import load_clip_text
    assert jax.device_count() == 8
    folder = {folder!r}
    ids = jnp.asarray(np.load({ids!r}))
    module, params = load_clip_text(folder)
    expected = module.apply({{"params": params}}, ids).last_hidden_state
    mesh = sharding.make_mesh({{"data": 2, "fsdp": 2, "tensor": 2}})
    rules = sharding.DEFAULT_RULES
    _, sharded = load_clip_text(folder, mesh=mesh, rules=rules)
    fc1 = sharded["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor"), fc1.sharding.spec
    assert fc1.addressable_shards[0].data.shape == (16, 20)  # (32, 40) split over fsdp x tensor
    with mesh, nn.logical_axis_rules(rules):
        ids_sharded = jax.device_put(ids, sharding.batch_sharding(mesh, rules, 2, ids.shape))
        out = jax.jit(lambda p, x: module.apply({{"params": p}}, x).last_hidden_state)(sharded, ids_sharded)
    err = float(jnp.linalg.norm(out - expected) / jnp.linalg.norm(expected))
    print("sharded vs unsharded relative error", err)
    assert err <= 1e-6, err
""")


def test_sharded_load_and_forward_on_8_devices_equals_unsharded(tmp_path, text_folder):
    folder, _ = text_folder
    ids_path = tmp_path / "ids.npy"
    np.save(ids_path, text_ids(batch=4).astype(np.int32))
    script = SHARDED_SCRIPT.format(repo=REPO, folder=str(folder), ids=str(ids_path))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout)


# ----------------------------------------------------------------------------------------------
# Full size


@pytest.mark.slow
def test_full_size_vit_l14_text_tower_matches_transformers(tmp_path):
    """SD1.5's text tower size (123M parameters, random weights) through save_pretrained and our loader,
    against transformers in float64 (the float64 rule of tests/parity.py)."""
    torch.manual_seed(0)
    model = HFTextModel(HFTextConfig(**SD15_CLIP_TEXT)).eval()
    model.save_pretrained(tmp_path)
    ids = np.full((2, 77), 49407, np.int64)
    ids[:, 0] = 49406
    ids[0, 1:9] = np.arange(320, 328)
    ids[1, 1:30] = np.arange(1000, 1029)
    ref32 = reference_text(model, ids)
    ref64 = reference_text(model.double(), ids)  # in place: one copy of the weights at a time
    del model
    gc.collect()
    module, params = load_clip_text(tmp_path)
    assert module.config == CLIPTextConfig.sd15()
    out = run_text(module, params, jnp.asarray(ids))
    assert_float64_parity("ViT-L/14 text tower fp32 last_hidden_state", out.last_hidden_state,
                          ref32.last_hidden_state, ref64.last_hidden_state)
    assert_float64_parity("ViT-L/14 text tower fp32 pooler_output", out.pooler_output, ref32.pooler_output,
                          ref64.pooler_output)
