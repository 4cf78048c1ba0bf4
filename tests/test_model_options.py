"""Model options shared by every Flax model: a bad attention or remat choice fails at once, by name."""
import jax
import jax.numpy as jnp
import pytest
from tiny_models import TINY_CLIP_TEXT, TINY_UNET_MIXED, TINY_VAE_SMALL

from mema_jax.models.clip import CLIPTextConfig, CLIPTextModel
from mema_jax.models.resnet_classifier import ResNetClassifier
from mema_jax.models.unet import UNet2DConditionModel, UNetConfig
from mema_jax.models.vae import AutoencoderKL, VAEConfig

UNET = UNetConfig.from_dict(TINY_UNET_MIXED)
VAE = VAEConfig.from_dict(TINY_VAE_SMALL)
CLIP = CLIPTextConfig.from_dict(TINY_CLIP_TEXT)

INITS = {
    "unet": lambda **kw: UNet2DConditionModel(UNET, **kw).init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 3, TINY_UNET_MIXED["cross_attention_dim"]))),
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
