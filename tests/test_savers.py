"""One rule for every model saver (save_unet, save_vae, save_clip_text, save_clip_vision): an
existing config.json or weights file is never overwritten, and nothing is written then; a fresh
folder gets both files, and they load back to the same parameters.  JAX only (no torch)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mema_jax.models import convert_clip, convert_unet, convert_vae
from mema_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
from mema_jax.models.unet import UNet2DConditionModel, UNetConfig
from mema_jax.models.vae import AutoencoderKL, VAEConfig


def _unet():
    config = UNetConfig.from_dict(dict(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
                                       cross_attention_dim=8, attention_head_dim=2,
                                       down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",)))
    module = UNet2DConditionModel(config)
    params = module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,)), jnp.zeros((1, 3, 8)))["params"]
    return module, params, convert_unet.save_unet, convert_unet.load_unet, "diffusion_pytorch_model.safetensors"


def _vae():
    config = VAEConfig.from_dict(dict(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                                      down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)))
    module = AutoencoderKL(config)
    params = module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))["params"]
    return module, params, convert_vae.save_vae, convert_vae.load_vae, "diffusion_pytorch_model.safetensors"


def _clip_text():
    config = CLIPTextConfig.from_dict(dict(vocab_size=20, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                           num_hidden_layers=1, max_position_embeddings=6))
    module = CLIPTextModel(config)
    params = module.init(jax.random.key(0), jnp.zeros((1, 6), jnp.int32))["params"]
    return module, params, convert_clip.save_clip_text, convert_clip.load_clip_text, "model.safetensors"


def _clip_vision():
    config = CLIPVisionConfig.from_dict(dict(hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                             num_hidden_layers=1, image_size=8, patch_size=4, projection_dim=4))
    module = CLIPVisionModelWithProjection(config)
    params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    return module, params, convert_clip.save_clip_vision, convert_clip.load_clip_vision, "model.safetensors"


SAVERS = {"unet": _unet, "vae": _vae, "clip_text": _clip_text, "clip_vision": _clip_vision}


@pytest.fixture(scope="module", params=sorted(SAVERS))
def model(request):
    return SAVERS[request.param]()


def test_saved_folder_loads_back_to_the_same_parameters(model, tmp_path):
    module, params, save, load, weights_file = model
    save(tmp_path / "saved", module, params)
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == sorted(["config.json", weights_file])
    _, loaded = load(tmp_path / "saved")
    jax.tree.map(np.testing.assert_array_equal, nn.unbox(params), loaded)


@pytest.mark.parametrize("existing", ["config.json", "weights"])
def test_saver_refuses_to_overwrite_and_writes_nothing(model, tmp_path, existing):
    module, params, save, _, weights_file = model
    name = weights_file if existing == "weights" else existing
    (tmp_path / name).write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=name):
        save(tmp_path, module, params)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # the other file was not written either
    assert (tmp_path / name).read_bytes() == b"precious"
