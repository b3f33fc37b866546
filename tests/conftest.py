"""Shared fixtures: the real LiteMedSAM backbone (loaded once) and the real data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    return Path(os.environ.get("AUTOMEDSAM_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = data_dir()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set AUTOMEDSAM_DATA)")
    return root


@pytest.fixture(scope="session")
def backbone():
    from automedsam.backbones import build_backbone

    torch.manual_seed(0)
    return build_backbone("lite_medsam")


@pytest.fixture(scope="session")
def polyp_cases(data_root):
    """8 real Kvasir polyps: (image (256,256,3) float [0,1], mask (256,256) bool)."""
    import numpy as np
    from PIL import Image

    folder = data_root / "polyp" / "kvasir-seg"
    names = sorted(p.name for p in (folder / "images").glob("*.jpg"))[:8]
    cases = []
    for n in names:
        img = np.asarray(Image.open(folder / "images" / n).convert("RGB"), dtype=np.float32) / 255.0
        mask = np.asarray(Image.open(folder / "masks" / n).convert("L")) > 127
        cases.append((img, mask))
    return cases


@pytest.fixture(scope="session")
def polyp_embeddings(backbone, polyp_cases):
    """Image embeddings of the 8 polyps (the cache a training run would use)."""
    import numpy as np

    imgs = torch.from_numpy(np.stack([c[0] for c in polyp_cases])).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        return torch.cat([backbone.encode(imgs[i:i + 4]) for i in range(0, len(imgs), 4)])
