r"""The whole pipeline, offline, as the README's first command runs it (``make quickstart``):

  python -m launch.pipeline [--preset quick|tiny] [--runs runs/pipeline] [--data ROOT] [--only STAGE,...]

Stages, each a command a user can also run alone (printed before it runs), each cached: a stage
whose output exists is skipped, so a rerun does no training and rewrites nothing.

  classifier  the JAX disease classifier on MeMa-Synth (configs/quickstart.py; renders MeMa-Synth,
              3000 faces at 64 px, into data/ on first use)
  unet        the small pixel-space diffusion UNet (configs/mema_lora.py:synth): Enc_med's source
  identity    the ArcFace of the identity losses (configs/identity.py:synth), exported as .pth
  eval_identity  the evaluation-only ArcFace: the same recipe with another seed, never a loss (its
              verification of validation pairs is the report's yardstick; dlib finds only a third
              of the 64 px faces)
  deid        MedSem-DeID (configs/medsem_deid.py:synth) with the two models above
  deidentify  the validation split de-identified by the CLI into <runs>/method (deid/, features/)
  recover     recovered with the passphrase (method/recovered/), and the ID-Decryptor's output for a
              wrong password (method/wrong/: the features opened with the passphrase, decrypted with
              another; the CLI refuses a wrong passphrase outright, its files are sealed)
  medclass    the eval bridge's Med-Class yardstick (a ResNet-18 trained on MeMa-Synth, PyTorch)
  report      the eval bridge's tables (python -m eval.report): ID-Dis and face matching with dlib and
              the evaluation-only ArcFace, every face embedded at its recorded (faces.csv) face, each
              model's verification of same/different pairs of the validation people, Med-Class on
              originals, de-identified and recovered images, PSNR of recovery, reference rows
  grid        <runs>/grid.png: original | de-identified | recovered | wrong password

The passphrase comes from $MEMA_PASSPHRASE; without it a fixed demonstration passphrase is used
(and said so): this is a demo on synthetic faces.  It reaches the CLI through its environment,
never its command line.  The JAX stages run on the core install; medclass and report need the
eval bridge's PyTorch (``make setup-all``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from launch import stages as stages_lib
from launch.stages import Stage, python

DEMO_PASSPHRASE = "mema-jax quickstart demo passphrase"
PASSPHRASE_ENV = "MEMA_PASSPHRASE"
WRONG_PASSPHRASE = "not the passphrase"
DATA = {"quick": "data/mema_synth_64_3k", "tiny": "data/mema_synth_32_tiny"}

# Steps and sizes per preset.  quick: ~15 min on 2 CPU cores in all (measured in README);
# tiny: seconds a stage; its unet, identity and deid stages are also the test suite's shared trained
# models (tests/conftest.py runs these very commands once per test run), so they are evaluated at
# the start and end and the UNet draws a sample grid.
PRESETS = {
    "quick": {"classifier": ("configs/quickstart.py", ("--config.total_steps=200", "--config.eval_every=100")),
              "unet": ("configs/mema_lora.py:synth", ("--config.total_steps=200", "--config.eval_every=0",
                                                      "--config.sample.every=0")),
              "identity": ("configs/identity.py:synth", ("--config.total_steps=100",)),
              # 100 steps: validation verification 0.980 (configs/identity.py), the yardstick.
              "eval_identity": ("configs/identity.py:synth", ("--config.total_steps=100", "--config.seed=1")),
              # 300 steps at batch 8 leave recovery weak at the paper's lambda_rev = 0.1 (14.5 dB measured);
              # lambda_rev = 1 (a value of Fig. 8's sweep) and lr 1e-3 gave 15.8 dB in the same time; with X_enc
              # decoded before the sign pad and :synth's lambda_ae = 1, 19.4 dB (eval) / 19.5 dB (the CLI's, Tab. 8).
              "deid": ("configs/medsem_deid.py:synth", ("--config.total_steps=300", "--config.batch_size=8",
                                                         "--config.optim.lr=1e-3", "--config.loss.lambda_rev=1.0",
                                                         "--config.eval_every=150", "--config.checkpoint_every=150")),
              "medclass": ("--epochs=8", "--threads=2"), "report_images": 0},  # select accuracy 0.78 (15: 0.91)
    "tiny": {"classifier": ("configs/quickstart.py:tiny", ()),
             "unet": ("configs/mema_lora.py:tiny", ("--config.mode=full", "--config.sample.every=24")),
             "identity": ("configs/identity.py:tiny", ()),
             "eval_identity": ("configs/identity.py:tiny", ("--config.seed=1",)),
             # 40 steps: recovery has levelled off by 25 (measured psnr_rec 9.6 at 0, 15.2 at 25, 15.3 at 40 and 100)
             "deid": ("configs/medsem_deid.py:tiny", ("--config.total_steps=40", "--config.eval_every=40",
                                                        "--config.eval_at_start=true", "--config.checkpoint_every=40",
                                                        "--config.log_every=20")),
             "medclass": ("--epochs=1", "--warmup-epochs=0", "--batch-size=16", "--image-size=32"),
             "report_images": 16},
}
STAGES = ("classifier", "unet", "identity", "eval_identity", "deid", "deidentify", "recover", "medclass", "report", "grid")


def _trainer(config: str, workdir: Path, data: str, *overrides: str) -> tuple[str, ...]:
    return python("launch.main", f"--config={config}", f"--workdir={workdir}", f"--config.data.root={data}", *overrides)


def plan(preset: str, runs: Path, data: str = "") -> list[Stage]:
    """The stages, in order."""
    p, data = PRESETS[preset], data or DATA[preset]
    method = runs / "method"
    unet_model, backbone, deid_model = runs / "unet" / "model", runs / "identity" / "backbone.pth", runs / "deid" / "model"
    eval_backbone = runs / "eval_identity" / "backbone.pth"
    report_args = [f"--config.originals.root={data}", f"--config.medical.classifier={runs / 'medclass'}",
                   f"--config.identity.models.arcface_r18.weights={eval_backbone}", "--config.identity.faces=recorded",
                   "--config.identity.pairs=originals"]
    if p["report_images"]:
        report_args.append(f"--config.max_images={p['report_images']}")
    return [
        Stage("classifier", _trainer(p["classifier"][0], runs / "classifier", data, *p["classifier"][1]),
              runs / "classifier" / "metrics.csv"),
        Stage("unet", _trainer(p["unet"][0], runs / "unet", data, *p["unet"][1]), unet_model),
        Stage("identity", _trainer(p["identity"][0], runs / "identity", data, *p["identity"][1]), backbone),
        Stage("eval_identity", _trainer(p["eval_identity"][0], runs / "eval_identity", data, *p["eval_identity"][1]),
              eval_backbone),
        Stage("deid", _trainer(p["deid"][0], runs / "deid", data, f"--config.medical_encoder.source={unet_model}",
                               f"--config.identity.weights={backbone}", *p["deid"][1]), deid_model),
        Stage("deidentify", python("deid_jax.deidentify", "deidentify", "--aligned", f"--model={deid_model}", f"--in={data}",
                                   "--split=val", f"--out={method}", f"--passphrase-env={PASSPHRASE_ENV}"),
              method / "features"),
        Stage("recover", python("deid_jax.deidentify", "recover", f"--model={deid_model}", f"--in={method}",
                                f"--passphrase-env={PASSPHRASE_ENV}"), method / "recovered"),
        Stage("recover", python("deid_jax.deidentify", "recover", f"--model={deid_model}", f"--in={method}",
                                f"--out={method / 'wrong'}", f"--passphrase-env={PASSPHRASE_ENV}",
                                "--decryptor-passphrase-env=MEMA_WRONG_PASSPHRASE"), method / "wrong"),
        Stage("medclass", python("eval.medical.classification", "train", f"--data={data}", "--backbone=resnet18",
                                 f"--out={runs / 'medclass'}", *p["medclass"]), runs / "medclass" / "classifier"),
        Stage("report", python("eval.report", f"--config=configs/eval_mema.py:medsem_deid={method}",
                               f"--out={runs / 'report'}", *report_args), runs / "report" / "tables.md"),
        Stage("grid", python("launch.pipeline", "grid", f"--data={data}", f"--method={method}",
                             f"--out={runs / 'grid.png'}"), runs / "grid.png"),
    ]


def write_grid(data: Path, method: Path, out: Path, examples: int = 8) -> Path:
    """original | de-identified | recovered | wrong password for the first validation images."""
    import numpy as np
    from PIL import Image

    from eval.grid import example_grid
    from mema_jax.fileio import atomic_file

    names = sorted(p.relative_to(method / "deid").as_posix() for p in (method / "deid").rglob("*.png"))[:examples]
    rows = [[np.asarray(Image.open(folder / name).convert("RGB"))
             for folder in (data / "images", method / "deid", method / "recovered", method / "wrong")] for name in names]
    grid = example_grid(rows, ("original", "de-identified", "recovered", "wrong password"), cell_height=128)
    with atomic_file(out) as tmp:
        grid.save(tmp, format="PNG")
    return out


def _grid_command(argv: list[str]) -> int:
    g = argparse.ArgumentParser(prog="python -m launch.pipeline grid")
    g.add_argument("--data", required=True)
    g.add_argument("--method", required=True)
    g.add_argument("--out", required=True)
    a = g.parse_args(argv)
    print(f"grid: {write_grid(Path(a.data), Path(a.method), Path(a.out))}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    helper = stages_lib.run_helper(argv, {"grid": _grid_command})
    if helper is not None:
        return helper
    parser = stages_lib.parser("python -m launch.pipeline", __doc__, PRESETS, STAGES, default_runs="runs/pipeline")
    parser.add_argument("--data", default="", help="the MeMa-Synth root (default: the preset's, rendered on first use)")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    stages = stages_lib.select_or_exit(parser, plan(args.preset, runs, args.data), args.only)
    env = dict(os.environ)
    if PASSPHRASE_ENV not in env:
        env[PASSPHRASE_ENV] = DEMO_PASSPHRASE
        print(f"pipeline: ${PASSPHRASE_ENV} is not set; using the demonstration passphrase {DEMO_PASSPHRASE!r}")
    env.setdefault("MEMA_WRONG_PASSPHRASE", WRONG_PASSPHRASE)
    t_start = time.time()
    if not stages_lib.run(stages, env):
        return 1
    print(f"pipeline: finished in {time.time() - t_start:.0f} s")
    for what, path in (("tables", runs / "report" / "tables.md"), ("grid", runs / "grid.png"),
                       ("de-identified", runs / "method" / "deid"), ("recovered", runs / "method" / "recovered"),
                       ("de-identifier", runs / "deid" / "model")):
        if path.exists():
            print(f"  {what}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
