"""Per-source quality flags of the reference catalogue.

``pydriftn.flags`` (the project-wide pixel bitmask) is being written by
another engineer; these *source* flags describe a detection, not a pixel, so
they live here. They are OR-ed over the g and r measurements of a star in the
combined catalogue (``flags`` column, plus ``flags_g`` and ``flags_r``).
"""

from __future__ import annotations

import enum

__all__ = ["SourceFlag", "flag_names"]


class SourceFlag(enum.IntFlag):
    """Bits of the ``flags`` columns of the catalogue."""

    #: a pixel of the source is above the amplifier's saturation level, or
    #: flagged SATURATED / BLEED in the dq mask
    SATURATED = 1
    #: the photometric aperture (or the centroid window) reaches the CCD edge
    NEAR_EDGE = 2
    #: another detection lies within ``blend_radius_fwhm`` FWHM, or the source
    #: was deblended from a larger one
    BLENDED = 4
    #: a dq-masked (bad, cosmic ray, ...) or non-finite pixel lies in the aperture
    MASKED = 8
    #: the windowed centroid failed and the isophotal barycentre is used
    CENTROID_FALLBACK = 16
    #: detection lies in the wings or bleed trail of a saturated star
    NEAR_SATURATED = 32


def flag_names(value: int) -> str:
    """Human-readable ``|``-joined names of the bits set in ``value``."""
    value = int(value)
    return "|".join(f.name for f in SourceFlag if value & f) or ""
