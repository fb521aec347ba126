"""An independent, minimal re-implementation of the ORIGINAL CompVis latent-diffusion layout.

Written for the tests from the published architecture (LDM paper, its released YAML configs and
parameter names), not copied from the CompVis repositories. It exists only so the tests can build
tiny randomly-initialised CompVis-layout models, save them as CompVis `.ckpt` files, and check
that `lowbitdm_cli.models.compvis` converts them to diffusers modules that compute the same
function.

Module and parameter names follow the CompVis checkpoints exactly (that is what is under test):

* ``UNetModel``: ``time_embed.{0,2}``, ``input_blocks.N.M``, ``middle_block.{0,1,2}``,
  ``output_blocks.N.M``, ``out.{0,2}``; blocks are ``TimestepEmbedSequential`` lists of
  ``ResBlock`` (``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection``),
  ``AttentionBlock`` (``norm``, ``qkv`` conv1d, ``proj_out`` conv1d), ``SpatialTransformer``
  (``norm``, ``proj_in``, ``transformer_blocks.K.{attn1,attn2,ff,norm1,norm2,norm3}``,
  ``proj_out``), ``Downsample`` (``op``) and ``Upsample`` (``conv``).
* ``AttentionBlock`` head ordering: the "legacy" order (the default, ``use_new_attention_order:
  False``) lays the qkv conv's output channels out head by head, ``[h0:(q,k,v), h1:(q,k,v), ...]``;
  the new order lays them out ``[q(all heads), k(all heads), v(all heads)]``. Both are implemented.
* Autoencoders: ``Encoder``/``Decoder`` (``conv_in``, ``down.I.block.J``, ``down.I.downsample``,
  ``mid.block_1``, ``mid.attn_1``, ``mid.block_2``, ``up.I.block.J``, ``up.I.upsample``,
  ``norm_out``, ``conv_out``), ``VQModelInterface`` (``quant_conv``, ``quantize.embedding``,
  ``post_quant_conv``) and ``AutoencoderKL`` (``quant_conv`` to 2*embed_dim moments).
* ``ClassEmbedder``: ``embedding`` (n_classes x embed_dim), output (B, 1, embed_dim).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- UNet (openaimodel)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cosine half first: [cos(t*f_i), sin(t*f_i)], f_i = P^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def norm32(ch: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=eps)


class Downsample(nn.Module):
    def __init__(self, ch: int, use_conv: bool) -> None:
        super().__init__()
        self.use_conv = use_conv
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int, use_conv: bool) -> None:
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
    def __init__(self, ch: int, emb_ch: int, out_ch: int, scale_shift: bool = False,
                 up: bool = False, down: bool = False) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(norm32(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(ch, False), Upsample(ch, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(ch, False), Downsample(ch, False)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch))
        self.out_layers = nn.Sequential(norm32(out_ch), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


def _qkv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v: (B*, d, T) → (B*, d, T), softmax over keys with 1/sqrt(d)."""
    w = torch.einsum("bct,bcs->bts", q, k) / math.sqrt(q.shape[1])
    w = w.softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", w, v)


class AttentionBlock(nn.Module):
    """Spatial self-attention over all positions (ADM-style), residual."""

    def __init__(self, ch: int, num_heads: int, new_order: bool = False) -> None:
        super().__init__()
        self.heads = num_heads
        self.new_order = new_order
        self.norm = norm32(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        n, d = self.heads, c // self.heads
        t = qkv.shape[-1]
        if self.new_order:
            q, k, v = (z.reshape(b * n, d, t) for z in qkv.chunk(3, dim=1))
        else:  # legacy: per head, (q, k, v) contiguous
            q, k, v = qkv.reshape(b * n, 3 * d, t).split(d, dim=1)
        h = _qkv_attention(q, k, v).reshape(b, c, t)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        b, n, inner = q.shape
        h = self.heads

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(b, z.shape[1], h, inner // h).permute(0, 2, 1, 3)

        q, k, v = split(q), split(k), split(v)
        w = (q @ k.transpose(-1, -2)) * (inner // h) ** -0.5
        out = w.softmax(dim=-1) @ v
        return self.to_out(out.permute(0, 2, 1, 3).reshape(b, n, inner))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, ch: int, heads: int, dim_head: int, depth: int, context_dim: int | None) -> None:
        super().__init__()
        inner = heads * dim_head
        self.norm = norm32(ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))
        self.proj_out = nn.Conv2d(inner, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        b, _, hh, ww = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(1, 2).reshape(b, -1, hh, ww)
        return self.proj_out(h) + x


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """The CompVis ``openaimodel.UNetModel``, built from its YAML ``unet_config.params``."""

    def __init__(self, *, in_channels: int, model_channels: int, out_channels: int, num_res_blocks: int,
                 attention_resolutions: list[int], channel_mult: list[int], num_heads: int = -1,
                 num_head_channels: int = -1, use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, use_spatial_transformer: bool = False,
                 transformer_depth: int = 1, context_dim: int | None = None, conv_resample: bool = True,
                 **_ignored: Any) -> None:
        super().__init__()
        mc = model_channels
        self.model_channels = mc
        ted = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))

        def attn(ch: int) -> nn.Module:
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if use_spatial_transformer:
                return SpatialTransformer(ch, heads, dim_head, transformer_depth, context_dim)
            return AttentionBlock(ch, heads, use_new_attention_order)

        def res(ch: int, out: int, **kw: bool) -> ResBlock:
            return ResBlock(ch, ted, out, use_scale_shift_norm, **kw)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, mc, 3, padding=1))])
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + chans.pop(), mc * mult)]
                ch = mc * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(norm32(ch), nn.SiLU(), nn.Conv2d(mc, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


# ----------------------------------------------------------------------------- autoencoders (model.py)


def _norm6(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6)


class AEResnetBlock(nn.Module):
    def __init__(self, ch: int, out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm6(ch), nn.Conv2d(ch, out, 3, padding=1)
        self.norm2, self.conv2 = _norm6(out), nn.Conv2d(out, out, 3, padding=1)
        if ch != out:
            self.nin_shortcut = nn.Conv2d(ch, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AEAttnBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = _norm6(ch)
        self.q, self.k, self.v = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(b, c, hh * ww) for m in (self.q, self.k, self.v))
        h = _qkv_attention(q, k, v).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class AEDownsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad right/bottom


class AEUpsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: list[int], num_res_blocks: int, attn_resolutions: list[int],
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True, **_ignored: Any) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, block_in = resolution, ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(AEResnetBlock(block_in, ch * mult))
                block_in = ch * mult
                if res in attn_resolutions:
                    stage.attn.append(AEAttnBlock(block_in))
            if level != len(ch_mult) - 1:
                stage.downsample = AEDownsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = AEResnetBlock(block_in, block_in), AEAttnBlock(block_in)
        self.mid.block_2 = AEResnetBlock(block_in, block_in)
        self.norm_out = _norm6(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for j, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[j](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch: int, out_ch: int, ch_mult: list[int], num_res_blocks: int, attn_resolutions: list[int],
                 resolution: int, z_channels: int, **_ignored: Any) -> None:
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = AEResnetBlock(block_in, block_in), AEAttnBlock(block_in)
        self.mid.block_2 = AEResnetBlock(block_in, block_in)
        ups: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(AEResnetBlock(block_in, ch * ch_mult[level]))
                block_in = ch * ch_mult[level]
                if res in attn_resolutions:
                    stage.attn.append(AEAttnBlock(block_in))
            if level != 0:
                stage.upsample = AEUpsample(block_in)
                res *= 2
            ups.insert(0, stage)  # up[i] is level i: the checkpoint indexes by level, not by order
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm6(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for j, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[j](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codebook entry per position: argmin ||z - e||^2 (expanded form)."""
        zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        e = self.embedding.weight
        d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1)[None] - 2 * zf @ e.t()
        return d.argmin(dim=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = z.shape
        zq = self.embedding(self.indices(z)).reshape(b, hh, ww, c).permute(0, 3, 1, 2)
        return zq


class VQModelInterface(nn.Module):
    """VQ first stage; `decode` quantizes its input first (as LatentDiffusion's decode does)."""

    def __init__(self, *, embed_dim: int, n_embed: int, ddconfig: dict, **_ignored: Any) -> None:
        super().__init__()
        self.encoder, self.decoder = Encoder(**ddconfig), Decoder(**ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        q = h if force_not_quantize else self.quantize(h)
        return self.decoder(self.post_quant_conv(q))


class AutoencoderKL(nn.Module):
    def __init__(self, *, embed_dim: int, ddconfig: dict, **_ignored: Any) -> None:
        super().__init__()
        self.encoder, self.decoder = Encoder(**ddconfig), Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of the diagonal Gaussian posterior."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


class ClassEmbedder(nn.Module):
    def __init__(self, *, embed_dim: int, n_classes: int = 1000, **_ignored: Any) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels)[:, None]  # (B, 1, D): a one-token cross-attention context


# ----------------------------------------------------------------------------- LatentDiffusion container


def make_beta_schedule(kind: str, n: int, start: float, end: float) -> torch.Tensor:
    """CompVis `make_beta_schedule`: "linear" is linear in sqrt(beta); "sqrt_linear" linear in beta."""
    if kind == "linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    if kind == "sqrt_linear":
        return torch.linspace(start, end, n, dtype=torch.float64)
    raise ValueError(kind)


class _Wrapper(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = unet


class LatentDiffusion(nn.Module):
    """Holds the three sub-models under their checkpoint prefixes, plus the schedule buffers."""

    def __init__(self, params: dict, first_stage: nn.Module, cond_stage: nn.Module | None) -> None:
        super().__init__()
        self.model = _Wrapper(UNetModel(**params["unet_config"]["params"]))
        self.first_stage_model = first_stage
        if cond_stage is not None:
            self.cond_stage_model = cond_stage
        betas = make_beta_schedule(params.get("beta_schedule", "linear"), params.get("timesteps", 1000),
                                   params.get("linear_start", 1e-4), params.get("linear_end", 2e-2))
        ac = torch.cumprod(1 - betas, 0)
        self.register_buffer("betas", betas.float())
        self.register_buffer("alphas_cumprod", ac.float())
        self.register_buffer("alphas_cumprod_prev", torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]]).float())
        self.register_buffer("sqrt_alphas_cumprod", ac.sqrt().float())


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter a non-trivial random value (no zero-initialised output convs, non-unit norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module
