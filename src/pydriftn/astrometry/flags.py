"""Per-trail quality flags of the astrometry trail table (``flags`` column).

These describe one *trail* on one drift exposure (not a pixel: the pixel
bitmask lives in ``pydriftn.flags``). Every bit is defined once here, with a
decoder, so later stages can select or reject trails by name.
"""

from __future__ import annotations

import enum

__all__ = ["TrailFlag", "trail_flag_names"]


class TrailFlag(enum.IntFlag):
    """Bits of the ``flags`` column of the trail table."""

    #: no catalogue star explains the trail (new / variable / transient candidate);
    #: ``star_id`` is -1
    UNMATCHED = 1
    #: part of the trail lies outside the CCD; its position comes from the
    #: visible end (start or end edge) plus the known trail vector, never from
    #: the centroid of the visible part
    TRUNCATED = 2
    #: a pixel of the trail footprint is saturated (or flagged SATURATED/BLEED)
    SATURATED = 4
    #: cosmic-ray pixels inside the trail footprint (see ``n_cr_pixels``)
    COSMIC_RAY = 8
    #: another catalogue star's trail overlaps the footprint; fitted jointly
    BLENDED = 16
    #: masked pixels (bad pixel, bad column, streak) inside the footprint
    MASKED = 32
    #: the trail was found by a fit seeded at the catalogue position (it was not
    #: a separate matched-filter peak, e.g. hidden in a blend)
    FORCED = 64
    #: the fit did not converge or ran out of its window; positions are the seed
    FIT_FAILED = 128
    #: the trail crosses a satellite/aircraft streak
    STREAK = 256
    #: not used in the WCS fit (clipped outlier, truncated, blended or failed)
    NOT_IN_WCS_FIT = 512
    #: the fitted length differs from the expected trail length by > 3 sigma
    #: (overlapping trails along the track, or a moving object)
    BAD_LENGTH = 1024


def trail_flag_names(value: int) -> str:
    """Human-readable ``|``-joined names of the bits set in ``value``."""
    value = int(value)
    return "|".join(f.name for f in TrailFlag if value & f) or ""
