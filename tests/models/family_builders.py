"""Tiny, randomly initialised models in each diffusers format, written to folders (nothing downloaded).

Each builder seeds torch, builds the components at toy sizes (latents 4x4, images 8x8) and
saves them the way a user's copy of the real checkpoint is laid out on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["build_class_ldm", "build_clip", "build_ddpm", "build_dit", "build_ldm", "build_pixel_dit", "build_sd",
           "tiny_tokenizer"]

_CHARS = "abcdefghijklmnopqrstuvwxyz"


def _vq():  # noqa: ANN202 - 8x8 RGB <-> 3x4x4 latents
    from diffusers import VQModel

    return VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                   down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), norm_num_groups=4,
                   up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), num_vq_embeddings=16, vq_embed_dim=3)


def _kl():  # noqa: ANN202 - 8x8 RGB <-> 4x4x4 latents
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         layers_per_block=1, norm_num_groups=4, sample_size=8,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))


def _cond_unet(in_channels: int, context_dim: int):  # noqa: ANN202
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=4, in_channels=in_channels, out_channels=in_channels,
                                block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=context_dim, attention_head_dim=4)


def build_ddpm(path: Path) -> Path:
    """DDPMPipeline: unconditional 3x8x8 UNet2DModel, cosine (squaredcos_cap_v2) schedule."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(path)
    return path


def build_ldm(path: Path) -> Path:
    """LDMPipeline: unconditional UNet2DModel on 3x4x4 latents of a VQModel, linear schedule."""
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel

    torch.manual_seed(1)
    unet = UNet2DModel(sample_size=4, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4)
    sched = DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="linear")
    LDMPipeline(vqvae=_vq(), unet=unet, scheduler=sched).save_pretrained(path)
    return path


def build_class_ldm(path: Path, num_classes: int = 4) -> Path:
    """Class-conditional LDM (CompVis cin256 layout): class-embedding context into a UNet2DConditionModel."""
    from lowbitdm_cli.models.families import save_class_ldm_folder

    torch.manual_seed(2)
    emb = nn.Embedding(num_classes + 1, 8)
    sched = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0195,
             "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
    return save_class_ldm_folder(path, _cond_unet(3, 8), emb, _vq(), sched, num_classes, num_classes,
                                 latent_scale=1.0)


def tiny_tokenizer(folder: Path, max_length: int = 8):  # noqa: ANN201
    """A CLIPTokenizer over single letters (no merges), written to `folder`."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    for f in ("vocab.json", "merges.txt"):
        (folder / f).unlink()
    return tok


def build_sd(path: Path) -> Path:
    """StableDiffusionPipeline: UNet2DConditionModel on 4x4x4 AutoencoderKL latents, a tiny CLIPTextModel."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(3)
    tok = tiny_tokenizer(path / "_tok")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=8, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          clip_sample=False)
    pipe = StableDiffusionPipeline(vae=_kl(), text_encoder=text, tokenizer=tok, unet=_cond_unet(4, 16),
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def build_dit(path: Path, num_classes: int = 4, hub_layout: bool = False) -> Path:
    """DiTPipeline: DiTTransformer2DModel (patch 2, learned sigma: 8 output channels) on KL latents.

    `hub_layout` saves the transformer as a ``Transformer2DModel`` with ``norm_type`` ada_norm_zero,
    as facebook/DiT-XL-2-256 on the hub does (diffusers builds a DiTTransformer2DModel from it)."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel, Transformer2DModel

    torch.manual_seed(4)
    kwargs = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8, "num_layers": 2,
              "sample_size": 4, "patch_size": 2, "num_embeds_ada_norm": num_classes}
    dit = DiTTransformer2DModel(**kwargs)
    DiTPipeline(transformer=dit, vae=_kl(), scheduler=DDIMScheduler()).save_pretrained(path)
    if hub_layout:
        (path / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
        legacy = Transformer2DModel(**kwargs, norm_type="ada_norm_zero", norm_elementwise_affine=False,
                                    activation_fn="gelu-approximate", attention_bias=True)
        legacy.load_state_dict(dit.state_dict())
        legacy.save_pretrained(path / "transformer")
    return path


def build_pixel_dit(path: Path, num_classes: int = 4) -> Path:
    """DiTPipeline without vae/: a pixel-space DiTTransformer2DModel on 3x8x8 images (learned sigma), as
    small-data research trains them; model_index.json lists the vae as [null, null]."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(6)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=6,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes)
    DiTPipeline(transformer=dit, vae=None, scheduler=DDIMScheduler()).save_pretrained(path)
    return path


def build_clip(path: Path) -> Path:
    """A tiny transformers CLIPModel folder (8x8 images, letter tokenizer) for the CLIP score."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(5)
    tok = tiny_tokenizer(path, max_length=8)
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1)
    vision = CLIPVisionConfig(image_size=8, patch_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8)).save_pretrained(
        path)
    tok.save_pretrained(path)
    return path
