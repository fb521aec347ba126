"""Text conditioning: prompts from a file → frozen full-precision CLIP text embeddings.

A text model's condition is a prompt *index* into its prompt list (one prompt per line of
the recipe's ``model.prompts`` file); index ``len(prompts)`` is the empty prompt, the
unconditional branch of classifier-free guidance (as Stable Diffusion does). Calibration
data and sample artifacts therefore store small integer indices; the stages put the prompts'
sha256 into their inputs digests (`stages.common.prompt_options`), so a changed file is never
taken for the same inputs.
Embeddings are computed in full precision, one prompt at a time, and cached.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
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

    `tokenizer` is a transformers tokenizer (padded to its `model_max_length`, as SD does). Each
    prompt is encoded on its own, so its embedding never depends on which prompts shared a batch
    or were cached before (sampling and a resumed run give the same bits); the most recently used
    `cache_size` embeddings are kept, on the encoder's device.
    """

    kind = "text"

    def __init__(self, text_encoder: nn.Module, tokenizer, prompts: list[str],  # noqa: ANN001
                 cache_size: int = 4096) -> None:
        super().__init__(len(prompts), len(prompts))
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.cache_size = cache_size
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def with_prompts(self, prompts: list[str]) -> PromptEncoder:
        """The same frozen text encoder over another prompt list (the cache is kept when it is the same)."""
        if list(prompts) == self.prompts:
            return self
        return PromptEncoder(self.text_encoder, self.tokenizer, prompts, self.cache_size)

    def text(self, index: int) -> str:
        """Prompt `index`; the null index (len(prompts)) is the empty prompt."""
        return "" if index == self.null else self.prompts[index]

    @torch.no_grad()
    def _embedding(self, index: int) -> torch.Tensor:
        emb = self._cache.get(index)
        if emb is None:
            ids = self.tokenizer([self.text(index)], padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
            emb = self.text_encoder(ids.to(next(self.text_encoder.parameters()).device))[0][0].float()
            self._cache[index] = emb
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(index)
        return emb

    def denoiser_kwargs(self, cond: torch.Tensor | None) -> dict[str, torch.Tensor]:
        rows = torch.stack([self._embedding(i) for i in cond.tolist()])
        return {"encoder_hidden_states": rows.to(cond.device)}

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - a device move drops the cache
        self._cache.clear()
        return super()._apply(fn, recurse)
