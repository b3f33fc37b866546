"""Uncertainty-aware joint loss of AutoMedSAM.

Terms (each switchable):

* ``region``: Dice loss against the ground truth (MONAI ``DiceLoss``), on slices where the class
  is present (Dice of an empty target gives no useful gradient);
* ``pixel``: binary cross-entropy (or MONAI ``FocalLoss``) against the ground truth, on every
  sample: on negatives it is what teaches an empty mask;
* ``distill``: distribution distillation from the frozen box-prompted MedSAM teacher (BCE of the
  student's logits against the teacher's probabilities), where a teacher box exists;
* ``presence``: BCE of the presence logit against "class in this slice" (our addition: SAM's
  decoder always draws something, so "not here" needs its own answer).

Combined with learned homoscedastic-uncertainty weights (Kendall, Gal and Cipolla, CVPR 2018):
``L = sum_i exp(-s_i) L_i + s_i``, ``s_i = log sigma_i^2``; ``learn_weights=False`` gives fixed
equal weights (ablation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss

TERMS = ("region", "pixel", "distill", "presence")


class UncertaintyWeightedLoss(nn.Module):
    def __init__(self, terms: Sequence[str] = TERMS, pixel_loss: str = "bce", learn_weights: bool = True,
                 focal_gamma: float = 2.0):
        super().__init__()
        terms = tuple(terms)
        bad = [t for t in terms if t not in TERMS]
        if bad or not terms:
            raise ValueError(f"loss terms must be a non-empty subset of {TERMS}, got {terms}")
        if pixel_loss not in ("bce", "focal"):
            raise ValueError(f"pixel_loss must be 'bce' or 'focal', got '{pixel_loss}'")
        self.terms = terms
        self.learn_weights = learn_weights
        self.dice = DiceLoss(sigmoid=True, reduction="none")
        self.focal = FocalLoss(gamma=focal_gamma, use_softmax=False, reduction="mean") if pixel_loss == "focal" else None
        self.log_vars = nn.Parameter(torch.zeros(len(terms)), requires_grad=learn_weights)

    def weights(self) -> dict[str, float]:
        """Current effective weights exp(-s_i), for logging."""
        return {t: float(torch.exp(-s)) for t, s in zip(self.terms, self.log_vars.detach())}

    def components(self, logits: torch.Tensor, target: torch.Tensor, presence_logit: torch.Tensor | None = None,
                   present: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None,
                   has_teacher: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        target = target.float()
        if present is None:
            present = (target.flatten(1).amax(1) > 0).float()
        present = present.float().view(-1)
        out: dict[str, torch.Tensor] = {}
        if "region" in self.terms:
            d = self.dice(logits, target).view(-1)
            out["region"] = (d * present).sum() / present.sum().clamp(min=1)
        if "pixel" in self.terms:
            out["pixel"] = self.focal(logits, target) if self.focal is not None else \
                F.binary_cross_entropy_with_logits(logits, target)
        if "distill" in self.terms:
            if teacher_logits is None:
                out["distill"] = logits.new_zeros(())
            else:
                w = present if has_teacher is None else has_teacher.float().view(-1)
                per = F.binary_cross_entropy_with_logits(logits, torch.sigmoid(teacher_logits.float()),
                                                         reduction="none").flatten(1).mean(1)
                out["distill"] = (per * w).sum() / w.sum().clamp(min=1)
        if "presence" in self.terms:
            if presence_logit is None:
                raise ValueError("the presence term needs the model's presence logits")
            out["presence"] = F.binary_cross_entropy_with_logits(presence_logit.view(-1), present)
        return out

    def combine(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for t, s in zip(self.terms, self.log_vars):
            if self.learn_weights:
                total = total + torch.exp(-s) * parts[t] + s
            else:
                total = total + parts[t]
        return total

    def forward(self, logits, target, presence_logit=None, present=None, teacher_logits=None, has_teacher=None):
        return self.combine(self.components(logits, target, presence_logit, present, teacher_logits, has_teacher))
