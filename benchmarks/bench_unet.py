"""Our Flax UNet vs diffusers' UNet2DConditionModel: same config, batch and precision; forward
and forward+backward (gradients w.r.t. all parameters of a mean-square loss).

    python benchmarks/bench_unet.py --size cpu-small --precision fp32
    python benchmarks/bench_unet.py --size gpu-sd15 --precision bf16
    python benchmarks/bench_unet.py --size cpu-sd15 --conv-impl xla      # JAX convs as lax.conv only
    python benchmarks/bench_unet.py --conv-shapes                        # per-shape conv table

``--conv-impl`` (auto / xla / im2col) sets how the JAX model lowers its convolutions
(mema_jax/models/layers/conv.py; "auto" is the default the library uses).  ``--conv-shapes``
times single 3x3 convolutions instead of the UNet: lax.conv vs im2col (+ PyTorch conv2d) for
each map size and channel count of ``--conv-maps`` x ``--conv-channels``, forward and
forward+backward (gradients w.r.t. input and kernel); it prints the minimum over the repeats,
the figure least disturbed by other processes on a shared machine.

Prints median step times over ``--repeats`` timed calls after ``--warmup`` untimed ones; the
first call (JAX: trace + compile + run; PyTorch: first run) is shown separately.  Weights are
random on both sides (timing does not depend on values).  ``bf16`` means weights and compute in
bf16 on both sides; ``fp32`` runs at each framework's default fp32 matmul/conv precision.
The two frameworks run one after the other, so only one model is in memory at a time.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SD15_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
# The SD1.5 topology (4 levels, 2 layers, same block types) at a tenth of the width.
SMALL_CONFIG = dict(SD15_CONFIG, block_out_channels=(32, 64, 128, 128), cross_attention_dim=128, sample_size=16)

SIZES = {
    # name: (config, batch, latent size, context length, run backward by default)
    "cpu-small": (SMALL_CONFIG, 2, 16, 77, True),
    "cpu-sd15": (SD15_CONFIG, 1, 16, 77, False),  # 860M params: forward only unless --backward
    "gpu-sd15": (SD15_CONFIG, 8, 64, 77, True),  # 512 px images
}


def timed(fn, warmup: int, repeats: int, sync):
    start = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - start
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def bench_torch(config, batch, size, context_len, precision, passes, warmup, repeats, device):
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    model = UNet2DConditionModel(**config).to(device=device, dtype=dtype)
    rng = np.random.default_rng(0)
    sample = torch.from_numpy(rng.standard_normal((batch, 4, size, size), np.float32)).to(device, dtype)
    context = torch.from_numpy(rng.standard_normal((batch, context_len, config["cross_attention_dim"]), np.float32)).to(device, dtype)
    timesteps = torch.arange(batch, device=device) * 97 % 1000
    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)

    def forward():
        with torch.no_grad():
            return model(sample, timesteps, context).sample

    def forward_backward():
        model.zero_grad(set_to_none=True)
        loss = model(sample, timesteps, context).sample.float().square().mean()
        loss.backward()
        return loss

    results = {}
    model.eval()
    if "fwd" in passes:
        results["fwd"] = timed(forward, warmup, repeats, sync)
    model.train()  # dropout is 0 in SD configs: same math, autograd on
    if "fwd+bwd" in passes:
        results["fwd+bwd"] = timed(forward_backward, warmup, repeats, sync)
    return results


def bench_conv_shapes(maps, channels, batch, stride, precision, warmup, repeats, with_torch):
    """Rows of (map, channels, pass, {"xla": s, "im2col": s, "torch": s}) for 3x3 convolutions;
    ``channels`` items are C (in = out) or "IN:OUT"."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from mema_jax.core.compile import jit
    from mema_jax.models.layers.conv import im2col_conv

    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    if with_torch:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
    pad = ((1, 1), (1, 1))

    def xla(x, k):
        return lax.conv_general_dilated(x, k, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def im2col(x, k):
        return im2col_conv(x, k, (stride, stride), pad)

    def best(fns):
        """{name: minimum seconds}; the functions take turns, so a change of load hits them alike."""
        for _ in range(1 + warmup):
            for fn, sync in fns.values():
                sync(fn())
        times = {name: [] for name in fns}
        for _ in range(repeats):
            for name, (fn, sync) in fns.items():
                start = time.perf_counter()
                sync(fn())
                times[name].append(time.perf_counter() - start)
        return {name: min(t) for name, t in times.items()}

    rows = []
    rng = np.random.default_rng(0)
    for size in maps:
        for c in channels:
            c_in, c_out = (int(v) for v in c.split(":")) if ":" in str(c) else (int(c), int(c))
            x_np = rng.standard_normal((batch, size, size, c_in), np.float32)
            k_np = (rng.standard_normal((3, 3, c_in, c_out), np.float32) / np.sqrt(9 * c_in)).astype(np.float32)
            x, k = jnp.asarray(x_np, dtype), jnp.asarray(k_np, dtype)
            fwd_fns, bwd_fns = {}, {}
            for name, conv in (("xla", xla), ("im2col", im2col)):
                f = jit(conv)
                g = jit(jax.grad(lambda x, k, conv=conv: jnp.sum(conv(x, k).astype(jnp.float32) ** 2) / 2,
                                     argnums=(0, 1)), training=True)
                fwd_fns[name] = (lambda f=f: f(x, k), jax.block_until_ready)
                bwd_fns[name] = (lambda g=g: g(x, k), jax.block_until_ready)
            if with_torch:
                tdtype = torch.bfloat16 if precision == "bf16" else torch.float32
                tx = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(tdtype)
                tk = torch.from_numpy(k_np.transpose(3, 2, 0, 1).copy()).to(tdtype)

                def t_fwd():
                    with torch.no_grad():
                        return torch.nn.functional.conv2d(tx, tk, stride=stride, padding=1)

                txg, tkg = tx.clone().requires_grad_(True), tk.clone().requires_grad_(True)

                def t_bwd():
                    txg.grad = tkg.grad = None
                    y = torch.nn.functional.conv2d(txg, tkg, stride=stride, padding=1)
                    (y.float().square().sum() / 2).backward()
                    return y

                fwd_fns["torch"] = (t_fwd, lambda _: None)
                bwd_fns["torch"] = (t_bwd, lambda _: None)
            fwd, bwd = best(fwd_fns), best(bwd_fns)
            for name, times in (("fwd", fwd), ("fwd+bwd", bwd)):
                rows.append((size, c, name, times))
                print_conv_row(rows[-1], with_torch)
    return rows


def print_conv_row(row, with_torch):
    size, c, name, t = row
    line = f"| {size}x{size} | {c} | {name} | {t['xla'] * 1e3:.2f} | {t['im2col'] * 1e3:.2f} | {t['xla'] / t['im2col']:.2f} |"
    if with_torch:
        line += f" {t['torch'] * 1e3:.2f} | {t['xla'] / t['torch']:.2f} | {t['im2col'] / t['torch']:.2f} |"
    print(line, flush=True)


def bench_jax(config, batch, size, context_len, precision, passes, warmup, repeats, attention_impl, remat):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from mema_jax.core.compile import jit
    from mema_jax.models.unet import UNet2DConditionModel, UNetConfig, init_params

    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    module = UNet2DConditionModel(UNetConfig.from_dict(config), dtype=dtype, param_dtype=dtype,
                                  attention_impl=attention_impl, remat=remat)
    # Random values of the right shapes without running (and compiling) flax's init.
    abstract = nn.meta.unbox(jax.eval_shape(lambda rng: init_params(module, rng), jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(0.02 * rng.standard_normal(a.shape, np.float32), a.dtype), abstract)
    sample = jnp.asarray(rng.standard_normal((batch, size, size, 4), np.float32), dtype)
    context = jnp.asarray(rng.standard_normal((batch, context_len, config["cross_attention_dim"]), np.float32), dtype)
    timesteps = jnp.arange(batch) * 97 % 1000
    sync = jax.block_until_ready

    forward_jit = jit(lambda p: module.apply({"params": p}, sample, timesteps, context))

    def loss(p):
        return jnp.mean(jnp.square(module.apply({"params": p}, sample, timesteps, context).astype(jnp.float32)))

    grad_jit = jit(jax.grad(loss), training=True)
    results = {}
    if "fwd" in passes:
        results["fwd"] = timed(lambda: forward_jit(params), warmup, repeats, sync)
    if "fwd+bwd" in passes:
        results["fwd+bwd"] = timed(lambda: grad_jit(params), warmup, repeats, sync)
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu-small")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch", type=int, help="override the size's batch")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backward", action=argparse.BooleanOptionalAction, help="also time forward+backward")
    parser.add_argument("--attention", choices=("xla", "dot_product"), help="JAX attention (default: dot_product on GPU)")
    parser.add_argument("--remat", choices=("none", "full", "dots"), default="none", help="JAX remat policy")
    parser.add_argument("--only", choices=("jax", "torch"), help="run one framework only")
    parser.add_argument("--conv-impl", choices=("auto", "xla", "im2col"), default="auto",
                        help="how the JAX model lowers its convolutions (default: auto, the library default)")
    parser.add_argument("--conv-shapes", action="store_true", help="time single 3x3 convs per shape instead")
    parser.add_argument("--conv-maps", type=int, nargs="+", default=[2, 4, 8, 16, 32], help="--conv-shapes map sizes")
    parser.add_argument("--conv-channels", nargs="+", default=["320", "640", "1280"],
                        help="--conv-shapes channel counts: C (in = out) or IN:OUT")
    parser.add_argument("--conv-stride", type=int, default=1, help="--conv-shapes stride (map = input size)")
    parser.add_argument("--cpus", type=int, help="pin the process to this many CPU cores (default: 1 for cpu sizes, "
                        "all for gpu sizes)")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)

    # On a shared CPU box more threads than free cores makes PyTorch's OpenMP spin-waits
    # dominate (measured 30x slowdowns at load 3 on 2 cores); pinning both frameworks to the
    # same cores keeps the comparison fair.  XLA sizes its thread pool from the affinity mask,
    # so this must happen before jax starts.
    cores = sorted(os.sched_getaffinity(0))
    cpus = args.cpus or (len(cores) if args.size.startswith("gpu") else 1)
    os.sched_setaffinity(0, cores[:cpus])

    config, batch, size, context_len, backward = SIZES[args.size]
    batch = args.batch or batch
    backward = backward if args.backward is None else args.backward
    passes = ("fwd", "fwd+bwd") if backward else ("fwd",)
    gpu = args.size.startswith("gpu")
    attention = args.attention or ("dot_product" if gpu else "xla")

    import jax

    if args.conv_shapes:
        batch = args.batch or 1
        print(f"3x3 conv, stride {args.conv_stride}, padding 1, batch {batch}, NHWC, {args.precision}, "
              f"jax={jax.__version__} backend={jax.default_backend()} cpus={len(os.sched_getaffinity(0))} of "
              f"{os.cpu_count()} load={os.getloadavg()[0]:.1f}; ms, minimum of {args.repeats}", flush=True)
        with_torch = args.only != "jax"
        header = "| map | channels | pass | lax.conv | im2col | conv / im2col |"
        if with_torch:
            header += " PyTorch | conv / PyTorch | im2col / PyTorch |"
        print("\n" + header)
        print("|" + "---|" * (header.count("|") - 1))
        bench_conv_shapes(args.conv_maps, args.conv_channels, batch, args.conv_stride, args.precision, args.warmup,
                          args.repeats, with_torch)
        return

    from mema_jax.models.layers.conv import set_default_conv_impl

    set_default_conv_impl(args.conv_impl)
    print(f"size={args.size} precision={args.precision} batch={batch} latent={size}x{size} context={context_len} "
          f"jax={jax.__version__} backend={jax.default_backend()} attention={attention} remat={args.remat} "
          f"conv_impl={args.conv_impl} "
          f"cpus={len(os.sched_getaffinity(0))} of {os.cpu_count()} load={os.getloadavg()[0]:.1f}", flush=True)
    common = (config, batch, size, context_len, args.precision, passes, args.warmup, args.repeats)
    results = {}
    if args.only != "torch":
        results["jax"] = bench_jax(*common, attention, args.remat)
        gc.collect()  # the JAX model's buffers go before the PyTorch model is built
    if args.only != "jax":
        results["torch"] = bench_torch(*common, "cuda" if gpu else "cpu")

    print_table(results, passes)


def print_table(results: dict, passes) -> None:
    print("\n| pass | framework | first call (s) | median step (ms) | JAX / PyTorch |")
    print("|---|---|---|---|---|")
    for name in passes:
        for framework in ("jax", "torch"):
            if framework not in results:
                continue
            first, median = results[framework][name]
            ratio = ""
            if framework == "jax" and "torch" in results:
                ratio = f"{median / results['torch'][name][1]:.2f}"
            label = "JAX (Flax)" if framework == "jax" else "PyTorch (diffusers)"
            print(f"| {name} | {label} | {first:.1f} | {median * 1e3:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
