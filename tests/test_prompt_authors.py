"""The authors' released class prompt encoder as a preset (issue 17 item 3)."""

from __future__ import annotations

import pytest
import torch

from automedsam.model import AutoMedSAM, build_class_prompt_encoder
from automedsam.prompt_authors import AuthorsClassPromptEncoder, chain_noise_scale


def _their_loop(x, label, fc_label, timesteps, noises):
    """Their DiffusionModel.forward's chain, written out from the released code: for t = T..1,
    label_proj = fc_label(label.float().view(-1, 1)) as a (B,1,H,W) map and
    x = x + (randn * (1 / (t + 1)) + label_proj); ``noises`` stands in for their torch.randn_like."""
    draws = iter(noises)
    for t in range(timesteps, 0, -1):
        label_proj = fc_label(label.float().view(-1, 1)).view(label.shape[0], 1, x.size(2), x.size(3))
        noise = next(draws) * (1 / (t + 1)) + label_proj
        x = x + noise
    return x


def test_forward_process_is_their_loop():
    torch.manual_seed(0)
    enc = AuthorsClassPromptEncoder(num_classes=8, embed_dim=8, embedding_size=6, timesteps=7)
    x = torch.randn(3, 8, 6, 6)
    ids = torch.tensor([1, 5, 8])
    g = torch.Generator().manual_seed(1)
    noises = [torch.randn(3, 8, 6, 6, generator=g) for _ in range(7)]
    ours = enc.diffuse(x, enc.class_map(ids), noises)
    torch.testing.assert_close(ours, _their_loop(x, ids, enc.fc_label, 7, noises), rtol=1e-6, atol=1e-6)
    # the class map is accumulated at every step: T times phi(c) on top of the noise
    no_noise = enc.diffuse(x, enc.class_map(ids), [torch.zeros_like(x)] * 7)
    torch.testing.assert_close(no_noise - x, 7 * enc.class_map(ids).expand_as(x), rtol=1e-5, atol=1e-5)


def test_evaluation_adds_the_fixed_chain_once_and_is_deterministic():
    torch.manual_seed(0)
    enc = AuthorsClassPromptEncoder(num_classes=8, embed_dim=8, embedding_size=6, timesteps=7).eval()
    x = torch.randn(2, 8, 6, 6)
    ids = torch.tensor([2, 7])
    chain = enc.diffuse(x, enc.class_map(ids), [n.expand_as(x) for n in enc.step_noises()])
    torch.testing.assert_close(x + enc.eval_noise + 7 * enc.class_map(ids), chain, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        a, b = enc(x, ids), enc(x, ids)
    assert torch.equal(a.dense, b.dense) and torch.equal(a.sparse, b.sparse)
    # the summed noise has the chain's scale: sqrt(sum 1/(t+1)^2)
    assert chain_noise_scale(100) == pytest.approx(sum(1 / (t + 1) ** 2 for t in range(1, 101)) ** 0.5)


def test_released_architecture_shapes_and_the_listed_bugs_fixed():
    enc = AuthorsClassPromptEncoder(num_classes=8)
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert shapes["fc_label.weight"] == (64 * 64, 1)  # a linear layer on the raw index
    assert shapes["unet.enc1.0.weight"] == (64, 257, 3, 3) and shapes["unet.enc2.2.weight"] == (128, 128, 3, 3)
    assert shapes["unet.middle.0.weight"] == (256, 128, 3, 3) and shapes["unet.middle.2.weight"] == (128, 256, 3, 3)
    assert shapes["unet.dense_attention.weight"] == (128, 129, 1, 1)
    assert shapes["unet.sparse_attention.1.weight"] == (128, 129, 1, 1)
    assert shapes["unet.dense_dec2.2.weight"] == (256, 64, 3, 3)
    assert not any(isinstance(m, (torch.nn.GroupNorm, torch.nn.SiLU)) for m in enc.modules())
    assert enc.presence_head is None  # ours, off in the preset
    enc.eval()
    with torch.no_grad():
        p = enc(torch.randn(1, 256, 64, 64) * 0.1, torch.tensor([3]))  # batch size 1 (their squeeze broke it)
    assert p.sparse.shape == (1, 2, 256) and p.dense.shape == (1, 256, 64, 64)  # not swapped
    assert p.dense.min() >= 0  # their final ReLU
    assert torch.all(p.presence_logit > 0)  # no head: every class "present", masks ungated


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="preset"):
        build_class_prompt_encoder(8, preset="theirs")


def test_authors_preset_trains_and_runs_end_to_end(backbone):
    from automedsam.engine import ClassPromptTrainInferer, EngineLoss, trainable_parameters

    torch.manual_seed(0)
    net = AutoMedSAM(backbone, prompt_encoder={"preset": "authors", "presence": True, "timesteps": 10}).train()
    assert isinstance(net.class_prompt_encoder, AuthorsClassPromptEncoder)
    emb = torch.randn(2, 256, 64, 64) * 0.1
    ids = torch.tensor([1, 7])
    mask = torch.zeros(2, 1, 256, 256)
    mask[0, :, 40:100, 50:140] = 1
    loss = EngineLoss()
    opt = torch.optim.AdamW(trainable_parameters(net, loss, 0.02), lr=1e-3)
    before = net.class_prompt_encoder.fc_label.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        value = loss(ClassPromptTrainInferer()(emb, net, class_ids=ids), {"mask": mask})
        value.backward()
        opt.step()
    assert torch.isfinite(value)
    assert not torch.equal(before, net.class_prompt_encoder.fc_label.weight)
    net.eval()
    with torch.no_grad():
        full = net.decode_classes(emb, [1, 2, 7])
        skipped = net.decode_classes(emb, [1, 2, 7], skip_absent=True)
    assert full.logits.shape == (6, 1, 256, 256)
    torch.testing.assert_close(full.probabilities(), skipped.probabilities(), atol=1e-4, rtol=1e-4)
