"""Drift astrometry of one CCD of one exposure: trails → catalogue IDs → WCS.

:func:`solve_exposure_ccd` runs the whole stage:

1. trail geometry (direction, length, sense) from the header WCS, EXPTIME and
   the drift-rate vector (:mod:`pydriftn.geometry`);
2. bad pixels and cosmic rays from the dq mask, or from astroscrappy when no
   mask is given;
3. background (sep), matched-filter S/N map, satellite streaks and trail
   candidates (:mod:`.detect`); sub-pixel trail fits (:mod:`.trailfit`),
   including the PSF width measured on bright trails;
4. matching to the catalogue with no good prior (offset voting over trial
   rotations, then refinement with a magnitude-consistency term; :mod:`.match`);
5. a first TAN(-SIP) fit of the shutter-open WCS (:mod:`.wcsfit`) from the
   trail middles against the sky positions moved by half the drift;
6. a joint linear flux solve of every catalogue star predicted on the CCD
   (overlapping trails separated exactly, with a line-spread function measured
   on bright trails), then sub-pixel positions of the clean bright trails with
   their neighbours' models subtracted; the final WCS (SIP order by BIC) is
   fitted to these;
7. the trail table: every catalogue star whose flux is significant (or whose
   unresolved blend is), at the positions the fitted WCS predicts (better than
   any single-trail measurement, and jitter-free; the measured middles are in
   ``x_meas``/``y_meas``); candidates the catalogue model does not explain
   become UNMATCHED rows (star_id -1): new, variable or transient sources.

Trail middles are measured as the first moment of the along-track line
density (the image position averaged over the exposure) rather than halfway
between the ends, so the WCS carries the exposure's mean tracking jitter
(~0.03" rms in the simulator) rather than the jitter at shutter open and
close (~0.05").

:func:`predict_trails` gives start/end positions of all catalogue stars with
a (fitted) WCS, for forced extraction of faint stars, with a TRUNCATED flag
for trails crossing the CCD edge.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import geometry
from ..errors import AstrometryError, MaskError
from . import detect, trailfit
from .flags import TrailFlag
from .match import apply_affine, refine_matches, vote_transform
from .wcsfit import fit_tan_sip

log = logging.getLogger(__name__)

__all__ = [
    "AstrometryResult",
    "solve_exposure_ccd",
    "predict_trails",
    "resolve_mask",
    "detect_cosmic_rays",
    "write_astrometry_products",
    "write_exposure_products",
    "TRAIL_COLUMNS",
]

#: Columns of the trail table, in order:
#:
#: * ``expnum, ccd, star_id`` (catalogue ID, -1 for UNMATCHED), ``ra, dec`` (catalogue
#:   position; for UNMATCHED rows the fitted WCS at the trail start);
#: * ``x_start, y_start, x_end, y_end`` (0-based pixels at t = 0 and EXPTIME) and
#:   ``x, y`` (the ``anchor`` point): for catalogue stars as predicted by the fitted
#:   WCS, with errors ``x_err, y_err`` of that prediction; ``x_meas, y_meas`` (anchor
#:   point measured on the trail itself, NaN when not measured) and their errors;
#: * ``flux_adu, flux_err_adu, snr`` (joint linear fit, full trail even when truncated),
#:   ``mag_cat``;
#: * ``matched``, ``match_sep_arcsec`` (measured minus predicted middle);
#: * ``flags`` (:class:`pydriftn.flags.SampleFlag` bits), ``n_cr_pixels``,
#:   ``n_cr_samples`` (samples k, covering pixel steps k..k+1 from the start, touched
#:   by a cosmic-ray pixel), ``n_masked_pixels``;
#: * ``truncated, blended, position_measured, in_wcs_fit, bad_length`` (bool),
#:   ``length_px, length_err_px`` (fitted start-to-end length).
TRAIL_COLUMNS = [
    "expnum", "ccd", "star_id", "ra", "dec", "x_start", "y_start", "x_end", "y_end", "x", "y",
    "x_err", "y_err", "flux_adu", "flux_err_adu", "snr", "mag_cat", "matched", "match_sep_arcsec",
    "flags", "n_cr_pixels", "n_cr_samples", "n_masked_pixels", "truncated", "blended", "position_measured",
    "in_wcs_fit", "bad_length", "length_px", "length_err_px", "x_meas", "y_meas", "x_meas_err", "y_meas_err",
]


@dataclass
class AstrometryResult:
    """Result of :func:`solve_exposure_ccd`.

    Attributes
    ----------
    trails : pandas.DataFrame
        One row per detected trail (columns :data:`TRAIL_COLUMNS`).
    wcs : astropy.wcs.WCS
        Fitted WCS of the CCD at shutter open.
    rms_arcsec : float
        2-D rms residual of the stars used in the final WCS fit.
    n_used : int
        Stars used in the final WCS fit.
    cr_mask : ndarray of bool
        Cosmic-ray pixels (from the dq mask or astroscrappy).
    bad_mask : ndarray of bool
        All pixels ignored (bad, saturated, cosmic rays, streaks).
    geometry : pydriftn.geometry.TrailGeometry
        Trail geometry with the fitted WCS.
    diagnostics : dict
        Timings, counts, vote, zero point, PSF width, SIP order, streaks, ...
    cr_index, bad_index : ndarray of int or None
        Flat indices (ascending) of the True pixels of ``cr_mask`` and
        ``bad_mask`` when known without a pass over the image (else None:
        use ``numpy.flatnonzero``).
    """

    trails: pd.DataFrame
    wcs: object
    rms_arcsec: float
    n_used: int
    cr_mask: np.ndarray
    bad_mask: np.ndarray
    geometry: geometry.TrailGeometry
    diagnostics: dict = field(default_factory=dict)
    cr_index: np.ndarray | None = None
    bad_index: np.ndarray | None = None


# ----------------------------------------------------------------------------- inputs

def _info(image, name, default=None):
    info = getattr(image, "info", None)
    if info is not None:
        val = getattr(info, name, None)
        if val is not None:
            return val
    return default


def _scalar(v, default):
    """Reduce a per-amplifier value (dict / sequence / scalar) to one float."""
    if v is None:
        return default
    if isinstance(v, dict):
        vals = [float(x) for x in v.values() if x is not None]
        return float(np.mean(vals)) if vals else default
    if np.ndim(v) > 0:
        return float(np.mean(np.asarray(v, float)))
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _min_scalar(v, default):
    if v is None:
        return default
    if isinstance(v, dict):
        vals = [float(x) for x in v.values() if x is not None]
        return float(np.min(vals)) if vals else default
    if np.ndim(v) > 0:
        return float(np.min(np.asarray(v, float)))
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _bits(value, default):
    from ..flags import encode_flags

    if value is None:
        return int(default)
    if isinstance(value, str):
        value = [v.strip() for v in value.replace("|", ",").split(",") if v.strip()]
    if isinstance(value, (list, tuple, set)):
        return int(encode_flags(list(value), "pixel"))
    return int(value)


def resolve_mask(mask, shape, *, bad_bits=None, cr_bits=None, where="dq mask", nonzero_index=None):
    """Turn a dq mask into boolean images of bad, cosmic-ray, saturated and streak pixels.

    Parameters
    ----------
    mask : ndarray or None
        Boolean (True = bad) or the decoded :class:`pydriftn.flags.PixelFlag`
        bitmask (``CCDImage.mask``).
    shape : (int, int)
        Image shape the mask must have.
    bad_bits : int or list of str, optional
        Pixel flags (bits or names, e.g. ``["BAD_PIXEL", "SATURATED", "BLEED",
        "COSMIC_RAY"]``) that make a pixel unusable; default
        :data:`pydriftn.flags.DEFAULT_BAD_PIXEL_FLAGS`.
    cr_bits : int or list of str, optional
        Bits meaning "cosmic ray" (default ``PixelFlag.COSMIC_RAY``).
    nonzero_index : ndarray of int, optional
        Flat indices (ascending) of the non-zero pixels of an integer ``mask``
        when already known (``CCDImage.mask_index``): no pass over the mask.

    Returns
    -------
    dict or None
        ``bad``, ``cr``, ``saturated``, ``streak`` boolean images (None without a
        mask), and ``index``: a dict with the same keys holding the flat indices
        (ascending) of their True pixels (from the sparse nonzero values already
        found here, so that callers need no full-image pass to find them).

    Raises
    ------
    MaskError
        Wrong shape, non-integer values, NaN or negative values.
    """
    from ..flags import DEFAULT_BAD_PIXEL_FLAGS, PixelFlag

    if mask is None:
        return None
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise MaskError(f"{where}: shape {m.shape} does not match the image shape {tuple(shape)}")
    zeros = np.zeros(shape, bool)
    if m.dtype == bool:
        none = np.zeros(0, np.intp)
        return {"bad": m, "cr": zeros, "saturated": zeros, "streak": zeros,
                "index": {"bad": np.flatnonzero(m), "cr": none, "saturated": none, "streak": none}}
    if not np.issubdtype(m.dtype, np.integer):
        if not np.all(np.isfinite(m)):
            raise MaskError(f"{where}: contains NaN/inf values; an integer bitmask was expected")
        if np.any(m != np.round(m)):
            raise MaskError(f"{where}: non-integer values; an integer bitmask was expected")
        m = m.astype(np.int64)
    if np.issubdtype(m.dtype, np.signedinteger) and m.size and int(m.min()) < 0:
        raise MaskError(f"{where}: negative values; an integer bitmask was expected")
    bad_b = _bits(bad_bits, DEFAULT_BAD_PIXEL_FLAGS)
    cr_b = _bits(cr_bits, PixelFlag.COSMIC_RAY)
    # flagged pixels are a few per cent: test the bits on those only
    flat = m.reshape(-1)
    if nonzero_index is not None and m is mask:
        nz = np.asarray(nonzero_index, dtype=np.intp)
    else:
        nz = np.flatnonzero(flat != 0)  # (5x faster than on the ints)
    nz_vals = flat[nz].astype(np.int64)
    present = int(np.bitwise_or.reduce(nz_vals)) if nz_vals.size else 0

    index = {}

    def has(key, bits):
        if not present & bits:
            index[key] = nz[:0]
            return zeros
        out = np.zeros(m.size, bool)
        index[key] = nz[(nz_vals & bits) != 0]
        out[index[key]] = True
        return out.reshape(m.shape)

    return {
        "bad": has("bad", bad_b | cr_b),
        "cr": has("cr", cr_b),
        "saturated": has("saturated", int(PixelFlag.SATURATED | PixelFlag.BLEED)),
        "streak": has("streak", int(PixelFlag.STREAK)),
        "index": index,
    }


def detect_cosmic_rays(data, *, gain=1.0, readnoise=6.5, saturation=None, sigclip=6.0, objlim=30.0, niter=2):
    """Cosmic-ray mask with :func:`astroscrappy.detect_cosmics` (used when no dq mask exists).

    Settings favour speed and trails: two iterations, the median fine-structure
    mode and separable median; a high ``objlim`` (30) keeps the smooth cores of
    bright trails out of the mask (with the default 5, ~100 trail pixels per
    small CCD were flagged and faint trails lost flux).
    """
    import astroscrappy

    sat = float(saturation) if saturation is not None else 1e30
    crmask, _ = astroscrappy.detect_cosmics(
        np.asarray(data, np.float32), gain=float(gain), readnoise=float(readnoise), sigclip=sigclip,
        sigfrac=0.3, objlim=objlim, niter=niter, satlevel=sat, sepmed=True, cleantype="meanmask",
        fsmode="median", verbose=False)
    return np.asarray(crmask, bool)


def _select_catalogue(catalogue, wcs, shape, exptime, rate, margin_px):
    needed = {"star_id", "ra", "dec"}
    missing = needed - set(catalogue.columns)
    if missing:
        raise AstrometryError(f"catalogue: missing column(s) {sorted(missing)}; expected star_id, ra, dec, mag_r")
    rate = geometry.parse_drift_rate(rate)
    ra = catalogue["ra"].to_numpy(float)
    dec = catalogue["dec"].to_numpy(float)
    ok = np.isfinite(ra) & np.isfinite(dec)
    ny, nx = shape
    # cheap cone around the CCD first (a field catalogue may hold 10^5 stars of many CCDs)
    rc, dc = wcs.pixel_to_world_values((nx - 1) / 2.0, (ny - 1) / 2.0)
    scale_deg = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))))
    radius = (0.5 * math.hypot(nx, ny) + margin_px) * scale_deg * 1.2 + 2.0 * math.hypot(*rate) * exptime / 3600.0
    d1, d2 = np.radians(dec), math.radians(float(dc))
    cosd = np.sin(d1) * math.sin(d2) + np.cos(d1) * math.cos(d2) * np.cos(np.radians(ra - float(rc)))
    ok &= cosd >= math.cos(math.radians(radius))
    x0 = np.full(ra.size, np.nan)
    y0, x1, y1 = x0.copy(), x0.copy(), x0.copy()
    if ok.any():
        x0[ok], y0[ok], x1[ok], y1[ok] = geometry.trail_endpoints(wcs, ra[ok], dec[ok], exptime, rate)
    xmin, xmax = np.minimum(x0, x1), np.maximum(x0, x1)
    ymin, ymax = np.minimum(y0, y1), np.maximum(y0, y1)
    inside = ok & (xmax > -margin_px) & (xmin < nx - 1 + margin_px) & (ymax > -margin_px) & (ymin < ny - 1 + margin_px)
    return np.nonzero(inside)[0]


def _cat_mag(cat):
    for col in ("mag_vr", "mag_r", "r", "mag_g", "g"):
        if col in cat.columns:
            return cat[col].to_numpy(float)
    if "flux_r" in cat.columns:
        f = cat["flux_r"].to_numpy(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            return -2.5 * np.log10(f)
    return np.full(len(cat), np.nan)


def predict_trails(catalogue, wcs, exptime_s, drift_rate_arcsec_s, shape, *, anchor="middle", margin_px=0.0,
                   fwhm_px=4.0):
    """Start/end positions of ALL catalogue stars whose trail touches the CCD.

    Parameters
    ----------
    catalogue : pandas.DataFrame
        With ``star_id, ra, dec`` (extra columns are carried over).
    wcs : astropy.wcs.WCS
        Shutter-open WCS (the fitted one).
    exptime_s : float
    drift_rate_arcsec_s : float or (float, float)
    shape : (ny, nx)
        CCD shape.
    anchor : {'start', 'middle', 'end'}
        Which point is reported as ``x, y``.
    margin_px : float
        Keep trails within this distance outside the CCD too.
    fwhm_px : float
        PSF FWHM; a trail is TRUNCATED when a start or end lies closer than
        one FWHM to the CCD edge or beyond.

    Returns
    -------
    pandas.DataFrame
        ``star_id, ra, dec, x_start, y_start, x_end, y_end, x, y, truncated,
        on_ccd_fraction, flags`` plus the catalogue's other columns.
    """
    geometry._anchor_fraction(anchor)
    ny, nx = shape
    idx = _select_catalogue(catalogue, wcs, shape, exptime_s, drift_rate_arcsec_s, margin_px)
    cat = catalogue.iloc[idx].reset_index(drop=True)
    ra = cat["ra"].to_numpy(float)
    dec = cat["dec"].to_numpy(float)
    x0, y0, x1, y1 = geometry.trail_endpoints(wcs, ra, dec, exptime_s, drift_rate_arcsec_s)
    f = geometry._anchor_fraction(anchor)
    edge = float(fwhm_px)

    def inside(x, y, e):
        return (x >= e) & (x <= nx - 1 - e) & (y >= e) & (y <= ny - 1 - e)

    truncated = ~(inside(x0, y0, edge) & inside(x1, y1, edge))
    frac = _on_ccd_fraction(x0, y0, x1, y1, nx, ny)
    cols = {
        "star_id": cat["star_id"].to_numpy(),
        "ra": ra, "dec": dec,
        "x_start": x0, "y_start": y0, "x_end": x1, "y_end": y1,
        "x": x0 + f * (x1 - x0), "y": y0 + f * (y1 - y0),
        "truncated": truncated,
        "on_ccd_fraction": frac,
        "flags": np.where(truncated, int(TrailFlag.TRUNCATED), 0).astype(np.int64),
    }
    # the catalogue's other columns, then one DataFrame (added one by one they cost ~5 ms per CCD)
    for c in cat.columns:
        if c not in cols:
            cols[c] = cat[c].to_numpy()
    return pd.DataFrame(cols, index=pd.RangeIndex(len(cat)))


def _on_ccd_fraction(x0, y0, x1, y1, nx, ny, n=64):
    t = (np.arange(n) + 0.5) / n
    X = x0[:, None] + t[None, :] * (x1 - x0)[:, None]
    Y = y0[:, None] + t[None, :] * (y1 - y0)[:, None]
    return ((X >= -0.5) & (X <= nx - 0.5) & (Y >= -0.5) & (Y <= ny - 0.5)).mean(axis=1)


# ----------------------------------------------------------------------------- main

def solve_exposure_ccd(image, catalogue, drift_rate_arcsec_s=geometry.DEFAULT_DRIFT_RATE_ARCSEC_S, *, mask=None,
                       anchor="middle", detect_sigma=5.0, keep_sigma=None, max_pointing_error_arcsec=60.0,
                       max_rotation_deg=0.2, sip_order=None, max_sip_order=3, bad_bits=None, cr_bits=None,
                       detect_cosmics_without_mask=True, n_bright=120, expnum=None, ccd=None,
                       wcs=None, exptime_s=None, fwhm_px=None, gain=None, saturation=None,
                       min_snr_position=20.0, max_position_fits=200,
                       position_estimator="moment", background_row_step=2):
    """Find every trail on a drift CCD, identify its star and re-fit the WCS.

    Parameters
    ----------
    image : CCDImage-like
        With ``data`` (float ADU, sky kept), ``header``, ``wcs`` (header WCS)
        and optionally ``info`` (gain, read noise, saturation, pixel scale,
        EXPTIME, EXPNUM, FWHM) and ``mask``.
    catalogue : pandas.DataFrame
        Reference catalogue with ``star_id, ra, dec`` and a magnitude
        (``mag_r``, else ``mag_g``/``flux_r``).
    drift_rate_arcsec_s : float or (float, float)
        Drift-rate vector (east, north) arcsec/s.
    mask : ndarray, optional
        dq mask: boolean (True = bad) or decoded integer bitmask (see
        ``bad_bits``, ``cr_bits``). Default: ``image.mask`` if present; with
        no mask and ``detect_cosmics_without_mask``, cosmic rays are found
        with astroscrappy.
    anchor : {'start', 'middle', 'end'}
        Trail point reported as ``x, y``.
    detect_sigma : float
        Matched-filter threshold (S/N) for candidates and for UNMATCHED rows.
    keep_sigma : float, optional
        S/N of its joint-fit flux a catalogue star needs to be reported
        (default ``detect_sigma``).
    bad_bits, cr_bits : int or list of str, optional
        Pixel flags (:class:`pydriftn.flags.PixelFlag` bits or names) that make
        a pixel unusable / mean "cosmic ray" (defaults:
        ``DEFAULT_BAD_PIXEL_FLAGS``, ``COSMIC_RAY``); see :func:`resolve_mask`.
    detect_cosmics_without_mask : bool
        Without a dq mask, find cosmic rays with astroscrappy (slow: ~1 s per
        small CCD) and dead/hot column segments from the image.
    max_pointing_error_arcsec, max_rotation_deg : float
        Search range of the matching.
    sip_order : int, optional
        SIP order of the fitted WCS; ``None`` chooses up to ``max_sip_order`` by BIC.
    n_bright : int
        Detections used in the vote; the brightest ``1.25 n_bright`` (at least
        150) candidates are fitted for the matching, the first WCS and the
        line-spread function (120: on the simulated full CCDs and the 60"/0.2 deg
        pointing-error runs the matches, WCS and identifications were those
        of 200, with 100 fewer trail fits).
    min_snr_position : float
        Unblended, untruncated trails of at least this S/N get a measured
        position (``x_meas``, ``y_meas``) and may enter the WCS fit ...
    max_position_fits : int
        ... at most this many, the most significant (200: on full simulated
        CCDs the WCS of the 200 brightest matched that of 400 within 0.0003"
        rms against the truth, and the position fits cost half as much).
    position_estimator : {'moment', 'edges'}
        Along-track position of a measured trail: the first moment of its line
        density (the image position averaged over the exposure) or halfway
        between its fitted ends (sensitive to the image jitter at shutter
        open and close).
    background_row_step : int
        The background and its rms are estimated from every this-th row of the
        2x2-binned image (see :func:`.detect.estimate_background`; 1 = all).
    expnum, ccd, wcs, exptime_s, fwhm_px, gain, saturation : optional
        Override values read from ``image``.

    Returns
    -------
    AstrometryResult

    Raises
    ------
    AstrometryError
        No catalogue star on the CCD, no consistent match (catalogue of
        another field), or too few stars for the WCS fit.
    MaskError
        The mask does not fit the image or is not an integer bitmask.
    """
    t_start = time.perf_counter()
    timings = {}
    diag = {}
    rate = geometry.parse_drift_rate(drift_rate_arcsec_s)
    geometry._anchor_fraction(anchor)
    keep_sigma = detect_sigma if keep_sigma is None else keep_sigma
    data = np.asarray(image.data)
    if data.ndim != 2:
        raise AstrometryError(f"image data must be 2-D, got shape {data.shape}")
    shape = data.shape
    ny, nx = shape
    header = getattr(image, "header", None) or {}
    hwcs = wcs if wcs is not None else getattr(image, "wcs", None)
    if hwcs is None:
        raise AstrometryError("image has no WCS")
    hwcs = hwcs.celestial if hasattr(hwcs, "celestial") else hwcs
    if hwcs.pixel_shape is None:
        hwcs = hwcs.deepcopy()
        hwcs.pixel_shape = (nx, ny)
    exptime = exptime_s if exptime_s is not None else _info(image, "exptime", header.get("EXPTIME"))
    if exptime is None or not float(exptime) > 0:
        raise AstrometryError("EXPTIME missing or not positive: the trail length cannot be computed")
    exptime = float(exptime)
    expnum = expnum if expnum is not None else _info(image, "expnum", header.get("EXPNUM", -1))
    ccd = ccd if ccd is not None else (getattr(image, "ccd", None) or _info(image, "ccd", None)
                                       or header.get("EXTNAME") or header.get("DETPOS") or "")
    gain = _scalar(gain if gain is not None else _info(image, "gain", header.get("GAINA")), 1.0)
    rdnoise_e = _scalar(_info(image, "read_noise", _info(image, "rdnoise", header.get("RDNOISEA"))), 6.5)
    saturation = _min_scalar(saturation if saturation is not None else
                             _info(image, "saturation", header.get("SATURATE")), None)
    pixscale = float(np.sqrt(abs(np.linalg.det(hwcs.pixel_scale_matrix)))) * 3600.0
    fwhm_from_header = True
    if fwhm_px is None:
        fwhm_px = _scalar(_info(image, "fwhm_px", header.get("FWHM")), None)
        if fwhm_px is None or not fwhm_px > 0:
            fwhm_from_header = False
            fwhm_px = 1.0 / pixscale
    fwhm_px = float(fwhm_px) if fwhm_px and fwhm_px > 0 else 1.0 / pixscale
    sigma0 = fwhm_px / trailfit.FWHM_PER_SIGMA

    # -- masks
    if mask is None:
        mask = getattr(image, "mask", None)
    # the flagged pixels' indices found when the image's mask was decoded
    known_nz = None
    if mask is not None and mask is getattr(image, "mask", None):
        known_nz = getattr(image, "mask_index", None)
    masks = resolve_mask(mask, shape, bad_bits=bad_bits, cr_bits=cr_bits,
                         where=f"dq mask of {getattr(image, 'path', '')}[{ccd}]", nonzero_index=known_nz)
    bad = cr = None
    dq_sat = dq_streak = None
    # flat indices of the flagged pixels, kept while the masks are those of the dq mask
    index = {}
    if masks is not None:
        bad, cr, dq_sat, dq_streak = masks["bad"], masks["cr"], masks["saturated"], masks["streak"]
        index = dict(masks["index"])
    t = time.perf_counter()
    if bad is None:
        if detect_cosmics_without_mask:
            cr = detect_cosmic_rays(data, gain=gain, readnoise=rdnoise_e, saturation=saturation)
            diag["cosmic_rays_from"] = "astroscrappy"
        else:
            cr = np.zeros(shape, bool)
            diag["cosmic_rays_from"] = "none"
        bad = cr.copy()
    else:
        diag["cosmic_rays_from"] = "dq mask"
    timings["cosmic_rays"] = time.perf_counter() - t
    # min and max are finite only when every pixel is (NaN propagates); the max is reused below
    dmax = float(data.max())
    if not (math.isfinite(dmax) and math.isfinite(float(data.min()))):
        nonfinite = ~np.isfinite(data)
        bad = bad | nonfinite
        index.pop("bad", None)
        data = np.where(nonfinite, 0.0, data)
        dmax = float(data.max())
    sat_pix = dq_sat
    if saturation is not None and dmax >= saturation:
        above = data >= saturation
        sat_pix = above if sat_pix is None else (sat_pix | above)
        bad = bad | above
        index.pop("bad", None)
        index.pop("saturated", None)
    if bad.all():
        raise AstrometryError("every pixel is masked")
    t_det = time.perf_counter()

    # -- geometry and detection
    geo = geometry.trail_geometry(hwcs, exptime, rate)
    diag["header_geometry"] = dict(direction=geo.direction, length_px=geo.length_px, angle_deg=geo.angle_deg)
    amp_boundary = None
    info = getattr(image, "info", None)
    if info is not None and getattr(info, "amp_boundary", None) is not None:
        amp_boundary = int(info.amp_boundary)
    elif header.get("GAINB") is not None:
        amp_boundary = nx // 2
    sub, rms_map, grms, sub_b2 = detect.estimate_background(data, bad, amp_boundary=amp_boundary,
                                                            return_binned=True, row_step=background_row_step,
                                                            bad_index=index.get("bad"))
    if masks is None:
        # no dq mask: dead / hot column segments from the image itself
        bcols = detect.find_bad_columns(sub, grms)
        diag["n_bad_column_pixels"] = int(bcols.sum())
        if bcols.any():
            bad = bad | bcols
            sub, rms_map, grms, sub_b2 = detect.estimate_background(data, bad, amp_boundary=amp_boundary,
                                                                    return_binned=True,
                                                                    row_step=background_row_step)
    timings["background"] = time.perf_counter() - t_det
    t = time.perf_counter()
    snr, fbin = detect.matched_filter_snr(sub, rms_map, geo.direction, geo.length_px, sigma0, return_binning=True,
                                               binned2=sub_b2)
    streak_mask_b, streaks = detect.find_streaks(snr, geo.direction, geo.length_px,
                                                 threshold=max(3.0, 0.6 * detect_sigma), binning=fbin)
    streak_mask = None
    if streak_mask_b is not None:
        streak_mask = np.zeros(shape, bool)
        up = np.repeat(np.repeat(streak_mask_b, fbin[0], axis=0), fbin[1], axis=1)
        up = up[: shape[0], : shape[1]]
        streak_mask[: up.shape[0], : up.shape[1]] = up
        log.warning("%s: %d satellite/aircraft streak(s) masked", ccd, len(streaks))
    diag["streaks"] = streaks
    cx, cy, cpk = detect.find_candidates(snr, geo.direction, geo.length_px, sigma0, threshold=detect_sigma,
                                         exclude=streak_mask_b, binning=fbin)
    timings["matched_filter"] = time.perf_counter() - t
    diag["n_candidates"] = int(cx.size)
    if streak_mask is not None:
        index.pop("streak", None)
    if dq_streak is not None and dq_streak.any():
        streak_mask = dq_streak if streak_mask is None else (streak_mask | dq_streak)
    fit_bad = bad if streak_mask is None else (bad | streak_mask)
    t = time.perf_counter()

    # -- fit candidates; measure the PSF width on bright ones
    grid = trailfit.make_grid(geo.direction, geo.length_px, sigma0)
    def rms_at(x, y):
        iy = np.clip(np.rint(y).astype(int) // 2, 0, rms_map.shape[0] - 1)
        ix = np.clip(np.rint(x).astype(int) // 2, 0, rms_map.shape[1] - 1)
        return rms_map[iy, ix]
    # only the brightest candidates are fitted here (matching and the first WCS need no
    # more); the rest are either catalogue stars (fitted jointly later) or unmatched
    cx_all, cy_all = cx, cy
    order_pk = np.argsort(-cpk, kind="stable")
    top = order_pk[: max(int(1.25 * n_bright), 150)]
    bright = order_pk[:80]
    if bright.size >= 5 and not fwhm_from_header:  # no seeing in the header: measure it first
        bfit = trailfit.fit_trails(sub, cx[bright], cy[bright], grid, rms=rms_at(cx[bright], cy[bright]),
                                   gain=gain, bad=fit_bad, fit_sigma=True, n_iter=4)
        okb = bfit["ok"] & bfit["start_visible"] & bfit["end_visible"]
        s_med = float(np.median(bfit["sigma_px"][okb])) if okb.sum() >= 5 else sigma0
        if np.isfinite(s_med) and abs(s_med / sigma0 - 1) > 0.03:
            sigma0 = s_med
            grid = trailfit.make_grid(geo.direction, geo.length_px, sigma0)
    cx, cy = cx[top], cy[top]
    cand = trailfit.fit_trails(sub, cx, cy, grid, rms=rms_at(cx, cy), gain=gain, bad=fit_bad, n_iter=4)
    c_snr = cand["flux"] / np.maximum(cand["flux_err"], 1e-12)
    # line-spread function (with wings) from bright, isolated, unsaturated trails
    lsf = None
    iso_c = ~_near_catalogue(cand["x_mid"], cand["y_mid"], cand["x_mid"], cand["y_mid"], grid, exclude_self=True)
    lb = np.nonzero(cand["ok"] & (c_snr > 50) & cand["start_visible"] & cand["end_visible"] & iso_c)[0]
    if sat_pix is not None and lb.size:
        lb = lb[~_touches(sat_pix, cand["x_mid"][lb], cand["y_mid"][lb], grid)]
    if lb.size >= 5:
        # (the 50 most significant: on full simulated CCDs the profile's FWHM is within 0.3 % of that of the
        # 100 most significant, and the fit's cost grows with the stack)
        lb = lb[np.argsort(-c_snr[lb])[:50]]
        lsf = trailfit.measure_lsf(sub, grid, cand["x_mid"][lb], cand["y_mid"][lb], bad=fit_bad)
    diag["lsf"] = None if lsf is None else {"weights": [float(v) for v in lsf[0]],
                                            "sigmas_px": [float(v) for v in lsf[1]]}
    if lsf is not None:
        # the Gaussian width used by the position fits: that of the measured profile's FWHM
        qq = np.linspace(0.0, 6.0 * float(np.max(lsf[1])), 2001)
        prof = sum(w * np.exp(-0.5 * (qq / sk) ** 2) / sk for w, sk in zip(*lsf))
        half = qq[np.argmax(prof <= 0.5 * prof[0])]
        if half > 0:
            sigma0 = float(2.0 * half / trailfit.FWHM_PER_SIGMA)
    diag["psf_sigma_px"] = sigma0
    diag["fwhm_px"] = sigma0 * trailfit.FWHM_PER_SIGMA
    good_c = cand["ok"] & (c_snr >= detect_sigma)
    timings["candidate_fit"] = time.perf_counter() - t

    # -- catalogue and matching
    t = time.perf_counter()
    if catalogue is None or len(catalogue) == 0:
        raise AstrometryError(f"{ccd}: the catalogue is empty")
    margin = max_pointing_error_arcsec / pixscale + 2.0 * math.radians(max_rotation_deg) * math.hypot(nx, ny) + 10
    cidx = _select_catalogue(catalogue, hwcs, shape, exptime, rate, margin)
    if cidx.size == 0:
        raise AstrometryError(
            f"{ccd}: no catalogue star falls on this CCD (within {margin:.0f} px) with the header WCS; "
            "is the catalogue from this field?")
    cat = catalogue.iloc[cidx].reset_index(drop=True)
    cat_mag = _cat_mag(cat)
    cra = cat["ra"].to_numpy(float)
    cdec = cat["dec"].to_numpy(float)
    hx0, hy0, hx1, hy1 = geometry.trail_endpoints(hwcs, cra, cdec, exptime, rate)
    cat_mid = np.c_[0.5 * (hx0 + hx1), 0.5 * (hy0 + hy1)]
    full = good_c & cand["start_visible"] & cand["end_visible"]
    det_xy = np.c_[cand["x_mid"], cand["y_mid"]]
    with np.errstate(divide="ignore", invalid="ignore"):
        det_mag = -2.5 * np.log10(np.where(cand["flux"] > 0, cand["flux"], np.nan))
    bidx = np.nonzero(full)[0]
    bidx = bidx[np.argsort(-cand["flux"][bidx])[:n_bright]]
    if bidx.size < 3:
        raise AstrometryError(f"{ccd}: only {bidx.size} trails detected at S/N >= {detect_sigma}; cannot match")
    mag_for_rank = np.where(np.isfinite(cat_mag), cat_mag, 99.0)
    n_cat = int(min(len(cat), max(3, round(bidx.size * 1.5 * (1 + 2 * margin / min(nx, ny))))))
    cb = np.argsort(mag_for_rank, kind="stable")[:n_cat]
    centre = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    vote = vote_transform(det_xy[bidx], cat_mid[cb], centre, max_shift_px=margin,
                          max_rotation_deg=max_rotation_deg)
    diag["vote"] = dict(rotation_deg=vote.rotation_deg, shift_px=vote.shift_px, peak=vote.peak,
                        background=vote.background, significance=vote.significance)
    gi = np.nonzero(good_c)[0]
    md, mc, affine, minfo = refine_matches(det_xy[gi], det_mag[gi], cat_mid, cat_mag, vote, centre,
                                           det_err=np.hypot(cand["x_err"], cand["y_err"])[gi])
    md = gi[md]
    diag["match"] = dict(minfo, n_matched_candidates=int(md.size))
    timings["match"] = time.perf_counter() - t

    # -- first WCS fit: middles vs sky moved by half the drift
    t = time.perf_counter()
    half = 0.5 * exptime
    use = full[md] & (np.abs(cand["length_px"][md] - geo.length_px) < 3 * cand["length_err"][md] + 1.0)
    mra, mdec = geometry.offset_sky(cra[mc], cdec[mc], rate[0] * half, rate[1] * half)
    ref_sky = hwcs.pixel_to_world_values(*apply_affine(np.linalg.inv(np.r_[affine, [[0, 0, 1]]])[:2], centre[None])[0])
    fit1 = fit_tan_sip(cand["x_mid"][md][use], cand["y_mid"][md][use], mra[use], mdec[use],
                       sigma_px=np.hypot(cand["x_err"], cand["y_err"])[md][use], ref_pixel=centre,
                       ref_sky=ref_sky, order=1 if sip_order is None else sip_order, shape=shape,
                       ref_cd=_rotated_cd(hwcs, vote.rotation_deg))
    timings["wcs_fit_1"] = time.perf_counter() - t

    # -- joint fit of all catalogue stars on the CCD, at positions predicted by the WCS
    wcs_cur = fit1.wcs
    fit2 = fit1
    for it in range(2):
        t = time.perf_counter()
        geo_c = geometry.trail_geometry(wcs_cur, exptime, rate)
        grid = trailfit.make_grid(geo_c.direction, geo_c.length_px, sigma0, psf=lsf)
        pidx = _select_catalogue(cat, wcs_cur, shape, exptime, rate, 2.0 * fwhm_px)
        x0p, y0p, x1p, y1p = geometry.trail_endpoints(wcs_cur, cra[pidx], cdec[pidx], exptime, rate)
        px, py = 0.5 * (x0p + x1p), 0.5 * (y0p + y1p)
        zp = minfo["zero_point"]
        with np.errstate(over="ignore", invalid="ignore"):
            h_zp = np.nan_to_num(10 ** (-0.4 * (cat_mag[pidx] - zp)) / grid.length_p, nan=0.0)
        noise_trail = grms * math.sqrt(2 * math.sqrt(math.pi) * sigma0 * grid.length_p)
        pred_snr = h_zp * grid.length_p / max(noise_trail, 1e-9)
        # stars far below the noise are left to forced extraction (predict_trails)
        fit_sel = np.nonzero(pred_snr >= 1.0)[0]
        fx, fy = px[fit_sel], py[fit_sel]
        rms_f = rms_at(fx, fy)
        hj, hj_err, blend, templ, local_snr = trailfit.solve_fluxes(sub, grid, fx, fy, rms=rms_f, gain=gain,
                                                                    bad=fit_bad, return_templates=True)
        j_snr = hj / np.maximum(hj_err, 1e-12)
        timings[f"flux_solve_{it + 1}"] = time.perf_counter() - t
        # positions of the significant ones, with their neighbours' models subtracted
        t = time.perf_counter()
        # measured positions for the clean, significant trails (the WCS needs no more than
        # the best couple of hundred: its error falls as 1/sqrt(N), less for the fainter ones added,
        # while the cost grows as N)
        fxs, fxe = fx - 0.5 * geo_c.displacement_px[0], fx + 0.5 * geo_c.displacement_px[0]
        fys, fye = fy - 0.5 * geo_c.displacement_px[1], fy + 0.5 * geo_c.displacement_px[1]
        ins = ((np.minimum(fxs, fxe) >= fwhm_px) & (np.maximum(fxs, fxe) <= nx - 1 - fwhm_px)
               & (np.minimum(fys, fye) >= fwhm_px) & (np.maximum(fys, fye) <= ny - 1 - fwhm_px))
        pos_sel = np.nonzero((j_snr >= min_snr_position) & (blend < 0.1) & ins)[0]
        pos_sel = np.sort(pos_sel[np.argsort(-j_snr[pos_sel], kind="stable")[:max_position_fits]])
        # render only the trails that reach a trail to be fitted (position fits, unmatched candidates)
        near = _near_catalogue(cx_all, cy_all, fx[j_snr >= 1], fy[j_snr >= 1], grid)
        ucand = np.nonzero(~near)[0]
        if grid.snapped:
            # the neighbours' models on each fitted trail's grid, pair by pair (no full-size rendering)
            # (the unit templates scaled by the fluxes only where they overlap a target)
            src = np.nonzero(hj > 0)[0]
            self_src = np.full(fx.size, -1, np.intp)
            self_src[src] = np.arange(src.size)
            nb_pos = trailfit.neighbour_models(grid, fx[pos_sel], fy[pos_sel], fx[src], fy[src], templ,
                                               self_index=self_src[pos_sel], scale=hj[src], model_index=src)
            nb_u = trailfit.neighbour_models(grid, cx_all[ucand], cy_all[ucand], fx[src], fy[src], templ,
                                             scale=hj[src], model_index=src)
            pf = trailfit.fit_trails(sub, fx[pos_sel], fy[pos_sel], grid, rms=rms_f[pos_sel], gain=gain,
                                     bad=fit_bad, neighbours=nb_pos, use_moment=position_estimator == "moment",
                                     n_iter=3)
            u_model = dict(neighbours=nb_u)
        else:
            need = _reaching(fx, fy, np.r_[fx[pos_sel], cx_all[ucand]], np.r_[fy[pos_sel], cy_all[ucand]], grid)
            model = trailfit.render_trails(shape, grid, fx[need], fy[need], np.maximum(hj[need], 0.0),
                                           templates=templ[need])
            pf = trailfit.fit_trails(sub, fx[pos_sel], fy[pos_sel], grid, rms=rms_f[pos_sel], gain=gain,
                                     bad=fit_bad, model_image=model,
                                     own_flux={"x_mid": fx[pos_sel], "y_mid": fy[pos_sel],
                                               "h": np.maximum(hj[pos_sel], 0.0),
                                               "model": templ[pos_sel] * np.maximum(hj[pos_sel], 0.0)[:, None, None]},
                                     use_moment=position_estimator == "moment", n_iter=3)
            u_model = dict(model_image=model, own_flux={"x_mid": cx_all[ucand], "y_mid": cy_all[ucand],
                                                        "h": np.zeros(ucand.size)})
        moved = np.hypot(pf["x_mid"] - fx[pos_sel], pf["y_mid"] - fy[pos_sel])
        perr = np.hypot(pf["x_err"], pf["y_err"])
        pos_ok = pf["ok"] & (moved < np.maximum(1.0, 5 * perr))
        full_p = pf["start_visible"] & pf["end_visible"]
        len_ok = np.abs(pf["length_px"] - geo_c.length_px) < 3 * pf["length_err"] + 0.5
        wuse = pos_ok & full_p & len_ok & (blend[pos_sel] < 0.1)
        timings[f"position_fit_{it + 1}"] = time.perf_counter() - t
        t = time.perf_counter()
        sel_cat = pidx[fit_sel][pos_sel]
        wra, wdec = geometry.offset_sky(cra[sel_cat], cdec[sel_cat], rate[0] * half, rate[1] * half)
        fit2 = fit_tan_sip(pf["x_mid"][wuse], pf["y_mid"][wuse], wra[wuse], wdec[wuse], sigma_px=perr[wuse],
                           ref_pixel=centre, ref_sky=wcs_cur.pixel_to_world_values(*centre), order=sip_order,
                           max_order=max_sip_order, shape=shape, ref_cd=wcs_cur.pixel_scale_matrix)
        timings[f"wcs_fit_{it + 2}"] = time.perf_counter() - t
        wcs_cur = fit2.wcs
        if fit2.sip_order <= 1 and it == 0 and fit1.rms_arcsec < 3 * fit2.rms_arcsec + 0.05:
            # the order-1 prediction was already good: one pass is enough
            break
    wcs_fit = fit2.wcs
    geo2 = geometry.trail_geometry(wcs_fit, exptime, rate)
    in_fit = np.zeros(fit_sel.size, bool)
    in_fit[pos_sel[np.nonzero(wuse)[0][fit2.used]]] = True
    diag["joint_fit_table"] = pd.DataFrame({
        "star_id": cat["star_id"].to_numpy()[pidx[fit_sel]], "x_pred": fx, "y_pred": fy, "h": hj, "snr": j_snr,
        "blend": blend, "in_wcs_fit": in_fit, "pred_snr": pred_snr[fit_sel], "local_snr": local_snr,
    })

    # -- unmatched candidates: what the catalogue model does not explain
    t = time.perf_counter()
    # fitted on the data minus the model of all catalogue trails
    ufit = trailfit.fit_trails(sub, cx_all[ucand], cy_all[ucand], grid,
                               rms=rms_at(cx_all[ucand], cy_all[ucand]), gain=gain, bad=fit_bad, **u_model)
    u_snr = ufit["flux"] / np.maximum(ufit["flux_err"], 1e-12)
    ukeep = ufit["ok"] & (u_snr >= detect_sigma)
    ukeep &= ~_dedup(ufit["x_mid"], ufit["y_mid"], u_snr, grid)
    # a fit that slid onto a catalogue trail (e.g. the residual of a trail cut by the CCD edge,
    # whose matched-filter peak lies off its middle) is not a new source
    ukeep &= ~_near_catalogue(ufit["x_mid"], ufit["y_mid"], fx[j_snr >= 1], fy[j_snr >= 1], grid)
    timings["unmatched"] = time.perf_counter() - t

    # -- assemble the table: catalogue stars with a significant flux
    t = time.perf_counter()
    # a star whose own flux is not separable from an overlapping neighbour (e.g. two stars
    # < 1 FWHM apart) is still reported when the catalogue predicts it detectable and the
    # blend is significant: the row carries the joint-fit flux and the BLENDED flag
    unresolved = (blend >= 0.5) & (local_snr >= keep_sigma) & (pred_snr[fit_sel] >= keep_sigma)
    keep = (j_snr >= keep_sigma) | unresolved
    sel_all = pidx[fit_sel]
    # positions of catalogue stars: predicted by the fitted WCS (jitter-free, better than any
    # single-trail measurement); the measured middles are reported beside them
    xs, ys, xe, ye = geometry.trail_endpoints(wcs_fit, cra[sel_all], cdec[sel_all], exptime, rate)
    # error of a position predicted by the fitted WCS: rms per axis x sqrt(parameters / stars)
    n_par = 2 * len([1 for k in range(max(fit2.sip_order, 1) + 1) for _ in range(k + 1)])
    perr_w = fit2.rms_arcsec / math.sqrt(2) / pixscale * math.sqrt(n_par / max(fit2.n_used, 1))
    nf = fit_sel.size
    x_meas = np.full(nf, np.nan)
    y_meas = np.full(nf, np.nan)
    x_meas_err = np.full(nf, np.nan)
    y_meas_err = np.full(nf, np.nan)
    measured = np.zeros(nf, bool)
    length = np.full(nf, np.nan)
    length_err = np.full(nf, np.nan)
    ps = pos_sel[pos_ok]
    x_meas[ps] = pf["x_mid"][pos_ok]
    y_meas[ps] = pf["y_mid"][pos_ok]
    x_meas_err[ps] = pf["x_err"][pos_ok]
    y_meas_err[ps] = pf["y_err"][pos_ok]
    measured[ps] = True
    length[pos_sel] = pf["length_px"]
    length_err[pos_sel] = pf["length_err"]
    ny_, nx_ = shape
    edge = fwhm_px
    inside0 = (xs >= edge) & (xs <= nx_ - 1 - edge) & (ys >= edge) & (ys <= ny_ - 1 - edge)
    inside1 = (xe >= edge) & (xe <= nx_ - 1 - edge) & (ye >= edge) & (ye <= ny_ - 1 - edge)
    trunc = ~(inside0 & inside1)
    f_anchor = geometry._anchor_fraction(anchor)
    flags = np.where(trunc, int(TrailFlag.TRUNCATED), 0).astype(np.int64)
    flags |= np.where(blend >= 0.1, int(TrailFlag.BLENDED | TrailFlag.DEBLENDED), 0)
    bad_len = np.isfinite(length) & ~trunc & (np.abs(length - geo2.length_px) > 3 * length_err + 0.5)
    flux = hj * grid.length_p
    sep = np.hypot(x_meas - 0.5 * (xs + xe), y_meas - 0.5 * (ys + ye)) * pixscale
    rows = {
        "star_id": cat["star_id"].to_numpy()[sel_all], "ra": cra[sel_all], "dec": cdec[sel_all],
        "x_start": xs, "y_start": ys, "x_end": xe, "y_end": ye,
        "x": xs + f_anchor * (xe - xs), "y": ys + f_anchor * (ye - ys),
        "x_err": np.full(nf, perr_w), "y_err": np.full(nf, perr_w),
        "x_meas": x_meas + (f_anchor - 0.5) * (xe - xs), "y_meas": y_meas + (f_anchor - 0.5) * (ye - ys),
        "x_meas_err": x_meas_err, "y_meas_err": y_meas_err,
        "flux_adu": flux, "flux_err_adu": hj_err * grid.length_p, "snr": j_snr, "mag_cat": cat_mag[sel_all],
        "matched": np.ones(nf, bool), "match_sep_arcsec": sep,
        "flags": flags, "truncated": trunc, "blended": blend >= 0.1, "in_wcs_fit": in_fit,
        "position_measured": measured, "bad_length": bad_len,
        "length_px": length, "length_err_px": length_err,
    }
    rows = {k: np.asarray(v)[keep] for k, v in rows.items()}
    urows = _rows_from_fit(ufit, ukeep, geo2, anchor)
    n_u = int(ukeep.sum())
    urows["star_id"] = np.full(n_u, -1, dtype=np.int64)
    ura, udec = wcs_fit.pixel_to_world_values(urows["x_start"], urows["y_start"])
    urows["ra"] = np.asarray(ura, float)
    urows["dec"] = np.asarray(udec, float)
    urows["mag_cat"] = np.full(n_u, np.nan)
    urows["matched"] = np.zeros(n_u, bool)
    urows["match_sep_arcsec"] = np.full(n_u, np.nan)
    urows["flags"] |= int(TrailFlag.UNMATCHED)
    urows["blended"] = np.zeros(n_u, bool)
    urows["in_wcs_fit"] = np.zeros(n_u, bool)
    urows["position_measured"] = np.ones(n_u, bool)
    # the table is built once, from numpy columns
    cols = {k: np.concatenate([np.asarray(rows[k]), np.asarray(urows[k])]) for k in rows}
    ntab = cols["star_id"].size
    cols["expnum"] = np.full(ntab, int(expnum) if expnum is not None else -1, dtype=np.int64)
    cols["ccd"] = np.full(ntab, str(ccd), dtype=object)
    # per-trail cosmic-ray and mask counts, saturation, streaks
    _pixel_counts(cols, cr, bad, sat_pix, streak_mask, geo2, sigma0, index=index)
    order = np.lexsort((cols["x_start"], cols["star_id"]))
    table = pd.DataFrame({k: cols[k][order] for k in TRAIL_COLUMNS})
    timings["table"] = time.perf_counter() - t
    timings["detection_to_wcs"] = time.perf_counter() - t_det
    timings["total"] = time.perf_counter() - t_start
    diag.update(
        timings=timings, n_catalogue_on_ccd=int(pidx.size), n_fitted=int(fit_sel.size),
        n_trails=int(len(table)), n_unmatched=n_u, sip_order=fit2.sip_order, bic=fit2.bic,
        rms_arcsec_first=fit1.rms_arcsec, geometry=dict(direction=geo2.direction, length_px=geo2.length_px,
                                                        angle_deg=geo2.angle_deg, sense=_sense(geo2)),
        pixel_scale_arcsec=pixscale, background_rms_adu=grms, gain=gain,
    )
    log.info("%s exp %s: %d trails (%d unmatched), WCS rms %.3f\" from %d stars, SIP order %d, %.2f s",
             ccd, expnum, len(table), n_u, fit2.rms_arcsec, fit2.n_used, fit2.sip_order, timings["total"])
    return AstrometryResult(trails=table, wcs=wcs_fit, rms_arcsec=fit2.rms_arcsec, n_used=fit2.n_used,
                            cr_mask=cr, bad_mask=fit_bad, geometry=geo2, diagnostics=diag,
                            cr_index=index.get("cr"), bad_index=index.get("bad") if fit_bad is bad else None)


def _rotated_cd(wcs, rot_deg):
    """CD matrix of ``wcs`` for an image rotated by ``rot_deg`` (pixel frame) about the reference pixel."""
    th = math.radians(rot_deg)
    R = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    return wcs.pixel_scale_matrix @ R.T


def _sense(geo):
    ux, uy = geo.direction
    if abs(ux) >= abs(uy):
        return "+x" if ux > 0 else "-x"
    return "+y" if uy > 0 else "-y"


def _neighbours(x, y, h, grid):
    """True where another trail (>= 1 % of the flux) overlaps a trail's fit window."""
    from scipy.spatial import cKDTree

    n = x.size
    out = np.zeros(n, bool)
    if n < 2:
        return out
    ux, uy = grid.u
    vx, vy = -uy, ux
    a = x * ux + y * uy
    c = x * vx + y * vy
    reach_a = grid.length_px + 3 * grid.sigma_px
    reach_c = 2.0 * grid.q_off[-1]
    tree = cKDTree(np.c_[a / reach_a, c / reach_c])
    pairs = tree.query_pairs(r=1.0, p=np.inf, output_type="ndarray")
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        hi, hj = h[i], h[j]
        out[i[hj > 0.01 * hi]] = True
        out[j[hi > 0.01 * hj]] = True
    return out


def _near_catalogue(x, y, cx, cy, grid, *, exclude_self=False, scale=1.0):
    """True where a position lies on another trail (within half a trail along, 1.5 FWHM across)."""
    from scipy.spatial import cKDTree

    out = np.zeros(np.size(x), bool)
    if np.size(x) == 0 or np.size(cx) == 0:
        return out
    ux, uy = grid.u
    vx, vy = -uy, ux
    ra_ = scale * (0.5 * grid.length_px + 2 * grid.sigma_px)
    rc = scale * 1.5 * trailfit.FWHM_PER_SIGMA * grid.sigma_px
    tree = cKDTree(np.c_[(cx * ux + cy * uy) / ra_, (cx * vx + cy * vy) / rc])
    k = 2 if exclude_self else 1
    d, _ = tree.query(np.c_[(x * ux + y * uy) / ra_, (x * vx + y * vy) / rc], k=k, p=np.inf,
                      distance_upper_bound=1.0)
    if exclude_self:
        d = d[:, 1]
    return np.isfinite(d)


def _reaching(x, y, tx, ty, grid):
    """True for trails at (x, y) whose model reaches the fit window of any target at (tx, ty)."""
    from scipy.spatial import cKDTree

    out = np.zeros(np.size(x), bool)
    if np.size(x) == 0 or np.size(tx) == 0:
        return out
    ux, uy = grid.u
    smax = float(np.max(grid.mixture[1]))
    rp = grid.length_px + 2 * (grid.p_off[-1] - 0.5 * grid.length_p) + 4 * smax
    rq = 2 * grid.q_off[-1] + 4 * smax
    a = lambda xx, yy: np.c_[(xx * ux + yy * uy) / rp, (-xx * uy + yy * ux) / rq]  # noqa: E731
    d, _ = cKDTree(a(tx, ty)).query(a(x, y), p=np.inf, distance_upper_bound=1.0)
    return np.isfinite(d)


def _touches(mask, x, y, grid):
    """True where a trail's footprint (grid window) holds a pixel of ``mask``."""
    xa, ya = np.rint(x), np.rint(y)
    P = grid.p_off[None, :, None]
    Q = grid.q_off[None, None, :]
    ny, nx = mask.shape
    X = np.clip(np.rint(xa[:, None, None] + P * grid.ep[0] + Q * grid.eq[0]).astype(np.intp), 0, nx - 1)
    Y = np.clip(np.rint(ya[:, None, None] + P * grid.ep[1] + Q * grid.eq[1]).astype(np.intp), 0, ny - 1)
    return mask[Y, X].any(axis=(1, 2))


def _dedup(x, y, snr, grid):
    """True for fits that duplicate a higher-S/N fit of the same trail."""
    from scipy.spatial import cKDTree

    n = np.size(x)
    dup = np.zeros(n, bool)
    if n < 2:
        return dup
    ux, uy = grid.u
    a = (x * ux + y * uy) / (0.5 * grid.length_px)
    c = (-x * uy + y * ux) / (2.0 * grid.sigma_px)
    pairs = cKDTree(np.c_[a, c]).query_pairs(r=1.0, p=np.inf, output_type="ndarray")
    for i, j in pairs[np.argsort(-np.maximum(snr[pairs[:, 0]], snr[pairs[:, 1]]))] if len(pairs) else []:
        if dup[i] or dup[j]:
            continue
        dup[j if snr[i] >= snr[j] else i] = True
    return dup


def _rows_from_fit(fit, keep, geo, anchor):
    f = geometry._anchor_fraction(anchor)
    dx, dy = geo.displacement_px
    xm = fit["x_mid"][keep]
    ym = fit["y_mid"][keep]
    xs = xm - 0.5 * dx
    ys = ym - 0.5 * dy
    trunc = ~(fit["start_visible"][keep] & fit["end_visible"][keep])
    flux = fit["flux"][keep]
    ferr = fit["flux_err"][keep]
    flags = np.where(trunc, int(TrailFlag.TRUNCATED), 0).astype(np.int64)
    bad_len = (~trunc) & (np.abs(fit["length_px"][keep] - geo.length_px) > 3 * fit["length_err"][keep] + 0.5)
    return {
        "x_start": xs, "y_start": ys, "x_end": xs + dx, "y_end": ys + dy,
        "x": xs + f * dx, "y": ys + f * dy,
        "x_err": fit["x_err"][keep], "y_err": fit["y_err"][keep],
        "x_meas": xm + (f - 0.5) * dx, "y_meas": ym + (f - 0.5) * dy,
        "x_meas_err": fit["x_err"][keep], "y_meas_err": fit["y_err"][keep],
        "flux_adu": flux, "flux_err_adu": ferr, "snr": flux / np.maximum(ferr, 1e-12),
        "flags": flags, "truncated": trunc, "bad_length": bad_len,
        "length_px": fit["length_px"][keep], "length_err_px": fit["length_err"][keep],
    }


def _zero_count_columns(cols) -> int:
    """Add zeroed ``n_cr_pixels``, ``n_cr_samples``, ``n_masked_pixels`` columns to ``cols``; return the row count."""
    n = len(cols["x_start"])
    zeros = np.zeros(n, dtype=np.int64)
    cols["n_cr_pixels"] = zeros
    cols["n_cr_samples"] = zeros.copy()
    cols["n_masked_pixels"] = zeros.copy()
    return n


def _pixel_counts(cols, cr, bad, sat, streak, geo, sigma, index=None):
    """Count cosmic-ray / masked pixels and affected samples in each trail footprint.

    ``cols`` is the dict of table columns (``x_start``, ``y_start``, ``flags``);
    ``n_cr_pixels``, ``n_cr_samples``, ``n_masked_pixels`` are added and
    ``flags`` updated. Masked pixels are those of ``bad`` that are not cosmic rays.

    A footprint is the set of pixels ``rint(start + s u + c v)`` for whole
    along offsets ``s`` (-1 .. ceil(length) + 1) and across offsets ``c``
    (``|c| <= ceil(2.5 sigma)``), counted with multiplicity. The flagged pixels
    are a small fraction of the CCD (< 1 %), far fewer than the footprint samples
    of ~2000 trails: the counts are made from the flagged pixels, each paired
    with the trails whose footprint box holds it and with the few ``(s, c)``
    that can round onto it (the same floating-point expression as the footprint
    itself, so the counts are exact), instead of gathering every mask at every
    footprint sample (3 instead of 8 ms on a full CCD). Dense masks fall back to the
    gather (:func:`_pixel_counts_dense`). ``index`` may hold the flat indices of
    the True pixels of ``cr``, ``bad``, ``sat``, ``streak`` (keys ``cr``, ``bad``,
    ``saturated``, ``streak``; see :func:`resolve_mask`) when they are known.
    """
    n = _zero_count_columns(cols)
    if n == 0:
        return
    ny, nx = cr.shape
    L = geo.length_px
    hw = int(math.ceil(2.5 * sigma))
    n_s = int(math.ceil(L)) + 3  # along offsets -1 .. ceil(L) + 1
    n_c = 2 * hw + 1
    # flagged pixels of each mask (flat indices); the sparse path when they are few
    masks = {"cr": (cr, "cr"), "msk": (bad, "bad"), "sat": (sat, "saturated"), "streak": (streak, "streak")}
    index = index or {}
    flagged = {}
    n_flag = 0
    for key, (img, ikey) in masks.items():
        if img is None:
            continue
        known = index.get(ikey)
        flagged[key] = known if known is not None else np.flatnonzero(img)
        n_flag += flagged[key].size
    if n_flag > 0.25 * n * n_s * n_c:
        _pixel_counts_dense(cols, cr, bad, sat, streak, geo, sigma)
        return
    if "msk" in flagged and flagged["msk"].size and "cr" in flagged and flagged["cr"].size:
        fm = flagged["msk"]
        flagged["msk"] = fm[~cr.reshape(-1)[fm]]  # masked pixels that are not cosmic rays
    xs = np.asarray(cols["x_start"], float)
    ys = np.asarray(cols["y_start"], float)
    ux, uy = geo.direction
    vx, vy = -uy, ux
    # each trail's footprint box in the (along, across) frame of its start
    a0 = xs * ux + ys * uy
    b0 = xs * vx + ys * vy
    ra = 0.5 * (n_s - 1) + 2.0  # half-extent along (offsets -1 .. n_s - 2, plus rounding)
    rb = hw + 2.0
    ac = a0 + (0.5 * (n_s - 1) - 1.0)
    from scipy.spatial import cKDTree

    tree = cKDTree(np.c_[ac / ra, b0 / rb])

    def hits(flat_idx):
        """(trail, along index) of every footprint sample on the given pixels, with multiplicity."""
        if flat_idx.size == 0:
            return np.zeros(0, np.intp), np.zeros(0, np.intp)
        py, px = np.divmod(flat_idx, nx)
        px = px.astype(float)
        py = py.astype(float)
        pa = px * ux + py * uy
        pb = px * vx + py * vy
        pairs = cKDTree(np.c_[pa / ra, pb / rb]).sparse_distance_matrix(tree, 1.0, p=np.inf, output_type="ndarray")
        k = pairs["i"].astype(np.intp)  # pixel
        t = pairs["j"].astype(np.intp)  # trail
        if k.size == 0:
            return np.zeros(0, np.intp), np.zeros(0, np.intp)
        # real (s, c) of the pixel in the trail's frame; the samples that round onto it lie within 0.71
        s_r = (px[k] - xs[t]) * ux + (py[k] - ys[t]) * uy
        c_r = (px[k] - xs[t]) * vx + (py[k] - ys[t]) * vy
        d = np.arange(-1, 3)
        S = np.floor(s_r)[:, None, None] + d[None, :, None]  # (m, 4, 1)
        C = np.floor(c_r)[:, None, None] + d[None, None, :]  # (m, 1, 4)
        # the footprint's own expression: X = x_start + (s * ux + c * vx), rounded
        X = np.rint(xs[t][:, None, None] + (S * ux + C * vx))
        Y = np.rint(ys[t][:, None, None] + (S * uy + C * vy))
        on = ((X == px[k][:, None, None]) & (Y == py[k][:, None, None])
              & (S >= -1) & (S <= n_s - 2) & (C >= -hw) & (C <= hw))
        m_i, s_i, _ = np.nonzero(on)
        return t[m_i], (S[m_i, s_i, 0] + 1).astype(np.intp)  # along index into -1 .. n_s - 2

    ncr = np.zeros(n, np.int64)
    if "cr" in flagged:
        t_cr, s_cr = hits(flagged["cr"])
        ncr = np.bincount(t_cr, minlength=n).astype(np.int64)
        cols["n_cr_pixels"] = ncr
        # a pixel at along offset s (centre) receives light during samples floor(s - 0.5) and floor(s + 0.5)
        nsamp = geo.n_samples
        s_off = np.arange(-1, n_s - 1, dtype=float)
        M = np.zeros((n_s, max(nsamp, 1)), np.uint8)
        for shift in (-0.5, 0.5):
            kk = np.floor(s_off + shift).astype(int)
            ok = (kk >= 0) & (kk < nsamp)
            M[np.nonzero(ok)[0], kk[ok]] = 1
        hit_rows = np.nonzero(ncr)[0]  # only trails with a cosmic-ray pixel have hit samples
        hit = np.zeros((n, n_s), np.uint8)
        hit[t_cr, s_cr] = 1
        ncs = np.zeros(n, np.int64)
        ncs[hit_rows] = ((hit[hit_rows] @ M) > 0).sum(axis=1)
        cols["n_cr_samples"] = ncs
    nmask = np.zeros(n, np.int64)
    if "msk" in flagged:
        t_m, _ = hits(flagged["msk"])
        nmask = np.bincount(t_m, minlength=n).astype(np.int64)
        cols["n_masked_pixels"] = nmask
    flags = np.asarray(cols["flags"]).astype(np.int64, copy=True)
    flags |= np.where(ncr > 0, int(TrailFlag.COSMIC_RAY), 0)
    flags |= np.where(nmask > 0, int(TrailFlag.MASKED_PIXELS), 0)
    for key, bit in (("sat", TrailFlag.SATURATED), ("streak", TrailFlag.SATELLITE)):
        if key in flagged:
            t_f, _ = hits(flagged[key])
            flags |= np.where(np.bincount(t_f, minlength=n) > 0, int(bit), 0)
    cols["flags"] = flags


def _pixel_counts_dense(cols, cr, bad, sat, streak, geo, sigma):
    """Count cosmic-ray / masked pixels and affected samples in each trail footprint (every footprint sample gathered).

    ``cols`` is the dict of table columns (``x_start``, ``y_start``, ``flags``);
    ``n_cr_pixels``, ``n_cr_samples``, ``n_masked_pixels`` are added and
    ``flags`` updated. Masked pixels are those of ``bad`` that are not cosmic rays.
    """
    n = _zero_count_columns(cols)
    if n == 0:
        return
    ny, nx = cr.shape
    L = geo.length_px
    ux, uy = geo.direction
    vx, vy = -uy, ux
    hw = int(math.ceil(2.5 * sigma))
    s_off = np.arange(-1, int(math.ceil(L)) + 2, dtype=float)  # along, from the start
    c_off = np.arange(-hw, hw + 1, dtype=float)
    xs = np.asarray(cols["x_start"], float)
    ys = np.asarray(cols["y_start"], float)
    ox = s_off[:, None] * ux + c_off[None, :] * vx
    oy = s_off[:, None] * uy + c_off[None, :] * vy
    X = xs[:, None, None] + ox[None]
    np.rint(X, out=X)
    X = X.astype(np.intp)
    Y = ys[:, None, None] + oy[None]
    np.rint(Y, out=Y)
    Y = Y.astype(np.intp)
    # bounds checked only for the footprints that may cross the CCD edge
    edge = ((xs + ox.min() < 1) | (xs + ox.max() > nx - 2) | (ys + oy.min() < 1) | (ys + oy.max() > ny - 2))
    ie = np.nonzero(edge)[0]
    inside = None
    if ie.size:
        Xe, Ye = X[ie], Y[ie]
        inside = np.ones(X.shape, bool)
        inside[ie] = (Xe >= 0) & (Xe < nx) & (Ye >= 0) & (Ye < ny)
        X[ie] = np.clip(Xe, 0, nx - 1)
        Y[ie] = np.clip(Ye, 0, ny - 1)
    flat = Y
    flat *= nx
    flat += X
    del X

    # gather each mask at the footprints only (no full-image passes)
    def gather(img):
        if img is None:
            return None
        if not img.any():  # (an empty mask: cheaper than the gather)
            return np.zeros(flat.shape, bool)
        g = np.take(img.reshape(-1), flat)
        if inside is not None:
            g &= inside
        return g

    crs = gather(cr)
    ncr = crs.sum(axis=(1, 2))
    cols["n_cr_pixels"] = ncr.astype(np.int64)
    # a pixel at along offset s (centre) receives light during samples floor(s - 0.5) and floor(s + 0.5)
    nsamp = geo.n_samples
    M = np.zeros((s_off.size, max(nsamp, 1)), np.uint8)
    for shift in (-0.5, 0.5):
        k = np.floor(s_off + shift).astype(int)
        ok = (k >= 0) & (k < nsamp)
        M[np.nonzero(ok)[0], k[ok]] = 1
    hit_rows = np.nonzero(ncr)[0]  # only trails with a cosmic-ray pixel have hit samples
    hit = crs[hit_rows].any(axis=2)  # (n_hit, len(s_off))
    ncs = np.zeros(n, np.int64)
    ncs[hit_rows] = ((hit.astype(np.uint8) @ M) > 0).sum(axis=1)
    cols["n_cr_samples"] = ncs
    msk = gather(bad)
    msk &= ~crs
    nmask = msk.sum(axis=(1, 2))
    cols["n_masked_pixels"] = nmask.astype(np.int64)
    flags = np.asarray(cols["flags"]).astype(np.int64, copy=True)
    flags |= np.where(ncr > 0, int(TrailFlag.COSMIC_RAY), 0)
    flags |= np.where(nmask > 0, int(TrailFlag.MASKED_PIXELS), 0)
    for img, bit in ((sat, TrailFlag.SATURATED), (streak, TrailFlag.SATELLITE)):
        if img is not None:
            flags |= np.where(gather(img).any(axis=(1, 2)), int(bit), 0)
    cols["flags"] = flags


# ----------------------------------------------------------------------------- outputs

def write_astrometry_products(result: AstrometryResult, out_dir, *, expnum=None, ccd=None, header=None):
    """Write the trail table (CSV + Parquet) and the fitted WCS header of one CCD.

    Files: ``driftastrom-exp_{EXPNUM}-{ccd}.csv`` / ``.parquet`` (the
    per-exposure ``driftastrom-exp_{EXPNUM}.csv`` is assembled over CCDs by the
    pipeline), and ``wcs-exp_{EXPNUM}-{ccd}.fits``: a header-only FITS whose
    header holds the fitted TAN-SIP WCS, the fit rms and star count. Input
    files are never modified. Writes are atomic (``pydriftn.io`` writers when
    available).

    Returns
    -------
    list of pathlib.Path
    """
    from astropy.io import fits

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    expnum = result.trails["expnum"].iloc[0] if expnum is None and len(result.trails) else expnum
    ccd = result.trails["ccd"].iloc[0] if ccd is None and len(result.trails) else ccd
    stem = f"exp_{expnum}-{ccd}"
    hdu = fits.PrimaryHDU(header=_wcs_header(result, expnum, ccd, header))
    paths = [out / f"driftastrom-{stem}.csv", out / f"driftastrom-{stem}.parquet", out / f"wcs-{stem}.fits"]
    try:
        from ..io import write_fits_atomic, write_table_atomic
    except ImportError:  # pragma: no cover - io not available
        write_fits_atomic = write_table_atomic = None
    if write_table_atomic is not None:
        write_table_atomic(result.trails, paths[0])
        write_table_atomic(result.trails, paths[1])
        write_fits_atomic(fits.HDUList([hdu]), paths[2])
    else:
        _atomic(paths[0], lambda p: result.trails.to_csv(p, index=False))
        _atomic(paths[1], lambda p: result.trails.to_parquet(p, index=False))
        _atomic(paths[2], lambda p: fits.HDUList([hdu]).writeto(p))
    return paths


def _atomic(path, writer):
    import os

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer(tmp)
    os.replace(tmp, path)


def write_exposure_products(results, out_dir, expnum, *, headers=None):
    """Write the per-exposure products users of pydriftn 0.1.4 expect.

    ``driftastrom-exp_{EXPNUM}.csv`` and ``.parquet``: the trail tables of all
    CCDs of the exposure, sorted by CCD and star ID; ``wcs-exp_{EXPNUM}.fits``:
    one header-only extension per CCD (EXTNAME = CCD) holding its fitted
    TAN-SIP WCS. Input files are never modified; writes are atomic.

    Parameters
    ----------
    results : dict {ccd: AstrometryResult}
    out_dir : path
    expnum : int
    headers : dict {ccd: header}, optional
        Original headers, to copy DATE-OBS, MJD-OBS, EXPTIME, FILTER.

    Returns
    -------
    list of pathlib.Path
    """
    from astropy.io import fits

    from ..io import write_fits_atomic, write_table_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = [r.trails for _, r in sorted(results.items())]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=TRAIL_COLUMNS)
    table = table.sort_values(["ccd", "star_id"], kind="mergesort").reset_index(drop=True)
    paths = [out / f"driftastrom-exp_{expnum}.csv", out / f"driftastrom-exp_{expnum}.parquet",
             out / f"wcs-exp_{expnum}.fits"]
    write_table_atomic(table, paths[0])
    write_table_atomic(table, paths[1])
    hdus = [fits.PrimaryHDU()]
    hdus[0].header["EXPNUM"] = int(expnum)
    for ccd, res in sorted(results.items()):
        hdr = _wcs_header(res, expnum, ccd, (headers or {}).get(ccd))
        hdus.append(fits.ImageHDU(header=hdr, name=str(ccd)))
    write_fits_atomic(fits.HDUList(hdus), paths[2])
    return paths


def _wcs_header(result, expnum, ccd, header=None):
    hdr = result.wcs.to_header(relax=True)
    hdr["WCSRMS"] = (float(result.rms_arcsec), "[arcsec] rms residual of the WCS fit")
    hdr["WCSNSTAR"] = (int(result.n_used), "stars used in the WCS fit")
    hdr["WCSSIPO"] = (int(result.diagnostics.get("sip_order", 0)), "SIP order of the fit")
    hdr["WCSEPOCH"] = ("SHUTTER_OPEN", "WCS describes the sky at shutter open")
    hdr["EXPNUM"] = int(expnum) if expnum is not None else -1
    hdr["EXTNAME"] = str(ccd)
    if header is not None:
        for key in ("DATE-OBS", "MJD-OBS", "EXPTIME", "FILTER"):
            if key in header:
                hdr[key] = header[key]
    return hdr
