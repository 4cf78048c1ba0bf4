r"""The whole pipeline, offline, as the README's first command runs it (``make quickstart``):

  python -m launch.pipeline [--preset quick|tiny] [--runs runs/pipeline] [--data ROOT] [--only STAGE,...]

Stages, each a command a user can also run alone (printed before it runs), each cached: a stage
whose output exists is skipped, so a rerun does no training and rewrites nothing.

  classifier  the JAX disease classifier on MeMa-Synth (configs/quickstart.py; tiny preset only: nothing
              downstream uses it).  The first training stage renders MeMa-Synth (3000 faces at 64 px)
              into data/ on first use
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
  pretrained  the same three CLI steps (de-identify, recover, wrong password) for the MedSem-DeID the
              project trained with the full :synth recipe and ships in pretrained/ (PRETRAINED_MODEL;
              how it was made: pretrained/medsem_deid_synth64/MODEL.md) into <runs>/pretrained_method;
              the report scores it beside this run's model (row medsem_deid_pretrained)
  grid        <runs>/grid.png: original | de-identified | recovered | wrong password, for the shipped
              model, and <runs>/grid_this_run.png: the same for this run's own short training

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

# Steps and sizes per preset.  quick: <= 30 min on 2 CPU cores in all (measured in README);
# tiny: seconds a stage; its unet, identity and deid stages are also the test suite's shared trained
# models (tests/conftest.py runs these very commands once per test run), so they are evaluated at
# the start and end and the UNet draws a sample grid.
PRESETS = {
    # No JAX classifier stage in quick (None): nothing downstream uses it, and its ~2 min are the shipped model's
    # evaluation; `python -m launch.main --config=configs/quickstart.py` trains it alone.
    "quick": {"classifier": None,
              "unet": ("configs/mema_lora.py:synth", ("--config.total_steps=200", "--config.eval_every=0",
                                                      "--config.sample.every=0")),
              "identity": ("configs/identity.py:synth", ("--config.total_steps=100",)),
              # 100 steps: validation verification 0.980 (configs/identity.py), the yardstick.
              "eval_identity": ("configs/identity.py:synth", ("--config.total_steps=100", "--config.seed=1")),
              # The first 150 steps of the :synth recipe (lr 1e-3, before its decays): ~5 min, recovery ~20.6 dB on
              # the trainer's eval batches (benchmarks/results/deid_learning_curves_synth_1500.md).  It shows the
              # trainer at work; the method's quality is shown by the shipped model (stage pretrained), trained by
              # the recipe in full, which does not fit the quickstart's 30 minutes.
              "deid": ("configs/medsem_deid.py:synth", ("--config.total_steps=150", "--config.eval_every=150",
                                                         "--config.checkpoint_every=150")),
              "medclass": ("--epochs=8", "--threads=2"), "report_images": 0, "pretrained": True},  # select accuracy 0.78 (15: 0.91)
    "tiny": {"classifier": ("configs/quickstart.py:tiny", ()),
             "unet": ("configs/mema_lora.py:tiny", ("--config.mode=full", "--config.sample.every=24")),
             "identity": ("configs/identity.py:tiny", ()),
             "eval_identity": ("configs/identity.py:tiny", ("--config.seed=1",)),
             # 40 steps: recovery has levelled off by 25 (measured psnr_rec 9.6 at 0, 15.2 at 25, 15.3 at 40 and 100)
             "deid": ("configs/medsem_deid.py:tiny", ("--config.total_steps=40", "--config.eval_every=40",
                                                        "--config.eval_at_start=true", "--config.checkpoint_every=40",
                                                        "--config.log_every=20")),
             "medclass": ("--epochs=1", "--warmup-epochs=0", "--batch-size=16", "--image-size=32"),
             "report_images": 16, "pretrained": True},
}
STAGES = ("classifier", "unet", "identity", "eval_identity", "deid", "deidentify", "recover", "pretrained", "medclass",
          "report", "grid")
# MedSem-DeID trained by the :synth preset's recipe (~26 min on 2 cores), shipped so that the quickstart shows
# the method at the quality its own short run cannot reach in the time (MODEL.md there: command, time, figures).
PRETRAINED_MODEL = Path(__file__).resolve().parent.parent / "pretrained" / "medsem_deid_synth64"


def _trainer(config: str, workdir: Path, data: str, *overrides: str) -> tuple[str, ...]:
    return python("launch.main", f"--config={config}", f"--workdir={workdir}", f"--config.data.root={data}", *overrides)


def plan(preset: str, runs: Path, data: str = "") -> list[Stage]:
    """The stages, in order."""
    p, data = PRESETS[preset], data or DATA[preset]
    method = runs / "method"
    unet_model, backbone, deid_model = runs / "unet" / "model", runs / "identity" / "backbone.pth", runs / "deid" / "model"
    eval_backbone = runs / "eval_identity" / "backbone.pth"
    pretrained_method = runs / "pretrained_method"
    report_methods = [f"medsem_deid={method}"]
    grids = [("grid_this_run.png", method)] if p["pretrained"] else [("grid.png", method)]
    if p["pretrained"]:
        report_methods.append(f"medsem_deid_pretrained={pretrained_method}")
        grids.insert(0, ("grid.png", pretrained_method))
    report_args = [f"--config.originals.root={data}", f"--config.medical.classifier={runs / 'medclass'}",
                   f"--config.identity.models.arcface_r18.weights={eval_backbone}", "--config.identity.faces=recorded",
                   "--config.identity.pairs=originals"]
    if p["report_images"]:
        report_args.append(f"--config.max_images={p['report_images']}")
    return [
        *([Stage("classifier", _trainer(p["classifier"][0], runs / "classifier", data, *p["classifier"][1]),
                 runs / "classifier" / "metrics.csv")] if p["classifier"] else []),
        Stage("unet", _trainer(p["unet"][0], runs / "unet", data, *p["unet"][1]), unet_model),
        Stage("identity", _trainer(p["identity"][0], runs / "identity", data, *p["identity"][1]), backbone),
        Stage("eval_identity", _trainer(p["eval_identity"][0], runs / "eval_identity", data, *p["eval_identity"][1]),
              eval_backbone),
        Stage("deid", _trainer(p["deid"][0], runs / "deid", data, f"--config.medical_encoder.source={unet_model}",
                               f"--config.identity.weights={backbone}", *p["deid"][1]), deid_model),
        Stage("deidentify", python("deid_jax.deidentify", "deidentify", "--aligned", f"--model={deid_model}", f"--in={data}",
                                   "--split=val", f"--out={method}", f"--passphrase-env={PASSPHRASE_ENV}"),
              method / "features"),
        *_cli_stages("recover", deid_model, data, method, deidentified=False),
        *(_cli_stages("pretrained", PRETRAINED_MODEL, data, pretrained_method) if p["pretrained"] else ()),
        Stage("medclass", python("eval.medical.classification", "train", f"--data={data}", "--backbone=resnet18",
                                 f"--out={runs / 'medclass'}", *p["medclass"]), runs / "medclass" / "classifier"),
        Stage("report", python("eval.report", f"--config=configs/eval_mema.py:{','.join(report_methods)}",
                               f"--out={runs / 'report'}", *report_args), runs / "report" / "tables.md"),
        *(Stage("grid", python("launch.pipeline", "grid", f"--data={data}", f"--method={folder}", f"--out={runs / name}"),
                runs / name) for name, folder in grids),
    ]


def _cli_stages(name: str, model: Path, data: str, method: Path, deidentified: bool = True) -> list[Stage]:
    """The CLI on the validation split: de-identify (unless done), recover, and decrypt with a wrong password."""
    stages = [Stage(name, python("deid_jax.deidentify", "recover", f"--model={model}", f"--in={method}",
                                 f"--passphrase-env={PASSPHRASE_ENV}"), method / "recovered"),
              Stage(name, python("deid_jax.deidentify", "recover", f"--model={model}", f"--in={method}",
                                 f"--out={method / 'wrong'}", f"--passphrase-env={PASSPHRASE_ENV}",
                                 "--decryptor-passphrase-env=MEMA_WRONG_PASSPHRASE"), method / "wrong")]
    if deidentified:
        stages.insert(0, Stage(name, python("deid_jax.deidentify", "deidentify", "--aligned", f"--model={model}",
                                            f"--in={data}", "--split=val", f"--out={method}",
                                            f"--passphrase-env={PASSPHRASE_ENV}"), method / "features"))
    return stages


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
    pretrained = PRESETS[args.preset]["pretrained"]
    for what, path in (("tables", runs / "report" / "tables.md"),
                       ("grid" + (" (the shipped model)" if pretrained else ""), runs / "grid.png"),
                       ("grid (this run's model)", runs / "grid_this_run.png"),
                       ("de-identified", runs / "method" / "deid"), ("recovered", runs / "method" / "recovered"),
                       ("de-identifier", runs / "deid" / "model"),
                       ("the shipped model's de-identified / recovered", runs / "pretrained_method")):
        if path.exists():
            print(f"  {what}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
