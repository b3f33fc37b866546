"""Write the fixed Decathlon-style datalists of AutoMedSAM's development data.

    python data_lists/make_datalists.py [--data-dir ../shared/data] [--seed 0]

Paths in the JSON files are relative to the data folder given at run time
(``AUTOMEDSAM_DATA``, default ``../shared/data`` beside the repository). The split is fixed:
2D sets are sorted by file name, shuffled with ``seed`` and split 80/20 into "training" and
the held-out rest; BraTS cases 3/1. The held-out rest is then halved (shuffled with ``seed``
again) into "validation" (choosing epochs and thresholds) and "test" (the final report only):
"training" is what model 0.2.0 was trained on, so "test" is cut from the old validation list.
Too few cases for a test split (BraTS: 4 volumes; CT: 1 labelled volume) leaves "test" empty
and says so in the datalist's "note". The single labelled TotalSegmentator CT volume is listed
under both "training" and "validation" (it is the only labelled CT here: CT validation figures
are training-set figures), and its unlabelled 112-slice sibling under "unlabelled".
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path(os.environ.get("AUTOMEDSAM_DATA", HERE.parent.parent / "shared" / "data"))


def _split(items: list, seed: int, train_fraction: float) -> tuple[list, list]:
    items = sorted(items, key=lambda d: d["image"])
    random.Random(seed).shuffle(items)
    n_train = int(round(len(items) * train_fraction))
    return sorted(items[:n_train], key=lambda d: d["image"]), sorted(items[n_train:], key=lambda d: d["image"])


def _halve(items: list, seed: int) -> tuple[list, list]:
    """The held-out cases split into (validation, test), the larger half to validation."""
    items = sorted(items, key=lambda d: d["image"])
    random.Random(seed).shuffle(items)
    n_val = len(items) - len(items) // 2
    return sorted(items[:n_val], key=lambda d: d["image"]), sorted(items[n_val:], key=lambda d: d["image"])


def _pairs_2d(data: Path, folder: str, suffix: str) -> list[dict]:
    images = sorted((data / folder / "images").glob(f"*{suffix}"))
    out = []
    for img in images:
        mask = data / folder / "masks" / img.name
        if not mask.is_file():
            raise SystemExit(f"missing mask for {img}: expected {mask}")
        out.append({"image": f"{folder}/images/{img.name}", "label": f"{folder}/masks/{img.name}"})
    if not out:
        raise SystemExit(f"no *{suffix} images in {data / folder / 'images'}")
    return out


def _hc18(data: Path, seed: int) -> dict:
    """HC18 fetal heads (the class taught with ``automedsam add-class``): a fixed test subset of 100
    never used for training, 50 for validation, the remaining 350 for training (seeded shuffle)."""
    items = sorted(_pairs_2d(data, "ultrasound/hc18", ".png"), key=lambda d: d["image"])
    random.Random(seed).shuffle(items)
    test, val, train = items[:100], items[100:150], items[150:]
    return {"name": "HC18 fetal head ultrasound (halved copy)", "dataset": "hc18", "modality": "ultrasound",
            "note": "the worked example of adding a class (fetal_head): taught from 'training' (a seeded draw "
                    "of N of it for N-image runs), 'test' is never used for training or choosing settings",
            "training": sorted(train, key=lambda d: d["image"]), "validation": sorted(val, key=lambda d: d["image"]),
            "test": sorted(test, key=lambda d: d["image"])}


def make(data: Path, seed: int = 0) -> dict[str, dict]:
    lists = {}
    kv_train, kv_rest = _split(_pairs_2d(data, "polyp/kvasir-seg", ".jpg"), seed, 0.8)
    kv_val, kv_test = _halve(kv_rest, seed)
    lists["kvasir"] = {"name": "Kvasir-SEG polyps (256x256 copy)", "dataset": "kvasir", "modality": "endoscopy",
                       "training": kv_train, "validation": kv_val, "test": kv_test}
    sz_train, sz_rest = _split(_pairs_2d(data, "chest-xray/shenzhen", ".png"), seed, 0.8)
    sz_val, sz_test = _halve(sz_rest, seed)
    lists["shenzhen"] = {"name": "Shenzhen chest X-ray lungs (512x512 copy)", "dataset": "shenzhen",
                         "modality": "xray", "training": sz_train, "validation": sz_val, "test": sz_test}
    cases = sorted(p.name for p in (data / "brain-mri" / "brats").iterdir() if p.is_dir())
    brats = [{"image": f"brain-mri/brats/{c}/Flair_subtrMeanDivStd.nii.gz",
              "label": f"brain-mri/brats/{c}/OTMultiClass.nii.gz"} for c in cases]
    br_train, br_val = _split(brats, seed, 0.75)
    lists["brats"] = {"name": "BraTS 2013 FLAIR, whole tumour", "dataset": "brats", "modality": "mr",
                      "note": "4 volumes only: 3 for training, 1 for validation, none left for a test split "
                              "('test' is empty; never fill it with training cases). Brain tumour test figures "
                              "need other BraTS cases.",
                      "training": br_train, "validation": br_val, "test": []}
    lists["totalseg"] = {
        "name": "TotalSegmentator example CT (abdomen crop)", "dataset": "totalseg", "modality": "ct",
        "note": "one labelled volume only (labels made by the TotalSegmentator model): it is both the only CT "
                "training case and the CT validation case, so CT validation figures are training-set figures "
                "(a check that the 3D path works, not generalisation). No case is left for a test split ('test' is empty). "
                "'unlabelled' holds the unlabelled 112-slice volume of the same patient (no label: not a test case).",
        "training": [{"image": "abdomen-ct/totalseg-example/ct.nii.gz",
                      "label": "abdomen-ct/totalseg-example/label.nii.gz"}],
        "validation": [{"image": "abdomen-ct/totalseg-example/ct.nii.gz",
                        "label": "abdomen-ct/totalseg-example/label.nii.gz"}],
        "test": [],
        "unlabelled": [{"image": "abdomen-ct/totalseg-example-unlabelled/ct.nii.gz"}],
        "validation_overlaps_training": True,
    }
    lists["hc18"] = _hc18(data, seed)
    for name, dl in lists.items():
        dl["seed"] = seed
        for split in ("training", "validation", "test", "unlabelled"):
            for e in dl.get(split, []):
                for key in ("image", "label"):
                    if key in e and not (data / e[key]).exists():
                        raise SystemExit(f"{name}: {data / e[key]} does not exist")
    return lists


def _dumps(dl: dict) -> str:
    """JSON with one entry per line (readable diffs)."""
    lines = ["{"]
    items = list(dl.items())
    for i, (k, v) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if isinstance(v, list):
            body = ",\n".join("  " + json.dumps(e) for e in v)
            lines.append(f" {json.dumps(k)}: [\n{body}\n ]{comma}" if v else f" {json.dumps(k)}: []{comma}")
        else:
            lines.append(f" {json.dumps(k)}: {json.dumps(v)}{comma}")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == dl
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA))
    ap.add_argument("--out-dir", default=str(HERE))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name, dl in make(Path(args.data_dir), args.seed).items():
        out = Path(args.out_dir) / f"{name}.json"
        out.write_text(_dumps(dl))
        print(f"{out}: {len(dl['training'])} training, {len(dl['validation'])} validation, "
              f"{len(dl.get('test', []))} test")


if __name__ == "__main__":
    main()
