"""Load CompVis latent diffusion checkpoints (`.ckpt`/`.safetensors` + YAML) as diffusers modules.

Modules: `files` (locate and read checkpoint and YAML, never unpickling code), `translate` (YAML →
diffusers configs and schedule), `keymap` (CompVis keys → diffusers keys, strict loading),
`modules` (the result type and the per-level-heads UNet), `load` (`load_compvis`, the entry point).

The papers quantize the original CompVis LDMs: LDM-4 ImageNet (``cin256-v2``, class-conditional
through cross-attention on a one-token ``ClassEmbedder`` context), LDM-4 LSUN-Bedroom and LDM-8
LSUN-Church (unconditional), and Stable Diffusion v1.x (text cross-attention; only UNet and VAE are
converted here, the CLIP text encoder is reported, not loaded). `load_compvis` reads the YAML with
``yaml.safe_load`` and the checkpoint with ``torch.load(weights_only=True)`` (or safetensors), builds
the matching diffusers modules and maps every CompVis key onto them, strictly.

Key mapping (CompVis → diffusers), written here and verified against an independent
re-implementation of the CompVis layout in ``tests/models/compvis_reference.py``:

UNet (``model.diffusion_model.*``; ``nrb`` = ``num_res_blocks``)
  ``time_embed.{0,2}`` → ``time_embedding.linear_{1,2}``; ``input_blocks.0.0`` → ``conv_in``;
  ``out.{0,2}`` → ``conv_norm_out``/``conv_out``.
  ``input_blocks.i`` (i ≥ 1): level ``(i-1)//(nrb+1)``, slot ``(i-1)%(nrb+1)``; slots < nrb hold
  ``.0`` ResBlock → ``down_blocks.L.resnets.S`` and ``.1`` attention → ``down_blocks.L.attentions.S``;
  slot nrb is the downsampler: ``.0.op`` conv → ``downsamplers.0.conv`` or, with ``resblock_updown``,
  a ResBlock → ``downsamplers.0``.
  ``middle_block.{0,1,2}`` → ``mid_block.resnets.0``, ``mid_block.attentions.0``, ``mid_block.resnets.1``.
  ``output_blocks.i``: up block ``i//(nrb+1)``, slot ``i%(nrb+1)``: ``.0`` ResBlock → ``resnets.S``,
  ``.1`` attention (on attention levels) → ``attentions.S``, the last layer of the last slot of
  every level but the lowest is the upsampler (``.conv`` → ``upsamplers.0.conv``; a ResBlock with
  ``resblock_updown`` → ``upsamplers.0``).
  ResBlock: ``in_layers.0/2`` → ``norm1``/``conv1``, ``emb_layers.1`` → ``time_emb_proj``,
  ``out_layers.0/3`` → ``norm2``/``conv2``, ``skip_connection`` → ``conv_shortcut``.
  SpatialTransformer → ``Transformer2DModel``: same names (``norm``, ``proj_in``,
  ``transformer_blocks.K.{attn1,attn2,ff,norm1..3}``, ``proj_out``).
  AttentionBlock → diffusers ``Attention``: ``norm`` → ``group_norm``; the ``qkv`` conv1d (3C×C×1) is
  split into ``to_q``/``to_k``/``to_v`` linears — in the legacy head order (default) the output
  channels are ``[head0: q,k,v | head1: q,k,v | ...]``, with ``use_new_attention_order`` they are
  ``[q | k | v]``; ``proj_out`` conv1d → ``to_out.0`` linear.

Autoencoder (``first_stage_model.*``)
  ``encoder.down.I.block.J`` → ``encoder.down_blocks.I.resnets.J``; ``encoder.down.I.downsample.conv``
  → ``encoder.down_blocks.I.downsamplers.0.conv``; ``decoder.up.I.*`` (indexed by resolution level)
  → ``decoder.up_blocks.{L-1-I}.*`` (indexed by execution order), ``upsample.conv`` →
  ``upsamplers.0.conv``; ``{encoder,decoder}.mid.block_{1,2}`` → ``mid_block.resnets.{0,1}``;
  ``mid.attn_1.{norm,q,k,v,proj_out}`` (1×1 convs) → ``mid_block.attentions.0.{group_norm,to_q,
  to_k,to_v,to_out.0}`` (linears); ``norm_out`` → ``conv_norm_out``; ResnetBlock ``nin_shortcut`` →
  ``conv_shortcut``; ``quant_conv``, ``post_quant_conv`` and the VQ codebook
  ``quantize.embedding.weight`` keep their names.

Class embedder (``cond_stage_model.embedding.weight``) → an ``nn.Embedding``.

Head counts: for ``UNet2DConditionModel`` diffusers' ``attention_head_dim`` is the number of heads
(one int, or one per level for ``num_head_channels`` configs); for ``UNet2DModel`` it is the head
dim. An AttentionBlock UNet whose head dim differs between levels (``num_heads`` over levels of
different width, as in LSUN-Church) becomes a `CompVisUNet2DModel`, which records the per-level
head counts in its config.

Anything this module does not know how to map is refused with a one-line error; it never builds
a model that would silently compute something else.
"""

from __future__ import annotations

from lowbitdm_cli.models.compvis.files import compvis_files, read_checkpoint, read_config
from lowbitdm_cli.models.compvis.keymap import (  # noqa: F401 - the steps tests compare with diffusers' converters
    UNET_PREFIX,
    VAE_PREFIX,
    _load_strict,
    _map_unet,
    _map_vae,
)
from lowbitdm_cli.models.compvis.load import load_compvis
from lowbitdm_cli.models.compvis.modules import CompVisModel, CompVisUNet2DModel
from lowbitdm_cli.models.compvis.translate import _diffusers_unet_config, _unet_layout, _vae_config  # noqa: F401

__all__ = ["CompVisModel", "CompVisUNet2DModel", "compvis_files", "load_compvis", "read_checkpoint", "read_config"]
