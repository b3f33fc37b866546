"""DICOM as it comes from the field (issue 15 item 2, issue 19 items 2, 3 and 9): series written
with pydicom the way anonymised PACS/research exports look - files named ``CT.<uid>`` with no
suffix, SeriesInstanceUID/StudyInstanceUID empty, shuffled file order, compressed transfer
syntaxes, a DICOMDIR, junk beside the series, duplicate and missing slices - read by
``load_image`` and segmented end to end, label map geometry and DICOM-SEG references checked.

Pixels: a few slices of the real CT (../shared/data) when it is there, else a generated phantom
with the same geometry (the reading code does not care which).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from automedsam.classes import CLASS_IDS
from automedsam.data.dicom import is_dicom, list_dicom_series
from automedsam.data.io import InputError, input_kind, load_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
CT = REPO.parent / "shared" / "data" / "abdomen-ct" / "totalseg-example" / "ct.nii.gz"
Z0, NZ = 14, 4  # CT slices 14..17 hold liver


def ct_block() -> tuple[np.ndarray, np.ndarray]:
    """(X,Y,Z) int16 HU volume of NZ slices and its RAS affine: the real CT's or a phantom."""
    if CT.is_file():
        img = nib.load(str(CT))
        sub = img.slicer[:, :, Z0:Z0 + NZ]
        return np.asarray(sub.dataobj).astype(np.int16), sub.affine
    x, y = np.meshgrid(np.arange(122), np.arange(101), indexing="ij")
    body = ((x - 61) / 55.0) ** 2 + ((y - 50) / 42.0) ** 2 < 1
    organ = ((x - 45) / 20.0) ** 2 + ((y - 45) / 16.0) ** 2 < 1
    vol = np.where(body, 40, -1000).astype(np.int16)[..., None].repeat(NZ, 2)
    vol[organ] = 60
    vol += np.arange(NZ, dtype=np.int16)[None, None] * 3
    aff = np.array([[-3.0, 0, 0, 180], [0, -3.0, 0, 150], [0, 0, 3.0, -200], [0, 0, 0, 1]])
    return vol, aff


def sha_tree(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _encode(ds, stored: np.ndarray, syntax) -> None:
    """Pixel data in ``syntax``: pydicom's encoder when it has one here; JPEG 2000 through Pillow's
    OpenJPEG otherwise (pydicom's needs pylibjpeg-openjpeg); skipped when neither can."""
    from pydicom.encaps import encapsulate
    from pydicom.pixels.encoders.base import get_encoder
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    if syntax == ExplicitVRLittleEndian:
        ds.PixelData = stored.tobytes()
        return
    try:
        enc = get_encoder(syntax)
        available, missing = enc.is_available, "; ".join(enc.missing_dependencies)
    except NotImplementedError as e:
        available, missing = False, str(e)
    if available:
        ds.compress(syntax, stored, generate_instance_uid=False)
        return
    if syntax == JPEG2000Lossless:
        from PIL import Image, features

        if features.check("jpg_2000"):
            buf = io.BytesIO()
            Image.fromarray(stored).save(buf, format="JPEG2000", irreversible=False, no_jp2=True)
            ds.PixelData = encapsulate([buf.getvalue()])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = syntax
            return
    pytest.skip(f"{syntax.name}: no encoder here ({missing}) and no other way to write it")


def write_series(folder: Path, vol: np.ndarray, affine: np.ndarray, *, empty_uids: bool = True,
                 frame_of_reference: bool = True, syntax=None, seed: int = 0, drop=(), preamble: bool = True,
                 tilt_mm: float = 0.0) -> list[dict]:
    """A CT series as an anonymised export writes it: one file per slice named ``CT.<SOP UID>``
    (no suffix), written in shuffled order with InstanceNumber reversed (only the positions give
    the order), SeriesInstanceUID and StudyInstanceUID empty (``empty_uids``), unsigned 16-bit
    stored values with RescaleIntercept -2048. ``drop``: slice numbers not written (a gap);
    ``tilt_mm``: each slice shifted this much along the column direction (a gantry tilt)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    syntax = syntax or ExplicitVRLittleEndian
    folder.mkdir(parents=True, exist_ok=True)
    flip = np.diag([-1.0, -1.0, 1.0])
    a = np.asarray(affine, float)
    col_dir, row_dir = flip @ a[:3, 0], flip @ a[:3, 1]
    sx, sy = np.linalg.norm(col_dir), np.linalg.norm(row_dir)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    order = [k for k in range(vol.shape[2]) if k not in drop]
    random.Random(seed).shuffle(order)
    written = []
    for k in order:
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"CT.{sop}"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID = "" if empty_uids else study
        ds.SeriesInstanceUID = "" if empty_uids else series
        if frame_of_reference:
            ds.FrameOfReferenceUID = frame
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Anonymous^", "ANON"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20200101", "120000", "1"
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "abdomen", 2, vol.shape[2] - k
        ds.ImageOrientationPatient = [float(v) for v in (*(col_dir / sx), *(row_dir / sy))]
        ipp = flip @ (a @ np.array([0.0, 0.0, k, 1.0]))[:3] + k * tilt_mm * row_dir / sy
        ds.ImagePositionPatient = [round(float(v), 6) for v in ipp]
        ds.PixelSpacing = [float(sy), float(sx)]
        ds.SliceThickness = float(np.linalg.norm(a[:3, 2]))
        ds.RescaleIntercept, ds.RescaleSlope = -2048, 1
        stored = np.clip(vol[:, :, k].T.astype(np.int32) + 2048, 0, 65535).astype(np.uint16)
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        _encode(ds, stored, syntax)
        if preamble:
            ds.save_as(str(path), enforce_file_format=True)
        else:  # a bare data set (ACR-NEMA style): no preamble, no 'DICM', no file meta
            ds.preamble, ds.file_meta = None, FileMetaDataset()
            ds.save_as(str(path), implicit_vr=True, little_endian=True, enforce_file_format=False)
        written.append({"k": k, "path": path, "sop": sop})
    return sorted(written, key=lambda w: w["k"])


@pytest.fixture(scope="module")
def block():
    return ct_block()


@pytest.fixture(scope="module")
def clean(block, tmp_path_factory):
    folder = tmp_path_factory.mktemp("field") / "clean"
    files = write_series(folder, *block)
    return folder, files


def _bad(fn, match: str, name: str):
    with pytest.raises(InputError, match=match) as ei:
        fn()
    msg = str(ei.value)
    assert name in msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ------------------------------------------------------------------------------ recognising


def test_dicom_recognised_by_content_not_suffix(clean, tmp_path, block):
    folder, files = clean
    f = files[0]["path"]
    assert "." in f.name and not f.name.lower().endswith(".dcm")
    assert is_dicom(f) and input_kind(f) == "dicom_file"
    raw = write_series(tmp_path / "raw", *block, preamble=False, drop=range(1, NZ))[0]["path"]  # no 'DICM'
    assert raw.read_bytes()[128:132] != b"DICM" and is_dicom(raw)
    (tmp_path / "noise").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "noise.dcm").write_bytes(np.random.default_rng(1).bytes(3000))
    (tmp_path / "text").write_text("hello")
    assert not any(is_dicom(tmp_path / n) for n in ("noise", "noise.dcm", "text"))
    _bad(lambda: load_image(tmp_path / "noise.dcm"), "not a readable DICOM file", "noise.dcm")


def test_empty_uids_no_suffix_shuffled_series_reads_like_the_nifti(clean, block, tmp_path):
    folder, files = clean
    vol, affine = block
    # junk beside the series: a text file, random bytes, an empty file
    mixed = tmp_path / "export"
    shutil.copytree(folder, mixed)
    (mixed / "README.txt").write_text("exported")
    (mixed / "LOCKFILE").write_bytes(np.random.default_rng(2).bytes(700))
    (mixed / "VERSION").write_bytes(b"")
    before = sha_tree(mixed)
    series = list_dicom_series(mixed)
    assert len(series) == 1 and len(series[0]["files"]) == NZ and series[0]["uid_generated"]
    assert list_dicom_series(mixed)[0]["uid"] == series[0]["uid"]  # the generated UID is stable
    img = load_image(mixed)
    assert img.is_volume and img.native_shape == vol.shape
    np.testing.assert_allclose(img.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(img.labels_to_native(img.slices[..., 0]), vol)  # HU, in NIfTI voxel order
    d = img.meta["dicom"]
    assert [Path(p).name for p in d["files"]] == [f["path"].name for f in files]  # slice order from positions
    assert d["sop_instance_uids"] == [f["sop"] for f in files] and d["planes"] == list(range(NZ))
    assert d["series_uid"] == series[0]["uid"] and set(d["generated_uids"]) == {"SeriesInstanceUID",
                                                                                "StudyInstanceUID"}
    notes = " | ".join(img.notes)
    assert "SeriesInstanceUID empty in the files" in notes and "grouped into one series by FrameOfReferenceUID" in notes
    assert "generated" in notes and d["series_uid"] in notes
    assert "3 other file(s) in the folder skipped" in notes
    assert sha_tree(mixed) == before  # the input is only read


def test_two_uidless_series_are_told_apart(block, tmp_path):
    vol, affine = block
    folder = tmp_path / "two"
    write_series(folder, vol, affine, seed=1)
    other = tmp_path / "other"
    write_series(other, vol[:, :, :3], affine, seed=2)
    import pydicom

    for f in other.iterdir():  # a second reconstruction: other series number and description
        ds = pydicom.dcmread(f)
        ds.SeriesNumber, ds.SeriesDescription = 5, "soft tissue"
        ds.save_as(folder / f.name)
    series = list_dicom_series(folder)
    assert sorted(len(s["files"]) for s in series) == [3, NZ] and len({s["uid"] for s in series}) == 2
    _bad(lambda: load_image(folder), "folder holds 2 DICOM series", "two")
    small = load_image(folder, series_uid=next(s["uid"] for s in series if len(s["files"]) == 3))
    assert small.native_shape == (*vol.shape[:2], 3)


def test_missing_frame_of_reference_is_generated_and_said(block, tmp_path):
    folder = tmp_path / "nofor"
    write_series(folder, *block, frame_of_reference=False)
    img = load_image(folder)
    d = img.meta["dicom"]
    assert "FrameOfReferenceUID" in d["generated_uids"] and d["frame_of_reference_uid"]
    assert any("FrameOfReferenceUID" in n for n in img.notes)


@pytest.mark.parametrize("syntax_name", ["JPEGLSLossless", "JPEG2000Lossless", "RLELossless"])
def test_compressed_transfer_syntaxes_decode_to_the_same_pixels(block, tmp_path, syntax_name):
    import pydicom
    import pydicom.uid

    syntax = getattr(pydicom.uid, syntax_name)
    vol, affine = block
    folder = tmp_path / syntax_name
    files = write_series(folder, vol, affine, syntax=syntax)
    assert pydicom.dcmread(files[0]["path"]).file_meta.TransferSyntaxUID == syntax
    img = load_image(folder)
    np.testing.assert_array_equal(img.labels_to_native(img.slices[..., 0]), vol)
    np.testing.assert_allclose(img.affine, affine, atol=1e-4)


def test_dicomdir(block, tmp_path):
    from pydicom.fileset import FileSet

    files = write_series(tmp_path / "src", *block, empty_uids=False)  # a DICOMDIR's records need the UIDs
    fs = FileSet()
    for f in files:
        fs.add(str(f["path"]))
    media = tmp_path / "media"
    fs.write(str(media))  # DICOMDIR + files renamed under sub-folders, as on a CD
    assert (media / "DICOMDIR").is_file() and not [p for p in media.iterdir() if p.is_file() and p.name != "DICOMDIR"]
    for path in (media, media / "DICOMDIR"):
        img = load_image(path)
        assert img.native_shape == block[0].shape
        np.testing.assert_allclose(img.affine, block[1], atol=1e-4)
        np.testing.assert_array_equal(img.labels_to_native(img.slices[..., 0]), block[0])
        assert any("DICOMDIR" in n for n in img.notes)


def test_gantry_tilt_keeps_the_true_geometry(block, tmp_path):
    vol, affine = block
    folder = tmp_path / "tilt"
    write_series(folder, vol, affine, tilt_mm=1.5)
    img = load_image(folder)
    flip = np.diag([-1.0, -1.0, 1.0])
    ipp0 = flip @ affine[:3, 3]
    row_dir = flip @ affine[:3, 1] / np.linalg.norm(affine[:3, 1])  # the writer's shift per slice
    step = flip @ affine[:3, 2] + 1.5 * row_dir
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    np.testing.assert_allclose(lps[:3, 3], ipp0, atol=1e-4)
    np.testing.assert_allclose(lps[:3, 2], step, atol=1e-4)  # the slices' real step, a shear
    assert img.voxel_ml == pytest.approx(abs(np.linalg.det(img.affine[:3, :3])) / 1000)


# ------------------------------------------------------------------------------ duplicates, gaps


def test_identical_duplicate_slice_is_dropped_and_said(clean, block, tmp_path):
    folder, files = clean
    dup = tmp_path / "dup"
    shutil.copytree(folder, dup)
    shutil.copy(files[1]["path"], dup / "copy_of_slice_1")
    img = load_image(dup)
    ref = load_image(folder)
    assert img.native_shape == ref.native_shape
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-6)
    assert img.spacing == pytest.approx(ref.spacing)
    np.testing.assert_array_equal(img.slices, ref.slices)
    (note,) = [n for n in img.notes if "duplicate slice dropped" in n]
    assert {"copy_of_slice_1", files[1]["path"].name} <= set(note.replace("(", " ").replace(")", " ").split())
    assert len(img.meta["dicom"]["files"]) == NZ


def test_same_position_different_pixels_is_refused(clean, tmp_path):
    import pydicom

    folder, files = clean
    bad = tmp_path / "conflict"
    shutil.copytree(folder, bad)
    ds = pydicom.dcmread(files[2]["path"])
    arr = ds.pixel_array.copy()
    arr[10:20, 10:20] += 100
    ds.PixelData = arr.tobytes()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(bad / "other_at_slice_2")
    msg = _bad(lambda: load_image(bad), "same slice position", "conflict")
    assert "other_at_slice_2" in msg and files[2]["path"].name in msg


def test_gap_refused_unless_allowed_then_true_geometry(clean, block, tmp_path):
    folder, files = clean
    vol, affine = block
    gap = tmp_path / "gap"
    written = {w["k"]: w["path"].name for w in write_series(gap, vol, affine, drop=(2,))}
    msg = _bad(lambda: load_image(gap), "not evenly spaced", "gap")
    step = float(np.linalg.norm(affine[:3, 2]))
    assert f"{2 * step:.3g} mm between {written[1]} and {written[3]} (elsewhere {step:.3g} mm)" in msg
    assert "allow_gaps" in msg
    img = load_image(gap, allow_gaps=True)
    ref = load_image(folder)
    assert img.native_shape == ref.native_shape  # the missing plane is back, on the uniform grid
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)
    assert img.voxel_ml == pytest.approx(ref.voxel_ml)
    d = img.meta["dicom"]
    assert d["planes"] == [0, 1, 3] and len(d["files"]) == 3
    got, want = img.labels_to_native(img.slices[..., 0]), vol.astype(np.float32)
    for k in (0, 1, 3):
        np.testing.assert_array_equal(got[..., k], want[..., k])  # real slices untouched
    np.testing.assert_allclose(got[..., 2], (want[..., 1] + want[..., 3]) / 2, atol=1e-3)  # interpolated
    assert any("gap in the slice positions" in n and "1 plane(s) filled" in n for n in img.notes)


# ------------------------------------------------------------------------------ not images


def _minimal(path: Path, modality: str, sop_class, pixels: bool):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, meta.MediaStorageSOPInstanceUID, modality
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    if modality == "CT":
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 8, 8, 16, 1
        if pixels:
            ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_non_images_named_with_what_they_are(tmp_path):
    from pydicom.uid import CTImageStorage, RTStructureSetStorage

    rt = _minimal(tmp_path / "RS.struct", "RTSTRUCT", RTStructureSetStorage, False)
    nopix = _minimal(tmp_path / "header_only.dcm", "CT", CTImageStorage, False)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    _bad(lambda: load_image(rt), r"DICOM RTSTRUCT \(RT Structure Set Storage\), not an image", "RS.struct")
    _bad(lambda: load_image(nopix), r"DICOM CT \(CT Image Storage\) without pixel data", "header_only.dcm")
    _bad(lambda: load_image(empty), r"empty file \(0 bytes\)", "empty.dcm")
    folder = tmp_path / "only_rt"
    folder.mkdir()
    shutil.copy(rt, folder / "RS1")
    shutil.copy(nopix, folder / "CT1")
    msg = _bad(lambda: load_image(folder), "no DICOM image files in this folder", "only_rt")
    assert "RS1: DICOM RTSTRUCT" in msg and "CT1: DICOM CT" in msg and "without pixel data" in msg


def test_series_with_a_header_only_file_skips_it_and_says_so(clean, tmp_path):
    from pydicom.uid import CTImageStorage

    folder, _ = clean
    mixed = tmp_path / "with_header_only"
    shutil.copytree(folder, mixed)
    _minimal(mixed / "DOSE_INFO", "CT", CTImageStorage, False)
    img = load_image(mixed)
    assert img.num_slices == NZ and any("DOSE_INFO" in n for n in img.notes)


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def field_run(clean, tmp_path_factory):
    """``automedsam segment FOLDER --output out`` on the anonymised export (junk beside it)."""
    from test_segment import run_cli

    folder, files = clean
    export = tmp_path_factory.mktemp("e2e") / "CT_export"
    shutil.copytree(folder, export)
    (export / "notes.txt").write_text("anonymised")
    before = sha_tree(export)
    out = export.parent / "out"
    proc = run_cli([export, "--output", out, "--classes", "liver", "--quiet"], cwd=export.parent)
    return proc, export, out, files, before


def test_anonymised_export_segments_with_geometry_and_dicom_seg(field_run, block):
    import highdicom as hd

    proc, export, out, files, before = field_run
    vol, affine = block
    assert proc.returncode == 0, proc.stderr
    assert "no inputs to segment" not in proc.stderr
    seg = nib.load(str(out / "CT_export_seg.nii.gz"))
    assert seg.shape == vol.shape and np.allclose(seg.affine, affine, atol=1e-4)
    rep = json.loads((out / "CT_export_report.json").read_text())
    notes = " | ".join(rep["input_notes"])
    assert "SeriesInstanceUID empty in the files" in notes and "generated" in notes
    labels = np.asarray(seg.dataobj)
    liver = rep["classes"]["liver"]
    assert liver["voxels"] == int((labels == CLASS_IDS["liver"]).sum())
    assert liver["volume_ml"] == pytest.approx(liver["voxels"] * abs(np.linalg.det(affine[:3, :3])) / 1000, abs=1e-3)
    if rep["classes_found"]:
        dcm = hd.seg.segread(str(out / "CT_export_seg.dcm"))
        refd = {u[2] for u in dcm.get_source_image_uids()}
        covered = [k for k in range(NZ) if (labels[:, :, k] > 0).any()]
        assert refd == {f["sop"] for f in files}  # the source images, by their SOP instance UIDs
        assert dcm.ReferencedSeriesSequence[0].SeriesInstanceUID == rep["series_uid"]
        assert rep["series_uid"] in notes  # the generated series UID is the one in the report
        assert int(dcm.NumberOfFrames) == len(covered)
    assert sha_tree(export) == before  # the input is only read


def test_gap_series_label_map_and_ml_match_the_series_without_the_gap(field_run, block, tmp_path):
    """The same export with its slice 2 missing, read with allow_gaps and segmented: the label map
    lies on the clean series' grid (same shape and affine), the real planes are segmented as in
    the clean run, the report's ml uses the true voxel size, and the DICOM-SEG references only the
    real files (the filled plane has no source image)."""
    import highdicom as hd

    from automedsam.segment import Segmenter

    proc, export, out, files, _ = field_run
    assert proc.returncode == 0, proc.stderr
    vol, affine = block
    gap = tmp_path / "gap_export"
    written = write_series(gap, vol, affine, drop=(2,))
    seg = Segmenter(progress=False, warn=lambda m: None)
    res = seg.segment_loaded(load_image(gap, allow_gaps=True), classes="liver", modality="ct", stem="gap")
    seg.write(res, tmp_path / "out")
    clean_map = nib.load(str(out / "CT_export_seg.nii.gz"))
    gap_map = nib.load(str(tmp_path / "out" / "gap_seg.nii.gz"))
    assert gap_map.shape == clean_map.shape
    np.testing.assert_allclose(gap_map.affine, clean_map.affine, atol=1e-4)
    a, b = np.asarray(clean_map.dataobj), np.asarray(gap_map.dataobj)
    liver = CLASS_IDS["liver"]
    for k in (0, 1, 3):  # the real slices: segmented as without the gap
        m, n = a[..., k] == liver, b[..., k] == liver
        assert 2 * (m & n).sum() / max(1, m.sum() + n.sum()) > 0.98
    rep = json.loads((tmp_path / "out" / "gap_report.json").read_text())
    clean_rep = json.loads((out / "CT_export_report.json").read_text())
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    st = rep["classes"]["liver"]
    assert st["volume_ml"] == pytest.approx(int((b == liver).sum()) * voxel_ml, abs=1e-3)
    # the ml differ by the filled plane's share only (the real planes agree to 2%)
    filled_ml = (int((b[..., 2] == liver).sum()) - int((a[..., 2] == liver).sum())) * voxel_ml
    clean_ml = clean_rep["classes"]["liver"]["volume_ml"]
    assert st["volume_ml"] - clean_ml == pytest.approx(filled_ml, abs=0.02 * clean_ml + 1e-3)
    assert any("gap in the slice positions" in n for n in rep["input_notes"])
    if st["voxels"]:
        dcm = hd.seg.segread(str(tmp_path / "out" / "gap_seg.dcm"))
        refd = {u[2] for u in dcm.get_source_image_uids()}
        assert refd == {w["sop"] for w in written}
        covered = [k for k in (0, 1, 3) if (b[..., k] > 0).any()]
        assert int(dcm.NumberOfFrames) == len(covered)
