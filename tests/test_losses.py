"""The joint loss's learned weights (issue 16 item 5) and the switchable presence head (issue 17
item 4)."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine, Events

from automedsam.engine import ClassPromptTrainInferer, EngineLoss, LossWeightsHandler, trainable_parameters
from automedsam.losses import UncertaintyWeightedLoss
from automedsam.model import AutoMedSAM
from automedsam.prompt_encoder import PRESENT_LOGIT, DiffusionClassPromptEncoder

SMALL = {"channels": (16, 32), "class_dim": 32}


def _batch(present: bool):
    logits = torch.randn(4, 1, 16, 16, requires_grad=True)
    target = torch.zeros(4, 1, 16, 16)
    if present:
        target[:2, :, 4:10, 4:10] = 1
    return logits, target


def test_terms_without_support_add_neither_loss_nor_log_variance():
    loss_fn = UncertaintyWeightedLoss()
    logits, target = _batch(present=False)
    parts = loss_fn.components(logits, target, presence_logit=torch.zeros(4), teacher_logits=torch.zeros(4, 1, 16, 16),
                               has_teacher=torch.zeros(4))
    # no class present: no Dice term; no teacher box: no distillation term
    assert set(parts) == {"pixel", "presence"}
    loss_fn.combine(parts).backward()
    grads = dict(zip(loss_fn.terms, loss_fn.log_vars.grad.tolist()))
    assert grads["region"] == 0.0 and grads["distill"] == 0.0
    assert grads["pixel"] != 0.0 and grads["presence"] != 0.0
    # with support, every term is there and every weight gets a gradient
    loss_fn.log_vars.grad = None
    logits, target = _batch(present=True)
    parts = loss_fn.components(logits, target, presence_logit=torch.zeros(4), teacher_logits=torch.zeros(4, 1, 16, 16))
    assert set(parts) == {"region", "pixel", "distill", "presence"}
    loss_fn.combine(parts).backward()
    assert all(g != 0.0 for g in loss_fn.log_vars.grad.tolist())


def test_loss_weights_have_their_own_group_and_reach_their_optimum():
    """At the optimum s_i = log L_i. In their own group (lr 0.02, no weight decay) AdamW gets the
    weights there within an epoch's worth of steps; in the network's group (lr 2e-4, as before)
    they barely move."""
    net = torch.nn.Linear(2, 2)
    losses = {"region": 0.3, "pixel": 0.05, "distill": 0.2, "presence": 0.02}

    def run(loss_weight_lr):
        loss_fn = UncertaintyWeightedLoss()
        groups = trainable_parameters(net, loss_fn, loss_weight_lr)
        opt = torch.optim.AdamW(groups, lr=2e-4, weight_decay=1e-4)
        for _ in range(290):  # about one epoch of the bundle's training (2290 samples, batch 8)
            opt.zero_grad()
            loss_fn.combine({k: torch.tensor(v) for k, v in losses.items()}).backward()
            opt.step()
        return groups, {t: float(s) for t, s in zip(loss_fn.terms, loss_fn.log_vars.detach())}

    groups, learned = run(0.02)
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0 and groups[1]["lr"] == 0.02
    assert all(abs(learned[k] - math.log(v)) < 0.2 for k, v in losses.items()), learned
    _, shared = run(None)
    assert all(abs(s) < 0.1 for s in shared.values()), shared


def test_loss_weight_trajectory_is_logged_per_epoch_and_survives_a_resume(tmp_path):
    loss = EngineLoss()
    opt = torch.optim.AdamW(trainable_parameters(torch.nn.Linear(1, 1), loss, 0.05), lr=1e-4)
    logits, target = _batch(present=True)

    def step(engine, _):
        opt.zero_grad()
        out = loss({"logits": logits.detach(), "presence_logit": torch.zeros(4)},
                   {"mask": target, "teacher": torch.zeros(4, 1, 16, 16)})
        out.backward()
        opt.step()
        return out

    def train(epochs, start=0):
        engine = Engine(step)
        LossWeightsHandler(loss, output_dir=str(tmp_path)).attach(engine)
        if start:
            engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "epoch", start))
        engine.run(range(20), max_epochs=epochs)
        return engine

    engine = train(3)
    assert set(engine.state.metrics) >= {"weight_region", "loss_region", "weight_presence"}
    rows = (tmp_path / "loss_weights.csv").read_text().splitlines()
    assert rows[0].split(",")[:5] == ["epoch", "weight_region", "weight_pixel", "weight_distill", "weight_presence"]
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    weights = [[float(x) for x in r.split(",")[1:5]] for r in rows[1:]]
    assert weights[0] != weights[2]  # they move
    # a run resumed after epoch 2 redoes epoch 3: one row per epoch, no duplicate
    train(3, start=2)
    rows = (tmp_path / "loss_weights.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]


def test_presence_head_can_be_switched_off():
    torch.manual_seed(0)
    enc = DiffusionClassPromptEncoder(num_classes=8, presence=False, layout="shared_trunk", **SMALL).eval()
    assert not any(k.startswith("presence_head") for k in enc.state_dict())
    emb = torch.randn(2, 256, 64, 64) * 0.1
    p = enc.forward_classes(emb, [1, 7])
    assert torch.equal(p.presence_logit, torch.full((4,), PRESENT_LOGIT))
    # skipping absent classes skips nothing: every item is decoded
    assert torch.equal(enc.forward_classes(emb, [1, 7], skip_absent=True).rows, torch.arange(4))
    with_head = DiffusionClassPromptEncoder(num_classes=8, layout="shared_trunk", **SMALL)
    assert any(k.startswith("presence_head") for k in with_head.state_dict())


def test_presence_off_gives_ungated_masks_and_trains_without_the_presence_term(backbone):
    torch.manual_seed(0)
    net = AutoMedSAM(backbone, prompt_encoder={**SMALL, "presence": False}).train()
    emb = torch.randn(2, 256, 64, 64) * 0.1
    ids = torch.tensor([1, 7])
    target = torch.zeros(2, 1, 256, 256)
    target[0, :, 50:90, 60:120] = 1
    out = ClassPromptTrainInferer()(emb, net, class_ids=ids)
    assert out["presence_logit"] is None
    with pytest.raises(ValueError, match="presence head"):
        EngineLoss()(out, {"mask": target})
    loss = EngineLoss(terms=["region", "pixel", "distill"])
    value = loss(out, {"mask": target})
    value.backward()
    assert torch.isfinite(value)
    assert all(p.grad is not None for n, p in net.named_parameters() if n.startswith("class_prompt_encoder.enc1"))
    net.eval()
    with torch.no_grad():
        pred = net(embeddings=emb, class_ids=ids)
    torch.testing.assert_close(pred.probabilities(), torch.sigmoid(pred.logits))  # nothing blanked
