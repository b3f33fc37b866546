"""The S-step reverse diffusion of the sparse prompt (prompt_encoder reverse_steps >= 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from automedsam.engine import ClassPromptTrainInferer, EngineLoss, prepare_batch
from automedsam.model import AutoMedSAM
from automedsam.prompt_encoder import DiffusionClassPromptEncoder, class_items
from automedsam.reverse_diffusion import SparseReverseDiffusion

REPO = Path(__file__).resolve().parents[1]
SMALL = {"channels": (16, 32), "class_dim": 32, "layout": "shared_trunk"}
# small enough that an ONNX export takes seconds
TINY = {"channels": (8, 16), "class_dim": 16, "layout": "shared_trunk", "embedding_size": 16,
        "reverse": {"width": 32, "heads": 2, "depth": 1}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors on a shared 2-core machine: one thread, or the pool's spinning dominates."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _encoder(steps: int, seed: int = 0, **kw) -> DiffusionClassPromptEncoder:
    torch.manual_seed(seed)
    return DiffusionClassPromptEncoder(num_classes=8, reverse_steps=steps, **{**TINY, **kw}).eval()


def _emb(n: int = 2, size: int = 16) -> torch.Tensor:
    return 0.1 * torch.randn(n, 256, size, size, generator=torch.Generator().manual_seed(1))


def test_fixed_seed_gives_the_same_prompts_and_the_chain_starts_from_its_noise():
    emb = _emb()
    enc = _encoder(4)
    with torch.no_grad():
        a, b = enc.forward_classes(emb, [1, 3]), enc.forward_classes(emb, [1, 3])
        assert torch.equal(a.sparse, b.sparse)
        # the same weights rebuilt from the state dict (x_T is stored with them)
        again = _encoder(4, seed=5)
        again.load_state_dict(enc.state_dict())
        assert torch.equal(again.forward_classes(emb, [1, 3]).sparse, a.sparse)
        # another x_T gives another prompt: the output depends on where the chain starts
        other = torch.randn(4, 2, 256, generator=torch.Generator().manual_seed(9))
        owner, ids = class_items(2, [1, 3])
        assert not torch.allclose(enc.prompts_for(emb, owner, ids, reverse_noise=other).sparse, a.sparse, atol=1e-3)
        # training draws fresh noise for x_T (and t): two training passes differ
        enc.train()
        assert not torch.allclose(enc.forward_classes(emb, [1]).sparse, enc.forward_classes(emb, [1]).sparse)


def test_s_step_sparse_prompt_differs_from_one_pass_and_changes_with_s():
    emb = _emb()
    one = _encoder(0)
    multi = _encoder(2)  # same seed: the U-Net is the same, the reverse chain comes on top
    assert one.reverse is None and _encoder(1).reverse is None  # 0 and 1 are both the one-pass model
    with torch.no_grad():
        p1, p2 = one.forward_classes(emb, [1, 3]), multi.forward_classes(emb, [1, 3])
        torch.testing.assert_close(p2.dense, p1.dense)  # dense prompt and presence stay one-pass
        torch.testing.assert_close(p2.presence_logit, p1.presence_logit)
        assert not torch.allclose(p2.sparse, p1.sparse, atol=1e-2)
        by_s = {}
        for s in (1, 2, 4, 8):
            multi.reverse.steps = s
            by_s[s] = multi.forward_classes(emb, [1, 3]).sparse
    for s, t in ((1, 2), (2, 4), (4, 8), (1, 8)):
        assert not torch.allclose(by_s[s], by_s[t], atol=1e-3), (s, t)
    assert multi.reverse.schedule(4) == [1000, 750, 500, 250]


def test_bad_reverse_settings_are_refused():
    with pytest.raises(ValueError, match="reverse_steps must be >= 0"):
        _encoder(-1)
    with pytest.raises(ValueError, match="needs the 'sparse' branch"):
        _encoder(4, branches=("dense",))
    with pytest.raises(ValueError, match="steps must be in 1..1000"):
        _encoder(4).reverse.steps = 0
    with pytest.raises(ValueError, match="schedule must be"):
        _encoder(4, reverse={"schedule": "additive"})
    with pytest.raises(ValueError, match="not divisible"):
        _encoder(4, reverse={"width": 30, "heads": 4})


def test_denoiser_learns_a_tiny_problem():
    """x0 is a fixed function of the condition: a few dozen steps of the denoising objective
    bring its loss down, and the S-step chain's answer closer to x0."""
    g = torch.Generator().manual_seed(0)
    rev = SparseReverseDiffusion(embed_dim=16, cond_dim=8, steps=4, width=32, depth=1, heads=2)
    cond_tokens, cond_vec = torch.randn(64, 2, 16, generator=g), torch.randn(64, 8, generator=g)
    mix = torch.randn(8, 2 * 16, generator=g) / 8 ** 0.5
    x0 = (0.5 * cond_tokens + (cond_vec @ mix).view(-1, 2, 16)).detach()
    t_eval = torch.randint(1, 1001, (64,), generator=g)
    n_eval = torch.randn(64, 2, 16, generator=g)

    def losses():
        with torch.no_grad():
            ctx = rev.denoiser.context(cond_tokens, cond_vec)
            return float(rev.denoise_error(ctx, x0, t_eval, n_eval).mean()), \
                float(((rev.sample(ctx) - x0) ** 2).mean())

    torch.manual_seed(0)
    before, sample_before = losses()
    opt = torch.optim.Adam(rev.parameters(), lr=1e-2)
    for _ in range(60):
        loss = rev.denoise_error(rev.denoiser.context(cond_tokens, cond_vec), x0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, sample_after = losses()
    assert after < 0.5 * before, (before, after)
    assert sample_after < 0.6 * sample_before, (sample_before, sample_after)


def test_one_pass_default_leaves_the_shipped_models_prompts_unchanged():
    """The shipped weights under the shipped config (reverse_steps 0) give the prompts the code
    before the reverse diffusion gave (tests/data/shipped_prompts_onepass.pt, made with it)."""
    cfgs = [yaml.safe_load((REPO / "bundles/automedsam/configs" / f).read_text())["network_def"]["prompt_encoder"]
            for f in ("inference.yaml", "train.yaml")]
    assert cfgs[0] == cfgs[1] and cfgs[0]["reverse_steps"] == 0
    ref = torch.load(REPO / "tests/data/shipped_prompts_onepass.pt", weights_only=True)
    state = torch.load(REPO / "bundles/automedsam/models/model.pt", map_location="cpu", weights_only=True)
    own = {k[len("class_prompt_encoder."):]: v for k, v in state.items() if k.startswith("class_prompt_encoder.")}
    enc = DiffusionClassPromptEncoder(num_classes=own["class_embed.weight"].shape[0], **cfgs[0])
    enc.load_state_dict(own, strict=True)  # no new weights in the one-pass model
    enc.eval()
    with torch.no_grad():
        p = enc.forward_classes(0.1 * torch.randn(2, 256, 64, 64, generator=torch.Generator().manual_seed(0)),
                                ref["class_ids"])
    tol = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(p.sparse, ref["sparse"], **tol)
    torch.testing.assert_close(p.presence_logit, ref["presence_logit"], **tol)
    torch.testing.assert_close(p.dense.mean((2, 3)), ref["dense_pooled"], **tol)
    torch.testing.assert_close(p.dense[:, :, ::16, ::16], ref["dense_strided"], **tol)


def test_onnx_export_unrolls_the_chain_and_agrees_with_eager(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from automedsam.runtime import ClassPromptRunner

    monkeypatch.setenv("AUTOMEDSAM_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    enc = DiffusionClassPromptEncoder(num_classes=8, reverse_steps=2, **TINY).eval()
    emb = _emb()
    owner, ids = class_items(2, [1, 3])
    runner = ClassPromptRunner("onnx")
    with torch.no_grad():
        for s in (2, 3):  # another S is another graph (a new export), each agreeing with eager
            enc.reverse.steps = s
            ref = enc.prompts_for(emb, owner, ids)
            out = runner(enc, emb, owner, ids)
            torch.testing.assert_close(out.sparse, ref.sparse, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out.dense, ref.dense, rtol=1e-4, atol=1e-5)
            assert len(list(tmp_path.glob("*.onnx"))) == s - 1
    assert not torch.allclose(runner(enc, emb, owner, ids).sparse, enc.prompts_for(emb, owner, ids, reverse_noise=(
        torch.randn(4, 2, 256))).sparse, atol=1e-3)


def test_one_training_step_through_the_engine(backbone):
    torch.manual_seed(0)
    net = AutoMedSAM(backbone, prompt_encoder={**SMALL, "reverse_steps": 2}).train()  # SAM's 64x64 grid
    mask = torch.zeros(2, 1, 256, 256)
    mask[0, :, 60:90, 50:120] = 1
    batch = {"embedding": _emb(2, 64), "class_id": torch.tensor([1, 7]), "mask": mask,
             "present": torch.tensor([1.0, 0.0]), "box": torch.tensor([[50.0, 60, 120, 90], [0, 0, 0, 0]]),
             "teacher": torch.zeros(2, 1, 256, 256), "has_teacher": torch.tensor([True, False])}
    inputs, targets, _, kwargs = prepare_batch(batch)
    loss = EngineLoss(terms=["region", "pixel", "distill", "presence", "denoise"])
    out = ClassPromptTrainInferer()(inputs, net, **kwargs)
    assert out["denoise_error"].shape == (2,)
    value = loss(out, targets)
    value.backward()
    assert set(loss.last) == {"region", "pixel", "distill", "presence", "denoise"}
    # the denoise term is the positive's error alone (the negative has no box)
    assert loss.last["denoise"] == pytest.approx(float(out["denoise_error"][0].detach()))
    for part in ("reverse.denoiser.out", "reverse.denoiser.c_in", "sparse_branch.out", "enc1"):
        grads = [p.grad for n, p in net.class_prompt_encoder.named_parameters() if n.startswith(part)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), part
    # the denoise term weighs its own learned variance
    assert loss.loss.log_vars.grad[loss.loss.terms.index("denoise")] != 0
    # without a positive there is no denoise term; without the reverse diffusion it is refused
    no_pos = {**targets, "present": torch.zeros(2)}
    assert "denoise" not in loss.loss.components(out["logits"], targets["mask"] * 0, out["presence_logit"],
                                                  no_pos["present"], denoise_error=out["denoise_error"])
    one_pass = AutoMedSAM(backbone, prompt_encoder=SMALL).train()
    plain = ClassPromptTrainInferer()(inputs, one_pass, **kwargs)
    assert plain["denoise_error"] is None
    with pytest.raises(ValueError, match="reverse_steps >= 2"):
        loss(plain, targets)
