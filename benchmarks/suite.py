r"""The benchmark suite vs PyTorch: one command, one table.

    python benchmarks/suite.py --profile cpu                 # 2-core CPU sizes, fp32 (minutes)
    python benchmarks/suite.py --profile gpu                 # one H100/H200: SD1.5 at 512 px, bf16
    python benchmarks/suite.py --profile gpu --dry-run       # the workloads and shapes, nothing run
    python benchmarks/suite.py --profile cpu --quick         # tiny sizes (the test runs this)
    python benchmarks/suite.py --profile cpu --only deid_train

Workloads (each measured for JAX and PyTorch one after the other, in one process, on the same
device, at the same precision, batch and shapes):

  unet_lora_train  SD1.5-topology UNet LoRA step: DDPM noise at random t, epsilon MSE, backward to
                   the LoRA weights only, AdamW (+ global-norm clip 1.0).  Ours: mema_jax.models.lora
                   (LoRA merged into the frozen base inside the loss) through mema_jax.core's
                   make_train_step, as benchmarks/bench_lora.py; PyTorch: diffusers
                   UNet2DConditionModel + peft LoraConfig(r, alpha, target to_q/to_k/to_v/to_out.0),
                   torch.optim.AdamW on the LoRA parameters only.  Rank/alpha from configs/mema_lora.py.
  unet_full_train  the same step training every UNet weight (fp32 master weights; bf16 compute in bf16).
  unet_forward     one sampling forward (no gradients) of the UNet.
  vae_encode       SD1.5's VAE encoder (posterior mode): ours mema_jax.models.vae vs diffusers AutoencoderKL.
  deid_train       one MedSem-DeID training step as deid_jax/train.py builds it (make_parts' generator and
                   discriminator losses, two Adam optimizers, ts.make_train_step: generator update, then
                   the discriminator against the updated generator), vs the PyTorch twin of
                   benchmarks/torch_medsem_deid.py (same networks, parameter counts asserted equal, same
                   loss terms: ArcFace-like IResNet identity terms on landmark-aligned crops, L_rev L1,
                   L_sep, L_med L2 through Enc_med, non-saturating GAN; same Adam settings).
  deidentify       the de-identify path of deid_jax/deidentify.py (``Deidentifier.deidentify``: uint8 in,
                   Enc_med + encoder + ID-Encryptor + decoder, uint8 and f_enc out) at 512 px with the
                   paper's architecture (configs/medsem_deid.py:paper, SD1.5 VAE + first UNet block as
                   Enc_med), vs the twin's forward with the same I/O.

Timing: ``warmup`` untimed calls after the first (JAX: lower + compile + run; PyTorch: first run,
torch.compile's compilation when on), then the median of ``repeats`` timed calls; every JAX call
ends in block_until_ready, every CUDA call in torch.cuda.synchronize (bench_unet.timed).  The JAX
step is the AOT-compiled executable of the function (``jit(...).lower(...).compile()``), so its
cost analysis is that of the program timed.

FLOPs per step: XLA's cost analysis of our program, used for BOTH frameworks' TFLOP/s (the same
work; PyTorch's own FLOP count is not used).  On CPU: ``compile().cost_analysis()['flops']`` of the
timed executable, except where our CPU program does less work than the model as written (MedSem-DeID's
x2-upsample convolutions, folded into 2x2 ones: ``mema_jax.models.layers.conv``): there the count
is that of the same step traced with every convolution as written, the work PyTorch does, and the
program's own count is printed beside it.  On GPU the optimised module hides GEMMs and convolutions in custom calls that
the cost analysis does not count (jax-ml/jax#22249, #16008) and cuDNN attention is a custom call
too, so there the count is ``lower().cost_analysis()`` (pre-optimisation HLO) of the same step built
with XLA attention.  XLA counts 2 per multiply-add, only the taps that land inside the padded
input, and 1 per elementwise op.  The UNet forward is also counted analytically from its config
(conv / dense / attention matmuls only); both and their ratio are printed once.
MFU = achieved FLOP/s / peak; the peak (``--peak-tflops``, or the default table: H100/H200 SXM dense
bf16 989.4, tf32 494.7, fp32 66.9 TFLOP/s; A100 312 / 156 / 19.5; CPU = cores used x GHz x FLOP per
cycle per core of the SIMD width, AVX-512 FMA 64 fp32 (2 x 16 lanes x 2), AVX2 FMA 32, or, where
higher, the best fp32 2048^3 GEMM of XLA and PyTorch measured on the same cores at the start of
the run: a VM's /proc/cpuinfo gives its base clock, and a GEMM here reaches 216 GFLOP/s on one
core against the 166 of 2.6 GHz x 64) is printed with its formula.

Threads: both frameworks get the same cores.  The process pins itself to ``--threads`` cores with
sched_setaffinity (what ``taskset -c 0-(N-1)`` does) before jax or torch is imported: XLA:CPU sizes
its intra-op (Eigen) thread pool from the affinity mask (XLA_FLAGS has no thread-count flag; the
suite leaves ``--xla_cpu_multi_thread_eigen`` at its default, true), and torch gets
torch.set_num_threads(N) / OMP_NUM_THREADS=N.  torch.set_flush_denormal(True) on CPU (XLA:CPU
flushes denormals).  GPU: fp32 matmuls/convs in TF32 on both (JAX's default precision on GPU;
torch.backends.{cuda.matmul,cudnn}.allow_tf32 = True), XLA_PYTHON_CLIENT_PREALLOCATE=false so the
two share the device memory, torch.compile (default mode; every workload but deid_train, whose twin
calls each network in several gradient modes and batch sizes, 9 graphs: ``--torch-compile on``
compiles it too) and SDPA attention (diffusers' default AttnProcessor2_0), channels_last for the
UNet/VAE, fused AdamW/Adam, cudnn.benchmark; ours with cuDNN attention (attention_impl="dot_product")
in the UNet/VAE (the DeID networks have XLA attention only).  ``--profile gpu --device cpu --quick``
runs the gpu profile's code paths (bf16, channels_last, torch.compile with ``--torch-compile on``,
the lowered FLOP count) at tiny sizes on a machine without a GPU.  The gpu profile itself has not
been run yet (written without a GPU at hand): most of its time is compilation (XLA, inductor), and
its batch sizes are a guess at what fits in 80 GB; ``--only`` runs one workload.

``--quick``: tiny sizes as a smoke test (tests/test_bench_suite.py), compiled with
``--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true`` and the FLOP
cross-check from the pre-optimisation HLO, so its numbers are not measurements.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from workloads.common import (  # noqa: E402  (re-exported: tests and benchmarks/profile_ops.py use them)
    COMPILED_BY_DEFAULT, QUICK_UNET, QUICK_VAE, SD15_VAE, Ctx, Spec, _cost, unet_forward_flops)
from workloads.deid import (  # noqa: E402
    _deid_cfg, deid_parameter_counts, deid_setup, jax_deid_train, jax_deidentify, torch_deid_train, torch_deidentify)
from workloads.report import header_lines, markdown, note_lines, sig, versions  # noqa: E402
from workloads.machine import cpu_info, cpu_peak, cpu_peak_measured, gpu_peak, pin_threads  # noqa: E402
from workloads.unet import (  # noqa: E402
    jax_unet_forward, jax_unet_train, jax_vae_encode, lora_rank, torch_unet_forward, torch_unet_train, torch_vae_encode)

WORKLOADS = ("unet_lora_train", "unet_full_train", "unet_forward", "vae_encode", "deid_train", "deidentify")

QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The small UNet forward: 1 - tolerance <= analytic / XLA <= 1.  The analytic count is the matmuls only
# (conv, dense, attention); XLA also counts every elementwise op (GroupNorm, SiLU, softmax, bias and residual
# adds), 15 % of the small UNet (measured 0.848) and less at SD1.5 widths.  A single conv or dense layer
# agrees exactly (tests/test_bench_suite.py).
FLOP_CHECK_TOLERANCE = 0.20


# ----------------------------------------------------------------------------------------------
# Profiles.


def profile_specs(profile: str, quick: bool) -> list[Spec]:
    from bench_unet import SD15_CONFIG, SMALL_CONFIG

    rank, alpha = lora_rank()
    if quick:  # the profile's precisions at tiny sizes
        lora = dict(config=QUICK_UNET, rank=4, alpha=4.0, describe="quick UNet (one level, 16), LoRA r4")
        unet = dict(config=QUICK_UNET, describe="quick UNet (one level, 16)")
        p = "bf16" if profile == "gpu" else "fp32"
        return [
            Spec("unet_lora_train", 1, 8, p, f"quick UNet b1 8x8 r4 {p}", lora, 1, 2),
            Spec("unet_full_train", 1, 8, p, f"quick UNet b1 8x8 {p}", unet, 1, 2),
            Spec("unet_forward", 1, 8, p, f"quick UNet b1 8x8 {p}", unet, 1, 2),
            Spec("vae_encode", 1, 32, p, f"quick VAE b1 32px {p}", dict(config=QUICK_VAE), 1, 2),
            Spec("deid_train", 2, 32, "fp32", "DeID :tiny b2 32px", dict(variant="tiny"), 1, 2),
            Spec("deidentify", 1, 32, "fp32", "DeID :tiny b1 32px", dict(variant="tiny"), 1, 2),
        ]
    if profile == "cpu":
        return [
            Spec("unet_lora_train", 2, 16, "fp32", f"small UNet b2 16x16 r{rank}",
                 dict(config=SMALL_CONFIG, rank=rank, alpha=alpha, describe="SD1.5 topology at 1/10 width")),
            Spec("unet_lora_train", 1, 16, "fp32", f"SD1.5 UNet b1 16x16 r{rank}",
                 dict(config=SD15_CONFIG, rank=rank, alpha=alpha, describe="860M params, bench_lora's cpu-sd15"), 1, 3),
            Spec("unet_full_train", 2, 16, "fp32", "small UNet b2 16x16", dict(config=SMALL_CONFIG)),
            Spec("unet_forward", 1, 16, "fp32", "SD1.5 UNet b1 16x16", dict(config=SD15_CONFIG, describe="860M params")),
            Spec("vae_encode", 1, 128, "fp32", "SD1.5 VAE b1 128px", dict(config=SD15_VAE)),
            Spec("deid_train", 8, 64, "fp32", "DeID :synth b8 64px", dict(variant="synth"), 1, 3),
            Spec("deidentify", 1, 512, "fp32", "DeID :paper b1 512px", dict(variant="paper"), 0, 3),
        ]
    if profile == "gpu":
        return [
            Spec("unet_lora_train", 8, 64, "bf16", f"SD1.5 UNet b8 64x64 r{rank}", dict(config=SD15_CONFIG, rank=rank, alpha=alpha), 3, 10),
            Spec("unet_full_train", 8, 64, "bf16", "SD1.5 UNet b8 64x64", dict(config=SD15_CONFIG), 3, 10),
            Spec("unet_forward", 8, 64, "bf16", "SD1.5 UNet b8 64x64", dict(config=SD15_CONFIG), 3, 10),
            Spec("vae_encode", 8, 512, "bf16", "SD1.5 VAE b8 512px", dict(config=SD15_VAE), 3, 10),
            Spec("deid_train", 4, 512, "fp32", "DeID :paper b4 512px", dict(variant="paper"), 2, 5),
            Spec("deidentify", 8, 512, "fp32", "DeID :paper b8 512px", dict(variant="paper"), 3, 10),
        ]
    raise ValueError(f"unknown profile {profile!r}")


# ----------------------------------------------------------------------------------------------
# The builders of each workload (benchmarks/workloads/).


JAX_BUILDERS = {
    "unet_lora_train": lambda s, c: jax_unet_train(s, c, "lora"),
    "unet_full_train": lambda s, c: jax_unet_train(s, c, "full"),
    "unet_forward": jax_unet_forward,
    "vae_encode": jax_vae_encode,
    "deid_train": jax_deid_train,
    "deidentify": jax_deidentify,
}


TORCH_BUILDERS = {
    "unet_lora_train": lambda s, c: torch_unet_train(s, c, "lora"),
    "unet_full_train": lambda s, c: torch_unet_train(s, c, "full"),
    "unet_forward": torch_unet_forward,
    "vae_encode": torch_vae_encode,
    "deid_train": torch_deid_train,
    "deidentify": torch_deidentify,
}


# ----------------------------------------------------------------------------------------------
# Running.


def check_counts(name: str, ours: dict, theirs: dict) -> None:
    """The twin / diffusers model must have exactly our parameter counts (keys both report)."""
    common = sorted(set(ours) & set(theirs))
    bad = {k: (ours[k], theirs[k]) for k in common if ours[k] != theirs[k]}
    assert common, f"{name}: no parameter counts to compare ({ours}, {theirs})"
    assert not bad, f"{name}: parameter counts differ (ours, PyTorch): {bad}"


def measure(builder, spec: Spec, ctx: Ctx, warmup: int, repeats: int):
    from bench_unet import timed

    start = time.perf_counter()
    runner = builder(spec, ctx)
    runner.build_s = time.perf_counter() - start
    first, median = timed(runner.step, warmup, repeats, runner.sync)
    flops = runner.flops() if runner.flops else None
    return runner, first + runner.build_s, median, flops


def free_memory(ctx):
    gc.collect()
    if ctx.device == "cuda":
        import torch

        torch.cuda.empty_cache()


def run_workload(spec: Spec, ctx: Ctx, warmup: int, repeats: int, frameworks=("jax", "torch")) -> dict:
    row = {"spec": spec}
    print(f"\n== {spec.describe()}", flush=True)
    for fw in frameworks:
        builder = (JAX_BUILDERS if fw == "jax" else TORCH_BUILDERS)[spec.name]
        runner, first, median, flops = measure(builder, spec, ctx, warmup, repeats)
        row[fw] = {"first": first, "median": median, "counts": runner.counts, "note": runner.note}
        if flops:
            row["flops"], row["flops_source"] = flops
        print(f"   {fw:5s} first {first:7.2f} s (build + compile + run)  median {median * 1e3:9.2f} ms  "
              f"counts {runner.counts}" + (f"  flops {flops[0] / 1e9:.2f} G ({flops[1]})" if flops else ""), flush=True)
        del runner
        free_memory(ctx)
    if "jax" in row and "torch" in row:
        check_counts(spec.name, row["jax"]["counts"], row["torch"]["counts"])
    return row


def flop_cross_check(ctx: Ctx, quick: bool, forward_row: dict | None) -> list[dict]:
    """Analytic vs XLA FLOPs of the UNet forward: bench_unet's SMALL_CONFIG (b2, 16x16, fp32) always,
    and the profile's unet_forward workload (its XLA count from the timed run) when it ran (not in --quick)."""
    from bench_unet import SMALL_CONFIG

    out = []
    spec = Spec("unet_forward", 2, 16, "fp32", "small UNet b2 16x16", dict(config=SMALL_CONFIG))
    lowered_flops = _cost(jax_unet_forward(spec, ctx, lower_only=True).cost_analysis())
    if ctx.gpu:
        xla, source = lowered_flops, "XLA lowered, XLA attention"
    elif quick:  # no compile in the smoke test: the pre-optimisation count (within 0.1 % of the compiled one)
        xla, source = lowered_flops, "XLA lowered (pre-optimisation HLO)"
    else:
        xla, source = jax_unet_forward(spec, ctx).flops()
        source += f"; the pre-optimisation HLO gives {lowered_flops / 1e9:.3f} G ({lowered_flops / xla:.4f}x)"
    checks = [(spec, xla, source)]
    if forward_row is not None and not quick and "flops" in forward_row:
        checks.append((forward_row["spec"], forward_row["flops"], forward_row["flops_source"]))
    for spec, xla, source in checks:
        analytic = unet_forward_flops(spec.options["config"], spec.batch, spec.size)
        out.append({"label": spec.label, "analytic": analytic, "xla": xla, "ratio": analytic / xla, "source": source})
    free_memory(ctx)
    return out


def selected_specs(args) -> list[Spec]:
    """The profile's workloads (``--only``), with ``--warmup`` / ``--repeats`` applied."""
    specs = [s for s in profile_specs(args.profile, args.quick) if not args.only or s.name in args.only]
    for s in specs:
        s.warmup = args.warmup if args.warmup is not None else s.warmup
        s.repeats = args.repeats if args.repeats is not None else s.repeats
    return specs


def print_plan(specs, peak_lines) -> None:
    for line in peak_lines:
        print("peak: " + line)
    for s in specs:
        extra = ""
        if s.name.startswith("unet"):
            extra = f"; analytic forward {sig(unet_forward_flops(s.options['config'], s.batch, s.size) / 1e9)} GFLOP"
        print(f"  {s.describe()}{extra}")


def default_peaks(specs, peak_tflops, gpu: bool, gpu_name: str, threads: int, info: dict):
    """({workload: (peak TFLOP/s, how it was found)}, the distinct "how" lines)."""
    peaks, lines = {}, []
    for s in specs:
        precision = s.precision if not (gpu and s.precision == "fp32") else "tf32"
        if peak_tflops:
            peaks[s.name] = (peak_tflops, f"--peak-tflops {peak_tflops}")
        elif gpu:
            peaks[s.name] = gpu_peak(gpu_name, precision)
        else:
            peaks[s.name] = cpu_peak(threads, info)
        if peaks[s.name][1] not in lines:
            lines.append(peaks[s.name][1])
    return peaks, lines


def dry_run(specs) -> None:
    """The DeID configs resolve (variants, medical encoders) and the twin's parameter counts equal ours."""
    for s in specs:
        if s.name.startswith("deid"):
            setup = deid_setup(s.options["variant"], s.size)
            cfg = _deid_cfg(setup)
            ours, theirs = deid_parameter_counts(setup, cfg)
            check_counts(s.name, ours, theirs)
            print(f"  {s.name}: DeidConfig {cfg.image_size}px grid {cfg.grid}x{cfg.grid} width {cfg.width} depth "
                  f"{cfg.depth} med {cfg.med_channels}ch; ArcFace {setup['arcface']}; Enc_med UNet "
                  f"{setup['unet']['block_out_channels']} x{setup['num_down_blocks']} block(s)"
                  f"{' + SD1.5 VAE' if setup['vae'] else ''}; parameters (ours = twin, checked) {ours}")


def set_up_torch(threads: int, gpu: bool) -> None:
    import torch

    torch.set_num_threads(threads)
    if not gpu:
        torch.set_flush_denormal(True)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def run_all(specs, ctx: Ctx) -> list[dict]:
    """Every workload's row; one that fails gets an error row and does not lose the others'."""
    rows = []
    for spec in specs:
        try:
            rows.append(run_workload(spec, ctx, spec.warmup, spec.repeats))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"spec": spec, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            free_memory(ctx)
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds; the test runs this)")
    parser.add_argument("--only", action="append", choices=WORKLOADS, help="run only this workload (repeatable)")
    parser.add_argument("--out", help="Markdown output (default benchmarks/results/suite_<profile>[_quick].md)")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU (default: from the GPU table / CPU flags)")
    parser.add_argument("--threads", type=int, help="cores for both frameworks (default: all in the affinity mask)")
    parser.add_argument("--warmup", type=int, help="override every workload's warm-up calls")
    parser.add_argument("--repeats", type=int, help="override every workload's timed calls")
    parser.add_argument("--torch-compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the PyTorch models (auto: on CUDA, every workload but deid_train)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="PyTorch device (auto: cuda for the gpu profile); JAX uses its default backend")
    parser.add_argument("--no-flop-check", action="store_true", help="skip the analytic vs XLA FLOP cross-check")
    parser.add_argument("--dry-run", action="store_true", help="list workloads, shapes and peaks; build nothing")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    threads = pin_threads(args.threads)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and torch share the GPU
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not args.dry_run:
        # diffusers loads triton's LLVM; loaded after XLA had compiled a MedSem-DeID step it segfaulted
        # (--only deid_train, where the twin's medical encoder is the first diffusers import).
        import diffusers  # noqa: F401
    if args.quick:  # tiny sizes are a smoke test, not a measurement: compile fast
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + QUICK_XLA_FLAGS).strip()
    device = args.device if args.device != "auto" else ("cuda" if args.profile == "gpu" else "cpu")
    gpu = device == "cuda"
    compile_ = {"on": WORKLOADS, "off": (), "auto": COMPILED_BY_DEFAULT if gpu else ()}[args.torch_compile]
    # The gpu profile's settings (cuDNN attention for ours, channels_last, FLOPs from the lowered program)
    # also hold with --device cpu, which runs its code paths (at --quick sizes) on a machine without a GPU.
    ctx = Ctx(device=device, torch_compile=compile_, channels_last=args.profile == "gpu", gpu=args.profile == "gpu")
    specs = selected_specs(args)
    info = cpu_info()
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"suite_{args.profile}{'_quick' if args.quick else ''}.md"

    gpu_name = "-"
    if args.dry_run and gpu:
        gpu_name = "the GPU torch reports at run time"
    elif gpu:
        import torch

        gpu_name = torch.cuda.get_device_name(0)
    peaks, peak_lines = default_peaks(specs, args.peak_tflops, gpu, gpu_name, threads, info)

    print(f"profile {args.profile}{' (quick)' if args.quick else ''}: device {device} ({gpu_name}), {threads} threads "
          f"of {info['cores_total']} cores, torch.compile: {', '.join(compile_) or 'off'}", flush=True)
    print_plan(specs, peak_lines)
    if args.dry_run:
        dry_run(specs)
        return 0

    import jax

    set_up_torch(threads, gpu)
    backend = jax.default_backend()
    if gpu and backend != "gpu":
        print(f"warning: PyTorch on cuda but JAX's backend is {backend}", flush=True)
    if not gpu and not args.peak_tflops and not args.quick:
        measured = cpu_peak_measured(threads, info)
        peaks = dict.fromkeys(peaks, measured)
        peak_lines = [measured[1]]
        print("peak: " + measured[1], flush=True)

    start, load_start = time.time(), os.getloadavg()[0]
    rows = run_all(specs, ctx)
    cross = []
    if not args.no_flop_check:
        fwd = next((r for r in rows if r["spec"].name == "unet_forward" and "error" not in r), None)
        cross = flop_cross_check(ctx, args.quick, fwd)
        for c in cross:
            print(f"FLOP cross-check {c['label']}: analytic {c['analytic'] / 1e9:.3f} G, XLA {c['xla'] / 1e9:.3f} G "
                  f"({c['source']}), analytic/XLA {c['ratio']:.4f}", flush=True)

    v = versions()
    load = os.getloadavg()
    header = header_lines(args, info, threads, device, gpu_name, backend, jax.devices()[0].device_kind, v, start,
                          load_start, load, compile_, ctx, peak_lines)
    notes = note_lines(rows, threads)
    text = markdown(rows, header, peaks, cross, notes)
    print("\n" + text)
    from mema_jax.fileio import atomic_write_bytes

    atomic_write_bytes(out, text.encode())
    print(f"wrote {out}")
    failed = [r["spec"].name for r in rows if "error" in r]
    if failed:
        print(f"failed workloads: {failed}", file=sys.stderr)
        return 1
    if cross and not 1 - FLOP_CHECK_TOLERANCE <= cross[0]["ratio"] <= 1.0:
        print(f"warning: analytic/XLA FLOPs of the small UNet outside [{1 - FLOP_CHECK_TOLERANCE}, 1]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
