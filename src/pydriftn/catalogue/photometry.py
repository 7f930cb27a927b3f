"""Detection, centroids, shapes and aperture photometry on one pointed CCD image.

Pure functions over arrays (image, masks, gain / saturation maps); no file
I/O. The steps, in order:

1. **Background and noise** on the image converted to electrons with the
   per-amplifier gain (so the sky has no step between amplifiers), with
   ``sep.Background`` (64-px meshes; sep is several times faster than
   photutils ``Background2D`` on a full DECam CCD). A second pass masks every
   detection out to where its wings fall below ~0.1 sky sigma, and the map is
   re-centred on the clipped mean of the unmasked residuals (sep's mode
   estimator is biased low by ~0.8 e- on a Poisson sky). The noise map used
   for photometric errors is ``sigma² = rms_bkg² + max(image − bkg, 0)``
   (e-²): measured background noise plus the Poisson noise of the sources.
2. **Detection** with ``sep.extract`` on the S/N image (3x3 smoothing,
   ``detect_thresh`` per pixel, deblending; given a per-pixel err array sep
   leaves neighbouring stars merged). dq-masked bad pixels (bad, hot, cosmic
   rays, streaks) are excluded; saturated and bleed pixels are *not* (the
   star is then one object).
3. **Centroids**: Source Extractor "windowed" positions (``sep.winpos``)
   with the window matched to each source's half-light radius (isophotal
   barycentre when that fails: ``centroid_fallback``). Saturated stars use
   their saturated core instead: x from the core columns, y from the point
   symmetry of the unmasked halo (the windowed algorithm is pulled along
   bleed trails).
4. **Photometry** (aperture, not PSF fitting): circular aperture of radius
   ``aperture_fwhm`` (0.8) × the PSF half-light diameter ``2 r_half`` (≈ 1
   FWHM for a Moffat beta = 3), corrected to the total with an aperture
   correction from the curve of growth of up to 100 bright (S/N > 150),
   isolated, unflagged stars: median over stars of the exact sum to 1.5
   sizes, plus medians over stars of 1-px annuli out to 4 sizes, each annulus'
   flux being its area times the 3-sigma-clipped mean of its pixels, with the
   pixels near other detections left out (crowded fields do not inflate it),
   extrapolated with a Moffat curve of growth fitted to it. The correction's
   error -- statistical, plus a systematic of half its difference from a
   Moffat fitted to the inner curve only, at least ``apcorr_sys_frac``
   (0.5 %, the accuracy reached on crowded simulated fields) -- is added to
   every flux error in quadrature. Aperture rather than PSF photometry: a
   few tens of ms per CCD, no PSF model, totals unbiased to < 1 % for the
   isolated stars the pipeline uses; PSF fitting of ~2000 stars per CCD with
   photutils would not fit the 2 s budget.
5. **Shapes**: ``fwhm_px`` = the source's half-light diameter scaled by
   FWHM / half-light diameter of the fitted Moffat (so it is the FWHM for
   PSF-like sources); ``ellipticity`` = 1 − b/a from the isophotal moments.
6. **Flags** (:mod:`.flags`, bits of :class:`pydriftn.flags.SampleFlag`) and
   the cut ``snr >= detect_sigma``.

Dropped (counted in the returned meta): detections sharper than the PSF or
with too much flux in one pixel (cosmic rays not in the mask), fragments of
saturated stars (other detections touching the same saturated blob), and
detections whose centroid is within half a PSF size of the CCD edge.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import sep
from scipy import ndimage
from scipy.optimize import least_squares
from scipy.spatial import cKDTree

from ..errors import CatalogueError, EmptyDataError
from .flags import SourceFlag

__all__ = ["MeasureOptions", "measure_sources", "noise_map", "moffat_growth"]

log = logging.getLogger(__name__)

_GAUSS_FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))
#: half-light diameter / FWHM of a Moffat profile with beta = 3
_HLD_PER_FWHM_MOFFAT3 = np.sqrt(np.sqrt(2.0) - 1.0) / np.sqrt(2.0 ** (1.0 / 3.0) - 1.0)


@dataclass
class MeasureOptions:
    """Knobs of :func:`measure_sources` (defaults suit DECam pointed images).

    Attributes
    ----------
    detect_sigma : float
        Keep detections with aperture ``flux / flux_err >= detect_sigma``.
    detect_thresh : float
        Per-pixel threshold of ``sep.extract`` in units of the background rms.
    minarea : int
        Minimum number of connected pixels above the threshold.
    deblend_cont : float
        sep/Source Extractor deblending contrast (0.001 separates an r = 20.5
        star 3.5" from an r = 16 one; the default 0.005 does not).
    aperture_fwhm : float
        Photometric aperture radius in units of the PSF's half-light
        diameter ``2 r_half`` (= the FWHM for a Gaussian PSF, 1.26 FWHM for a
        Moffat with beta = 3). All "FWHM" units of these options mean ``2 r_half``.
    growth_inner_fwhm, growth_outer_fwhm : float
        The curve of growth is the median exact aperture sum out to the inner
        radius plus the medians (over stars) of 1-px annuli (clipped means of
        their pixels) out to the outer radius; beyond it a fitted Moffat
        extrapolates.
    edge_drop_fwhm : float
        Detections whose centroid is closer than this (in PSF sizes) to the
        CCD edge are dropped (mostly off the CCD, biased centroid).
    apcorr_sys_frac : float
        Floor of the fractional systematic error of the aperture correction.
        The systematic is ``|measured − Moffat model of the inner curve| / 2``
        (see ``growth_model_fwhm``), at least this fraction; it is added in
        quadrature to the statistical error (and so to every flux error).
    growth_model_fwhm : float
        Outer radius (sizes) of the inner curve of growth the Moffat model of
        the systematic is fitted to.
    apcorr_min_snr : float
        Stars of the curve of growth need this S/N in the aperture.
    max_apcorr_stars : int
        At most this many (the brightest) stars build the curve of growth.
    blend_radius_fwhm : float
        A neighbour closer than this (in FWHM) sets ``BLENDED``.
    sharp_frac, sharp_peak_factor : float
        Unsaturated detections with ``fwhm_px < sharp_frac * FWHM``, or whose
        peak pixel holds more than ``sharp_peak_factor`` times the typical
        star's fraction of the aperture flux, are cosmic-ray-like and dropped.
    back_size : int
        Background mesh size (pixels).
    mask_sources_in_background : bool
        Re-estimate the background with the detections masked.
    fill_masked : bool
        Fill dq-masked pixels near sources (normalised Gaussian convolution,
        sigma 1 px) before centroiding and aperture photometry; the sources
        keep the MASKED_PIXELS flag.
    min_apcorr_stars : int
        Fewer bright isolated stars than this: the aperture correction comes
        from a Moffat(beta=3) profile of the measured FWHM with a 2 % error.
    """

    detect_sigma: float = 5.0
    detect_thresh: float = 1.5
    minarea: int = 5
    deblend_cont: float = 0.001
    aperture_fwhm: float = 0.8
    growth_inner_fwhm: float = 1.5
    growth_outer_fwhm: float = 4.0
    max_apcorr_stars: int = 100
    apcorr_min_snr: float = 150.0
    apcorr_sys_frac: float = 0.005
    growth_model_fwhm: float = 2.5
    edge_drop_fwhm: float = 0.5
    blend_radius_fwhm: float = 2.0
    sharp_frac: float = 0.55
    sharp_peak_factor: float = 1.8
    back_size: int = 64
    min_apcorr_stars: int = 3
    mask_sources_in_background: bool = True
    fill_masked: bool = True
    extra: dict = field(default_factory=dict)


def _as_map(value, shape, name):
    """Scalar, per-column ``(1, nx)`` or image-shaped value → float32 array broadcastable to ``shape``."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        v = float(arr)
        if not np.isfinite(v) or v <= 0:
            raise CatalogueError(f"{name}: expected a positive finite number, got {value!r}")
        return np.float32(v)
    ny, nx = shape
    if arr.ndim == 1 and arr.shape[0] == nx:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != nx or arr.shape[0] not in (1, ny):
        raise CatalogueError(
            f"{name}: expected a scalar, a per-column vector of length {nx} or an array of shape "
            f"{tuple(shape)}, got shape {arr.shape}"
        )
    return arr.astype(np.float32, copy=False)


def _at(mapv, x, y):
    """Value of a scalar-or-map at (rounded, clipped) pixel positions."""
    if np.ndim(mapv) == 0:
        return np.full(len(x), float(mapv))
    ny, nx = mapv.shape
    ix = np.clip(np.rint(x).astype(int), 0, nx - 1)
    iy = np.clip(np.rint(y).astype(int), 0, ny - 1) if ny > 1 else np.zeros(len(x), int)
    return mapv[iy, ix].astype(float)


def noise_map(sub, rms, gain):
    """Per-pixel noise (ADU): background rms and Poisson noise of the sources.

    Parameters
    ----------
    sub : ndarray
        Background-subtracted image (ADU).
    rms : ndarray or float
        Background noise (ADU), e.g. ``sep.Background.rms()``.
    gain : ndarray or float
        Gain (e-/ADU), scalar or per-pixel (per-amplifier) map.

    Returns
    -------
    ndarray
        ``sqrt(rms² + max(sub, 0) / gain)`` as float32.
    """
    out = np.maximum(sub, 0.0, dtype=np.float32)
    g = np.asarray(gain, dtype=np.float32)
    if g.ndim or g != 1:
        out /= g
    out += np.square(rms, dtype=np.float32)
    return np.sqrt(out, out=out)


def _clipped_mean(v, nsig=3.0, n_iter=5):
    """Mean of ``v`` after iterative symmetric ``nsig``-sigma clipping (MAD sigma)."""
    v = np.asarray(v, float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return 0.0
    keep = np.ones(len(v), bool)
    for _ in range(n_iter):
        med = np.median(v[keep])
        sd = 1.4826 * np.median(np.abs(v[keep] - med))
        new = np.abs(v - med) < nsig * max(sd, 1e-12)
        if new.sum() == 0 or np.array_equal(new, keep):
            break
        keep = new
    return float(np.mean(v[keep]))


def moffat_growth(r, alpha, beta):
    """Fraction of a Moffat profile's flux inside radius ``r``."""
    return 1.0 - (1.0 + (np.asarray(r, float) / alpha) ** 2) ** (1.0 - beta)


def _fit_growth(radii, ratios):
    """Fit a Moffat curve of growth to ``ratios = F(r)/F(r0)`` (r0 = radii[0]).

    Returns (alpha, beta) or None.
    """

    def resid(p):
        a, b = p
        g = moffat_growth(radii, a, b)
        return g / g[0] - ratios

    try:
        res = least_squares(resid, x0=[radii[0], 3.0], bounds=([0.05 * radii[0], 1.2], [20 * radii[0], 60.0]))
    except Exception:  # pragma: no cover - defensive
        return None
    if not res.success:
        return None
    return float(res.x[0]), float(res.x[1])


def _symmetric_y(sub, bad, xc, y0, rad, sat=None):
    """Row of the centre of point symmetry of the (unmasked) light around a saturated star.

    The star's halo and diffraction spikes are point-symmetric about the star,
    the bleed trail is not: minimise the mean squared difference between the
    (arcsinh-compressed) image and its 180° rotation about ``(xc, y)`` over
    pixels unmasked in both, for ``y`` within ±4 px of ``y0``.
    """
    from scipy.optimize import minimize_scalar

    ny, nx = sub.shape
    ix0, ix1 = max(int(xc - rad), 0), min(int(xc + rad) + 1, nx)
    iy0, iy1 = max(int(y0 - rad), 0), min(int(y0 + rad) + 1, ny)
    if ix1 - ix0 < 5 or iy1 - iy0 < 5:
        return y0
    I = np.arcsinh(np.clip(sub[iy0:iy1, ix0:ix1].astype(float), 0, None) / max(np.std(sub[iy0:iy1, ix0:ix1]) * 0.1, 1e-6))
    masked = bad[iy0:iy1, ix0:ix1]
    if sat is not None:
        masked = masked | ndimage.binary_dilation(sat[iy0:iy1, ix0:ix1], iterations=1)
    W = (~masked).astype(float)
    yy, xx = np.mgrid[iy0:iy1, ix0:ix1].astype(float)
    xr = 2 * xc - xx - ix0

    def cost(yc):
        yr = 2 * yc - yy - iy0
        Ir = ndimage.map_coordinates(I, [yr, xr], order=1, mode="constant", cval=0.0)
        Wr = ndimage.map_coordinates(W, [yr, xr], order=0, mode="constant", cval=0.0)
        ww = W * Wr
        if ww.sum() < 10:
            return 1e30
        return float(np.sum(ww * (I - Ir) ** 2) / ww.sum())

    res = minimize_scalar(cost, bounds=(y0 - 4.0, y0 + 4.0), method="bounded", options={"xatol": 0.01})
    return float(res.x) if res.success else y0


def _robust_growth(sub, bad, xs, ys, r_ap, r_in, r_out, width=1.0, others=None):
    """Curve of growth ``F(r) / F(r_ap)`` of a set of stars, robust to neighbours.

    Per star: the exact aperture sum to ``r_in``, then 1-px annuli whose flux
    is the annulus area times the 3-sigma-clipped mean of its pixels (a
    neighbour covering part of an annulus is clipped). The curve is the median
    over stars of the inner ratio plus the cumulative sum of the per-annulus
    medians over stars.

    Parameters
    ----------
    others : (ndarray (m, 2), ndarray (m,)), optional
        Positions and mask radii of all detections: pixels of a star's annuli
        within those radii of *another* detection are not used.

    Returns
    -------
    radii : ndarray (K,)
        ``r_in, r_in + width, ..., r_out``.
    curve : ndarray (K,)
        Median curve of growth at ``radii``.
    curve_err : ndarray (K,)
        Its standard error (quadrature sum of the per-annulus errors of the medians).
    """
    xs = np.asarray(xs, float)
    if others is not None:
        oxy, orad = others
        otree = cKDTree(oxy)
        omax = float(np.max(orad)) if len(orad) else 0.0
    ys = np.asarray(ys, float)
    n = len(xs)
    f_ap, _, _ = sep.sum_circle(sub, xs, ys, r_ap, mask=bad, subpix=5)
    f_ap = np.asarray(f_ap, float)
    f_in, _, _ = sep.sum_circle(sub, xs, ys, r_in, mask=bad, subpix=5)
    edges = np.arange(r_in, r_out + 1e-9, width)
    nk = len(edges) - 1
    areas = np.pi * (edges[1:] ** 2 - edges[:-1] ** 2)
    ann = np.full((n, nk), np.nan)
    ny, nx = sub.shape
    R = int(np.ceil(r_out)) + 1
    for i in range(n):
        ix, iy = int(round(xs[i])), int(round(ys[i]))
        x0, x1, y0, y1 = max(ix - R, 0), min(ix + R + 1, nx), max(iy - R, 0), min(iy + R + 1, ny)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        k = np.floor((np.hypot(xx - xs[i], yy - ys[i]) - r_in) / width).astype(int)
        sel = (k >= 0) & (k < nk) & ~bad[y0:y1, x0:x1]
        if others is not None:
            for j in otree.query_ball_point([xs[i], ys[i]], r_out + omax):
                dj = np.hypot(oxy[j, 0] - xs[i], oxy[j, 1] - ys[i])
                if dj < 0.5 or dj > r_out + orad[j]:
                    continue  # the star itself / too far to matter
                sel &= np.hypot(xx - oxy[j, 0], yy - oxy[j, 1]) >= orad[j]
        kk, vv = k[sel], sub[y0:y1, x0:x1][sel].astype(float)
        order = np.argsort(kk, kind="stable")
        kk, vv = kk[order], vv[order]
        bounds = np.searchsorted(kk, np.arange(nk + 1))
        for a in range(nk):
            v = vv[bounds[a]: bounds[a + 1]]
            if len(v) < 5:
                continue
            med = np.median(v)
            sd = 1.4826 * np.median(np.abs(v - med))
            if sd > 0:
                v = v[np.abs(v - med) < 3.0 * sd]
            ann[i, a] = np.mean(v) * areas[a] / f_ap[i]
    parts = np.column_stack([np.asarray(f_in, float) / f_ap, ann])  # (n, K)
    med = np.nanmedian(parts, axis=0)
    mad = 1.4826 * np.nanmedian(np.abs(parts - med), axis=0)
    cnt = np.maximum(np.sum(np.isfinite(parts), axis=0), 1)
    err = 1.2533 * mad / np.sqrt(cnt)
    return edges, np.cumsum(med), np.sqrt(np.cumsum(err**2))


def _fill_masked(sub, bad, filled, xs, ys, half, sigma=1.0):
    """Fill masked pixels of ``sub`` in boxes around ``(xs, ys)`` (in place).

    Normalised convolution with a Gaussian of ``sigma`` px over the unmasked
    pixels; pixels too far from any unmasked one stay masked. ``filled`` (bool
    image) is set where a value was filled in.
    """
    ny, nx = sub.shape
    for x, y in zip(xs, ys):
        ix, iy = int(round(x)), int(round(y))
        x0, x1, y0, y1 = max(ix - half, 0), min(ix + half + 1, nx), max(iy - half, 0), min(iy + half + 1, ny)
        box = (slice(y0, y1), slice(x0, x1))
        todo = bad[box] & ~filled[box]
        if not todo.any():
            continue
        w = (~bad[box]).astype(np.float32)
        num = ndimage.gaussian_filter(sub[box] * w, sigma, mode="constant")
        den = ndimage.gaussian_filter(w, sigma, mode="constant")
        ok = todo & (den > 0.05)
        sub[box][ok] = num[ok] / den[ok]
        filled[box][ok] = True


def _saturated_centroids(sat_lab, labels, sub=None, bad=None):
    """Centroid of each saturated star from its saturated blob.

    The bleed trail runs along columns. x = mean column of the blob's pixels
    in the core rows (where the blob is wider than the bleed); y = mean of the
    core rows weighted by their excess width, refined by the point symmetry of
    the unmasked halo (:func:`_symmetric_y`) when the image is given.
    """
    out = {}
    objs = ndimage.find_objects(sat_lab)
    for lab in labels:
        sl = objs[lab - 1]
        if sl is None:
            continue
        blob = sat_lab[sl] == lab
        width = blob.sum(axis=1).astype(float)
        rows = np.arange(sl[0].start, sl[0].stop, dtype=float)
        cols = np.arange(sl[1].start, sl[1].stop, dtype=float)
        base = np.percentile(width[width > 0], 25) if np.any(width > 0) else 0.0
        w = np.clip(width - base, 0.0, None) ** 2
        if w.sum() <= 0:
            w = width
        yc = float(np.sum(rows * w) / np.sum(w))
        core = blob[w > 0]
        xc = float(np.sum(core * cols[None, :]) / max(core.sum(), 1))
        if sub is not None:
            r_eq = np.sqrt(blob.sum() / np.pi)
            rad = float(np.clip(1.2 * r_eq + 8.0, 10.0, 60.0))
            yc = _symmetric_y(sub, bad, xc, yc, rad, sat=sat_lab > 0)
        out[lab] = (xc, yc)
    return out


def measure_sources(
    data,
    *,
    gain,
    saturation,
    read_noise=None,
    bad_mask=None,
    saturated_mask=None,
    exptime=1.0,
    fwhm_hint_px=None,
    options: MeasureOptions | None = None,
):
    """Detect and measure the sources of one CCD image.

    Parameters
    ----------
    data : ndarray, shape (ny, nx)
        Image in ADU (sky not subtracted is fine).
    gain : float or ndarray
        Gain (e-/ADU): scalar, per-column vector / ``(1, nx)`` map (one value
        per amplifier) or an image-shaped map.
    saturation : float or ndarray
        Saturation level (ADU) of the *raw* image values, same forms as ``gain``.
    read_noise : float, optional
        Read noise (e-); only used to sanity-check the measured noise.
    bad_mask : ndarray of bool, optional
        Pixels to ignore (bad, hot, cosmic rays, streaks, ...).
    saturated_mask : ndarray of bool, optional
        Pixels flagged saturated or bleed in the dq mask.
    exptime : float
        Exposure time (s) for the instrumental magnitudes.
    fwhm_hint_px : float, optional
        Seeing FWHM from the header (CP ``FWHM``), used only when fewer than
        three clean stars measure the PSF size (e.g. small cutouts).
    options : MeasureOptions, optional

    Returns
    -------
    sources : pandas.DataFrame
        One row per kept detection: ``x, y`` (0-based, windowed), ``pos_err_px``,
        ``flux, flux_err`` (e-, total), ``mag, mag_err`` (instrumental,
        ``-2.5 log10(flux / exptime)``), ``snr``, ``fwhm_px``, ``ellipticity``,
        ``theta_rad``, ``peak_adu``, ``nn_dist_px``, ``flags``
        (:class:`pydriftn.flags.SampleFlag` bits, see :mod:`.flags`),
        ``centroid_fallback`` (the windowed centroid failed; isophotal
        barycentre used).
    meta : dict
        ``fwhm_px`` (image), ``aperture_radius_px``, ``apcorr``,
        ``apcorr_err``, ``apcorr_nstars``, ``moffat_alpha_px``,
        ``moffat_beta``, ``sky_e``, ``sky_rms_e`` (per pixel), ``n_detected``,
        ``n_dropped_sharp``, ``n_dropped_fragments``, ``n_below_snr``,
        ``photometry`` (method description).

    Raises
    ------
    EmptyDataError
        No finite unmasked pixel, or a constant image.
    CatalogueError
        Bad gain/saturation arguments or no source detected.
    """
    opt = options or MeasureOptions()
    _tm = {}
    _t0 = time.perf_counter()
    data = np.asarray(data)
    if data.ndim != 2 or data.size == 0:
        raise EmptyDataError(f"expected a 2-d image with pixels, got shape {data.shape}")
    ny, nx = data.shape
    img = np.ascontiguousarray(data, dtype=np.float32)
    bad = ~np.isfinite(img)
    if bad_mask is not None:
        bad |= np.asarray(bad_mask, bool)
    if bad.all():
        raise EmptyDataError("all pixels are NaN/inf or masked")
    lo = float(np.min(img, where=~bad, initial=np.inf))
    hi = float(np.max(img, where=~bad, initial=-np.inf))
    if lo == hi:
        raise EmptyDataError(f"all unmasked pixels have the same value ({lo!r}): empty image")
    gain_m = _as_map(gain, img.shape, "gain")
    sat_m = _as_map(saturation, img.shape, "saturation")
    satpix = img >= sat_m  # saturation is judged on the raw ADU values
    if saturated_mask is not None:
        satpix |= np.asarray(saturated_mask, bool)
    # work in electrons: the sky is then continuous across amplifiers of
    # different gain (a step in ADU would bias the background near the boundary)
    img = np.multiply(img, gain_m, dtype=np.float32)
    if bad.any():
        step = max(1, int(np.sqrt(img.size / 250_000)))
        samp = img[::step, ::step][~bad[::step, ::step]]
        img[bad] = np.median(samp) if samp.size else np.median(img[~bad])  # neutral fill
    _tm["prepare"] = time.perf_counter() - _t0

    bkg = sep.Background(img, mask=bad, bw=opt.back_size, bh=opt.back_size, fw=3, fh=3)
    back = bkg.back()
    rms = bkg.rms()
    sub = img - back
    sub[bad] = 0.0
    sigma = None

    _tm['background1'] = time.perf_counter() - _t0
    sep.set_extract_pixstack(max(300000, img.size // 4))
    sep.set_sub_object_limit(4096)
    try:
        # detect on the S/N image: sep's deblending misbehaves when given a
        # per-pixel err array (neighbouring stars stay merged); with a smooth
        # rms map the S/N image has the same structure as the image
        snr_img = np.ascontiguousarray(sub / np.maximum(rms, 1e-12), dtype=np.float32)
        objs, seg = sep.extract(
            snr_img, opt.detect_thresh, mask=bad, minarea=opt.minarea, segmentation_map=True,
            deblend_cont=opt.deblend_cont,
        )
    except Exception as exc:  # sep raises plain Exception on buffer overflows
        raise CatalogueError(f"source extraction failed: {exc}") from exc
    n_det = len(objs)
    _tm['extract'] = time.perf_counter() - _t0
    if n_det == 0:
        raise CatalogueError("no source detected above the threshold")
    if opt.mask_sources_in_background:
        # second pass: background and rms with the detected sources (grown by
        # ~1 FWHM) masked, so star wings and faint neighbours do not bias them
        # each source is masked out to where its wings fall below ~0.1 sigma of
        # the sky (radius growing as peak S/N^(1/5), a Moffat-like r^-5..-6 wing)
        size0 = _GAUSS_FWHM * float(np.median(np.sqrt(objs["a"] * objs["b"])))
        rmask = size0 * np.clip((np.maximum(objs["peak"], 0.1) / 0.1) ** 0.2, 1.0, 4.0)
        srcmask = (seg > 0).astype(np.uint8)
        sep.mask_ellipse(srcmask, objs["x"], objs["y"], a=rmask, b=rmask, theta=np.zeros(n_det), r=1.0)
        srcmask = srcmask.astype(bool)
        bkg = sep.Background(img, mask=bad | srcmask, bw=opt.back_size, bh=opt.back_size, fw=3, fh=3)
        back = bkg.back()
        rms = bkg.rms()
        # sep's mesh statistic is a mode estimate (2.5 median - 1.5 mean), biased
        # low by ~0.8 e- for a Poisson sky of ~1000 e-: re-centre the map on the
        # clipped mean of the unmasked residuals (one offset per CCD)
        stride = max(1, img.size // 400_000)
        res = (img - back)[~(bad | srcmask)][::stride]
        back = back + _clipped_mean(res)
        sub = img - back
        sub[bad] = 0.0
    x0 = objs["x"].astype(float)
    y0 = objs["y"].astype(float)
    a = objs["a"].astype(float)
    b = objs["b"].astype(float)
    _tm['background2'] = time.perf_counter() - _t0

    # --- saturation: per-object, via the segmentation map and saturated blobs
    sat_lab, n_blobs = ndimage.label(satpix, structure=np.ones((3, 3), bool))
    obj_sat = np.zeros(n_det, bool)
    blob_of = np.zeros(n_det, int)
    drop_fragment = np.zeros(n_det, bool)
    blob_centres = {}
    if n_blobs:
        both = (seg > 0) & (sat_lab > 0)
        pairs = np.unique(np.stack([seg[both], sat_lab[both]]), axis=1) if both.any() else np.empty((2, 0), int)
        obj_sat[pairs[0] - 1] = True
        # the brightest object touching a blob is the star; others are fragments
        flux_iso = objs["flux"].astype(float)
        order = np.argsort(-flux_iso[pairs[0] - 1], kind="stable")
        seen = set()
        for k in order:
            o, lab = int(pairs[0, k]) - 1, int(pairs[1, k])
            if lab in seen:
                if blob_of[o] == 0:
                    drop_fragment[o] = True
                continue
            seen.add(lab)
            if blob_of[o] == 0:
                blob_of[o] = lab
            drop_fragment[o] = False
        blob_labels = sorted(set(blob_of[blob_of > 0].tolist()))
    # also aperture-based saturation below (an unsaturated detection cannot contain sat pixels)

    _tm['saturation'] = time.perf_counter() - _t0
    # --- preliminary image FWHM from bright, clean, isolated objects
    snr_iso = objs["flux"] / np.sqrt(np.maximum(objs["npix"], 1))  # objs are in S/N units
    clean0 = (~obj_sat) & (objs["flag"] == 0) & (snr_iso > 30)
    hint_ok = fwhm_hint_px is not None and np.isfinite(fwhm_hint_px) and fwhm_hint_px > 0
    if clean0.sum() >= 3:
        fwhm0 = float(np.median(_GAUSS_FWHM * np.sqrt(a[clean0] * b[clean0])))
    elif hint_ok:
        fwhm0 = float(fwhm_hint_px)
    else:
        fwhm0 = float(np.median(_GAUSS_FWHM * np.sqrt(a * b)))
    fwhm0 = float(np.clip(fwhm0, 1.5, 30.0))

    # --- fill masked pixels near sources (a bad column or a masked cosmic ray
    # through a star) by normalised Gaussian convolution, so that centroids and
    # aperture sums are not biased by the missing pixels (MASKED_PIXELS is kept)
    filled = np.zeros_like(bad)
    if opt.fill_masked and bad.any():
        nb0, _, _ = sep.sum_circle(bad.astype(np.float32), x0, y0, 2.0 * fwhm0, subpix=1)
        near = np.flatnonzero((np.asarray(nb0) > 0) & ~obj_sat)
        if len(near):
            _fill_masked(sub, bad, filled, x0[near], y0[near], half=int(np.ceil(3.0 * fwhm0)) + 2)
    bad_eff = bad & ~filled

    # --- shapes: half-light radius inside 3 FWHM
    rmax = np.full(n_det, 3.0 * fwhm0)
    rhalf, _ = sep.flux_radius(sub, x0, y0, rmax, 0.5, mask=bad_eff, subpix=5)
    fwhm_src = 2.0 * np.asarray(rhalf, float)
    ok_shape = (~obj_sat) & (objs["flag"] == 0) & (snr_iso > 30) & np.isfinite(fwhm_src)
    if ok_shape.sum() >= 3:
        fwhm_img = float(np.median(fwhm_src[ok_shape]))
    elif hint_ok:  # half-light diameter of a Moffat(beta=3) of the header FWHM
        fwhm_img = _HLD_PER_FWHM_MOFFAT3 * float(fwhm_hint_px)
        log.info("fewer than 3 clean stars to measure the PSF: using the header FWHM %.2f px", fwhm_hint_px)
    else:
        fwhm_img = fwhm0
    if not np.isfinite(fwhm_img) or fwhm_img <= 0:
        fwhm_img = fwhm0

    if n_blobs:
        blob_centres = _saturated_centroids(sat_lab, blob_labels, sub, bad)

    _tm['shapes'] = time.perf_counter() - _t0
    # --- windowed centroids
    sig = np.clip(np.where(np.isfinite(fwhm_src) & (fwhm_src > 0), fwhm_src, fwhm_img), 0.5 * fwhm_img, 2.0 * fwhm_img)
    sig = sig / _GAUSS_FWHM
    xw, yw, wflag = sep.winpos(sub, x0, y0, sig, mask=bad_eff)
    xw = np.asarray(xw, float)
    yw = np.asarray(yw, float)
    fallback = (wflag != 0) | ~np.isfinite(xw) | ~np.isfinite(yw) | (np.hypot(xw - x0, yw - y0) > max(2.0, 0.5 * fwhm_img))
    x = np.where(fallback, x0, xw)
    y = np.where(fallback, y0, yw)
    for i in np.flatnonzero(blob_of > 0):
        cx, cy = blob_centres.get(int(blob_of[i]), (x[i], y[i]))
        x[i], y[i] = cx, cy
    fallback &= blob_of == 0

    _tm['centroids'] = time.perf_counter() - _t0
    sigma = noise_map(sub, rms, 1.0)

    # --- aperture photometry
    r_ap = opt.aperture_fwhm * fwhm_img
    f_ap, e_ap, aflag = sep.sum_circle(sub, x, y, r_ap, err=sigma, mask=bad_eff, subpix=5)
    f_ap = np.asarray(f_ap, float)
    e_ap = np.asarray(e_ap, float)
    nbad, _, _ = sep.sum_circle(bad.astype(np.float32), x, y, r_ap, subpix=1)
    nsat, _, _ = sep.sum_circle(satpix.astype(np.float32), x, y, r_ap, subpix=1)
    obj_sat |= np.asarray(nsat) > 0
    peak = (objs["peak"].astype(float) * _at(rms, x0, y0) + _at(back, x0, y0)) / _at(gain_m, x0, y0)

    _tm['aperture'] = time.perf_counter() - _t0
    # --- neighbours
    tree = cKDTree(np.column_stack([x, y]))
    dist, idx = tree.query(np.column_stack([x, y]), k=2)
    nn = dist[:, 1] if n_det > 1 else np.full(n_det, np.inf)

    edge_dist = np.minimum.reduce([x + 0.5, nx - 0.5 - x, y + 0.5, ny - 0.5 - y])
    flags = np.zeros(n_det, np.int64)
    flags[obj_sat] |= SourceFlag.SATURATED
    flags[(edge_dist < r_ap + 1.0) | ((np.asarray(aflag) & sep.APER_TRUNC) != 0)] |= SourceFlag.NEAR_EDGE
    flags[(nn < opt.blend_radius_fwhm * fwhm_img) | ((objs["flag"] & sep.OBJ_MERGED) != 0)] |= SourceFlag.BLENDED
    flags[np.asarray(nbad) > 0] |= SourceFlag.MASKED_PIXELS

    _tm['flags'] = time.perf_counter() - _t0
    # --- aperture correction from the curve of growth of bright isolated stars
    snr_ap = np.where(e_ap > 0, f_ap / e_ap, 0.0)
    r_in = opt.growth_inner_fwhm * fwhm_img
    r_out = opt.growth_outer_fwhm * fwhm_img
    iso = nn > r_in + 1.0 * fwhm_img
    cog_sel = (flags == 0) & ~fallback & iso & (snr_ap > opt.apcorr_min_snr) & (edge_dist > r_out + 2)
    if cog_sel.sum() > opt.max_apcorr_stars:  # the brightest ones
        keep_idx = np.flatnonzero(cog_sel)[np.argsort(-f_ap[cog_sel], kind="stable")[: opt.max_apcorr_stars]]
        cog_sel = np.zeros(n_det, bool)
        cog_sel[keep_idx] = True
    alpha = beta = np.nan
    apcorr_model = None
    n_cog = int(cog_sel.sum())
    if n_cog >= opt.min_apcorr_stars:
        # neighbours are cut out of the annuli to where their light is < ~0.1 sky sigma
        nb_rad = np.clip(fwhm_img * np.clip((np.maximum(objs["peak"], 0.1) / 0.1) ** 0.2, 1.0, 4.0), 0, r_out)
        radii, curve, curve_err = _robust_growth(
            sub, bad, x[cog_sel], y[cog_sel], r_ap, r_in, r_out, others=(np.column_stack([x, y]), nb_rad)
        )
        fit = _fit_growth(np.concatenate([[r_ap], radii]), np.concatenate([[1.0], curve]))
        if fit is not None:
            alpha, beta = fit
            tail = 1.0 / moffat_growth(radii[-1], alpha, beta)
        else:
            tail = 1.0
        apcorr = float(curve[-1] * tail)
        # statistical error of the curve + half the extrapolation beyond r_out
        apcorr_err = float(np.hypot(curve_err[-1] * tail, 0.5 * (tail - 1.0) * apcorr))
        # model dependence: the correction a Moffat fitted to the inner curve
        # (<= 2.5 sizes, little neighbour light) predicts; its difference from
        # the measured one (faint neighbours / background in the outer annuli,
        # non-Moffat wings) is taken as a systematic error, with a small floor
        inner = radii <= opt.growth_model_fwhm * fwhm_img
        fit_in = _fit_growth(np.concatenate([[r_ap], radii[inner]]), np.concatenate([[1.0], curve[inner]]))
        apcorr_model = float(1.0 / moffat_growth(r_ap, *fit_in)) if fit_in is not None else apcorr
        sys_err = max(0.5 * abs(apcorr - apcorr_model), opt.apcorr_sys_frac * apcorr)
        apcorr_err = float(np.hypot(apcorr_err, sys_err))
    else:
        # Moffat(beta=3) whose half-light radius is the measured one
        beta = 3.0
        alpha = 0.5 * fwhm_img / np.sqrt(2.0 ** (1.0 / (beta - 1.0)) - 1.0)
        apcorr = float(1.0 / moffat_growth(r_ap, alpha, beta))
        apcorr_err = 0.02 * apcorr
        log.warning(
            "only %d bright isolated stars for the aperture correction (need %d): "
            "using a Moffat(beta=3) profile of half-light diameter %.2f px, correction %.3f ± 2%%",
            n_cog, opt.min_apcorr_stars, fwhm_img, apcorr,
        )

    _tm['apcorr'] = time.perf_counter() - _t0
    hld_img = fwhm_img  # half-light diameter of the PSF (the size unit used above)
    if np.isfinite(alpha) and np.isfinite(beta):
        psf_fwhm = float(2.0 * alpha * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
        fwhm_src = fwhm_src * (psf_fwhm / hld_img)
        fwhm_img = psf_fwhm

    flux = f_ap * apcorr  # electrons
    flux_err = np.sqrt((e_ap * apcorr) ** 2 + (f_ap * apcorr_err) ** 2)
    snr = np.where(flux_err > 0, flux / flux_err, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mag = np.where(flux > 0, -2.5 * np.log10(flux / float(exptime)), np.nan)
        mag_err = np.where(flux > 0, 2.5 / np.log(10) * flux_err / flux, np.nan)
    # centroid error: sigma_psf/snr, up to sqrt(2) larger when background-dominated
    var_bkg = np.pi * r_ap**2 * _at(rms, x, y) ** 2
    sig_psf = hld_img / _GAUSS_FWHM
    var_tot = np.maximum(e_ap**2, 1e-30)
    pos_err = sig_psf * np.sqrt(1.0 + np.clip(var_bkg / var_tot, 0, 1)) / np.maximum(snr_ap, 1e-3)

    with np.errstate(invalid="ignore"):
        ellip = np.where(a > 0, 1.0 - b / a, np.nan)
    # cosmic-ray-like: much smaller than the PSF, or far too much of the flux in one pixel
    peak_e = objs["peak"].astype(float) * _at(rms, x0, y0)
    with np.errstate(invalid="ignore", divide="ignore"):
        peak_frac = np.where(f_ap > 0, peak_e / f_ap, np.inf)
    ref_pf = np.median(peak_frac[(flags == 0) & (snr_ap > 30)]) if np.sum((flags == 0) & (snr_ap > 30)) >= 3 else np.nan
    # (sizes and peaks of faint sources are noisy: below S/N 20 only gross outliers)
    hi = snr_ap > 20
    sharp = (~obj_sat) & (
        (hi & np.isfinite(fwhm_src) & (fwhm_src < opt.sharp_frac * fwhm_img))
        | (np.isfinite(ref_pf) & hi & (peak_frac > opt.sharp_peak_factor * ref_pf))
        | (np.isfinite(ref_pf) & ~hi & (peak_frac > 2.0 * opt.sharp_peak_factor * ref_pf))
    )
    keep_snr = (snr >= opt.detect_sigma) | obj_sat
    # centroid within half a PSF size of the edge: most of the star is off the CCD and its
    # position is biased by the truncation (> 1" on the simulator) -- not catalogued
    off_edge = (edge_dist < opt.edge_drop_fwhm * hld_img) & (blob_of == 0)
    keep = keep_snr & ~sharp & ~drop_fragment & ~off_edge
    # fragments / halo pieces of saturated stars: within the saturated star's reach
    sat_stars = np.flatnonzero(keep & (blob_of > 0))
    if len(sat_stars):
        blob_sizes = np.bincount(sat_lab.ravel())
        reach = np.array([3.0 * np.sqrt(blob_sizes[blob_of[i]]) + 2 * fwhm_img for i in sat_stars])
        for i, rr in zip(sat_stars, reach):
            near = np.hypot(x - x[i], y - y[i]) < rr
            near[i] = False
            flags[near] |= SourceFlag.BLENDED  # in the halo / bleed of a saturated star

    meta = {
        "fwhm_px": fwhm_img,
        "halflight_diameter_px": float(hld_img),
        "aperture_radius_px": float(r_ap),
        "apcorr": apcorr,
        "apcorr_err": apcorr_err,
        "apcorr_nstars": n_cog,
        "apcorr_model": apcorr_model,
        "moffat_alpha_px": float(alpha),
        "moffat_beta": float(beta),
        "sky_e": float(np.mean(back)),
        "sky_rms_e": float(bkg.globalrms),
        "n_detected": int(n_det),
        "n_dropped_sharp": int((sharp & keep_snr).sum()),
        "n_dropped_fragments": int((drop_fragment & keep_snr).sum()),
        "n_below_snr": int((~keep_snr).sum()),
        "n_dropped_edge": int((off_edge & keep_snr & ~sharp & ~drop_fragment).sum()),
        "photometry": (
            f"aperture r={opt.aperture_fwhm:g}xFWHM with aperture correction from the curve of growth "
            f"of bright isolated stars (clipped annuli) to {opt.growth_outer_fwhm:g}xFWHM + Moffat extrapolation"
        ),
    }
    _tm["total"] = time.perf_counter() - _t0
    meta["timing_s"] = {k: round(v, 4) for k, v in _tm.items()}
    if read_noise is not None:
        meta["read_noise_e"] = float(np.mean(read_noise))
    src = pd.DataFrame(
        {
            "x": x, "y": y, "pos_err_px": pos_err,
            "flux": flux, "flux_err": flux_err, "mag": mag, "mag_err": mag_err, "snr": snr,
            "fwhm_px": fwhm_src, "ellipticity": ellip, "theta_rad": objs["theta"].astype(float),
            "peak_adu": peak, "nn_dist_px": nn, "flags": flags, "centroid_fallback": fallback,
        }
    )[keep].reset_index(drop=True)
    # recompute neighbour distance among kept sources (dropped junk is not a neighbour)
    if len(src) > 1:
        d, _ = cKDTree(src[["x", "y"]].to_numpy()).query(src[["x", "y"]].to_numpy(), k=2)
        src["nn_dist_px"] = d[:, 1]
    elif len(src) == 1:
        src["nn_dist_px"] = np.inf
    if len(src) == 0:
        raise CatalogueError(f"no source above {opt.detect_sigma:g} sigma")
    log.debug("measured %d sources (of %d detections), FWHM %.2f px, apcorr %.4f", len(src), n_det, fwhm_img, apcorr)
    return src, meta
