"""The encoder's fast path (ONNX Runtime) gives the eager answer and manages its export safely."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from automedsam.runtime import EncoderRunner, OnnxEncoder, weights_key

pytest.importorskip("onnxruntime")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


def gt_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def onnx_encoder(backbone, export_dir):
    enc = OnnxEncoder(backbone.image_encoder, backbone.image_size, "lite_medsam", directory=export_dir)
    assert enc.exported and enc.path.is_file()
    return enc


def test_onnx_masks_agree_with_eager_on_real_polyps(backbone, onnx_encoder, polyp_cases):
    imgs = torch.from_numpy(np.stack([c[0] for c in polyp_cases])).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        eager = torch.cat([backbone.image_encoder(imgs[i:i + 4]) for i in range(0, len(imgs), 4)])
    fast = onnx_encoder(imgs)
    assert fast.shape == eager.shape == (len(imgs), 256, 64, 64) and fast.dtype == torch.float32
    assert ((fast - eager).abs().max() / eager.abs().max()).item() < 1e-3
    boxes = torch.tensor([gt_box(m) for _, m in polyp_cases], dtype=torch.float32)
    with torch.no_grad():
        sparse, dense = backbone.prompt(boxes=boxes)
        masks_e = backbone.decode(eager, sparse, dense)[0][:, 0] > 0
        masks_f = backbone.decode(fast, sparse, dense)[0][:, 0] > 0
    dices = [dice(masks_f[i].numpy(), masks_e[i].numpy()) for i in range(len(imgs))]
    assert min(dices) >= 0.99, dices
    # and the masks are real polyp masks, not two agreeing failures
    gt = [m for _, m in polyp_cases]
    assert np.mean([dice(masks_f[i].numpy(), gt[i]) for i in range(len(imgs))]) > 0.8


def test_export_is_reused_and_keyed_by_the_weights(backbone, onnx_encoder, export_dir):
    again = OnnxEncoder(backbone.image_encoder, backbone.image_size, "lite_medsam", directory=export_dir)
    assert not again.exported and again.path == onnx_encoder.path
    changed = copy.deepcopy(backbone.image_encoder)
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    assert weights_key(changed, 256) != weights_key(backbone.image_encoder, 256)
    assert weights_key(backbone.image_encoder, 1024) != weights_key(backbone.image_encoder, 256)
    assert not list(export_dir.glob(".tmp-*")), "a temporary export was left behind"


def test_a_damaged_export_is_made_again(backbone, onnx_encoder, tmp_path):
    damaged = tmp_path / onnx_encoder.path.name
    damaged.write_bytes(onnx_encoder.path.read_bytes()[:1000])
    enc = OnnxEncoder(backbone.image_encoder, backbone.image_size, "lite_medsam", directory=tmp_path)
    assert enc.exported and enc.path.stat().st_size == onnx_encoder.path.stat().st_size
    x = torch.rand(1, 3, 256, 256)
    assert torch.allclose(enc(x), onnx_encoder(x))


def test_runner_paths(backbone, onnx_encoder, monkeypatch):
    monkeypatch.setenv("AUTOMEDSAM_CACHE_DIR", str(onnx_encoder.path.parent))
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        ref = backbone.image_encoder(x)
    eager = EncoderRunner(backbone.image_encoder, 256, "lite_medsam", "eager")
    assert eager.active == "eager" and torch.equal(eager(x), ref)
    auto = EncoderRunner(backbone.image_encoder, 256, "lite_medsam", "auto")
    out = auto(x)
    assert auto.active == "onnx" and not auto._onnx.exported  # found the export made above
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-3
    assert torch.equal(auto(x), out), "the fast path is deterministic"
    clone = copy.deepcopy(auto)  # sessions are not copied; the copy rebuilds its own
    assert clone._onnx is None and torch.equal(clone(x), out)
    bf16 = EncoderRunner(backbone.image_encoder, 256, "lite_medsam", "bf16")
    out16 = bf16(x)
    assert out16.dtype == torch.float32 and ((out16 - ref).abs().max() / ref.abs().max()).item() < 0.1
    with pytest.raises(ValueError, match="runtime must be one of"):
        EncoderRunner(backbone.image_encoder, 256, "lite_medsam", "tensorrt")


def test_a_failing_fast_path_falls_back_to_eager(backbone, monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOMEDSAM_CACHE_DIR", str(tmp_path))
    import automedsam.runtime as rt

    def broken(*a, **k):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(rt, "OnnxEncoder", broken)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        ref = backbone.image_encoder(x)
    auto = EncoderRunner(backbone.image_encoder, 256, "lite_medsam", "auto")
    with pytest.warns(RuntimeWarning, match="exporter exploded"):
        out = auto(x)
    assert torch.equal(out, ref) and auto.active == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not per call
        auto(x)
    strict = EncoderRunner(backbone.image_encoder, 256, "lite_medsam", "onnx")
    for _ in range(2):  # not only the first call: "onnx" never runs eager quietly
        with pytest.raises(RuntimeError, match="unavailable"):
            strict(x)


def test_model_takes_its_runtime_from_the_argument_or_the_environment(backbone, monkeypatch):
    from automedsam.model import AutoMedSAM

    small = {"channels": (8, 16), "class_dim": 16}
    monkeypatch.setenv("AUTOMEDSAM_ENCODER_RUNTIME", "eager")
    assert AutoMedSAM(backbone, prompt_encoder=small).backbone.encoder_runner.runtime == "eager"
    assert AutoMedSAM(backbone, prompt_encoder=small, encoder_runtime="bf16").backbone.encoder_runner.runtime == "bf16"
    monkeypatch.delenv("AUTOMEDSAM_ENCODER_RUNTIME")
    assert AutoMedSAM(backbone, prompt_encoder=small).backbone.encoder_runner.runtime == "auto"
    monkeypatch.setenv("AUTOMEDSAM_ENCODER_RUNTIME", "fpga")
    with pytest.raises(ValueError, match="fpga"):
        AutoMedSAM(backbone, prompt_encoder=small)


# ---- the mask decoder at inference -------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped(polyp_embeddings):
    """The shipped model as inference builds it (decoder through ONNX Runtime), and an eager twin."""
    from automedsam.pretrained import load_pretrained

    fast, eager = load_pretrained(), load_pretrained()
    eager.set_decoder_runtime("eager")
    return fast, eager


def test_shipped_inference_decodes_through_onnx_with_the_eager_answer(shipped, polyp_embeddings, polyp_cases,
                                                                      monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOMEDSAM_CACHE_DIR", str(tmp_path))
    fast, eager = shipped
    assert fast.decoder_runner.runtime == "auto"  # inference.yaml asks for it
    ids = [7, 8]  # polyp and lungs, every class of every slice as segment does
    with torch.inference_mode():
        a = fast.decode_classes(polyp_embeddings, ids)
        b = eager.decode_classes(polyp_embeddings, ids)
    assert fast.decoder_runner._onnx is not None and fast.decoder_runner._onnx.exported
    assert fast.prompt_runner._onnx is not None and fast.prompt_runner._onnx.exported
    assert eager.decoder_runner._onnx is None and eager.prompt_runner._onnx is None
    assert float((a.presence_logit - b.presence_logit).abs().max()) < 1e-3
    assert float((a.logits - b.logits).abs().max() / b.logits.abs().max()) < 1e-3
    pa, pb = a.probabilities().numpy() > 0.5, b.probabilities().numpy() > 0.5
    assert min(dice(x, y) for x, y in zip(pa, pb)) > 0.99
    # a user's box adds prompt tokens: the export's token axis is dynamic
    boxes = torch.tensor([gt_box(m) for _, m in polyp_cases], dtype=torch.float32)
    with torch.inference_mode():
        a = fast.decode(polyp_embeddings, [7] * len(boxes), boxes=boxes)
        b = eager.decode(polyp_embeddings, [7] * len(boxes), boxes=boxes)
    assert float((a.logits - b.logits).abs().max() / b.logits.abs().max()) < 1e-3


def test_skipping_absent_classes_keeps_every_answer(shipped, polyp_embeddings, monkeypatch, tmp_path):
    """Classes judged absent are not decoded; the probabilities (so the label maps) stay the same,
    on the ONNX path (prompts for every item, decoder for the present) and the eager one (the
    prompt encoder skips its branches too)."""
    monkeypatch.setenv("AUTOMEDSAM_CACHE_DIR", str(tmp_path))
    from automedsam.classes import class_id
    from automedsam.model import ABSENT_LOGIT

    fast, eager = shipped
    ids = [class_id("polyp"), class_id("lungs"), class_id("liver")]
    with torch.inference_mode():
        full = eager.decode_classes(polyp_embeddings, ids)
        skips = {"onnx": fast.decode_classes(polyp_embeddings, ids, skip_absent=True),
                 "eager": eager.decode_classes(polyp_embeddings, ids, skip_absent=True)}
    absent = full.presence_logit <= 0
    assert absent.any() and (~absent).any()  # on polyp images lungs and liver are absent, polyps mostly not
    for path, skip in skips.items():
        assert torch.equal(skip.presence_logit > 0, ~absent), path
        assert (skip.logits[absent] == ABSENT_LOGIT).all() and (skip.iou[absent] == 0).all(), path
        assert float((skip.logits[~absent] - full.logits[~absent]).abs().max() / full.logits.abs().max()) < 1e-3, path
        assert float((skip.probabilities() - full.probabilities()).abs().max()) < 1e-3, path
        assert torch.equal(skip.probabilities() > 0.5, full.probabilities() > 0.5), path


def test_decoder_fast_path_never_runs_in_training_and_follows_weight_changes(polyp_embeddings, monkeypatch,
                                                                             tmp_path):
    monkeypatch.setenv("AUTOMEDSAM_CACHE_DIR", str(tmp_path))
    from automedsam.model import AutoMedSAM

    net = AutoMedSAM(train_mask_decoder=True, prompt_encoder={"channels": (8, 16), "class_dim": 16},
                     decoder_runtime="auto").eval()
    emb = polyp_embeddings[:2]
    net.decode(emb, [7, 7])  # gradients on: eager, nothing exported
    assert net.decoder_runner._onnx is None and not list(tmp_path.glob("*.onnx"))
    with torch.no_grad():
        net.train()
        net.decode(emb, [7, 7])  # training mode: eager
        assert net.decoder_runner._onnx is None
        net.eval()
        first = net.decode(emb, [7, 7]).logits
        path = net.decoder_runner._onnx.path
        net.student_decoder.output_hypernetworks_mlps[0].layers[-1].bias.add_(5.0)  # as an optimiser step would
        second = net.decode(emb, [7, 7]).logits
        assert net.decoder_runner._onnx.path != path  # re-exported for the new weights
        net.decoder_runner.runtime = "eager"
        ref = net.decode(emb, [7, 7]).logits
    assert not torch.allclose(first, second, atol=1e-3)
    assert float((second - ref).abs().max() / ref.abs().max()) < 1e-3


def test_prompt_fast_path_never_runs_in_training_and_follows_weight_changes(polyp_embeddings, monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOMEDSAM_CACHE_DIR", str(tmp_path))
    from automedsam.model import AutoMedSAM

    net = AutoMedSAM(prompt_encoder={"channels": (8, 16), "class_dim": 16, "layout": "shared_trunk"},
                     decoder_runtime="auto").eval()
    emb = polyp_embeddings[:2]
    net.decode_classes(emb, [7, 8])  # gradients on: eager, nothing exported
    assert net.prompt_runner._onnx is None and not list(tmp_path.glob("*class-prompts*.onnx"))
    with torch.no_grad():
        net.train()
        net.decode_classes(emb, [7, 8])  # training mode: eager
        assert net.prompt_runner._onnx is None
        net.eval()
        first = net.decode_classes(emb, [7, 8]).logits
        path = net.prompt_runner._onnx.path
        with pytest.raises(ValueError, match="class ids"):  # checked before the graph sees them
            net.decode_classes(emb, [0])
        net.class_prompt_encoder.class_embed.weight.mul_(-3.0)  # as an optimiser step would
        second = net.decode_classes(emb, [7, 8]).logits
        assert net.prompt_runner._onnx.path != path  # re-exported for the new weights
        net.set_decoder_runtime("eager")
        ref = net.decode_classes(emb, [7, 8]).logits
    assert not torch.allclose(first, second, atol=1e-3)
    assert float((second - ref).abs().max() / ref.abs().max()) < 1e-3


def test_a_failing_decoder_export_falls_back_to_eager(polyp_embeddings, monkeypatch):
    import automedsam.runtime as rt
    from automedsam.model import AutoMedSAM

    def broken(*a, **k):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(rt, "OnnxMaskDecoder", broken)
    monkeypatch.setattr(rt, "OnnxClassPrompts", broken)
    small = {"channels": (8, 16), "class_dim": 16}
    auto = AutoMedSAM(train_mask_decoder=True, prompt_encoder=small, decoder_runtime="auto").eval()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="exporter exploded") as caught:
        pred = auto.decode_classes(polyp_embeddings[:1], [7, 8])
    said = " | ".join(str(m.message) for m in caught)
    assert "class prompt encoder unavailable" in said and "mask decoder unavailable" in said
    assert pred.logits.shape == (2, 1, 256, 256)
    strict = AutoMedSAM(train_mask_decoder=True, prompt_encoder=small, decoder_runtime="onnx").eval()
    for _ in range(2):  # not only the first call: "onnx" never runs eager quietly
        with torch.no_grad(), pytest.raises(RuntimeError, match="unavailable"):
            strict.decode(polyp_embeddings[:1], [7])
        with torch.no_grad(), pytest.raises(RuntimeError, match="class prompt encoder unavailable"):
            strict.decode_classes(polyp_embeddings[:1], [7])
    with pytest.raises(ValueError, match="decoder runtime"):
        AutoMedSAM(prompt_encoder=small, decoder_runtime="tensorrt")
