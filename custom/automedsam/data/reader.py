"""Reading one file, checked: the first step of the one pipeline (:mod:`automedsam.pipeline`).

:func:`read_checked` finds the kind by content (:func:`automedsam.data.io.input_kind`), checks the
voxel count from the header before any data is read, reads the file with MONAI ``LoadImage`` and
the kind's reader (the table in :mod:`automedsam.data.io`), then refuses empty, 1D/4D, NaN/Inf,
constant images and degenerate affines in one line naming the file.
:class:`automedsam.transforms.LoadInputd` calls it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .geometry import _affine_spacing, nifti_geometry_notes
from .geometry import check_affine as _check_affine
from .io import InputError, _fail, _first_line, input_kind
from .limits import _check_voxels, _PilNoBombLimit, header_voxels, max_voxels_limit

__all__ = ["read_checked"]

_LOADER = None


def _load(path, reader):
    """MONAI LoadImage with a given reader: (numpy array in the reader's raw dtype, meta dict)."""
    global _LOADER
    from monai.transforms import LoadImage

    if _LOADER is None:
        _LOADER = LoadImage(image_only=False, dtype=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img, meta = _LOADER(str(path), reader=reader)
    arr = img.numpy() if hasattr(img, "numpy") else np.asarray(img)
    return np.asarray(arr), dict(meta)


def _pil_image_converter(img):
    """PIL image -> grey ('L', 'I;16', 'I', 'F') or 'RGB'; multi-page files are refused."""
    if getattr(img, "n_frames", 1) > 1:
        raise ValueError(f"multi-page image with {img.n_frames} pages; only single-page 2D images are supported")
    if img.mode in ("1", "LA", "La"):
        return img.convert("L")
    if img.mode in ("L", "I", "F", "RGB") or img.mode.startswith("I;16"):
        return img
    return img.convert("RGB")  # P, PA, RGBA, CMYK, YCbCr, ...


def _pil_label_converter(img):
    """Label images: palette images keep their indices; colour masks become grey."""
    if getattr(img, "n_frames", 1) > 1:
        raise ValueError(f"multi-page image with {img.n_frames} pages")
    if img.mode in ("P", "L", "I", "F") or img.mode.startswith("I;16"):
        return img
    return img.convert("L")


def _squeeze_trailing(arr: np.ndarray, keep: int) -> np.ndarray:
    while arr.ndim > keep and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr


def _check_values(arr: np.ndarray, path, what: str = "image") -> None:
    if arr.size == 0:
        raise _fail(path, f"{what} is empty (shape {arr.shape})")
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            n = int(bad.sum())
            raise _fail(path, f"{what} has {n} NaN/Inf voxel{'s' if n != 1 else ''} out of {arr.size}; refusing to "
                              f"guess their values (fix or replace them in the file)")


def _read_native(path: Path, kind: str, series_uid: str | None = None, label: bool = False,
                 npz_key: str | None = None, max_voxels: int = 0,
                 allow_gaps: bool = False) -> tuple[np.ndarray, dict, dict | None, str]:
    """(native array, MONAI meta, dicom info or None, reader name). Raises InputError."""
    from monai.data import ITKReader, NibabelReader, NumpyReader, PILReader

    dicom = None
    try:
        if kind == "nifti":
            reader = NibabelReader()
            arr, meta = _load(path, reader)
        elif kind == "itk":
            reader = ITKReader()
            arr, meta = _load(path, reader)
        elif kind == "dicom_series":
            from .dicom_series import DicomSeriesReader

            reader = DicomSeriesReader(series_uid=series_uid, allow_gaps=allow_gaps, max_voxels=max_voxels)
            arr, meta = _load(path, reader)
            dicom = meta.pop("dicom")
        elif kind == "dicom_file":
            from .dicom import single_file_info

            dicom = single_file_info(path)
            reader = ITKReader()
            arr, meta = _load(path, reader)
        elif kind == "image2d":
            conv = _pil_label_converter if label else _pil_image_converter
            reader = PILReader(converter=conv, reverse_indexing=True)
            if max_voxels:  # the voxel limit was checked from the header: PIL's bomb limit need not apply
                with _PilNoBombLimit():
                    arr, meta = _load(path, reader)
            else:
                arr, meta = _load(path, reader)
        elif kind == "npz":
            key = npz_key or ("gts" if label else "imgs")
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                spacing = np.asarray(z["spacing"], dtype=float).reshape(-1) if "spacing" in keys else None
            if key not in keys:
                raise _fail(path, f"npz file has no '{key}' array (keys: {', '.join(keys) or 'none'})")
            reader = NumpyReader(npz_keys=[key])
            arr, meta = _load(path, reader)
            if spacing is not None and spacing.size == 3:
                meta["npz_spacing"] = tuple(float(s) for s in spacing)
        else:
            raise _fail(path, f"unsupported input kind {kind}")
    except InputError:
        raise
    except Exception as e:
        raise _fail(path, f"cannot read {kind.replace('_', ' ')} file ({_first_line(e)})") from e
    return arr, meta, dicom, type(reader).__name__


def read_checked(path: str | os.PathLike, series_uid: str | None = None, max_voxels: int | None = None,
                 allow_gaps: bool = False, label: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """The checks that make bad input fail in one line, and the read: (array, meta).

    The first step of the one pipeline (:class:`automedsam.transforms.LoadInputd` calls it): the
    kind is found by content (:func:`input_kind`), the voxel count is checked from the header
    before any data is read, the file is read by MONAI ``LoadImage`` with the reader of its kind,
    then empty, 1D/4D, NaN/Inf, constant images and degenerate affines are refused. The array
    keeps the reader's spatial axes (x first for NIfTI/ITK/DICOM/PIL; (Z,H,W) or (H,W) for a
    MedSAM npz) with a trailing channel axis when ``meta["has_channel"]``; ``meta`` says how the
    pipeline lays it out (``layout``, ``is_volume``, ``affine``, ``spacing``, ``notes``, ...).
    """
    p = Path(path)
    kind = input_kind(p)
    if kind == "dicom_series" and p.is_file():  # a DICOMDIR: its folder
        p = p.parent
    limit = max_voxels_limit(max_voxels)
    promised = None
    if limit and kind != "dicom_series":  # a series is counted from its files' headers when chosen
        promised = header_voxels(p, kind)
        if promised is not None:
            _check_voxels(p, promised[0], promised[1], limit)
    arr, rmeta, dicom, reader_name = _read_native(p, kind, series_uid, label=label, max_voxels=limit,
                                                  allow_gaps=allow_gaps)
    notes: list[str] = list((dicom or {}).get("notes", []))
    if promised is None and kind != "dicom_series":  # a header that could not tell: count what was read
        _check_voxels(p, int(arr.size), tuple(arr.shape), limit)
    original_shape = tuple(int(s) for s in arr.shape)
    native_dtype = str(arr.dtype)
    if arr.dtype.kind not in "biuf":
        raise _fail(p, f"unsupported {'label ' if label else ''}voxel type {arr.dtype}")
    affine = np.eye(4)
    spacing = (1.0, 1.0, 1.0)
    has_channel = False

    if kind in ("nifti", "itk", "dicom_series", "dicom_file"):
        # multi-component pixels (RGB DICOM) as ITK reports them; a 4D NIfTI is refused below
        has_channel = kind != "nifti" and rmeta.get("original_channel_dim") == -1
        if has_channel:
            chans = 3 if arr.shape[-1] >= 3 else 1  # RGB(A) -> RGB; grey(+alpha) -> grey
            arr = arr[..., :chans].reshape(*_squeeze_trailing(arr[..., 0], 2).shape, chans)
            if chans == 1:
                arr, has_channel = arr[..., 0], False
        else:
            arr = _squeeze_trailing(arr, 2)
        affine = np.asarray(rmeta.get("affine", np.eye(4)), dtype=np.float64)
        if affine.shape != (4, 4):  # 2D ITK images carry a 3x3 affine
            a = np.eye(4)
            a[:2, :2], a[:2, 3] = affine[:2, :2], affine[:2, 2]
            affine = a
        if kind == "nifti" and not label:
            notes += nifti_geometry_notes(p, affine, arr.ndim)
        _check_affine(p, affine)
        spacing = _affine_spacing(affine)
        n_spatial = arr.ndim - (1 if has_channel else 0)
        if n_spatial == 1:
            raise _fail(p, f"1D array of shape {original_shape}; need a 2D image or a 3D volume")
        if n_spatial > 3 or (has_channel and n_spatial == 3):
            raise _fail(p, f"{arr.ndim}D array of shape {original_shape}; only 2D images and 3D volumes are "
                           f"supported (split multi-channel or time series into 3D volumes)")
        if kind == "dicom_file" and n_spatial == 2:
            layout, is_volume = "xy", False
            spacing = (spacing[0], spacing[1], 1.0)
        else:
            layout, is_volume = "xyz", True
            if arr.ndim == 2:  # a one-slice volume (2D NIfTI)
                arr = arr[..., None]
    elif kind == "image2d":  # PILReader, x first: (W, H[, C])
        layout, is_volume = "xy", False
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
            raise _fail(p, f"unexpected image array shape {original_shape}")
        has_channel = arr.ndim == 3
    else:  # npz
        what = "gts" if label else "imgs"
        if arr.ndim == 2:
            layout, is_volume = "hw", False
        elif arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4:
            layout, is_volume, has_channel = "hw", False, True
            arr = arr[..., :3]
        elif arr.ndim == 3:
            layout, is_volume = "zhw", True
        elif arr.ndim == 1:
            raise _fail(p, f"'{what}' is a 1D array of shape {original_shape}; need (H,W,3) or (Z,H,W)")
        else:
            raise _fail(p, f"'{what}' is a {arr.ndim}D array of shape {original_shape}; need (H,W,3) 2D or "
                           f"(Z,H,W) 3D")
        if "npz_spacing" in rmeta:
            spacing = rmeta["npz_spacing"]
            if is_volume:
                affine = np.diag([*spacing, 1.0])

    _check_values(arr, p, "label" if label else "image")
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if lo == hi and not label:
        raise _fail(p, f"constant image (every voxel is {lo:g}); nothing to segment")
    spatial = arr.shape[:-1] if has_channel else arr.shape
    if kind == "image2d":  # the file's own grid is rows x columns (what its label PNG holds)
        spatial = spatial[::-1]
    meta: dict[str, Any] = {
        "reader": reader_name, "kind": kind, "original_shape": original_shape,
        "native_spatial_shape": tuple(int(s) for s in spatial), "native_dtype": native_dtype, "layout": layout,
        "is_volume": is_volume, "has_channel": bool(has_channel), "native_affine": affine, "spacing": spacing,
        "intensity_range": (lo, hi), "filename_or_obj": str(p), "notes": notes,
        "label_affine": np.asarray(rmeta.get("affine", np.eye(4)), dtype=float) if label else None,
    }
    if kind == "image2d":
        meta["pil_mode"] = rmeta.get("mode")
    if dicom is not None:
        meta["dicom"] = dicom
    return arr, meta
