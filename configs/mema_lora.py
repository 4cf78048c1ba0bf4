r"""Stable Diffusion fine-tuning on MeMa (the paper's Step 1, and the medical encoder's source).

Run:
  python -m launch.main --config=configs/mema_lora.py:synth --workdir=runs/mema_synth_unet
  python -m launch.main --config=configs/mema_lora.py:paper --workdir=runs/mema_lora \
      --config.model.pretrained=/path/to/stable-diffusion-v1-5 --config.data.root=/path/to/MeMa
Variants:
  :paper  SD1.5 from a diffusers folder, LoRA rank 64 on the UNet's attention projections, 512 px,
          Adam b1=0.9 b2=0.99, lr 1e-4 cosine, batch 32, 10 epochs (the paper's Implementation
          Details).  alpha = rank (scale 1): the paper gives no alpha; diffusers' LoRA scripts use
          alpha = rank.  bf16 compute, fp32 weights.  Latents from SD1.5's VAE, encoded in the step.
  :gpu    :paper's model and optimizer for one GPU: batch 8, 2000 steps, remat, cuDNN attention.
  :synth  the offline stand-in: a small UNet trained in full from scratch on MeMa-Synth (64 px),
          in pixel space: there is no pretrained VAE offline, and at 64 px a VAE would leave 8x8
          latents, too coarse for eye-region signs.  Its text encoder is a frozen random CLIP text
          tower over a word vocabulary of the MeMa prompts (SD1.5's is not at hand offline): the
          UNet learns what each caption's embedding means.  Its export (runs/.../model/) is the
          medical encoder's source for configs/medsem_deid.py:synth.
  :synth_lora  LoRA (rank 8) on the :synth model (pass --config.model.pretrained=<its model/>).
  :synth_generator  the offline MeMa generator of ``python -m launch.mema_pipeline``: a UNet built
          here on the patients' train split (few people, so that it can memorise them, as the paper's
          LoRA does its patients), working on lossless 4x4 patches of the 64 px image
          (``model.latents="patches"``, mema_jax.models.patch_vae: 16x16x48 "latents", SD1.5's VAE
          role without a VAE to train or its blur), widths 64-128-256 with self/cross-attention at
          8x8 and 4x4; x0 ("sample") prediction with x0-MSE weights clip(SNR, 1, 5) (min-SNR-5's cap,
          floored at 1); EMA 0.995; 1800 steps at batch 16 (~15 min on 2 cores).  Why (each run ~15
          min here, samples viewed, dlib HOG at 2x on direct samples):
            - on pixels (widths 16-32-64 at 64/32/16 px, the widths 2 cores afford there) nothing
              drew eyes: v-prediction with min-SNR-5 sampled colour noise at 500 steps, plain v noisy
              blobs at 1500, x0 smooth ovals with hair by 750 (faces found 0.8%, README, stop 31);
            - the same compute on 4x4 patches buys 4x the width at every level (a step: 0.50 s vs
              0.71 s at batch 16): x0 with weight 1 drew blurred faces with eyes at 1800 steps
              (faces found 10.9% vs 45.5% on real validation images);
            - clip(SNR, 1, 5) weights: sharper eyes and lids by step 600 than weight 1 at the same
              step (the quiet steps, which draw them, count up to 5x).
          What limits it (measured on this design, 8 training images re-noised, x0 MSE of the
          prediction): 0.0089 at t=50 (SNR 20) vs 0.011 at t=600: even from a nearly clean input
          the prediction is a blur, so sampling cannot be sharper; eyes and signs are lost there.
          On 4x4 patches v-prediction (with and without min-SNR-5) and epsilon-prediction do not
          train in 900 steps (samples stay noise; epsilon's weighted loss ~0.9 throughout), and
          the 64-128-256 UNet does not learn the identity map of patch noise in 150 Adam steps at
          lr 1e-3 (loss stays 1.0) where 16-32-64 does; lr 2e-4 / 5e-4 denoise worse at 900 steps
          (t=50: 0.0127 / 0.0103), batch 8 x 1800 steps about the same (0.0079; faces 15.6% vs
          10.9% on 64 samples).  Ancestral DDPM sampling (50 steps, x0 clipped) is as blurred.
          ``tiny_generator`` is the same design at 32 px for tests.
  :tiny   seconds, for tests.
Choices the paper leaves open:
  * caption dropout 0.1 (empty prompt): the unconditional branch that classifier-free guidance
    subtracts must be learnt (from scratch) or kept in step with the fine-tuned conditional one (LoRA);
    0.1 is what SD itself was trained with.
  * epsilon prediction for :paper (SD1.5's own); v-prediction for :synth, trained from scratch:
    measured here after 600 steps, epsilon's DDIM samples were still high-frequency noise (its
    predictions are worst at the high-noise steps sampling starts from) while v's showed smooth
    face-coloured shapes.  min-SNR-γ off for :paper (the paper does not use it), 5 for :synth
    (it speeds up training from scratch, Hang et al. 2023).
  * EMA only for :synth (0.99): LoRA fine-tuning for 10 epochs does not need it.
Measured (2-core CPU shared with two other training jobs): :synth, 600 steps in 23 min (0.43
steps/s, step 25 to 600 in runs/mema_synth_unet/metrics.csv); validation denoising MSE of the v
target 0.21 / 0.13 / 0.11 at steps 200 / 400 / 600.  The quickstart trains it for 200 steps.
"""
import ml_collections

from configs.common import base_config, data_config, make_tiny, parse_arg, use_real_data

VARIANTS = ("paper", "gpu", "synth", "synth_lora", "synth_generator", "tiny", "tiny_generator")
GENERATOR_PATCH = 4  # :synth_generator's UNet works on 4x4 patches: 16x16x48 at 64 px
GENERATOR_STEPS = 1800
GENERATOR_GAMMA = 5.0


def synth_unet(widths=(16, 32, 64), cross_dim=64, heads=4, size=64, attention_levels=1, channels=3) -> dict:
    """diffusers UNet2DConditionModel kwargs of the small UNet (``channels``: 3 on pixels, 48 on
    4x4 patches).  Attention (self and cross) only at the coarsest level(s): measured on 2 CPU
    cores at 64 px, batch 32, a second attention level (32x32 tokens) makes a step 3.7x slower
    (3.4 s vs 12.6 s for widths 32-64-128)."""
    n = len(widths)
    plain = n - attention_levels
    return {
        "in_channels": channels, "out_channels": channels, "sample_size": size, "block_out_channels": list(widths),
        "layers_per_block": 1, "norm_num_groups": 8, "cross_attention_dim": cross_dim, "attention_head_dim": heads,
        "down_block_types": ["DownBlock2D"] * plain + ["CrossAttnDownBlock2D"] * attention_levels,
        "up_block_types": ["CrossAttnUpBlock2D"] * attention_levels + ["UpBlock2D"] * plain,
    }


def get_config(arg=None):
    variant, _ = parse_arg(arg, "configs/mema_lora.py", VARIANTS, default="synth")
    c = base_config()
    c.trainer = "mema_jax.trainers.diffusion"
    c.variant = variant
    c.mode = "lora"

    c.data = data_config(augment=False)  # a flip would move a one-sided sign (a turned left eye) to the other side

    c.model = ml_collections.ConfigDict()
    c.model.pretrained = ""  # a diffusers pipeline folder; "" = build the :synth model here
    c.model.latents = "auto"  # "auto": VAE latents when the folder has vae/, else pixels; "pixels": never a VAE;
    # "patches": a model built here on lossless patch_size x patch_size patches (mema_jax.models.patch_vae)
    c.model.patch_size = 4
    c.model.unet = ml_collections.ConfigDict(synth_unet())
    c.model.text_encoder = ml_collections.ConfigDict({"hidden_size": 64, "intermediate_size": 128,
                                                      "num_hidden_layers": 2, "num_attention_heads": 4,
                                                      "max_position_embeddings": 77, "projection_dim": 64})

    c.caption = ml_collections.ConfigDict({"template": "A face, eye with {disease}", "dropout": 0.1,
                                           "disease_words": ml_collections.ConfigDict()})
    c.noise = ml_collections.ConfigDict({"prediction": "epsilon", "min_snr_gamma": 0.0})
    c.lora = ml_collections.ConfigDict({"rank": 64, "alpha": 64.0, "targets": ("attention",)})
    c.ip_adapter = ml_collections.ConfigDict({"image_encoder": "", "num_tokens": 4, "drop": 0.05})
    c.sample = ml_collections.ConfigDict({"every": 0, "prompts": (), "num_seeds": 2, "steps": 25, "guidance": 3.0,
                                          "ip_scale": 0.5})

    c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 1e-4, "b1": 0.9, "b2": 0.99, "schedule": "cosine",
                                         "warmup_steps": 0, "grad_clip": 1.0})
    c.precision.compute_dtype = "bfloat16"
    c.batch_size = 32
    c.num_epochs = 10  # > 0: total_steps = num_epochs * train images / batch_size
    c.total_steps = 0
    c.eval_every = 1000
    c.eval_batches = 8
    c.eval_split = "val"
    c.checkpoint_every = 1000
    c.log_every = 50

    if variant in ("paper", "gpu"):
        use_real_data(c)
        c.model.pretrained = ""  # --config.model.pretrained=/path/to/stable-diffusion-v1-5
        c.sample.update(every=2000, num_seeds=2, steps=30, guidance=7.5)
        c.mesh.update(data=1, fsdp=-1)
    if variant == "gpu":
        c.batch_size = 8
        c.num_epochs = 0
        c.total_steps = 2000
        c.sample.every = 500
        c.eval_every = 500
    elif variant in ("synth", "synth_lora", "synth_generator", "tiny", "tiny_generator"):
        c.precision.compute_dtype = "float32"  # XLA:CPU has no fast bf16; fp32 keeps resumes bitwise
        c.mode = "full"
        c.num_epochs = 0
        c.total_steps = 600
        c.batch_size = 16
        c.optim.update(lr=1e-3, warmup_steps=50)
        c.noise.update(prediction="v_prediction", min_snr_gamma=5.0)
        c.ema_decay = 0.99
        c.eval_every = 200
        c.eval_batches = 4
        c.checkpoint_every = 200
        c.log_every = 25
        c.sample.update(every=300, num_seeds=2, steps=20, guidance=2.0)
    if variant in ("synth_generator", "tiny_generator"):
        c.model.latents = "patches"
        c.model.patch_size = GENERATOR_PATCH
        channels = 3 * GENERATOR_PATCH ** 2
        c.model.unet = ml_collections.ConfigDict(synth_unet(widths=(64, 128, 256), cross_dim=64, heads=8,
                                                            size=64 // GENERATOR_PATCH, attention_levels=2,
                                                            channels=channels))
        c.total_steps = GENERATOR_STEPS
        c.noise.update(prediction="sample", min_snr_gamma=GENERATOR_GAMMA)
        c.ema_decay = 0.995
        c.eval_every = 0
        c.checkpoint_every = 300
        c.sample.every = 0
    if variant == "synth_lora":
        c.mode = "lora"
        c.lora.update(rank=8, alpha=8.0)
        c.ema_decay = 0.0
        c.total_steps = 600
        c.optim.update(lr=5e-4, warmup_steps=20)
    if variant == "tiny_generator":  # the generator's design at 32 px, for tests (8x8x48 patches)
        make_tiny(c, total_steps=60, checkpoint_every=30)
        c.model.unet = ml_collections.ConfigDict(synth_unet(widths=(32, 64), cross_dim=32, heads=4,
                                                            size=32 // GENERATOR_PATCH, channels=channels))
        c.model.text_encoder.update(hidden_size=32, intermediate_size=64, num_attention_heads=2, projection_dim=32)
        c.ema_decay = 0.0
    if variant == "tiny":
        make_tiny(c, eval_every=12)
        c.model.unet = ml_collections.ConfigDict(synth_unet(widths=(16, 32), cross_dim=32, heads=2, size=32))
        c.eval_at_start = True
        c.model.text_encoder.update(hidden_size=32, intermediate_size=64, num_attention_heads=2, projection_dim=32)
        c.eval_batches = 2
        c.sample.update(every=0, num_seeds=1, steps=3)
        c.ema_decay = 0.9
    return c
