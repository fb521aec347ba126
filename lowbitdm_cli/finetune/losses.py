"""Distillation losses: output MSE and MPQ-DM's time-smoothed relation distillation (TRD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["relation_kl", "relation_matrix"]


def relation_matrix(feature: torch.Tensor) -> torch.Tensor:
    """Spatial relations of a feature map [N, C, H, W] → S [N, HW, HW] (before the row softmax).

    Per sample F ∈ R^{C×HW}, L2-normalised over C, S = FᵀF.
    """
    f = feature.flatten(2)  # [N, C, HW]
    f = F.normalize(f, dim=1)
    s = torch.bmm(f.transpose(1, 2), f)
    return s


def relation_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(softmax(S_fp) ‖ softmax(S_q)) averaged over samples and rows (MPQ-DM, AAAI 2025).

    Gradient flows into `student` (the reference code detaches it, so its TRD term trains
    nothing); the teacher side carries no gradient.
    """
    log_q = F.log_softmax(relation_matrix(student), dim=-1)
    log_p = F.log_softmax(relation_matrix(teacher.detach()), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.mean()
