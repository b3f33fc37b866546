"""Refusing inputs too large to segment from their headers, before the data is read.

Segmenting needs roughly 40 bytes per voxel with five classes, so an input whose header
promises more than the limit is refused in one line naming the file; the limit is the
``max_voxels`` argument, then ``$AUTOMEDSAM_MAX_VOXELS``, then :data:`DEFAULT_MAX_VOXELS`
(0: no limit).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import input_error as _fail

__all__ = ["DEFAULT_MAX_VOXELS", "max_voxels_limit", "header_voxels"]

# 2**28 voxels ~ 10 GiB while segmenting
DEFAULT_MAX_VOXELS = 2 ** 28


def max_voxels_limit(max_voxels: int | None = None) -> int:
    """The voxel limit in force: ``max_voxels`` if given, else $AUTOMEDSAM_MAX_VOXELS, else
    :data:`DEFAULT_MAX_VOXELS`; 0 means no limit."""
    if max_voxels is None:
        env = os.environ.get("AUTOMEDSAM_MAX_VOXELS", "").strip()
        if env:
            try:
                max_voxels = int(float(env))
            except ValueError:
                raise ValueError(f"AUTOMEDSAM_MAX_VOXELS must be a whole number of voxels, got '{env}'") from None
        else:
            max_voxels = DEFAULT_MAX_VOXELS
    try:
        limit = int(max_voxels)
    except (TypeError, ValueError):
        raise ValueError(f"max_voxels must be a whole number of voxels (0: no limit), got {max_voxels!r}") from None
    if limit < 0 or limit != float(max_voxels):
        raise ValueError(f"max_voxels must be a whole number >= 0 (0: no limit), got {max_voxels!r}")
    return limit


class _PilNoBombLimit:
    """PIL's own decompression-bomb refusal off for a moment: the voxel limit decides instead."""

    def __enter__(self):
        from PIL import Image

        self._saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None

    def __exit__(self, *exc):
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = self._saved
        return False


def header_voxels(path: str | os.PathLike, kind: str | None = None) -> tuple[int, tuple[int, ...]] | None:
    """(voxel count, array shape) that a file's header promises, read without its pixel data.

    NIfTI (nibabel header), MHA/NRRD (ITK ImageIO information), a DICOM file (Rows, Columns,
    NumberOfFrames), 2D images (PIL's lazy open) and MedSAM ``.npz`` (the ``imgs`` member's
    ``.npy`` header). None when the header cannot tell (the reader then reports the file).
    DICOM series folders: see ``list_dicom_series`` (``voxels`` per series).
    """
    from .io import input_kind

    p = Path(path)
    kind = kind or input_kind(p)
    try:
        if kind == "nifti":
            import nibabel as nib

            shape = tuple(int(v) for v in nib.load(str(p)).header.get_data_shape())
        elif kind == "itk":
            import itk

            image_io = itk.ImageIOFactory.CreateImageIO(str(p), itk.CommonEnums.IOFileMode_ReadMode)
            if image_io is None:
                return None
            image_io.SetFileName(str(p))
            image_io.ReadImageInformation()
            shape = tuple(int(image_io.GetDimensions(i)) for i in range(image_io.GetNumberOfDimensions()))
        elif kind == "dicom_file":
            import pydicom

            ds = pydicom.dcmread(str(p), stop_before_pixels=True, specific_tags=["Rows", "Columns", "NumberOfFrames"])
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            shape = (int(ds.Columns), int(ds.Rows)) + ((frames,) if frames > 1 else ())
        elif kind == "image2d":
            from PIL import Image

            with _PilNoBombLimit(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(p) as im:
                    frames = int(getattr(im, "n_frames", 1) or 1)
                    shape = (int(im.height), int(im.width)) + ((frames,) if frames > 1 else ())
        elif kind == "npz":
            import zipfile

            with zipfile.ZipFile(p) as z:
                if "imgs.npy" not in z.namelist():
                    return None
                with z.open("imgs.npy") as fh:
                    version = np.lib.format.read_magic(fh)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape = tuple(int(v) for v in read(fh)[0])
        else:
            return None
    except Exception:
        return None
    return int(np.prod(shape, dtype=np.int64)) if shape else 0, shape


def _check_voxels(path, n: int, shape: tuple[int, ...] | None, limit: int) -> None:
    if limit and n > limit:
        dims = "x".join(str(v) for v in shape) + " = " if shape else ""
        raise _fail(path, f"{dims}{n:,} voxels is over the limit of {limit:,} voxels; refused before reading the "
                          f"data (raise it with --max_voxels N or $AUTOMEDSAM_MAX_VOXELS; 0 = no limit)")
