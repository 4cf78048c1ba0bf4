r"""MeMa generation offline, end to end (the paper's Steps 1-3, Tab. 1-2) on MeMa-Synth:

  python -m launch.mema_pipeline [--preset quick|tiny] [--runs runs/mema] [--only STAGE,...] [--images N]

Stages, each a command a user can also run alone (printed before it runs), each cached (a stage
whose output exists is skipped; a rerun resumes at the first missing one):

  data        the "real patients": MeMa-Synth 64 px, 2000 images, clinic-like disease frequencies
              (CLINIC_WEIGHTS) and 60% women (data/mema_synth_64_clinic)
  public      the public faces: 400 healthy MeMa-Synth faces of other people (another seed), and
              their metadata table (image, age, gender) from their labels (data/mema_synth_64_public)
  unet        the patient model: the small pixel-space UNet (configs/mema_lora.py:synth) on the
              real patients' captions "A face, eye with {disease}"
  encoder     a CLIP vision tower for the IP-Adapter, random weights saved in transformers' format
              (no CLIP weights offline; a user passes openai/clip-vit-large-patch14's folder)
  ip_adapter  the IP-Adapter on the frozen UNet (configs/mema_lora.py:synth with mode=ip_adapter)
  identity    an ArcFace trained on the real patients' identities (configs/identity.py:synth, seed 1):
              the leakage filter's identity model (dlib finds only some 64 px synthetic faces)
  direct      Tab. 1's "Direct sample": simple prompts, no injection (configs/mema_sample.py:synth,direct)
  injected    real-guided rich-condition sampling with face injection (configs/mema_sample.py:synth)
  random      Tab. 2's random sampling with injection (configs/mema_sample.py:synth,random)
  tab1        Tab. 1: identity leakage of direct vs injected (eval bridge, python -m eval.leakage_filter tab1;
              thresholds chosen on same/different pairs of the real set's validation people, --pairs real:val)
  tab2        Tab. 2: Wasserstein distances of random and real-guided labels to the real set
  filter      Step 3: the injected set without the images that leak, a new MeMa folder (runs/mema/mema);
              it reuses the identity features Tab. 1 computed (runs/mema/embeddings: biometric data, kept there)
  grid        <runs>/grid.png: a reference face | its injected sample, and direct samples

The JAX stages run on the core install; tab1, tab2 and filter need the eval bridge (make setup-all).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from launch import stages as stages_lib
from launch.stages import Stage, python

# Over layout.DISEASES (Normal, BCC, Conj, Uveitis, Ptosis, SCC, Strab, TAO): an eye clinic's mix,
# far from uniform, so that Tab. 2 can tell real-guided from random sampling.
CLINIC_WEIGHTS = (0.30, 0.06, 0.16, 0.05, 0.12, 0.04, 0.17, 0.10)
STAGES = ("data", "public", "unet", "encoder", "ip_adapter", "identity", "direct", "injected", "random",
          "tab1", "tab2", "filter", "grid")
# x0 ("sample") prediction, no min-SNR weighting, no EMA for the 200-step patient model: measured
# here, :synth's v-prediction UNet at 200-600 steps still sampled high-frequency noise with DDIM, while
# x0-prediction at 150 steps sampled smooth face-coloured shapes (its target is the image itself, the
# easiest thing for a barely trained UNet to approximate; EMA 0.99 would average in the first, noisy
# steps of so short a run).  The IP-Adapter trains on that frozen UNet, so it uses the same target.
SAMPLE_PREDICTION = ("--config.noise.prediction=sample", "--config.noise.min_snr_gamma=0", "--config.ema_decay=0")
# quick: the README's offline run (~15 min on 2 CPU cores, measured there); tiny: its test (seconds a stage).
PRESETS = {
    "quick": {"data": "data/mema_synth_64_clinic", "public": "data/mema_synth_64_public", "resolution": 64,
              "real_images": 2000, "public_images": 400, "images": 128,
              "unet": ("configs/mema_lora.py:synth", ("--config.total_steps=200", *SAMPLE_PREDICTION)),
              "ip_adapter": ("configs/mema_lora.py:synth", ("--config.total_steps=100", "--config.optim.warmup_steps=10",
                                                            *SAMPLE_PREDICTION)),
              "identity": ("configs/identity.py:synth", ("--config.total_steps=100",)),
              "sample": "synth", "sample_args": ()},
    "tiny": {"data": "data/mema_synth_32_clinic_tiny", "public": "data/mema_synth_32_public_tiny", "resolution": 32,
             "real_images": 96, "public_images": 16, "images": 8,
             "unet": ("configs/mema_lora.py:tiny", ("--config.mode=full", "--config.eval_every=0")),
             "ip_adapter": ("configs/mema_lora.py:tiny", ("--config.total_steps=4", "--config.optim.warmup_steps=1")),
             "identity": ("configs/identity.py:tiny", ()),
             "sample": "tiny", "sample_args": ("--config.sample.steps=3",)},
}


def plan(runs: Path, preset: str = "quick", images: int = 0, data_dir: str = "") -> list[Stage]:
    """The stages, in order."""
    p = PRESETS[preset]
    data, public, res = p["data"], p["public"], p["resolution"]
    if data_dir:  # the two rendered folders elsewhere than data/
        data, public = (str(Path(data_dir) / Path(d).name) for d in (data, public))
    unet, encoder, ip = runs / "unet", runs / "encoder", runs / "ip_adapter"
    backbone = runs / "identity" / "backbone.pth"
    weights = ",".join(str(w) for w in CLINIC_WEIGHTS)
    no_render = "--config.data.generate_if_missing=false"
    sample_args = [f"--config.model.folder={unet / 'model'}", f"--config.model.image_encoder={encoder}",
                   f"--config.model.ip_adapter={ip / 'ip_adapter' / 'ip-adapter.safetensors'}",
                   f"--config.real.root={data}", f"--config.public_faces.folder={public}",
                   f"--config.sample.num_images={images or p['images']}", *p["sample_args"]]
    identity_models = ["--model=dlib", f"--model=arcface_r18={backbone}", "--pairs=real:val", "--faces=real-mean",
                       f"--real={data}", "--real-split=train", f"--embedding-cache={runs / 'embeddings'}"]
    sample = p["sample"]
    stages = [
        ("data", python("mema_jax.data.synth", f"--out={data}", f"--num-images={p['real_images']}",
                     "--images-per-identity=4", f"--resolution={res}", "--seed=0", f"--class-weights={weights}",
                     "--female-fraction=0.6", "--workers=2"), Path(data) / "labels.csv"),
        ("public", python("mema_jax.data.synth", f"--out={public}", f"--num-images={p['public_images']}",
                       "--images-per-identity=1", f"--resolution={res}", "--seed=1", "--class-weights=1,0,0,0,0,0,0,0",
                       "--workers=1"), Path(public) / "labels.csv"),
        ("public", python("launch.mema_pipeline", "public-metadata", f"--folder={public}"), Path(public) / "metadata.csv"),
        ("unet", python("launch.main", f"--config={p['unet'][0]}", f"--workdir={unet}", f"--config.data.root={data}",
                     no_render, "--config.eval_every=0", "--config.sample.every=0", *p["unet"][1]), unet / "model"),
        ("encoder", python("launch.mema_pipeline", "image-encoder", f"--out={encoder}", f"--image-size={res}"), encoder),
        ("ip_adapter", python("launch.main", f"--config={p['ip_adapter'][0]}", f"--workdir={ip}",
                           f"--config.data.root={data}", no_render, "--config.mode=ip_adapter",
                           f"--config.model.pretrained={unet / 'model'}", f"--config.ip_adapter.image_encoder={encoder}",
                           "--config.ema_decay=0", "--config.eval_every=0", "--config.sample.every=0",
                           *p["ip_adapter"][1]), ip / "ip_adapter" / "ip-adapter.safetensors"),
        ("identity", python("launch.main", f"--config={p['identity'][0]}", f"--workdir={runs / 'identity'}",
                         f"--config.data.root={data}", no_render, "--config.seed=1", *p["identity"][1]), backbone),
        ("direct", python("launch.main", f"--config=configs/mema_sample.py:{sample},direct", f"--workdir={runs / 'direct'}",
                       *sample_args), runs / "direct" / "summary.json"),
        ("injected", python("launch.main", f"--config=configs/mema_sample.py:{sample}", f"--workdir={runs / 'injected'}",
                         *sample_args), runs / "injected" / "summary.json"),
        ("random", python("launch.main", f"--config=configs/mema_sample.py:{sample},random", f"--workdir={runs / 'random'}",
                       *sample_args), runs / "random" / "summary.json"),
        ("tab1", python("eval.leakage_filter", "tab1", f"--row=Direct sample={runs / 'direct'}",
                     f"--row=Face injection={runs / 'injected'}", *identity_models, f"--out={runs / 'tab1'}"),
         runs / "tab1" / "tab1_leakage.md"),
        ("tab2", python("eval.report.tab2_label_distance", f"--real={data}", "--real-split=train",
                     f"--row=Random sampling={runs / 'random'}", f"--row=Real-guided sampling={runs / 'injected'}",
                     f"--out={runs / 'tab2'}"), runs / "tab2" / "tab2_wasserstein.md"),
        ("filter", python("eval.leakage_filter", "filter", f"--generated={runs / 'injected'}", *identity_models,
                       f"--out={runs / 'mema'}"), runs / "mema"),
        ("grid", python("launch.mema_pipeline", "grid", f"--runs={runs}", f"--public={public}", f"--out={runs / 'grid.png'}"),
         runs / "grid.png"),
    ]
    return [Stage(*stage) for stage in stages]


# ----------------------------------------------------------------------------- helper commands


def write_public_metadata(folder: Path, out: Path) -> Path:
    """``image,age,gender`` of a MeMa folder's images, from its labels (MeMa-Synth knows them)."""
    from mema_jax.data import layout
    from mema_jax.fileio import atomic_write_bytes, csv_bytes

    if out.exists():
        raise FileExistsError(f"{out}: exists; outputs are never overwritten")
    records = layout.read_dataset(folder, verify_images=False).records
    atomic_write_bytes(out, csv_bytes(["image", "age", "gender"],
                                      [(r.image, r.age, r.gender) for r in records if r.age is not None and r.gender]))
    return out


def write_image_encoder(out: Path, image_size: int = 64, seed: int = 0) -> Path:
    """A small CLIP vision tower with random weights, in transformers' CLIPVisionModelWithProjection format."""
    import jax
    import jax.numpy as jnp

    from mema_jax.fileio import atomic_folder
    from mema_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
    from mema_jax.models.convert_clip import save_clip_vision

    module = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                            num_attention_heads=4, image_size=image_size, patch_size=8,
                                                            projection_dim=64))
    boxed = jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, image_size, image_size, 3)))["params"]
    params = jax.tree.map(lambda b: b.value, boxed, is_leaf=lambda x: hasattr(x, "names"))
    with atomic_folder(out) as tmp:
        save_clip_vision(tmp, module, params)
    return out


def write_grid(runs: Path, public: Path, out: Path, examples: int = 8) -> Path:
    """Columns: reference face | injected sample (same index) | direct sample; one row per image."""
    import numpy as np
    from PIL import Image

    from eval.grid import example_grid
    from mema_jax.fileio import atomic_file
    from mema_jax.sampling.sampler import read_generation

    rows_csv = read_generation(runs / "injected")[:examples]
    rows = []
    for r in rows_csv:
        load = lambda p: np.asarray(Image.open(p).convert("RGB").resize((64, 64)))
        rows.append([load(public / r["reference"]), load(runs / "injected" / "images" / f"{r['image_id']}.png"),
                     load(runs / "direct" / "images" / f"{r['image_id']}.png")])
    grid = example_grid(rows, ("reference face", "injected sample", "direct sample"), cell_height=128)
    with atomic_file(out) as tmp:
        grid.save(tmp, format="PNG")
    return out


def _helper(name: str):
    def command(argv: list[str]) -> int:
        p = argparse.ArgumentParser(prog=f"python -m launch.mema_pipeline {name}")
        p.add_argument("--out", default="")
        p.add_argument("--folder", default="")
        p.add_argument("--runs", default="")
        p.add_argument("--public", default="")
        p.add_argument("--image-size", type=int, default=64)
        a = p.parse_args(argv)
        if name == "public-metadata":
            print(write_public_metadata(Path(a.folder), Path(a.out or Path(a.folder) / "metadata.csv")))
        elif name == "image-encoder":
            print(write_image_encoder(Path(a.out), a.image_size))
        else:
            print(write_grid(Path(a.runs), Path(a.public), Path(a.out)))
        return 0

    return command


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    helper = stages_lib.run_helper(argv, {name: _helper(name) for name in ("public-metadata", "image-encoder", "grid")})
    if helper is not None:
        return helper
    parser = stages_lib.parser("python -m launch.mema_pipeline", __doc__, PRESETS, STAGES, default_runs="runs/mema")
    parser.add_argument("--images", type=int, default=0, help="images per sampled set (default: the preset's)")
    parser.add_argument("--data-dir", default="", help="render the two MeMa-Synth folders here (default: data/)")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    t0 = time.time()
    stages = stages_lib.select_or_exit(parser, plan(runs, args.preset, args.images, args.data_dir), args.only)
    if not stages_lib.run(stages, os.environ):
        return 1
    print(f"mema pipeline: finished in {time.time() - t0:.0f} s")
    for what, path in (("Tab. 1", runs / "tab1" / "tab1_leakage.md"), ("Tab. 2", runs / "tab2" / "tab2_wasserstein.md"),
                       ("filtered MeMa", runs / "mema"), ("grid", runs / "grid.png")):
        if path.exists():
            print(f"  {what}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
