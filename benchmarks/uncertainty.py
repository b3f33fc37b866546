"""Uncertainty benchmark (issue 17 item 2): fit the bundle's calibration on the validation split,
judge it on the test split, both under robustness.py's perturbations.

Inputs are robustness.py runs with ``--pixels`` (per-sample records plus a uniform random sample
of pixels per image and class):

    python benchmarks/robustness.py --split validation --datalists kvasir,shenzhen --max_cases 6 \\
        --perturbations zoom_out,noise --strengths zoom_out=2.0,0.08 \\
        --out benchmarks/results/uncertainty_fit_validation --pixels benchmarks/results/uncertainty_fit_validation_pixels.npz
    (the same with --split test --out .../uncertainty_test_records --pixels .../uncertainty_test_pixels.npz)
    python benchmarks/uncertainty.py --fit benchmarks/results/uncertainty_fit_validation \\
        --test benchmarks/results/uncertainty_test_records [--write_config]

``--fit``: per-class temperatures (NLL on the sampled pixels) and the logistic case model of
P(Dice < 0.5) (``automedsam.uncertainty``); ``--write_config`` writes them to the bundle's
``configs/uncertainty.json``. ``--test``: per dataset, the AUROC of the case score for Dice < 0.5,
the AUROC of the per-pixel uncertainty for error pixels (p > 0.5 differs from the truth), and
the ECE of the foreground probabilities before and after calibration. Writes
benchmarks/results/uncertainty.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import RESULTS  # noqa: E402

from automedsam import uncertainty as U  # noqa: E402

TARGET_AUROC, TARGET_ECE = 0.90, 0.05
L2 = 1.0  # ridge on the case model's coefficients (few validation failures)


def load_run(stem: str) -> tuple[dict, dict]:
    base = Path(stem)
    js = base.with_suffix(".json")
    px = base.parent / (base.name + "_pixels.npz") if not str(base).endswith("_records") else \
        base.parent / (base.name.replace("_records", "_pixels") + ".npz")
    if not js.is_file():
        raise SystemExit(f"uncertainty.py: {js}: not found (run robustness.py with --pixels first)")
    if not px.is_file():
        raise SystemExit(f"uncertainty.py: {px}: not found (run robustness.py with --pixels first)")
    run = json.loads(js.read_text())
    pix = dict(np.load(px))
    return run, pix


def features(records: list[dict]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Case-model inputs and labels (Dice < 0.5) of the present classes."""
    rows, ys, kept = [], [], []
    for r in records:
        if not r["present"] or "image_pixels" not in r:
            continue
        empty = r["pred_pixels"] == 0
        rows.append(U.case_features(r["presence"], None if empty else r["iou"], r["uncertain_pixels"],
                                    r["pred_pixels"], r["image_pixels"]))
        ys.append(r["dice"] < 0.5)
        kept.append(r)
    return np.array(rows), np.array(ys, dtype=bool), kept


def fit(run: dict, pix: dict) -> dict:
    records = run["records"]
    temps = {}
    for cls in sorted({r["class"] for r in records}):
        m = np.array([records[i]["class"] == cls for i in pix["record"]])
        temps[cls] = round(U.fit_temperature(pix["probability"][m].astype(np.float64), pix["truth"][m]), 4)
    x, y, kept = features(records)
    coef, intercept = U.fit_logistic(x, y, l2=L2)
    per_class = {}
    for cls in sorted({r["class"] for r in kept}):
        m = np.array([r["class"] == cls for r in kept])
        c, b = U.fit_logistic(x[m], y[m], l2=L2)
        per_class[cls] = {"coef": [round(float(v), 5) for v in c], "intercept": round(b, 5), "cases": int(m.sum()),
                          "failures": int(y[m].sum())}
    return {"about": "Uncertainty calibration (automedsam.uncertainty), fitted on the validation split by "
                     "benchmarks/uncertainty.py; see benchmarks/results/uncertainty.md",
            "fitted_on": {"command": run["command"], "split": run["split"], "cases": len(y),
                          "failures": int(y.sum()), "model_sha256": run["model"]["weights_sha256"]},
            "default_temperature": 1.0, "temperature": temps, "band": [0.2, 0.8],
            "case_model": {"features": list(U.FEATURES), "coef": [round(float(c), 5) for c in coef],
                           "intercept": round(intercept, 5), "per_class": per_class},
            "flag_threshold": 0.5}


def evaluate(run: dict, pix: dict, cal: U.Calibration) -> dict:
    records = run["records"]
    out = {}
    x, y, kept = features(records)
    scores = np.array([U.case_score(f, cal, r["class"]) for f, r in zip(x, kept)]) if len(x) else np.array([])
    by_ds = defaultdict(list)
    for i, r in enumerate(kept):
        by_ds[r["dataset"]].append(i)
    ds_of = np.array([records[i]["dataset"] for i in pix["record"]])
    cls_of = np.array([records[i]["class"] for i in pix["record"]])
    for ds in sorted(set(ds_of) | set(by_ds)):
        idx = np.array(by_ds.get(ds, []), dtype=int)
        m = ds_of == ds
        p = pix["probability"][m].astype(np.float64)
        t = pix["truth"][m]
        pc = np.empty_like(p)
        for cls in set(cls_of[m]):
            c = cls_of[m] == cls
            pc[c] = U.calibrate(p[c], cal.temperature_of(cls))
        err = (p > 0.5) != t
        # the image's case score on its pixels (what segment --uncertainty writes) and the pixel
        # record's case features
        pos = {id(r): i for i, r in enumerate(kept)}
        rec_score = np.array([scores[pos[id(records[k])]] if id(records[k]) in pos else 0.0
                              for k in pix["record"][m]])
        flagged = scores[idx] >= cal.flag_threshold
        out[ds] = {"cases": int(len(idx)), "failures": int(y[idx].sum()),
                   "case_auroc": U.auroc(scores[idx], y[idx]),
                   "flagged": int(flagged.sum()), "flagged_failures": int((flagged & y[idx]).sum()),
                   "pixels": int(m.sum()), "error_pixels": int(err.sum()),
                   "pixel_auroc_entropy": U.auroc(U.pixel_uncertainty(pc), err),
                   "pixel_auroc": U.auroc(U.pixel_uncertainty(pc, None, rec_score), err),
                   "ece_raw": U.ece(p, t), "ece_calibrated": U.ece(pc, t)}
    return out


def render(res: dict) -> str:
    def f(v):
        return "n/a" if v is None or v != v else f"{v:.3f}"

    lines = ["# Uncertainty: per-case score, per-pixel uncertainty, calibration", "",
             f"Command: `{res['command']}`  ", f"Fit (validation): `{res['fit_command']}`  ",
             f"Test records: `{res['test_command']}`", "",
             "Case score: the bundle's logistic model of P(Dice < 0.5) on presence logit, predicted IoU, share of "
             "pixels with raw probability in (0.2, 0.8) relative to the mask, empty mask, log10 area share; one model per class; AUROC for Dice < 0.5 over "
             "present classes (every image is scored clean and under each perturbation). Pixel AUROC: "
             "the entropy of the calibrated probability against error pixels (p > 0.5 differs from the truth), "
             "on a uniform random sample of 20000 pixels per image and class; no noise draws. ECE: 15 equal-width "
             "bins, same pixels.", "",
             f"Targets: AUROC >= {TARGET_AUROC} (both), ECE <= {TARGET_ECE}.", "",
             "| dataset | cases (fail) | case AUROC | flagged (of them failures) | pixels (errors) | pixel AUROC | "
             "pixel AUROC, entropy only | ECE raw | ECE calibrated |", "|---|---|---|---|---|---|---|---|---|"]
    for ds, r in res["test"].items():
        lines.append(f"| {ds} | {r['cases']} ({r['failures']}) | {f(r['case_auroc'])} | {r['flagged']} "
                     f"({r['flagged_failures']}) | {r['pixels']} ({r['error_pixels']}) | {f(r['pixel_auroc'])} | "
                     f"{f(r['pixel_auroc_entropy'])} | "
                     f"{f(r['ece_raw'])} | {f(r['ece_calibrated'])} |")
    lines += ["", "Calibration fitted: " + json.dumps({k: res["calibration"][k] for k in
                                                      ("temperature", "case_model", "fitted_on")}), ""]
    lines += [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit", required=True, help="robustness.py --out stem of the validation run")
    ap.add_argument("--test", required=True, help="robustness.py --out stem of the test run")
    ap.add_argument("--write_config", action="store_true", help="write the fit to the bundle's uncertainty.json")
    ap.add_argument("--out", default=str(RESULTS / "uncertainty"))
    ap.add_argument("--note", action="append", default=[])
    args = ap.parse_args(argv)
    vrun, vpix = load_run(args.fit)
    trun, tpix = load_run(args.test)
    if vrun["split"] != "validation" or trun["split"] != "test":
        print(f"uncertainty.py: --fit must be a validation run and --test a test run "
              f"(got {vrun['split']}, {trun['split']})", file=sys.stderr)
        return 2
    cfg = fit(vrun, vpix)
    cal = U.parse_config(cfg, "fit")
    res = {"command": " ".join(["python", "benchmarks/uncertainty.py"] + argv), "fit_command": vrun["command"],
           "test_command": trun["command"], "calibration": cfg, "validation": evaluate(vrun, vpix, cal),
           "test": evaluate(trun, tpix, cal), "notes": list(args.note)}
    from automedsam.atomic import atomic_write

    out = Path(args.out)
    atomic_write(out.with_suffix(".json"), lambda p: Path(p).write_text(json.dumps(res, indent=1)))
    atomic_write(out.with_suffix(".md"), lambda p: Path(p).write_text(render(res)))
    if args.write_config:
        target = U.config_path()
        atomic_write(target, lambda p: Path(p).write_text(json.dumps(cfg, indent=2) + "\n"))
        print(f"wrote {target}")
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
