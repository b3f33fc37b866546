"""Voxel geometry that is never silently wrong (and the one home of the volume <-> slice layout): affines checked before use, voxel volumes from
the determinant, and the NIfTI header cases that readers paper over said out loud.

* A singular, all-zero or non-finite affine gives voxel axes no direction in space: the input
  is refused in one line (which NIfTI form it came from is named) instead of failing deep in
  the orientation code.
* A NIfTI whose affine is built from ``pixdim`` (no sform) with a voxel size of 0: nibabel
  assumes 1 mm; that is kept, with a note for the report, since the pixels are still usable.
* The volume of one voxel is ``|det(affine[:3, :3])|`` (a sheared grid's voxel is smaller than
  the product of its column norms).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import input_error

__all__ = ["check_affine", "voxel_volume_mm3", "nifti_geometry_notes"]

_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # voxel axis codes: (low, high) end of each world axis


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """The volume of one voxel, ``|det|`` of the affine's 3x3 part (mm^3)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def _nifti_source(path: Path) -> str:
    """Which part of a NIfTI header gave its affine: 'sform (sform_code N)', 'qform ...' or 'pixdim'."""
    try:
        import nibabel as nib

        hdr = nib.load(str(path)).header
        s, q = int(hdr["sform_code"]), int(hdr["qform_code"])
    except Exception:
        return "affine"
    if s > 0:
        return f"sform (sform_code {s})"
    if q > 0:
        return f"qform (qform_code {q})"
    return "pixdim-based affine (no sform or qform)"


def check_affine(path: str | os.PathLike, affine: np.ndarray) -> None:
    """Refuse (InputError) an affine whose voxel axes have no direction in space."""
    a = np.asarray(affine, dtype=np.float64)
    p = Path(path)
    nifti = p.name.lower().endswith((".nii", ".nii.gz"))
    where = _nifti_source(p) if nifti else "affine"
    if not np.isfinite(a).all():
        raise input_error(path, f"the {where} has NaN/Inf values; the voxel grid has no place in space")
    m = a[:3, :3]
    if not m.any():
        raise input_error(path, f"the {where} is all zero: the voxel axes have no direction in space (fix the "
                                f"header{', e.g. set sform_code 0 to use the qform' if 'sform' in where else ''})")
    scale = float(np.abs(m).max())
    rank = int(np.linalg.matrix_rank(m, tol=1e-6 * scale))
    if rank < 3:
        raise input_error(path, f"the {where} is singular (its 3x3 part has rank {rank}): the voxel axes have no "
                                f"direction in space (fix the header"
                                f"{', e.g. set sform_code 0 to use the qform' if 'sform' in where else ''})")


def nifti_geometry_notes(path: str | os.PathLike, affine: np.ndarray, ndim: int = 3) -> list[str]:
    """Notes about a NIfTI header's geometry that the reader assumed its way through (pixdim 0)."""
    try:
        import nibabel as nib
        from nibabel.openers import ImageOpener

        klass = type(nib.load(str(path)).header)
        with ImageOpener(str(path)) as fh:
            raw = klass.from_fileobj(fh, check=False)  # the header as stored, before nibabel's fixes
        pixdim = [float(v) for v in raw["pixdim"][1:4]]
        sform = int(raw["sform_code"])
    except Exception:
        return []
    n = max(1, min(3, int(ndim)))
    zero = [i for i in range(n) if pixdim[i] == 0]
    if sform > 0 or not zero:
        return []  # an sform gives the grid; pixdim does not matter
    dims = ", ".join(f"pixdim[{i + 1}]" for i in zero)
    return [f"{Path(path).name}: {dims} = 0 in the NIfTI header (no voxel size); 1 mm assumed, so sizes and "
            f"volumes in ml are only as right as that guess"]


# --------------------------------------------------------------------------------------------
# voxel axes and the slice layout (LoadedImage.slices <-> the input's own voxel grid)


def _orient_codes(affine: np.ndarray) -> str:
    import nibabel as nib

    return "".join(nib.aff2axcodes(affine, labels=_AXIS_LABELS))


def _orient(arr: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """Flip/permute the three spatial axes of arr (X,Y,Z[,C]) to ``codes`` (MONAI Orientation)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    chan = arr.ndim == 4
    t = torch.as_tensor(np.ascontiguousarray(np.moveaxis(arr, -1, 0) if chan else arr[None]))
    mt = MetaTensor(t, affine=torch.as_tensor(affine, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = Orientation(axcodes=codes, labels=_AXIS_LABELS)(mt)
    res = out.as_tensor().numpy()
    res = np.moveaxis(res, 0, -1) if chan else res[0]
    return np.ascontiguousarray(res), out.affine.numpy().astype(np.float64)


def _check_axcodes(codes: str) -> str:
    codes = str(codes).upper()
    axes = sorted(i for c in codes for i, pair in enumerate(_AXIS_LABELS) if c in pair)
    if len(codes) != 3 or axes != [0, 1, 2]:
        raise ValueError(f"orientation must be three axis codes such as 'LPS' or 'RAS', got '{codes}'")
    return codes


def _native_to_slices(arr: np.ndarray, meta: dict, oriented: bool = False) -> np.ndarray:
    """Native array (raw layout; may carry a trailing channel axis) -> (N,H,W[,C]) slices.

    ``oriented``: a volume is already turned to ``meta['orientation']['target']``."""
    layout = meta["layout"]
    if layout == "hw":  # 2D, natural orientation already
        return arr[None]
    if layout == "xy":  # 2D from ITK: (X,Y[,C]) -> (H=Y, W=X)
        return np.swapaxes(arr, 0, 1)[None]
    if layout == "zhw":  # MedSAM npz volume
        return arr
    if layout == "xyz":
        orient = meta.get("orientation")
        if orient and not oriented and orient["target"] != orient["native"]:
            arr, _ = _orient(arr, np.asarray(meta["native_affine"]), orient["target"])
        # (X,Y,Z[,C]) -> (Z,Y,X[,C]): slice k = vol[..., k].T
        return np.swapaxes(np.moveaxis(arr, 2, 0), 1, 2)
    raise ValueError(f"unknown layout {layout}")


def _slices_to_native(label_slices: np.ndarray, meta: dict) -> np.ndarray:
    layout = meta["layout"]
    shape = tuple(meta["native_spatial_shape"])
    if layout == "hw":
        out = label_slices[0]
    elif layout == "xy":
        out = label_slices[0].T
    elif layout == "zhw":
        out = label_slices
    elif layout == "xyz":
        out = np.swapaxes(label_slices, 1, 2)  # (Z,X,Y)
        out = np.moveaxis(out, 0, 2)  # (X,Y,Z)
        orient = meta.get("orientation")
        if orient and orient["target"] != orient["native"]:
            out, back = _orient(out, np.asarray(meta["oriented_affine"]), orient["native"])
    else:
        raise ValueError(f"unknown layout {layout}")
    return np.ascontiguousarray(out.reshape(shape))


def _affine_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    sp = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return tuple(float(s) for s in sp)
