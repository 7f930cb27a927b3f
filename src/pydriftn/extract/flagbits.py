"""Per-sample and per-star quality flags used by extraction and normalisation.

The bit values come from :mod:`pydriftn.flags` when that module defines them
(the project's single flag registry); the fall-backs below are used only when
it does not, so tables stay self-consistent either way.
"""

from __future__ import annotations

import enum
import importlib

__all__ = ["lookup_bit", "SHUTTER_RAMP", "DEBLENDED", "MASKED_PIXELS", "SATURATED", "COSMIC_RAY",
           "OFF_IMAGE", "NO_DATA", "OUTLIER_PIXELS", "FEW_VALID_SAMPLES", "BAD_SKY", "NOT_NORMALISED",
           "BLENDED", "BLEND_MINOR", "describe"]

_FALLBACK = {
    "SHUTTER_RAMP": 1 << 0,
    "DEBLENDED": 1 << 1,
    "MASKED_PIXELS": 1 << 2,
    "SATURATED": 1 << 3,
    "COSMIC_RAY": 1 << 4,
    "OFF_IMAGE": 1 << 5,
    "NO_DATA": 1 << 6,
    "OUTLIER_PIXELS": 1 << 7,
    "FEW_VALID_SAMPLES": 1 << 8,
    "BAD_SKY": 1 << 9,
    "NOT_NORMALISED": 1 << 10,
    "BLENDED": 1 << 11,
    "BLEND_MINOR": 1 << 12,
}


def _registry():
    try:
        return importlib.import_module("pydriftn.flags")
    except ImportError:
        return None


def lookup_bit(name, fallback=None, *, kinds=("Sample", "Series", "Star", "Trail", "Pixel", "")):
    """Value of flag ``name`` from :mod:`pydriftn.flags` (module attribute or a member of
    one of its ``enum.IntFlag`` classes, sample/star classes first), else ``fallback``."""
    mod = _registry()
    if mod is not None:
        classes = [v for v in vars(mod).values() if isinstance(v, type) and issubclass(v, enum.IntFlag)]
        for kind in kinds:
            for cls in classes:
                if kind and kind.lower() not in cls.__name__.lower():
                    continue
                if name in cls.__members__:
                    return int(cls.__members__[name])
        val = getattr(mod, name, None)
        if isinstance(val, int):
            return int(val)
    return _FALLBACK.get(name, fallback) if fallback is None else fallback


SHUTTER_RAMP = lookup_bit("SHUTTER_RAMP")
DEBLENDED = lookup_bit("DEBLENDED")
MASKED_PIXELS = lookup_bit("MASKED_PIXELS")
SATURATED = lookup_bit("SATURATED")
COSMIC_RAY = lookup_bit("COSMIC_RAY")
OFF_IMAGE = lookup_bit("OFF_IMAGE")
NO_DATA = lookup_bit("NO_DATA")
OUTLIER_PIXELS = lookup_bit("OUTLIER_PIXELS")
FEW_VALID_SAMPLES = lookup_bit("FEW_VALID_SAMPLES")
BAD_SKY = lookup_bit("BAD_SKY")
NOT_NORMALISED = lookup_bit("NOT_NORMALISED")
BLENDED = lookup_bit("BLENDED")
BLEND_MINOR = lookup_bit("BLEND_MINOR")
SATELLITE = lookup_bit("SATELLITE", 0)

#: Pixel-mask bits (from pydriftn.flags) that mark cosmic rays / saturation, if defined.
PIXEL_COSMIC_RAY = lookup_bit("COSMIC_RAY", 0, kinds=("Pixel", "Mask", ""))
PIXEL_SATURATED = lookup_bit("SATURATED", 0, kinds=("Pixel", "Mask", ""))
PIXEL_STREAK = lookup_bit("STREAK", 0, kinds=("Pixel", "Mask", ""))

_NAMES = ["SHUTTER_RAMP", "DEBLENDED", "MASKED_PIXELS", "SATURATED", "COSMIC_RAY", "OFF_IMAGE",
          "NO_DATA", "OUTLIER_PIXELS", "FEW_VALID_SAMPLES", "BAD_SKY", "NOT_NORMALISED", "BLENDED",
          "BLEND_MINOR", "SATELLITE"]


def describe(value):
    """Names of the flags set in ``value`` (for logs and reports)."""
    value = int(value)
    return [n for n in _NAMES if value & globals()[n]]
