"""Augmented views (issue 16 item 1) and the epoch sampling over them (item 2).

Fast: the cache tests use a stub encoder (an image-dependent pooling, no network), so a view
costs milliseconds; the real encoder's agreement with the cache is tested in test_data_cache.py.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from automedsam.classes import CLASS_IDS, DATASET_LABELS
from automedsam.data.augment import (AugmentConfig, ViewAugmenter, has_lateral_classes, hue_saturation_shift,
                                     jpeg_recompress, mr_raw_intensities, resolution_loss, zoom_rotate)
from automedsam.data.cache import EmbeddingCache
from automedsam.data.datalist import load_datalist
from automedsam.data.dataset import SliceSamples
from automedsam.data.io import load_image, load_label
from automedsam.data.preprocess import PreprocessConfig, mask_to_box, mask_to_input, mask_to_low_res, normalise, \
    to_backbone_input

REPO = Path(__file__).resolve().parents[1]
CT_STEP = 10
NO_INTENSITY = {k: 0.0 for k in ("contrast_prob", "gamma_prob", "hist_prob", "hue_prob", "blur_prob", "sharpen_prob",
                                 "resloss_prob", "noise_prob", "jpeg_prob")}


# ------------------------------------------------------------------ fixed-strength functions


def test_jpeg_and_resolution_loss_keep_shape_dtype_and_range():
    rng = np.random.default_rng(0)
    rgb = rng.random((48, 40, 3)).astype(np.float32)
    hu = (rng.random((48, 40)) * 1400 - 1000).astype(np.float32)  # native CT range
    for img in (rgb, hu):
        for out in (jpeg_recompress(img, 50), resolution_loss(img, 0.5)):
            assert out.shape == img.shape and out.dtype == img.dtype
            assert out.min() >= img.min() - 1e-3 and out.max() <= img.max() + 1e-3
    # stronger settings lose more; mild ones stay close
    err = {q: np.abs(jpeg_recompress(rgb, q) - rgb).mean() for q in (90, 20)}
    assert err[20] > err[90] > 0
    smooth = np.tile(np.linspace(0, 1, 40, dtype=np.float32), (48, 1))
    assert np.abs(jpeg_recompress(smooth, 90) - smooth).max() < 0.05
    checker = (np.indices((48, 40)).sum(0) % 2).astype(np.float32)
    assert np.abs(resolution_loss(checker, 0.5) - 0.5).max() < 1e-5  # 2x2 averages, then flat
    np.testing.assert_array_equal(resolution_loss(checker, 1.0), checker)
    with pytest.raises(ValueError, match="quality"):
        jpeg_recompress(rgb, 0)
    with pytest.raises(ValueError, match="factor"):
        resolution_loss(rgb, 1.5)


def test_hue_saturation_and_zoom_rotate():
    red = np.zeros((8, 8, 3), np.float32)
    red[..., 0] = 0.8
    red[..., 1:] = 0.2
    np.testing.assert_allclose(hue_saturation_shift(red, 0.0, 1.0), red, atol=1e-6)
    grey = hue_saturation_shift(red, 0.0, 0.0)
    assert np.ptp(grey, axis=-1).max() < 1e-6  # no saturation: grey
    turned = hue_saturation_shift(red, 120.0, 1.0)
    assert turned[0, 0, 1] > turned[0, 0, 0]  # red turned towards green
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 20:44] = 3
    img = mask.astype(np.float32) * 10 - 5
    out, lab = zoom_rotate(img, zoom=0.5, label=mask)
    assert out.shape == img.shape and lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 3}
    assert abs((lab > 0).sum() / (mask > 0).sum() - 0.25) < 0.05  # half the size each way
    assert out.min() == pytest.approx(-5)  # padded with the image's minimum, not 0
    assert (zoom_rotate(mask.astype(np.float32), zoom=2.0) > 0.5).sum() > 3 * (mask > 0).sum()


def test_mr_raw_intensities_normalise_like_z_scored():
    rng = np.random.default_rng(1)
    z = np.zeros((5, 40, 40, 1), np.float32)
    z[:, 8:32, 8:32] = rng.normal(size=(5, 24, 24, 1))
    raw = mr_raw_intensities(z, 300.0, 900.0)
    assert raw.dtype == z.dtype and raw[z != 0].min() >= 1 and (raw[z == 0] == 0).all()
    np.testing.assert_allclose(normalise(raw, "mr"), normalise(z, "mr"), atol=1e-5)


# ------------------------------------------------------------------ views


def test_same_seed_same_view_and_views_differ():
    rng = np.random.default_rng(2)
    x = rng.random((60, 70, 3)).astype(np.float32)
    lab = (rng.random((60, 70)) > 0.5).astype(np.uint8)
    a = ViewAugmenter("endoscopy", "kvasir").slice(x, lab, 7)
    b = ViewAugmenter("endoscopy", "kvasir").slice(x, lab, 7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    outs = [ViewAugmenter("endoscopy", "kvasir").slice(x, lab, s)[0] for s in range(4)]
    assert all(o.dtype == np.float32 and o.min() == 0 and o.max() == 1 for o in outs)
    assert len({o.tobytes() for o in outs}) == 4
    other = ViewAugmenter("endoscopy", "kvasir", AugmentConfig(seed=1))
    assert AugmentConfig(seed=1).key("endoscopy") != AugmentConfig().key("endoscopy")
    assert other.config.view_seed("img", 0, 1) != AugmentConfig().view_seed("img", 0, 1)


@pytest.mark.parametrize("modality,dataset", [("endoscopy", "kvasir"), ("ct", "totalseg"), ("mr", "brats")])
def test_label_follows_the_geometric_transform_exactly(modality, dataset):
    """The image is the label itself (0/1): wherever the bilinear image is exactly 1 (all the
    pixels it was interpolated from were inside) the label is 1, exactly 0 -> 0 (crop, flip,
    zoom, rotation and shift all applied to both with the same parameters)."""
    mask = np.zeros((80, 96), np.uint8)
    mask[10:50, 12:40] = 1
    mask[50:70, 12:24] = 1  # an L: flips and rotations show
    cfg = AugmentConfig(overrides={modality: {**NO_INTENSITY, "crop_prob": 0.5, "affine_prob": 1.0}})
    aug = ViewAugmenter(modality, dataset, cfg)
    moved = 0
    for seed in range(12):
        img, lab = aug.slice(np.repeat(mask[..., None].astype(np.float32), 3, -1), mask, seed)
        assert img.shape[:2] == lab.shape
        inside, outside = img[..., 0] == 1.0, img[..., 0] == 0.0
        assert (lab[inside] == 1).all() and (lab[outside] == 0).all()
        boundary = ~(inside | outside)
        assert (lab[boundary] != np.rint(img[..., 0][boundary])).mean() < 0.2  # nearest agrees near the edge
        moved += lab.shape != mask.shape or not np.array_equal(lab, mask)
    assert moved >= 10


def test_lateral_classes_never_flipped():
    assert {"kidney_left", "kidney_right"} <= set(DATASET_LABELS["totalseg"]) and has_lateral_classes("totalseg")
    assert not has_lateral_classes("kvasir") and not has_lateral_classes("brats")
    forced = AugmentConfig(overrides={"ct": {"flip_lr": 1.0, "flip_ud": 1.0}})
    assert forced.settings("ct", "totalseg")["flip_lr"] == 0 and forced.settings("ct", "totalseg")["flip_ud"] == 0
    names = [type(t).__name__ for t in ViewAugmenter("ct", "totalseg", forced).geometric.transforms]
    assert "RandFlipd" not in names
    assert "RandFlipd" in [type(t).__name__ for t in ViewAugmenter("endoscopy", "kvasir").geometric.transforms]
    # a kidney_left mask stays on its side: left half only, in every view
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 4:20] = 1
    aug = ViewAugmenter("ct", "totalseg", AugmentConfig(overrides={"ct": {"rotate_deg": 0.0, "shift": 0.0}}))
    for seed in range(10):
        _, lab = aug.slice(np.repeat(mask[..., None].astype(np.float32), 3, -1), mask, seed)
        xs = np.nonzero(lab)[1]
        assert xs.size == 0 or xs.mean() < lab.shape[1] / 2
    with pytest.raises(ValueError, match="unknown augmentation setting"):
        AugmentConfig(overrides={"ct": {"flip": 1}}).settings("ct")


# ------------------------------------------------------------------ the cache with views


class Stub(torch.nn.Module):
    """An image-dependent 'encoder' (pooled input), fast, counting its slices."""

    name, image_size = "lite_medsam", 256

    def __init__(self):
        from automedsam.backbones import default_lite_medsam_checkpoint

        super().__init__()
        self.checkpoint = default_lite_medsam_checkpoint()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.slices = 0

    def encode(self, images):
        self.slices += len(images)
        return F.avg_pool2d(images, 4).repeat(1, 86, 1, 1)[:, :256]


@pytest.fixture(scope="module")
def entries(data_root):
    return load_datalist("kvasir", base_dir=data_root)[:2] + load_datalist("totalseg", base_dir=data_root)


@pytest.fixture(scope="module")
def views_cache(entries, tmp_path_factory):
    stub = Stub()
    cache = EmbeddingCache(tmp_path_factory.mktemp("views"), backbone=stub, teacher=False)
    first = cache.build(entries, slice_step=CT_STEP, num_views=3, max_slices=7, progress=False)
    second = cache.build(entries, slice_step=CT_STEP, num_views=3, progress=False)
    return {"cache": cache, "stub": stub, "first": first, "second": second,
            "third": cache.build(entries, slice_step=CT_STEP, num_views=3, progress=False)}


def test_view_zero_keys_are_todays_keys(views_cache, entries):
    """The key of view 0 is the key of the cache module before views (git HEAD~ of this change)."""
    cache = views_cache["cache"]
    for e in entries:
        assert cache.slice_key(e, 0, 0) == cache.slice_key(e, 0)
        assert len({cache.slice_key(e, 0, v) for v in range(3)}) == 3
    other = EmbeddingCache(cache.root, backbone=cache.backbone, teacher=False, augment=AugmentConfig(seed=5))
    assert other.slice_key(entries[0], 0) == cache.slice_key(entries[0], 0)
    assert other.slice_key(entries[0], 0, 1) != cache.slice_key(entries[0], 0, 1)
    try:
        src = subprocess.run(["git", "show", "69cfec4:custom/automedsam/data/cache.py"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git history not available")
    spec = importlib.util.spec_from_loader("automedsam.data._cache_before_views", loader=None)
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old
    exec(compile(src, "cache_before_views.py", "exec"), old.__dict__)
    before = old.EmbeddingCache(cache.root, backbone=cache.backbone, teacher=False)
    for e in entries:
        for k in (0, 10):
            assert before.slice_key(e, k) == cache.slice_key(e, k, 0)


def test_k_views_per_slice_resumable(views_cache, entries):
    cache = views_cache["cache"]
    n_slices = 2 + 3  # two polyps, CT slices 0, 10, 20
    first, second, third = views_cache["first"], views_cache["second"], views_cache["third"]
    assert first["computed"] == 7 and first["slices"] == 3 * n_slices and first["num_views"] == 3
    assert second["cached"] == 7 and second["computed"] == 3 * n_slices - 7
    assert third["computed"] == 0 and third["cached"] == 3 * n_slices
    assert views_cache["stub"].slices == 3 * n_slices
    # built view-major: the first 7 were every plain slice and 2 views 1
    assert len(list(cache.root.glob("slices/*/*.npc"))) == 3 * n_slices
    for e in entries:
        embs = [cache.load(cache.slice_key(e, 0, v))["embedding"] for v in range(3)]
        assert not np.array_equal(embs[0], embs[1]) and not np.array_equal(embs[1], embs[2])


def test_cached_view_masks_and_boxes_follow_the_view(views_cache, entries):
    """The stored GT of view v is the augmented label of that view, and the embedding is the
    encoder's output of the augmented image (recomputed here from the same seed)."""
    from automedsam.classes import label_to_classes

    cache = views_cache["cache"]
    ct = entries[-1]
    img = load_image(ct["image"])
    labels = load_label(ct["label"], img)
    aug = ViewAugmenter("ct", "totalseg", cache.augment)
    changed = 0
    for k in (0, 10, 20):
        plain = cache.load(cache.slice_key(ct, k, 0))
        for v in (1, 2):
            raw, cfg = aug.volume(img.slices, cache.config_for(ct), cache.view_seed(ct, -1, v))
            x_v, lab_v = aug.slice(cfg.normalise(raw)[k], labels[k], cache.view_seed(ct, k, v))
            d = cache.load(cache.slice_key(ct, k, v))
            inp, info = to_backbone_input(x_v, 256)
            assert d["geometry"] == info and d["meta"]["view"] == v
            np.testing.assert_allclose(d["embedding"].astype(np.float32), Stub().encode(inp[None])[0].numpy(),
                                       atol=2e-3)
            present = {c: m for c, m in label_to_classes(lab_v, "totalseg").items()
                       if m.any() and mask_to_box(mask_to_input(m, info)) is not None}
            assert d["class_ids"].tolist() == sorted(present)
            for j, c in enumerate(d["class_ids"].tolist()):
                np.testing.assert_array_equal(d["masks"][j], mask_to_low_res(present[c], info))
                np.testing.assert_array_equal(d["boxes"][j], mask_to_box(mask_to_input(present[c], info)))
            changed += d["boxes"].shape != plain["boxes"].shape or not np.array_equal(d["boxes"], plain["boxes"])
    assert changed >= 3  # most views moved the organs (and their boxes)


def test_one_view_per_slice_per_epoch_deterministic(views_cache, entries):
    cache = views_cache["cache"]
    ds = SliceSamples(cache, entries, slice_step=CT_STEP, num_views=3, seed=0)
    per_epoch = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        per_epoch.append(dict(ds._view))
        for i in range(len(ds)):  # every sample of a slice serves the same, cached view
            s = ds.samples[i]
            assert ds.view_of(s.entry, s.slice) == per_epoch[-1][(s.entry, s.slice)]
    assert set(per_epoch[0]) == {(0, 0), (1, 0), (2, 0), (2, 10), (2, 20)}
    assert len({tuple(sorted(p.items())) for p in per_epoch}) > 1  # redrawn per epoch
    assert {v for p in per_epoch for v in p.values()} == {0, 1, 2}
    ds.set_epoch(3)
    assert ds._view == per_epoch[3]  # same epoch, same views (resume-exact)
    again = SliceSamples(cache, entries, slice_step=CT_STEP, num_views=3, seed=0)
    again.set_epoch(3)
    assert again._view == per_epoch[3] and again.samples == ds.samples
    pos = next(i for i, s in enumerate(ds.samples) if s.positive and s.entry == 0)
    item, s = ds[pos], ds.samples[pos]
    want = cache.load(cache.slice_key(entries[0], s.slice, ds.view_of(0, s.slice)))["embedding"]
    np.testing.assert_array_equal(item["embedding"].numpy(), want.astype(np.float32))
    # num_views 1 (the default): always the plain slice, the samples as before views
    one = SliceSamples(cache, entries, slice_step=CT_STEP, seed=0)
    one.set_epoch(3)
    assert set(one._view.values()) == {0} and one.samples == ds.samples  # views do not change the samples


def test_cached_only_uses_the_views_built_so_far(entries, tmp_path):
    cache = EmbeddingCache(tmp_path, backbone=Stub(), teacher=False)
    cache.build(entries[:2], num_views=1, progress=False)
    cache.build(entries[:1], num_views=2, progress=False)
    ds = SliceSamples(cache, entries[:2], num_views=2, cached_only=True)
    assert ds.views == {(0, 0): [0, 1], (1, 0): [0]}
    for epoch in range(8):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            ds[i]  # never asks for a view that is not there


# ------------------------------------------------------------------ sampling (item 2)


def _records(classes_per_case):
    """A fake cache answering case records: classes present per slice, per case."""

    class FakeCache:
        def case_record(self, entry):
            c = classes_per_case[entry["case"]]
            return {"num_slices": len(c), "classes": c}

        select_slices = staticmethod(EmbeddingCache.select_slices)

    return FakeCache()


def test_class_balanced_positives_and_hard_negatives():
    liver, spleen = CLASS_IDS["liver"], CLASS_IDS["spleen"]
    # one CT volume of 40 slices: liver on 10..29 (20 slices), spleen on 14..15 (2 slices)
    classes = [sorted(([liver] if 10 <= k < 30 else []) + ([spleen] if k in (14, 15) else [])) for k in range(40)]
    cache = _records({"ct": classes})
    entries = [{"case": "ct", "image": "ct", "dataset": "totalseg", "modality": "ct"}]
    plain = SliceSamples(cache, entries, negative_ratio=0.0)
    assert Counter(s.class_id for s in plain.samples) == {liver: 20, spleen: 2}
    bal = SliceSamples(cache, entries, negative_ratio=0.0, class_balance=1.0, seed=3)
    per_class = Counter(s.class_id for s in bal.samples)
    assert per_class == {liver: 11, spleen: 11}  # the 22 positives, split equally
    assert {s.slice for s in bal.samples if s.class_id == spleen} == {14, 15}
    # a repeated slice serves its next views: with 3 views, spleen's 5-6 samples per slice see all 3
    multi = SliceSamples(cache, entries, negative_ratio=0.0, class_balance=1.0, seed=3, num_views={"totalseg": 3})
    for sl in (14, 15):
        served = [multi.view_of(s.entry, s.slice, s.repeat) for s in multi.samples
                  if s.class_id == spleen and s.slice == sl]
        assert len(served) >= 5 and set(served) == {0, 1, 2}
    half = Counter(s.class_id for s in SliceSamples(cache, entries, negative_ratio=0.0, class_balance=0.5).samples)
    assert 11 < half[liver] < 20 and 2 < half[spleen] < 11
    bal.set_epoch(1)
    liver_1 = [s.slice for s in bal.samples if s.class_id == liver]
    bal.set_epoch(2)
    assert liver_1 != [s.slice for s in bal.samples if s.class_id == liver]  # a fresh subsample per epoch
    bal.set_epoch(1)
    assert liver_1 == [s.slice for s in bal.samples if s.class_id == liver]
    # hard negatives: slices within 3 of the organ, asked for that organ
    hard = SliceSamples(cache, entries, negative_ratio=0.0, hard_negative_ratio=10.0, hard_negative_distance=3)
    near_liver = {s.slice for s in hard.hard_negatives if s.class_id == liver}
    assert near_liver == set(range(7, 10)) | set(range(30, 33))
    assert {s.slice for s in hard.hard_negatives if s.class_id == spleen} == set(range(11, 19)) - {14, 15}
    assert hard.counts()["hard_negative"] == len(hard.hard_negatives) and hard.counts()["negative"] == 0
    assert not {(s.slice, s.class_id) for s in hard.hard_negatives} & {(s.slice, s.class_id) for s in hard.negatives}
    with pytest.raises(ValueError, match="class_balance"):
        SliceSamples(cache, entries, class_balance=2.0)


def test_all_labelled_slices_with_slice_step():
    tumour = CLASS_IDS["brain_tumor"]
    classes = [[tumour] if 3 <= k < 9 else [] for k in range(20)]
    cache = _records({"mr": classes})
    entries = [{"case": "mr", "image": "mr", "dataset": "brats", "modality": "mr"}]
    sparse = {s.slice for s in SliceSamples(cache, entries, slice_step=5, negative_ratio=None).samples}
    assert sparse == {0, 5, 10, 15}
    every = SliceSamples(cache, entries, slice_step=5, all_labelled_slices=True, negative_ratio=None)
    assert {s.slice for s in every.positives} == set(range(3, 9))  # every tumour slice
    assert {s.slice for s in every.negatives} == {0, 10, 15}
