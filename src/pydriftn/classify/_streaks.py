"""Satellite streaks: long straight features at any angle.

Detection is a thresholded Hough transform of a heavily binned
(``bin_px`` x ``bin_px``) residual image (star trails already subtracted):
binning keeps the per-bin signal-to-noise of a streak narrower than a bin
unchanged while cutting the number of pixels voting by ``bin_px**2``, and
each bin votes only if it is above ``on_sigma``. A line's vote count is
compared with the binomial expectation for the bins the line crosses, so a
faint streak that is below the noise in every pixel but covers the CCD is
still found. Each detection is refined at full resolution on a
"straightened" cut through the image (cross-track profile in segments along
the line: median across the segment, robust to the stars it crosses), which
gives the angle, offset, width, surface brightness and the extent.

scikit-image is not a dependency and its Hough transform needs a full-
resolution edge map (far too slow for 8 Mpixel in the time budget), hence
this small implementation with ``np.bincount``.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["Streak", "find_streaks", "bin_image"]

log = logging.getLogger(__name__)


@dataclass
class Streak:
    """One satellite streak (full-resolution, 0-based pixels)."""

    x0: float
    y0: float
    x1: float
    y1: float
    rho_px: float  # x cos(theta) + y sin(theta) = rho
    theta_deg: float
    width_px: float  # FWHM of the cross profile
    surface_brightness_adu: float  # ADU per pixel of length
    snr: float
    mask_half_width_px: float
    coverage: float
    #: lit 32 px chunks of the line at least half clear of modelled trails (-1: no trail model given)
    clear_lit_chunks: int = -1


def bin_image(a, b):
    """Sum ``a`` in ``b`` x ``b`` blocks (the ragged edge is dropped); float32 unless ``a`` is float64.

    A boolean ``a`` is summed as 0/1 (counts), without a float copy of the image.
    """
    ny, nx = a.shape
    nyb, nxb = ny // b, nx // b
    v = a[: nyb * b, : nxb * b]
    # strided adds (b + b passes over contiguous rows) are ~5x faster than reshape + sum(axis); the first two
    # rows (columns) added into a new array directly (no copy first: the same sums, in the same order)
    dt = np.float64 if v.dtype == np.float64 else np.float32
    if b == 1:
        return v.astype(dt)
    out = np.empty((nyb, nxb), dt)
    # in blocks of 32 output rows: the row sums of a block are still in the cache for the column sums (the same
    # sums in the same order as on the whole image; ~30 % faster on a full CCD)
    for s0 in range(0, nyb, 32):
        s1 = min(nyb, s0 + 32)
        vv = v[s0 * b:s1 * b]
        r = np.add(vv[0::b], vv[1::b], dtype=dt)
        for k in range(2, b):
            r += vv[k::b]
        o = out[s0:s1]
        np.add(r[:, 0::b], r[:, 1::b], out=o)
        for k in range(2, b):
            o += r[:, k::b]
    return out


@functools.lru_cache(maxsize=8)
def _hough_norm(nyb, nxb, n_theta):
    yy, xx = np.mgrid[0:nyb, 0:nxb]
    return _hough(xx.ravel().astype(float), yy.ravel().astype(float), nyb, nxb, n_theta)


def _hough(x, y, nyb, nxb, n_theta):
    th = np.arange(n_theta) * (math.pi / n_theta)
    diag = int(math.ceil(math.hypot(nyb, nxb))) + 2
    nr = 2 * diag + 1
    cos, sin = np.cos(th), np.sin(th)
    acc = np.zeros(n_theta * nr)
    for a in range(0, n_theta, 32):
        b = min(n_theta, a + 32)
        r = np.rint(x[None, :] * cos[a:b, None] + y[None, :] * sin[a:b, None]).astype(np.int64) + diag
        idx = (np.arange(b - a)[:, None] * nr + r).ravel()
        # counts of this chunk's angles only (the same integer counts as a bincount over the whole accumulator)
        acc[a * nr:b * nr] += np.bincount(idx, minlength=(b - a) * nr)
    acc = acc.reshape(n_theta, nr)
    # band of 3 rho bins
    band = acc.copy()
    band[:, 1:] += acc[:, :-1]
    band[:, :-1] += acc[:, 1:]
    return band, th, diag


def _straighten(img, xc, yc, vx, vy, a, c):
    """Sample ``img`` at points ``(xc, yc) + a*v + c*n`` (n = v rotated +90°)."""
    nxv, nyv = -vy, vx
    A, C = np.meshgrid(a, c, indexing="ij")
    X = xc + A * vx + C * nxv
    Y = yc + A * vy + C * nyv
    return ndi.map_coordinates(img, [Y.ravel(), X.ravel()], order=1, mode="constant", cval=np.nan).reshape(A.shape)


def _line_extent(xc, yc, vx, vy, nx, ny):
    """Parameter range a for which (xc, yc) + a v is inside the image."""
    lo, hi = -1e9, 1e9
    for p, v, n in ((xc, vx, nx), (yc, vy, ny)):
        if abs(v) < 1e-12:
            if not (-0.5 <= p <= n - 0.5):
                return 0.0, 0.0
            continue
        t0, t1 = (-0.5 - p) / v, (n - 0.5 - p) / v
        lo, hi = max(lo, min(t0, t1)), min(hi, max(t0, t1))
    return lo, hi


def _nanmedian0(S):
    """``np.nanmedian(S, axis=0)`` of a 2-D array by one sort (NaN sort last); NaN for all-NaN columns.

    Same values as numpy's (mean of the two middle values), without its slow
    masked-array path for small arrays.
    """
    A = np.sort(S, axis=0)
    n = S.shape[0] - np.count_nonzero(np.isnan(S), axis=0)
    cols = np.arange(S.shape[1])
    lo = np.maximum((n - 1) // 2, 0)
    hi = np.maximum(n // 2, 0)
    out = (A[lo, cols] + A[hi, cols]) / 2.0
    return np.where(n > 0, out, np.nan)


def _chunk_medians(v, nch):
    """``[np.median(v[ch]) for ch in np.array_split(np.arange(len(v)), nch)]`` (the same values) as an array.

    ``array_split`` gives ``len(v) % nch`` chunks of ``len(v) // nch + 1``
    values, then chunks of ``len(v) // nch``: one ``np.median`` along the rows
    of each of the two reshaped blocks instead of one call per chunk.
    """
    q, n1 = divmod(len(v), nch)
    k = n1 * (q + 1)
    parts = []
    if n1:
        parts.append(np.median(v[:k].reshape(n1, q + 1), axis=1))
    if nch > n1:
        parts.append(np.median(v[k:].reshape(nch - n1, q), axis=1))
    return np.concatenate(parts)


def _segment_nanmedians(S, nseg):
    """``[_nanmedian0(S[sg]) for sg in np.array_split(np.arange(len(S)), nseg)]`` (the same values).

    The segments come in two lengths (``array_split``): each group is sorted
    at once along its rows (NaN last) and read at every column's count.
    """
    q, n1 = divmod(len(S), nseg)
    k = n1 * (q + 1)
    out = []
    for blk, m, ln in ((S[:k], n1, q + 1), (S[k:], nseg - n1, q)):
        if m == 0:
            continue
        if ln == 0:  # (empty segments: all-NaN profiles, as _nanmedian0 of no rows)
            out.extend(np.full((m, S.shape[1]), np.nan))
            continue
        B = np.sort(blk.reshape(m, ln, S.shape[1]), axis=1)
        n = ln - np.count_nonzero(np.isnan(B), axis=1)  # (m, ncol)
        lo = np.take_along_axis(B, np.maximum((n - 1) // 2, 0)[:, None, :], 1)[:, 0]
        hi = np.take_along_axis(B, np.maximum(n // 2, 0)[:, None, :], 1)[:, 0]
        with np.errstate(all="ignore"):
            med = (lo + hi) / 2.0
        out.extend(np.where(n > 0, med, np.nan))
    return out


def _chunk_medians_where(v, chunks, use):
    """Median of ``v`` over the positions ``use`` of each chunk (NaN where none)."""
    return np.array([np.median(v[ch][use[ch]]) if use[ch].any() else np.nan for ch in chunks])


def _along_the_line(S_chunk, chunk_value) -> bool:
    """Is a lit chunk's light a line along the cut (a satellite) rather than a source crossing it?

    ``S_chunk``: the chunk's straightened band (positions x cross offsets, 0.5 px steps). A streak along
    the line has the same cross profile at every position, so the band sum of its median cross profile is
    the chunk's median band sum; a trail crossing the band at an angle lies at a different cross offset
    at each position, and its median profile holds half of that or less.
    """
    if S_chunk.shape[0] == 0 or not np.isfinite(chunk_value) or chunk_value <= 0:
        return False
    with np.errstate(all="ignore"):
        prof = np.nan_to_num(_nanmedian0(S_chunk))
    return bool(np.sum(prof) * 0.5 >= 0.5 * chunk_value)


def _refine(img, sigma, theta, rho, fwhm, nx, ny, band_px, gain=None, trails=None):
    """Refine a coarse line at full resolution; return a Streak or None.

    ``trails`` (optional): the star-trail model image (ADU, same shape); where
    it exceeds the sky noise ``sigma`` the line's band crosses a
    modelled trail, and its ``coverage`` (the fraction of 32 px chunks
    between the first and last lit ones that are lit) counts only the chunks
    at least half clear of trails, if there is one: a satellite is lit
    between the trails too, while a line through a few bright trails'
    residuals or halos is lit only on them (on the image-level simulations,
    lines through three or four bright trails that happened to line up, or
    through the halos of two saturated ones, were masked as streaks, and the
    stars on them lost the exposure). ``clear_lit_chunks`` counts the lit
    chunks clear of trails whose light lies along the line (see
    :func:`_along_the_line`; -1 without ``trails``).
    """
    for it in range(2):
        nxv, nyv = math.cos(theta), math.sin(theta)  # normal
        vx, vy = -nyv, nxv  # along
        xc0, yc0 = rho * nxv, rho * nyv
        lo, hi = _line_extent(xc0, yc0, vx, vy, nx, ny)
        if hi - lo < 10:
            return None
        a = np.arange(lo, hi, 2.0)
        c = np.arange(-band_px, band_px + 0.25, 0.5)
        S = _straighten(img, xc0, yc0, vx, vy, a, c)
        nseg = max(2, min(16, int((hi - lo) // 128)))
        segs = np.array_split(np.arange(len(a)), nseg)
        profs = _segment_nanmedians(S, nseg)
        cen, wts, amid = [], [], []
        for sg, prof in zip(segs, profs):
            if not np.isfinite(prof).any():
                continue
            prof = np.nan_to_num(prof)
            k = int(np.argmax(ndi.uniform_filter1d(prof, 5)))
            win = np.abs(c - c[k]) <= max(1.5 * fwhm, 3.0)
            p = np.clip(prof[win], 0, None)
            if p.sum() <= 0:
                continue
            cen.append(float(np.sum(p * c[win]) / p.sum()))
            wts.append(float(p.sum()))
            amid.append(float(np.mean(a[sg])))
        if len(cen) < 2:
            return None
        cen, wts, amid = np.array(cen), np.array(wts), np.array(amid)
        # robust line fit c(a) = c0 + k a
        good = np.ones(len(cen), bool)
        for _ in range(3):
            if good.sum() < 2:
                break
            k_, c0_ = np.polyfit(amid[good], cen[good], 1, w=np.sqrt(wts[good]))
            r = cen - (c0_ + k_ * amid)
            mad = np.median(np.abs(r[good])) * 1.4826 + 0.1
            good = np.abs(r) < 3 * mad + 0.5
        # new line: points (xc0, yc0) + a v + (c0 + k a) m, with m = (-vy, vx) = -n the cut's c axis
        dth = math.atan(k_)
        px, py = xc0 - c0_ * nxv, yc0 - c0_ * nyv
        theta = theta + dth
        nxv, nyv = math.cos(theta), math.sin(theta)
        rho = px * nxv + py * nyv
        band_px = max(5.0 * fwhm, 16.0)
    theta = theta % (2 * math.pi)
    if theta >= math.pi:
        theta -= math.pi
        rho = -rho
    nxv, nyv = math.cos(theta), math.sin(theta)
    vx, vy = -nyv, nxv
    xc0, yc0 = rho * nxv, rho * nyv
    lo, hi = _line_extent(xc0, yc0, vx, vy, nx, ny)
    a = np.arange(lo, hi, 1.0)
    c = np.arange(-band_px, band_px + 0.25, 0.5)
    S = _straighten(img, xc0, yc0, vx, vy, a, c)
    with np.errstate(all="ignore"):
        prof = np.nan_to_num(_nanmedian0(S))
    # local baseline from the wings of the cut (the global sky is biased by the sources)
    wings = np.abs(c) > max(3.0 * fwhm, 8.0)
    if wings.sum() >= 4:
        base = float(np.median(prof[wings]))
        prof = prof - base
        S = S - base
    core = np.abs(c) <= max(2.0 * fwhm, 4.0)
    p = prof[core]
    sb = float(np.sum(p) * 0.5)  # ADU per px length (c step 0.5)
    pp = np.clip(p, 0, None)
    if pp.sum() <= 0 or sb <= 0:
        return None
    var = float(np.sum(pp * c[core] ** 2) / pp.sum())
    width_sigma = math.sqrt(max(var, 0.09))
    # along-line extent in chunks of 32 px
    hwb = max(2.0 * width_sigma, 2.0)
    inb = np.abs(c) <= hwb
    with np.errstate(all="ignore"):
        along = np.nansum(S[:, inb], axis=1) * 0.5  # ADU per px length
    nch = max(1, len(a) // 32)
    chunks = np.array_split(np.arange(len(a)), nch)
    # noise of a chunk median of band sums: sigma*sqrt(2 hwb) per px of length, / sqrt(len)
    chunk_val = _chunk_medians(along, nch)
    chunk_err = sigma * math.sqrt(2 * hwb) / np.sqrt(np.array([len(ch) for ch in chunks], float)) * 1.25
    sig_ch = chunk_val / chunk_err
    on = sig_ch > 3.0
    if not on.any():
        return None
    i0 = int(np.argmax(on))
    i1 = len(on) - 1 - int(np.argmax(on[::-1]))
    coverage = float(on[i0:i1 + 1].mean())
    clear_lit_chunks = -1
    if trails is not None:
        clear_lit_chunks = 0
        T = _straighten(trails, xc0, yc0, vx, vy, a, c[inb])
        with np.errstate(invalid="ignore"):
            clear_pos = ~(np.nan_to_num(T, nan=0.0) > sigma).any(axis=1)
        clear = np.array([clear_pos[ch].mean() >= 0.5 for ch in chunks])
        span = clear[i0:i1 + 1]
        if span.any():  # (else no stretch of the line is clear of trails: the plain coverage)
            val_clear = _chunk_medians_where(along, chunks, clear_pos)
            lit_clear = val_clear / chunk_err > 3.0
            coverage = float(lit_clear[i0:i1 + 1][span].mean())
            clear_lit_chunks = sum(_along_the_line(S[ch][clear_pos[ch]][:, inb], val_clear[k])
                                   for k, ch in enumerate(chunks) if i0 <= k <= i1 and clear[k] and lit_clear[k])
    a0 = a[chunks[i0][0]]
    a1 = a[chunks[i1][-1]]
    snr = float(np.sum(chunk_val[i0:i1 + 1]) / math.sqrt(np.sum(chunk_err[i0:i1 + 1] ** 2)))
    peak = sb / (math.sqrt(2 * math.pi) * width_sigma)
    hwm = width_sigma * math.sqrt(2 * math.log(max(2 * peak / sigma, 1.0001))) if peak > 0.5 * sigma else 0.0
    hwm = max(hwm, 1.5 * fwhm, 3.0 * width_sigma) + 1.0
    return Streak(
        x0=float(xc0 + a0 * vx), y0=float(yc0 + a0 * vy), x1=float(xc0 + a1 * vx), y1=float(yc0 + a1 * vy),
        rho_px=float(rho), theta_deg=math.degrees(theta), width_px=2.3548 * width_sigma,
        surface_brightness_adu=sb, snr=snr, mask_half_width_px=float(hwm), coverage=coverage,
        clear_lit_chunks=clear_lit_chunks,
    )


def rasterize_streak(st, shape, margin=None):
    """Boolean mask of the pixels within ``mask_half_width_px`` of the streak segment."""
    ny, nx = shape
    m = np.zeros(shape, bool)
    hw = st.mask_half_width_px
    margin = hw if margin is None else margin
    th = math.radians(st.theta_deg)
    vx, vy = -math.sin(th), math.cos(th)
    L = math.hypot(st.x1 - st.x0, st.y1 - st.y0)
    if (st.x1 - st.x0) * vx + (st.y1 - st.y0) * vy < 0:
        vx, vy = -vx, -vy
    a = np.arange(-margin, L + margin + 0.5, 0.5)
    c = np.arange(-hw, hw + 0.25, 0.5)
    A, C = np.meshgrid(a, c, indexing="ij")
    X = np.rint(st.x0 + A * vx - C * vy).astype(np.int64).ravel()
    Y = np.rint(st.y0 + A * vy + C * vx).astype(np.int64).ravel()
    ok = (X >= 0) & (X < nx) & (Y >= 0) & (Y < ny)
    m[Y[ok], X[ok]] = True
    return m


def find_streaks(resid, sigma, *, fwhm_px, bin_px=16, on_sigma=1.5, detect_sigma=8.0, max_streaks=5,
                 min_length_px=150.0, n_theta=360, ignore=None, background_binned2=None, binned2=None,
                 trails=None):
    """Find long straight streaks in a (trail-subtracted) residual image.

    Parameters
    ----------
    resid : ndarray (ny, nx)
        Residual image in ADU, sky and star trails removed, masked pixels 0.
    sigma : float
        Sky noise per pixel (ADU).
    fwhm_px : float
    bin_px : int
        Binning of the Hough image.
    on_sigma : float
        A bin votes when above this many sigma.
    detect_sigma : float
        Significance of the vote excess needed for a detection.
    min_length_px : float
        Shortest streak reported.
    ignore : ndarray bool, optional
        Pixels not to use (set to 0 before binning).
    background_binned2 : ndarray, optional
        Smooth background of the 2x2-binned residual (subtracted after binning).
    binned2 : ndarray, optional
        ``bin_image(resid, 2)`` if already computed (then, with ``ignore`` None
        and an even ``bin_px``, the Hough image is binned from it: the same
        block sums, in float32 rounding, without another pass over the image).
    trails : ndarray, optional
        The star-trail model subtracted from ``resid``: a candidate's coverage
        counts only the stretches of the line clear of modelled trails (see
        ``_refine``).

    Returns
    -------
    list of Streak
    """
    ny, nx = resid.shape
    if binned2 is not None and ignore is None and bin_px % 2 == 0 and binned2.shape == (ny // 2, nx // 2):
        B = bin_image(binned2, bin_px // 2)  # (ny // 2) // (bin_px // 2) == ny // bin_px: the same blocks
    else:
        img = resid if ignore is None else np.where(ignore, 0.0, resid).astype(np.float32)
        B = bin_image(img, bin_px)
    if background_binned2 is not None and bin_px % 2 == 0:
        bg = bin_image(background_binned2, bin_px // 2)
        B = B - bg[: B.shape[0], : B.shape[1]]
    nyb, nxb = B.shape
    if nyb < 4 or nxb < 4:
        return []
    med = float(np.median(B))
    p16 = float(np.percentile(B, 15.865525))
    sb = max(med - p16, 1e-9)
    z = (B - med) / sb
    on = z > on_sigma
    # very bright compact bins (stars, cosmic rays) vote too; limit the effect of isolated ones
    p = float(on.mean())
    if p <= 0:
        return []
    norm, th, diag = _hough_norm(nyb, nxb, n_theta)
    streaks = []
    onv = on.copy()
    for _ in range(max_streaks):
        yy, xx = np.nonzero(onv)
        if len(xx) < 5:
            break
        acc, _, _ = _hough(xx.astype(float), yy.astype(float), nyb, nxb, n_theta)
        N = norm
        with np.errstate(divide="ignore", invalid="ignore"):
            sig = (acc - N * p) / np.sqrt(N * p * (1 - p) + 1.0)
        sig[N < min_length_px / bin_px] = 0
        k = int(np.argmax(sig))
        it, ir = divmod(k, sig.shape[1])
        best = float(sig[it, ir])
        if best < detect_sigma:
            break
        theta = float(th[it])
        rho_b = float(ir - diag)
        rho = bin_px * rho_b + (bin_px - 1) / 2.0 * (math.cos(theta) + math.sin(theta))
        st = _refine(resid, sigma, theta, rho, fwhm_px, nx, ny, band_px=1.5 * bin_px + 4, trails=trails)
        # remove the votes of this line (coarse band) in any case
        dist = np.abs(xx * math.cos(theta) + yy * math.sin(theta) - rho_b)
        kill = dist <= 2.0
        onv[yy[kill], xx[kill]] = False
        if st is None:
            continue
        length = math.hypot(st.x1 - st.x0, st.y1 - st.y0)
        if length < min_length_px or st.coverage < 0.5:
            log.debug("streak candidate rejected: length %.0f px, coverage %.2f", length, st.coverage)
            continue
        st.snr = max(st.snr, best)
        streaks.append(st)
        # remove votes near the refined line too
        thr = math.radians(st.theta_deg)
        xf = xx * bin_px + (bin_px - 1) / 2.0
        yf = yy * bin_px + (bin_px - 1) / 2.0
        dist = np.abs(xf * math.cos(thr) + yf * math.sin(thr) - st.rho_px)
        kill = dist <= bin_px * 1.5 + st.mask_half_width_px
        onv[yy[kill], xx[kill]] = False
    return streaks
