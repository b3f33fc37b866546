"""DICOM as it comes from the field, part 1: recognising files and grouping them into series.

* A file is DICOM when it has the ``DICM`` preamble, or (raw files without one) when pydicom
  reads a header with a SOP class from it; the name and suffix never decide.
* A folder (or the files a ``DICOMDIR`` in it lists) is scanned with pydicom headers only.
  Image files are grouped into series by SeriesInstanceUID; where an anonymiser left it
  empty, by FrameOfReferenceUID, orientation, rows/columns, pixel spacing, series number and
  description. Such a series gets a UID made from its files (``pydicom.uid.generate_uid``
  with the SOP instance UIDs as entropy: the same files give the same UID); the grouping and
  every generated UID are recorded in the series' notes for the report.
* Files that are DICOM but no image (RTSTRUCT, SEG, SR, a header without pixel data) are
  skipped with the reason, which names them when a folder holds nothing else.

Reading one series (order, duplicates, gaps, pixels, affine): :mod:`automedsam.data.dicom_series`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..errors import input_error as _fail
from .io import _first_line

__all__ = ["is_dicom", "non_image_reason", "scan_folder", "list_dicom_series", "describe_series",
           "single_file_info", "NON_IMAGE_MODALITIES"]

# DICOM objects that are not images to segment (our own DICOM-SEG output may sit beside the series).
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC", "PLAN"}
_UID = re.compile(r"[0-9]+(\.[0-9]+)+")


def is_dicom(path: str | os.PathLike) -> bool:
    """Is this file DICOM by its content (preamble + ``DICM``, or a raw header pydicom reads)?"""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:] == b"DICM":
        return True
    if head[:2] not in (b"\x02\x00", b"\x08\x00"):  # a raw data set starts with group 0002 or 0008
        return False
    try:
        import pydicom

        ds = pydicom.dcmread(str(p), force=True, stop_before_pixels=True, specific_tags=["SOPClassUID", "Rows"])
        return bool(_UID.fullmatch(str(ds.get("SOPClassUID", "") or "")))
    except Exception:
        return False


def _read_header(path: Path):
    """A header with every tag but large values left unread (PixelData is known to be there)."""
    import pydicom

    return pydicom.dcmread(str(path), force=True, defer_size=1024)


def _text(ds, key: str) -> str:
    try:
        return str(ds.get(key, "") or "").strip()
    except Exception:
        return ""


def _floats(ds, key: str, n: int) -> tuple[float, ...] | None:
    try:
        v = ds.get(key)
        vals = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) or hasattr(v, "__len__") else [v]))
    except Exception:
        return None
    return vals if len(vals) == n and all(np.isfinite(vals)) else None


def _sop_class_name(ds) -> str:
    uid = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    try:
        return str(uid.name) if uid else ""
    except Exception:
        return str(uid or "")


def non_image_reason(ds) -> str | None:
    """Why a DICOM data set is no image to segment ("DICOM RTSTRUCT (RT Structure Set Storage), not an
    image"), or None when it is one."""
    modality = _text(ds, "Modality").upper()
    what = f"DICOM {modality or 'object'}" + (f" ({_sop_class_name(ds)})" if _sop_class_name(ds) else "")
    if "DirectoryRecordSequence" in ds:
        return "a DICOMDIR (an index of the files on a medium), not an image: give its folder"
    if modality in NON_IMAGE_MODALITIES:
        return f"{what}, not an image: nothing to segment"
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return f"{what} without pixel data: nothing to segment"
    if "Rows" not in ds or "Columns" not in ds:
        return f"{what} without Rows/Columns: not an image"
    return None


def _file_info(path: Path, ds) -> dict:
    frames = 1
    try:
        frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        pass
    try:
        number = int(ds.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        number = 0
    return {
        "path": str(path), "sop_instance_uid": _text(ds, "SOPInstanceUID"),
        "series_uid": _text(ds, "SeriesInstanceUID"),
        "study_uid": _text(ds, "StudyInstanceUID"), "frame_of_reference_uid": _text(ds, "FrameOfReferenceUID"),
        "sop_class_uid": _text(ds, "SOPClassUID"), "modality": _text(ds, "Modality"),
        "description": _text(ds, "SeriesDescription"), "series_number": _text(ds, "SeriesNumber"),
        "instance_number": number, "rows": int(ds.Rows), "columns": int(ds.Columns), "frames": frames,
        "samples": int(ds.get("SamplesPerPixel", 1) or 1),
        "ipp": _floats(ds, "ImagePositionPatient", 3), "iop": _floats(ds, "ImageOrientationPatient", 6),
        "pixel_spacing": _floats(ds, "PixelSpacing", 2),
        "slice_step": (_floats(ds, "SpacingBetweenSlices", 1) or _floats(ds, "SliceThickness", 1) or (None,))[0],
    }


def _geometry_key(info: dict) -> tuple:
    """What the files of one volume share: frame of reference, orientation, size, pixel spacing."""
    iop = tuple(round(v, 4) for v in info["iop"]) if info["iop"] else None
    ps = tuple(round(v, 4) for v in info["pixel_spacing"]) if info["pixel_spacing"] else None
    return info["frame_of_reference_uid"], iop, info["rows"], info["columns"], ps, info["samples"]


_GROUPED_BY = "FrameOfReferenceUID, orientation, rows/columns, pixel spacing, series number and description"


def _folder_files(folder: Path) -> tuple[list[Path], str | None]:
    """The files to scan: those a DICOMDIR in the folder lists (any depth), else the folder's own files."""
    dicomdir = folder / "DICOMDIR"
    if dicomdir.is_file():
        try:
            import pydicom
            from pydicom.fileset import FileSet

            listed = sorted({Path(inst.path) for inst in FileSet(pydicom.dcmread(str(dicomdir)))})
            listed = [f for f in listed if f.is_file()]
            if listed:
                return listed, str(dicomdir)
        except Exception:
            pass  # an unreadable DICOMDIR: scan the folder itself
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")), None


def scan_folder(folder: str | os.PathLike) -> tuple[list[dict], list[tuple[str, str]]]:
    """(image series, skipped files) of a folder, from headers only; series largest first.

    Each series: ``uid`` (generated when the files have none: ``uid_generated``), ``modality``,
    ``description``, ``study_uid``, ``frame_of_reference_uid``, ``sop_class_uid``, ``files``,
    ``sop_instance_uids`` ({file: uid}), ``voxels``, ``grouped_by`` (None when by UID),
    ``infos`` (per-file header details) and ``dicomdir``. Skipped: (file name, why) for files
    that are not DICOM or not images (RTSTRUCT, SEG, no pixel data, ...).
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    if not folder.is_dir():
        raise _fail(folder, "not a folder")
    files, dicomdir = _folder_files(folder)
    groups: dict[tuple, list[dict]] = {}
    skipped: list[tuple[str, str]] = []
    for f in files:
        if f.name == "DICOMDIR":
            continue
        if not is_dicom(f):
            skipped.append((f.name, "empty file" if f.stat().st_size == 0 else "not DICOM"))
            continue
        try:
            ds = _read_header(f)
            reason = non_image_reason(ds)
            info = None if reason else _file_info(f, ds)
        except Exception as e:
            reason, info = f"unreadable DICOM header ({_first_line(e)})", None
        if reason:
            skipped.append((f.name, reason))
            continue
        key = ("uid", info["series_uid"]) if info["series_uid"] else \
            ("geometry", *_geometry_key(info), info["series_number"], info["description"], info["modality"])
        groups.setdefault(key, []).append(info)
    series = []
    for key, infos in groups.items():
        first = infos[0]
        generated = key[0] != "uid"
        entropy = sorted(i["sop_instance_uid"] or Path(i["path"]).name for i in infos)
        uid = first["series_uid"] or str(generate_uid(entropy_srcs=["automedsam series", *entropy]))
        study = next((i["study_uid"] for i in infos if i["study_uid"]), "")
        series.append({
            "uid": uid, "uid_generated": generated, "grouped_by": _GROUPED_BY if generated else None,
            "modality": first["modality"], "description": first["description"],
            "study_uid": study or str(generate_uid(entropy_srcs=["automedsam study", *entropy])),
            "study_uid_generated": not study,
            "frame_of_reference_uid": first["frame_of_reference_uid"], "sop_class_uid": first["sop_class_uid"],
            "files": [i["path"] for i in infos], "sop_instance_uids": {i["path"]: i["sop_instance_uid"] for i in infos},
            "voxels": sum(i["rows"] * i["columns"] * i["frames"] for i in infos), "infos": infos,
            "dicomdir": dicomdir,
        })
    return sorted(series, key=lambda s: -len(s["files"])), skipped


def list_dicom_series(folder: str | os.PathLike) -> list[dict]:
    """Image series of a folder (see :func:`scan_folder`), largest first."""
    return scan_folder(folder)[0]


def describe_series(series: list[dict]) -> str:
    return "; ".join(f"{s['uid']} ({s['modality'] or '?'} '{s['description']}', {len(s['files'])} files"
                     + (", no SeriesInstanceUID in the files" if s["uid_generated"] else "") + ")" for s in series)


def _no_images(folder: Path, skipped: list[tuple[str, str]]) -> InputError:
    dicom_skips = [f"{n}: {why}" for n, why in skipped if why not in ("not DICOM", "empty file")]
    if dicom_skips:
        more = f" and {len(dicom_skips) - 3} more" if len(dicom_skips) > 3 else ""
        return _fail(folder, f"no DICOM image files in this folder ({'; '.join(dicom_skips[:3])}{more})")
    subdirs = [d.name for d in folder.iterdir() if d.is_dir()][:5]
    hint = f" (it has sub-folders: {', '.join(subdirs)}; give the series folder itself)" if subdirs else ""
    return _fail(folder, f"no DICOM image files in this folder{hint}")


def single_file_info(path: Path) -> dict:
    """The ``dicom`` details of a single DICOM file; non-images (RTSTRUCT, SEG, no pixel data) are
    refused naming what the file is."""
    import pydicom

    if not is_dicom(path):
        raise _fail(path, "not a readable DICOM file (no 'DICM' marker and no DICOM header in it)")
    try:
        ds = pydicom.dcmread(str(path), force=True, defer_size=1024)
    except Exception as e:
        raise _fail(path, f"not a readable DICOM file ({_first_line(e)})") from e
    reason = non_image_reason(ds)
    if reason:
        raise _fail(path, reason)
    get = lambda k: str(getattr(ds, k, "") or "")  # noqa: E731
    return {"series_uid": get("SeriesInstanceUID"), "study_uid": get("StudyInstanceUID"),
            "frame_of_reference_uid": get("FrameOfReferenceUID"), "sop_class_uid": get("SOPClassUID"),
            "modality": get("Modality"), "description": get("SeriesDescription"), "files": [str(path)],
            "sop_instance_uids": [get("SOPInstanceUID")], "planes": [0], "notes": []}
