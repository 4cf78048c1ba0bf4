"""Trainer: Stable Diffusion fine-tuning on a MeMa-layout folder (the paper's Step 1, and the
source of MedSem-DeID's medical encoder).  Run it through ``launch.main`` (configs/mema_lora.py).

Modes (``config.mode``):
  * ``lora``: LoRA on the UNet (``mema_jax.models.lora``: a separate tree merged with the frozen
    base inside the loss); only the LoRA tree is trained and kept in the optimizer state; the base
    UNet, text encoder (and VAE) are frozen step arguments laid out by the sharding rules.
  * ``full``: every UNet weight, from a pretrained folder or from scratch (the offline stand-in for
    SD1.5 on MeMa-Synth, and the medical encoder's source).
  * ``ip_adapter``: IP-Adapter's image projection and to_k_ip / to_v_ip (``mema_jax.models.
    ip_adapter``) on a frozen UNet, conditioned on each training image's own embedding from a
    frozen image encoder (a CLIP vision tower), the embedding dropped with ``ip_adapter.drop``.

Captions come from the labels through a template ("A face, eye with {disease}"; the paper's
training captions carry no severity); with probability ``caption.dropout`` a caption becomes the
empty prompt, so the model also learns the unconditional branch that classifier-free guidance
subtracts.  DDPM noise at uniform timesteps, epsilon or v-prediction targets, optional min-SNR-γ
weighting, optional EMA.  Latents: the frozen VAE encodes each batch inside the step (SD1.5), or
the model works on pixels (a folder without vae/, or ``model.latents="pixels"``), or a model built
here works on lossless patches (``model.latents="patches"``, mema_jax.models.patch_vae).

Every ``sample.every`` steps a grid (one row per prompt, one column per seed; DDIM) goes to
``<workdir>/samples/step_XXXXXX.png`` and TensorBoard.  At the end the trained part is exported:
``<workdir>/model/`` (a pipeline folder: unet/, text_encoder/, tokenizer/, scheduler/[, vae/]) for
``full``; ``<workdir>/lora/pytorch_lora_weights.safetensors`` (diffusers/peft format) for ``lora``;
``<workdir>/ip_adapter/ip-adapter.safetensors`` (ip-adapter_sd15 layout) for ``ip_adapter``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mema_jax.core import loop
from mema_jax.core import sharding as shd
from mema_jax.core import train_state as ts
from mema_jax.core.compile import jit
from mema_jax.core.optim import make_optimizer
from mema_jax.data import captions, layout, pipeline, tfds_mema
from mema_jax.fileio import atomic_folder, atomic_write_bytes, write_png
from mema_jax.models import ip_adapter, lora, patch_vae
from mema_jax.models.clip import CLIPTextConfig, CLIPTextModel
from mema_jax.models.convert_clip import load_clip_text, load_clip_vision, load_tokenizer, save_clip_text, tokenize
from mema_jax.models.convert_unet import load_unet, save_unet
from mema_jax.models.convert_vae import load_vae, save_vae
from mema_jax.models.tokenizer import write_word_vocabulary
from mema_jax.models.unet import UNet2DConditionModel, UNetConfig, init_params
from mema_jax.models.clip import clip_pixels
from mema_jax.models.weights import WeightsError
from mema_jax.pipelines.text_to_image import StableDiffusionPipeline
from mema_jax.schedulers import DDPMConfig, ddpm, read_scheduler_config
from mema_jax.trainers import common

MODES = ("lora", "full", "ip_adapter")
# model.latents: "auto" (a pretrained folder's vae/, else pixels), "pixels" (never a VAE), "patches"
# (a model built here on lossless patch_size x patch_size patches, mema_jax.models.patch_vae).
LATENTS = ("auto", "pixels", "patches")
# SD1.5's training noise schedule (its scheduler_config.json), for models built here from scratch.
SD15_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                  "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"}


@dataclasses.dataclass
class Models:
    """The diffusion model's parts: modules, their (placed) weights, and where they came from."""

    unet: UNet2DConditionModel
    unet_params: Any  # None when the UNet is trained from scratch (mode=full without a pretrained folder)
    text_encoder: CLIPTextModel
    text_params: Any
    tokenizer_folder: str
    scheduler_config: dict
    vae: Any = None
    vae_params: Any = None
    image_encoder: Any = None
    image_encoder_params: Any = None

    @property
    def pixel_space(self) -> bool:
        return self.vae is None


def load_models(config, mesh, rules, workdir: Path) -> Models:
    """From ``model.pretrained`` (a pipeline folder), or built here: the UNet from ``model.unet``
    (diffusers kwargs), a frozen random text encoder from ``model.text_encoder`` (drawn from the
    seed, so every process and every restart draws the same one) over a word vocabulary of the
    MeMa prompts, and no VAE (pixel space)."""
    m = config.model
    kw = dict(mesh=mesh, rules=rules, dtype=jnp.dtype(config.precision.compute_dtype))
    if m.latents not in LATENTS:
        raise ValueError(f"model.latents is {m.latents!r}; choose one of {LATENTS}")
    if m.pretrained:
        folder = Path(m.pretrained)
        for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
            if not (folder / part).is_dir():
                raise WeightsError(f"{folder}: not a diffusion model folder (no {part}/ inside; a diffusers "
                                   "pipeline folder has unet/, text_encoder/, tokenizer/, scheduler/ and vae/)")
        unet, unet_params = load_unet(folder / "unet", **kw)
        text, text_params = load_clip_text(folder / "text_encoder", **kw)
        vae = vae_params = None
        if (folder / "vae").is_dir() and m.latents in ("auto", "patches"):
            vae, vae_params = load_vae(folder / "vae", **kw)
        if m.latents == "patches" and not isinstance(vae, patch_vae.PatchAutoencoder):
            raise WeightsError(f"{folder}: model.latents='patches', but its vae/ is not a PatchAutoencoder "
                               "(a model trained on patches exports one; use model.latents='auto' for others)")
        models = Models(unet, unet_params, text, text_params, str(folder / "tokenizer"),
                        read_scheduler_config(folder / "scheduler"), vae, vae_params)
    else:
        unet = UNet2DConditionModel(UNetConfig.from_dict(m.unet.to_dict()), dtype=kw["dtype"])
        tokenizer_folder = workdir / "tokenizer"
        if not tokenizer_folder.is_dir():
            write_word_vocabulary(tokenizer_folder, captions.all_prompts() + [""])
        vocab = load_tokenizer(tokenizer_folder).vocab
        text_config = CLIPTextConfig(**{**m.text_encoder.to_dict(), "vocab_size": len(vocab),
                                        "bos_token_id": vocab["<|startoftext|>"],
                                        "eos_token_id": vocab["<|endoftext|>"], "pad_token_id": vocab["<|endoftext|>"]})
        text = CLIPTextModel(text_config, dtype=kw["dtype"])
        boxed = text.init(jax.random.fold_in(jax.random.key(config.seed), 1), jnp.zeros((1, 77), jnp.int32))["params"]
        text_params, _ = ts.place_frozen(boxed, mesh, rules)
        vae = None
        if m.latents == "patches":
            vae = patch_vae.PatchAutoencoder(patch_vae.PatchConfig(patch_size=m.patch_size), dtype=kw["dtype"])
        channels = 3 if vae is None else vae.config.latent_channels
        if unet.config.in_channels != channels or unet.config.out_channels != channels:
            raise ValueError(f"model.unet: a UNet built here on {m.latents} needs {channels} input and output "
                             f"channels, got {unet.config.in_channels} and {unet.config.out_channels}")
        models = Models(unet, None, text, text_params, str(tokenizer_folder), dict(SD15_SCHEDULER,
                        prediction_type=config.noise.prediction), vae, None if vae is None else {})
    if config.mode == "ip_adapter":
        models.image_encoder, models.image_encoder_params = load_clip_vision(config.ip_adapter.image_encoder, **kw)
    if config.mode in ("lora", "ip_adapter") and models.unet_params is None:
        # A base drawn from the seed (tests, or LoRA on a base trained here and given as pretrained).
        boxed = init_params(unet, jax.random.fold_in(jax.random.key(config.seed), 2), sample_shape=(1, 8, 8))
        models.unet_params, _ = ts.place_frozen(boxed, mesh, rules)
    return models


def abstract_unet(unet: UNet2DConditionModel):
    return jax.eval_shape(functools.partial(init_params, unet, sample_shape=(1, 8, 8)), jax.random.key(0))


def caption_table(models: Models, config) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of every disease's caption (num_diseases, 77) and of the empty prompt (77,)."""
    tokenizer = load_tokenizer(models.tokenizer_folder)
    words = dict(captions.DISEASE_WORDS, **config.caption.disease_words.to_dict())
    table = [captions.caption(d, template=config.caption.template, words=words) for d in layout.DISEASES]
    length = models.text_encoder.config.max_position_embeddings
    return tokenize(tokenizer, table, max_length=length), tokenize(tokenizer, [""], max_length=length)[0]


def snr_weights(alphas_cumprod, timesteps, prediction: str, gamma: float):
    """min-SNR-γ (Hang et al. 2023): min(SNR, γ) / SNR for epsilon, / (SNR + 1) for v; for x0
    ("sample") the x0-MSE weight clip(SNR, 1, γ): min-SNR's cap, floored at 1 (Salimans & Ho's
    truncated SNR) so the noisiest steps, where a face's layout is decided, keep their weight while
    the quiet steps that draw the eyes count up to γ times more.  1 when γ = 0."""
    if not gamma:
        return jnp.ones(timesteps.shape, jnp.float32)
    a = alphas_cumprod[timesteps]
    snr = a / (1.0 - a)
    if prediction == "sample":
        return jnp.clip(snr, 1.0, max(gamma, 1.0))
    clipped = jnp.minimum(snr, gamma)
    return clipped / snr if prediction == "epsilon" else clipped / (snr + 1.0)


def make_loss(models: Models, config, alphas_cumprod, lora_scale: float):
    """``loss(params, frozen, batch, rng)``: the weighted denoising MSE of one batch."""
    unet, mode = models.unet, config.mode
    ip_unet = ip_adapter.ip_unet(unet) if mode == "ip_adapter" else None
    prediction, gamma = config.noise.prediction, config.noise.min_snr_gamma
    num_t = alphas_cumprod.shape[0]

    def loss_fn(params, frozen, batch, rng, *, deterministic_t=None):
        r_noise, r_t, r_drop, r_vae, r_ip = jax.random.split(rng, 5)
        images = batch["image"]
        n = images.shape[0]
        if models.vae is None:
            x0 = images
        else:
            posterior = models.vae.apply({"params": frozen["vae"]}, images, method=models.vae.encode)
            x0 = posterior.sample(r_vae) * models.vae.config.scaling_factor
        drop = jax.random.uniform(r_drop, (n,)) < config.caption.dropout if deterministic_t is None else jnp.zeros(n, bool)
        ids = jnp.where(drop[:, None], frozen["empty_ids"][None], frozen["caption_ids"][batch["label"]])
        context = models.text_encoder.apply({"params": frozen["text"]}, ids).last_hidden_state
        t = jax.random.randint(r_t, (n,), 0, num_t) if deterministic_t is None else deterministic_t
        noise = jax.random.normal(r_noise, x0.shape, x0.dtype)
        x_t = ddpm.add_noise(alphas_cumprod, x0, noise, t)
        target = ddpm.training_target(prediction, alphas_cumprod, x0, noise, t)
        if mode == "lora":
            pred = unet.apply({"params": lora.merge(frozen["unet"], params, lora_scale)}, x_t, t, context, train=True)
        elif mode == "full":
            pred = unet.apply({"params": params}, x_t, t, context, train=True)
        else:
            enc = models.image_encoder
            embeds = enc.apply({"params": frozen["image_encoder"]}, clip_pixels(images, enc.config.image_size)).image_embeds
            keep = jax.random.uniform(r_ip, (n,)) >= config.ip_adapter.drop if deterministic_t is None else jnp.ones(n, bool)
            embeds = jnp.where(keep[:, None], embeds, 0.0)
            tokens = ip_adapter.image_tokens(params, embeds, config.ip_adapter.num_tokens, unet.config.cross_attention_dim[0])
            pred = ip_unet.apply({"params": ip_adapter.unet_params(frozen["unet"], params)}, x_t, t, context,
                                 train=True, ip_tokens=tokens, ip_scale=1.0)
        mse = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2, 3))
        weights = snr_weights(alphas_cumprod, t, prediction, gamma)
        return jnp.mean(weights * mse), {"mse": jnp.mean(mse)}

    return loss_fn


def make_evaluator(loss_fn, num_train_timesteps: int, dataset, config, mesh, rules, params_shardings, batch_shardings,
                   frozen, frozen_shardings):
    """``evaluate(state)``: the denoising MSE on ``config.eval_split`` at fixed noise and fixed,
    evenly spread timesteps (the same for every evaluation, so curves are comparable).  The
    function is compiled once; the frozen weights are its argument."""
    num_t = num_train_timesteps

    def eval_mse(params, frozen, batch, index):
        n = batch["image"].shape[0]
        t = ((jnp.arange(n) + index * n) * 97 % num_t).astype(jnp.int32)
        _, metrics = loss_fn(params, frozen, batch, jax.random.fold_in(jax.random.key(1234), index), deterministic_t=t)
        return metrics["mse"]

    keys = ("image", "label")
    run = loop.in_mesh(jit(eval_mse, in_shardings=(params_shardings, frozen_shardings,
                                                        {k: batch_shardings[k] for k in keys}, None)), mesh, rules)

    def evaluate(state: ts.TrainState) -> dict:
        params = state.ema_params if state.ema_params is not None else state.params
        loader = pipeline.make_loader(dataset, config.eval_split, global_batch_size=config.batch_size,
                                      image_size=config.data.image_size, seed=0, shuffle=False, num_epochs=1,
                                      augment=False, drop_remainder=True)
        values = [float(run(params, frozen, batch, jnp.int32(i)))
                  for i, (batch, _, _) in enumerate(loop.padded_batches(loader, {k: batch_shardings[k] for k in keys},
                                                                          config.batch_size))
                  if i < config.eval_batches]
        return {"eval/denoise_mse": float(np.mean(values))} if values else {}

    return evaluate


def unet_params_of(mode, params, frozen, lora_scale):
    if mode == "lora":
        return lora.merge(frozen["unet"], params, lora_scale)
    if mode == "full":
        return params
    return frozen["unet"]


def make_sampler(models: Models, config, lora_scale: float, frozen, samples_dir: Path, reference_embeds=None):
    """``sample(step, state, writer)``: the grid of ``config.sample.prompts`` (default: every
    disease's caption; rows) x ``sample.num_seeds`` seeds (columns)."""
    sc = config.sample

    def sample(step, state, writer):
        params = state.ema_params if state.ema_params is not None else state.params
        unet_params = unet_params_of(config.mode, params, frozen, lora_scale)
        pipe = StableDiffusionPipeline(models.unet, unet_params, models.vae, frozen.get("vae"), models.text_encoder,
                                       frozen["text"], load_tokenizer(models.tokenizer_folder), models.scheduler_config)
        prompts = list(sc.prompts) or [captions.caption(d, template=config.caption.template) for d in layout.DISEASES]
        ip = {}
        if config.mode == "ip_adapter" and reference_embeds is not None:
            pipe.ip_adapter, pipe.ip_num_tokens = params, config.ip_adapter.num_tokens
            ip = {"image_embeds": np.repeat(reference_embeds[: len(prompts)], 1, axis=0), "ip_scale": sc.ip_scale}
            prompts = prompts[: len(reference_embeds)]
        rows = []
        for seed in range(sc.num_seeds):
            rows.append(pipe(prompts, num_inference_steps=sc.steps, guidance_scale=sc.guidance, seed=seed,
                             height=config.data.image_size, width=config.data.image_size, **ip))
        grid = np.concatenate([np.concatenate(list(images), axis=0) for images in rows], axis=1)  # prompts x seeds
        path = samples_dir / f"step_{step:06d}.png"
        if jax.process_index() == 0:
            write_png(path, grid)
            writer.write_images(step, {"samples": grid[None]})
            print(f"samples: {path}", flush=True)

    return sample


def export(mode, models: Models, config, workdir: Path, state, frozen, lora_scale: float) -> Path:
    """Writes the trained part in its official format (skipped when it is already there)."""
    params = loop.fetch(state.ema_params if state.ema_params is not None else state.params)
    if mode == "full":  # the frozen towers are saved beside the UNet
        frozen = loop.fetch({k: frozen[k] for k in ("text", "vae") if frozen.get(k) is not None})
    if jax.process_index() != 0:  # the gathers above are every process's part; one writes
        return workdir
    if mode == "lora":
        out = workdir / "lora" / "pytorch_lora_weights.safetensors"
        if not out.exists():
            lora.save_lora(out, params, models.unet.config, alpha=config.lora.alpha, rank=config.lora.rank)
        return out
    if mode == "ip_adapter":
        out = workdir / "ip_adapter" / "ip-adapter.safetensors"
        if not out.exists():
            ip_adapter.save_adapter(str(out), params)
        return out
    out = workdir / "model"
    if not out.exists():
        with atomic_folder(out) as tmp:
            save_unet(tmp / "unet", models.unet, params)
            save_clip_text(tmp / "text_encoder", models.text_encoder, frozen["text"])
            shutil.copytree(models.tokenizer_folder, tmp / "tokenizer")
            (tmp / "scheduler").mkdir()
            atomic_write_bytes(tmp / "scheduler" / "scheduler_config.json",
                               (json.dumps(models.scheduler_config, indent=2, sort_keys=True) + "\n").encode())
            if models.vae is not None:
                save_vae(tmp / "vae", models.vae, frozen["vae"])
    return out


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The settings derived from others, fixed before launch.main writes config.json (so the saved
    config is the run's): with ``num_epochs > 0``, total_steps = ceil(num_epochs * train images / batch)."""
    if config.num_epochs > 0:
        dataset = tfds_mema.open_configured_dataset(
            config.data, config.data.synth if config.data.generate_if_missing else None, verify_images=False)
        train_images = len(dataset.split("train"))
        config.total_steps = max(1, -(-config.num_epochs * train_images // config.batch_size))
        print(f"{config.num_epochs} epochs of {train_images} training images at batch {config.batch_size}: "
              f"{config.total_steps} steps", flush=True)
    return config


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    if config.mode not in MODES:
        raise ValueError(f"config.mode is {config.mode!r}; choose one of {MODES}")
    workdir = Path(workdir)
    mesh, rules = loop.mesh_and_rules(config)
    dataset = common.open_dataset(config)
    models = load_models(config, mesh, rules, workdir)
    if models.pixel_space and models.unet.config.in_channels != 3:
        raise ValueError(f"a model without a VAE works on pixels, but its UNet has {models.unet.config.in_channels} "
                         "input channels")
    alphas_cumprod = jnp.asarray(ddpm.alphas_cumprod(DDPMConfig.from_config(
        {k: v for k, v in models.scheduler_config.items() if k in DDPM_KEYS})))
    lora_scale = config.lora.alpha / config.lora.rank

    # Frozen weights: step arguments with their own shardings.
    caption_ids, empty_ids = caption_table(models, config)
    frozen = {"text": models.text_params, "caption_ids": jnp.asarray(caption_ids), "empty_ids": jnp.asarray(empty_ids)}
    if models.vae is not None:
        frozen["vae"] = models.vae_params
    if config.mode != "full":
        frozen["unet"] = models.unet_params
    if config.mode == "ip_adapter":
        frozen["image_encoder"] = models.image_encoder_params
    frozen, frozen_shardings = ts.place_frozen(frozen, mesh, rules, loop.replicated_warning_bytes(config))

    tx = make_optimizer(config.optim, config.total_steps)
    warn = loop.replicated_warning_bytes(config)
    use_ema = config.ema_decay > 0
    if config.mode == "lora":
        base = abstract_unet(models.unet)
        state_spec = ts.sharded_state(lambda r: lora.init_lora(r, base, config.lora.rank, tuple(config.lora.targets)),
                                      tx, mesh, rules, seed=config.seed, use_ema=use_ema, warn_replicated_bytes=warn)
    elif config.mode == "full":
        boxed = abstract_unet(models.unet)
        if models.unet_params is None:
            init = functools.partial(init_params, models.unet, sample_shape=(1, 8, 8))
            state_spec = ts.sharded_state(init, tx, mesh, rules, seed=config.seed, use_ema=use_ema,
                                          warn_replicated_bytes=warn)
        else:  # fine-tune a loaded UNet: its weights enter the init as an argument
            state_spec = ts.sharded_state(lambda r, p: shd.box_like(p, boxed), tx, mesh, rules, seed=config.seed,
                                          use_ema=use_ema, warn_replicated_bytes=warn, init_args=(models.unet_params,))
    else:
        embed_dim = models.image_encoder.config.projection_dim
        tokens = config.ip_adapter.num_tokens
        state_spec = ts.sharded_state(
            lambda r, base: ip_adapter.init_from_base(ip_adapter.init_adapter(r, models.unet, embed_dim, tokens), base),
            tx, mesh, rules, seed=config.seed, use_ema=use_ema, warn_replicated_bytes=warn,
            init_args=(models.unet_params,))

    shardings = loop.batch_shardings(mesh, rules, common.batch_shapes(config))
    loss_fn = make_loss(models, config, alphas_cumprod, lora_scale)
    train_step = ts.make_train_step(loss_fn, tx, mesh=mesh, rules=rules, state_shardings=state_spec.shardings,
                                    batch_shardings=shardings, frozen_shardings=frozen_shardings, seed=config.seed,
                                    accum_steps=config.grad_accum_steps, ema_decay=config.ema_decay or None)
    loader = common.train_loader(config, dataset)
    evaluate = None
    if config.eval_every:
        evaluate = make_evaluator(loss_fn, int(alphas_cumprod.shape[0]), dataset, config, mesh, rules,
                                  state_spec.shardings.params, shardings, frozen, frozen_shardings)
    periodic = []
    if config.sample.every:
        reference = None
        if config.mode == "ip_adapter":
            reference = reference_embeddings(models, dataset, config, frozen)
        sampler = make_sampler(models, config, lora_scale, frozen, workdir / "samples", reference)
        periodic.append(loop.Periodic(config.sample.every, sampler))

    def finish(state):
        out = export(config.mode, models, config, workdir, state, frozen, lora_scale)  # every process: a gather
        if jax.process_index() == 0:
            print(f"exported {config.mode}: {out}", flush=True)

    return loop.run(config, workdir, state_spec=state_spec, train_step=train_step, data_iter=iter(loader),
                    batch_shardings=shardings, frozen=frozen, evaluate=evaluate, periodic=periodic, on_finish=finish,
                    console_keys=("loss",))


DDPM_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type"}


def reference_embeddings(models: Models, dataset, config, frozen) -> np.ndarray:
    """Image embeddings of the first validation images (the IP-Adapter sample grid's references)."""
    loader = pipeline.make_loader(dataset, config.eval_split, global_batch_size=8, image_size=config.data.image_size,
                                  seed=0, shuffle=False, num_epochs=1, augment=False, drop_remainder=False)
    images = next(iter(loader))["image"]
    enc = models.image_encoder
    out = enc.apply({"params": frozen["image_encoder"]}, clip_pixels(jnp.asarray(images), enc.config.image_size))
    return np.asarray(out.image_embeds)
