"""MedSAM preprocessing and its inverse on real masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from automedsam.classes import CLASS_IDS, label_to_classes
from automedsam.data.io import load_image, load_label
from automedsam.data.preprocess import (
    InputGeometry,
    PreprocessConfig,
    low_res_to_original,
    mask_to_box,
    mask_to_input,
    mask_to_low_res,
    normalise,
    to_backbone_input,
)

CASES = {  # dataset: (image, label, slice, class, modality)
    "kvasir": ("polyp/kvasir-seg/images/cju0qkwl35piu0993l0dewei2.jpg",
               "polyp/kvasir-seg/masks/cju0qkwl35piu0993l0dewei2.jpg", 0, "polyp", "endoscopy"),
    "shenzhen": ("chest-xray/shenzhen/images/CHNCXR_0001_0.png", "chest-xray/shenzhen/masks/CHNCXR_0001_0.png", 0,
                 "lungs", "xray"),
    "brats": ("brain-mri/brats/brats_2013_pat0003_1/Flair_subtrMeanDivStd.nii.gz",
              "brain-mri/brats/brats_2013_pat0003_1/OTMultiClass.nii.gz", 80, "brain_tumor", "mr"),
    "totalseg": ("abdomen-ct/totalseg-example/ct.nii.gz", "abdomen-ct/totalseg-example/label.nii.gz", 15, "liver",
                 "ct"),
}

REPO = Path(__file__).resolve().parents[1]


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())


@pytest.fixture(scope="module")
def real(data_root):
    out = {}
    for ds, (img, lab, k, cls, mod) in CASES.items():
        im = load_image(data_root / img)
        labels = load_label(data_root / lab, im)
        out[ds] = (im, label_to_classes(labels[k], ds)[CLASS_IDS[cls]], k, mod)
    return out


@pytest.mark.parametrize("dataset", list(CASES))
@pytest.mark.parametrize("size", [256, 1024])
def test_inverse_returns_masks_to_original_grid(real, dataset, size):
    im, mask, k, mod = real[dataset]
    assert mask.sum() > 100
    x = normalise(im.slices, mod)
    inp, info = to_backbone_input(x[k], size)
    assert inp.shape == (3, size, size) and inp.dtype == torch.float32
    assert float(inp.min()) >= 0 and float(inp.max()) <= 1
    assert max(info.new_height, info.new_width) == size and (info.height, info.width) == im.slice_shape
    assert info == InputGeometry.for_shape(*im.slice_shape, size)
    # padding is bottom/right only and zero
    assert float(inp[:, info.new_height:].abs().sum()) == 0 and float(inp[:, :, info.new_width:].abs().sum()) == 0
    low = mask_to_low_res(mask, info).astype(np.float32)
    back = low_res_to_original(low, info) > 0.5
    assert back.shape == mask.shape
    assert dice(back, mask) > 0.99
    # the same through torch with a batch dimension, as logits
    logits = torch.from_numpy(low * 20 - 10)[None, None]
    back_t = low_res_to_original(logits, info)
    assert back_t.shape == (1, 1, *mask.shape)
    assert dice(back_t[0, 0].numpy() > 0, mask) > 0.99


def test_box_in_input_pixels(real):
    im, mask, k, mod = real["totalseg"]
    info = InputGeometry.for_shape(*im.slice_shape, 256)
    m_in = mask_to_input(mask, info)
    box = mask_to_box(m_in)
    ys, xs = np.nonzero(mask)
    scale = 256 / max(im.slice_shape)
    np.testing.assert_allclose(box, [xs.min() * scale, ys.min() * scale, xs.max() * scale, ys.max() * scale], atol=2.5)
    assert mask_to_box(np.zeros((8, 8))) is None
    j1 = mask_to_box(m_in, jitter=0.1, rng=np.random.default_rng(3))
    j2 = mask_to_box(m_in, jitter=0.1, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(j1, j2)
    w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
    assert np.all(np.abs(j1 - box) <= 0.1 * np.array([w, h, w, h]) + 1e-4)
    assert j1[0] <= j1[2] and j1[1] <= j1[3] and j1.min() >= 0 and j1.max() <= 255


def test_normalise_modalities():
    ct = np.array([-1000, -160, 40, 240, 1000], np.float32).reshape(1, 1, 5, 1)
    out = normalise(ct, "ct", per_slice=False)
    assert out.shape == (1, 1, 5, 3)
    np.testing.assert_allclose(out[0, 0, :, 0], [0, 0, 0.5, 1, 1], atol=1e-6)
    out = normalise(ct, "ct", ct_level=0, ct_width=2000, per_slice=False)
    np.testing.assert_allclose(out[0, 0, :, 0], [0, 0.42, 0.52, 0.62, 1], atol=1e-6)

    rng = np.random.default_rng(0)
    mr = rng.normal(100, 20, size=(4, 16, 16, 1)).astype(np.float32)
    mr[:, :4] = 0
    mr[0, 5, 5] = 1e4  # an outlier clipped by the 99.5 percentile
    out = normalise(mr, "mr")
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert np.all(out[:, :4] == 0)  # background stays 0
    assert np.isclose(out[0, 5, 5, 0], 1.0) and (out[0] > 0.99).sum() < 20

    rgb = rng.integers(10, 200, size=(8, 8, 3)).astype(np.float32)
    out = normalise(rgb, "endoscopy")
    assert out.shape == (8, 8, 3) and out.min() == 0 and out.max() == 1
    np.testing.assert_allclose(out, (rgb - rgb.min()) / (rgb.max() - rgb.min()), atol=1e-6)
    grey = normalise(np.arange(12, dtype=np.float32).reshape(1, 3, 4, 1), "xray")
    assert grey.shape == (1, 3, 4, 3) and np.all(grey[..., 0] == grey[..., 2])


def test_config_key():
    a = PreprocessConfig("ct")
    assert a.key() != PreprocessConfig("ct", ct_level=50).key()
    assert a.key() != PreprocessConfig("ct", size=1024).key()
    assert PreprocessConfig("mr").key() != PreprocessConfig("mr", mr_upper=99).key()
    # parameters a modality does not use do not change its key
    assert PreprocessConfig("endoscopy").key() == PreprocessConfig("endoscopy", ct_level=50).key()
    assert PreprocessConfig("MRI").modality == "mr"
    with pytest.raises(ValueError):
        PreprocessConfig("sonar")
    # ultrasound is a modality by the vocabulary file alone (min-max, like the other 2D ones)
    assert PreprocessConfig("US").key().endswith("ultrasound-minmax-s256")
    with pytest.raises(AttributeError):
        a.size = 3  # frozen


def test_ct_and_mr_defaults_have_one_home_the_vocabulary():
    """The CT window and MR percentiles come from configs/classes.json alone: a vocabulary with
    another CT window changes the cache's PreprocessConfig, normalise() and the pipeline's
    NormaliseModalityd together (and the bundle's inference.yaml leaves them null)."""
    import copy

    import yaml

    from automedsam import classes as vocabulary
    from automedsam.data.preprocess import normalisation_defaults, normalise
    from automedsam.transforms import NormaliseModalityd

    cfg = yaml.safe_load((REPO / "bundles" / "automedsam" / "configs" / "inference.yaml").read_text())
    assert [cfg[k] for k in ("ct_level", "ct_width", "mr_lower", "mr_upper")] == [None] * 4
    data = vocabulary.read_vocabulary(vocabulary.default_vocabulary_path())
    ct = data["modalities"]["ct"]
    assert normalisation_defaults() == {"ct_level": ct["level"], "ct_width": ct["width"],
                                        "mr_lower": data["modalities"]["mr"]["lower"],
                                        "mr_upper": data["modalities"]["mr"]["upper"]}
    hu = np.linspace(-200, 300, 64, dtype=np.float32).reshape(1, 8, 8, 1)
    before = normalise(hu, "ct")
    other = copy.deepcopy(data)
    other["modalities"]["ct"].update(level=0.0, width=100.0)
    try:
        vocabulary.load_vocabulary(other)
        assert PreprocessConfig("ct").ct_level == 0.0 and PreprocessConfig("ct").key() == "v1-ct0_100-s256"
        changed = normalise(hu, "ct")
        assert not np.allclose(changed, before)
        np.testing.assert_array_equal(changed, normalise(hu, "ct", ct_level=0.0, ct_width=100.0))
        import torch

        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(hu[0], -1, 0)))  # (1,8,8)
        out = NormaliseModalityd("image", modality="ct")({"image": x})["image"]
        np.testing.assert_array_equal(np.moveaxis(np.asarray(out), 0, -1), changed[0])
    finally:
        vocabulary.load_vocabulary()
    assert PreprocessConfig("ct").key() == "v1-ct40_400-s256"
