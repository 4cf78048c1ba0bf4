"""A PyTorch twin of MedSem-DeID (deid_jax/model.py, deid_jax/train.py, deid_jax/losses.py), written
for the benchmark suite (benchmarks/suite.py): the same networks, layer for layer and parameter for
parameter, the same loss terms and the same optimizers, in NCHW PyTorch.  It does not share weights
with the JAX model (timing does not depend on values); ``benchmarks/suite.py`` and
``tests/test_bench_suite.py`` check that every network has exactly our parameter count.

    generator  MedSemDeID: ConvEncoder -> Fusion(f_face, f_med) -> ID-Encryptor (PasswordTransformer)
               -> sign pad -> ImageDecoder; recovery: sign pad -> ID-Decryptor -> ImageDecoder
    critic     PatchDiscriminator (PatchGAN)
    frozen     phi: an arcface_torch-style IResNet (mema_jax/models/iresnet.py) in eval mode, on the
               112 x 112 crop aligned from five landmarks (mema_jax/models/face_align.py: least-squares
               similarity, bilinear warp, border = fill);
               Enc_med: the diffusion UNet's conv_in, time embedding and first down blocks (diffusers
               UNet2DConditionModel submodules), after the VAE encoder when there is one
               (deid_jax/medical_encoder.py)
    step       generator update on L_deid + L_rev-id + L_wrong + lambda_rev L_rev (L1) + lambda_sep
               L_sep + lambda_med L_med (L2) + lambda_gan L_GAN (softplus), gradients to the generator
               only (phi, Enc_med and the discriminator frozen for it); then a discriminator update on
               softplus(-D(X)) + softplus(D(fakes)) against the updated generator with fresh passwords.
               Two Adam optimizers, as deid_jax/train.py (two parameter groups, ts.make_train_step).

Where the twin differs (by necessity, not in cost): the +-1 password pad is drawn by an integer hash
(murmur3 finaliser over a counter) instead of threefry; f_med of the real images is computed once per
step and reused by the discriminator update (inside one jitted step XLA may merge the two identical
computations of ours); layouts are NCHW.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ArcFace's 112 x 112 template (= mema_jax.models.face_align.ARCFACE_TEMPLATE_112).
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
IRESNET_LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}
_MASK32 = 0xFFFFFFFF


def _groups(channels: int, wanted: int) -> int:
    g = min(wanted, channels)
    while channels % g:
        g -= 1
    return g


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# Layers (mema_jax/models/layers).


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3, GroupNorm-SiLU-conv3x3, + shortcut (1x1 conv when channels change); no time input."""

    def __init__(self, cin: int, cout: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Attention(nn.Module):
    """to_q/k/v (no bias), multi-head SDPA, to_out (bias): mema_jax.models.layers.attention.Attention."""

    def __init__(self, width: int, heads: int, context_width: int | None = None):
        super().__init__()
        self.heads = heads
        kv = context_width or width
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_k = nn.Linear(kv, width, bias=False)
        self.to_v = nn.Linear(kv, width, bias=False)
        self.to_out = nn.Linear(width, width)

    def forward(self, x, context=None):
        context = x if context is None else context
        b, lq, d = x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)))
        return self.to_out(out.transpose(1, 2).reshape(b, lq, d))


# ----------------------------------------------------------------------------------------------
# The generator (deid_jax/model.py).


class ConvEncoder(nn.Module):
    def __init__(self, widths, out_channels: int, groups: int, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.stages = nn.ModuleList()
        for i, w in enumerate(widths):
            stage = nn.Sequential()
            if i:
                stage.append(Downsample(widths[i - 1], w))
            stage.append(ResnetBlock(w, w, _groups(w, groups)))
            self.stages.append(stage)
        self.norm_out = nn.GroupNorm(_groups(widths[-1], groups), widths[-1], 1e-5)
        self.proj = nn.Conv2d(widths[-1], out_channels, 1)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.proj(F.silu(self.norm_out(x)))


class ImageDecoder(nn.Module):
    def __init__(self, in_channels: int, widths, groups: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList(ResnetBlock(w, w, _groups(w, groups)) for w in widths)
        self.ups = nn.ModuleList(Upsample(widths[i], widths[i + 1]) for i in range(len(widths) - 1))
        self.norm_out = nn.GroupNorm(_groups(widths[-1], groups), widths[-1], 1e-5)
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, f):
        x = self.conv_in(f)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.ups):
                x = self.ups[i](x)
        return torch.tanh(self.conv_out(F.silu(self.norm_out(x))))


class Fusion(nn.Module):
    def __init__(self, face_channels: int, med_channels: int, channels: int, num_blocks: int, groups: int):
        super().__init__()
        self.proj = nn.Conv2d(face_channels + med_channels, channels, 1)
        g = _groups(channels, groups)
        self.blocks = nn.Sequential(*(ResnetBlock(channels, channels, g) for _ in range(num_blocks)))

    def forward(self, f_face, f_med=None):
        x = f_face
        if f_med is not None:
            f_med = F.interpolate(f_med.to(x.dtype), size=x.shape[-2:], mode="bilinear", antialias=True,
                                  align_corners=False)
            x = torch.cat([x, f_med], dim=1)
        return self.blocks(self.proj(x))


class PasswordBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int, password_mode: str):
        super().__init__()
        self.mode = password_mode
        self.norm1 = nn.LayerNorm(width, eps=1e-5)
        self.self_attn = Attention(width, heads)
        if password_mode == "cross_attention":
            self.norm_p = nn.LayerNorm(width, eps=1e-5)
            self.password_attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-5)
        if password_mode == "modulation":
            names = ["norm1", "norm2"] + (["norm_p"] if password_mode == "cross_attention" else [])
            self.film = nn.ModuleDict({n: nn.Linear(width, 2 * width) for n in names})
        self.mlp_in = nn.Linear(width, width * mlp_ratio)
        self.mlp_out = nn.Linear(width * mlp_ratio, width)

    def _norm(self, name, h, p):
        h = getattr(self, name)(h)
        if self.mode == "modulation":
            scale, shift = self.film[name](p)[:, None, :].chunk(2, dim=-1)
            h = h * (1 + scale) + shift
        return h

    def forward(self, x, p, memory=None):
        x = x + self.self_attn(self._norm("norm1", x, p))
        if self.mode == "cross_attention":
            x = x + self.password_attn(self._norm("norm_p", x, p), memory)
        h = F.gelu(self.mlp_in(self._norm("norm2", x, p)), approximate="tanh")  # flax nn.gelu's default
        return x + self.mlp_out(h)


class PasswordTransformer(nn.Module):
    """Feature map (B, C, h, w) + password (B, P) -> feature map (residual)."""

    def __init__(self, channels: int, tokens: int, width: int, depth: int, heads: int, mlp_ratio: int,
                 password_mode: str, password_dim: int, password_tokens: int = 4):
        super().__init__()
        self.mode, self.width, self.password_tokens = password_mode, width, password_tokens
        self.tokens_in = nn.Linear(channels, width)
        self.position = nn.Parameter(torch.randn(tokens, width) * 0.02)
        self.password_in = nn.Linear(password_dim, width)
        if password_mode == "cross_attention":
            self.password_memory = nn.Linear(width, password_tokens * width)
        self.blocks = nn.ModuleList(PasswordBlock(width, heads, mlp_ratio, password_mode) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width, eps=1e-5)
        self.tokens_out = nn.Linear(width, channels)

    def forward(self, f, password):
        b, c, h, w = f.shape
        x = self.tokens_in(f.flatten(2).transpose(1, 2)) + self.position[None]
        p = self.password_in(password.to(x.dtype))
        memory = None
        if self.mode == "token":
            x = torch.cat([p[:, None], x], dim=1)
        elif self.mode == "cross_attention":
            memory = self.password_memory(p).view(b, self.password_tokens, self.width)
        for block in self.blocks:
            x = block(x, p, memory)
        if self.mode == "token":
            x = x[:, 1:]
        x = self.tokens_out(self.norm_out(x))
        return f + x.transpose(1, 2).reshape(b, c, h, w)


_HASH_MULTIPLIERS = (np.random.default_rng(20261201).integers(0, 2**31, size=(2, 4096), dtype=np.uint64) * 2 + 1
                     ).astype(np.int64)


def hash_multipliers(password_dim: int):
    """(2, password_dim) int64: the odd multipliers of the password hash (ours: deid_jax.model._HASH_MULTIPLIERS)."""
    return torch.as_tensor(_HASH_MULTIPLIERS[:, :password_dim])


def sign_mask(password, shape, mult=None):
    """A +-1 tensor (B, *shape) per password: its float32 bits hashed to two 32-bit words (as ours), then a
    murmur3 finaliser over the element counter (ours draws threefry rademacher from the hash).  ``mult``:
    ``hash_multipliers`` on the password's device (a module buffer, so torch.compile sees no numpy)."""
    words = password.detach().float().contiguous().view(torch.int32).to(torch.int64) & _MASK32
    mult = (hash_multipliers(words.shape[-1]) if mult is None else mult).to(password.device)
    hashes = (words[:, None, :] * mult[None]).sum(-1) & _MASK32  # (B, 2); int64 wraps, the low 32 bits are exact
    n = math.prod(shape)
    x = (torch.arange(n, device=password.device, dtype=torch.int64)[None] * 0x9E3779B1 + hashes[:, :1]) & _MASK32
    x = x ^ hashes[:, 1:]
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    x = x ^ (x >> 16)
    return (1 - 2 * (x & 1)).to(torch.float32).view(password.shape[0], *shape)


def quantize_8bit(x):
    q = torch.round((x.clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0
    return x + (q - x).detach()


class MedSemDeID(nn.Module):
    """``cfg``: a deid_jax.model.DeidConfig (or anything with its attributes); NCHW images in [-1, 1]."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        c = cfg
        self.image_encoder = ConvEncoder(c.encoder_widths, c.face_channels, c.norm_groups)
        self.fusion = Fusion(c.face_channels, c.med_channels, c.face_channels, c.fusion_blocks, c.norm_groups)
        kw = dict(channels=c.face_channels, tokens=c.grid * c.grid, width=c.width, depth=c.depth, heads=c.heads,
                  mlp_ratio=c.mlp_ratio, password_mode=c.password_mode, password_dim=c.password_dim,
                  password_tokens=c.password_tokens)
        self.encryptor = PasswordTransformer(**kw)
        self.decryptor = PasswordTransformer(**kw)
        self.decoder = ImageDecoder(c.face_channels, c.decoder_widths, c.norm_groups)
        self.reencoder = (ConvEncoder(c.encoder_widths, c.face_channels, c.norm_groups)
                          if c.recover_from == "image" else None)
        self.register_buffer("hash_multipliers", hash_multipliers(c.password_dim), persistent=False)

    def features(self, x, f_med=None):
        return self.fusion(self.image_encoder(x), f_med if self.cfg.med_channels else None)

    def _pad(self, f, password):
        if self.cfg.password_key == "none":
            return f
        return f * sign_mask(password, tuple(f.shape[1:]), self.hash_multipliers).to(f.dtype)

    def deidentify(self, x, f_med, password):
        f_encrypted = self.encryptor(self.features(x, f_med), password)
        return self.decoder(f_encrypted), self._pad(f_encrypted, password)

    def recover(self, encrypted, password):
        if self.reencoder is not None:
            encrypted = self.reencoder(quantize_8bit(encrypted))
        return self.decoder(self.decryptor(self._pad(encrypted, password), password))

    def forward(self, x, f_med, password, wrong_password):
        """Batched as ours: both recoveries in one decryptor batch, the decoder's three inputs in one."""
        n = x.shape[0]
        f = self.features(x, f_med)
        f_encrypted = self.encryptor(f, password)
        f_enc = self._pad(f_encrypted, password)
        passwords = torch.cat([password, wrong_password])
        if self.reencoder is not None:
            x_enc = self.decoder(f_encrypted)
            encrypted = self.reencoder(quantize_8bit(x_enc))
            both = torch.cat([encrypted, encrypted])
            recovered = self.decoder(self.decryptor(self._pad(both, passwords), passwords))
            return SimpleNamespace(f=f, f_enc=f_enc, x_enc=x_enc, x_hat=recovered[:n], x_wrong=recovered[n:])
        decrypted = self.decryptor(self._pad(torch.cat([f_enc, f_enc]), passwords), passwords)
        images = self.decoder(torch.cat([f_encrypted, decrypted]))
        return SimpleNamespace(f=f, f_enc=f_enc, x_enc=images[:n], x_hat=images[n:2 * n], x_wrong=images[2 * n:])


class PatchDiscriminator(nn.Module):
    def __init__(self, widths=(64, 128, 256, 512), norm_groups: int = 32):
        super().__init__()
        self.convs, self.norms = nn.ModuleList(), nn.ModuleList()
        cin = 3
        for i, w in enumerate(widths):
            self.convs.append(nn.Conv2d(cin, w, 4, stride=2 if i < len(widths) - 1 else 1, padding=1))
            self.norms.append(nn.GroupNorm(_groups(w, norm_groups), w, 1e-5) if i else nn.Identity())
            cin = w
        self.logits = nn.Conv2d(cin, 1, 4, padding=1)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = F.leaky_relu(norm(conv(x)), 0.2)
        return self.logits(x)[:, 0]


# ----------------------------------------------------------------------------------------------
# phi: the ArcFace-like IResNet (mema_jax/models/iresnet.py) and the differentiable face crop.


class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout, 0.25)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """(B, 3, 112, 112) in [-1, 1] -> (B, num_features) float32."""

    def __init__(self, depth: str = "r50", width: float = 1.0, num_features: int = 512):
        super().__init__()
        base = int(round(64 * width))
        stages = tuple(base * m for m in (1, 2, 4, 8))
        self.conv1 = nn.Conv2d(3, base, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base, eps=1e-5)
        self.prelu = nn.PReLU(base, 0.25)
        blocks, cin = [], base
        for n, cout in zip(IRESNET_LAYERS[depth], stages):
            for b in range(n):
                blocks.append(IBasicBlock(cin, cout, 2 if b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.fc = nn.Linear(cin * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.bn2(self.layers(x))
        return self.features(self.fc(torch.flatten(x, 1))).float()


def similarity_transform(source, target):
    """(B, K, 2) points -> (B, 2, 3) least-squares similarity taking them onto ``target`` (K, 2)."""
    target = target.expand_as(source)
    ms, mt = source.mean(-2, keepdim=True), target.mean(-2, keepdim=True)
    p, q = source - ms, target - mt
    norm = (p * p).sum((-2, -1))
    a = (p[..., 0] * q[..., 0] + p[..., 1] * q[..., 1]).sum(-1) / norm
    b = (p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0]).sum(-1) / norm
    linear = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)
    shift = mt[:, 0] - torch.einsum("bij,bj->bi", linear, ms[:, 0])
    return torch.cat([linear, shift[..., None]], -1)


def align_faces(images, landmarks, size: int = 112, fill: float = -1.0):
    """Bilinear warp of NCHW images onto the ArcFace crop (pixel centres at integers, edge pixels repeat
    inside [-0.5, size - 0.5), ``fill`` outside): mema_jax.models.face_align.align_faces."""
    template = torch.as_tensor(ARCFACE_TEMPLATE_112, device=images.device)
    m = similarity_transform(landmarks.float(), template)
    a, b, c, d, e, f = (m[:, 0, 0], m[:, 0, 1], m[:, 0, 2], m[:, 1, 0], m[:, 1, 1], m[:, 1, 2])
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    ic, if_ = -(ia * c + ib * f), -(id_ * c + ie * f)
    r = torch.arange(size, device=images.device, dtype=torch.float32)
    ys, xs = torch.meshgrid(r, r, indexing="ij")
    x = ia[:, None, None] * xs + ib[:, None, None] * ys + ic[:, None, None]
    y = id_[:, None, None] * xs + ie[:, None, None] * ys + if_[:, None, None]
    height, width = images.shape[-2:]
    inside = (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)
    grid = torch.stack([2 * x / (width - 1) - 1, 2 * y / (height - 1) - 1], -1)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return torch.where(inside[:, None], out, torch.full_like(out, fill))


# ----------------------------------------------------------------------------------------------
# Enc_med (deid_jax/medical_encoder.py, the diffusion kind) from diffusers modules.


class DiffusionMedicalEncoder(nn.Module):
    """VAE encoder (mode, scaled) if any -> fixed-noise DDPM noising to ``timestep`` -> the UNet's conv_in,
    time embedding and first ``num_down_blocks`` down blocks with a fixed text context."""

    def __init__(self, unet, vae, num_down_blocks: int, timestep: int, alphas_cumprod, context):
        super().__init__()
        self.conv_in, self.time_proj, self.time_embedding = unet.conv_in, unet.time_proj, unet.time_embedding
        self.down_blocks = nn.ModuleList(unet.down_blocks[:num_down_blocks])
        self.vae_encoder = None if vae is None else vae.encoder
        self.quant_conv = None if vae is None else vae.quant_conv
        self.scaling = 1.0 if vae is None else float(vae.config.scaling_factor)
        self.timestep = timestep
        self.signal = float(np.sqrt(alphas_cumprod[timestep]))
        self.sigma = float(np.sqrt(1.0 - alphas_cumprod[timestep]))
        self.register_buffer("context", torch.as_tensor(context), persistent=False)
        self.latent_channels = unet.config.in_channels
        self.factor = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        self.register_buffer("noise", None, persistent=False)

    def prepare(self, image_size: int):
        """The fixed noise pattern for ``image_size`` images (before torch.compile sees the module)."""
        gen = torch.Generator(device="cpu").manual_seed(20240701)
        side = image_size // self.factor
        self.register_buffer("noise", torch.randn((self.latent_channels, side, side), generator=gen).to(self.context.device),
                             persistent=False)
        return self

    def forward(self, images):
        x = images
        if self.vae_encoder is not None:
            moments = self.vae_encoder(images)
            if self.quant_conv is not None:
                moments = self.quant_conv(moments)
            x = moments.chunk(2, dim=1)[0] * self.scaling  # the posterior's mode
        if self.noise is None or self.noise.shape != x.shape[1:]:
            self.prepare(images.shape[-1])
        x = self.signal * x + self.sigma * self.noise[None].to(x.dtype)
        t = torch.full((x.shape[0],), self.timestep, device=x.device, dtype=torch.long)
        emb = self.time_embedding(self.time_proj(t).to(x.dtype))
        context = self.context.to(x.dtype).expand(x.shape[0], -1, -1)
        h = self.conv_in(x)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        return h

    def unet_parameter_count(self) -> int:
        return sum(count_params(m) for m in (self.conv_in, self.time_embedding, self.down_blocks))


def medical_encoder(unet_config: dict, vae_config: dict | None, num_down_blocks: int, timestep: int,
                    alphas_cumprod, context_len: int = 77, image_size: int | None = None):
    """Enc_med with random weights from diffusers configs (the unused UNet parts are dropped); its noise
    pattern is drawn now for ``image_size`` (else at the first call)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(**unet_config)
    vae = AutoencoderKL(**vae_config) if vae_config else None
    context = torch.randn(1, context_len, unet.config.cross_attention_dim)
    encoder = DiffusionMedicalEncoder(unet, vae, num_down_blocks, timestep, np.asarray(alphas_cumprod), context)
    del unet, vae
    return encoder.prepare(image_size) if image_size else encoder


# ----------------------------------------------------------------------------------------------
# Losses (deid_jax/losses.py) and the training step (deid_jax/train.py).


def cosine(a, b, eps: float = 1e-8):
    a, b = a.float(), b.float()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def l1(a, b, dims=None):
    d = (a.float() - b.float()).abs()
    return d.mean() if dims is None else d.mean(dims)


def separation_loss(x, x_hat, x_wrong, margin: float):
    apart = F.relu(margin - l1(x_hat, x_wrong, (1, 2, 3)))
    farther = F.relu(margin + l1(x, x_hat, (1, 2, 3)) - l1(x, x_wrong, (1, 2, 3)))
    return (apart + farther).mean()


class TrainStep:
    """One MedSem-DeID training step: the generator's Adam update, then the discriminator's.

    ``loss``: lambda_rev, lambda_sep, sep_margin, lambda_med, lambda_gan (configs/medsem_deid.py);
    ``optim`` / ``optim_discriminator``: lr, b1, b2, eps of Adam.  ``crop``: "landmarks" or "whole"."""

    def __init__(self, generator, discriminator, phi, medical, *, loss, optim, optim_discriminator,
                 crop: str = "landmarks", fused: bool = False, compile: bool = False):
        self.generator, self.discriminator, self.phi, self.medical = generator, discriminator, phi, medical
        self.cfg = generator.cfg
        self.lw = SimpleNamespace(**dict(loss))
        self.crop = crop
        phi.eval().requires_grad_(False)
        if medical is not None:
            medical.eval().requires_grad_(False)
        generator.train()
        discriminator.train()

        def adam(params, o):
            return torch.optim.Adam(params, lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o.get("eps", 1e-8),
                                    **({"fused": True} if fused else {}))

        self.g_opt = adam(generator.parameters(), optim)
        self.d_opt = adam(discriminator.parameters(), optim_discriminator) if self.lw.lambda_gan else None
        wrap = torch.compile if compile else (lambda m: m)
        self.G, self.D, self.Phi = wrap(generator), wrap(discriminator), wrap(phi)
        self.Med = wrap(medical) if medical is not None else None

    def identity(self, images, landmarks):
        if self.crop == "landmarks":
            crops = align_faces(images, landmarks, 112, fill=-1.0)
        else:
            crops = F.interpolate(images.float(), size=(112, 112), mode="bilinear", antialias=True, align_corners=False)
        return self.Phi(crops)

    def __call__(self, x, landmarks=None):
        lw, cfg = self.lw, self.cfg
        b = x.shape[0]
        password = torch.randn(b, cfg.password_dim, device=x.device)
        wrong = torch.randn(b, cfg.password_dim, device=x.device)
        with torch.no_grad():
            f_med = self.Med(x) if self.Med is not None else None
            phi_x = self.identity(x, landmarks)
        # The generator's update: the discriminator's weights are constants in its loss.
        self.discriminator.requires_grad_(False)
        out = self.G(x, f_med if cfg.med_channels else None, password, wrong)
        fakes = torch.cat([out.x_enc, out.x_hat, out.x_wrong])
        phi_enc, phi_hat, phi_wrong = self.identity(
            fakes, None if landmarks is None else torch.cat([landmarks] * 3)).chunk(3)  # one batch, as ours
        total = (cosine(phi_x, phi_enc).mean() - cosine(phi_x, phi_hat).mean() + cosine(phi_x, phi_wrong).mean()
                 + lw.lambda_rev * l1(x, out.x_hat))
        if lw.lambda_sep:
            total = total + lw.lambda_sep * separation_loss(x, out.x_hat, out.x_wrong, lw.sep_margin)
        if lw.lambda_med:
            total = total + lw.lambda_med * (f_med.float() - self.Med(out.x_enc).float()).square().mean()
        if lw.lambda_gan:
            total = total + lw.lambda_gan * F.softplus(-self.D(fakes).float()).mean()
        self.g_opt.zero_grad(set_to_none=True)
        total.backward()
        self.g_opt.step()
        self.discriminator.requires_grad_(True)
        if not lw.lambda_gan:
            return total.detach()
        # The discriminator's update, against the updated generator with fresh passwords.
        password = torch.randn(b, cfg.password_dim, device=x.device)
        wrong = torch.randn(b, cfg.password_dim, device=x.device)
        with torch.no_grad():
            out = self.G(x, f_med if cfg.med_channels else None, password, wrong)
            fakes = torch.cat([out.x_enc, out.x_hat, out.x_wrong])
        d_loss = F.softplus(-self.D(x).float()).mean() + F.softplus(self.D(fakes).float()).mean()
        self.d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.d_opt.step()
        return total.detach() + d_loss.detach()


def parameter_counts(generator, discriminator=None, phi=None, medical=None) -> dict[str, int]:
    counts = {"generator": count_params(generator)}
    if discriminator is not None:
        counts["discriminator"] = count_params(discriminator)
    if phi is not None:
        counts["identity"] = count_params(phi)
    if medical is not None:
        counts["medical_unet"] = medical.unet_parameter_count()
    return counts
