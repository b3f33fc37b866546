"""Reading inputs: the checks that make bad input fail in one line, and the reader of each kind.

:func:`automedsam.data.reader.read_checked` is the first step of the one pipeline (:mod:`automedsam.pipeline`,
:class:`automedsam.transforms.LoadInputd`): the kind by content (:func:`input_kind`), voxel limits
from the header before any data is read, MONAI ``LoadImage`` with the kind's reader, then empty,
1D/4D, NaN/Inf, constant images and degenerate affines refused naming the file:

=================  ==============================  =========================================
input              MONAI reader                    layout (what SliceLayoutd does with it)
=================  ==============================  =========================================
NIfTI              ``NibabelReader``               xyz: LPS, then rows first; slice k last
DICOM series dir   ``DicomSeriesReader`` (data/    xyz
or DICOMDIR        dicom_series.py: ordered from
                   the headers; UIDs optional)
MHA/MHD/NRRD       ``ITKReader``                   xyz
single DICOM file  ``ITKReader``                   xy (2D: rows first) or xyz if multi-frame
PNG/JPG/BMP/TIFF   ``PILReader`` (io's converters) xy (2D: rows first)
MedSAM ``.npz``    ``NumpyReader(npz_keys=imgs)``  hw (H,W,3) as is; zhw (Z,H,W): slice axis last
=================  ==============================  =========================================

:func:`load_image` runs the pipeline's loading transforms and gives a :class:`LoadedImage`, a
view of their output as (N,H,W,C) slices; ``LoadedImage.labels_to_native`` is the inverse of
the same transforms. Label files: :mod:`automedsam.data.labels`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .geometry import _AXIS_LABELS  # noqa: F401  (re-exported: transforms.py)
from .geometry import _check_axcodes, _orient_codes, voxel_volume_mm3
from .limits import _check_voxels  # noqa: F401  (re-exported: dicom_series.py)
from .limits import DEFAULT_MAX_VOXELS, header_voxels, max_voxels_limit

__all__ = [
    "InputError",
    "LoadedImage",
    "load_image",
    "load_label",
    "save_label_map",
    "list_dicom_series",
    "input_kind",
    "content_sha256",
    "header_voxels",
    "max_voxels_limit",
    "DEFAULT_MAX_VOXELS",
    "IMAGE_2D_SUFFIXES",
    "VOLUME_SUFFIXES",
]

IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_VOLUME_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_VOLUME_SUFFIXES
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
NPZ_SUFFIXES = (".npz",)

# DICOM Modality tag -> AutoMedSAM modality (a hint only; the caller decides).
_DICOM_MODALITY_HINT = {"CT": "ct", "MR": "mr", "CR": "xray", "DX": "xray", "ES": "endoscopy"}



from ..errors import InputError, input_error  # noqa: E402  (the one error type: automedsam.errors)


@dataclass
class LoadedImage:
    """An image or volume as 2D slices in natural image orientation.

    Attributes:
        path: the input path (a file, or a folder for a DICOM series).
        slices: (N,H,W,C) float32 raw intensities; N=1 for 2D; C=1 grey or 3 RGB.
        is_volume: True for 3D inputs (label maps are written as NIfTI, else PNG).
        affine: 4x4 voxel-to-world (RAS, mm) matrix of the *input's* voxel grid; identity for 2D.
        spacing: voxel sizes (mm) of the input's three voxel axes; (1,1,1) for 2D.
        meta: reader, kind, native shape/dtype, layout, orientation, DICOM details (series and
            study UIDs, ordered source files and SOP instance UIDs), ...
        modality_hint: from the DICOM Modality tag when there is one ("ct", "mr", ...), else None.
    """

    path: str
    slices: np.ndarray
    is_volume: bool
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    meta: dict[str, Any] = field(default_factory=dict)
    modality_hint: str | None = None
    image: Any = field(default=None, repr=False)  # the pipeline's (C,H,W[,N]) MetaTensor (raw values)
    chain: Any = field(default=None, repr=False)  # the loading transforms that made it (inverted on the way back)

    @classmethod
    def from_pipeline(cls, image, info: dict[str, Any], chain) -> "LoadedImage":
        """The view :func:`load_image` gives of :func:`automedsam.pipeline.load`'s output."""
        arr = image.detach().cpu().numpy()
        x = np.moveaxis(arr, 0, -1)  # (H,W[,N],C)
        slices = np.ascontiguousarray(np.moveaxis(x, 2, 0) if x.ndim == 4 else x[None], dtype=np.float32)
        meta = {k: v for k, v in info.items() if k not in ("spacing", "is_volume", "has_channel", "label_affine")}
        meta["orientation"], meta["oriented_affine"] = None, None
        op = next(o for o in reversed(image.applied_operations) if o["class"] == "SliceLayoutd")
        if op["extra_info"]["oriented"]:
            meta["orientation"] = {"native": _orient_codes(info["native_affine"]),
                                   "target": chain.transforms[-1].orientation}
            oriented = image.affine.detach().cpu().numpy().astype(np.float64)
            oriented[:, [0, 1]] = oriented[:, [1, 0]]  # rows first -> the oriented voxel axes
            meta["oriented_affine"] = oriented
        dicom = info.get("dicom")
        hint = _DICOM_MODALITY_HINT.get(str(dicom["modality"]).upper()) if dicom else None
        return cls(path=info["filename_or_obj"], slices=slices, is_volume=bool(info["is_volume"]),
                   affine=np.asarray(info["native_affine"], dtype=np.float64), spacing=tuple(info["spacing"]),
                   meta=meta, modality_hint=hint, image=image, chain=chain)

    @property
    def num_slices(self) -> int:
        return int(self.slices.shape[0])

    @property
    def slice_shape(self) -> tuple[int, int]:
        """(H, W) of every slice."""
        return int(self.slices.shape[1]), int(self.slices.shape[2])

    @property
    def voxel_ml(self) -> float | None:
        """The volume of one voxel in ml, ``|det(affine)|`` (right under shear too); None for 2D."""
        return voxel_volume_mm3(self.affine) / 1000.0 if self.is_volume else None

    @property
    def notes(self) -> list[str]:
        """One line each about how the input was read (see :func:`load_image`), for the report."""
        return list(self.meta.get("notes", []))

    @property
    def native_shape(self) -> tuple[int, ...]:
        """Spatial shape of the array as the reader gives it (what ``labels_to_native`` returns)."""
        return tuple(self.meta["native_spatial_shape"])

    def labels_to_native(self, label_slices: np.ndarray) -> np.ndarray:
        """(N,H,W) label slices -> an array on the input's voxel grid (``native_shape``)."""
        label_slices = np.asarray(label_slices)
        expected = (self.num_slices, *self.slice_shape)
        if label_slices.shape != expected:
            raise ValueError(f"label slices of {self.path} must have shape {expected}, got {label_slices.shape}")
        from ..pipeline import to_native

        return np.ascontiguousarray(to_native(label_slices, self.image, self.chain).reshape(self.native_shape))


# --------------------------------------------------------------------------------------------
# helpers


def _suffix(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


_fail = input_error  # "<path>: <problem>" on one line


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _is_dicom_file(path: Path) -> bool:
    """DICOM by content (``DICM`` preamble or a raw header), whatever the name."""
    from .dicom import is_dicom

    return is_dicom(path)


def input_kind(path: str | os.PathLike) -> str:
    """'dicom_series', 'dicom_file', 'nifti', 'itk', 'image2d' or 'npz' (raises InputError otherwise)."""
    p = Path(path)
    if not p.exists():
        raise _fail(path, "no such file or folder")
    if p.is_dir() or p.name.upper() == "DICOMDIR":
        return "dicom_series"
    if p.is_file() and p.stat().st_size == 0:
        raise _fail(path, "empty file (0 bytes); nothing to read")
    if _is_dicom_file(p):  # by content, whatever the name says
        return "dicom_file"
    suffix = _suffix(p)
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in ITK_VOLUME_SUFFIXES:
        return "itk"
    if suffix in IMAGE_2D_SUFFIXES:
        return "image2d"
    if suffix in NPZ_SUFFIXES:
        return "npz"
    if suffix in DICOM_SUFFIXES:  # named DICOM but without its content: read, and refused naming the file
        return "dicom_file"
    raise _fail(path, f"unsupported file type '{suffix or '(no suffix)'}'; expected NIfTI (.nii/.nii.gz), a DICOM "
                      f"series folder or .dcm file, MHA/NRRD, PNG/JPG/BMP/TIFF or MedSAM .npz")


def content_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes; for a folder, of its files' relative names and contents (sorted)."""
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode() + b"\0" + content_sha256(f).encode())
        return h.hexdigest()
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# DICOM


def list_dicom_series(folder: str | os.PathLike) -> list[dict]:
    """Image series of a folder (or of the DICOMDIR in it), found by content and grouped from the
    headers (empty UIDs too): see :func:`automedsam.data.dicom.scan_folder`. Largest first."""
    from .dicom import list_dicom_series as _list

    return _list(folder)


# --------------------------------------------------------------------------------------------
# public API


def load_image(path: str | os.PathLike, series_uid: str | None = None, orientation: str | None = "LPS",
               max_voxels: int | None = None, allow_gaps: bool = False) -> LoadedImage:
    """Read an image or volume (see the module doc for the kinds) into a :class:`LoadedImage`,
    through the one pipeline's loading transforms (:func:`automedsam.pipeline.load`).

    Args:
        path: a file, or a folder holding one DICOM series.
        series_uid: which series to read when a DICOM folder holds several.
        orientation: voxel axis codes volumes are turned to before slicing (``"LPS"``: the
            radiological view); ``None`` keeps the file's voxel order.
        max_voxels: refuse inputs whose header promises more voxels than this, before their data
            is read (None: $AUTOMEDSAM_MAX_VOXELS or :data:`DEFAULT_MAX_VOXELS`; 0: no limit).
        allow_gaps: a DICOM series whose slice positions are unevenly spaced (a missing slice) is
            refused unless this is True; then it is put on a uniform grid, the missing planes
            interpolated (``meta["notes"]`` says so).

    ``meta["notes"]``: one line each about how the input was read (DICOM files grouped without
    UIDs, UIDs generated, duplicate slices dropped, gaps filled, a header's voxel size assumed),
    for the report.

    Raises:
        InputError: missing path, unreadable/truncated/non-image file, 1D or 4D arrays, several
            DICOM series without ``series_uid``, more voxels than ``max_voxels``, a constant
            (e.g. all-zero) image, NaN/Inf voxels (refused, never guessed).
    """
    from ..pipeline import load

    if orientation:
        orientation = _check_axcodes(orientation)
    image, info, chain = load(path, orientation=orientation, series_uid=series_uid, max_voxels=max_voxels,
                              allow_gaps=allow_gaps)
    return LoadedImage.from_pipeline(image, info, chain)


def load_label(path: str | os.PathLike, like: LoadedImage) -> np.ndarray:
    """See :func:`automedsam.data.labels.load_label` (its home)."""
    from .labels import load_label as _load_label

    return _load_label(path, like)


def save_label_map(label_slices: np.ndarray, loaded: LoadedImage, out_path: str | os.PathLike) -> str:
    """See :func:`automedsam.data.labels.save_label_map` (its home)."""
    from .labels import save_label_map as _save_label_map

    return _save_label_map(label_slices, loaded, out_path)
