"""The embedding cache and the slice-sample dataset on real slices with the real LiteMedSAM encoder.

Encoder passes cost ~1.5-2 s each on a laptop CPU: these tests use 5 slices (2 polyps + 3 CT
slices) and one small killed subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from automedsam.classes import CLASS_IDS, MODALITY_CLASSES, label_to_classes
from automedsam.data.cache import CacheError, EmbeddingCache
from automedsam.data.datalist import load_datalist
from automedsam.data.dataset import SliceSamples
from automedsam.data.io import load_image, load_label
from automedsam.data.preprocess import PreprocessConfig, mask_to_low_res, to_backbone_input

REPO = Path(__file__).resolve().parents[1]
CT_STEP = 10  # CT slices 0, 10, 20


class EncodeCounter:
    """Counts encoder calls (slices), optionally failing after ``fail_after`` slices."""

    def __init__(self, backbone, fail_after: int | None = None):
        self.backbone, self.fail_after, self.slices = backbone, fail_after, 0
        self.orig = type(backbone).encode

    def __call__(self, images):
        if self.fail_after is not None and self.slices + len(images) > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.slices += len(images)
        return self.orig(self.backbone, images)


@pytest.fixture(scope="module")
def entries(data_root):
    kv = load_datalist("kvasir", base_dir=data_root)[:2]
    ct = load_datalist("totalseg", base_dir=data_root, split="validation")
    return kv + ct


@pytest.fixture(scope="module")
def built(backbone, entries, tmp_path_factory):
    """A cache built in two goes: interrupted after 2 slices, then resumed."""
    root = tmp_path_factory.mktemp("cache")
    cache = EmbeddingCache(root, backbone=backbone)
    mp = pytest.MonkeyPatch()
    first = EncodeCounter(backbone, fail_after=2)
    mp.setattr(backbone, "encode", first)
    with pytest.raises(KeyboardInterrupt):
        cache.build(entries, slice_step=CT_STEP, batch_size=1, progress=False)
    second = EncodeCounter(backbone)
    mp.setattr(backbone, "encode", second)
    stats = cache.build(entries, slice_step=CT_STEP, batch_size=2, progress=False)
    third = EncodeCounter(backbone)
    mp.setattr(backbone, "encode", third)
    again = cache.build(entries, slice_step=CT_STEP, progress=False)
    mp.undo()
    return {"cache": cache, "first": first.slices, "second": second.slices, "third": third.slices,
            "stats": stats, "again": again}


def test_resume_does_not_recompute(built):
    assert built["first"] == 2
    assert built["second"] == 3  # 2 polyps + 3 CT slices - the 2 already done
    assert built["stats"]["slices"] == 5 and built["stats"]["cached"] == 2 and built["stats"]["computed"] == 3
    assert built["third"] == 0 and built["again"]["cached"] == 5 and built["again"]["computed"] == 0
    assert not list(built["cache"].root.rglob(".tmp-*"))


def test_cached_embedding_equals_fresh_pass(built, backbone, entries):
    cache = built["cache"]
    entry = entries[-1]
    k = 10
    d = cache.load(cache.slice_key(entry, k))
    img = load_image(entry["image"])
    x = PreprocessConfig("ct").normalise(img.slices)
    inp, info = to_backbone_input(x[k], 256)
    assert d["geometry"] == info
    with torch.no_grad():
        fresh = backbone.encode(inp[None])[0].numpy()
    cached = d["embedding"].astype(np.float32)
    assert d["embedding"].dtype == np.float16 and cached.shape == (256, 64, 64)
    assert np.abs(cached - fresh).max() <= 2e-3 * max(1.0, np.abs(fresh).max())
    # per present class: GT low-res mask, GT box and the teacher's logits
    labels = load_label(entry["label"], img)
    present = {c: m for c, m in label_to_classes(labels[k], "totalseg").items() if m.any()}
    assert sorted(present) == d["class_ids"].tolist()
    liver = int(np.nonzero(d["class_ids"] == CLASS_IDS["liver"])[0][0])
    np.testing.assert_array_equal(d["masks"][liver], mask_to_low_res(present[CLASS_IDS["liver"]], info))
    teacher = d["teacher"][liver].astype(np.float32) > 0
    gt = d["masks"][liver].astype(bool)
    assert 2 * (teacher & gt).sum() / (teacher.sum() + gt.sum()) > 0.7  # box-prompted MedSAM finds the liver
    x0, y0, x1, y1 = d["boxes"][liver]
    ys, xs = np.nonzero(gt)
    assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())


def test_corrupt_entry_detected_and_recomputed(built, backbone, entries, monkeypatch):
    cache = built["cache"]
    key = cache.slice_key(entries[0], 0)
    path = cache.path_for(key)
    good = cache.load(key)["embedding"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="checksum"):
        cache.load(key)
    other = cache.path_for(cache.slice_key(entries[1], 0))
    other.write_bytes(other.read_bytes()[:1000])  # truncated, as by a full disk
    counter = EncodeCounter(backbone)
    monkeypatch.setattr(backbone, "encode", counter)
    stats = cache.build(entries, slice_step=CT_STEP, progress=False)
    assert counter.slices == 2 and stats["corrupt_recomputed"] == 2 and stats["computed"] == 2
    np.testing.assert_array_equal(cache.load(key)["embedding"], good)


def test_keys_change_with_content_and_settings(built, entries, data_root, tmp_path):
    cache = built["cache"]
    img_a, img_b = entries[0]["image"], entries[1]["image"]
    copy = tmp_path / "case.jpg"
    copy.write_bytes(Path(img_a).read_bytes())
    entry = {**entries[0], "image": str(copy)}
    key_a = cache.slice_key(entry, 0)
    assert key_a == cache.slice_key(entries[0], 0)  # content, not the path, makes the key
    copy.write_bytes(Path(img_b).read_bytes())
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert cache.slice_key(entry, 0) != key_a
    ct = entries[-1]
    other = EmbeddingCache(cache.root, backbone=cache.backbone, preprocess=PreprocessConfig(ct_level=50))
    assert other.slice_key(ct, 0) != cache.slice_key(ct, 0)
    assert other.slice_key(entries[0], 0) == cache.slice_key(entries[0], 0)  # CT window: not for polyps
    assert cache.slice_key(ct, 0) != cache.slice_key(ct, 1)
    label_copy = tmp_path / "mask.jpg"
    label_copy.write_bytes(Path(entries[1]["label"]).read_bytes())
    assert cache.slice_key({**entries[0], "label": str(label_copy)}, 0) != cache.slice_key(entries[0], 0)
    no_teacher = EmbeddingCache(cache.root, backbone=cache.backbone, teacher=False)
    assert no_teacher.slice_key(ct, 0) != cache.slice_key(ct, 0)


def test_slice_samples(built, entries):
    cache = built["cache"]
    ds = SliceSamples(cache, entries, negative_ratio=0.5, cross_domain_ratio=1.0, slice_step=CT_STEP, seed=0)
    rec = cache.case_record(entries[-1])
    ct_pos = sum(len(rec["classes"][k]) for k in (0, 10, 20))
    n_pos = 2 + ct_pos
    counts = ds.counts()
    assert counts["positive"] == n_pos
    n_ct_neg = 3 * len(MODALITY_CLASSES["ct"]) - ct_pos
    assert counts["negative"] == min(n_ct_neg, int(0.5 * n_pos))
    assert counts["cross_domain"] == n_pos
    pos = next(i for i, s in enumerate(ds.samples) if s.positive)
    item = ds[pos]
    assert item["embedding"].shape == (256, 64, 64) and item["embedding"].dtype == torch.float32
    assert item["mask"].shape == (1, 256, 256) and item["mask"].sum() > 0 and item["present"] == 1
    assert item["has_teacher"] and item["teacher"].shape == (1, 256, 256) and item["box"][2] > item["box"][0]
    neg = next(i for i, s in enumerate(ds.samples) if s.kind == "cross_domain")
    item = ds[neg]
    assert item["mask"].sum() == 0 and item["present"] == 0 and not item["has_teacher"] and item["box"].sum() == 0
    cid = int(item["class_id"])
    modality = entries[int(item["case_index"])]["modality"]
    assert cid not in {CLASS_IDS[n] for n in MODALITY_CLASSES[modality]}
    before = list(ds.samples)
    ds.set_epoch(1)
    assert len(ds) == len(before) and ds.samples[:n_pos] == before[:n_pos]
    ds.set_epoch(0)
    assert ds.samples == before
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)))
    assert batch["embedding"].shape == (4, 256, 64, 64) and batch["class_id"].shape == (4,)
    all_neg = SliceSamples(cache, entries, negative_ratio=None, slice_step=CT_STEP)
    assert all_neg.counts()["negative"] == n_ct_neg and all_neg.counts()["cross_domain"] == 0


def _landed(root: Path) -> list[Path]:
    """Finished slice files (not the temporary names they are written under before the rename)."""
    return [f for f in root.glob("slices/*/*.npc") if not f.name.startswith(".tmp-")]


def test_killed_process_resumes(backbone, data_root, tmp_path):
    """SIGKILL a real build after its first slice lands; the rerun encodes only the rest."""
    root = tmp_path / "cache"
    script = textwrap.dedent(f"""
        from automedsam.data.cache import EmbeddingCache
        from automedsam.data.datalist import load_datalist
        entries = load_datalist("kvasir", base_dir={str(data_root)!r}, split="validation")[:4]
        EmbeddingCache({str(root)!r}).build(entries, batch_size=1, progress=False)
        """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if _landed(root):
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = _landed(root)
    assert 1 <= len(done) < 4
    cache = EmbeddingCache(root, backbone=backbone)
    for f in done:  # whatever landed is whole
        cache.load(f.stem)
    counter = EncodeCounter(backbone)
    mp = pytest.MonkeyPatch()
    mp.setattr(backbone, "encode", counter)
    try:
        stats = cache.build(load_datalist("kvasir", base_dir=data_root, split="validation")[:4], progress=False)
    finally:
        mp.undo()
    assert counter.slices == 4 - len(done) and stats["cached"] == len(done)


def test_slice_without_classes(data_root, tmp_path):
    """A slice with no labelled class is cached with empty class arrays (no encoder needed: a stub)."""
    from automedsam.backbones import default_lite_medsam_checkpoint

    class Stub(torch.nn.Module):
        name, image_size, checkpoint = "lite_medsam", 256, default_lite_medsam_checkpoint()

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def encode(self, images):
            return torch.zeros(len(images), 256, 64, 64)

    entry = load_datalist("brats", base_dir=data_root, split="validation")[0]
    cache = EmbeddingCache(tmp_path, backbone=Stub())
    rec = cache.case_record(entry)
    assert rec["num_slices"] == 155 and rec["classes"][0] == []
    labelled = cache.select_slices(rec, only_labelled_slices=True)
    assert labelled and all(rec["classes"][k] == [CLASS_IDS["brain_tumor"]] for k in labelled)
    stats = cache.build([entry], slice_step=200, progress=False)  # slice 0 only
    assert stats["computed"] == 1
    d = cache.load(cache.slice_key(entry, 0))
    assert d["class_ids"].shape == (0,) and d["masks"].shape == (0, 256, 256) and d["teacher"].shape == (0, 256, 256)
    item = SliceSamples(cache, [entry], slice_step=200, negative_ratio=None)[0]
    assert item["present"] == 0 and item["mask"].sum() == 0


def test_keys_and_file_format_are_pinned(tmp_path):
    """The cache keys and the slice file's bytes are what the code has always made: a cache
    built before a refactor (e.g. /work/cache) stays valid. Fixed bytes for the image, label and
    checkpoint, so the expected keys are constants (computed by the code before cache.py was
    split into cache.py and cache_files.py); changing what a key covers must change them."""
    import hashlib

    (tmp_path / "img.nii.gz").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "lab.nii.gz").write_bytes(b"label" * 100)
    (tmp_path / "ckpt.pth").write_bytes(b"weights" * 10)
    cache = EmbeddingCache(tmp_path / "cache", backbone="lite_medsam", checkpoint=tmp_path / "ckpt.pth")
    ct = {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz"), "dataset": "totalseg",
          "modality": "ct"}
    endo = {"image": str(tmp_path / "img.nii.gz"), "dataset": "kvasir", "modality": "endoscopy"}
    assert cache.slice_key(ct, 3) == "10484d1c41ddb6e602bfe43b4007ab002a1220a2cf22bb83"
    assert cache.slice_key(ct, 3, view=1) == "e22609a30f3e2404d6934b79d2ba8ef891f345185992f187"
    assert cache.case_key(ct) == "1d8482edd6ee2cc25934441c4d99a4d98b77764a"
    assert cache.slice_key(endo, 0) == "7a12d08f0fb67d367972f177ec0962d3745c3f05045da555"
    assert cache.case_key(endo) == "6af47f2447b2ce580ac56daf0f4db27936f86baa"
    arrays = {"embedding": np.arange(12, dtype=np.float16).reshape(3, 4), "class_ids": np.array([5], np.int16)}
    data = cache._encode_file("k" * 48, arrays, {"slice": 3})
    assert data.startswith(b"AUTOMEDSAM-CACHE-1\nf8690ac918fc33aad67977dba73430eff34d61f8d9ccdf195090f085a7d3b16a\n")
    assert hashlib.sha256(data[84:]).hexdigest() == "f8690ac918fc33aad67977dba73430eff34d61f8d9ccdf195090f085a7d3b16a"
