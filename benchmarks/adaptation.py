"""Few-shot adaptation benchmark: teach ``fetal_head`` from N HC18 images, judge it on the fixed
HC18 test subset (data_lists/hc18.json "test", never used for training).

    python benchmarks/adaptation.py [--n 20 all] [--draws 1] [--steps 100] [--test-limit 100] \
        [--ship]     # also write the run taught from all training images into the repository bundle

For each N and draw: ``automedsam.adapt.add_class`` (the same code as ``automedsam add-class``) on
a seeded draw of N training images -> a bundle in a temporary folder; then Dice of the new class on
the test subset at the images' full resolution (the class decode on the cached embeddings,
presence-gated, resized back with the preprocessing's exact inverse), and the CPU minutes of the
whole add-class call (encoding the new images included). Old classes: their rows and every other
weight are checked bit for bit by add_class itself; this benchmark adds label maps on shared
validation cases before/after (``--old-cases``). Results: benchmarks/results/adaptation.{md,json}.

Timings are wall-clock on whatever CPU this runs on; on the development machine (2 cores shared by
several processes) they are pessimistic.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "custom"))

from automedsam import classes as V  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
BUNDLE = REPO / "bundles" / "automedsam"


def hc18_entries(split: str, data_dir: Path) -> list[dict]:
    from monai.data import load_decathlon_datalist

    raw = load_decathlon_datalist(str(REPO / "data_lists" / "hc18.json"), True, split, str(data_dir))
    return [{"image": e["image"], "label": e["label"], "dataset": "hc18", "modality": "ultrasound",
             "case": Path(e["image"]).name} for e in raw]


@torch.no_grad()
def dice_on(net, cache, entries: list[dict], class_id: int) -> list[float]:
    """Full-resolution Dice of ``class_id`` per entry (2D images), from cached embeddings."""
    from automedsam.data.io import load_image, load_label
    from automedsam.data.preprocess import low_res_to_original

    out = []
    for e in entries:
        d = cache.get(e, 0)
        emb = torch.from_numpy(d["embedding"].astype(np.float32))[None]
        prob = net.decode_classes(emb, [class_id]).probabilities()[0, 0]
        pred = low_res_to_original(prob, d["geometry"]).numpy() > 0.5
        gt = load_label(e["label"], load_image(e["image"]))[0] > 0
        out.append(2 * float((pred & gt).sum()) / max(1.0, float(pred.sum() + gt.sum())))
    return out


def old_label_maps(bundle: Path, cases: list[tuple[str, str]], data_dir: Path) -> dict:
    from automedsam.pretrained import load_pretrained
    from automedsam.segment import Segmenter

    seg = Segmenter(load_pretrained(bundle), warn=lambda m: None)
    return {c: seg.segment_file(data_dir / c, modality=m).label_slices for c, m in cases}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", nargs="+", default=["20"], help="training images per run ('all': every training image)")
    ap.add_argument("--draws", type=int, default=1)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=0.1)
    ap.add_argument("--head-learning-rate", type=float, default=3e-4, help="the new class's own head (class_adapters)")
    ap.add_argument("--no-class-head", action="store_true", help="teach the class-table row only")
    ap.add_argument("--test-limit", type=int, default=100, help="judge on the first K test images")
    ap.add_argument("--data-dir", default=os.environ.get("AUTOMEDSAM_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--cache-dir", default=os.environ.get("AUTOMEDSAM_CACHE", str(REPO / "cache")))
    ap.add_argument("--old-cases", type=int, default=10, help="Kvasir and Shenzhen validation images each")
    ap.add_argument("--ship", action="store_true", help="write the last run's bundle files into the repository bundle "
                    "if its old classes' label maps are unchanged")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--bundle", default=str(BUNDLE), help="the source bundle")
    ap.add_argument("--class-name", default="fetal_head", help="the class taught (a new name if the source has it)")
    args = ap.parse_args(argv)
    data = Path(args.data_dir)
    from automedsam.adapt import add_class
    from automedsam.data.cache import EmbeddingCache
    from automedsam.pretrained import load_pretrained

    train, test = hc18_entries("training", data), hc18_entries("test", data)[: args.test_limit]
    src = Path(args.bundle)
    if args.class_name in {c["name"] for c in V.read_vocabulary(src)["classes"]}:
        raise SystemExit(f"{src} already has {args.class_name}: give --class-name another name (or --bundle one without it)")
    rows, last = [], None
    tmp = Path(tempfile.mkdtemp(prefix="adaptation-"))
    for n_spec in args.n:
        n = None if n_spec == "all" else int(n_spec)
        for draw in range(args.draws):
            out = tmp / f"n{n_spec}-d{draw}"
            t0, c0 = time.time(), time.process_time()
            s = add_class(args.class_name, "ultrasound", datalist=REPO / "data_lists" / "hc18.json", data_dir=data,
                          output=out, bundle=src, max_cases=n, dataset="hc18", steps=args.steps,
                          batch_size=args.batch_size, learning_rate=args.learning_rate, cache_dir=args.cache_dir,
                          seed=draw, snomed=("69536005", "Head"), colour=(255, 170, 60), progress=True,
                          class_head=not args.no_class_head, head_learning_rate=args.head_learning_rate)
            wall, cpu = time.time() - t0, time.process_time() - c0
            net = load_pretrained(out)  # its vocabulary (fetal_head) is now loaded
            cache = EmbeddingCache(args.cache_dir, backbone=net.backbone.name, device="cpu")
            cache.build(test, progress=True)
            dice = dice_on(net, cache, test, V.CLASS_IDS[args.class_name])
            V.load_vocabulary()
            row = {"n": s["cases"], "draw": draw, "steps": args.steps, "test_images": len(test),
                   "trained": "row" if args.no_class_head else "row + class head",
                   "dice_mean": round(float(np.mean(dice)), 4), "dice_median": round(float(np.median(dice)), 4),
                   "wall_minutes": round(wall / 60, 2), "cpu_minutes": round(cpu / 60, 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            last = out
    forgetting = []
    if args.old_cases and last is not None:
        cases = []
        for name, mod in (("kvasir", "endoscopy"), ("shenzhen", "xray")):
            v = json.loads((REPO / "data_lists" / f"{name}.json").read_text())["validation"][: args.old_cases]
            cases += [(e["image"], mod) for e in v]
        before = old_label_maps(src, cases, data)
        after = old_label_maps(last, cases, data)
        V.load_vocabulary()
        for c in cases:
            b, a = before[c[0]], after[c[0]]
            forgetting.append({"case": c[0], "identical": bool(np.array_equal(a, b))})
    result = {"command": "python benchmarks/adaptation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": rows, "old_classes_label_maps": forgetting,
              "note": "wall/CPU minutes on the development machine's 2 cores shared with other processes: pessimistic"}
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "adaptation.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Few-shot adaptation: fetal_head from HC18", "", f"Command: `{result['command']}`", "",
             "| training images | draw | steps | test images | Dice mean | Dice median | wall min | CPU min |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['draw']} | {r['steps']} | {r['test_images']} | {r['dice_mean']:.3f} | "
              f"{r['dice_median']:.3f} | {r['wall_minutes']:.1f} | {r['cpu_minutes']:.1f} |" for r in rows]
    if forgetting:
        same = sum(f["identical"] for f in forgetting)
        lines += ["", f"Old classes: label maps of {len(forgetting)} shared validation images (Kvasir, Shenzhen) "
                      f"identical before/after: {same}/{len(forgetting)}."]
    lines += ["", result["note"] + "."]
    (dest / "adaptation.md").write_text("\n".join(lines) + "\n")
    if args.ship and last is not None and all(f["identical"] for f in forgetting):
        import shutil

        for rel in ("configs/classes.json", "models/model.pt"):
            shutil.copy(last / rel, BUNDLE / rel)
        meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
        new = json.loads((last / "configs" / "metadata.json").read_text())
        meta["network_data_format"]["outputs"]["pred"]["channel_def"] = \
            new["network_data_format"]["outputs"]["pred"]["channel_def"]
        (BUNDLE / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"shipped {last} into {BUNDLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
