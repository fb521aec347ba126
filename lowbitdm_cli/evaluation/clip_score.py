"""CLIP score of text-to-image samples (Hessel et al. 2021, as torchmetrics and QuEST report it):
100 · mean over images of max(cos(image embedding, prompt embedding), 0).

The CLIP model is a local `transformers.CLIPModel` folder (``config.json``, weights, tokenizer
files; ``preprocessor_config.json`` optional): never downloaded. Images are resized (bicubic,
shorter side) and centre-cropped to the vision tower's input size and normalised with the
folder's image mean/std (OpenAI CLIP's when the folder has none). The score depends on which
CLIP it is (papers use ViT-L/14 or ViT-B/16): the manifest records the folder's sha256s.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lowbitdm_cli.errors import WeightsNotFoundError

__all__ = ["CLIP_ENV", "ClipScorer", "open_clip"]

CLIP_ENV = "LOWBITDM_CLIP_WEIGHTS"
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".txt")):
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


@dataclass
class ClipScorer:
    model: torch.nn.Module
    tokenizer: object
    size: int
    mean: torch.Tensor
    std: torch.Tensor
    folder: Path
    device: torch.device

    def identity(self) -> dict:
        return {"clip": str(self.folder), "clip_sha256": _folder_digest(self.folder), "image_size": self.size}

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        x = F.interpolate(x, size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))),
                          mode="bicubic", align_corners=False, antialias=True)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size].clamp(0, 1)
        return ((x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)).to(self.device)

    def scores(self, batches: Iterator[tuple[np.ndarray, list[str]]],
               progress: Callable[[int], None] = lambda _n: None) -> np.ndarray:
        """Per-image CLIP score 100 · max(cos, 0) for batches of (uint8 NHWC images, their prompts)."""
        return 100.0 * np.maximum(self.cosines(batches, progress), 0.0)

    @torch.no_grad()
    def cosines(self, batches: Iterator[tuple[np.ndarray, list[str]]],
                progress: Callable[[int], None] = lambda _n: None) -> np.ndarray:
        """Per-image cosine similarity of image and prompt embeddings."""
        out = []
        for images, texts in batches:
            img = self.model.get_image_features(pixel_values=self._pixels(images))
            tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
            txt = self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            cos = F.cosine_similarity(img.float(), txt.float(), dim=-1)
            out.append(cos.cpu().numpy())
            progress(len(texts))
        return np.concatenate(out) if out else np.zeros(0)


def open_clip(weights: str | Path | None, device: str = "cpu") -> ClipScorer:
    """A CLIP scorer from a local CLIPModel folder (`weights`, else $LOWBITDM_CLIP_WEIGHTS)."""
    from transformers import CLIPModel, CLIPTokenizer

    folder = weights or os.environ.get(CLIP_ENV)
    if not folder:
        raise WeightsNotFoundError(f"clip_score needs local CLIP weights: pass --clip-weights DIR (a transformers "
                                   f"CLIPModel folder, e.g. `hf download openai/clip-vit-large-patch14 --local-dir "
                                   f"DIR` on a machine with internet) or set ${CLIP_ENV}")
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise WeightsNotFoundError(f"{folder} is not a CLIPModel folder (no config.json): pass the folder that "
                                   f"`hf download openai/clip-vit-large-patch14 --local-dir DIR` writes")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model = CLIPModel.from_pretrained(str(folder)).eval().requires_grad_(False).to(dev)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    pre = json.loads((folder / "preprocessor_config.json").read_text()) \
        if (folder / "preprocessor_config.json").is_file() else {}
    size = int(model.config.vision_config.image_size)
    mean = torch.tensor(pre.get("image_mean", _OPENAI_MEAN), dtype=torch.float32)
    std = torch.tensor(pre.get("image_std", _OPENAI_STD), dtype=torch.float32)
    return ClipScorer(model, tokenizer, size, mean, std, folder, dev)
