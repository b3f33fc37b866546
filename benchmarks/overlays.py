"""Pictures for the model card: good and bad cases of the accuracy benchmark, side by side with
the ground truth.

Reads the per-case Dice that `benchmarks/accuracy.py` wrote (AutoMedSAM, class name only), takes
for every 2D dataset/class the best and the worst validation case and for every volume dataset its
validation volume, segments each with `automedsam segment`'s pipeline (full resolution, the
dataset's classes, the shipped weights) and writes `<dataset>_<class>_<best|worst|volume>.png`:
the prediction (left) and the ground truth (right) on the slice with the most predicted pixels.

    python benchmarks/overlays.py [--results benchmarks/results/accuracy.json]
                                  [--out bundles/automedsam/docs/overlays] [--weights PATH]

Also writes `index.md` in the output folder: one line per picture with the case and its Dice.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "accuracy.json"
OUT = REPO / "bundles" / "automedsam" / "docs" / "overlays"
VOLUME_SETS = ("brats", "totalseg")


def choose_cases(results: dict, method: str = "automedsam") -> list[dict]:
    """[{dataset, class, case, dice, kind}] to draw: best and worst per 2D dataset/class, and
    each volume dataset's volumes once (all their classes in one picture)."""
    picks, seen_volumes = [], set()
    for key, row in sorted(results["methods"][method].items()):
        per_case = row.get("dice_per_case") or {}
        if not per_case:
            continue
        dataset, cls = key.split("/", 1)
        if dataset in VOLUME_SETS:
            for case, dice in per_case.items():
                if (dataset, case) not in seen_volumes:
                    seen_volumes.add((dataset, case))
                    picks.append({"dataset": dataset, "class": "all", "case": case, "dice": None, "kind": "volume"})
            continue
        ranked = sorted(per_case.items(), key=lambda kv: kv[1])
        picks.append({"dataset": dataset, "class": cls, "case": ranked[-1][0], "dice": ranked[-1][1], "kind": "best"})
        if len(ranked) > 1:
            picks.append({"dataset": dataset, "class": cls, "case": ranked[0][0], "dice": ranked[0][1], "kind": "worst"})
    return picks


def ground_truth_slices(label_path: str, loaded, dataset: str, class_ids: list[int]) -> np.ndarray:
    """The reference label map in the result's slice layout, with our class ids."""
    from automedsam.classes import label_to_classes
    from automedsam.data.io import load_label

    raw = load_label(label_path, like=loaded)
    masks = label_to_classes(raw, dataset)
    out = np.zeros(raw.shape, np.uint8)
    for cid in class_ids:
        if cid in masks:
            out[np.asarray(masks[cid]) > 0] = cid
    return out


def run(results: str = str(RESULTS), out: str = str(OUT), weights: str | None = None, method: str = "automedsam"):
    from PIL import Image

    from automedsam.classes import CLASSES
    from automedsam.data.datalist import default_data_dir, load_datalists
    from automedsam.data.dataset import dataset_classes
    from automedsam.engine import slice_dice
    from automedsam.report import choose_overlay_slice, overlay_image, pixel_aspect_of
    from automedsam.segment import Segmenter

    t0 = time.time()
    res = json.loads(Path(results).read_text())
    data = default_data_dir()
    by_image = {str(Path(e["image"]).resolve()): e for e in load_datalists("kvasir,shenzhen,brats,totalseg",
                                                                             split="validation")}
    seg = Segmenter(weights=weights, warn=lambda m: print("warning:", m))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Validation cases: AutoMedSAM (class name only, left) and the reference (right)", "",
             f"Made by `python benchmarks/overlays.py` from `{Path(results).relative_to(REPO) if Path(results).is_relative_to(REPO) else results}`.", ""]
    for pick in choose_cases(res, method):
        image = str((data / pick["case"]).resolve())
        entry = by_image[image]
        ids = dataset_classes(entry["dataset"], entry["modality"])
        r = seg.segment_file(image, classes=[CLASSES[i] for i in ids], modality=entry["modality"])
        gt = ground_truth_slices(entry["label"], r.loaded, entry["dataset"], ids)
        pred = r.label_slices
        k = choose_overlay_slice(pred if pred.any() else gt)
        aspect = pixel_aspect_of(r.loaded.meta.get("oriented_affine") if r.loaded.is_volume else None)
        dices = {CLASSES[c]: round(slice_dice(pred == c, gt == c), 3) for c in ids if (gt == c).any()}
        name = Path(pick["case"]).name
        left = overlay_image(r.image[k], pred[k], ids, title=f"AutoMedSAM  {name}  " +
                             " ".join(f"{c} {d:.2f}" for c, d in dices.items()), pixel_aspect=aspect,
                             found=[c for c in ids if (pred == c).any()])
        right = overlay_image(r.image[k], gt[k], ids, title="reference", pixel_aspect=aspect,
                              found=[c for c in ids if (gt == c).any()])
        pic = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), "white")
        pic.paste(left, (0, 0))
        pic.paste(right, (left.width, 0))
        fname = f"{pick['dataset']}_{pick['class']}_{pick['kind']}.png"
        pic.save(out_dir / fname)
        what = f"{pick['kind']} {pick['class']}" if pick["kind"] != "volume" else "validation volume"
        lines.append(f"- `{fname}`: {what}, `{pick['case']}`" + (f" slice {k}" if r.loaded.is_volume else "") +
                     ": full-resolution Dice " + ", ".join(f"{c} {d:.3f}" for c, d in dices.items()))
        print(lines[-1], flush=True)
    lines += ["", f"Wall time {time.time() - t0:.0f} s."]
    (out_dir / "index.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    import fire

    fire.Fire(run)
