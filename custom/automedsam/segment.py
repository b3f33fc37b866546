"""Segment files by class name: the Python API behind ``automedsam segment``.

Two levels:

* :func:`segment` - files or folders in, files out (label map, overlay, JSON report, and for
  DICOM input a DICOM-SEG); returns one result dict per input.
* :class:`Segmenter` - holds the loaded network (loaded once); :meth:`Segmenter.segment_file`
  returns arrays without writing anything, :meth:`Segmenter.write` writes them.

Each 2D slice is encoded once by MedSAM's image encoder whatever the number of classes; every
class is then decoded from that embedding (:class:`automedsam.inferer.ClassPromptInferer`).

Output names follow the input's stem (``ct.nii.gz`` -> ``ct``; a DICOM series folder -> the
folder's name)::

    <stem>_seg.nii.gz | <stem>_seg.png     uint8 label map, ids from classes.CLASSES
    <stem>_overlay.png                     contours on the most covered (or middle) slice
    <stem>_report.json                     per-class statistics, timings, model
    <stem>_seg.dcm                         DICOM-SEG (DICOM input only, when a class was found)
    <stem>_uncertainty.nii.gz | .png       per-pixel spread over noise draws (``uncertainty=N``)

Every file is first written under a temporary name in the output folder and only renamed into
place when all of an input's outputs were written, so a failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .classes import CLASSES, MODALITY_CLASSES, check_modality, class_id, classes_not_fitting, parse_classes
from .data.io import (DICOM_SUFFIXES, IMAGE_2D_SUFFIXES, NPZ_SUFFIXES, VOLUME_SUFFIXES, InputError, LoadedImage,
                      list_dicom_series, load_image)
from .errors import CheckpointError, RunError, SegmentError, one_line
from .modality import guess_modality
from .options import (Correction, SegmentOptions, check_batch_size, check_threshold, check_uncertainty, class_ids,
                      parse_box, parse_points, segment_options)

__all__ = [
    "segment",
    "segment_options",
    "SegmentOptions",
    "Segmenter",
    "SegmentationResult",
    "SegmentError",
    "InputItem",
    "resolve_inputs",
    "guess_modality",
    "parse_box",
    "parse_points",
    "output_paths",
    "OUTPUT_KINDS",
]

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
UNCERTAINTY_PNG_SCALE = 510.0  # PNG value = std * 510 (a probability's std is at most 0.5)
_INPUT_SUFFIXES = IMAGE_2D_SUFFIXES + VOLUME_SUFFIXES + NPZ_SUFFIXES


# --------------------------------------------------------------------------------------------
# inputs


@dataclass
class InputItem:
    """One thing to segment: a file, or a DICOM series (a folder, plus its series UID when the
    folder holds several)."""

    path: Path
    stem: str
    series_uid: str | None = None

    @property
    def label(self) -> str:
        return f"{self.path} (series {self.series_uid})" if self.series_uid else str(self.path)


def _strip_suffix(name: str) -> str:
    low = name.lower()
    for suf in sorted(_INPUT_SUFFIXES + DICOM_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf):
            return name[: len(name) - len(suf)]
    return Path(name).stem if "." in name else name


def _safe_stem(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._")
    return s or "input"


def _may_hold_dicom(folder: Path) -> bool:
    """A cheap look: does the folder have files that could be DICOM (no known image suffix)? Only a
    pre-filter: :func:`list_dicom_series` then decides by content (preamble or header), with
    empty UIDs, odd names (``CT.<uid>``) and a DICOMDIR too."""
    for f in folder.iterdir():
        if f.is_file() and not f.name.startswith("."):
            low = f.name.lower()
            if low.endswith(DICOM_SUFFIXES) or not low.endswith(_INPUT_SUFFIXES + (".txt", ".json", ".md", ".csv")):
                return True
    return False


def _series_items(folder: Path, series_uid: str | None = "all", wanted: dict | None = None) -> list[InputItem]:
    """Items of a DICOM folder: ``"all"``: one per series; None: the folder (a folder holding
    several series then fails when read, listing them); a UID: that series only (recorded in
    ``wanted``; folders without it give nothing)."""
    series = list_dicom_series(folder)
    stem = _safe_stem(folder.name)
    if series_uid == "all":
        if len(series) == 1:
            return [InputItem(folder, stem)]
        return [InputItem(folder, _safe_stem(f"{folder.name}_{s['uid'][-8:]}"), s["uid"]) for s in series]
    if series_uid is None:
        return [InputItem(folder, stem)]
    if wanted is not None:
        wanted.setdefault("folders", []).append(folder)
    if any(s["uid"] == series_uid for s in series):
        if wanted is not None:
            wanted["found"] = True
        return [InputItem(folder, stem, series_uid)]
    return []


def resolve_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike],
                   exclude: str | os.PathLike | None = None,
                   series_uid: str | None = "all") -> tuple[list[InputItem], list[str]]:
    """Expand inputs into :class:`InputItem`s, in order; returns (items, notes).

    A file is one item (missing files too: they fail when read). A folder that holds DICOM image
    files gives its series (see ``series_uid``); any other folder gives its image/volume/npz files
    and the DICOM series in its direct sub-folders (other files are listed in ``notes``). Items
    whose stems clash get their parent folder's name in front (then a number).

    ``series_uid``: ``"all"`` - one item per series of a folder holding several; None - such a
    folder is one item that fails when read, with a message listing its series; a series UID -
    only that series (folders without it are skipped; when no folder holds it, each DICOM
    folder is an item that fails listing the series it does hold).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if series_uid is not None:
        series_uid = str(series_uid).strip()
    excl = Path(exclude).resolve() if exclude else None
    items: list[InputItem] = []
    notes: list[str] = []
    wanted: dict = {}
    for raw in inputs:
        p = Path(str(raw))
        if not p.is_dir():
            # a DICOMDIR stands for the series it lists: named after its folder
            name = p.resolve().parent.name if p.name.upper() == "DICOMDIR" else _strip_suffix(p.name)
            items.append(InputItem(p, _safe_stem(name)))
            continue
        if _may_hold_dicom(p) and list_dicom_series(p):
            items.extend(_series_items(p, series_uid, wanted))
            # other image files sitting beside the series are inputs too
            items.extend(InputItem(f, _safe_stem(_strip_suffix(f.name))) for f in sorted(p.iterdir())
                         if f.is_file() and f.name.lower().endswith(_INPUT_SUFFIXES) and not f.name.startswith("."))
            continue
        found, ignored, series_dirs = [], [], 0
        for f in sorted(p.iterdir()):
            if f.name.startswith(".") or (excl is not None and f.resolve() == excl):
                continue
            if f.is_file():
                if f.name.lower().endswith(_INPUT_SUFFIXES) or f.name.lower().endswith(DICOM_SUFFIXES):
                    found.append(InputItem(f, _safe_stem(_strip_suffix(f.name))))
                else:
                    ignored.append(f.name)
            elif f.is_dir() and _may_hold_dicom(f) and list_dicom_series(f):
                series_dirs += 1
                found.extend(_series_items(f, series_uid, wanted))
        if ignored:
            notes.append(f"{p}: ignored {len(ignored)} file(s) that are not images: {', '.join(ignored[:5])}"
                         + (" ..." if len(ignored) > 5 else ""))
        if not found and not series_dirs:
            notes.append(f"{p}: no images, volumes or DICOM series in this folder")
        items.extend(found)
    if wanted.get("folders") and not wanted.get("found"):
        # the asked-for series is nowhere: each DICOM folder fails when read, listing its series
        items.extend(InputItem(f, _safe_stem(f.name), series_uid) for f in wanted["folders"])
    elif wanted.get("folders"):
        skipped = [f for f in wanted["folders"] if not any(it.path == f for it in items)]
        if skipped:
            notes.append(f"{len(skipped)} DICOM folder(s) without series {series_uid} skipped: "
                         + ", ".join(str(f) for f in skipped[:3]) + (" ..." if len(skipped) > 3 else ""))
    # unique stems: parent folder name in front of clashing ones, then a counter
    by_stem: dict[str, list[InputItem]] = {}
    for it in items:
        by_stem.setdefault(it.stem, []).append(it)
    for stem, group in by_stem.items():
        if len(group) > 1:
            for it in group:
                it.stem = _safe_stem(f"{it.path.parent.name}_{stem}")
    seen: dict[str, int] = {}
    for it in items:
        if it.stem in seen:
            seen[it.stem] += 1
            it.stem = f"{it.stem}_{seen[it.stem]}"
        else:
            seen[it.stem] = 1
    return items, notes


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


# --------------------------------------------------------------------------------------------
# modality: automedsam.modality (guess_modality); corrections: automedsam.options (Correction,
# parse_box, parse_points), parsed once with the other options


class SliceMapper:
    """Maps the input's own pixel coordinates (column x, row y, slice k of the voxel grid as
    stored) to the slices AutoMedSAM works on (volumes are turned to LPS before slicing)."""

    def __init__(self, loaded: LoadedImage):
        self.n, (self.h, self.w) = loaded.num_slices, loaded.slice_shape
        self.t = np.eye(4)
        meta = loaded.meta
        orient = meta.get("orientation")
        if meta.get("layout") == "xyz" and orient and orient["target"] != orient["native"]:
            # native voxel index -> oriented voxel index (a signed permutation)
            oriented = np.asarray(meta["oriented_affine"], float)
            self.t = np.round(np.linalg.inv(oriented) @ np.asarray(meta["native_affine"], float), 6)

    @property
    def slice_axis_kept(self) -> bool:
        return abs(abs(self.t[2, 2]) - 1) < 1e-6

    def to_slice(self, x: float, y: float, k: float) -> tuple[float, float, int]:
        """(column, row, slice) of the working slices for input pixel (x, y) on slice k."""
        v = self.t @ np.array([x, y, k, 1.0])
        return float(v[0]), float(v[1]), int(round(v[2]))

    def native_slice(self, s: int) -> int:
        """The input's own slice number of working slice ``s`` (when the slice axis is kept)."""
        if not self.slice_axis_kept:
            return int(s)
        return int(round((s - self.t[2, 3]) / self.t[2, 2]))


def _corrections_to_prompts(corrections: Sequence[Correction], loaded: LoadedImage, default_class: int | None,
                            ) -> dict[int, dict]:
    """Corrections -> the inferer's prompts {class_id: {"box", "points", "slices"}} in slice pixels."""
    mapper = SliceMapper(loaded)
    prompts: dict[int, dict] = {}
    for c in corrections:
        if c.class_name:
            cid = class_id(c.class_name)
        elif default_class is not None:
            cid = default_class
        else:
            raise SegmentError(f"--{c.kind} needs a class: prefix it (e.g. liver:{','.join(f'{v:g}' for v in c.values)}"
                               f"...) or give --classes with exactly one class")
        k = c.slice
        if loaded.is_volume and loaded.num_slices > 1 and k is None:
            raise SegmentError(f"--{c.kind} on a volume needs its slice number ({loaded.path} has "
                               f"{loaded.num_slices} slices): x,y,...,slice")
        k = 0 if k is None else k
        native_shape = loaded.native_shape
        nz = native_shape[2] if (loaded.meta.get("layout") == "xyz" and len(native_shape) > 2) else loaded.num_slices
        if not 0 <= k < nz:
            raise SegmentError(f"--{c.kind} slice {k} is outside {loaded.path} (slices 0..{nz - 1})")
        if c.kind == "box":
            x0, y0, s0 = mapper.to_slice(c.values[0], c.values[1], k)
            x1, y1, s1 = mapper.to_slice(c.values[2], c.values[3], k)
            if s0 != s1:
                raise SegmentError(f"--box on {loaded.path}: this volume's stored slices are not axial, so a box "
                                   f"cannot be placed on one slice; reorient the file")
            pts = [(min(x0, x1), min(y0, y1)), (max(x0, x1), max(y0, y1))]
            s = s0
        else:
            x, y, s = mapper.to_slice(c.values[0], c.values[1], k)
            pts = [(x, y)]
        for px, py in pts:
            if not (-0.5 <= px <= mapper.w - 0.5 and -0.5 <= py <= mapper.h - 0.5):
                raise SegmentError(f"--{c.kind} {','.join(f'{v:g}' for v in c.values)} lies outside the image "
                                   f"({loaded.path}: {loaded.slice_shape[1]} columns x {loaded.slice_shape[0]} rows)")
        pr = prompts.setdefault(cid, {"box": None, "points": [], "slices": [s]})
        if pr["slices"] != [s]:
            raise SegmentError(f"all --box/--point corrections of class {CLASSES[cid]} must be on one slice "
                               f"(got slices {pr['slices'][0]} and {s} in the working order)")
        if c.kind == "box":
            if pr["box"] is not None:
                raise SegmentError(f"only one --box per class (class {CLASSES[cid]})")
            pr["box"] = (pts[0][0], pts[0][1], pts[1][0], pts[1][1])
        else:
            pr["points"].append((pts[0][0], pts[0][1], c.label))
    return prompts


# --------------------------------------------------------------------------------------------
# results


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


def _keep_largest(mask: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` largest connected components (full connectivity) of a binary mask."""
    if n == 1:
        from .inferer import largest_component_3d

        return largest_component_3d(mask)
    from scipy import ndimage

    lab, num = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    if num <= n:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    keep = np.argsort(sizes)[::-1][:n] + 1
    return np.isin(lab, keep)


# classes made of more than one connected part: how many the clean-up keeps
COMPONENTS_KEPT = {"lungs": 2}


def _file_sha(path: Path) -> str | None:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        return h.hexdigest()[:16]
    except OSError:
        return None


class _Staged:
    """Writes files under temporary names in their folder; ``commit`` renames them into place."""

    def __init__(self):
        self.pending: list[tuple[str, Path]] = []

    def write(self, final: Path, writer: Callable[[str], Any]) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + final.name, dir=final.parent)
        os.close(fd)
        self.pending.append((tmp, final))
        writer(tmp)

    def commit(self) -> None:
        mask = os.umask(0)
        os.umask(mask)
        for tmp, final in self.pending:
            os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600 files; outputs get the usual permissions
            os.replace(tmp, final)
        self.pending = []

    def abort(self) -> None:
        for tmp, _ in self.pending:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
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


# --------------------------------------------------------------------------------------------
# the segmenter


class Segmenter:
    """The loaded network plus everything needed to segment files with it (model loaded once).

    Args:
        network: an :class:`~automedsam.model.AutoMedSAM` (None: the bundle's trained model).
        weights: AutoMedSAM weights file (default: the bundle's ``models/model.pt``).
        bundle: bundle folder (default: ``$AUTOMEDSAM_BUNDLE`` or the repository's bundle).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: slices per image-encoder call.
        threshold: foreground probability threshold.
        progress: show a progress bar for volumes.
        warn: called with each warning (default: :func:`warnings.warn`).
    """

    def __init__(self, network=None, weights: str | os.PathLike | None = None, bundle: str | os.PathLike | None = None,
                 device: str = "cpu", batch_size: int | None = None, threshold: float = 0.5, progress: bool = False,
                 warn: Callable[[str], None] | None = None):
        self._network = network
        self.weights = Path(weights) if weights else None
        self.bundle = Path(bundle) if bundle else None
        self.device = str(device)
        self.batch_size = check_batch_size(batch_size) or (16 if self.device.startswith("cuda") else 4)
        self.threshold = check_threshold(threshold)
        self.progress = progress
        self._warn = warn or (lambda m: warnings.warn(m, stacklevel=3))
        self.load_seconds = 0.0
        self._info: dict[str, Any] | None = None

    # ---- the model -----------------------------------------------------------------------
    @property
    def network(self):
        """The network, loaded on first use (:meth:`load`)."""
        if self._network is None:
            self.load()
        return self._network

    def load(self):
        """Load the network now (once); any failure is a :class:`~automedsam.errors.RunError`
        (a :class:`~automedsam.errors.CheckpointError` for the weights) of one line."""
        if self._network is None:
            from .options import check_device
            from .pretrained import default_bundle_dir, load_pretrained

            check_device(self.device)
            t = time.perf_counter()
            bundle = self.bundle or default_bundle_dir()
            if self.weights is not None:  # an unreadable or unsafe file is refused before the network is built
                from .backbones import load_state_dict_file

                load_state_dict_file(self.weights, "AutoMedSAM weights")
            try:
                self._network = load_pretrained(bundle, self.weights, device=self.device)
            except RunError:
                raise
            except Exception as e:  # a bundle config, a device, memory: the run cannot go on
                raise RunError(f"cannot load the model (bundle {bundle}, device {self.device}): "
                               f"{type(e).__name__}: {one_line(e)}") from e
            self.load_seconds = time.perf_counter() - t
            if self.weights is None:
                from .pretrained import WEIGHTS_NAME

                self.weights = Path(bundle) / "models" / WEIGHTS_NAME
        return self._network

    def model_info(self) -> dict[str, Any]:
        """What the report says about the model (computed once)."""
        if self._info is not None:
            return dict(self._info)
        net = self.network
        bb = getattr(net, "backbone", None)
        from .bundle import model_versions
        from .pretrained import default_bundle_dir

        try:
            device = str(next(net.parameters()).device)
        except (StopIteration, AttributeError):
            device = self.device
        # version: the bundle's (metadata.json) and the weights' full sha256, to trace a result
        # to the model that made it; the package version only beside them
        versions = model_versions(self.bundle or default_bundle_dir(), self.weights)
        self._info = {
            "name": "AutoMedSAM",
            **versions,
            "backbone": getattr(bb, "name", None),
            "backbone_checkpoint": getattr(bb, "checkpoint", None),
            "image_size": getattr(net, "image_size", None),
            "weights": str(self.weights) if self.weights else None,
            "device": device,
            "threshold": self.threshold,
            "batch_size": self.batch_size,
        }
        return dict(self._info)

    # ---- one input -----------------------------------------------------------------------
    def segment_file(self, path: str | os.PathLike, classes=None, modality: str | None = None,
                     largest_component: bool = False, uncertainty: int = 0, box=None, point=None,
                     series_uid: str | None = None, stem: str | None = None,
                     max_voxels: int | None = None, allow_gaps: bool = False) -> SegmentationResult:
        """Segment one file (or DICOM series folder) and return arrays; nothing is written.

        Args:
            path: NIfTI, DICOM series folder or file, MHA/NRRD, PNG/JPG/BMP/TIFF or MedSAM .npz.
            classes: names/ids (list or comma-separated); default: every class of the modality.
            modality: ``ct``, ``mr``, ``endoscopy`` or ``xray``; default: guessed (see
                :func:`guess_modality`).
            largest_component: keep only the largest connected 3D component per class (two
                for ``lungs``).
            uncertainty: N > 0 noise draws of the class prompt encoder; gives ``uncertainty``.
            box, point: interactive corrections (see :func:`parse_box`, :func:`parse_points`);
                coordinates are the input's pixel column x and row y on slice k as stored.
            series_uid: which series of a DICOM folder holding several.
            max_voxels: refuse larger inputs from their header (see
                :func:`~automedsam.data.io.load_image`).
            allow_gaps: go on with a DICOM series that misses slices (see load_image).
        """
        t0 = time.perf_counter()
        loaded = load_image(path, series_uid=series_uid, max_voxels=max_voxels, allow_gaps=allow_gaps)
        t_load = time.perf_counter() - t0
        return self.segment_loaded(loaded, classes=classes, modality=modality, largest_component=largest_component,
                                   uncertainty=uncertainty, box=box, point=point, stem=stem,
                                   _timings={"read_s": t_load})

    def segment_loaded(self, loaded: LoadedImage, classes=None, modality: str | None = None,
                       largest_component: bool = False, uncertainty: int = 0, box=None, point=None,
                       stem: str | None = None, _timings: dict | None = None) -> SegmentationResult:
        """As :meth:`segment_file`, for an image already read with :func:`~automedsam.data.io.load_image`."""
        import torch

        from .data.preprocess import normalise
        from .inferer import ClassPromptInferer
        from .report import class_statistics

        timings = dict(_timings or {})
        messages: list[str] = []
        # the same checks as segment_options (a no-op for options already checked there)
        corrections = parse_box(box) + parse_points(point)
        uncertainty = check_uncertainty(uncertainty)
        asked = class_ids(classes)

        # modality and classes
        if modality:
            try:
                modality, modality_source = check_modality(modality), "given"
            except ValueError as e:
                raise SegmentError(str(e)) from None
        else:
            modality, modality_source = guess_modality(loaded)
        ids = parse_classes(asked, modality)
        default_class = ids[0] if len(ids) == 1 else None
        for c in corrections:
            if c.class_name:
                cid = class_id(c.class_name)
                if cid not in ids:
                    ids.append(cid)
        prompts = _corrections_to_prompts(corrections, loaded, default_class) if corrections else None
        unfit = classes_not_fitting(ids, modality)
        if unfit:
            messages.append(f"{loaded.path}: class{'es' if len(unfit) > 1 else ''} {', '.join(unfit)} not expected "
                            f"in {modality} images (expected: {', '.join(MODALITY_CLASSES[modality])}); "
                            f"segmenting anyway")

        # the network: one encoder pass per slice batch, every class decoded from it
        t = time.perf_counter()
        image = normalise(loaded.slices, modality)  # (N,H,W,3) in [0,1]
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))
        timings["preprocess_s"] = time.perf_counter() - t
        fresh = self._network is None
        net = self.network
        if fresh:
            timings["model_load_s"] = self.load_seconds
        inferer = ClassPromptInferer(ids, batch_size=self.batch_size, threshold=self.threshold,
                                     uncertainty=uncertainty,
                                     progress=self.progress and loaded.is_volume and loaded.num_slices > 1)
        t = time.perf_counter()
        maps = inferer.predict(net, x, ids, prompts=prompts)
        timings["inference_s"] = time.perf_counter() - t

        # label map and clean-up
        t = time.perf_counter()
        labels = maps.label_map(self.threshold).numpy().astype(np.uint8)
        flags: dict[int, list[str]] = {cid: [] for cid in ids}
        for name in unfit:
            flags[class_id(name)].append(f"not expected in {modality}")
        mapper = SliceMapper(loaded)
        if prompts:
            for cid, pr in prompts.items():
                what = " and ".join(w for w, v in (("box", pr["box"]), ("points", pr["points"])) if v)
                flags[cid].append(f"refined by user {what} on slice {mapper.native_slice(pr['slices'][0])}")
        if largest_component:
            for cid in ids:
                m = labels == cid
                if not m.any():
                    continue
                keep = _keep_largest(m if loaded.is_volume else m[0], COMPONENTS_KEPT.get(CLASSES[cid], 1))
                keep = keep if loaded.is_volume else keep[None]
                removed = int(m.sum() - keep.sum())
                if removed:
                    labels[m & ~keep] = 0
                    flags[cid].append(f"largest component kept ({removed} voxels removed)")
        spread = None
        if maps.spread is not None:
            spread = maps.spread.max(0).values.numpy().astype(np.float32)
        stats = class_statistics(labels, ids, maps.iou.numpy(), maps.presence.numpy(), spacing=loaded.spacing,
                                 is_volume=loaded.is_volume, native_slice=mapper.native_slice, flags=flags,
                                 voxel_ml=loaded.voxel_ml)
        timings["postprocess_s"] = time.perf_counter() - t
        for name, st in stats.items():
            if "class not found" in st["flags"]:
                messages.append(f"{loaded.path}: {name} not found")

        stem = stem or _safe_stem(_strip_suffix(Path(loaded.path).name))
        dicom = loaded.meta.get("dicom") or {}
        report: dict[str, Any] = {
            "input": str(loaded.path),
            "input_kind": loaded.meta.get("kind"),
            "series_uid": dicom.get("series_uid"),
            "stem": stem,
            "modality": modality,
            "modality_source": modality_source,
            "classes_asked": [CLASSES[c] for c in ids],
            "classes_found": [CLASSES[c] for c in ids if stats[CLASSES[c]]["voxels"] > 0],
            "is_volume": loaded.is_volume,
            "shape": list(loaded.native_shape),
            "slices": loaded.num_slices,
            "spacing_mm": [float(s) for s in loaded.spacing] if loaded.is_volume else None,
            "input_notes": loaded.notes,  # how the input was read: DICOM grouping, generated UIDs, gaps, ...
            "classes": stats,
            "largest_component": bool(largest_component),
            "uncertainty_draws": uncertainty,
            "corrections": [{"kind": c.kind, "values": list(c.values), "slice": c.slice, "label": c.label,
                             "class": c.class_name} for c in corrections],
            "model": self.model_info(),
            "encoder_calls": int(maps.encoder_calls),
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "warnings": messages,
        }
        for m in messages:
            self._warn(m)
        return SegmentationResult(
            input=str(loaded.path), stem=stem, loaded=loaded, modality=modality, modality_source=modality_source,
            class_ids=ids, image=image, label_slices=labels, probabilities=maps.probabilities.numpy(),
            iou=maps.iou.numpy(), presence=maps.presence.numpy(), uncertainty=spread,
            encoder_calls=int(maps.encoder_calls), report=report, warnings=messages)

    # ---- writing -------------------------------------------------------------------------
    def write(self, result: SegmentationResult, output_dir: str | os.PathLike, overwrite: bool = False,
              dicom_seg: bool = True) -> dict[str, str]:
        """Write one result's outputs (all or none); returns {kind: path}."""
        from PIL import Image

        from .data.io import save_label_map
        from .report import choose_overlay_slice, overlay_image, pixel_aspect_of, report_json

        t = time.perf_counter()
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
                self._warn(msg)
            if seg is None and not any(m.startswith(f"{loaded.path}: DICOM-SEG") for m in report["warnings"]):
                msg = f"{loaded.path}: DICOM-SEG not written (no class found)"
                report["warnings"] = report["warnings"] + [msg]
                self._warn(msg)

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
                    report["uncertainty_png_scale"] = f"pixel value / {UNCERTAINTY_PNG_SCALE:g} = std of probability"
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


# --------------------------------------------------------------------------------------------
# the one-call API


def _own_outputs(items: list[InputItem]) -> tuple[list[InputItem], list[Path]]:
    """(inputs, skipped): files this tool wrote - named ``<stem><suffix>`` for a suffix of
    OUTPUT_KINDS, with ``<stem>_report.json`` beside them (that lists them, when it lists outputs)
    - are never inputs, so an output folder that is also the input folder is safe to re-run."""
    import json

    keep, skipped = [], []
    for it in items:
        p, name = it.path, it.path.name
        suffix = next((s for s in OUTPUT_KINDS.values() if name.endswith(s) and len(name) > len(s)), None)
        report = p.parent / f"{name[: len(name) - len(suffix)]}{OUTPUT_KINDS['report']}" if suffix else None
        if report is None or not p.is_file() or not report.is_file():
            keep.append(it)
            continue
        try:
            listed = json.loads(report.read_text()).get("outputs")
        except (OSError, ValueError, AttributeError):
            listed = None
        if isinstance(listed, dict) and not any(Path(str(v)).name == name for v in listed.values()):
            keep.append(it)  # a report of another tool, or one that does not know this file
            continue
        skipped.append(p)
    return keep, skipped


def segment(inputs: str | os.PathLike | Iterable[str | os.PathLike], output_dir: str | os.PathLike,
            classes=None, modality: str | None = None, device: str = "cpu", weights: str | os.PathLike | None = None,
            bundle: str | os.PathLike | None = None, largest_component: bool = False, uncertainty: int = 0,
            box=None, point=None, overwrite: bool = False, progress: bool = False, threshold: float = 0.5,
            batch_size: int | None = None, network=None, on_error: str = "raise",
            warn: Callable[[str], None] | None = None,
            on_result: Callable[[dict], None] | None = None, max_voxels: int | None = None,
            series_uid: str | None = None, allow_gaps: bool = False,
            options: SegmentOptions | None = None) -> list[dict]:
    """Segment files, DICOM series folders or folders of them; write the outputs to ``output_dir``.

    The options (keywords, or one :class:`~automedsam.options.SegmentOptions` as ``options``,
    which then replaces them) are checked first (:func:`~automedsam.options.segment_options`);
    then the output folder, the inputs' names and existing outputs; then the network is loaded,
    once; only then is the first input read. Returns one dict per input:
    ``{"input", "stem", "ok", "error", "outputs": {kind: path}, "report"}``.

    Run-level problems (an option, outputs already there without ``overwrite``, an output folder
    that cannot be written, corrections with several inputs, the weights, the device) raise
    :class:`~automedsam.errors.RunError` (``SegmentError``; ``CheckpointError`` for weights), one
    line, before any input is read and before anything is written. A bad input raises
    :class:`~automedsam.errors.InputError` with ``on_error="raise"``; with ``on_error="skip"`` its
    dict has ``ok=False`` and the one-line ``error``, and the other inputs go on.

    ``max_voxels``: inputs whose header promises more voxels are refused before their data is
    read (None: $AUTOMEDSAM_MAX_VOXELS or ``DEFAULT_MAX_VOXELS``; 0: no limit). ``series_uid``:
    a DICOM folder holding several series is refused, listing them, unless this names one of
    them or is ``"all"`` (each series in turn). ``allow_gaps``: go on with a DICOM series that
    misses slices (passed to the loader). Files this tool wrote (``<stem>_seg.png`` ... with
    ``<stem>_report.json`` beside them) are never taken as inputs.
    """
    if on_error not in ("raise", "skip"):
        raise SegmentError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    opts = options if options is not None else segment_options(
        classes=classes, modality=modality, device=device, weights=weights, bundle=bundle,
        largest_component=largest_component, uncertainty=uncertainty, box=box, point=point, overwrite=overwrite,
        progress=progress, threshold=threshold, batch_size=batch_size, max_voxels=max_voxels,
        series_uid=series_uid, allow_gaps=allow_gaps)
    if output_dir is None or str(output_dir) == "":
        raise SegmentError("no output folder given (--output DIR)")
    out = check_output_dir(output_dir)
    items, notes = resolve_inputs(inputs, exclude=out, series_uid=opts.series_uid)
    items, own = _own_outputs(items)
    if own:
        notes.append(f"skipped {len(own)} file(s) this tool wrote (each has its report beside it), not inputs: "
                     + ", ".join(p.name for p in own[:3]) + (" ..." if len(own) > 3 else ""))
    emit = warn or (lambda m: warnings.warn(m, stacklevel=2))
    for n in notes:
        emit(n)
    if not items:
        raise SegmentError("no inputs to segment" + (f" ({'; '.join(notes)})" if notes else ""))
    if opts.corrections and len(items) > 1:
        raise SegmentError(f"--box/--point refer to one image's pixels: give exactly one input (got {len(items)})")
    if not opts.overwrite:
        clash = [p for it in items for p in _existing_outputs(out, it.stem)]
        if clash:
            more = f" and {len(clash) - 3} more" if len(clash) > 3 else ""
            raise SegmentError(f"outputs already exist: {', '.join(str(p) for p in clash[:3])}{more} "
                               f"(use --overwrite to replace them)")

    segmenter = Segmenter(network=network, weights=opts.weights, bundle=opts.bundle, device=opts.device,
                          batch_size=opts.batch_size, threshold=opts.threshold, progress=opts.progress, warn=warn)
    segmenter.load()  # weights and device are the run's: refused here, once, before any input is read
    results = []
    for it in items:
        entry: dict[str, Any] = {"input": it.label, "stem": it.stem, "ok": False, "error": None, "outputs": {},
                                 "report": None}
        try:
            loaded_t = time.perf_counter()
            loaded = load_image(it.path, series_uid=it.series_uid, max_voxels=opts.max_voxels,
                                allow_gaps=opts.allow_gaps)
            read_s = time.perf_counter() - loaded_t
            res = segmenter.segment_loaded(loaded, classes=opts.classes, modality=opts.modality,
                                           largest_component=opts.largest_component, uncertainty=opts.uncertainty,
                                           box=list(opts.corrections), stem=it.stem, _timings={"read_s": read_s})
            entry["outputs"] = segmenter.write(res, out, overwrite=opts.overwrite)
            entry["report"] = res.report
            entry["ok"] = True
        except InputError as e:
            if on_error == "raise":
                raise
            entry["error"] = one_line(e)
        except Exception as e:
            if isinstance(e, RunError) or on_error == "raise":  # the run's problems stop everything
                raise
            entry["error"] = f"{it.label}: {type(e).__name__}: {one_line(e)}"
        results.append(entry)
        if on_result is not None:
            on_result(entry)
    return results
