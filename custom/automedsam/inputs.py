"""What to segment: files and folders -> :class:`InputItem`s (discovery for ``automedsam segment``).

A file is one item; a folder holding DICOM files gives its series (found by content, grouped
from the headers: :func:`automedsam.data.io.list_dicom_series`); any other folder gives its
images, volumes, npz files and the DICOM series of its direct sub-folders. This tool's own
outputs are never inputs (:func:`own_outputs`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .data.io import DICOM_SUFFIXES, IMAGE_2D_SUFFIXES, NPZ_SUFFIXES, VOLUME_SUFFIXES, list_dicom_series
from .outputs import OUTPUT_KINDS

__all__ = ["InputItem", "resolve_inputs", "own_outputs", "safe_stem", "strip_suffix"]

_INPUT_SUFFIXES = IMAGE_2D_SUFFIXES + VOLUME_SUFFIXES + NPZ_SUFFIXES


@dataclass
class InputItem:
    """One thing to segment: a file, or a DICOM series (a folder, plus its series UID when the
    folder holds several)."""

    path: Path
    stem: str
    series_uid: str | None = None

    @property
    def label(self) -> str:
        return f"{self.path} (series {self.series_uid})" if self.series_uid else str(self.path)


def _strip_suffix(name: str) -> str:
    low = name.lower()
    for suf in sorted(_INPUT_SUFFIXES + DICOM_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf):
            return name[: len(name) - len(suf)]
    return Path(name).stem if "." in name else name


def _safe_stem(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._")
    return s or "input"


def _may_hold_dicom(folder: Path) -> bool:
    """A cheap look: does the folder have files that could be DICOM (no known image suffix)? Only a
    pre-filter: :func:`list_dicom_series` then decides by content (preamble or header), with
    empty UIDs, odd names (``CT.<uid>``) and a DICOMDIR too."""
    for f in folder.iterdir():
        if f.is_file() and not f.name.startswith("."):
            low = f.name.lower()
            if low.endswith(DICOM_SUFFIXES) or not low.endswith(_INPUT_SUFFIXES + (".txt", ".json", ".md", ".csv")):
                return True
    return False


def _series_items(folder: Path, series_uid: str | None = "all", wanted: dict | None = None) -> list[InputItem]:
    """Items of a DICOM folder: ``"all"``: one per series; None: the folder (a folder holding
    several series then fails when read, listing them); a UID: that series only (recorded in
    ``wanted``; folders without it give nothing)."""
    series = list_dicom_series(folder)
    stem = _safe_stem(folder.name)
    if series_uid == "all":
        if len(series) == 1:
            return [InputItem(folder, stem)]
        return [InputItem(folder, _safe_stem(f"{folder.name}_{s['uid'][-8:]}"), s["uid"]) for s in series]
    if series_uid is None:
        return [InputItem(folder, stem)]
    if wanted is not None:
        wanted.setdefault("folders", []).append(folder)
    if any(s["uid"] == series_uid for s in series):
        if wanted is not None:
            wanted["found"] = True
        return [InputItem(folder, stem, series_uid)]
    return []


def resolve_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike],
                   exclude: str | os.PathLike | None = None,
                   series_uid: str | None = "all") -> tuple[list[InputItem], list[str]]:
    """Expand inputs into :class:`InputItem`s, in order; returns (items, notes).

    A file is one item (missing files too: they fail when read). A folder that holds DICOM image
    files gives its series (see ``series_uid``); any other folder gives its image/volume/npz files
    and the DICOM series in its direct sub-folders (other files are listed in ``notes``). Items
    whose stems clash get their parent folder's name in front (then a number).

    ``series_uid``: ``"all"`` - one item per series of a folder holding several; None - such a
    folder is one item that fails when read, with a message listing its series; a series UID -
    only that series (folders without it are skipped; when no folder holds it, each DICOM
    folder is an item that fails listing the series it does hold).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if series_uid is not None:
        series_uid = str(series_uid).strip()
    excl = Path(exclude).resolve() if exclude else None
    items: list[InputItem] = []
    notes: list[str] = []
    wanted: dict = {}
    for raw in inputs:
        p = Path(str(raw))
        if not p.is_dir():
            # a DICOMDIR stands for the series it lists: named after its folder
            name = p.resolve().parent.name if p.name.upper() == "DICOMDIR" else _strip_suffix(p.name)
            items.append(InputItem(p, _safe_stem(name)))
            continue
        if _may_hold_dicom(p) and list_dicom_series(p):
            items.extend(_series_items(p, series_uid, wanted))
            # other image files sitting beside the series are inputs too
            items.extend(InputItem(f, _safe_stem(_strip_suffix(f.name))) for f in sorted(p.iterdir())
                         if f.is_file() and f.name.lower().endswith(_INPUT_SUFFIXES) and not f.name.startswith("."))
            continue
        found, ignored, series_dirs = [], [], 0
        for f in sorted(p.iterdir()):
            if f.name.startswith(".") or (excl is not None and f.resolve() == excl):
                continue
            if f.is_file():
                if f.name.lower().endswith(_INPUT_SUFFIXES) or f.name.lower().endswith(DICOM_SUFFIXES):
                    found.append(InputItem(f, _safe_stem(_strip_suffix(f.name))))
                else:
                    ignored.append(f.name)
            elif f.is_dir() and _may_hold_dicom(f) and list_dicom_series(f):
                series_dirs += 1
                found.extend(_series_items(f, series_uid, wanted))
        if ignored:
            notes.append(f"{p}: ignored {len(ignored)} file(s) that are not images: {', '.join(ignored[:5])}"
                         + (" ..." if len(ignored) > 5 else ""))
        if not found and not series_dirs:
            notes.append(f"{p}: no images, volumes or DICOM series in this folder")
        items.extend(found)
    if wanted.get("folders") and not wanted.get("found"):
        # the asked-for series is nowhere: each DICOM folder fails when read, listing its series
        items.extend(InputItem(f, _safe_stem(f.name), series_uid) for f in wanted["folders"])
    elif wanted.get("folders"):
        skipped = [f for f in wanted["folders"] if not any(it.path == f for it in items)]
        if skipped:
            notes.append(f"{len(skipped)} DICOM folder(s) without series {series_uid} skipped: "
                         + ", ".join(str(f) for f in skipped[:3]) + (" ..." if len(skipped) > 3 else ""))
    # unique stems: parent folder name in front of clashing ones, then a counter
    by_stem: dict[str, list[InputItem]] = {}
    for it in items:
        by_stem.setdefault(it.stem, []).append(it)
    for stem, group in by_stem.items():
        if len(group) > 1:
            for it in group:
                it.stem = _safe_stem(f"{it.path.parent.name}_{stem}")
    seen: dict[str, int] = {}
    for it in items:
        if it.stem in seen:
            seen[it.stem] += 1
            it.stem = f"{it.stem}_{seen[it.stem]}"
        else:
            seen[it.stem] = 1
    return items, notes


def _own_outputs(items: list[InputItem]) -> tuple[list[InputItem], list[Path]]:
    """(inputs, skipped): files this tool wrote - named ``<stem><suffix>`` for a suffix of
    OUTPUT_KINDS, with ``<stem>_report.json`` beside them (that lists them, when it lists outputs)
    - are never inputs, so an output folder that is also the input folder is safe to re-run."""
    keep, skipped = [], []
    for it in items:
        p, name = it.path, it.path.name
        suffix = next((s for s in OUTPUT_KINDS.values() if name.endswith(s) and len(name) > len(s)), None)
        report = p.parent / f"{name[: len(name) - len(suffix)]}{OUTPUT_KINDS['report']}" if suffix else None
        if report is None or not p.is_file() or not report.is_file():
            keep.append(it)
            continue
        try:
            listed = json.loads(report.read_text()).get("outputs")
        except (OSError, ValueError, AttributeError):
            listed = None
        if isinstance(listed, dict) and not any(Path(str(v)).name == name for v in listed.values()):
            keep.append(it)  # a report of another tool, or one that does not know this file
            continue
        skipped.append(p)
    return keep, skipped


own_outputs = _own_outputs
safe_stem = _safe_stem
strip_suffix = _strip_suffix
