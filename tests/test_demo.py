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


def test_real_demo_cases_are_one_per_domain_with_small_slabs_and_a_labelled_failure(data_root, tmp_path):
    """The real-data demo: polyp, chest X-ray, a BraTS slab and a CT slab (SLAB slices each,
    centred where the reference has the most classes, same voxel grid as the source), then the
    README's failure polyp, labelled as a failure; no training case but the (only) labelled CT."""
    from automedsam.classes import label_to_classes
    from automedsam.data.datalist import load_datalist
    from automedsam.demo import SLAB, real_samples

    cases = real_samples(data_root, tmp_path)
    assert [c["name"] for c in cases] == ["polyp", "lungs", "brain_tumor", "abdomen", "polyp_failure"]
    assert "FAILURE" in cases[-1]["what"] and not any("FAILURE" in c["what"] for c in cases[:-1])
    for c in cases[2:4]:
        img, lab = nib.load(c["image"]), nib.load(c["label"])
        assert img.shape[2] == SLAB and lab.shape == img.shape
        masks = label_to_classes(np.asarray(lab.dataobj), c["dataset"])
        assert all(m.any() for m in masks.values() if c["dataset"] == "brats")
        assert sum(m.any() for m in masks.values()) >= (1 if c["dataset"] == "brats" else 4)
        src = nib.load(load_datalist(c["dataset"], base_dir=data_root, split="validation")[0]["image"])
        np.testing.assert_allclose(img.affine[:3, :3], src.affine[:3, :3])  # same grid, shifted along z
    training = {e["image"] for n in ("kvasir", "shenzhen", "brats") for e in
                load_datalist(n, base_dir=data_root, split="training")}
    assert not training & {str(c["image"]) for c in cases if c["dataset"] != "totalseg"}
