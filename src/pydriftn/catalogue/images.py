"""Reading one CCD of a pointed image (+ its dq mask) for the catalogue.

Uses :mod:`pydriftn.io` (``read_ccd``, ``find_mask``) when it is available;
until then a minimal reader with the same conventions (DECam CP headers:
``GAINA/B``, ``RDNOISEA/B``, ``SATURATA/B``, ``DATASECA/B``, CP dq-mask codes)
stands in, so the catalogue works on CP files and the simulator's output.
Everything downstream only sees :class:`PointedCCD`.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import (
    EmptyDataError,
    FileMissingError,
    HeaderError,
    InputFileError,
    MaskError,
    MissingExtensionError,
    NotFITSError,
    WCSError,
)

__all__ = ["PointedCCD", "read_pointed_ccd", "list_ccds", "find_mask_path", "decode_cp_mask"]

log = logging.getLogger(__name__)

# CP dq codes (older CP): 0 good, 1 bad, 2 hot, 3 saturated, 4 bleed, 5 cosmic ray,
# 6 low weight, 7 transient, 8 streak
_CP_SATURATED = (3, 4)
_CP_BAD = (1, 2, 5, 6, 7, 8)


@dataclass
class PointedCCD:
    """One CCD of a pointed image with what the catalogue needs."""

    path: str
    ccd: str
    data: np.ndarray
    header: object
    wcs: object
    gain: object  # float or per-pixel map
    read_noise: float
    saturation: object  # float or per-pixel map
    exptime: float
    mjd: float
    band: str
    pixscale_arcsec: float
    ccdnum: int
    bad_mask: np.ndarray | None = None
    saturated_mask: np.ndarray | None = None
    mask_path: str | None = None
    extra: dict = field(default_factory=dict)


def decode_cp_mask(codes):
    """CP dq codes → (bad, saturated) boolean arrays.

    Codes 3 (saturated) and 4 (bleed trail) → saturated; 1, 2, 5, 6, 7, 8 →
    bad; anything else non-zero is treated as bad.
    """
    codes = np.asarray(codes)
    sat = np.isin(codes, _CP_SATURATED)
    bad = (codes != 0) & ~sat
    return bad, sat


def find_mask_path(path):
    """The dq mask beside an image: ``_ooi_`` → ``_ood_``, ``-image`` → ``-dqmask``; or None."""
    path = Path(path)
    name = path.name
    cands = []
    if "_ooi_" in name:
        cands.append(name.replace("_ooi_", "_ood_"))
    if "-image" in name:
        cands.append(name.replace("-image", "-dqmask"))
    for c in cands:
        p = path.with_name(c)
        if p.exists():
            return p
    return None


def _open(path):
    from astropy.io import fits

    path = Path(path)
    if not path.exists():
        raise FileMissingError("file does not exist", path=path)
    try:
        return fits.open(path, memmap=False)
    except OSError as exc:
        raise NotFITSError(f"not a readable FITS file ({exc})", path=path) from exc


def list_ccds(path):
    """EXTNAMEs of the image extensions of a (MEF) file, in file order."""
    try:
        from ..io import list_ccds as _io_list  # type: ignore[attr-defined]

        return list(_io_list(path))
    except (ImportError, AttributeError):
        pass
    with _open(path) as hdul:
        out = []
        for h in hdul[1:]:
            if h.is_image and h.header.get("NAXIS", 0) == 2:
                out.append(str(h.header.get("EXTNAME", h.name)).strip())
        if not out and hdul[0].header.get("NAXIS", 0) == 2:
            out.append(str(hdul[0].header.get("EXTNAME", hdul[0].header.get("DETPOS", "PRIMARY"))).strip())
    return out


def _amp_map(shape, hdr, key_a, key_b, default=None, name=""):
    va, vb = hdr.get(key_a), hdr.get(key_b)
    if va is None and vb is None:
        if default is None:
            return None
        return float(default)
    if va is None or vb is None:
        return float(va if va is not None else vb)
    va, vb = float(va), float(vb)
    if va == vb:
        return va
    m = np.full(shape, va, dtype=np.float32)
    sec_b = hdr.get("DATASECB")
    sec_a = hdr.get("DATASECA")
    parsed = False
    for sec, val in ((sec_a, va), (sec_b, vb)):
        if isinstance(sec, str):
            mm = re.match(r"\[(\d+):(\d+),(\d+):(\d+)\]", sec.replace(" ", ""))
            if mm:
                x0, x1, y0, y1 = (int(g) for g in mm.groups())
                m[y0 - 1: y1, x0 - 1: x1] = val
                parsed = True
    if not parsed:
        m[:, shape[1] // 2:] = vb
    return m


def _fallback_read(path, ccd):
    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    with _open(path) as hdul:
        names = [str(h.header.get("EXTNAME", h.name)).strip() for h in hdul]
        if ccd not in names:
            raise MissingExtensionError(
                f"no extension {ccd!r}; extensions present: {[n for n in names if n and n != 'PRIMARY']}",
                path=path, extension=ccd,
            )
        hdu = hdul[names.index(ccd)]
        if hdu.data is None or hdu.data.size == 0:
            raise EmptyDataError("extension has no pixels", path=path, extension=ccd)
        data = np.asarray(hdu.data, dtype=np.float32)
        hdr = fits.Header(hdul[0].header)
        for card in hdu.header.cards:
            if card.keyword not in ("", "COMMENT", "HISTORY"):
                hdr[card.keyword] = card.value
        ext_hdr = hdu.header.copy()
    if not np.isfinite(data).any():
        raise EmptyDataError("all pixels are NaN/inf", path=path, extension=ccd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(ext_hdr).celestial
        except Exception as exc:
            raise WCSError(f"unusable WCS ({exc})", path=path, extension=ccd) from exc
    if not wcs.has_celestial:
        raise WCSError("no celestial WCS (CTYPE1/2)", path=path, extension=ccd)
    shape = data.shape
    gain = _amp_map(shape, hdr, "GAINA", "GAINB", default=hdr.get("GAIN", hdr.get("ARAWGAIN")))
    if gain is None:
        raise HeaderError("no gain: expected GAINA/GAINB or GAIN", path=path, extension=ccd)
    sat = _amp_map(shape, hdr, "SATURATA", "SATURATB", default=hdr.get("SATURATE"))
    if sat is None:
        raise HeaderError("no saturation level: expected SATURATA/SATURATB or SATURATE", path=path, extension=ccd)
    rn = [hdr.get(k) for k in ("RDNOISEA", "RDNOISEB", "RDNOISE") if hdr.get(k) is not None]
    exptime = hdr.get("EXPTIME")
    if exptime is None:
        raise HeaderError("no EXPTIME", path=path, extension=ccd)
    band = str(hdr.get("BAND", str(hdr.get("FILTER", "?")).split()[0] if hdr.get("FILTER") else "?")).strip()
    from astropy.wcs.utils import proj_plane_pixel_scales

    pixscale = float(np.mean(proj_plane_pixel_scales(wcs)) * 3600.0)
    return dict(
        data=data, header=hdr, wcs=wcs, gain=gain, read_noise=float(np.mean(rn)) if rn else np.nan,
        saturation=sat, exptime=float(exptime), mjd=float(hdr.get("MJD-OBS", np.nan)), band=band,
        pixscale_arcsec=pixscale, ccdnum=int(hdr.get("CCDNUM", 0) or 0),
    )


def _read_mask(mask_path, ccd, shape):
    with _open(mask_path) as hdul:
        names = [str(h.header.get("EXTNAME", h.name)).strip() for h in hdul]
        if ccd not in names:
            raise MaskError(f"mask has no extension {ccd!r}", path=mask_path, extension=ccd)
        codes = np.asarray(hdul[names.index(ccd)].data)
    if codes.shape != tuple(shape):
        raise MaskError(f"mask shape {codes.shape} differs from image shape {tuple(shape)}", path=mask_path, extension=ccd)
    return decode_cp_mask(codes)


def read_pointed_ccd(path, ccd, *, mask=True):
    """Read one CCD of a pointed image and its dq mask.

    Parameters
    ----------
    path : str or Path
        Image file (MEF, CP or simulator layout).
    ccd : str
        Extension name, e.g. ``"S4"``.
    mask : bool or str or Path
        True: look for the mask beside the image; a path: that mask; False: none.

    Returns
    -------
    PointedCCD

    Raises
    ------
    InputFileError (FileMissingError, NotFITSError, MissingExtensionError, EmptyDataError, WCSError, HeaderError, MaskError)
    """
    info = None
    try:
        from .. import io as pio  # type: ignore

        if hasattr(pio, "read_ccd"):
            info = _from_io(pio, path, ccd)
    except ImportError:
        pass
    if info is None:
        info = _fallback_read(path, ccd)
    mask_path = None
    if mask is True:
        mask_path = find_mask_path(path)
    elif mask:
        mask_path = Path(mask)
    bad = sat = None
    if info.get("bad_mask") is not None:
        bad, sat = info.pop("bad_mask"), info.pop("saturated_mask")
    elif mask_path is not None:
        bad, sat = _read_mask(mask_path, ccd, info["data"].shape)
    info.pop("bad_mask", None)
    info.pop("saturated_mask", None)
    return PointedCCD(path=str(path), ccd=ccd, bad_mask=bad, saturated_mask=sat,
                      mask_path=None if mask_path is None else str(mask_path), **info)


def _from_io(pio, path, ccd):
    """Adapter to :func:`pydriftn.io.read_ccd` (used once that module exists)."""
    img = pio.read_ccd(path, ccd)
    hi = img.info
    shape = img.data.shape

    def amp(v):
        v = np.atleast_1d(np.asarray(v, float))
        if v.size == 1 or np.all(v == v[0]):
            return float(v[0])
        m = np.full(shape, v[0], dtype=np.float32)
        m[:, shape[1] // 2:] = v[1]
        return m

    gain = getattr(hi, "gain_map", None)
    if gain is None:
        gain = amp(hi.gain)
    sat = getattr(hi, "saturation_map", None)
    if sat is None:
        sat = amp(hi.saturation)
    hdr = img.header
    return dict(
        data=np.asarray(img.data, np.float32), header=hdr, wcs=img.wcs, gain=gain,
        read_noise=float(np.mean(np.atleast_1d(hi.read_noise))), saturation=sat, exptime=float(hi.exptime),
        mjd=float(hi.mjd), band=str(hi.band), pixscale_arcsec=float(hi.pixel_scale),
        ccdnum=int(hdr.get("CCDNUM", 0) or 0),
    )
