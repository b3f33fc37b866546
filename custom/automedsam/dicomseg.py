"""DICOM-SEG output for DICOM input (highdicom): one BINARY segment per found class,
referencing the source series' instances, frames in the source's own pixel grid.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .classes import CLASS_COLOURS, CLASSES

__all__ = ["segment_codes", "build_dicom_seg", "write_dicom_seg"]


def segment_codes(class_id: int):
    """(segmented property category, segmented property type) codes of a class: the coded concept
    of the vocabulary's classes file (SNOMED CT, data: ``automedsam add-class`` appends to it); a part
    it lacks is pydicom's ``codes.SCT.AnatomicalStructure``."""
    from pydicom.sr.codedict import codes as dicom_codes
    from pydicom.sr.coding import Code

    from .classes import CLASS_CODES

    def code(c):
        return Code(str(c["code"]), c.get("scheme", "SCT"), c["meaning"]) if c else dicom_codes.SCT.AnatomicalStructure

    own = CLASS_CODES.get(int(class_id), {})
    return code(own.get("category")), code(own.get("type"))


def _source_frames(native: np.ndarray, layout: str) -> np.ndarray:
    """The label array on the input's voxel grid -> (frames, rows, columns) in source-file order."""
    if layout == "xy":  # one 2D DICOM image, (X,Y)
        return native.T[None]
    if layout == "xyz":  # (X,Y,Z) -> (Z,Y,X): plane k (columns along X, rows along Y); dicom["planes"] maps files
        return np.ascontiguousarray(np.transpose(native, (2, 1, 0)))
    raise ValueError(f"DICOM-SEG needs DICOM input, got layout {layout}")


def _source_dataset(path: str, dicom: dict, k: int):
    """A source file's header for highdicom, with the UIDs the loader generated for empty ones
    (``dicom["generated_uids"]``) filled in memory: the file itself is never changed."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    fill = {"SeriesInstanceUID": dicom.get("series_uid"), "StudyInstanceUID": dicom.get("study_uid"),
            "FrameOfReferenceUID": dicom.get("frame_of_reference_uid"),
            "SOPInstanceUID": (dicom.get("sop_instance_uids") or [None] * (k + 1))[k]}
    for key, value in fill.items():
        if value and not str(ds.get(key, "") or "").strip():
            setattr(ds, key, value)
    for key in _TYPE2_COPIED:  # type 2 (may be empty, must be there): anonymisers often remove them
        if key not in ds:
            setattr(ds, key, "")
    return ds


# patient and study attributes highdicom copies from the source into the SEG
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def build_dicom_seg(loaded, label_slices: np.ndarray, class_ids: Sequence[int], software_version: str = "0",
                    algorithm_name: str = "AutoMedSAM", series_description: str = "AutoMedSAM segmentation"):
    """A highdicom ``Segmentation`` of the found classes, or None when no class was found.

    The segmentation references the source files' SOP instances (``loaded.meta["dicom"]``); UIDs
    the files left empty are the ones the loader generated (``generated_uids``, in the report).

    Args:
        loaded: the :class:`~automedsam.data.io.LoadedImage` of a DICOM series (or file).
        label_slices: (N,H,W) label map in ``loaded.slices`` layout.
        class_ids: the classes that were asked for (absent ones get no segment).
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    dicom = loaded.meta.get("dicom")
    if not dicom:
        raise ValueError(f"{loaded.path}: DICOM-SEG needs DICOM input")
    native = loaded.labels_to_native(np.asarray(label_slices, dtype=np.uint8))
    frames = _source_frames(native, loaded.meta["layout"])
    sources = [_source_dataset(f, dicom, k) for k, f in enumerate(dicom["files"])]
    if len(sources) == 1 and int(getattr(sources[0], "NumberOfFrames", 1) or 1) > 1:
        pass  # multi-frame source: frames follow the source's frames
    else:
        planes = list(dicom.get("planes") or range(len(sources)))
        if len(planes) != len(sources) or (planes and max(planes) >= frames.shape[0]):
            raise ValueError(f"{loaded.path}: {len(sources)} DICOM files but {frames.shape[0]} label planes")
        frames = frames[planes]  # planes filled between the files (a gap) have no source image
    found = [int(c) for c in class_ids if (frames == c).any()]
    if not found:
        return None
    algo = hd.AlgorithmIdentificationSequence(name=algorithm_name, family=codes.cid7162.ArtificialIntelligence,
                                              version=software_version)
    descriptions = []
    for number, cid in enumerate(found, start=1):
        category, prop = segment_codes(cid)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=CLASSES[cid], segmented_property_category=category,
            segmented_property_type=prop, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo, tracking_uid=hd.UID(), tracking_id=f"{CLASSES[cid]}",
            display_color=hd.color.CIELabColor.from_rgb(*CLASS_COLOURS.get(cid, (255, 255, 255)))))
    masks = np.stack([frames == cid for cid in found], axis=-1)  # (F,R,C,S) bool
    src = sources[0]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(src, "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="AutoMedSAM",
        manufacturer_model_name=algorithm_name,
        software_versions=str(software_version),
        device_serial_number="0",
        series_description=series_description,
        content_label="AUTOMEDSAM",
        content_description="Class-prompted MedSAM segmentation (not for clinical use)",
    )


def write_dicom_seg(seg, path: str | os.PathLike) -> str:
    """Save a ``Segmentation`` to ``path`` (the caller makes the write atomic)."""
    seg.save_as(str(path), enforce_file_format=True)
    return str(path)
