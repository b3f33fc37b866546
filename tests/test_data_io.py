"""Readers and writers of automedsam.data.io on real files (and a DICOM series written from the real CT)."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from automedsam.data.io import InputError, LoadedImage, list_dicom_series, load_image, load_label, save_label_map

pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")

CT = "abdomen-ct/totalseg-example/ct.nii.gz"
CT_LABEL = "abdomen-ct/totalseg-example/label.nii.gz"
BRATS = "brain-mri/brats/brats_2013_pat0003_1"
POLYP = "polyp/kvasir-seg/images/cju0qkwl35piu0993l0dewei2.jpg"
POLYP_MASK = "polyp/kvasir-seg/masks/cju0qkwl35piu0993l0dewei2.jpg"
XRAY = "chest-xray/shenzhen/images/CHNCXR_0001_0.png"
XRAY_MASK = "chest-xray/shenzhen/masks/CHNCXR_0001_0.png"


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_ct_series(vol_xyz: np.ndarray, affine_ras: np.ndarray, out_dir: Path, series_uid: str | None = None,
                    description: str = "test", seed: int = 0) -> list[Path]:
    """Write a volume as a CT Image Storage series with pydicom: real per-slice geometry tags
    (ImagePositionPatient, ImageOrientationPatient, PixelSpacing), rescale intercept, file
    names shuffled and InstanceNumber reversed so that only the positions give the order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    out_dir.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    sx, sy, sz = np.linalg.norm(lps[:3, :3], axis=0)
    xdir, ydir = lps[:3, 0] / sx, lps[:3, 1] / sy
    series_uid = series_uid or generate_uid()
    study_uid, for_uid = generate_uid(), generate_uid()
    nz = vol_xyz.shape[2]
    names = [f"IM{i:04d}" for i in range(nz)]
    random.Random(seed).shuffle(names)
    paths = []
    for k in range(nz):
        meta = FileMetaDataset()
        sop = generate_uid()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Test^Phantom", "T0001"
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = description, 1, nz - k
        ds.ImagePositionPatient = [f"{v:.6f}" for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in [*xdir, *ydir]]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]
        ds.SliceThickness = f"{sz:.6f}"
        plane = vol_xyz[:, :, k].T  # rows run along y, columns along x
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        ds.PixelData = (plane.astype(np.int32) + 1024).astype(np.int16).tobytes()
        path = out_dir / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def ct(data_root):
    return load_image(data_root / CT)


@pytest.fixture(scope="module")
def dicom_dir(data_root, tmp_path_factory):
    src = nib.load(data_root / CT)
    folder = tmp_path_factory.mktemp("dicom") / "series"
    write_ct_series(np.asanyarray(src.dataobj), src.affine, folder)
    return folder


# ------------------------------------------------------------------ readers


def test_nifti_ct(data_root, ct):
    src = nib.load(data_root / CT)
    raw = np.asanyarray(src.dataobj)
    assert ct.is_volume and ct.slices.shape == (30, 101, 122, 1) and ct.slices.dtype == np.float32
    assert ct.spacing == pytest.approx((3.0, 3.0, 3.0))
    np.testing.assert_allclose(ct.affine, src.affine, atol=1e-5)
    assert ct.native_shape == raw.shape
    # RAS storage turned to LPS: both in-plane axes flipped, slice k = vol[..., k].T
    np.testing.assert_array_equal(ct.slices[7, ..., 0], raw[::-1, ::-1, 7].T)
    native = load_image(data_root / CT, orientation=None)
    np.testing.assert_array_equal(native.slices[7, ..., 0], raw[:, :, 7].T)
    assert ct.meta["orientation"] == {"native": "RAS", "target": "LPS"}
    assert ct.modality_hint is None


def test_nifti_brats_and_label_round_trip(data_root, tmp_path):
    img = load_image(data_root / BRATS / "Flair_subtrMeanDivStd.nii.gz")
    assert img.slices.shape == (155, 240, 240, 1) and img.spacing == pytest.approx((1, 1, 1))
    lab = load_label(data_root / BRATS / "OTMultiClass.nii.gz", img)
    assert lab.shape == (155, 240, 240) and lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1, 2, 3, 4}
    raw = np.asanyarray(nib.load(data_root / BRATS / "OTMultiClass.nii.gz").dataobj)
    np.testing.assert_array_equal(img.labels_to_native(lab), raw)
    out = Path(save_label_map(lab, img, tmp_path / "brats_seg.nii.gz"))
    back = nib.load(out)
    assert back.get_data_dtype() == np.uint8 and back.shape == raw.shape
    np.testing.assert_allclose(back.affine, nib.load(data_root / BRATS / "Flair_subtrMeanDivStd.nii.gz").affine)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), raw)
    assert [p.name for p in tmp_path.iterdir()] == ["brats_seg.nii.gz"]  # no temporary left


def test_ct_label_saved_in_input_geometry(data_root, ct, tmp_path):
    lab = load_label(data_root / CT_LABEL, ct)
    assert lab.shape == (30, 101, 122) and lab.max() == 117
    out = save_label_map(lab, ct, tmp_path / "seg.nii.gz")
    back = nib.load(out)
    src = nib.load(data_root / CT_LABEL)
    assert back.shape == src.shape and back.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.asanyarray(src.dataobj))
    with pytest.raises(ValueError, match="NIfTI"):
        save_label_map(lab, ct, tmp_path / "seg.png")


def test_jpg_rgb_natural_orientation(data_root, tmp_path):
    img = load_image(data_root / POLYP)
    ref = np.asarray(Image.open(data_root / POLYP).convert("RGB"), dtype=np.float32)
    assert not img.is_volume and img.slices.shape == (1, 256, 256, 3)
    np.testing.assert_array_equal(img.slices[0], ref)
    np.testing.assert_array_equal(img.affine, np.eye(4))
    lab = load_label(data_root / POLYP_MASK, img)
    assert lab.shape == (1, 256, 256)
    ref_mask = np.asarray(Image.open(data_root / POLYP_MASK).convert("L"))
    np.testing.assert_array_equal(lab[0], ref_mask)


def test_png_grey_and_png_writer(data_root, tmp_path):
    img = load_image(data_root / XRAY)
    ref = np.asarray(Image.open(data_root / XRAY))
    assert img.slices.shape == (1, 512, 512, 1)
    np.testing.assert_array_equal(img.slices[0, ..., 0], ref)
    lab = (load_label(data_root / XRAY_MASK, img) > 127).astype(np.uint8) * 8
    out = save_label_map(lab, img, tmp_path / "lungs.png")
    back = np.asarray(Image.open(out))
    assert back.shape == (512, 512) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, lab[0])
    with pytest.raises(ValueError, match="PNG"):
        save_label_map(lab, img, tmp_path / "lungs.nii.gz")


def test_tiff_16bit_and_bmp(data_root, tmp_path):
    ref = np.asarray(Image.open(data_root / XRAY)).astype(np.uint16) * 200
    Image.fromarray(ref).save(tmp_path / "x.tif")
    img = load_image(tmp_path / "x.tif")
    np.testing.assert_array_equal(img.slices[0, ..., 0], ref.astype(np.float32))
    rgb = np.asarray(Image.open(data_root / POLYP).convert("RGB"))
    Image.fromarray(rgb).save(tmp_path / "p.bmp")
    np.testing.assert_array_equal(load_image(tmp_path / "p.bmp").slices[0], rgb.astype(np.float32))


def test_npz_2d_and_3d(data_root, ct, tmp_path):
    rgb = np.asarray(Image.open(data_root / POLYP).convert("RGB"))
    gts = (np.asarray(Image.open(data_root / POLYP_MASK).convert("L")) > 127).astype(np.uint8)
    np.savez_compressed(tmp_path / "polyp.npz", imgs=rgb, gts=gts)
    img = load_image(tmp_path / "polyp.npz")
    assert not img.is_volume and img.slices.shape == (1, 256, 256, 3)
    np.testing.assert_array_equal(img.slices[0], rgb.astype(np.float32))
    np.testing.assert_array_equal(load_label(tmp_path / "polyp.npz", img)[0], gts)

    raw = np.asanyarray(nib.load(data_root / CT).dataobj)
    zhw = np.ascontiguousarray(raw[:, :, 10:14].transpose(2, 1, 0))  # (Z,H,W) as MedSAM stores it
    lab = np.ascontiguousarray(np.asanyarray(nib.load(data_root / CT_LABEL).dataobj)[:, :, 10:14].transpose(2, 1, 0))
    np.savez_compressed(tmp_path / "ct.npz", imgs=zhw, gts=lab, spacing=np.array([3.0, 3.0, 3.0]))
    vol = load_image(tmp_path / "ct.npz")
    assert vol.is_volume and vol.slices.shape == (4, 101, 122, 1) and vol.spacing == (3.0, 3.0, 3.0)
    np.testing.assert_array_equal(vol.slices[..., 0], zhw.astype(np.float32))
    gl = load_label(tmp_path / "ct.npz", vol)
    np.testing.assert_array_equal(gl, lab)
    out = save_label_map(gl, vol, tmp_path / "ct_seg.npz")
    with np.load(out) as z:
        np.testing.assert_array_equal(z["segs"], lab)


def test_dicom_series_matches_nifti(data_root, ct, dicom_dir, tmp_path):
    before = {p.name: sha(p) for p in dicom_dir.iterdir()}
    dcm = load_image(dicom_dir)
    assert dcm.is_volume and dcm.slices.shape == ct.slices.shape
    np.testing.assert_array_equal(dcm.slices, ct.slices)  # same voxels, same slice order
    np.testing.assert_allclose(dcm.affine, ct.affine, atol=1e-4)
    assert dcm.spacing == pytest.approx(ct.spacing, abs=1e-5)
    assert dcm.modality_hint == "ct" and dcm.meta["dicom"]["modality"] == "CT"
    files = dcm.meta["dicom"]["files"]
    assert len(files) == 30 and len(set(dcm.meta["dicom"]["sop_instance_uids"])) == 30
    import pydicom

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ dcm.affine
    for k in (0, 13, 29):  # files[k] is voxel plane k, whatever the file names say
        ipp = np.asarray(pydicom.dcmread(files[k], stop_before_pixels=True).ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(ipp, (lps @ [0, 0, k, 1])[:3], atol=1e-3)
    # a label map for DICOM input goes to NIfTI on the same grid as the source NIfTI
    lab = load_label(data_root / CT_LABEL, ct)
    out = nib.load(save_label_map(lab, dcm, tmp_path / "seg.nii.gz"))
    np.testing.assert_allclose(out.affine, nib.load(data_root / CT).affine, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), np.asanyarray(nib.load(data_root / CT_LABEL).dataobj))
    assert {p.name: sha(p) for p in dicom_dir.iterdir()} == before  # input untouched


def test_single_dicom_file_is_2d(data_root, dicom_dir):
    raw = np.asanyarray(nib.load(data_root / CT).dataobj)
    first = load_image(dicom_dir).meta["dicom"]["files"][5]
    img = load_image(first)
    assert not img.is_volume and img.slices.shape == (1, 101, 122, 1)
    np.testing.assert_array_equal(img.slices[0, ..., 0], raw[:, :, 5].T)  # the DICOM pixel rows x columns


def test_dicom_folder_with_two_series(data_root, dicom_dir, tmp_path):
    from pydicom.uid import generate_uid

    src = nib.load(data_root / CT)
    vol = np.asanyarray(src.dataobj)[:, :, :6]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in dicom_dir.iterdir():
        (mixed / p.name).write_bytes(p.read_bytes())
    uid_b = generate_uid()
    write_ct_series(vol, src.affine, mixed / "sub", series_uid=uid_b, description="second")
    for p in (mixed / "sub").iterdir():
        p.rename(mixed / f"B_{p.name}")
    (mixed / "sub").rmdir()
    (mixed / "notes.txt").write_text("not dicom")
    series = list_dicom_series(mixed)
    assert len(series) == 2
    with pytest.raises(InputError, match=r"mixed: folder holds 2 DICOM series: .*" + uid_b.replace(".", r"\.")):
        load_image(mixed)
    small = load_image(mixed, series_uid=uid_b)
    assert small.slices.shape == (6, 101, 122, 1)
    with pytest.raises(InputError, match="no DICOM series with uid 1.2.3"):
        load_image(mixed, series_uid="1.2.3")


def test_orientation_round_trip_oblique(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 200, size=(9, 11, 7)).astype(np.int16)
    c, s = np.cos(0.3), np.sin(0.3)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[0, -c, s], [-1, 0, 0], [0, s, c]]) @ np.diag([1.5, 0.8, 2.5])
    nib.save(nib.Nifti1Image(data, aff), tmp_path / "obl.nii.gz")
    img = load_image(tmp_path / "obl.nii.gz")
    assert img.meta["orientation"]["target"] == "LPS"
    labels = img.slices[..., 0].astype(np.uint8)  # any slice-shaped array goes back exactly
    np.testing.assert_array_equal(img.labels_to_native(labels), data.astype(np.uint8))
    out = nib.load(save_label_map(labels, img, tmp_path / "obl_seg.nii.gz"))
    np.testing.assert_allclose(out.affine, aff, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), data)


# ------------------------------------------------------------------ failures


def _bad(path: Path, match: str, **kw):
    with pytest.raises(InputError, match=match) as ei:
        load_image(path, **kw)
    msg = str(ei.value)
    assert str(path) in msg and "\n" not in msg, msg
    return msg


def test_missing_and_unsupported(tmp_path):
    _bad(tmp_path / "nothere.nii.gz", "no such file")
    (tmp_path / "a.txt").write_text("hello")
    _bad(tmp_path / "a.txt", "unsupported file type")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    _bad(empty, "no DICOM image files")


@pytest.mark.parametrize("name", ["junk.nii.gz", "junk.nii", "junk.png", "junk.jpg", "junk.npz", "junk.dcm",
                                  "junk.mha"])
def test_random_bytes(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(np.random.default_rng(1).bytes(5000))
    _bad(p, "cannot read|not a readable")


def test_truncated_files(data_root, tmp_path):
    cases = ((CT, "ct.nii.gz"), (POLYP, "p.jpg"), (XRAY, "x.png"))
    before = {rel: sha(data_root / rel) for rel, _ in cases}
    for rel, name in cases:
        data = (data_root / rel).read_bytes()
        p = tmp_path / name
        p.write_bytes(data[: len(data) // 2])
        _bad(p, "cannot read")
        assert sha(p) == hashlib.sha256(data[: len(data) // 2]).hexdigest()  # the truncated copy is only read
    assert {rel: sha(data_root / rel) for rel, _ in cases} == before  # sources are only read


def test_bad_arrays(tmp_path):
    aff = np.eye(4)
    nib.save(nib.Nifti1Image(np.arange(10, dtype=np.float32), aff), tmp_path / "one_d.nii.gz")
    _bad(tmp_path / "one_d.nii.gz", "1D array")
    nib.save(nib.Nifti1Image(np.random.rand(5, 5, 5, 2).astype(np.float32), aff), tmp_path / "four_d.nii.gz")
    _bad(tmp_path / "four_d.nii.gz", "4D array")
    nib.save(nib.Nifti1Image(np.full((5, 5, 5), 7, np.int16), aff), tmp_path / "flat.nii.gz")
    _bad(tmp_path / "flat.nii.gz", "constant image")
    vol = np.random.rand(5, 5, 5).astype(np.float32)
    vol[1, 2, 3] = np.nan
    vol[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(vol, aff), tmp_path / "nan.nii.gz")
    _bad(tmp_path / "nan.nii.gz", "2 NaN/Inf voxels")
    Image.fromarray(np.full((20, 30), 9, np.uint8)).save(tmp_path / "flat.png")
    _bad(tmp_path / "flat.png", "constant image")
    np.savez(tmp_path / "one_d.npz", imgs=np.arange(5.0))
    _bad(tmp_path / "one_d.npz", "1D")
    np.savez(tmp_path / "nokey.npz", images=np.ones((4, 4)))
    _bad(tmp_path / "nokey.npz", "no 'imgs' array")
    np.savez(tmp_path / "four.npz", imgs=np.random.rand(2, 3, 4, 5))
    _bad(tmp_path / "four.npz", "4D")


def test_label_mismatch(data_root, ct, tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), tmp_path / "small.nii.gz")
    with pytest.raises(InputError, match="small.nii.gz: label shape"):
        load_label(tmp_path / "small.nii.gz", ct)
    prob = np.random.default_rng(0).random((122, 101, 30)).astype(np.float32)
    nib.save(nib.Nifti1Image(prob, nib.load(data_root / CT).affine), tmp_path / "prob.nii.gz")
    with pytest.raises(InputError, match="non-integer"):
        load_label(tmp_path / "prob.nii.gz", ct)


def test_inputs_never_modified(data_root):
    paths = [data_root / CT, data_root / POLYP, data_root / XRAY]
    before = [(sha(p), os.stat(p).st_mtime_ns) for p in paths]
    for p in paths:
        assert isinstance(load_image(p), LoadedImage)
    assert [(sha(p), os.stat(p).st_mtime_ns) for p in paths] == before


def test_constant_and_all_zero_images_are_refused(tmp_path):
    aff = np.eye(4)
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), aff), tmp_path / "zeros.nii.gz")
    _bad(tmp_path / "zeros.nii.gz", r"constant image \(every voxel is 0\)")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "black.png")
    _bad(tmp_path / "black.png", r"constant image \(every voxel is 0\)")
    np.savez(tmp_path / "zeros.npz", imgs=np.zeros((3, 8, 8), np.uint8))
    _bad(tmp_path / "zeros.npz", "constant image")


def test_nan_and_inf_are_refused_not_guessed(tmp_path):
    """The policy: NaN/Inf voxels are refused (never replaced by a guess); the message says so."""
    vol = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    vol[0, 0, 0] = -np.inf
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "inf.nii.gz")
    msg = _bad(tmp_path / "inf.nii.gz", "1 NaN/Inf voxel out of 120")
    assert "refusing to guess" in msg


def write_nifti_header_only(path: Path, shape, dtype=np.int16) -> Path:
    """A .nii whose header promises ``shape`` but that holds no voxel data at all."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["vox_offset"] = 352
    path.write_bytes(hdr.binaryblock + b"\0" * 4)
    return path


def test_max_voxels_refused_from_the_header_before_reading(data_root, dicom_dir, tmp_path, monkeypatch):
    import time

    from automedsam.data.io import DEFAULT_MAX_VOXELS, header_voxels

    # a header promising 4096^3 int16 voxels (128 GiB): refused from the header in well under a
    # second (the file holds no data, so reading it would fail with another message)
    huge = write_nifti_header_only(tmp_path / "huge.nii", (4096, 4096, 4096))
    t = time.perf_counter()
    msg = _bad(huge, r"4096x4096x4096 = 68,719,476,736 voxels is over the limit of 268,435,456 voxels; refused "
                     r"before reading")
    assert time.perf_counter() - t < 5 and "--max_voxels" in msg
    assert DEFAULT_MAX_VOXELS == 2 ** 28
    # the limit is configurable: argument, then $AUTOMEDSAM_MAX_VOXELS; 0 = no limit
    _bad(data_root / CT, r"122x101x30 = 369,660 voxels is over the limit of 1,000", max_voxels=1000)
    assert load_image(data_root / CT, max_voxels=369_660).num_slices == 30
    monkeypatch.setenv("AUTOMEDSAM_MAX_VOXELS", "60000")
    _bad(data_root / POLYP, r"256x256 = 65,536 voxels is over the limit of 60,000")
    assert load_image(data_root / POLYP, max_voxels=0).slice_shape == (256, 256)
    monkeypatch.delenv("AUTOMEDSAM_MAX_VOXELS")
    # every reader's header: MHA, npz, a DICOM file, a DICOM series (sum over its files)
    import itk

    itk.imwrite(itk.image_from_array(np.arange(120, dtype=np.int16).reshape(4, 5, 6)), str(tmp_path / "v.mha"))
    assert header_voxels(tmp_path / "v.mha") == (120, (6, 5, 4))
    _bad(tmp_path / "v.mha", "120 voxels is over the limit of 100", max_voxels=100)
    np.savez(tmp_path / "v.npz", imgs=np.arange(300, dtype=np.uint8).reshape(3, 10, 10))
    assert header_voxels(tmp_path / "v.npz") == (300, (3, 10, 10))
    _bad(tmp_path / "v.npz", "300 voxels is over", max_voxels=299)
    one = sorted(dicom_dir.iterdir())[0]
    _bad(one, "12,322 voxels is over", max_voxels=12_000)
    _bad(dicom_dir, "369,660 voxels is over the limit of 369,659", max_voxels=369_659)
    with pytest.raises(ValueError, match="max_voxels"):
        load_image(data_root / POLYP, max_voxels=-1)
    # an unreadable header is left to the reader, which names the problem
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(np.random.default_rng(3).bytes(3000))
    assert header_voxels(junk) is None
    _bad(junk, "cannot read", max_voxels=10)


# ------------------------------------------------------------------------------------ the one pipeline


@pytest.mark.parametrize("kind", ["nifti_ras", "nifti_las_2d", "png_rgb", "npz_volume", "npz_2d"])
def test_pipeline_round_trip_puts_each_voxel_back_where_it_was(kind, tmp_path):
    """A marked voxel goes through the pipeline's loading (load_image) and comes back through its
    inverse (labels_to_native) at the same place of the input's own grid; the working slice shows
    it where a viewer would (LPS for volumes: patient's left on the image's right)."""
    import nibabel as nib
    from PIL import Image

    rng = np.random.default_rng(1)
    if kind.startswith("nifti"):
        shape = (7, 5, 4) if kind == "nifti_ras" else (6, 9)
        vol = rng.integers(0, 50, size=shape).astype(np.int16)
        where = (5, 1, 2) if len(shape) == 3 else (4, 7)
        vol[where] = 1000
        aff = np.diag([0.8, 1.2, 2.5, 1.0]) if kind == "nifti_ras" else np.diag([-1.0, 1.0, 1.0, 1.0])
        path = tmp_path / "v.nii.gz"
        nib.save(nib.Nifti1Image(vol, aff), str(path))
    elif kind == "png_rgb":
        img = rng.integers(0, 100, size=(9, 14, 3)).astype(np.uint8)  # rows x columns, not square
        where = (2, 11)
        img[where] = 255
        path = tmp_path / "i.png"
        Image.fromarray(img).save(path)
    else:
        shape = (5, 8, 6) if kind == "npz_volume" else (8, 6)
        arr = rng.integers(0, 100, size=shape).astype(np.float32)
        where = (3, 6, 1) if len(shape) == 3 else (6, 1)
        arr[where] = 500
        path = tmp_path / "m.npz"
        np.savez(path, imgs=arr)
    loaded = load_image(path)
    raw = loaded.slices.max(-1)
    k, r, c = np.unravel_index(np.argmax(raw), raw.shape)
    mark = np.zeros(raw.shape, np.uint8)
    mark[k, r, c] = 1
    native = loaded.labels_to_native(mark)
    assert native.shape == loaded.native_shape
    where = where + (0,) * (native.ndim - len(where))  # a 2D NIfTI is a one-slice volume
    assert tuple(int(i) for i in np.argwhere(native)[0]) == where
    if kind == "nifti_ras":  # RAS -> LPS flips x and y: row = Y-1-y, column = X-1-x, slice z
        assert (k, r, c) == (2, 5 - 1 - 1, 7 - 1 - 5)
    if kind == "png_rgb":
        assert loaded.slice_shape == (9, 14) and (r, c) == where
    if kind == "nifti_las_2d":  # LAS -> LPS flips y only: row = Y-1-y, column = x
        assert (k, r, c) == (0, 9 - 1 - 7, 4)


def test_cli_and_bundle_build_the_same_pipeline():
    """One chain: the bundle's preprocessing is automedsam.pipeline's, with the same transforms in
    the same order as the loading load_image runs (plus the normalisation)."""
    from monai.bundle import ConfigParser

    from automedsam import pipeline

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "bundles" / "automedsam" / "configs" / "inference.yaml"))
    parser.parse()
    pre = parser.get_parsed_content("preprocessing", instantiate=True)
    names = [type(t).__name__ for t in pre.transforms]
    assert names == [type(t).__name__ for t in pipeline.loading()] + ["NormaliseModalityd"]
    assert names == ["LoadInputd", "EnsureChannelFirstd", "SliceLayoutd", "NormaliseModalityd"]
