r"""The MeMa sampler (paper, Step 2): a MeMa-layout folder of virtual patients from a fine-tuned
diffusion model, real-guided rich conditions and IP-Adapter injection of public faces.

  python -m launch.main --config=configs/mema_sample.py:synth --workdir=runs/mema/injected
  python -m mema_jax.sampling.sampler regenerate --folder=runs/mema/injected --image-id=000123 --out=x.png

The output folder (the workdir) holds ``images/<image_id>.png``, ``labels.csv`` (the MeMa layout:
the drawn disease and severity; age and gender of the injected reference, empty for a direct
sample), ``generation.csv`` (per image: prompt, seed, IP-Adapter scale, reference, microbatch,
sampler settings, model fingerprint), ``run.json`` (the settings that fix the plan) and
``summary.json`` (counts, reference fallbacks, the real statistics followed, time).

Determinism: image ``i``'s conditions and noise come from ``(seed, i)`` alone (conditions.py).
Images are computed in microbatches of ``sample.microbatch`` consecutive indices, one microbatch per
device per call (``microbatch_images`` under shard_map): XLA's float results depend on a kernel's
batch size (measured here: ~2e-6 between batch 1 and 8 on CPU), never on the other rows' values,
so with the microbatch fixed an image is the same bits on 1 or 8 devices, in an uninterrupted run
or a resumed one, and when regenerated alone.  One limit, measured: XLA:CPU compiles differently
for a process with 8 host devices than for one with 1 (--xla_force_host_platform_device_count),
<= 2 grey levels on 0.2% of pixels; bits are equal for the same process device count.  A rerun
skips every microbatch whose images all exist and redoes the rest (a kill can leave part of one);
tables are rebuilt from the plan, so there are no gaps and no duplicates.  Every file
is written atomically; only process 0 writes.
"""
from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mema_jax.core import sharding
from mema_jax.core.compile import jit
from mema_jax.data import captions, layout
from mema_jax.errors import InputError
from mema_jax.fileio import atomic_write_bytes, write_png
from mema_jax.schedulers.guidance import uses_guidance
from mema_jax.sampling.conditions import (
    PlannedImage,
    PlanOptions,
    PublicFaces,
    RealStatistics,
    SamplingInputError,
    draw_plan,
    fallback_counts,
    plan_records,
)

GENERATION_FILE = "generation.csv"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
GENERATION_COLUMNS = ("image_id", "index", "microbatch", "prompt", "negative_prompt", "seed", "ip_scale", "reference",
                      "disease", "severity", "drawn_age", "drawn_gender", "reference_age", "reference_gender",
                      "fallback", "steps", "guidance", "scheduler", "height", "width", "model_fingerprint")
PIPELINE_PARTS = ("unet", "text_encoder", "tokenizer", "scheduler")


# ----------------------------------------------------------------------------- models


def fingerprint(paths: Sequence[str | os.PathLike]) -> str:
    """sha256 (first 16 hex digits) over every file under ``paths`` (names and contents): any change of
    weights, configs or tokenizer changes it."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(file.relative_to(path if path.is_dir() else path.parent).as_posix().encode() + b"\0")
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def check_model_folder(folder) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise SamplingInputError(f"{folder}: the model folder does not exist")
    missing = [p for p in PIPELINE_PARTS if not (folder / p).is_dir()]
    if missing:
        raise SamplingInputError(f"{folder}: not a diffusion model folder (a diffusers pipeline folder, e.g. the "
                                 f"diffusion trainer's <workdir>/model); missing {missing}")
    if not (folder / "unet" / "config.json").is_file():
        raise SamplingInputError(f"{folder / 'unet' / 'config.json'}: missing; not a diffusers UNet folder")
    try:
        json.loads((folder / "unet" / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise SamplingInputError(f"{folder / 'unet' / 'config.json'}: not valid JSON ({e})") from None
    return folder


class Sampler:
    """The loaded models: the pipeline (LoRA merged, IP-Adapter attached) and the CLIP image encoder."""

    def __init__(self, config):
        from mema_jax.models import ip_adapter, lora
        from mema_jax.models.convert_clip import load_clip_vision
        from mema_jax.pipelines.text_to_image import StableDiffusionPipeline

        m = config.model
        folder = check_model_folder(m.folder)
        dtype = jnp.dtype(config.precision.compute_dtype)
        try:
            self.pipe = StableDiffusionPipeline.from_folder(folder, dtype=dtype)
        except (ValueError, KeyError, OSError) as e:
            raise SamplingInputError(f"{folder}: cannot be loaded as a diffusion model ({type(e).__name__}: {e})") from None
        parts = [folder]
        if m.lora:
            tree, scales = lora.load_lora(m.lora, self.pipe.unet_params, self.pipe.unet.config)
            self.pipe.unet_params = lora.merge(self.pipe.unet_params, tree, {k: v * m.lora_scale for k, v in scales.items()})
            parts.append(m.lora)
        self.inject = bool(config.sample.inject)
        self.image_encoder = self.image_encoder_params = None
        if self.inject:
            if not m.ip_adapter or not m.image_encoder:
                raise SamplingInputError("face injection (sample.inject) needs model.ip_adapter (an ip-adapter_sd15 "
                                         "file) and model.image_encoder (its CLIP vision folder)")
            for path in (m.ip_adapter, m.image_encoder):
                if not Path(path).exists():
                    raise SamplingInputError(f"{path}: does not exist")
            adapter, _, tokens = ip_adapter.load_adapter(m.ip_adapter, self.pipe.unet)
            self.pipe.ip_adapter, self.pipe.ip_num_tokens = adapter, tokens
            self.image_encoder, self.image_encoder_params = load_clip_vision(m.image_encoder, dtype=dtype)
            parts += [m.ip_adapter, m.image_encoder]
        self.fingerprint = fingerprint(parts)
        self.config = config
        self._embeds: dict[str, np.ndarray] = {}
        self._fns: dict = {}

    def reference_embedding(self, path: Path) -> np.ndarray:
        """The CLIP image embedding of a reference face, resized to the model's resolution first (as
        training images were); computed once per face at batch 1, so it does not depend on batching."""
        from mema_jax.models.clip import clip_pixels

        key = str(path)
        if key not in self._embeds:
            size = self.config.sample.image_size
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 127.5 - 1.0
            enc = self.image_encoder
            out = _embed(enc, self.image_encoder_params, clip_pixels(jnp.asarray(image[None]), enc.config.image_size))
            self._embeds[key] = np.asarray(out[0])
        return self._embeds[key]

    def generate(self, items: Sequence[PlannedImage], public_folder: Path | None, mesh=None) -> np.ndarray:
        """uint8 images (len(items), H, W, 3); with ``mesh``, microbatch k runs on device k."""
        from mema_jax.models.convert_clip import tokenize

        s, pipe = self.config.sample, self.pipe
        factor = pipe.vae_scale_factor
        shape = (s.image_size // factor, s.image_size // factor, pipe.unet.config.in_channels)
        latents = np.stack([np.asarray(jax.random.normal(jax.random.PRNGKey(p.seed), shape, jnp.float32)) for p in items])
        max_length = pipe.text_encoder.config.max_position_embeddings
        ids = tokenize(pipe.tokenizer, [prompt_of(p, self.config) for p in items], max_length=max_length)
        negative = tokenize(pipe.tokenizer, [s.negative_prompt] * len(items), max_length=max_length)
        embeds = scales = None
        if self.inject:
            embeds = np.stack([self.reference_embedding(public_folder / p.reference) for p in items])
            scales = np.asarray([p.ip_scale for p in items], np.float32)
        params = {"unet": pipe.unet_params, "text": pipe.text_encoder_params, "vae": pipe.vae_params,
                  "ip": pipe.ip_adapter if self.inject else None}
        state = pipe.scheduler_state(s.scheduler, s.steps)
        fn = self._generate_fn(mesh)
        decoded = fn(params, jnp.asarray(ids), jnp.asarray(negative), jnp.asarray(latents), jnp.float32(s.guidance),
                     state, None if embeds is None else jnp.asarray(embeds), None if scales is None else jnp.asarray(scales))
        images = np.clip(np.asarray(decoded, np.float32) / 2 + 0.5, 0.0, 1.0)
        return (images * 255).round().astype(np.uint8)

    def _generate_fn(self, mesh):
        key = None if mesh is None else id(mesh)
        if key not in self._fns:
            from jax.sharding import PartitionSpec as P

            pipe = self.pipe
            core = functools.partial(microbatch_images, pipe.unet, pipe.text_encoder, pipe.vae,
                                     uses_guidance(self.config.sample.guidance), pipe.ip_num_tokens)
            if mesh is not None:
                batch = P(sharding.MESH_AXES[0])
                specs = (P(), batch, batch, batch, P(), P(), batch if self.inject else None, batch if self.inject else None)
                core = jax.shard_map(core, mesh=mesh, in_specs=specs, out_specs=batch, check_vma=False)
            self._fns[key] = jit(core)
        return self._fns[key]


def microbatch_images(unet, text_encoder, vae, use_guidance: bool, num_tokens: int, params, ids, negative_ids,
                      latents, guidance_scale, state, image_embeds=None, ip_scales=None):
    """The whole sampling of a batch (text encoding, IP-Adapter tokens, denoising, decoding) as one
    traceable function of arrays, run as is on one device or per device under shard_map, so a
    device computes its microbatch with the same kernels as a single-device run."""
    from mema_jax.models import ip_adapter
    from mema_jax.pipelines.text_to_image import denoising_loop

    context = text_encoder.apply({"params": params["text"]}, ids).last_hidden_state
    if use_guidance:
        uncond = text_encoder.apply({"params": params["text"]}, negative_ids).last_hidden_state
        context = jnp.concatenate([uncond, context])
    model, unet_params, tokens, scales = unet, params["unet"], None, None
    if image_embeds is not None:
        cross = unet.config.cross_attention_dim[0]
        tokens, scales = ip_adapter.image_tokens(params["ip"], image_embeds, num_tokens, cross), ip_scales
        if use_guidance:  # the negative half sees a zero embedding, as in diffusers
            negative = ip_adapter.image_tokens(params["ip"], jnp.zeros_like(image_embeds), num_tokens, cross)
            tokens, scales = jnp.concatenate([negative, tokens]), jnp.concatenate([scales, scales])
        model, unet_params = ip_adapter.ip_unet(unet), ip_adapter.unet_params(params["unet"], params["ip"])
    latents = denoising_loop(model, unet_params, latents, context, guidance_scale, state, tokens, scales,
                              use_guidance=use_guidance)
    if vae is None:
        return latents
    return vae.apply({"params": params["vae"]}, latents / vae.scaling_factor, method="decode")


@functools.partial(jit, static_argnames=("module",))
def _embed(module, params, pixels):
    return module.apply({"params": params}, pixels).image_embeds


def prompt_of(p: PlannedImage, config) -> str:
    words = dict(captions.DISEASE_WORDS)
    words.update(config.sample.get("disease_words", {}) or {})
    return captions.caption(p.disease, p.severity or None, words=words)


# ----------------------------------------------------------------------------- the run


def plan_options(config) -> PlanOptions:
    s = config.sample
    return PlanOptions(mode=s.mode, seed=int(config.seed), severity=bool(s.severity), inject=bool(s.inject),
                       ip_scale_range=tuple(float(v) for v in s.ip_scale_range), age_band=int(s.age_band),
                       random_age_range=tuple(int(v) for v in s.random_age_range),
                       split_weights=tuple(float(v) for v in s.split_weights))


def make_plan(config) -> tuple[list[PlannedImage], RealStatistics | None, PublicFaces | None]:
    s = config.sample
    stats = RealStatistics.from_folder(config.real.root, config.real.split) if s.mode == "real" else None
    faces = PublicFaces.read(config.public_faces.folder, config.public_faces.metadata) if s.inject else None
    return draw_plan(int(s.num_images), plan_options(config), stats, faces), stats, faces


def microbatches(plan: Sequence[PlannedImage], size: int) -> list[list[PlannedImage]]:
    if size < 1:
        raise ValueError("sample.microbatch must be >= 1")
    return [list(plan[k:k + size]) for k in range(0, len(plan), size)]


def padded(batch: Sequence[PlannedImage], size: int) -> list[PlannedImage]:
    """A short (last) microbatch padded with copies of its last image: the kernel batch stays ``size``."""
    return list(batch) + [batch[-1]] * (size - len(batch))


def run_settings(config, model_fingerprint: str) -> dict:
    """What fixes the images: a rerun into the same folder must agree on all of it."""
    s = config.sample
    return {"model_fingerprint": model_fingerprint, "seed": int(config.seed), "num_images": int(s.num_images),
            "mode": s.mode, "inject": bool(s.inject), "severity": bool(s.severity),
            "ip_scale_range": [float(v) for v in s.ip_scale_range], "age_band": int(s.age_band),
            "random_age_range": [int(v) for v in s.random_age_range], "microbatch": int(s.microbatch),
            "steps": int(s.steps), "guidance": float(s.guidance), "scheduler": s.scheduler,
            "image_size": int(s.image_size), "negative_prompt": s.negative_prompt,
            "compute_dtype": config.precision.compute_dtype,
            "real": {"root": str(config.real.root), "split": config.real.split},
            "public_faces": {"folder": str(config.public_faces.folder), "metadata": str(config.public_faces.metadata)},
            "model": {k: str(config.model[k]) for k in ("folder", "lora", "lora_scale", "ip_adapter", "image_encoder")}}


def _check_output(out: Path, config) -> None:
    for name, path in (("real set", config.real.root), ("public-face folder", config.public_faces.folder),
                       ("model folder", config.model.folder)):
        if path and out.resolve() == Path(path).resolve():
            raise SamplingInputError(f"{out}: the output folder is the {name}; inputs are never written to")


def _check_resume(out: Path, settings: dict) -> None:
    path = out / RUN_FILE
    if not path.exists():
        return
    have = json.loads(path.read_text()).get("settings", {})
    diff = {k: (have.get(k), v) for k, v in settings.items() if have.get(k) != v}
    if diff:
        raise SamplingInputError(f"{path}: this folder holds a sampling run with other settings (have, asked): "
                                 f"{diff}; choose another --workdir")


def generation_rows(plan: Sequence[PlannedImage], config, model_fingerprint: str) -> list[dict]:
    s, m = config.sample, int(config.sample.microbatch)
    return [{"image_id": p.image_id, "index": p.index, "microbatch": p.index // m, "prompt": prompt_of(p, config),
             "negative_prompt": s.negative_prompt, "seed": p.seed, "ip_scale": repr(p.ip_scale),
             "reference": p.reference, "disease": p.disease, "severity": p.severity, "drawn_age": p.drawn_age,
             "drawn_gender": p.drawn_gender, "reference_age": "" if p.reference_age is None else p.reference_age,
             "reference_gender": p.reference_gender, "fallback": p.fallback, "steps": int(s.steps),
             "guidance": repr(float(s.guidance)), "scheduler": s.scheduler, "height": int(s.image_size),
             "width": int(s.image_size), "model_fingerprint": model_fingerprint} for p in plan]


def write_tables(out: Path, plan: Sequence[PlannedImage], config, model_fingerprint: str) -> None:
    layout.write_labels(out, plan_records(plan))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, GENERATION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(generation_rows(plan, config, model_fingerprint))
    atomic_write_bytes(out / GENERATION_FILE, buf.getvalue().encode())


def _done(out: Path, batch: Sequence[PlannedImage]) -> bool:
    return all((out / "images" / f"{p.image_id}.png").is_file() for p in batch)


def sample(config, workdir) -> dict:
    """Samples ``config.sample.num_images`` images into ``workdir`` (resuming what is there)."""
    from tqdm import tqdm

    out = Path(workdir)
    _check_output(out, config)
    plan, stats, faces = make_plan(config)
    wanted = int(config.mesh.data)  # > 0: sample on that many devices (the rest idle); -1: all
    mesh = sharding.make_mesh(dict(config.mesh), devices=jax.devices()[:wanted] if wanted > 0 else None)
    devices = int(mesh.shape["data"])
    if mesh.shape["fsdp"] * mesh.shape["tensor"] != 1:
        raise ValueError("the sampler shards the batch only: set mesh.fsdp = mesh.tensor = 1")
    sampler = Sampler(config)
    settings = run_settings(config, sampler.fingerprint)
    _check_resume(out, settings)
    writer = jax.process_index() == 0
    if writer:
        (out / "images").mkdir(parents=True, exist_ok=True)
        run = {"settings": settings, "config": json.loads(config.to_json_best_effort())}
        atomic_write_bytes(out / RUN_FILE, (json.dumps(run, indent=2) + "\n").encode())
    size = int(config.sample.microbatch)
    batches = microbatches(plan, size)
    pending = [b for b in batches if not _done(out, b)]
    already = len(plan) - sum(len(b) for b in pending)
    t0, computed = time.time(), 0
    public = faces.folder if faces is not None else None
    with tqdm(total=len(plan), initial=already, desc=f"sampling {out}", unit="img", disable=not writer) as bar:
        for g in range(0, len(pending), devices):
            group = pending[g:g + devices]
            group = group + [group[-1]] * (devices - len(group))  # idle devices repeat a microbatch
            items = [p for b in group for p in padded(b, size)]
            images = sampler.generate(items, public, mesh if devices > 1 else None)
            for k, b in enumerate(pending[g:g + devices]):
                for j, p in enumerate(b):
                    if writer:
                        write_png(out / "images" / f"{p.image_id}.png", images[k * size + j])
                computed += len(b)
                bar.update(len(b))
    elapsed = time.time() - t0
    summary = {"images": len(plan), "computed_now": computed, "already_there": already,
               "seconds_now": round(elapsed, 1),
               "images_per_second_now": round(computed / elapsed, 3) if computed and elapsed > 0 else None,
               "devices": devices, "microbatch": size, "mode": config.sample.mode, "inject": bool(config.sample.inject),
               "model_fingerprint": sampler.fingerprint,
               "reference_fallbacks": fallback_counts(plan) if config.sample.inject else None,
               "real_statistics": stats.summary() if stats is not None else None,
               "public_faces": {"folder": str(faces.folder), "metadata": str(faces.metadata), "faces": len(faces.faces)}
               if faces is not None else None}
    if writer:
        write_tables(out, plan, config, sampler.fingerprint)
        atomic_write_bytes(out / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
        fb = summary["reference_fallbacks"]
        print(f"sampler: {len(plan)} images in {out} ({computed} computed now in {elapsed:.0f} s, {already} there)"
              + (f"; references: {fb['exact']} in the drawn age band and gender, {fb['nearest_band']} from the "
                 f"nearest band, {fb['other_gender']} of the other gender" if fb else ""), flush=True)
    return summary


def train_and_evaluate(config, workdir):
    """launch.main's entry point (nothing is trained: the sampler samples)."""
    return sample(config, workdir)


# ----------------------------------------------------------------------------- regeneration


def read_generation(folder) -> list[dict]:
    path = Path(folder) / GENERATION_FILE
    if not path.is_file():
        raise SamplingInputError(f"{path}: missing; not a folder written by the MeMa sampler")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def regenerate(folder, image_id: str, *, config=None) -> np.ndarray:
    """Image ``image_id`` of a sampled folder, computed again from generation.csv alone (with the
    model paths of its run.json): its microbatch is rebuilt and run, on one device."""
    import ml_collections

    folder = Path(folder)
    rows = read_generation(folder)
    row = next((r for r in rows if r["image_id"] == image_id), None)
    if row is None:
        raise SamplingInputError(f"{folder / GENERATION_FILE}: no image {image_id!r}")
    if config is None:
        run_file = folder / RUN_FILE
        if not run_file.is_file():
            raise SamplingInputError(f"{run_file}: missing; it names the model files the images came from")
        config = ml_collections.ConfigDict(json.loads(run_file.read_text())["config"])
    sampler = Sampler(config)
    if sampler.fingerprint != row["model_fingerprint"]:
        raise SamplingInputError(f"{folder / GENERATION_FILE}: {image_id} was sampled with model "
                                 f"{row['model_fingerprint']}, the model files now give {sampler.fingerprint}")
    batch = [r for r in rows if r["microbatch"] == row["microbatch"]]
    items = padded([_planned(r) for r in batch], int(config.sample.microbatch))
    images = sampler.generate(items, Path(config.public_faces.folder))
    return images[[r["image_id"] for r in batch].index(image_id)]


def _planned(r: dict) -> PlannedImage:
    return PlannedImage(int(r["index"]), r["image_id"], int(r["seed"]), r["disease"], r["severity"],
                        int(r["drawn_age"]), r["drawn_gender"], "", float(r["ip_scale"]), r["reference"],
                        int(r["reference_age"]) if r["reference_age"] else None, r["reference_gender"], r["fallback"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mema_jax.sampling.sampler",
                                     description="Regenerate one image of a sampled MeMa folder from its generation.csv.")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("regenerate")
    r.add_argument("--folder", required=True)
    r.add_argument("--image-id", required=True)
    r.add_argument("--out", required=True, help="PNG path (must not exist)")
    args = parser.parse_args(argv)
    try:
        if Path(args.out).exists():
            raise SamplingInputError(f"{args.out}: exists; outputs are never overwritten")
        image = regenerate(args.folder, args.image_id)
        write_png(args.out, image)
        same = np.array_equal(image, np.asarray(Image.open(Path(args.folder) / "images" / f"{args.image_id}.png")))
        print(f"{args.out}: regenerated {args.image_id}; {'bit-identical to' if same else 'DIFFERS from'} the folder's")
        return 0 if same else 4
    except InputError as e:
        print(f"mema_jax.sampling.sampler: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
