"""benchmarks/robustness.py: perturbations are deterministic at a fixed seed and leave their
inputs alone, geometric ones carry the labels with the image, the failure split names the cause,
options are refused before any work, and a 1-image/1-perturbation run writes its results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import robustness as R  # noqa: E402


def _square_case(modality: str):
    """An image with a bright off-centre square, and that square as the mask."""
    rng = np.random.default_rng(0)
    if modality == "ct":
        img = np.full((2, 40, 50, 1), -1000.0, np.float32)
        img[:, 4:36, 4:46] = 40.0 + rng.normal(0, 5, (2, 32, 42, 1))
        hi, lo = 300.0, 40.0
    elif modality == "mr":
        img = np.full((3, 48, 48, 1), -1.5, np.float32)
        img[:, 6:42, 6:42] = rng.normal(0, 0.3, (3, 36, 36, 1))
        hi, lo = 3.0, 0.0
    else:
        c = 3 if modality == "endoscopy" else 1
        img = np.round(rng.uniform(20, 60, (1, 64, 64, c))).astype(np.float32)
        hi, lo = 230.0, 40.0
    n, h, w = img.shape[:3]
    masks = np.zeros((1, n, h, w), bool)
    masks[:, :, h // 5:h // 5 + h // 4, w // 5:w // 5 + w // 4] = True
    img[masks[0]] = hi
    return img, masks, (hi + lo) / 2


CASES = [(n, s, m) for n, p in R.PERTURBATIONS.items() for s in p.strengths for m in p.modalities]


@pytest.mark.parametrize("name,strength,modality", CASES)
def test_deterministic_and_inputs_untouched(name, strength, modality):
    img, masks, _ = _square_case(modality)
    before = img.copy(), masks.copy()
    spacing = (3.0, 3.0) if modality == "ct" else (1.0, 1.0)
    a = R.apply(name, strength, img, masks, 7, modality, spacing)
    b = R.apply(name, strength, img, masks, 7, modality, spacing)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.array_equal(img, before[0]) and np.array_equal(masks, before[1])
    assert a[0].dtype == np.float32 and a[0].ndim == 4 and a[1].shape[1:] == a[0].shape[:3]
    assert a[0].shape != img.shape or not np.array_equal(a[0], img)  # it changed the image


def test_noise_is_fixed_by_the_seed_and_has_its_stated_strength():
    img, masks, _ = _square_case("ct")
    a, _ = R.apply("noise", 0.03, img, masks, 1, "ct")
    b, _ = R.apply("noise", 0.03, img, masks, 2, "ct")
    assert not np.array_equal(a, b)
    lo, hi = np.percentile(img, [0.5, 99.5])
    assert np.std(a - img) == pytest.approx(0.03 * (hi - lo), rel=0.05)  # fixed, not a sampled std
    assert R.perturbation_seed(0, "x", "noise", 0.03) == R.perturbation_seed(0, "x", "noise", 0.03)
    assert R.perturbation_seed(0, "x", "noise", 0.03) != R.perturbation_seed(0, "y", "noise", 0.03)


@pytest.mark.parametrize("name,strength,modality", [("rotate", 30, "endoscopy"), ("rotate", 15, "ct"),
                                                    ("zoom_out", 2.0, "xray"), ("zoom_out", 1.5, "mr"),
                                                    ("ct_fov", 0.75, "ct")])
def test_geometric_perturbations_move_the_label_with_the_image(name, strength, modality):
    img, masks, mid = _square_case(modality)
    out, m = R.apply(name, strength, img, masks, 0, modality, (3.0, 3.0))
    bright = out[..., 0] > mid
    inter = np.logical_and(bright, m[0]).sum()
    assert inter / np.logical_or(bright, m[0]).sum() > 0.85
    if m.shape == masks.shape:
        assert (m != masks).mean() > 0.01  # the mask did move
    else:  # resampled: 3 mm -> 0.75 mm pixels, so the square is 4x larger per side
        assert m.sum() == pytest.approx(masks.sum() * 16, rel=0.1)


def test_failure_split():
    assert R.failure_kind(0.9, 0.1) is None
    assert R.failure_kind(0.0, 0.2) == "presence_absent"
    assert R.failure_kind(0.3, 0.9) == "mask_wrong"
    recs = [
        {"dataset": "d", "class": "c", "present": True, "dice": 0.0, "presence": 0.1, "pred_pixels": 0,
         "failure": R.failure_kind(0.0, 0.1)},
        {"dataset": "d", "class": "c", "present": True, "dice": 0.2, "presence": 0.8, "pred_pixels": 50,
         "failure": R.failure_kind(0.2, 0.8)},
        {"dataset": "d", "class": "c", "present": True, "dice": 0.0, "presence": 0.7, "pred_pixels": 0,
         "failure": R.failure_kind(0.0, 0.7)},
        {"dataset": "d", "class": "c", "present": True, "dice": 0.9, "presence": 0.9, "pred_pixels": 80,
         "failure": None},
        {"dataset": "d", "class": "c", "present": False, "presence": 0.9, "pred_pixels": 9},
    ]
    assert R.failures(recs)["d/c"] == {"failures": 3, "presence_absent": 1, "mask_wrong": 2, "mask_wrong_empty": 1}


def test_options_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "r"
    for argv in (["--perturbations", "rotate,blur"], ["--perturbations", "rotate", "--strengths", "45"],
                 ["--split", "tset"], ["--max_cases", "0"], ["--datalists", "nosuch"],
                 ["--weights", str(tmp_path / "missing.pt")]):
        assert R.main(argv + ["--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("robustness.py: ") and "\n" not in err
    assert not list(tmp_path.iterdir())
    assert R.parse_plan("rotate,jpeg", "15,jpeg=50") == [("clean", None), ("rotate", 15), ("jpeg", 50)]


def test_one_image_one_perturbation_end_to_end(data_root, tmp_path):
    """The benchmark's prediction is the CLI's (Segmenter.segment_loaded), and a 1-image run
    writes per-class rows, the failure split and per-case records."""
    from automedsam.classes import CLASS_IDS
    from automedsam.data.datalist import load_datalist
    from automedsam.data.io import load_image
    from automedsam.segment import Segmenter

    entry = load_datalist("kvasir", split="test")[0]
    loaded = load_image(entry["image"])
    seg = Segmenter()
    cli = seg.segment_loaded(loaded, classes="polyp", modality="endoscopy")
    maps = R.predict(seg, loaded.slices, "endoscopy", [CLASS_IDS["polyp"]], [0])
    np.testing.assert_allclose(maps.probabilities.numpy(), cli.probabilities, atol=1e-5)
    np.testing.assert_allclose(maps.presence.numpy(), cli.presence, atol=1e-5)

    out = tmp_path / "rob"
    assert R.main(["--datalists", "kvasir", "--max_cases", "1", "--perturbations", "rotate", "--strengths", "15",
                   "--out", str(out)], segmenter=seg) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["complete"] and set(res["results"]) == {"clean", "rotate@15"}
    row = res["results"]["clean"]["kvasir/polyp"]
    assert row["n"] == 1 and row["failures"] == row["presence_absent"] + row["mask_wrong"]
    clean = [r for r in res["records"] if r["perturbation"] == "clean"]
    assert len(clean) == 1 and clean[0]["case"] == entry["case"]
    assert clean[0]["presence"] == pytest.approx(float(cli.presence[0, 0]), abs=1e-3)
    assert row["dice"] == pytest.approx(clean[0]["dice"], abs=1e-3)
    assert "rotate@15" in out.with_suffix(".md").read_text()
