"""The one class vocabulary of AutoMedSAM.

Every part of the project (model, datasets, bundle metadata ``channel_def``, CLI,
reports) takes its class names and label ids from here. A class id is the value
the class has in an output label map; 0 is background and never a class.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# label id -> class name; ids are stable: never renumber, only append.
CLASSES: dict[int, str] = {
    1: "liver",
    2: "spleen",
    3: "kidney_left",
    4: "kidney_right",
    5: "pancreas",
    6: "brain_tumor",
    7: "polyp",
    8: "lungs",
}
NUM_CLASSES = len(CLASSES)
CLASS_IDS: dict[str, int] = {name: idx for idx, name in CLASSES.items()}

# Spellings users type that mean a vocabulary class.
ALIASES: dict[str, str] = {
    "brain_tumour": "brain_tumor",
    "tumour": "brain_tumor",
    "whole_tumor": "brain_tumor",
    "lung": "lungs",
    "polyps": "polyp",
    "left_kidney": "kidney_left",
    "right_kidney": "kidney_right",
}

MODALITIES = ("ct", "mr", "endoscopy", "xray")
MODALITY_CLASSES: dict[str, tuple[str, ...]] = {
    "ct": ("liver", "spleen", "kidney_left", "kidney_right", "pancreas"),
    "mr": ("brain_tumor",),
    "endoscopy": ("polyp",),
    "xray": ("lungs",),
}

# RGB colours for overlays, one per class id.
CLASS_COLOURS: dict[int, tuple[int, int, int]] = {
    1: (220, 90, 60),
    2: (140, 70, 200),
    3: (60, 170, 230),
    4: (30, 110, 200),
    5: (240, 200, 40),
    6: (250, 60, 160),
    7: (60, 220, 90),
    8: (80, 200, 230),
}


def normalise_name(name: str) -> str:
    key = str(name).strip().lower().replace(" ", "_").replace("-", "_")
    return ALIASES.get(key, key)


def class_id(name: str | int) -> int:
    """Label id of a class given by name (any spelling in ALIASES) or id."""
    if isinstance(name, int) or (isinstance(name, str) and name.strip().isdigit()):
        idx = int(name)
        if idx not in CLASSES:
            raise ValueError(f"unknown class id {idx}; valid ids: {sorted(CLASSES)}")
        return idx
    key = normalise_name(name)
    if key not in CLASS_IDS:
        raise ValueError(f"unknown class '{name}'; valid classes: {', '.join(CLASS_IDS)}")
    return CLASS_IDS[key]


def parse_classes(classes: str | Iterable[str | int] | None, modality: str | None = None) -> list[int]:
    """Class ids from a comma-separated string or a list; default: every class of the modality."""
    if classes is None or classes == "" or classes == "all":
        if modality is None:
            return list(CLASSES)
        return [CLASS_IDS[n] for n in MODALITY_CLASSES[check_modality(modality)]]
    if isinstance(classes, str):
        classes = [c for c in classes.split(",") if c.strip()]
    ids = [class_id(c) for c in classes]
    return list(dict.fromkeys(ids))


def check_modality(modality: str) -> str:
    key = str(modality).strip().lower().replace("-", "").replace("_", "")
    key = {"mri": "mr", "xr": "xray", "cxr": "xray", "endo": "endoscopy", "colonoscopy": "endoscopy"}.get(key, key)
    if key not in MODALITIES:
        raise ValueError(f"unknown modality '{modality}'; valid: {', '.join(MODALITIES)}")
    return key


def classes_not_fitting(ids: Sequence[int], modality: str) -> list[str]:
    """Names of the classes in ``ids`` that are not expected in ``modality``."""
    allowed = set(MODALITY_CLASSES[check_modality(modality)])
    return [CLASSES[i] for i in ids if CLASSES[i] not in allowed]


def channel_def() -> dict[str, str]:
    """The bundle metadata ``channel_def``: label id (as a string) -> name, 0 = background."""
    return {"0": "background", **{str(i): n for i, n in CLASSES.items()}}


# Per-dataset label mappings: how each source's label values become vocabulary classes.
# ``values``: label values that make up the class; ``threshold``: binary masks stored
# as 8-bit images (anti-aliased or lossy JPG) are foreground where value > threshold.
DATASET_LABELS: dict[str, dict[str, dict]] = {
    "totalseg": {  # TotalSegmentator v2 "total" task ids
        "spleen": {"values": [1]},
        "kidney_right": {"values": [2]},
        "kidney_left": {"values": [3]},
        "liver": {"values": [5]},
        "pancreas": {"values": [7]},
    },
    "brats": {"brain_tumor": {"values": [1, 2, 3, 4]}},  # whole tumour
    "kvasir": {"polyp": {"threshold": 127}},
    "shenzhen": {"lungs": {"threshold": 127}},
}

DATASET_MODALITY: dict[str, str] = {"totalseg": "ct", "brats": "mr", "kvasir": "endoscopy", "shenzhen": "xray"}


def label_to_classes(label, dataset: str) -> dict[int, "object"]:
    """Binary masks (bool arrays, same shape as ``label``) per class id for one dataset's label array."""
    import numpy as np

    if dataset not in DATASET_LABELS:
        raise ValueError(f"unknown dataset '{dataset}'; known: {', '.join(DATASET_LABELS)}")
    label = np.asarray(label)
    out = {}
    for name, rule in DATASET_LABELS[dataset].items():
        if "threshold" in rule:
            out[CLASS_IDS[name]] = label > rule["threshold"]
        else:
            out[CLASS_IDS[name]] = np.isin(label, rule["values"])
    return out
