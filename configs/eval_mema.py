r"""The paper's evaluation on a MeMa-layout validation split: every table, reference rows included.

Methods come from the argument, comma-separated ``name=method_folder`` (layout in eval/inputs.py);
a folder with a ``recovered/`` sub-folder is scored as reversible (Tab. 8).

Run:
  python -m eval.report --config=configs/eval_mema.py:ours=runs/deid/val --out=runs/eval_mema \
      --config.originals.root=data/mema \
      --config.identity.models.facenet_vggface2.weights=weights/20180402-114759-vggface2.pt \
      --config.identity.models.facenet_casia.weights=weights/20180408-102900-casia-webface.pt \
      --config.identity.models.sphereface.weights=weights/sphere20a_20171020.pth \
      --config.gaze.weights=weights/L2CSNet_gaze360.pkl \
      --config.reconstruction.lpips_backbone=weights/alexnet-owt-7be5be79.pth \
      --config.medical.classifier=runs/dinov2_mema
Without an argument only the reference rows are scored. Identity models: the paper's four and an arcface_r18 slot
for an evaluation-only ArcFace of your own (left out unless its weights are set). Every weight left empty is left out of the
tables with a note. Not measured on the real MeMa here (the dataset is not available on this machine).
"""
from pathlib import Path

from configs.eval_base import DEFAULT_STRENGTHS, base_config, identity_model, method, reference

PAPER_IDENTITY_MODELS = ("facenet_vggface2", "facenet_casia", "sphereface", "dlib")
# An ArcFace slot for an evaluation-only model of the user's (offline: configs/identity.py:synth trained
# with another seed than the de-identifier's loss ArcFace), scored at the recorded faces like the others.
EXTRA_IDENTITY_MODELS = ("arcface_r18",)


def _parse_methods(arg: str) -> dict[str, str]:
    methods = {}
    for item in filter(None, (part.strip() for part in arg.split(","))):
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"configs/eval_mema.py argument {item!r}: expected name=method_folder")
        methods[name] = folder
    return methods


def get_config(arg=None):
    c = base_config()
    c.originals.root = "data/mema"
    c.originals.split = "val"
    for name, folder in _parse_methods(arg or "").items():
        c.methods[name] = method(folder, reversible=(Path(folder) / "recovered").is_dir())
    for name, strength in DEFAULT_STRENGTHS.items():
        c.reference_methods[name] = reference(name, strength)
    for name in PAPER_IDENTITY_MODELS + EXTRA_IDENTITY_MODELS:
        c.identity.models[name] = identity_model()
    return c
