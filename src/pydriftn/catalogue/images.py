"""Reading one CCD of a pointed image (+ its dq mask) for the catalogue.

A thin adapter over :func:`pydriftn.io.read_ccd`: the pixels, merged header,
WCS and typed header values (per-amplifier gain, read noise and saturation
maps, EXPTIME, MJD, band, pixel scale, CCDNUM) and the decoded dq mask split
into the two masks :func:`~pydriftn.catalogue.measure_sources` needs —
``bad_mask`` (bad/hot pixels, cosmic rays, low weight, streaks: ignored) and
``saturated_mask`` (SATURATED/BLEED: part of a saturated star, flagged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .. import io as pio
from ..errors import HeaderError
from ..flags import PixelFlag

__all__ = ["PointedCCD", "read_pointed_ccd", "list_ccds", "BAD_PIXEL_FLAGS", "SATURATED_PIXEL_FLAGS"]

log = logging.getLogger(__name__)

#: dq-mask pixel flags ignored by detection and photometry
BAD_PIXEL_FLAGS = PixelFlag.BAD_PIXEL | PixelFlag.COSMIC_RAY | PixelFlag.LOW_WEIGHT | PixelFlag.STREAK
#: dq-mask pixel flags that mark a saturated star (kept in detection, flagged)
SATURATED_PIXEL_FLAGS = PixelFlag.SATURATED | PixelFlag.BLEED


@dataclass
class PointedCCD:
    """One CCD of a pointed image with what the catalogue needs."""

    path: str
    ccd: str
    data: np.ndarray
    header: object
    wcs: object
    gain: object  # float or per-column (1, nx) map (e-/ADU)
    read_noise: float
    saturation: object  # float or per-column (1, nx) map (ADU)
    exptime: float
    mjd: float
    band: str
    pixscale_arcsec: float
    ccdnum: int
    bad_mask: np.ndarray | None = None
    saturated_mask: np.ndarray | None = None
    mask_path: str | None = None
    fwhm_hint_px: float | None = None
    extra: dict = field(default_factory=dict)


def list_ccds(path):
    """EXTNAMEs of the image extensions of a (MEF) file, in file order."""
    return list(pio.list_ccds(path))


def _amp(values, shape):
    """Per-amplifier (A, B) values → a scalar, or a per-column ``(1, nx)`` float32 map."""
    v = np.atleast_1d(np.asarray(values, float))
    if v.size == 1 or np.all(v == v[0]):
        return float(v[0])
    return pio.amp_map(tuple(v[:2]), shape, kind="column")[None, :]


def read_pointed_ccd(path, ccd, *, mask=True):
    """Read one CCD of a pointed image and its dq mask.

    Parameters
    ----------
    path : str or Path
        Image file (MEF ``.fits``/``.fits.fz``, CP or simulator layout).
    ccd : str
        Extension name, e.g. ``"S4"``.
    mask : bool or str or Path
        True: use the mask beside the image if there is one (none is fine);
        a path: that mask; False: no mask.

    Returns
    -------
    PointedCCD

    Raises
    ------
    InputFileError
        (FileMissingError, NotFITSError, TruncatedFileError,
        MissingExtensionError, EmptyDataError, WCSError, HeaderError, MaskError)
    """
    mask_arg = None
    if mask is True:
        found = pio.find_mask(path)
        mask_arg = found if found is not None else None
        if found is None:
            log.info("%s: no dq mask beside the image; only non-finite pixels are masked", path)
    elif mask:
        mask_arg = mask
    img = pio.read_ccd(path, ccd, mask=mask_arg)
    info = img.info
    if info.exptime is None or not np.isfinite(info.exptime) or info.exptime <= 0:
        raise HeaderError("EXPTIME missing or not positive: needed for the instrumental magnitudes",
                          path=path, extension=img.extname)
    shape = img.data.shape
    bad = sat = None
    if img.mask is not None:
        bad = (img.mask & int(BAD_PIXEL_FLAGS)) != 0
        sat = (img.mask & int(SATURATED_PIXEL_FLAGS)) != 0
    return PointedCCD(
        path=str(path), ccd=img.extname, data=img.data, header=img.header, wcs=img.wcs,
        gain=_amp(info.gain, shape), read_noise=float(np.mean(info.read_noise)),
        saturation=_amp(info.saturation, shape), exptime=float(info.exptime),
        mjd=float(info.mjd) if info.mjd is not None else float("nan"), band=str(info.band),
        pixscale_arcsec=float(info.pixel_scale), ccdnum=int(info.ccdnum or 0),
        bad_mask=bad, saturated_mask=sat, mask_path=img.mask_path, fwhm_hint_px=info.fwhm_px,
    )
