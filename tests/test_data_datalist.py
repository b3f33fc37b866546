"""The fixed datalists and their loader."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from automedsam.classes import DATASET_LABELS
from automedsam.data.datalist import available_datalists, default_data_dir, load_datalist, read_datalist

REPO = Path(__file__).resolve().parents[1]


def test_committed_datalists_are_what_the_script_makes(data_root):
    spec = importlib.util.spec_from_file_location("make_datalists", REPO / "data_lists" / "make_datalists.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    made = mod.make(data_root, seed=0)
    assert sorted(made) == available_datalists() == ["brats", "kvasir", "shenzhen", "totalseg"]
    for name, dl in made.items():
        assert json.loads((REPO / "data_lists" / f"{name}.json").read_text()) == dl
        assert dl["dataset"] in DATASET_LABELS
        train = {e["image"] for e in dl["training"]}
        val = {e["image"] for e in dl["validation"]}
        # a split may reuse training cases for validation only when it says so (the lone CT volume)
        assert bool(train & val) == dl.get("validation_overlaps_training", False), name
        assert all(not Path(e["image"]).is_absolute() for e in dl["training"] + dl["validation"])


def test_split_sizes_and_absolute_paths(data_root):
    kv = load_datalist("kvasir", base_dir=data_root)
    assert len(kv) == 640 and len(load_datalist("kvasir", base_dir=data_root, split="validation")) == 160
    assert all(Path(e["image"]).is_file() and Path(e["label"]).is_file() for e in kv[:5])
    assert kv[0]["dataset"] == "kvasir" and kv[0]["modality"] == "endoscopy" and kv[0]["split"] == "training"
    assert len(load_datalist("shenzhen", base_dir=data_root, split="training,validation")) == 450
    br = load_datalist("brats", base_dir=data_root, split="all")
    assert [e["split"] for e in br] == ["training"] * 3 + ["validation"]
    assert all(e["image"].endswith("Flair_subtrMeanDivStd.nii.gz") and e["label"].endswith("OTMultiClass.nii.gz")
               for e in br)
    ts = load_datalist("totalseg", base_dir=data_root, split="validation")
    assert len(ts) == 1 and ts[0]["modality"] == "ct"
    # the only labelled CT is both the CT training case and the CT validation case (stated in the note)
    assert [e["image"] for e in load_datalist("totalseg", base_dir=data_root)] == [ts[0]["image"]]
    assert "note" in read_datalist("totalseg")


def test_base_dir_default_and_errors(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("AUTOMEDSAM_DATA", str(data_root))
    assert default_data_dir() == data_root
    assert load_datalist("brats")[0]["image"].startswith(str(data_root))
    with pytest.raises(FileNotFoundError, match="no datalist named 'nope'"):
        load_datalist("nope")
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        load_datalist("brats", base_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown split"):
        load_datalist("brats", split="train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="files missing"):
        load_datalist("brats", base_dir=tmp_path / "empty")
