"""The MedSem-DeID workloads: the training step of deid_jax/train.py and the de-identify path of
deid_jax/deidentify.py, against the PyTorch twin (benchmarks/torch_medsem_deid.py)."""
from __future__ import annotations


from workloads.common import CONTEXT_LEN, Ctx, Runner, SD15_VAE, Spec, _count, _fan_in_init, _in_mesh, _jax_flops, _mesh, _torch_sync


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
    parts = deid_train.make_parts(config, med, identity)
    mesh, rules = _mesh()
    frozen = {"identity": identity[1], "med": med.params}
    frozen, frozen_shardings = ts.place_frozen(frozen, mesh, rules)
    size, batch = spec.size, spec.batch

    init_params, tx, loss_fns = deid_train.parameter_groups(config, med, parts, 1)
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
    import numpy as np

    from deid_jax import deidentify as deid_cli
    from deid_jax import export as deid_export
    from deid_jax import train as deid_train
    from mema_jax.core import sharding as shd

    setup = deid_setup(spec.options["variant"], spec.size)
    med = jax_medical_encoder(setup)
    cfg = deid_train.deid_config(setup["config"], med)
    params = _fan_in_init(shd.unbox(deid_export.abstract_params(cfg, med)), 3)
    model = deid_cli.Deidentifier(cfg, params, med)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (spec.batch, spec.size, spec.size, 3), dtype=np.uint8)
    password = rng.standard_normal(cfg.password_dim).astype(np.float32)

    def flops():
        run, args = model.deidentify_program(), model.deidentify_args(images, password)
        return _jax_flops(ctx, None if ctx.gpu else run.lower(*args).compile(), lambda: run.lower(*args),
                          lambda: jax.jit(model.deidentify_function()).lower(*args))

    return Runner(lambda: model.deidentify(images, password), lambda r: r, flops,
                  {"generator": _count(params), "medical_unet": _count(med.params["unet"])},
                  note="uint8 in and out, host<->device copies included")


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
