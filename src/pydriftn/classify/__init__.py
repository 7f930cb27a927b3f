"""Classification of sources on a drift image.

Star trails, millisecond flashes, satellite streaks, cosmic rays and other
(moving-object) trails are told apart by shape against the known drift
geometry. Public API::

    from pydriftn.classify import classify_exposure_ccd, save_cutouts

    res = classify_exposure_ccd(image, mask, trails, geometry, fwhm_px=..., gain=..., wcs=..., mjd_obs=...)
    res.table          # one row per object, columns COLUMNS
    res.streak_mask    # satellite pixels, to be masked downstream
    res.counts         # {'star_trail': n, 'flash': n, ...}
    save_cutouts(res, image, out_dir)
"""

from .core import (
    CLASSES,
    COLUMNS,
    FLAG_DQ_CR,
    FLAG_EDGE,
    FLAG_MASKED,
    FLAG_ON_TRAIL,
    FLAG_SATURATED,
    FLAG_STREAK_CROSSED,
    ClassificationResult,
    classify_exposure_ccd,
    decode_mask,
)
from .cutouts import save_cutouts

__all__ = [
    "CLASSES",
    "COLUMNS",
    "FLAG_DQ_CR",
    "FLAG_EDGE",
    "FLAG_MASKED",
    "FLAG_ON_TRAIL",
    "FLAG_SATURATED",
    "FLAG_STREAK_CROSSED",
    "ClassificationResult",
    "classify_exposure_ccd",
    "decode_mask",
    "save_cutouts",
]
