"""What a segmentation run tells its user besides the label map: per-class statistics, the
JSON report, and an overlay picture (contours in class colours with a legend).

Nothing here runs the model; :mod:`automedsam.segment` calls these on its results.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .classes import CLASS_COLOURS, CLASSES

__all__ = ["class_statistics", "report_json", "choose_overlay_slice", "overlay_image", "LOW_IOU"]

LOW_IOU = 0.5  # mean predicted IoU under this is flagged "low predicted IoU"


def class_statistics(label_slices: np.ndarray, class_ids: Sequence[int], iou: np.ndarray, presence: np.ndarray,
                     spacing: Sequence[float] | None = None, is_volume: bool = True,
                     native_slice: Callable[[int], int] | None = None,
                     flags: dict[int, list[str]] | None = None,
                     voxel_ml: float | None = None, probabilities: np.ndarray | None = None,
                     calibration=None) -> dict[str, dict[str, Any]]:
    """Per-class numbers for the report, keyed by class name.

    Args:
        label_slices: (N,H,W) label map (class ids, 0 background).
        class_ids: the classes asked for, in the order of the rows of ``iou``/``presence``.
        iou, presence: (K,N) the decoder's predicted IoU and the presence probability per slice.
        spacing: voxel sizes in mm (volumes: ``volume_ml`` is given).
        voxel_ml: the volume of one voxel in ml, ``|det(affine)| / 1000`` (``LoadedImage.voxel_ml``);
            when given it is used instead of the product of ``spacing``, which is too large under shear.
        native_slice: maps a slice index of ``label_slices`` to the input's own slice number.
        flags: extra flags per class id (e.g. "refined by user box").
        probabilities: (K,N,H,W) the raw foreground probabilities (``ClassMaps.probabilities``);
            when given, each class gets ``likely_wrong_score`` (the calibrated P(Dice < 0.5) of
            :mod:`automedsam.uncertainty`), ``uncertain_share``, ``presence_margin`` and the flag
            "likely wrong" when the score reaches the bundle's ``flag_threshold``.
        calibration: an :class:`automedsam.uncertainty.Calibration` (default: the bundle's).
    """
    lab = np.asarray(label_slices)
    iou = np.asarray(iou, dtype=np.float64)
    presence = np.asarray(presence, dtype=np.float64)
    if not is_volume:
        voxel_ml = None
    elif voxel_ml is None and spacing is not None:
        voxel_ml = float(np.prod(spacing)) / 1000.0
    per_slice = {cid: (lab == cid).reshape(lab.shape[0], -1).sum(1) for cid in class_ids}
    if probabilities is not None:
        from .uncertainty import bundle_calibration

        calibration = calibration or bundle_calibration()
    out: dict[str, dict[str, Any]] = {}
    for j, cid in enumerate(class_ids):
        counts = per_slice[cid]
        covered = np.nonzero(counts)[0]
        n = int(counts.sum())
        stats: dict[str, Any] = {"id": int(cid), "colour": list(CLASS_COLOURS.get(cid, (255, 255, 255))),
                                 "voxels": n}
        if voxel_ml is not None:
            stats["volume_ml"] = round(n * voxel_ml, 3)
        if is_volume:
            idx = sorted(int(native_slice(int(s))) if native_slice else int(s) for s in covered)
            stats["slices_covered"] = len(idx)
            stats["slices"] = idx
        stats["mean_predicted_iou"] = round(float(iou[j, covered].mean()), 4) if covered.size else None
        stats["mean_presence"] = round(float(presence[j].mean()), 4)
        stats["max_presence"] = round(float(presence[j].max()), 4)
        f = list((flags or {}).get(cid, []))
        if n == 0:
            f.insert(0, "class not found")
        elif stats["mean_predicted_iou"] is not None and stats["mean_predicted_iou"] < LOW_IOU:
            f.append("low predicted IoU")
        if probabilities is not None:
            from .uncertainty import LIKELY_WRONG, calibrate, class_uncertainty

            name = CLASSES[cid]
            cal_p = calibrate(np.asarray(probabilities[j]), calibration.temperature_of(name))
            stats.update(class_uncertainty(name, presence[j], iou[j], lab == cid, cal_p, calibration))
            if n > 0 and stats["likely_wrong_score"] >= calibration.flag_threshold:
                f.append(LIKELY_WRONG)
        stats["flags"] = f
        out[CLASSES[cid]] = stats
    return out


def _to_builtin(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "__fspath__"):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def report_json(report: dict) -> str:
    """The report as indented JSON text (numpy values made plain)."""
    return json.dumps(report, indent=2, default=_to_builtin) + "\n"


def choose_overlay_slice(label_slices: np.ndarray) -> int:
    """The slice with the most labelled pixels; the middle slice when nothing is labelled."""
    lab = np.asarray(label_slices)
    counts = (lab > 0).reshape(lab.shape[0], -1).sum(1)
    if counts.max(initial=0) == 0:
        return lab.shape[0] // 2
    return int(np.argmax(counts))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def overlay_image(image: np.ndarray, labels: np.ndarray, class_ids: Sequence[int], title: str = "",
                  pixel_aspect: float = 1.0, min_side: int = 512, max_side: int = 1024, fill_alpha: float = 0.22,
                  found: Sequence[int] | None = None):
    """A PIL RGB picture of one slice with class contours and a legend.

    Args:
        image: (H,W,3) or (H,W) slice in [0,1] (the normalised model input).
        labels: (H,W) label map of that slice.
        class_ids: classes to list in the legend (those absent on this slice are marked so).
        found: the classes found anywhere in the image (default: those on this slice); others are
            listed as "not found".
        title: a line above the legend.
        pixel_aspect: row spacing / column spacing (anisotropic pixels are shown to scale).
        min_side, max_side: the picture's longest side is brought into this range.
    """
    from PIL import Image, ImageDraw
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    h, w = img.shape[:2]
    disp_h, disp_w = h * max(pixel_aspect, 1e-3), float(w)
    longest = max(disp_h, disp_w)
    scale = min_side / longest if longest < min_side else (max_side / longest if longest > max_side else 1.0)
    size = (max(1, round(disp_w * scale)), max(1, round(disp_h * scale)))  # PIL (width, height)
    base = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8), "RGB")
    base = np.asarray(base.resize(size, Image.Resampling.BILINEAR)).astype(np.float32)
    lab = np.asarray(Image.fromarray(np.asarray(labels, dtype=np.uint8)).resize(size, Image.Resampling.NEAREST))
    thick = max(1, round(min(size) / 256))
    present = [int(c) for c in class_ids if (lab == c).any()]
    for cid in present:
        colour = np.array(CLASS_COLOURS.get(cid, (255, 255, 255)), dtype=np.float32)
        m = lab == cid
        base[m] = (1 - fill_alpha) * base[m] + fill_alpha * colour
        edge = m & ~ndimage.binary_erosion(m, border_value=0)
        if thick > 1:
            edge = ndimage.binary_dilation(edge, iterations=thick - 1)
        base[edge] = colour
    pic = Image.fromarray(base.round().clip(0, 255).astype(np.uint8), "RGB")

    # legend strip under the picture
    fsize = max(12, round(size[0] / 40))
    font = _font(fsize)
    line = fsize + 8
    found_set = set(present if found is None else (int(c) for c in found))
    entries = [(cid, CLASSES.get(cid, str(cid)) + ("" if cid in present else
                                                   " (not on this slice)" if cid in found_set else " (not found)"))
               for cid in class_ids]
    draw_probe = ImageDraw.Draw(pic)
    widths = [draw_probe.textlength(t, font=font) + fsize + 24 for _, t in entries]
    rows, x = 1, 8.0
    for wd in widths:
        if x + wd > size[0] - 8 and x > 8:
            rows, x = rows + 1, 8.0
        x += wd
    strip_h = 8 + (line if title else 0) + rows * line + 4
    canvas = Image.new("RGB", (size[0], size[1] + strip_h), (0, 0, 0))
    canvas.paste(pic, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = size[1] + 6
    if title:
        draw.text((8, y), title, fill=(235, 235, 235), font=font)
        y += line
    x = 8.0
    for (cid, text), wd in zip(entries, widths):
        if x + wd > size[0] - 8 and x > 8:
            x, y = 8.0, y + line
        colour = tuple(CLASS_COLOURS.get(cid, (255, 255, 255))) if cid in present else (110, 110, 110)
        draw.rectangle([x, y + 2, x + fsize, y + 2 + fsize], fill=colour if cid in present else None, outline=colour,
                       width=2)
        draw.text((x + fsize + 6, y), text, fill=(235, 235, 235) if cid in present else (150, 150, 150), font=font)
        x += wd
    return canvas


def pixel_aspect_of(affine: np.ndarray | None) -> float:
    """Row spacing / column spacing of slices whose columns follow voxel axis 0 and rows axis 1."""
    if affine is None:
        return 1.0
    a = np.asarray(affine, dtype=np.float64)
    col, row = np.linalg.norm(a[:3, 0]), np.linalg.norm(a[:3, 1])
    if not (math.isfinite(col) and math.isfinite(row)) or col <= 0 or row <= 0:
        return 1.0
    return float(row / col)
