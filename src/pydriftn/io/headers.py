"""The one place that knows DECam / Community Pipeline header conventions.

:class:`HeaderInfo` turns a (merged primary + extension) header into typed
values: pixel scale, exposure time, shutter-open time, per-amplifier gain,
read noise and saturation, seeing FWHM, average sky, band, exposure number.
Every other module asks :class:`HeaderInfo` instead of reading keywords.

Fallbacks
---------
A missing (or unparsable) key falls back to a documented DECam default and a
``logging`` warning names the file, the extension and the key:

==========================  =========================================  ==================
quantity                    keys tried, in order                       default
==========================  =========================================  ==================
gain (e-/ADU), per amp      ``GAINA``/``GAINB``, then ``GAIN``          4.0
read noise (e-), per amp    ``RDNOISEA``/``RDNOISEB``, then ``RDNOISE`` 7.0
saturation (ADU), per amp   ``SATURATA``/``SATURATB``, then ``SATURATE`` 40000.0
pixel scale ("/px)          ``PIXSCAL1``/``PIXSCAL2``, then the WCS     0.27 (no WCS)
FWHM (px)                   ``FWHM``                                    None
average sky (ADU)           ``AVSKY``                                   None
band                        first word of ``FILTER``, then ``BAND``     None
exposure number             ``EXPNUM``                                  None
==========================  =========================================  ==================

Exposure time (``EXPTIME``) and shutter-open time (``DATE-OBS`` and/or
``MJD-OBS``, UTC) have no safe default for a drift image: with
``require_timing=True`` a missing one raises :class:`~pydriftn.errors.HeaderError`;
otherwise the field is ``None`` (with a warning). If only one of ``DATE-OBS``
and ``MJD-OBS`` is present the other is derived from it; if both are present
and disagree by more than 1 s, ``MJD-OBS`` wins and a warning is logged.

Amplifiers
----------
A DECam CCD is read by two amplifiers; amplifier A covers the columns
``x < NAXIS1 / 2`` (0-based), B the rest (the convention of the CP InstCal
products and of :mod:`pydriftn.simulate`). :meth:`HeaderInfo.amp_map` and
:func:`amp_map` expand per-amplifier values to a column vector or an image.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import HeaderError

__all__ = [
    "DECAM_DEFAULTS",
    "HeaderInfo",
    "amp_map",
    "band_from_filter",
    "merge_headers",
    "NON_INHERITED_KEYS",
]

log = logging.getLogger(__name__)

#: DECam defaults used when a header key is missing (see the module docstring).
DECAM_DEFAULTS = {
    "gain": 4.0,  # e-/ADU
    "read_noise": 7.0,  # e-
    "saturation": 40000.0,  # ADU
    "pixel_scale": 0.27,  # arcsec/px, nominal; only used when there is no WCS
}

#: Keys never copied from the primary header into an extension header: FITS
#: structure keys, and the keys describing one HDU's pixel grid (a WCS belongs
#: to the pixels it describes, so it is never inherited).
NON_INHERITED_KEYS = re.compile(
    r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|EXTNAME|EXTVER|INHERIT|NEXTEND"
    r"|CHECKSUM|DATASUM|BSCALE|BZERO|BLANK|COMMENT|HISTORY"
    r"|WCSAXES\w?|CTYPE\d\w?|CRPIX\d\w?|CRVAL\d\w?|CDELT\d\w?|CUNIT\d\w?|CROTA\d"
    r"|CD\d_\d\w?|PC\d_\d\w?|PV\d_\d+\w?|PS\d_\d+\w?|[AB]P?_\w+|LTV\d|LTM\d_\d|WCSDIM|WAT\d_\d+)$"
)


def merge_headers(primary, extension):
    """Extension header with the primary header's cards it lacks (``INHERIT`` convention).

    Cards of ``primary`` whose keyword is absent from ``extension`` are
    appended, except structure and pixel-grid (WCS) keys
    (:data:`NON_INHERITED_KEYS`). Nothing is inherited when the extension says
    ``INHERIT = F``. Neither input is modified.

    Parameters
    ----------
    primary, extension : astropy.io.fits.Header

    Returns
    -------
    astropy.io.fits.Header
    """
    merged = extension.copy()
    if primary is None or extension.get("INHERIT", True) is False:
        return merged
    for card in primary.cards:
        key = card.keyword
        if not key or NON_INHERITED_KEYS.match(key) or key in merged:
            continue
        merged.append(card, end=True)
    return merged


def band_from_filter(filter_value):
    """Short band name from a DECam ``FILTER`` string.

    ``'g DECam SDSS c0001 4720.0 1520.0'`` → ``'g'``,
    ``'VR DECam c0007 6300.0 2600.0'`` → ``'VR'``; ``None``/blank → ``None``.
    """
    if filter_value is None:
        return None
    s = str(filter_value).strip()
    if not s:
        return None
    return s.split()[0]


def amp_map(values, shape, *, boundary=None, kind="image", dtype=np.float32):
    """Expand per-amplifier values (A, B) over a CCD.

    Parameters
    ----------
    values : float or (float, float)
        Value for amplifier A and B (a scalar applies to both).
    shape : (ny, nx)
        Image shape.
    boundary : int, optional
        First column of amplifier B; default ``ceil(nx / 2)`` (amp A is
        ``x < nx / 2``).
    kind : {'image', 'column'}
        ``'image'`` → array of ``shape``; ``'column'`` → vector of length nx
        (value of each column), which broadcasts against ``data[y, x]``.

    Returns
    -------
    ndarray
    """
    ny, nx = int(shape[0]), int(shape[1])
    v = np.atleast_1d(np.asarray(values, dtype=float))
    if v.size == 1:
        va = vb = float(v[0])
    elif v.size == 2:
        va, vb = float(v[0]), float(v[1])
    else:
        raise ValueError(f"amp_map: expected one value or (A, B), got {values!r}")
    b = int(math.ceil(nx / 2)) if boundary is None else int(boundary)
    col = np.full(nx, vb, dtype=dtype)
    col[: max(0, min(b, nx))] = va
    if kind == "column":
        return col
    if kind == "image":
        return np.broadcast_to(col, (ny, nx)).copy()
    raise ValueError(f"amp_map: kind must be 'image' or 'column', got {kind!r}")


def _where(path, extname):
    w = str(path) if path is not None else "<header>"
    if extname is not None:
        w += f"[{extname}]"
    return w


def _float_or_none(value):
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass(frozen=True)
class HeaderInfo:
    """Typed header values of one CCD extension (see the module docstring).

    Attributes
    ----------
    path, extname : str or None
        Where the header came from (for messages).
    shape : (ny, nx) or None
        From ``NAXIS2``, ``NAXIS1`` (``ZNAXISn`` for compressed headers).
    pixel_scale : float
        Arcsec per pixel; ``pixel_scale_source`` says where it came from
        (``'PIXSCAL'``, ``'WCS'`` or ``'default'``).
    exptime : float or None
        Exposure time (s).
    mjd : float or None
        Shutter-open time, UTC MJD.
    date_obs : astropy.time.Time or None
        Shutter-open time (UTC).
    gain, read_noise, saturation : (float, float)
        Amplifier A and B values: e-/ADU, e-, ADU.
    fwhm_px : float or None
        Median seeing FWHM of the exposure (CP ``FWHM``), pixels.
    avsky : float or None
        Average sky level (CP ``AVSKY``), ADU.
    band : str or None
        Short band name (``'g'``, ``'r'``, ``'VR'``); ``filter`` is the full string.
    expnum, ccdnum : int or None
    defaults_used : tuple of str
        Quantities that fell back to a default.
    """

    path: str | None
    extname: str | None
    shape: tuple[int, int] | None
    pixel_scale: float
    pixel_scale_source: str
    exptime: float | None
    mjd: float | None
    date_obs: object | None
    gain: tuple[float, float]
    read_noise: tuple[float, float]
    saturation: tuple[float, float]
    fwhm_px: float | None
    avsky: float | None
    band: str | None
    filter: str | None
    expnum: int | None
    ccdnum: int | None
    defaults_used: tuple[str, ...] = field(default_factory=tuple)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_header(cls, header, *, path=None, extname=None, wcs=None, require_timing=False):
        """Read the header conventions.

        Parameters
        ----------
        header : astropy.io.fits.Header
            The extension header, already merged with the primary header
            (:func:`merge_headers`; :func:`pydriftn.io.read_ccd` does that).
        path, extname : optional
            Named in warnings and errors.
        wcs : astropy.wcs.WCS, optional
            Used for the pixel scale when ``PIXSCAL1/2`` are absent; if not
            given, one is built from the header when it has ``CTYPE1``.
        require_timing : bool
            Raise :class:`~pydriftn.errors.HeaderError` when ``EXPTIME`` or the
            shutter-open time is missing or unusable (drift images need both).

        Returns
        -------
        HeaderInfo
        """
        where = _where(path, extname)
        if extname is None:
            extname = header.get("EXTNAME")
            extname = None if extname is None else str(extname).strip()
        defaults = []

        def warn_default(key, what, default, unit):
            log.warning("%s: header key %s missing or unusable; using the DECam default %s = %s %s",
                        where, key, what, default, unit)
            defaults.append(what)

        # shape
        nx = header.get("ZNAXIS1", header.get("NAXIS1"))
        ny = header.get("ZNAXIS2", header.get("NAXIS2"))
        shape = (int(ny), int(nx)) if nx is not None and ny is not None else None

        # per-amplifier values
        def per_amp(key_a, key_b, key_any, what, unit):
            out = []
            for k in (key_a, key_b):
                v = _float_or_none(header.get(k))
                if v is None or v <= 0:
                    v = _float_or_none(header.get(key_any))
                    if v is not None and v > 0:
                        log.warning("%s: header key %s missing; using %s = %s for that amplifier",
                                    where, k, key_any, v)
                    else:
                        v = DECAM_DEFAULTS[what]
                        warn_default(k, what, v, unit)
                out.append(float(v))
            return tuple(out)

        gain = per_amp("GAINA", "GAINB", "GAIN", "gain", "e-/ADU")
        read_noise = per_amp("RDNOISEA", "RDNOISEB", "RDNOISE", "read_noise", "e-")
        saturation = per_amp("SATURATA", "SATURATB", "SATURATE", "saturation", "ADU")

        # pixel scale
        ps = [_float_or_none(header.get(k)) for k in ("PIXSCAL1", "PIXSCAL2")]
        ps = [p for p in ps if p is not None and p > 0]
        if ps:
            pixel_scale, ps_source = float(np.mean(ps)), "PIXSCAL"
        else:
            pixel_scale = None
            if wcs is None and header.get("CTYPE1") is not None:
                try:
                    from .fits import wcs_from_header

                    wcs = wcs_from_header(header, path=path, extname=extname)
                except Exception:  # noqa: BLE001 - any failure means "no WCS"
                    wcs = None
            if wcs is not None:
                pixel_scale = _wcs_pixel_scale(wcs, shape)
            if pixel_scale is not None:
                ps_source = "WCS"
                log.info("%s: no PIXSCAL1/PIXSCAL2; pixel scale %.4f\"/px from the WCS", where, pixel_scale)
            else:
                pixel_scale, ps_source = DECAM_DEFAULTS["pixel_scale"], "default"
                warn_default("PIXSCAL1", "pixel_scale", pixel_scale, "arcsec/px (and no usable WCS)")

        # timing
        exptime = _float_or_none(header.get("EXPTIME"))
        if exptime is not None and exptime < 0:
            exptime = None
        if exptime is None:
            msg = "header key EXPTIME missing or unusable (expected the exposure time in s)"
            if require_timing:
                raise HeaderError(msg, path=path, extension=extname)
            log.warning("%s: %s", where, msg)
        mjd, date_obs = _read_time(header, path, extname, where)
        if mjd is None and require_timing:
            raise HeaderError(
                "header keys DATE-OBS and MJD-OBS both missing or unusable "
                "(expected the shutter-open time, UTC)",
                path=path,
                extension=extname,
            )

        fwhm = _float_or_none(header.get("FWHM"))
        if fwhm is None or fwhm <= 0:
            fwhm = None
            log.warning("%s: header key FWHM missing; fwhm_px = None (estimate it from the image)", where)
        avsky = _float_or_none(header.get("AVSKY"))
        if avsky is None:
            log.warning("%s: header key AVSKY missing; avsky = None", where)

        filt = header.get("FILTER")
        filt = None if filt is None else str(filt).strip() or None
        band = band_from_filter(filt)
        if band is None:
            b = header.get("BAND")
            band = None if b is None else (str(b).strip() or None)
        if band is None:
            log.warning("%s: header keys FILTER and BAND missing; band = None", where)

        def as_int(key):
            v = header.get(key)
            try:
                return None if v is None else int(str(v).strip())
            except ValueError:
                log.warning("%s: header key %s = %r is not an integer", where, key, v)
                return None

        expnum = as_int("EXPNUM")
        if expnum is None:
            log.warning("%s: header key EXPNUM missing; expnum = None", where)

        return cls(
            path=None if path is None else str(path),
            extname=extname,
            shape=shape,
            pixel_scale=float(pixel_scale),
            pixel_scale_source=ps_source,
            exptime=exptime,
            mjd=mjd,
            date_obs=date_obs,
            gain=gain,
            read_noise=read_noise,
            saturation=saturation,
            fwhm_px=fwhm,
            avsky=avsky,
            band=band,
            filter=filt,
            expnum=expnum,
            ccdnum=as_int("CCDNUM"),
            defaults_used=tuple(defaults),
        )

    # ------------------------------------------------------------- helpers
    @property
    def amp_boundary(self) -> int | None:
        """First column (0-based) of amplifier B, ``ceil(nx / 2)``."""
        return None if self.shape is None else int(math.ceil(self.shape[1] / 2))

    @property
    def fwhm_arcsec(self) -> float | None:
        """Seeing FWHM in arcsec (``fwhm_px * pixel_scale``)."""
        return None if self.fwhm_px is None else self.fwhm_px * self.pixel_scale

    @property
    def mjd_end(self) -> float | None:
        """Shutter-close time, UTC MJD (``mjd + exptime``)."""
        if self.mjd is None or self.exptime is None:
            return None
        return self.mjd + self.exptime / 86400.0

    def require_timing(self):
        """Raise :class:`~pydriftn.errors.HeaderError` unless EXPTIME and the start time are known."""
        if self.exptime is None:
            raise HeaderError("header key EXPTIME missing (exposure time needed for a drift image)",
                              path=self.path, extension=self.extname)
        if self.mjd is None:
            raise HeaderError("header keys DATE-OBS / MJD-OBS missing (shutter-open time needed)",
                              path=self.path, extension=self.extname)
        return self

    def amp_map(self, quantity, kind="image", shape=None):
        """Per-pixel (``kind='image'``) or per-column (``'column'``) map of
        ``'gain'``, ``'read_noise'`` or ``'saturation'`` (amp A: ``x < nx/2``)."""
        if quantity not in ("gain", "read_noise", "saturation"):
            raise ValueError(f"quantity must be 'gain', 'read_noise' or 'saturation', got {quantity!r}")
        shape = self.shape if shape is None else shape
        if shape is None:
            raise ValueError(f"{_where(self.path, self.extname)}: image shape unknown; pass shape=")
        return amp_map(getattr(self, quantity), shape, kind=kind)

    def amp_of_column(self, x):
        """0 for amplifier A, 1 for B, for (array of) 0-based x position(s).

        Integer columns follow ``x < nx / 2`` → A; a continuous position belongs
        to the pixel containing it (pixel centres at integers, so the edge
        between the amplifiers is at ``amp_boundary - 0.5``).
        """
        if self.amp_boundary is None:
            raise ValueError(f"{_where(self.path, self.extname)}: image shape unknown")
        return (np.asarray(x) >= self.amp_boundary - 0.5).astype(int)

    def as_dict(self):
        """Plain-Python summary (``date_obs`` as an ISO string), e.g. for JSON."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["date_obs"] = None if self.date_obs is None else self.date_obs.isot
        return d


def _read_time(header, path, extname, where):
    """(mjd, Time) of the shutter opening from DATE-OBS / MJD-OBS (either may be missing)."""
    from astropy.time import Time

    date_obs = None
    raw = header.get("DATE-OBS")
    if raw is not None and str(raw).strip():
        s = str(raw).strip()
        if "T" not in s and header.get("TIME-OBS"):
            s = f"{s}T{str(header['TIME-OBS']).strip()}"
        try:
            date_obs = Time(s, format="isot" if "T" in s else None, scale="utc")
        except (ValueError, TypeError):
            log.warning("%s: header key DATE-OBS = %r is not an ISO time; ignored", where, raw)
            date_obs = None
    mjd = _float_or_none(header.get("MJD-OBS"))
    if mjd is not None and mjd <= 0:
        mjd = None
    if mjd is None and date_obs is None:
        return None, None
    if mjd is None:
        mjd = float(date_obs.mjd)
        log.info("%s: MJD-OBS missing; derived %.8f from DATE-OBS", where, mjd)
    elif date_obs is None:
        date_obs = Time(mjd, format="mjd", scale="utc")
        log.info("%s: DATE-OBS missing; derived %s from MJD-OBS", where, date_obs.isot)
    else:
        diff_s = abs(float(date_obs.mjd) - mjd) * 86400.0
        if diff_s > 1.0:
            log.warning("%s: DATE-OBS (%s) and MJD-OBS (%.8f) differ by %.1f s; using MJD-OBS",
                        where, date_obs.isot, mjd, diff_s)
            date_obs = Time(mjd, format="mjd", scale="utc")
    return float(mjd), date_obs


def _wcs_pixel_scale(wcs, shape):
    """Local pixel scale (arcsec/px) at the image centre: sqrt of the pixel's sky area.

    Computed numerically so that distortion terms (TPV, SIP) are included.
    """
    try:
        if shape is not None:
            x0, y0 = (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0
        else:
            x0 = y0 = 0.0
        xs = np.array([x0, x0 + 1.0, x0])
        ys = np.array([y0, y0, y0 + 1.0])
        ra, dec = wcs.celestial.pixel_to_world_values(xs, ys)
        ra, dec = np.radians(ra), np.radians(dec)
        # unit vectors
        v = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)
        a, b = v[1] - v[0], v[2] - v[0]
        area = np.linalg.norm(np.cross(a, b))  # sr
        scale = math.degrees(math.sqrt(area)) * 3600.0
    except Exception:  # noqa: BLE001
        return None
    return scale if math.isfinite(scale) and scale > 0 else None
