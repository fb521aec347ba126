"""Layer policy: which module is quantized at which bits, decided by role and name pattern.

The classes (`QuantScheme`, `LayerSpec`) live in `quant.config`; this module applies a scheme to
a model's modules.

Roles are recognised from diffusers module names, never from hard-coded indices, for every
family (UNet2DModel, UNet2DConditionModel, DiT / Transformer2DModel):
``conv_in`` / ``conv_out`` (the first and last layer: a UNet's convs, DiT's patch embedding
``pos_embed.proj`` and its final ``proj_out_1`` / ``proj_out_2``), ``time_embedding`` (the
timestep MLP, DiT's ``timestep_embedder`` too), ``class_embedding`` (layers of a label /
class embedding), ``adaln`` (DiT's adaLN-Zero modulation ``norm1.linear``), ``time_emb_proj``
(ResBlock projections of the time embedding), ``shortcut`` (1x1 ResBlock skips),
``downsample``, ``upsample``, ``attention`` (self-attention to_q/k/v/out), ``cross_attention``
(``attn2``: queries from the image, keys/values from the text or class context; recipes may
keep it at 8 bit or FP), ``feed_forward``, and plain ``conv``/``linear``.
With ``attn_matmul`` on, every diffusers ``Attention`` module also gets a spec of role
``attention_matmul`` (kind ``matmul``): the inputs of QKᵀ and softmax·V are quantized.

Inside the attention and feed-forward roles a layer also has a *part* (`layer_part`):
``attention_qkv`` (to_q / to_k / to_v), ``attention_out`` (to_out.0, proj_attn), ``ff_in``
(ff.net.0.proj, the GELU/GEGLU input projection) and ``ff_out`` (ff.net.2). ``keep_8bit``,
``skip`` and the transformer-method scopes (``a_per_token``, ``smooth``, ``rotate``,
``low_rank``) accept a role or a part; the scopes also take fnmatch patterns of layer names.
The transformer methods apply to linear layers only (a conv in scope is left as it is).
"""

from __future__ import annotations

from fnmatch import fnmatch

from torch import nn

from lowbitdm_cli.errors import RecipeError
from lowbitdm_cli.quant.config import PARTS, ROLES, LayerOverride, LayerSpec, QuantScheme
from lowbitdm_cli.quant.transforms import hadamard_block

__all__ = ["PARTS", "ROLES", "LayerOverride", "LayerSpec", "QuantPolicy", "QuantScheme", "build_layer_specs",
           "in_scope", "layer_part", "layer_role"]

# the scheme is what decides each layer's spec; the old name stays for callers
QuantPolicy = QuantScheme


_FIRST = ("conv_in", "pos_embed.proj")  # UNets' first conv; DiT's patch embedding
_LAST = ("conv_out", "proj_out", "proj_out_1", "proj_out_2")  # top-level only: inner proj_out are not last
_ATTN_LEAVES = ("to_q", "to_k", "to_v", "query", "key", "value", "proj_attn")


def layer_role(name: str, module: nn.Module) -> str:
    """The role of a Conv2d/Linear from its qualified name."""
    parts = name.split(".")
    leaf = parts[-1]
    if name in _FIRST:
        return "conv_in"
    if name in _LAST:
        return "conv_out"
    if parts[0] in ("time_embedding", "time_embed", "t_embedder") or "timestep_embedder" in parts:
        return "time_embedding"
    if any(p in ("class_embedding", "class_embedder", "label_emb", "add_embedding") for p in parts):
        return "class_embedding"
    if len(parts) > 1 and leaf == "linear" and parts[-2] in ("norm1", "norm2", "norm3", "norm_out"):
        return "adaln"
    if leaf in ("time_emb_proj", "emb_layers") or (len(parts) > 1 and parts[-2] == "emb_layers"):
        return "time_emb_proj"
    if leaf in ("conv_shortcut", "skip_connection", "nin_shortcut"):
        return "shortcut"
    if "downsamplers" in parts or "downsample" in parts:
        return "downsample"
    if "upsamplers" in parts or "upsample" in parts:
        return "upsample"
    if leaf in _ATTN_LEAVES or "to_out" in parts:
        return "cross_attention" if "attn2" in parts else "attention"
    if "ff" in parts or leaf in ("ff", "proj_in_ff"):
        return "feed_forward"
    return "conv" if isinstance(module, nn.Conv2d) else "linear"


_QKV_LEAVES = ("to_q", "to_k", "to_v", "query", "key", "value", "add_q_proj", "add_k_proj", "add_v_proj")


def layer_part(name: str) -> str | None:
    """The finer label of an attention or feed-forward linear (`PARTS`), or None."""
    parts = name.split(".")
    leaf = parts[-1]
    if leaf in _QKV_LEAVES:
        return "attention_qkv"
    if leaf == "proj_attn" or (len(parts) > 1 and parts[-2] in ("to_out", "to_add_out")):
        return "attention_out"
    if "ff" in parts and "net" in parts:
        i = parts.index("net")
        if i + 1 < len(parts):
            return "ff_in" if parts[i + 1] == "0" else "ff_out" if parts[i + 1] == "2" else None
    return None


def in_scope(scope: list[str], name: str, role: str, part: str | None) -> bool:
    """Whether a layer is named by a scope: one of its entries is the layer's role or part, or an
    fnmatch pattern matching its qualified name."""
    return any(entry in (role, part) or (entry not in ROLES + PARTS and fnmatch(name, entry)) for entry in scope)


def _bits(value: int | str | None, default: int | None) -> int | None:
    if value is None:
        return default
    return None if value == "fp" else int(value)


def _is_attention(module: nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention

    return isinstance(module, Attention)


def build_layer_specs(denoiser: nn.Module, policy: QuantScheme) -> dict[str, LayerSpec]:
    """A `LayerSpec` for every Conv2d/Linear of `denoiser` that gets any quantizer, and for every
    attention module whose matmuls are quantized (`policy.attn_matmul`)."""
    specs: dict[str, LayerSpec] = {}
    names = [n for n, m in denoiser.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    _check_scopes(policy, names)
    for name, module in denoiser.named_modules():
        if policy.attn_matmul and policy.a_bits is not None and _is_attention(module):
            spec = _matmul_spec(name, policy)
            if spec is not None:
                specs[name] = spec
            continue
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        role, part = layer_role(name, module), layer_part(name)
        w_bits, a_bits = policy.w_bits, policy.a_bits
        if role in policy.skip or part in policy.skip:
            w_bits = a_bits = None
        elif role in policy.keep_8bit or part in policy.keep_8bit:
            w_bits = 8 if w_bits is not None else None
            a_bits = 8 if a_bits is not None else None
        for ov in policy.overrides:
            if fnmatch(name, ov.pattern):
                w_bits, a_bits = _bits(ov.w_bits, w_bits), _bits(ov.a_bits, a_bits)
        if w_bits is None and a_bits is None:
            continue
        spec = LayerSpec(role=role, part=part, kind="conv" if isinstance(module, nn.Conv2d) else "linear",
                         w_bits=w_bits, a_bits=a_bits, w_per_channel=policy.w_per_channel,
                         w_symmetric=policy.w_symmetric, a_symmetric=policy.a_symmetric,
                         a_temporal=policy.a_temporal, lsq_grad_scale=policy.lsq_grad_scale)
        if isinstance(module, nn.Linear):
            spec = _with_transforms(spec, name, module, policy)
        specs[name] = spec
    return specs


def _with_transforms(spec: LayerSpec, name: str, linear: nn.Linear, policy: QuantScheme) -> LayerSpec:
    """`spec` with the transformer methods whose scope names this linear layer. Per-token inputs
    are symmetric and have no timestep slots; a low-rank branch needs a quantized weight and a rank
    below min(O, K); rotation needs a power-of-two block of at least 2 dividing in_features."""
    update: dict = {}
    scoped = {key: in_scope(getattr(policy, key), name, spec.role, spec.part)
              for key in ("a_per_token", "smooth", "rotate", "low_rank")}
    if scoped["a_per_token"] and spec.a_bits is not None:
        update.update(a_dynamic=True, a_symmetric=True, a_temporal=False, lsq_grad_scale=False)
    if scoped["smooth"]:
        update["smooth"] = True
    block = hadamard_block(linear.in_features)
    if scoped["rotate"] and block >= 2:
        update["rotate"] = block
    if scoped["low_rank"] and spec.w_bits is not None and policy.low_rank_dim < min(linear.weight.shape):
        update["low_rank"] = policy.low_rank_dim
    return spec.model_copy(update=update) if update else spec


def _check_scopes(policy: QuantScheme, names: list[str]) -> None:
    """A scope entry that is neither a role, a part nor a pattern matching some layer is a typo."""
    for key in ("a_per_token", "smooth", "rotate", "low_rank"):
        for entry in getattr(policy, key):
            if entry not in ROLES + PARTS and not any(fnmatch(n, entry) for n in names):
                raise RecipeError(f"quant.{key}: {entry!r} is no role ({', '.join(ROLES)}), no part "
                                  f"({', '.join(PARTS)}) and matches no layer of this model")


def _matmul_spec(name: str, policy: QuantScheme) -> LayerSpec | None:
    """QKᵀ / softmax·V inputs at the activation bits (role rules and overrides apply to a_bits).

    A cross-attention module's (``attn2``) matmuls also follow the ``cross_attention`` role, so
    keeping cross-attention at 8 bit or in full precision covers its matmuls too."""
    role = "attention_matmul"
    roles = {role, "cross_attention"} if name.split(".")[-1] == "attn2" else {role}
    if roles & set(policy.skip):
        a_bits = None
    else:
        a_bits = 8 if roles & set(policy.keep_8bit) else policy.a_bits
    for ov in policy.overrides:
        if fnmatch(name, ov.pattern):
            a_bits = _bits(ov.a_bits, a_bits)
    if a_bits is None:
        return None
    return LayerSpec(role=role, kind="matmul", a_bits=a_bits, a_symmetric=policy.a_symmetric,
                     a_temporal=policy.a_temporal, lsq_grad_scale=policy.lsq_grad_scale,
                     p_bits=policy.attn_softmax_bits)
