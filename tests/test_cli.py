"""The command line and the run-level checks (issue 19 items 1, 4, 5, 6, 7, 10; issue 15 items 3
and 6, the CLI layer; issue 20 item 5).

Most runs go through ``automedsam.cli.main(argv)`` in-process (a subprocess costs 5-10 s of
start-up for the torch import); a few real subprocess runs check what only they can (the
``python -m automedsam`` entry, the help text, the import graph). Every test input is generated
here: nothing needs ../shared/data.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from automedsam import cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "custom" / "automedsam"


# ------------------------------------------------------------------------------------ helpers


def run(argv, capsys) -> tuple[int, list[str], str]:
    """main(argv) in-process: (exit status, the error lines, all of stderr)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.startswith("automedsam: error:")], err


def digest(paths) -> dict[str, str]:
    out = {}
    for p in paths:
        p = Path(p)
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p] if p.exists() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


def colour_png(path: Path, size: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.stack([150 + 40 * np.sin(xx / 9.0), 70 + 20 * np.cos(yy / 7.0), 60 + 0 * xx], -1)
    img[((xx - size / 2) / (size / 5)) ** 2 + ((yy - size / 2) / (size / 6)) ** 2 < 1] = [200, 120, 100]
    Image.fromarray(np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)).save(path)
    return path


def zscored_flair(path: Path, scale: float = 1.0) -> Path:
    """A z-scored MR-like float volume (what BraTS' *_subtrMeanDivStd files hold), times ``scale``."""
    rng = np.random.default_rng(3)
    vol = rng.normal(0, 1, (16, 16, 3)).astype(np.float32) * np.float32(scale)
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    return path


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """The bundle's weights, or an untrained seeded model's when the bundle ships none."""
    shipped = REPO / "bundles" / "automedsam" / "models" / "model.pt"
    if shipped.is_file():
        return shipped
    import torch

    from automedsam.pretrained import network_from_bundle

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(network_from_bundle().trainable_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def network(weights_file):
    from automedsam.pretrained import load_pretrained

    return load_pretrained(weights=weights_file)


@pytest.fixture
def no_model(monkeypatch):
    """For runs whose inputs all fail before the network is used: skip the model load (seconds on
    2 busy cores). A sentinel stands in; touching it would fail the run."""
    import automedsam.segment as S

    def load(self):
        self._network = object()
        return self._network

    monkeypatch.setattr(S.Segmenter, "load", load)


@pytest.fixture(scope="module")
def wrong_shape_weights(weights_file, tmp_path_factory) -> tuple[Path, str]:
    """The weights with one tensor of the wrong shape: (file, the tensor's name)."""
    import torch

    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    key = sorted(state)[0]
    state[key] = torch.zeros(3, 3)
    path = tmp_path_factory.mktemp("badweights") / "wrong_shape.pt"
    torch.save(state, path)
    return path, key


# ------------------------------------------------------------------------------------ issue 19.1


def test_mistyped_option_is_refused_before_any_work(tmp_path, capsys):
    img = colour_png(tmp_path / "img.png")
    out = tmp_path / "o"
    rc, errs, err = run(["segment", img, "--output", out, "--clases", "liver"], capsys)
    assert rc == 2 and len(errs) == 1, err
    assert "--clases" in errs[0] and "did you mean --classes" in errs[0]
    assert not out.exists()


def test_file_name_starting_with_dash_is_refused_not_dropped(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    colour_png(tmp_path / "one.png")
    colour_png(tmp_path / "-dash.png", seed=1)
    rc, errs, err = run(["segment", "one.png", "-dash.png", "--output", "o"], capsys)
    assert rc == 2 and len(errs) == 1, err
    assert "-dash.png" in errs[0] and "./-dash.png" in errs[0]
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ issue 19.4


@pytest.mark.parametrize("classes", [",", " , ,", ""])
def test_empty_class_list_is_refused_up_front_with_the_valid_names(tmp_path, capsys, classes):
    img = colour_png(tmp_path / "img.png")
    rc, errs, err = run(["segment", img, "--output", tmp_path / "o", "--classes", classes], capsys)
    assert rc == 2 and len(errs) == 1, err
    assert "--classes" in errs[0] and "names no class" in errs[0]
    assert all(name in errs[0] for name in ("liver", "brain_tumor", "polyp", "lungs"))
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ issue 19.5


def test_run_errors_come_once_before_any_input_is_read(tmp_path, capsys, monkeypatch):
    """A weights problem stops the run before the first input is read: one line, not one per input."""
    import automedsam.pretrained
    import automedsam.segment as S
    from automedsam.errors import CheckpointError

    read, loads = [], []
    real_load_image = S.load_image
    monkeypatch.setattr(S, "load_image", lambda *a, **k: read.append(a[0]) or real_load_image(*a, **k))

    def failing_load(*a, **k):
        loads.append(1)
        raise CheckpointError("AutoMedSAM weights x.pt do not fit this model: tensor t has shape (3, 3)")

    monkeypatch.setattr(automedsam.pretrained, "load_pretrained", failing_load)
    a, b = colour_png(tmp_path / "a.png"), colour_png(tmp_path / "b.png", seed=1)
    out = tmp_path / "o"
    rc, errs, err = run(["segment", a, b, "--output", out], capsys)
    assert rc == 2 and len(errs) == 1 and "tensor t" in errs[0], err
    assert read == [] and loads == [1]
    assert "the others were segmented" not in err and not out.exists()


def test_wrongly_shaped_weights_are_a_checkpoint_error_naming_the_tensor(network, wrong_shape_weights):
    """(The command line's one line for it, once for two inputs, is in the matrix test below.)"""
    from automedsam.errors import CheckpointError

    path, key = wrong_shape_weights
    with pytest.raises(CheckpointError) as ei:
        network.load_trainable(path)
    assert str(path) in str(ei.value) and f"tensor {key} has shape (3, 3)" in str(ei.value)


def test_unknown_device_is_refused_once_before_reading(tmp_path, capsys):
    a = colour_png(tmp_path / "a.png")
    missing = tmp_path / "missing.png"  # would be an input error if any input were read
    rc, errs, err = run(["segment", a, missing, "--output", tmp_path / "o", "--device", "tpu"], capsys)
    assert rc == 2 and len(errs) == 1, err
    assert "--device 'tpu'" in errs[0] and "cpu, cuda or cuda:N" in errs[0]
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ issue 19.6


def test_output_folder_equal_to_input_folder_never_takes_its_own_outputs(tmp_path, network):
    from automedsam.segment import segment

    d = tmp_path / "d"
    d.mkdir()
    colour_png(d / "x.png")
    notes = []
    results = segment(d, d, network=network, warn=notes.append)
    assert [r["ok"] for r in results] == [True]
    first = sorted(p.name for p in d.iterdir())
    assert first == ["x.png", "x_overlay.png", "x_report.json", "x_seg.png"]
    results = segment(d, d, network=network, overwrite=True, warn=notes.append)
    assert [r["input"] for r in results] == [str(d / "x.png")]
    assert sorted(p.name for p in d.iterdir()) == first  # no x_seg_seg.png, no x_overlay_overlay.png
    assert any("skipped 2 file(s) this tool wrote" in n for n in notes), notes
    # a file that only looks like an output (no report of ours beside it) is still an input
    colour_png(d / "y_seg.png", seed=2)
    from automedsam.segment import InputItem, _own_outputs

    kept, skipped = _own_outputs([InputItem(d / n, n) for n in ("x.png", "x_seg.png", "x_overlay.png",
                                                                 "y_seg.png")])
    assert [i.path.name for i in kept] == ["x.png", "y_seg.png"]
    assert sorted(p.name for p in skipped) == ["x_overlay.png", "x_seg.png"]


# ------------------------------------------------------------------------------------ issue 19.7


def test_absurd_intensities_are_refused_not_guessed_as_ct(tmp_path, capsys, no_model):
    bad = zscored_flair(tmp_path / "flair_x1e30.nii.gz", 1e30)
    before = digest([bad])
    out = tmp_path / "o"
    rc, errs, err = run(["segment", bad, "--output", out], capsys)
    assert rc == 1 and len(errs) == 1, err
    assert str(bad) in errs[0] and "far outside the range of any modality" in errs[0] and "--modality" in errs[0]
    assert nothing_written(out) and digest([bad]) == before
    # the same rule in the one home of modality guessing, used by the bundle's transforms too
    from automedsam.errors import InputError
    from automedsam.modality import guess_modality_of
    from automedsam.transforms import guess_modality_of as via_transforms

    assert via_transforms is guess_modality_of
    slices = np.asarray(nib.load(str(bad)).dataobj, np.float32).transpose(2, 1, 0)[..., None]
    with pytest.raises(InputError, match="far outside"):
        guess_modality_of(slices, True, "float32", str(bad))
    assert guess_modality_of(slices / np.float32(1e30), True, "float32")[0] == "mr"  # the plain z-scored FLAIR


# ------------------------------------------------------------------------------------ issue 19.10


def test_uncertainty_values_are_named_bounded_and_checked_before_reading(tmp_path, capsys):
    from automedsam.options import MAX_UNCERTAINTY_DRAWS

    missing = tmp_path / "not_read.png"  # an input error, if the input were read first
    for value, expected in (("abc", "--uncertainty must be a whole number of noise draws, got 'abc'"),
                            ("-1", "--uncertainty must be >= 0 noise draws, got -1"),
                            ("1", "--uncertainty needs at least 2 noise draws"),
                            ("1000", f"--uncertainty 1000 is over the limit of {MAX_UNCERTAINTY_DRAWS} draws")):
        rc, errs, err = run(["segment", missing, "--output", tmp_path / "o", "--uncertainty", value], capsys)
        assert rc == 2 and len(errs) == 1 and expected in errs[0], (value, err)
        assert "not_read.png" not in err
    assert not (tmp_path / "o").exists()


def test_random_bytes_as_weights_never_advise_weights_only_false(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(5).bytes(4096))
    img = colour_png(tmp_path / "img.png")
    rc, errs, err = run(["segment", img, "--output", tmp_path / "o", "--weights", junk], capsys)
    assert rc == 2 and len(errs) == 1, err
    assert str(junk) in errs[0] and "not a PyTorch weights file" in errs[0]
    assert "weights_only" not in err and "will likely succeed" not in err
    assert not (tmp_path / "o").exists()


def test_folder_summary_when_every_input_failed(tmp_path, capsys, no_model):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.png").write_bytes(np.random.default_rng(0).bytes(3000))
    (d / "b.png").write_bytes(np.random.default_rng(1).bytes(3000))
    rc, errs, err = run(["segment", d, "--output", tmp_path / "o"], capsys)
    assert rc == 1 and len(errs) == 2, err
    assert "all 2 inputs failed; nothing was segmented" in err and "the others were segmented" not in err


# ------------------------------------------------------------------------------------ issue 15.6: the CLI layer


def test_argparse_options_repeatable_dashed_and_checked_once_into_a_frozen_object():
    import dataclasses

    from automedsam.classes import CLASS_IDS
    from automedsam.options import SegmentOptions, segment_options

    parser = cli.build_parser()["segment"]
    ns = cli._parse(parser, ["a.png", "--point", "1,2,1", "--output", "o", "--point=3,4,0", "b.png",
                             "--box", "liver:1,2,3,4", "--max-voxels", "1e6", "--classes", "Liver,spleen,liver",
                             "--largest-component", "--overwrite=true", "--quiet=false", "--allow_gaps"])
    assert ns.inputs == ["a.png", "b.png"] and ns.output == "o"  # inputs intermixed with options
    assert ns.point == ["1,2,1", "3,4,0"] and ns.box == ["liver:1,2,3,4"]
    assert ns.largest_component and ns.overwrite and not ns.quiet and ns.allow_gaps
    opts = segment_options(classes=ns.classes, box=ns.box, point=ns.point, max_voxels=ns.max_voxels,
                           allow_gaps=ns.allow_gaps)
    assert isinstance(opts, SegmentOptions)
    assert opts.classes == (CLASS_IDS["liver"], CLASS_IDS["spleen"])  # names -> ids, once, no repeats
    assert opts.max_voxels == 1_000_000 and opts.allow_gaps is True
    assert [(c.kind, c.class_name, c.label) for c in opts.corrections] == [("box", "liver", 1), ("point", None, 1),
                                                                           ("point", None, 0)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.uncertainty = 5


def test_allow_gaps_reaches_the_loader(tmp_path, capsys, monkeypatch, no_model):
    import automedsam.segment as S

    seen = []

    def fake_load_image(path, **kw):
        seen.append(kw.get("allow_gaps", False))
        raise S.InputError(f"{path}: stop here")

    monkeypatch.setattr(S, "load_image", fake_load_image)
    img = colour_png(tmp_path / "a.png")
    for flag, expected in (([], False), (["--allow_gaps"], True)):
        rc, errs, err = run(["segment", img, "--output", tmp_path / "o", *flag], capsys)
        assert rc == 1 and errs == [f"automedsam: error: {img}: stop here"], err
        assert seen[-1] is expected


def test_help_is_argparse_without_fire_lines_and_lists_every_option():
    proc = subprocess.run([sys.executable, "-m", "automedsam", "segment", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "INFO" not in proc.stdout + proc.stderr and "Showing help" not in proc.stdout + proc.stderr
    for flag in ("--output", "--classes", "--modality", "--device", "--weights", "--bundle", "--largest_component",
                 "--uncertainty", "--box", "--point", "--overwrite", "--quiet", "--threshold", "--batch_size",
                 "--max_voxels", "--series_uid", "--allow_gaps"):
        assert flag in proc.stdout, flag


# ------------------------------------------------------------------------------------ issue 15.3: entry, imports, errors


def _imports_of(path: Path) -> set[str]:
    """automedsam modules a module imports anywhere (top level or inside functions)."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    pkg = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("automedsam"):
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("automedsam"))
    return found


def test_no_module_imports_cli_back_and_python_m_automedsam_works():
    importers = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "automedsam.cli" in _imports_of(p)}
    assert importers == {"__main__.py"}, importers
    code = ("import sys, automedsam.cli; mods = sorted(m for m in sys.modules if m.startswith('automedsam')); "
            "print(' '.join(mods))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for mod in proc.stdout.split():
        path = PACKAGE.parent / (mod.replace(".", "/") + ".py")
        if path.is_file() and mod != "automedsam.cli":
            assert "automedsam.cli" not in _imports_of(path), mod
    proc = subprocess.run([sys.executable, "-m", "automedsam", "segment", "x.png", "--output", "o", "--bogus"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.count("automedsam: error:") == 1, proc.stderr
    assert "--bogus" in proc.stderr and not (REPO / "o").exists()


def test_one_error_type():
    from automedsam import backbones, segment
    from automedsam.data import io
    from automedsam.errors import AutoMedSAMError, CheckpointError, InputError, RunError, SegmentError

    assert io.InputError is InputError and backbones.CheckpointError is CheckpointError
    assert segment.SegmentError is SegmentError is RunError
    for e in (InputError, CheckpointError, RunError):
        assert issubclass(e, AutoMedSAMError) and issubclass(e, ValueError)
    assert issubclass(CheckpointError, RuntimeError) and not issubclass(InputError, RunError)
    assert str(InputError("a\n   b")) == "a b"


# ------------------------------------------------------------------------------------ issue 20.5


def test_third_party_warnings_hidden_for_every_command_and_ctrl_c_is_one_line(capsys, caplog, monkeypatch):
    def noisy(ns):
        warnings.warn("Importing from timm.models.layers is deprecated, please import via timm.layers",
                      FutureWarning)
        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").warning("nvImageCodec is not installed")
        warnings.warn("a warning of our own", UserWarning)
        return 0

    for command in ("demo", "segment", "cache"):
        monkeypatch.setitem(cli.COMMANDS, command, noisy)
        caplog.clear()
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            rc, errs, err = run([command] + (["x.png", "--output", "o"] if command == "segment" else
                                             ["--datalist", "kvasir"] if command == "cache" else []), capsys)
        assert rc == 0, (command, err)
        assert [str(w.message) for w in shown] == ["a warning of our own"], command
        assert not [r for r in caplog.records if "nvImageCodec" in r.getMessage()], command

    def interrupted(ns):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "demo", interrupted)
    rc, errs, err = run(["demo"], capsys)
    assert rc == 130 and err.strip() == "automedsam: interrupted"


# ------------------------------------------------------------------------------------ issue 19: the Done-when matrix


def _make_bad_inputs(d: Path) -> tuple[list[tuple[Path, str]], Path]:
    """Every bad input file the project tests (tests/test_segment.py, tests/test_data_io.py) and
    this file: [(path, what its one error line must say)], and a good image."""
    from test_data_io import write_nifti_header_only

    rng = np.random.default_rng(7)
    aff = np.eye(4)
    good = colour_png(d / "good.png")
    colour_png(d / "-dash.png", seed=4)
    ct = np.clip(rng.normal(0, 300, (24, 20, 6)), -1000, 1500).astype(np.int16)
    nib.save(nib.Nifti1Image(ct, np.diag([1.5, 1.5, 3.0, 1.0])), str(d / "whole.nii.gz"))
    whole = (d / "whole.nii.gz").read_bytes()
    (d / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    png = good.read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    for name in ("noise.nii.gz", "noise.nii", "noise.png", "noise.jpg", "noise.npz", "noise.dcm", "noise.mha"):
        (d / name).write_bytes(rng.bytes(5000))
    (d / "empty.dcm").write_bytes(b"")
    (d / "gz_of_noise.nii.gz").write_bytes(gzip.compress(rng.bytes(5000)))
    (d / "notes.txt").write_text("not an image")
    nib.save(nib.Nifti1Image(rng.random((5, 5, 5, 2)).astype(np.float32), aff), str(d / "four_d.nii.gz"))
    nib.save(nib.Nifti1Image(np.arange(10, dtype=np.float32), aff), str(d / "one_d.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), aff), str(d / "zeros.nii.gz"))
    nib.save(nib.Nifti1Image(np.full((5, 5, 5), 7, np.int16), aff), str(d / "flat.nii.gz"))
    Image.fromarray(np.full((20, 30), 9, np.uint8)).save(d / "flat.png")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(d / "black.png")
    vol = rng.random((6, 5, 4)).astype(np.float32)
    vol[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(vol, aff), str(d / "nan.nii.gz"))
    vol[1, 2, 3], vol[0, 0, 0] = 0.5, -np.inf
    nib.save(nib.Nifti1Image(vol, aff), str(d / "inf.nii.gz"))
    write_nifti_header_only(d / "huge.nii", (4096, 4096, 4096))
    Image.fromarray(rng.integers(0, 255, (80, 90), dtype=np.uint8)).save(d / "over_limit.png")
    np.savez(d / "one_d.npz", imgs=np.arange(5.0))
    np.savez(d / "nokey.npz", images=np.ones((4, 4)))
    np.savez(d / "four.npz", imgs=rng.random((2, 3, 4, 5)))
    np.savez(d / "zeros.npz", imgs=np.zeros((3, 8, 8), np.uint8))
    zscored_flair(d / "flair_x1e30.nii.gz", 1e30)
    nib.save(nib.Nifti1Image(rng.integers(0, 256, (16, 16, 3)).astype(np.uint8), aff), str(d / "u8.nii.gz"))
    (d / "junk_weights.pt").write_bytes(rng.bytes(4096))
    (d / "emptydir").mkdir()
    files = [
        ("missing.nii.gz", "no such file"),
        ("truncated.nii.gz", "cannot read"),
        ("truncated.png", "cannot read"),
        ("noise.nii.gz", "cannot read nifti file"),
        ("noise.nii", "cannot read"),
        ("noise.png", "cannot read image2d file"),
        ("noise.jpg", "cannot read"),
        ("noise.npz", "cannot read"),
        ("noise.dcm", "not a readable DICOM file"),
        ("noise.mha", "cannot read"),
        ("empty.dcm", ""),
        ("gz_of_noise.nii.gz", "cannot read"),
        ("notes.txt", "unsupported file type"),
        ("four_d.nii.gz", "4D array of shape (5, 5, 5, 2)"),
        ("one_d.nii.gz", "1D array of shape (10,)"),
        ("zeros.nii.gz", "constant image (every voxel is 0)"),
        ("flat.nii.gz", "constant image"),
        ("flat.png", "constant image (every voxel is 9)"),
        ("black.png", "constant image (every voxel is 0)"),
        ("nan.nii.gz", "1 NaN/Inf voxel out of 120; refusing to guess"),
        ("inf.nii.gz", "1 NaN/Inf voxel out of 120"),
        ("huge.nii", "4096x4096x4096 = 68,719,476,736 voxels is over the limit of 5,000"),
        ("over_limit.png", "80x90 = 7,200 voxels is over the limit of 5,000"),
        ("one_d.npz", "1D"),
        ("nokey.npz", "no 'imgs' array"),
        ("four.npz", "4D"),
        ("zeros.npz", "constant image"),
        ("flair_x1e30.nii.gz", "far outside the range of any modality"),
        ("u8.nii.gz", "--modality"),
    ]
    return [(d / n, problem) for n, problem in files], good


def _bad_runs(d: Path, good: Path, wrong_shape: Path, wrong_key: str) -> list[tuple[list, str, list[str]]]:
    """Runs refused as a whole, before any input is read: (arguments, what the one error line
    must say, the option/file it must name)."""
    g = [good]
    return [
        (g + ["--clases", "liver"], "unknown option", ["--clases"]),
        (g + ["-dash.png"], "a file name starting with '-'", ["-dash.png"]),  # run from d
        (g + ["--classes", ","], "names no class", ["--classes"]),
        (g + ["--classes", "livr"], "unknown class 'livr'", ["livr"]),
        (g + ["--modality", "pet"], "unknown modality 'pet'", ["--modality"]),
        (g + ["--device", "tpu"], "is not a device here", ["--device"]),
        (g + ["--uncertainty", "abc"], "whole number of noise draws", ["--uncertainty"]),
        (g + ["--uncertainty", "-1"], ">= 0 noise draws", ["--uncertainty"]),
        (g + ["--uncertainty", "1000"], "over the limit", ["--uncertainty"]),
        (g + ["--threshold", "2"], "between 0 and 1", ["--threshold"]),
        (g + ["--batch_size", "0"], ">= 1", ["--batch_size"]),
        (g + ["--max_voxels", "-3"], "whole number >= 0", ["--max_voxels"]),
        (g + ["--box", "1,2,3"], "x0,y0,x1,y1", ["--box"]),
        (g + ["--point", "1,2,7"], "label", ["--point"]),
        (g + ["--box", "livr:1,2,3,4"], "unknown class 'livr'", ["--box"]),
        (g + ["--box", "1,2,3,4", d / "whole.nii.gz"], "give exactly one input", ["--box"]),
        (g + ["--series_uid", ""], "--series_uid is empty", ["--series_uid"]),
        (g + ["--bundle", d], "not an AutoMedSAM bundle folder", ["--bundle"]),
        (g + ["--weights", d / "nothere.pt"], "weights not found", [str(d / "nothere.pt")]),
        (g + ["--weights", d / "junk_weights.pt"], "not a PyTorch weights file", [str(d / "junk_weights.pt")]),
        ([d / "emptydir"], "no images, volumes or DICOM series", [str(d / "emptydir")]),
        # the one run that builds the network: two inputs, one line, no input read
        (g + [d / "whole.nii.gz", "--weights", wrong_shape], f"tensor {wrong_key} has shape (3, 3)",
         [str(wrong_shape)]),
    ]


def test_every_bad_input_and_option_one_line_nonzero_nothing_written_inputs_untouched(tmp_path, capsys,
                                                                                       wrong_shape_weights,
                                                                                       weights_file, monkeypatch):
    """Issue 19's Done-when: the CLI over every bad input the project tests (old and new): exactly
    one error line naming the file (one run over all the bad files, the model loaded once) or the
    option (one run each), a non-zero exit, nothing written, every input byte-identical afterwards."""
    d = tmp_path / "in"
    d.mkdir()
    files, good = _make_bad_inputs(d)
    monkeypatch.chdir(d)
    before = digest([d, wrong_shape_weights[0]])

    out = tmp_path / "out_files"
    rc, errs, err = run(["segment", *[p for p, _ in files], "--output", out, "--max-voxels", "5000",
                         "--weights", weights_file], capsys)
    assert rc == 1 and "Traceback" not in err, err
    wrong = []
    for path, problem in files:
        mine = [e for e in errs if e.startswith(f"automedsam: error: {path}:")]
        if len(mine) != 1 or problem not in mine[0]:
            wrong.append(f"{path.name}: wanted one line with {problem!r}, got {mine}")
    assert not wrong and len(errs) == len(files), "\n".join(wrong) + "\n" + err
    assert f"all {len(files)} inputs failed; nothing was segmented" in err
    assert nothing_written(out)

    failures = []
    for i, (args, problem, names) in enumerate(_bad_runs(d, good, *wrong_shape_weights)):
        out = tmp_path / f"out{i}"
        rc, errs, err = run(["segment", *args, "--output", out], capsys)
        if not (rc == 2 and len(errs) == 1 and problem in errs[0] and all(n in errs[0] for n in names)
                and "Traceback" not in err and nothing_written(out)):
            failures.append(f"{args} -> rc {rc}, wanted {problem!r}: {err}")
    assert not failures, "\n".join(failures)
    assert digest([d, wrong_shape_weights[0]]) == before


def test_a_few_real_console_runs(tmp_path):
    """The installed command (or python -m automedsam) as users run it: options refused first."""
    script = Path(sys.executable).parent / "automedsam"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "automedsam"]
    img = colour_png(tmp_path / "img.png")
    out = tmp_path / "o"
    for extra, needle in ((["--clases", "liver"], "--clases"), (["--uncertainty", "-1"], "--uncertainty")):
        proc = subprocess.run(cmd + ["segment", str(img), "--output", str(out), *extra], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path, env=os.environ.copy())
        errs = [ln for ln in proc.stderr.splitlines() if ln.startswith("automedsam: error:")]
        assert proc.returncode == 2 and len(errs) == 1 and needle in errs[0], proc.stderr
        assert "Traceback" not in proc.stderr and not out.exists()
