r"""MeMa sampling (the paper's Step 2): virtual patients from the fine-tuned diffusion model.

Run (argument: VARIANT[,direct][,random]):
  python -m launch.main --config=configs/mema_sample.py:synth --workdir=runs/mema/injected
  python -m launch.main --config=configs/mema_sample.py:synth,direct --workdir=runs/mema/direct
  python -m launch.main --config=configs/mema_sample.py:synth,random --workdir=runs/mema/random
  python -m launch.main --config=configs/mema_sample.py:paper --workdir=runs/mema_paper \
      --config.model.folder=/path/to/stable-diffusion-v1-5 --config.model.lora=runs/mema_lora/lora/pytorch_lora_weights.safetensors \
      --config.model.ip_adapter=/path/to/ip-adapter_sd15.safetensors --config.model.image_encoder=/path/to/image_encoder \
      --config.real.root=/path/to/real_patients --config.public_faces.folder=/path/to/ffhq
  python -m mema_jax.sampling.sampler regenerate --folder=runs/mema/injected --image-id=000007 --out=x.png
Variants:
  :synth  the offline MeMa-Synth models of ``python -m launch.mema_pipeline`` (runs/mema/): the
          64 px UNet on lossless 4x4 patches (configs/mema_lora.py:synth_generator) trained on the "real
          patients" (data/mema_synth_64_patients, whose statistics the real-guided sampling follows),
          its IP-Adapter trained on the population; public faces = healthy MeMa-Synth faces of
          other people (another seed), metadata from their labels.
  :paper  SD1.5 + the MeMa LoRA, 512 px, 50 DDIM steps, guidance 7.5, 42307 images (MeMa's size),
          FFHQ as the public faces, bf16.
  :tiny   seconds, for tests.
Modifiers:
  direct  Tab. 1's "Direct sample": the simple training prompt, no severity, no injection.
  random  Tab. 2's "Random sampling": uniform disease, gender, age (random_age_range).
Choices the paper leaves open (see mema_jax/sampling/conditions.py):
  * severity uniform over slight/mid/heavy (the real captions have none), none for Normal;
  * age bands of 10 years for matching references; an empty (band, gender) cell falls back to
    the nearest band of that gender, then to the nearest age of the other gender (counted in
    summary.json);
  * labels.csv of an injected set carries the reference face's age and gender, what was injected;
    a direct sample's age and gender are left empty (not controlled);
  * random_age_range 1..90 (FFHQ's range is roughly 0-70+; the paper gives none);
  * splits drawn per image in MeMa's proportions 34000 / 3729 / 4578;
  * negative prompt empty (the paper names none); guidance 7.5 for SD1.5 (diffusers' default),
    2.0 for the small model (its training grid's value);
  * microbatch 4 on CPU: measured here on the :synth model, 20 steps with guidance, ms per image at
    microbatch 1 / 4 / 8 / 16: 402 / 362 / 593 / 632 (2 cores, other jobs running).
Measured: see README (MeMa sampling) for the end-to-end run.
"""
import ml_collections

from configs.common import base_config, parse_arg
from mema_jax.data import layout

VARIANTS = ("synth", "paper", "tiny")
MODIFIERS = ("direct", "random")
RUNS = "runs/mema"


def get_config(arg=None):
    variant, modifiers = parse_arg(arg, "configs/mema_sample.py", VARIANTS, MODIFIERS, default="synth")
    c = base_config()
    c.trainer = "mema_jax.sampling.sampler"
    c.variant = ",".join([variant, *modifiers])
    c.seed = 0
    c.precision.compute_dtype = "float32"

    c.model = ml_collections.ConfigDict({
        "folder": f"{RUNS}/unet/model",  # a diffusers pipeline folder
        "lora": "",  # optional LoRA file merged into the UNet (the diffusion trainer's lora/ export)
        "lora_scale": 1.0,
        "ip_adapter": f"{RUNS}/ip_adapter/ip_adapter/ip-adapter.safetensors",
        "image_encoder": f"{RUNS}/image_encoder",  # CLIP vision tower folder the IP-Adapter was trained with
    })
    c.real = ml_collections.ConfigDict({"root": "data/mema_synth_64_patients", "split": "train"})
    c.public_faces = ml_collections.ConfigDict({"folder": "data/mema_synth_64_public", "metadata": ""})

    c.sample = ml_collections.ConfigDict({
        "num_images": 128, "mode": "real", "inject": True, "severity": True,
        "ip_scale_range": (0.2, 0.4), "age_band": 10, "random_age_range": (1, 90),
        "split_weights": tuple(float(layout.PAPER_SPLIT_SIZES[s]) for s in layout.SPLITS),
        "image_size": 64, "steps": 20, "guidance": 2.0, "scheduler": "ddim", "negative_prompt": "",
        "microbatch": 4, "disease_words": ml_collections.ConfigDict(),
    })

    if variant == "paper":
        c.model.update(folder="", lora="", ip_adapter="", image_encoder="")
        c.real.update(root="", split="train")
        c.public_faces.folder = ""
        c.sample.update(num_images=42307, image_size=512, steps=50, guidance=7.5, microbatch=8)
        c.precision.compute_dtype = "bfloat16"
    elif variant == "tiny":
        c.model.update(folder="", ip_adapter="", image_encoder="")
        c.real.root = "data/mema_synth_32_tiny"
        c.public_faces.folder = ""
        c.sample.update(num_images=12, image_size=32, steps=3, microbatch=2)
    if "direct" in modifiers:
        c.sample.update(inject=False, severity=False)
    if "random" in modifiers:
        c.sample.mode = "random"
    return c
