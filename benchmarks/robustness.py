"""Robustness benchmark (issue 16 item 4): Dice per class under image-space perturbations.

Each test image (or volume slice) is perturbed in image space at fixed strengths and seeds, then
segmented by class name only through the product's own path: the modality normalisation over
the whole (perturbed) image or volume (``data.preprocess.normalise``) and
``ClassPromptInferer`` with the ``Segmenter``'s network, threshold and batch size, exactly what
``Segmenter.segment_loaded`` (the CLI) runs, so the image embedding is recomputed for every
perturbed image. Geometric perturbations move the labels with the image (nearest neighbour).

Metrics (``benchmarks/accuracy.py``'s ``summarise``, every sample scored as a 2D image):
Dice/NSD per dataset/class where the class is present, empty-answer rate where it is absent,
and every failure (Dice < 0.5) split into "presence said absent" (presence probability < 0.5:
the mask was blanked) and "mask drawn but wrong". Per sample and class the JSON also keeps the
presence probability, predicted IoU, mean foreground probability, the count of pixels with
probability in (0.2, 0.8) and the image's pixel count (issue 17's inputs); ``--pixels x.npz``
also saves a uniform random sample of pixels (probability, truth) per image and class for
``benchmarks/uncertainty.py``.

Volumes (BraTS, the CT) have no test split (too few cases): their validation volume's slices
holding the tumour/organs are used (evenly spaced, ``--max_slices``), which is not a clean test
(the CT validation volume is also the training volume).

    python benchmarks/robustness.py [--split test] [--max_cases 24] [--max_slices 12]
        [--perturbations rotate,jpeg] [--strengths 15,jpeg=50] [--weights model.pt]

Writes benchmarks/results/robustness.json and robustness.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import RESULTS, VOLUME_DATASETS, summarise  # noqa: E402

from automedsam.classes import CLASSES, label_to_classes  # noqa: E402
from automedsam.engine import slice_dice  # noqa: E402

FAIL_DICE = 0.5  # a case with Dice below this is a failure
PIXEL_SAMPLE = 20000  # pixels sampled per image and class with --pixels
PIXELS: list | None = None  # (record index, probabilities, truth) per image and class with --pixels
PIXELS_RECORDS: list = []
EIGHT_BIT = ("endoscopy", "xray")  # modalities whose images arrive as 8-bit pictures


# --------------------------------------------------------------------------------------------
# perturbations: (image (N,H,W,C) float raw intensities, masks (K,N,H,W) bool, strength, seed,
# modality, spacing (row, col mm)) -> (image, masks)


def _cf(image: np.ndarray) -> np.ndarray:
    """(N,H,W,C) -> (N*C,H,W): every slice/channel as a MONAI channel."""
    n, h, w, c = image.shape
    return np.ascontiguousarray(image.transpose(0, 3, 1, 2).reshape(n * c, h, w))


def _cl(arr, n: int, c: int) -> np.ndarray:
    """(N*C,H,W) -> (N,H,W,C)."""
    from monai.utils import convert_to_numpy

    arr = convert_to_numpy(arr).astype(np.float32)
    return np.ascontiguousarray(arr.reshape(n, c, *arr.shape[-2:]).transpose(0, 2, 3, 1))


def _masks_cf(masks: np.ndarray) -> np.ndarray:
    k, n, h, w = masks.shape
    return masks.reshape(k * n, h, w).astype(np.float32)


def _masks_back(arr, k: int, n: int) -> np.ndarray:
    from monai.utils import convert_to_numpy

    arr = convert_to_numpy(arr)
    return arr.reshape(k, n, *arr.shape[-2:]) > 0.5


def _eight_bit(image: np.ndarray, modality: str) -> np.ndarray:
    """8-bit pictures stay 8-bit after an intensity change (rounded, clipped to 0..255)."""
    return np.clip(np.round(image), 0, 255).astype(np.float32) if modality in EIGHT_BIT else image


def _geometric(transform_image, transform_mask, image, masks):
    """Apply a spatial transform to the image (padding with its minimum, e.g. black or air)
    and the same transform, nearest neighbour, to the masks."""
    n, _, _, c = image.shape
    bg = float(image.min())
    out = _cl(transform_image(_cf(image) - bg), n, c) + bg
    k = masks.shape[0]
    return out, _masks_back(transform_mask(_masks_cf(masks)), k, masks.shape[1])


def rotate(image, masks, degrees, seed, modality, spacing):
    """In-plane rotation by ``degrees`` (MONAI ``Rotate``, same size, corners filled with the minimum)."""
    from monai.transforms import Rotate

    a = float(np.deg2rad(degrees))
    return _geometric(Rotate(a, keep_size=True, mode="bilinear", padding_mode="zeros"),
                      Rotate(a, keep_size=True, mode="nearest", padding_mode="zeros"), image, masks)


def zoom_out(image, masks, factor, seed, modality, spacing):
    """Shrink by ``factor`` and pad back to the same size (the object covers less of the frame)."""
    from monai.transforms import Zoom

    z = 1.0 / float(factor)
    return _geometric(Zoom(z, mode="area", padding_mode="constant", keep_size=True),
                      Zoom(z, mode="nearest", padding_mode="constant", keep_size=True), image, masks)


def gaussian_noise(image, masks, std, seed, modality, spacing):
    """Additive Gaussian noise, std = ``std`` x the image's 0.5..99.5 percentile range."""
    from monai.transforms import RandGaussianNoise

    lo, hi = np.percentile(image, [0.5, 99.5])
    noise = RandGaussianNoise(prob=1.0, mean=0.0, std=float(std) * float(hi - lo), dtype=np.float32, sample_std=False)
    noise.set_random_state(seed=seed)
    n, _, _, c = image.shape
    return _eight_bit(_cl(noise(_cf(image)), n, c), modality), masks


def gamma(image, masks, g, seed, modality, spacing):
    """MONAI ``AdjustContrast`` (gamma on the image's min..max range)."""
    from monai.transforms import AdjustContrast

    n, _, _, c = image.shape
    return _eight_bit(_cl(AdjustContrast(gamma=float(g))(_cf(image)), n, c), modality), masks


def contrast(image, masks, c, seed, modality, spacing):
    """Contrast x ``c`` about the mean, clipped to the 8-bit range (details saturate)."""
    from monai.transforms import ScaleIntensityRange

    m, half = float(image.mean()), 127.5 / float(c)
    out = ScaleIntensityRange(a_min=m - half, a_max=m + half, b_min=0.0, b_max=255.0, clip=True)(image)
    return _eight_bit(np.asarray(out, dtype=np.float32), modality), masks


def _rgb_op(image, op):
    out = []
    for sl in image:
        t = torch.from_numpy(np.clip(np.round(sl), 0, 255).astype(np.uint8)).permute(2, 0, 1)
        out.append(op(t).permute(1, 2, 0).numpy().astype(np.float32))
    return np.stack(out)


def hue(image, masks, shift, seed, modality, spacing):
    """Hue rotated by ``shift`` of the colour circle (torchvision ``adjust_hue``)."""
    from torchvision.transforms.functional import adjust_hue

    return _rgb_op(image, lambda t: adjust_hue(t, float(shift))), masks


def saturation(image, masks, factor, seed, modality, spacing):
    """Saturation x ``factor`` (torchvision ``adjust_saturation``)."""
    from torchvision.transforms.functional import adjust_saturation

    return _rgb_op(image, lambda t: adjust_saturation(t, float(factor))), masks


def jpeg(image, masks, quality, seed, modality, spacing):
    """JPEG round trip at ``quality`` (``automedsam.data.augment.jpeg_recompress``)."""
    from automedsam.data.augment import jpeg_recompress

    return np.stack([jpeg_recompress(sl, int(quality)) for sl in image]), masks


def downscale(image, masks, factor, seed, modality, spacing):
    """Down- by ``factor`` and back up (``automedsam.data.augment.resolution_loss``)."""
    from automedsam.data.augment import resolution_loss

    return np.stack([resolution_loss(sl, float(factor)) for sl in image]), masks


def mr_raw(image, masks, kind, seed, modality, spacing):
    """Un-z-scored MR as a scanner stores it: ``affine`` maps the z-scores to a positive range
    (background, the volume minimum, becomes exactly 0, tissue ~0..1500); ``noisefloor`` adds
    the magnitude-image noise floor (Rician, sigma 15), so the background is no longer 0."""
    raw = (image - float(image.min())) * 150.0
    if kind == "noisefloor":
        rng = np.random.default_rng(seed)
        raw = np.sqrt((raw + rng.normal(0, 15.0, raw.shape)) ** 2 + rng.normal(0, 15.0, raw.shape) ** 2)
    elif kind != "affine":
        raise ValueError(f"mr_raw strength must be affine or noisefloor, got {kind}")
    return raw.astype(np.float32), masks


CT_FIELD = 512  # pixels of a full CT field of view


def ct_fov(image, masks, pixel_mm, seed, modality, spacing):
    """The CT resampled in-plane to ``pixel_mm`` pixels and centred in a 512x512 field of view
    padded with air (-1000 HU +/- 10): a full scanner field around the body (the crop holds the
    whole body outline)."""
    from monai.transforms import Zoom

    n, h, w, c = image.shape
    z = (float(spacing[0]) / float(pixel_mm), float(spacing[1]) / float(pixel_mm))
    img = _cl(Zoom(z, mode="bilinear", keep_size=False, align_corners=False)(_cf(image)), n, c)
    k = masks.shape[0]
    m = _masks_back(Zoom(z, mode="nearest", keep_size=False)(_masks_cf(masks)), k, n)
    hh, ww = img.shape[1:3]
    sh, sw = max(CT_FIELD, hh), max(CT_FIELD, ww)
    rng = np.random.default_rng(seed)
    out = (-1000.0 + rng.normal(0, 10.0, (n, sh, sw, c))).astype(np.float32)
    y0, x0 = (sh - hh) // 2, (sw - ww) // 2
    out[:, y0:y0 + hh, x0:x0 + ww] = img
    mm = np.zeros((k, n, sh, sw), dtype=bool)
    mm[:, :, y0:y0 + hh, x0:x0 + ww] = m
    return out, mm


def ct_png(image, masks, window, seed, modality, spacing):
    """Each CT slice exported as an 8-bit greyscale PNG at display window ``W/L`` (``"400/40"``)
    and read back by the product's reader, as a 2D tool receives it (then segmented as ct)."""
    from PIL import Image

    from automedsam.data.io import load_image

    width, level = (float(v) for v in str(window).split("/"))
    u8 = np.round(np.clip((image[..., 0] - (level - width / 2)) / width, 0, 1) * 255).astype(np.uint8)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, sl in enumerate(u8):
            p = os.path.join(tmp, f"slice{i}.png")
            Image.fromarray(sl).save(p)
            out.append(load_image(p).slices[0])
    return np.stack(out).astype(np.float32), masks


@dataclass(frozen=True)
class Perturbation:
    name: str
    fn: Callable
    strengths: tuple  # mild -> strong (or the variants)
    modalities: tuple
    label: str  # how a strength reads, e.g. "q{}"


PERTURBATIONS = {p.name: p for p in [
    Perturbation("jpeg", jpeg, (90, 50, 20), EIGHT_BIT, "quality {}"),
    Perturbation("downscale", downscale, (0.5, 0.25), EIGHT_BIT + ("mr",), "x{} and back"),
    Perturbation("hue", hue, (0.05, 0.1), ("endoscopy",), "shift {} turn"),
    Perturbation("saturation", saturation, (0.5, 1.5), ("endoscopy",), "x{}"),
    Perturbation("gamma", gamma, (0.5, 2.0), EIGHT_BIT + ("mr",), "gamma {}"),
    Perturbation("contrast", contrast, (1.5, 2.0), EIGHT_BIT, "x{} (clipped)"),
    Perturbation("rotate", rotate, (15, 30), EIGHT_BIT + ("mr", "ct"), "{} deg"),
    Perturbation("noise", gaussian_noise, (0.03, 0.08), EIGHT_BIT + ("mr", "ct"), "std {} of range"),
    Perturbation("zoom_out", zoom_out, (1.5, 2.0), EIGHT_BIT + ("mr", "ct"), "1/{} with padding"),
    Perturbation("mr_raw", mr_raw, ("affine", "noisefloor"), ("mr",), "{}"),
    Perturbation("ct_fov", ct_fov, (1.0, 0.75), ("ct",), "{} mm pixels, 512 field"),
    Perturbation("ct_png", ct_png, ("400/40", "350/50", "1500/-600"), ("ct",), "8-bit PNG W/L {}"),
]}


def perturbation_seed(seed: int, case: str, name: str, strength) -> int:
    """A seed fixed by the case and perturbation (independent of what else is selected)."""
    return zlib.crc32(f"{seed}|{case}|{name}|{strength}".encode()) & 0x7FFFFFFF


def apply(name: str, strength, image: np.ndarray, masks: np.ndarray, seed: int, modality: str,
          spacing=(1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """One perturbation; ``clean`` returns the inputs. Inputs are never modified."""
    if name == "clean":
        return image, masks
    return PERTURBATIONS[name].fn(image.copy(), masks.copy(), strength, seed, modality, spacing)


# --------------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    dataset: str
    modality: str
    name: str
    image: np.ndarray  # (N,H,W,C) raw intensities (a volume: every slice, for its normalisation)
    masks: np.ndarray  # (K,N,H,W) bool, rows in class_ids order
    class_ids: list[int]
    keep: list[int] = field(default_factory=lambda: [0])  # slices segmented and scored
    spacing: tuple = (1.0, 1.0)  # in-plane (row, col) mm
    is_volume: bool = False


def load_cases(datalists, split: str, max_cases: int, max_slices: int, notes: list[str]) -> list[Case]:
    from automedsam.data.datalist import load_datalist
    from automedsam.data.dataset import dataset_classes
    from automedsam.data.io import load_image, load_label

    cases = []
    for name in datalists:
        entries = load_datalist(name, split=split)
        dataset = entries[0]["dataset"] if entries else None
        if not entries:
            entries = load_datalist(name, split="validation")
            dataset = entries[0]["dataset"] if entries else name
            if dataset not in VOLUME_DATASETS:
                raise SystemExit(f"robustness.py: datalist {name} has no '{split}' split")
            notes.append(f"{dataset}: no '{split}' split (too few cases); its validation volume's slices holding "
                         f"the classes are used (not a clean test{'; also the training volume' if dataset == 'totalseg' else ''})")
        for e in entries[:max_cases]:
            loaded = load_image(e["image"])
            labels = load_label(e["label"], loaded)
            ids = dataset_classes(e["dataset"], e["modality"])
            by_class = label_to_classes(labels, e["dataset"])
            masks = np.stack([by_class[c] for c in ids])
            keep = [0]
            if loaded.is_volume:
                held = np.nonzero(masks.any(axis=(0, 2, 3)))[0]
                keep = sorted({int(held[i]) for i in np.linspace(0, len(held) - 1, min(max_slices, len(held))).round()
                               .astype(int)})
            spacing = tuple(float(s) for s in loaded.spacing[:2]) if loaded.is_volume else (1.0, 1.0)
            cases.append(Case(e["dataset"], e["modality"], e["case"], loaded.slices.astype(np.float32), masks, ids,
                              keep, spacing, loaded.is_volume))
    return cases


# --------------------------------------------------------------------------------------------
# segmentation and scoring


def predict(segmenter, image: np.ndarray, modality: str, class_ids: list[int], keep: list[int]):
    """What ``Segmenter.segment_loaded`` computes: normalise the whole image/volume, encode the
    ``keep`` slices once each, decode every class. Returns the inferer's ``ClassMaps``."""
    from automedsam.data.preprocess import normalise
    from automedsam.inferer import ClassPromptInferer

    x = normalise(image, modality)[keep]
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    inferer = ClassPromptInferer(class_ids, batch_size=segmenter.batch_size, threshold=segmenter.threshold)
    return inferer.predict(segmenter.network, x, class_ids)


def failure_kind(dice: float, presence: float) -> str | None:
    """None (not a failure), "presence_absent" (the presence head blanked it) or "mask_wrong"."""
    if dice >= FAIL_DICE:
        return None
    return "presence_absent" if presence < 0.5 else "mask_wrong"


def score(name: str, strength, cases: list[Case], segmenter, seed: int) -> dict:
    """One perturbation at one strength over every case it applies to."""
    store, empty, entries, records = {}, defaultdict(list), [], []
    for case in cases:
        s = perturbation_seed(seed, case.name, name, strength)
        image, masks = apply(name, strength, case.image, case.masks, s, case.modality, case.spacing)
        maps = predict(segmenter, image, case.modality, case.class_ids, case.keep)
        labels = maps.label_map(segmenter.threshold).numpy()
        probs = maps.probabilities.numpy()
        for i, k in enumerate(case.keep):
            sample = len(entries)
            entries.append({"image": case.name + (f"#slice{k}" if case.is_volume else "")})
            for j, cid in enumerate(case.class_ids):
                pred, gt = labels[i] == cid, masks[j, k]
                rec = {"dataset": case.dataset, "case": case.name, "slice": int(k) if case.is_volume else None,
                       "class": CLASSES[cid], "present": bool(gt.any()),
                       "presence": round(float(maps.presence[j, i]), 4), "iou": round(float(maps.iou[j, i]), 4),
                       "pred_pixels": int(pred.sum()), "gt_pixels": int(gt.sum()), "image_pixels": int(gt.size),
                       "mean_probability": round(float(probs[j, i][pred].mean()), 4) if pred.any() else None,
                       "uncertain_pixels": int(((probs[j, i] > 0.2) & (probs[j, i] < 0.8)).sum())}
                if PIXELS is not None:  # a uniform random sample of the pixels (issue 17's ECE / error AUROC)
                    rng = np.random.default_rng(perturbation_seed(seed, case.name, f"pixels{k}|{cid}", strength))
                    flat = rng.choice(gt.size, size=min(PIXEL_SAMPLE, gt.size), replace=False)
                    PIXELS.append((len(PIXELS_RECORDS), probs[j, i].ravel()[flat].astype(np.float16),
                                   gt.ravel()[flat]))
                    PIXELS_RECORDS.append(rec)
                if gt.any():
                    store[(case.dataset, sample, cid)] = {0: (pred, gt)}
                    rec["dice"] = round(slice_dice(pred, gt), 4)
                    rec["failure"] = failure_kind(rec["dice"], rec["presence"])
                else:
                    empty[(case.dataset, cid)].append(float(not pred.any()))
                records.append(rec)
    rows = summarise(store, empty, entries, 1, volumes=())
    for row in rows.values():
        row.pop("dice_per_case", None)  # per case in "records"
    for key, fails in failures(records).items():
        rows.setdefault(key, {}).update(fails)
    return {"perturbation": name, "strength": strength, "rows": rows, "records": records}


def failures(records: list[dict]) -> dict:
    """Per "dataset/class": {"failures", "presence_absent", "mask_wrong", "mask_wrong_empty"}."""
    out = defaultdict(lambda: {"failures": 0, "presence_absent": 0, "mask_wrong": 0, "mask_wrong_empty": 0})
    for r in records:
        if not r["present"]:
            continue
        row = out[f"{r['dataset']}/{r['class']}"]
        if r["failure"]:
            row["failures"] += 1
            row[r["failure"]] += 1
            row["mask_wrong_empty"] += int(r["failure"] == "mask_wrong" and r["pred_pixels"] == 0)
    return dict(out)


# --------------------------------------------------------------------------------------------
# options, plan, output


def parse_plan(perturbations: str, strengths: str | None) -> list[tuple[str, object]]:
    """[(name, strength)] with the clean run first; refuses unknown names or strengths."""
    names = list(PERTURBATIONS) if perturbations in ("", "all") else [p.strip() for p in perturbations.split(",")
                                                                       if p.strip()]
    bad = [n for n in names if n not in PERTURBATIONS and n != "clean"]
    if bad:
        raise ValueError(f"unknown perturbation {', '.join(bad)}; valid: {', '.join(PERTURBATIONS)}")
    # strength-major (every perturbation at its first strength, then its second, ...), so a
    # stopped run has covered every perturbation
    plan = [(n, PERTURBATIONS[n].strengths[i]) for i in range(max(len(p.strengths) for p in PERTURBATIONS.values()))
            for n in names if n != "clean" and i < len(PERTURBATIONS[n].strengths)]
    if strengths:
        wanted = [w.strip() for w in str(strengths).split(",") if w.strip()]
        keep = []
        for w in wanted:
            pert, _, val = w.rpartition("=")
            hit = [(n, s) for n, s in plan if str(s) == val and (not pert or pert == n)]
            if not hit:
                raise ValueError(f"strength '{w}' matches none of the selected perturbations "
                                 f"({'; '.join(f'{n}: ' + ','.join(map(str, PERTURBATIONS[n].strengths)) for n in names if n in PERTURBATIONS)})")
            keep += hit
        plan = [p for p in plan if p in keep]
    return [("clean", None)] + plan


def _key(name, strength) -> str:
    return "clean" if name == "clean" else f"{name}@{strength}"


def run(args, on_progress: Callable[[dict], None] | None = None, segmenter=None) -> dict:
    from automedsam.segment import Segmenter

    t0 = time.time()
    notes: list[str] = list(getattr(args, "note", []) or [])
    cases = load_cases(args.datalists, args.split, args.max_cases, args.max_slices, notes)
    segmenter = segmenter or Segmenter(weights=args.weights, device=args.device, batch_size=args.batch_size)
    info = segmenter.model_info()
    plan = [(n, s) for n, s in args.plan if n == "clean" or any(c.modality in PERTURBATIONS[n].modalities
                                                                 for c in cases)]
    results, records = {}, []
    per_image = {}
    for i, (name, strength) in enumerate(plan):
        applies = [c for c in cases if name == "clean" or c.modality in PERTURBATIONS[name].modalities]
        t = time.time()
        r = score(name, strength, applies, segmenter, args.seed)
        results[_key(name, strength)] = r["rows"]
        for rec in r["records"]:
            rec.update(perturbation=name, strength=strength)
        records += r["records"]
        n_img = sum(len(c.keep) for c in applies)
        per_image[_key(name, strength)] = (time.time() - t) / max(1, n_img)
        done = time.time() - t0
        left = sum(sum(len(c.keep) for c in cases if nn == "clean" or c.modality in PERTURBATIONS[nn].modalities)
                   for nn, _ in plan[i + 1:]) * float(np.mean(list(per_image.values())))
        print(f"[{i + 1}/{len(plan)}] {_key(name, strength)}: {n_img} images in {time.time() - t:.0f} s "
              f"(elapsed {done / 60:.1f} min, about {left / 60:.1f} min left)", flush=True)
        if on_progress is not None and i + 1 < len(plan):
            on_progress(_results(args, cases, info, notes, plan[:i + 1], results, records, t0, complete=False))
    return _results(args, cases, info, notes, plan, results, records, t0, complete=True)


def _results(args, cases, info, notes, plan, results, records, t0, complete: bool) -> dict:
    counts = defaultdict(int)
    for c in cases:
        counts[c.dataset] += len(c.keep)
    if not complete:
        notes = notes + [f"PARTIAL: {len(results)} perturbation-strengths done so far (the run is still going "
                         f"or was stopped)"]
    return {"command": args.command, "seconds": round(time.time() - t0, 1), "split": args.split, "seed": args.seed,
            "complete": complete,
            "model": {k: info[k] for k in ("weights", "weights_sha256", "backbone", "threshold")},
            "images": dict(counts), "notes": notes,
            "perturbations": {n: {"strengths": list(p.strengths), "modalities": list(p.modalities),
                                  "reads": p.label, "what": (p.fn.__doc__ or "").split("\n\n")[0].strip()}
                              for n, p in PERTURBATIONS.items()},
            "results": results, "records": records}


def write(results: dict, out: Path) -> None:
    from automedsam.atomic import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    md = render_md(results)
    atomic_write(out.with_suffix(".json"), lambda p: Path(p).write_text(json.dumps(results, indent=1)))
    atomic_write(out.with_suffix(".md"), lambda p: Path(p).write_text(md))


def save_pixels(path: Path, records: list[dict]) -> None:
    """The --pixels sample: per sampled image and class its record's index in ``records``."""
    from automedsam.atomic import atomic_write

    index = {id(r): i for i, r in enumerate(records)}
    rec = np.concatenate([np.full(len(p), index[id(PIXELS_RECORDS[k])], dtype=np.int32) for k, p, _ in PIXELS])
    prob = np.concatenate([p for _, p, _ in PIXELS])
    truth = np.concatenate([t for _, _, t in PIXELS])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: np.savez_compressed(p, record=rec, probability=prob, truth=truth))


def render_md(results: dict) -> str:
    order = {_key(n, st): (i, j) for i, (n, p) in enumerate(results["perturbations"].items())
             for j, st in enumerate(p["strengths"])}
    res = dict(sorted(results["results"].items(), key=lambda kv: order.get(kv[0], (-1, 0))))
    cols = sorted({k for rows in res.values() for k, r in rows.items() if "dice" in r})
    clean = res.get("clean", {})
    lines = ["# Robustness under image-space perturbations", "", f"Command: `{results['command']}`  ",
             f"Model: `{results['model']['weights']}` (sha256 {str(results['model']['weights_sha256'])[:12]}); "
             f"split: {results['split']}; seed {results['seed']}; wall time {results['seconds'] / 60:.1f} min; "
             f"images/slices per perturbation: {results['images']}", ""]
    lines += [f"- {n}" for n in results["notes"]]
    lines += ["- Every image/slice is perturbed in image space, then segmented by class name only through the "
              "CLI's path (normalise over the whole image/volume, one encoder pass per slice, every class decoded). "
              "Volume slices are scored one by one as 2D images (n = slices), NSD in the JSON (2 px of the image grid).",
              "- A failure is a present class with Dice < 0.5: **presence said absent** (presence probability < 0.5, "
              "the mask is blanked) or **mask drawn but wrong**.", "",
              "## Dice where the class is present", "",
              "Cell: mean Dice (change vs clean) n. `-`: the perturbation does not apply to the modality.", "",
              "| perturbation | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for key, rows in res.items():
        cells = []
        for c in cols:
            r = rows.get(c, {})
            if "dice" not in r:
                cells.append("-")
                continue
            d = f" ({r['dice'] - clean[c]['dice']:+.3f})" if key != "clean" and "dice" in clean.get(c, {}) else ""
            cells.append(f"{r['dice']:.3f}{d} n={r['n']}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "## Failures (Dice < 0.5): presence said absent / mask drawn but wrong", "",
              "Cell: failures of n = presence-absent + mask-wrong (of which the mask was empty).", "",
              "| perturbation | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for key, rows in res.items():
        cells = []
        for c in cols:
            r = rows.get(c, {})
            if "dice" not in r:
                cells.append("-")
                continue
            cells.append(f"{r['failures']}/{r['n']} = {r['presence_absent']} + {r['mask_wrong']}"
                         + (f" ({r['mask_wrong_empty']} empty)" if r["mask_wrong_empty"] else ""))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    absent = sorted({k for rows in res.values() for k, r in rows.items() if "empty_when_absent" in r})
    if absent:
        lines += ["", "## Empty answers where the class is absent (volume slices without it)", "",
                  "| perturbation | " + " | ".join(absent) + " |", "|---|" + "---|" * len(absent)]
        for key, rows in res.items():
            cells = [f"{rows[c]['empty_when_absent']:.3f} n={rows[c]['n_absent']}" if "empty_when_absent"
                     in rows.get(c, {}) else "-" for c in absent]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "## Perturbations", "", "| name | strengths | modalities | what |", "|---|---|---|---|"]
    for n, p in results["perturbations"].items():
        lines.append(f"| {n} | {', '.join(p['reads'].format(s) for s in p['strengths'])} | "
                     f"{', '.join(p['modalities'])} | {' '.join(p['what'].split())} |")
    lines += ["", "Per sample and class (`records` in the JSON): Dice, presence probability, predicted IoU, "
              "mean foreground probability, predicted and true pixels (inputs for issue 17's uncertainty metrics)."]
    return "\n".join(lines) + "\n"


def main(argv=None, segmenter=None) -> int:
    """The command line; ``segmenter``: an already loaded ``Segmenter`` to use (tests)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="test")
    ap.add_argument("--datalists", default="kvasir,shenzhen,brats,totalseg")
    ap.add_argument("--max_cases", type=int, default=24, help="cases per datalist")
    ap.add_argument("--max_slices", type=int, default=12, help="slices per volume (evenly spaced, holding a class)")
    ap.add_argument("--perturbations", default="all", help=f"comma-separated: {', '.join(PERTURBATIONS)}")
    ap.add_argument("--strengths", default=None, help="keep only these strengths, e.g. 15,jpeg=50")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch_size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "robustness"))
    ap.add_argument("--note", action="append", default=[], help="a line added to the results' notes")
    ap.add_argument("--write_partial", action="store_true", help="rewrite the results after each perturbation")
    ap.add_argument("--pixels", default=None, help="also save a uniform random sample of pixels (probability, "
                    f"truth; {PIXEL_SAMPLE} per image and class) to this .npz, for benchmarks/uncertainty.py")
    args = ap.parse_args(argv)
    try:
        if args.max_cases < 1 or args.max_slices < 1:
            raise ValueError("--max_cases and --max_slices must be >= 1")
        args.plan = parse_plan(args.perturbations, args.strengths)
        args.datalists = [d.strip() for d in args.datalists.split(",") if d.strip()]
        from automedsam.data.datalist import SPLITS, datalist_path

        if args.split not in SPLITS:
            raise ValueError(f"unknown split '{args.split}'; valid: {', '.join(SPLITS)}")
        for d in args.datalists:
            datalist_path(d)
        if args.weights and not Path(args.weights).is_file():
            raise ValueError(f"{args.weights}: weights file not found")
        if args.pixels and not args.pixels.endswith(".npz"):
            raise ValueError(f"--pixels {args.pixels}: must end with .npz")
    except (ValueError, FileNotFoundError) as e:
        print(f"robustness.py: {e}", file=sys.stderr)
        return 2
    args.command = " ".join(["python", "benchmarks/robustness.py"] + argv)
    global PIXELS
    PIXELS = [] if args.pixels else None
    PIXELS_RECORDS.clear()
    results = run(args, on_progress=(lambda r: write(r, Path(args.out))) if args.write_partial else None,
                  segmenter=segmenter)
    write(results, Path(args.out))
    print(f"wrote {Path(args.out).with_suffix('.md')} and .json", flush=True)
    if PIXELS is not None:
        save_pixels(Path(args.pixels), results["records"])
        print(f"wrote {args.pixels}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
