"""Drift astrometry: find every trail, identify its star, re-fit the WCS.

Public API
----------
solve_exposure_ccd
    One CCD of one drift exposure → :class:`AstrometryResult` (trail table,
    fitted shutter-open WCS, rms, stars used, cosmic-ray mask, diagnostics).
predict_trails
    Start/end positions of all catalogue stars with a WCS (forced positions),
    TRUNCATED flag for trails crossing the CCD edge.
write_astrometry_products
    Trail table (CSV + Parquet) and fitted WCS header file of one CCD.
write_exposure_products
    ``driftastrom-exp_{EXPNUM}.csv``/``.parquet`` over all CCDs of an exposure
    and ``wcs-exp_{EXPNUM}.fits`` (one header per CCD).
TrailFlag, trail_flag_names
    Bits of the trail table's ``flags`` column.

Building blocks: :mod:`.detect` (background, matched filter, candidates,
streaks), :mod:`.trailfit` (vectorised trail fits and rendering),
:mod:`.match` (offset voting, refinement), :mod:`.wcsfit` (TAN-SIP fit).
"""

from .core import (
    TRAIL_COLUMNS,
    AstrometryResult,
    detect_cosmic_rays,
    predict_trails,
    resolve_mask,
    solve_exposure_ccd,
    write_astrometry_products,
    write_exposure_products,
)
from .flags import TrailFlag, trail_flag_names

__all__ = [
    "TRAIL_COLUMNS",
    "AstrometryResult",
    "TrailFlag",
    "detect_cosmic_rays",
    "predict_trails",
    "resolve_mask",
    "solve_exposure_ccd",
    "trail_flag_names",
    "write_astrometry_products",
    "write_exposure_products",
]
