"""The one pipeline from a file to the model's slices and back, as MONAI transforms.

``automedsam segment`` (:func:`automedsam.data.io.load_image`), the bundle's ``inference`` /
``batch_inference`` / ``evaluate`` configs (``preprocessing: $automedsam.pipeline.preprocessing(...)``)
and the MONAI Label app (which runs the config's ``preprocessing`` and ``postprocessing``) all
build their chain here, so they read, lay out and normalise a file the same way by construction::

    file -> LoadInputd        io's checks (kind by content, voxel limit from the header, NaN/Inf,
                              constant image, degenerate affine), then MONAI LoadImage with the
                              kind's reader (nibabel, ITK, DicomSeriesReader, PIL, NumPy)
         -> EnsureChannelFirstd                                   (C, X, Y[, Z])
         -> SliceLayoutd      Orientation to LPS (volumes), then rows first: (C, H, W[, N])
         -> NormaliseModalityd   modality (given / datalist / guessed) -> 3 channels in [0, 1]

The way back is the inverse of the same transforms: :func:`postprocessing` (``Invertd``, then
``SaveLabelMapd``) for the bundle, :func:`to_native` for ``automedsam segment`` (which writes
with the input's own NIfTI header, DICOM-SEG and report, staged and atomic).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["loading", "preprocessing", "postprocessing", "load", "normalised", "normalise_loaded", "to_native", "INFO_KEY"]

INFO_KEY = "image_info"  # where load() keeps what LoadInputd learnt about the file (DICOM details, notes)


def loading(keys="image", orientation: str | None = "LPS", labels: bool = False, series_uid: str | None = None,
            allow_gaps: bool = False, max_voxels: int | None = None, info_key: str | None = None) -> list:
    """The loading transforms: LoadInputd -> EnsureChannelFirstd -> SliceLayoutd."""
    from monai.transforms import EnsureChannelFirstd

    from .transforms import LoadInputd, SliceLayoutd

    return [LoadInputd(keys, labels=labels, series_uid=series_uid, allow_gaps=allow_gaps, max_voxels=max_voxels,
                       info_key=info_key),
            EnsureChannelFirstd(keys),
            SliceLayoutd(keys, orientation=orientation)]


def preprocessing(keys="image", orientation: str | None = "LPS", modality: str | None = None,
                  ct_level: float | None = None, ct_width: float | None = None, mr_lower: float | None = None,
                  mr_upper: float | None = None,
                  label_keys=None, dataset_classes: bool = False, **load_kwargs):
    """The whole chain as a ``Compose``: file name(s) in ``keys`` -> (3,H,W[,N]) in [0, 1].

    ``label_keys`` (evaluation): reference labels read by the same checked loader
    (``labels=True``) and made channel first, left on their own voxel grid, where ``Invertd``
    puts the prediction. ``dataset_classes``: the entry's dataset's labelled classes go into
    the image's meta (:class:`~automedsam.transforms.DatasetClassesd`), for the inferer."""
    from monai.transforms import Compose, EnsureChannelFirstd

    from .transforms import DatasetClassesd, LoadInputd, NormaliseModalityd

    chain = loading(keys, orientation=orientation, **load_kwargs)
    if label_keys:
        chain[1:1] = [LoadInputd(label_keys, labels=True), EnsureChannelFirstd(label_keys)]
    chain.append(NormaliseModalityd(keys, modality=modality or None, ct_level=ct_level, ct_width=ct_width,
                                    mr_lower=mr_lower, mr_upper=mr_upper))
    if dataset_classes:
        chain.append(DatasetClassesd(keys))
    return Compose(chain)


def postprocessing(preprocessing, output_dir: str | None = "./", keys="pred", orig_keys="image",
                   data_root_dir: str = "", save: bool = True, output_postfix: str = "seg"):
    """The way back: ``Invertd`` through ``preprocessing`` (the input's voxel grid, orientation and
    affine), then (``save``) ``SaveLabelMapd``."""
    from monai.transforms import Compose, Invertd

    from .transforms import SaveLabelMapd

    chain = [Invertd(keys=keys, transform=preprocessing, orig_keys=orig_keys, nearest_interp=True, to_tensor=True)]
    if save:
        chain.append(SaveLabelMapd(keys=keys, output_dir=output_dir, output_postfix=output_postfix,
                                   data_root_dir=data_root_dir, separate_folder=False))
    return Compose(chain)


def load(path, orientation: str | None = "LPS", **load_kwargs) -> tuple[Any, dict, Any]:
    """One file through the loading transforms: ((C,H,W[,N]) MetaTensor with its applied
    operations, the file's details (kind, layout, native affine, DICOM, notes), the chain that
    made it (whose inverse :func:`to_native` runs))."""
    from monai.transforms import Compose

    chain = Compose(loading("image", orientation=orientation, info_key=INFO_KEY, **load_kwargs))
    d = {"image": str(path)}
    for t in chain.transforms:  # one by one: an InputError stays the one line it is (Compose wraps it)
        d = t(d)
    return d["image"], d[INFO_KEY], chain


def normalised(image, modality: str | None = None, **params):
    """The chain's last step on a loaded (C,H,W[,N]) image: (image (3,H,W[,N]), modality, source)."""
    from .transforms import MODALITY_META_KEY, NormaliseModalityd

    out = NormaliseModalityd("image", modality=modality, **params)({"image": image})["image"]
    return out, out.meta[MODALITY_META_KEY], out.meta["modality_source"]


def normalise_loaded(loaded, modality: str | None = None, **params) -> tuple[np.ndarray, str, str]:
    """:func:`normalised` for a :class:`~automedsam.data.io.LoadedImage` (its ``slices``, so an
    edited copy counts): ((N,H,W,3) float32 in [0, 1], modality, how it was decided)."""
    import torch
    from monai.data import MetaTensor

    x = np.moveaxis(np.asarray(loaded.slices), -1, 0)  # (C,N,H,W)
    x = np.moveaxis(x, 1, -1) if loaded.is_volume else x[:, 0]
    meta = dict(loaded.image.meta) if loaded.image is not None else {}
    dicom = loaded.meta.get("dicom") or {}
    meta.update({"filename_or_obj": str(loaded.path), "is_volume": bool(loaded.is_volume),
                 "native_dtype": str(loaded.meta.get("native_dtype", x.dtype)),
                 "dicom_modality": str(dicom.get("modality") or "")})
    out, modality, source = normalised(MetaTensor(torch.from_numpy(np.ascontiguousarray(x)), meta=meta), modality,
                                       **params)
    y = np.moveaxis(out.detach().cpu().numpy(), 0, -1)  # (H,W[,N],3)
    y = np.moveaxis(y, 2, 0) if y.ndim == 4 else y[None]
    return np.ascontiguousarray(y, dtype=np.float32), modality, source


def to_native(labels: np.ndarray, image, chain) -> np.ndarray:
    """(N,H,W) label slices (or (C,N,H,W) maps) in the layout of ``image`` -> the input's own
    voxel grid, by the inverse of ``chain``, the loading transforms that made ``image``
    (:func:`load`)."""
    import torch
    from monai.data import MetaTensor

    x = np.asarray(labels)
    lead = x.ndim == 4
    c = x if lead else x[None]  # (C,N,H,W)
    arr = np.moveaxis(c, 1, -1) if image.ndim == 4 else c[:, 0]  # (C,H,W,N) or (C,H,W)
    t = MetaTensor(torch.from_numpy(np.ascontiguousarray(arr)), meta=dict(image.meta),
                   applied_operations=[dict(op) for op in image.applied_operations])
    inv = chain.inverse({"image": t})["image"]
    out = inv.detach().cpu().numpy()
    if image.meta.get("automedsam_kind") == "image2d":  # a PNG stores rows first
        out = np.swapaxes(out, 1, 2)
    return out if lead else out[0]
