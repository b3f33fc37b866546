"""Uncertainty-aware joint loss of AutoMedSAM.

Terms (each switchable):

* ``region``: Dice loss against the ground truth (MONAI ``DiceLoss``), on slices where the class
  is present (Dice of an empty target gives no useful gradient);
* ``pixel``: binary cross-entropy (or MONAI ``FocalLoss``) against the ground truth, on every
  sample: on negatives it is what teaches an empty mask;
* ``distill``: distribution distillation from the frozen box-prompted MedSAM teacher (BCE of the
  student's logits against the teacher's probabilities), where a teacher box exists;
* ``presence``: BCE of the presence logit against "class in this slice" (our addition: SAM's
  decoder always draws something, so "not here" needs its own answer);
* ``denoise``: the reverse diffusion's denoising objective (ours; prompt encoder ``reverse_steps``
  >= 2): the mean over items with a box (present) of the denoiser's squared error against the
  ground-truth box's SAM tokens (:mod:`automedsam.reverse_diffusion`).

Combined with learned homoscedastic-uncertainty weights (Kendall, Gal and Cipolla, CVPR 2018):
``L = sum_i exp(-s_i) L_i + s_i``, ``s_i = log sigma_i^2``; ``learn_weights=False`` gives fixed
equal weights (ablation). The sum runs over the terms a batch has support for: a batch without a
present class has no ``region`` term, one without a teacher box no ``distill`` term, and for those
neither ``exp(-s_i) L_i`` nor ``s_i`` is added (``+ s_i`` alone would only push ``s_i`` down, by
the learning rate, whatever the losses are). At its optimum ``s_i = log L_i``, so the weights
need their own optimiser group with a learning rate that reaches it within an epoch
(:func:`automedsam.engine.trainable_parameters`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss

TERMS = ("region", "pixel", "distill", "presence", "denoise")
DEFAULT_TERMS = ("region", "pixel", "distill", "presence")


class UncertaintyWeightedLoss(nn.Module):
    def __init__(self, terms: Sequence[str] = DEFAULT_TERMS, pixel_loss: str = "bce", learn_weights: bool = True,
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
                   has_teacher: torch.Tensor | None = None,
                   denoise_error: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The loss terms this batch has support for (``region`` needs a present class,
        ``distill`` a teacher box, ``denoise`` a present class; ``pixel`` and ``presence`` are
        always there). ``denoise_error``: the reverse diffusion's per-item error (B,)."""
        target = target.float()
        if present is None:
            present = (target.flatten(1).amax(1) > 0).float()
        present = present.float().view(-1)
        out: dict[str, torch.Tensor] = {}
        if "region" in self.terms and bool(present.sum() > 0):
            d = self.dice(logits, target).view(-1)
            out["region"] = (d * present).sum() / present.sum()
        if "pixel" in self.terms:
            out["pixel"] = self.focal(logits, target) if self.focal is not None else \
                F.binary_cross_entropy_with_logits(logits, target)
        if "distill" in self.terms and teacher_logits is not None:
            w = present if has_teacher is None else has_teacher.float().view(-1)
            if bool(w.sum() > 0):
                per = F.binary_cross_entropy_with_logits(logits, torch.sigmoid(teacher_logits.float()),
                                                         reduction="none").flatten(1).mean(1)
                out["distill"] = (per * w).sum() / w.sum()
        if "presence" in self.terms:
            if presence_logit is None:
                raise ValueError("the presence loss term needs a presence head: a network built with "
                                 "prompt_encoder presence=False is trained without it (loss terms without 'presence')")
            out["presence"] = F.binary_cross_entropy_with_logits(presence_logit.view(-1), present)
        if "denoise" in self.terms:
            if denoise_error is None:
                raise ValueError("the denoise loss term needs a reverse-diffusion prompt encoder (prompt_encoder "
                                 "reverse_steps >= 2) given the ground-truth boxes (the batch's 'box')")
            if bool(present.sum() > 0):
                out["denoise"] = (denoise_error.view(-1) * present).sum() / present.sum()
        return out

    def combine(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum over the terms present in ``parts`` (see the module's docstring)."""
        total = None
        for t, s in zip(self.terms, self.log_vars):
            if t not in parts:
                continue
            term = torch.exp(-s) * parts[t] + s if self.learn_weights else parts[t]
            total = term if total is None else total + term
        if total is None:
            raise ValueError(f"no loss term of {self.terms} has support in this batch")
        return total

    def forward(self, logits, target, presence_logit=None, present=None, teacher_logits=None, has_teacher=None,
                denoise_error=None):
        return self.combine(self.components(logits, target, presence_logit, present, teacher_logits, has_teacher,
                                            denoise_error))
