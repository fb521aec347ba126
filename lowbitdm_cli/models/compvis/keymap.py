"""CompVis state-dict keys → diffusers module keys (UNet, autoencoder), loaded strictly.

The mapping is described in the package docstring (`lowbitdm_cli.models.compvis`)."""

from __future__ import annotations

import re

import torch
from torch import nn

from lowbitdm_cli.models.compvis.files import _fail
from lowbitdm_cli.models.compvis.translate import _UNetLayout

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."

#: LatentDiffusion buffers stored next to the sub-models; read for cross-checks, never mapped.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "lvlb_weights", "logvar", "scale_factor",
})



# ----------------------------------------------------------------------------- key mapping


_RES_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
              "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


class _Mapper:
    """Collects target tensors and remembers which source keys found no place."""

    def __init__(self, src: dict[str, torch.Tensor], what: str) -> None:
        self.src, self.what = src, what
        self.out: dict[str, torch.Tensor] = {}
        self.unmapped: list[str] = []

    def put(self, key: str, value: torch.Tensor) -> None:
        if key in self.out:
            raise _fail(f"{self.what}: two checkpoint keys map to {key}")
        self.out[key] = value


def _resnet(m: _Mapper, rest: str, value: torch.Tensor, dst: str, src_key: str) -> None:
    for old, new in _RES_NAMES.items():
        if rest.startswith(old + "."):
            m.put(f"{dst}.{new}{rest[len(old):]}", value)
            return
    m.unmapped.append(src_key)


def _attention_block(m: _Mapper, prefix: str, dst: str, heads: int, new_order: bool) -> None:
    """CompVis AttentionBlock (norm, qkv conv1d, proj_out conv1d) → diffusers Attention."""
    for leaf in ("weight", "bias"):
        for old, new in (("norm", "group_norm"), ("proj_out", "to_out.0")):
            k = f"{prefix}.{old}.{leaf}"
            if k in m.src:
                t = m.src[k]
                m.put(f"{dst}.{new}.{leaf}", t[..., 0] if t.ndim == 3 else t)
        k = f"{prefix}.qkv.{leaf}"
        if k not in m.src:
            continue
        t = m.src[k]
        t = t[..., 0] if t.ndim == 3 else t  # conv1d (3C, C, 1) → (3C, C); bias (3C,)
        c3 = t.shape[0]
        if c3 % (3 * heads):
            raise _fail(f"{m.what}: {k} has {c3} output channels, not 3 x {heads} heads x head dim")
        if new_order:  # [q | k | v]
            q, kk, v = t.chunk(3, dim=0)
        else:  # legacy: [h0:(q,k,v) | h1:(q,k,v) | ...]
            per = t.reshape(heads, 3, c3 // (3 * heads), *t.shape[1:])
            q, kk, v = (per[:, i].reshape(c3 // 3, *t.shape[1:]) for i in range(3))
        for name, part in (("to_q", q), ("to_k", kk), ("to_v", v)):
            m.put(f"{dst}.{name}.{leaf}", part.contiguous())


def _map_unet(src: dict[str, torch.Tensor], lay: _UNetLayout) -> _Mapper:
    m = _Mapper(src, "UNet")
    n, per = len(lay.mult), lay.nrb + 1
    attn_done: set[str] = set()
    simple = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}

    def attention(src_prefix: str, dst: str, heads: int, key: str) -> None:
        if lay.spatial:  # SpatialTransformer ↔ Transformer2DModel share their names
            m.put(dst + key[len(src_prefix):], src[key])
        elif src_prefix not in attn_done:
            attn_done.add(src_prefix)
            _attention_block(m, src_prefix, dst, heads, lay.new_order)
            used = {f"{src_prefix}.{a}.{b}" for a in ("norm", "qkv", "proj_out") for b in ("weight", "bias")}
            m.unmapped.extend(k for k in src if k.startswith(src_prefix + ".") and k not in used)

    for key, value in src.items():
        head = key.rsplit(".", 1)[0]
        leaf = key.rsplit(".", 1)[1]
        if head in simple:
            m.put(f"{simple[head]}.{leaf}", value)
            continue
        mt = re.match(r"(input_blocks|output_blocks|middle_block)\.(\d+)\.(?:(\d+)\.)?(.+)$", key)
        if not mt:
            m.unmapped.append(key)
            continue
        part, i, j, rest = mt.group(1), int(mt.group(2)), mt.group(3), mt.group(4)
        if part == "middle_block":
            j, rest = i, (mt.group(3) + "." if mt.group(3) else "") + rest
            if j in (0, 2):
                _resnet(m, rest, value, f"mid_block.resnets.{j // 2}", key)
            elif j == 1:
                attention("middle_block.1", "mid_block.attentions.0", lay.heads[-1], key)
            else:
                m.unmapped.append(key)
            continue
        if j is None:
            m.unmapped.append(key)
            continue
        j = int(j)
        if part == "input_blocks":
            if i == 0:
                m.unmapped.append(key)
                continue
            level, slot = divmod(i - 1, per)
            if level >= n:
                m.unmapped.append(key)
            elif slot < lay.nrb:
                if j == 0:
                    _resnet(m, rest, value, f"down_blocks.{level}.resnets.{slot}", key)
                elif j == 1 and lay.attn_levels[level]:
                    attention(f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{slot}", lay.heads[level], key)
                else:
                    m.unmapped.append(key)
            elif j == 0 and level < n - 1:
                if lay.updown:
                    _resnet(m, rest, value, f"down_blocks.{level}.downsamplers.0", key)
                elif rest in ("op.weight", "op.bias"):
                    m.put(f"down_blocks.{level}.downsamplers.0.conv.{leaf}", value)
                else:
                    m.unmapped.append(key)
            else:
                m.unmapped.append(key)
        else:  # output_blocks
            block, slot = divmod(i, per)
            level = n - 1 - block
            has_attn = level >= 0 and lay.attn_levels[level]
            up_j = (2 if has_attn else 1) if (level > 0 and slot == lay.nrb) else None
            if level < 0:
                m.unmapped.append(key)
            elif j == 0:
                _resnet(m, rest, value, f"up_blocks.{block}.resnets.{slot}", key)
            elif j == 1 and has_attn:
                attention(f"output_blocks.{i}.1", f"up_blocks.{block}.attentions.{slot}", lay.heads[level], key)
            elif j == up_j:
                if lay.updown:
                    _resnet(m, rest, value, f"up_blocks.{block}.upsamplers.0", key)
                elif rest in ("conv.weight", "conv.bias"):
                    m.put(f"up_blocks.{block}.upsamplers.0.conv.{leaf}", value)
                else:
                    m.unmapped.append(key)
            else:
                m.unmapped.append(key)
    return m


_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _map_vae(src: dict[str, torch.Tensor], n_levels: int) -> _Mapper:
    m = _Mapper(src, "autoencoder")

    def resnet(rest: str, value: torch.Tensor, dst: str, key: str) -> None:
        mt = re.match(r"(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)$", rest)
        if not mt:
            m.unmapped.append(key)
            return
        name = "conv_shortcut" if mt.group(1) == "nin_shortcut" else mt.group(1)
        m.put(f"{dst}.{name}.{mt.group(2)}", value)

    for key, value in src.items():
        if key in ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias",
                   "quantize.embedding.weight"):
            m.put(key, value)
            continue
        mt = re.match(r"(encoder|decoder)\.(.+)$", key)
        if not mt:
            m.unmapped.append(key)
            continue
        side, rest = mt.group(1), mt.group(2)
        if re.match(r"(conv_in|conv_out)\.(weight|bias)$", rest):
            m.put(key, value)
        elif re.match(r"norm_out\.(weight|bias)$", rest):
            m.put(f"{side}.conv_norm_out.{rest.split('.')[-1]}", value)
        elif mt2 := re.match(r"mid\.block_([12])\.(.+)$", rest):
            resnet(mt2.group(2), value, f"{side}.mid_block.resnets.{int(mt2.group(1)) - 1}", key)
        elif mt2 := re.match(r"mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", rest):
            v = value[:, :, 0, 0] if value.ndim == 4 else value  # 1x1 conv → linear
            m.put(f"{side}.mid_block.attentions.0.{_VAE_ATTN[mt2.group(1)]}.{mt2.group(2)}", v)
        elif side == "encoder" and (mt2 := re.match(r"down\.(\d+)\.block\.(\d+)\.(.+)$", rest)):
            resnet(mt2.group(3), value, f"encoder.down_blocks.{mt2.group(1)}.resnets.{mt2.group(2)}", key)
        elif side == "encoder" and (mt2 := re.match(r"down\.(\d+)\.downsample\.conv\.(weight|bias)$", rest)):
            m.put(f"encoder.down_blocks.{mt2.group(1)}.downsamplers.0.conv.{mt2.group(2)}", value)
        elif side == "decoder" and (mt2 := re.match(r"up\.(\d+)\.block\.(\d+)\.(.+)$", rest)):
            blk = n_levels - 1 - int(mt2.group(1))
            resnet(mt2.group(3), value, f"decoder.up_blocks.{blk}.resnets.{mt2.group(2)}", key)
        elif side == "decoder" and (mt2 := re.match(r"up\.(\d+)\.upsample\.conv\.(weight|bias)$", rest)):
            blk = n_levels - 1 - int(mt2.group(1))
            m.put(f"decoder.up_blocks.{blk}.upsamplers.0.conv.{mt2.group(2)}", value)
        else:
            m.unmapped.append(key)
    return m


def _load_strict(module: nn.Module, m: _Mapper, prefix: str, where: str) -> None:
    """Load `m.out` into `module` with strict=True, after a check that names what does not fit."""
    if m.unmapped:
        keys = ", ".join(prefix + k for k in sorted(m.unmapped)[:5])
        more = f" (+{len(m.unmapped) - 5} more)" if len(m.unmapped) > 5 else ""
        raise _fail(f"{where}: checkpoint keys this converter cannot place: {keys}{more} — the config does not "
                    "describe this checkpoint, or the layout is unsupported")
    expected = module.state_dict()
    missing = [k for k in expected if k not in m.out]
    extra = [k for k in m.out if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing for diffusers {', '.join(missing[:5])}" + (f" (+{len(missing) - 5})" if len(missing) > 5 else ""))
        if extra:
            parts.append(f"no diffusers slot for {', '.join(extra[:5])}" + (f" (+{len(extra) - 5})" if len(extra) > 5 else ""))
        raise _fail(f"{where}: checkpoint does not match its config: {'; '.join(parts)}")
    bad = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in m.out.items() if v.shape != expected[k].shape]
    if bad:
        k, got, want = bad[0]
        raise _fail(f"{where}: {k}: checkpoint shape {got} != {want} from the config"
                    + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""))
    module.load_state_dict(m.out, strict=True)


