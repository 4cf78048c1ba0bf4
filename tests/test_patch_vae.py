"""The offline generator's lossless "VAE" (mema_jax.models.patch_vae): 4x4 patches of the image in
the channels, exactly invertible, saved as a config-only vae/ folder that every loader of a
pipeline folder reads (the trainer, the text-to-image pipeline, the sampler, the medical encoder)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mema_jax.models import convert_vae, patch_vae
from mema_jax.models.weights import WeightsError


def test_encode_puts_each_patch_in_the_channels_and_decode_inverts_it_exactly():
    vae = patch_vae.PatchAutoencoder(patch_vae.PatchConfig(patch_size=4))
    images = jax.random.uniform(jax.random.key(0), (2, 16, 12, 3), minval=-1, maxval=1)
    latents = vae.apply({"params": {}}, images, method="encode").mode()
    assert latents.shape == (2, 4, 3, 48)
    # latent (i, j) holds the 4x4 block at rows 4i.., columns 4j.., row-major, RGB innermost
    np.testing.assert_array_equal(latents[1, 2, 1], images[1, 8:12, 4:8].reshape(-1))
    np.testing.assert_array_equal(vae.apply({"params": {}}, latents, method="decode"), images)


def test_a_side_that_is_not_a_multiple_of_the_patch_is_refused():
    vae = patch_vae.PatchAutoencoder(patch_vae.PatchConfig(patch_size=4))
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        vae.apply({"params": {}}, jnp.zeros((1, 10, 12, 3)), method="encode")


def test_saved_folder_is_its_config_alone_and_loads_back(tmp_path):
    vae = patch_vae.PatchAutoencoder(patch_vae.PatchConfig(patch_size=2))
    convert_vae.save_vae(tmp_path / "vae", vae, {})
    assert [p.name for p in (tmp_path / "vae").iterdir()] == ["config.json"]
    loaded, params = convert_vae.load_vae(tmp_path / "vae")
    assert isinstance(loaded, patch_vae.PatchAutoencoder) and params == {}
    assert loaded.config == vae.config and loaded.downsample_factor == 2
    with pytest.raises(FileExistsError, match="config.json"):
        convert_vae.save_vae(tmp_path / "vae", vae, {})


def test_a_bad_patch_config_is_one_error_naming_the_folder(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "PatchAutoencoder", "patch_size": 0}')
    with pytest.raises(WeightsError, match=f"{tmp_path / 'vae'}: patch_size and in_channels must be >= 1"):
        convert_vae.load_vae(tmp_path / "vae")
