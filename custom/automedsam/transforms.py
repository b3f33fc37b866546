"""MONAI dictionary transforms for the bundle's inference and evaluation configs.

They put MONAI's ``LoadImaged`` output into exactly the slices that
:func:`automedsam.data.io.load_image` and :func:`automedsam.data.preprocess.normalise` give
the ``automedsam segment`` command (and the training cache), so that the bundle, MONAI Label
and the CLI answer the same file with the same label map:

==========================  ===================================================================
``LoadInputd``              ``LoadImaged`` with io's PIL conversions (palette/RGBA -> RGB, colour
                            masks -> grey); MONAI's default readers otherwise (NIfTI: nibabel;
                            DICOM series, MHA, NRRD: ITK), MONAI's x-first array layout kept
``SliceLayoutd``            (invertible) volumes reoriented to ``LPS`` and their first two axes
                            swapped, so that ``x[..., k]`` is io's slice k (``oriented[..., k].T``);
                            2D images (x-first from MONAI's readers) transposed to (H rows, W cols)
``NormaliseModalityd``      modality (given, the data's ``modality`` key, or guessed like
                            ``automedsam segment``) -> io's normalisation -> 3 channels in [0, 1];
                            the modality goes into the image's meta for the inferer
``DatasetClassesd``         a dataset's labelled classes into the image's meta (evaluation)
``SaveLabelMapd``           (a ``SaveImaged``) uint8 label map: NIfTI for volumes, PNG for 2D
``CaseMetricsd``            per case and class Dice and NSD (NSD in mm with the voxel spacing)
==========================  ===================================================================

Shapes through the inference config: file -> ``LoadInputd`` (X,Y[,Z][,C]) -> ``EnsureChannelFirstd``
(C,X,Y[,Z]) -> ``SliceLayoutd`` (C,H,W[,N]) -> ``NormaliseModalityd`` (3,H,W[,N]) in [0,1] ->
``ClassPromptInferer`` (1,H,W[,N]) label map -> ``Invertd`` (1,X,Y[,Z]) on the input's grid.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, LoadImaged, MapTransform, Orientation, SaveImage, SaveImaged
from monai.utils import TraceKeys

from .classes import CLASSES, MODALITY_CLASSES, check_modality, parse_classes
from .data.io import _AXIS_LABELS, VOLUME_SUFFIXES
from .data.preprocess import normalise

__all__ = [
    "MODALITY_META_KEY",
    "CLASSES_META_KEY",
    "LoadInputd",
    "SliceLayoutd",
    "NormaliseModalityd",
    "DatasetClassesd",
    "SaveLabelMapd",
    "CaseMetricsd",
    "inference_datalist",
]

MODALITY_META_KEY = "modality"  # read by automedsam.inferer.ClassPromptInferer
CLASSES_META_KEY = "class_names"  # comma-separated class names, read by the inferer


def _meta(img) -> dict:
    return dict(img.meta) if isinstance(img, MetaTensor) else {}


def _filename(img) -> str:
    name = _meta(img).get("filename_or_obj", "")
    return str(name[0] if isinstance(name, (list, tuple)) and name else name)


# --------------------------------------------------------------------------------------------
# loading


class LoadInputd(LoadImaged):
    """The pipeline's first step (:mod:`automedsam.pipeline`): :func:`automedsam.data.reader.read_checked`,
    i.e. the checks that make bad input fail in one line naming the file (kind by content,
    voxel limit from the header before the data is read, NaN/Inf, constant image, degenerate
    affine, DICOM notes), then MONAI ``LoadImage`` with the reader of the file's kind (NIfTI:
    ``NibabelReader``; MHA/NRRD and single DICOM files: ``ITKReader``; DICOM series folders:
    :class:`~automedsam.data.dicom_series.DicomSeriesReader`; PNG/JPG/BMP/TIFF: ``PILReader``
    with io's converters, palette/RGBA -> RGB, ``labels=True``: colour masks -> grey; MedSAM
    npz: ``NumpyReader``). ``dtype=None`` keeps the file's voxel type.

    The result is a MetaTensor in the reader's layout with ``original_channel_dim`` set (for
    ``EnsureChannelFirstd``) and the layout :class:`SliceLayoutd` needs in its meta
    (``automedsam_layout``); ``info_key``: the file's full details (DICOM, notes) go there too.
    It is a ``LoadImaged``, so MONAI Label keeps it as it does any bundle's loader.
    """

    def __init__(self, keys: KeysCollection, labels: bool = False, series_uid: str | None = None,
                 allow_gaps: bool = False, max_voxels: int | None = None, info_key: str | None = None,
                 allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, reader=None, dtype=None, image_only=True, allow_missing_keys=allow_missing_keys,
                         **kwargs)
        self.labels, self.series_uid, self.allow_gaps = bool(labels), series_uid, bool(allow_gaps)
        self.max_voxels, self.info_key = max_voxels, info_key

    def __call__(self, data, reader=None):
        from .data.reader import read_checked

        d = dict(data)
        for key in self.key_iterator(d):
            arr, info = read_checked(d[key], series_uid=self.series_uid, max_voxels=self.max_voxels,
                                     allow_gaps=self.allow_gaps, label=self.labels)
            affine = np.asarray(info["native_affine"], dtype=np.float64)
            if info["layout"] in ("xy", "hw"):  # 2D: a 3x3 affine, as MONAI's 2D readers give
                affine = affine[np.ix_([0, 1, 3], [0, 1, 3])]
            dicom = info.get("dicom") or {}
            meta = {"affine": torch.as_tensor(affine), "original_affine": torch.as_tensor(affine),
                    "spatial_shape": np.asarray(arr.shape[:-1] if info["has_channel"] else arr.shape),
                    "original_channel_dim": -1 if info["has_channel"] else "no_channel",
                    "filename_or_obj": info["filename_or_obj"], "automedsam_kind": info["kind"],
                    "automedsam_layout": info["layout"], "is_volume": bool(info["is_volume"]),
                    "native_dtype": info["native_dtype"], "dicom_modality": str(dicom.get("modality") or "")}
            d[key] = MetaTensor(torch.as_tensor(np.ascontiguousarray(arr)), meta=meta)
            if self.info_key:
                d[self.info_key] = info
        return d


# --------------------------------------------------------------------------------------------
# slice layout


def _is_volume_file(img) -> bool:
    """2D arrays read from a volume format (a one-slice NIfTI): io treats them as volumes."""
    meta = _meta(img)
    if "is_volume" in meta:
        return bool(meta["is_volume"])
    name = _filename(img).lower()
    return name.endswith(VOLUME_SUFFIXES) or (bool(name) and os.path.isdir(name))


def _swap01(affine: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(affine).clone()
    a[:, [0, 1]] = a[:, [1, 0]]
    return a


class SliceLayoutd(MapTransform, InvertibleTransform):
    """Channel-first arrays from :class:`LoadInputd` -> AutoMedSAM's slice layout (invertible):
    (C,H,W,N) for volumes, (C,H,W) for 2D images, ``x[..., k]`` the k-th slice as a viewer
    shows it (rows first).

    * volumes (C,X,Y,Z): reoriented to ``orientation`` (MONAI ``Orientation``; ``None`` keeps
      the file's voxel order), then the first two spatial axes swapped;
    * x-first 2D images (C,X,Y) (PIL, ITK): the two axes swapped;
    * MedSAM npz: (C,Z,H,W) volumes get their slice axis last; (C,H,W) images stay as they are.

    ``Invertd`` with this transform (or :func:`automedsam.pipeline.to_native`) puts a prediction
    back on the input's voxel grid and affine.
    """

    def __init__(self, keys: KeysCollection, orientation: str | None = "LPS", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.orientation = str(orientation).upper() if orientation else None
        self._orient = Orientation(axcodes=self.orientation, labels=_AXIS_LABELS) if self.orientation else None

    def _forward(self, img):
        if not isinstance(img, MetaTensor):
            img = MetaTensor(torch.as_tensor(img))
        spatial = img.ndim - 1
        layout = _meta(img).get("automedsam_layout") or ("xyz" if spatial == 3 else "xy")
        if spatial != (3 if layout in ("xyz", "zhw") else 2):
            raise ValueError(f"SliceLayoutd: a {layout} image needs {3 if layout in ('xyz', 'zhw') else 2} spatial "
                             f"axes, got shape {tuple(img.shape)} ({_filename(img) or 'array'})")
        oriented = layout == "xyz" and self._orient is not None
        if oriented:
            img = self._orient(img)
        affine = img.affine.clone()
        if layout in ("xyz", "xy"):
            out = img.transpose(1, 2).contiguous()
            out.affine = _swap01(affine)
        elif layout == "zhw":
            out = img.permute(0, 2, 3, 1).contiguous()
            out.affine = affine[:, [1, 2, 0, 3]]
        else:
            out = img
        self.push_transform(out, extra_info={"layout": layout, "oriented": oriented})
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._forward(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            info = self.pop_transform(img)
            extra = info[TraceKeys.EXTRA_INFO]
            layout = extra["layout"]
            affine = img.affine.clone()
            if layout in ("xyz", "xy"):
                img = img.transpose(1, 2).contiguous()
                img.affine = _swap01(affine)
            elif layout == "zhw":
                img = img.permute(0, 3, 1, 2).contiguous()
                img.affine = affine[:, [2, 0, 1, 3]]
            if extra["oriented"]:
                img = self._orient.inverse(img)
            d[key] = img
        return d


# --------------------------------------------------------------------------------------------
# modality and intensities


def _to_slices(arr: np.ndarray) -> np.ndarray:
    """(C,H,W) or (C,H,W,N) -> (N,H,W,C)."""
    x = np.moveaxis(arr, 0, -1)  # (H,W[,N],C)
    return np.moveaxis(x, 2, 0) if x.ndim == 4 else x[None]


def _from_slices(x: np.ndarray, volume: bool) -> np.ndarray:
    """(N,H,W,C) -> (C,H,W,N) or (C,H,W)."""
    x = np.moveaxis(x, -1, 0)  # (C,N,H,W)
    return np.moveaxis(x, 1, -1) if volume else x[:, 0]


from .modality import guess_modality_of  # noqa: E402  (the one home of modality guessing)


class NormaliseModalityd(MapTransform):
    """Slices (C,H,W[,N]) in io's layout -> (3,H,W[,N]) float32 in [0, 1], normalised as
    :func:`automedsam.data.preprocess.normalise` does for ``automedsam segment`` and the cache.

    The modality is, in order: ``modality`` (a config value), the data's ``modality_key`` entry
    (datalist entries carry it), else guessed from the values as ``automedsam segment`` does
    (DICOM Modality tag, HU-like values -> CT, ...). It is written to the image's meta
    (``meta["modality"]``, where :class:`~automedsam.inferer.ClassPromptInferer` finds it) and to
    the data (``modality_key``). RGBA/grey+alpha arrays lose their alpha channel. CT/MR parameters
    left None: the vocabulary's (:func:`automedsam.data.preprocess.normalisation_defaults`).
    """

    def __init__(self, keys: KeysCollection, modality: str | None = None, modality_key: str = "modality",
                 ct_level: float | None = None, ct_width: float | None = None, mr_lower: float | None = None,
                 mr_upper: float | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.modality = check_modality(modality) if modality else None
        self.modality_key = modality_key
        self.params = {"ct_level": ct_level, "ct_width": ct_width, "mr_lower": mr_lower, "mr_upper": mr_upper}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            meta = _meta(img)
            arr = img.detach().cpu().numpy() if torch.is_tensor(img) else np.asarray(img)
            native_dtype = str(arr.dtype)
            volume = arr.ndim == 4
            if arr.shape[0] in (2, 4):  # grey+alpha, RGBA: drop alpha
                arr = arr[: arr.shape[0] - 1]
            if arr.shape[0] not in (1, 3):
                raise ValueError(f"{_filename(img) or key}: expected 1 or 3 channels, got {arr.shape[0]}")
            slices = np.ascontiguousarray(_to_slices(arr), dtype=np.float32)
            if self.modality:
                modality, source = self.modality, "given"
            elif d.get(self.modality_key):
                modality, source = check_modality(d[self.modality_key]), "datalist"
            else:
                modality, source = guess_modality_of(slices, volume or _is_volume_file(img),
                                                     str(meta.get("native_dtype", native_dtype)), _filename(img),
                                                     meta.get("dicom_modality") or meta.get("0008|0060"))
            x = normalise(slices, modality, **self.params)
            out = torch.from_numpy(np.ascontiguousarray(_from_slices(x, volume)))
            if isinstance(img, MetaTensor):
                out = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
                out.meta[MODALITY_META_KEY] = modality
                out.meta["modality_source"] = source
            d[key] = out
            d[self.modality_key] = modality
        return d


class DatasetClassesd(MapTransform):
    """Put a dataset's labelled classes (those of its modality that its labels answer for) into
    the image's meta, so that the inferer decodes exactly those (evaluation)."""

    def __init__(self, keys: KeysCollection, dataset_key: str = "dataset", modality_key: str = "modality",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.dataset_key = dataset_key
        self.modality_key = modality_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from .data.dataset import dataset_classes

        d = dict(data)
        ids = dataset_classes(d[self.dataset_key], check_modality(d[self.modality_key]))
        for key in self.key_iterator(d):
            if isinstance(d[key], MetaTensor):
                d[key].meta[CLASSES_META_KEY] = ",".join(CLASSES[i] for i in ids)
        return d


# --------------------------------------------------------------------------------------------
# writing


class SaveLabelMapd(SaveImaged):
    """Write uint8 label maps in the input's geometry: NIfTI (``.nii.gz``, the input's voxel grid
    and affine) for volumes, PNG (the input's H x W) for 2D images; names
    ``<stem>_<output_postfix><ext>`` as ``automedsam segment`` writes them.

    Use it after ``Invertd`` (the prediction back on the input's grid). It is a ``SaveImaged``, so
    MONAI Label drops it (and writes the result itself).
    """

    def __init__(self, keys: KeysCollection, output_dir: str = "./", output_postfix: str = "seg",
                 data_root_dir: str = "", separate_folder: bool = False, print_log: bool = True,
                 allow_missing_keys: bool = False, **kwargs):
        common = dict(output_dir=output_dir, output_postfix=output_postfix, output_dtype=np.uint8, resample=False,
                      scale=None, data_root_dir=data_root_dir, separate_folder=separate_folder,
                      print_log=print_log, **kwargs)
        super().__init__(keys, output_ext=".nii.gz", writer="NibabelWriter", allow_missing_keys=allow_missing_keys,
                         **common)
        self.savers = {3: self.saver, 2: SaveImage(output_ext=".png", writer="PILWriter", **common)}

    def __call__(self, data):
        d = dict(data)
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            if meta_key is None and meta_key_postfix is not None:
                meta_key = f"{key}_{meta_key_postfix}"
            img = d[key]
            spatial = img.ndim - 1
            if spatial not in self.savers:
                raise ValueError(f"SaveLabelMapd expects (1,H,W) or (1,X,Y,Z) label maps, got {tuple(img.shape)}")
            if img.is_floating_point():
                img = img.round()
            self.savers[spatial](img=img, meta_data=d.get(meta_key) if meta_key is not None else None)
        return d


# --------------------------------------------------------------------------------------------
# evaluation


def _spacing(img, rank: int) -> tuple[float, ...]:
    if isinstance(img, MetaTensor):
        from monai.data.utils import affine_to_spacing

        sp = affine_to_spacing(np.asarray(img.affine, dtype=float), r=rank, dtype=float, suppress_zeros=False)
        return tuple(float(s) for s in sp)
    return (1.0,) * rank


class CaseMetricsd(MapTransform):
    """Per case and class Dice and NSD between the prediction and the reference label, both on
    the input's grid (use after ``Invertd``). Rows accumulate in ``rows``; :meth:`write` writes
    them to ``<dir>/metrics.csv`` with a summary (``summary.json``, ``summary.md``).

    The classes of a case are its dataset's labelled classes (``dataset_key``); the reference
    label's raw values are mapped by :func:`automedsam.classes.label_to_classes`. NSD (MONAI
    ``compute_surface_dice``) uses ``nsd_tolerance`` in mm with the voxel spacing of the label's
    affine for volumes, and in pixels for 2D images (their spacing is unknown).
    """

    COLUMNS = ("case", "dataset", "modality", "class_id", "class_name", "dice", "nsd", "gt_voxels", "pred_voxels",
               "spacing", "nsd_tolerance", "nsd_unit")

    def __init__(self, keys: KeysCollection = "pred", label_key: str = "label", dataset_key: str = "dataset",
                 modality_key: str = "modality", case_key: str = "case", nsd_tolerance: float = 2.0,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.dataset_key = dataset_key
        self.modality_key = modality_key
        self.case_key = case_key
        self.nsd_tolerance = float(nsd_tolerance)
        self.rows: list[dict] = []

    def reset(self) -> None:
        self.rows = []

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from .classes import label_to_classes
        from .data.dataset import dataset_classes
        from .engine import slice_dice, slice_nsd

        d = dict(data)
        label = d[self.label_key]
        lab = (label.detach().cpu().numpy() if torch.is_tensor(label) else np.asarray(label))
        dataset = d[self.dataset_key]
        modality = check_modality(d[self.modality_key])
        case = d.get(self.case_key) or _filename(label) or _filename(d.get("image"))
        for key in self.key_iterator(d):
            pred = d[key]
            p = pred.detach().cpu().numpy() if torch.is_tensor(pred) else np.asarray(pred)
            if p.shape[0] != 1 or lab.shape[0] != 1:
                raise ValueError(f"{case}: expected single-channel prediction and label, got {p.shape} and {lab.shape}")
            p, g = p[0], lab[0]
            if p.shape != g.shape:
                raise ValueError(f"{case}: prediction {p.shape} and label {g.shape} are not on the same grid")
            rank = p.ndim
            volume = rank == 3 or _is_volume_file(label)
            spacing = _spacing(label, rank) if volume else (1.0,) * rank
            gts = label_to_classes(g, dataset)
            for cid in dataset_classes(dataset, modality):
                pm = np.rint(p) == cid
                gm = gts.get(cid, np.zeros_like(pm))
                self.rows.append({
                    "case": str(case), "dataset": dataset, "modality": modality, "class_id": cid,
                    "class_name": CLASSES[cid], "dice": slice_dice(pm, gm),
                    "nsd": slice_nsd(pm, gm, self.nsd_tolerance, spacing=list(spacing)),
                    "gt_voxels": int(gm.sum()), "pred_voxels": int(pm.sum()),
                    "spacing": "x".join(f"{s:.4g}" for s in spacing), "nsd_tolerance": self.nsd_tolerance,
                    "nsd_unit": "mm" if volume else "px",
                })
        return d

    def summary(self) -> dict:
        """Mean Dice/NSD per class over the cases where the class is in the reference (and the
        fraction of the other cases answered with an empty mask)."""
        per_class: dict[str, dict] = {}
        for name in dict.fromkeys(r["class_name"] for r in self.rows):
            rows = [r for r in self.rows if r["class_name"] == name]
            pos = [r for r in rows if r["gt_voxels"] > 0]
            neg = [r for r in rows if r["gt_voxels"] == 0]
            per_class[name] = {
                "cases": len(pos),
                "dice": float(np.mean([r["dice"] for r in pos])) if pos else None,
                "nsd": float(np.mean([r["nsd"] for r in pos])) if pos else None,
                "dice_std": float(np.std([r["dice"] for r in pos])) if pos else None,
                "nsd_std": float(np.std([r["nsd"] for r in pos])) if pos else None,
                "empty_cases": len(neg),
                "empty_correct": float(np.mean([r["pred_voxels"] == 0 for r in neg])) if neg else None,
            }
        dices = [v["dice"] for v in per_class.values() if v["dice"] is not None]
        nsds = [v["nsd"] for v in per_class.values() if v["nsd"] is not None]
        return {
            "cases": len(dict.fromkeys(r["case"] for r in self.rows)),
            "mean_dice": float(np.mean(dices)) if dices else None,
            "mean_nsd": float(np.mean(nsds)) if nsds else None,
            "nsd_tolerance": self.nsd_tolerance,
            "nsd_unit": "mm for volumes (voxel spacing), pixels for 2D images",
            "per_class": per_class,
        }

    def write(self, output_dir: str | os.PathLike) -> dict:
        """Write ``metrics.csv``, ``summary.json`` and ``summary.md``; returns the summary."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metrics.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.COLUMNS)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: (f"{v:.6f}" if isinstance(v, float) and k in ("dice", "nsd") else v)
                            for k, v in r.items()})
        summary = self.summary()
        (out / "summary.json").write_text(json.dumps(summary, indent=1))

        def f(v):
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

        lines = [f"# AutoMedSAM evaluation ({summary['cases']} cases)", "",
                 f"NSD tolerance: {self.nsd_tolerance:g} ({summary['nsd_unit']}). Means over the cases where "
                 f"the class is in the reference; 'empty correct': share of the other cases answered empty.", "",
                 "| class | cases | Dice | NSD | empty cases | empty correct |", "|---|---|---|---|---|---|"]
        for name, v in summary["per_class"].items():
            lines.append(f"| {name} | {v['cases']} | {f(v['dice'])} | {f(v['nsd'])} | {v['empty_cases']} | "
                         f"{f(v['empty_correct'])} |")
        lines += ["", f"Mean over classes: Dice {f(summary['mean_dice'])}, NSD {f(summary['mean_nsd'])}", ""]
        (out / "summary.md").write_text("\n".join(lines))
        return summary


# --------------------------------------------------------------------------------------------
# config helpers

from .bundle import inference_datalist  # noqa: E402  (its home is automedsam.bundle; kept here for old configs)


def displayable_classes(class_names) -> str:
    """A class list from the config as the comma-separated text MONAI Label shows ('' = default)."""
    if class_names in (None, "", "all"):
        return ""
    if isinstance(class_names, str):
        return ",".join(CLASSES[i] for i in parse_classes(class_names))
    return ",".join(CLASSES[i] for i in parse_classes(list(class_names)))


def modality_classes() -> dict[str, list[str]]:
    """Modality -> its class names (for docs and MONAI Label's option panel)."""
    return {m: list(names) for m, names in MODALITY_CLASSES.items()}
