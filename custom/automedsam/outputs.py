"""What ``automedsam segment`` writes, and how: output names, the result type, staged writing.

Output names follow the input's stem (``ct.nii.gz`` -> ``ct``; a DICOM series folder -> the
folder's name); see :data:`OUTPUT_KINDS`. Every file is first written under a temporary name in
the output folder and only renamed into place when all of an input's outputs were written
(:class:`_Staged`), so a failure leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import discard, publish, temp_beside  # the one home of atomic writes
from .classes import CLASSES
from .corrections import SliceMapper
from .data.io import LoadedImage
from .errors import SegmentError

__all__ = ["OUTPUT_KINDS", "UNCERTAINTY_PNG_SCALE", "output_paths", "check_output_dir", "SegmentationResult",
           "write_outputs"]

# output kind -> file name suffix after the stem
OUTPUT_KINDS = {
    "seg_nifti": "_seg.nii.gz",
    "seg_png": "_seg.png",
    "overlay": "_overlay.png",
    "report": "_report.json",
    "dicom_seg": "_seg.dcm",
    "uncertainty_nifti": "_uncertainty.nii.gz",
    "uncertainty_png": "_uncertainty.png",
}
UNCERTAINTY_PNG_SCALE = 255.0  # PNG value = uncertainty * 255 (the map is in [0, 1], see automedsam.uncertainty)


def output_paths(output_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """Every output name an input with this stem can have."""
    out = Path(output_dir)
    return {k: out / f"{stem}{suf}" for k, suf in OUTPUT_KINDS.items()}


def _existing_outputs(output_dir, stem) -> list[Path]:
    return [p for p in output_paths(output_dir, stem).values() if p.exists()]


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Refuse (:class:`SegmentError`) an output folder that cannot be written, before any work.

    An existing folder is probed with a temporary file (removed at once); a folder still to be
    made needs its nearest existing parent to be a writable folder. Nothing is left behind."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise SegmentError(f"output {out} exists and is not a folder")
    if out.is_dir():
        try:
            fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=out)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise SegmentError(f"output folder {out} is not writable ({e.strerror or type(e).__name__})") from None
        return out
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SegmentError(f"output folder {out} cannot be made: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SegmentError(f"output folder {out} cannot be made: {parent} is not writable")
    return out


@dataclass
class SegmentationResult:
    """Everything :meth:`Segmenter.segment_file` computes for one input (nothing written yet).

    Attributes:
        input: the input path; ``stem`` names its outputs.
        loaded: the read image (geometry, DICOM details, raw slices).
        modality, modality_source: the modality used and how it was decided.
        class_ids: the classes asked for.
        image: (N,H,W,3) the normalised slices in [0,1] the network saw.
        label_slices: (N,H,W) uint8 label map in ``loaded.slices`` layout.
        probabilities, iou, presence: (K,N,H,W), (K,N), (K,N) per class, rows in ``class_ids`` order.
        uncertainty: (N,H,W) per-pixel spread (max over classes) or None.
        encoder_calls: image-encoder calls made (one per slice batch).
        report: the JSON report (outputs are added by :meth:`Segmenter.write`).
        warnings: messages for the user.
    """

    input: str
    stem: str
    loaded: LoadedImage
    modality: str
    modality_source: str
    class_ids: list[int]
    image: np.ndarray
    label_slices: np.ndarray
    probabilities: np.ndarray
    iou: np.ndarray
    presence: np.ndarray
    uncertainty: np.ndarray | None
    encoder_calls: int
    report: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def is_volume(self) -> bool:
        return self.loaded.is_volume

    @property
    def labels(self) -> np.ndarray:
        """The label map on the input's own voxel grid (what the label file holds)."""
        return self.loaded.labels_to_native(self.label_slices)

    @property
    def found_classes(self) -> list[int]:
        return [c for c in self.class_ids if (self.label_slices == c).any()]


class _Staged:
    """Writes files under temporary names in their folder; ``commit`` renames them into place."""

    def __init__(self):
        self.pending: list[tuple[str, Path]] = []

    def write(self, final: Path, writer: Callable[[str], Any]) -> None:
        tmp = temp_beside(final)
        self.pending.append((tmp, final))
        writer(tmp)

    def commit(self) -> None:
        for tmp, final in self.pending:
            publish(tmp, final)
        self.pending = []

    def abort(self) -> None:
        for tmp, _ in self.pending:
            discard(tmp)
        self.pending = []


def _save_float_map(values: np.ndarray, loaded: LoadedImage, path: str) -> None:
    """(N,H,W) float map -> float32 NIfTI on the input's voxel grid and affine."""
    import nibabel as nib

    native = loaded.labels_to_native(np.asarray(values, dtype=np.float32)).astype(np.float32)
    if loaded.meta.get("kind") == "nifti":
        src = nib.load(loaded.path)
        img = nib.Nifti1Image(native, src.affine, header=src.header.copy())
        img.set_qform(src.get_qform(), code=int(src.header["qform_code"]))
        img.set_sform(src.get_sform(), code=int(src.header["sform_code"]))
    else:
        img = nib.Nifti1Image(native, np.asarray(loaded.affine, float))
    img.set_data_dtype(np.float32)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0.0, 0.5
    nib.save(img, path)


def write_outputs(result: SegmentationResult, output_dir: str | os.PathLike, overwrite: bool = False,
                  dicom_seg: bool = True, warn: Callable[[str], None] | None = None) -> dict[str, str]:
    """Write one result's outputs (all or none); returns {kind: path}."""
    from PIL import Image

    from .data.labels import save_label_map
    from .report import choose_overlay_slice, overlay_image, pixel_aspect_of, report_json

    t = time.perf_counter()
    _warn = warn or (lambda m: warnings.warn(m, stacklevel=3))
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise SegmentError(f"output {out} exists and is not a folder")
    paths = output_paths(out, result.stem)
    if not overwrite:
        clash = _existing_outputs(out, result.stem)
        if clash:
            raise SegmentError(f"outputs already exist: {', '.join(str(p) for p in clash)} (use --overwrite)")
    loaded = result.loaded
    report = dict(result.report)
    written: dict[str, Path] = {}

    # DICOM-SEG first: it is the step most likely to refuse
    seg = None
    if dicom_seg and loaded.meta.get("dicom"):
        from .dicomseg import build_dicom_seg

        version = report["model"].get("version") or "0"
        try:
            seg = build_dicom_seg(loaded, result.label_slices, result.class_ids, software_version=version)
        except Exception as e:  # a refusal here must not lose the label map
            first = str(e).splitlines()[0] if str(e) else ""
            msg = f"{loaded.path}: DICOM-SEG not written ({type(e).__name__}: {first})"
            report["warnings"] = report["warnings"] + [msg]
            _warn(msg)
        if seg is None and not any(m.startswith(f"{loaded.path}: DICOM-SEG") for m in report["warnings"]):
            msg = f"{loaded.path}: DICOM-SEG not written (no class found)"
            report["warnings"] = report["warnings"] + [msg]
            _warn(msg)

    k = choose_overlay_slice(result.label_slices)
    mapper = SliceMapper(loaded)
    aspect = pixel_aspect_of(loaded.meta.get("oriented_affine") if loaded.is_volume else None)
    title = f"{result.stem}  {result.modality}"
    if loaded.is_volume:
        title += f"  slice {mapper.native_slice(k)} of 0-{loaded.num_slices - 1}"
    pic = overlay_image(result.image[k], result.label_slices[k], result.class_ids, title=title,
                        pixel_aspect=aspect, found=result.found_classes)
    report["overlay_slice"] = mapper.native_slice(k) if loaded.is_volume else None

    staged = _Staged()
    try:
        if loaded.is_volume:
            written["seg"] = paths["seg_nifti"]
            staged.write(paths["seg_nifti"], lambda tmp: save_label_map(result.label_slices, loaded, tmp))
        else:
            written["seg"] = paths["seg_png"]
            staged.write(paths["seg_png"], lambda tmp: save_label_map(result.label_slices, loaded, tmp))
        written["overlay"] = paths["overlay"]
        staged.write(paths["overlay"], lambda tmp: pic.save(tmp, format="PNG"))
        if result.uncertainty is not None:
            if loaded.is_volume:
                written["uncertainty"] = paths["uncertainty_nifti"]
                staged.write(paths["uncertainty_nifti"],
                             lambda tmp: _save_float_map(result.uncertainty, loaded, tmp))
            else:
                written["uncertainty"] = paths["uncertainty_png"]
                u8 = np.clip(np.round(result.uncertainty[0] * UNCERTAINTY_PNG_SCALE), 0, 255).astype(np.uint8)
                staged.write(paths["uncertainty_png"], lambda tmp: Image.fromarray(u8).save(tmp, format="PNG"))
                report["uncertainty_png_scale"] = f"pixel value / {UNCERTAINTY_PNG_SCALE:g} = uncertainty (0..1)"
        if seg is not None:
            from .dicomseg import write_dicom_seg

            written["dicom_seg"] = paths["dicom_seg"]
            staged.write(paths["dicom_seg"], lambda tmp: write_dicom_seg(seg, tmp))
            report["dicom_seg"] = {"series_instance_uid": str(seg.SeriesInstanceUID),
                                   "segments": [CLASSES[c] for c in result.found_classes],
                                   "frames": int(getattr(seg, "NumberOfFrames", 0))}
        written["report"] = paths["report"]
        report["outputs"] = {k2: str(v) for k2, v in written.items()}
        report["timings_s"] = {**report["timings_s"], "write_s": round(time.perf_counter() - t, 3)}
        text = report_json(report)
        staged.write(paths["report"], lambda tmp: Path(tmp).write_text(text))
        staged.commit()
    except BaseException:
        staged.abort()
        raise
    result.report = report
    return {k2: str(v) for k2, v in written.items()}
