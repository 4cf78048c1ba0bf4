"""The JAX text-to-image pipeline against diffusers' StableDiffusionPipeline on a tiny random model.

The tiny pipeline (UNet, VAE, CLIP text tower, tokenizer, DDIM scheduler config like SD1.5's) is
written with diffusers' ``save_pretrained`` (the session fixture ``tiny_sd`` of conftest.py) and
loaded with ``StableDiffusionPipeline.from_folder``.
Both pipelines start from the same latents (passed explicitly) and run 3 steps with
classifier-free guidance (scale 7.5), safety checker disabled.

Tolerance: the tiny-model rule of tests/parity.py, fp32 against diffusers fp32: relative error
<= 1e-5 for the final latents and the decoded [0, 1] images.  Each UNet call agrees to ~1e-6;
guidance multiplies the difference of two UNet outputs by 7.5, and three steps compound it
(measured: latents ~2e-6, images ~6e-7).  The full-size components are checked one by one, with
the float64 rule, in test_unet_parity / test_vae_parity / test_clip_parity.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from diffusers import DPMSolverMultistepScheduler
from diffusers import StableDiffusionPipeline as DiffusersPipeline
from parity import FP32_TOL, rel_err
from PIL import Image
from tiny_models import TINY_SD_SIZE

from mema_jax.pipelines.text_to_image import StableDiffusionPipeline, main, output_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a photo", "b c"]  # the tiny_sd fixture's latents are for two prompts
SIZE = TINY_SD_SIZE  # pixels; the tiny VAE downsamples by 2, so the latents are 16 x 16
STEPS = 3


@pytest.fixture(scope="module")
def ours(tiny_sd):
    return StableDiffusionPipeline.from_folder(tiny_sd[0])


def diffusers_outputs(folder, scheduler, latents, negative_prompt, guidance_scale):
    pipe = DiffusersPipeline.from_pretrained(folder)
    if scheduler == "dpmpp_2m":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    kwargs = {"negative_prompt": negative_prompt, "num_inference_steps": STEPS, "guidance_scale": guidance_scale,
              "latents": latents, "height": SIZE, "width": SIZE}
    final_latents = pipe(PROMPTS, output_type="latent", **kwargs).images.numpy()
    images = pipe(PROMPTS, output_type="np", **kwargs).images
    return final_latents, images


@pytest.mark.parametrize(("scheduler", "negative_prompt", "guidance_scale"), [
    ("ddim", ["c b", "a"], 7.5),
    ("dpmpp_2m", None, 7.5),
    ("ddim", None, 1.0),  # no guidance: diffusers then skips the unconditional branch
])
def test_pipeline_matches_diffusers_from_the_same_latents(tiny_sd, ours, scheduler, negative_prompt, guidance_scale):
    folder, latents = tiny_sd
    ref_latents, ref_images = diffusers_outputs(folder, scheduler, latents, negative_prompt, guidance_scale)
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": guidance_scale, "height": SIZE, "width": SIZE,
              "scheduler": scheduler, "latents": latents.numpy().transpose(0, 2, 3, 1)}
    negative = "" if negative_prompt is None else negative_prompt
    our_latents = ours(PROMPTS, negative, output_type="latent", **kwargs)
    our_images = ours(PROMPTS, negative, output_type="float", **kwargs)
    latent_err = rel_err(our_latents.transpose(0, 3, 1, 2), ref_latents)
    image_err = rel_err(our_images, ref_images)
    print(f"{scheduler}, guidance {guidance_scale}: final latents rel. error {latent_err:.2e}, images rel. error {image_err:.2e}")
    assert latent_err <= FP32_TOL
    assert image_err <= FP32_TOL
    # uint8 output: diffusers' (x * 255).round(); equal except where float noise crosses a .5 boundary.
    our_uint8 = ours(PROMPTS, negative, **kwargs)
    ref_uint8 = (ref_images * 255).round().astype(np.uint8)
    assert our_uint8.dtype == np.uint8 and our_uint8.shape == (2, SIZE, SIZE, 3)
    diff = np.abs(our_uint8.astype(int) - ref_uint8.astype(int))
    assert diff.max() <= 1 and np.mean(diff > 0) <= 0.01


def test_seed_decides_the_images_and_images_per_prompt_differ(ours):
    # The shapes of test_pipeline_matches_diffusers_from_the_same_latents: the compiled loop is reused.
    kwargs = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "scheduler": "dpmpp_2m"}
    first = ours("a photo", seed=1, num_images_per_prompt=2, output_type="latent", **kwargs)
    again = ours("a photo", seed=1, num_images_per_prompt=2, output_type="latent", **kwargs)
    other = ours("a photo", seed=2, num_images_per_prompt=2, output_type="latent", **kwargs)
    assert first.shape == (2, SIZE // 2, SIZE // 2, 4)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert not np.allclose(first[0], first[1])  # two images of one prompt start from different noise


def test_wrong_sizes_and_folders_are_clear_errors(tmp_path, ours):
    with pytest.raises(ValueError, match="multiples of 2"):
        ours("a", num_inference_steps=1, height=33, width=32)
    with pytest.raises(ValueError, match="latents of shape"):
        ours("a", num_inference_steps=1, height=SIZE, width=SIZE, latents=np.zeros((1, 8, 8, 4)))
    with pytest.raises(ValueError, match="negative prompts"):
        ours(PROMPTS, ["x"], num_inference_steps=1)
    with pytest.raises(FileNotFoundError, match="unet"):
        StableDiffusionPipeline.from_folder(tmp_path)


def test_cli_writes_the_pipeline_images_as_png(tmp_path, tiny_sd, ours):
    out = tmp_path / "out" / "img.png"
    paths = main(["--model", str(tiny_sd[0]), "--prompt", "a photo", "--out", str(out), "--steps", str(STEPS),
                  "--seed", "3", "--num-images", "2", "--scheduler", "ddim", "--height", str(SIZE), "--width", str(SIZE)])
    assert paths == output_paths(str(out), 2) == [str(tmp_path / "out" / "img_0.png"), str(tmp_path / "out" / "img_1.png")]
    expected = ours("a photo", num_inference_steps=STEPS, seed=3, num_images_per_prompt=2, scheduler="ddim")
    for path, image in zip(paths, expected):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    assert sorted(p.name for p in out.parent.iterdir()) == ["img_0.png", "img_1.png"]  # no temp files left


SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {repo!r})
    import jax, numpy as np
    from mema_jax.core import sharding
    from mema_jax.pipelines.text_to_image import StableDiffusionPipeline
    assert jax.device_count() == 8
    prompts = ["a photo", "b c", "a", "c b a"]
    kwargs = dict(num_inference_steps=2, scheduler="dpmpp_2m", seed=0, output_type="latent")
    expected = StableDiffusionPipeline.from_folder({folder!r})(prompts, **kwargs)
    mesh = sharding.make_mesh({{"data": 2, "fsdp": 2, "tensor": 2}})
    pipe = StableDiffusionPipeline.from_folder({folder!r}, mesh=mesh, rules=sharding.DEFAULT_RULES)
    sharded_leaves = [x for x in jax.tree.leaves(pipe.unet_params) if any(a is not None for a in x.sharding.spec)]
    assert len(sharded_leaves) > 10, "the UNet parameters should be sharded over the mesh"
    out = pipe(prompts, **kwargs)
    err = float(np.linalg.norm(out - expected) / np.linalg.norm(expected))
    print("sharded vs unsharded pipeline latents, relative error", err)
    assert err <= 1e-5, err
""")


def test_pipeline_on_an_8_device_mesh_equals_the_unsharded_pipeline(tiny_sd):
    """Sharded parameters (DEFAULT_RULES on data=2, fsdp=2, tensor=2) and a batch-sharded loop."""
    script = SHARDED_SCRIPT.format(repo=REPO, folder=str(tiny_sd[0]))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout)
