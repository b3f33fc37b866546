"""The one home of modality guessing (``automedsam segment`` without ``--modality``, and the
bundle's :class:`~automedsam.transforms.NormaliseModalityd` when neither the config nor the
datalist names it).

In order: the DICOM Modality tag; then the values. 2D colour images are endoscopy, grey ones
X-ray; volumes with HU-like values (minimum <= -500, some positive) are CT; z-scored float
volumes (non-integer, some negative) and positive-only volumes are MR. Values far outside the
range of every modality (``PLAUSIBLE_MAX_ABS``, e.g. a z-scored FLAIR multiplied by 1e30) are
never guessed: they are refused, asking for ``--modality``.
"""

from __future__ import annotations

import numpy as np

from .errors import input_error

__all__ = ["guess_modality", "guess_modality_of", "guess_from_values", "PLAUSIBLE_MAX_ABS"]

# No modality's values come near this: CT is -1024..~3000 HU (~30000 with extended-range metal),
# MR scanner units and 16-bit images stay under 65536. Anything beyond is refused unguessed.
PLAUSIBLE_MAX_ABS = 1e7

_ASK = "give it with --modality ct|mr|endoscopy|xray"


def guess_from_values(slices: np.ndarray, is_volume: bool, native_dtype: str, path: str = "",
                      value_range: tuple[float, float] | None = None) -> tuple[str, str]:
    """(modality, how it was decided) from the slices' values (N,H,W,C); raises
    :class:`~automedsam.errors.InputError` naming ``path`` when they fit no modality."""
    s = slices
    lo, hi = (float(v) for v in (value_range if value_range is not None else (s.min(), s.max())))
    if max(abs(lo), abs(hi)) > PLAUSIBLE_MAX_ABS:
        raise input_error(path, f"values {lo:.3g}..{hi:.3g} are far outside the range of any modality (CT "
                                f"-1024..~3000 HU, MR and 16-bit images under 65536); not guessing the modality: "
                                f"if these values are right, {_ASK}")
    if not is_volume:
        if s.shape[-1] == 3:
            sample = s[0, ::4, ::4]
            if float(np.abs(sample - sample[..., :1]).max()) > 2.0 * max(1e-6, float(np.ptp(sample))) / 255:
                return "endoscopy", "colour 2D image"
        return "xray", "grey 2D image"
    sample = s[:: max(1, s.shape[0] // 8), ::4, ::4].ravel()
    integral = str(native_dtype).startswith(("int", "uint")) or bool(np.all(sample == np.round(sample)))
    if lo <= -500 and hi > 0:
        return "ct", f"HU-like values ({lo:g}..{hi:g})"
    if not integral and lo < 0:
        return "mr", f"z-scored float values ({lo:.3g}..{hi:.3g})"
    if lo >= 0 and not (native_dtype == "uint8" or (integral and hi <= 255)):
        return "mr", f"positive-only values ({lo:g}..{hi:g})"
    raise input_error(path, f"cannot guess the modality from the values ({native_dtype}, {lo:g}..{hi:g}); {_ASK}")


def guess_modality(loaded) -> tuple[str, str]:
    """(modality, how it was decided) for a :class:`~automedsam.data.io.LoadedImage`: its DICOM
    Modality tag, else :func:`guess_from_values`."""
    if loaded.modality_hint:
        return loaded.modality_hint, f"DICOM Modality tag ({loaded.meta.get('dicom', {}).get('modality', '?')})"
    meta = loaded.meta
    return guess_from_values(loaded.slices, loaded.is_volume, str(meta.get("native_dtype", loaded.slices.dtype)),
                             str(loaded.path), meta.get("intensity_range"))


def guess_modality_of(slices: np.ndarray, is_volume: bool, native_dtype: str, path: str = "",
                      dicom_modality: str | None = None) -> tuple[str, str]:
    """:func:`guess_modality` for slices (N,H,W,C) that did not come from
    :func:`~automedsam.data.io.load_image` (the bundle's transforms)."""
    from .data.io import _DICOM_MODALITY_HINT

    hint = _DICOM_MODALITY_HINT.get(str(dicom_modality or "").strip().upper())
    if hint:
        return hint, f"DICOM Modality tag ({dicom_modality})"
    return guess_from_values(slices, is_volume, native_dtype, path)
