r"""Tab. 8 and Tab. 9 of the paper, offline on MeMa-Synth: MedSem-DeID and its ablations M1-M4, and
both recovery paths, trained on the same schedule and scored by the eval bridge.

  python benchmarks/deid_tables.py [--runs runs/deid_tables] [--steps 300] [--batch 8] [--lr 1e-3] [--classifier DIR]

Needs the quickstart's medical-encoder UNet, ArcFace and Med-Class classifier (``make quickstart``,
or ``python -m launch.pipeline --only unet,identity,medclass``); reads them from --pipeline.
Variants (configs/medsem_deid.py modifiers): full, m1 (healthy faces only, no f_med, no L_med),
m2 (no f_med, no L_med), m3 (f_med, no L_med), m4 (L_med, no f_med), recover_image (the PNG alone
recovers).  Each is trained, de-identifies and recovers the validation split through the CLI, and
one ``eval.report`` run scores them all (ID-Dis with dlib at the recorded faces, Med-Class,
recovery PSNR).  Every stage is cached as in launch.pipeline.  Writes <runs>/report/tables.md.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from launch import stages as stages_lib
from launch.stages import Stage, python

VARIANTS = ("full", "m1", "m2", "m3", "m4", "recover_image")
DATA = "data/mema_synth_64_3k"


def stages(args) -> list[Stage]:
    runs, pipeline = Path(args.runs), Path(args.pipeline)
    out = []
    methods = []
    for variant in VARIANTS:
        workdir, method = runs / variant, runs / variant / "method"
        config = "configs/medsem_deid.py:synth" + ("" if variant == "full" else f",{variant}")
        train = python("launch.main", f"--config={config}", f"--workdir={workdir}", f"--config.data.root={DATA}",
                       f"--config.medical_encoder.source={pipeline / 'unet' / 'model'}",
                       f"--config.identity.weights={pipeline / 'identity' / 'backbone.pth'}",
                       f"--config.total_steps={args.steps}", f"--config.batch_size={args.batch}",
                       f"--config.optim.lr={args.lr}", f"--config.eval_every={args.steps}",
                       f"--config.checkpoint_every={args.steps}")
        out.append(Stage(f"train {variant}", train, workdir / "model"))
        out.append(Stage(f"deidentify {variant}", python("deid_jax.deidentify", "deidentify", "--aligned", f"--model={workdir / 'model'}",
                                                         f"--in={DATA}", "--split=val", f"--out={method}",
                                                         "--passphrase-env=MEMA_PASSPHRASE"), method / "deid"))
        out.append(Stage(f"recover {variant}", python("deid_jax.deidentify", "recover", f"--model={workdir / 'model'}",
                                                      f"--in={method}", "--passphrase-env=MEMA_PASSPHRASE"),
                         method / "recovered"))
        methods.append(f"{variant}={method}")
    out.append(Stage("report", python("eval.report", f"--config=configs/eval_mema.py:{','.join(methods)}",
                                      f"--out={runs / 'report'}", f"--config.originals.root={DATA}",
                                      f"--config.medical.classifier={args.classifier or pipeline / 'medclass'}",
                                      *([f"--config.identity.models.arcface_r18.weights={args.identity_eval}"]
                                        if Path(args.identity_eval).is_file() else [])),
                     runs / "report" / "tables.md"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/deid_tables")
    parser.add_argument("--pipeline", default="runs/pipeline", help="the quickstart's runs folder")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="generator learning rate (short schedules)")
    parser.add_argument("--identity-eval", default="runs/deid_attacks/identity_eval/backbone.pth",
                        help="an evaluation-only ArcFace (benchmarks/deid_attacks.py trains one), used when it exists")
    parser.add_argument("--classifier", default="", help="the Med-Class classifier (default: the quickstart's)")
    args = parser.parse_args()
    env = dict(os.environ)
    env.setdefault("MEMA_PASSPHRASE", "mema-jax benchmark passphrase")
    if not stages_lib.run(stages(args), env):
        return 1
    print(f"tables: {Path(args.runs) / 'report' / 'tables.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
