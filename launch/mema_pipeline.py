r"""MeMa generation offline, end to end (the paper's Steps 1-3, Tab. 1-2) on MeMa-Synth:

  python -m launch.mema_pipeline [--preset quick|tiny] [--runs runs/mema] [--only STAGE,...] [--images N]

The paper's situation, rebuilt from MeMa-Synth: a generator fine-tuned on a few real patients
reproduces them (Tab. 1's direct sampling), and injecting public faces through the IP-Adapter should
not.  Three disjoint sets of people: the patients (few enough to be memorised), the population (the
world the evaluation models learn from: many other people, every disease) and the public faces
(healthy people, FFHQ's stand-in).  Stages, each a command a user can also run alone (printed before
it runs), each cached (a stage whose output exists is skipped; a rerun resumes at the first missing one):

  data        the population: MeMa-Synth 64 px, 2000 images of 500 people, every disease equally often
              (so Med-Class learns the rare ones too), 60% women (data/mema_synth_64_population); the
              evaluation models' data
  patients    the "real patients": PATIENT_IMAGES images of other people, 3 each, an eye clinic's mix
              (CLINIC_WEIGHTS; data/mema_synth_64_patients); their train split is what the generator sees
  public      the public faces: 400 healthy MeMa-Synth faces of other people (another seed), and
              their metadata table (image, age, gender) from their labels (data/mema_synth_64_public)
  unet        the patient model: the small UNet on lossless 4x4 patches (configs/mema_lora.py:synth_generator)
              trained on the patients' captions "A face, eye with {disease}"
  encoder     a CLIP vision tower for the IP-Adapter, random weights saved in transformers' format
              (no CLIP weights offline; a user passes openai/clip-vit-large-patch14's folder)
  ip_adapter  the IP-Adapter on the frozen patient UNet, trained on the population's faces (as the
              paper's is trained on public data, never on the patients)
  identity    an ArcFace trained on the population (configs/identity.py:synth, seed 1): the leakage
              filter's identity model beside dlib; it never sees a patient
  medclass    Med-Class: the ResNet-18 disease classifier (eval bridge) trained on the population
  direct      Tab. 1's "Direct sample": simple prompts, no injection (configs/mema_sample.py:synth,direct)
  injected    real-guided rich-condition sampling with face injection (configs/mema_sample.py:synth)
  random      Tab. 2's random sampling with injection (configs/mema_sample.py:synth,random)
  tab1        Tab. 1: identity leakage of direct vs injected against the patients (eval bridge,
              python -m eval.leakage_filter tab1; thresholds chosen on same/different pairs of the
              population's validation people, --pairs data/mema_synth_64_population:val)
  tab2        Tab. 2: Wasserstein distances of random and real-guided labels to the patients
  quality     the generated images scored: Med-Class per prompted disease, faces found, Fréchet
              distance in Med-Class features (python -m eval.report.generation_quality)
  filter      Step 3: the injected set without the images that leak, a new MeMa folder (runs/mema/mema);
              it reuses the identity features Tab. 1 computed (runs/mema/embeddings: biometric data, kept there)
  grid        <runs>/grid.png: one row per disease: a patient with it | direct samples | injected samples

The JAX stages run on the core install; tab1, tab2, medclass, quality and filter need the eval
bridge (make setup-all).
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
# The population's: uniform.  Clinic-weighted, Med-Class had 64-96 training images of the three rarest
# diseases and read 38.7% on real validation images; uniform, 76.9% (8 epochs, measured here).
UNIFORM_WEIGHTS = ",".join(["1"] * len(CLINIC_WEIGHTS))
STAGES = ("data", "patients", "public", "unet", "encoder", "ip_adapter", "identity", "medclass", "direct", "injected",
          "random", "ip_sweep", "tab1", "tab2", "quality", "filter", "grid")
# Tab. 1 beyond the paper's U[0.2, 0.4]: injection at these fixed IP-Adapter scales too.
IP_SWEEP = (0.7, 1.0)
PATIENT_IMAGES = 96  # 32 patients, 3 photos each: few enough that the generator can memorise them
# quick: the README's offline run (~30 min on 2 CPU cores, measured there); tiny: its test (seconds a stage).
PRESETS = {
    "quick": {"data": "data/mema_synth_64_population", "patients": "data/mema_synth_64_patients",
              "public": "data/mema_synth_64_public", "resolution": 64,
              "real_images": 2000, "population_weights": UNIFORM_WEIGHTS, "patient_images": PATIENT_IMAGES,
              "public_images": 400, "images": 128, "sweep_images": 64,
              "unet": ("configs/mema_lora.py:synth_generator", ()),
              "ip_adapter": ("configs/mema_lora.py:synth_generator", ("--config.total_steps=150",
                                                                      "--config.optim.warmup_steps=10",
                                                                      "--config.ema_decay=0")),
              "identity": ("configs/identity.py:synth", ("--config.total_steps=100",)),
              "medclass": ("--epochs=8", "--threads=2"),
              # DPM-Solver++(2M), 10 steps: on the generator's 64 direct samples of one seed, faces found
              # 14.1% vs DDIM-20's 10.9% and the same Fréchet distance (723.5 vs 723.0), in half the time
              "sample": "synth", "sample_args": ("--config.sample.scheduler=dpmpp_2m", "--config.sample.steps=10")},
    "tiny": {"data": "data/mema_synth_32_population_tiny", "patients": "data/mema_synth_32_patients_tiny",
             "public": "data/mema_synth_32_public_tiny", "resolution": 32,
             # 96 images: uniform weights would leave each disease 3 people and the val split empty
             "real_images": 96, "population_weights": ",".join(str(w) for w in CLINIC_WEIGHTS), "patient_images": 48,
             "public_images": 16, "images": 8, "sweep_images": 8,
             "unet": ("configs/mema_lora.py:tiny_generator", ()),
             "ip_adapter": ("configs/mema_lora.py:tiny", ("--config.total_steps=4", "--config.optim.warmup_steps=1",
                                                          "--config.ema_decay=0")),
             "identity": ("configs/identity.py:tiny", ()),
             "medclass": ("--epochs=1", "--warmup-epochs=0", "--batch-size=16", "--image-size=32"),
             "sample": "tiny", "sample_args": ("--config.sample.steps=3",)},
}


def plan(runs: Path, preset: str = "quick", images: int = 0, data_dir: str = "") -> list[Stage]:
    """The stages, in order."""
    p = PRESETS[preset]
    data, patients, public, res = p["data"], p["patients"], p["public"], p["resolution"]
    if data_dir:  # the rendered folders elsewhere than data/
        data, patients, public = (str(Path(data_dir) / Path(d).name) for d in (data, patients, public))
    unet, encoder, ip = runs / "unet", runs / "encoder", runs / "ip_adapter"
    backbone, medclass = runs / "identity" / "backbone.pth", runs / "medclass"
    weights = ",".join(str(w) for w in CLINIC_WEIGHTS)
    no_render = "--config.data.generate_if_missing=false"
    sample_args = [f"--config.model.folder={unet / 'model'}", f"--config.model.image_encoder={encoder}",
                   f"--config.model.ip_adapter={ip / 'ip_adapter' / 'ip-adapter.safetensors'}",
                   f"--config.real.root={patients}", f"--config.public_faces.folder={public}",
                   *p["sample_args"]]
    num_images = f"--config.sample.num_images={images or p['images']}"
    sweep_images = f"--config.sample.num_images={images or p['sweep_images']}"
    identity_models = ["--model=dlib", f"--model=arcface_r18={backbone}", f"--pairs={data}:val", "--faces=real-mean",
                       f"--real={patients}", "--real-split=train", f"--embedding-cache={runs / 'embeddings'}"]
    sample = p["sample"]
    sweep = [(scale, runs / f"injected_ip{scale}") for scale in IP_SWEEP]

    def render(folder, images, per_identity, seed, class_weights, *extra):
        return python("mema_jax.data.synth", f"--out={folder}", f"--num-images={images}",
                      f"--images-per-identity={per_identity}", f"--resolution={res}", f"--seed={seed}",
                      f"--class-weights={class_weights}", *extra)

    stages = [
        ("data", render(data, p["real_images"], 4, 0, p["population_weights"], "--female-fraction=0.6", "--workers=2"),
         Path(data) / "labels.csv"),
        ("patients", render(patients, p["patient_images"], 3, 2, weights, "--female-fraction=0.6", "--workers=1"),
         Path(patients) / "labels.csv"),
        ("public", render(public, p["public_images"], 1, 1, "1,0,0,0,0,0,0,0", "--workers=1"), Path(public) / "labels.csv"),
        ("public", python("launch.mema_pipeline", "public-metadata", f"--folder={public}"), Path(public) / "metadata.csv"),
        ("unet", python("launch.main", f"--config={p['unet'][0]}", f"--workdir={unet}", f"--config.data.root={patients}",
                     no_render, "--config.eval_every=0", "--config.sample.every=0", *p["unet"][1]), unet / "model"),
        ("encoder", python("launch.mema_pipeline", "image-encoder", f"--out={encoder}", f"--image-size={res}"), encoder),
        ("ip_adapter", python("launch.main", f"--config={p['ip_adapter'][0]}", f"--workdir={ip}",
                           f"--config.data.root={data}", no_render, "--config.mode=ip_adapter",
                           f"--config.model.pretrained={unet / 'model'}", f"--config.ip_adapter.image_encoder={encoder}",
                           "--config.eval_every=0", "--config.sample.every=0", *p["ip_adapter"][1]),
         ip / "ip_adapter" / "ip-adapter.safetensors"),
        ("identity", python("launch.main", f"--config={p['identity'][0]}", f"--workdir={runs / 'identity'}",
                         f"--config.data.root={data}", no_render, "--config.seed=1", *p["identity"][1]), backbone),
        ("medclass", python("eval.medical.classification", "train", f"--data={data}", "--backbone=resnet18",
                         f"--out={medclass}", *p["medclass"]), medclass / "classifier"),
        ("direct", python("launch.main", f"--config=configs/mema_sample.py:{sample},direct", f"--workdir={runs / 'direct'}",
                       *sample_args, num_images), runs / "direct" / "summary.json"),
        ("injected", python("launch.main", f"--config=configs/mema_sample.py:{sample}", f"--workdir={runs / 'injected'}",
                         *sample_args, num_images), runs / "injected" / "summary.json"),
        ("random", python("launch.main", f"--config=configs/mema_sample.py:{sample},random", f"--workdir={runs / 'random'}",
                       *sample_args, num_images), runs / "random" / "summary.json"),
        *[("ip_sweep", python("launch.main", f"--config=configs/mema_sample.py:{sample}", f"--workdir={folder}",
                              *sample_args, sweep_images, f"--config.sample.ip_scale_range=({scale}, {scale})"),
           folder / "summary.json") for scale, folder in sweep],
        ("tab1", python("eval.leakage_filter", "tab1", f"--row=Direct sample={runs / 'direct'}",
                     f"--row=Face injection={runs / 'injected'}",
                     *[f"--row=Face injection (IP scale {scale})={folder}" for scale, folder in sweep],
                     *identity_models, f"--out={runs / 'tab1'}"),
         runs / "tab1" / "tab1_leakage.md"),
        ("tab2", python("eval.report.tab2_label_distance", f"--real={patients}", "--real-split=train",
                     f"--row=Random sampling={runs / 'random'}", f"--row=Real-guided sampling={runs / 'injected'}",
                     f"--out={runs / 'tab2'}"), runs / "tab2" / "tab2_wasserstein.md"),
        ("quality", python("eval.report.generation_quality", f"--classifier={medclass}", f"--real={data}",
                        f"--row=Direct sample={runs / 'direct'}", f"--row=Face injection={runs / 'injected'}",
                        *[f"--row=Face injection (IP scale {scale})={folder}" for scale, folder in sweep],
                        f"--out={runs / 'quality'}"), runs / "quality" / "generation_quality.md"),
        ("filter", python("eval.leakage_filter", "filter", f"--generated={runs / 'injected'}", *identity_models,
                       f"--out={runs / 'mema'}"), runs / "mema"),
        ("grid", python("launch.mema_pipeline", "grid", f"--runs={runs}", f"--patients={patients}", f"--out={runs / 'grid.png'}"),
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


def write_grid(runs: Path, patients: Path, out: Path, per_set: int = 3) -> Path:
    """One row per disease: a patient (train split) with it | ``per_set`` direct samples prompted with it |
    ``per_set`` injected samples prompted with it (the first ones of each folder; a blank where a set has fewer)."""
    import numpy as np
    from PIL import Image

    from eval.grid import example_grid
    from mema_jax.data import layout
    from mema_jax.fileio import atomic_file

    def by_disease(folder: Path, split: str = "") -> dict[str, list[Path]]:
        dataset = layout.read_dataset(folder, verify_images=False)
        found: dict[str, list[Path]] = {}
        for r in dataset.records:
            if not split or r.split == split:
                found.setdefault(r.disease, []).append(folder / r.image)
        return found

    def load(path: Path | None, size: int) -> np.ndarray:
        if path is None:
            return np.full((size, size, 3), 255, np.uint8)
        return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.NEAREST))

    real, direct, injected = by_disease(patients, "train"), by_disease(runs / "direct"), by_disease(runs / "injected")
    size = np.asarray(Image.open(next(iter(real.values()))[0])).shape[0]
    rows, titles = [], []
    for disease in layout.DISEASES:
        pick = lambda found, k: found.get(disease, [])[k] if k < len(found.get(disease, [])) else None
        rows.append([load(pick(real, 0), size)] + [load(pick(direct, k), size) for k in range(per_set)]
                    + [load(pick(injected, k), size) for k in range(per_set)])
        titles.append(disease)
    columns = ("patient", *[f"direct {k + 1}" for k in range(per_set)], *[f"injected {k + 1}" for k in range(per_set)])
    grid = example_grid(rows, columns, cell_height=128, row_titles=titles)
    with atomic_file(out) as tmp:
        grid.save(tmp, format="PNG")
    return out


def _helper(name: str):
    def command(argv: list[str]) -> int:
        p = argparse.ArgumentParser(prog=f"python -m launch.mema_pipeline {name}")
        p.add_argument("--out", default="")
        p.add_argument("--folder", default="")
        p.add_argument("--runs", default="")
        p.add_argument("--patients", default="")
        p.add_argument("--image-size", type=int, default=64)
        a = p.parse_args(argv)
        if name == "public-metadata":
            print(write_public_metadata(Path(a.folder), Path(a.out or Path(a.folder) / "metadata.csv")))
        elif name == "image-encoder":
            print(write_image_encoder(Path(a.out), a.image_size))
        else:
            print(write_grid(Path(a.runs), Path(a.patients), Path(a.out)))
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
                       ("quality", runs / "quality" / "generation_quality.md"),
                       ("filtered MeMa", runs / "mema"), ("grid", runs / "grid.png")):
        if path.exists():
            print(f"  {what}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
