"""``automedsam demo``: segment with the shipped weights, on the real development data when it is
there (``$AUTOMEDSAM_DATA`` or ../shared/data), otherwise on a sample this module generates
(a synthetic abdominal CT volume and a synthetic endoscopy frame) - and say which.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

DEMO_DATALISTS = ("kvasir", "shenzhen", "totalseg", "brats")


def real_samples(data_dir: Path) -> list[Path]:
    """The first validation case of each domain's datalist (not seen in training; the CT volume
    is the exception: it is the only labelled CT, see data_lists/totalseg.json)."""
    from .data.datalist import load_datalist

    out = []
    for name in DEMO_DATALISTS:
        try:
            entries = load_datalist(name, base_dir=data_dir, split="validation")
        except (FileNotFoundError, ValueError):
            continue
        if entries:
            out.append(Path(entries[0]["image"]))
    return out


def make_synthetic_samples(folder: Path) -> list[Path]:
    """A synthetic CT volume (HU: air, fat, soft tissue, a liver-like and a spleen-like organ) and a
    synthetic endoscopy frame with a polyp-like blob. No real anatomy: a smoke test of the pipeline."""
    import nibabel as nib
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(np.arange(128), np.arange(128), np.arange(12), indexing="ij")
    vol = np.full((128, 128, 12), -1000.0)
    body = ((x - 64) / 58) ** 2 + ((y - 64) / 46) ** 2 < 1
    vol[body] = -80.0
    vol[body & (((x - 64) / 50) ** 2 + ((y - 64) / 38) ** 2 < 1)] = 40.0
    vol[((x - 40) / 22) ** 2 + ((y - 58) / 18) ** 2 < 1] = 60.0  # liver-like (patient's right)
    vol[((x - 92) / 9) ** 2 + ((y - 54) / 12) ** 2 < 1] = 50.0  # spleen-like
    vol += rng.normal(0, 8, vol.shape)
    ct = folder / "synthetic_ct.nii.gz"
    nib.save(nib.Nifti1Image(vol.astype(np.int16), np.diag([-1.5, -1.5, 3.0, 1.0])), str(ct))
    yy, xx = np.mgrid[:256, :256]
    img = np.stack([150 + 40 * np.sin(xx / 30.0), 70 + 20 * np.cos(yy / 25.0), 60 + 0 * xx], -1)
    blob = ((xx - 140) / 40.0) ** 2 + ((yy - 120) / 32.0) ** 2 < 1
    img[blob] = [200, 120, 100]
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    frame = folder / "synthetic_endoscopy.png"
    Image.fromarray(img).save(frame)
    return [ct, frame]


def demo(output: str = "outputs/demo", data_dir: str | None = None, device: str = "cpu", overwrite: bool = True,
         quiet: bool = False) -> None:
    """Segment one case per domain with the shipped weights and write the results to ``output``."""
    from .data.datalist import default_data_dir
    from .segment import segment

    data = Path(data_dir) if data_dir else default_data_dir()
    out = Path(output)
    inputs = real_samples(data) if data.is_dir() else []
    if inputs:
        print(f"automedsam demo: real data from {data} ({len(inputs)} cases: one per domain)", file=sys.stderr)
    else:
        inputs = make_synthetic_samples(out / "synthetic_inputs")
        print(f"automedsam demo: no real data at {data} (set AUTOMEDSAM_DATA); segmenting a SYNTHETIC sample "
              f"generated in {out / 'synthetic_inputs'} - it only shows that the pipeline runs", file=sys.stderr)
    results = segment([str(p) for p in inputs], str(out), device=device, overwrite=overwrite, progress=not quiet,
                      on_error="skip", largest_component=True)
    failed = 0
    for r in results:
        if r["ok"]:
            rep = r["report"] or {}
            found = ", ".join(rep.get("classes_found") or []) or "no class found"
            print(f"{r['input']}: {rep.get('modality')}: {found} -> {r['outputs'].get('overlay')}", file=sys.stderr)
        else:
            failed += 1
            print(f"automedsam: error: {r['error']}", file=sys.stderr)
    if failed:
        sys.exit(1)
