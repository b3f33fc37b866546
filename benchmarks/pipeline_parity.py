"""Pipeline parity: the label maps of this checkout against those of an older commit, voxel by voxel.

Issue 15 item 1 replaced the two ways a file reached the model (hand-written layout code for
``automedsam segment``, MONAI transforms for the bundle) with one chain of MONAI transforms
(:mod:`automedsam.pipeline`). This script checks that nothing moved: every input kind in
../shared/data, plus a DICOM series, a single DICOM file and a MedSAM npz made from the CT, is
segmented by ``automedsam.segment.segment`` (the CLI's Python API, writing files) with this
checkout and with a baseline checkout, and the written label maps are compared (values, shape,
affine).

The encoder costs ~1-3 s per slice on a loaded CPU, so the volumes are slabs of ``--slices``
slices (8 by default) cut from the real files::

    git worktree add /tmp/h8/base 69cfec4
    python benchmarks/pipeline_parity.py --baseline /tmp/h8/base [--slices 8]

writes benchmarks/results/pipeline_parity.{md,json}. Both sides run in their own process with
``PYTHONPATH=<checkout>/custom`` (so the baseline needs no install) and the same weights file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("AUTOMEDSAM_DATA", REPO.parent / "shared" / "data"))
CT = DATA / "abdomen-ct" / "totalseg-example" / "ct.nii.gz"
FLAIR = DATA / "brain-mri" / "brats" / "brats_2013_pat0003_1" / "Flair_subtrMeanDivStd.nii.gz"
KVASIR = DATA / "polyp" / "kvasir-seg" / "images" / "cju0qkwl35piu0993l0dewei2.jpg"
SHENZHEN = DATA / "chest-xray" / "shenzhen" / "images" / "CHNCXR_0001_0.png"


def make_inputs(folder: Path, slices: int) -> dict[str, Path]:
    """The inputs, from the real files: NIfTI slabs (the CT's and FLAIR's middle ``slices``), the
    CT slab as a DICOM series and as a MedSAM npz, one CT slice as a single DICOM file, the JPG
    and the PNG as they are."""
    import nibabel as nib

    sys.path.insert(0, str(REPO / "tests"))
    from test_segment import write_ct_dicom_series  # the tests' pydicom CT writer

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name, src in (("ct_slab", CT), ("flair_slab", FLAIR)):
        img = nib.load(str(src))
        z0 = max(0, img.shape[2] // 2 - slices // 2)
        slab = img.slicer[:, :, z0:z0 + slices]
        p = folder / f"{name}.nii.gz"
        nib.save(slab, str(p))
        out[name] = p
    ct = nib.load(str(out["ct_slab"]))
    vol = np.asarray(ct.dataobj).astype(np.float32)
    write_ct_dicom_series(vol, ct.affine, folder / "ct_series")
    out["dicom_series"] = folder / "ct_series"
    one = folder / "ct_single"
    write_ct_dicom_series(vol[:, :, slices // 2: slices // 2 + 1], ct.affine, one)
    single = folder / "ct_slice.dcm"
    next(one.iterdir()).rename(single)
    one.rmdir()
    out["dicom_file"] = single
    zhw = np.ascontiguousarray(np.transpose(vol, (2, 1, 0)))  # MedSAM npz: (Z, H, W)
    spacing = np.linalg.norm(ct.affine[:3, :3], axis=0)
    p = folder / "ct_slab.npz"
    np.savez_compressed(p, imgs=zhw, spacing=spacing)
    out["npz"] = p
    out["kvasir_jpg"], out["shenzhen_png"] = KVASIR, SHENZHEN
    return out


def run_side(inputs: dict[str, str], out_dir: str, weights: str) -> dict:
    """Segment each input with the ``automedsam`` on ``sys.path``; {name: {"seg": path, "s": seconds}}."""
    import automedsam.segment as S

    res = {}
    for name, path in inputs.items():
        t = time.perf_counter()
        r = S.segment([path], Path(out_dir) / name, weights=weights, overwrite=True)[0]
        res[name] = {"seg": r["outputs"].get("seg"), "ok": r["ok"], "error": r["error"],
                     "s": round(time.perf_counter() - t, 1), "module": S.__file__}
    return res


def read_label(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    if path.endswith(".png"):
        from PIL import Image

        return np.asarray(Image.open(path)), None
    import nibabel as nib

    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def compare(base: dict, new: dict) -> list[dict]:
    rows = []
    for name in base:
        a, aa = read_label(base[name]["seg"])
        b, ba = read_label(new[name]["seg"])
        same_shape = a.shape == b.shape
        rows.append({
            "input": name, "shape": list(a.shape), "same_shape": same_shape,
            "flipped_voxels": int((a != b).sum()) if same_shape else None,
            "labelled_voxels": int((a > 0).sum()), "classes": sorted(int(v) for v in np.unique(a) if v),
            "same_affine": None if aa is None else bool(np.allclose(aa, ba, atol=1e-5)),
            "baseline_s": base[name]["s"], "new_s": new[name]["s"],
        })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="checkout of the code before the change (git worktree)")
    ap.add_argument("--slices", type=int, default=8, help="slices per volume slab (the encoder is the cost)")
    ap.add_argument("--weights", default=str(REPO / "bundles" / "automedsam" / "models" / "model.pt"))
    ap.add_argument("--work", default=None, help="folder for inputs and outputs (default: a temporary one)")
    ap.add_argument("--note", default="", help="a line for the result: what the baseline is")
    ap.add_argument("--reuse_baseline", action="store_true", help="keep the baseline's results already in --work")
    ap.add_argument("--side", nargs=3, metavar=("INPUTS_JSON", "OUT_DIR", "RESULT_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:  # one side, in its own process
        inputs = json.loads(Path(args.side[0]).read_text())
        Path(args.side[2]).write_text(json.dumps(run_side(inputs, args.side[1], args.weights)))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="pipeline-parity-"))
    inputs = {k: str(v) for k, v in make_inputs(work / "inputs", args.slices).items()}
    (work / "inputs.json").write_text(json.dumps(inputs))
    sides = {}
    for side, root in (("baseline", Path(args.baseline)), ("new", REPO)):
        if side == "baseline" and args.work and (work / "baseline.json").is_file() and args.reuse_baseline:
            sides[side] = json.loads((work / "baseline.json").read_text())
            continue
        env = {**os.environ, "PYTHONPATH": str(root / "custom"), "AUTOMEDSAM_BUNDLE": str(root / "bundles" / "automedsam")}
        subprocess.run([sys.executable, __file__, "--baseline", str(args.baseline), "--weights", args.weights,
                        "--side", str(work / "inputs.json"), str(work / side), str(work / f"{side}.json")],
                       check=True, env=env, cwd=str(root))
        sides[side] = json.loads((work / f"{side}.json").read_text())
    for side, res in sides.items():
        bad = {k: v["error"] for k, v in res.items() if not v["ok"]}
        if bad:
            print(f"{side}: failed: {bad}", file=sys.stderr)
            return 1
    rows = compare(sides["baseline"], sides["new"])
    commit = subprocess.run(["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or str(args.baseline)
    result = {"baseline": str(args.baseline), "baseline_commit": commit, "slices_per_volume": args.slices,
              "weights": args.weights, "note": args.note, "modules": {s: next(iter(r.values()))["module"] for s, r in sides.items()},
              "rows": rows, "all_identical": all(r["same_shape"] and r["flipped_voxels"] == 0
                                                 and r["same_affine"] in (None, True) for r in rows)}
    res_dir = REPO / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / "pipeline_parity.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Pipeline parity: label maps of this checkout vs {commit}", "",
             f"`python benchmarks/pipeline_parity.py --baseline <worktree of {commit}> --slices {args.slices}`: "
             f"`automedsam.segment.segment` (default weights, every class of the guessed modality) on each input "
             f"kind, written label maps compared voxel by voxel. Volumes are {args.slices}-slice slabs of the real "
             f"files (the encoder is ~1-3 s per slice on the loaded CPU).", "",
             *([args.note, ""] if args.note else []),
             "| input | label map shape | flipped voxels | labelled voxels | classes | same affine | baseline s | new s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['input']} | {'x'.join(map(str, r['shape']))} | {r['flipped_voxels']} | "
                     f"{r['labelled_voxels']} | {','.join(map(str, r['classes']))} | "
                     f"{'-' if r['same_affine'] is None else r['same_affine']} | {r['baseline_s']} | {r['new_s']} |")
    lines += ["", f"All identical: **{result['all_identical']}**", ""]
    (res_dir / "pipeline_parity.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if result["all_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
