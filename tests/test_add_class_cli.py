"""``automedsam add-class``: the command line of automedsam.adapt.add_class.

Cheap on purpose: the options, the name and the data are refused before any work (no model load,
no encoder pass, nothing written); a real run is covered by tests/test_add_class.py through the
Python API, which the command calls with the same arguments (checked here with a stand-in).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from automedsam import adapt, cli


def _folders(root: Path, mask_size=(40, 30), empty=False) -> tuple[Path, Path]:
    img, msk = root / "images", root / "masks"
    img.mkdir()
    msk.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40), dtype=np.uint8)).save(img / "a.png")
    m = np.zeros(mask_size[::-1], np.uint8)
    if not empty:
        m[5:15, 5:20] = 255
    Image.fromarray(m).save(msk / "a.png")
    return img, msk


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_lists_the_command_and_its_options(capsys):
    rc, out, _ = _run(capsys, "add-class", "--help")
    assert rc == 0
    for opt in ("--modality", "--images", "--masks", "--datalist", "--max_cases", "--colour", "--snomed",
                "--steps", "--num_views", "--output"):
        assert opt in out
    rc, out, _ = _run(capsys, "--help")
    assert rc == 0 and "add-class" in out


@pytest.mark.parametrize("extra, words", [
    (["--colour", "300,0,0"], "--colour must be R,G,B"),
    (["--snomed", "Head"], "--snomed must be CODE:MEANING"),
    (["--steps", "0"], "--steps must be > 0"),
    (["--learning-rate", "abc"], "--learning_rate must be a number"),
    (["--datalist", "x.json"], "either --images and --masks, or --datalist"),
    (["--stepz", "3"], "unknown option --stepz (did you mean --steps?)"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, capsys, monkeypatch, extra, words):
    img, msk = _folders(tmp_path)
    called = []
    monkeypatch.setattr(adapt, "add_class", lambda *a, **k: called.append(1))
    out_dir = tmp_path / "new_bundle"
    rc, _, err = _run(capsys, "add-class", "fetal_head", "--modality", "ultrasound", "--images", str(img),
                      "--masks", str(msk), "--output", str(out_dir), *extra)
    assert rc == 2 and words in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("automedsam: error: ")
    assert not called and not out_dir.exists()


@pytest.mark.parametrize("argv, words", [
    (["--modality", "ultrasound", "--output", "o"], "no class NAME"),
    (["x", "--output", "o", "--images", "i", "--masks", "m"], "no modality"),
    (["x", "--modality", "us", "--images", "i", "--masks", "m"], "no output folder"),
    (["x", "--modality", "us", "--output", "o"], "no training data"),
    (["x", "--modality", "us", "--output", "o", "--images", "i"], "--images needs --masks"),
])
def test_missing_options_are_named(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    rc, _, err = _run(capsys, "add-class", *argv)
    assert rc == 2 and words in err, err
    assert not (tmp_path / "o").exists()


def test_data_problems_are_one_line_naming_the_file(tmp_path, capsys):
    """add_class's own checks (the real function: they run before the model is loaded)."""
    out_dir = tmp_path / "new_bundle"
    # a name the vocabulary already has
    (tmp_path / "ok").mkdir()
    img, msk = _folders(tmp_path / "ok")
    rc, _, err = _run(capsys, "add-class", "liver", "--modality", "ct", "--images", str(img), "--masks", str(msk),
                      "--output", str(out_dir))
    assert rc == 2 and "liver" in err and len(err.strip().splitlines()) == 1, err
    # a mask whose size is not its image's
    (tmp_path / "bad").mkdir()
    img, msk = _folders(tmp_path / "bad", mask_size=(20, 10))
    rc, _, err = _run(capsys, "add-class", "new_thing", "--modality", "ultrasound", "--images", str(img),
                      "--masks", str(msk), "--output", str(out_dir))
    assert rc == 2 and str(msk / "a.png") in err and len(err.strip().splitlines()) == 1, err
    # an empty mask
    (tmp_path / "empty").mkdir()
    img, msk = _folders(tmp_path / "empty", empty=True)
    rc, _, err = _run(capsys, "add-class", "new_thing", "--modality", "ultrasound", "--images", str(img),
                      "--masks", str(msk), "--output", str(out_dir))
    assert rc == 2 and "empty mask" in err and str(msk / "a.png") in err, err
    assert not out_dir.exists()


def test_options_reach_add_class(tmp_path, capsys, monkeypatch):
    img, msk = _folders(tmp_path)
    got = {}
    monkeypatch.setattr(adapt, "add_class", lambda *a, **k: got.update(args=a, kw=k))
    rc, _, err = _run(capsys, "add-class", "fetal_head", "--modality", "ultrasound", "--images", str(img),
                      "--masks", str(msk), "--output", str(tmp_path / "o"), "--max-cases", "20", "--aliases",
                      "head, foetal_head", "--colour", "255,170,60", "--snomed", "69536005:Head", "--steps", "40",
                      "--learning_rate", "0.2", "--num_views", "2", "--seed", "3", "--quiet", "--no-class-head")
    assert rc == 0, err
    assert got["args"] == ("fetal_head", "ultrasound")
    kw = got["kw"]
    assert kw["images"] == str(img) and kw["masks"] == str(msk) and kw["max_cases"] == 20
    assert kw["aliases"] == ["head", "foetal_head"] and kw["colour"] == (255, 170, 60)
    assert kw["snomed"] == ("69536005", "Head") and kw["steps"] == 40 and kw["learning_rate"] == 0.2
    assert kw["num_views"] == 2 and kw["seed"] == 3 and kw["progress"] is False and kw["datalist"] is None
    assert kw["class_head"] is False and "head_learning_rate" not in kw
