"""Teaching a new class (automedsam.adapt.add_class) and the vocabulary that lives in the bundle.

The main test adds a class to a copy of the bundle from a handful of real HC18 fetal-head images
(generated grey images with a bright ellipse when ../shared/data is absent), segments with the new
bundle through the Python API, and checks that every old class's label map on shared validation
cases (Kvasir, Shenzhen) is the same as with the source bundle.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from automedsam import classes as V
from automedsam.adapt import AddClassError, add_class

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "automedsam"
DATA = Path(os.environ.get("AUTOMEDSAM_DATA", REPO.parent / "shared" / "data"))
HC18 = DATA / "ultrasound" / "hc18"
# shared validation cases whose old-class label maps must not change
OLD_CASES = [("polyp/kvasir-seg/images/cju15jr8jz8sb0855ukmkswkz.jpg", "endoscopy"),
             ("chest-xray/shenzhen/images/CHNCXR_0009_0.png", "xray")]


@pytest.fixture(autouse=True)
def _default_vocabulary():
    yield
    V.load_vocabulary()  # every test leaves the repository bundle's vocabulary loaded


def _pairs(root: Path, n: int = 4) -> tuple[Path, Path]:
    """A folder of n images and one of masks: real HC18 when present, else generated."""
    img_dir, mask_dir = root / "images", root / "masks"
    img_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    if HC18.is_dir():
        # from the datalist's training split (never its test split)
        train = json.loads((REPO / "data_lists" / "hc18.json").read_text())["training"]
        names = [Path(e["image"]).name for e in train][:n]
        for name in names:
            shutil.copy(HC18 / "images" / name, img_dir / name)
            shutil.copy(HC18 / "masks" / name, mask_dir / name)
        return img_dir, mask_dir
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:200, :260]
    for i in range(n):
        cy, cx, ry, rx = 100 + rng.integers(-20, 20), 130 + rng.integers(-30, 30), 60, 80
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        img = (rng.normal(60, 20, yy.shape) + 120 * inside).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(img_dir / f"case{i}.png")
        Image.fromarray((inside * 255).astype(np.uint8)).save(mask_dir / f"case{i}.png")
    return img_dir, mask_dir


def _label_maps(bundle: Path) -> dict[str, np.ndarray]:
    """Label maps of every class of each old case's modality, with the network of ``bundle``."""
    from automedsam.pretrained import load_pretrained
    from automedsam.segment import Segmenter

    seg = Segmenter(load_pretrained(bundle), warn=lambda m: None)
    return {case: seg.segment_file(DATA / case, modality=mod).label_slices for case, mod in OLD_CASES}


def _dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 1.0 if not (a.any() or b.any()) else 2 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """A copy of the bundle taught 'test_head' from 4 images (a few steps: the mechanics, not accuracy)."""
    root = tmp_path_factory.mktemp("add_class")
    images, masks = _pairs(root / "data")
    out = root / "bundle"
    summary = add_class("test_head", "ultrasound", images=images, masks=masks, output=out, steps=4, batch_size=4,
                        class_head=True, negatives=(("kvasir", 1, 1),), cache_dir=root / "cache", progress=False, log=lambda m: None)
    V.load_vocabulary()
    return {"root": root, "images": images, "masks": masks, "out": out, "summary": summary}


def test_add_class_writes_a_bundle_whose_old_classes_answer_as_before(taught):
    out, summary = taught["out"], taught["summary"]
    new_id = V.NUM_CLASSES + 1
    assert summary["class_id"] == new_id and summary["positives"] == 4
    # the new bundle: vocabulary, channel_def, model.pt grown by one row; the source is unchanged
    vocab = V.read_vocabulary(out)
    assert vocab["classes"][-1]["name"] == "test_head" and vocab["classes"][-1]["id"] == new_id
    assert [c["id"] for c in vocab["classes"][:-1]] == list(V.CLASSES)
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"][str(new_id)] == "test_head"
    assert "test_head" not in V.CLASS_IDS and not (out / ".add_class").exists()
    old = torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True)
    new = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    table = "class_prompt_encoder.class_embed.weight"
    assert new[table].shape[0] == old[table].shape[0] + 1
    assert torch.equal(new[table][:-1], old[table])
    assert all(torch.equal(old[k], new[k]) for k in old if k != table)
    assert not torch.equal(new[table][-1], old[table].mean(0))  # the new row was trained
    # and its own class head (automedsam.class_adapters), a trained copy of the shared parts
    head = {k: v for k, v in new.items() if k.startswith(f"class_heads.{new_id}.")}
    assert head and set(head) == {k for k in new if k.startswith("class_heads.") and k not in old}
    shared = {k: old["class_prompt_encoder." + k.split(".", 2)[2]] for k in head}
    assert not all(torch.equal(head[k], shared[k]) for k in head)

    # segment with it through the Python API: the new class is known and answers in its ids
    from automedsam.segment import segment

    img = sorted(taught["images"].iterdir())[0]
    res = segment([img], taught["root"] / "seg", classes="test_head", modality="ultrasound", bundle=out)
    assert res[0]["ok"], res[0]["error"]
    labels = np.asarray(Image.open(res[0]["outputs"]["seg"]))
    assert set(np.unique(labels)) <= {0, new_id}
    assert "test_head" in V.CLASS_IDS  # the bundle's vocabulary was loaded with it

    # every old class's label map on shared validation cases: unchanged (within 0.01 Dice)
    if not (DATA / OLD_CASES[0][0]).is_file():
        pytest.skip(f"shared validation cases not found under {DATA}")
    V.load_vocabulary()
    before = _label_maps(BUNDLE)
    after = _label_maps(out)
    for case in before:
        for cid in np.unique(np.concatenate([before[case].ravel(), after[case].ravel()])):
            if cid and cid != new_id:
                assert _dice(before[case] == cid, after[case] == cid) >= 0.99, (case, cid)
        assert not (after[case] == new_id).any(), f"{case}: the new class found on another modality"


def test_resume_and_refusals(taught, tmp_path):
    images, masks, out = taught["images"], taught["masks"], taught["out"]
    # a name or alias that exists, an output that exists, missing folders: one line, before any work
    with pytest.raises(AddClassError, match="already exists"):
        add_class("lung", "xray", images=images, masks=masks, output=tmp_path / "o1")
    with pytest.raises(AddClassError, match="already exists"):
        add_class("thing", "us", images=images, masks=masks, output=tmp_path / "o1", aliases=["polyps"])
    with pytest.raises(AddClassError, match="output folder already exists"):
        add_class("other", "ultrasound", images=images, masks=masks, output=out)
    with pytest.raises(AddClassError, match="masks folder not found"):
        add_class("other", "ultrasound", images=images, masks=tmp_path / "nope", output=tmp_path / "o1")
    assert not (tmp_path / "o1").exists()
    # a mask of the wrong size, an empty mask: named in the message
    bad = tmp_path / "bad"
    shutil.copytree(masks, bad)
    first = sorted(bad.iterdir())[0]
    Image.fromarray(np.full((10, 12), 255, np.uint8)).save(first)
    with pytest.raises(AddClassError, match=f"{first.name}.*does not match"):
        add_class("other", "ultrasound", images=images, masks=bad, output=tmp_path / "o1")
    size = Image.open(sorted(masks.iterdir())[0]).size
    Image.fromarray(np.zeros(size[::-1], np.uint8)).save(first)
    with pytest.raises(AddClassError, match=f"{first.name}: empty mask"):
        add_class("other", "ultrasound", images=images, masks=bad, output=tmp_path / "o1")
    assert not (tmp_path / "o1").exists()

    # resumable: an interrupted run (its checkpoint at step 2 of 4) carries on and ends with the
    # same weights as the uninterrupted run of the fixture
    cache = taught["root"] / "cache"
    kw = dict(images=images, masks=masks, batch_size=4, class_head=True, negatives=(("kvasir", 1, 1),), cache_dir=cache,
              progress=False, log=lambda m: None)
    part = tmp_path / "part"

    class Stop(Exception):
        pass

    import automedsam.engine as engine

    real = engine.save_atomic

    def stop_after_first_checkpoint(obj, path):  # killed right after the step-2 checkpoint
        real(obj, path)
        if Path(path).name == "checkpoint.pt":
            raise Stop

    engine.save_atomic = stop_after_first_checkpoint
    try:
        with pytest.raises(Stop):
            add_class("test_head", "ultrasound", output=part, steps=4, checkpoint_every=2, **kw)
    finally:
        engine.save_atomic = real
    assert torch.load(part / ".add_class" / "checkpoint.pt", weights_only=False)["step"] == 2
    assert not (part / "models").exists()
    add_class("test_head", "ultrasound", output=part, steps=4, checkpoint_every=2, **kw)
    a = torch.load(part / "models" / "model.pt", weights_only=True)["class_prompt_encoder.class_embed.weight"]
    b = torch.load(out / "models" / "model.pt", weights_only=True)["class_prompt_encoder.class_embed.weight"]
    assert torch.allclose(a, b, atol=1e-6)
    a = torch.load(part / "models" / "model.pt", weights_only=True)
    b = torch.load(out / "models" / "model.pt", weights_only=True)
    heads = [k for k in b if k.startswith("class_heads.")]
    assert heads and all(torch.allclose(a[k], b[k], atol=1e-6) for k in heads)  # the head resumed too


def test_grow_classes_keeps_old_rows_and_loads_older_weights():
    from automedsam.prompt_encoder import DiffusionClassPromptEncoder

    enc = DiffusionClassPromptEncoder(8, channels=(8, 16), class_dim=16, layout="shared_trunk")
    rows = enc.class_embed.weight.detach().clone()
    enc.grow_classes(9)
    assert enc.num_classes == 9 and enc.class_embed.weight.shape == (9, 16)
    assert torch.equal(enc.class_embed.weight[:8], rows)
    with pytest.raises(ValueError, match="shrink"):
        enc.grow_classes(4)
    emb = 0.1 * torch.randn(1, 256, 64, 64)
    enc.eval()
    with torch.no_grad():  # ids 1..9 answer; old ids as before growth
        enc(emb, torch.tensor([9]))

    # an 8-row model.pt loads into a 9-class model: old rows bit for bit
    from automedsam.model import AutoMedSAM

    state = torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True)
    table = AutoMedSAM.CLASS_TABLE
    n = state[table].shape[0]
    net = AutoMedSAM(num_classes=n + 1, prompt_encoder={"channels": [32, 64], "class_dim": 64,
                                                        "layout": "shared_trunk"}, train_mask_decoder=True)
    net.load_trainable(BUNDLE / "models" / "model.pt")
    got = net.class_prompt_encoder.class_embed.weight.detach()
    assert got.shape[0] == n + 1 and torch.equal(got[:n], state[table])


def test_vocabulary_file_and_channel_def_agree():
    vocab = V.read_vocabulary(BUNDLE)
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert channel_def == {"0": "background", **{str(c["id"]): c["name"] for c in vocab["classes"]}}
    assert V.channel_def() == channel_def and V.NUM_CLASSES == len(vocab["classes"])
    # every modality normalises as its entry says; ultrasound is one, by the file alone
    from automedsam.data.preprocess import normalisation_of

    assert {m: normalisation_of(m) for m in V.MODALITIES} == {m: s["normalise"] for m, s in vocab["modalities"].items()}
    assert "ultrasound" in V.MODALITIES and V.check_modality("US") == "ultrasound"
    # codes for DICOM-SEG come from the file
    from automedsam.dicomseg import segment_codes

    for c in vocab["classes"]:
        assert segment_codes(c["id"])[1].value == c["type"]["code"]


def test_load_vocabulary_refills_every_importer_in_place(tmp_path):
    from automedsam.data import dataset as ds_mod
    from automedsam import segment as seg_mod

    data = V.add_class_entry(V.read_vocabulary(BUNDLE), "thing", "newmod", aliases=["things"], dataset="mine")
    V.load_vocabulary(data)
    assert seg_mod.CLASSES is V.CLASSES and ds_mod.CLASS_IDS["thing"] == len(data["classes"])
    assert V.class_id("things") == len(data["classes"]) and V.check_modality("new-mod") == "newmod"
    assert V.MODALITY_CLASSES["newmod"] == ("thing",) and V.DATASET_MODALITY["mine"] == "newmod"
    bad = json.loads(json.dumps(data))
    bad["classes"][-1]["id"] = 42
    (tmp_path / "classes.json").write_text(json.dumps(bad))
    with pytest.raises(V.VocabularyError, match="classes.json: class ids must be 1..N"):
        V.load_vocabulary(tmp_path / "classes.json")
    with pytest.raises(V.VocabularyError, match="already exists"):
        V.add_class_entry(data, "Thing", "ct")


def test_shipped_fetal_head_finds_heads_on_hc18_test_images(tmp_path):
    """The bundle ships fetal_head (taught from HC18 training images): it finds the head on images of
    the fixed test subset, through the Python API."""
    if "fetal_head" not in V.read_vocabulary(BUNDLE)["classes"][-1]["name"]:
        pytest.skip("this bundle has no fetal_head")
    if not HC18.is_dir():
        pytest.skip(f"HC18 not found under {DATA}")
    from automedsam.segment import segment

    test = json.loads((REPO / "data_lists" / "hc18.json").read_text())["test"][:3]
    res = segment([DATA / e["image"] for e in test], tmp_path / "seg", classes="fetal_head", modality="ultrasound")
    dice = []
    for r, e in zip(res, test):
        assert r["ok"], r["error"]
        pred = np.asarray(Image.open(r["outputs"]["seg"])) == V.CLASS_IDS["fetal_head"]
        dice.append(_dice(pred, np.asarray(Image.open(DATA / e["label"])) > 0))
    assert np.mean(dice) > 0.5, dice


def test_bundle_route_calls_add_class(tmp_path):
    """configs/add_class.yaml layered on train.yaml reaches add_class (here: its refusal of an
    existing name, before any work)."""
    import subprocess
    import sys

    images, masks = _pairs(tmp_path / "data", n=1)
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                           "['configs/train.yaml','configs/add_class.yaml']", "--class_name", "lungs", "--modality", "xray",
                           "--images", str(images), "--masks", str(masks), "--output_dir", str(tmp_path / "out")],
                          cwd=BUNDLE, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "class 'lungs' already exists" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_class_heads_route_only_their_class_and_round_trip(tmp_path):
    """A class with its own head: old classes' outputs bit-identical, the head's id goes through the
    head, and the head is saved in and created from the weights file."""
    from automedsam.class_adapters import make_head
    from automedsam.model import AutoMedSAM

    torch.manual_seed(0)
    kw = dict(num_classes=3, prompt_encoder={"channels": [8, 16], "class_dim": 16, "layout": "shared_trunk"},
              decoder_runtime="eager")
    net = AutoMedSAM(**kw).eval()
    emb = 0.1 * torch.randn(2, 256, 64, 64)
    with torch.no_grad():
        before = net.decode_classes(emb, [1, 2, 3])
        net.class_heads["3"] = make_head(net.class_prompt_encoder)
        for p in net.class_heads["3"].parameters():
            p.add_(0.05 * torch.randn_like(p))  # a head that differs from the shared parts
        for skip in (False, True):
            after = net.decode_classes(emb, [1, 2, 3], skip_absent=skip)
            ref = net.decode_classes(emb, [1, 2, 3], skip_absent=False) if skip else before
            old = torch.tensor([0, 1, 3, 4])  # class-major within each embedding: ids 1, 2 of both
            # asked beside the headed class, old items run in a smaller batch: equal to float rounding
            assert torch.allclose(after.probabilities()[old], (ref if skip else before).probabilities()[old], atol=1e-5)
        assert torch.allclose(after.presence_logit[old], before.presence_logit[old], atol=1e-5)
        assert not torch.equal(after.presence_logit[[2, 5]], before.presence_logit[[2, 5]])
        one = net.decode(emb[:1], [3])  # the training path routes through the head too
        assert torch.allclose(one.presence_logit, after.presence_logit[2:3], atol=1e-5)
        old_only = net.decode_classes(emb, [1, 2])  # asked alone (as a modality's classes are): bit for bit
        ref = AutoMedSAM(**kw).eval()
        ref.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("class_heads.")})
        ref_only = ref.decode_classes(emb, [1, 2])
        assert torch.equal(old_only.logits, ref_only.logits) and torch.equal(old_only.presence_logit, ref_only.presence_logit)
    state = net.trainable_state_dict()
    assert any(k.startswith("class_heads.3.") for k in state)
    torch.save(state, tmp_path / "model.pt")
    again = AutoMedSAM(**kw).eval()
    again.load_trainable(tmp_path / "model.pt")
    with torch.no_grad():
        assert torch.equal(again.decode_classes(emb, [1, 2, 3]).presence_logit, after.presence_logit)
