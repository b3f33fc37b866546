"""Decathlon-style datalists (``data_lists/<name>.json``) with paths relative to a data folder.

Each JSON has ``name``, ``dataset`` (a key of :data:`automedsam.classes.DATASET_LABELS`),
``modality``, and split lists of ``{"image": relpath, "label": relpath}``:

* ``training``: what the model is trained on;
* ``validation``: for choosing epochs and thresholds;
* ``test``: held out for the final report only (disjoint from both; empty where a dataset has
  too few cases, said in the datalist's ``note``);
* ``unlabelled``: images without labels (e.g. the 112-slice CT), for inference only.

The old name ``testing`` (which held the unlabelled volume) is refused with a message naming
both new splits, so an old command cannot silently read the wrong one. The data folder is given at run time
(``base_dir``), else ``$AUTOMEDSAM_DATA``, else ``../shared/data`` beside the repository.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..classes import DATASET_LABELS, DATASET_MODALITY, check_modality

__all__ = ["SPLITS", "repo_root", "default_data_dir", "datalist_dir", "available_datalists", "datalist_path",
           "read_datalist", "load_datalist"]

SPLITS = ("training", "validation", "test", "unlabelled")
_RENAMED = {"testing": "split 'testing' was renamed: use 'unlabelled' for the unlabelled images it held, "
                       "or 'test' for the held-out labelled cases"}


def repo_root() -> Path:
    """The repository holding this package (custom/automedsam/data -> repo)."""
    return Path(__file__).resolve().parents[3]


def default_data_dir() -> Path:
    """``$AUTOMEDSAM_DATA`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get("AUTOMEDSAM_DATA")
    return Path(env).expanduser() if env else repo_root().parent / "shared" / "data"


def datalist_dir() -> Path:
    """``$AUTOMEDSAM_DATALISTS`` if set, else ``<repo>/data_lists``."""
    env = os.environ.get("AUTOMEDSAM_DATALISTS")
    return Path(env).expanduser() if env else repo_root() / "data_lists"


def available_datalists() -> list[str]:
    return sorted(p.stem for p in datalist_dir().glob("*.json"))


def datalist_path(name_or_path: str | os.PathLike) -> Path:
    """A datalist by name (``kvasir``) or by path to a JSON file."""
    p = Path(name_or_path).expanduser()
    if p.suffix == ".json" or p.is_file():
        if not p.is_file():
            raise FileNotFoundError(f"datalist not found: {p}")
        return p
    cand = datalist_dir() / f"{name_or_path}.json"
    if not cand.is_file():
        raise FileNotFoundError(f"no datalist named '{name_or_path}' in {datalist_dir()}; "
                                f"available: {', '.join(available_datalists()) or 'none'}")
    return cand


def read_datalist(name_or_path: str | os.PathLike) -> dict:
    """The raw JSON of a datalist, checked for the keys AutoMedSAM needs."""
    path = datalist_path(name_or_path)
    try:
        dl = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist {path} is not valid JSON: {e}") from e
    dataset = dl.get("dataset")
    if dataset not in DATASET_LABELS:
        raise ValueError(f"datalist {path}: 'dataset' must be one of {', '.join(DATASET_LABELS)}, got {dataset!r}")
    dl["modality"] = check_modality(dl.get("modality") or DATASET_MODALITY[dataset])
    dl["_path"] = str(path)
    return dl


def load_datalist(name_or_path: str | os.PathLike, base_dir: str | os.PathLike | None = None,
                  split: str = "training", check_files: bool = True) -> list[dict]:
    """Entries of one split (or several, comma-separated, or ``"all"``) with absolute paths.

    Each entry: ``{"image", "label" (if any), "dataset", "modality", "case", "split"}``;
    ``case`` is the image path relative to the data folder (a stable id).
    """
    from monai.data import load_decathlon_datalist

    dl = read_datalist(name_or_path)
    base = Path(base_dir).expanduser() if base_dir is not None else default_data_dir()
    if not base.is_dir():
        raise FileNotFoundError(f"data folder not found: {base} (give base_dir or set AUTOMEDSAM_DATA)")
    splits = SPLITS if split == "all" else tuple(s.strip() for s in str(split).split(",") if s.strip())
    for s in splits:
        if s in _RENAMED:
            raise ValueError(_RENAMED[s])
        if s not in SPLITS:
            raise ValueError(f"unknown split '{s}'; valid: {', '.join(SPLITS)} or 'all'")
    entries = []
    for s in splits:
        raw = dl.get(s) or []
        if not raw:
            continue
        absolute = load_decathlon_datalist(dl["_path"], is_segmentation=True, data_list_key=s, base_dir=base)
        for rel, e in zip(raw, absolute):
            e = {k: str(v) for k, v in e.items()}
            e.update(dataset=dl["dataset"], modality=dl["modality"], case=rel["image"], split=s)
            entries.append(e)
    if check_files:
        missing = [e[k] for e in entries for k in ("image", "label") if k in e and not Path(e[k]).exists()]
        if missing:
            raise FileNotFoundError(f"datalist {dl['_path']}: {len(missing)} files missing under {base}, "
                                    f"e.g. {missing[0]}")
    return entries


def load_datalists(names: str | Sequence[str], base_dir: str | os.PathLike | None = None, split: str = "training",
                   max_cases: int | None = None) -> list[dict]:
    """Entries of several datalists (a list or comma-separated names), the first ``max_cases``
    of each (None: all): what the bundle's train/evaluate configs read."""
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    entries: list[dict] = []
    for name in names:
        es = load_datalist(name, base_dir=base_dir, split=split)
        entries.extend(es[:max_cases] if max_cases else es)
    return entries
