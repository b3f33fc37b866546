"""Box and point corrections (``--box``/``--point``) -> the inferer's prompts.

The user gives pixels of the input as stored (column x, row y, slice k of its voxel grid); the
working slices are the pipeline's (volumes turned to LPS, rows first). :class:`SliceMapper`
maps one to the other through the image's affines (the native one and the one the pipeline's
``Orientation`` gave, both in :class:`~automedsam.data.io.LoadedImage`'s meta); inside a slice,
segment-anything's ``ResizeLongestSide`` geometry takes over in the inferer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .classes import CLASSES, class_id
from .data.io import LoadedImage
from .errors import SegmentError
from .options import Correction

__all__ = ["SliceMapper", "corrections_to_prompts"]


class SliceMapper:
    """Maps the input's own pixel coordinates (column x, row y, slice k of the voxel grid as
    stored) to the slices AutoMedSAM works on (volumes are turned to LPS before slicing)."""

    def __init__(self, loaded: LoadedImage):
        self.n, (self.h, self.w) = loaded.num_slices, loaded.slice_shape
        self.t = np.eye(4)
        meta = loaded.meta
        orient = meta.get("orientation")
        if meta.get("layout") == "xyz" and orient and orient["target"] != orient["native"]:
            # native voxel index -> oriented voxel index (a signed permutation)
            oriented = np.asarray(meta["oriented_affine"], float)
            self.t = np.round(np.linalg.inv(oriented) @ np.asarray(meta["native_affine"], float), 6)

    @property
    def slice_axis_kept(self) -> bool:
        return abs(abs(self.t[2, 2]) - 1) < 1e-6

    def to_slice(self, x: float, y: float, k: float) -> tuple[float, float, int]:
        """(column, row, slice) of the working slices for input pixel (x, y) on slice k."""
        v = self.t @ np.array([x, y, k, 1.0])
        return float(v[0]), float(v[1]), int(round(v[2]))

    def native_slice(self, s: int) -> int:
        """The input's own slice number of working slice ``s`` (when the slice axis is kept)."""
        if not self.slice_axis_kept:
            return int(s)
        return int(round((s - self.t[2, 3]) / self.t[2, 2]))


def _corrections_to_prompts(corrections: Sequence[Correction], loaded: LoadedImage, default_class: int | None,
                            ) -> dict[int, dict]:
    """Corrections -> the inferer's prompts {class_id: {"box", "points", "slices"}} in slice pixels."""
    mapper = SliceMapper(loaded)
    prompts: dict[int, dict] = {}
    for c in corrections:
        if c.class_name:
            cid = class_id(c.class_name)
        elif default_class is not None:
            cid = default_class
        else:
            raise SegmentError(f"--{c.kind} needs a class: prefix it (e.g. liver:{','.join(f'{v:g}' for v in c.values)}"
                               f"...) or give --classes with exactly one class")
        k = c.slice
        if loaded.is_volume and loaded.num_slices > 1 and k is None:
            raise SegmentError(f"--{c.kind} on a volume needs its slice number ({loaded.path} has "
                               f"{loaded.num_slices} slices): x,y,...,slice")
        k = 0 if k is None else k
        native_shape = loaded.native_shape
        nz = native_shape[2] if (loaded.meta.get("layout") == "xyz" and len(native_shape) > 2) else loaded.num_slices
        if not 0 <= k < nz:
            raise SegmentError(f"--{c.kind} slice {k} is outside {loaded.path} (slices 0..{nz - 1})")
        if c.kind == "box":
            x0, y0, s0 = mapper.to_slice(c.values[0], c.values[1], k)
            x1, y1, s1 = mapper.to_slice(c.values[2], c.values[3], k)
            if s0 != s1:
                raise SegmentError(f"--box on {loaded.path}: this volume's stored slices are not axial, so a box "
                                   f"cannot be placed on one slice; reorient the file")
            pts = [(min(x0, x1), min(y0, y1)), (max(x0, x1), max(y0, y1))]
            s = s0
        else:
            x, y, s = mapper.to_slice(c.values[0], c.values[1], k)
            pts = [(x, y)]
        for px, py in pts:
            if not (-0.5 <= px <= mapper.w - 0.5 and -0.5 <= py <= mapper.h - 0.5):
                raise SegmentError(f"--{c.kind} {','.join(f'{v:g}' for v in c.values)} lies outside the image "
                                   f"({loaded.path}: {loaded.slice_shape[1]} columns x {loaded.slice_shape[0]} rows)")
        pr = prompts.setdefault(cid, {"box": None, "points": [], "slices": [s]})
        if pr["slices"] != [s]:
            raise SegmentError(f"all --box/--point corrections of class {CLASSES[cid]} must be on one slice "
                               f"(got slices {pr['slices'][0]} and {s} in the working order)")
        if c.kind == "box":
            if pr["box"] is not None:
                raise SegmentError(f"only one --box per class (class {CLASSES[cid]})")
            pr["box"] = (pts[0][0], pts[0][1], pts[1][0], pts[1][1])
        else:
            pr["points"].append((pts[0][0], pts[0][1], c.label))
    return prompts


corrections_to_prompts = _corrections_to_prompts
