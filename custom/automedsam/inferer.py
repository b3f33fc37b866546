"""Slice-wise inference: encode each 2D slice once, decode every requested class from it.

:class:`ClassPromptInferer` is what the bundle's ``inferer`` id holds and what MONAI Label
calls as ``inferer(inputs, network)``: the class prompts live in the inferer itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .backbones import LOW_RES_SIZE
from .classes import parse_classes
from .data.preprocess import low_res_to_original, to_backbone_input


@dataclass
class ClassMaps:
    """Per-class results for a stack of slices."""

    class_ids: list[int]
    probabilities: torch.Tensor  # (K, N, H, W) presence-blanked foreground probability
    iou: torch.Tensor  # (K, N) decoder's predicted IoU
    presence: torch.Tensor  # (K, N) presence probability
    # (K, N, H, W) with noise draws: the per-pixel uncertainty in [0, 1], the entropy of the calibrated
    # probability combined with the draws' std (automedsam.uncertainty.pixel_uncertainty); the std
    # itself is extras["draw_std"]
    spread: torch.Tensor | None = None
    encoder_calls: int = 0
    extras: dict = field(default_factory=dict)

    def calibrated(self, calibration=None) -> torch.Tensor:
        """(K,N,H,W) temperature-scaled foreground probabilities (the bundle's
        ``configs/uncertainty.json`` by default). ``probabilities`` stay raw, so the label maps
        are the model's; calibration keeps each pixel's side of 0.5 anyway."""
        from .classes import CLASSES
        from .uncertainty import bundle_calibration, calibrate

        cal = calibration or bundle_calibration()
        return torch.stack([calibrate(self.probabilities[j], cal.temperature_of(CLASSES[cid]))
                            for j, cid in enumerate(self.class_ids)]) if self.class_ids else self.probabilities

    def label_map(self, threshold: float = 0.5) -> torch.Tensor:
        """(N,H,W) uint8 label map; overlaps go to the most probable class."""
        best, idx = self.probabilities.max(0)
        ids = torch.tensor(self.class_ids, dtype=torch.uint8)
        return torch.where(best > threshold, ids[idx], torch.zeros((), dtype=torch.uint8))


class ClassPromptInferer:
    """Encode once per slice, decode each class from that embedding.

    Args:
        class_ids: class names or ids (default: every class of ``modality``; with neither, each
            input's own classes from its meta, see :meth:`classes_for`, else all).
        modality: used for the default class list.
        batch_size: slices encoded per encoder call.
        threshold: foreground probability threshold for the label map.
        uncertainty: number of noise draws (0: the deterministic path).
        progress: show a progress bar over slices.
        skip_absent: skip the prompt branches and mask decoder of (slice, class) pairs whose presence
            says "absent": they are blanked anyway, so the label maps and probabilities do not change;
            their predicted IoU reads 0 (see :meth:`AutoMedSAM.decode_classes`).
    Calling ``inferer(inputs, network)`` with (B,C,H,W) or (B,C,H,W,D) inputs in [0,1] returns a
    (B,1,H,W[,D]) label map, slicing 3D inputs along the last axis.
    """

    def __init__(self, class_ids: Sequence[int | str] | str | None = None, modality: str | None = None,
                 batch_size: int = 4, threshold: float = 0.5, uncertainty: int = 0, progress: bool = False,
                 skip_absent: bool = True):
        self.class_ids = parse_classes(class_ids, modality)
        # nothing asked: each input's own classes (from its meta) decide, see classes_for
        self.fixed = class_ids not in (None, "", "all") or modality is not None
        self.batch_size = batch_size
        self.threshold = threshold
        self.uncertainty = uncertainty
        self.progress = progress
        self.skip_absent = skip_absent

    @torch.no_grad()
    def predict(self, network, slices: torch.Tensor, class_ids: Sequence[int] | None = None,
                prompts: dict[int, dict] | None = None) -> ClassMaps:
        """(N,C,H,W) slices in [0,1] -> :class:`ClassMaps`. ``prompts``: optional interactive
        corrections {class_id: {"box": (x0,y0,x1,y1) | None, "points": [(x,y,label)], "slices": [k...]}}
        in slice pixel coordinates."""
        ids = list(class_ids or self.class_ids)
        n, _, h, w = slices.shape
        device = next(network.parameters()).device
        size = network.image_size
        k = len(ids)
        probs = torch.zeros(k, n, h, w)
        iou = torch.zeros(k, n)
        presence = torch.zeros(k, n)
        spread = torch.zeros(k, n, h, w) if self.uncertainty else None
        calls = 0
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, unit="slice", desc=f"encode 1x, decode {k} class{'es' if k > 1 else ''}")
        for start in range(0, n, self.batch_size):
            chunk = slices[start:start + self.batch_size]
            # the same resize/pad as the training cache (data.preprocess), slice by slice
            inputs = [to_backbone_input(sl.permute(1, 2, 0) if sl.shape[0] == 3 else sl[0], size) for sl in chunk]
            geom = inputs[0][1]
            emb = network.encode(torch.stack([x for x, _ in inputs]).to(device))
            calls += 1
            b = emb.shape[0]
            pred = network.decode_classes(emb, ids, skip_absent=self.skip_absent)  # (b*k, ...), class-major per slice
            p = pred.probabilities().view(b, k, LOW_RES_SIZE, LOW_RES_SIZE).transpose(0, 1)
            probs[:, start:start + b] = low_res_to_original(p, geom).cpu()
            iou[:, start:start + b] = pred.iou.view(b, k).T.cpu()
            presence[:, start:start + b] = torch.sigmoid(pred.presence_logit).view(b, k).T.cpu()
            if self.uncertainty:
                for j, cid in enumerate(ids):
                    mean, std = network.sample(emb, [cid] * b, n=self.uncertainty)
                    probs[j, start:start + b] = low_res_to_original(mean[:, 0], geom).cpu()
                    spread[j, start:start + b] = low_res_to_original(std[:, 0], geom).cpu()
            if prompts:
                self._refine(network, emb, ids, prompts, start, geom, probs, iou, presence)
            if bar is not None:
                bar.update(b)
        if bar is not None:
            bar.close()
        maps = ClassMaps(ids, probs, iou, presence, spread, encoder_calls=calls)
        if spread is not None:
            from .classes import CLASSES
            from .uncertainty import bundle_calibration, pixel_uncertainty, slice_scores

            cal = bundle_calibration()
            scores = slice_scores([CLASSES[c] for c in ids], probs.numpy(), maps.label_map(self.threshold).numpy(),
                                  ids, presence.numpy(), iou.numpy(), cal)
            maps.extras["draw_std"] = spread
            maps.extras["slice_scores"] = scores
            maps.spread = torch.from_numpy(pixel_uncertainty(maps.calibrated(cal).numpy(), spread.numpy(),
                                                             scores[:, :, None, None]))
        return maps

    def _refine(self, network, emb, ids, prompts, start, geom, probs, iou, presence):
        """Add the user's box/point prompts to the class prompts of the slices they name."""
        b = emb.shape[0]
        scale = geom.new_height / geom.height  # slice pixels -> backbone-input pixels
        for cid, pr in prompts.items():
            if cid not in ids:
                continue
            j = ids.index(cid)
            targets = pr.get("slices") or list(range(start, start + b))
            for s in targets:
                if not start <= s < start + b:
                    continue
                e = emb[s - start:s - start + 1]
                boxes = points = labels = None
                if pr.get("box") is not None:
                    boxes = torch.tensor([pr["box"]], dtype=torch.float32, device=e.device) * scale
                if pr.get("points"):
                    pts = torch.tensor([[p[0], p[1]] for p in pr["points"]], dtype=torch.float32, device=e.device)
                    points = pts[None] * scale
                    labels = torch.tensor([[int(p[2]) for p in pr["points"]]], device=e.device)
                pred = network.decode(e, [cid], boxes=boxes, points=points, point_labels=labels)
                probs[j, s] = low_res_to_original(pred.probabilities()[0, 0], geom).cpu()
                iou[j, s] = float(pred.iou[0, 0])
                presence[j, s] = 1.0

    def classes_for(self, modality: str | None = None, class_names: str | None = None) -> list[int]:
        """The classes asked of one input: those the inferer was built with; else the classes the
        input carries in its meta (``class_names``, e.g. a dataset's labelled classes); else every
        class of its ``modality`` (the bundle's transforms put it there); else the default list."""
        if self.fixed:
            return self.class_ids
        if class_names:
            return parse_classes(class_names)
        if modality:
            return parse_classes(None, modality)
        return self.class_ids

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        if inputs.ndim not in (4, 5):
            raise ValueError(f"inputs must be (B,C,H,W) or (B,C,H,W,D), got {tuple(inputs.shape)}")
        n = inputs.shape[0]
        modalities, names = _item_meta(inputs, "modality", n), _item_meta(inputs, "class_names", n)
        plain = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs  # no MetaTensor bookkeeping
        outs = []
        for item, modality, class_names in zip(plain, modalities, names):
            volume = item.ndim == 4
            slices = item.permute(3, 0, 1, 2) if volume else item[None]  # (N,C,H,W)
            ids = self.classes_for(modality, class_names)
            labels = self.predict(network, torch.as_tensor(slices), ids, **kwargs).label_map(self.threshold)
            labels = labels.permute(1, 2, 0) if volume else labels[0]
            outs.append(labels[None])
        out = torch.stack(outs).to(inputs.device)
        if hasattr(inputs, "as_tensor"):  # a MetaTensor: the label map keeps its meta (Invertd needs it)
            from monai.utils import convert_to_dst_type

            out = convert_to_dst_type(out, inputs, dtype=out.dtype)[0]
        return out


def _item_meta(inputs, key: str, n: int) -> list:
    """Per-item values of a MetaTensor batch's meta entry (collated batches hold lists)."""
    value = (getattr(inputs, "meta", None) or {}).get(key)
    if isinstance(value, (list, tuple)) and len(value) == n:
        return [v if isinstance(v, str) and v else None for v in value]
    return [value if isinstance(value, str) and value else None] * n


def largest_component_3d(mask: np.ndarray) -> np.ndarray:
    """Keep the largest connected component (26-connectivity in 3D) of a binary mask (MONAI's
    ``KeepLargestConnectedComponent`` on it as one channel)."""
    from monai.transforms import KeepLargestConnectedComponent

    if not mask.any():
        return mask
    keep = KeepLargestConnectedComponent(applied_labels=1, is_onehot=False, connectivity=mask.ndim)
    return np.asarray(keep(torch.as_tensor(np.asarray(mask, dtype=np.uint8))[None]))[0].astype(bool)
