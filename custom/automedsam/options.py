"""The options of a segmentation run, parsed and checked once, before any work.

:func:`segment_options` turns what a user gives (the command line's strings, or the Python
API's keywords) into one frozen :class:`SegmentOptions`: class names become label ids here and
nowhere else, box/point corrections are parsed here, and every value is checked here. Anything
wrong raises :class:`~automedsam.errors.RunError` naming the option, before an input is read or
the model is loaded. :func:`automedsam.segment.segment` and the ``automedsam segment`` command
both go through it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .classes import CLASS_IDS, CLASSES, check_modality, class_id
from .errors import RunError

__all__ = ["SegmentOptions", "segment_options", "Correction", "parse_box", "parse_points", "class_ids",
           "check_uncertainty", "check_threshold", "check_batch_size", "check_device", "MAX_UNCERTAINTY_DRAWS"]

# --uncertainty draws at most. The spread from N draws has a relative standard error of about
# 1/sqrt(2(N-1)) (13% at 32), while each draw costs one class-prompt and mask-decoder pass per
# slice and class: 1000 draws on one 256x256 image ran past 2 minutes on a laptop CPU.
MAX_UNCERTAINTY_DRAWS = 32


# --------------------------------------------------------------------------------------------
# interactive corrections


@dataclass(frozen=True)
class Correction:
    """A user box or point prompt in the input's pixel coordinates."""

    kind: str  # "box" | "point"
    values: tuple[float, ...]  # box: x0,y0,x1,y1 ; point: x,y
    slice: int | None = None
    label: int = 1  # points: 1 foreground, 0 background
    class_name: str | None = None


def _split_specs(spec) -> list:
    if spec is None or spec == "" or spec == []:
        return []
    if isinstance(spec, str):
        return [s.strip() for s in spec.split(";") if s.strip()]
    if isinstance(spec, list) or (isinstance(spec, tuple) and spec and not isinstance(spec[0], (int, float))):
        out = []
        for s in spec:
            out.extend(_split_specs(s))
        return out
    return [spec]  # a tuple of numbers, or a Correction


def _numbers_and_class(item, what: str) -> tuple[str | None, list[float]]:
    cls = None
    if isinstance(item, str):
        text = item.strip()
        if ":" in text:
            cls, text = text.split(":", 1)
            cls = cls.strip()
        parts = [t for t in re.split(r"[,\s]+", text.strip("()[] ")) if t]
        try:
            nums = [float(t) for t in parts]
        except ValueError:
            raise RunError(f"bad {what} '{item}': expected numbers separated by commas") from None
    else:
        try:
            nums = [float(t) for t in item]
        except (TypeError, ValueError):
            raise RunError(f"bad {what} {item!r}: expected numbers separated by commas") from None
    if cls is not None:
        try:
            cls = CLASSES[class_id(cls)]
        except ValueError as e:
            raise RunError(f"bad {what} '{item}': {e}") from None
    return cls, nums


def parse_box(spec) -> list[Correction]:
    """``[class:]x0,y0,x1,y1[,slice]`` (several separated by ';', or a list) -> corrections."""
    out = []
    for item in _split_specs(spec):
        if isinstance(item, Correction):
            out.append(item)
            continue
        cls, n = _numbers_and_class(item, "--box")
        if len(n) not in (4, 5):
            raise RunError(f"bad --box {item!r}: expected x0,y0,x1,y1[,slice] (4 or 5 numbers), got {len(n)}")
        x0, y0, x1, y1 = n[:4]
        if x1 < x0 or y1 < y0:
            raise RunError(f"bad --box {item!r}: need x0 <= x1 and y0 <= y1")
        out.append(Correction("box", (x0, y0, x1, y1), int(n[4]) if len(n) == 5 else None, 1, cls))
    return out


def parse_points(spec) -> list[Correction]:
    """``[class:]x,y[,slice],label`` (label 1 foreground, 0 background; several separated by ';')."""
    out = []
    for item in _split_specs(spec):
        if isinstance(item, Correction):
            out.append(item)
            continue
        cls, n = _numbers_and_class(item, "--point")
        if len(n) not in (3, 4):
            raise RunError(f"bad --point {item!r}: expected x,y[,slice],label (3 or 4 numbers), got {len(n)}")
        label = n[-1]
        if label not in (0, 1):
            raise RunError(f"bad --point {item!r}: the last number is the label, 1 (object) or 0 (background)")
        out.append(Correction("point", (n[0], n[1]), int(n[2]) if len(n) == 4 else None, int(label), cls))
    return out


# --------------------------------------------------------------------------------------------
# single checks (each the one home of its rule)


def class_ids(classes: str | int | Iterable[str | int] | None) -> tuple[int, ...] | None:
    """Label ids of ``--classes`` (names in any spelling of classes.ALIASES, or ids; a list or
    comma-separated), in order without repeats; None or "all": the modality's classes (None).
    A list naming no class (``","``, ``""``) is refused with the valid names."""
    if classes is None or (isinstance(classes, str) and classes.strip().lower() == "all"):
        return None
    if isinstance(classes, str):
        names = [c.strip() for c in classes.split(",") if c.strip()]
    elif isinstance(classes, int):
        names = [classes]
    else:
        names = [c for c in classes if str(c).strip()]
    if not names:
        raise RunError(f"--classes {classes!r} names no class; valid classes: {', '.join(CLASS_IDS)} "
                       f"(or leave --classes out for every class of the modality)")
    try:
        return tuple(dict.fromkeys(class_id(c) for c in names))
    except ValueError as e:
        raise RunError(str(e)) from None


def check_uncertainty(uncertainty) -> int:
    """Noise draws: 0 (none) or 2..MAX_UNCERTAINTY_DRAWS."""
    if uncertainty is None or uncertainty is False:
        return 0
    try:
        n = int(uncertainty)
        if n != float(uncertainty) or isinstance(uncertainty, bool):
            raise ValueError
    except (TypeError, ValueError):
        raise RunError(f"--uncertainty must be a whole number of noise draws, got {uncertainty!r}") from None
    if n < 0:
        raise RunError(f"--uncertainty must be >= 0 noise draws, got {n}")
    if n == 1:
        raise RunError("--uncertainty needs at least 2 noise draws (a spread of one draw is 0)")
    if n > MAX_UNCERTAINTY_DRAWS:
        raise RunError(f"--uncertainty {n} is over the limit of {MAX_UNCERTAINTY_DRAWS} draws: each draw costs one "
                       f"decoder pass per slice and class, and the spread from {MAX_UNCERTAINTY_DRAWS} draws is "
                       f"already within ~13% of its limit")
    return n


def check_threshold(threshold) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise RunError(f"--threshold must be a number between 0 and 1, got {threshold!r}") from None
    if not 0 < t < 1:
        raise RunError(f"--threshold must be between 0 and 1, got {threshold}")
    return t


def check_batch_size(batch_size) -> int | None:
    if batch_size is None:
        return None
    try:
        b = int(batch_size)
        if b != float(batch_size) or isinstance(batch_size, bool):
            raise ValueError
    except (TypeError, ValueError):
        raise RunError(f"--batch_size must be a whole number of slices, got {batch_size!r}") from None
    if b < 1:
        raise RunError(f"--batch_size must be >= 1, got {b}")
    return b


def check_device(device) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (a CUDA device must be there)."""
    d = str(device if device is not None else "cpu").strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", d):
        raise RunError(f"--device {device!r} is not a device here: use cpu, cuda or cuda:N")
    if d.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RunError(f"--device {d}: CUDA is not available here; use --device cpu")
        index = int(d.split(":")[1]) if ":" in d else 0
        if index >= torch.cuda.device_count():
            raise RunError(f"--device {d}: there are {torch.cuda.device_count()} CUDA device(s) here "
                           f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return d


def _check_max_voxels(max_voxels) -> int:
    from .data.io import max_voxels_limit

    if isinstance(max_voxels, str):  # the command line's text: 268435456, 2.5e8
        try:
            as_float = float(max_voxels)
            max_voxels = int(as_float) if as_float.is_integer() else max_voxels
        except ValueError:
            pass
    try:
        return max_voxels_limit(max_voxels)
    except ValueError as e:
        raise RunError(f"--{e}" if str(e).startswith("max_voxels") else str(e)) from None


def _check_weights(weights) -> Path | None:
    if weights is None or str(weights) == "":
        return None
    from .errors import CheckpointError

    p = Path(weights)
    if not p.exists():
        raise CheckpointError(f"--weights: AutoMedSAM weights not found: {p}")
    if not p.is_file():
        raise CheckpointError(f"--weights: {p} is not a file")
    if not os.access(p, os.R_OK):
        raise CheckpointError(f"--weights: {p} cannot be read (permission denied)")
    return p


def _check_bundle(bundle) -> Path | None:
    if bundle is None or str(bundle) == "":
        return None
    p = Path(bundle)
    if not (p / "configs" / "inference.yaml").is_file():
        raise RunError(f"--bundle {p} is not an AutoMedSAM bundle folder (no configs/inference.yaml in it)")
    return p


# --------------------------------------------------------------------------------------------
# the options object


@dataclass(frozen=True)
class SegmentOptions:
    """Every option of a segmentation run, checked (see :func:`segment_options`).

    ``classes``: label ids, or None for every class of each input's modality. ``corrections``:
    the parsed ``--box``/``--point`` prompts (class names canonical). ``max_voxels``: the limit
    in force (0: none). The others are as :func:`automedsam.segment.segment` documents them."""

    classes: tuple[int, ...] | None = None
    modality: str | None = None
    device: str = "cpu"
    weights: Path | None = None
    bundle: Path | None = None
    largest_component: bool = False
    uncertainty: int = 0
    corrections: tuple[Correction, ...] = ()
    overwrite: bool = False
    progress: bool = False
    threshold: float = 0.5
    batch_size: int | None = None
    max_voxels: int = 0
    series_uid: str | None = None
    allow_gaps: bool = False


def segment_options(classes=None, modality: str | None = None, device: str = "cpu", weights=None, bundle=None,
                    largest_component: bool = False, uncertainty=0, box=None, point=None, overwrite: bool = False,
                    progress: bool = False, threshold=0.5, batch_size=None, max_voxels=None, series_uid=None,
                    allow_gaps: bool = False) -> SegmentOptions:
    """Check every option once and return them as a :class:`SegmentOptions`; raises
    :class:`~automedsam.errors.RunError` (one line naming the option) on the first wrong one."""
    mod = None
    if modality not in (None, ""):
        try:
            mod = check_modality(modality)
        except ValueError as e:
            raise RunError(f"--modality: {e}") from None
    uid = str(series_uid).strip() if series_uid is not None else None
    if uid == "":
        raise RunError("--series_uid is empty: give a SeriesInstanceUID, or 'all'")
    return SegmentOptions(
        classes=class_ids(classes), modality=mod, device=check_device(device), weights=_check_weights(weights),
        bundle=_check_bundle(bundle), largest_component=bool(largest_component),
        uncertainty=check_uncertainty(uncertainty), corrections=tuple(parse_box(box) + parse_points(point)),
        overwrite=bool(overwrite), progress=bool(progress), threshold=check_threshold(threshold),
        batch_size=check_batch_size(batch_size), max_voxels=_check_max_voxels(max_voxels), series_uid=uid,
        allow_gaps=bool(allow_gaps))
