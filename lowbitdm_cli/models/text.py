"""Text conditioning: prompts from a file → frozen full-precision CLIP text embeddings.

A text model's condition is a prompt *index* into its prompt list (one prompt per line of
the recipe's ``model.prompts`` file); index ``len(prompts)`` is the empty prompt, the
unconditional branch of classifier-free guidance (as Stable Diffusion does). Calibration
data and sample artifacts therefore store small integer indices, and the prompt file's
sha256 is recorded so a changed file is caught instead of silently re-pairing data and text.
The embeddings of all prompts are computed once, in full precision, and cached.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from lowbitdm_cli.errors import RecipeError
from lowbitdm_cli.models.conditioning import Conditioner

__all__ = ["PromptEncoder", "prompts_digest", "read_prompts"]


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped; a clear error when missing or empty."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"prompt file {p} does not exist (model.prompts / --prompts: one prompt per line)")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise RecipeError(f"prompt file {p} holds no prompts (one prompt per line)")
    return prompts


def prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


class PromptEncoder(Conditioner):
    """Prompt index → ``encoder_hidden_states`` [B, L, D] from a frozen text encoder (CLIPTextModel).

    `tokenizer` is a transformers tokenizer (padded to its `model_max_length`, as SD does).
    """

    kind = "text"

    def __init__(self, text_encoder: nn.Module, tokenizer, prompts: list[str]) -> None:  # noqa: ANN001
        super().__init__(len(prompts), len(prompts))
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self._cache: torch.Tensor | None = None

    @torch.no_grad()
    def embeddings(self, device: torch.device) -> torch.Tensor:
        """[P + 1, L, D]: every prompt, then the empty prompt (computed once per device)."""
        if self._cache is None or self._cache.device != device:
            tokens = self.tokenizer(self.prompts + [""], padding="max_length", truncation=True,
                                    max_length=self.tokenizer.model_max_length, return_tensors="pt")
            ids = tokens.input_ids.to(next(self.text_encoder.parameters()).device)
            rows = [self.text_encoder(ids[i:i + 64])[0] for i in range(0, ids.shape[0], 64)]
            self._cache = torch.cat(rows).float().to(device)
        return self._cache

    def denoiser_kwargs(self, cond: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": self.embeddings(cond.device)[cond]}

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - a device move drops the cache
        self._cache = None
        return super()._apply(fn, recurse)
