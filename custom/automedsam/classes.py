"""The one class vocabulary of AutoMedSAM: read from the bundle, checked here.

The vocabulary is data: the bundle's ``configs/classes.json`` holds the class ids (the value a
class has in an output label map; 0 is background and never a class), names, aliases, modality,
overlay colour and coded concept (SNOMED CT, for DICOM-SEG), the modalities with their intensity
normalisation, and the per-dataset label rules. This module reads and checks that file at import
(``$AUTOMEDSAM_BUNDLE`` or the repository's bundle) and keeps the tables below, which every other
module imports by value: :func:`load_vocabulary` refills them *in place*, so every importer sees
the one vocabulary loaded last (``NUM_CLASSES`` is an int: read it as ``classes.NUM_CLASSES``).

Ids are stable: a new class is appended (:func:`add_class_entry`), never renumbered.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

VOCABULARY_FILE = "classes.json"  # in a bundle's configs/
NORMALISATIONS = ("window", "percentile", "minmax")  # how a modality's intensities map to [0, 1]

# ---- the tables (filled in place from the classes file) -----------------------------------------
CLASSES: dict[int, str] = {}  # label id -> class name
CLASS_IDS: dict[str, int] = {}  # class name -> label id
ALIASES: dict[str, str] = {}  # spellings users type -> class name
MODALITIES: list[str] = []
MODALITY_ALIASES: dict[str, str] = {}  # spellings of a modality (after dropping '-' and '_') -> modality
MODALITY_NORMALISATION: dict[str, dict] = {}  # modality -> {"normalise": window|percentile|minmax, ...}
MODALITY_CLASSES: dict[str, tuple[str, ...]] = {}
CLASS_COLOURS: dict[int, tuple[int, int, int]] = {}  # RGB colours for overlays, one per class id
CLASS_CODES: dict[int, dict] = {}  # id -> {"category": {code, scheme, meaning}, "type": {...}}
DATASET_LABELS: dict[str, dict[str, dict]] = {}  # dataset -> class name -> {"values": [...]} | {"threshold": t}
DATASET_MODALITY: dict[str, str] = {}
NUM_CLASSES = 0
VOCABULARY: dict = {}  # the loaded file's content (checked)
VOCABULARY_PATH: Path | None = None


class VocabularyError(ValueError):
    """A classes file that is missing or does not make a consistent vocabulary (one line, naming it)."""


def _key(text: str) -> str:
    return str(text).strip().lower().replace(" ", "_").replace("-", "_")


def _modality_key(text: str) -> str:
    return str(text).strip().lower().replace("-", "").replace("_", "")


def default_vocabulary_path() -> Path:
    """``configs/classes.json`` of ``$AUTOMEDSAM_BUNDLE``, else of the repository's bundle."""
    env = os.environ.get("AUTOMEDSAM_BUNDLE")
    bundle = Path(env) if env else Path(__file__).resolve().parents[2] / "bundles" / "automedsam"
    return bundle / "configs" / VOCABULARY_FILE


def read_vocabulary(path: str | os.PathLike) -> dict:
    """The checked content of a classes file (raises :class:`VocabularyError` naming the file)."""
    p = Path(path)
    if p.is_dir():
        p = p / "configs" / VOCABULARY_FILE if (p / "configs").is_dir() else p / VOCABULARY_FILE
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise VocabularyError(f"{p}: classes file not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise VocabularyError(f"{p}: not a readable JSON classes file ({e})") from None
    check_vocabulary(data, p)
    return data


def check_vocabulary(data: dict, where="classes file") -> None:
    """Raise :class:`VocabularyError` unless ``data`` is a consistent vocabulary."""
    def bad(msg: str):
        raise VocabularyError(f"{where}: {msg}")

    if not isinstance(data, dict) or not isinstance(data.get("classes"), list) or not isinstance(data.get("modalities"), dict):
        bad("needs 'modalities' (an object) and 'classes' (a list)")
    spellings: dict[str, str] = {}
    for mod, spec in data["modalities"].items():
        if _modality_key(mod) != mod or not mod:
            bad(f"modality name '{mod}' must be lower case without '-' or '_'")
        method = (spec or {}).get("normalise")
        if method not in NORMALISATIONS:
            bad(f"modality '{mod}': normalise must be one of {', '.join(NORMALISATIONS)}, got {method!r}")
        if method == "window" and not float(spec.get("width", 0)) > 0:
            bad(f"modality '{mod}': a window needs width > 0")
        if method == "percentile" and not 0 <= float(spec.get("lower", -1)) < float(spec.get("upper", -1)) <= 100:
            bad(f"modality '{mod}': percentile needs 0 <= lower < upper <= 100")
        for s in [mod, *spec.get("aliases", [])]:
            k = _modality_key(s)
            if spellings.get(k, mod) != mod:
                bad(f"modality spelling '{s}' is used by both '{spellings[k]}' and '{mod}'")
            spellings[k] = mod
    names: dict[str, int] = {}
    ids = []
    for c in data["classes"]:
        try:
            cid, name, mod = int(c["id"]), c["name"], c["modality"]
        except (KeyError, TypeError, ValueError):
            bad(f"every class needs 'id', 'name' and 'modality': {c!r}")
        if cid < 1:
            bad(f"class '{name}': id must be >= 1 (0 is background), got {cid}")
        if _key(name) != name:
            bad(f"class name '{name}' must be lower case with '_' for spaces")
        if mod not in data["modalities"]:
            bad(f"class '{name}': unknown modality '{mod}' (modalities: {', '.join(data['modalities'])})")
        colour = c.get("colour", [255, 255, 255])
        if len(colour) != 3 or not all(0 <= int(v) <= 255 for v in colour):
            bad(f"class '{name}': colour must be three values 0..255, got {colour}")
        for s in [name, *c.get("aliases", [])]:
            k = _key(s)
            if k in names:
                bad(f"class spelling '{s}' of '{name}' is already used by class id {names[k]}")
            names[k] = cid
        ids.append(cid)
    if sorted(ids) != list(range(1, len(ids) + 1)):
        bad(f"class ids must be 1..N without gaps or repeats, got {ids}")
    if ids != sorted(ids):
        bad(f"classes must be listed in id order, got {ids}")
    class_names = {c["name"] for c in data["classes"]}
    for ds, spec in data.get("datasets", {}).items():
        if spec.get("modality") not in data["modalities"]:
            bad(f"dataset '{ds}': unknown modality {spec.get('modality')!r}")
        for name, rule in spec.get("labels", {}).items():
            if name not in class_names:
                bad(f"dataset '{ds}': label rule for unknown class '{name}'")
            if not (("values" in rule) ^ ("threshold" in rule)):
                bad(f"dataset '{ds}', class '{name}': a rule has 'values' or 'threshold' (one of them)")


def load_vocabulary(path: str | os.PathLike | dict | None = None) -> dict:
    """Read a classes file (a path, a bundle folder, or already-read content; None: the default
    bundle's) and make it *the* vocabulary: every table of this module is refilled in place."""
    global NUM_CLASSES, VOCABULARY_PATH
    if isinstance(path, dict):
        check_vocabulary(path)
        data, where = copy.deepcopy(path), None
    else:
        where = Path(path) if path is not None else default_vocabulary_path()
        data = read_vocabulary(where)
    classes = sorted(data["classes"], key=lambda c: int(c["id"]))
    CLASSES.clear()
    CLASSES.update({int(c["id"]): c["name"] for c in classes})
    CLASS_IDS.clear()
    CLASS_IDS.update({n: i for i, n in CLASSES.items()})
    ALIASES.clear()
    ALIASES.update({_key(a): c["name"] for c in classes for a in c.get("aliases", [])})
    MODALITIES[:] = list(data["modalities"])
    MODALITY_ALIASES.clear()
    MODALITY_NORMALISATION.clear()
    for mod, spec in data["modalities"].items():
        MODALITY_ALIASES.update({_modality_key(a): mod for a in spec.get("aliases", [])})
        MODALITY_NORMALISATION[mod] = {k: v for k, v in spec.items() if k != "aliases"}
    MODALITY_CLASSES.clear()
    MODALITY_CLASSES.update({m: tuple(c["name"] for c in classes if c["modality"] == m) for m in data["modalities"]})
    CLASS_COLOURS.clear()
    CLASS_COLOURS.update({int(c["id"]): tuple(int(v) for v in c.get("colour", (255, 255, 255))) for c in classes})
    CLASS_CODES.clear()
    CLASS_CODES.update({int(c["id"]): {k: dict(c[k]) for k in ("category", "type") if k in c} for c in classes})
    DATASET_LABELS.clear()
    DATASET_LABELS.update({d: copy.deepcopy(s.get("labels", {})) for d, s in data.get("datasets", {}).items()})
    DATASET_MODALITY.clear()
    DATASET_MODALITY.update({d: s["modality"] for d, s in data.get("datasets", {}).items()})
    NUM_CLASSES = len(CLASSES)
    VOCABULARY.clear()
    VOCABULARY.update(data)
    VOCABULARY_PATH = Path(where) if where is not None else None
    return data


def add_class_entry(data: dict, name: str, modality: str, aliases: Sequence[str] = (), colour=None,
                    category: dict | None = None, type_code: dict | None = None, dataset: str | None = None,
                    label_rule: dict | None = None, normalise: dict | None = None) -> dict:
    """A copy of vocabulary ``data`` with class ``name`` appended (the next id). A modality not in
    it is added with ``normalise`` (default min-max). Raises :class:`VocabularyError` for a name
    or alias that already exists."""
    out = copy.deepcopy(data)
    key = _key(name)
    taken = {_key(s): c["name"] for c in out["classes"] for s in [c["name"], *c.get("aliases", [])]}
    for s in [key, *aliases]:
        if _key(s) in taken:
            raise VocabularyError(f"class '{s}' already exists in the vocabulary (as '{taken[_key(s)]}'); "
                                  f"choose another name")
    mod_key = _modality_key(modality)
    spellings = {_modality_key(a): m for m, spec in out["modalities"].items() for a in [m, *spec.get("aliases", [])]}
    mod = spellings.get(mod_key)
    if mod is None:
        mod = mod_key
        out["modalities"][mod] = dict(normalise or {"normalise": "minmax"}, aliases=[])
    new_id = max([int(c["id"]) for c in out["classes"]], default=0) + 1
    if colour is None:  # a colour far from the existing ones (golden-angle hue walk)
        import colorsys

        r, g, b = colorsys.hsv_to_rgb((new_id * 0.618034) % 1.0, 0.75, 0.95)
        colour = [int(r * 255), int(g * 255), int(b * 255)]
    entry = {"id": new_id, "name": key, "aliases": [_key(a) for a in aliases], "modality": mod, "colour": list(colour),
             "category": category or {"code": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
             "type": type_code or {"code": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}}
    out["classes"].append(entry)
    if dataset:
        out.setdefault("datasets", {})[dataset] = {"modality": mod, "labels": {key: dict(label_rule or {"threshold": 0})}}
    check_vocabulary(out, "the new vocabulary")
    return out


# ---- lookups ----------------------------------------------------------------------------------


def normalise_name(name: str) -> str:
    key = _key(name)
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
    key = _modality_key(modality)
    key = MODALITY_ALIASES.get(key, key)
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


def label_to_classes(label, dataset: str) -> dict[int, "object"]:
    """Binary masks (bool arrays, same shape as ``label``) per class id for one dataset's label array.

    ``values``: label values that make up the class; ``threshold``: binary masks stored as 8-bit
    images (anti-aliased or lossy JPG) are foreground where value > threshold."""
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


load_vocabulary()
