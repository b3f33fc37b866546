"""Voxel geometry that is never silently wrong (the volume <-> slice layout itself is the pipeline's
``SliceLayoutd``, automedsam.pipeline): affines checked before use, voxel volumes from
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
# voxel axis codes


def _orient_codes(affine: np.ndarray) -> str:
    import nibabel as nib

    return "".join(nib.aff2axcodes(affine, labels=_AXIS_LABELS))


def _check_axcodes(codes: str) -> str:
    codes = str(codes).upper()
    axes = sorted(i for c in codes for i, pair in enumerate(_AXIS_LABELS) if c in pair)
    if len(codes) != 3 or axes != [0, 1, 2]:
        raise ValueError(f"orientation must be three axis codes such as 'LPS' or 'RAS', got '{codes}'")
    return codes


def _affine_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    sp = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return tuple(float(s) for s in sp)
