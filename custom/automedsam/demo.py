"""``automedsam demo``: segment with the shipped weights, quickly, and say what was segmented.

On the real development data when it is there (``$AUTOMEDSAM_DATA`` or ../shared/data): one
representative held-out case per domain - a Kvasir polyp, a Shenzhen chest X-ray, a slab of
the BraTS validation volume (the slices around its largest tumour section) and a slab of the
TotalSegmentator CT (around the slice with the most labelled organs) - then the polyp the README
shows as a failure, labelled as one. Each line is printed as its case finishes, with the time it
took and its Dice against the reference. The slabs (``SLAB`` slices, written to
``<output>/demo_inputs``) keep the demo to a few minutes on a laptop CPU; ``automedsam segment``
on the full volumes does the same slice by slice.

Without the real data: a sample this module generates (a synthetic abdominal CT volume and a
synthetic endoscopy frame), said plainly - it only shows that the pipeline runs.

``$AUTOMEDSAM_DEMO_CASES`` (comma-separated names from :data:`CASES`, e.g. ``polyp``) runs a
subset; the README test uses it to stay short.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

SLAB = 8  # slices per volume slab

# name, datalist, the validation image (None: the first), what the line says
CASES = (
    ("polyp", "kvasir", "polyp/kvasir-seg/images/cju15jr8jz8sb0855ukmkswkz.jpg", "endoscopy polyp"),
    ("lungs", "shenzhen", None, "chest X-ray"),
    ("brain_tumor", "brats", None, f"BraTS FLAIR, {SLAB}-slice slab"),
    ("abdomen", "totalseg", None, f"CT, {SLAB}-slice slab"),
    ("polyp_failure", "kvasir", "polyp/kvasir-seg/images/cju0qoxqj9q6s0835b43399p4.jpg",
     "KNOWN FAILURE: a large flat polyp the model misses (README)"),
)


def _slab(image: Path, label: Path, dataset: str, folder: Path, stem: str) -> tuple[Path, Path]:
    """``SLAB`` consecutive slices of a volume and its label, centred on the slice whose label
    covers the most classes (then the most voxels); same affine."""
    import nibabel as nib

    from .classes import label_to_classes

    img, lab = nib.load(str(image)), nib.load(str(label))
    masks = label_to_classes(np.asarray(lab.dataobj), dataset)
    n = img.shape[2]
    present = sum(m.any(axis=(0, 1)).astype(int) for m in masks.values())
    area = sum(m.sum(axis=(0, 1)) for m in masks.values())
    centre = int(np.lexsort((area, present))[-1])
    z0 = max(0, min(centre - SLAB // 2, n - SLAB))
    z1 = min(n, z0 + SLAB)
    folder.mkdir(parents=True, exist_ok=True)
    out_img, out_lab = folder / f"{stem}.nii.gz", folder / f"{stem}_label.nii.gz"
    nib.save(img.slicer[:, :, z0:z1], str(out_img))
    nib.save(lab.slicer[:, :, z0:z1], str(out_lab))
    return out_img, out_lab


def real_samples(data_dir: Path, folder: Path, names=None) -> list[dict]:
    """The demo cases found under ``data_dir`` (slabs of the volumes written to ``folder``); none of
    them is a training case, except the CT (the only labelled CT, see data_lists/totalseg.json)."""
    from .data.datalist import load_datalist

    out = []
    for name, datalist, image, what in CASES:
        if names and name not in names:
            continue
        try:
            # a named image: wherever the datalist has it (validation or test); else the first validation case
            entries = load_datalist(datalist, base_dir=data_dir, split="all" if image else "validation")
        except (FileNotFoundError, ValueError):
            continue
        if image is not None:
            entries = [e for e in entries if Path(e["image"]) == data_dir / image]
        if not entries:
            continue
        e = entries[0]
        img, lab = Path(e["image"]), Path(e["label"]) if e.get("label") else None
        if lab is not None and img.name.endswith((".nii", ".nii.gz")):
            img, lab = _slab(img, lab, e["dataset"], folder, f"{name}_slab")
        out.append({"name": name, "image": img, "label": lab, "dataset": e["dataset"], "what": what})
    return out


def make_synthetic_samples(folder: Path) -> list[Path]:
    """A synthetic CT volume (HU: air, fat, soft tissue, a liver-like and a spleen-like organ) and a
    synthetic endoscopy frame with a polyp-like blob. No real anatomy: a smoke test of the pipeline."""
    import nibabel as nib
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(np.arange(128), np.arange(128), np.arange(12), indexing="ij")
    vol = np.full((128, 128, 12), -1000.0)
    body = ((x - 64) / 58) ** 2 + ((y - 64) / 46) ** 2 < 1
    vol[body] = -80.0
    vol[body & (((x - 64) / 50) ** 2 + ((y - 64) / 38) ** 2 < 1)] = 40.0
    vol[((x - 40) / 22) ** 2 + ((y - 58) / 18) ** 2 < 1] = 60.0  # liver-like (patient's right)
    vol[((x - 92) / 9) ** 2 + ((y - 54) / 12) ** 2 < 1] = 50.0  # spleen-like
    vol += rng.normal(0, 8, vol.shape)
    ct = folder / "synthetic_ct.nii.gz"
    nib.save(nib.Nifti1Image(vol.astype(np.int16), np.diag([-1.5, -1.5, 3.0, 1.0])), str(ct))
    yy, xx = np.mgrid[:256, :256]
    img = np.stack([150 + 40 * np.sin(xx / 30.0), 70 + 20 * np.cos(yy / 25.0), 60 + 0 * xx], -1)
    blob = ((xx - 140) / 40.0) ** 2 + ((yy - 120) / 32.0) ** 2 < 1
    img[blob] = [200, 120, 100]
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    frame = folder / "synthetic_endoscopy.png"
    Image.fromarray(img).save(frame)
    return [ct, frame]


def case_dice(seg: str, label: Path, image: Path, dataset: str) -> dict[str, float]:
    """Dice per labelled class of ``dataset`` between a written label map and the reference."""
    from .classes import CLASSES, label_to_classes
    from .data.io import load_image, load_label
    from .engine import slice_dice

    loaded = load_image(image)
    pred = load_label(seg, loaded)
    ref = label_to_classes(load_label(label, loaded), dataset)
    return {CLASSES[cid]: float(slice_dice(pred == cid, m)) for cid, m in ref.items() if m.any()}


def demo(output: str = "outputs/demo", data_dir: str | None = None, device: str = "cpu", overwrite: bool = True,
         quiet: bool = False) -> None:
    """Segment one case per domain with the shipped weights and write the results to ``output``."""
    from .data.datalist import default_data_dir
    from .segment import segment

    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*timm.*")
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
    data = Path(data_dir) if data_dir else default_data_dir()
    out = Path(output)
    names = [n.strip() for n in os.environ.get("AUTOMEDSAM_DEMO_CASES", "").split(",") if n.strip()] or None
    cases = real_samples(data, out / "demo_inputs", names) if data.is_dir() else []
    if cases:
        print(f"automedsam demo: real data from {data}: {len(cases)} held-out cases, one per domain "
              f"(volumes as {SLAB}-slice slabs), then a known failure", file=sys.stderr, flush=True)
    else:
        cases = [{"name": p.stem, "image": p, "label": None, "dataset": None, "what": "SYNTHETIC sample"}
                 for p in make_synthetic_samples(out / "synthetic_inputs")]
        print(f"automedsam demo: no real data at {data} (set AUTOMEDSAM_DATA); segmenting a SYNTHETIC sample "
              f"generated in {out / 'synthetic_inputs'} - it only shows that the pipeline runs", file=sys.stderr,
              flush=True)
    by_input = {str(c["image"]): c for c in cases}
    clock = {"t": time.perf_counter(), "start": time.perf_counter()}

    def on_result(r):
        took = time.perf_counter() - clock["t"]
        clock["t"] = time.perf_counter()
        case = by_input.get(str(r["input"]), {})
        if not r["ok"]:
            print(f"automedsam: error: {r['error']}", file=sys.stderr, flush=True)
            return
        rep = r["report"] or {}
        found = ", ".join(rep.get("classes_found") or []) or "no class found"
        dice = ""
        if case.get("label") and r["outputs"].get("seg"):
            scores = case_dice(r["outputs"]["seg"], case["label"], case["image"], case["dataset"])
            dice = " Dice " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) + ";"
        print(f"{case.get('what', r['input'])}: {Path(r['input']).name}: {found};{dice} {took:.0f} s -> "
              f"{r['outputs'].get('overlay')}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*timm.*")
        results = segment([str(c["image"]) for c in cases], str(out), device=device, overwrite=overwrite,
                          progress=not quiet, on_error="skip", largest_component=True, on_result=on_result,
                          warn=lambda m: print(f"automedsam: warning: {m}", file=sys.stderr, flush=True))
    failed = sum(not r["ok"] for r in results)
    print(f"automedsam demo: {len(results) - failed} of {len(results)} cases in "
          f"{time.perf_counter() - clock['start']:.0f} s (model load included); outputs in {out}", file=sys.stderr,
          flush=True)
    if failed:
        sys.exit(1)
