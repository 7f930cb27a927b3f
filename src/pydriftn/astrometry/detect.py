"""Trail detection by a matched filter (line segment of the drift vector ⊗ PSF).

The background and its rms come from :class:`sep.Background`. The matched
filter is applied to the background-subtracted image binned 2 px across the
drift (the PSF FWHM is 3-4 px, so binning loses < 2 % of S/N) and 4 px along
it (a trail is ~37 px long: detection needs no finer along-track resolution)
when the drift is within a few degrees of a pixel axis: a Gaussian of the PSF
sigma across, followed by a running mean over the trail length along
(``scipy.ndimage.uniform_filter1d``), 8x cheaper than the unbinned filter.
Otherwise the image is binned 2x2 and convolved with an explicit kernel
(``scipy.signal.oaconvolve``). The filtered image divided by its noise
(background rms times the kernel's noise gain) is an S/N map; its local maxima
above the threshold are the candidates.

Long connected regions of the S/N map that are not parallel to the drift are
satellite / aircraft streaks: their pixels are returned as a mask and no
candidates are taken from them.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import sep
from scipy import ndimage, signal

from . import _kernels

log = logging.getLogger(__name__)

__all__ = ["estimate_background", "matched_filter_snr", "find_candidates", "find_streaks"]


def estimate_background(data, bad=None, *, box=128, filter_size=3, amp_boundary=None, return_binned=False,
                        row_step=1, bad_index=None):
    """Background and rms maps with :class:`sep.Background`.

    Parameters
    ----------
    data : ndarray
        Image (ADU), any float dtype.
    bad : ndarray of bool, optional
        Pixels excluded from the estimate.
    box : int
        Mesh size (pixels); larger than a trail (~37 px) so trails do not bias it.
    amp_boundary : int, optional
        First column of the second amplifier: the two halves are estimated
        separately, so a step in level between amplifiers is followed exactly.
    return_binned : bool
        Also return ``sub`` summed in 2x2 blocks (for :func:`matched_filter_snr`;
        on the fast path it comes from the binned image the background was
        estimated on, corrected only where a block holds a bad pixel).
    row_step : int
        On the fast path, estimate from every ``row_step``-th row of the
        2x2-binned image only (meshes of the same ``box`` pixels on the sky,
        ``row_step`` times fewer samples each), each estimated row standing for
        the ``row_step`` binned rows from it. ``sep`` costs ~11 ns per sample:
        2 halves the cost of the mesh statistics and of their interpolation.
        The samples keep the 2x2 noise statistics (binning 4x4 instead would
        clip faint sources less and bias the level and rms). On full simulated
        CCDs (10 amplifier halves) the level moved by +0.006 +- 0.008 ADU (its
        bias from faint sources is ~+0.12 ADU either way; sky rms 6.7 ADU), the
        global rms by < 0.3 %; the astrometry's WCS, detection and
        identification figures were unchanged.
    bad_index : ndarray of int, optional
        Flat indices of the True pixels of ``bad`` when known (no pass over it
        to find them).

    Returns
    -------
    sub : ndarray float32
        ``data - background``, with ``bad`` pixels set to 0.
    rms : ndarray float32, shape (ny // 2, nx // 2)
        Background rms per (unbinned) pixel on the 2x2-binned grid: pixel
        ``(x, y)`` has rms ``rms[y // 2, x // 2]``.
    global_rms : float
    sub_binned : ndarray float32, shape (ceil(ny / 2), ceil(nx / 2))
        With ``return_binned``.
    """
    d = np.ascontiguousarray(data, dtype=np.float32)
    m = None if bad is None else np.ascontiguousarray(bad, dtype=bool)
    nx = d.shape[1]
    odd_col = None
    if amp_boundary is not None and 32 <= int(amp_boundary) <= nx - 32:
        # split at an even column so both halves take the binned path; an odd
        # boundary leaves one column of amplifier A in B's half, levelled below
        b = int(amp_boundary)
        if b % 2:
            odd_col = b - 1
            b -= 1
        parts = [slice(0, b), slice(b, nx)]
    else:
        parts = [slice(0, nx)]
    sub = np.empty_like(d)
    ny0, nx0 = d.shape
    if (ny0 % 2 == 0 and nx0 % 2 == 0 and all(p.start % 2 == 0 for p in parts)
            and ny0 >= 4 * box and all(p.stop - p.start >= 2 * box for p in parts)):
        # fast path: every part estimated on the 2x2-binned image, one full-size subtraction.
        # (Binning 4x4 for sep would be ~2x cheaper but is not equivalent: on a full
        # simulated CCD it raised the rms by 2 % and the level by 0.06 ADU, the light of
        # faint sources being less clipped in the larger bins.)
        ny2, nx2 = ny0 // 2, nx0 // 2
        db2 = _kernels.bin2_mean(d, np.empty((ny2, nx2), np.float32))  # 2x2 means
        mb2 = None if m is None else _kernels.bin2_any(m, np.empty((ny2, nx2), bool))
        grms = []
        rs = max(int(row_step), 1) if box % (2 * max(int(row_step), 1)) == 0 else 1
        nrs = (ny2 + rs - 1) // rs  # rows of db2[::rs]
        back_s = np.empty((nrs, nx2), np.float32)  # background per pixel on the 2x2 grid, every rs-th row
        rms_s = np.empty((nrs, nx2), np.float32)
        for p_ in parts:
            bs = slice(p_.start // 2, p_.stop // 2)
            db = np.ascontiguousarray(db2[::rs, bs])
            mb = None if mb2 is None else np.ascontiguousarray(mb2[::rs, bs])
            bkg = sep.Background(db, mask=mb, bw=box // 2, bh=box // (2 * rs), fw=filter_size, fh=filter_size)
            back_s[:, bs] = bkg.back()
            rms_s[:, bs] = bkg.rms()
            grms.append(float(bkg.globalrms) * 2.0)
        # rms per (unbinned) pixel on the 2x2 grid: each estimated row stands for the rs binned rows from it
        rms = np.repeat(rms_s, rs, axis=0)[:ny2] if rs > 1 else rms_s
        rms *= np.float32(2.0)  # rms per unbinned pixel
        # sub = d - background (repeated over the rs binned rows and 2x2), and with
        # return_binned the binned sub (4 x (2x2 mean - background)) in the same pass
        _kernels.subtract_back2(d, back_s, rs, sub, db2, bool(return_binned))
        _level_odd_column(sub, m, odd_col)
        if m is not None:
            # the bad pixels are a few per cent: zeroed through their flat indices
            sub.reshape(-1)[np.flatnonzero(m) if bad_index is None else bad_index] = 0.0
        if not return_binned:
            return sub, rms, float(np.mean(grms))
        b2 = db2  # (db2 - back2) * 4, done by subtract_back2
        # blocks holding a bad pixel (set to 0 in sub) or the levelled column: from sub
        fix = mb2 if mb2 is not None else np.zeros(b2.shape, bool)
        if odd_col is not None:
            fix = fix.copy()
            fix[:, odd_col // 2] = True
        jj, ii = np.divmod(np.flatnonzero(fix), nx2)  # (np.nonzero of a 2-D image is ~5x slower)
        if jj.size:
            y0, x0 = 2 * jj, 2 * ii
            b2[jj, ii] = (sub[y0, x0] + sub[y0 + 1, x0]) + sub[y0, x0 + 1] + sub[y0 + 1, x0 + 1]
        return sub, rms, float(np.mean(grms)), b2
    rms_parts = []
    grms = []
    for sl in parts:
        dp = d[:, sl]
        mp = None if m is None else m[:, sl]
        ny_, nx_ = dp.shape
        # the mesh (128 px) is far coarser than a pixel: estimate on the 2x2-binned
        # image (4x cheaper) and repeat the binned maps back to full resolution
        if ny_ >= 4 * box and nx_ >= 2 * box and ny_ % 2 == 0 and nx_ % 2 == 0 and sub[:, sl].flags.c_contiguous:
            db = np.ascontiguousarray(_bin2(dp) * 0.25)
            mb = None if mp is None else np.ascontiguousarray(_bin2(mp))
            bkg = sep.Background(db, mask=mb, bw=box // 2, bh=box // 2, fw=filter_size, fh=filter_size)
            back = bkg.back()
            out = sub[:, sl]
            np.subtract(dp.reshape(ny_ // 2, 2, nx_ // 2, 2), back[:, None, :, None],
                        out=out.reshape(ny_ // 2, 2, nx_ // 2, 2))
            rb = bkg.rms() * 2.0  # rms per unbinned pixel
            rms_parts.append(rb)
            grms.append(float(bkg.globalrms) * 2.0)
        elif ny_ >= 4 * box and nx_ >= 2 * box:
            # odd size: bin the even part, extend the maps by their last row/column
            ye, xe = ny_ // 2 * 2, nx_ // 2 * 2
            db = np.ascontiguousarray(_bin2(dp[:ye, :xe]) * 0.25)
            mb = None if mp is None else np.ascontiguousarray(_bin2(mp[:ye, :xe]))
            bkg = sep.Background(db, mask=mb, bw=box // 2, bh=box // 2, fw=filter_size, fh=filter_size)
            back = np.repeat(np.repeat(bkg.back(), 2, axis=0), 2, axis=1)
            back = np.pad(back, ((0, ny_ - ye), (0, nx_ - xe)), mode="edge")
            sub[:, sl] = dp - back
            rms_parts.append(bkg.rms() * 2.0)
            grms.append(float(bkg.globalrms) * 2.0)
        else:
            bkg = sep.Background(np.ascontiguousarray(dp), mask=None if mp is None else np.ascontiguousarray(mp),
                                 bw=box, bh=box, fw=filter_size, fh=filter_size)
            np.subtract(dp, bkg.back(), out=sub[:, sl])
            r = bkg.rms()
            rr = r[: max(r.shape[0] // 2 * 2, 2), : max(r.shape[1] // 2 * 2, 2)]
            rms_parts.append(np.sqrt(_bin2(rr**2) / 4.0))
            grms.append(float(bkg.globalrms))
    _level_odd_column(sub, m, odd_col)
    if m is not None:
        np.putmask(sub, m, 0.0)
    rms = np.concatenate(rms_parts, axis=1) if len(rms_parts) > 1 else rms_parts[0]
    ty, tx = max(d.shape[0] // 2, 1), max(d.shape[1] // 2, 1)
    rms = rms[:ty, :tx]
    if rms.shape != (ty, tx):
        rms = np.pad(rms, ((0, ty - rms.shape[0]), (0, tx - rms.shape[1])), mode="edge")
    if return_binned:
        return sub, rms.astype(np.float32), float(np.mean(grms)), _bin(sub, 2, 2)
    return sub, rms.astype(np.float32), float(np.mean(grms))


def _level_odd_column(sub, m, col):
    """Level the one column of amplifier A that was estimated with amplifier B's background."""
    if col is None:
        return
    good = np.ones(sub.shape[0], bool) if m is None else ~(m[:, col] | m[:, col - 1])
    if good.sum() > 10:
        sub[:, col] -= np.median(sub[good, col]) - np.median(sub[good, col - 1])


def _expand2(a, out):
    """Write ``a`` repeated 2x along both axes into ``out`` (its extra rows/columns: the edge values)."""
    h, w = a.shape
    H, W = out.shape
    h, w = min(h, H // 2), min(w, W // 2)
    out[: 2 * h, : 2 * w] = np.repeat(np.repeat(a[:h, :w], 2, axis=0), 2, axis=1)
    if W > 2 * w:
        out[: 2 * h, 2 * w:] = out[: 2 * h, 2 * w - 1: 2 * w]
    if H > 2 * h:
        out[2 * h:] = out[2 * h - 1: 2 * h]


def _bin2(a):
    """Sum of 2x2 blocks (strided adds: faster than a reduction over reshaped axes)."""
    ny, nx = a.shape
    ny2, nx2 = ny // 2, nx // 2
    a = a[: 2 * ny2, : 2 * nx2]
    if a.dtype == bool or a.dtype == np.uint8:
        if a.dtype == bool and a.strides[1] == 1 and nx2:
            # OR of the row pairs (contiguous), then of the column pairs as 2-byte words
            r = a[0::2].view(np.uint8) | a[1::2].view(np.uint8)
            return r.view(np.uint16) != 0
        return a[0::2, 0::2] | a[1::2, 0::2] | a[0::2, 1::2] | a[1::2, 1::2]
    out = a[0::2, 0::2] + a[1::2, 0::2]
    out += a[0::2, 1::2]
    out += a[1::2, 1::2]
    return out


def _bin(a, fy, fx):
    """Sum of ``fy x fx`` blocks, the image zero-padded to whole blocks.

    ``fy, fx`` in {2, 4}: 2x2 sums by strided adds, then pairs of those summed
    the same way (a reduction over a short reshaped axis is several times slower).
    """
    ny, nx = a.shape
    if ny % 2 or nx % 2:
        a = np.pad(a, ((0, ny % 2), (0, nx % 2)))
    return _bin_more(_bin2(a), fy, fx)


def _bin_more(out, fy, fx):
    """Blocks of ``fy x fx`` pixels from the 2x2 block sums ``out``."""
    if out.dtype == np.float32 and out.ndim == 2 and (fy, fx) != (2, 2) and fy in (2, 4) and fx in (2, 4):
        # one compiled pass (the strided adds below, without their temporaries and padding copies)
        ny, nx = out.shape
        shape = ((ny + 1) // 2 if fy == 4 else ny, (nx + 1) // 2 if fx == 4 else nx)
        return _kernels.bin_more(out, fy, fx, np.empty(shape, np.float32))
    if fx == 4:
        if out.shape[1] % 2:
            out = np.pad(out, ((0, 0), (0, 1)))
        out = out[:, 0::2] + out[:, 1::2]
    if fy == 4:
        if out.shape[0] % 2:
            out = np.pad(out, ((0, 1), (0, 0)))
        out = out[0::2] + out[1::2]
    return out


def _gauss1d(a, sigma, axis, truncate=3.0):
    """``scipy.ndimage.gaussian_filter1d(a, sigma, axis, truncate=truncate)`` (mode 'reflect').

    Along axis 0 as a weighted sum of whole shifted rows: ``correlate1d`` across
    rows of a C-ordered image is ~6x slower than along them.
    """
    if axis != 0:
        return ndimage.gaussian_filter1d(a, sigma, axis=axis, truncate=truncate)
    r = int(truncate * float(sigma) + 0.5)
    if r == 0 or a.shape[0] <= r:
        return ndimage.gaussian_filter1d(a, sigma, axis=axis, truncate=truncate)
    x = np.arange(-r, r + 1, dtype=float)
    w = np.exp(-0.5 * (x / float(sigma)) ** 2)
    w = (w / w.sum()).astype(a.dtype)
    if a.dtype == np.float32:
        # one compiled pass, the reflection by index (no padded copy, no temporaries)
        return _kernels.gauss_rows(np.ascontiguousarray(a), w, np.empty(a.shape, np.float32))
    p = np.pad(a, ((r, r), (0, 0)), mode="symmetric")
    n = a.shape[0]
    out = p[r:r + n] * w[r]
    tmp = np.empty_like(out)
    for k in range(1, r + 1):
        np.add(p[r - k:r - k + n], p[r + k:r + k + n], out=tmp)
        tmp *= w[r + k]
        out += tmp
    return out


def filter_binning(direction, length_px):
    """Binning ``(fy, fx)`` of the matched-filter grid for a drift direction.

    2 px across the trail (the PSF FWHM is 3-4 px); 4 px along it when the
    drift is within 3 degrees of a pixel axis (a trail is ~37 px long, so the
    along-track resolution needed for detection is coarse) and the trail is
    long enough; 2x2 otherwise.
    """
    ux, uy = direction
    along = 4 if length_px >= 16 else 2
    if abs(ux) >= math.cos(math.radians(3.0)):
        return 2, along
    if abs(uy) >= math.cos(math.radians(3.0)):
        return along, 2
    return 2, 2


def matched_filter_snr(sub, rms, direction, length_px, sigma_px, *, return_binning=False, binned2=None):
    """S/N map of the trail matched filter on a binned image.

    When the drift is within 3 degrees of a pixel axis the image is binned
    2 px across by 4 px along the drift (:func:`filter_binning`) and the filter
    is separable: a Gaussian of the PSF sigma across
    (``scipy.ndimage.gaussian_filter1d``) and a running mean over the trail
    length along (``scipy.ndimage.uniform_filter1d``; the PSF along the trail,
    sigma < 0.5 binned px, is negligible next to the 37-px segment). Otherwise
    the image is binned 2x2 and convolved with an explicit kernel
    (``scipy.signal.oaconvolve``).

    Parameters
    ----------
    sub : ndarray
        Background-subtracted image.
    rms : ndarray or float
        Background rms per (unbinned) pixel, on the 2x2-binned grid
        (as returned by :func:`estimate_background`).
    direction : (float, float)
        Unit drift vector (pixels).
    length_px, sigma_px : float
        Trail length and PSF sigma (pixels).
    return_binning : bool
        Also return the binning factors ``(fy, fx)``.
    binned2 : ndarray, optional
        ``sub`` already summed in 2x2 blocks (:func:`estimate_background` with
        ``return_binned``).

    Returns
    -------
    snr : ndarray float32
        S/N map on the binned grid (binned pixel ``(i, j)`` covers unbinned
        rows ``fy*i .. fy*i+fy-1`` and columns ``fx*j .. fx*j+fx-1``).
    binning : (int, int)
        With ``return_binning``.
    """
    fy, fx = filter_binning(direction, length_px)
    if binned2 is not None:
        b = _bin_more(np.asarray(binned2, dtype=np.float32), fy, fx)
    else:
        b = _bin(np.asarray(sub, dtype=np.float32), fy, fx)
    ux, uy = direction
    axis = None
    if fx > fy or (fx == fy and abs(ux) >= math.cos(math.radians(3.0))):
        axis = 1
    elif fy > fx or abs(uy) >= math.cos(math.radians(3.0)):
        axis = 0
    f_along = fx if axis == 1 else fy
    f_across = fy if axis == 1 else fx
    L = length_px / f_along
    size = max(int(round(L)), 1)

    def apply(a):
        if axis is not None:
            s_across = max(sigma_px / f_across, 0.5)
            g = _gauss1d(a, s_across, 1 - axis)
            s_along = sigma_px / f_along
            if s_along >= 0.5:
                g = ndimage.gaussian_filter1d(g, s_along, axis=axis, truncate=3.0)
            return ndimage.uniform_filter1d(g, size, axis=axis)
        return signal.oaconvolve(a, kernel, mode="same")

    kernel = None
    s = max(sigma_px / 2.0, 0.5)
    if axis is None:
        half = int(math.ceil(0.5 * L + 3 * s)) + 1
        yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
        t = np.clip(xx * ux + yy * uy, -0.5 * L, 0.5 * L)
        d2 = (xx - t * ux) ** 2 + (yy - t * uy) ** 2
        kernel = np.exp(-0.5 * d2 / s**2)
        kernel /= kernel.sum()
        kernel = kernel.astype(np.float32)
    # noise gain of the filter: response of a unit delta
    n = int(4 * (L + 6 * s)) | 1
    delta = np.zeros((n, n), np.float32)
    delta[n // 2, n // 2] = 1.0
    gain = float(np.sqrt((apply(delta).astype(float) ** 2).sum()))
    f = apply(b)
    if np.ndim(rms) == 2 and f.dtype == np.float32 and f.flags.c_contiguous and np.size(rms):
        # f / (sqrt(fy fx) rms * gain) in one compiled pass, the rms map sampled once per (fy, fx) block
        _kernels.divide_by_noise(f, np.asarray(rms, np.float32), max(fy // 2, 1), max(fx // 2, 1),
                                 np.float32(math.sqrt(fy * fx)), np.float32(gain))
    elif np.ndim(rms) == 0:
        rb = math.sqrt(fy * fx) * float(rms)
        f /= rb * np.float32(gain)
    else:
        r2 = np.asarray(rms, np.float32)
        # the rms map is on the 2x2 grid: one sample per (fy, fx) block
        r2 = r2[:: max(fy // 2, 1), :: max(fx // 2, 1)]
        if r2.shape != b.shape:
            r2 = r2[: b.shape[0], : b.shape[1]]
            r2 = np.pad(r2, ((0, b.shape[0] - r2.shape[0]), (0, b.shape[1] - r2.shape[1])), mode="edge")
        rb = np.float32(math.sqrt(fy * fx)) * r2
        f /= rb * np.float32(gain)
    snr = f.astype(np.float32, copy=False)
    if return_binning:
        return snr, (fy, fx)
    return snr


def find_streaks(snr, direction, length_px, *, threshold=3.0, min_length_factor=5.0, max_angle_deg=15.0,
                 binning=(2, 2)):
    """Find satellite/aircraft streaks: long straight lines in the S/N map not along the drift.

    Each connected region above ``threshold`` whose extent exceeds
    ``min_length_factor`` trail lengths gets a robust line fit (principal axis
    refitted on the pixels within 3 binned px of it). It is a streak when the
    line is at least that long, more than ``max_angle_deg`` from the drift
    direction, and continuous (its pixels fill >= 85 % of its length; a chain of
    overlapping star trails has gaps).

    ``binning`` ``(fy, fx)`` is that of the S/N map (:func:`matched_filter_snr`);
    the geometry is done in units of 2 unbinned pixels.

    Returns
    -------
    mask : ndarray of bool (binned grid) or None
        Pixels of the band about each streak's line (not the trails merged into
        its connected region), or ``None`` when there are none.
    streaks : list of dict
        ``x0, y0, x1, y1`` (unbinned pixels), ``length_px``, ``angle_deg``.
    """
    det = snr > threshold
    # connected regions (ndimage.label's numbering) and their bounding boxes in one compiled pass
    lab, nlab, boxes = _kernels.label_boxes(np.ascontiguousarray(det))
    if nlab == 0:
        return None, []
    Lb = length_px / 2.0
    # binned pixel i covers unbinned f*i .. f*i+f-1: centre f*i + (f-1)/2, in units of 2 px
    sy, sx = binning[0] / 2.0, binning[1] / 2.0
    oy, ox = (binning[0] - 2) / 4.0, (binning[1] - 2) / 4.0
    ux, uy = direction
    out_mask = None
    streaks = []
    # (a loose pre-selection of the long regions; the exact test follows)
    ext2 = ((boxes[:, 1] - boxes[:, 0]) * sy) ** 2 + ((boxes[:, 3] - boxes[:, 2]) * sx) ** 2
    for i in np.flatnonzero(ext2 >= (0.99 * min_length_factor * Lb) ** 2) + 1:
        i = int(i)
        y0_, y1_, x0_, x1_ = (int(v) for v in boxes[i - 1])
        sl = (slice(y0_, y1_), slice(x0_, x1_))
        h = (sl[0].stop - sl[0].start) * sy
        w = (sl[1].stop - sl[1].start) * sx
        if math.hypot(h, w) < min_length_factor * Lb:
            continue
        yy, xx = np.nonzero(lab[sl] == i)
        if xx.size < 10:
            continue
        xx = (xx + sl[1].start) * sx + ox
        yy = (yy + sl[0].start) * sy + oy
        # robust line: principal axis, then refit on the pixels within 3 px of it
        inl = np.ones(xx.size, bool)
        for _ in range(4):
            cx, cy = xx[inl].mean(), yy[inl].mean()
            cov = np.cov(np.vstack([xx[inl] - cx, yy[inl] - cy]))
            evals, evecs = np.linalg.eigh(cov)
            major = evecs[:, 1]
            perp = -(xx - cx) * major[1] + (yy - cy) * major[0]
            new_inl = np.abs(perp) <= 3.0
            if new_inl.sum() < 10 or np.array_equal(new_inl, inl):
                break
            inl = new_inl
        if inl.sum() < 10:
            continue
        along = (xx - cx) * major[0] + (yy - cy) * major[1]
        a_in = along[inl]
        ext = float(a_in.max() - a_in.min())
        angle = math.degrees(math.acos(min(1.0, abs(major[0] * ux + major[1] * uy))))
        if ext < min_length_factor * Lb or angle < max_angle_deg:
            continue
        # continuous: the inliers fill the line along its length (a chain of trails has gaps)
        bins = np.floor((a_in - a_in.min()) / 2.0).astype(int)
        nbin = int(ext / 2.0) + 1
        if np.unique(bins).size < 0.85 * nbin:
            continue
        if out_mask is None:
            out_mask = np.zeros(snr.shape, bool)
        # mask the band about the streak's line only (not the trails merged into its component)
        half_w = float(np.percentile(np.abs(perp[inl]), 95)) + 1.0
        a0, a1 = a_in.min() - 2, a_in.max() + 2
        gy, gx = np.mgrid[0:snr.shape[0], 0:snr.shape[1]].astype(float)
        gy, gx = gy * sy + oy, gx * sx + ox
        ga = (gx - cx) * major[0] + (gy - cy) * major[1]
        gp = -(gx - cx) * major[1] + (gy - cy) * major[0]
        out_mask |= (np.abs(gp) <= half_w) & (ga >= a0) & (ga <= a1)
        # end points in unbinned pixels (binned pixel i covers 2i..2i+1, centre 2i + 0.5)
        x0 = 2 * (cx + a0 * major[0]) + 0.5
        y0 = 2 * (cy + a0 * major[1]) + 0.5
        x1 = 2 * (cx + a1 * major[0]) + 0.5
        y1 = 2 * (cy + a1 * major[1]) + 0.5
        ext = a1 - a0
        streaks.append(dict(x0=x0, y0=y0, x1=x1, y1=y1, length_px=2 * ext,
                            angle_deg=math.degrees(math.atan2(major[1], major[0]))))
    return out_mask, streaks


def find_candidates(snr, direction, length_px, sigma_px, *, threshold=5.0, exclude=None, binning=(2, 2)):
    """Local maxima of the S/N map above ``threshold``.

    The maximum filter spans half a trail along the drift and ~1.5 FWHM
    across, so one trail gives one peak (its middle). ``binning`` ``(fy, fx)``
    is that of the S/N map (:func:`matched_filter_snr`).

    Returns
    -------
    x, y : ndarray
        Candidate trail middles in unbinned pixels.
    peak_snr : ndarray
    """
    ux, uy = direction
    fy, fx = binning
    Lb = length_px / 2.0
    fw = max(3, int(round(1.5 * 2.3548 * sigma_px / 2.0)) | 1)
    if abs(ux) >= abs(uy) and abs(ux) >= math.cos(math.radians(10.0)):
        size = (max(3, int(round(1.5 * 2.3548 * sigma_px / fy)) | 1), max(3, int(round(0.5 * length_px / fx)) | 1))
    elif abs(uy) >= math.cos(math.radians(10.0)):
        size = (max(3, int(round(0.5 * length_px / fy)) | 1), max(3, int(round(1.5 * 2.3548 * sigma_px / fx)) | 1))
    else:
        e = max(fw, int(round(0.5 * Lb * max(abs(ux), abs(uy)))) | 1)
        size = (e, e)
    # local maxima: the pixels above the threshold that are >= every other pixel of the
    # window (pixels beyond the image: -inf), in one compiled pass (a full-image maximum
    # filter costs more than the matched filter itself)
    hy, hx = size[0] // 2, size[1] // 2
    snr_c = np.ascontiguousarray(snr)
    ex = _NO_EXCLUDE if exclude is None else np.ascontiguousarray(exclude, dtype=bool)
    # (the threshold in the map's dtype, as numpy compares an array with a Python float)
    flat = _kernels.local_maxima(snr_c, snr_c.dtype.type(threshold), ex, int(hy), int(hx))
    if flat.size == 0 and not _any_above(snr, threshold, exclude):
        return np.zeros(0), np.zeros(0), np.zeros(0)
    yb, xb = np.divmod(flat, snr.shape[1])
    val = snr[yb, xb]
    # flat tops give adjacent equal maxima: keep one per plateau
    if yb.size:
        order = np.argsort(-val, kind="stable")
        yb, xb, val = yb[order], xb[order], val[order]
        key = (yb // max(size[0], 1)) * (snr.shape[1] + 1) + (xb // max(size[1], 1))
        _, first = np.unique(key, return_index=True)
        first = np.sort(first)
        yb, xb, val = yb[first], xb[first], val[first]
    # sub-bin refinement by a parabola through the neighbours
    ny, nx = snr.shape
    xs = xb.astype(float)
    ys = yb.astype(float)
    for arr, ax in ((xs, 1), (ys, 0)):
        lo = np.clip(np.where(ax == 1, xb - 1, yb - 1), 0, None)
        if ax == 1:
            c0 = snr[yb, np.clip(xb - 1, 0, nx - 1)]
            c2 = snr[yb, np.clip(xb + 1, 0, nx - 1)]
        else:
            c0 = snr[np.clip(yb - 1, 0, ny - 1), xb]
            c2 = snr[np.clip(yb + 1, 0, ny - 1), xb]
        den = c0 - 2 * val + c2
        off = np.where(den < 0, 0.5 * (c0 - c2) / np.where(den < 0, den, -1), 0.0)
        arr += np.clip(off, -0.5, 0.5)
        del lo
    return fx * xs + 0.5 * (fx - 1), fy * ys + 0.5 * (fy - 1), val.astype(float)


_NO_EXCLUDE = np.zeros((0, 0), bool)


def _any_above(snr, threshold, exclude):
    """Whether any pixel of ``snr`` is above ``threshold`` outside ``exclude``."""
    above = snr > threshold
    if exclude is not None:
        above &= ~exclude
    return bool(above.any())


def find_bad_columns(sub, rms, *, block=64, zmin=8.0, min_blocks=3):
    """Dead or hot column segments, for images without a dq mask.

    The background-subtracted image is cut into blocks of ``block`` rows; the
    median of each column in each block is compared with its noise
    (``1.25 rms / sqrt(block)``). A column segment is bad where ``|z| > zmin``
    in at least ``min_blocks`` consecutive blocks (a star trail along the
    column covers at most two blocks).

    Parameters
    ----------
    sub : ndarray
        Background-subtracted image.
    rms : float
        Background noise per pixel.

    Returns
    -------
    ndarray of bool
        Bad pixels (whole blocks of the flagged column segments).
    """
    ny, nx = sub.shape
    nb = ny // block
    out = np.zeros(sub.shape, bool)
    if nb < min_blocks:
        return out
    med = np.median(sub[: nb * block].reshape(nb, block, nx), axis=1)  # (nb, nx)
    z = med / (1.25 * float(rms) / math.sqrt(block))
    flag = np.abs(z) > zmin
    # runs of >= min_blocks consecutive flagged blocks per column
    run = np.zeros_like(flag, dtype=np.int32)
    run[0] = flag[0]
    for i in range(1, nb):
        run[i] = np.where(flag[i], run[i - 1] + 1, 0)
    keep = np.zeros_like(flag)
    for i in range(nb - 1, -1, -1):
        start_ok = run[i] >= min_blocks
        keep[i] |= start_ok
        if i + 1 < nb:
            keep[i] |= flag[i] & keep[i + 1]
    # propagate back over the whole run
    for i in range(nb - 2, -1, -1):
        keep[i] |= flag[i] & keep[i + 1]
    for i in range(1, nb):
        keep[i] |= flag[i] & keep[i - 1]
    if not keep.any():
        return out
    rows = np.repeat(keep, block, axis=0)
    out[: nb * block] = rows
    if nb * block < ny:
        out[nb * block:] = keep[-1][None, :]
    return out
