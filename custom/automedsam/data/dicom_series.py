"""DICOM as it comes from the field, part 2: reading one series of a folder.

* The files of the series (found and grouped by :mod:`automedsam.data.dicom`) are ordered by
  ImagePositionPatient projected on the slice normal (the cross product of
  ImageOrientationPatient's row and column directions); InstanceNumber and names never decide.
* Slices at one position with identical pixels are dropped (noted); at one position with
  different pixels the series is refused, naming both files. Uneven positions (a missing
  slice) are refused unless ``allow_gaps``; then the volume is put on a uniform grid along the
  stack, the missing planes filled by linear interpolation between their neighbours, and
  ``planes`` says which plane each file is (the DICOM-SEG references only real files).
* Pixels are decoded by pydicom (its modality LUT applied: Hounsfield units for CT); a
  transfer syntax pydicom has no decoder for here is decoded by GDCM through ITK.
* The affine comes from the DICOM geometry (LPS, returned as RAS like MONAI's readers), its
  third column the real step between slice positions (a gantry tilt stays a shear), so
  empty UIDs never matter. :class:`DicomSeriesReader` is a MONAI ``ImageReader`` for
  ``LoadImage``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import input_error as _fail
from .dicom import _geometry_key, _no_images, describe_series, scan_folder
from .io import _check_voxels, _first_line

__all__ = ["load_series", "read_pixels", "DicomSeriesReader", "SAME_POSITION_MM", "GAP_TOLERANCE"]

SAME_POSITION_MM = 0.01  # slices closer than this along the normal are at one position
GAP_TOLERANCE = 0.01  # a step differing from the usual one by more than this fraction is a gap


# --------------------------------------------------------------------------------------------
# pixels


def _itk_pixels(path: str) -> np.ndarray:
    import itk

    arr = np.asarray(itk.GetArrayFromImage(itk.imread(path)))
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    return arr


def read_pixels(path: str) -> np.ndarray:
    """One single-frame DICOM file's pixels, (rows, columns[, 3]) float32, modality LUT applied."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as e:
        raise _fail(path, f"not a readable DICOM file ({_first_line(e)})") from e
    try:
        arr = np.asarray(ds.pixel_array)
        if int(ds.get("SamplesPerPixel", 1) or 1) == 1:
            arr = apply_modality_lut(arr, ds)
    except Exception as e:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is None or not getattr(syntax, "is_compressed", False):
            raise _fail(path, f"DICOM pixel data cannot be read ({_first_line(e)})") from e
        try:  # a codec pydicom has no decoder for here (e.g. JPEG Lossless): GDCM through ITK
            arr = _itk_pixels(path)
        except Exception:
            raise _fail(path, f"DICOM pixel data in {syntax.name} cannot be decoded ({_first_line(e)})") from e
    return np.asarray(arr, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# one series


def _choose(folder: Path, series_uid: str | None) -> tuple[dict, list]:
    series, skipped = scan_folder(folder)
    if not series:
        raise _no_images(folder, skipped)
    if series_uid is None:
        if len(series) > 1:
            raise _fail(folder, f"folder holds {len(series)} DICOM series: {describe_series(series)}; "
                                f"choose one with series_uid=UID (automedsam segment --series_uid UID, or "
                                f"--series_uid all for each in turn)")
        return series[0], skipped
    found = [s for s in series if s["uid"] == series_uid]
    if not found:
        raise _fail(folder, f"no DICOM series with uid {series_uid}; found: {describe_series(series)}")
    return found[0], skipped


def _name(info: dict) -> str:
    return Path(info["path"]).name


def _order(folder: Path, infos: list[dict]) -> tuple[list[dict], np.ndarray, np.ndarray, list[str]]:
    """(files in slice order, their positions along the normal, the normal, notes)."""
    notes: list[str] = []
    keys = {_geometry_key(i) for i in infos}
    if len(keys) > 1:
        a = infos[0]
        b = next(i for i in infos if _geometry_key(i) != _geometry_key(a))
        raise _fail(folder, f"DICOM series files do not form one volume: {_name(a)} is {a['rows']}x{a['columns']} "
                            f"with orientation {a['iop']}, {_name(b)} is {b['rows']}x{b['columns']} with orientation "
                            f"{b['iop']} ({len(keys)} different geometries among {len(infos)} files)")
    missing = [_name(i) for i in infos if i["ipp"] is None or i["iop"] is None]
    if missing and len(missing) < len(infos):
        raise _fail(folder, f"{len(missing)} of {len(infos)} DICOM files have no ImagePositionPatient/"
                            f"ImageOrientationPatient ({', '.join(missing[:3])}); cannot place their slices")
    if missing:
        ordered = sorted(infos, key=lambda i: (i["instance_number"], i["path"]))
        step = float(infos[0]["slice_step"] or 1.0)
        notes.append(f"no ImagePositionPatient/ImageOrientationPatient: {len(infos)} slices ordered by "
                     f"InstanceNumber, {step:g} mm apart assumed")
        return ordered, np.arange(len(ordered)) * step, np.array([0.0, 0.0, 1.0]), notes
    iop = np.asarray(infos[0]["iop"], dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    if not np.isfinite(normal).all() or np.linalg.norm(normal) < 1e-3:
        raise _fail(folder, f"ImageOrientationPatient {infos[0]['iop']} of {_name(infos[0])} gives no slice direction")
    normal /= np.linalg.norm(normal)
    pos = np.array([float(np.dot(i["ipp"], normal)) for i in infos])
    idx = sorted(range(len(infos)), key=lambda k: (pos[k], infos[k]["instance_number"], infos[k]["path"]))
    return [infos[k] for k in idx], pos[idx], normal, notes


def _usual_step(steps: np.ndarray) -> float:
    """The step most slices are apart (the smaller one on a tie: a missing slice only makes steps longer)."""
    best, best_n = float(steps.min()), 0
    for s in np.sort(steps):
        n = int((np.abs(steps - s) <= max(GAP_TOLERANCE * s, SAME_POSITION_MM)).sum())
        if n > best_n:
            best, best_n = float(np.median(steps[np.abs(steps - s) <= max(GAP_TOLERANCE * s, SAME_POSITION_MM)])), n
    return best


def _stack(folder: Path, ordered: list[dict], pos: np.ndarray, allow_gaps: bool, notes: list[str]):
    """Pixels of the ordered files with duplicates dropped and gaps checked; returns (planes on a
    uniform grid (M,R,C[,3]), grid positions, the kept files, the grid plane of each kept file)."""
    pixels = [read_pixels(i["path"]) for i in ordered]
    keep = [0]
    for k in range(1, len(ordered)):
        j = keep[-1]
        if abs(pos[k] - pos[j]) >= SAME_POSITION_MM:
            keep.append(k)
            continue
        a, b = ordered[j], ordered[k]
        same_place = np.allclose(a["ipp"], b["ipp"], atol=SAME_POSITION_MM) if a["ipp"] else True
        if same_place and pixels[j].shape == pixels[k].shape and np.array_equal(pixels[j], pixels[k]):
            notes.append(f"duplicate slice dropped: {_name(b)} (identical pixels and position to {_name(a)})")
            continue
        raise _fail(folder, f"{_name(a)} and {_name(b)} lie at the same slice position ({pos[k]:.3f} mm along the "
                            f"normal) but hold different pixels: two series mixed in one folder? (separate them, "
                            f"or remove one)")
    files = [ordered[k] for k in keep]
    planes = [pixels[k] for k in keep]
    p = pos[keep]
    if len(p) < 3:
        return np.stack(planes), p, files, list(range(len(files)))
    steps = np.diff(p)
    usual = _usual_step(steps)
    tol = max(GAP_TOLERANCE * usual, SAME_POSITION_MM)
    odd = np.nonzero(np.abs(steps - usual) > tol)[0]
    if odd.size == 0:
        return np.stack(planes), p, files, list(range(len(files)))
    where = ", ".join(f"{steps[k]:.3g} mm between {_name(files[k])} and {_name(files[k + 1])}" for k in odd[:3])
    where += f" and {odd.size - 3} more" if odd.size > 3 else ""
    if not allow_gaps:
        raise _fail(folder, f"DICOM slice positions are not evenly spaced: {where} (elsewhere {usual:.3g} mm); a "
                            f"slice missing? refused: allow_gaps=True (--allow_gaps) fills the gaps by "
                            f"interpolation on a uniform grid")
    m = int(round((p[-1] - p[0]) / usual)) + 1
    grid = np.linspace(p[0], p[-1], m)
    step = float(grid[1] - grid[0])
    out = np.empty((m, *planes[0].shape), dtype=np.float32)
    plane_of: dict[int, int] = {}
    filled = 0
    for g, z in enumerate(grid):
        k = int(np.argmin(np.abs(p - z)))
        if abs(p[k] - z) <= tol:
            out[g] = planes[k]
            plane_of.setdefault(k, g)
            continue
        hi = int(np.searchsorted(p, z))
        lo = hi - 1
        w = (z - p[lo]) / (p[hi] - p[lo])
        out[g] = (1 - w) * planes[lo] + w * planes[hi]
        filled += 1
    kept_files = [f for k, f in enumerate(files) if k in plane_of]
    kept_planes = [plane_of[k] for k in range(len(files)) if k in plane_of]
    notes.append(f"gap in the slice positions: {where} (elsewhere {usual:.3g} mm); allowed (allow_gaps): the series "
                 f"put on a uniform grid of {m} planes {step:.4g} mm apart, {filled} plane(s) filled by linear "
                 f"interpolation between their neighbours"
                 + (f", {len(files) - len(kept_files)} file(s) off the grid resampled" if len(kept_files) < len(files)
                    else ""))
    return out, grid, kept_files, kept_planes


def load_series(folder: str | os.PathLike, series_uid: str | None = None, max_voxels: int = 0,
                allow_gaps: bool = False) -> tuple[np.ndarray, dict, dict]:
    """One DICOM series of a folder: (array (X=columns, Y=rows, Z[, 3]) float32, MONAI-style meta
    with a RAS ``affine``, the ``dicom`` details). Raises :class:`~automedsam.data.io.InputError`.

    ``dicom``: series/study/frame-of-reference UIDs (generated ones listed in ``generated_uids``),
    ``files`` (slice order), ``sop_instance_uids``, ``planes`` (``files[k]`` is the plane
    ``vol[..., planes[k]]``), ``grouped_by``, ``notes`` (one line each, for the report).
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    chosen, skipped = _choose(folder, series_uid)
    _check_voxels(folder, chosen["voxels"], None, max_voxels)
    infos = chosen["infos"]
    notes: list[str] = []
    if chosen["grouped_by"]:
        notes.append(f"SeriesInstanceUID empty in the files: {len(infos)} files grouped into one series by "
                     f"{chosen['grouped_by']}")
    if chosen["dicomdir"]:
        notes.append(f"files found through {chosen['dicomdir']}")
    junk = [n for n, _ in skipped]
    if junk:
        notes.append(f"{len(junk)} other file(s) in the folder skipped (not DICOM images): {', '.join(junk[:5])}"
                     + (" ..." if len(junk) > 5 else ""))
    if len(infos) > 1 and any(i["frames"] > 1 for i in infos):
        raise _fail(folder, f"a multi-frame DICOM file among {len(infos)} files of one series "
                            f"({next(_name(i) for i in infos if i['frames'] > 1)}); give that file alone")
    if infos[0]["frames"] > 1:  # one multi-frame file: ITK (GDCM) places its frames
        return _multiframe(chosen, notes)
    ordered, pos, normal, order_notes = _order(folder, infos)
    notes += order_notes
    planes, grid, files, plane_index = _stack(folder, ordered, pos, allow_gaps, notes)

    # the affine (LPS): columns along the row direction, rows along the column direction, slices
    # along the stack as the positions lie (a tilt stays a shear)
    first = files[0]
    ps = first["pixel_spacing"]
    if ps is None:
        ps = (1.0, 1.0)
        notes.append("no PixelSpacing: 1 mm pixels assumed")
    iop = np.asarray(first["iop"] if first["iop"] else (1, 0, 0, 0, 1, 0), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * ps[1]
    lps[:3, 1] = iop[3:] * ps[0]
    m = planes.shape[0]
    if first["ipp"] is not None and len(files) > 1:
        a, b = np.asarray(files[0]["ipp"]), np.asarray(files[-1]["ipp"])
        ga, gb = plane_index[0], plane_index[-1]
        lps[:3, 2] = (b - a) / (gb - ga)
        lps[:3, 3] = a - ga * lps[:3, 2]
        along = lps[:3, 2] / max(np.linalg.norm(lps[:3, 2]), 1e-12)
        tol_line = max(SAME_POSITION_MM, 0.1 * min(ps))
        for f in files[1:-1]:
            off = np.asarray(f["ipp"]) - a
            if np.linalg.norm(off - np.dot(off, along) * along) > tol_line:
                raise _fail(folder, f"slice positions do not lie on one line ({_name(f)} is "
                                    f"{np.linalg.norm(off - np.dot(off, along) * along):.3g} mm off the line from "
                                    f"{_name(files[0])} to {_name(files[-1])}); not one volume")
    else:
        step = float(first["slice_step"] or 1.0) if m == 1 else float(grid[1] - grid[0]) if m > 1 else 1.0
        lps[:3, 2] = normal * step
        lps[:3, 3] = np.asarray(first["ipp"]) if first["ipp"] is not None else 0.0
    if abs(np.linalg.det(lps[:3, :3])) < 1e-6:
        raise _fail(folder, "DICOM geometry gives a singular affine (zero pixel spacing or slice step)")
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps

    chan = planes.ndim == 4
    arr = np.transpose(planes, (2, 1, 0, 3) if chan else (2, 1, 0))  # (M,R,C) -> (X=C, Y=R, Z=M)
    generated: dict[str, str] = {}
    if chosen["uid_generated"]:
        generated["SeriesInstanceUID"] = chosen["uid"]
    if chosen["study_uid_generated"]:
        generated["StudyInstanceUID"] = chosen["study_uid"]
    for_uid = chosen["frame_of_reference_uid"]
    if not for_uid:
        for_uid = generated["FrameOfReferenceUID"] = str(generate_uid(entropy_srcs=["automedsam frame",
                                                                                    chosen["uid"]]))
    sops = []
    for f in files:
        uid = f["sop_instance_uid"]
        if not uid:
            uid = str(generate_uid(entropy_srcs=["automedsam instance", chosen["uid"], _name(f)]))
            generated.setdefault("SOPInstanceUID", f"{len([x for x in files if not x['sop_instance_uid']])} made")
        sops.append(uid)
    if generated:
        notes.append("UIDs empty in the files, generated for the outputs (the files are not changed): "
                     + ", ".join(f"{k} {v}" for k, v in generated.items()))
    dicom = {
        "series_uid": chosen["uid"], "study_uid": chosen["study_uid"], "frame_of_reference_uid": for_uid,
        "sop_class_uid": chosen["sop_class_uid"], "modality": chosen["modality"],
        "description": chosen["description"],
        "files": [f["path"] for f in files],  # slice order; files[k] is the voxel plane vol[..., planes[k]]
        "sop_instance_uids": sops, "planes": plane_index, "num_planes": m,
        "generated_uids": generated, "grouped_by": chosen["grouped_by"], "notes": notes,
    }
    meta: dict[str, Any] = {"affine": ras, "original_affine": ras.copy(), "spatial_shape": np.asarray(arr.shape[:3]),
                            "original_channel_dim": -1 if chan else float("nan"), "space": "RAS",
                            "spacing": np.linalg.norm(ras[:3, :3], axis=0)}
    return arr, meta, dicom


def _multiframe(chosen: dict, notes: list[str]) -> tuple[np.ndarray, dict, dict]:
    import warnings

    from monai.data import ITKReader
    from monai.transforms import LoadImage

    path = chosen["files"][0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img, meta = LoadImage(image_only=False, dtype=None)(path, reader=ITKReader())
    except Exception as e:
        raise _fail(path, f"cannot read the multi-frame DICOM file ({_first_line(e)})") from e
    arr = np.asarray(img.numpy())
    n = int(chosen["infos"][0]["frames"])
    dicom = {"series_uid": chosen["uid"], "study_uid": chosen["study_uid"],
             "frame_of_reference_uid": chosen["frame_of_reference_uid"], "sop_class_uid": chosen["sop_class_uid"],
             "modality": chosen["modality"], "description": chosen["description"], "files": [path],
             "sop_instance_uids": [chosen["infos"][0]["sop_instance_uid"]], "planes": list(range(n)),
             "num_planes": n, "generated_uids": {}, "grouped_by": chosen["grouped_by"], "notes": notes}
    return arr, dict(meta), dicom


class DicomSeriesReader:
    """A MONAI ``ImageReader`` for a DICOM series folder (see :func:`load_series`): ordered from
    the headers, so series without UIDs, shuffled names and DICOMDIRs read alike. ``get_data``
    gives the (X,Y,Z[,C]) array and meta with the RAS ``affine`` and the ``dicom`` details."""

    def __init__(self, series_uid: str | None = None, allow_gaps: bool = False, max_voxels: int = 0):
        self.series_uid, self.allow_gaps, self.max_voxels = series_uid, bool(allow_gaps), int(max_voxels or 0)

    def verify_suffix(self, filename) -> bool:
        from monai.utils import ensure_tuple

        return all(Path(f).is_dir() for f in ensure_tuple(filename))

    def read(self, data, **kwargs):
        from monai.utils import ensure_tuple

        names = ensure_tuple(data)
        if len(names) != 1:
            raise ValueError("DicomSeriesReader reads one series folder at a time")
        return load_series(names[0], self.series_uid, self.max_voxels, self.allow_gaps)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        arr, meta, dicom = img
        return arr, {**meta, "dicom": dicom}


def _register_reader():
    from monai.data import ImageReader

    ImageReader.register(DicomSeriesReader)  # an ImageReader by interface (ABC virtual subclass)


_register_reader()
