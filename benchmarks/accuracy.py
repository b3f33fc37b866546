"""Accuracy benchmark on the validation splits, from the embedding cache.

Methods (all share the frozen LiteMedSAM encoder and the cached embeddings):
  automedsam     the shipped model, class name only (the product)
  box_oracle     LiteMedSAM with the ground-truth box (the distillation teacher; an upper reference)
  box_jitter     LiteMedSAM with a realistic user box: each edge moved by up to 10% of the box size (seeded)
  + any extra AutoMedSAM weights given with --variant name=path (ablations, trained with the
    bundle's train.yaml and network_def overrides).

Metrics per dataset and class: Dice and NSD where the class is present (per image for 2D sets,
per volume over the cached slices for 3D sets), and for AutoMedSAM the fraction of slices where
the class is absent that are answered with an empty mask. NSD tolerance: 2 px in the 256 px
low-res grid for 2D; for volumes 2 mm, using the slice spacing of the cached slices.

    python benchmarks/accuracy.py --cache_dir cache [--weights bundles/automedsam/models/model.pt]

Writes benchmarks/results/accuracy.json and accuracy.md.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import fire
import numpy as np
import torch

from automedsam.classes import CLASSES
from automedsam.data.cache import EmbeddingCache
from automedsam.data.datalist import load_datalists
from automedsam.data.dataset import SliceSamples
from automedsam.engine import slice_dice, slice_nsd
from automedsam.pretrained import load_pretrained

RESULTS = Path(__file__).resolve().parent / "results"
VOLUME_DATASETS = ("brats", "totalseg")  # scored per volume by summarise


def jitter_box(box: np.ndarray, frac: float, rng: np.random.Generator) -> np.ndarray:
    w, h = box[2] - box[0], box[3] - box[1]
    shift = rng.uniform(-frac, frac, 4) * np.array([w, h, w, h])
    out = box + shift
    return np.clip(np.array([min(out[0], out[2] - 1), min(out[1], out[3] - 1), max(out[2], out[0] + 1),
                             max(out[3], out[1] + 1)]), 0, 255)


def run(cache_dir: str = "cache", weights: str | None = None, datalists: str = "kvasir,shenzhen,brats,totalseg",
        base_dir: str | None = None, max_cases: int | None = None, slice_step: int = 1, cross_domain_ratio: float = 0.25,
        variant: str | list | None = None, jitter: float = 0.1, seed: int = 0, batch_size: int = 8,
        device: str = "cpu", out: str = str(RESULTS / "accuracy")):
    t0 = time.time()
    models = {"automedsam": load_pretrained(weights=weights)}
    for v in ([variant] if isinstance(variant, str) else (variant or [])):
        name, path = v.split("=", 1)
        models[name] = load_pretrained(weights=path)
    results = evaluate(models, cache_dir, datalists=datalists, base_dir=base_dir, max_cases=max_cases,
                       slice_step=slice_step, cross_domain_ratio=cross_domain_ratio, jitter=jitter, seed=seed,
                       batch_size=batch_size, device=device)
    results["command"] = " ".join(["python", "benchmarks/accuracy.py"] + sys.argv[1:])
    results["seconds"] = round(time.time() - t0, 1)
    _write(results, Path(out))
    return None


def evaluate(models: dict, cache_dir: str, datalists: str | list = "kvasir,shenzhen,brats,totalseg",
             base_dir: str | None = None, max_cases: int | None = None, slice_step: int = 1,
             cross_domain_ratio: float = 0.25, jitter: float = 0.1, seed: int = 0, batch_size: int = 8,
             device: str = "cpu") -> dict:
    """Every AutoMedSAM in ``models`` ({name: network}) and the box-prompted teacher (ground-truth
    and jittered box, through the first model's backbone) on the cached validation slices.
    Returns {"methods": {name: summarise(...)}, "counts": sample counts}."""
    names = [d.strip() for d in datalists.split(",")] if isinstance(datalists, str) else list(datalists)
    models = {m: net.to(device).eval() for m, net in models.items()}
    backbone = next(iter(models.values())).backbone
    cache = EmbeddingCache(cache_dir, backbone=backbone)
    entries = load_datalists(names, base_dir=base_dir, split="validation", max_cases=max_cases)
    ds = SliceSamples(cache, entries, negative_ratio=None, cross_domain_ratio=cross_domain_ratio, slice_step=slice_step,
                      cached_only=True, seed=seed)
    rng = np.random.default_rng(seed)
    # per method: {(dataset, case, class): {slice: (pred, gt)}}, and empty answers on negatives
    store = {m: defaultdict(dict) for m in list(models) + ["box_oracle", "box_jitter"]}
    empty = {m: defaultdict(list) for m in models}
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    with torch.no_grad():
        for batch in loader:
            emb, cids = batch["embedding"].to(device), batch["class_id"].to(device)
            preds = {m: net(embeddings=emb, class_ids=cids).probabilities()[:, 0].cpu().numpy() > 0.5
                     for m, net in models.items()}
            pos = batch["present"].numpy() > 0
            if pos.any():
                idx = np.nonzero(pos)[0]
                boxes = np.stack([jitter_box(batch["box"][i].numpy(), jitter, rng) for i in idx])
                sparse, dense = backbone.prompt(boxes=torch.as_tensor(boxes, dtype=torch.float32, device=device))
                jit, _ = backbone.decode(emb[idx], sparse, dense)
                jit = dict(zip(idx.tolist(), (jit[:, 0].cpu().numpy() > 0)))
            for i in range(len(cids)):
                entry = entries[int(batch["case_index"][i])]
                key = (entry["dataset"], int(batch["case_index"][i]), int(cids[i]))
                k = int(batch["slice_index"][i])
                gt = batch["mask"][i, 0].numpy() > 0.5
                if pos[i]:
                    for m in models:
                        store[m][key][k] = (preds[m][i], gt)
                    store["box_oracle"][key][k] = (batch["teacher"][i, 0].numpy() > 0, gt)
                    store["box_jitter"][key][k] = (jit[i], gt)
                else:
                    for m in models:
                        empty[m][(entry["dataset"], int(cids[i]))].append(float(not preds[m][i].any()))
                        if entry["dataset"] in ("brats", "totalseg") and int(cids[i]) in _own(entry):
                            store[m][key][k] = (preds[m][i], gt)  # volumes: FP slices count in 3D Dice
    return {"methods": {m: summarise(per, empty.get(m, {}), entries, slice_step) for m, per in store.items()},
            "counts": ds.counts()}


def summarise(store: dict, empty: dict, entries: dict, slice_step: int,
              volumes: tuple[str, ...] = VOLUME_DATASETS) -> dict:
    """Per "dataset/class": mean Dice and NSD where the class is present (per image for 2D sets,
    per volume for the datasets in ``volumes``) and the empty-answer rate where it is absent.

    Args:
        store: {(dataset, case, class id): {slice index: (pred mask, gt mask)}}.
        empty: {(dataset, class id): [1.0 if the answer was empty else 0.0, ...]}.
        entries: datalist entries by case (for volume spacing).
        volumes: datasets scored per volume (3D Dice/NSD over the slices); others per image.
    """
    rows = defaultdict(lambda: {"dice": [], "nsd": [], "cases": {}})
    for (dataset, case, cid), slices in sorted(store.items()):
        if not any(g.any() for _, g in slices.values()):
            continue
        ks = sorted(slices)
        p = np.stack([slices[k][0] for k in ks])
        g = np.stack([slices[k][1] for k in ks])
        row = rows[(dataset, cid)]
        if dataset in volumes:
            spacing = _volume_spacing(entries[case], slice_step)
            dice, nsd = [slice_dice(p, g)], [slice_nsd(p, g, 2.0, spacing=spacing)]
        else:
            dice = [slice_dice(pp, gg) for pp, gg in zip(p, g)]
            nsd = [slice_nsd(pp, gg, 2.0) for pp, gg in zip(p, g)]
        row["dice"] += dice
        row["nsd"] += nsd
        row["cases"][_case_name(entries[case])] = round(float(np.mean(dice)), 4)
    out = {}
    for (dataset, cid), r in sorted(rows.items()):
        out[f"{dataset}/{CLASSES[cid]}"] = {"dice": float(np.mean(r["dice"])), "nsd": float(np.mean(r["nsd"])),
                                           "n": len(r["dice"]), "dice_per_case": r["cases"]}
    for (dataset, cid), v in sorted(empty.items()):
        out.setdefault(f"{dataset}/{CLASSES[cid]}", {})["empty_when_absent"] = float(np.mean(v))
        out[f"{dataset}/{CLASSES[cid]}"]["n_absent"] = len(v)
    return out


def _case_name(entry) -> str:
    """The case's image path relative to the data folder (where it lies under it)."""
    import os

    from automedsam.data.datalist import default_data_dir

    image = str(entry["image"])
    rel = os.path.relpath(image, default_data_dir())
    return image if rel.startswith("..") else rel


def _own(entry) -> set[int]:
    from automedsam.data.dataset import dataset_classes

    return set(dataset_classes(entry["dataset"], entry["modality"]))


def _volume_spacing(entry, slice_step: int) -> tuple[float, float, float]:
    """Spacing of the low-res grid of a cached volume: in-plane scaled to 256 px, slices x step."""
    import nibabel as nib

    img = nib.load(entry["image"])
    sx, sy, sz = (float(s) for s in img.header.get_zooms()[:3])
    shape = img.shape[:3]
    f = max(shape[0], shape[1]) / 256.0
    return (sz * slice_step, sx * f, sy * f)


def _write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    methods = list(results["methods"])
    rows = sorted({k for m in methods for k, r in results["methods"][m].items() if "dice" in r})
    lines = ["# Accuracy on the validation splits", "", f"Command: `{results['command']}`  ",
             f"Wall time: {results['seconds']} s; samples: {results['counts']}", "",
             "Dice / NSD where the class is present (per image for 2D sets, per volume for 3D sets; NSD "
             "tolerance 2 px of the 256 px grid for 2D, 2 mm for volumes).", "",
             "| dataset/class | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for k in rows:
        cells = []
        for m in methods:
            r = results["methods"][m].get(k, {})
            cells.append(f"{r['dice']:.3f} / {r['nsd']:.3f} (n={r['n']})" if "dice" in r else "-")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    class_methods = [m for m in methods if not m.startswith("box_")]
    lines += ["", "Empty answers where the class is absent (fraction of slices answered with an empty mask), per "
              "class over all validation sets: in-modality (e.g. spleen asked on a CT slice without spleen) and "
              "cross-domain (e.g. polyp asked on a chest X-ray).", "",
              "| class | " + " | ".join(f"{m} in-modality | {m} cross-domain" for m in class_methods) + " |",
              "|---|" + "---|---|" * len(class_methods)]
    from automedsam.classes import CLASS_IDS, MODALITY_CLASSES
    from automedsam.classes import DATASET_MODALITY

    for name in CLASS_IDS:
        cells = []
        for m in class_methods:
            inside, cross = [], []
            for k, r in results["methods"][m].items():
                ds, cname = k.split("/")
                if cname != name or "empty_when_absent" not in r:
                    continue
                same = name in MODALITY_CLASSES[DATASET_MODALITY[ds]]
                (inside if same else cross).append((r["empty_when_absent"], r["n_absent"]))
            cells += [_weighted(inside), _weighted(cross)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _weighted(pairs) -> str:
    n = sum(c for _, c in pairs)
    return "-" if n == 0 else f"{sum(v * c for v, c in pairs) / n:.3f} (n={n})"


if __name__ == "__main__":
    fire.Fire(run)
