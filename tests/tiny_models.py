"""Model configs and builders shared by the test modules (a plain module, not a test module).

Tests import it as ``from tiny_models import ...`` (conftest.py puts tests/ on sys.path).  The
configs are diffusers / transformers constructor kwargs; the builders make PyTorch models with
random weights, save them with ``save_pretrained`` (the layout real weights come in) and return
them for the reference outputs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------
# UNet (diffusers UNet2DConditionModel kwargs)

# SD1.x-like: conv proj_in/out, 2 layers per level (the LDM numbering of input/output blocks),
# heads from attention_head_dim, upsampler after a cross-attention up block.
TINY_UNET_SD1 = dict(
    block_out_channels=(16, 32),
    layers_per_block=2,
    norm_num_groups=8,
    cross_attention_dim=24,
    attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    sample_size=16,
)
# SD2.x-like: linear projections, per-block heads, upcast_attention, 2 transformer layers,
# sin-first timestep features with freq_shift 1, plain Down/Up blocks.
TINY_UNET_SD2 = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=24,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    upcast_attention=True,
    transformer_layers_per_block=2,
    flip_sin_to_cos=False,
    freq_shift=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    sample_size=16,
)
# One level, one layer: the smallest graph with every layer kind, for the checks that compile
# several variants (remat policies, attention implementations).
TINY_UNET_ONE_LEVEL = dict(
    block_out_channels=(16,),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=24,
    attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
    sample_size=8,
)
# SD1-like with one attention and one plain level (2 layers each, conv projections): every kind of
# LDM key, for the weight-file tests.
TINY_UNET_MIXED = dict(
    TINY_UNET_SD1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    sample_size=8,
)
# SD1.5's UNet (860M parameters).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)

# ----------------------------------------------------------------------------------------------
# VAE (diffusers AutoencoderKL kwargs)

TINY_VAE = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    sample_size=32,
)
# No mid-block attention, no (post_)quant_conv, a shift factor, 3 levels of 2 layers.
TINY_VAE_VARIANT = dict(
    block_out_channels=(8, 16, 16),
    layers_per_block=2,
    norm_num_groups=4,
    latent_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    mid_block_add_attention=False,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    sample_size=32,
)
# The smallest: 8 and 16 channels (the weight-file tests and the tiny pipeline).
TINY_VAE_SMALL = dict(TINY_VAE, block_out_channels=(8, 16), norm_num_groups=4)
# SD1.5's VAE (84M parameters).
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512,
)

# ----------------------------------------------------------------------------------------------
# CLIP (transformers CLIPTextConfig / CLIPVisionConfig kwargs)

CLIP_VOCAB, CLIP_BOS, CLIP_EOS = 99, 97, 98
TINY_CLIP_TEXT = {
    "vocab_size": CLIP_VOCAB, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 3,
    "num_attention_heads": 4, "max_position_embeddings": 16, "projection_dim": 8, "bos_token_id": CLIP_BOS,
    "eos_token_id": CLIP_EOS, "pad_token_id": 1,
}
TINY_CLIP_VISION = {
    "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 42,
    "patch_size": 14, "projection_dim": 12, "hidden_act": "gelu",
}
# SD1.5's text tower, ViT-L/14 (123M parameters).
SD15_CLIP_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      max_position_embeddings=77, projection_dim=768)

# ----------------------------------------------------------------------------------------------
# Builders


def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, norms included (their default 1/0 would hide swapped keys)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.5 * float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.2
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def make_diffusers_unet(config: dict, folder: Path, seed: int = 0):
    """A perturbed diffusers UNet2DConditionModel, saved to ``folder``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = perturb_(UNet2DConditionModel(**config).eval(), seed)
    model.save_pretrained(folder)
    return model


def make_diffusers_vae(config: dict, folder: Path, seed: int = 0):
    """A perturbed diffusers AutoencoderKL, saved to ``folder``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = perturb_(AutoencoderKL(**config).eval(), seed)
    model.save_pretrained(folder)
    return model


def make_tokenizer_folder(path: Path) -> dict:
    """A tiny CLIP BPE tokenizer written in the files of SD1.5's tokenizer/ folder; returns its vocab."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {}
    for token in [*letters, *(c + "</w>" for c in letters), "ph", "ot", "oto</w>", "photo</w>",
                  "<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\np h\no t\not o</w>\nph oto</w>\n")
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True}))
    return vocab


TINY_SD_SIZE = 32  # pixels; the tiny VAE downsamples by 2, so the latents are 16 x 16


def save_tiny_sd_pipeline(folder: Path, tokenizer_dir: Path) -> Path:
    """A tiny diffusers StableDiffusionPipeline (UNet, VAE, CLIP text tower, tokenizer, SD1.5's DDIM
    scheduler settings; no safety checker) with random weights, saved to ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = make_tokenizer_folder(tokenizer_dir)
    eos = vocab["<|endoftext|>"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=TINY_SD_SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4,
    )
    vae = AutoencoderKL(**TINY_VAE_SMALL)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos,
    ))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder,
                                   tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights, PReLU slopes and BatchNorm scales, shifts and running statistics, in place
    (fan-in scaled so deep nets stay finite); returns the module in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var") or (name.endswith(".weight") and tensor.ndim == 1):
                # BN scales / variances and PReLU slopes
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.25)
            elif tensor.ndim >= 2:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(tensor[0].numel()))
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return module.eval()
