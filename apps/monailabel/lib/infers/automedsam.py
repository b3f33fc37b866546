"""MONAI Label inference task for the AutoMedSAM bundle.

MONAI Label's ``BundleInferTask`` does the real work: it reads the bundle's
``configs/inference.yaml`` (network_def, preprocessing, inferer, postprocessing,
displayable_configs; preprocessing and postprocessing are ``automedsam.pipeline``'s, the one
chain ``automedsam segment`` runs too, so a file reads the same here as on the command line) and ``models/model.pt``, and writes the request's options back into
``displayable_configs`` before each request, which is how the classes reach the bundle's
``ClassPromptInferer``. This subclass only adds what the bundle cannot say itself:

* ``classes`` in a request is an alias of ``class_names`` (names or ids, comma-separated or a
  list; empty: every class of the image's modality);
* 2D images (PNG/JPG/...) get their label map back as a single-channel PNG (a JPEG label map
  would be lossy), volumes as NIfTI on the input's voxel grid and affine; always uint8;
* the result JSON carries ``label_names`` (the bundle's ``channel_def``, name -> id, as every
  MONAI Label bundle task returns it) and ``found_labels`` (the subset present in the label map).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Sequence

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask

logger = logging.getLogger(__name__)

from automedsam.data.io import IMAGE_2D_SUFFIXES  # noqa: E402  (the one list of 2D image suffixes)


class SqueezeLabelChannel:
    """(1, X, Y) -> (X, Y) for 2D inputs, after MONAI Label's ``Restored``.

    ``Restored`` drops the channel of a volume's (1, X, Y, Z) label map but keeps that of a 2D
    one, and MONAI Label's writer would then write a 3D (1, X, Y) image. Whether the input was 2D
    is read off the loader's ``spatial_shape``.
    """

    def __init__(self, key: str = "pred", ref_image: str = "image"):
        self.key = key
        self.ref_image = ref_image

    def __call__(self, data):
        d = dict(data)
        pred = d[self.key]
        ref = d.get(self.ref_image)
        meta = getattr(ref, "meta", None) or d.get(f"{self.ref_image}_meta_dict") or {}
        spatial = meta.get("spatial_shape")
        if spatial is not None and pred.ndim == len(spatial) + 1 and pred.shape[0] == 1:
            d[self.key] = pred[0]
        return d


class AutoMedSAMInfer(BundleInferTask):
    """Automatic segmentation of every class (or the classes the request names) of a 2D image or
    a 3D volume with the AutoMedSAM bundle."""

    def __init__(self, path: str, conf: Dict[str, str], **kwargs):
        super().__init__(path, conf, type=InferType.SEGMENTATION, **kwargs)
        if self.is_valid():
            # the bundle slices volumes itself: it serves 2D images and 3D volumes alike
            self.dimension = 3
            self.description = (self.description or "AutoMedSAM") + (
                " Options: class_names (or classes): comma-separated class names or ids, empty = every class "
                "of the image's modality; modality: ct | mr | endoscopy | xray, empty = guessed.")

    def __call__(self, request, callbacks=None):
        request = dict(request)
        classes = request.pop("classes", None)
        if classes not in (None, "", []):
            request["class_names"] = classes
        for key in ("class_names", "modality"):  # JSON null -> the bundle's default
            if request.get(key) is None:
                request.pop(key, None)
        if isinstance(request.get("class_names"), (list, tuple)):
            request["class_names"] = ",".join(str(c) for c in request["class_names"])
        return super().__call__(request, callbacks)

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return list(super().post_transforms(data)) + [SqueezeLabelChannel(self.key_pred, self.key_image)]

    def writer(self, data: Dict[str, Any], extension=None, dtype=None):
        path = data.get("image_path") or (data["image"] if isinstance(data.get("image"), str) else "")
        path = str(path)
        if extension is None and not data.get("result_extension") and path.lower().endswith(IMAGE_2D_SUFFIXES):
            extension = ".png"
        if dtype is None and not data.get("result_dtype"):
            dtype = np.uint8
        label_file, result = super().writer(data, extension=extension, dtype=dtype)
        result = dict(result or {})
        pred = data.get(self.key_pred)
        if pred is not None:
            values = np.unique(np.asarray(pred)).tolist()
            names = {v: k for k, v in (self.labels or {}).items()}
            result["found_labels"] = {names[int(v)]: int(v) for v in values if int(v) in names}
        return label_file, result

