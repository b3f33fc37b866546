"""benchmarks/unet_baseline.py end to end on a few real cases with a tiny training budget.

2 Kvasir + 2 Shenzhen images and the CT volume (its cached slices), a 6 s budget, then
``--eval_only`` from the checkpoint it left. Needs the real data and the embedding cache
($AUTOMEDSAM_CACHE, default ../cache beside the repository) holding those cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "unet_baseline.py"


def _cache_dir() -> Path:
    return Path(os.environ.get("AUTOMEDSAM_CACHE", REPO.parent / "cache"))


def _run(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=150,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_unet_baseline_trains_evaluates_and_resumes(data_root, tmp_path):
    cache = _cache_dir()
    if not (cache / "slices").is_dir():
        pytest.skip(f"embedding cache not found at {cache} (set AUTOMEDSAM_CACHE)")
    ckpt, out = tmp_path / "ckpt", tmp_path / "res"
    common = ["--cache_dir", str(cache), "--base_dir", str(data_root), "--max_cases", "2", "--batch_size", "4",
              "--ckpt_dir", str(ckpt), "--threads", "2"]
    _run(common + ["--datalists", "kvasir,shenzhen,totalseg", "--budget_min", "0.1", "--out", str(out)])

    assert (ckpt / "last.pt").is_file()
    res = json.loads(out.with_suffix(".json").read_text())
    md = out.with_suffix(".md").read_text()
    assert res["epochs"] > 0 and res["iterations"] >= 1
    assert 6.0 <= res["train_seconds"] < 6.0 + 60.0  # stops at the first iteration past the budget
    assert res["train_slices"]["kvasir"] == 2 and res["train_slices"]["shenzhen"] == 2
    assert res["train_slices"]["totalseg"] >= 1
    assert res["val"]["gt_mismatch_vs_cache"] == 0  # the U-Net's targets are the cache's masks
    m = res["methods"]["unet_baseline"]
    assert m["kvasir/polyp"]["n"] == 2 and m["shenzhen/lungs"]["n"] == 2
    for k in ("kvasir/polyp", "shenzhen/lungs", "totalseg/liver", "totalseg/spleen", "totalseg/pancreas"):
        assert 0.0 <= m[k]["dice"] <= 1.0 and 0.0 <= m[k]["nsd"] <= 1.0, (k, m[k])
    assert m["totalseg/liver"]["n"] == 1  # per volume
    for r in m.values():
        if "empty_when_absent" in r:
            assert 0.0 <= r["empty_when_absent"] <= 1.0 and r["n_absent"] >= 1
    assert "automedsam" in res["reference"]["methods"]
    assert "| kvasir/polyp |" in md and "Subset run" in md and "epochs done" in md

    # evaluation from the checkpoint alone gives the same figures
    _run(common + ["--datalists", "kvasir", "--eval_only", "--out", str(tmp_path / "again")])
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["eval_only"] and again["epochs"] == res["epochs"]
    assert again["methods"]["unet_baseline"]["kvasir/polyp"] == m["kvasir/polyp"]
