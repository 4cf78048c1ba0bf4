r"""De-identify a folder of face photos with a trained MedSem-DeID, and recover it with the passphrase.

    python -m deid_jax.deidentify deidentify --model runs/medsem_deid/model --in PHOTOS --out METHOD
    python -m deid_jax.deidentify deidentify --method blur_keep_eyes --in PHOTOS --out METHOD
    python -m deid_jax.deidentify deidentify --aligned --model runs/medsem_deid/model --in MEMA_ROOT --out METHOD
    python -m deid_jax.deidentify recover --model runs/medsem_deid/model --in METHOD [--out FOLDER]

Whole photographs and DICOM files (the default): every face is found, aligned to the model's
training crop, de-identified, warped back and blended into the photo at its own resolution; the
photo path, its outputs and failures are ``photos.folder``'s (``--method`` a reference
de-identifier needs no model and no passphrase; ``--boxes`` gives the faces by hand).  With
``--aligned`` each input is a crop aligned as the model's training images (a MeMa folder) and goes
through the model whole, as described below.

The passphrase is asked for at a prompt (not echoed), or read from ``--passphrase-env VAR`` or
``--passphrase-file FILE``; it is never taken from the command line (where ``ps`` and the shell
history would show it) and never written anywhere.  What is written:

    METHOD/deid/<name>.png        the de-identified image, at the original's size, no metadata
    METHOD/features/<name>.sealed the encrypted features f_enc (models that recover from features,
                                  the paper's path), sealed with AES-256-GCM under a key from the
                                  passphrase (deid_jax/payload.py); ``recover_from=image`` models need
                                  only the PNG
    METHOD/password.json          the salt and scrypt cost the passphrase is stretched with (public)
    METHOD/recovered/<name>.png   ``recover``'s output (or under ``--out``)
    METHOD/failures.csv           the inputs that could not be processed, with the reason

``<name>`` is each image's path below the input folder (``images/`` of a MeMa root), so METHOD is
the method-folder layout ``eval.report`` scores.  ``--opaque-names --name-map FILE`` writes outputs
under random names instead and the original -> opaque map to FILE (keep it apart from the images);
the failures, which name originals, then go to FILE's stem + ``.failures.csv``, not into METHOD.

A wrong passphrase, a modified features file or one moved onto another image's name does not
open: ``recover`` lists it in failures.csv, and stops with one error when no file of the folder
opens (the passphrase is wrong).  (The networks' own answer to a wrong password, another face, is
measured by the trainer's evaluation: ``eval/psnr_wrong``, ``eval/id_cos_wrong``.)

Inputs are only read.  Each output is written atomically; a rerun skips outputs that exist (a
killed run finishes where it stopped).  A bad input (unreadable, grayscale or RGBA unless
``--convert-color``, another size than the model's when ``--size refuse``) is listed with its
reason and the rest of the folder is still done; the exit status is then 3.  Images of another
size are resized to the model's size and the output back to the original's (``--size resize``).
Outputs carry none of the input's metadata (EXIF, XMP, IPTC, ICC profile, comments: camera
serials, GPS positions, names): they are new PNGs holding pixels only.
"""
from __future__ import annotations

import argparse
import dataclasses
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image

from deid_jax import export
from deid_jax import medical_encoder as med_lib
from deid_jax import passwords, payload
from deid_jax.export import DeidModelError  # noqa: F401  (the error a bad --model raises)
from deid_jax.model import DeidConfig, MedSemDeID
from mema_jax.core.compile import jit, use_persistent_cache
from mema_jax.errors import InputError
from mema_jax.fileio import atomic_write_bytes, csv_bytes, write_png
from photos import align, reference
from photos import folder as photo_folder

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
FAILURES_FILE = "failures.csv"
SIZE_POLICIES = ("resize", "refuse")


@dataclasses.dataclass
class Deidentifier:
    """A trained MedSem-DeID: ``deidentify(images, password)`` and ``recover(encrypted, password)``
    on batches of uint8 (B, S, S, 3) images at the model's size S, one password vector per call.
    Each instance compiles its two programs once (per input shape) and keeps them."""

    config: DeidConfig
    params: dict
    medical: med_lib.MedicalEncoder | None
    _compiled: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    face_template: np.ndarray | None = None  # the training crop's five points (photos.align), when recorded

    @classmethod
    def load(cls, folder) -> Deidentifier:
        saved = export.load(folder)
        template = None if saved.face_template is None else np.asarray(saved.face_template, np.float64)
        return cls(saved.config, saved.params, saved.medical, template)

    @property
    def size(self) -> int:
        return self.config.image_size

    @property
    def recovers_from_image(self) -> bool:
        return self.config.recover_from == "image"

    def deidentify(self, images: np.ndarray, password: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (de-identified uint8 images, encrypted features f_enc float32)."""
        x_enc, f_enc = self.deidentify_program()(*self.deidentify_args(images, password))
        return _to_uint8(x_enc), np.asarray(f_enc)

    def recover(self, encrypted: np.ndarray, password: np.ndarray) -> np.ndarray:
        """``encrypted``: the de-identified uint8 images (``recover_from=image``) or f_enc ("features")."""
        data = _to_float(encrypted) if self.recovers_from_image else jnp.asarray(encrypted, jnp.float32)
        if "recover" not in self._compiled:
            model = MedSemDeID(self.config)
            self._compiled["recover"] = jit(lambda p, e, pw: model.apply({"params": p}, e, pw, method=MedSemDeID.recover))
        return _to_uint8(self._compiled["recover"](self.params, data, _batch_password(password, len(encrypted))))

    def deidentify_function(self):
        """The pure function ``(params, med_params, x in [-1, 1], passwords) -> (x_enc, f_enc)``, not jitted."""
        model, med, uses_med = MedSemDeID(self.config), self.medical, bool(self.config.med_channels)

        def run(params, med_params, x, password):
            f_med = med.apply(med_params, x) if uses_med else None
            return model.apply({"params": params}, x, f_med, password, method=MedSemDeID.deidentify)

        return run

    def deidentify_program(self):
        """:meth:`deidentify_function` jitted (compiled once per input shape): what :meth:`deidentify` runs."""
        if "deidentify" not in self._compiled:
            self._compiled["deidentify"] = jit(self.deidentify_function())
        return self._compiled["deidentify"]

    def deidentify_args(self, images: np.ndarray, password: np.ndarray) -> tuple:
        """The arguments :meth:`deidentify` passes its program for uint8 ``images`` and one password."""
        return (self.params, self.medical.params if self.medical else None, _to_float(images),
                _batch_password(password, len(images)))


@dataclasses.dataclass
class MedSemFaces:
    """MedSem-DeID as a ``photos.folder.FaceMethod``: each aligned face crop at the model's size is
    de-identified; what recovery needs (f_enc, or the de-identified crop for ``recover_from=image``
    models) is sealed per photo with the face warps under the passphrase's key."""

    model: Deidentifier
    secret: passwords.Secrets
    template: np.ndarray
    decryptor_vector: np.ndarray | None = None  # recover with another password (the wrong-password demo)
    batch_size: int = 16
    name: str = "medsem_deid"
    reversible: bool = True

    def crop_size(self, face) -> int:
        return self.model.size

    def _batched(self, arrays, run):
        outs = []
        for i in range(0, len(arrays), self.batch_size):
            chunk = list(arrays[i:i + self.batch_size])
            outs.extend(run(_pad(chunk, self.batch_size))[:len(chunk)])
        return outs

    def deidentify(self, crops):
        pairs = self._batched(crops, lambda b: list(zip(*self.model.deidentify(b, self.secret.vector))))
        x_enc = [np.asarray(x) for x, _ in pairs]
        return x_enc, (x_enc if self.model.recovers_from_image else [np.asarray(f) for _, f in pairs])

    def seal(self, name, arrays):
        return payload.seal_arrays(self.secret.payload_key, name, arrays)

    def unseal(self, name, blob, source):
        return payload.unseal_arrays(self.secret.payload_key, name, blob, source)

    def recover(self, payloads):
        vector = self.secret.vector if self.decryptor_vector is None else self.decryptor_vector
        return self._batched(payloads, lambda b: list(self.model.recover(b, vector)))


def _batch_password(password, n):
    return jnp.broadcast_to(jnp.asarray(password, jnp.float32)[None], (n, password.shape[-1]))


def _to_float(images):
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def _to_uint8(x) -> np.ndarray:
    return np.asarray(jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255)).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Folders.


def list_images(folder, split: str = "") -> tuple[Path, list[str]]:
    """(image folder, names): every image below ``folder`` (``images/`` of a MeMa root), by relative
    path; ``split`` keeps the images of one split of a MeMa root (its labels.csv)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    mema = (folder / "labels.csv").is_file() and (folder / "images").is_dir()
    image_dir = folder / "images" if mema else folder
    names = sorted(p.relative_to(image_dir).as_posix() for p in image_dir.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if split:
        if not mema:
            raise InputError(f"{folder}: --split needs a MeMa root (labels.csv and images/)")
        from mema_jax.data.layout import read_dataset

        records = [r for r in read_dataset(folder, verify_images=False).records if r.split == split]
        if not records:
            raise InputError(f"{folder / 'labels.csv'}: no images in split {split!r}")
        wanted = {Path(r.image).relative_to("images").as_posix() if r.image.startswith("images/") else r.image
                  for r in records}
        names = [n for n in names if n in wanted]
    return image_dir, names


def read_image(path: Path, size: int, size_policy: str, convert_color: bool) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 (size, size, 3), original (width, height)); raises ValueError with the reason."""
    try:
        with Image.open(path) as im:
            im.load()
            mode, original = im.mode, im.size
            if mode not in ("RGB",):
                if not convert_color:
                    what = {"L": "grayscale", "LA": "grayscale with alpha", "RGBA": "RGBA (has an alpha channel)",
                            "P": "palette", "I;16": "16-bit grayscale", "CMYK": "CMYK"}.get(mode, f"mode {mode}")
                    raise ValueError(f"{what}, not RGB; pass --convert-color to convert it")
                im = im.convert("RGB")
            if original != (size, size):
                if size_policy == "refuse":
                    raise ValueError(f"size {original[0]}x{original[1]}, the model takes {size}x{size} "
                                     "(--size resize to resize)")
                im = im.resize((size, size), Image.BICUBIC)
            return np.asarray(im, np.uint8), original
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a broken file
        raise ValueError(f"unreadable image ({type(e).__name__}: {e})") from None


def _resized(image: np.ndarray, original: tuple[int, int]) -> np.ndarray:
    if image.shape[1::-1] == original:
        return image
    return np.asarray(Image.fromarray(image).resize(original, Image.BICUBIC))


def _write_failures(path: Path, failures: dict[str, str]) -> None:
    atomic_write_bytes(path, csv_bytes(["name", "reason"], sorted(failures.items())))


def _check_apart(inputs: Path, out: Path) -> None:
    inputs, out = inputs.resolve(), out.resolve()
    if out == inputs or inputs in out.parents or out in inputs.parents:
        raise InputError(f"{out}: the output folder must be outside the input folder {inputs} (inputs are never written)")


def _progress(groups, desc):
    """Yields the batches, with a progress bar counting images."""
    from tqdm import tqdm

    with tqdm(total=sum(len(g) for g in groups), desc=desc, unit="img", file=sys.stderr) as bar:
        for group in groups:
            yield group
            bar.update(len(group))


def _batches(names, batch_size):
    for i in range(0, len(names), batch_size):
        yield names[i:i + batch_size]


def _pad(images: list[np.ndarray], batch: int) -> np.ndarray:
    out = np.zeros((batch,) + images[0].shape, images[0].dtype)
    out[: len(images)] = images
    return out


def deidentify_folder(model: Deidentifier, inputs, out, passphrase: str, *, batch_size: int = 16,
                      split: str = "", size_policy: str = "resize", convert_color: bool = False, name_map: str | None = None,
                      key_params: passwords.KeyParams | None = None) -> dict:
    """De-identifies every image below ``inputs`` into ``out`` (see the module docstring).
    Returns {"done": [...names], "skipped": [...], "failures": {name: reason}, "out": Path}."""
    if size_policy not in SIZE_POLICIES:
        raise ValueError(f"size policy {size_policy!r}; choose one of {SIZE_POLICIES}")
    image_dir, names = list_images(inputs, split)
    out = Path(out)
    _check_apart(image_dir, out)
    if not names:
        raise InputError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    out.mkdir(parents=True, exist_ok=True)
    if (out / passwords.PARAMS_FILE).is_file():  # a rerun keeps the folder's salt
        key_params = passwords.KeyParams.load(out)
    key_params = key_params or passwords.KeyParams.new()
    key_params.save(out)
    secret = passwords.derive(passphrase, key_params)
    opaque = photo_folder.load_name_map(name_map) if name_map else None
    result = {"done": [], "skipped": [], "failures": {}, "out": out}

    def target(name: str, assign: bool = True) -> str | None:
        if opaque is None:
            return str(Path(name).with_suffix(".png"))
        if name not in opaque and assign:  # only images that are written get a name in the map
            opaque[name] = f"{secrets.token_hex(8)}.png"
        return opaque.get(name)

    todo = []
    for name in names:
        t = target(name, assign=False)
        if t is None:
            todo.append(name)
            continue
        deid, feats = out / "deid" / t, _features_file(out, t)
        if deid.exists() and (model.recovers_from_image or feats.exists()):
            result["skipped"].append(name)
        else:
            todo.append(name)
    for group in _progress(list(_batches(todo, batch_size)), "de-identifying"):
        images, originals, ok = [], [], []
        for name in group:
            try:
                image, original = read_image(image_dir / name, model.size, size_policy, convert_color)
            except ValueError as e:
                result["failures"][name] = str(e)
                continue
            images.append(image)
            originals.append(original)
            ok.append(name)
        if not ok:
            continue
        x_enc, f_enc = model.deidentify(_pad(images, batch_size), secret.vector)
        for i, name in enumerate(ok):
            t = target(name)
            if not model.recovers_from_image:
                atomic_write_bytes(_features_file(out, t), payload.seal(secret.payload_key, t, f_enc[i]))
            write_png(out / "deid" / t, _resized(x_enc[i], originals[i]))
            result["done"].append(name)
        if opaque is not None:
            photo_folder.save_name_map(name_map, opaque)
    if result["failures"]:  # with opaque names the list names originals, so it goes beside the name map
        result["failures_file"] = (Path(name_map).with_suffix(".failures.csv") if opaque is not None
                                   else out / FAILURES_FILE)
        _write_failures(result["failures_file"], result["failures"])
    return result


def recover_folder(model: Deidentifier, method_dir, passphrase: str, *, out=None, batch_size: int = 16,
                   decryptor_passphrase: str | None = None) -> dict:
    """Recovers ``method_dir/deid`` (with its features, for feature-path models) into
    ``out`` (default ``method_dir/recovered``), with the passphrase and the folder's password.json.
    ``decryptor_passphrase``: open the features with ``passphrase`` but give the ID-Decryptor the
    password of this other one (the paper's wrong-password output, for demonstrations).
    Outputs that exist are skipped.  Returns {"done", "skipped", "failures", "out"} as deidentify_folder."""
    method_dir = Path(method_dir)
    key_params = passwords.KeyParams.load(method_dir)
    secret = passwords.derive(passphrase, key_params)
    vector = secret.vector if decryptor_passphrase is None else passwords.password_vector(decryptor_passphrase,
                                                                                           key_params)
    deid_dir = method_dir / "deid"
    if not deid_dir.is_dir():
        raise InputError(f"{deid_dir}: missing; recover reads the de-identified images of a method folder")
    _, names = list_images(deid_dir)
    out = Path(out) if out is not None else method_dir / "recovered"
    result = {"done": [], "skipped": [n for n in names if (out / n).exists()], "failures": {}, "out": out}
    todo = [n for n in names if not (out / n).exists()]  # a rerun finishes what a killed one left
    for group in _progress(list(_batches(todo, batch_size)), "recovering"):
        encrypted, sizes, ok = [], [], []
        for name in group:
            try:
                image, original = read_image(deid_dir / name, model.size, "resize", convert_color=False)
                if model.recovers_from_image:
                    encrypted.append(image)
                else:
                    feats = _features_file(method_dir, name)
                    if not feats.is_file():
                        raise ValueError(f"no encrypted features {feats} (this model recovers from features)")
                    encrypted.append(payload.unseal(secret.payload_key, name, feats.read_bytes(), str(feats)))
            except (ValueError, payload.PayloadError) as e:
                result["failures"][name] = str(e)
                continue
            sizes.append(original)
            ok.append(name)
        if not ok:
            continue
        recovered = model.recover(_pad(encrypted, batch_size), vector)
        for i, name in enumerate(ok):
            write_png(out / name, _resized(recovered[i], sizes[i]))
            result["done"].append(name)
    if todo and not result["done"] and not model.recovers_from_image and all(
            "does not open with this passphrase" in r for r in result["failures"].values()):
        raise payload.PayloadError(f"{method_dir / 'features'}: no file opens with this passphrase: it is not "
                                   "the one the folder was de-identified with (nothing was written)")
    if result["failures"]:
        result["failures_file"] = out / FAILURES_FILE
        _write_failures(result["failures_file"], result["failures"])
    return result


def _features_file(method_dir: Path, name: str) -> Path:
    return method_dir / "features" / Path(name).with_suffix(payload.SUFFIX)


# ----------------------------------------------------------------------------------------------
# Command line.


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deid_jax.deidentify", allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("deidentify", "recover"):
        p = sub.add_parser(name, allow_abbrev=False)
        p.add_argument("--model", help="a MedSem-DeID model folder (<trainer workdir>/model); not needed with a "
                       "reference --method")
        p.add_argument("--in", dest="inputs", required=True,
                       help="photos to de-identify" if name == "deidentify" else "the method folder deidentify wrote")
        p.add_argument("--out", required=name == "deidentify", help="the method folder to write" if name ==
                       "deidentify" else "where the recovered images go (default: <in>/recovered)")
        p.add_argument("--passphrase-env", help="read the passphrase from this environment variable")
        p.add_argument("--passphrase-file", help="read the passphrase from the first line of this file")
        p.add_argument("--passphrase", help=argparse.SUPPRESS)  # refused with a message that does not echo it
        p.add_argument("--batch", type=int, default=16)
        if name == "recover":
            p.add_argument("--decryptor-passphrase-env", help="open the features with the passphrase but run the "
                           "ID-Decryptor with this variable's passphrase: the paper's wrong-password output (a demo)")
        if name == "deidentify":
            p.add_argument("--method", choices=("medsem_deid", *reference.METHODS), default="medsem_deid",
                           help="MedSem-DeID (needs --model and a passphrase) or a reference de-identifier")
            p.add_argument("--strength", type=float, help="a reference method's strength (photos.reference)")
            p.add_argument("--aligned", action="store_true", help="the inputs are crops already aligned as the "
                           "model's training images (a MeMa folder): each whole image goes through the model")
            p.add_argument("--boxes", help="CSV name,left,top,right,bottom: the faces, given by hand (no detection)")
            p.add_argument("--template", default="", help="'head' (photos.align.HEAD_TEMPLATE) for a model folder that "
                           "records no face template")
            p.add_argument("--max-upscale", type=float, default=photo_folder.MAX_UPSCALE,
                           help="a face whose crop would enlarge it more than this is too small for the model")
            p.add_argument("--size", choices=SIZE_POLICIES, default="resize",
                           help="an image of another size than the model's: resize it (and the output back), or refuse it")
            p.add_argument("--split", default="", help="of a MeMa root, only this split (e.g. val)")
            p.add_argument("--convert-color", action="store_true", help="convert grayscale/RGBA/palette images to RGB")
            p.add_argument("--opaque-names", action="store_true", help="write outputs under random names ...")
            p.add_argument("--name-map", help="... and the original -> opaque name map to this CSV (required with it)")
    args = parser.parse_args(argv)
    use_persistent_cache()
    try:
        if args.passphrase is not None:
            raise InputError("the passphrase is never taken from the command line (ps and the shell history show "
                             "it); type it at the prompt, or use --passphrase-env VAR or --passphrase-file FILE")
        if getattr(args, "opaque_names", False) and not args.name_map:
            raise InputError("--opaque-names needs --name-map FILE (where the original names are kept)")
        if args.command == "deidentify" and not args.aligned:
            return _photos_main(args)
        if args.command == "recover" and (Path(args.inputs) / PHOTOS_FILE).is_file():
            return _photos_main(args)
        if args.model is None:
            raise InputError("--model is needed (a MedSem-DeID model folder)")
        model = Deidentifier.load(args.model)
        passphrase = passwords.read_passphrase(env=args.passphrase_env, file=args.passphrase_file,
                                               confirm=args.command == "deidentify" and not (
                                                   args.passphrase_env or args.passphrase_file))
        if args.command == "deidentify":
            result = deidentify_folder(model, args.inputs, args.out, passphrase, batch_size=args.batch,
                                       split=args.split, size_policy=args.size, convert_color=args.convert_color,
                                       name_map=args.name_map if args.opaque_names else None)
            what = f"de-identified {len(result['done'])} images into {result['out'] / 'deid'}"
            if not model.recovers_from_image:
                what += f" (with their encrypted features in {result['out'] / 'features'}, needed to recover them)"
        else:
            other = None
            if args.decryptor_passphrase_env:
                other = passwords.read_passphrase(env=args.decryptor_passphrase_env)
            result = recover_folder(model, args.inputs, passphrase, out=args.out, batch_size=args.batch,
                                    decryptor_passphrase=other)
            what = f"recovered {len(result['done'])} images into {result['out']}"
        return _report(result, what, "inputs failed")
    except (InputError, FileExistsError) as e:
        print(f"deid_jax.deidentify: {e}", file=sys.stderr)
        return 2


PHOTOS_FILE = "photos.json"


def _photos_main(args) -> int:
    """Whole photos (photos.folder): detect -> align -> de-identify -> paste back, or recover."""
    import json

    from mema_jax.fileio import atomic_write_bytes as write

    if args.command == "deidentify":
        method_name = args.method
        aligned_only = [flag for flag, used in (("--split", args.split), ("--size", args.size != "resize"),
                                                ("--convert-color", args.convert_color)) if used]
        if aligned_only:
            raise InputError(f"{', '.join(aligned_only)}: only with --aligned (whole photos are read at their own size "
                             "and colour, and written under their own names)")
    else:
        method_name = json.loads((Path(args.inputs) / PHOTOS_FILE).read_text())["method"]
    if method_name in reference.METHODS:
        if args.command == "recover":
            raise InputError(f"{args.inputs}: made with {method_name}, which is not reversible: nothing to recover")
        method = photo_folder.ReferenceMethod(method_name, args.strength)
    else:
        if args.model is None:
            raise InputError("--model is needed for --method medsem_deid (or choose a reference --method)")
        model = Deidentifier.load(args.model)
        template = model.face_template
        if getattr(args, "template", "") == "head":
            template = align.HEAD_TEMPLATE
        if template is None:
            raise InputError(f"{args.model}: the model folder records no face template (its training data had no "
                             "faces.csv); pass --template head to align faces to MeMa's head crop, or --aligned")
        if args.command == "deidentify":
            out = Path(args.out)
            key_params = passwords.KeyParams.load(out) if (out / passwords.PARAMS_FILE).is_file() else passwords.KeyParams.new()
            passphrase = passwords.read_passphrase(env=args.passphrase_env, file=args.passphrase_file,
                                                   confirm=not (args.passphrase_env or args.passphrase_file))
            out.mkdir(parents=True, exist_ok=True)
            key_params.save(out)
        else:
            key_params = passwords.KeyParams.load(Path(args.inputs))
            passphrase = passwords.read_passphrase(env=args.passphrase_env, file=args.passphrase_file)
        secret = passwords.derive(passphrase, key_params)
        other = None
        if args.command == "recover" and args.decryptor_passphrase_env:
            other = passwords.password_vector(passwords.read_passphrase(env=args.decryptor_passphrase_env), key_params)
        method = MedSemFaces(model, secret, np.asarray(template), other, batch_size=args.batch)
    if args.command == "deidentify":
        header = None
        boxes = photo_folder.read_boxes(args.boxes) if args.boxes else None
        out = Path(args.out)
        try:
            from photos import dicom

            header_deidentifier = dicom.HeaderDeidentifier()
            header = lambda ds: header_deidentifier.deidentify(ds, faces_cleaned=True)  # noqa: E731
        except ImportError:
            pass  # DICOM inputs then fail with a clear error (pip install 'mema-jax[photos]')
        out.mkdir(parents=True, exist_ok=True)
        write(out / PHOTOS_FILE, (json.dumps({"method": method.name}) + "\n").encode())
        result = photo_folder.deidentify_photos(method, args.inputs, out, boxes=boxes, header=header,
                                                max_upscale=args.max_upscale,
                                                name_map=args.name_map if args.opaque_names else None)
        what = (f"{result['files']} files: de-identified {result['faces']} faces in {len(result['done'])} photos "
                f"into {out / 'deid'}")
    else:
        result = photo_folder.recover_photos(method, args.inputs, out=args.out)
        what = f"recovered {result['faces']} faces in {len(result['done'])} photos into {result['out']}"
    return _report(result, what, "files with failures")


def _report(result: dict, what: str, failed: str) -> int:
    """Prints the summary and the failures list; the exit status: 3 when anything failed, else 0."""
    skipped = result.get("skipped", [])
    print(what + (f"; {len(skipped)} already done" if skipped else ""), flush=True)
    if not result["failures"]:
        return 0
    print(f"{len(result['failures'])} {failed} (listed in {result['failures_file']}):", file=sys.stderr)
    for name, reason in sorted(result["failures"].items()):
        print(f"  {name}: {reason}", file=sys.stderr)
    return 3


if __name__ == "__main__":
    raise SystemExit(main())
