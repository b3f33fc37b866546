"""MONAI Label app serving the AutoMedSAM bundle (layout of MONAI Label's ``monaibundle`` sample app).

    monailabel start_server --app apps/monailabel --studies <folder of NIfTI/PNG/JPG> --conf models automedsam

Where the bundle comes from (no network access is ever needed):

* ``<app>/model/<models>`` when it is a real folder: a bundle the site put there (e.g. retrained
  weights) is served as it is;
* otherwise ``<app>/model/<models>`` is (re)made at start as a symlink to ``--conf bundle PATH``,
  else to ``$AUTOMEDSAM_BUNDLE``, else to the repository's ``bundles/automedsam`` (found relative to
  this file), so a checkout of the repository serves its own bundle and weights with nothing
  copied. Where symlinks are not allowed the bundle folder is copied instead.

Conf options (``--conf NAME VALUE``): ``models`` (bundle folder name, default ``automedsam``),
``bundle`` (path of the bundle to serve), ``preload`` (``true``: load the network at start).
Per-request options (shown by clients, from the bundle's ``displayable_configs``): ``class_names``
(alias ``classes``) and ``modality``. Training through MONAI Label is not offered: the bundle trains
from its datalists and embedding cache (``python -m monai.bundle run training ...``).

Run one inference without a server (debugging): ``python apps/monailabel/main.py --studies DIR --image ID``.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Dict

import monailabel
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib.infers import AutoMedSAMInfer

logger = logging.getLogger(__name__)

APP_DIR = os.path.dirname(os.path.realpath(__file__))
DEFAULT_MODEL = "automedsam"
REPO_BUNDLE = os.path.normpath(os.path.join(APP_DIR, "..", "..", "bundles", "automedsam"))


def _is_bundle(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "configs", "metadata.json")) and any(
        os.path.isfile(os.path.join(path, "configs", c)) for c in ("inference.yaml", "inference.json"))


def prepare_bundle(app_dir: str, name: str, source: str | None = None) -> str:
    """The bundle folder ``<app_dir>/model/<name>`` to serve, linked to ``source`` when needed."""
    model_dir = os.path.join(app_dir, "model")
    target = os.path.join(model_dir, name)
    if os.path.isdir(target) and not os.path.islink(target):
        if source:
            raise ValueError(f"{target} is a folder of its own; remove it to serve {source}, or pick another name "
                             f"with --conf models NAME")
        if not _is_bundle(target):
            raise ValueError(f"{target} is not a MONAI bundle (configs/metadata.json and configs/inference.yaml)")
        logger.info(f"+++ Serving the bundle folder {target} as it is")
        return target

    source = os.path.realpath(source or os.environ.get("AUTOMEDSAM_BUNDLE") or REPO_BUNDLE)
    if not _is_bundle(source):
        raise ValueError(f"no MONAI bundle at {source}: pass --conf bundle PATH (or set AUTOMEDSAM_BUNDLE), or put "
                         f"the bundle folder at {target}")
    os.makedirs(model_dir, exist_ok=True)
    if os.path.islink(target):
        if os.path.realpath(target) == source:
            return target
        os.unlink(target)  # stale (e.g. another checkout's)
    try:
        os.symlink(source, target, target_is_directory=True)
        logger.info(f"+++ {target} -> {source}")
    except FileExistsError:  # another server made it meanwhile
        if os.path.realpath(target) != source:
            raise
    except OSError:  # no symlinks here (e.g. Windows without the right): copy
        shutil.copytree(source, target)
        logger.info(f"+++ copied {source} to {target}")
    return target


class AutoMedSAMApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        conf = dict(conf or {})
        names = [m.strip() for m in conf.get("models", DEFAULT_MODEL).split(",") if m.strip()]
        if len(names) != 1:
            raise ValueError(f"this app serves one AutoMedSAM bundle, got --conf models {conf.get('models')!r}")
        self.model_name = names[0]
        self.bundle_path = prepare_bundle(app_dir, self.model_name, conf.get("bundle"))

        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"AutoMedSAM - MONAI Label ({monailabel.__version__})",
            description="Class-prompted automatic segmentation (AutoMedSAM on LiteMedSAM) of CT, MR, endoscopy "
                        "and X-ray images: 3D volumes slice by slice, 2D images as they are",
            version=monailabel.__version__,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        task = AutoMedSAMInfer(self.bundle_path, self.conf)
        if not task.is_valid():
            raise ValueError(f"the bundle at {self.bundle_path} could not be loaded (see the log above)")
        logger.info(f"+++ Adding Inferer:: {self.model_name} => {self.bundle_path}")
        return {self.model_name: task}

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {}  # the bundle trains from its datalists and embedding cache, not from MONAI Label's datastore

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First()}


def main():
    """One inference without a server: ``python apps/monailabel/main.py --studies DIR --image ID``."""
    import argparse
    import json

    from monailabel.config import settings

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("-s", "--studies", required=True, help="folder of images (MONAI Label's local datastore)")
    parser.add_argument("-i", "--image", required=True, help="image id (file name without extension) or a path")
    parser.add_argument("-c", "--classes", default="", help="class names or ids, comma-separated (default: all)")
    parser.add_argument("-m", "--modality", default="", help="ct | mr | endoscopy | xray (default: guessed)")
    parser.add_argument("--bundle", default=None, help="bundle to serve (default: the repository's)")
    args = parser.parse_args()

    settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(levelname)s] (%(name)s) - %(message)s")
    conf = {"models": DEFAULT_MODEL, **({"bundle": args.bundle} if args.bundle else {})}
    app = AutoMedSAMApp(APP_DIR, args.studies, conf)
    res = app.infer(request={"model": DEFAULT_MODEL, "image": args.image, "classes": args.classes,
                             "modality": args.modality})
    print(json.dumps({"label": res["label"], "params": res["params"]}, indent=2, default=str))


if __name__ == "__main__":
    main()
