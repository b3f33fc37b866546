"""Reading inputs and writing label maps, all through MONAI's ``LoadImage``.

Every input kind ends up as a :class:`LoadedImage` whose ``slices`` are 2D images in
natural image orientation (rows x columns, as a viewer shows them), so one per-slice
pipeline serves them all:

=================  ==============================  =========================================
input              MONAI reader                    slice k
=================  ==============================  =========================================
NIfTI              ``NibabelReader``               ``vol[..., k].T`` after reorientation
DICOM series dir   ``ITKReader`` (GDCM, sorted by  ``vol[..., k].T`` after reorientation
                   slice position)
MHA/MHD/NRRD       ``ITKReader``                   ``vol[..., k].T`` after reorientation
single DICOM file  ``ITKReader``                   ``img.T`` (2D) or as a volume if multi-frame
PNG/JPG/BMP/TIFF   ``PILReader(reverse_indexing=   the image as stored (H rows, W columns)
                   False)``
MedSAM ``.npz``    ``NumpyReader(npz_keys=imgs)``  ``imgs`` (H,W,3) or ``imgs[k]`` of (Z,H,W)
=================  ==============================  =========================================

Volumes are by default reoriented (MONAI ``Orientation``) to ``LPS`` voxel axes before
slicing, so every volume is shown the radiological way (patient's left on the image's
right, anterior up) whatever order its file stores voxels in; ``orientation=None`` keeps
the file's voxel order. ``LoadedImage.labels_to_native`` undoes all of this exactly, and
``save_label_map`` writes a label map on the input's own voxel grid and affine.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write

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
# DICOM objects that are not images to segment (our own DICOM-SEG output may sit beside the series).
_NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "REG", "DOC"}
_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

# Inputs with more voxels than this are refused from their header, before the data is read
# (segmenting needs roughly 40 bytes per voxel with five classes: 2**28 voxels ~ 10 GiB).
# ``max_voxels`` arguments, then $AUTOMEDSAM_MAX_VOXELS, then this; 0 means no limit.
DEFAULT_MAX_VOXELS = 2 ** 28


class InputError(ValueError):
    """An input (or label) file that cannot be used; the message is one line naming the file."""


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

    @property
    def num_slices(self) -> int:
        return int(self.slices.shape[0])

    @property
    def slice_shape(self) -> tuple[int, int]:
        """(H, W) of every slice."""
        return int(self.slices.shape[1]), int(self.slices.shape[2])

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
        return _slices_to_native(label_slices, self.meta)


# --------------------------------------------------------------------------------------------
# helpers


def _suffix(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def _fail(path, problem: str) -> InputError:
    problem = " ".join(str(problem).split())  # one line
    return InputError(f"{path}: {problem}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _is_dicom_file(path: Path) -> bool:
    try:
        import pydicom.misc

        return bool(pydicom.misc.is_dicom(str(path)))
    except Exception:
        return False


def input_kind(path: str | os.PathLike) -> str:
    """'dicom_series', 'dicom_file', 'nifti', 'itk', 'image2d' or 'npz' (raises InputError otherwise)."""
    p = Path(path)
    if not p.exists():
        raise _fail(path, "no such file or folder")
    if p.is_dir():
        return "dicom_series"
    suffix = _suffix(p)
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in ITK_VOLUME_SUFFIXES:
        return "itk"
    if suffix in IMAGE_2D_SUFFIXES:
        return "image2d"
    if suffix in NPZ_SUFFIXES:
        return "npz"
    if suffix in DICOM_SUFFIXES or _is_dicom_file(p):
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


# --------------------------------------------------------------------------------------------
# DICOM


def list_dicom_series(folder: str | os.PathLike) -> list[dict]:
    """Image series directly in a folder: [{uid, modality, description, files, ...}], largest first.

    Non-DICOM files and non-image objects (SEG, RTSTRUCT, SR, ...) are skipped.
    """
    import pydicom

    folder = Path(folder)
    if not folder.is_dir():
        raise _fail(folder, "not a folder")
    series: dict[str, dict] = {}
    tags = ["SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID", "SOPClassUID",
            "Modality", "SeriesDescription", "SeriesNumber", "Rows", "Columns", "NumberOfFrames"]
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True, specific_tags=tags)
        except Exception:
            continue  # not DICOM (or unreadable): GDCM skips it too
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        modality = str(getattr(ds, "Modality", "") or "")
        if not uid or modality.upper() in _NON_IMAGE_MODALITIES or "Rows" not in ds:
            continue
        s = series.setdefault(uid, {
            "uid": uid, "modality": modality, "description": str(getattr(ds, "SeriesDescription", "") or ""),
            "study_uid": str(getattr(ds, "StudyInstanceUID", "") or ""),
            "frame_of_reference_uid": str(getattr(ds, "FrameOfReferenceUID", "") or ""),
            "sop_class_uid": str(getattr(ds, "SOPClassUID", "") or ""), "files": [], "sop_instance_uids": {},
            "voxels": 0,
        })
        s["files"].append(str(f))
        s["voxels"] += _dicom_voxels(ds)
        s["sop_instance_uids"][str(f)] = str(getattr(ds, "SOPInstanceUID", "") or "")
    return sorted(series.values(), key=lambda s: -len(s["files"]))


def _dicom_voxels(ds) -> int:
    """Pixels a DICOM header promises (Rows x Columns x NumberOfFrames)."""
    try:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        return int(ds.Rows) * int(ds.Columns) * max(1, frames)
    except Exception:
        return 0


def _describe_series(series: list[dict]) -> str:
    return "; ".join(f"{s['uid']} ({s['modality'] or '?'} '{s['description']}', {len(s['files'])} files)"
                     for s in series)


def _gdcm_identifier(folder: Path, files: list[str]) -> tuple[str, list[str]]:
    """The GDCM series identifier MONAI's ITKReader would use for exactly these files, and the
    files in GDCM's order (by slice position along the normal)."""
    import itk

    gen = itk.GDCMSeriesFileNames.New()
    gen.SetUseSeriesDetails(True)
    gen.AddSeriesRestriction("0008|0021")  # as MONAI's ITKReader does
    gen.SetDirectory(str(folder))
    wanted = {os.path.realpath(f) for f in files}
    matches = []
    for ident in gen.GetSeriesUIDs():
        names = [str(n) for n in gen.GetFileNames(ident)]
        real = {os.path.realpath(n) for n in names}
        if real & wanted:
            matches.append((ident, names, real))
    if len(matches) != 1 or matches[0][2] != wanted:
        raise _fail(folder, f"DICOM series has {len(wanted)} files that do not form one volume "
                            f"(GDCM splits them into {len(matches)} groups: differing size, orientation or date)")
    return matches[0][0], matches[0][1]


def _load_dicom_series(folder: Path, series_uid: str | None, max_voxels: int = 0) -> tuple[np.ndarray, dict, dict]:
    from monai.data import ITKReader

    series = list_dicom_series(folder)
    if not series:
        subdirs = [d.name for d in folder.iterdir() if d.is_dir()][:5]
        hint = f" (it has sub-folders: {', '.join(subdirs)}; give the series folder itself)" if subdirs else ""
        raise _fail(folder, f"no DICOM image files in this folder{hint}")
    if series_uid is None:
        if len(series) > 1:
            raise _fail(folder, f"folder holds {len(series)} DICOM series: {_describe_series(series)}; "
                                f"choose one with series_uid=UID (automedsam segment --series_uid UID, or "
                                f"--series_uid all for each in turn)")
        chosen = series[0]
    else:
        found = [s for s in series if s["uid"] == series_uid]
        if not found:
            raise _fail(folder, f"no DICOM series with uid {series_uid}; found: {_describe_series(series)}")
        chosen = found[0]
    _check_voxels(folder, chosen["voxels"], None, max_voxels)
    ident, ordered = _gdcm_identifier(folder, chosen["files"])
    arr, meta = _load(folder, ITKReader(series_name=ident))
    uids = {os.path.realpath(k): v for k, v in chosen["sop_instance_uids"].items()}
    dicom = {
        "series_uid": chosen["uid"], "study_uid": chosen["study_uid"],
        "frame_of_reference_uid": chosen["frame_of_reference_uid"], "sop_class_uid": chosen["sop_class_uid"],
        "modality": chosen["modality"], "description": chosen["description"],
        "files": ordered,  # slice order: files[k] is the voxel plane vol[..., k] of the native array
        "sop_instance_uids": [uids[os.path.realpath(f)] for f in ordered],
    }
    return arr, meta, dicom


def _dicom_file_info(path: Path) -> dict:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as e:
        raise _fail(path, f"not a readable DICOM file ({_first_line(e)})") from e
    get = lambda k: str(getattr(ds, k, "") or "")  # noqa: E731
    return {"series_uid": get("SeriesInstanceUID"), "study_uid": get("StudyInstanceUID"),
            "frame_of_reference_uid": get("FrameOfReferenceUID"), "sop_class_uid": get("SOPClassUID"),
            "modality": get("Modality"), "description": get("SeriesDescription"), "files": [str(path)],
            "sop_instance_uids": [get("SOPInstanceUID")]}


# --------------------------------------------------------------------------------------------
# public API


def _read_native(path: Path, kind: str, series_uid: str | None = None, label: bool = False,
                 npz_key: str | None = None, max_voxels: int = 0) -> tuple[np.ndarray, dict, dict | None, str]:
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
            reader = ITKReader()
            arr, meta, dicom = _load_dicom_series(path, series_uid, max_voxels)
        elif kind == "dicom_file":
            dicom = _dicom_file_info(path)
            reader = ITKReader()
            arr, meta = _load(path, reader)
        elif kind == "image2d":
            conv = _pil_label_converter if label else _pil_image_converter
            reader = PILReader(converter=conv, reverse_indexing=False)
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


def load_image(path: str | os.PathLike, series_uid: str | None = None, orientation: str | None = "LPS",
               max_voxels: int | None = None) -> LoadedImage:
    """Read an image or volume (see the module doc for the kinds) into a :class:`LoadedImage`.

    Args:
        path: a file, or a folder holding one DICOM series.
        series_uid: which series to read when a DICOM folder holds several.
        orientation: voxel axis codes volumes are turned to before slicing (``"LPS"``: the
            radiological view); ``None`` keeps the file's voxel order.
        max_voxels: refuse inputs whose header promises more voxels than this, before their data
            is read (None: $AUTOMEDSAM_MAX_VOXELS or :data:`DEFAULT_MAX_VOXELS`; 0: no limit).

    Raises:
        InputError: missing path, unreadable/truncated/non-image file, 1D or 4D arrays, several
            DICOM series without ``series_uid``, more voxels than ``max_voxels``, a constant
            (e.g. all-zero) image, NaN/Inf voxels (refused, never guessed).
    """
    p = Path(path)
    kind = input_kind(p)
    limit = max_voxels_limit(max_voxels)
    promised = None
    if limit and kind != "dicom_series":  # a series is counted from its files' headers when chosen
        promised = header_voxels(p, kind)
        if promised is not None:
            _check_voxels(p, promised[0], promised[1], limit)
    arr, rmeta, dicom, reader_name = _read_native(p, kind, series_uid, max_voxels=limit)
    if promised is None and kind != "dicom_series":  # a header that could not tell: count what was read
        _check_voxels(p, int(arr.size), tuple(arr.shape), limit)
    original_shape = tuple(int(s) for s in arr.shape)
    native_dtype = str(arr.dtype)
    if arr.dtype.kind not in "biuf":
        raise _fail(p, f"unsupported voxel type {arr.dtype}")
    affine = np.eye(4)
    spacing = (1.0, 1.0, 1.0)
    orient = None
    oriented_affine = None

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
            if orientation:
                target = _check_axcodes(orientation)
                orient = {"native": _orient_codes(affine), "target": target}
    elif kind == "image2d":
        layout, is_volume = "hw", False
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
            raise _fail(p, f"unexpected image array shape {original_shape}")
    else:  # npz
        if arr.ndim == 2:
            layout, is_volume = "hw", False
        elif arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4:
            layout, is_volume = "hw", False
            arr = arr[..., :3]
        elif arr.ndim == 3:
            layout, is_volume = "zhw", True
        elif arr.ndim == 1:
            raise _fail(p, f"'imgs' is a 1D array of shape {original_shape}; need (H,W,3) or (Z,H,W)")
        else:
            raise _fail(p, f"'imgs' is a {arr.ndim}D array of shape {original_shape}; need (H,W,3) 2D or (Z,H,W) 3D")
        if "npz_spacing" in rmeta:
            spacing = rmeta["npz_spacing"]
            if is_volume:
                affine = np.diag([*spacing, 1.0])

    _check_values(arr, p)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if lo == hi:
        raise _fail(p, f"constant image (every voxel is {lo:g}); nothing to segment")

    spatial = arr.shape[:-1] if (arr.ndim == 3 and layout in ("hw", "xy")) else arr.shape
    meta: dict[str, Any] = {
        "reader": reader_name,
        "kind": kind,
        "original_shape": original_shape,
        "native_spatial_shape": tuple(int(s) for s in spatial),
        "native_dtype": native_dtype,
        "layout": layout,
        "native_affine": affine,
        "orientation": orient,
        "oriented_affine": oriented_affine,
        "intensity_range": (lo, hi),
        "filename_or_obj": str(p),
    }
    if kind == "image2d":
        meta["pil_mode"] = rmeta.get("mode")
    modality_hint = None
    if dicom is not None:
        meta["dicom"] = dicom
        modality_hint = _DICOM_MODALITY_HINT.get(dicom["modality"].upper())
    if orient is not None:
        arr, oriented_affine = _orient(arr, affine, orient["target"])
        meta["oriented_affine"] = oriented_affine
    slices = _native_to_slices(arr, meta, oriented=True)
    if slices.ndim == 3:
        slices = slices[..., None]
    slices = np.ascontiguousarray(slices, dtype=np.float32)
    return LoadedImage(path=str(p), slices=slices, is_volume=is_volume, affine=affine, spacing=spacing,
                       meta=meta, modality_hint=modality_hint)


def load_label(path: str | os.PathLike, like: LoadedImage) -> np.ndarray:
    """Read a ground-truth label file as (N,H,W) integer slices in the same layout as ``like``.

    2D colour masks are turned grey; palette PNGs keep their indices; a MedSAM ``.npz`` gives its
    ``gts`` array. The label must lie on the image's voxel grid (same shape and axis order).
    Returns uint8 when every value fits, else int32.
    """
    p = Path(path)
    kind = input_kind(p)
    arr, rmeta, _, _ = _read_native(p, kind, label=True)
    original_shape = tuple(int(s) for s in arr.shape)
    if kind == "image2d":
        layout = "hw"
    elif kind == "npz":
        layout = like.meta["layout"] if like.meta["kind"] == "npz" else ("hw" if arr.ndim == 2 else "zhw")
    else:
        layout = "xyz" if like.meta["layout"] == "xyz" else "xy"
    arr = _squeeze_trailing(arr, 3 if layout in ("xyz", "zhw") else 2)
    if arr.dtype.kind not in "biuf":
        raise _fail(p, f"unsupported label voxel type {arr.dtype}")
    _check_values(arr, p, "label")
    if arr.dtype.kind == "f":
        if np.abs(arr - np.round(arr)).max() > 1e-3:
            raise _fail(p, "label has non-integer values (an interpolated or probability map?); need integer labels")
        arr = np.round(arr)
    if arr.min() < 0:
        raise _fail(p, f"label has negative values (min {arr.min():g})")
    arr = arr.astype(np.uint8 if arr.max() <= 255 else np.int32)
    mismatch = _fail(p, f"label shape {original_shape} does not match the image ({like.path}: "
                        f"{like.native_shape} as stored, {like.num_slices} slices of {like.slice_shape})")

    if layout == "hw":
        if arr.ndim != 2 or tuple(arr.shape) != like.slice_shape:
            raise mismatch
        return np.ascontiguousarray(arr[None])
    if layout == "xy":
        if arr.ndim != 2 or tuple(arr.shape[::-1]) != like.slice_shape:
            raise mismatch
        return np.ascontiguousarray(arr.T[None])
    if layout == "zhw":
        if tuple(arr.shape) != (like.num_slices, *like.slice_shape):
            raise mismatch
        return np.ascontiguousarray(arr)
    # xyz volume
    if arr.ndim == 2:
        arr = arr[..., None]
    native = tuple(like.native_shape) + (1,) * (3 - len(like.native_shape))
    if tuple(arr.shape) != native:
        raise mismatch
    laff = np.asarray(rmeta.get("affine", np.eye(4)), dtype=float)
    iaff = np.asarray(like.meta["native_affine"], dtype=float)
    if laff.shape == (4, 4):
        if _orient_codes(laff) != _orient_codes(iaff):
            raise _fail(p, f"label voxel axes {_orient_codes(laff)} differ from the image's {_orient_codes(iaff)} "
                           f"({like.path})")
        if not np.allclose(laff, iaff, atol=1e-2 * max(1.0, float(np.abs(iaff[:3, :3]).max()))):
            warnings.warn(f"{p}: label affine differs from the image's ({like.path}); using the image grid",
                          stacklevel=2)
    return np.ascontiguousarray(_native_to_slices(arr, like.meta))


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
