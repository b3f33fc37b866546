"""The fixed datalists and their loader."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from automedsam.classes import DATASET_LABELS
from automedsam.data.datalist import available_datalists, default_data_dir, load_datalist, load_datalists, \
    read_datalist

REPO = Path(__file__).resolve().parents[1]
MODEL_020_COMMIT = "17d6ec2"  # model 0.2.0 was trained on the training lists of this commit
HELD_OUT = ("validation", "test")


def test_committed_datalists_are_what_the_script_makes(data_root):
    spec = importlib.util.spec_from_file_location("make_datalists", REPO / "data_lists" / "make_datalists.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    made = mod.make(data_root, seed=0)
    assert sorted(made) == available_datalists() == ["brats", "hc18", "kvasir", "shenzhen", "totalseg"]
    for name, dl in made.items():
        assert json.loads((REPO / "data_lists" / f"{name}.json").read_text()) == dl
        assert dl["dataset"] in DATASET_LABELS
        train = {e["image"] for e in dl["training"]}
        val = {e["image"] for e in dl["validation"]}
        # a split may reuse training cases for validation only when it says so (the lone CT volume)
        assert bool(train & val) == dl.get("validation_overlaps_training", False), name
        assert all(not Path(e["image"]).is_absolute() for e in dl["training"] + dl["validation"] + dl["test"])
        assert "testing" not in dl  # renamed: "test" (held out, labelled) vs "unlabelled"
        assert all("label" in e for e in dl["test"])
        if not dl["test"]:  # too few cases for a test split: the datalist must say so
            assert "test" in dl["note"], name


def test_three_splits_disjoint_and_training_unchanged():
    """training / validation / test never share an image (the lone CT's declared validation reuse
    aside), and training is exactly what model 0.2.0 was trained on: test was cut from the old
    validation list, so 0.2.0 never saw a test case."""
    for name in available_datalists():
        dl = read_datalist(name)
        split = {s: [e["image"] for e in dl.get(s, [])] for s in ("training",) + HELD_OUT}
        for s, images in split.items():
            assert len(images) == len(set(images)), (name, s)
        train, val, test = (set(split[s]) for s in ("training",) + HELD_OUT)
        assert not train & test and not val & test, name
        if not dl.get("validation_overlaps_training"):
            assert not train & val, name
    sizes = {n: tuple(len(read_datalist(n).get(s, [])) for s in HELD_OUT) for n in available_datalists()}
    assert sizes == {"kvasir": (80, 80), "shenzhen": (45, 45), "brats": (1, 0), "totalseg": (1, 0), "hc18": (50, 100)}

    def at_020(path: str) -> dict | None:
        done = subprocess.run(["git", "show", f"{MODEL_020_COMMIT}:{path}"], cwd=REPO, capture_output=True, text=True)
        return json.loads(done.stdout) if done.returncode == 0 else None

    try:
        have = subprocess.run(["git", "cat-file", "-e", f"{MODEL_020_COMMIT}^{{commit}}"], cwd=REPO,
                              capture_output=True).returncode == 0
    except OSError:
        have = False
    if not have:
        pytest.skip(f"git history with {MODEL_020_COMMIT} not available")
    for name in ("kvasir", "shenzhen", "brats", "totalseg"):  # the datalists 0.2.0 was trained on
        old, dl = at_020(f"data_lists/{name}.json"), read_datalist(name)
        assert old is not None, name
        assert dl["training"] == old["training"], name
        held_out = {e["image"] for s in HELD_OUT for e in dl[s]}
        assert held_out == {e["image"] for e in old["validation"]}, name  # nothing new, nothing lost


def test_split_sizes_and_absolute_paths(data_root):
    kv = load_datalist("kvasir", base_dir=data_root)
    assert len(kv) == 640 and len(load_datalist("kvasir", base_dir=data_root, split="validation")) == 80
    test = load_datalist("kvasir", base_dir=data_root, split="test")
    assert len(test) == 80 and test[0]["split"] == "test" and Path(test[0]["label"]).is_file()
    assert all(Path(e["image"]).is_file() and Path(e["label"]).is_file() for e in kv[:5])
    assert kv[0]["dataset"] == "kvasir" and kv[0]["modality"] == "endoscopy" and kv[0]["split"] == "training"
    assert len(load_datalist("shenzhen", base_dir=data_root, split="training,validation,test")) == 450
    assert len(load_datalists(["kvasir", "shenzhen", "brats", "totalseg"], base_dir=data_root, split="test")) == 125
    unlabelled = load_datalist("totalseg", base_dir=data_root, split="unlabelled")
    assert len(unlabelled) == 1 and "label" not in unlabelled[0] and "unlabelled" in unlabelled[0]["image"]
    br = load_datalist("brats", base_dir=data_root, split="all")
    assert [e["split"] for e in br] == ["training"] * 3 + ["validation"]  # 4 volumes: no test case
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
    with pytest.raises(ValueError, match="'testing' was renamed: use 'unlabelled'.*or 'test'"):
        load_datalist("totalseg", split="testing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="files missing"):
        load_datalist("brats", base_dir=tmp_path / "empty")
