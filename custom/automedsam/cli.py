"""The ``automedsam`` command (fire): ``automedsam segment ...``, ``automedsam cache ...``,
``automedsam demo``.

Commands return None and end with the right exit status (0 only on success); errors are one
line on stderr, ``automedsam: error: ...``.
"""

from __future__ import annotations

import sys


def cache(datalist, base_dir=None, cache_dir="cache", backbone="lite_medsam", checkpoint=None, max_cases=None,
          slice_step=1, only_labelled_slices=False, split="training", batch_size=4, rank=None, world_size=None,
          device=None):
    """Encode every slice of a datalist once into the embedding cache (resumable).

    Example: automedsam cache --datalist kvasir,brats --cache-dir cache --split training
    """
    from .data.cache import build_cache

    return build_cache(datalist, base_dir=base_dir, cache_dir=cache_dir, backbone=backbone, checkpoint=checkpoint,
                       max_cases=max_cases, slice_step=slice_step, only_labelled_slices=only_labelled_slices,
                       split=split, batch_size=batch_size, rank=rank, world_size=world_size, device=device)


def segment(*inputs, output=None, classes=None, modality=None, device="cpu", weights=None, bundle=None,
            largest_component=False, uncertainty=0, box=None, point=None, overwrite=False, quiet=False,
            threshold=0.5, batch_size=None, max_voxels=None, series_uid=None):
    """Segment images or volumes by class name.

    automedsam segment INPUT [INPUT ...] --output DIR [--classes liver,spleen] [--modality ct|mr|endoscopy|xray]
                       [--device cpu|cuda] [--largest_component] [--uncertainty N] [--box ...] [--point ...]
                       [--overwrite] [--quiet] [--max_voxels N] [--series_uid UID|all]

    INPUT: a NIfTI file, a DICOM series folder, a 2D image (PNG/JPG/BMP/TIFF), a MedSAM .npz, or a
    folder of such files (each segmented in turn, the model loaded once; a bad file is reported
    and skipped, and the exit status is then non-zero).

    Outputs in DIR, named after each input's stem: <stem>_seg.nii.gz (volumes; uint8 label map on
    the input's voxel grid and affine) or <stem>_seg.png (2D), <stem>_overlay.png,
    <stem>_report.json, <stem>_seg.dcm (DICOM-SEG, DICOM input), <stem>_uncertainty.nii.gz/.png
    (--uncertainty). Label ids: 1 liver, 2 spleen, 3 kidney_left, 4 kidney_right, 5 pancreas,
    6 brain_tumor, 7 polyp, 8 lungs.

    Bad input (a missing, truncated or unreadable file, a 1D or 4D array, a constant or all-zero
    image, NaN/Inf voxels, more voxels than --max_voxels) is refused with one line naming the file;
    NaN/Inf voxels are never guessed: replace them in the file. Nothing is written for a refused
    input, and every output is written under a temporary name and renamed into place.

    Corrections name their class with a prefix when --classes lists several, e.g.
    --box liver:40,30,90,80,12 --point liver:60,55,12,1 (column, row, slice, label).

    Args:
        inputs: files or folders to segment.
        output: the output folder (created if needed).
        classes: comma-separated class names (default: all classes of the modality); unknown
            names are refused, classes not expected in the modality give a warning.
        modality: ct, mr, endoscopy or xray. Default - guessed from the DICOM Modality tag or from
            the values (HU-like volumes are ct, z-scored float or positive-only volumes mr, colour
            2D images endoscopy, grey 2D images xray).
        device: cpu, cuda or cuda:N.
        weights: AutoMedSAM weights file (default: the bundle's models/model.pt).
        bundle: bundle folder (default: $AUTOMEDSAM_BUNDLE or bundles/automedsam).
        largest_component: keep only the largest connected 3D component per class (lungs: two).
        uncertainty: N noise draws; writes the per-pixel spread (max over classes).
        box: correct one class with a box, "x0,y0,x1,y1[,slice]" in the input's pixels (column x,
            row y, and for volumes the slice number k as stored, which is then required). The class
            is the one --classes names, or a class-name prefix (see above), or the modality's only
            class. One box per class; one input.
        point: correct one class with points, "x,y[,slice],label" (label 1 = object, 0 =
            background), class as for --box; repeat --point or separate points with ";". All
            corrections of a class must be on one slice.
        overwrite: replace existing outputs (otherwise an error, and nothing is written).
        quiet: no progress bar and no per-input summary (warnings and errors still show).
        threshold: foreground probability threshold (0.5).
        batch_size: slices per image-encoder call (default 4 on CPU, 16 on CUDA).
        max_voxels: refuse inputs with more voxels than this, checked from the file's header
            before its data is read (default $AUTOMEDSAM_MAX_VOXELS or 268435456 = 2**28; 0: no
            limit).
        series_uid: a DICOM folder holding several series is refused, listing them; name the one
            to segment with its SeriesInstanceUID, or give "all" to segment each in turn.
    """
    import warnings

    from .backbones import CheckpointError
    from .data.io import InputError
    from .segment import SegmentError, segment as run_segment

    def warn(msg):
        print(f"automedsam: warning: {msg}", file=sys.stderr, flush=True)

    def on_result(entry):
        if entry["ok"]:
            if not quiet:
                outs = entry["outputs"]
                rep = entry["report"] or {}
                found = ", ".join(rep.get("classes_found") or []) or "no class found"
                print(f"{entry['input']}: {rep.get('modality')}, {found} -> {outs.get('seg')}", file=sys.stderr,
                      flush=True)
        else:
            print(f"automedsam: error: {entry['error']}", file=sys.stderr, flush=True)

    flat = []
    for i in inputs:  # fire turns "a,b.png" into a tuple and "123" into an int
        flat.append(",".join(str(x) for x in i) if isinstance(i, (tuple, list)) else str(i))
    if not flat:
        _fail("no INPUT given (automedsam segment INPUT [INPUT ...] --output DIR)")
    if output is None or output is True:
        _fail("no output folder given (--output DIR)")
    if isinstance(classes, (tuple, list)):
        classes = ",".join(str(c) for c in classes)
    elif classes is not None:
        classes = str(classes)
    if isinstance(output, (tuple, list)):
        output = ",".join(str(x) for x in output)
    if series_uid is not None:
        series_uid = str(series_uid)
    if max_voxels is not None and (isinstance(max_voxels, bool) or not isinstance(max_voxels, (int, float))):
        _fail(f"--max_voxels must be a whole number of voxels (0: no limit), got {max_voxels!r}")
    import logging

    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)  # GPU DICOM decoder absent
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*timm.*")
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            results = run_segment(flat, str(output), classes=classes, modality=modality, device=str(device),
                                  weights=weights, bundle=bundle, largest_component=bool(largest_component),
                                  uncertainty=int(uncertainty or 0), box=box, point=point,
                                  overwrite=bool(overwrite), progress=not quiet, threshold=float(threshold),
                                  batch_size=batch_size, on_error="skip", warn=warn, on_result=on_result,
                                  max_voxels=max_voxels, series_uid=series_uid)
    except (SegmentError, InputError, CheckpointError, ValueError, OSError) as e:
        _fail(" ".join(str(e).split()) or type(e).__name__)
    except KeyboardInterrupt:
        print("automedsam: interrupted", file=sys.stderr)
        sys.exit(130)
    failed = [r for r in results if not r["ok"]]
    if failed:
        if len(results) > 1:
            print(f"automedsam: {len(failed)} of {len(results)} inputs failed and were skipped; the others were "
                  f"segmented", file=sys.stderr)
        sys.exit(1)
    return None


def _fail(message: str, code: int = 2):
    print(f"automedsam: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


# flags that may be given more than once; fire keeps only the last, so they are merged first
_REPEATABLE = ("--point", "--box")


def _merge_repeated(argv: list[str]) -> list[str]:
    out: list[str] = []
    merged: dict[str, int] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        flag = next((f for f in _REPEATABLE if a == f or a.startswith(f + "=")), None)
        if flag is None:
            out.append(a)
            i += 1
            continue
        if a == flag:
            value = argv[i + 1] if i + 1 < len(argv) else ""
            i += 2
        else:
            value = a[len(flag) + 1:]
            i += 1
        if flag in merged:
            out[merged[flag]] += ";" + value
        else:
            out.append(flag)
            out.append(value)
            merged[flag] = len(out) - 1
    return out


def main(argv: list[str] | None = None):
    import fire

    args = _merge_repeated(list(sys.argv[1:] if argv is None else argv))
    from .demo import demo

    fire.Fire({"segment": segment, "cache": cache, "demo": demo}, command=args, name="automedsam")


if __name__ == "__main__":
    main()
