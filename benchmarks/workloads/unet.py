"""The UNet and VAE workloads: LoRA and full training steps, the sampling forward, the VAE encoder;
ours (mema_jax) and diffusers + peft."""
from __future__ import annotations


from workloads.common import CONTEXT_LEN, Ctx, Runner, Spec, _count, _in_mesh, _jax_dtype, _jax_flops, _memory_format, _mesh, _random_like, _torch_dtype, _torch_sync


def lora_rank():
    from configs.mema_lora import get_config

    c = get_config("paper")
    return int(c.lora.rank), float(c.lora.alpha)


def unet_optimizer_settings() -> dict:
    """AdamW as diffusers' train_text_to_image(_lora).py runs it (weight decay 1e-2, max_grad_norm 1.0),
    with configs/mema_lora.py:paper's lr and betas; constant learning rate."""
    from configs.mema_lora import get_config

    import ml_collections

    o = get_config("paper").optim
    return ml_collections.ConfigDict({"name": "adamw", "lr": float(o.lr), "b1": float(o.b1), "b2": float(o.b2), "eps": 1e-8,
                                      "weight_decay": 1e-2, "grad_clip": float(o.grad_clip), "schedule": "constant",
                                      "warmup_steps": 0})


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
