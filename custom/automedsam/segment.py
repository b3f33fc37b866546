"""Segment files by class name: the Python API behind ``automedsam segment``.

Two levels:

* :func:`segment` - files or folders in, files out (label map, overlay, JSON report, and for
  DICOM input a DICOM-SEG); returns one result dict per input.
* :class:`Segmenter` - holds the loaded network (loaded once); :meth:`Segmenter.segment_file`
  returns arrays without writing anything, :meth:`Segmenter.write` writes them.

Each 2D slice is encoded once by MedSAM's image encoder whatever the number of classes; every
class is then decoded from that embedding (:class:`automedsam.inferer.ClassPromptInferer`).

This module holds the run (:func:`segment`) and the network's side (:class:`Segmenter`); what
to segment is found by :mod:`automedsam.inputs`, files are read by the one pipeline
(:mod:`automedsam.pipeline`), corrections mapped by :mod:`automedsam.corrections` and outputs
written by :mod:`automedsam.outputs`.

Output names follow the input's stem (``ct.nii.gz`` -> ``ct``; a DICOM series folder -> the
folder's name)::

    <stem>_seg.nii.gz | <stem>_seg.png     uint8 label map, ids from classes.CLASSES
    <stem>_overlay.png                     contours on the most covered (or middle) slice
    <stem>_report.json                     per-class statistics, timings, model
    <stem>_seg.dcm                         DICOM-SEG (DICOM input only, when a class was found)
    <stem>_uncertainty.nii.gz | .png       per-pixel uncertainty (calibrated entropy, noise-draw spread and
                                           the case score, see automedsam.uncertainty; ``uncertainty=N``)

Every file is first written under a temporary name in the output folder and only renamed into
place when all of an input's outputs were written, so a failure leaves nothing behind.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .classes import CLASSES, MODALITY_CLASSES, check_modality, class_id, classes_not_fitting, parse_classes
from .corrections import SliceMapper, _corrections_to_prompts
from .data.io import InputError, LoadedImage, load_image
from .errors import CheckpointError, RunError, SegmentError, one_line  # noqa: F401  (CheckpointError: re-exported)
from .inputs import InputItem, _own_outputs, _safe_stem, _strip_suffix, resolve_inputs
from .modality import guess_modality
from .options import (SegmentOptions, check_batch_size, check_threshold, check_uncertainty, class_ids, parse_box,
                      parse_points, segment_options)
from .outputs import (OUTPUT_KINDS, UNCERTAINTY_PNG_SCALE, SegmentationResult, _existing_outputs,  # noqa: F401
                      check_output_dir, output_paths, write_outputs)

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

        from .pipeline import normalise_loaded
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
                modality = check_modality(modality)
            except ValueError as e:
                raise SegmentError(str(e)) from None
        # the pipeline's last step (NormaliseModalityd): the modality (given or guessed) and the
        # normalised (N,H,W,3) slices in [0,1], as the bundle and MONAI Label get them
        t = time.perf_counter()
        image, modality, modality_source = normalise_loaded(loaded, modality)
        timings["preprocess_s"] = time.perf_counter() - t
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
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))
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
                                 voxel_ml=loaded.voxel_ml, probabilities=maps.probabilities.numpy())
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
        """Write one result's outputs (all or none); returns {kind: path}
        (:func:`automedsam.outputs.write_outputs`)."""
        return write_outputs(result, output_dir, overwrite=overwrite, dicom_seg=dicom_seg, warn=self._warn)

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


# --------------------------------------------------------------------------------------------
# the one-call API


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
    if network is None:  # the class names are those of the bundle used (its configs/classes.json)
        from .pretrained import default_bundle_dir, use_vocabulary

        use_vocabulary((getattr(options, "bundle", None) if options is not None else bundle) or default_bundle_dir())
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
