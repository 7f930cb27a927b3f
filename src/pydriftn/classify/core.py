"""Classification of every significant source on one CCD of a drift exposure.

A drift image separates phenomena by shape. With the drift geometry known
(:mod:`pydriftn.geometry`):

* ``star_trail`` — a segment of the drift length along the drift direction,
  convolved with the PSF (catalogued: from the trail table; uncatalogued
  "new" stars: found in the residual with that shape);
* ``flash`` — a PSF-shaped point: a source shorter than the PSF crossing
  time (~2 s at 1"/0.5"/s; a millisecond optical transient) does not trail;
* ``satellite`` — a straight streak much longer than a trail, at any angle;
* ``cosmic_ray`` — sharper than the PSF (or flagged in the dq mask);
* ``other_trail`` — elongated, but with a length or angle inconsistent with
  the drift (a moving object, an artefact).

Method (per CCD): separable sky; model image of all catalogued trails with a
template common to the CCD (:mod:`._trailmodel`), subtracted; streaks found
by a binned Hough transform of the residual and masked (:mod:`._streaks`);
point-like excesses found with a PSF matched filter (on a 2x2-binned residual
for speed, refined at full resolution), plus single pixels far above the
noise (cosmic-ray hits). Each candidate is classified from likelihood
comparisons and moments:

* ``sharp_ratio`` = (chi2 gain of up to 4 free pixels) / (chi2 gain of the
  PSF): about 0.35-0.6 for a PSF, > 1 for a cosmic ray;
* ``trail_ratio`` = S/N of the drift-trail matched filter / S/N of the PSF
  matched filter at the candidate: ~0.4 for a point, > 1.5 for a trail;
* second moments of the footprint in the smoothed residual: length, width,
  angle relative to the drift.

A point candidate becomes a ``flash`` only if it stays above ``flash_sigma``
in a local generalised least-squares fit in which the trail model may be
wrong in the ways it is wrong in practice (sub-pixel shift along and across
the drift, flux and width errors, local background; Gaussian priors), and if
it is PSF-shaped (a Gaussian twice as wide does not fit better):
:mod:`._local`. Residuals at the ends of bright trails and in blends are
explained by those error modes; a flash in a trail's interior or off the
trails keeps its matched-filter S/N.

A flash on a catalogued star's trail is timed by its position along the
trail: ``t_s = along-track distance from the trail start / speed``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from ..errors import MaskError
from ._background import estimate_sky, residual_mesh, sky_noise
from ._local import local_point_fit
from ._streaks import Streak, bin_image, find_streaks, rasterize_streak
from ._streaks import _refine as _refine_streak
from . import _kernels
from ._trailmodel import fit_trails, refit_fluxes

__all__ = [
    "CLASSES",
    "COLUMNS",
    "ClassificationResult",
    "classify_exposure_ccd",
    "decode_mask",
]

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400.0
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: Class names, in the order used for counts.
CLASSES = ("star_trail", "flash", "satellite", "cosmic_ray", "other_trail")

#: Columns of the classification table (one row per object), in order.
COLUMNS = [
    "class",  # one of CLASSES
    "subclass",  # star_trail: catalogued/new; cosmic_ray: dqmask/sharp; satellite: hough/fragment
    "score",  # 0..1 confidence of the class
    "star_id",  # catalogued trails (Int64, <NA> otherwise)
    "x", "y",  # position (px): trail midpoint, flash centroid, streak midpoint, CR centroid
    "ra", "dec",  # sky position (deg): flashes at their instant (mid-exposure if unknown)
    "flux_e", "flux_err_e", "snr",
    "psf_snr",  # S/N of the PSF matched filter
    "trail_snr",  # S/N of the drift-trail matched filter (binned residual)
    "trail_ratio",  # trail_snr / point S/N on the same binned map
    "sharp_ratio",  # chi2(<=4 free pixels) / chi2(PSF)
    "peak_sigma",  # brightest pixel in units of its noise
    "length_px", "width_px",  # moments (streaks: line fit)
    "angle_deg",  # image position angle of the major axis, deg from +x towards +y
    "angle_rel_drift_deg",  # major axis relative to the drift direction, -90..90
    "npix",
    "x0", "y0", "x1", "y1",  # trail start/end, streak ends
    "rho_px", "theta_deg",  # streaks: x cos(theta) + y sin(theta) = rho
    "surface_brightness_e",  # streaks: e- per pixel of length
    "mjd_start", "mjd_end",  # exposure window (UTC MJD)
    "t_s", "t_mjd",  # instant of a flash on a catalogued trail (NaN otherwise)
    "on_star_id", "sample_index",  # the star whose trail the flash lies on, and the sample
    "cross_offset_px",  # flashes on a trail: distance from the trail's centre line, across the drift
    "near_star_ids", "near_t_mjd", "near_cross_offset_px",  # flashes: other trails within FLASH_CONTACT_FWHM
    "pos_err_arcsec",  # flashes: sky-position uncertainty from the unknown instant
    "flags",  # bitmask, see FLAG_*
]

#: A flash's light reaches the samples of every trail whose centre line passes within this many PSF FWHM (its
#: wing: 1.8 % of the peak at 2 FWHM, 0.3 % at 3 for a Moffat beta = 3): besides the trail it lies on (within
#: 1.5 FWHM: ``on_star_id``), those trails are listed (``near_star_ids``, ``near_t_mjd`` the instant the star
#: passed the flash's position along its trail, ``near_cross_offset_px``; ";"-separated) so that the event
#: search can tell their excursions from the flash. A bright flash 1.9 FWHM from the trail of an r = 20 star made
#: a false event there.
FLASH_CONTACT_FWHM = 3.0
#: A streak fitted from one elongated footprint (too short for the Hough search) must be lit along its line
#: on at least this many 32 px chunks clear of the star-trail model (``Streak.clear_lit_chunks``).
MIN_SEGMENT_CLEAR_CHUNKS = 2

#: Columns of text (the others are numbers).
TEXT_COLUMNS = ("class", "subclass", "near_star_ids", "near_t_mjd", "near_cross_offset_px")

FLAG_SATURATED = 1  # saturated / masked pixels in the core
FLAG_STREAK_CROSSED = 2  # a satellite streak crosses the object (pixels masked)
FLAG_EDGE = 4  # near the CCD edge
FLAG_MASKED = 8  # dq-masked pixels nearby
FLAG_ON_TRAIL = 16  # flash on a catalogued trail
FLAG_DQ_CR = 32  # dq mask says cosmic ray

_CP_CODES = {"bad": (1, 2, 6), "sat": (3, 4), "cr": (5,), "streak": (8,)}


@dataclass
class ClassificationResult:
    """Classification of one exposure x CCD.

    Attributes
    ----------
    table : DataFrame
        One row per object, columns :data:`COLUMNS`.
    streak_mask : ndarray of bool
        Pixels of satellite streaks (to be masked by later stages).
    counts : dict
        Number of objects per class (all of :data:`CLASSES`).
    model : ndarray float32
        Model image of the catalogued star trails (ADU, sky not included).
    sky_sigma : float
        Sky noise per pixel (ADU).
    streaks : list of Streak
    meta : dict
        Knobs and diagnostics (template kind, timings).
    """

    table: pd.DataFrame
    streak_mask: np.ndarray
    counts: dict
    model: np.ndarray | None = None
    sky_sigma: float = float("nan")
    streaks: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def decode_mask(mask, shape, convention="flags", union=None, images=None):
    """Split a data-quality mask into bad, saturated, cosmic-ray and streak pixels.

    Parameters
    ----------
    mask : ndarray or None
        Boolean (True = bad), or integer: decoded
        :class:`pydriftn.flags.PixelFlag` bitmask as read by
        :func:`pydriftn.io.read_ccd` (``convention="flags"``) or raw CP codes (``"cp"``: 1 bad,
        2 hot, 3 saturated, 4 bleed, 5 cosmic ray, 6 low weight, 7
        transient, 8 streak).
    shape : tuple
        Image shape.
    union : sequence of str, optional
        With a decoded-flags mask: also return, as ``union_index``, the flat
        indices of the pixels in any of these groups (cheaper than OR-ing
        their images).
    images : sequence of str, optional
        With a decoded-flags mask: build the images of these groups only
        (the others are None); default all.

    Returns
    -------
    dict of bool arrays (or None): ``bad``, ``sat``, ``cr``, ``streak``
    (and ``union_index`` if asked for and available).
    """
    out = dict(bad=None, sat=None, cr=None, streak=None)
    if mask is None:
        return out
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise MaskError(f"dq mask shape {m.shape} does not match image shape {tuple(shape)}")
    if m.dtype == bool:
        out["bad"] = m
        return out
    if not np.issubdtype(m.dtype, np.integer):
        raise MaskError(f"dq mask dtype {m.dtype}: expected bool or integer codes/bits")
    if convention == "cp":
        for k, codes in _CP_CODES.items():
            out[k] = np.isin(m, codes)
        return out
    if convention != "flags":
        raise ValueError(f"mask convention must be 'flags' or 'cp', got {convention!r}")
    from ..flags import PixelFlag as P

    groups = dict(bad=P.BAD_PIXEL | P.LOW_WEIGHT | P.EDGE | P.INTERPOLATED, sat=P.SATURATED | P.BLEED,
                  cr=P.COSMIC_RAY, streak=P.STREAK)
    # flags are rare: decode the non-zero pixels only (one pass over the image instead of one per group)
    flat = np.ascontiguousarray(m).ravel()
    nz = np.flatnonzero(flat != 0)  # via a boolean image: flatnonzero on uint16 is ~5x slower
    vals = flat[nz]
    for k, b in groups.items():
        if images is not None and k not in images:
            continue
        o = np.zeros(m.shape, bool)
        o.ravel()[nz[(vals & int(b)) != 0]] = True
        out[k] = o
    if union is not None:
        # flat indices of the pixels in any of the groups ``union`` (the same pixels as OR-ing their images)
        b = 0
        for k in union:
            b |= int(groups[k])
        out["union_index"] = nz[(vals & b) != 0]
    return out


def _gauss_kernel(sigma, truncate=3.0):
    r = max(1, int(math.ceil(truncate * sigma)))
    x = np.arange(-r, r + 1, dtype=float)
    k1 = np.exp(-0.5 * (x / sigma) ** 2)
    k1 /= k1.sum()
    return np.outer(k1, k1), r


def _smooth(B, sigma, truncate=3.0):
    """``ndi.gaussian_filter(B, sigma, truncate=truncate)`` (mode 'reflect') of a float32 image, ~2x faster.

    scipy's filter along axis 0 walks the image column by column (15 ms on a
    2047x1023 binned CCD); here that pass is a sum of whole shifted rows, and
    only the pass along axis 1 is scipy's. Same kernel, same boundary
    handling; float32 rounding differences only.
    """
    r = int(truncate * float(sigma) + 0.5)
    x = np.arange(-r, r + 1, dtype=float)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    n = B.shape[0]
    if r == 0 or n < r + 1:
        return ndi.gaussian_filter(B, sigma, truncate=truncate)
    P = np.pad(B, [(r, r), (0, 0)], mode="symmetric")  # = scipy's 'reflect'
    out = np.empty(B.shape, np.float32)
    # both passes on blocks of 64 rows, which stay in the cache between them (the same sums per pixel as the
    # passes over the whole image; ~30 % faster)
    for a in range(0, n, 64):
        b = min(n, a + 64)
        acc = P[r + a:r + b] * np.float32(k[r])
        for j in range(1, r + 1):
            t = P[r - j + a:r - j + b] + P[r + j + a:r + j + b]
            t *= np.float32(k[r + j])
            acc += t
        ndi.correlate1d(acc, k, axis=1, mode="reflect", output=out[a:b])
    return out


def _trail_norm(sigma_b, ux, uy, length_px, step=0.5):
    """sqrt(sum E^2) of the effective kernel of a line sum of samples of a Gaussian-smoothed binned map."""
    n = int(round(length_px))
    t = (np.arange(n) - (n - 1) / 2.0) * step  # binned units, one sample per full px
    px, py = t * ux, t * uy
    R = int(math.ceil(abs(t).max() + 4 * sigma_b)) + 1
    g = np.arange(-R, R + 1, dtype=float)
    X, Y = np.meshgrid(g, g)
    E = np.zeros_like(X)
    for a, b in zip(px, py):
        E += np.exp(-0.5 * ((X - a) ** 2 + (Y - b) ** 2) / sigma_b**2)
    E /= 2 * math.pi * sigma_b**2
    return float(math.sqrt(np.sum(E**2))), n


def _dead_columns(r0, sigma, block=64, nsig=8.0):
    """Column segments far below the sky (dead column parts) when no dq mask is given."""
    ny, nx = r0.shape
    nb = max(1, ny // block)
    sub = r0[: nb * block : 2].reshape(nb, -1, nx)
    ns = sub.shape[1]
    thr = nsig * sigma / math.sqrt(ns) * 1.25
    t = -max(thr, 3 * sigma)
    # a median below t needs at least half of the values below t: one count over the image, the exact
    # median only for the (block, column) cells that pass (the full median was 25x slower; same cells)
    below = np.count_nonzero(sub < t, axis=1)  # (nb, nx)
    jc, ic = np.nonzero(below >= ns // 2)
    if not len(jc):
        return None
    lowc = np.zeros(below.shape, bool)
    lowc[jc, ic] = np.median(sub[jc, :, ic], axis=1) < t
    if not lowc.any():
        return None
    m = np.zeros((ny, nx), bool)
    jb, ic = np.nonzero(lowc)
    for j, i in zip(jb, ic):
        y1 = ny if j == nb - 1 else (j + 1) * block
        m[j * block:y1, i] = True
    return m


def _empty_table():
    df = pd.DataFrame({c: pd.Series(dtype="float64") for c in COLUMNS})
    for c in TEXT_COLUMNS:
        df[c] = df[c].astype(object)
    df["star_id"] = df["star_id"].astype("Int64")
    df["on_star_id"] = df["on_star_id"].astype("Int64")
    df["sample_index"] = df["sample_index"].astype("Int64")
    df["npix"] = df["npix"].astype("Int64")
    df["flags"] = df["flags"].astype("int64")
    return df


def _table_from_parts(trail_cols, n_tr, rows):
    """Table with :data:`COLUMNS` and their dtypes: the catalogued trails, then ``rows`` (list of dicts).

    ``trail_cols`` maps columns to arrays of ``n_tr`` values or scalars. Each
    column is assembled once from the two parts (no DataFrame per part and no
    concatenation of DataFrames, ~2x faster); missing values are NaN (<NA> in
    the integer columns, 0 in ``flags``).
    """
    n = n_tr + len(rows)
    if n == 0:
        return _empty_table()
    out = {}
    for c in COLUMNS:
        text = c in TEXT_COLUMNS
        parts = []
        if n_tr:
            v = trail_cols.get(c, np.nan)
            if np.ndim(v) == 0:
                v = np.full(n_tr, v, dtype=object if text else None)
            parts.append(np.asarray(v, dtype=object if text else None))
        if rows:
            vals = [r.get(c, np.nan) for r in rows]
            vals = [np.nan if x is None else x for x in vals]
            parts.append(np.array(vals, dtype=object if text else np.float64))
        if text:
            out[c] = np.concatenate(parts) if len(parts) > 1 else parts[0]
            continue
        col = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if col.dtype.kind not in "fiub":  # (e.g. nullable integers as objects: pandas' conversion)
            col = pd.to_numeric(pd.Series(col), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        col = col.astype(np.float64, copy=False)
        if c in ("star_id", "on_star_id", "sample_index", "npix"):
            out[c] = pd.array(np.round(col), dtype="Int64")
        elif c == "flags":
            out[c] = np.where(np.isnan(col), 0.0, col).astype(np.int64)
        else:
            out[c] = col
    return pd.DataFrame(out, columns=COLUMNS)


def _gather(img, ys, xs):
    """``img[ys, xs]`` as float64 (broadcast), 0 outside the image; and the inside mask."""
    ny, nx = img.shape
    ys, xs = np.broadcast_arrays(ys, xs)
    ok = (ys >= 0) & (ys < ny) & (xs >= 0) & (xs < nx)
    # one flat take at clipped indices, then zero outside (no boolean-indexed copies of the indices)
    flat = np.clip(ys, 0, ny - 1) * nx
    flat += np.clip(xs, 0, nx - 1)
    v = np.take(img.ravel(), flat).astype(np.float64, copy=False)
    if not ok.all():
        v = np.where(ok, v, 0.0)
    return v, ok


def _local_maxima(img, ys, xs, values):
    """True where ``values`` (at ``img[ys, xs]``) is >= each of its 8 neighbours inside the image."""
    ismax = np.ones(len(ys), bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dx == 0 and dy == 0:
                continue
            v, ok = _gather(img, ys + dy, xs + dx)
            ismax &= ~ok | (v <= values)
    return ismax


def classify_exposure_ccd(image, mask, trails, geometry, *, fwhm_px, gain, read_noise=None, wcs=None,
                          mjd_obs=None, exptime=None, saturation_adu=None, mask_convention="flags",
                          flash_sigma=7.0, cr_sigma=6.0, sharp_threshold=1.3, trail_ratio_threshold=1.2,
                          model_error_frac=0.015, position_error_px=0.05, angle_tol_deg=15.0, streak_detect_sigma=8.0,
                          streak_bin_px=16, max_streaks=5, detect_streaks=True, amp_boundary="half",
                          model_pos_err_px=(0.5, 0.3), model_flux_err=0.03, broad_ratio_max=1.0, sky=None):
    """Classify every significant source on one CCD of a drift exposure.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Image in ADU with the sky.
    mask : ndarray or None
        dq mask (see :func:`decode_mask`); None when no mask was read.
    trails : DataFrame
        Catalogued (and predicted) trails with ``star_id, x_start, y_start,
        x_end, y_end`` (0-based px).
    geometry : TrailGeometry
        Drift geometry of the CCD (direction, length, speed, sample_dt_s).
    fwhm_px : float
        PSF FWHM (px).
    gain : float
        e-/ADU.
    read_noise : float, optional
        e-; only used if the sky noise cannot be measured.
    wcs : astropy.wcs.WCS, optional
        Shutter-open WCS for sky coordinates.
    mjd_obs, exptime : float, optional
        Shutter-open MJD and exposure time (s); default exptime from geometry.
    saturation_adu : float, optional
        Pixels at or above 98 % of this are treated as saturated.
    mask_convention : {'flags', 'cp'}
        Meaning of an integer mask.
    flash_sigma : float
        Detection threshold of the PSF matched filter (sigma).
    cr_sigma : float
        A cosmic ray needs a pixel this many sigma above the model.
    sharp_threshold : float
        ``sharp_ratio`` above which a source is sharper than the PSF.
    trail_ratio_threshold : float
        ``trail_ratio`` above which a source is trail-like.
    model_error_frac : float
        Fractional error of the trail model added to the noise (keeps
        bright-trail residuals from becoming detections).
    position_error_px : float
        Position error of the trail model (px) times the model's gradient, added to the noise.
    angle_tol_deg : float
        Largest angle between an uncatalogued trail and the drift.
    streak_detect_sigma, streak_bin_px, max_streaks, detect_streaks
        Satellite search (see :func:`pydriftn.classify._streaks.find_streaks`).
    amp_boundary : int, 'half' or None
        First column of the second amplifier (``'half'``: NAXIS1/2, DECam).
    model_pos_err_px : (float, float)
        Prior rms position error of the trail model along / across the drift
        (px): a flash must stay above ``flash_sigma`` when the local model is
        allowed to shift by this much (see :mod:`pydriftn.classify._local`).
    model_flux_err : float
        Prior rms fractional error of the local trail model, same use.
    broad_ratio_max : float
        A flash must be PSF-shaped: the S/N of a Gaussian twice the PSF's
        width over the PSF's S/N (0.8 for a point source) must stay below this.
    sky : (ndarray, float or None), optional
        A sky already estimated by the caller (e.g. the astrometry's
        background): ``(sky_subtracted, sigma)`` with ``sky_subtracted`` the
        image minus its sky (ADU, float32, the image's shape), which this
        function takes over and overwrites (it becomes the residual; pass a
        copy to keep it), and ``sigma`` the sky noise per pixel (ADU), or None
        to measure it here (:func:`~._background.sky_noise`). Default None:
        the sky is estimated here (:func:`~._background.estimate_sky`).

    Returns
    -------
    ClassificationResult
    """
    import time

    t_start = time.perf_counter()
    data = np.asarray(image, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {data.shape}")
    if not (fwhm_px and fwhm_px > 0):
        raise ValueError(f"fwhm_px must be positive, got {fwhm_px}")
    if not (gain and gain > 0):
        raise ValueError(f"gain must be positive (e-/ADU), got {gain}")
    for col in ("star_id", "x_start", "y_start", "x_end", "y_end"):
        if trails is not None and len(trails) and col not in trails:
            raise ValueError(f"trail table: column {col!r} missing (need star_id, x_start, y_start, x_end, y_end)")
    ny, nx = data.shape
    exptime = float(exptime if exptime is not None else geometry.exptime_s)
    mjd_start = float(mjd_obs) if mjd_obs is not None else float("nan")
    mjd_end = mjd_start + exptime / SECONDS_PER_DAY
    sigma_psf = float(fwhm_px) / FWHM_PER_SIGMA
    ux, uy = (float(v) for v in geometry.direction)
    L = float(geometry.length_px)
    timings = {}

    # ---------------------------------------------------------------- masks
    excl_groups = ("bad", "sat", "cr")
    # (images of the bad and saturated groups are not needed: they enter only the exclusion mask, via union_index)
    dq = decode_mask(mask, data.shape, mask_convention, union=excl_groups, images=("cr", "streak"))
    # pixels excluded from all fits: non-finite (a finite sum proves there are none: one pass instead of two; the
    # float32 sum is ~3x faster than float64 and can only err towards the exact test, by overflowing),
    # dq-flagged bad, saturated, dq cosmic rays
    any_nonfinite = not np.isfinite(np.sum(data))
    sat_ok = saturation_adu is not None and np.isfinite(saturation_adu)
    if sat_ok and not any_nonfinite:
        excl = data >= 0.98 * float(saturation_adu)  # the first term, without a zeroed image
    else:
        excl = ~np.isfinite(data) if any_nonfinite else np.zeros(data.shape, bool)
        if sat_ok:
            excl |= data >= 0.98 * float(saturation_adu)
    if "union_index" in dq:
        excl.ravel()[dq.pop("union_index")] = True
    else:
        for k in excl_groups:
            if dq[k] is not None:
                excl |= dq[k]
    crm = dq["cr"]
    if any_nonfinite:
        data = np.where(np.isfinite(data), data, 0.0).astype(np.float32)

    # ---------------------------------------------------------------- sky
    if amp_boundary == "half":
        amp_boundary = nx // 2 if nx >= 64 else None
    cr_vals = None
    if sky is None:
        rows, cols, sigma, level = estimate_sky(data, excl, amp_boundary=amp_boundary)
    else:
        # the caller's sky-subtracted image becomes r0 (no sky estimate, no subtraction pass here)
        r0, sigma = sky
        r0 = np.asarray(r0)
        if r0.shape != data.shape:
            raise ValueError(f"sky: sky-subtracted image of shape {r0.shape}, expected the image's {data.shape}")
        if r0.dtype != np.float32:
            r0 = r0.astype(np.float32)
        if not np.isfinite(np.sum(r0)):
            nf = ~np.isfinite(r0)
            np.copyto(r0, 0.0, where=nf)
            excl |= nf
        if sigma is None:
            sigma = sky_noise(r0, excl)
        sigma = float(sigma) if sigma is not None else float("nan")
        lv = data[::64, ::64] - r0[::64, ::64]
        level = float(np.median(lv[~excl[::64, ::64]])) if (~excl[::64, ::64]).any() else float("nan")
        if crm is not None:
            cr_vals = r0.ravel()[np.flatnonzero(crm)].astype(np.float64)  # (before the excluded pixels are zeroed)
    if not sigma > 0:
        sigma = float(read_noise or 1.0) / gain
    zero_now = mask is not None  # without a dq mask, dead columns are found on r0 before the zeroing
    if sky is None:
        r0 = np.empty(data.shape, np.float32)
        rows32, cols32 = rows.astype(np.float32), cols.astype(np.float32)
        if data.dtype in (np.float32, np.float64) and data.dtype.isnative:
            # one compiled pass (the same values as the numpy passes below)
            _kernels.sky_subtract(data, rows32, cols32, excl, zero_now, r0)
        else:
            # sky-subtracted image in blocks of 64 rows (the block stays in the cache between the passes)
            for a in range(0, ny, 64):
                rb = np.subtract(data[a:a + 64], rows32[a:a + 64, None], out=r0[a:a + 64])
                rb -= cols32[None, :]
                if zero_now:
                    np.copyto(rb, 0.0, where=excl[a:a + 64])  # = r0[excl] = 0, ~2x faster
    elif zero_now:
        np.copyto(r0, 0.0, where=excl)
    if not zero_now:
        dead = _dead_columns(r0, sigma)
        if dead is not None:
            excl |= dead
        np.copyto(r0, 0.0, where=excl)
    timings["sky"] = time.perf_counter() - t_start

    # ---------------------------------------------------------------- trail model
    t0 = time.perf_counter()
    tr = trails if trails is not None else pd.DataFrame(columns=["star_id", "x_start", "y_start", "x_end", "y_end"])
    tx0 = tr["x_start"].to_numpy(float) if len(tr) else np.zeros(0)
    ty0 = tr["y_start"].to_numpy(float) if len(tr) else np.zeros(0)
    tx1 = tr["x_end"].to_numpy(float) if len(tr) else np.zeros(0)
    ty1 = tr["y_end"].to_numpy(float) if len(tr) else np.zeros(0)
    fin = np.isfinite(tx0) & np.isfinite(ty0) & np.isfinite(tx1) & np.isfinite(ty1)
    if not fin.all():
        # a trail without an end: use the geometry
        tx1 = np.where(np.isfinite(tx1), tx1, tx0 + ux * L)
        ty1 = np.where(np.isfinite(ty1), ty1, ty0 + uy * L)
        fin = np.isfinite(tx0) & np.isfinite(ty0)
    tidx = np.flatnonzero(fin)
    fit = fit_trails(r0, excl, tx0[tidx], ty0[tidx], tx1[tidx], ty1[tidx], sigma_psf=sigma_psf, sky_sigma=sigma,
                     analytic_length=L, gain=gain)
    model = fit.model
    # residual in place of r0 (not needed again: see the streak refit below), excluded pixels zeroed and (for the
    # streak search) binned 2x2, in one compiled pass (the same values as bin_image of the residual)
    resid = r0
    del r0
    B0 = np.empty((ny // 2, nx // 2), np.float32) if detect_streaks else None
    _kernels.subtract_model_bin2(resid, model, excl, B0 if B0 is not None else np.zeros((0, 0), np.float32))
    timings["trail_model"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- streaks
    t0 = time.perf_counter()
    streak_mask = np.zeros(data.shape, bool)
    streaks: list[Streak] = []
    if detect_streaks:
        mesh0, _ = residual_mesh(B0)
        streaks = find_streaks(resid, sigma, fwhm_px=fwhm_px, bin_px=streak_bin_px, background_binned2=mesh0,
                               binned2=B0, detect_sigma=streak_detect_sigma, max_streaks=max_streaks,
                               min_length_px=max(4.0 * L, 100.0), trails=model)
        for st in streaks:
            streak_mask |= rasterize_streak(st, data.shape)
    dq_streaks = []
    dq_streak = dq["streak"] is not None and dq["streak"].any()
    if dq_streak:
        # streaks flagged in the dq mask: one line fit per connected group (binned 4x4 for speed)
        sb4 = bin_image(dq["streak"], 4) > 0
        lab4, nlab = ndi.label(sb4, structure=np.ones((3, 3)))
        yy, xx = np.divmod(np.flatnonzero(dq["streak"]), nx)
        g = lab4[np.minimum(yy // 4, lab4.shape[0] - 1), np.minimum(xx // 4, lab4.shape[1] - 1)]
        for k in range(1, nlab + 1):
            sel_k = g == k
            if sel_k.sum() < 10:
                continue
            px_, py_ = xx[sel_k].astype(float), yy[sel_k].astype(float)
            mx_, my_ = px_.mean(), py_.mean()
            cov = np.cov(np.stack([px_ - mx_, py_ - my_]))
            evals, evecs = np.linalg.eigh(cov)
            vx_, vy_ = evecs[:, 1]
            if math.sqrt(12.0 * max(evals[1], 0.0)) < 2.0 * L:
                continue
            th_n = math.atan2(vy_, vx_) + 0.5 * math.pi
            rho_n = mx_ * math.cos(th_n) + my_ * math.sin(th_n)
            dup = False
            for st in streaks:
                dth = abs((math.degrees(th_n) - st.theta_deg + 90.0) % 180.0 - 90.0)
                if dth < 1.0 and abs(abs(rho_n) - abs(st.rho_px)) < 10.0:
                    dup = True
            if dup:
                continue
            st = _refine_streak(resid, sigma, th_n, rho_n, fwhm_px, nx, ny, band_px=max(3.0 * fwhm_px, 12.0))
            if st is not None and math.hypot(st.x1 - st.x0, st.y1 - st.y0) >= 2.0 * L:
                streaks.append(st)
                dq_streaks.append(st)
                streak_mask |= rasterize_streak(st, data.shape)
        streak_mask |= dq["streak"]
    any_streak = bool(streak_mask.any()) if (streaks or dq_streak) else False  # (nothing was added otherwise)
    if any_streak:
        B0 = None  # residual changes below
    if any_streak and len(tidx):
        # refit the fluxes without the streak's pixels (template and offsets kept); the data are read back from the
        # residual and the residual and model are updated in place on the refitted trails' pixels only
        fit = refit_fluxes(fit, resid, excl | streak_mask, sky_sigma=sigma, residual=True, inplace=True)
        model = fit.model
    if any_streak:
        np.copyto(resid, 0.0, where=streak_mask)
    timings["streaks"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- candidates
    t0 = time.perf_counter()
    weak_frac = 0.8
    rows_out = []
    K, R = _gauss_kernel(sigma_psf)
    knorm = float(np.sqrt(np.sum(K**2)))
    Psum = float(np.sum(K**2))
    sig_b = 0.5 * sigma_psf
    if B0 is not None:
        B, mesh = B0, mesh0  # no streak: the residual is the one the streak search binned
    else:
        B = bin_image(resid, 2)
        mesh, _ = residual_mesh(B)
    B = np.subtract(B, mesh, out=B)  # in place: the binned residual is not needed again
    M = _smooth(B, sig_b)
    Kb, _ = _gauss_kernel(sig_b)
    knorm_b = float(np.sqrt(np.sum(Kb**2)))
    Mz = np.divide(M, np.float32(2.0 * sigma * knorm_b), out=M)
    pre = 0.6 * flash_sigma
    cand = np.flatnonzero(Mz > pre)
    nyb, nxb = Mz.shape
    cy, cx = np.divmod(cand, nxb)
    if len(cand):
        ismax = _local_maxima(Mz, cy, cx, Mz[cy, cx])
        cy, cx = cy[ismax], cx[ismax]
    # full-resolution matched filter around each binned maximum
    W = 6
    off = np.arange(-W // 2 - R, W // 2 + R)  # stamp offsets
    py_list, px_list, fv_list = [], [], []
    if len(cy):
        by = 2 * cy
        bx = 2 * cx
        oy = off[None, :, None]
        ox = off[None, None, :]
        ys = by[:, None, None] + oy
        xs = bx[:, None, None] + ox
        st, _ = _gather(resid, np.broadcast_to(ys, (len(cy), len(off), len(off))),
                        np.broadcast_to(xs, (len(cy), len(off), len(off))))
        st -= (mesh[np.minimum(cy, nyb - 1), np.minimum(cx, nxb - 1)] / 4.0)[:, None, None]
        win = np.lib.stride_tricks.sliding_window_view(st, (2 * R + 1, 2 * R + 1), axis=(1, 2))
        filt = np.einsum("nijab,ab->nij", win, K)  # (n, W, W): positions off[R:R+W]
        inner = filt[:, 1:-1, 1:-1]
        k = inner.reshape(len(cy), -1).argmax(axis=1)
        iy, ix = np.divmod(k, inner.shape[2])
        iy += 1
        ix += 1
        pk_y = by + off[R + iy]
        pk_x = bx + off[R + ix]
        fv = filt[np.arange(len(cy)), iy, ix]
        # sub-pixel: parabola through neighbours
        n_ = np.arange(len(cy))
        fxm, fxp = filt[n_, iy, ix - 1], filt[n_, iy, ix + 1]
        fym, fyp = filt[n_, iy - 1, ix], filt[n_, iy + 1, ix]
        with np.errstate(divide="ignore", invalid="ignore"):
            dxs = np.clip(0.5 * (fxm - fxp) / (fxm - 2 * fv + fxp), -0.5, 0.5)
            dys = np.clip(0.5 * (fym - fyp) / (fym - 2 * fv + fyp), -0.5, 0.5)
        dxs = np.nan_to_num(dxs)
        dys = np.nan_to_num(dys)
        py_list.append(pk_y)
        px_list.append(pk_x)
        fv_list.append(np.stack([fv, pk_x + dxs, pk_y + dys], axis=1))
    # single pixels far above the noise (cosmic-ray hits)
    # (in blocks of 128 rows: no image-sized boolean temporary; the same indices in the same order)
    thr_hot = cr_sigma * sigma
    hot = np.concatenate([np.flatnonzero(resid[a:a + 128] > thr_hot) + a * nx for a in range(0, ny, 128)])
    if len(hot):
        hy, hx = np.divmod(hot, nx)
        hv = resid[hy, hx]
        mloc = model[hy, hx]
        var = sigma**2 + np.clip(mloc, 0, None) / gain + (model_error_frac * mloc) ** 2
        keep = hv / np.sqrt(var) > cr_sigma
        hy, hx, hv = hy[keep], hx[keep], hv[keep]
        ismax = _local_maxima(resid, hy, hx, hv)
        hy, hx = hy[ismax], hx[ismax]
        if len(hy):
            stp, _ = _gather(resid, hy[:, None, None] + np.arange(-R, R + 1)[None, :, None],
                             hx[:, None, None] + np.arange(-R, R + 1)[None, None, :])
            bgh = mesh[np.minimum(hy // 2, nyb - 1), np.minimum(hx // 2, nxb - 1)] / 4.0
            fvh = np.einsum("nab,ab->n", stp, K) - bgh
            py_list.append(hy)
            px_list.append(hx)
            fv_list.append(np.stack([fvh, hx.astype(float), hy.astype(float)], axis=1))
    timings["candidates"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if py_list:
        PY = np.concatenate(py_list)
        PX = np.concatenate(px_list)
        FV = np.concatenate(fv_list)
        key = PY * nx + PX
        _, first = np.unique(key, return_index=True)
        PY, PX, FV = PY[first], PX[first], FV[first]
        mloc, _ = _gather(model, PY, PX)
        o7 = np.arange(-3, 4)
        m7, _ = _gather(model, PY[:, None, None] + o7[None, :, None], PX[:, None, None] + o7[None, None, :])
        mnear = m7.reshape(len(PY), -1).max(axis=1)
        gy_, gx_ = np.gradient(m7, axis=(1, 2))
        gnear = np.sqrt(gx_**2 + gy_**2).reshape(len(PY), -1).max(axis=1)
        # photon noise of the star light + systematic floors: a fraction of the nearest trail's peak
        # (the model is never perfect in the wings) and a position error times the model's gradient
        # (trail ends, where a sub-pixel error in the start or the jitter leaves a dipole)
        var_pk = sigma**2 + np.clip(mloc, 0, None) / gain + (model_error_frac * mnear) ** 2 + \
            (position_error_px * gnear) ** 2
        psf_snr = FV[:, 0] / (knorm * np.sqrt(var_pk))
        # candidates with masked pixels under the kernel: masked matched filter (weights 0 there)
        oR = np.arange(-R, R + 1)
        ysR = PY[:, None, None] + oR[None, :, None]
        xsR = PX[:, None, None] + oR[None, None, :]
        mR, inR = _gather(excl, ysR, xsR)
        wR = (inR & (mR == 0)).astype(float)
        part = wR.reshape(len(PY), -1).min(axis=1) == 0
        if part.any():
            stR, _ = _gather(resid, ysR[part], xsR[part])
            bgp = (mesh[np.minimum(PY[part] // 2, nyb - 1), np.minimum(PX[part] // 2, nxb - 1)] / 4.0)
            stR = stR - bgp[:, None, None]
            wp = wR[part]
            sKr = np.einsum("nab,ab->n", stR * wp, K)
            sK2 = np.einsum("nab,ab->n", wp, K * K)
            with np.errstate(divide="ignore", invalid="ignore"):
                FV[part, 0] = np.where(sK2 > 0, sKr / sK2 * Psum, 0.0)
                psf_snr[part] = np.where(sK2 > 0, sKr / np.sqrt(sK2 * var_pk[part]), 0.0)
        # sharpness: top-4 z^2 in the 5x5 around the peak vs PSF chi2
        o5 = np.arange(-2, 3)
        ys5 = PY[:, None, None] + o5[None, :, None]
        xs5 = PX[:, None, None] + o5[None, None, :]
        ys5, xs5 = np.broadcast_arrays(ys5, xs5)
        st5, ok5 = _gather(resid, ys5, xs5)
        st5 -= (mesh[np.minimum(PY // 2, nyb - 1), np.minimum(PX // 2, nxb - 1)] / 4.0)[:, None, None]
        m5, _ = _gather(model, ys5, xs5)
        v5 = sigma**2 + np.clip(m5, 0, None) / gain + (model_error_frac * m5) ** 2
        z5 = st5 / np.sqrt(v5)
        zc = z5[:, 1:4, 1:4].reshape(len(PY), -1)
        peak_sigma = zc.max(axis=1)
        m5, _ = _gather(excl, ys5, xs5)
        z5 = np.where(m5 > 0, 0.0, z5)  # masked pixels carry no information
        zz = np.sort(np.clip(z5.reshape(len(PY), -1), 0, None) ** 2, axis=1)[:, ::-1]
        s4 = zz[:, :4].sum(axis=1)
        # compare with the PSF S/N on the same per-pixel noise as z5 (without the floors of var_pk that
        # deflate psf_snr next to bright trail ends: a smooth residual there must not look "sharp")
        var_c = sigma**2 + np.clip(mloc, 0, None) / gain + (model_error_frac * mloc) ** 2
        psf_snr_c = psf_snr * np.sqrt(var_pk / var_c)
        sharp_ratio = s4 / np.maximum(psf_snr_c, 1.0) ** 2
        dq_cr = np.zeros(len(PY), bool)
        if crm is not None:
            c3, _ = _gather(crm, ys5[:, 1:4, 1:4], xs5[:, 1:4, 1:4])
            dq_cr = c3.reshape(len(PY), -1).max(axis=1) > 0
        near_mask = m5.reshape(len(PY), -1).max(axis=1) > 0  # (m5: excl on the 5x5 stamps, gathered above)
        # candidates below flash_sigma on the matched filter (whose variance includes a crude model-error floor)
        # get a second chance from the local fit, which treats the model error honestly (flashes only)
        keep = (psf_snr >= weak_frac * flash_sigma) | ((peak_sigma >= cr_sigma) & (sharp_ratio > sharp_threshold))
        sel = np.flatnonzero(keep)
    else:
        sel = np.zeros(0, int)
    timings["features"] = time.perf_counter() - t0

    # trail matched filter along the drift, on the binned map
    t0 = time.perf_counter()
    tnorm, nL = _trail_norm(sig_b, ux, uy, L)
    if len(sel):
        xb = (FV[sel, 1] - 0.5) / 2.0
        yb = (FV[sel, 2] - 0.5) / 2.0
        tt = np.arange(-nL, nL + 1) * 0.5  # binned units
        XS = xb[:, None] + tt[None, :] * ux
        YS = yb[:, None] + tt[None, :] * uy
        prof = ndi.map_coordinates(Mz, [YS.ravel(), XS.ravel()], order=1, mode="constant", cval=0.0)
        prof = prof.reshape(len(sel), -1)
        cs = np.concatenate([np.zeros((len(sel), 1)), np.cumsum(prof, axis=1)], axis=1)
        wins = cs[:, nL:] - cs[:, : cs.shape[1] - nL]  # windows of nL samples
        # windows that contain the centre sample (index nL)
        start = np.arange(wins.shape[1])
        contain = (start <= nL) & (start + nL - 1 >= nL)
        wbest = np.where(contain[None, :], wins, -np.inf).max(axis=1)
        trail_snr_b = wbest * knorm_b * 2.0 * sigma / (2.0 * sigma * tnorm)
        point_b = ndi.map_coordinates(Mz, [yb, xb], order=1, mode="constant", cval=0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            trail_ratio = trail_snr_b / np.maximum(point_b, 1e-3)
        trail_snr = trail_snr_b
    timings["trail_filter"] = time.perf_counter() - t0

    # catalogued trail geometry for membership tests
    t0 = time.perf_counter()
    n_tr = len(tidx)
    if n_tr:
        Lc = np.hypot(tx1[tidx] - tx0[tidx], ty1[tidx] - ty0[tidx])
        Lc = np.where(Lc > 0, Lc, L)
        uxc = np.where(Lc > 0, (tx1[tidx] - tx0[tidx]) / Lc, ux)
        uyc = np.where(Lc > 0, (ty1[tidx] - ty0[tidx]) / Lc, uy)
        sx0 = tx0[tidx] + fit.d_along * uxc - fit.d_cross * uyc
        sy0 = ty0[tidx] + fit.d_along * uyc + fit.d_cross * uxc
        order_y = np.argsort(np.minimum(sy0, sy0 + uyc * Lc))
        ymin_sorted = np.minimum(sy0, sy0 + uyc * Lc)[order_y]
        span = float(np.max(np.abs(uyc * Lc))) if n_tr else 0.0

    def on_trails(x, y, cmax, smargin):
        """Indices (into tidx) of catalogued trails whose stadium contains (x, y), sorted by |c|."""
        if not n_tr:
            return np.zeros(0, int), np.zeros(0), np.zeros(0)
        lo = np.searchsorted(ymin_sorted, y - span - cmax - smargin - 1, side="left")
        hi = np.searchsorted(ymin_sorted, y + cmax + smargin + 1, side="right")
        j = order_y[lo:hi]
        dx = x - sx0[j]
        dy = y - sy0[j]
        s = dx * uxc[j] + dy * uyc[j]
        c = dy * uxc[j] - dx * uyc[j]
        ok = (np.abs(c) <= cmax) & (s >= -smargin) & (s <= Lc[j] + smargin)
        j, s, c = j[ok], s[ok], c[ok]
        o = np.argsort(np.abs(c))
        return j[o], s[o], c[o]

    # honest local significance (model error modes as nuisances) and shape test of the point candidates
    t0 = time.perf_counter()
    point_diag = None
    loc_snr = np.full(len(PY) if py_list else 0, np.inf)
    broad = np.zeros(len(loc_snr))
    if len(sel):
        # only candidates that can become flashes: not sharper than the PSF, not dq-flagged cosmic rays, not
        # trail-like (those go to the trail branch below whatever the local fit says), not at the CCD edge
        e_px = R + 1  # the matched-filter kernel lies on the CCD
        xs_, ys_ = FV[sel, 1], FV[sel, 2]
        cand_fl = sel[(psf_snr[sel] >= weak_frac * flash_sigma) & ~(sharp_ratio[sel] > sharp_threshold)
                      & ~dq_cr[sel] & ~(trail_ratio > trail_ratio_threshold)
                      & (xs_ >= e_px) & (ys_ >= e_px) & (xs_ <= nx - 1 - e_px) & (ys_ <= ny - 1 - e_px)]
        if len(cand_fl):
            xc_, yc_ = FV[cand_fl, 1], FV[cand_fl, 2]
            bkg_c = mesh[np.minimum(PY[cand_fl] // 2, nyb - 1), np.minimum(PX[cand_fl] // 2, nxb - 1)] / 4.0
            # the (up to 3) trails with the most light at the candidate: each may be shifted / scaled on its own
            K_st = 3
            jst = np.full((len(cand_fl), K_st), -1, np.int64)
            if n_tr:
                reach = fit.half_width_px + 5.0 * sigma_psf
                pq, pj, ps, pc = [], [], [], []
                for q in np.flatnonzero(mnear[cand_fl] > 0.5 * sigma):  # where trail light is significant
                    j, s_, c_ = on_trails(xc_[q], yc_[q], reach, reach)
                    pq.append(np.full(len(j), q))
                    pj.append(j)
                    ps.append(s_)
                    pc.append(c_)
                if pq:
                    pq, pj = np.concatenate(pq), np.concatenate(pj)
                    lt = np.abs(fit.flux[pj] * fit.template.evaluate(np.concatenate(ps), np.concatenate(pc)))
                    o = np.lexsort((-lt, pq))  # by candidate, brightest first
                    pq, pj = pq[o], pj[o]
                    first = np.searchsorted(pq, pq, side="left")
                    rank = np.arange(len(pq)) - first
                    k_ = rank < K_st
                    jst[pq[k_], rank[k_]] = pj[k_]
            modes = None
            Rl = int(np.ceil(4.0 * sigma_psf))
            if (jst >= 0).any():
                ol = np.arange(-Rl, Rl + 1)
                XS = np.rint(xc_).astype(np.int64)[:, None, None] + ol[None, None, :]
                YS = np.rint(yc_).astype(np.int64)[:, None, None] + ol[None, :, None]
                XS, YS = np.broadcast_arrays(XS, YS)
                jj = np.maximum(jst, 0)
                dxs = XS[:, None] - sx0[jj][:, :, None, None]
                dys = YS[:, None] - sy0[jj][:, :, None, None]
                uxj = uxc[jj][:, :, None, None]
                uyj = uyc[jj][:, :, None, None]
                Tm, Tsm, Tcm = fit.template.evaluate((dxs * uxj + dys * uyj).astype(np.float32).ravel(),
                                                     (dys * uxj - dxs * uyj).astype(np.float32).ravel(),
                                                     derivatives=True)
                Fj = np.where(jst >= 0, fit.flux[jj], 0.0)[:, :, None, None]
                shp = dxs.shape
                modes = np.stack([Fj * Tm.reshape(shp), Fj * Tsm.reshape(shp), Fj * Tcm.reshape(shp)], axis=2)
            ls, _, br = local_point_fit(resid, model, excl, xc_, yc_, sigma_psf=sigma_psf,
                                        sky_sigma=sigma, gain=gain, direction=(ux, uy), bkg=bkg_c,
                                        pos_err_along=model_pos_err_px[0], pos_err_cross=model_pos_err_px[1],
                                        flux_err=model_flux_err, star_modes=modes, half_size=Rl)
            loc_snr[cand_fl] = ls
            broad[cand_fl] = br
            point_diag = pd.DataFrame(dict(x=xc_, y=yc_, psf_snr=psf_snr[cand_fl], local_snr=ls, broad_ratio=br))
    timings["local_fit"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- classify candidates
    claimed = np.zeros((nyb, nxb), bool)
    claims_arr = np.zeros((max(len(sel), 1), 3))  # (x, y, r) of the point sources accepted so far
    n_claims = 0
    gain_e = float(gain)
    ang_drift = math.degrees(math.atan2(uy, ux))
    Psum = float(np.sum(K**2))
    order = sel[np.argsort(-np.nan_to_num(psf_snr[sel]))] if len(sel) else sel
    pos_in_sel = {int(s): i for i, s in enumerate(sel)}
    rb = int(math.ceil(0.5 * L / 2.0 + 6))
    edge_px = max(2 * R, int(math.ceil(2.0 * fwhm_px)))
    cr_rows = []
    segment_streaks = []
    for ci in order:
        i = pos_in_sel[int(ci)]
        x, y = float(FV[ci, 1]), float(FV[ci, 2])
        pyi, pxi = int(PY[ci]), int(PX[ci])
        byi, bxi = min(pyi // 2, nyb - 1), min(pxi // 2, nxb - 1)
        if claimed[byi, bxi] or streak_mask[pyi, pxi]:
            continue
        if n_claims:
            pc = claims_arr[:n_claims]
            if np.any((x - pc[:, 0]) ** 2 + (y - pc[:, 1]) ** 2 < pc[:, 2] ** 2):
                continue
        flags = 0
        if near_mask[ci]:
            flags |= FLAG_MASKED
        if x < edge_px or y < edge_px or x > nx - 1 - edge_px or y > ny - 1 - edge_px:
            flags |= FLAG_EDGE
        flux_adu = FV[ci, 0] / Psum
        ferr = math.sqrt(var_pk[ci] / Psum + max(flux_adu, 0) / gain_e * 1.0)
        base = dict(x=x, y=y, flux_e=flux_adu * gain_e, flux_err_e=ferr * gain_e,
                    snr=flux_adu / ferr if ferr > 0 else np.nan, psf_snr=float(psf_snr[ci]),
                    trail_snr=float(trail_snr[i]), trail_ratio=float(trail_ratio[i]),
                    sharp_ratio=float(sharp_ratio[ci]), peak_sigma=float(peak_sigma[ci]),
                    mjd_start=mjd_start, mjd_end=mjd_end)
        # --- cosmic ray
        sharp = sharp_ratio[ci] > sharp_threshold
        is_sharp = sharp and peak_sigma[ci] >= cr_sigma
        if dq_cr[ci] or is_sharp:
            zc5 = z5[ci]
            npx = int(np.sum(zc5 > 3.0))
            sub = "dqmask" if dq_cr[ci] else "sharp"
            score = 1.0 if dq_cr[ci] else float(min(1.0, sharp_ratio[ci] / (2 * sharp_threshold)))
            cr_rows.append(dict(base, **{"class": "cosmic_ray", "subclass": sub, "score": score, "npix": npx,
                                         "flags": flags | (FLAG_DQ_CR if dq_cr[ci] else 0)}))
            claims_arr[n_claims] = (x, y, 2.0)
            n_claims += 1
            continue
        weak = psf_snr[ci] < flash_sigma
        if (weak and loc_snr[ci] < flash_sigma) or sharp:
            continue  # too faint, or sharper than the PSF but too faint for a cosmic ray
        # --- footprint moments on the binned map
        y0s, y1s = max(0, byi - rb), min(nyb, byi + rb + 1)
        x0s, x1s = max(0, bxi - rb), min(nxb, bxi + rb + 1)
        stamp = Mz[y0s:y1s, x0s:x1s]
        thr_fp = max(2.5, 0.3 * float(Mz[byi, bxi]))
        lab, _ = ndi.label(stamp > thr_fp)
        lid = lab[byi - y0s, bxi - x0s]
        if lid == 0:
            fp = np.zeros_like(stamp, bool)
            fp[byi - y0s, bxi - x0s] = True
        else:
            fp = lab == lid
        yy, xx = np.nonzero(fp)
        wv = stamp[yy, xx].astype(float)
        wv = np.clip(wv, 1e-6, None)
        mx = float(np.sum(wv * xx) / wv.sum())
        my = float(np.sum(wv * yy) / wv.sum())
        cxx = float(np.sum(wv * (xx - mx) ** 2) / wv.sum()) * 4.0
        cyy = float(np.sum(wv * (yy - my) ** 2) / wv.sum()) * 4.0
        cxy = float(np.sum(wv * (xx - mx) * (yy - my)) / wv.sum()) * 4.0
        tr_ = 0.5 * (cxx + cyy)
        dd = math.sqrt(max(0.25 * (cxx - cyy) ** 2 + cxy**2, 0.0))
        l1, l2 = tr_ + dd, max(tr_ - dd, 0.0)
        ang = 0.5 * math.degrees(math.atan2(2 * cxy, cxx - cyy))
        length_m = math.sqrt(12.0 * max(l1 - l2, 0.0))
        width_m = FWHM_PER_SIGMA * math.sqrt(max(l2, 0.0))
        rel = (ang - ang_drift + 90.0) % 180.0 - 90.0
        # the footprint reaches the stamp border (not where the stamp is cut by the CCD edge)
        touches = (bool(fp[0, :].any()) and y0s > 0) or (bool(fp[-1, :].any()) and y1s < nyb) or \
                  (bool(fp[:, 0].any()) and x0s > 0) or (bool(fp[:, -1].any()) and x1s < nxb)
        shape = dict(length_px=length_m, width_px=width_m, angle_deg=ang, angle_rel_drift_deg=rel,
                     npix=int(fp.sum()) * 4)
        elongated = length_m > max(2.0 * fwhm_px, 0.35 * L) or touches
        trail_like = trail_ratio[i] > trail_ratio_threshold
        fx_full = (x0s + mx) * 2 + 0.5
        fy_full = (y0s + my) * 2 + 0.5
        if elongated or trail_like:
            if weak:
                continue  # only a flash may rest on the local fit alone
            drift_ok = abs(rel) <= angle_tol_deg
            len_ok = 0.5 * L <= length_m <= 1.6 * L
            claimed[y0s:y1s, x0s:x1s] |= fp
            # a drift-aligned residual on a catalogued trail is that star's, not a new object
            if (drift_ok or not elongated) and not touches:
                j, s_, c_ = on_trails(fx_full, fy_full, fit.half_width_px + fwhm_px, fit.half_width_px)
                if len(j):
                    continue
            if not drift_ok and (length_m > 2.0 * L or touches):
                # a straight streak too short for the Hough search (e.g. a CCD corner): fit it here
                th_n = math.radians(ang) + 0.5 * math.pi
                rho_n = fx_full * math.cos(th_n) + fy_full * math.sin(th_n)
                st = _refine_streak(resid, sigma, th_n, rho_n, fwhm_px, nx, ny, band_px=max(3.0 * fwhm_px, 12.0),
                                    trails=model)
                # and lit along the line on at least 2 chunks (64 px) clear of the trail model: a footprint
                # through the under-modelled halo of a bright trail and an unmodelled (edge, faint) trail
                # crossing the line beside it is lit so on one chunk or none (the false "segment" streaks
                # of the image-level runs: 62 in 576 CCD-exposures, none on a simulated satellite)
                if st is not None and math.hypot(st.x1 - st.x0, st.y1 - st.y0) >= 2.0 * L and st.coverage >= 0.6 \
                        and st.clear_lit_chunks >= MIN_SEGMENT_CLEAR_CHUNKS:
                    st.snr = max(st.snr, float(psf_snr[ci]))
                    streaks.append(st)
                    new_mask = rasterize_streak(st, data.shape)
                    streak_mask |= new_mask
                    segment_streaks.append(st)
                    bm = bin_image(new_mask, 2) > 0
                    claimed |= bm[:nyb, :nxb]
                    continue
            if (elongated and drift_ok and len_ok) or (trail_like and not elongated) or (
                    trail_like and drift_ok and not touches):
                cls, sub = "star_trail", "new"
                score = float(min(1.0, trail_ratio[i] / (2 * trail_ratio_threshold)))
                e = dict(x0=fx_full - 0.5 * L * ux, y0=fy_full - 0.5 * L * uy, x1=fx_full + 0.5 * L * ux,
                         y1=fy_full + 0.5 * L * uy)
            elif length_m > 4.0 * L or touches:
                cls, sub, score = "satellite", "fragment", 0.5
                e = {}
            else:
                cls, sub = "other_trail", "moving"
                score = float(min(1.0, abs(rel) / 45.0 + abs(length_m - L) / L))
                e = {}
            rows_out.append(dict(base, x=fx_full, y=fy_full, **shape, **e,
                                 **{"class": cls, "subclass": sub, "score": score, "flags": flags}))
            continue
        # --- flash
        if x < R + 1 or y < R + 1 or x > nx - 2 - R or y > ny - 2 - R:
            continue  # the PSF kernel is cut by the CCD edge: not classified as a flash (FLAG_EDGE marks 2 FWHM)
        if loc_snr[ci] < flash_sigma or broad[ci] > broad_ratio_max:
            continue  # explained by an error of the local trail model, or broader than the PSF
        j, s_, c_ = on_trails(x, y, FLASH_CONTACT_FWHM * fwhm_px, fwhm_px)
        extra = {}
        t_s = np.nan
        on = np.abs(c_) <= 1.5 * fwhm_px
        if on.any():
            jj = j[0]
            speed = Lc[jj] / exptime
            t_s = float(s_[0] / speed)
            k = int(math.floor(max(0.0, t_s) / geometry.sample_dt_s))
            extra = dict(on_star_id=tr["star_id"].iloc[tidx[jj]], sample_index=k, t_s=t_s,
                         t_mjd=mjd_start + t_s / SECONDS_PER_DAY, cross_offset_px=float(abs(c_[0])))
            flags |= FLAG_ON_TRAIL
        rest = slice(1, None) if on.any() else slice(None)
        if len(j[rest]):  # other trails the flash's light reaches: star, instant, offset
            t_near = s_[rest] / (Lc[j[rest]] / exptime)
            extra.update(
                near_star_ids=";".join(str(int(v)) for v in tr["star_id"].iloc[tidx[j[rest]]]),
                near_t_mjd=";".join(f"{mjd_start + v / SECONDS_PER_DAY:.9f}" for v in t_near),
                near_cross_offset_px=";".join(f"{abs(v):.2f}" for v in c_[rest]))
        score = float(min(1.0, (1.0 - trail_ratio[i] / trail_ratio_threshold) * 2.0 + 0.5)) \
            if trail_ratio[i] < trail_ratio_threshold else 0.1
        rows_out.append(dict(base, **shape, **extra, **{"class": "flash", "subclass": "point",
                                                        "score": max(score, 0.0), "flags": flags}))
        claims_arr[n_claims] = (x, y, 1.5 * fwhm_px)
        n_claims += 1

    # merge cosmic-ray candidates closer than 6 px (tracks give several maxima)
    if cr_rows:
        xy = np.array([[r["x"], r["y"]] for r in cr_rows])
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
        from scipy.spatial import cKDTree

        pairs = cKDTree(xy).query_pairs(6.0, output_type="ndarray")
        n = len(cr_rows)
        g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])) if len(pairs) else ([], ([], [])),
                       shape=(n, n))
        _, labels = connected_components(g, directed=False)
        for lab_ in np.unique(labels):
            members = [cr_rows[k] for k in np.flatnonzero(labels == lab_)]
            best = max(members, key=lambda r: r["peak_sigma"])
            if len(members) > 1:
                fl = np.array([max(m["flux_e"], 1e-9) for m in members])
                best = dict(best, x=float(np.sum(fl * [m["x"] for m in members]) / fl.sum()),
                            y=float(np.sum(fl * [m["y"] for m in members]) / fl.sum()),
                            flux_e=float(np.sum([m["flux_e"] for m in members])),
                            npix=int(np.sum([m["npix"] for m in members])),
                            flags=int(np.bitwise_or.reduce([m["flags"] for m in members])),
                            subclass="dqmask" if any(m["subclass"] == "dqmask" for m in members) else "sharp")
            rows_out.append(best)

    # dq-flagged cosmic rays with no candidate (faint): one row per flagged cluster
    if crm is not None and crm.any():
        cy_, cx_ = np.divmod(np.flatnonzero(crm), nx)  # same order as np.nonzero (~15x faster on a 2-D image)
        xy = np.stack([cx_, cy_], axis=1).astype(float)
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
        from scipy.spatial import cKDTree

        pairs = cKDTree(xy).query_pairs(1.5, output_type="ndarray")
        n = len(xy)
        g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])) if len(pairs) else ([], ([], [])),
                       shape=(n, n))
        ncomp, labels = connected_components(g, directed=False)
        vals = data[cy_, cx_] - (rows[cy_] + cols[cx_]) if cr_vals is None else cr_vals
        cnt = np.bincount(labels, minlength=ncomp)
        wsum = np.bincount(labels, weights=np.clip(vals, 1e-3, None), minlength=ncomp)
        mx = np.bincount(labels, weights=np.clip(vals, 1e-3, None) * cx_, minlength=ncomp) / wsum
        my = np.bincount(labels, weights=np.clip(vals, 1e-3, None) * cy_, minlength=ncomp) / wsum
        fl = np.bincount(labels, weights=vals, minlength=ncomp)
        pk = np.zeros(ncomp)
        np.maximum.at(pk, labels, vals)
        have = [(r["x"], r["y"]) for r in rows_out if r.get("class") == "cosmic_ray"]
        tree = cKDTree(np.array(have)) if have else None
        for k in range(ncomp):
            if tree is not None and tree.query_ball_point([mx[k], my[k]], 6.0):
                continue
            rows_out.append({"class": "cosmic_ray", "subclass": "dqmask", "score": 1.0, "x": float(mx[k]),
                             "y": float(my[k]), "flux_e": float(fl[k] * gain_e), "npix": int(cnt[k]),
                             "peak_sigma": float(pk[k] / sigma), "flags": FLAG_DQ_CR,
                             "mjd_start": mjd_start, "mjd_end": mjd_end})

    # detections inside a streak found later in the loop belong to the streak
    if segment_streaks and rows_out:
        rows_out = [r for r in rows_out
                    if not streak_mask[min(max(int(round(r["y"])), 0), ny - 1), min(max(int(round(r["x"])), 0), nx - 1)]]

    # ---------------------------------------------------------------- satellites
    for st in streaks:
        sub = "segment" if st in segment_streaks else ("dqmask" if st in dq_streaks else "hough")
        rows_out.append({"class": "satellite", "subclass": sub,
                         "score": float(min(1.0, st.coverage)),
                         "x": 0.5 * (st.x0 + st.x1), "y": 0.5 * (st.y0 + st.y1), "x0": st.x0, "y0": st.y0,
                         "x1": st.x1, "y1": st.y1, "rho_px": st.rho_px, "theta_deg": st.theta_deg,
                         "width_px": st.width_px, "length_px": math.hypot(st.x1 - st.x0, st.y1 - st.y0),
                         "angle_deg": (st.theta_deg + 90.0 + 90.0) % 180.0 - 90.0,
                         "angle_rel_drift_deg": ((st.theta_deg + 90.0) - ang_drift + 90.0) % 180.0 - 90.0,
                         "surface_brightness_e": st.surface_brightness_adu * gain_e, "snr": st.snr,
                         "flux_e": st.surface_brightness_adu * gain_e * math.hypot(st.x1 - st.x0, st.y1 - st.y0),
                         "mjd_start": mjd_start, "mjd_end": mjd_end, "flags": 0})

    # ---------------------------------------------------------------- catalogued trails
    if n_tr:
        mid_x = sx0 + 0.5 * Lc * uxc
        mid_y = sy0 + 0.5 * Lc * uyc
        flags_t = np.where(fit.n_masked > 0, FLAG_SATURATED, 0)
        if any_streak or segment_streaks:
            tp = fit.pixels
            hit = np.bincount(tp.star, weights=streak_mask.ravel()[tp.pix], minlength=n_tr)
            flags_t = flags_t | np.where(hit > 0, FLAG_STREAK_CROSSED, 0)
        edge = (np.minimum(sx0, sx0 + uxc * Lc) < 0) | (np.maximum(sx0, sx0 + uxc * Lc) > nx - 1) | \
               (np.minimum(sy0, sy0 + uyc * Lc) < 0) | (np.maximum(sy0, sy0 + uyc * Lc) > ny - 1)
        flags_t = flags_t | np.where(edge, FLAG_EDGE, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            snr_t = fit.flux / fit.flux_err
        trow = {
            "class": "star_trail", "subclass": "catalogued", "score": 1.0,
            "star_id": tr["star_id"].to_numpy()[tidx], "x": mid_x, "y": mid_y,
            "flux_e": fit.flux * gain_e, "flux_err_e": fit.flux_err * gain_e, "snr": snr_t,
            "length_px": Lc, "width_px": np.full(n_tr, float(fwhm_px)),
            "angle_deg": np.degrees(np.arctan2(uyc, uxc)),
            "angle_rel_drift_deg": (np.degrees(np.arctan2(uyc, uxc)) - ang_drift + 90.0) % 180.0 - 90.0,
            "x0": sx0, "y0": sy0, "x1": sx0 + Lc * uxc, "y1": sy0 + Lc * uyc,
            "mjd_start": mjd_start, "mjd_end": mjd_end, "flags": flags_t.astype(np.int64),
        }
    else:
        trow = {}
    table = _table_from_parts(trow, n_tr, rows_out)

    # ---------------------------------------------------------------- sky coordinates
    if wcs is not None and len(table):
        tt_ = table["t_s"].to_numpy(float)
        is_fl = (table["class"] == "flash").to_numpy()
        t_use = np.where(np.isfinite(tt_), tt_, np.where(is_fl, 0.5 * exptime, 0.0))
        rate = geometry.drift_rate_arcsec_s
        ra, dec = wcs.pixel_to_world_values(table["x"].to_numpy(float), table["y"].to_numpy(float))
        from ..geometry import offset_sky

        ra2, dec2 = offset_sky(ra, dec, -rate[0] * t_use, -rate[1] * t_use)
        # catalogued trails: the star is where the trail starts (t=0)
        is_tr = (table["class"] == "star_trail").to_numpy()
        ra_t, dec_t = wcs.pixel_to_world_values(table["x0"].to_numpy(float), table["y0"].to_numpy(float))
        table["ra"] = np.where(is_tr & np.isfinite(table["x0"].to_numpy(float)), ra_t, ra2)
        table["dec"] = np.where(is_tr & np.isfinite(table["x0"].to_numpy(float)), dec_t, dec2)
        rate_abs = math.hypot(*rate)
        table["pos_err_arcsec"] = np.where(is_fl & ~np.isfinite(tt_), 0.5 * exptime * rate_abs,
                                           np.where(is_fl, 0.0, np.nan))
    counts = {c: int((table["class"] == c).sum()) for c in CLASSES}
    timings["total"] = time.perf_counter() - t_start
    log.info("classified %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
    meta = dict(empirical_template=fit.empirical, sky_level_adu=level, sky_sigma_adu=sigma, timings=timings,
                n_streaks=len(streaks), point_candidates=point_diag)
    return ClassificationResult(table=table, streak_mask=streak_mask, counts=counts, model=model, sky_sigma=sigma,
                                streaks=streaks, meta=meta)
