"""Uncertainty (issue 17 item 2): calibration, the per-case score and flag, metric helpers, the
bundle's calibration file. Fast: no real encoder."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from automedsam import uncertainty as U
from automedsam.classes import CLASSES, class_id
from automedsam.report import class_statistics

REPO = Path(__file__).resolve().parents[1]


def _cal(**kw) -> U.Calibration:
    base = dict(temperature={"polyp": 2.0}, coef=(0.0, -4.0, 2.0, 3.0, 0.0), intercept=1.0, flag_threshold=0.5)
    base.update(kw)
    return U.Calibration(**base)


# ---- calibration keeps every label ------------------------------------------------------------


@pytest.mark.parametrize("t", [0.2, 0.7, 1.5, 8.0])
def test_temperature_keeps_each_pixel_side_of_the_threshold(t):
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.random(5000), [0.0, 1.0, 0.5, np.nextafter(0.5, 1), np.nextafter(0.5, 0)],
                        0.5 + rng.normal(0, 1e-6, 200)]).astype(np.float32)
    q = U.calibrate(p, t)
    assert np.array_equal(q > 0.5, p > 0.5) and q.dtype == np.float32
    qt = U.calibrate(torch.from_numpy(p), t)
    assert torch.equal(qt > 0.5, torch.from_numpy(p) > 0.5)
    assert q[0 + 5000] == 0.0  # blanked stays blanked
    inner = (p > 0.01) & (p < 0.99) & (np.abs(p - 0.5) > 0.01)
    # T > 1 softens (towards 0.5), T < 1 sharpens
    moved = np.abs(q[inner] - 0.5) - np.abs(p[inner] - 0.5)
    assert (moved < 0).all() if t > 1 else (moved > 0).all()


def test_inferer_label_map_unchanged_by_calibration_and_uncertainty_map_in_range():
    """The inferer's label map comes from the raw probabilities; with draws, ``spread`` becomes
    the combined uncertainty map (entropy of the calibrated probability vs twice the std)."""
    from automedsam.backbones import LOW_RES_SIZE
    from automedsam.inferer import ClassPromptInferer

    class Net(torch.nn.Module):
        image_size = 64

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def encode(self, x):
            return x.mean(1, keepdim=True)

        def _logits(self, emb, k):
            g = torch.linspace(-6, 6, LOW_RES_SIZE)
            base = g[None, :] + g[:, None] * 0.3
            return torch.stack([base * (j + 1) * 0.5 for j in range(k)] * emb.shape[0])[:, None]

        def decode_classes(self, emb, ids, skip_absent=True):
            lg = self._logits(emb, len(ids))
            return SimpleNamespace(probabilities=lambda: torch.sigmoid(lg), iou=torch.full((lg.shape[0], 1), 0.8),
                                   presence_logit=torch.full((lg.shape[0], 1), 3.0))

        def sample(self, emb, cids, n):
            lg = self._logits(emb, 1)[: len(cids)]
            return torch.sigmoid(lg), torch.full_like(lg, 0.1)

    x = torch.rand(2, 3, 40, 48)
    ids = [class_id("polyp")]
    plain = ClassPromptInferer(ids, uncertainty=0).predict(Net(), x, ids)
    drawn = ClassPromptInferer(ids, uncertainty=3).predict(Net(), x, ids)
    assert torch.equal(plain.label_map(), drawn.label_map())
    cal = _cal(temperature={"polyp": 3.0})
    assert torch.equal((plain.calibrated(cal) > 0.5), plain.probabilities > 0.5)
    u = drawn.spread
    s = drawn.extras["slice_scores"]
    assert s.shape == (1, 2) and ((s >= 0) & (s <= 1)).all()
    h = np.maximum(U.binary_entropy(drawn.calibrated().numpy()), 0.2)
    assert u.shape == drawn.probabilities.shape
    assert np.allclose(u.numpy(), (h + s[:, :, None, None]) / 2, atol=1e-5)
    assert torch.allclose(drawn.extras["draw_std"], torch.full_like(u, 0.1), atol=1e-5)


# ---- the per-case score and flag in the report ------------------------------------------------


def _report(prob_value: float, iou: float, cal):
    cid = class_id("polyp")
    lab = np.zeros((1, 32, 32), np.uint8)
    lab[0, 8:24, 8:24] = cid
    probs = np.zeros((1, 1, 32, 32), np.float32)
    probs[0, 0][lab[0] == cid] = prob_value
    return class_statistics(lab, [cid], np.array([[iou]]), np.array([[0.9]]), is_volume=False,
                            probabilities=probs, calibration=cal)["polyp"]


def test_score_and_flag_in_report():
    confident = _report(0.97, 0.95, _cal())
    unsure = _report(0.6, 0.3, _cal())
    for st in (confident, unsure):
        assert {"likely_wrong_score", "uncertain_share", "presence_margin"} <= set(st)
    assert confident["uncertain_share"] == 0.0 and unsure["uncertain_share"] == 1.0
    assert confident["likely_wrong_score"] < 0.5 <= unsure["likely_wrong_score"]
    assert U.LIKELY_WRONG in unsure["flags"] and U.LIKELY_WRONG not in confident["flags"]
    # the score is the logistic model of the features
    f = U.case_features(0.9, 0.3, 256, 256, 1024)
    assert unsure["likely_wrong_score"] == pytest.approx(1 / (1 + np.exp(-(np.dot(_cal().coef, f) + 1.0))), abs=1e-4)


def test_per_class_model_is_used_for_its_class_only():
    f = U.case_features(0.9, 0.8, 10, 100, 1000)
    cal = _cal(per_class={"polyp": ((0.0,) * 5, 3.0)})
    assert U.case_score(f, cal, "polyp") == pytest.approx(1 / (1 + np.exp(-3.0)))
    assert U.case_score(f, cal, "lungs") == pytest.approx(U.case_score(f, _cal()))


def test_report_without_probabilities_has_no_score():
    cid = class_id("polyp")
    st = class_statistics(np.zeros((1, 8, 8), np.uint8), [cid], np.zeros((1, 1)), np.zeros((1, 1)), is_volume=False)
    assert "likely_wrong_score" not in st["polyp"]


# ---- metric helpers ---------------------------------------------------------------------------


def test_auroc_known_answers():
    assert U.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert U.auroc([1, 2, 3], [0, 1, 1]) == 1.0 and U.auroc([3, 2, 1], [0, 1, 1]) == 0.0
    assert U.auroc([0.5] * 6, [0, 1, 0, 1, 0, 1]) == 0.5
    assert np.isnan(U.auroc([1, 2], [1, 1]))


def test_ece_known_answers():
    rng = np.random.default_rng(1)
    assert U.ece(np.full(1000, 0.7), np.arange(1000) < 700) == pytest.approx(0.0, abs=1e-12)
    assert U.ece(np.full(50, 0.9), np.zeros(50)) == pytest.approx(0.9)
    p = rng.random(200000)
    assert U.ece(p, rng.random(200000) < p) < 0.01  # calibrated by construction
    assert U.ece(p, rng.random(200000) < 0.5) > 0.2


def test_temperature_fit_recovers_the_true_temperature():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 4, 40000)
    y = rng.random(z.size) < 1 / (1 + np.exp(-z / 2.5))
    t = U.fit_temperature(1 / (1 + np.exp(-z)), y)
    assert t == pytest.approx(2.5, rel=0.08)
    assert U.ece(U.calibrate(1 / (1 + np.exp(-z)), t), y) < U.ece(1 / (1 + np.exp(-z)), y)


def test_logistic_fit_recovers_coefficients():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20000, 2))
    y = rng.random(20000) < 1 / (1 + np.exp(-(1.5 * x[:, 0] - 2.0 * x[:, 1] + 0.5)))
    coef, b = U.fit_logistic(x, y, l2=0.0)
    assert coef == pytest.approx([1.5, -2.0], abs=0.1) and b == pytest.approx(0.5, abs=0.1)


def test_pixel_uncertainty_is_entropy_and_spread():
    assert U.pixel_uncertainty(np.array([0.0, 0.5, 1.0])).tolist() == [0.0, 1.0, 0.0]
    assert U.pixel_uncertainty(np.array([0.0]), np.array([0.2]))[0] == pytest.approx(0.4)
    # the case score lifts every pixel of a distrusted image, entropy still ranks within it
    u = U.pixel_uncertainty(np.array([[0.0, 0.5]]), None, np.array([[0.8]]))
    assert u[0].tolist() == pytest.approx([0.4, 0.9])


# ---- the bundle's calibration file ------------------------------------------------------------


def test_bundle_file_is_read(monkeypatch):
    path = REPO / "bundles" / "automedsam" / "configs" / U.CONFIG_FILE
    monkeypatch.delenv("AUTOMEDSAM_BUNDLE", raising=False)
    assert U.config_path() == path
    data = json.loads(path.read_text())
    cal = U.bundle_calibration()
    assert cal.coef == tuple(float(c) for c in data["case_model"]["coef"]) and cal.path == str(path)
    assert all(cal.temperature_of(k) == float(v) for k, v in data["temperature"].items())
    assert set(data["temperature"]) <= set(CLASSES.values())


def test_bundle_env_points_elsewhere(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    good = json.loads((REPO / "bundles" / "automedsam" / "configs" / U.CONFIG_FILE).read_text())
    good["temperature"] = {"polyp": 4.0}
    (tmp_path / "configs" / U.CONFIG_FILE).write_text(json.dumps(good))
    monkeypatch.setenv("AUTOMEDSAM_BUNDLE", str(tmp_path))
    assert U.bundle_calibration().temperature_of("polyp") == 4.0


@pytest.mark.parametrize("text, problem", [
    (None, "not found"),
    ("{not json", "not readable JSON"),
    ('[1, 2]', "JSON object"),
    ('{"case_model": {"features": ["iou"], "coef": [1], "intercept": 0}}', "features"),
    ('{"temperature": {"polyp": -1}, "case_model": {}}', "temperatures"),
    ('{"band": [0.6, 0.9]}', "band"),
    ('{}', "missing 'case_model'"),
    ('{"case_model": {"features": ["presence_logit", "iou", "uncertain_share", "empty", "log_area"], '
     '"coef": [0, 0, 0, 0, 0], "intercept": 0, "per_class": {"polyp": {"coef": [1], "intercept": 0}}}}',
     "per_class.polyp.coef"),
])
def test_missing_or_malformed_file_is_one_line(tmp_path, monkeypatch, text, problem):
    (tmp_path / "configs").mkdir()
    f = tmp_path / "configs" / U.CONFIG_FILE
    if text is not None:
        f.write_text(text)
    monkeypatch.setenv("AUTOMEDSAM_BUNDLE", str(tmp_path))
    with pytest.raises(U.UncertaintyConfigError) as e:
        U.bundle_calibration()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(f)) and problem in msg
    # and the report says so instead of writing a score
    with pytest.raises(U.UncertaintyConfigError):
        class_statistics(np.zeros((1, 4, 4), np.uint8), [class_id("polyp")], np.zeros((1, 1)), np.zeros((1, 1)),
                         is_volume=False, probabilities=np.zeros((1, 1, 4, 4), np.float32))
