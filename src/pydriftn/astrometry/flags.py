"""Flags of the astrometry trail table (``flags`` column).

The bits are the project-wide per-trail flags of :class:`pydriftn.flags.SampleFlag`
(one registry for every table), so later stages can OR them with their own.
The astrometry stage sets:

``TRUNCATED``
    part of the trail lies outside the CCD (or within one FWHM of its edge);
    its position comes from the visible end plus the known trail vector or
    from the fitted WCS, never from the centroid of the visible part.
``SATURATED``
    a pixel of the footprint is saturated (or SATURATED/BLEED in the dq mask).
``MASKED_PIXELS``
    dq-masked (bad, bad column, streak) or non-finite pixels in the footprint.
``COSMIC_RAY``
    cosmic-ray pixels in the footprint (see ``n_cr_pixels``, ``n_cr_samples``).
``BLENDED`` / ``DEBLENDED``
    another trail overlaps the footprint (>= 10 % of the trail's own signal);
    DEBLENDED is added where the joint fit separated the fluxes.
``SATELLITE``
    a satellite/aircraft streak crosses the footprint.
``UNMATCHED``
    no catalogue star explains the trail (``star_id`` = -1): a new, variable
    or transient source candidate.

Astrometry-specific states that have no registry bit are boolean columns of
the trail table: ``position_measured`` (False = position predicted by the
fitted WCS, best for faint trails), ``in_wcs_fit``, ``bad_length`` (fitted
length inconsistent with the drift: overlapping trails along the track or a
moving object).
"""

from __future__ import annotations

from ..flags import SampleFlag, decode_flags

__all__ = ["TrailFlag", "trail_flag_names"]

#: The per-trail flag registry (an alias of :class:`pydriftn.flags.SampleFlag`).
TrailFlag = SampleFlag


def trail_flag_names(value: int) -> str:
    """Human-readable ``|``-joined names of the bits set in ``value``."""
    return "|".join(decode_flags(int(value), SampleFlag))
