"""Model options shared by every Flax model: a bad attention or remat choice fails at once, by name."""
import jax
import jax.numpy as jnp
import pytest

from mema_jax.models.clip import CLIPTextConfig, CLIPTextModel
from mema_jax.models.resnet import ResNetClassifier
from mema_jax.models.unet import UNet2DConditionModel, UNetConfig
from mema_jax.models.vae import AutoencoderKL, VAEConfig

UNET = UNetConfig.from_dict(dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                 cross_attention_dim=8, attention_head_dim=2,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
VAE = VAEConfig.from_dict(dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))
CLIP = CLIPTextConfig.from_dict(dict(vocab_size=50, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                     num_hidden_layers=1, max_position_embeddings=8))

INITS = {
    "unet": lambda **kw: UNet2DConditionModel(UNET, **kw).init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 3, 8))),
    "vae": lambda **kw: AutoencoderKL(VAE, **kw).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))),
    "clip": lambda **kw: CLIPTextModel(CLIP, **kw).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)),
}


@pytest.mark.parametrize("model", sorted(INITS))
def test_unknown_attention_implementation_is_named(model):
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        INITS[model](attention_impl="flash")


@pytest.mark.parametrize("model", sorted(INITS))
def test_unknown_remat_policy_is_named(model):
    with pytest.raises(ValueError, match="unknown remat policy 'sometimes'"):
        INITS[model](remat="sometimes")


def test_classifier_rejects_unknown_remat_policy():
    with pytest.raises(ValueError, match="unknown remat policy 'yes'"):
        ResNetClassifier(widths=(8,), remat="yes").init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
