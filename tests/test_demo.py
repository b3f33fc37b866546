"""The README's main job: `automedsam demo` falls back to a generated sample, and says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from automedsam.classes import CLASSES, MODALITY_CLASSES, CLASS_IDS


def test_demo_without_real_data_segments_a_generated_sample_and_says_so(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "automedsam.cli", "demo", "--output", str(out), "--data_dir",
                           str(tmp_path / "no-data-here"), "--quiet"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SYNTHETIC" in proc.stderr and "no real data" in proc.stderr
    ct = out / "synthetic_inputs" / "synthetic_ct.nii.gz"
    seg = nib.load(out / "synthetic_ct_seg.nii.gz")
    src = nib.load(ct)
    assert seg.shape == src.shape and np.allclose(seg.affine, src.affine)
    ids = set(np.unique(np.asarray(seg.dataobj)).tolist()) - {0}
    assert ids <= {CLASS_IDS[n] for n in MODALITY_CLASSES["ct"]}
    report = json.loads((out / "synthetic_ct_report.json").read_text())
    assert report["modality"] == "ct"
    png = np.asarray(Image.open(out / "synthetic_endoscopy_seg.png"))
    assert png.shape == (256, 256) and set(np.unique(png).tolist()) <= {0, CLASS_IDS["polyp"]}
    for stem in ("synthetic_ct", "synthetic_endoscopy"):
        assert (out / f"{stem}_overlay.png").is_file()
    assert set(CLASSES[i] for i in ids) <= set(MODALITY_CLASSES["ct"])
