"""The shipped model: the bundle's ``network_def`` plus its trained weights.

The bundle (``bundles/automedsam``) is the one home of the model's configuration; the CLI and
the Python API build the network from its ``configs/inference.yaml`` and load
``models/model.pt`` (only what training changed; the backbone comes from its package).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .backbones import CheckpointError

WEIGHTS_NAME = "model.pt"


def default_bundle_dir() -> Path:
    """``$AUTOMEDSAM_BUNDLE`` or the bundle beside the package in this repository."""
    env = os.environ.get("AUTOMEDSAM_BUNDLE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "bundles" / "automedsam"


def use_vocabulary(bundle_dir: str | os.PathLike) -> None:
    """Make the bundle's classes file (``configs/classes.json``) the vocabulary, when it has one
    and it is not the one loaded already (see :func:`automedsam.classes.load_vocabulary`)."""
    from . import classes

    path = Path(bundle_dir) / "configs" / classes.VOCABULARY_FILE
    if path.is_file() and (classes.VOCABULARY_PATH is None or path.resolve() != classes.VOCABULARY_PATH.resolve()):
        classes.load_vocabulary(path)


def network_from_bundle(bundle_dir: str | os.PathLike | None = None, config: str = "inference.yaml",
                        **overrides):
    """Instantiate the bundle's ``network_def`` (with ``network_def#...`` overrides)."""
    from monai.bundle import ConfigParser

    bundle = Path(bundle_dir) if bundle_dir else default_bundle_dir()
    cfg = bundle / "configs" / config
    if not cfg.is_file():
        raise FileNotFoundError(f"bundle config not found: {cfg}")
    use_vocabulary(bundle)
    parser = ConfigParser()
    parser.read_config(str(cfg))
    parser["bundle_root"] = str(bundle)
    for k, v in overrides.items():
        parser[f"network_def#{k}"] = v
    return parser.get_parsed_content("network_def")


def load_pretrained(bundle_dir: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
                    device: str | torch.device = "cpu", backbone_checkpoint: str | None = None):
    """The trained AutoMedSAM, in eval mode, on ``device``."""
    bundle = Path(bundle_dir) if bundle_dir else default_bundle_dir()
    overrides = {"checkpoint": backbone_checkpoint} if backbone_checkpoint else {}
    net = network_from_bundle(bundle, **overrides)
    path = Path(weights) if weights else bundle / "models" / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"AutoMedSAM weights not found: {path} (train them with the bundle's train.yaml, "
                              f"see bundles/automedsam/docs/README.md)")
    net.load_trainable(path)
    return net.to(device).eval()
