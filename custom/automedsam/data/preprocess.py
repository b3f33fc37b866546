"""MedSAM preprocessing and its exact inverse for masks.

The steps, as MedSAM does them:

1. ``normalise``: modality intensity mapping to [0, 1] over the whole image or volume
   (CT: window level/width, default soft tissue 40/400; MR: clip to the 0.5..99.5
   percentiles of non-zero voxels, zeros stay 0; 2D endoscopy/X-ray: min-max; the defaults are
   the vocabulary's, ``configs/classes.json``: :func:`normalisation_defaults`), then every
   slice min-max scaled to [0, 1] on its own (as MedSAM's inference does) and grey made
   3-channel.
2. ``to_backbone_input``: resize so the longest side is ``size`` (256 LiteMedSAM, 1024
   MedSAM ViT-B; bilinear, anti-aliased when shrinking) and pad bottom/right to a square.
3. The mask decoder answers on a 256x256 low-res grid over the padded input;
   ``low_res_to_original`` crops its valid part and resizes it back to the slice size.

Geometry is kept in :class:`InputGeometry`; all parameters in :class:`PreprocessConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..classes import MODALITY_NORMALISATION, check_modality

__all__ = [
    "PREPROCESS_VERSION",
    "LOW_RES",
    "PreprocessConfig",
    "InputGeometry",
    "normalise",
    "normalisation_of",
    "normalisation_defaults",
    "to_backbone_input",
    "low_res_to_original",
    "mask_to_input",
    "mask_to_low_res",
    "mask_to_box",
]

PREPROCESS_VERSION = 1  # bump when the numbers this module produces change (invalidates caches)
LOW_RES = 256  # side of the mask decoder's output grid


@dataclass(frozen=True)
class PreprocessConfig:
    """All preprocessing parameters; ``key()`` names them for cache keys."""

    modality: str = "ct"
    ct_level: float | None = None  # None: the vocabulary's (normalisation_defaults)
    ct_width: float | None = None
    mr_lower: float | None = None
    mr_upper: float | None = None
    size: int = 256

    def __post_init__(self):
        object.__setattr__(self, "modality", check_modality(self.modality))
        for name, value in normalisation_params(self.ct_level, self.ct_width, self.mr_lower, self.mr_upper).items():
            object.__setattr__(self, name, value)
        if self.ct_width <= 0:
            raise ValueError(f"ct_width must be > 0, got {self.ct_width}")
        if not 0 <= self.mr_lower < self.mr_upper <= 100:
            raise ValueError(f"need 0 <= mr_lower < mr_upper <= 100, got {self.mr_lower}, {self.mr_upper}")
        if int(self.size) < 16:
            raise ValueError(f"size must be >= 16, got {self.size}")

    def with_modality(self, modality: str) -> "PreprocessConfig":
        return dataclasses.replace(self, modality=modality)

    def key(self) -> str:
        """A short string that changes whenever the preprocessing output would change."""
        method = normalisation_of(self.modality)
        if method == "window":
            mapping = f"{self.modality}{self.ct_level:g}_{self.ct_width:g}"
        elif method == "percentile":
            mapping = f"{self.modality}{self.mr_lower:g}_{self.mr_upper:g}"
        else:
            mapping = f"{self.modality}-minmax"
        return f"v{PREPROCESS_VERSION}-{mapping}-s{int(self.size)}"

    def normalise(self, slices: np.ndarray) -> np.ndarray:
        return normalise(slices, self.modality, ct_level=self.ct_level, ct_width=self.ct_width,
                         mr_lower=self.mr_lower, mr_upper=self.mr_upper)


@dataclass(frozen=True)
class InputGeometry:
    """Where a slice of ``height x width`` sits in the ``size x size`` backbone input."""

    height: int
    width: int
    new_height: int
    new_width: int
    size: int

    def to_array(self) -> np.ndarray:
        return np.array([self.height, self.width, self.new_height, self.new_width, self.size], dtype=np.int64)

    @classmethod
    def from_array(cls, a) -> "InputGeometry":
        return cls(*(int(v) for v in np.asarray(a).reshape(-1)[:5]))

    @classmethod
    def for_shape(cls, height: int, width: int, size: int) -> "InputGeometry":
        """The geometry ``to_backbone_input`` gives (MONAI Resize, size_mode='longest')."""
        scale = size / max(height, width)
        return cls(int(height), int(width), int(round(height * scale)), int(round(width * scale)), int(size))


def normalisation_of(modality: str | None) -> str:
    """How a modality's intensities map to [0, 1], from the vocabulary's classes file:
    ``window`` (level/width, CT), ``percentile`` (of non-zero voxels, MR) or ``minmax`` (2D
    endoscopy, X-ray, ultrasound; also a generic image, ``modality`` None)."""
    if modality is None:
        return "minmax"
    return MODALITY_NORMALISATION[check_modality(modality)]["normalise"]


def normalisation_defaults() -> dict[str, float]:
    """The one definition of the default CT window and MR percentiles: the vocabulary's
    (``configs/classes.json``: ``modalities.ct`` level/width, ``modalities.mr`` lower/upper),
    read by :class:`PreprocessConfig` (the cache), :func:`normalise`, the pipeline's
    ``NormaliseModalityd`` (``automedsam segment``, the bundle configs, MONAI Label)."""
    ct, mr = MODALITY_NORMALISATION["ct"], MODALITY_NORMALISATION["mr"]
    return {"ct_level": float(ct["level"]), "ct_width": float(ct["width"]), "mr_lower": float(mr["lower"]),
            "mr_upper": float(mr["upper"])}


def normalisation_params(ct_level: float | None = None, ct_width: float | None = None, mr_lower: float | None = None,
                         mr_upper: float | None = None) -> dict[str, float]:
    """The four parameters, each None replaced by :func:`normalisation_defaults`'s value."""
    given = {"ct_level": ct_level, "ct_width": ct_width, "mr_lower": mr_lower, "mr_upper": mr_upper}
    return {k: float(v) if v is not None else d for (k, v), d in zip(given.items(), normalisation_defaults().values())}


def normalise(slices: np.ndarray, modality: str | None, *, ct_level: float | None = None,
              ct_width: float | None = None, mr_lower: float | None = None, mr_upper: float | None = None,
              per_slice: bool = True) -> np.ndarray:
    """(N,H,W,C) or (H,W[,C]) raw intensities -> float32 (N,H,W,3) (or (H,W,3)) in [0, 1].

    ``modality`` None means a generic image: min-max like endoscopy/X-ray. Parameters left None:
    the vocabulary's (:func:`normalisation_defaults`).
    """
    from monai.transforms import ScaleIntensityRange

    p = normalisation_params(ct_level, ct_width, mr_lower, mr_upper)
    ct_level, ct_width, mr_lower, mr_upper = p["ct_level"], p["ct_width"], p["mr_lower"], p["mr_upper"]

    x = np.asarray(slices, dtype=np.float32)
    single = x.ndim in (2, 3) and not (x.ndim == 3 and x.shape[-1] not in (1, 3))
    if x.ndim == 2:
        x = x[None, ..., None]
    elif x.ndim == 3 and single:
        x = x[None]
    elif x.ndim == 3:  # (N,H,W) grey stack
        x = x[..., None]
        single = False
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"normalise expects (N,H,W,C) slices with C in (1,3), got {np.shape(slices)}")
    method = normalisation_of(modality)
    if method == "window":
        lo, hi = ct_level - ct_width / 2.0, ct_level + ct_width / 2.0
        x = np.asarray(ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)(x))
    elif method == "percentile":
        nonzero = x[x != 0]
        if nonzero.size == 0:
            x = np.zeros_like(x)
        else:
            lo, hi = np.percentile(nonzero, [mr_lower, mr_upper])
            zero = x == 0
            if hi > lo:
                x = np.asarray(ScaleIntensityRange(a_min=float(lo), a_max=float(hi), b_min=0.0, b_max=1.0,
                                                   clip=True, dtype=np.float32)(x))
            else:
                x = (x > lo).astype(np.float32)
            x[zero] = 0.0
    else:  # minmax (endoscopy, xray, ultrasound, generic 2D): over the whole image
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    if per_slice:  # MedSAM scales every slice to [0, 1] on its own
        lo = x.min(axis=(1, 2, 3), keepdims=True)
        hi = x.max(axis=(1, 2, 3), keepdims=True)
        rng = hi - lo
        x = np.where(rng > 0, (x - lo) / np.where(rng > 0, rng, 1.0), 0.0)
    x = np.clip(x, 0.0, 1.0).astype(np.float32)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x[0] if single else x


def _plain(t) -> torch.Tensor:
    """A plain tensor (MONAI transforms return MetaTensors, whose bookkeeping slows the encoder)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


def to_backbone_input(slice_hw3: np.ndarray | torch.Tensor, size: int = 256) -> tuple[torch.Tensor, InputGeometry]:
    """(H,W,3) [0,1] slice -> ((3,size,size) float32 tensor, geometry): longest side resized to
    ``size`` (bilinear, anti-aliased when shrinking), padded bottom/right with zeros."""
    from monai.transforms import Resize, SpatialPad

    x = torch.as_tensor(np.asarray(slice_hw3, dtype=np.float32)) if not torch.is_tensor(slice_hw3) \
        else slice_hw3.float()
    if x.ndim == 2:
        x = x[..., None].expand(-1, -1, 3)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"to_backbone_input expects an (H,W,3) slice, got {tuple(x.shape)}")
    h, w = int(x.shape[0]), int(x.shape[1])
    chw = x.permute(2, 0, 1).contiguous()
    if max(h, w) != size:
        chw = Resize(spatial_size=size, size_mode="longest", mode="bilinear", anti_aliasing=True)(chw)
    info = InputGeometry(h, w, int(chw.shape[1]), int(chw.shape[2]), int(size))
    out = _plain(SpatialPad(spatial_size=(size, size), method="end")(chw)).clamp_(0.0, 1.0)
    return out.contiguous(), info


def low_res_to_original(logits: np.ndarray | torch.Tensor, info: InputGeometry) -> np.ndarray | torch.Tensor:
    """(..., 256, 256) low-res logits (or masks as floats) -> (..., H, W) on the slice grid.

    The exact inverse of the resize+pad: (upsample to the input size when it is not 256,)
    crop the valid part, resize bilinear to the original height and width.
    """
    is_np = not torch.is_tensor(logits)
    t = torch.as_tensor(np.asarray(logits)) if is_np else logits
    if t.shape[-2:] != (LOW_RES, LOW_RES):
        raise ValueError(f"low-res logits must end with ({LOW_RES},{LOW_RES}), got {tuple(t.shape)}")
    lead = t.shape[:-2]
    x = t.reshape(-1, 1, LOW_RES, LOW_RES).float()
    if info.size != LOW_RES:
        x = F.interpolate(x, size=(info.size, info.size), mode="bilinear", align_corners=False)
    x = x[..., : info.new_height, : info.new_width]
    if (info.new_height, info.new_width) != (info.height, info.width):
        x = F.interpolate(x, size=(info.height, info.width), mode="bilinear", align_corners=False)
    x = x.reshape(*lead, info.height, info.width)
    return x.numpy() if is_np else x


def mask_to_input(mask_hw: np.ndarray, info: InputGeometry) -> np.ndarray:
    """(H,W) mask on the slice grid -> (size,size) uint8 in backbone-input pixels (nearest)."""
    from monai.transforms import Resize, SpatialPad

    m = np.asarray(mask_hw)
    if m.shape != (info.height, info.width):
        raise ValueError(f"mask shape {m.shape} does not match the geometry ({info.height},{info.width})")
    t = torch.as_tensor((m > 0).astype(np.float32))[None]
    if (info.new_height, info.new_width) != (info.height, info.width):
        t = _plain(Resize(spatial_size=(info.new_height, info.new_width), mode="nearest-exact")(t))
    t = _plain(SpatialPad(spatial_size=(info.size, info.size), method="end")(t))
    return (t[0].numpy() > 0.5).astype(np.uint8)


def mask_to_low_res(mask_hw: np.ndarray, info: InputGeometry) -> np.ndarray:
    """(H,W) mask -> (256,256) uint8 on the decoder's low-res grid (identical to
    ``mask_to_input`` for a 256 input; area-downsampled and thresholded at 0.5 otherwise)."""
    m = mask_to_input(mask_hw, info)
    if info.size == LOW_RES:
        return m
    t = torch.as_tensor(m, dtype=torch.float32)[None, None]
    t = F.interpolate(t, size=(LOW_RES, LOW_RES), mode="area")
    return (t[0, 0].numpy() >= 0.5).astype(np.uint8)


def mask_to_box(mask: np.ndarray, jitter: float = 0.0, rng: np.random.Generator | int | None = None
                ) -> np.ndarray | None:
    """Bounding box [x0, y0, x1, y1] (float32, pixels of the mask's grid, inclusive max) of a
    mask; None when empty. ``jitter`` moves each edge by up to ``jitter`` x the box size
    (uniform, ``rng`` a seeded Generator or seed), clipped to the image."""
    m = np.asarray(mask) > 0
    if m.ndim != 2:
        raise ValueError(f"mask_to_box expects a 2D mask, got shape {m.shape}")
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        return None
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)
    if jitter > 0:
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        bw, bh = box[2] - box[0] + 1, box[3] - box[1] + 1
        box += gen.uniform(-jitter, jitter, size=4) * np.array([bw, bh, bw, bh])
        h, w = m.shape
        box[[0, 2]] = np.clip(box[[0, 2]], 0, w - 1)
        box[[1, 3]] = np.clip(box[[1, 3]], 0, h - 1)
        box = np.array([min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])])
    return box.astype(np.float32)
