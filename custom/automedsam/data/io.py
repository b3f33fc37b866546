"""Reading inputs: the checks that make bad input fail in one line, and the reader of each kind.

:func:`read_checked` is the first step of the one pipeline (:mod:`automedsam.pipeline`,
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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .geometry import _AXIS_LABELS  # noqa: F401  (re-exported: transforms.py)
from .geometry import _affine_spacing, _check_axcodes, _orient_codes, \
    nifti_geometry_notes, voxel_volume_mm3
from .geometry import check_affine as _check_affine
from .limits import DEFAULT_MAX_VOXELS, _check_voxels, _PilNoBombLimit, header_voxels, max_voxels_limit

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


# --------------------------------------------------------------------------------------------
# DICOM


def list_dicom_series(folder: str | os.PathLike) -> list[dict]:
    """Image series of a folder (or of the DICOMDIR in it), found by content and grouped from the
    headers (empty UIDs too): see :func:`automedsam.data.dicom.scan_folder`. Largest first."""
    from .dicom import list_dicom_series as _list

    return _list(folder)


# --------------------------------------------------------------------------------------------
# public API


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
