"""The README's documented loading calls run as written, on a tiny saved Stable Diffusion folder."""
import re
import shutil

import numpy as np
import torch
from conftest import REPO
from tiny_models import TINY_CLIP_VISION
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- README-CALLS -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its README-CALLS block"
    return match.group(1)


def test_readme_loading_calls_run_on_a_saved_model(tmp_path, tiny_sd):
    """``tiny_sd`` (conftest.py): a tiny diffusers pipeline saved with save_pretrained."""
    folder = tmp_path / "sd"
    shutil.copytree(tiny_sd[0], folder)
    torch.manual_seed(0)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_VISION))
    vision.save_pretrained(folder / "image_encoder")

    code = readme_block()
    assert 'SD = "stable-diffusion-v1-5"' in code
    scope = {}
    exec(compile(code.replace('SD = "stable-diffusion-v1-5"', f'SD = "{folder}"'), "README.md", "exec"), scope)

    size = scope["unet"].config.sample_size
    assert scope["eps"].shape == scope["latents"].shape == (1, size, size, 4)
    assert scope["context"].shape[:2] == (1, 77)
    assert scope["image"].shape[-1] == 3 and scope["image_embeds"].shape == (1, TINY_CLIP_VISION["projection_dim"])
    assert scope["f_med"].shape[-1] == scope["unet"].config.block_out_channels[0]
    assert scope["images"].dtype == np.uint8 and scope["images"].ndim == 4
    a = scope["unet_params"]["conv_in"]["kernel"]
    b = scope["unet_sharded_params"]["conv_in"]["kernel"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
