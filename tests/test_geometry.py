"""Degenerate voxel geometry (issue 19 item 8): a singular or all-zero NIfTI sform is refused in
one line naming the file (it used to end in an internal ``TypeError``), a pixdim of 0 is said
in the notes for the report, and volumes in ml come from ``|det(affine)|``, not the product of
the affine's column norms (too large under shear)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from automedsam.data.geometry import check_affine, voxel_volume_mm3
from automedsam.data.io import InputError, load_image, save_label_map
from automedsam.report import class_statistics

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _data(shape=(8, 9, 5)):
    return np.random.default_rng(0).integers(0, 300, shape).astype(np.int16)


def _refused(path, match):
    with pytest.raises(InputError, match=match) as ei:
        load_image(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg and "NoneType" not in msg, msg
    return msg


def test_singular_sform_is_refused_in_one_line(tmp_path):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 2] = aff[:3, 0]  # the third voxel axis along the first: rank 2
    nib.save(nib.Nifti1Image(_data(), aff), tmp_path / "singular.nii.gz")
    msg = _refused(tmp_path / "singular.nii.gz", r"sform \(sform_code 2\) is singular \(its 3x3 part has rank 2\)")
    assert "sform_code 0" in msg  # says how to fix it


def test_all_zero_sform_is_refused_not_copied(tmp_path):
    img = nib.Nifti1Image(_data(), np.eye(4))
    img.set_sform(np.zeros((4, 4)), code=1)
    nib.save(img, tmp_path / "zero.nii.gz")
    _refused(tmp_path / "zero.nii.gz", r"sform \(sform_code 1\) is all zero")


def test_non_finite_affine_is_refused(tmp_path):
    aff = np.eye(4)
    aff[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN/Inf"):
        check_affine(tmp_path / "x.mha", aff)


def test_pixdim_zero_is_said_in_the_notes(tmp_path):
    img = nib.Nifti1Image(_data(), None)  # no sform/qform: the affine is built from pixdim
    img.header["pixdim"][1:4] = [0.0, 0.8, 0.0]
    img.header["sform_code"] = img.header["qform_code"] = 0
    nib.save(img, tmp_path / "pix0.nii.gz")
    loaded = load_image(tmp_path / "pix0.nii.gz")
    (note,) = loaded.notes
    assert "pix0.nii.gz" in note and "pixdim[1], pixdim[3] = 0" in note and "1 mm assumed" in note
    # an sform gives the grid: pixdim does not matter then, and nothing is said
    ok = nib.Nifti1Image(_data(), np.diag([0.8, 0.8, 2.0, 1.0]))
    ok.header["pixdim"][1:4] = 0
    nib.save(ok, tmp_path / "sform_ok.nii.gz")
    assert load_image(tmp_path / "sform_ok.nii.gz").notes == []


def test_shear_volume_from_the_determinant(tmp_path):
    aff = np.eye(4)
    aff[:3, :3] = [[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]  # sheared columns
    data = _data()
    nib.save(nib.Nifti1Image(data, aff), tmp_path / "shear.nii.gz")
    loaded = load_image(tmp_path / "shear.nii.gz")
    det = abs(np.linalg.det(aff[:3, :3]))
    norms = float(np.prod(np.linalg.norm(aff[:3, :3], axis=0)))
    assert norms > det * 1.04  # the column norms overstate the voxel here
    assert voxel_volume_mm3(loaded.affine) == pytest.approx(det)
    assert loaded.voxel_ml == pytest.approx(det / 1000)
    labels = np.zeros(loaded.slices.shape[:3], np.uint8)
    labels[1:3, 2:6, 2:7] = 1
    stats = class_statistics(labels, [1], np.ones((1, labels.shape[0])), np.ones((1, labels.shape[0])),
                             spacing=loaded.spacing, voxel_ml=loaded.voxel_ml)
    assert stats[list(stats)[0]]["volume_ml"] == pytest.approx(int(labels.sum()) * det / 1000, abs=1e-3)
    # the label map keeps the sheared affine
    out = nib.load(save_label_map(labels, loaded, tmp_path / "shear_seg.nii.gz"))
    np.testing.assert_allclose(out.affine, aff, atol=1e-6)
