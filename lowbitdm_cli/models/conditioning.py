"""How a condition reaches the denoiser: nothing, class labels, or a cross-attention context.

A condition is always an integer index tensor [B]: a class label, or (text models) a prompt
index. `null` is the index of the unconditional branch of classifier-free guidance (the null
class, or the empty prompt). A conditioner turns indices into the denoiser's keyword
arguments, so `DiffusionModel.eps` is the same code for every family:

- `NoCondition`: unconditional models (DDPM CIFAR-10, LDM LSUN);
- `ClassLabels`: ``class_labels=`` (diffusers `UNet2DModel` with class embeddings, DiT);
- `ClassEmbedder`: a frozen ``nn.Embedding`` whose row is the cross-attention context
  ``encoder_hidden_states`` [B, 1, D] (CompVis cin256 LDM-4 on a `UNet2DConditionModel`);
- `lowbitdm_cli.models.text.PromptEncoder`: prompt index → frozen CLIP text embedding [B, L, D].

Conditioners are modules (so `.to(device)` and the weights digest cover their parameters)
and stay full precision: quantization only ever wraps layers of the denoiser.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ClassEmbedder", "ClassLabels", "Conditioner", "NoCondition"]


class Conditioner(nn.Module):
    """Base: `kind` is "none", "class" or "text"; `num_conditions` valid indices; `null` the CFG index."""

    kind: str = "none"

    def __init__(self, num_conditions: int = 0, null: int | None = None) -> None:
        super().__init__()
        self.num_conditions = int(num_conditions)
        self.null = null

    def denoiser_kwargs(self, cond: torch.Tensor | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class NoCondition(Conditioner):
    kind = "none"

    def denoiser_kwargs(self, cond: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {}


class ClassLabels(Conditioner):
    """Labels passed as ``class_labels`` (the denoiser owns the label embedding)."""

    kind = "class"

    def denoiser_kwargs(self, cond: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"class_labels": cond}


class ClassEmbedder(Conditioner):
    """A class-embedding table outside the denoiser whose rows are its cross-attention context.

    `embedding` has num_classes + 1 rows when the null class is a learned row (CompVis
    cin256: 1001 rows, null = 1000); None when the model has no null class (no guidance).
    """

    kind = "class"

    def __init__(self, embedding: nn.Embedding, num_classes: int, null: int | None) -> None:
        super().__init__(num_classes, null)
        if null is not None and not 0 <= null < embedding.num_embeddings:
            raise ValueError(f"null class {null} is not a row of the {embedding.num_embeddings}-row class embedding")
        self.embedding = embedding

    def denoiser_kwargs(self, cond: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": self.embedding(cond)[:, None, :]}
