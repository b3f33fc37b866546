"""Image-space augmentation for the multi-view embedding cache (issue 16 item 1).

Training runs on frozen-encoder embeddings, so augmentation has to happen before the encoder:
the cache holds K views per training slice (:class:`~automedsam.data.cache.EmbeddingCache`,
``num_views``), view 0 the plain slice, views 1..K-1 made here. A view is a deterministic
function of its seed (derived from the image content, slice index, view index and
:meth:`AugmentConfig.key`, all part of the view's cache key):

1. volume level, on raw intensities before MedSAM's normalisation: CT window jitter; MR raw
   scanner-like intensities (z-scored inside the brain -> positive values with a smooth bias
   field; the MR normalisation maps both to the same range);
2. slice level, on the normalised [0, 1] slice, image and label together (the label by nearest
   neighbour, with the same parameters: GT box and teacher logits follow exactly): crop,
   flips (never for datasets with a lateral class: kidney_left/right), zoom out and in with
   zero padding + rotation + translation in one resampling;
3. slice level, image only: contrast, gamma, histogram shift, hue/saturation (endoscopy),
   blur or sharpen, resolution loss, Gaussian noise, JPEG recompression; then the slice is
   min-max scaled to [0, 1] again, as the inference preprocessing would.

Deterministic fixed-strength perturbations (also used by ``benchmarks/robustness.py``):
:func:`jpeg_recompress` (``img, quality``), :func:`resolution_loss` (``img, factor``),
:func:`hue_saturation_shift` (``img, hue_deg, saturation``), :func:`zoom_rotate` (``img, zoom,
angle_deg, shift, label``), :func:`mr_raw_intensities` (``volume, scale, offset``). They take a float
numpy array, HxW or HxWxC, in [0, 1] or any native range, and return the same shape and dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io

import json
from dataclasses import dataclass, field

import numpy as np
from monai.transforms import MapTransform, RandomizableTransform

from ..classes import DATASET_LABELS

__all__ = ["AUGMENT_VERSION", "AugmentConfig", "ViewAugmenter", "has_lateral_classes", "views_for",
           "parse_num_views", "jpeg_recompress",
           "resolution_loss", "hue_saturation_shift", "zoom_rotate", "mr_raw_intensities", "RandJpegd",
           "RandResolutionLossd", "RandHueSaturationd", "RandZoomRotated"]

AUGMENT_VERSION = 1  # bump when the views this module makes change for the same settings (new cache keys)


def _to_uint8(img: np.ndarray) -> tuple[np.ndarray, float, float]:
    lo, hi = float(np.min(img)), float(np.max(img))
    if lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    scale = (hi - lo) or 1.0
    u8 = np.clip(np.round((img.astype(np.float64) - lo) / scale * 255.0), 0, 255).astype(np.uint8)
    return u8, lo, scale


def jpeg_recompress(img: np.ndarray, quality: int) -> np.ndarray:
    """``img`` (HxW or HxWxC float, [0, 1] or native range) after a JPEG round trip at ``quality`` (1..95).

    3-channel images go through the codec as RGB (chroma subsampling included, as a camera or
    PACS export would), other channel counts channel by channel as greyscale.
    """
    from PIL import Image

    quality = int(quality)
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"jpeg_recompress expects HxW or HxWxC, got shape {img.shape}")
    u8, lo, scale = _to_uint8(img)

    def roundtrip(a: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        return np.asarray(Image.open(buf).convert("RGB" if a.ndim == 3 else "L"))

    if u8.ndim == 3 and u8.shape[-1] == 3:
        out = roundtrip(u8)
    elif u8.ndim == 3:
        out = np.stack([roundtrip(u8[..., c]) for c in range(u8.shape[-1])], axis=-1)
    else:
        out = roundtrip(u8)
    return (out.astype(np.float64) / 255.0 * scale + lo).astype(img.dtype)


def resolution_loss(img: np.ndarray, factor: float) -> np.ndarray:
    """``img`` (HxW or HxWxC) downsampled by ``factor`` (0 < factor <= 1; area averaging) and
    upsampled back to its size (bilinear): the detail a low-resolution acquisition or export loses."""
    import torch
    import torch.nn.functional as F

    factor = float(factor)
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"resolution_loss factor must be in (0, 1], got {factor}")
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"resolution_loss expects HxW or HxWxC, got shape {img.shape}")
    if factor == 1.0:
        return img.copy()
    h, w = img.shape[:2]
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    small = F.interpolate(t, size=(max(1, round(h * factor)), max(1, round(w * factor))), mode="area")
    back = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
    out = back[0] if img.ndim == 2 else back.permute(1, 2, 0)
    return out.numpy().astype(img.dtype)


def hue_saturation_shift(img: np.ndarray, hue_deg: float, saturation: float = 1.0) -> np.ndarray:
    """An RGB ``img`` (HxWx3, any range) with its hue turned by ``hue_deg`` degrees and its
    saturation scaled by ``saturation`` (a rotation and scaling of the chroma plane in YIQ, the
    luma kept), clipped to the input's range. Grey images (HxW or C != 3) come back unchanged."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] != 3:
        if img.ndim not in (2, 3):
            raise ValueError(f"hue_saturation_shift expects HxW or HxWxC, got shape {img.shape}")
        return img.copy()
    if saturation < 0:
        raise ValueError(f"saturation must be >= 0, got {saturation}")
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    t = np.deg2rad(float(hue_deg))
    rot = np.array([[1.0, 0.0, 0.0],
                    [0.0, np.cos(t) * saturation, -np.sin(t) * saturation],
                    [0.0, np.sin(t) * saturation, np.cos(t) * saturation]])
    m = np.linalg.inv(to_yiq) @ rot @ to_yiq
    out = img.astype(np.float64) @ m.T
    return np.clip(out, float(img.min()), float(img.max())).astype(img.dtype)


def _np(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        t = t.as_tensor() if hasattr(t, "as_tensor") else t
        return t.numpy()
    return np.asarray(t)


def _affine(chw: np.ndarray, zoom: float, angle_deg: float, shift_px: tuple[float, float], mode: str) -> np.ndarray:
    from monai.transforms import Affine

    # MONAI's scale maps output to input coordinates: 1/zoom; zeros outside the image
    aff = Affine(rotate_params=float(np.deg2rad(angle_deg)), scale_params=(1.0 / zoom, 1.0 / zoom),
                 translate_params=tuple(float(s) for s in shift_px), padding_mode="zeros", mode=mode,
                 image_only=True)
    return _np(aff(np.ascontiguousarray(chw, dtype=np.float32)))


def zoom_rotate(img: np.ndarray, zoom: float = 1.0, angle_deg: float = 0.0, shift: tuple[float, float] = (0.0, 0.0),
                label: np.ndarray | None = None):
    """``img`` (HxW or HxWxC) zoomed about its centre (``zoom`` < 1 shrinks the content and pads
    with the image's minimum: a wider field of view; > 1 magnifies), rotated by ``angle_deg``
    and shifted by ``shift`` (fractions of height and width), same size. With ``label`` (HxW),
    returns ``(img, label)``, the label moved by the same transform (nearest, background 0)."""
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"zoom_rotate expects HxW or HxWxC, got shape {img.shape}")
    if zoom <= 0:
        raise ValueError(f"zoom must be > 0, got {zoom}")
    h, w = img.shape[:2]
    shift_px = (float(shift[0]) * h, float(shift[1]) * w)
    lo = float(img.min())
    chw = (img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)).astype(np.float32) - lo
    out = _affine(chw, zoom, angle_deg, shift_px, "bilinear") + lo
    out = (out[0] if img.ndim == 2 else np.moveaxis(out, 0, -1)).astype(img.dtype)
    if label is None:
        return out
    lab = np.asarray(label)
    if lab.shape != (h, w):
        raise ValueError(f"label shape {lab.shape} does not match the image's {(h, w)}")
    lab_out = _affine(lab[None].astype(np.float32), zoom, angle_deg, shift_px, "nearest")[0]
    return out, np.rint(lab_out).astype(lab.dtype)


def mr_raw_intensities(volume: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """A z-scored MR volume (zeros outside the brain) as raw scanner-like intensities: non-zero
    voxels ``v * scale + offset`` (kept >= 1 so that no tissue becomes background), zeros stay 0.
    MedSAM's MR normalisation (percentiles of the non-zero voxels) maps it back to the same image."""
    v = np.asarray(volume)
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    nz = v != 0
    out = np.zeros(v.shape, dtype=np.float64)
    out[nz] = np.maximum(v[nz].astype(np.float64) * scale + offset, 1.0)
    return out.astype(v.dtype)


# ------------------------------------------------------------------ MONAI-style random transforms


def _per_image(x, fn):
    """Apply ``fn`` (HxWxC numpy) to a channel-first array or tensor, returning numpy CxHxW."""
    a = _np(x)
    return np.moveaxis(fn(np.moveaxis(a, 0, -1)), -1, 0)


class RandJpegd(RandomizableTransform, MapTransform):
    """JPEG recompression at a random quality in ``quality_range`` (channel-first images)."""

    def __init__(self, keys, prob: float = 0.1, quality_range: tuple[int, int] = (20, 90), allow_missing_keys=False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.quality_range = (int(quality_range[0]), int(quality_range[1]))
        self.quality = self.quality_range[1]

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.quality = int(self.R.randint(self.quality_range[0], self.quality_range[1] + 1))

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        if self._do_transform:
            for key in self.key_iterator(d):
                d[key] = _per_image(d[key], lambda a: jpeg_recompress(a, self.quality))
        return d


class RandResolutionLossd(RandomizableTransform, MapTransform):
    """Down- then up-sampling by a random factor in ``factor_range`` (channel-first images)."""

    def __init__(self, keys, prob: float = 0.1, factor_range: tuple[float, float] = (0.25, 0.75),
                 allow_missing_keys=False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.factor_range = (float(factor_range[0]), float(factor_range[1]))
        self.factor = 1.0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.factor = float(self.R.uniform(*self.factor_range))

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        if self._do_transform:
            for key in self.key_iterator(d):
                d[key] = _per_image(d[key], lambda a: resolution_loss(a, self.factor))
        return d


class RandHueSaturationd(RandomizableTransform, MapTransform):
    """Hue turned by up to +-``hue_deg`` and saturation scaled within ``saturation_range`` (RGB)."""

    def __init__(self, keys, prob: float = 0.1, hue_deg: float = 20.0, saturation_range=(0.7, 1.3),
                 allow_missing_keys=False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.hue_deg, self.saturation_range = float(hue_deg), tuple(float(s) for s in saturation_range)
        self.hue, self.saturation = 0.0, 1.0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.hue = float(self.R.uniform(-self.hue_deg, self.hue_deg))
        self.saturation = float(self.R.uniform(*self.saturation_range))

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        if self._do_transform:
            for key in self.key_iterator(d):
                d[key] = _per_image(d[key], lambda a: hue_saturation_shift(a, self.hue, self.saturation))
        return d


class RandZoomRotated(RandomizableTransform, MapTransform):
    """Zoom (log-uniform in ``zoom_range``; < 1 pads with zeros), rotation (+-``rotate_deg``) and
    shift (+-``shift`` of the size) in one resampling, the same for every key: ``image`` keys
    bilinear, ``label_keys`` nearest (so labels follow the image exactly)."""

    def __init__(self, keys, label_keys=(), prob: float = 0.8, zoom_range=(0.6, 1.3), rotate_deg: float = 15.0,
                 shift: float = 0.1, allow_missing_keys=False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.label_keys = set(label_keys)
        self.zoom_range, self.rotate_deg, self.shift = tuple(float(z) for z in zoom_range), float(rotate_deg), \
            float(shift)
        self.zoom, self.angle, self.offset = 1.0, 0.0, (0.0, 0.0)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.zoom = float(np.exp(self.R.uniform(np.log(self.zoom_range[0]), np.log(self.zoom_range[1]))))
        self.angle = float(self.R.uniform(-self.rotate_deg, self.rotate_deg))
        self.offset = (float(self.R.uniform(-self.shift, self.shift)), float(self.R.uniform(-self.shift, self.shift)))

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        if self._do_transform:
            for key in self.key_iterator(d):
                a = _np(d[key])
                shift_px = (self.offset[0] * a.shape[1], self.offset[1] * a.shape[2])
                mode = "nearest" if key in self.label_keys else "bilinear"
                out = _affine(a, self.zoom, self.angle, shift_px, mode)
                d[key] = np.rint(out) if key in self.label_keys else out
        return d


# ------------------------------------------------------------------ per-modality settings and views


def views_for(num_views: int | dict, dataset: str) -> int:
    """Views per slice of a dataset: ``num_views`` an int, or {dataset: K, "default": K}."""
    k = num_views.get(dataset, num_views.get("default", 1)) if isinstance(num_views, dict) else num_views
    if int(k) < 1:
        raise ValueError(f"num_views must be >= 1, got {k} for {dataset}")
    return int(k)


def parse_num_views(text: str) -> int | dict:
    """``"8"`` -> 8; ``"totalseg=32,default=8"`` -> {"totalseg": 32, "default": 8} (the command line)."""
    try:
        out = {k.strip(): int(v) for k, v in (p.split("=") for p in str(text).split(","))} if "=" in str(text) \
            else int(text)
    except ValueError:
        raise ValueError(f"num_views must be K or DATASET=K,...,default=K (K >= 1), got {text!r}") from None
    for k in out.values() if isinstance(out, dict) else [out]:
        if k < 1:
            raise ValueError(f"num_views must be >= 1, got {text!r}")
    return out


_COMMON = dict(
    crop_prob=0.2, crop_min=0.7,                                    # random crop (scale of each side)
    affine_prob=0.8, zoom=(0.6, 1.3), rotate_deg=15.0, shift=0.1,  # zoom out/in + rotation + shift
    flip_lr=0.0, flip_ud=0.0,
    contrast_prob=0.3, contrast=0.3, gamma_prob=0.3, gamma=(0.7, 1.5), hist_prob=0.15,
    hue_prob=0.0, hue_deg=0.0, saturation=(1.0, 1.0),
    blur_prob=0.15, sharpen_prob=0.1, resloss_prob=0.2, resloss=(0.25, 0.75),
    noise_prob=0.2, noise_std=0.04, jpeg_prob=0.2, jpeg=(20, 90),
    window_prob=0.0, level_jitter=0.0, width_scale=(1.0, 1.0),      # CT: display window jitter (HU)
    raw_prob=0.0, raw_scale=(1.0, 1.0), raw_offset=(0.0, 0.0), bias_coeff=0.0,  # MR: raw intensities
)
MODALITY_SETTINGS = {
    # large polyps made small (ETIS-like), any endoscope rotation, colour of other processors
    "endoscopy": {**_COMMON, "zoom": (0.4, 1.3), "rotate_deg": 180.0, "flip_lr": 0.5, "flip_ud": 0.5,
                  "hue_prob": 0.5, "hue_deg": 20.0, "saturation": (0.6, 1.4), "jpeg_prob": 0.3},
    "xray": {**_COMMON, "zoom": (0.7, 1.2), "rotate_deg": 10.0},
    # the 122x101 crop at 3 mm made to look like a full field of view (organs a third of the size)
    "ct": {**_COMMON, "zoom": (0.33, 1.2), "shift": 0.15, "window_prob": 0.5, "level_jitter": 20.0,
           "width_scale": (0.75, 1.4)},
    "mr": {**_COMMON, "zoom": (0.6, 1.2), "flip_lr": 0.5, "raw_prob": 0.5, "raw_scale": (50.0, 500.0),
           "raw_offset": (50.0, 500.0), "bias_coeff": 0.3},
}


def has_lateral_classes(dataset: str) -> bool:
    """Whether a dataset labels a left/right class (then its views are never flipped)."""
    return any(n.endswith(("_left", "_right")) or n.startswith(("left_", "right_")) for n in DATASET_LABELS[dataset])


@dataclass(frozen=True)
class AugmentConfig:
    """The view settings: ``seed`` and per-modality overrides of :data:`MODALITY_SETTINGS`."""

    seed: int = 0
    overrides: dict = field(default_factory=dict)  # {modality: {setting: value}}

    def settings(self, modality: str, dataset: str | None = None) -> dict:
        s = {**MODALITY_SETTINGS[modality], **self.overrides.get(modality, {})}
        unknown = set(s) - set(_COMMON)
        if unknown:
            raise ValueError(f"unknown augmentation setting(s) for {modality}: {', '.join(sorted(unknown))}")
        if dataset is not None and has_lateral_classes(dataset):
            s["flip_lr"] = s["flip_ud"] = 0.0  # kidney_left must stay on its side
        return s

    def key(self, modality: str, dataset: str | None = None) -> str:
        """A short hash of everything a view of this modality/dataset depends on (cache keys)."""
        blob = {"version": AUGMENT_VERSION, "seed": int(self.seed), "modality": modality,
                "settings": self.settings(modality, dataset)}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    def view_seed(self, content: str, slice_index: int, view: int) -> int:
        """The seed of one view (``slice_index`` -1: the volume-level draw)."""
        h = hashlib.sha256(f"{int(self.seed)}|{content}|{int(slice_index)}|{int(view)}".encode()).hexdigest()
        return int(h[:8], 16)


class ViewAugmenter:
    """Makes the views of one modality/dataset: :meth:`volume` on raw intensities (before the
    normalisation), :meth:`slice` on a normalised (H,W,3) slice and its label (H,W)."""

    def __init__(self, modality: str, dataset: str | None = None, config: AugmentConfig | None = None):
        from monai.transforms import (Compose, Identityd, OneOf, RandAdjustContrastd, RandFlipd, RandGaussianNoised,
                                      RandGaussianSharpend, RandGaussianSmoothd, RandHistogramShiftd,
                                      RandScaleCropd, RandScaleIntensityFixedMeand)

        self.config = config or AugmentConfig()
        self.modality = modality
        s = self.s = self.config.settings(modality, dataset)
        both, img = ["image", "label"], ["image"]
        geo = [OneOf([RandScaleCropd(both, roi_scale=s["crop_min"], max_roi_scale=1.0, random_size=True,
                                     allow_missing_keys=True), Identityd(both, allow_missing_keys=True)],
                     weights=[s["crop_prob"], 1.0 - s["crop_prob"]])]
        if s["flip_lr"] > 0:
            geo.append(RandFlipd(both, prob=s["flip_lr"], spatial_axis=1, allow_missing_keys=True))
        if s["flip_ud"] > 0:
            geo.append(RandFlipd(both, prob=s["flip_ud"], spatial_axis=0, allow_missing_keys=True))
        geo.append(RandZoomRotated(both, label_keys=["label"], prob=s["affine_prob"], zoom_range=s["zoom"],
                                   rotate_deg=s["rotate_deg"], shift=s["shift"], allow_missing_keys=True))
        inten = [RandScaleIntensityFixedMeand(img, prob=s["contrast_prob"], factors=s["contrast"]),
                 RandAdjustContrastd(img, prob=s["gamma_prob"], gamma=s["gamma"]),
                 RandHistogramShiftd(img, prob=s["hist_prob"], num_control_points=(5, 10))]
        if s["hue_prob"] > 0:
            inten.append(RandHueSaturationd(img, prob=s["hue_prob"], hue_deg=s["hue_deg"],
                                            saturation_range=s["saturation"]))
        inten += [RandGaussianSmoothd(img, prob=s["blur_prob"], sigma_x=(0.5, 1.5), sigma_y=(0.5, 1.5)),
                  RandGaussianSharpend(img, prob=s["sharpen_prob"]),
                  RandResolutionLossd(img, prob=s["resloss_prob"], factor_range=s["resloss"]),
                  RandGaussianNoised(img, prob=s["noise_prob"], std=s["noise_std"]),
                  RandJpegd(img, prob=s["jpeg_prob"], quality_range=s["jpeg"])]
        self.geometric = Compose(geo)
        self.intensity = Compose(inten)

    def volume(self, raw: np.ndarray, preprocess, seed: int):
        """(raw slices, PreprocessConfig) of a view before the normalisation."""
        s, rng = self.s, np.random.RandomState(seed)
        if self.modality == "ct" and rng.rand() < s["window_prob"]:
            level = preprocess.ct_level + rng.uniform(-s["level_jitter"], s["level_jitter"])
            width = preprocess.ct_width * float(np.exp(rng.uniform(*np.log(s["width_scale"]))))
            preprocess = dataclasses.replace(preprocess, ct_level=float(level), ct_width=float(width))
        elif self.modality == "mr" and rng.rand() < s["raw_prob"]:
            from monai.transforms import RandBiasField

            raw = mr_raw_intensities(raw, rng.uniform(*s["raw_scale"]), rng.uniform(*s["raw_offset"]))
            if s["bias_coeff"] > 0:  # a smooth multiplicative field over the volume (N,H,W,C -> C,N,H,W)
                bias = RandBiasField(degree=3, coeff_range=(0.0, s["bias_coeff"]), prob=1.0)
                bias.set_random_state(int(rng.randint(2**31)))
                raw = np.moveaxis(_np(bias(np.moveaxis(raw, -1, 0).astype(np.float32))), 0, -1).astype(raw.dtype)
        return raw, preprocess

    def slice(self, image_hw3: np.ndarray, label_hw: np.ndarray | None, seed: int):
        """(image (H',W',3) in [0, 1], label (H',W') or None) of one view of a normalised slice."""
        x = np.asarray(image_hw3, dtype=np.float32)
        grey = bool(np.all(x[..., :1] == x))  # normalised grey slices are 3 equal channels
        chw = np.moveaxis(x[..., :1] if grey else x, -1, 0)
        data = {"image": chw}
        if label_hw is not None:
            data["label"] = np.asarray(label_hw)[None].astype(np.float32)
        rs = np.random.RandomState(seed)
        self.geometric.set_random_state(int(rs.randint(2**31)))
        self.intensity.set_random_state(int(rs.randint(2**31)))
        data = self.geometric(data)
        data = {**data, **self.intensity({"image": _np(data["image"])})}
        out = _np(data["image"]).astype(np.float32)
        lo, hi = float(out.min()), float(out.max())  # per-slice min-max, as the preprocessing does
        out = np.clip((out - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(out)
        out = np.moveaxis(out, 0, -1)
        if grey:
            out = np.repeat(out, 3, axis=-1)
        lab = None
        if label_hw is not None:
            lab = np.rint(_np(data["label"])[0]).astype(np.asarray(label_hw).dtype)
        return np.ascontiguousarray(out, dtype=np.float32), lab
