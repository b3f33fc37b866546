"""Reference labels in, label maps out, on the input's own voxel grid.

:func:`load_label` reads a ground-truth file through the same loading transforms as its image
(:func:`automedsam.pipeline.load`, ``labels=True``: colour masks grey, palette PNGs keep their
indices, a MedSAM npz gives ``gts``), so label slice k lies under image slice k by construction;
:func:`save_label_map` writes a label map back with the inverse of those transforms (NIfTI with
the input's header and affine for volumes, PNG for 2D images, ``segs`` in an npz).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from .geometry import _orient_codes
from .io import NIFTI_SUFFIXES, LoadedImage, _fail, _suffix

__all__ = ["load_label", "save_label_map"]


def load_label(path: str | os.PathLike, like: LoadedImage) -> np.ndarray:
    """Read a ground-truth label file as (N,H,W) integer slices in the same layout as ``like``.

    2D colour masks are turned grey; palette PNGs keep their indices; a MedSAM ``.npz`` gives its
    ``gts`` array. The label must lie on the image's voxel grid (same shape and axis order).
    Returns uint8 when every value fits, else int32.
    """
    from ..pipeline import load

    p = Path(path)
    target = like.meta["orientation"]["target"] if like.meta.get("orientation") else None
    image, info, _ = load(p, orientation=target, labels=True)
    arr = image.detach().cpu().numpy()
    if arr.shape[0] != 1:
        raise _fail(p, f"label has {arr.shape[0]} channels; need one")
    x = arr[0]
    slices = np.moveaxis(x, 2, 0) if x.ndim == 3 else x[None]  # (N,H,W)
    if x.dtype.kind == "f":
        if np.abs(x - np.round(x)).max() > 1e-3:
            raise _fail(p, "label has non-integer values (an interpolated or probability map?); need integer labels")
        slices = np.round(slices)
    if slices.min() < 0:
        raise _fail(p, f"label has negative values (min {slices.min():g})")
    if tuple(slices.shape) != (like.num_slices, *like.slice_shape) or bool(info["is_volume"]) != like.is_volume:
        raise _fail(p, f"label shape {info['original_shape']} does not match the image ({like.path}: "
                       f"{like.native_shape} as stored, {like.num_slices} slices of {like.slice_shape})")
    if like.meta.get("layout") == "xyz" and info["layout"] == "xyz":
        laff = np.asarray(info["label_affine"], dtype=float)
        iaff = np.asarray(like.meta["native_affine"], dtype=float)
        if laff.shape == (4, 4):
            if _orient_codes(laff) != _orient_codes(iaff):
                raise _fail(p, f"label voxel axes {_orient_codes(laff)} differ from the image's "
                               f"{_orient_codes(iaff)} ({like.path})")
            if not np.allclose(laff, iaff, atol=1e-2 * max(1.0, float(np.abs(iaff[:3, :3]).max()))):
                warnings.warn(f"{p}: label affine differs from the image's ({like.path}); using the image grid",
                              stacklevel=2)
    return np.ascontiguousarray(slices.astype(np.uint8 if slices.max() <= 255 else np.int32))


def save_label_map(label_slices: np.ndarray, loaded: LoadedImage, out_path: str | os.PathLike) -> str:
    """Write (N,H,W) label slices in the input's geometry, atomically; returns the path written.

    Volumes -> NIfTI (``.nii``/``.nii.gz``; uint8, the input's voxel grid and affine; a NIfTI
    input's header is kept). 2D -> PNG (uint8, the input's H x W). A MedSAM ``.npz`` input may
    also be answered with ``.npz`` (key ``segs``, the layout of ``imgs``).
    """
    import nibabel as nib
    from PIL import Image

    out = Path(out_path)
    suffix = _suffix(out)
    label_slices = np.asarray(label_slices)
    if label_slices.size and (label_slices.min() < 0 or label_slices.max() > 255):
        raise ValueError(f"label values must be 0..255 to write {out}; got {label_slices.min()}..{label_slices.max()}")
    native = loaded.labels_to_native(label_slices).astype(np.uint8)

    if suffix == ".npz" and loaded.meta["kind"] == "npz":
        def write(tmp):
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, segs=native)
    elif loaded.is_volume:
        if suffix not in NIFTI_SUFFIXES:
            raise ValueError(f"a label map of a volume is written as NIfTI (.nii.gz), not '{suffix}': {out}")
        if loaded.meta["kind"] == "nifti":
            src = nib.load(loaded.path)
            header = src.header.copy()
            img = nib.Nifti1Image(native, src.affine, header=header)
            img.set_qform(src.get_qform(), code=int(src.header["qform_code"]))
            img.set_sform(src.get_sform(), code=int(src.header["sform_code"]))
        else:
            img = nib.Nifti1Image(native, loaded.affine)
        img.set_data_dtype(np.uint8)
        img.header.set_slope_inter(1.0, 0.0)
        img.header["cal_min"], img.header["cal_max"] = 0, max(1, int(native.max()))

        def write(tmp):
            nib.save(img, tmp)
    else:
        if suffix != ".png":
            raise ValueError(f"a label map of a 2D image is written as PNG, not '{suffix}': {out}")
        plane = label_slices[0].astype(np.uint8)

        def write(tmp):
            Image.fromarray(plane).save(tmp, format="PNG")

    atomic_write(out, write)
    return str(out)
