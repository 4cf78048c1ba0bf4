"""The LoRA training step: ours (mema_jax.core train step, LoRA merged into the frozen base inside
the loss) vs diffusers + peft (``unet.add_adapter(LoraConfig)``, only LoRA parameters trainable),
same UNet config, rank, batch and precision.

    python benchmarks/bench_lora.py --size cpu-small
    python benchmarks/bench_lora.py --size gpu-sd15 --precision bf16

One step = noise at random timesteps (DDPM, SD1.5's schedule), the UNet's epsilon prediction, MSE,
backward to the LoRA parameters only, an Adam update (b1 0.9, b2 0.99, lr 1e-4).  The text
context is a fixed random tensor on both sides (the frozen text encoder is not part of the step
in either).  Median of ``--repeats`` timed steps after ``--warmup``; the first step (JAX: trace +
compile) is shown apart.  ``bf16``: the base weights and compute in bf16, LoRA weights fp32 on both
sides (peft keeps adapter weights in fp32 under autocast; we merge in the base's dtype).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_unet import SD15_CONFIG, SMALL_CONFIG, timed  # noqa: E402

SIZES = {  # name: (config, batch, latent size)
    "cpu-small": (SMALL_CONFIG, 2, 16),
    "cpu-sd15": (SD15_CONFIG, 1, 16),
    "gpu-sd15": (SD15_CONFIG, 8, 64),
}
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def sd15_alphas_cumprod():
    import numpy as np

    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1 - betas).astype(np.float32)


def bench_torch(config, batch, size, rank, precision, warmup, repeats, device):
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device=device, dtype=dtype)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(TARGETS)))
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    for p in lora_params:  # as diffusers' train_text_to_image_lora.py does under mixed precision
        p.data = p.data.float()
    opt = torch.optim.Adam(lora_params, lr=1e-4, betas=(0.9, 0.99))
    rng = np.random.default_rng(0)
    latents = torch.from_numpy(rng.standard_normal((batch, 4, size, size), np.float32)).to(device)
    context = torch.from_numpy(rng.standard_normal((batch, 77, config["cross_attention_dim"]), np.float32)).to(device, dtype)
    acp = torch.from_numpy(sd15_alphas_cumprod()).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    unet.train()

    def step():
        noise = torch.randn(latents.shape, generator=gen, device=device)
        t = torch.randint(0, 1000, (batch,), generator=gen, device=device)
        a = acp[t].view(-1, 1, 1, 1)
        noisy = (a.sqrt() * latents + (1 - a).sqrt() * noise).to(dtype)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            pred = unet(noisy, t, context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return timed(step, warmup, repeats, sync), sum(p.numel() for p in lora_params)


def bench_jax(config, batch, size, rank, precision, warmup, repeats, attention_impl, remat):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import linen as nn

    from mema_jax.core import sharding as shd
    from mema_jax.core import train_state as ts
    from mema_jax.models import lora
    from mema_jax.models.unet import UNet2DConditionModel, UNetConfig, init_params
    from mema_jax.schedulers import ddpm

    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    unet = UNet2DConditionModel(UNetConfig.from_dict(config), dtype=dtype, param_dtype=dtype,
                                attention_impl=attention_impl, remat=remat)
    abstract_boxed = jax.eval_shape(lambda rng: init_params(unet, rng), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    base = jax.tree.map(lambda a: jnp.asarray(0.02 * rng.standard_normal(a.shape, np.float32), a.dtype),
                        nn.meta.unbox(abstract_boxed))
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    rules = shd.DEFAULT_RULES
    frozen, frozen_shardings = ts.place_frozen({"unet": base}, mesh, rules)
    tx = optax.adam(1e-4, b1=0.9, b2=0.99)
    spec = ts.sharded_state(lambda r: lora.init_lora(r, abstract_boxed, rank), tx, mesh, rules, seed=0)
    acp = jnp.asarray(sd15_alphas_cumprod())
    latents = jnp.asarray(rng.standard_normal((batch, size, size, 4), np.float32))
    context = jnp.asarray(rng.standard_normal((batch, 77, config["cross_attention_dim"]), np.float32), dtype)
    batch_arrays = {"latents": latents, "context": context}
    batch_shardings = {k: shd.batch_sharding(mesh, rules, v.ndim, v.shape) for k, v in batch_arrays.items()}

    def loss_fn(params, frozen, b, key):
        r_noise, r_t = jax.random.split(key)
        noise = jax.random.normal(r_noise, b["latents"].shape)
        t = jax.random.randint(r_t, (batch,), 0, 1000)
        noisy = ddpm.add_noise(acp, b["latents"], noise, t)
        pred = unet.apply({"params": lora.merge(frozen["unet"], params, 1.0)}, noisy, t, b["context"])
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - noise)), {}

    step = ts.make_train_step(loss_fn, tx, mesh=mesh, rules=rules, state_shardings=spec.shardings,
                              batch_shardings=batch_shardings, frozen_shardings=frozen_shardings, seed=0)
    state = [spec.init()]
    placed = {k: jax.device_put(v, batch_shardings[k]) for k, v in batch_arrays.items()}

    def one():
        state[0], metrics = step(state[0], placed, frozen)
        return metrics["loss"]

    n_lora = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state[0].params))
    return timed(one, warmup, repeats, jax.block_until_ready), n_lora


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu-small")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attention", choices=("xla", "dot_product"))
    parser.add_argument("--remat", choices=("none", "full", "dots"), default="none")
    parser.add_argument("--only", choices=("jax", "torch"))
    parser.add_argument("--cpus", type=int, help="cores to pin to (default: 1 for cpu sizes, all for gpu sizes)")
    args = parser.parse_args(argv)

    cores = sorted(os.sched_getaffinity(0))  # both frameworks on the same cores (see bench_unet.py)
    gpu = args.size.startswith("gpu")
    os.sched_setaffinity(0, cores[: args.cpus or (len(cores) if gpu else 1)])
    config, batch, size = SIZES[args.size]
    batch = args.batch or batch
    attention = args.attention or ("dot_product" if gpu else "xla")

    import jax

    print(f"size={args.size} precision={args.precision} rank={args.rank} batch={batch} latent={size}x{size} "
          f"jax={jax.__version__} backend={jax.default_backend()} attention={attention} remat={args.remat} "
          f"cpus={len(os.sched_getaffinity(0))} of {os.cpu_count()} load={os.getloadavg()[0]:.1f}", flush=True)
    common = (config, batch, size, args.rank, args.precision, args.warmup, args.repeats)
    results = {}
    if args.only != "torch":
        results["jax"] = bench_jax(*common, attention, args.remat)
        gc.collect()
    if args.only != "jax":
        results["torch"] = bench_torch(*common, "cuda" if gpu else "cpu")

    print("\n| framework | LoRA parameters | first step (s) | median step (ms) | JAX / PyTorch |")
    print("|---|---|---|---|---|")
    for framework, label in (("jax", "JAX (ours)"), ("torch", "PyTorch (diffusers + peft)")):
        if framework not in results:
            continue
        (first, median), n = results[framework]
        ratio = f"{median / results['torch'][0][1]:.2f}" if framework == "jax" and "torch" in results else ""
        print(f"| {label} | {n:,} | {first:.1f} | {median * 1e3:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
