"""Ablations of AutoMedSAM: each variant trained from scratch with the bundle's train.yaml (one
setting changed), then evaluated with the accuracy benchmark's code on the validation splits.

Variants (``VARIANTS``; the full model is the shipped configuration):
  full            shared-trunk layout, diffusion (linear schedule), both branches, learnt
                  uncertainty weights, distillation from the box-prompted teacher
  no_diffusion    no forward diffusion: the class map goes straight to the branches
  dense_only      only the dense (spatial-attention) branch; the sparse prompt is SAM's "none"
  sparse_only     only the sparse (channel-attention) branch; the dense prompt is SAM's "no mask"
  fixed_weights   the four loss terms with fixed equal weights instead of learnt uncertainty
  no_distill      no distillation term (region, pixel and presence losses only)
  additive        the authors' additive noise schedule instead of DDPM's linear one
  authors_layout  the class enters at the U-Net input (the paper's layout; nothing shared between
                  classes: see benchmarks/speed.py for its cost)
  diffusion_s4    the sparse prompt sampled by a 4-step reverse diffusion (DDIM) trained to denoise
                  towards the ground-truth box's SAM tokens, plus the loss term `denoise`

Steps, each resumable (a killed run carries on: the cache skips finished slices, training resumes
from each variant's last checkpoint, a finished variant is not retrained):

    python benchmarks/ablations.py cache   --cache_dir cache --workers 1
    python benchmarks/ablations.py train   --cache_dir cache --epochs 6 --parallel 2
    python benchmarks/ablations.py report  --cache_dir cache
    python benchmarks/ablations.py all     ... (the three in turn)

Every variant gets the same recipe (data, epochs, batch size, learning rate, seed) and is judged
on its final weights (no selection on the validation split). A variant whose training did not
finish is evaluated on its last finished epoch, and the table says which epoch that was.
Writes benchmarks/results/ablations.json and .md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fire
import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
TRAIN_CONFIG = REPO / "bundles" / "automedsam" / "configs" / "train.yaml"
sys.path.insert(0, str(Path(__file__).resolve().parent))

# name: (what changes, train.yaml overrides). Overrides under network_def# also build the network
# that evaluates the variant's weights.
VARIANTS: dict[str, tuple[str, dict]] = {
    "full": ("the shipped configuration", {}),
    "no_diffusion": ("no forward diffusion", {"network_def#prompt_encoder#use_diffusion": False}),
    "dense_only": ("dense branch alone", {"network_def#prompt_encoder#branches": ["dense"]}),
    "sparse_only": ("sparse branch alone", {"network_def#prompt_encoder#branches": ["sparse"]}),
    "fixed_weights": ("fixed equal loss weights", {"loss#learn_weights": False}),
    "no_distill": ("no distillation", {"loss#terms": ["region", "pixel", "presence"]}),
    "additive": ("additive noise schedule", {"network_def#prompt_encoder#schedule": "additive"}),
    "authors_layout": ("class at the U-Net input", {"network_def#prompt_encoder#layout": "authors"}),
    "authors_preset": ("the authors' released encoder (with our presence head)",
                       {"network_def#prompt_encoder": {"preset": "authors", "presence": True}}),
    "no_presence": ("no presence head (masks ungated)", {"network_def#prompt_encoder#presence": False,
                                                         "loss#terms": ["region", "pixel", "distill"]}),
    "diffusion_s4": ("sparse prompt by a 4-step reverse diffusion", {
        "network_def#prompt_encoder#reverse_steps": 4,
        "loss#terms": ["region", "pixel", "distill", "presence", "denoise"]}),
}
DATALISTS = "kvasir,shenzhen,brats,totalseg"


def _names(variants) -> list[str]:
    names = [v.strip() for v in variants.split(",")] if isinstance(variants, str) else list(variants)
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variants {bad}; known: {', '.join(VARIANTS)}")
    return names


def cache(cache_dir: str = "cache", datalists: str = DATALISTS, workers: int = 1, max_cases: int | None = None):
    """Encode every training and validation slice once (``workers`` processes share the build,
    each its own slices; on one GPU they overlap preprocessing with the encoder)."""
    datalists = datalists if isinstance(datalists, str) else ",".join(datalists)  # fire reads a,b as a tuple
    for split in ("training", "validation"):  # max_cases counts within each split, as training does
        cmd = [sys.executable, "-m", "automedsam.cli", "cache", "--datalist", datalists, "--split", split,
               "--cache_dir", cache_dir] + (["--max_cases", str(max_cases)] if max_cases else [])
        procs = [subprocess.Popen(cmd + ["--rank", str(r), "--world_size", str(workers)]) for r in range(workers)]
        if any([p.wait() for p in procs]):
            raise SystemExit(f"ablations: the cache build failed for the {split} split (see above)")


def _train_args(name: str, cache_dir: str, runs_dir: str, epochs: int, batch_size: int, learning_rate: float,
                num_workers: int, max_cases: int | None, seed: int) -> dict:
    args = {"output_dir": str(Path(runs_dir) / name), "cache_dir": cache_dir, "build_cache": False,
            "train#trainer#max_epochs": epochs, "val_interval": epochs + 1,  # judged by `report`, not in training
            "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed,
            "train#dataloader#num_workers": num_workers, "max_cases": max_cases}
    args.update(VARIANTS[name][1])
    return args


def train(cache_dir: str = "cache", variants: str = ",".join(VARIANTS), runs_dir: str = "runs/ablations",
          epochs: int = 6, batch_size: int = 8, learning_rate: float = 2e-4, num_workers: int = 0, parallel: int = 1,
          max_cases: int | None = None, seed: int = 0):
    """Train each variant with `python -m monai.bundle run training` (``parallel`` at a time)."""
    pending = [n for n in _names(variants) if not (Path(runs_dir) / n / "model.pt").is_file()]
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    failed, stopped = [], []

    def stop(signum, frame):  # a stopped benchmark stops its trainings (they resume on the next call);
        stopped.append(signum)  # the waiting happens in the loop (Popen's lock may be held right here)
        for p, _ in running.values():
            p.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while pending or running:
        while pending and len(running) < parallel:
            name = pending.pop(0)
            out = Path(runs_dir) / name
            out.mkdir(parents=True, exist_ok=True)
            args = _train_args(name, cache_dir, runs_dir, epochs, batch_size, learning_rate, num_workers, max_cases,
                               seed)
            (out / "args.json").write_text(json.dumps(args, indent=1))
            cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(TRAIN_CONFIG),
                   "--args_file", str(out / "args.json")]
            log = open(out / "train.log", "a")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time())
            print(f"ablations: training {name}", flush=True)
        time.sleep(2)
        if stopped:
            for p, _ in running.values():
                p.wait()
            raise SystemExit(f"ablations: stopped by signal {stopped[0]}; {sorted(running)} left unfinished")
        for name, (p, t0) in list(running.items()):
            if p.poll() is None:
                continue
            del running[name]
            wall = round(time.time() - t0, 1)
            print(f"ablations: {name} {'done' if p.returncode == 0 else 'FAILED'} in {wall} s", flush=True)
            if p.returncode:
                failed.append(name)
            else:
                (Path(runs_dir) / name / "wall_s.txt").write_text(f"{wall}\n")
    if failed:
        raise SystemExit(f"ablations: training failed for {failed} (see their train.log)")


def _weights(run_dir: Path) -> tuple[dict, int | None, bool]:
    """(trainable state, epochs trained, finished): model.pt, else the last checkpoint's model."""
    from automedsam.backbones import load_state_dict_file
    from automedsam.engine import latest_checkpoint

    ckpt = latest_checkpoint(str(run_dir))
    epoch = None
    if ckpt:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        epoch = int(state["trainer"]["iteration"]) // max(1, int(state["trainer"]["epoch_length"]))
    if (run_dir / "model.pt").is_file():
        return load_state_dict_file(run_dir / "model.pt", "AutoMedSAM weights"), epoch, True
    if not ckpt:
        raise FileNotFoundError(f"{run_dir}: neither model.pt nor a checkpoint; train this variant first")
    return state["model"], epoch, False


def report(cache_dir: str = "cache", variants: str = ",".join(VARIANTS), runs_dir: str = "runs/ablations",
           datalists: str = DATALISTS, device: str | None = None, batch_size: int = 16,
           max_cases: int | None = None, note: str | None = None, out: str = str(RESULTS / "ablations")):
    """Evaluate every trained variant (the accuracy benchmark's metrics) and write the table
    (``note``: where and how the variants were trained, printed under the command)."""
    from accuracy import evaluate

    from automedsam.pretrained import network_from_bundle

    t0 = time.time()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    models, info = {}, {}
    for name in _names(variants):
        run_dir = Path(runs_dir) / name
        if not run_dir.is_dir():
            print(f"ablations: {name} not trained, left out", flush=True)
            continue
        net_over = {k.split("#", 1)[1]: v for k, v in VARIANTS[name][1].items() if k.startswith("network_def#")}
        net = network_from_bundle(**net_over)
        state, epoch, finished = _weights(run_dir)
        net.load_trainable(state)
        models[name] = net
        wall = run_dir / "wall_s.txt"
        info[name] = {"change": VARIANTS[name][0], "overrides": VARIANTS[name][1], "epochs": epoch,
                      "finished": finished, "train_wall_s": float(wall.read_text()) if wall.is_file() else None}
        args = run_dir / "args.json"
        if args.is_file():
            info[name]["train_args"] = json.loads(args.read_text())
    if not models:
        raise SystemExit("ablations: no trained variant to report")
    datalists = datalists if isinstance(datalists, str) else ",".join(datalists)
    res = evaluate(models, cache_dir, datalists=datalists, max_cases=max_cases, batch_size=batch_size, device=device)
    res["variants"] = info
    res["device"] = torch.cuda.get_device_name(0) if str(device).startswith("cuda") else "cpu"
    res["command"] = " ".join(["python", "benchmarks/ablations.py"] + sys.argv[1:])
    res["seconds"] = round(time.time() - t0, 1)
    res["note"] = note
    _write(res, Path(out))


def rewrite(results: str = str(RESULTS / "ablations.json")):
    """Write the .md (and the paired intervals into the .json) again from a results file, without
    retraining or re-evaluating."""
    res = json.loads(Path(results).read_text())
    res.pop("intervals_of", None)
    _write(res, Path(results).with_suffix(""))


def run_all(cache_dir: str = "cache", variants: str = ",".join(VARIANTS), runs_dir: str = "runs/ablations",
            epochs: int = 6, batch_size: int = 8, learning_rate: float = 2e-4, num_workers: int = 0,
            parallel: int = 1, cache_workers: int = 1, max_cases: int | None = None, device: str | None = None,
            out: str = str(RESULTS / "ablations")):
    """cache, train and report in turn (the command ``all``)."""
    cache(cache_dir, workers=cache_workers, max_cases=max_cases)
    train(cache_dir, variants, runs_dir, epochs, batch_size, learning_rate, num_workers, parallel, max_cases)
    report(cache_dir, variants, runs_dir, device=device, max_cases=max_cases, out=out)


MIN_CASES = 40  # rows with fewer cases (the one CT volume, one BraTS volume) are shown, never averaged or compared


def paired_intervals(res: dict, reference: str = "full", min_cases: int = MIN_CASES, n_boot: int = 10000,
                     seed: int = 0) -> dict:
    """Per variant and row with at least ``min_cases`` paired cases: the mean of (variant - reference)
    Dice over the cases both were judged on, with a paired bootstrap 95% interval (cases resampled
    together, ``n_boot`` draws, fixed seed), and whether the interval excludes 0."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ref = res["methods"].get(reference, {})
    out: dict = {}
    for name, rows in res["methods"].items():
        if name in (reference, "box_oracle") or name not in res.get("variants", {}):
            continue
        for row, r in rows.items():
            a, b = r.get("dice_per_case") or {}, ref.get(row, {}).get("dice_per_case") or {}
            common = sorted(set(a) & set(b))
            if len(common) < min_cases:
                continue
            d = np.array([a[c] - b[c] for c in common], dtype=float)
            boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
            lo, hi = np.percentile(boots, [2.5, 97.5])
            out.setdefault(name, {})[row] = {"n": len(common), "mean_diff": round(float(d.mean()), 4),
                                             "ci95": [round(float(lo), 4), round(float(hi), 4)],
                                             "excludes_zero": bool(lo > 0 or hi < 0)}
    return out


def _write(res: dict, out: Path) -> None:
    from accuracy import _weighted

    from automedsam.classes import DATASET_MODALITY, MODALITY_CLASSES

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    names = [m for m in res["methods"] if m in res["variants"]]
    rows = sorted({k for m in names for k, r in res["methods"][m].items() if "dice" in r})
    lines = ["# Ablations", "", f"Command: `{res['command']}`  ", f"Evaluated on: {res['device']}; "
             f"wall time of the evaluation {res['seconds']} s; validation samples: {res['counts']}", ""]
    if res.get("note"):
        lines += [res["note"], ""]
    lines += ["Each variant trained from scratch with `bundles/automedsam/configs/train.yaml` and one change; the "
              "same data, epochs, batch size, learning rate and seed for all; final weights (no selection on the "
              "validation split).", "", "| variant | change | epochs | training wall s |", "|---|---|---|---|"]
    for m in names:
        v = res["variants"][m]
        lines.append(f"| {m} | {v['change']} | {v['epochs']}{'' if v['finished'] else ' (unfinished)'} | "
                     f"{v['train_wall_s'] if v['train_wall_s'] is not None else '-'} |")
    lines += ["", "Dice where the class is present (per image for 2D sets, per volume for 3D sets); the box-prompted "
              "teacher for reference.", "", "| dataset/class | " + " | ".join(names) + " | box_oracle |",
              "|---|" + "---|" * (len(names) + 1)]
    for k in rows:
        cells = [f"{res['methods'][m][k]['dice']:.3f}" if "dice" in res["methods"][m].get(k, {}) else "-"
                 for m in names + ["box_oracle"]]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    big = [k for k in rows if min(res["methods"][m].get(k, {}).get("n", 0) for m in names) >= MIN_CASES]
    means = []
    for m in names:
        d = [res["methods"][m][k]["dice"] for k in big if "dice" in res["methods"][m].get(k, {})]
        means.append(f"{sum(d) / len(d):.3f}" if d else "-")
    lines.append(f"| **mean over rows with n >= {MIN_CASES}** ({', '.join(big) or 'none'}) | " + " | ".join(means)
                 + " | |")
    lines += ["", f"Rows with n < {MIN_CASES} (one volume each: the CT is also the training volume) are shown for "
              "completeness and enter no mean and no comparison."]
    if "reference" not in res.get("intervals_of", {}) and "full" in names:
        res["intervals"] = paired_intervals(res)
        res["intervals_of"] = {"reference": "full", "min_cases": MIN_CASES, "n_boot": 10000, "seed": 0}
        out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    if res.get("intervals"):
        seeds = res.get("seeds", 1)
        lines += ["", f"Variant minus full, paired over the same cases, bootstrap 95% interval "
                  f"({res['intervals_of']['n_boot']} draws, seed {res['intervals_of']['seed']}); {seeds} training "
                  f"seed{'s' if seeds != 1 else ''} per variant. **bold**: the interval excludes 0.", "",
                  "| variant | " + " | ".join(f"{k} (n)" for k in big) + " |", "|---|" + "---|" * len(big)]
        for m, by_row in res["intervals"].items():
            cells = []
            for k in big:
                iv = by_row.get(k)
                if iv is None:
                    cells.append("-")
                    continue
                text = f"{iv['mean_diff']:+.3f} [{iv['ci95'][0]:+.3f}, {iv['ci95'][1]:+.3f}] ({iv['n']})"
                cells.append(f"**{text}**" if iv["excludes_zero"] else text)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Empty answers where the class is absent, all classes together: in-modality | cross-domain.", "",
              "| variant | in-modality | cross-domain |", "|---|---|---|"]
    for m in names:
        inside, cross = [], []
        for k, r in res["methods"][m].items():
            if "empty_when_absent" not in r:
                continue
            ds, cname = k.split("/")
            same = cname in MODALITY_CLASSES[DATASET_MODALITY[ds]]
            (inside if same else cross).append((r["empty_when_absent"], r["n_absent"]))
        lines.append(f"| {m} | {_weighted(inside)} | {_weighted(cross)} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    fire.Fire({"cache": cache, "train": train, "report": report, "all": run_all, "rewrite": rewrite})
