"""Specialist baseline for the accuracy benchmark: a MONAI 2D U-Net trained from scratch.

A ``monai.networks.nets.BasicUNet`` (2D, 3 input channels, one sigmoid output channel per class
of ``automedsam.classes.CLASSES``, multi-label) is trained on the same training slices as
AutoMedSAM saw and evaluated on the same validation samples as ``benchmarks/accuracy.py``:

* slices: the datalists' cases and slices that are in the embedding cache (the selection
  ``SliceSamples(..., cached_only=True)`` makes, i.e. the cache's slice subsampling);
* input: the same 256x256 MedSAM preprocessing (``PreprocessConfig.normalise`` over the whole
  image/volume, ``to_backbone_input``); targets: ``mask_to_low_res`` of each class of
  ``label_to_classes`` on the same 256x256 grid (what the cache stores); every class channel has
  a target on every slice (a dataset's labels answer for all classes of its modality, and the
  other modalities' classes are absent);
* evaluation: the same (slice, class) samples as accuracy.py (``SliceSamples`` with
  ``negative_ratio=None, cross_domain_ratio=0.25, seed``), GT masks from the cache, and the same
  metric functions (``automedsam.engine.slice_dice``/``slice_nsd``, volume spacing and 3D
  aggregation from accuracy.py): Dice/NSD per dataset and class where present (per image for 2D
  sets, per volume for 3D sets), the empty-answer rate where absent.

Training runs for a fixed wall-clock budget (``--budget_min`` minutes of training time, counted
over resumes) with a learning rate that follows a cosine of the spent fraction of the budget. A
checkpoint is written atomically after every epoch (and when the budget runs out); a killed run
started again with the same arguments resumes from it. ``--eval_only`` evaluates the latest
checkpoint and writes the results without training.

Augmentation: random affine (rotation, scale, translation) and small intensity changes. No flips
or 90-degree rotations: they would swap kidney_left/kidney_right.

    python benchmarks/unet_baseline.py --cache_dir /work/cache --budget_min 30

Writes benchmarks/results/unet_baseline.json and unet_baseline.md (beside AutoMedSAM's figures
from benchmarks/results/accuracy.json).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import fire
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # accuracy.py beside this file

from accuracy import _own, _weighted, summarise  # noqa: E402

from automedsam.classes import CLASSES, DATASET_MODALITY, MODALITY_CLASSES, label_to_classes  # noqa: E402
from automedsam.data.cache import EmbeddingCache  # noqa: E402
from automedsam.data.datalist import load_datalists  # noqa: E402
from automedsam.data.dataset import SliceSamples  # noqa: E402
from automedsam.data.io import load_image, load_label  # noqa: E402
from automedsam.data.preprocess import mask_to_low_res, to_backbone_input  # noqa: E402
from automedsam.engine import save_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
CLASS_LIST = sorted(CLASSES)  # channel c <-> class id CLASS_LIST[c]
VOLUME_SETS = ("brats", "totalseg")  # evaluated per volume, as in accuracy.py


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _ints(v) -> tuple[int, ...]:
    if isinstance(v, str):
        v = [x for x in v.replace("(", "").replace(")", "").split(",") if x.strip()]
    return tuple(int(x) for x in v)


def selected_slices(ds: SliceSamples) -> list[tuple[int, int]]:
    """(entry index, slice index) of every slice a SliceSamples holds (any class, any kind)."""
    return sorted({(s.entry, s.slice) for s in ds.positives + ds.negatives + ds.cross_domain})


def preload(cache: EmbeddingCache, entries: list[dict], slices: list[tuple[int, int]]):
    """Preprocessed inputs (N,3,256,256) float16 in [0,1] and targets as a bit field (N,256,256)
    uint8 (bit c: class CLASS_LIST[c]) of the given slices, in their order."""
    size = cache.preprocess.size
    images = np.zeros((len(slices), 3, size, size), np.float16)
    bits = np.zeros((len(slices), size, size), np.uint8)
    by_entry = defaultdict(list)
    for n, (i, k) in enumerate(slices):
        by_entry[i].append((n, k))
    for i, items in by_entry.items():
        entry = entries[i]
        img = load_image(entry["image"], orientation=cache.orientation)
        lab = load_label(entry["label"], img)
        x = cache.config_for(entry).normalise(img.slices)  # whole image/volume, as the cache does
        for n, k in items:
            t, info = to_backbone_input(x[k], size)
            images[n] = t.numpy().astype(np.float16)
            for cid, m in label_to_classes(lab[k], entry["dataset"]).items():
                if m.any():
                    bits[n] |= (mask_to_low_res(m, info).astype(np.uint8) << CLASS_LIST.index(cid)).astype(np.uint8)
    return images, bits


def unpack(bits: np.ndarray) -> np.ndarray:
    """(N,H,W) uint8 bit field -> (N,C,H,W) float32 multi-label target."""
    c = np.arange(len(CLASS_LIST), dtype=np.uint8)
    return ((bits[:, None] >> c[None, :, None, None]) & 1).astype(np.float32)


def build_net(features):
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=3, out_channels=len(CLASS_LIST), features=tuple(features))


def augmenter(seed: int):
    from monai.transforms import Compose, RandAffined, RandScaleIntensityd, RandShiftIntensityd

    t = Compose([
        RandAffined(keys=("image", "label"), prob=0.7, rotate_range=(math.radians(15),), scale_range=(0.15, 0.15),
                    translate_range=(20, 20), mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.3),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.3),
    ])
    t.set_random_state(seed=seed)
    return t


def _plain(x) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def _lr(base: float, frac: float, warmup: float = 0.03) -> float:
    """Cosine over the spent fraction of the time budget, with a short linear warm-up."""
    if frac < warmup:
        return base * max(frac / warmup, 0.05)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (frac - warmup) / (1.0 - warmup))))


def train(net, images, bits, *, ckpt: Path, config: dict, budget_s: float, batch_size: int, lr: float,
          loss_name: str, augment: bool, seed: int) -> dict:
    """Train until the budget of training seconds is spent; resume from ``ckpt`` if present."""
    from monai.losses import DiceCELoss, DiceFocalLoss

    loss_fn = DiceCELoss(sigmoid=True, batch=True) if loss_name == "dicece" else DiceFocalLoss(sigmoid=True,
                                                                                                  batch=True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    state = {"epoch": 0, "train_seconds": 0.0, "iterations": 0, "history": [], "finished": False}
    if ckpt.is_file():
        ck = torch.load(ckpt, map_location="cpu", weights_only=False)
        if ck["config"] != config:
            raise SystemExit(f"checkpoint {ckpt} was made with another configuration:\n  {ck['config']}\n"
                             f"  now: {config}\n(use another --ckpt_dir or --fresh)")
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        state = ck["state"]
        state["finished"] = state["train_seconds"] >= budget_s
        _log(f"resumed from {ckpt}: epoch {state['epoch']}, {state['train_seconds']:.0f} s of {budget_s:.0f} s spent")

    def save():
        save_atomic({"model": net.state_dict(), "optimizer": opt.state_dict(), "state": state, "config": config},
                    ckpt)

    n = len(images)
    while state["train_seconds"] < budget_s:
        epoch = state["epoch"]
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
        torch.manual_seed(int(np.random.SeedSequence([seed, epoch, 1]).generate_state(1)[0]))
        order = torch.randperm(n, generator=g).numpy()
        aug = augmenter(int(np.random.SeedSequence([seed, epoch, 2]).generate_state(1)[0])) if augment else None
        net.train()
        t_epoch = time.monotonic()
        spent0 = state["train_seconds"]
        losses, stopped = [], False
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x = torch.from_numpy(images[idx].astype(np.float32))
            y = torch.from_numpy(unpack(bits[idx]))
            if aug is not None:
                pairs = [aug({"image": x[j], "label": y[j]}) for j in range(len(idx))]
                x = torch.stack([_plain(p["image"]) for p in pairs]).clamp_(0.0, 1.0)
                y = torch.stack([_plain(p["label"]) for p in pairs])
            frac = (spent0 + time.monotonic() - t_epoch) / budget_s
            for grp in opt.param_groups:
                grp["lr"] = _lr(lr, frac)
            loss = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            state["iterations"] += 1
            if spent0 + time.monotonic() - t_epoch >= budget_s:
                stopped = start + batch_size < n
                break
        state["train_seconds"] = spent0 + time.monotonic() - t_epoch
        done = (start + len(idx)) / n
        state["epoch"] = epoch + 1 if not stopped else epoch
        state["history"].append({"epoch": epoch + 1, "fraction": round(done, 3), "loss": float(np.mean(losses)),
                                 "seconds": round(state["train_seconds"], 1)})
        state["epochs_done"] = round(epoch + done, 3)
        if stopped:  # the budget ran out inside the epoch: count the part done
            state["partial_epoch"] = round(done, 3)
        save()
        _log(f"epoch {epoch + 1}{' (partial %.2f)' % done if stopped else ''}: loss {np.mean(losses):.4f}, "
             f"{state['train_seconds']:.0f}/{budget_s:.0f} s, lr {opt.param_groups[0]['lr']:.2e}")
        if stopped:
            break
    state["finished"] = True
    return state


@torch.no_grad()
def predict(net, images, batch_size: int = 8) -> np.ndarray:
    """(N,C,256,256) bool: sigmoid > 0.5 per class channel."""
    net.eval()
    out = np.zeros((len(images), len(CLASS_LIST), *images.shape[2:]), bool)
    for s in range(0, len(images), batch_size):
        out[s:s + batch_size] = torch.sigmoid(net(torch.from_numpy(images[s:s + batch_size].astype(np.float32)))
                                              ).numpy() > 0.5
    return out


def evaluate(net, cache: EmbeddingCache, entries: list[dict], ds: SliceSamples, slice_step: int) -> tuple[dict, dict]:
    """accuracy.py's protocol on accuracy.py's samples, for the U-Net's masks."""
    slices = selected_slices(ds)
    images, bits = preload(cache, entries, slices)
    preds = predict(net, images)
    row = {sl: n for n, sl in enumerate(slices)}
    store = defaultdict(dict)
    empty = defaultdict(list)
    gt_mismatch = 0
    for i, s in enumerate(ds.samples):
        item = ds[i]  # the cached GT mask, exactly as accuracy.py reads it
        entry = entries[s.entry]
        cid = int(item["class_id"])
        key = (entry["dataset"], s.entry, cid)
        n = row[(s.entry, s.slice)]
        pred = preds[n, CLASS_LIST.index(cid)]
        gt = item["mask"][0].numpy() > 0.5
        gt_mismatch += int(not np.array_equal(gt, ((bits[n] >> CLASS_LIST.index(cid)) & 1).astype(bool)))
        if float(item["present"]) > 0:
            store[key][s.slice] = (pred, gt)
        else:
            empty[(entry["dataset"], cid)].append(float(not pred.any()))
            if entry["dataset"] in VOLUME_SETS and cid in _own(entry):
                store[key][s.slice] = (pred, gt)  # volumes: FP slices count in 3D Dice
    out = summarise(store, empty, entries, slice_step)
    info = {"val_slices": len(slices), "gt_mismatch_vs_cache": gt_mismatch}
    return out, info


def run(cache_dir: str = "cache", datalists: str = "kvasir,shenzhen,brats,totalseg", base_dir: str | None = None,
        max_cases: int | None = None, budget_min: float = 30.0, seed: int = 0, batch_size: int = 8, lr: float = 2e-3,
        features="16,16,32,64,128,16", loss: str = "dicece", augment: bool = True, threads: int = 2,
        ckpt_dir: str = str(REPO / "runs" / "unet_baseline"), eval_only: bool = False, fresh: bool = False,
        cross_domain_ratio: float = 0.25, slice_step: int = 1, accuracy_json: str = str(RESULTS / "accuracy.json"),
        out: str = str(RESULTS / "unet_baseline")):
    """Train (or resume) for ``budget_min`` minutes of training time, evaluate, write results.

    Args:
        cache_dir: the embedding cache that defines the slices (and holds the validation GT).
        datalists, base_dir, max_cases: as accuracy.py (max_cases: first N cases per datalist/split).
        budget_min: wall-clock minutes of training (summed over resumes).
        features: BasicUNet feature sizes (6 ints).
        loss: "dicece" (DiceCELoss) or "dicefocal" (DiceFocalLoss), both sigmoid, batch Dice.
        ckpt_dir: where ``last.pt`` is written after every epoch (a run resumes from it).
        eval_only: evaluate the checkpoint in ``ckpt_dir`` without training.
        fresh: delete an existing checkpoint and start afresh.
        cross_domain_ratio, slice_step: the validation sampling of accuracy.py (keep its defaults).
        accuracy_json: AutoMedSAM's results to put beside the U-Net's.
    """
    t0 = time.time()
    torch.set_num_threads(int(threads))
    features = _ints(features)
    if len(features) != 6:
        raise ValueError(f"features needs 6 ints, got {features}")
    if loss not in ("dicece", "dicefocal"):
        raise ValueError(f"loss must be dicece or dicefocal, got {loss!r}")
    names = [d.strip() for d in datalists.split(",")] if isinstance(datalists, str) else list(datalists)
    ckpt = Path(ckpt_dir) / "last.pt"
    if fresh and ckpt.is_file() and not eval_only:
        ckpt.unlink()
    cache = EmbeddingCache(cache_dir)  # backbone by name: never built, only its keys are needed
    config = {"datalists": names, "max_cases": max_cases, "features": list(features), "loss": loss, "lr": lr,
              "batch_size": batch_size, "seed": seed, "augment": bool(augment), "cache_dir": str(Path(cache_dir))}
    torch.manual_seed(seed)
    net = build_net(features)

    train_entries = load_datalists(names, base_dir=base_dir, split="training", max_cases=max_cases)
    train_ds = SliceSamples(cache, train_entries, negative_ratio=None, cross_domain_ratio=0.0, cached_only=True,
                            seed=seed)
    train_slices = selected_slices(train_ds)
    per_set = defaultdict(int)
    for i, _ in train_slices:
        per_set[train_entries[i]["dataset"]] += 1
    _log(f"training slices: {len(train_slices)} {dict(per_set)}")
    if eval_only:
        if not ckpt.is_file():
            raise SystemExit(f"--eval_only: no checkpoint at {ckpt}")
        ck = torch.load(ckpt, map_location="cpu", weights_only=False)
        net.load_state_dict(ck["model"])
        state = ck["state"]
        _log(f"evaluating {ckpt}: epoch {state.get('epochs_done', state['epoch'])}, {state['train_seconds']:.0f} s")
    else:
        if not train_slices:
            raise SystemExit(f"no cached training slices in {cache_dir}: build the cache first")
        t_load = time.time()
        images, bits = preload(cache, train_entries, train_slices)
        _log(f"preloaded {len(images)} slices in {time.time() - t_load:.0f} s")
        state = train(net, images, bits, ckpt=ckpt, config=config, budget_s=float(budget_min) * 60.0,
                      batch_size=batch_size, lr=lr, loss_name=loss, augment=augment, seed=seed)
        del images, bits

    val_entries = load_datalists(names, base_dir=base_dir, split="validation", max_cases=max_cases)
    val_ds = SliceSamples(cache, val_entries, negative_ratio=None, cross_domain_ratio=cross_domain_ratio,
                          slice_step=slice_step, cached_only=True, seed=seed)
    t_eval = time.time()
    metrics, info = evaluate(net, cache, val_entries, val_ds, slice_step)
    _log(f"evaluated {info['val_slices']} slices / {len(val_ds)} samples in {time.time() - t_eval:.0f} s")

    reference = {}
    if Path(accuracy_json).is_file():
        acc = json.loads(Path(accuracy_json).read_text())
        reference = {"command": acc.get("command"), "counts": acc.get("counts"),
                     "methods": {m: acc["methods"][m] for m in ("automedsam", "box_oracle") if m in acc["methods"]}}
    results = {
        "command": " ".join(["python", "benchmarks/unet_baseline.py"] + sys.argv[1:]),
        "budget_min": float(budget_min),
        "epochs": state.get("epochs_done", state["epoch"]),
        "iterations": state["iterations"],
        "train_seconds": round(state["train_seconds"], 1),
        "wall_seconds_this_invocation": round(time.time() - t0, 1),
        "eval_only": bool(eval_only),
        "config": config,
        "network": {"class": "monai.networks.nets.BasicUNet", "spatial_dims": 2, "in_channels": 3,
                    "out_channels": len(CLASS_LIST), "features": list(features),
                    "channels": {str(c): CLASSES[cid] for c, cid in enumerate(CLASS_LIST)},
                    "parameters": int(sum(p.numel() for p in net.parameters()))},
        "train_slices": {"total": len(train_slices), **dict(per_set)},
        "val": {**info, "samples": len(val_ds), "counts": val_ds.counts()},
        "history": state["history"],
        "threads": int(threads),
        "methods": {"unet_baseline": metrics},
        "reference": reference,
    }
    _write(results, Path(out))
    _log(f"wrote {Path(out).with_suffix('.json')} and .md")
    return None


def _cell(r: dict | None) -> str:
    return f"{r['dice']:.3f} / {r['nsd']:.3f} (n={r['n']})" if r and "dice" in r else "-"


def _empty_cells(methods: dict, name: str) -> list[str]:
    inside, cross = [], []
    for k, r in methods.items():
        ds, cname = k.split("/")
        if cname != name or "empty_when_absent" not in r:
            continue
        same = name in MODALITY_CLASSES[DATASET_MODALITY[ds]]
        (inside if same else cross).append((r["empty_when_absent"], r["n_absent"]))
    return [_weighted(inside), _weighted(cross)]


def _write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out.with_suffix(".json"))
    unet = results["methods"]["unet_baseline"]
    ref = results["reference"].get("methods", {})
    auto, oracle = ref.get("automedsam", {}), ref.get("box_oracle", {})
    net = results["network"]
    lines = [
        "# Specialist baseline: MONAI 2D U-Net from scratch vs AutoMedSAM", "",
        f"Command: `{results['command']}`  ",
        f"Budget: {results['budget_min']:g} min of training on CPU ({results['threads']} threads); epochs done: "
        f"{results['epochs']} ({results['iterations']} iterations of batch {results['config']['batch_size']}); "
        f"training time {results['train_seconds']:.0f} s; wall time of the last invocation "
        f"{results['wall_seconds_this_invocation']:.0f} s" + (" (--eval_only)" if results["eval_only"] else "") + ".  ",
        f"Network: BasicUNet(spatial_dims=2, in_channels=3, out_channels={net['out_channels']}, "
        f"features={tuple(net['features'])}), {net['parameters'] / 1e6:.2f} M parameters, sigmoid multi-label, "
        f"{'DiceCELoss' if results['config']['loss'] == 'dicece' else 'DiceFocalLoss'}(sigmoid, batch), AdamW "
        f"lr {results['config']['lr']:g} cosine over the budget, seed {results['config']['seed']}.  ",
        f"Training slices (the cached ones AutoMedSAM trained on): {results['train_slices']}.  ",
        f"Validation: {results['val']['val_slices']} slices, the same {results['val']['samples']} (slice, class) "
        f"samples as accuracy.py {results['val']['counts']}; GT masks from the cache "
        f"(U-Net targets differing from them: {results['val']['gt_mismatch_vs_cache']}).", "",
    ]
    cfg = results["config"]
    if cfg["max_cases"] or cfg["datalists"] != ["kvasir", "shenzhen", "brats", "totalseg"]:
        lines += [f"**Subset run** (datalists {cfg['datalists']}, max_cases {cfg['max_cases']}): the U-Net column is "
                  "not on the same samples as the AutoMedSAM figures beside it.", ""]
    lines += [
        "Dice / NSD where the class is present (per image for 2D sets, per volume for 3D sets; NSD tolerance 2 px "
        "of the 256 px grid for 2D, 2 mm for volumes), with the metric functions of accuracy.py. AutoMedSAM and "
        "box_oracle (LiteMedSAM with the GT box) from `benchmarks/results/accuracy.json` "
        f"(`{results['reference'].get('command', '-')}`).", "",
        "| dataset/class | unet_baseline | automedsam | box_oracle |", "|---|---|---|---|",
    ]
    keys = sorted({k for m in (unet, auto, oracle) for k, r in m.items() if "dice" in r})
    for k in keys:
        lines.append(f"| {k} | {_cell(unet.get(k))} | {_cell(auto.get(k))} | {_cell(oracle.get(k))} |")
    lines += ["", "Empty answers where the class is absent (fraction of the samples answered with an empty mask), "
              "per class over all validation sets, same samples for both: in-modality and cross-domain.", "",
              "| class | unet_baseline in-modality | unet_baseline cross-domain | automedsam in-modality | "
              "automedsam cross-domain |", "|---|---|---|---|---|"]
    for cid in CLASS_LIST:
        name = CLASSES[cid]
        lines.append(f"| {name} | " + " | ".join(_empty_cells(unet, name) + _empty_cells(auto, name)) + " |")
    lines += ["", "Notes: the CT set is one TotalSegmentator volume, listed in both the training and the validation "
              "split (both models train on its 30 cached slices); the 3D rows are one volume each (n=1). "
              "Per-epoch training loss is in the JSON (`history`)."]
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out.with_suffix(".md"))


if __name__ == "__main__":
    fire.Fire(run)
