"""Helpers the bundle's configs call (``bundles/automedsam/configs/*.yaml``).

* :func:`bundle_root` - the default of every config's ``bundle_root``: the folder of the config
  files being run (their ``configs/`` folder's parent, as MONAI's ``ConfigWorkflow`` takes it for
  ``sys.path``), so ``python -m monai.bundle run inference --config_file
  bundles/automedsam/configs/inference.yaml`` finds ``models/model.pt`` from any working folder;
  ``--bundle_root`` still overrides it (MONAI Label sets it too).
* :func:`show_help` - ``python -m monai.bundle run inference ... --help``: MONAI's command line
  (python-fire) passes ``--help`` on as a config override ``help=True`` and would run the
  workflow; the configs' ``initialize`` calls this first, which prints the workflow's options and
  stops before any work.
* :func:`checked_checkpoint` - a weights file checked before the engine starts: missing, empty,
  not a checkpoint, or a pickle that would run code end in one line naming the file.
* :func:`inference_datalist` - the inference configs' data, checked before any work (inputs that
  are missing, empty or unreadable from their header; label maps already in ``output_dir``).
* :class:`RunReporter` - an engine handler: one line per case as it starts and finishes (with
  its time and output), and a failure inside the run as one line naming the case.

Errors here are :class:`BundleError`, a ``SystemExit`` carrying its message: ``python -m
monai.bundle`` then prints that one line (no traceback) and exits with status 1. In-process
callers catch ``BundleError``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

__all__ = ["BundleError", "bundle_root", "show_help", "checked_checkpoint", "RunReporter", "inference_datalist"]


class BundleError(SystemExit):
    """A one-line refusal of a bundle run (``automedsam: error: <file>: <problem>``)."""

    def __init__(self, message: str):
        self.message = "automedsam: error: " + " ".join(str(message).split())
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


def _root_of(config_dir) -> str:
    d = Path(config_dir)
    return os.path.abspath(str(d.parent if d.name == "configs" else d))


def bundle_root() -> str:
    """The bundle folder of the config being run (absolute).

    Found from the caller's stack: a ``monai.bundle.ConfigWorkflow`` (``run``, ``create_workflow``,
    the model-zoo checks) knows its ``config_root_path``; ``monai.bundle``'s ``verify_net_in_out``
    and ``ckpt_export`` hold their ``config_file_``. Otherwise (a bare ``ConfigParser``) the bundle
    that ships with this package (``$AUTOMEDSAM_BUNDLE`` or the repository's ``bundles/automedsam``).
    """
    frame = sys._getframe(1)
    while frame is not None:
        local = frame.f_locals
        obj = local.get("self")
        # vars(), not getattr: ConfigParser and BundleWorkflow answer unknown attributes themselves
        root = getattr(obj, "__dict__", {}).get("config_root_path") if obj is not None else None
        if root is not None and type(obj).__name__.endswith("Workflow"):
            return _root_of(root)
        if frame.f_code.co_filename.endswith(os.path.join("monai", "bundle", "scripts.py")):
            cfg = local.get("config_file_")
            if cfg:
                first = cfg if isinstance(cfg, (str, os.PathLike)) else list(cfg)[0]
                return _root_of(Path(first).parent)
        frame = frame.f_back
    from .pretrained import default_bundle_dir

    return os.path.abspath(str(default_bundle_dir()))


_HELP = {
    "inference": """\
AutoMedSAM bundle inference (configs/inference.yaml; a folder or datalist: add configs/batch_inference.yaml)
  python -m monai.bundle run inference --config_file bundles/automedsam/configs/inference.yaml \\
      --input scan.nii.gz --output_dir outputs/inference [options]
options (config ids, given as --id value):
  --input PATH          a NIfTI/MHA/NRRD volume, a DICOM series folder or a 2D image (default: the
                        TotalSegmentator example CT under dataset_dir)
  --output_dir DIR      where <stem>_seg.nii.gz / <stem>_seg.png go (default: outputs/inference,
                        relative to the working folder)
  --overwrite true      replace label maps already in output_dir (default: refuse, before any work)
  --class_names a,b     class names (default: every class of the image's modality)
  --modality M          ct | mr | endoscopy | xray (default: from the datalist entry, else guessed)
  --ckpt_path FILE      weights (default: <bundle_root>/models/model.pt)
  --dataset_dir DIR     data folder (default: $AUTOMEDSAM_DATA or ../shared/data)
  --device cpu|cuda     --threshold 0.5     --inference_batch_size N (slices per encoder call)
  --bundle_root DIR     the bundle folder (default: the folder of the config files)
MONAI's own help for `run`: python -m monai.bundle run -- --help""",
    "training": """\
AutoMedSAM bundle training (configs/train.yaml; torchrun + configs/multi_gpu_train.yaml for several GPUs)
  python -m monai.bundle run training --config_file bundles/automedsam/configs/train.yaml [options]
options (config ids, given as --id value):
  --datalists "['kvasir','shenzhen']"   datalist names or JSON paths (default: all four)
  --max_cases N         cases per datalist and split (volumes: all their slices)
  --train#trainer#max_epochs N          --output_dir DIR (default: runs/train; resumes from it)
  --cache_dir DIR       embedding cache (default: $AUTOMEDSAM_CACHE or cache)
  --build_cache False   train only on slices already cached   --init_weights FILE   fine-tune
  --dataset_dir DIR     data folder (default: $AUTOMEDSAM_DATA or ../shared/data)
MONAI's own help for `run`: python -m monai.bundle run -- --help""",
    "evaluate": """\
AutoMedSAM bundle evaluation (configs/inference.yaml + configs/evaluate.yaml)
  python -m monai.bundle run evaluate --config_file \\
      "['bundles/automedsam/configs/inference.yaml','bundles/automedsam/configs/evaluate.yaml']" [options]
options (config ids, given as --id value):
  --ckpt_path FILE      weights (default: <bundle_root>/models/model.pt)
  --eval_dir DIR        metrics.csv, summary.json, summary.md (default: outputs/eval)
  --datalists [...]     --max_cases N    --eval_split validation   --dataset_dir DIR
  --save_predictions true   also write the label maps to eval_dir
MONAI's own help for `run`: python -m monai.bundle run -- --help""",
}


def show_help(asked, workflow: str = "inference") -> None:
    """Print the workflow's options and stop (exit 0) when ``--help`` was given."""
    if asked in (None, False, "", "false", "False", 0):
        return
    print(_HELP.get(workflow, _HELP["inference"]))
    raise SystemExit(0)


def _problem(path: Path) -> str | None:
    if not path.exists():
        return "no such file"
    if path.is_dir():
        return "is a folder, not a weights file"
    if path.stat().st_size == 0:
        return "is empty (0 bytes)"
    return None


def checked_checkpoint(path) -> str:
    """``path`` if it is a weights file ``torch.load(weights_only=True)`` can read; else a
    :class:`BundleError` naming the file and the problem (never advice to unpickle it)."""
    import pickle
    import zipfile

    import torch

    p = Path(str(path))
    problem = _problem(p)
    if problem is None:
        try:
            torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            problem = ("refused: it is not a plain weights file (loading it would run code or needs objects "
                       "other than tensors)")
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            problem = f"not a readable PyTorch weights file ({type(e).__name__}: {first})"
    if problem:
        raise BundleError(f"{p}: {problem} (--ckpt_path)")
    return str(p)


class RunReporter:
    """Engine handler: progress per case and one-line failures.

    Prints ``[i/N] <file> ...`` when a case starts and ``[i/N] <file>: done in 12.3 s`` when it
    is finished (after the postprocessing that writes it). An exception inside the run (a file
    that cannot be read, Ctrl-C) ends it with one line naming the case instead of a traceback.
    """

    def __init__(self, total: int | None = None, stream=None):
        self.total = total
        self.stream = stream
        self._t = 0.0
        self._name = ""

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._completed)
        # ignite calls only the first EXCEPTION_RAISED handlers in turn; put this one first
        handlers = engine._event_handlers.setdefault(Events.EXCEPTION_RAISED, [])
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)
        handlers.insert(0, handlers.pop())

    def _case(self, engine) -> str:
        batch = engine.state.batch
        name = ""
        try:
            img = batch["image"] if isinstance(batch, dict) else batch[0]["image"]
            name = img.meta.get("filename_or_obj", "")
            if isinstance(name, (list, tuple)):
                name = name[0]
        except (KeyError, IndexError, TypeError, AttributeError):
            pass
        return str(name) or f"case {engine.state.iteration}"

    def _counter(self, engine) -> str:
        total = self.total or getattr(engine.state, "epoch_length", None)
        return f"[{engine.state.iteration}/{total}]" if total else f"[{engine.state.iteration}]"

    def _started(self, engine) -> None:
        self._t = time.perf_counter()
        self._name = self._case(engine)
        self._print(f"{self._counter(engine)} {self._name} ...")

    def _completed(self, engine) -> None:
        self._print(f"{self._counter(engine)} {self._name}: done in {time.perf_counter() - self._t:.1f} s")

    def _failed(self, engine, e: BaseException) -> None:
        if isinstance(e, KeyboardInterrupt):
            raise BundleError("interrupted") from None
        if isinstance(e, SystemExit):
            raise e
        where = self._name or "the run"
        first = (str(e).strip().splitlines() or [""])[0]
        raise BundleError(f"{where}: {type(e).__name__}: {first}") from None


def _check_input(path: Path, dataset_dir=None) -> None:
    """One-line refusal of an input that cannot be segmented, read from its header only."""
    from .data.io import InputError, header_voxels, input_kind

    if not path.exists():
        hint = ""
        if dataset_dir and not Path(str(dataset_dir)).is_dir() and str(path).startswith(str(dataset_dir)):
            hint = (f" (dataset_dir {dataset_dir} does not exist: give --dataset_dir DIR, set AUTOMEDSAM_DATA, "
                    f"or name a file with --input)")
        raise BundleError(f"{path}: no such file or folder{hint}")
    if path.is_file() and path.stat().st_size == 0:
        raise BundleError(f"{path}: is empty (0 bytes)")
    try:
        kind = input_kind(path)
        if kind != "dicom_series":
            header_voxels(path, kind)
    except InputError as e:
        raise BundleError(str(e)) from None


def inference_datalist(inputs=None, datalist: str | None = None, split: str = "testing", base_dir=None,
                       output_dir=None, data_root_dir: str = "", overwrite: bool = True,
                       dataset_dir=None) -> list[dict]:
    """Data dicts ``{"image": path[, "modality", "dataset", ...]}`` for the inference configs,
    checked before any work.

    ``inputs``: files, DICOM series folders, or folders of them (expanded as ``automedsam
    segment`` does); ``datalist``: a datalist name or JSON path whose ``split`` (comma-separated
    or ``all``) is read, paths relative to ``base_dir``; its entries carry their modality.

    Every input must exist and be non-empty with a readable header; with ``output_dir`` and
    ``overwrite`` false, label maps already there (the names ``SaveLabelMapd`` would write) are
    refused, as ``automedsam segment`` refuses them. Problems raise :class:`BundleError` (one line).
    """
    items: list[dict] = []
    if datalist:
        from .data.datalist import load_datalist

        if base_dir is not None and not Path(str(base_dir)).is_dir():
            raise BundleError(f"{base_dir}: dataset_dir does not exist (give --dataset_dir DIR or set "
                              f"AUTOMEDSAM_DATA)")
        try:
            entries = load_datalist(datalist, base_dir=base_dir, split=split)
        except (FileNotFoundError, ValueError) as e:
            raise BundleError(str(e)) from None
        items += [{k: v for k, v in e.items() if k != "label"} for e in entries]
    if inputs:
        from .segment import resolve_inputs

        raw = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        for r in raw:
            if not Path(str(r)).exists():
                _check_input(Path(str(r)), dataset_dir)
        found, _ = resolve_inputs(raw)
        for it in found:
            if it.series_uid:
                raise BundleError(f"{it.path}: holds several DICOM series; give each series its own folder")
            items.append({"image": str(it.path)})
    if not items:
        raise BundleError("nothing to segment: give --input (files or folders) or a datalist")
    for item in items:
        _check_input(Path(item["image"]), dataset_dir or base_dir)
    if output_dir is not None and not overwrite:
        from monai.data.utils import create_file_basename

        clash = []
        for item in items:
            base = create_file_basename("seg", item["image"], str(output_dir), data_root_dir=data_root_dir or "",
                                        separate_folder=False)
            clash += [f"{base}{ext}" for ext in (".nii.gz", ".png") if os.path.exists(f"{base}{ext}")]
        if clash:
            more = f" and {len(clash) - 3} more" if len(clash) > 3 else ""
            raise BundleError(f"outputs already exist: {', '.join(clash[:3])}{more} (give --overwrite true to "
                              f"replace them, or another --output_dir)")
    return items


def model_versions(bundle_dir, weights=None) -> dict:
    """``version`` (the bundle's, from its ``configs/metadata.json``), ``weights_sha256`` (the full
    hex digest of the weights file) and ``package_version`` (the installed ``automedsam``)."""
    import json

    from .data.io import content_sha256

    version = None
    try:
        version = json.loads((Path(bundle_dir) / "configs" / "metadata.json").read_text()).get("version")
    except (OSError, ValueError):
        pass
    try:
        from importlib.metadata import version as pkg

        package = pkg("automedsam")
    except Exception:
        package = None
    sha = None
    if weights:
        try:
            sha = content_sha256(weights)
        except OSError:
            sha = None
    return {"version": version, "weights_sha256": sha, "package_version": package}
