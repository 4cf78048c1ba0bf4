"""The suite's Markdown report: the table (JAX and PyTorch side by side), the header that says
where and how it was measured, and the notes."""
from __future__ import annotations

import datetime
import math
import platform
import time


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def fmt(x, digits=2):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def sig(x, digits=3):
    """``digits`` significant digits (tiny quick-size rates stay non-zero)."""
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def markdown(rows, header_lines, peaks, cross, notes) -> str:
    lines = list(header_lines)
    lines += ["", "| workload | size | JAX ms | PyTorch ms | JAX/PyTorch | JAX img/s | PyTorch img/s | "
              "TFLOP/s (JAX / PyTorch) | MFU (JAX / PyTorch) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        spec = row["spec"]
        if "error" in row:
            lines.append(f"| {spec.name} | {spec.label} | error | error | - | - | - | - | - |")
            continue
        j, t = row["jax"]["median"], row["torch"]["median"]
        flops, peak = row.get("flops", float("nan")), peaks[spec.name][0]
        tj, tt = flops / j / 1e12, flops / t / 1e12
        lines.append(f"| {spec.name} | {spec.label} | {fmt(j * 1e3, 1)} | {fmt(t * 1e3, 1)} | {fmt(j / t)} | "
                     f"{fmt(spec.batch / j)} | {fmt(spec.batch / t)} | {sig(tj)} / {sig(tt)} | "
                     f"{sig(100 * tj / peak)}% / {sig(100 * tt / peak)}% |")
    lines += ["", "Per workload: FLOPs per step (used for both frameworks' TFLOP/s), the peak MFU is taken against, "
              "first call (build + compile + run) and parameter counts (asserted equal, ours vs PyTorch):", "",
              "| workload | GFLOP/step | FLOP source | peak TFLOP/s | JAX first s | PyTorch first s | parameters |",
              "|---|---|---|---|---|---|---|"]
    for row in rows:
        spec = row["spec"]
        if "error" in row:
            lines.append(f"| {spec.name} | - | - | - | - | - | {row['error']} |")
            continue
        counts = ", ".join(f"{k} {v:,}" for k, v in row["jax"]["counts"].items())
        lines.append(f"| {spec.name} | {fmt(row.get('flops', float('nan')) / 1e9, 3)} | {row.get('flops_source', '-')} | "
                     f"{fmt(peaks[spec.name][0], 3)} | {fmt(row['jax']['first'], 1)} | {fmt(row['torch']['first'], 1)} | "
                     f"{counts} |")
    if cross:
        lines += ["", "FLOP cross-check, UNet forward (analytic: conv + dense + attention matmuls from the config, "
                  "2 per multiply-add, padded taps excluded; XLA: cost analysis, which also counts elementwise ops; "
                  "the table uses XLA's):", ""]
        for c in cross:
            lines.append(f"- {c['label']}: analytic {c['analytic'] / 1e9:.3f} GFLOP, XLA {c['xla'] / 1e9:.3f} GFLOP "
                         f"({c['source']}), analytic/XLA = {c['ratio']:.4f}")
    lines += [""] + notes
    return "\n".join(lines) + "\n"


def header_lines(args, info, threads, device, gpu_name, backend, device_kind, v, start, load_start, load, compile_,
                 ctx, peak_lines) -> list[str]:
    gpu = device == "cuda"
    header = [f"# Benchmark suite: JAX (ours) vs PyTorch, profile `{args.profile}`{' (quick sizes)' if args.quick else ''}", "",
              f"- machine: {info['model']}, {info['cores_total']} cores ({threads} used by each framework, pinned), "
              f"{device}{' ' + gpu_name if gpu else ''}; JAX backend {backend} ({device_kind})",
              "- versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + f"; python {platform.python_version()}",
              f"- run: {datetime.datetime.now().isoformat(timespec='seconds')}, {time.time() - start:.0f} s; load average "
              f"{load_start:.1f} at the start, {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end",
              f"- settings: torch.compile for {', '.join(compile_) or 'none'}; JAX attention {ctx.attention}; "
              f"PyTorch SDPA attention; same batch, shapes and precision per row",
              "- peak: " + "; ".join(peak_lines),
              "- ms: median step time over the repeats after warm-up; img/s: batch / median; TFLOP/s: XLA's FLOPs of "
              "our step / median (the same FLOP count for both frameworks); MFU: TFLOP/s / peak; JAX/PyTorch < 1: ours faster"]
    if not gpu and max(load_start, load[1]) > 1.5 * (info["cores_total"] or 1):
        header.append(f"- **contended**: load average {max(load_start, load[1]):.1f} on {info['cores_total']} cores "
                      "(other processes): these figures are not a quiet-machine measurement; PyTorch's OpenMP "
                      "spin-waits suffer most (benchmarks/bench_unet.py), try --threads 1")
    return header


def note_lines(rows, threads) -> list[str]:
    notes = ["Notes:",
             "- unet_lora_train / unet_full_train: AdamW (lr, betas from configs/mema_lora.py:paper; weight decay 1e-2, "
             "clip 1.0) on the LoRA weights only / on every weight; LoRA on to_q, to_k, to_v, to_out.0.",
             "- deid_train: one generator update and one discriminator update (deid_jax/train.py); the PyTorch twin is "
             "benchmarks/torch_medsem_deid.py.  deidentify: Deidentifier.deidentify (uint8 I/O) vs the twin's forward.",
             f"- threads: sched_setaffinity to {threads} core(s) before jax/torch load (XLA:CPU sizes its pool from "
             "the mask), torch.set_num_threads; other processes on the machine share the cores."]
    for row in rows:
        for fw in ("jax", "torch"):
            if fw in row and row[fw].get("note"):
                notes.append(f"- {row['spec'].name} ({fw}): {row[fw]['note']}")
    return notes
