"""Uncertainty a user can act on (issue 17 item 2): calibrated foreground probabilities, a
per-pixel uncertainty map and a per-case, per-class "likely wrong" score.

All of it comes from what one inference already computes (no extra encoder pass):

- **Temperature scaling** per class of the foreground logits, ``p' = sigmoid(logit(p) / T)``.
  ``T > 0`` keeps the sign of the logit, so ``p' > 0.5`` exactly where ``p > 0.5``: the 0.5
  threshold, and every label map, are unchanged; presence-blanked pixels (p = 0) stay 0.
- **Per-pixel uncertainty**: the binary entropy of the calibrated probability (in bits, 0..1),
  combined with the spread of the noise draws when ``--uncertainty N`` is given
  (``max(entropy, 2 * std)``; a probability's std is at most 0.5).
- **Per-case score**: a logistic model of P(Dice < 0.5) on features of one class in one image:
  the presence head's logit, the decoder's predicted IoU over the covered slices, the share of
  uncertain pixels (raw probability in ``band``) relative to the mask, whether the mask is
  empty and the log10 of the share of the image it covers (a per-class prior: a polyp mask over
  half the frame is suspect). One model per class where the file has one. It estimates the chance that a *present* class was segmented wrongly; a flag
  ``likely wrong`` is raised when it is at least ``flag_threshold``.

The numbers (temperatures, coefficients) are data in the bundle, ``configs/uncertainty.json``,
fitted on the validation split by ``benchmarks/uncertainty.py --fit``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import RunError

CONFIG_FILE = "uncertainty.json"  # in a bundle's configs/
FEATURES = ("presence_logit", "iou", "uncertain_share", "empty", "log_area")
LIKELY_WRONG = "likely wrong"
EPS = 1e-6


class UncertaintyConfigError(RunError):
    """The bundle's uncertainty file is missing or malformed (one line naming the file)."""


@dataclass(frozen=True)
class Calibration:
    """The bundle's uncertainty settings (see the module docstring)."""

    temperature: dict = field(default_factory=dict)  # class name -> T (others: default_temperature)
    default_temperature: float = 1.0
    band: tuple = (0.2, 0.8)
    coef: tuple = (0.0,) * len(FEATURES)
    intercept: float = 0.0
    flag_threshold: float = 0.5
    path: str | None = None
    per_class: dict = field(default_factory=dict)  # class name -> (coef, intercept)

    def temperature_of(self, class_name: str) -> float:
        return float(self.temperature.get(class_name, self.default_temperature))

    def model_of(self, class_name: str | None) -> tuple[tuple, float]:
        return self.per_class.get(class_name, (self.coef, self.intercept))


# ---------------------------------------------------------------------------------------------
# the bundle file


def config_path(bundle_dir: str | os.PathLike | None = None) -> Path:
    from .pretrained import default_bundle_dir

    return Path(bundle_dir or default_bundle_dir()) / "configs" / CONFIG_FILE


def parse_config(data, path: str = CONFIG_FILE) -> Calibration:
    """A :class:`Calibration` from the file's JSON; a malformed one raises UncertaintyConfigError."""
    def bad(what: str):
        return UncertaintyConfigError(f"{path}: {what}")

    if not isinstance(data, dict):
        raise bad("must hold a JSON object")
    try:
        temps = data.get("temperature", {})
        if not isinstance(temps, dict):
            raise bad("'temperature' must map class names to numbers")
        temps = {str(k): float(v) for k, v in temps.items()}
        default_t = float(data.get("default_temperature", 1.0))
        if any(not math.isfinite(t) or t <= 0 for t in [default_t, *temps.values()]):
            raise bad("temperatures must be finite and > 0")
        band = tuple(float(b) for b in data.get("band", (0.2, 0.8)))
        if len(band) != 2 or not 0 < band[0] < 0.5 < band[1] < 1:
            raise bad("'band' must be [low, high] with 0 < low < 0.5 < high < 1")
        model = data["case_model"]
        if list(model["features"]) != list(FEATURES):
            raise bad(f"'case_model.features' must be {list(FEATURES)}")

        def read(m, where):
            c = tuple(float(v) for v in m["coef"])
            if len(c) != len(FEATURES):
                raise bad(f"'{where}.coef' must hold {len(FEATURES)} numbers")
            b = float(m["intercept"])
            if not all(math.isfinite(v) for v in (*c, b)):
                raise bad(f"'{where}' numbers must be finite")
            return c, b

        coef, intercept = read(model, "case_model")
        per_class = {str(k): read(m, f"case_model.per_class.{k}") for k, m in model.get("per_class", {}).items()}
        flag = float(data.get("flag_threshold", 0.5))
        if not 0 < flag < 1:
            raise bad("'flag_threshold' must be in (0, 1)")
    except KeyError as e:
        raise bad(f"missing {e}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, UncertaintyConfigError):
            raise
        raise bad(f"malformed value ({e})") from None
    return Calibration(temps, default_t, band, coef, intercept, flag, str(path), per_class)


def load_config(path: str | os.PathLike | None = None) -> Calibration:
    """The bundle's ``configs/uncertainty.json`` (default: the package's bundle)."""
    p = Path(path) if path is not None else config_path()
    if not p.is_file():
        raise UncertaintyConfigError(f"{p}: uncertainty calibration file not found")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UncertaintyConfigError(f"{p}: not readable JSON ({e})") from None
    return parse_config(data, str(p))


_CACHE: dict[str, tuple[float, Calibration]] = {}


def bundle_calibration() -> Calibration:
    """The package's bundle calibration, read once per file change."""
    p = config_path()
    key = str(p)
    mtime = p.stat().st_mtime if p.is_file() else -1.0
    hit = _CACHE.get(key)
    if hit is None or hit[0] != mtime:
        _CACHE[key] = (mtime, load_config(p))
    return _CACHE[key][1]


# ---------------------------------------------------------------------------------------------
# probabilities and the per-pixel map


def logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def calibrate(p, temperature: float):
    """``sigmoid(logit(p) / T)``; p == 0 (blanked) stays 0, the 0.5 threshold is kept exactly.
    Works on numpy arrays and torch tensors (returns the same kind)."""
    if temperature == 1.0:
        return p
    try:
        import torch

        if isinstance(p, torch.Tensor):
            q = p.clamp(EPS, 1 - EPS)
            out = torch.sigmoid((torch.log(q) - torch.log1p(-q)) / temperature).to(p.dtype)
            out = torch.where(p <= 0, torch.zeros_like(out), out)
            # rounding must not move a pixel across 0.5 (the threshold): keep the side exactly
            above = torch.nextafter(torch.tensor(0.5, dtype=out.dtype), torch.tensor(1.0, dtype=out.dtype))
            out = torch.where(p > 0.5, torch.maximum(out, above), torch.minimum(out, torch.full_like(out, 0.5)))
            return out
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(p)
    out = 1.0 / (1.0 + np.exp(-logit(a) / temperature))
    dt = a.dtype if a.dtype.kind == "f" else np.float64
    out = np.where(a <= 0, 0.0, out).astype(dt)
    above = np.nextafter(dt.type(0.5), dt.type(1.0))
    return np.where(a > 0.5, np.maximum(out, above), np.minimum(out, dt.type(0.5)))


def raw_band(band: tuple, temperature: float) -> tuple[float, float]:
    """The calibrated-probability interval that holds the raw probabilities in ``band``."""
    lo, hi = (float(1 / (1 + math.exp(-logit(b) / temperature))) for b in band)
    return lo, hi


def binary_entropy(p):
    """Entropy in bits of a Bernoulli(p): 0 at 0 and 1, 1 at 0.5."""
    q = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(q * np.log2(q) + (1 - q) * np.log2(1 - q))
    return np.nan_to_num(h, nan=0.0)


def pixel_uncertainty(calibrated, spread=None, case_score=None):
    """Per-pixel uncertainty in [0, 1]: the entropy of the calibrated probability (twice the
    draws' std where that is larger), averaged with the image's "likely wrong" score
    ``case_score`` (broadcast over the pixels, e.g. shape (K,N,1,1)) when given: a mask the case
    model distrusts is uncertain everywhere, also where the presence head blanked it (p = 0,
    entropy 0), while the entropy still ranks the pixels within the image. (The mean was chosen
    over the maximum on the validation split: benchmarks/results/uncertainty.md.)"""
    u = binary_entropy(calibrated)
    if spread is not None:
        u = np.maximum(u, np.clip(2.0 * np.asarray(spread, dtype=np.float64), 0.0, 1.0))
    if case_score is not None:
        u = (u + np.asarray(case_score, dtype=np.float64)) / 2.0
    return u.astype(np.float32)


def slice_scores(class_names, probabilities, label_map, class_ids, presence, iou, cal: Calibration) -> np.ndarray:
    """(K,N) case-model scores of each class on each slice (a slice scored as one 2D image):
    raw ``probabilities`` (K,N,H,W), ``label_map`` (N,H,W), presence/iou (K,N)."""
    p = np.asarray(probabilities)
    lab = np.asarray(label_map)
    out = np.zeros(p.shape[:2])
    for j, (name, cid) in enumerate(zip(class_names, class_ids)):
        for i in range(p.shape[1]):
            mask = lab[i] == cid
            n = int(mask.sum())
            unc = int(((p[j, i] > cal.band[0]) & (p[j, i] < cal.band[1])).sum())
            f = case_features(float(presence[j, i]), float(iou[j, i]) if n else None, unc, n, mask.size)
            out[j, i] = case_score(f, cal, name)
    return out


# ---------------------------------------------------------------------------------------------
# the per-case score


def case_features(presence: float, iou: float | None, uncertain_pixels: int, mask_pixels: int,
                  image_pixels: int) -> np.ndarray:
    """The case model's inputs (in ``FEATURES`` order) for one class in one image."""
    pres = float(np.clip(presence, 1e-4, 1 - 1e-4))
    return np.array([math.log(pres / (1 - pres)), 0.0 if iou is None else float(iou),
                     min(float(uncertain_pixels) / max(int(mask_pixels), 1), 5.0), float(mask_pixels == 0),
                     math.log10(max(int(mask_pixels), 1) / max(int(image_pixels), 1)) if mask_pixels else -4.0])


def case_score(features: np.ndarray, cal: Calibration, class_name: str | None = None) -> float:
    coef, intercept = cal.model_of(class_name)
    z = float(np.dot(np.asarray(coef), features) + intercept)
    return float(1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0))))


def class_uncertainty(class_name: str, presence: np.ndarray, iou: np.ndarray, mask: np.ndarray,
                      probabilities: np.ndarray, cal: Calibration) -> dict:
    """The report's fields for one class: ``likely_wrong_score`` (P(Dice < 0.5), from the
    calibrated case model), ``uncertain_share`` and ``presence_margin``.

    presence, iou: (N,) per slice; mask: (N,H,W) the final label map of the class;
    probabilities: (N,H,W) its calibrated foreground probabilities."""
    covered = np.nonzero(mask.reshape(mask.shape[0], -1).any(1))[0]
    lo, hi = raw_band(cal.band, cal.temperature_of(class_name))
    p = np.asarray(probabilities)
    uncertain = int(((p > lo) & (p < hi)).sum())
    pres = float(np.max(presence)) if covered.size == 0 else float(np.mean(np.asarray(presence)[covered]))
    mean_iou = float(np.mean(np.asarray(iou)[covered])) if covered.size else None
    feats = case_features(pres, mean_iou, uncertain, int(mask.sum()), int(mask.size))
    return {"likely_wrong_score": round(case_score(feats, cal, class_name), 4),
            "uncertain_share": round(float(feats[2]), 4),
            "presence_margin": round(abs(pres - 0.5) * 2, 4)}


# ---------------------------------------------------------------------------------------------
# metrics and fitting (benchmarks/uncertainty.py, tests)


def auroc(score, positive) -> float:
    """Area under the ROC curve (ties count half); NaN when one class is missing."""
    s = np.asarray(score, dtype=np.float64).ravel()
    y = np.asarray(positive, dtype=bool).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    _, start, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def ece(probability, truth, bins: int = 15) -> float:
    """Expected calibration error of foreground probabilities (equal-width bins, binary)."""
    p = np.asarray(probability, dtype=np.float64).ravel()
    y = np.asarray(truth, dtype=np.float64).ravel()
    if p.size == 0:
        return float("nan")
    idx = np.minimum((p * bins).astype(int), bins - 1)
    n = np.bincount(idx, minlength=bins)
    conf = np.bincount(idx, weights=p, minlength=bins)
    acc = np.bincount(idx, weights=y, minlength=bins)
    nz = n > 0
    return float(np.sum(np.abs(conf[nz] - acc[nz])) / p.size)


def fit_temperature(probability, truth, grid=None) -> float:
    """The T minimising the negative log-likelihood of ``truth`` under ``calibrate(p, T)``
    (pixels with p in (0, 1); blanked ones do not depend on T)."""
    p = np.asarray(probability, dtype=np.float64).ravel()
    y = np.asarray(truth, dtype=bool).ravel()
    keep = p > 0
    z, y = logit(p[keep]), y[keep]
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 241)) if grid is None else grid
    best, best_t = float("inf"), 1.0
    for t in grid:
        q = np.clip(1 / (1 + np.exp(-z / t)), EPS, 1 - EPS)
        nll = -float(np.mean(np.where(y, np.log(q), np.log1p(-q))))
        if nll < best:
            best, best_t = nll, float(t)
    return best_t


def fit_logistic(x, y, l2: float = 1e-2, iters: int = 100) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method: (coef, intercept)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    a = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(a.shape[1])
    reg = np.full(a.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(a @ w, -50, 50)))
        g = a.T @ (p - y) + reg * w
        h = (a * (p * (1 - p))[:, None]).T @ a + np.diag(reg) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(h, g)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w[:-1], float(w[-1])
