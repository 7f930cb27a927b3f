"""Local sky of every trail in a stadium-shaped annulus.

The sky of a trail is measured in the pixels between two stadia (a rectangle
along the trail capped by two semicircles) centred on the trail midpoint:
``radius <= d < radius + pad``, where ``d`` is the distance of a pixel centre
to the central segment of length ``length`` (default: the trail length).
Pixels flagged in the bitmask and pixels within ``mask_radius`` of any *other*
known trail are excluded, and the rest is sigma-clipped.

Why our own clipping instead of :func:`astropy.stats.sigma_clipped_stats`:
astropy clips one array at a time; thousands of trails per CCD would need a
Python loop (or a ragged masked array, which is slow). All annuli here share
the same pixel offsets (the trail shape is common to the CCD), so the annulus
values form a dense ``(n_stars, n_pixels)`` array; it is sorted once per row
and every clipping iteration is then a per-row binary search of the two
thresholds and a cumulative-sum lookup (no pass over the values); this
clipping, and the gather of the annulus pixels, are compiled loops
(:mod:`pydriftn.extract._kernels`). The statistics are those of astropy's default (median centre, standard deviation
of the kept values, ``sigma`` both sides, iterate to convergence); the test
suite checks them against astropy.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

__all__ = [
    "SKY_COLUMNS",
    "segment_distance",
    "stadium_offsets",
    "trail_footprint_image",
    "clipped_stats_rows",
    "local_sky",
    "sky_table_filename",
]

log = logging.getLogger(__name__)

#: Columns of the sky table, in order.
SKY_COLUMNS = [
    "star_id",
    "sky_adu",
    "sky_err_adu",
    "sky_rms_adu",
    "n_sky_pixels",
    "n_annulus_pixels",
    "n_rejected_pixels",
    "sky_ok",
    "sky_e",
    "sky_err_e",
]

#: sqrt(pi/2): standard error of a median relative to that of a mean (Gaussian).
_MEDIAN_EFFICIENCY = math.sqrt(math.pi / 2.0)


def sky_table_filename(expnum) -> str:
    """File name of the sky table of an exposure (``driftskysub-exp_{EXPNUM}.csv``)."""
    return f"driftskysub-exp_{expnum}.csv"


def segment_distance(px, py, x0, y0, x1, y1):
    """Distance of points to segments (broadcasting), i.e. the stadium distance.

    Parameters
    ----------
    px, py : array_like
        Points.
    x0, y0, x1, y1 : array_like
        Segment end points.

    Returns
    -------
    ndarray
        Euclidean distance of each point to the nearest point of its segment.
    """
    dx = np.asarray(x1, dtype=float) - x0
    dy = np.asarray(y1, dtype=float) - y0
    l2 = dx * dx + dy * dy
    with np.errstate(invalid="ignore", divide="ignore"):
        t = ((px - x0) * dx + (py - y0) * dy) / np.where(l2 > 0, l2, 1.0)
    t = np.clip(np.where(l2 > 0, t, 0.0), 0.0, 1.0)
    ex = px - (x0 + t * dx)
    ey = py - (y0 + t * dy)
    return np.hypot(ex, ey)


def stadium_offsets(direction, length, r_in, r_out):
    """Integer pixel offsets ``(dx, dy)`` with ``r_in <= d < r_out`` from a centred segment.

    ``d`` is the distance to the segment of length ``length`` centred on the
    origin along ``direction``. ``r_in = 0`` gives the filled stadium.
    """
    ux, uy = direction
    hx, hy = 0.5 * length * ux, 0.5 * length * uy
    bx = int(math.ceil(abs(hx) + r_out)) + 1
    by = int(math.ceil(abs(hy) + r_out)) + 1
    oy, ox = np.mgrid[-by : by + 1, -bx : bx + 1]
    d = segment_distance(ox, oy, -hx, -hy, hx, hy)
    sel = (d >= r_in) & (d < r_out)
    return ox[sel].astype(np.intp), oy[sel].astype(np.intp)


def _trail_arrays(trails):
    for col in ("star_id", "x_start", "y_start", "x_end", "y_end"):
        if col not in trails.columns:
            raise KeyError(f"trail table: missing column {col!r} (need star_id, x_start, y_start, x_end, y_end)")
    x0 = trails["x_start"].to_numpy(float)
    y0 = trails["y_start"].to_numpy(float)
    x1 = trails["x_end"].to_numpy(float)
    y1 = trails["y_end"].to_numpy(float)
    # trails without a position are treated as far off the image (no pixels)
    bad = ~(np.isfinite(x0) & np.isfinite(y0) & np.isfinite(x1) & np.isfinite(y1))
    if bad.any():
        x0, y0, x1, y1 = (np.where(bad, v, a) for a, v in ((x0, -1e6), (y0, -1e6), (x1, -1e6 + 1.0), (y1, -1e6)))
    return x0, y0, x1, y1


def _covered(shape, cx, cy, ox, oy):
    """Boolean image (ny, nx) of the pixels ``(cx + ox, cy + oy)`` of every trail.

    Written into a buffer padded by ``2 R + 1`` pixels (``R`` the largest
    offset), so every write lands in it without per-pixel bounds checks;
    centres farther out than ``R`` are clamped to ``R + 1`` outside, where
    their footprint still cannot reach the image. Returns a view.
    """
    buf, bx, by = _covered_buffer(shape, cx, cy, ox, oy)
    ny, nx = shape
    return buf[by : by + ny, bx : bx + nx]


def _covered_buffer(shape, cx, cy, ox, oy):
    """The padded buffer of :func:`_covered` (C-contiguous, ``(ny + 2 by, nx + 2 bx)``) and ``bx, by``:
    image pixel ``(x, y)`` is ``buf[y + by, x + bx]``."""
    ny, nx = shape
    rx = int(np.abs(ox).max(initial=0))
    ry = int(np.abs(oy).max(initial=0))
    bx, by = 2 * rx + 1, 2 * ry + 1
    nxp = nx + 2 * bx
    buf = np.zeros((ny + 2 * by) * nxp, dtype=bool)
    cxc = np.clip(cx, -rx - 1, nx + rx).astype(np.intp)
    cyc = np.clip(cy, -ry - 1, ny + ry).astype(np.intp)
    base = (cyc + by) * nxp + (cxc + bx)
    # each row of a (convex) stencil is one run of pixels: write it for every
    # trail at once through a view of all length-L windows of the buffer
    # (contiguous writes, no per-pixel index array); other rows pixel by pixel
    for r in np.unique(oy):
        xs = ox[oy == r]
        xlo, xhi = int(xs.min()), int(xs.max())
        if len(xs) == xhi - xlo + 1:
            L = xhi - xlo + 1
            win = np.lib.stride_tricks.as_strided(buf, shape=(buf.size - L + 1, L), strides=(1, 1))
            win[base + (int(r) * nxp + xlo)] = True
        else:
            buf[base[:, None] + (int(r) * nxp + xs.astype(np.intp))[None, :]] = True
    return buf.reshape(ny + 2 * by, nxp), bx, by


def trail_footprint_image(shape, trails, radius, direction=None, length=None, counts=True):
    """Trail footprints (stadia of half-width ``radius``) on the image grid.

    Parameters
    ----------
    shape : (int, int)
        Image shape ``(ny, nx)``.
    trails : pandas.DataFrame
        Trail table (``x_start, y_start, x_end, y_end``).
    radius : float
        Footprint half-width in pixels.
    direction, length : optional
        Common trail direction/length; by default the median over the table.
    counts : bool
        True: number of footprints covering each pixel (uint16); False: a
        boolean "covered" image (faster).

    Returns
    -------
    ndarray of shape ``shape``
    """
    ny, nx = shape
    if len(trails) == 0:
        return np.zeros(shape, dtype=np.uint16 if counts else bool)
    x0, y0, x1, y1 = _trail_arrays(trails)
    if direction is None or length is None:
        dx, dy = np.median(x1 - x0), np.median(y1 - y0)
        length = math.hypot(dx, dy) if length is None else length
        direction = (dx / math.hypot(dx, dy), dy / math.hypot(dx, dy)) if direction is None else direction
    ox, oy = stadium_offsets(direction, length, 0.0, radius)
    cx = np.rint(0.5 * (x0 + x1)).astype(np.int64)
    cy = np.rint(0.5 * (y0 + y1)).astype(np.int64)
    if not counts:
        return np.ascontiguousarray(_covered(shape, cx, cy, ox, oy))
    # counts: the stadium is convex, so each of its rows is one run of pixels:
    # draw the runs of every trail into a difference image and integrate along x
    rows = np.unique(oy)
    xlo = np.array([ox[oy == r].min() for r in rows])
    xhi = np.array([ox[oy == r].max() for r in rows])
    Y = cy[:, None] + rows[None, :]
    XL = np.clip(cx[:, None] + xlo[None, :], 0, nx)
    XH = np.clip(cx[:, None] + xhi[None, :] + 1, 0, nx)
    ok = (Y >= 0) & (Y < ny) & (XH > XL)
    diff = np.zeros((ny, nx + 1), dtype=np.int32)
    np.add.at(diff, (Y[ok], XL[ok]), 1)
    np.add.at(diff, (Y[ok], XH[ok]), -1)
    cov = np.cumsum(diff[:, :nx], axis=1, dtype=np.int32)
    out = np.minimum(cov, np.iinfo(np.uint16).max).astype(np.uint16)
    return out


def clipped_stats_rows(values, sigma=3.0, maxiters=10):
    """Sigma-clipped median, standard deviation and count of each row.

    Equivalent to :func:`astropy.stats.sigma_clipped_stats` with its defaults
    (``cenfunc='median'``, ``stdfunc='std'``) applied to every row, with
    ``NaN`` marking missing values; vectorised over rows.

    Each row is sorted once; the kept values of a row are then always one
    contiguous run ``[lo, hi)`` of the sorted row, so an iteration needs only
    a binary search of the two thresholds per row (no pass over the values)
    and cumulative-sum lookups for the mean and variance.

    Parameters
    ----------
    values : ndarray, shape (n, m)
        Rows of values; NaN = not used.
    sigma : float
        Clipping threshold (both sides) in standard deviations.
    maxiters : int
        Maximum number of clipping iterations.

    Returns
    -------
    median, std, n_kept : ndarray
        ``NaN`` for rows without values.
    """
    # float32 sorts several times faster than float64 (SIMD sort); the
    # cumulative sums are of deviations from a row reference level, so float32
    # keeps ~1e-6 relative precision on the standard deviation.
    v = np.sort(np.asarray(values, dtype=np.float32), axis=1)  # NaN sort last
    n_rows, m = v.shape
    if m == 0:
        nan = np.full(n_rows, np.nan)
        return nan, nan.copy(), np.zeros(n_rows, dtype=np.intp)
    # the clipping of each sorted row is a compiled loop (pydriftn.extract._kernels.clip_rows)
    from pydriftn.extract._kernels import clip_rows

    med, std, cnt, has_inf = clip_rows(v, float(sigma), int(maxiters))
    if has_inf:
        # infinities count as missing too (rare: sort again with them as NaN)
        v = np.where(np.isinf(v), np.float32(np.nan), v)
        v.sort(axis=1)
        med, std, cnt, _ = clip_rows(v, float(sigma), int(maxiters))
    return med, std, cnt


def local_sky(
    image,
    mask,
    trails,
    geometry=None,
    *,
    radius=12.0,
    pad=5.0,
    length=None,
    mask_radius=None,
    sigma=3.0,
    maxiters=10,
    min_pixels=20,
    gain=None,
    bad_bits=None,
    verbose_save=False,
    mask_index=None,
):
    """Local sky of every trail in a stadium annulus, other trails masked.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Drift image in ADU with the sky kept.
    mask : ndarray or None
        Pixel bitmask, nonzero = bad (any bit), same shape as ``image``.
    trails : pandas.DataFrame
        All known trails of the CCD: ``star_id, x_start, y_start, x_end, y_end``.
        Every trail is masked in the annuli of the others.
    geometry : pydriftn.geometry.TrailGeometry, optional
        Trail direction and length; default: the median start→end vector of
        the table.
    radius : float
        Inner radius of the stadium (half-width of its body and radius of its
        caps), pixels (the original's ``radius``). It must clear the star's
        own PSF wings: on the simulator's Moffat(beta=3) PSF of FWHM 3.9 px
        the original's 7 px biases the fluxes by -2 %, 10 px by -0.5 %,
        >= 12 px by < 0.3 %.
    pad : float
        Width of the annulus, pixels (the original's ``pad``).
    length : float, optional
        Length of the stadium body (the original's ``length``); default the
        trail length.
    mask_radius : float, optional
        Half-width of the footprint of other trails masked in each annulus;
        default ``radius``.
    sigma, maxiters : float, int
        Sigma clipping (both sides, iterate to convergence).
    min_pixels : int
        Fewer kept pixels than this: ``sky_ok = False`` (the value is still
        given when there is at least one pixel).
    gain : float or (float, float), optional
        Gain (e-/ADU) of amplifiers A (``x < nx/2``) and B. When given, the
        annulus pixels are converted to electrons before the statistics, so an
        annulus straddling the amplifier boundary is not biased by the
        different ADU levels of the two amplifiers; ``sky_e``/``sky_err_e``
        are then the electron values and ``sky_adu`` etc. are in the ADU of
        the amplifier of the trail midpoint. Without it ``sky_e`` is NaN.
    bad_bits : int, optional
        Mask bits that make a pixel unusable (default: any nonzero value), e.g.
        :data:`pydriftn.flags.DEFAULT_BAD_PIXEL_FLAGS` for a decoded bitmask.
    mask_index : ndarray of int, optional
        Flat indices (ascending) of the non-zero pixels of ``mask`` when known:
        the unusable pixels are then marked through them (the flagged pixels
        are < 1 %) instead of reading the mask at every annulus pixel.
    verbose_save : bool
        If True also return the annulus pixels: a dict with ``offsets``
        (dx, dy arrays), ``values`` (n_stars, n_pixels) ADU with NaN where
        masked, and ``star_id`` (the original's ``verbose_save``).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`SKY_COLUMNS`, one row per trail, in the table's order.
        ``sky_err_adu`` is the standard error of the clipped median
        (``sqrt(pi/2) * rms / sqrt(n)``).
    dict, only if ``verbose_save``
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"image: expected a 2-d array, got shape {img.shape}")
    ny, nx = img.shape
    if mask is not None and np.shape(mask) != img.shape:
        raise ValueError(f"mask: shape {np.shape(mask)} does not match image {img.shape}")
    n = len(trails)
    if n == 0:
        out = pd.DataFrame({c: pd.Series(dtype=float) for c in SKY_COLUMNS})
        return (out, {"offsets": (np.zeros(0), np.zeros(0)), "values": np.zeros((0, 0)), "star_id": np.zeros(0)}) if verbose_save else out
    x0, y0, x1, y1 = _trail_arrays(trails)
    if geometry is not None:
        direction = tuple(geometry.direction)
        trail_len = float(geometry.length_px)
    else:
        dx, dy = float(np.median(x1 - x0)), float(np.median(y1 - y0))
        trail_len = math.hypot(dx, dy)
        direction = (dx / trail_len, dy / trail_len) if trail_len > 0 else (1.0, 0.0)
    length = trail_len if length is None else float(length)
    mask_radius = float(radius) if mask_radius is None else float(mask_radius)
    r_out = float(radius) + float(pad)

    ox, oy = stadium_offsets(direction, length, float(radius), r_out)
    cx = np.rint(0.5 * (x0 + x1)).astype(np.int64)
    cy = np.rint(0.5 * (y0 + y1)).astype(np.int64)
    if gain is not None:
        from pydriftn.extract.stamps import per_column

        g_col = per_column(gain, nx, "gain").astype(np.float32)
    if mask_radius <= radius:
        # one compiled pass (pydriftn.extract._kernels.annulus_values): each annulus pixel is read once,
        # times the gain (the trail's amplifier's, or each pixel's own where the annulus straddles the
        # amplifier boundary, so that it is not biased by their different ADU levels), NaN where it is
        # off the image, flagged, not finite or within mask_radius of another trail. The footprints use
        # the same rounded centres and offsets as the annuli, so with mask_radius <= radius a star's own
        # footprint never touches its own annulus and one boolean image of them suffices.
        from pydriftn.extract._kernels import annulus_values

        fox, foy = stadium_offsets(direction, length, 0.0, mask_radius)
        cov, bx, by = _covered_buffer(img.shape, cx, cy, fox, foy)
        src = img if img.dtype in (np.float32, np.float64) else img.astype(np.float32)
        use_mask = mask is not None
        if use_mask and mask_index is not None:
            # mark the flagged pixels in the footprint buffer (a fresh one: ours to write)
            m = np.asarray(mask).reshape(-1)
            idx_m = np.asarray(mask_index, dtype=np.intp)
            if bad_bits is not None:
                idx_m = idx_m[(m[idx_m] & bad_bits) != 0]
            cov[idx_m // nx + by, idx_m % nx + bx] = True
            use_mask = False
        m2 = np.ascontiguousarray(mask).reshape(-1) if use_mask else np.zeros(1, dtype=np.uint8)
        if use_mask and m2.dtype.kind not in "iub":
            m2 = m2.astype(np.int64)
        vals, n_good, n_annulus = annulus_values(
            np.ascontiguousarray(src).reshape(-1), cov.reshape(-1), cov.shape[1], bx, by, m2, use_mask,
            -1 if bad_bits is None else int(bad_bits), cx, cy, ox.astype(np.intp), oy.astype(np.intp),
            g_col if gain is not None else np.ones(nx, dtype=np.float32), gain is not None)
    else:
        # flat pixel indices; only trails whose annulus box crosses the border need per-pixel checks
        cxc = np.clip(cx, -(10 * nx), 11 * nx)  # far-off (position-less) trails: no index overflow
        cyc = np.clip(cy, -(10 * ny), 11 * ny)
        idx = (cyc * nx + cxc).astype(np.intp)[:, None] + (oy.astype(np.intp) * nx + ox)[None, :]
        edge = (cx + ox.min() < 0) | (cx + ox.max() >= nx) | (cy + oy.min() < 0) | (cy + oy.max() >= ny)
        e = np.flatnonzero(edge)
        n_annulus = np.full(n, len(ox), dtype=np.int64)
        if len(e):
            X = cxc[e, None] + ox[None, :]
            Y = cyc[e, None] + oy[None, :]
            inside_e = (X >= 0) & (X < nx) & (Y >= 0) & (Y < ny)
            idx[e] = np.clip(Y, 0, ny - 1) * nx + np.clip(X, 0, nx - 1)
            n_annulus[e] = inside_e.sum(axis=1)
        flat = img.reshape(-1)
        vals = np.take(flat, idx)
        if vals.dtype != np.float32 and vals.dtype != np.float64:
            vals = vals.astype(np.float32)
        if gain is not None:
            # one gain per trail, except where the annulus straddles the amplifier boundary
            xmin = np.clip(cx + ox.min(), 0, nx - 1)
            xmax = np.clip(cx + ox.max(), 0, nx - 1)
            straddle = g_col[xmin] != g_col[xmax]
            vals *= g_col[np.clip(cx, 0, nx - 1)][:, None].astype(vals.dtype)
            if straddle.any():
                sidx = np.flatnonzero(straddle)
                vals[sidx] = flat[idx[sidx]] * g_col[idx[sidx] % nx]
        # footprints are counted and the star's own is subtracted
        fp = trail_footprint_image(img.shape, trails, mask_radius, direction, length, counts=True)
        hx, hy = 0.5 * length * direction[0], 0.5 * length * direction[1]
        own = segment_distance(ox, oy, -hx, -hy, hx, hy) < mask_radius
        good = (fp.reshape(-1)[idx].astype(np.int32) - own[None, :]) == 0
        if mask is not None:
            mv = np.asarray(mask).reshape(-1)[idx]
            good &= (mv == 0) if bad_bits is None else ((mv & bad_bits) == 0)
        if len(e):
            good[e] &= inside_e
        good &= np.isfinite(vals)
        np.copyto(vals, np.nan, where=~good)
        n_good = good.sum(axis=1)
    med, std, cnt = clipped_stats_rows(vals, sigma=sigma, maxiters=maxiters)
    with np.errstate(invalid="ignore", divide="ignore"):
        err = _MEDIAN_EFFICIENCY * std / np.sqrt(np.where(cnt > 0, cnt, np.nan))
    if gain is not None:
        g_mid = g_col[np.clip(cx, 0, nx - 1)].astype(np.float64)
        sky_e, err_e = med, err
        med, std, err = med / g_mid, std / g_mid, err / g_mid
    else:
        sky_e = err_e = np.full(n, np.nan)
    out = pd.DataFrame(
        {
            "star_id": trails["star_id"].to_numpy(),
            "sky_adu": med,
            "sky_err_adu": err,
            "sky_rms_adu": std,
            "n_sky_pixels": cnt.astype(np.int64),
            "n_annulus_pixels": n_annulus.astype(np.int64),
            "n_rejected_pixels": (n_annulus - cnt).astype(np.int64),
            "sky_ok": (cnt >= int(min_pixels)) & np.isfinite(med),
            "sky_e": sky_e,
            "sky_err_e": err_e,
        },
        index=trails.index,
    )
    n_bad = int((~out["sky_ok"]).sum())
    if n_bad:
        log.warning("local_sky: %d of %d trails have fewer than %d usable sky pixels", n_bad, n, min_pixels)
    log.debug("local_sky: %d trails, %d annulus offsets, median %d pixels kept", n, len(ox), int(np.median(n_good)))
    if verbose_save:
        return out, {"offsets": (ox, oy), "values": vals.astype(np.float32), "star_id": trails["star_id"].to_numpy()}
    return out
