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
import dataclasses
import datetime
import gc
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

WORKLOADS = ("unet_lora_train", "unet_full_train", "unet_forward", "vae_encode", "deid_train", "deidentify")

# SD1.5's VAE (diffusers AutoencoderKL kwargs; = tests/tiny_models.SD15_VAE).
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512)
QUICK_VAE = dict(SD15_VAE, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)
# One level, one layer (tests/tiny_models.TINY_UNET_ONE_LEVEL): every layer kind of the SD1 UNet but the
# resamplers, compiled in seconds.
QUICK_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16,), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                  cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8)
CONTEXT_LEN = 77
# Dense peaks (TFLOP/s) by GPU name fragment and precision.
GPU_PEAKS = {"H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}, "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
             "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}}
QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The small UNet forward: 1 - tolerance <= analytic / XLA <= 1.  The analytic count is the matmuls only
# (conv, dense, attention); XLA also counts every elementwise op (GroupNorm, SiLU, softmax, bias and residual
# adds), 15 % of the small UNet (measured 0.848) and less at SD1.5 widths.  A single conv or dense layer
# agrees exactly (tests/test_bench_suite.py).
FLOP_CHECK_TOLERANCE = 0.20


# ----------------------------------------------------------------------------------------------
# Profiles.


@dataclasses.dataclass
class Spec:
    name: str
    batch: int
    size: int  # latent side (UNet), image side (VAE, DeID)
    precision: str  # fp32 | bf16 (UNet/VAE); the DeID models are fp32 (TF32 on GPU)
    label: str  # the table's size column
    options: dict = dataclasses.field(default_factory=dict)
    warmup: int = 2
    repeats: int = 5

    def describe(self) -> str:
        return f"{self.name}: {self.label}; batch {self.batch}, {self.size}x{self.size}, {self.precision}, " \
               f"warmup {self.warmup}, repeats {self.repeats}, {self.options.get('describe', '')}".rstrip(", ")


def lora_rank():
    from configs.mema_lora import get_config

    c = get_config("paper")
    return int(c.lora.rank), float(c.lora.alpha)


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
# Machine, peak, threads.


def cpu_info() -> dict:
    model, mhz, flags = platform.processor() or "unknown CPU", [], set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name":
                model = value
            elif key == "cpu MHz":
                mhz.append(float(value))
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    if "avx512f" in flags and "fma" in flags:
        simd, per_cycle = "AVX-512 FMA", 64
    elif "avx2" in flags and "fma" in flags:
        simd, per_cycle = "AVX2 FMA", 32
    else:
        simd, per_cycle = "SSE", 8
    return {"model": model, "ghz": (max(mhz) / 1000.0) if mhz else 2.0, "simd": simd, "flop_per_cycle": per_cycle,
            "cores_total": os.cpu_count()}


def cpu_peak(cores: int, info: dict) -> tuple[float, str]:
    peak = cores * info["ghz"] * info["flop_per_cycle"] / 1000.0
    return peak, (f"CPU peak = {cores} cores x {info['ghz']:.2f} GHz x {info['flop_per_cycle']} fp32 FLOP/cycle "
                  f"({info['simd']}) = {peak * 1000:.1f} GFLOP/s")


def measured_gemm_peak(size: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """(XLA, PyTorch) best fp32 GFLOP/s of one size^3 matmul on the pinned cores: what the cores
    really reach (a VM's ``cpu MHz`` is its nominal clock; turbo runs above it)."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    from mema_jax.core.compile import jit

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), np.float32) for _ in range(2))
    xa, xb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    matmul = jit(jnp.matmul)
    best = {}
    for name, fn in (("xla", lambda: matmul(xa, xb).block_until_ready()), ("torch", lambda: ta @ tb)):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        best[name] = 2 * size**3 / min(times) / 1e9
    return best["xla"], best["torch"]


def cpu_peak_measured(cores: int, info: dict) -> tuple[float, str]:
    """The larger of the nominal peak and the measured fp32 GEMM peak (TFLOP/s, with its formula)."""
    nominal, formula = cpu_peak(cores, info)
    xla, torch_ = measured_gemm_peak()
    measured = max(xla, torch_) / 1000.0
    if measured <= nominal:
        return nominal, formula + f" (measured 2048^3 fp32 GEMM: XLA {xla:.0f}, PyTorch {torch_:.0f} GFLOP/s)"
    return measured, (f"measured fp32 GEMM peak on {cores} core(s) = max(XLA {xla:.0f}, PyTorch {torch_:.0f}) = "
                      f"{measured * 1000:.0f} GFLOP/s, above the nominal {formula} (the VM reports its base "
                      "clock; the cores run faster)")


def gpu_peak(name: str, precision: str) -> tuple[float, str]:
    if name.startswith("the GPU"):  # dry run
        return GPU_PEAKS["H100"][precision], (f"{precision}: by {name} from " + ", ".join(
            f"{k} {t[precision]}" for k, t in GPU_PEAKS.items()) + " TFLOP/s (dense, SXM)")
    for key, table in GPU_PEAKS.items():
        if key in name:
            return table[precision], f"{name}: dense {precision} peak {table[precision]} TFLOP/s (table, {key} SXM)"
    table = GPU_PEAKS["H100"]
    return table[precision], f"{name}: unknown GPU, assuming H100 SXM dense {precision} {table[precision]} TFLOP/s"


def pin_threads(threads: int | None) -> int:
    """Pins the process to ``threads`` cores (before jax/torch load) and sets the OpenMP/MKL env."""
    cores = sorted(os.sched_getaffinity(0))
    n = min(threads or len(cores), len(cores))
    os.sched_setaffinity(0, cores[:n])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    return n


# ----------------------------------------------------------------------------------------------
# Analytic FLOPs of the SD1.x UNet forward (conv, dense and attention matmuls; 2 per MAC).


def _axis_taps(n: int, k: int, s: int, p: int) -> tuple[int, int]:
    """(output length, number of (output, tap) pairs that land inside the unpadded input)."""
    out = (n + 2 * p - k) // s + 1
    return out, sum(1 for o in range(out) for t in range(k) if 0 <= o * s - p + t < n)


def conv_flops(b, h, w, cin, cout, k=3, s=1, p=None):
    p = (k - 1) // 2 if p is None else p
    ho, th = _axis_taps(h, k, s, p)
    wo, tw = _axis_taps(w, k, s, p)
    return 2 * b * th * tw * cin * cout, ho, wo


def unet_forward_flops(config: dict, batch: int, size: int, context_len: int = CONTEXT_LEN) -> int:
    """The diffusers SD1.x UNet2DConditionModel forward (CrossAttn/plain down and up blocks, the
    cross-attention mid block, one transformer layer per block, GEGLU feed-forward)."""
    chans = tuple(config["block_out_channels"])
    n, layers = len(chans), int(config.get("layers_per_block", 2))
    temb, cross = 4 * chans[0], int(config["cross_attention_dim"])
    down, up = config["down_block_types"], config["up_block_types"]
    b = batch

    def dense(tokens, i, o):
        return 2 * tokens * i * o

    def resnet(h, w, cin, cout):
        f = conv_flops(b, h, w, cin, cout)[0] + dense(b, temb, cout) + conv_flops(b, h, w, cout, cout)[0]
        return f + (conv_flops(b, h, w, cin, cout, k=1)[0] if cin != cout else 0)

    def transformer(h, w, c):
        t = h * w
        tok = b * t
        f = 2 * dense(tok, c, c)  # proj_in, proj_out (1x1 convs)
        f += 4 * dense(tok, c, c) + 2 * (2 * b * t * t * c)  # self-attention: q, k, v, out; QK^T, PV
        f += 2 * dense(tok, c, c) + 2 * dense(b * context_len, cross, c) + 2 * (2 * b * t * context_len * c)  # cross
        return f + dense(tok, c, 8 * c) + dense(tok, 4 * c, c)  # GEGLU feed-forward

    h = w = size
    total = dense(b, chans[0], temb) + dense(b, temb, temb)
    total += conv_flops(b, h, w, int(config.get("in_channels", 4)), chans[0])[0]
    skips, x = [(chans[0], h, w)], chans[0]
    for i in range(n):
        for _ in range(layers):
            total += resnet(h, w, x, chans[i])
            x = chans[i]
            if down[i].startswith("CrossAttn"):
                total += transformer(h, w, x)
            skips.append((x, h, w))
        if i < n - 1:
            f, h, w = conv_flops(b, h, w, x, x, s=2)
            total += f
            skips.append((x, h, w))
    total += 2 * resnet(h, w, x, x) + transformer(h, w, x)
    for i in range(n):
        c = chans[n - 1 - i]
        for _ in range(layers + 1):
            sc, _, _ = skips.pop()
            total += resnet(h, w, x + sc, c)
            x = c
            if up[i].startswith("CrossAttn"):
                total += transformer(h, w, c)
        if i < n - 1:
            _, h, w = skips[-1]
            total += conv_flops(b, h, w, c, c)[0]
    return total + conv_flops(b, h, w, chans[0], int(config.get("out_channels", 4)))[0]


# ----------------------------------------------------------------------------------------------
# Context shared by the builders.


# torch.compile on the gpu profile by default for these; the DeID training twin stays eager by default: its
# step calls each network in several gradient modes and batch sizes (9 graphs to compile, minutes of the
# profile's 8-minute budget).  --torch-compile on compiles it too.
COMPILED_BY_DEFAULT = ("unet_lora_train", "unet_full_train", "unet_forward", "vae_encode", "deidentify")


@dataclasses.dataclass
class Ctx:
    device: str  # "cpu" | "cuda" (torch's name; JAX uses its default backend)
    torch_compile: tuple  # the workloads whose PyTorch models are torch.compile'd
    channels_last: bool
    gpu: bool

    def compiles(self, name: str) -> bool:
        return name in self.torch_compile

    @property
    def attention(self) -> str:
        return "dot_product" if self.gpu else "xla"


@dataclasses.dataclass
class Runner:
    """One framework's workload, built: ``step()`` runs one step; ``sync(result)`` waits for it."""

    step: object
    sync: object
    flops: object = None  # () -> (flops, source) for JAX
    counts: dict = dataclasses.field(default_factory=dict)
    build_s: float = 0.0
    note: str = ""


def _jax_dtype(precision):
    import jax.numpy as jnp

    return jnp.bfloat16 if precision == "bf16" else jnp.float32


def _random_like(abstract, seed=0, scale=0.02):
    """Random values of the abstract tree's shapes/dtypes (host numpy -> device), no flax init run."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(scale * rng.standard_normal(a.shape, np.float32), a.dtype), abstract)


def _fan_in_init(abstract, seed=0):
    """Variance-preserving random values for an abstract flax tree without running (or compiling) its
    init: kernels N(0, 1/fan_in), norm scales and BatchNorm variances 1, PReLU slopes 0.25, the rest 0."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)

    def leaf(path, a):
        name = str(getattr(path[-1], "key", path[-1]))
        if a.ndim >= 2:
            return jnp.asarray(rng.standard_normal(a.shape, np.float32) / np.sqrt(np.prod(a.shape[:-1])), a.dtype)
        value = {"scale": 1.0, "var": 1.0, "alpha": 0.25}.get(name, 0.0)
        return jnp.full(a.shape, value, a.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def _cost(cost) -> float:
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else float("nan")


def _jax_flops(ctx: Ctx, compiled, lower_xla_attention, lower_afresh=None):
    """(flops, source): the compiled executable's cost analysis on CPU; on GPU the pre-optimisation
    HLO of the same program with XLA attention (``lower_xla_attention()`` -> a Lowered).

    ``lower_afresh`` (a step with x2-upsample convolutions, which our CPU program folds into 2x2 ones:
    fewer FLOPs than the model as written, which is what PyTorch runs): on CPU the count is the
    pre-optimisation HLO of the step traced again with every convolution as written (lowering
    "xla"); ``lower_afresh()`` must build a new jitted function (jax caches traces per function)."""
    if not ctx.gpu:
        program = _cost(compiled.cost_analysis())
        if lower_afresh is None:
            return program, "XLA compiled"
        from mema_jax.models.layers.conv import default_conv_impl

        with default_conv_impl("xla"):
            as_written = _cost(lower_afresh().cost_analysis())
        return as_written, (f"XLA lowered, convolutions as written (the compiled program, upsampling folded: "
                            f"{program / 1e9:.1f} G)")
    return _cost(lower_xla_attention().cost_analysis()), "XLA lowered (XLA attention)"


def _count(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _mesh():
    import jax

    from mema_jax.core import sharding as shd

    return shd.make_mesh({"data": 1}, devices=jax.devices()[:1]), shd.DEFAULT_RULES


def _in_mesh(mesh, rules, fn):
    import jax
    from flax import linen as nn

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return fn()


def unet_optimizer_settings() -> dict:
    """AdamW as diffusers' train_text_to_image(_lora).py runs it (weight decay 1e-2, max_grad_norm 1.0),
    with configs/mema_lora.py:paper's lr and betas; constant learning rate."""
    from configs.mema_lora import get_config

    import ml_collections

    o = get_config("paper").optim
    return ml_collections.ConfigDict({"name": "adamw", "lr": float(o.lr), "b1": float(o.b1), "b2": float(o.b2), "eps": 1e-8,
                                      "weight_decay": 1e-2, "grad_clip": float(o.grad_clip), "schedule": "constant",
                                      "warmup_steps": 0})


# ----------------------------------------------------------------------------------------------
# JAX builders.


def jax_unet_train(spec: Spec, ctx: Ctx, mode: str) -> Runner:
    """The LoRA (``mode="lora"``) or full fine-tuning step, as benchmarks/bench_lora.py builds it
    (mema_jax.core.train_state.make_train_step; LoRA merged into the frozen base inside the loss)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from bench_lora import sd15_alphas_cumprod
    from mema_jax.core import sharding as shd
    from mema_jax.core import train_state as ts
    from mema_jax.core.optim import make_optimizer
    from mema_jax.models import lora
    from mema_jax.models.unet import UNet2DConditionModel, UNetConfig, init_params

    from mema_jax.schedulers import ddpm

    config, batch, size = spec.options["config"], spec.batch, spec.size
    dtype = _jax_dtype(spec.precision)
    # LoRA: the frozen base stored in the compute dtype (bench_lora); full: fp32 master weights.
    param_dtype = dtype if mode == "lora" else jnp.float32

    def module(attention):
        return UNet2DConditionModel(UNetConfig.from_dict(config), dtype=dtype, param_dtype=param_dtype,
                                    attention_impl=attention)

    boxed = jax.eval_shape(lambda r: init_params(module("xla"), r), jax.random.PRNGKey(0))
    mesh, rules = _mesh()
    tx = make_optimizer(unet_optimizer_settings(), 1)
    base = _random_like(nn.meta.unbox(boxed))
    scale = 1.0
    if mode == "lora":
        rank = spec.options["rank"]
        frozen, frozen_shardings = ts.place_frozen({"unet": base}, mesh, rules)
        state_spec = ts.sharded_state(lambda r: lora.init_lora(r, boxed, rank), tx, mesh, rules, seed=0)
        scale = spec.options["alpha"] / rank
    else:
        frozen, frozen_shardings = None, None
        state_spec = ts.sharded_state(lambda r, p: shd.box_like(p, boxed), tx, mesh, rules, seed=0, init_args=(base,))
    del base
    acp = jnp.asarray(sd15_alphas_cumprod())
    rng = np.random.default_rng(0)
    arrays = {"latents": jnp.asarray(rng.standard_normal((batch, size, size, config["in_channels"]), np.float32)),
              "context": jnp.asarray(rng.standard_normal((batch, CONTEXT_LEN, config["cross_attention_dim"]), np.float32), dtype)}
    batch_shardings = {k: shd.batch_sharding(mesh, rules, v.ndim, v.shape) for k, v in arrays.items()}
    state = [state_spec.init()]
    placed = {k: jax.device_put(v, batch_shardings[k]) for k, v in arrays.items()}

    def lower(attention):
        unet = module(attention)

        def loss_fn(params, frozen, b, key):
            r_noise, r_t = jax.random.split(key)
            noise = jax.random.normal(r_noise, b["latents"].shape)
            t = jax.random.randint(r_t, (batch,), 0, 1000)
            noisy = ddpm.add_noise(acp, b["latents"], noise, t)
            weights = lora.merge(frozen["unet"], params, scale) if mode == "lora" else params
            pred = unet.apply({"params": weights}, noisy, t, b["context"], train=True)
            return jnp.mean(jnp.square(pred.astype(jnp.float32) - noise)), {}

        step = ts.make_train_step(loss_fn, tx, mesh=mesh, rules=rules, state_shardings=state_spec.shardings,
                                  batch_shardings=batch_shardings, frozen_shardings=frozen_shardings, seed=0)
        return _in_mesh(mesh, rules, lambda: step.jitted.lower(state[0], placed, frozen))

    compiled = lower(ctx.attention).compile()

    def one():
        state[0], metrics = compiled(state[0], placed, frozen)
        return metrics["loss"]

    counts = {"trainable": _count(state[0].params)}
    return Runner(one, jax.block_until_ready, lambda: _jax_flops(ctx, compiled, lambda: lower("xla")), counts)


def jax_unet_forward(spec: Spec, ctx: Ctx, lower_only: bool = False):
    """One UNet forward (bench_unet's); ``lower_only``: the Lowered program (XLA attention), nothing run."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from mema_jax.core.compile import jit
    from mema_jax.models.unet import UNet2DConditionModel, UNetConfig, init_params

    config = spec.options["config"]
    dtype = _jax_dtype(spec.precision)

    def module(attention):
        return UNet2DConditionModel(UNetConfig.from_dict(config), dtype=dtype, param_dtype=dtype, attention_impl=attention)

    abstract = nn.meta.unbox(jax.eval_shape(lambda r: init_params(module("xla"), r), jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    sample = jnp.asarray(rng.standard_normal((spec.batch, spec.size, spec.size, config["in_channels"]), np.float32), dtype)
    context = jnp.asarray(rng.standard_normal((spec.batch, CONTEXT_LEN, config["cross_attention_dim"]), np.float32), dtype)
    t = jnp.arange(spec.batch) * 97 % 1000

    def lower(attention, params):
        unet = module(attention)
        return jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c)).lower(params, sample, t, context)

    if lower_only:
        return lower("xla", abstract)
    params = _random_like(abstract)
    compiled = lower(ctx.attention, params).compile()
    return Runner(lambda: compiled(params, sample, t, context), jax.block_until_ready,
                  lambda: _jax_flops(ctx, compiled, lambda: lower("xla", abstract)), {"unet": _count(params)})


def jax_vae_encode(spec: Spec, ctx: Ctx):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from mema_jax.core.compile import jit
    from mema_jax.models.vae import AutoencoderKL, VAEConfig
    from mema_jax.models.vae import init_params as vae_init

    dtype = _jax_dtype(spec.precision)

    def module(attention):
        return AutoencoderKL(VAEConfig.from_dict(spec.options["config"]), dtype=dtype, param_dtype=dtype,
                             attention_impl=attention)

    abstract = nn.meta.unbox(jax.eval_shape(lambda r: vae_init(module("xla"), r), jax.random.PRNGKey(0)))
    abstract = {k: v for k, v in abstract.items() if k in ("encoder", "quant_conv")}
    params = _random_like(abstract)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (spec.batch, spec.size, spec.size, 3)).astype(np.float32), dtype)

    def lower(attention):
        vae = module(attention)
        return jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode).mode()).lower(abstract, x)

    compiled = lower(ctx.attention).compile()
    return Runner(lambda: compiled(params, x), jax.block_until_ready, lambda: _jax_flops(ctx, compiled, lambda: lower("xla")),
                  {"encoder": _count(params)})


# --- MedSem-DeID ------------------------------------------------------------------------------


def deid_setup(variant: str, image_size: int) -> dict:
    """What the DeID workloads are built from: the trainer config (configs/medsem_deid.py:<variant>,
    remat off), its medical encoder's UNet (and VAE) config and ArcFace size."""
    from bench_unet import SD15_CONFIG
    from configs.identity import get_config as identity_config
    from configs.mema_lora import get_config as lora_config
    from configs.medsem_deid import get_config

    config = get_config(variant)
    config.data.image_size = image_size
    config.model.remat = "none"
    if variant in ("paper", "gpu"):
        unet_cfg, vae_cfg = dict(SD15_CONFIG), dict(SD15_VAE)
        arcface = {"depth": "r50", "width": 1.0, "num_features": 512}
    else:
        unet_cfg, vae_cfg = dict(lora_config(variant).model.unet.to_dict()), None  # the :synth / :tiny UNet, pixels
        m = identity_config(variant).model
        arcface = {"depth": m.depth, "width": float(m.width), "num_features": int(m.num_features)}
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
        unet_cfg[k] = tuple(unet_cfg[k])
    return {"config": config, "unet": unet_cfg, "vae": vae_cfg, "arcface": arcface,
            "num_down_blocks": int(config.medical_encoder.num_down_blocks), "timestep": int(config.medical_encoder.timestep)}


def jax_medical_encoder(setup: dict, seed: int = 1):
    """deid_jax.medical_encoder's diffusion Enc_med with random (fan-in scaled) weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from bench_lora import sd15_alphas_cumprod
    from deid_jax import medical_encoder as med_lib
    from mema_jax.models.unet import UNet2DConditionModel, UNetConfig
    from mema_jax.models.unet import init_params as unet_init
    from mema_jax.models.vae import AutoencoderKL, VAEConfig
    from mema_jax.models.vae import init_params as vae_init

    n = setup["num_down_blocks"]
    unet = UNet2DConditionModel(UNetConfig.from_dict(setup["unet"]))
    abstract = nn.meta.unbox(jax.eval_shape(lambda r: unet_init(unet, r), jax.random.key(0)))
    cross = unet.config.cross_attention_dim[0]
    params = {"unet": _fan_in_init(med_lib._kept_unet(abstract, n), seed),
              "context": jnp.asarray(np.random.default_rng(seed).standard_normal((1, CONTEXT_LEN, cross)), jnp.float32)}
    vae = None
    if setup["vae"]:
        vae = AutoencoderKL(VAEConfig.from_dict(setup["vae"]))
        abstract = nn.meta.unbox(jax.eval_shape(lambda r: vae_init(vae, r), jax.random.key(0)))
        params["vae"] = _fan_in_init({k: v for k, v in abstract.items() if k in ("encoder", "quant_conv")}, seed + 1)
    settings = {"kind": "diffusion", "num_down_blocks": n, "timestep": setup["timestep"], "unet": unet.config.to_dict(),
                "vae": None if vae is None else vae.config.to_dict(),
                "alphas_cumprod": [float(a) for a in sd15_alphas_cumprod()], "source": "benchmark", "lora": ""}
    return med_lib._build(settings, params)


def jax_identity(setup: dict, seed: int = 2):
    """(IResNet, variables): the ArcFace-like phi with random (fan-in scaled) weights, running stats 0 / 1."""
    import jax
    from flax import linen as nn

    from mema_jax.models.iresnet import IResNet, IResNetConfig, init_variables

    a = setup["arcface"]
    model = IResNet(IResNetConfig(depth=a["depth"], width=a["width"], num_features=a["num_features"]))
    return model, _fan_in_init(nn.meta.unbox(jax.eval_shape(lambda r: init_variables(model, r), jax.random.key(0))), seed)


def deid_landmarks(batch: int, size: int, seed: int = 0):
    """Five points per image: ArcFace's template scaled to the image, jittered by ~1 % of its side."""
    import numpy as np

    from torch_medsem_deid import ARCFACE_TEMPLATE_112

    rng = np.random.default_rng(seed)
    base = ARCFACE_TEMPLATE_112 * (size / 112.0)
    return (base[None] + rng.normal(0, 0.01 * size, (batch, 5, 2))).astype(np.float32)


def deid_parameter_counts(setup: dict, cfg=None) -> tuple[dict, dict]:
    """(ours, the twin's) parameter counts of every DeID network: generator, discriminator, ArcFace
    and the kept Enc_med UNet part.  Ours from abstract shapes (jax.eval_shape of the flax inits:
    nothing is computed), the twin's from the PyTorch modules."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    import torch_medsem_deid as twin
    from deid_jax import medical_encoder as med_lib
    from deid_jax.model import MedSemDeID, PatchDiscriminator
    from mema_jax.models.iresnet import IResNet, IResNetConfig, init_variables
    from mema_jax.models.unet import UNet2DConditionModel, UNetConfig
    from mema_jax.models.unet import init_params as unet_init

    cfg = cfg or _deid_cfg(setup)
    config, a = setup["config"], setup["arcface"]
    s, grid = cfg.image_size, cfg.grid
    x, p = jnp.zeros((1, s, s, 3)), jnp.zeros((1, cfg.password_dim))
    f_med = jnp.zeros((1, grid, grid, cfg.med_channels)) if cfg.med_channels else None  # Fusion resizes it anyway
    abstract = lambda f: nn.meta.unbox(jax.eval_shape(f))  # noqa: E731
    unet = UNet2DConditionModel(UNetConfig.from_dict(setup["unet"]))
    ours = {
        "generator": _count(abstract(lambda: MedSemDeID(cfg).init(jax.random.key(0), x, f_med, p, p)["params"])),
        "discriminator": _count(abstract(lambda: PatchDiscriminator(tuple(config.gan.widths), cfg.norm_groups).init(
            jax.random.key(0), x)["params"])),
        "identity": _count(abstract(lambda: init_variables(IResNet(IResNetConfig(a["depth"], a["width"], a["num_features"])),
                                                           jax.random.key(0))["params"])),
        "medical_unet": _count(med_lib._kept_unet(abstract(lambda: unet_init(unet, jax.random.key(0))),
                                                  setup["num_down_blocks"])),
    }
    import torch

    with torch.device("meta"):  # shapes only
        generator, discriminator, phi = (twin.MedSemDeID(cfg), twin.PatchDiscriminator(tuple(config.gan.widths), cfg.norm_groups),
                                         twin.IResNet(a["depth"], a["width"], a["num_features"]))
        from diffusers import UNet2DConditionModel as TorchUNet

        tunet = TorchUNet(**setup["unet"])
    theirs = twin.parameter_counts(generator, discriminator, phi)
    theirs["medical_unet"] = sum(twin.count_params(m) for m in (tunet.conv_in, tunet.time_embedding,
                                                                *tunet.down_blocks[: setup["num_down_blocks"]]))
    return ours, theirs


def jax_deid_train(spec: Spec, ctx: Ctx):
    """deid_jax/train.py's step (make_parts' losses, two Adam optimizers) with random weights."""
    import jax
    import numpy as np

    from deid_jax import train as deid_train
    from mema_jax.core import loop
    from mema_jax.core import sharding as shd
    from mema_jax.core import train_state as ts

    setup = deid_setup(spec.options["variant"], spec.size)
    config = setup["config"]
    med = jax_medical_encoder(setup)
    identity = jax_identity(setup)
    _, generator, discriminator, _, g_loss, d_loss = deid_train.make_parts(config, med, identity)
    mesh, rules = _mesh()
    frozen = {"identity": identity[1], "med": med.params}
    frozen, frozen_shardings = ts.place_frozen(frozen, mesh, rules)
    size, batch = spec.size, spec.batch

    init_params, tx, loss_fns = deid_train.parameter_groups(config, med, generator, discriminator, g_loss, d_loss, 1)
    # The trainer's init_params, traced only (eval_shape); random values enter the state init as an argument
    # (compiling the flax init of the whole generator costs more than the step's own compile at small sizes).
    boxed = jax.eval_shape(init_params, jax.random.key(0))
    params0 = _fan_in_init(shd.unbox(boxed))
    state_spec = ts.sharded_state(lambda r, p: shd.box_like(p, boxed), tx, mesh, rules, seed=0, init_args=(params0,))
    del params0
    shapes = {"image": (batch, size, size, 3), "label": (batch,), "severity": (batch,), "index": (batch,),
              "landmarks": (batch, 5, 2)}
    shardings = loop.batch_shardings(mesh, rules, shapes)
    rng = np.random.default_rng(0)
    arrays = {"image": rng.uniform(-1, 1, shapes["image"]).astype(np.float32), "label": np.zeros(batch, np.int32),
              "severity": np.zeros(batch, np.int32), "index": np.arange(batch, dtype=np.int32),
              "landmarks": deid_landmarks(batch, size)}
    placed = {k: jax.device_put(v, shardings[k]) for k, v in arrays.items()}
    step = ts.make_train_step(loss_fns, tx, mesh=mesh, rules=rules, state_shardings=state_spec.shardings,
                              batch_shardings=shardings, frozen_shardings=frozen_shardings, seed=0)
    state = [state_spec.init()]
    lowered = _in_mesh(mesh, rules, lambda: step.jitted.lower(state[0], placed, frozen))
    compiled = lowered.compile()

    def one():
        state[0], metrics = compiled(state[0], placed, frozen)
        return metrics["generator/loss"]

    counts = {"generator": _count(state[0].params["generator"]), "discriminator": _count(state[0].params.get("discriminator", {})),
              "identity": _count(identity[1]["params"]), "medical_unet": _count(med.params["unet"])}
    def lower_afresh():  # a new jitted step: a new trace, under the caller's convolution lowering
        again = ts.make_train_step(loss_fns, tx, mesh=mesh, rules=rules, state_shardings=state_spec.shardings,
                                   batch_shardings=shardings, frozen_shardings=frozen_shardings, seed=0)
        return _in_mesh(mesh, rules, lambda: again.jitted.lower(state[0], placed, frozen))

    return Runner(one, jax.block_until_ready, lambda: _jax_flops(ctx, compiled, lambda: lowered, lower_afresh), counts,
                  note=f"generator {counts['generator']:,} + discriminator {counts['discriminator']:,} trained; "
                       f"ArcFace {setup['arcface']['depth']} x{setup['arcface']['width']} and Enc_med frozen")


def jax_deidentify(spec: Spec, ctx: Ctx):
    """deid_jax.deidentify.Deidentifier.deidentify on uint8 images (the CLI's path) with random weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from deid_jax import deidentify as deid_cli
    from deid_jax import train as deid_train
    from deid_jax.model import MedSemDeID

    setup = deid_setup(spec.options["variant"], spec.size)
    med = jax_medical_encoder(setup)
    cfg = deid_train.deid_config(setup["config"], med)
    x0 = jnp.zeros((1, spec.size, spec.size, 3))
    p0 = jnp.zeros((1, cfg.password_dim))
    f0 = jnp.zeros(jax.eval_shape(med.apply, med.params, x0).shape) if cfg.med_channels else None
    from flax import linen as nn

    params = _fan_in_init(nn.meta.unbox(jax.eval_shape(lambda r: MedSemDeID(cfg).init(r, x0, f0, p0, p0)["params"],
                                                       jax.random.key(0))), 3)
    model = deid_cli.Deidentifier(cfg, params, med)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (spec.batch, spec.size, spec.size, 3), dtype=np.uint8)
    password = rng.standard_normal(cfg.password_dim).astype(np.float32)

    def flops():
        key = ("deid", cfg, med.apply)
        run = deid_cli._COMPILED[key]
        args = (params, med.params, deid_cli._to_float(images), deid_cli._batch_password(password, len(images)))
        return _jax_flops(ctx, None if ctx.gpu else run.lower(*args).compile(), lambda: run.lower(*args),
                          lambda: jax.jit(lambda *a: run.__wrapped__(*a)).lower(*args))

    return Runner(lambda: model.deidentify(images, password), lambda r: r, flops,
                  {"generator": _count(params), "medical_unet": _count(med.params["unet"])},
                  note="uint8 in and out, host<->device copies included")


JAX_BUILDERS = {
    "unet_lora_train": lambda s, c: jax_unet_train(s, c, "lora"),
    "unet_full_train": lambda s, c: jax_unet_train(s, c, "full"),
    "unet_forward": jax_unet_forward,
    "vae_encode": jax_vae_encode,
    "deid_train": jax_deid_train,
    "deidentify": jax_deidentify,
}


# ----------------------------------------------------------------------------------------------
# PyTorch builders.


def _torch_sync(ctx):
    import torch

    return (lambda _: torch.cuda.synchronize()) if ctx.device == "cuda" else (lambda _: None)


def _torch_dtype(precision):
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def _memory_format(ctx):
    import torch

    return torch.channels_last if ctx.channels_last else torch.contiguous_format


def torch_unet_train(spec: Spec, ctx: Ctx, mode: str) -> Runner:
    """diffusers UNet2DConditionModel (+ peft LoRA on to_q/to_k/to_v/to_out.0); AdamW with clipping."""
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    from bench_lora import TARGETS, sd15_alphas_cumprod

    config, batch, size, device = spec.options["config"], spec.batch, spec.size, ctx.device
    bf16 = spec.precision == "bf16"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config)
    if mode == "lora":
        from peft import LoraConfig

        unet = unet.to(device=device, dtype=_torch_dtype(spec.precision))
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=spec.options["rank"], lora_alpha=spec.options["alpha"], init_lora_weights="gaussian",
                                    target_modules=list(TARGETS)))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:  # adapter weights in fp32 under bf16 autocast (diffusers' LoRA scripts)
            p.data = p.data.float()
    else:
        unet = unet.to(device=device)  # fp32 master weights, bf16 autocast
        params = list(unet.parameters())
    unet = unet.to(memory_format=_memory_format(ctx))
    o = unet_optimizer_settings()
    opt = torch.optim.AdamW(params, lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"], weight_decay=o["weight_decay"],
                            **({"fused": True} if device == "cuda" else {}))
    rng = np.random.default_rng(0)
    latents = torch.from_numpy(rng.standard_normal((batch, config["in_channels"], size, size), np.float32)).to(device)
    latents = latents.to(memory_format=_memory_format(ctx))
    context = torch.from_numpy(rng.standard_normal((batch, CONTEXT_LEN, config["cross_attention_dim"]), np.float32)).to(device)
    if mode == "lora":
        context = context.to(_torch_dtype(spec.precision))
    acp = torch.from_numpy(sd15_alphas_cumprod()).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    unet.train()
    model = torch.compile(unet) if ctx.compiles(spec.name) else unet
    weights_dtype = _torch_dtype(spec.precision) if mode == "lora" else torch.float32

    def step():
        noise = torch.randn(latents.shape, generator=gen, device=device)
        t = torch.randint(0, 1000, (batch,), generator=gen, device=device)
        a = acp[t].view(-1, 1, 1, 1)
        noisy = (a.sqrt() * latents + (1 - a).sqrt() * noise).to(weights_dtype)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            pred = model(noisy, t, context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o["grad_clip"])
        opt.step()
        return loss

    return Runner(step, _torch_sync(ctx), counts={"trainable": sum(p.numel() for p in params)})


def torch_unet_forward(spec: Spec, ctx: Ctx) -> Runner:
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    config, dtype, device = spec.options["config"], _torch_dtype(spec.precision), ctx.device
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device=device, dtype=dtype, memory_format=_memory_format(ctx)).eval()
    rng = np.random.default_rng(0)
    sample = torch.from_numpy(rng.standard_normal((spec.batch, config["in_channels"], spec.size, spec.size), np.float32))
    sample = sample.to(device, dtype).to(memory_format=_memory_format(ctx))
    context = torch.from_numpy(rng.standard_normal((spec.batch, CONTEXT_LEN, config["cross_attention_dim"]), np.float32)).to(device, dtype)
    t = torch.arange(spec.batch, device=device) * 97 % 1000
    model = torch.compile(unet) if ctx.compiles(spec.name) else unet

    def step():
        with torch.inference_mode():
            return model(sample, t, context).sample

    return Runner(step, _torch_sync(ctx), counts={"unet": sum(p.numel() for p in unet.parameters())})


def torch_vae_encode(spec: Spec, ctx: Ctx) -> Runner:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    dtype, device = _torch_dtype(spec.precision), ctx.device
    torch.manual_seed(0)
    vae = AutoencoderKL(**spec.options["config"])
    del vae.decoder, vae.post_quant_conv
    vae = vae.to(device=device, dtype=dtype, memory_format=_memory_format(ctx)).eval()
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (spec.batch, 3, spec.size, spec.size)).astype(np.float32))
    x = x.to(device, dtype).to(memory_format=_memory_format(ctx))

    def encode(x):
        return vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)[0]  # AutoencoderKL.encode(x).latent_dist.mode()

    fn = torch.compile(encode) if ctx.compiles(spec.name) else encode

    def step():
        with torch.inference_mode():
            return fn(x)

    return Runner(step, _torch_sync(ctx), counts={"encoder": sum(p.numel() for p in vae.encoder.parameters())
                                                  + sum(p.numel() for p in vae.quant_conv.parameters())})


def torch_deid_models(setup: dict, cfg, device):
    import torch_medsem_deid as twin

    from bench_lora import sd15_alphas_cumprod

    config = setup["config"]
    generator = twin.MedSemDeID(cfg).to(device)
    discriminator = twin.PatchDiscriminator(tuple(config.gan.widths), cfg.norm_groups).to(device)
    a = setup["arcface"]
    phi = twin.IResNet(a["depth"], a["width"], a["num_features"]).to(device)
    medical = twin.medical_encoder(setup["unet"], setup["vae"], setup["num_down_blocks"], setup["timestep"],
                                   sd15_alphas_cumprod(), image_size=cfg.image_size).to(device)
    return generator, discriminator, phi, medical


def _deid_cfg(setup: dict):
    """The DeidConfig the trainer derives (med_channels = the medical encoder's channels), without jax weights."""
    from deid_jax.model import DeidConfig

    d = dict(setup["config"].model.to_dict(), image_size=setup["config"].data.image_size)
    if d["med_channels"]:
        d["med_channels"] = setup["unet"]["block_out_channels"][setup["num_down_blocks"] - 1]
    return DeidConfig.from_dict(d)


def torch_deid_train(spec: Spec, ctx: Ctx) -> Runner:
    import numpy as np
    import torch
    import torch_medsem_deid as twin

    setup = deid_setup(spec.options["variant"], spec.size)
    config, cfg, device = setup["config"], _deid_cfg(setup), ctx.device
    torch.manual_seed(0)
    generator, discriminator, phi, medical = torch_deid_models(setup, cfg, device)
    adam = lambda o: {"lr": float(o.lr), "b1": float(o.b1), "b2": float(o.b2), "eps": float(o.get("eps", 1e-8))}  # noqa: E731
    step_fn = twin.TrainStep(generator, discriminator, phi, medical, loss=config.loss.to_dict(), optim=adam(config.optim),
                             optim_discriminator=adam(config.optim_discriminator), crop=config.identity.crop,
                             fused=device == "cuda", compile=ctx.compiles(spec.name))
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, (spec.batch, 3, spec.size, spec.size)).astype(np.float32)).to(device)
    marks = torch.from_numpy(deid_landmarks(spec.batch, spec.size)).to(device)
    counts = twin.parameter_counts(generator, discriminator, phi, medical)
    return Runner(lambda: step_fn(x, marks), _torch_sync(ctx), counts=counts)


def torch_deidentify(spec: Spec, ctx: Ctx) -> Runner:
    import numpy as np
    import torch
    import torch_medsem_deid as twin

    from bench_lora import sd15_alphas_cumprod

    setup = deid_setup(spec.options["variant"], spec.size)
    cfg, device = _deid_cfg(setup), ctx.device
    torch.manual_seed(0)
    generator = twin.MedSemDeID(cfg).to(device).eval()
    medical = twin.medical_encoder(setup["unet"], setup["vae"], setup["num_down_blocks"], setup["timestep"],
                                   sd15_alphas_cumprod(), image_size=cfg.image_size).to(device).eval()

    def forward(x, password):
        f_med = medical(x) if cfg.med_channels else None
        return generator.deidentify(x, f_med, password)

    fn = torch.compile(forward) if ctx.compiles(spec.name) else forward
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (spec.batch, spec.size, spec.size, 3), dtype=np.uint8)
    password = rng.standard_normal(cfg.password_dim).astype(np.float32)

    def step():  # the same I/O as Deidentifier.deidentify: uint8 NHWC in; uint8 images and f_enc (NHWC) out
        with torch.inference_mode():
            x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            p = torch.from_numpy(password).to(device)[None].expand(len(images), -1)
            x_enc, f_enc = fn(x, p)
            out = ((x_enc + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            return out, f_enc.permute(0, 2, 3, 1).float().cpu().numpy()

    return Runner(step, lambda r: r, counts={"generator": twin.count_params(generator),
                                              "medical_unet": medical.unet_parameter_count()})


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


def main(argv=None):
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
    args = parser.parse_args(argv)

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
    specs = [s for s in profile_specs(args.profile, args.quick) if not args.only or s.name in args.only]
    for s in specs:
        s.warmup = args.warmup if args.warmup is not None else s.warmup
        s.repeats = args.repeats if args.repeats is not None else s.repeats
    info = cpu_info()
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"suite_{args.profile}{'_quick' if args.quick else ''}.md"

    gpu_name = "-"
    if args.dry_run and gpu:
        gpu_name = "the GPU torch reports at run time"
    elif gpu:
        import torch

        gpu_name = torch.cuda.get_device_name(0)
    peaks, peak_lines = {}, []
    for s in specs:
        precision = s.precision if not (gpu and s.precision == "fp32") else "tf32"
        if args.peak_tflops:
            peaks[s.name] = (args.peak_tflops, f"--peak-tflops {args.peak_tflops}")
        elif gpu:
            peaks[s.name] = gpu_peak(gpu_name, precision)
        else:
            peaks[s.name] = cpu_peak(threads, info)
        if peaks[s.name][1] not in peak_lines:
            peak_lines.append(peaks[s.name][1])

    print(f"profile {args.profile}{' (quick)' if args.quick else ''}: device {device} ({gpu_name}), {threads} threads "
          f"of {info['cores_total']} cores, torch.compile: {', '.join(compile_) or 'off'}", flush=True)
    for line in peak_lines:
        print("peak: " + line)
    for s in specs:
        extra = ""
        if s.name.startswith("unet"):
            extra = f"; analytic forward {sig(unet_forward_flops(s.options['config'], s.batch, s.size) / 1e9)} GFLOP"
        print(f"  {s.describe()}{extra}")
    if args.dry_run:
        for s in specs:  # the configs resolve (DeID variants, medical encoders, twin parameter counts)
            if s.name.startswith("deid"):
                setup = deid_setup(s.options["variant"], s.size)
                cfg = _deid_cfg(setup)
                ours, theirs = deid_parameter_counts(setup, cfg)
                check_counts(s.name, ours, theirs)
                print(f"  {s.name}: DeidConfig {cfg.image_size}px grid {cfg.grid}x{cfg.grid} width {cfg.width} depth "
                      f"{cfg.depth} med {cfg.med_channels}ch; ArcFace {setup['arcface']}; Enc_med UNet "
                      f"{setup['unet']['block_out_channels']} x{setup['num_down_blocks']} block(s)"
                      f"{' + SD1.5 VAE' if setup['vae'] else ''}; parameters (ours = twin, checked) {ours}")
        return 0

    import jax
    import torch

    torch.set_num_threads(threads)
    if not gpu:
        torch.set_flush_denormal(True)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    backend = jax.default_backend()
    if gpu and backend != "gpu":
        print(f"warning: PyTorch on cuda but JAX's backend is {backend}", flush=True)
    if not gpu and not args.peak_tflops and not args.quick:
        measured = cpu_peak_measured(threads, info)
        peaks = dict.fromkeys(peaks, measured)
        peak_lines = [measured[1]]
        print("peak: " + measured[1], flush=True)

    start, load_start = time.time(), os.getloadavg()[0]
    rows = []
    for spec in specs:
        try:
            rows.append(run_workload(spec, ctx, spec.warmup, spec.repeats))
        except Exception as e:  # noqa: BLE001 - one failing workload does not lose the others' rows
            traceback.print_exc()
            rows.append({"spec": spec, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            free_memory(ctx)
    cross = []
    if not args.no_flop_check:
        fwd = next((r for r in rows if r["spec"].name == "unet_forward" and "error" not in r), None)
        cross = flop_cross_check(ctx, args.quick, fwd)
        for c in cross:
            print(f"FLOP cross-check {c['label']}: analytic {c['analytic'] / 1e9:.3f} G, XLA {c['xla'] / 1e9:.3f} G "
                  f"({c['source']}), analytic/XLA {c['ratio']:.4f}", flush=True)

    v = versions()
    load = os.getloadavg()
    header = [f"# Benchmark suite: JAX (ours) vs PyTorch, profile `{args.profile}`{' (quick sizes)' if args.quick else ''}", "",
              f"- machine: {info['model']}, {info['cores_total']} cores ({threads} used by each framework, pinned), "
              f"{device}{' ' + gpu_name if gpu else ''}; JAX backend {backend} ({jax.devices()[0].device_kind})",
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
