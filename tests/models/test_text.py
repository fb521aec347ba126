"""Prompt conditioning: prompt files, per-prompt CLIP embeddings, the empty prompt as the CFG null."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_builders import tiny_tokenizer

from lowbitdm_cli.errors import RecipeError
from lowbitdm_cli.models.text import PromptEncoder, prompts_digest, read_prompts


def _encoder(tmp_path: Path, cache_size: int = 4096) -> PromptEncoder:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = tiny_tokenizer(tmp_path / "tok")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=8, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))
    return PromptEncoder(text, tok, ["a cat", "a dog", "sun"], cache_size=cache_size)


def test_read_prompts(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("  a cat \n\n a dog\n")
    assert read_prompts(f) == ["a cat", "a dog"]
    assert prompts_digest(["a cat", "a dog"]) != prompts_digest(["a dog", "a cat"])
    f.write_text("\n \n")
    with pytest.raises(RecipeError, match="holds no prompts"):
        read_prompts(f)
    with pytest.raises(RecipeError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_embeddings_are_per_prompt_and_null_is_empty(tmp_path: Path) -> None:
    enc = _encoder(tmp_path)
    assert (enc.num_conditions, enc.null, enc.text(3)) == (3, 3, "")
    ctx = enc.denoiser_kwargs(torch.tensor([1, 3, 1]))["encoder_hidden_states"]
    assert ctx.shape == (3, 8, 16) and torch.equal(ctx[0], ctx[2])
    with torch.no_grad():
        ids = enc.tokenizer(["a dog", ""], padding="max_length", max_length=8, return_tensors="pt").input_ids
        # one prompt per call, as the encoder runs it: the same kernels on the same shapes, so the same bits
        alone = [enc.text_encoder(ids[i:i + 1])[0][0] for i in range(2)]
    assert torch.equal(ctx[0], alone[0]) and torch.equal(ctx[1], alone[1])
    # a one-entry cache recomputes every time and gives the same bits
    small = _encoder(tmp_path / "b", cache_size=1)
    again = small.denoiser_kwargs(torch.tensor([1, 3, 1]))["encoder_hidden_states"]
    assert torch.equal(again, ctx) and len(small._cache) == 1
