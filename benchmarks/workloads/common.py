"""What every workload shares: its spec, the run context, the runner it returns, FLOP counting
(XLA's cost analysis, the analytic UNet count) and small JAX / PyTorch helpers."""
from __future__ import annotations

import dataclasses
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


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


def _torch_sync(ctx):
    import torch

    return (lambda _: torch.cuda.synchronize()) if ctx.device == "cuda" else (lambda _: None)


def _torch_dtype(precision):
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def _memory_format(ctx):
    import torch

    return torch.channels_last if ctx.channels_last else torch.contiguous_format
