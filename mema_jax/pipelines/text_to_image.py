"""Stable Diffusion text-to-image (diffusers ``StableDiffusionPipeline`` semantics) in JAX.

Loads a diffusers pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/), encodes
prompts with the CLIP text tower, runs the whole denoising loop as one jitted ``fori_loop``
(classifier-free guidance on a [negative; positive] batch, DDIM or DPM-Solver++ 2M), and decodes
with the VAE.  With the same initial latents the result equals diffusers' pipeline (see
tests/test_pipeline.py).

A folder without vae/ holds a pixel-space model (the offline MeMa-Synth UNet: 3 channels in and
out, the "latents" are the image in [-1, 1]).  With an IP-Adapter (``ip_adapter``, see
``mema_jax.models.ip_adapter``) each image gets a reference image embedding and its own scale;
the negative half of classifier-free guidance sees the projection of a zero embedding, as in
diffusers.

CLI::

    python -m mema_jax.pipelines.text_to_image --model DIR --prompt "a photo of a cat" --out cat.png \\
        [--steps 50 --guidance 7.5 --seed 0 --height 512 --width 512 --num-images 1 --scheduler ddim|dpmpp_2m]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mema_jax.core import sharding
from mema_jax.core.compile import jit
from mema_jax.fileio import write_png
from mema_jax.models.convert_clip import load_clip_text, load_tokenizer, tokenize
from mema_jax.models.convert_unet import load_unet
from mema_jax.models.convert_vae import load_vae
from mema_jax.models.vae import AutoencoderKL
from mema_jax.schedulers import DDIMConfig, DPMSolverConfig, ddim, dpm_solver, read_scheduler_config
from mema_jax.schedulers.guidance import guided_prediction, uses_guidance

SCHEDULERS = ("ddim", "dpmpp_2m")
OUTPUT_TYPES = ("uint8", "float", "latent")


# Module-level jitted steps with the (hashable) flax modules as static arguments: pipelines
# built from equal configs share the compiled code.


@functools.partial(jit, static_argnames=("text_encoder",))
def _encode_text(text_encoder, params, ids):
    return text_encoder.apply({"params": params}, ids).last_hidden_state


@functools.partial(jit, static_argnames=("vae",))
def _decode_latents(vae, params, latents):
    return vae.apply({"params": params}, latents / vae.scaling_factor, method="decode")  # AutoencoderKL or PatchAutoencoder


@functools.partial(jit, static_argnames=("unet", "use_guidance"))
def denoising_loop(unet, unet_params, latents, context, guidance_scale, state, ip_tokens=None, ip_scale=None, *,
                   use_guidance: bool):
    """All steps in one ``fori_loop``; ``context`` (and ``ip_tokens`` / ``ip_scale``) are
    [negative; positive] when guiding.  DDIM runs deterministically (eta = 0), as in diffusers'
    pipeline by default."""
    ip = {} if ip_tokens is None else {"ip_tokens": ip_tokens, "ip_scale": ip_scale}

    def body(i, carry):
        latents, solver_carry = carry
        model_input = jnp.concatenate([latents, latents]) if use_guidance else latents
        t = jnp.broadcast_to(state.timesteps[i], (model_input.shape[0],))
        noise_pred = unet.apply({"params": unet_params}, model_input, t, context, **ip).astype(jnp.float32)
        if use_guidance:
            noise_pred = guided_prediction(noise_pred, guidance_scale)
        if isinstance(state, ddim.DDIMState):
            latents, _ = ddim.step(state, noise_pred, i, latents)
        else:
            latents, solver_carry = dpm_solver.step(state, solver_carry, noise_pred, i, latents)
        return latents, solver_carry

    latents, _ = jax.lax.fori_loop(0, state.timesteps.shape[0], body, (latents, dpm_solver.init_carry(latents)))
    return latents


@dataclasses.dataclass
class StableDiffusionPipeline:
    unet: Any
    unet_params: Any
    vae: AutoencoderKL | None  # None: a pixel-space model
    vae_params: Any
    text_encoder: Any
    text_encoder_params: Any
    tokenizer: Any
    scheduler_config: dict  # the folder's scheduler_config.json; converted per call like diffusers' from_config
    mesh: Any = None
    rules: Any = None
    ip_adapter: Any = None  # an IP-Adapter tree (mema_jax.models.ip_adapter) and ...
    ip_num_tokens: int = 4  # ... its number of image tokens

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                    mesh=None, rules=None, attention_impl: str = "xla") -> StableDiffusionPipeline:
        """Loads a diffusers ``StableDiffusionPipeline`` folder (as written by ``save_pretrained``)."""
        folder = os.fspath(folder)
        missing = [d for d in ("unet", "text_encoder", "tokenizer", "scheduler")
                   if not os.path.isdir(os.path.join(folder, d))]
        if missing:
            raise FileNotFoundError(f"{folder}: not a Stable Diffusion pipeline folder; missing {missing}")
        kw = {"dtype": dtype, "param_dtype": param_dtype, "attention_impl": attention_impl, "mesh": mesh, "rules": rules}
        unet, unet_params = load_unet(os.path.join(folder, "unet"), **kw)
        vae, vae_params = None, None
        if os.path.isdir(os.path.join(folder, "vae")):
            vae, vae_params = load_vae(os.path.join(folder, "vae"), **kw)
        elif unet.config.in_channels != 3 or unet.config.out_channels != 3:
            raise FileNotFoundError(f"{folder}: no vae/ folder, and the UNet has {unet.config.in_channels} input "
                                    "channels (a pixel-space model, the only kind without a VAE, has 3)")
        text_encoder, text_params = load_clip_text(os.path.join(folder, "text_encoder"), **kw)
        return cls(
            unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params,
            text_encoder=text_encoder, text_encoder_params=text_params,
            tokenizer=load_tokenizer(os.path.join(folder, "tokenizer")),
            scheduler_config=read_scheduler_config(os.path.join(folder, "scheduler")),
            mesh=mesh, rules=rules,
        )

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else self.vae.downsample_factor

    def scheduler_state(self, scheduler: str, num_inference_steps: int):
        if scheduler == "ddim":
            return ddim.set_timesteps(DDIMConfig.from_config(self.scheduler_config), num_inference_steps)
        if scheduler == "dpmpp_2m":
            config = dataclasses.replace(DPMSolverConfig.from_config(self.scheduler_config), solver_order=2)
            return dpm_solver.set_timesteps(config, num_inference_steps)
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {SCHEDULERS}")

    def encode_prompts(self, prompts: Sequence[str]):
        """(N, 77, hidden) CLIP last hidden states, as the SD pipeline feeds the UNet."""
        # diffusers pads to tokenizer.model_max_length; that is 77 = max_position_embeddings for SD,
        # and the text tower's own limit stays right when a tokenizer config lacks the length.
        ids = tokenize(self.tokenizer, prompts, max_length=self.text_encoder.config.max_position_embeddings)
        return _encode_text(self.text_encoder, self.text_encoder_params, self._on_batch_axis(jnp.asarray(ids)))

    def _sharding_context(self):
        """Inside it, the models' logical activation constraints apply to the mesh (if any)."""
        stack = ExitStack()
        if self.mesh is not None:
            stack.enter_context(self.mesh)
            stack.enter_context(nn.logical_axis_rules(sharding.normalize_rules(self.rules)))
        return stack

    def _on_batch_axis(self, x):
        if self.mesh is None:
            return x
        return jax.device_put(x, sharding.batch_sharding(self.mesh, self.rules, x.ndim, x.shape))

    def __call__(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
                 height: int | None = None, width: int | None = None, scheduler: str = "ddim",
                 num_images_per_prompt: int = 1, latents=None, output_type: str = "uint8",
                 image_embeds=None, ip_scale=1.0):
        """Images for the prompts: uint8 (N, H, W, 3) by default; ``output_type="float"`` gives
        [0, 1] floats, ``"latent"`` the final latents (N, H/f, W/f, C).

        ``latents`` (N, H/f, W/f, C) replace the initial noise drawn from ``seed``; N is
        len(prompts) * num_images_per_prompt, images of one prompt next to each other.
        ``image_embeds`` (N, E): the reference image of each output for the IP-Adapter, with
        ``ip_scale`` a float or one per output (N,).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of {OUTPUT_TYPES}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        negative = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        factor = self.vae_scale_factor
        sample_size = self.unet.config.sample_size or 64
        height = height or sample_size * factor
        width = width or sample_size * factor
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
        state = self.scheduler_state(scheduler, num_inference_steps)
        use_guidance = uses_guidance(guidance_scale)

        with self._sharding_context():
            context = jnp.repeat(self.encode_prompts(prompts), num_images_per_prompt, axis=0)
            if use_guidance:
                uncond = jnp.repeat(self.encode_prompts(negative), num_images_per_prompt, axis=0)
                context = jnp.concatenate([uncond, context])
            batch = len(prompts) * num_images_per_prompt
            shape = (batch, height // factor, width // factor, self.unet.config.in_channels)
            if latents is None:
                latents = jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)  # init_noise_sigma is 1 for both
            elif tuple(latents.shape) != shape:
                raise ValueError(f"latents of shape {tuple(latents.shape)} given, expected {shape}")
            unet, unet_params, ip_tokens, ip_scales = self.unet, self.unet_params, None, None
            if image_embeds is not None:
                unet, unet_params, ip_tokens, ip_scales = self._ip_inputs(image_embeds, ip_scale, batch, use_guidance)
            latents = denoising_loop(unet, unet_params, self._on_batch_axis(jnp.asarray(latents, jnp.float32)),
                                      context, jnp.float32(guidance_scale), state, ip_tokens, ip_scales,
                                      use_guidance=use_guidance)
            if output_type == "latent":
                return np.asarray(latents)
            decoded = latents if self.vae is None else _decode_latents(self.vae, self.vae_params, latents)
        images = np.clip(np.asarray(decoded, np.float32) / 2 + 0.5, 0.0, 1.0)
        if output_type == "float":
            return images
        return (images * 255).round().astype(np.uint8)


    def _ip_inputs(self, image_embeds, ip_scale, batch: int, use_guidance: bool):
        """The IP-Adapter UNet, its parameters, and [negative;] positive image tokens and scales."""
        from mema_jax.models import ip_adapter

        if self.ip_adapter is None:
            raise ValueError("image_embeds given, but this pipeline has no IP-Adapter (set pipe.ip_adapter)")
        embeds = jnp.asarray(image_embeds, jnp.float32)
        if embeds.shape[0] != batch:
            raise ValueError(f"{embeds.shape[0]} image embeddings for {batch} images")
        scales = jnp.broadcast_to(jnp.asarray(ip_scale, jnp.float32).reshape(-1), (batch,))
        # On the batch axis like the latents: each device projects its own images' embeddings.
        embeds, scales = self._on_batch_axis(embeds), self._on_batch_axis(scales)
        cross = self.unet.config.cross_attention_dim[0]
        tokens = ip_adapter.image_tokens(self.ip_adapter, embeds, self.ip_num_tokens, cross)
        if use_guidance:
            negative = ip_adapter.image_tokens(self.ip_adapter, jnp.zeros_like(embeds), self.ip_num_tokens, cross)
            tokens, scales = jnp.concatenate([negative, tokens]), jnp.concatenate([scales, scales])
        unet = ip_adapter.ip_unet(self.unet)
        return unet, ip_adapter.unet_params(self.unet_params, self.ip_adapter), tokens, scales


def output_paths(out: str, count: int) -> list[str]:
    """``out`` for one image; ``stem_0.png``, ``stem_1.png``, ... for several."""
    if count == 1:
        return [out]
    stem, suffix = os.path.splitext(out)
    return [f"{stem}_{i}{suffix or '.png'}" for i in range(count)]


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="diffusers Stable Diffusion pipeline folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--out", required=True, help="output PNG path (numbered when --num-images > 1)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="ddim")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    args = parser.parse_args(argv)

    pipe = StableDiffusionPipeline.from_folder(args.model, dtype=jnp.dtype(args.dtype))
    images = pipe(args.prompt, args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  seed=args.seed, height=args.height, width=args.width, scheduler=args.scheduler,
                  num_images_per_prompt=args.num_images)
    paths = output_paths(args.out, len(images))
    for path, image in zip(paths, images):
        write_png(path, image)
        print(path)
    return paths


if __name__ == "__main__":
    main()
