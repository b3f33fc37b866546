"""benchmarks/ablations.py: each variant's overrides change what its name says (through the
bundle's own train.yaml), and cache -> train -> report runs end to end on real data (one Kvasir
case, one epoch), reporting an interrupted variant at its last finished epoch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "ablations.py"
CONFIGS = REPO / "bundles" / "automedsam" / "configs"
sys.path.insert(0, str(REPO / "benchmarks"))

import ablations  # noqa: E402


def _parsed(overrides: dict):
    from monai.bundle import ConfigParser

    from automedsam.classes import CLASSES
    from automedsam.model import build_class_prompt_encoder

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    for k, v in overrides.items():
        parser[k] = v
    encoder = build_class_prompt_encoder(len(CLASSES), **parser.get_parsed_content("network_def#prompt_encoder"))
    return encoder, parser.get_parsed_content("loss").loss  # EngineLoss wraps UncertaintyWeightedLoss


def test_full_variant_is_the_shipped_configuration():
    from monai.bundle import ConfigParser

    train, infer = ConfigParser(), ConfigParser()
    train.read_config(str(CONFIGS / "train.yaml"))
    infer.read_config(str(CONFIGS / "inference.yaml"))
    assert ablations.VARIANTS["full"][1] == {}
    assert train.get("network_def#prompt_encoder") == infer.get("network_def#prompt_encoder")


@pytest.mark.parametrize("name, check", [
    ("full", lambda e, loss: e.use_diffusion and e.branches == ("dense", "sparse") and e.schedule == "linear"
     and e.layout == "shared_trunk" and loss.learn_weights and "distill" in loss.terms
     and e.presence_head is not None and "presence" in loss.terms),
    ("no_diffusion", lambda e, loss: not e.use_diffusion),
    ("dense_only", lambda e, loss: e.branches == ("dense",) and not hasattr(e, "sparse_branch")),
    ("sparse_only", lambda e, loss: e.branches == ("sparse",) and not hasattr(e, "dense_branch")),
    ("fixed_weights", lambda e, loss: not loss.learn_weights and not loss.log_vars.requires_grad),
    ("no_distill", lambda e, loss: "distill" not in loss.terms and len(loss.terms) == 3),
    ("additive", lambda e, loss: e.schedule == "additive"),
    ("authors_layout", lambda e, loss: e.layout == "authors"),
    ("authors_preset", lambda e, loss: getattr(e, "preset", None) == "authors" and e.presence_head is not None
     and e.use_diffusion and e.timesteps == 100),
    ("no_presence", lambda e, loss: e.presence_head is None and "presence" not in loss.terms),
])
def test_each_variant_changes_what_it_names(name, check):
    encoder, loss = _parsed(ablations.VARIANTS[name][1])
    assert check(encoder, loss)
    if name != "full":  # and nothing else: the full model differs in the named setting only
        full_encoder, full_loss = _parsed({})
        assert not check(full_encoder, full_loss)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variants"):
        ablations._names("full,no_such_thing")


def _run(args: list[str], env: dict) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_cache_train_report_end_to_end(data_root, tmp_path):
    import os

    env = dict(os.environ, AUTOMEDSAM_DATA=str(data_root), PYTHONPATH=os.pathsep.join(
        [str(REPO / "custom"), os.environ.get("PYTHONPATH", "")]))
    cache, runs, out = tmp_path / "cache", tmp_path / "runs", tmp_path / "abl"
    _run(["cache", "--cache_dir", str(cache), "--datalists", "kvasir", "--max_cases", "1"], env)
    assert len(list((cache / "slices").rglob("*"))) >= 2  # the training and the validation image
    _run(["train", "--cache_dir", str(cache), "--runs_dir", str(runs), "--variants", "full,dense_only",
          "--epochs", "1", "--parallel", "2", "--max_cases", "1"], env)
    for name in ("full", "dense_only"):
        assert (runs / name / "model.pt").is_file()
        args = json.loads((runs / name / "args.json").read_text())
        assert args["train#trainer#max_epochs"] == 1 and args["build_cache"] is False
    assert json.loads((runs / "dense_only" / "args.json").read_text())[
        "network_def#prompt_encoder#branches"] == ["dense"]
    (runs / "dense_only" / "model.pt").unlink()  # as if stopped before the end: its last checkpoint counts
    _run(["report", "--cache_dir", str(cache), "--runs_dir", str(runs), "--variants", "full,dense_only",
          "--datalists", "kvasir", "--max_cases", "1", "--device", "cpu", "--note", "test run", "--out", str(out)],
         env)
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["variants"]["full"]["finished"] and res["variants"]["full"]["epochs"] == 1
    assert not res["variants"]["dense_only"]["finished"] and res["variants"]["dense_only"]["epochs"] == 1
    for m in ("full", "dense_only", "box_oracle"):
        assert 0.0 <= res["methods"][m]["kvasir/polyp"]["dice"] <= 1.0
    assert res["methods"]["box_oracle"]["kvasir/polyp"]["dice"] > 0.5  # the teacher with the true box
    md = out.with_suffix(".md").read_text()
    assert "| dense_only | dense branch alone | 1 (unfinished) |" in md and "test run" in md
