"""Quality flags of the reference catalogue — bits of the project registry.

The ``flags`` columns (``flags_g``, ``flags_r`` and their OR ``flags``) use
:class:`pydriftn.flags.SampleFlag`, the single registry of table flags:

``SATURATED``
    a pixel of the source is at/above its amplifier's saturation level or
    flagged SATURATED/BLEED in the dq mask;
``NEAR_EDGE``
    the photometric aperture reaches the CCD edge;
``BLENDED``
    another detection lies within ``blend_radius_fwhm`` PSF sizes, the source
    was deblended from a larger one, or it lies in the halo/bleed of a
    saturated star;
``MASKED_PIXELS``
    a dq-masked (bad, cosmic ray, ...) or non-finite pixel is in the aperture.

The catalogue has no bit of its own: a failed windowed centroid (the
isophotal barycentre is used) is the boolean column ``centroid_fallback``.
"""

from __future__ import annotations

from ..flags import SampleFlag, decode_flags

__all__ = ["SourceFlag", "CATALOGUE_FLAGS", "flag_names"]

#: the registry the catalogue's ``flags`` columns use
SourceFlag = SampleFlag

#: the bits the catalogue sets
CATALOGUE_FLAGS = SampleFlag.SATURATED | SampleFlag.NEAR_EDGE | SampleFlag.BLENDED | SampleFlag.MASKED_PIXELS


def flag_names(value: int) -> str:
    """Human-readable ``|``-joined names of the bits set in ``value``."""
    return "|".join(decode_flags(int(value), SampleFlag))
