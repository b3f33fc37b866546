"""The core model on the real LiteMedSAM weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from automedsam.backbones import CheckpointError, build_backbone, default_lite_medsam_checkpoint, load_state_dict_file
from automedsam.classes import CLASS_IDS, NUM_CLASSES
from automedsam.losses import UncertaintyWeightedLoss
from automedsam.model import AutoMedSAM
from automedsam.prompt_encoder import DiffusionClassPromptEncoder

POLYP = CLASS_IDS["polyp"]
SMALL = {"channels": (16, 32), "class_dim": 32}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * (a & b).sum() / s


def gt_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max(), ys.max()]


@pytest.fixture(scope="module")
def model(backbone):
    torch.manual_seed(0)
    return AutoMedSAM(backbone, prompt_encoder=SMALL)


def test_strict_load_of_real_checkpoint(backbone):
    state = load_state_dict_file(default_lite_medsam_checkpoint())
    own = {**{f"image_encoder.{k}": v for k, v in backbone.image_encoder.state_dict().items()},
           **{f"prompt_encoder.{k}": v for k, v in backbone.prompt_encoder.state_dict().items()},
           **{f"mask_decoder.{k}": v for k, v in backbone.mask_decoder.state_dict().items()}}
    assert set(own) == set(state)
    assert all(torch.equal(own[k], state[k]) for k in state)


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nothere.pth"):
        build_backbone("lite_medsam", tmp_path / "nothere.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="junk.pth"):
        build_backbone("lite_medsam", junk)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(default_lite_medsam_checkpoint(), "rb").read(1 << 20))
    with pytest.raises(CheckpointError, match="truncated.pth"):
        build_backbone("lite_medsam", truncated)
    state = load_state_dict_file(default_lite_medsam_checkpoint())
    state.pop("mask_decoder.iou_token.weight")
    state["extra.weight"] = torch.zeros(1)
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    with pytest.raises(CheckpointError, match=r"partial.pth.*1 missing keys.*1 unexpected keys"):
        build_backbone("lite_medsam", partial)
    with pytest.raises(CheckpointError, match="needs a checkpoint"):
        build_backbone("medsam_vit_b", None)


def test_pickle_that_runs_code_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_state_dict_file(bad)
    assert not marker.exists()


def test_medsam_vit_b_loads_from_a_checkpoint_with_its_keys(tmp_path):
    from segment_anything import sam_model_registry

    sam = sam_model_registry["vit_b"](checkpoint=None)
    path = tmp_path / "medsam_vit_b.pth"
    torch.save(sam.state_dict(), path)
    bb = build_backbone("medsam_vit_b", path)
    assert bb.image_size == 1024
    assert all(not p.requires_grad for p in bb.image_encoder.parameters())
    # batched decoding: one embedding per prompt (segment-anything's decoder would broadcast)
    emb = torch.randn(2, 256, 64, 64)
    sparse, dense = bb.prompt(boxes=torch.tensor([[100., 100., 500., 500.], [10., 10., 900., 900.]]))
    logits, iou = bb.decode(emb, sparse, dense)
    assert logits.shape == (2, 1, 256, 256) and iou.shape == (2, 1)
    ref, _ = sam.mask_decoder(image_embeddings=emb[1:], image_pe=sam.prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=sparse[1:], dense_prompt_embeddings=dense[1:],
                              multimask_output=False)
    torch.testing.assert_close(logits[1:], ref, atol=1e-4, rtol=1e-4)
    state = sam.state_dict()
    state.pop(next(iter(state)))
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="medsam_vit_b.pth.*missing"):
        build_backbone("medsam_vit_b", path)


def test_encoder_is_frozen_and_stays_in_eval(model):
    model.train()
    enc = model.backbone.image_encoder
    assert not enc.training and all(not p.requires_grad for p in enc.parameters())
    assert model.class_prompt_encoder.training
    model.eval()


@pytest.mark.parametrize("batch", [1, 4])
def test_output_shapes(model, polyp_cases, batch):
    imgs = torch.from_numpy(np.stack([c[0] for c in polyp_cases[:batch]])).permute(0, 3, 1, 2).contiguous()
    model.eval()
    with torch.no_grad():
        out = model(images=imgs, class_ids=[POLYP] * batch)
        p = model.class_prompt_encoder(model.encode(imgs), torch.tensor([POLYP] * batch))
    assert out.logits.shape == (batch, 1, 256, 256)
    assert out.iou.shape == (batch, 1)
    assert out.presence_logit.shape == (batch,)
    assert p.sparse.shape == (batch, 2, 256) and p.dense.shape == (batch, 256, 64, 64)


def test_gradients_reach_exactly_the_trainable_parts(backbone, polyp_embeddings):
    for train_decoder in (False, True):
        torch.manual_seed(0)
        m = AutoMedSAM(backbone, prompt_encoder=SMALL, train_mask_decoder=train_decoder).train()
        loss_fn = UncertaintyWeightedLoss()
        emb = polyp_embeddings[:2]
        out = m(embeddings=emb, class_ids=[POLYP, POLYP])
        target = torch.zeros(2, 1, 256, 256)
        target[:, :, 100:150, 100:150] = 1
        loss = loss_fn(out.logits, target, out.presence_logit, teacher_logits=m.teacher(emb, torch.tensor([[100., 100, 150, 150]] * 2)))
        loss.backward()
        for name, p in m.named_parameters():
            trainable = name.startswith("class_prompt_encoder.") or (train_decoder and name.startswith("student_decoder."))
            assert p.requires_grad == trainable, name
            if trainable and "iou_prediction_head" not in name and "mask_tokens" not in name:
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
            if not trainable:
                assert p.grad is None, name
        assert all(p.grad is not None for p in loss_fn.parameters())
        # the teacher stays the original decoder even when the student's decoder trains
        assert all(not p.requires_grad for p in m.backbone.mask_decoder.parameters())
        keys = m.trainable_state_dict().keys()
        assert any(k.startswith("class_prompt_encoder.") for k in keys)
        assert any(k.startswith("student_decoder.") for k in keys) == train_decoder
        assert not any(k.startswith("backbone.") for k in keys)


def test_eval_is_deterministic_and_sampling_gives_spread(model, polyp_embeddings):
    model.eval()
    emb = polyp_embeddings[:1]
    with torch.no_grad():
        a = model(embeddings=emb, class_ids=[POLYP]).logits
        b = model(embeddings=emb.clone(), class_ids=[POLYP]).logits
    assert torch.equal(a, b)
    mean, spread = model.sample(emb, [POLYP], n=3)
    assert mean.shape == spread.shape == (1, 1, 256, 256)
    assert (spread >= 0).all()
    model.train()
    with torch.no_grad():
        c = model(embeddings=emb, class_ids=[POLYP]).logits
        d = model(embeddings=emb, class_ids=[POLYP]).logits
    model.eval()
    assert not torch.equal(c, d)  # training draws fresh noise


@pytest.mark.parametrize("schedule", ["linear", "cosine", "additive"])
def test_schedules_and_ablations_run(schedule):
    emb = torch.randn(2, 256, 64, 64) * 0.1
    for kwargs in ({}, {"use_diffusion": False}, {"branches": ("dense",)}, {"branches": ("sparse",)}):
        enc = DiffusionClassPromptEncoder(NUM_CLASSES, schedule=schedule, channels=(8, 16), class_dim=16, **kwargs).eval()
        p = enc(emb, torch.tensor([1, 8]))
        assert p.dense.shape == (2, 256, 64, 64) and p.presence_logit.shape == (2,)
        assert p.sparse.shape[0] == 2 and p.sparse.shape[2] == 256
    with pytest.raises(ValueError, match="class ids"):
        enc(emb, torch.tensor([0, 9]))


def test_shared_trunk_matches_per_class_forward():
    emb = torch.randn(2, 256, 64, 64) * 0.1
    enc = DiffusionClassPromptEncoder(NUM_CLASSES, layout="shared_trunk", channels=(8, 16), class_dim=16).eval()
    batched = enc.forward_classes(emb, [1, 2, 5])
    single = enc(emb[1:], torch.tensor([2]))
    torch.testing.assert_close(batched.dense[4:5], single.dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.sparse[4:5], single.sparse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("class_first", [True, False])
def test_conv_block_split_equals_the_block_on_the_concatenation(class_first):
    """A skip connection's convolution term is computed once per slice and added per item: the
    same as the block on the concatenated input."""
    from automedsam.prompt_encoder import ConvBlock

    torch.manual_seed(0)
    block = ConvBlock(6 + 4, 8).eval()
    skip, items = torch.randn(2, 4, 16, 16), torch.randn(5, 6, 16, 16)
    owner = torch.tensor([0, 0, 1, 1, 1])
    if class_first:
        mine, shared_ch = slice(0, 6), slice(6, None)
        ref = block(torch.cat([items, skip[owner]], 1))
    else:
        block = ConvBlock(4 + 6, 8).eval()
        mine, shared_ch = slice(4, None), slice(0, 4)
        ref = block(torch.cat([skip[owner], items], 1))
    out = block.forward_split(items, mine, block.shared(skip, shared_ch), owner)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_skip_absent_runs_the_branches_only_for_present_items():
    torch.manual_seed(0)
    emb = torch.randn(3, 256, 64, 64) * 0.1
    enc = DiffusionClassPromptEncoder(NUM_CLASSES, layout="shared_trunk", channels=(8, 16), class_dim=16).eval()
    with torch.no_grad():
        full = enc.forward_classes(emb, [1, 2, 5, 8])
        enc.presence_head[-1].bias -= full.presence_logit.median()  # some items absent, some present
        full = enc.forward_classes(emb, [1, 2, 5, 8])
        part = enc.forward_classes(emb, [1, 2, 5, 8], skip_absent=True)
    present = torch.nonzero(full.presence_logit > 0).squeeze(1)
    assert full.rows is None and 0 < present.numel() < 12
    assert torch.equal(part.rows, present) and part.dense.shape[0] == present.numel()
    torch.testing.assert_close(part.presence_logit, full.presence_logit)
    torch.testing.assert_close(part.dense, full.dense[present], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part.sparse, full.sparse[present], atol=1e-5, rtol=1e-5)


def test_uncertainty_weights_are_learned_and_logged():
    loss_fn = UncertaintyWeightedLoss()
    logits = torch.zeros(2, 1, 8, 8, requires_grad=True)
    target = torch.ones(2, 1, 8, 8)
    parts = loss_fn.components(logits, target, presence_logit=torch.zeros(2), teacher_logits=torch.zeros(2, 1, 8, 8))
    assert set(parts) == {"region", "pixel", "distill", "presence"}
    opt = torch.optim.SGD(loss_fn.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        loss_fn.combine({k: v.detach() for k, v in parts.items()}).backward()
        opt.step()
    w = loss_fn.weights()
    # exp(-s_i) moves from 1 towards 1/L_i: the ordering of the weights inverts that of the losses
    losses = {k: float(v) for k, v in parts.items()}
    assert all(abs(w[k] - 1.0) > 0.05 for k in w)
    by_loss = sorted(losses, key=losses.get)
    assert sorted(w, key=w.get, reverse=True) == by_loss
    fixed = UncertaintyWeightedLoss(learn_weights=False, terms=("region", "pixel"))
    assert torch.isclose(fixed(logits, target), parts["region"] + parts["pixel"])


def test_teacher_segments_real_polyps_from_gt_boxes(model, polyp_cases, polyp_embeddings):
    boxes = torch.tensor([gt_box(m) for _, m in polyp_cases], dtype=torch.float32)
    logits = model.teacher(polyp_embeddings, boxes)
    dices = [dice(logits[i, 0].numpy() > 0, m) for i, (_, m) in enumerate(polyp_cases)]
    assert np.mean(dices) > 0.8, dices


@pytest.mark.slow
def test_class_path_learns_real_polyps_without_a_box(backbone, polyp_cases, polyp_embeddings):
    """Only the class prompt encoder trains (decoder frozen): a few hundred steps on 8 cached
    embeddings must segment them with no box."""
    torch.manual_seed(0)
    m = AutoMedSAM(backbone, prompt_encoder=SMALL).train()
    loss_fn = UncertaintyWeightedLoss(terms=("region", "pixel", "distill"))
    params = [p for p in m.parameters() if p.requires_grad] + list(loss_fn.parameters())
    assert all(n.startswith("class_prompt_encoder.") for n, p in m.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-3)
    masks = torch.from_numpy(np.stack([c[1] for c in polyp_cases])).float()[:, None]
    boxes = torch.tensor([gt_box(c[1]) for c in polyp_cases], dtype=torch.float32)
    teacher = m.teacher(polyp_embeddings, boxes)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randperm(8, generator=g)[:4]
        out = m(embeddings=polyp_embeddings[idx], class_ids=[POLYP] * 4)
        loss = loss_fn(out.logits, masks[idx], teacher_logits=teacher[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        logits = m(embeddings=polyp_embeddings, class_ids=[POLYP] * 8).logits
    dices = [dice(logits[i, 0].numpy() > 0, c[1]) for i, c in enumerate(polyp_cases)]
    assert np.mean(dices) > 0.8, dices


def test_checkpoint_loader_refuses_a_pickle_that_runs_code(tmp_path):
    """The other loading paths: MONAI's CheckpointLoader (training resume, evaluate, inference
    configs) and ``load_pretrained`` (``automedsam segment --weights``) use weights_only=True too."""
    import pickle

    from ignite.engine import Engine
    from monai.handlers import CheckpointLoader

    from automedsam.pretrained import load_pretrained

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "checkpoint_epoch=3.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "trainer": Evil()}, bad)  # torch's own zip format, poisoned
    engine = Engine(lambda e, b: None)
    CheckpointLoader(load_path=str(bad), load_dict={"model": torch.nn.Linear(1, 1)}).attach(engine)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        engine.run([0], max_epochs=1)
    assert not marker.exists()
    plain = tmp_path / "model.pt"
    with open(plain, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(CheckpointError, match="model.pt"):
        load_pretrained(weights=plain)
    assert not marker.exists()
