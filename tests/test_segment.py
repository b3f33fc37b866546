"""``automedsam segment`` end to end on real files (subprocess runs of the command), plus the
Python API (:class:`automedsam.segment.Segmenter`) in-process where counting calls needs it.

CPU budget: every encoder pass costs seconds on 2 cores, so the volumes are cropped to 2-3
slices and the runs are shared by module-scoped fixtures (one CLI run checked by several tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from automedsam.classes import CLASS_IDS, MODALITY_CLASSES

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
CT = "abdomen-ct/totalseg-example/ct.nii.gz"
CT_LABEL = "abdomen-ct/totalseg-example/label.nii.gz"
BRATS_FLAIR = "brain-mri/brats/brats_2013_pat0003_1/Flair_subtrMeanDivStd.nii.gz"
POLYP = "polyp/kvasir-seg/images/cju0qkwl35piu0993l0dewei2.jpg"
XRAY = "chest-xray/shenzhen/images/CHNCXR_0001_0.png"
CT_SLICES = (15, 17)  # 2 slices with liver, spleen, both kidneys and pancreas
TOTALSEG_LIVER = 5


# ------------------------------------------------------------------------------------ helpers


def crop_nifti(src: Path, dst: Path, z0: int, z1: int) -> Path:
    """Slices z0..z1-1 of a NIfTI volume; nibabel's slicer moves the affine's origin to match."""
    img = nib.load(str(src))
    nib.save(img.slicer[:, :, z0:z1], str(dst))
    return dst


def write_ct_dicom_series(volume_hu: np.ndarray, affine: np.ndarray, folder: Path) -> dict:
    """An (X,Y,Z) HU volume with a RAS ``affine`` as a CT Image Storage series (pydicom), one
    file per slice: unsigned 16-bit stored values with RescaleIntercept -2048 / slope 1,
    ImagePositionPatient, ImageOrientationPatient and PixelSpacing in LPS. Returns the UIDs."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    flip = np.diag([-1.0, -1.0, 1.0])  # RAS -> LPS
    a = np.asarray(affine, float)
    col_dir, row_dir = flip @ a[:3, 0], flip @ a[:3, 1]  # along increasing column / row index
    sx, sy = np.linalg.norm(col_dir), np.linalg.norm(row_dir)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    sops = []
    for k in range(volume_hu.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"IM{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^CT", "AMS0001", "19700101", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "A1", "", "1"
        ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = 3, k + 1, "test"
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [float(v) for v in (*(col_dir / sx), *(row_dir / sy))]
        ds.ImagePositionPatient = [float(v) for v in flip @ (a @ np.array([0.0, 0.0, k, 1.0]))[:3]]
        ds.PixelSpacing = [float(sy), float(sx)]  # row spacing, column spacing
        ds.SliceThickness = float(np.linalg.norm(a[:3, 2]))
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -2048, 1, "HU"
        stored = np.clip(np.round(volume_hu[:, :, k].T) + 2048, 0, 65535).astype(np.uint16)  # rows=Y, cols=X
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = stored.tobytes()
        ds.save_as(str(folder / f"IM{k:04d}.dcm"), enforce_file_format=True)
        sops.append(sop)
    return {"study": study, "series": series, "sop_instance_uids": sops}


def automedsam_cmd() -> list[str]:
    """The installed console script when there is one, else ``python -m automedsam.cli``."""
    script = Path(sys.executable).parent / "automedsam"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "automedsam.cli"]


def run_cli(args: list, cwd: Path, module: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = ([sys.executable, "-m", "automedsam.cli"] if module else automedsam_cmd()) + ["segment", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("automedsam: error:")]


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * (a & b).sum() / s


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def weights_args(tmp_path_factory) -> list[str]:
    """``--weights FILE`` until the bundle ships trained weights: an untrained (seeded) model."""
    if (REPO / "bundles" / "automedsam" / "models" / "model.pt").is_file():
        return []
    import torch

    from automedsam.pretrained import network_from_bundle

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(network_from_bundle().trainable_state_dict(), path)
    return ["--weights", str(path)]


@pytest.fixture(scope="session")
def network(weights_args):
    from automedsam.pretrained import load_pretrained

    return load_pretrained(weights=weights_args[1] if weights_args else None)


@pytest.fixture(scope="module")
def ct_crop(data_root, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ct")
    crop_nifti(data_root / CT, folder / "ct2.nii.gz", *CT_SLICES)
    return folder / "ct2.nii.gz"


@pytest.fixture(scope="module")
def run_2d(data_root, weights_args, tmp_path_factory):
    """One folder run: a Kvasir polyp JPG, a Shenzhen X-ray PNG and random bytes named .png."""
    folder = tmp_path_factory.mktemp("in2d")
    (folder / "polyp.jpg").write_bytes((data_root / POLYP).read_bytes())
    (folder / "xray.png").write_bytes((data_root / XRAY).read_bytes())
    (folder / "broken.png").write_bytes(np.random.default_rng(0).bytes(2000))
    (folder / "notes.txt").write_text("not an image")
    out = folder.parent / "out2d"
    proc = run_cli([folder, "--output", out, "--uncertainty", "2", *weights_args], cwd=folder.parent)
    return proc, folder, out


@pytest.fixture(scope="module")
def run_volumes(data_root, weights_args, ct_crop, tmp_path_factory):
    """One run over two volumes (model loaded once): the CT crop and a 2-slice BraTS FLAIR crop,
    with --largest_component and --uncertainty 2, through ``python -m automedsam.cli``."""
    folder = tmp_path_factory.mktemp("vol")
    flair = crop_nifti(data_root / BRATS_FLAIR, folder / "flair2.nii.gz", 76, 78)
    out = folder / "out"
    proc = run_cli([ct_crop, flair, "--output", out, "--largest_component", "--uncertainty", "2", *weights_args],
                   cwd=folder, module=True)
    return proc, {"ct2": ct_crop, "flair2": flair}, out


@pytest.fixture(scope="module")
def run_dicom(data_root, weights_args, ct_crop, tmp_path_factory):
    """A CT DICOM series written from the CT crop, liver asked for and corrected with a box (the
    reference liver's bounding box on slice 1, in DICOM pixel column/row) and a point."""
    folder = tmp_path_factory.mktemp("dcm")
    img = nib.load(str(ct_crop))
    uids = write_ct_dicom_series(np.asarray(img.dataobj), img.affine, folder / "series")
    ref = np.asarray(nib.load(str(data_root / CT_LABEL)).dataobj)[:, :, CT_SLICES[0]:CT_SLICES[1]] == TOTALSEG_LIVER
    xs, ys = np.nonzero(ref[:, :, 1])  # native voxel (i = DICOM column, j = DICOM row)
    box = f"{xs.min()},{ys.min()},{xs.max()},{ys.max()},1"
    cx, cy = int(np.median(xs)), int(np.median(ys))
    if not ref[cx, cy, 1]:
        cx, cy = int(xs[len(xs) // 2]), int(ys[len(ys) // 2])
    out = folder / "out"
    proc = run_cli([folder / "series", "--output", out, "--classes", "liver", "--box", box,
                    "--point", f"{cx},{cy},1,1", "--quiet", *weights_args], cwd=folder)
    return proc, folder / "series", out, uids, ref, img.affine


# ------------------------------------------------------------------------------------ 2D


def test_folder_run_segments_good_files_and_reports_the_bad_one(run_2d):
    proc, folder, out = run_2d
    assert proc.returncode != 0, "a folder run with a bad file must not exit 0"
    errs = error_lines(proc.stderr)
    assert len(errs) == 1 and "broken.png" in errs[0], proc.stderr
    assert "Traceback" not in proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{s}_{k}" for s in ("polyp", "xray")
                           for k in ("seg.png", "overlay.png", "report.json", "uncertainty.png"))
    assert no_temporaries(out)


@pytest.mark.parametrize("stem,source,modality", [("polyp", POLYP, "endoscopy"), ("xray", XRAY, "xray")])
def test_2d_outputs(run_2d, data_root, stem, source, modality):
    _, folder, out = run_2d
    src = Image.open(data_root / source)
    seg = np.asarray(Image.open(out / f"{stem}_seg.png"))
    assert seg.dtype == np.uint8 and seg.shape == (src.height, src.width)
    asked = {CLASS_IDS[n] for n in MODALITY_CLASSES[modality]}
    assert set(np.unique(seg)) <= {0} | asked
    rep = json.loads((out / f"{stem}_report.json").read_text())
    assert rep["modality"] == modality and rep["modality_source"].endswith("2D image")
    assert rep["classes_asked"] == list(MODALITY_CLASSES[modality])
    assert rep["is_volume"] is False and rep["shape"] == [src.height, src.width]
    assert rep["encoder_calls"] == 1
    assert rep["model"]["backbone"] == "lite_medsam" and rep["model"]["image_size"] == 256
    assert {"read_s", "inference_s", "write_s"} <= set(rep["timings_s"])
    (name,) = rep["classes"]
    stats = rep["classes"][name]
    assert stats["id"] in asked and stats["voxels"] == int((seg == stats["id"]).sum())
    assert 0 <= stats["mean_presence"] <= 1 and isinstance(stats["flags"], list)
    assert ("class not found" in stats["flags"]) == (stats["voxels"] == 0)
    assert rep["outputs"]["seg"] == str(out / f"{stem}_seg.png")
    unc = np.asarray(Image.open(out / f"{stem}_uncertainty.png"))
    assert unc.dtype == np.uint8 and unc.shape == seg.shape and rep["uncertainty_draws"] == 2
    overlay = Image.open(out / f"{stem}_overlay.png")
    assert overlay.mode == "RGB" and overlay.width >= 512  # small inputs are scaled up for the legend


# ------------------------------------------------------------------------------------ volumes


def test_volume_run_outputs(run_volumes):
    proc, inputs, out = run_volumes
    assert proc.returncode == 0, proc.stderr
    assert "2/2 [" in proc.stderr  # the progress bar over 2 slices (not --quiet)
    for stem, modality in (("ct2", "ct"), ("flair2", "mr")):
        src = nib.load(str(inputs[stem]))
        seg = nib.load(str(out / f"{stem}_seg.nii.gz"))
        assert seg.shape == src.shape and seg.get_data_dtype() == np.uint8
        assert np.allclose(seg.affine, src.affine)
        labels = np.asarray(seg.dataobj)
        asked = {CLASS_IDS[n] for n in MODALITY_CLASSES[modality]}
        assert set(np.unique(labels)) <= {0} | asked
        unc = nib.load(str(out / f"{stem}_uncertainty.nii.gz"))
        assert unc.shape == src.shape and np.allclose(unc.affine, src.affine)
        u = np.asarray(unc.dataobj)
        # the combined map of automedsam.uncertainty: calibrated entropy / draws' spread and the case score, in [0, 1]
        assert u.dtype == np.float32 and u.min() >= 0 and u.max() <= 1 + 1e-6 and u.max() > u.min()
        rep = json.loads((out / f"{stem}_report.json").read_text())
        assert rep["modality"] == modality and rep["classes_asked"] == list(MODALITY_CLASSES[modality])
        assert rep["is_volume"] and rep["slices"] == 2 and rep["encoder_calls"] == 1  # 2 slices, one batch of 4
        assert rep["largest_component"] is True and rep["uncertainty_draws"] == 2
        voxel_ml = float(np.prod(src.header.get_zooms()[:3])) / 1000
        for name, st in rep["classes"].items():
            assert st["voxels"] == int((labels == CLASS_IDS[name]).sum())
            assert st["volume_ml"] == pytest.approx(st["voxels"] * voxel_ml, abs=1e-3)
            assert st["slices_covered"] == len(st["slices"]) and all(0 <= k < 2 for k in st["slices"])
            assert st["slices"] == sorted({int(k) for k in np.nonzero(labels == CLASS_IDS[name])[2]})
        assert (out / f"{stem}_overlay.png").is_file()
    assert rep["modality_source"].startswith("z-scored")
    assert no_temporaries(out)


# ------------------------------------------------------------------------------------ DICOM


def test_dicom_series_label_map_and_dicom_seg(run_dicom):
    import highdicom as hd

    proc, series, out, uids, ref, affine = run_dicom
    assert proc.returncode == 0, proc.stderr
    assert "2/2 [" not in proc.stderr  # --quiet: no progress bar
    stem = "series"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}_{k}" for k in ("seg.nii.gz", "seg.dcm", "overlay.png", "report.json"))
    seg = nib.load(str(out / f"{stem}_seg.nii.gz"))
    assert seg.shape == ref.shape and np.allclose(seg.affine, affine, atol=1e-4)
    labels = np.asarray(seg.dataobj)
    assert set(np.unique(labels)) <= {0, CLASS_IDS["liver"]}
    # the box was given in DICOM pixel columns/rows: the result sits on the reference liver
    assert dice(labels[:, :, 1] == CLASS_IDS["liver"], ref[:, :, 1]) > 0.6

    rep = json.loads((out / f"{stem}_report.json").read_text())
    assert rep["modality"] == "ct" and rep["modality_source"].startswith("DICOM Modality tag")
    assert rep["series_uid"] == uids["series"]
    assert any(f.startswith("refined by user box and points on slice 1") for f in rep["classes"]["liver"]["flags"])

    dcm = hd.seg.segread(str(out / f"{stem}_seg.dcm"))
    assert dcm.Modality == "SEG" and dcm.SegmentationType == "BINARY"
    assert dcm.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["series"]
    found = rep["classes_found"]
    assert [s.SegmentLabel for s in dcm.SegmentSequence] == found == ["liver"]
    refd = [u[2] for u in dcm.get_source_image_uids()]
    assert set(refd) == set(uids["sop_instance_uids"])
    covered = [k for k in range(labels.shape[2]) if (labels[:, :, k] > 0).any()]
    assert int(dcm.NumberOfFrames) == len(covered) == rep["dicom_seg"]["frames"]
    for k in covered:  # each frame equals the label map's plane, in the source's rows/columns
        px = dcm.get_pixels_by_source_instance(source_sop_instance_uids=[uids["sop_instance_uids"][k]],
                                               segment_numbers=[1], ignore_spatial_locations=True)
        np.testing.assert_array_equal(px[0, ..., 0] > 0, labels[:, :, k].T == CLASS_IDS["liver"])


# ------------------------------------------------------------------------------------ the API


def test_encoder_runs_once_per_slice_batch_whatever_the_classes(network, data_root, tmp_path, monkeypatch):
    from automedsam.segment import Segmenter

    vol = crop_nifti(data_root / CT, tmp_path / "ct2.nii.gz", 15, 17)
    calls, seen = [], {}
    original = network.backbone.encoder_runner  # whichever path (eager or ONNX Runtime) runs the encoder

    def counting_encoder(x):  # counts every call; answers a repeated input from memory (saves CPU)
        calls.append(x.shape[0])
        key = hash(x.detach().cpu().numpy().tobytes())
        if key not in seen:
            seen[key] = original(x)
        return seen[key]

    monkeypatch.setattr(network.backbone, "encoder_runner", counting_encoder)
    seg = Segmenter(network, batch_size=1)
    one = seg.segment_file(vol, classes="liver")
    assert calls == [1, 1] and one.encoder_calls == 2
    calls.clear()
    four = seg.segment_file(vol, classes="liver,spleen,kidney_left,kidney_right")
    assert calls == [1, 1] and four.encoder_calls == 2, "adding classes must not add encoder calls"
    assert four.probabilities.shape == (4, 2, 101, 122) and four.label_slices.shape == (2, 101, 122)
    assert four.labels.shape == nib.load(str(vol)).shape
    assert set(np.unique(four.label_slices)) <= {0, 1, 2, 3, 4}
    assert [p.name for p in tmp_path.iterdir()] == ["ct2.nii.gz"]  # segment_file writes nothing


def test_class_outside_modality_warns_and_point_refines(network, data_root, tmp_path):
    from automedsam.segment import Segmenter, segment, SegmentError

    mask = np.asarray(Image.open(data_root / POLYP.replace("/images/", "/masks/")).convert("L")) > 127
    ys, xs = np.nonzero(mask)
    inside = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2 + 1e9 * ~mask[ys, xs])
    warned = []
    seg = Segmenter(network, warn=warned.append)
    res = seg.segment_file(data_root / POLYP, classes="polyp,liver",
                           box=f"polyp:{xs.min()},{ys.min()},{xs.max()},{ys.max()}",
                           point=f"polyp:{xs[inside]},{ys[inside]},1")
    assert any("liver" in w and "not expected in endoscopy" in w for w in warned)
    assert "not expected in endoscopy" in res.report["classes"]["liver"]["flags"]
    assert any(f.startswith("refined by user box and points") for f in res.report["classes"]["polyp"]["flags"])
    found = res.label_slices[0] == CLASS_IDS["polyp"]
    in_box = np.zeros_like(mask)
    in_box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    assert found[in_box].sum() > 0.9 * found.sum() and dice(found, mask) > 0.4  # (column, row) pixels
    assert set(np.unique(res.label_slices)) <= {0, CLASS_IDS["polyp"], CLASS_IDS["liver"]}

    # the one-call API: result dicts; a second run without overwrite refuses before any work
    results = segment([data_root / POLYP], tmp_path / "out", network=network)
    assert [r["ok"] for r in results] == [True] and Path(results[0]["outputs"]["seg"]).is_file()
    with pytest.raises(SegmentError, match="overwrite"):
        segment([data_root / POLYP], tmp_path / "out", network=network)
    before = Path(results[0]["outputs"]["report"]).stat().st_mtime_ns
    again = segment([data_root / POLYP], tmp_path / "out", network=network, overwrite=True)
    assert again[0]["ok"] and Path(again[0]["outputs"]["report"]).stat().st_mtime_ns > before


# ------------------------------------------------------------------------------------ bad input


def test_missing_input(tmp_path):
    proc = run_cli([tmp_path / "nope.nii.gz", "--output", tmp_path / "out"], cwd=tmp_path)
    assert proc.returncode != 0
    errs = error_lines(proc.stderr)
    assert len(errs) == 1 and "nope.nii.gz" in errs[0] and "no such file" in errs[0]
    assert not (tmp_path / "out").exists()


def test_random_bytes_png(tmp_path):
    bad = tmp_path / "scan.png"
    bad.write_bytes(np.random.default_rng(1).bytes(4096))
    proc = run_cli([bad, "--output", tmp_path / "out"], cwd=tmp_path, module=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errs = error_lines(proc.stderr)
    assert len(errs) == 1 and "scan.png" in errs[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unknown_class_lists_valid_ones(data_root, tmp_path):
    proc = run_cli([data_root / POLYP, "--output", tmp_path / "out", "--classes", "polyp,livr"], cwd=tmp_path)
    assert proc.returncode != 0
    (err,) = error_lines(proc.stderr)
    assert "livr" in err and "liver" in err and "brain_tumor" in err
    assert not (tmp_path / "out").exists()


def test_existing_outputs_need_overwrite(run_2d):
    _, folder, out = run_2d
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    proc = run_cli([folder / "polyp.jpg", "--output", out], cwd=folder)
    assert proc.returncode != 0
    (err,) = error_lines(proc.stderr)
    assert "polyp_" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_help_lists_the_options(tmp_path):
    proc = subprocess.run(automedsam_cmd() + ["segment", "--help"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PAGER": "cat"}, timeout=120)
    assert proc.returncode == 0
    text = proc.stdout + proc.stderr
    for flag in ("--output", "--classes", "--modality", "--box", "--point", "--uncertainty", "--overwrite"):
        assert flag in text


# ------------------------------------------------------------------------------------ no model


def test_parse_corrections():
    from automedsam.segment import SegmentError, parse_box, parse_points

    (b,) = parse_box("liver:10,20,30,40,5")
    assert (b.class_name, b.values, b.slice) == ("liver", (10, 20, 30, 40), 5)
    (b,) = parse_box((1, 2, 3, 4))  # the Python API takes numbers too
    assert b.class_name is None and b.slice is None
    p = parse_points("5,6,1;polyp:7,8,2,0")
    assert [(q.values, q.slice, q.label, q.class_name) for q in p] == [((5, 6), None, 1, None),
                                                                        ((7, 8), 2, 0, "polyp")]
    with pytest.raises(SegmentError, match="x0,y0,x1,y1"):
        parse_box("1,2,3")
    with pytest.raises(SegmentError, match="label"):
        parse_points("1,2,7")


def test_repeated_flags_are_kept():
    from automedsam.cli import _parse, build_parser

    ns = _parse(build_parser()["segment"], ["a.png", "--point", "1,2,1", "--output", "o", "--point=3,4,0",
                                            "--box", "1,2,3,4"])
    assert ns.point == ["1,2,1", "3,4,0"] and ns.box == ["1,2,3,4"] and ns.inputs == ["a.png"]


def test_modality_guess(data_root, tmp_path):
    from automedsam.data.io import InputError, load_image
    from automedsam.segment import guess_modality

    assert guess_modality(load_image(data_root / POLYP))[0] == "endoscopy"
    assert guess_modality(load_image(data_root / XRAY))[0] == "xray"
    assert guess_modality(load_image(crop_nifti(data_root / CT, tmp_path / "c.nii.gz", 0, 2)))[0] == "ct"
    assert guess_modality(load_image(crop_nifti(data_root / BRATS_FLAIR, tmp_path / "b.nii.gz", 70, 72)))[0] == "mr"
    ambiguous = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    nib.save(nib.Nifti1Image(ambiguous, np.eye(4)), str(tmp_path / "u8.nii.gz"))
    with pytest.raises(InputError, match="--modality"):
        guess_modality(load_image(tmp_path / "u8.nii.gz"))


def test_box_coordinates_follow_the_stored_voxel_grid(tmp_path):
    """A volume stored RAS is shown LPS (flipped in-plane): input pixel (x, y, k) must land on
    the same voxel in the working slices."""
    from automedsam.data.io import load_image
    from automedsam.segment import SliceMapper

    vol = np.zeros((20, 16, 5), np.int16) - 1000
    vol[3, 11, 2] = 500
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 3.0, 1.0])), str(tmp_path / "v.nii.gz"))
    img = load_image(tmp_path / "v.nii.gz")
    x, y, s = SliceMapper(img).to_slice(3, 11, 2)
    assert img.slices[s, int(y), int(x), 0] == 500
    assert SliceMapper(img).native_slice(s) == 2


def test_stem_clashes_get_the_folder_name(data_root):
    from automedsam.segment import resolve_inputs

    a = data_root / "brain-mri/brats/brats_2013_pat0003_1/Flair_subtrMeanDivStd.nii.gz"
    b = data_root / "brain-mri/brats/brats_2013_pat0004_1/Flair_subtrMeanDivStd.nii.gz"
    items, _ = resolve_inputs([a, b, data_root / CT])
    assert [i.stem for i in items] == ["brats_2013_pat0003_1_Flair_subtrMeanDivStd",
                                       "brats_2013_pat0004_1_Flair_subtrMeanDivStd", "ct"]


# ------------------------------------------------------------------------------------ reliability


def _no_outputs(out: Path) -> bool:
    return not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".tmp-")]


def test_every_kind_of_bad_input_one_line_each_and_nothing_written(data_root, tmp_path):
    """One call over every bad input of the reliability list: each gets one error line naming
    the file and the problem; the exit status is non-zero; no output is written (the model is
    loaded once, before the first input is read: tests/test_cli.py has the full matrix)."""
    from test_data_io import write_nifti_header_only

    d = tmp_path / "bad"
    d.mkdir()
    rng = np.random.default_rng(7)
    ct = (data_root / CT).read_bytes()
    (d / "truncated.nii.gz").write_bytes(ct[: len(ct) // 2])
    (d / "noise.nii.gz").write_bytes(rng.bytes(5000))
    (d / "noise.png").write_bytes(rng.bytes(5000))
    (d / "noise.dcm").write_bytes(rng.bytes(5000))
    aff = np.eye(4)
    nib.save(nib.Nifti1Image(rng.random((5, 5, 5, 2)).astype(np.float32), aff), str(d / "four_d.nii.gz"))
    nib.save(nib.Nifti1Image(np.arange(10, dtype=np.float32), aff), str(d / "one_d.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), aff), str(d / "zeros.nii.gz"))
    Image.fromarray(np.full((20, 30), 9, np.uint8)).save(d / "flat.png")
    vol = rng.random((6, 5, 4)).astype(np.float32)
    vol[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(vol, aff), str(d / "nan.nii.gz"))
    write_nifti_header_only(d / "huge.nii", (4096, 4096, 4096))  # promises 128 GiB, holds none
    expected = {
        "missing.nii.gz": "no such file",
        "truncated.nii.gz": "cannot read nifti file",
        "noise.nii.gz": "cannot read nifti file",
        "noise.png": "cannot read image2d file",
        "noise.dcm": "not a readable DICOM file",
        "four_d.nii.gz": "4D array of shape (5, 5, 5, 2)",
        "one_d.nii.gz": "1D array of shape (10,)",
        "zeros.nii.gz": "constant image (every voxel is 0)",
        "flat.png": "constant image (every voxel is 9)",
        "nan.nii.gz": "1 NaN/Inf voxel out of 120; refusing to guess",
        "huge.nii": "4096x4096x4096 = 68,719,476,736 voxels is over the limit of 268,435,456",
    }
    out = tmp_path / "out"
    proc = run_cli([d / name for name in expected] + ["--output", out], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errs = error_lines(proc.stderr)
    assert len(errs) == len(expected), proc.stderr
    for err, (name, problem) in zip(errs, expected.items()):
        assert f"{d / name}:" in err and problem in err, (name, err)
    assert f"all {len(expected)} inputs failed; nothing was segmented" in proc.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.dcm"])
def test_random_bytes_volume_or_dicom_alone(tmp_path, name):
    bad = tmp_path / name
    bad.write_bytes(np.random.default_rng(2).bytes(8192))
    proc = run_cli([bad, "--output", tmp_path / "out"], cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (err,) = error_lines(proc.stderr)
    assert str(bad) in err and ("cannot read" in err or "not a readable DICOM" in err)
    assert not (tmp_path / "out").exists()


def test_max_voxels_flag(data_root, tmp_path):
    proc = run_cli([data_root / POLYP, "--output", tmp_path / "out", "--max_voxels", "1000"], cwd=tmp_path)
    assert proc.returncode != 0
    (err,) = error_lines(proc.stderr)
    assert POLYP.split("/")[-1] in err and "256x256 = 65,536 voxels is over the limit of 1,000" in err
    assert not (tmp_path / "out").exists()
    proc = run_cli([data_root / POLYP, "--output", tmp_path / "out", "--max_voxels", "-3"], cwd=tmp_path)
    assert proc.returncode == 2 and "max_voxels" in error_lines(proc.stderr)[0]
    assert not (tmp_path / "out").exists()


def two_series_folder(data_root: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """One folder holding two CT series written from the real CT: 2 slices and 1 slice."""
    src = nib.load(str(data_root / CT))
    folder = tmp_path / "two"
    folder.mkdir()
    uids = []
    for tag, (z0, z1) in (("A", (15, 17)), ("B", (20, 21))):
        sub = tmp_path / tag
        uids.append(write_ct_dicom_series(np.asarray(src.dataobj)[:, :, z0:z1], src.affine, sub)["series"])
        for f in sub.iterdir():
            f.rename(folder / f"{tag}_{f.name}")
        sub.rmdir()
    return folder, uids


def test_resolve_inputs_series_choice(data_root, tmp_path):
    from automedsam.segment import resolve_inputs

    folder, uids = two_series_folder(data_root, tmp_path)
    items, _ = resolve_inputs([folder], series_uid=None)
    assert [(i.path, i.series_uid) for i in items] == [(folder, None)]  # fails when read, listing both
    items, _ = resolve_inputs([folder])  # the API default: every series
    assert sorted(i.series_uid for i in items) == sorted(uids)
    items, _ = resolve_inputs([folder], series_uid=uids[1])
    assert [(i.path, i.series_uid, i.stem) for i in items] == [(folder, uids[1], "two")]
    items, _ = resolve_inputs([folder], series_uid="1.2.3")
    assert [(i.path, i.series_uid) for i in items] == [(folder, "1.2.3")]  # fails when read, listing both


def test_dicom_folder_with_two_series_refused_or_chosen_by_flag(data_root, weights_args, tmp_path):
    folder, (uid_a, uid_b) = two_series_folder(data_root, tmp_path)
    out = tmp_path / "out"
    proc = run_cli([folder, "--output", out, "--quiet", *weights_args], cwd=tmp_path)
    assert proc.returncode != 0
    (err,) = error_lines(proc.stderr)
    assert f"{folder}: folder holds 2 DICOM series:" in err and uid_a in err and uid_b in err
    assert "2 files" in err and "1 files" in err and "--series_uid" in err
    assert _no_outputs(out)
    proc = run_cli([folder, "--output", out, "--series_uid", "1.2.3", "--quiet", *weights_args], cwd=tmp_path)
    assert proc.returncode != 0
    (err,) = error_lines(proc.stderr)
    assert "no DICOM series with uid 1.2.3; found:" in err and uid_a in err and uid_b in err
    assert _no_outputs(out)
    proc = run_cli([folder, "--output", out, "--series_uid", uid_b, "--classes", "liver", "--quiet", *weights_args],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((out / "two_report.json").read_text())
    assert rep["series_uid"] == uid_b and rep["slices"] == 1
    assert nib.load(str(out / "two_seg.nii.gz")).shape == (122, 101, 1)


def _without_root_overrides():
    """preexec_fn for root: drop the capabilities that let root write whatever the mode bits say
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER) from the bounding set before exec."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_output_folder_not_writable(data_root, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    extra = {"preexec_fn": _without_root_overrides} if os.geteuid() == 0 else {}
    try:
        for out, problem in ((locked, f"output folder {locked} is not writable"),
                             (locked / "sub" / "out", f"output folder {locked / 'sub' / 'out'} cannot be made: "
                                                      f"{locked} is not writable")):
            proc = subprocess.run(automedsam_cmd() + ["segment", str(data_root / POLYP), "--output", str(out)],
                                  cwd=tmp_path, capture_output=True, text=True, timeout=300, **extra)
            assert proc.returncode == 2, proc.stderr
            (err,) = error_lines(proc.stderr)
            assert problem in err, err
            assert "Traceback" not in proc.stderr
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


_KILL_MID_WRITE = r"""
import os, signal, sys
import automedsam.outputs as S  # where the staged writer lives

target = sys.argv[1]
original = S._Staged.write

def write(self, final, writer):
    if final.name != target:
        return original(self, final, writer)
    def half_then_die(tmp):
        writer(tmp)
        with open(tmp, "r+b") as fh:
            fh.truncate(os.path.getsize(tmp) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, final, half_then_die)

S._Staged.write = write
from automedsam.cli import main
main(sys.argv[2:])
"""


def _complete_output_sets(out: Path) -> dict[str, list[str]]:
    """Every file under a final name must be whole (PNGs decode, JSON parses) and every report's
    outputs must exist; returns {stem: output names} of the reports."""
    sets = {}
    for p in out.iterdir():
        if p.name.startswith(".tmp-"):
            continue
        if p.suffix == ".png":
            with Image.open(p) as im:
                im.load()  # raises on a truncated file
        elif p.suffix == ".json":
            rep = json.loads(p.read_text())
            assert all(Path(v).is_file() for v in rep["outputs"].values()), rep["outputs"]
            sets[rep["stem"]] = sorted(Path(v).name for v in rep["outputs"].values())
    return sets


def test_killing_segment_leaves_no_partial_file_under_a_final_name(data_root, weights_args, tmp_path):
    import signal
    import time

    folder = tmp_path / "in"
    folder.mkdir()
    names = sorted(p.name for p in (data_root / "polyp/kvasir-seg/images").glob("*.jpg"))[:4]
    for i, n in enumerate(names):
        (folder / f"{'abcd'[i]}.jpg").write_bytes((data_root / "polyp/kvasir-seg/images" / n).read_bytes())

    # 1. killed while b's overlay is half written: a is complete, nothing of b under a final name
    out = tmp_path / "out1"
    script = tmp_path / "kill_mid_write.py"
    script.write_text(_KILL_MID_WRITE)
    proc = subprocess.run([sys.executable, str(script), "b_overlay.png", "segment", str(folder), "--output", str(out),
                           "--quiet", *weights_args], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _complete_output_sets(out) == {"a": ["a_overlay.png", "a_report.json", "a_seg.png"]}
    final = sorted(p.name for p in out.iterdir() if not p.name.startswith(".tmp-"))
    assert final == ["a_overlay.png", "a_report.json", "a_seg.png"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".tmp-")], "the half-written temporary is there"

    # 2. killed from outside at an arbitrary moment after the first result: only whole files
    out = tmp_path / "out2"
    p = subprocess.Popen(automedsam_cmd() + ["segment", str(folder), "--output", str(out), "--quiet", *weights_args],
                         cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (out / "a_report.json").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(float(np.random.default_rng().uniform(0.0, 2.0)))
    p.send_signal(signal.SIGKILL)
    p.wait()
    sets = _complete_output_sets(out)
    assert "a" in sets
    # 3. the same command with --overwrite finishes the job
    proc = run_cli([folder, "--output", out, "--quiet", "--overwrite", *weights_args], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(_complete_output_sets(out)) == ["a", "b", "c", "d"]
