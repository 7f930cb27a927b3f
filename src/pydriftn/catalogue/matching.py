"""Positional matching: g↔r cross-match, Gaia match and the Gaia astrometric anchor.

Matching is done with a KD-tree on gnomonic (tangent-plane) coordinates in
arcsec about a field centre — exact enough on a CCD (< 0.2 deg) and O(N log N),
where ``SkyCoord.match_to_catalog_sky`` would build the same tree on unit
vectors. Matches are *mutual* nearest neighbours within a radius, so a star is
never paired twice.

The Gaia anchor fits, per CCD and band, a small affine (or, with few stars, a
shift-only) correction in pixel space that maps measured positions onto the
Gaia positions projected through the image WCS, with iterative 3-sigma
clipping; corrected sky positions are the WCS of the corrected pixels. The
initial WCS offset is the mode of all pair offsets (:func:`find_offset`,
refined by medians: a box-smoothed histogram alone has flat-topped peaks whose
first maximum can lie ~3 bins from the true offset). A solution is used only
if it passes checks (enough pairs, well above chance coincidences, small
residuals, a correction within the searched WCS error); otherwise it is
rejected with the reason and the WCS positions are kept.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["tangent_plane", "from_tangent_plane", "mutual_match", "find_offset", "fit_pixel_correction",
           "anchor_to_gaia"]

log = logging.getLogger(__name__)


def tangent_plane(ra, dec, ra0, dec0):
    """Gnomonic projection of ``(ra, dec)`` about ``(ra0, dec0)``; returns (xi, eta) in arcsec."""
    ra = np.radians(np.asarray(ra, float))
    dec = np.radians(np.asarray(dec, float))
    a0, d0 = np.radians(ra0), np.radians(dec0)
    cosc = np.sin(d0) * np.sin(dec) + np.cos(d0) * np.cos(dec) * np.cos(ra - a0)
    xi = np.cos(dec) * np.sin(ra - a0) / cosc
    eta = (np.cos(d0) * np.sin(dec) - np.sin(d0) * np.cos(dec) * np.cos(ra - a0)) / cosc
    return np.degrees(xi) * 3600.0, np.degrees(eta) * 3600.0


def from_tangent_plane(xi, eta, ra0, dec0):
    """Inverse of :func:`tangent_plane` (xi, eta in arcsec) → (ra, dec) in deg."""
    x = np.radians(np.asarray(xi, float) / 3600.0)
    y = np.radians(np.asarray(eta, float) / 3600.0)
    a0, d0 = np.radians(ra0), np.radians(dec0)
    den = np.cos(d0) - y * np.sin(d0)
    ra = a0 + np.arctan2(x, den)
    dec = np.arctan2(np.sin(d0) + y * np.cos(d0), np.hypot(x, den))
    return np.degrees(ra) % 360.0, np.degrees(dec)


def mutual_match(xa, ya, xb, yb, radius):
    """Mutual nearest neighbours between point sets A and B within ``radius``.

    Returns
    -------
    ia, ib : ndarray of int
        Indices of matched pairs.
    dist : ndarray
        Their separations (same unit as the inputs).
    """
    xa, ya, xb, yb = (np.asarray(v, float) for v in (xa, ya, xb, yb))
    if len(xa) == 0 or len(xb) == 0:
        e = np.empty(0, int)
        return e, e, np.empty(0)
    ta = cKDTree(np.column_stack([xa, ya]))
    tb = cKDTree(np.column_stack([xb, yb]))
    dab, iab = tb.query(np.column_stack([xa, ya]), k=1, distance_upper_bound=radius)
    dba, iba = ta.query(np.column_stack([xb, yb]), k=1, distance_upper_bound=radius)
    ia = np.flatnonzero(np.isfinite(dab))
    ib = iab[ia]
    mutual = iba[ib] == ia
    return ia[mutual], ib[mutual], dab[ia[mutual]]


def _robust_std(v):
    v = np.asarray(v, float)
    if len(v) == 0:
        return np.nan
    return 1.4826 * np.median(np.abs(v - np.median(v)))


def fit_pixel_correction(x, y, xr, yr, *, min_affine=6, clip=3.0, n_iter=5):
    """Fit ``(xr, yr) ≈ T(x, y)`` with T affine (or a shift) and sigma clipping.

    Parameters
    ----------
    x, y : ndarray
        Measured pixel positions.
    xr, yr : ndarray
        Reference pixel positions (Gaia through the WCS).
    min_affine : int
        Fewer kept pairs than this: shift only.

    Returns
    -------
    dict
        ``kind`` ('affine'|'shift'|'none'), ``coeff_x``, ``coeff_y`` (for
        ``[1, x, y]``), ``used`` (bool mask), ``n_used``, ``resid_x``,
        ``resid_y`` (after, all pairs).
    """
    x, y, xr, yr = (np.asarray(v, float) for v in (x, y, xr, yr))
    n = len(x)
    used = np.ones(n, bool)
    cx = np.array([0.0, 1.0, 0.0])
    cy = np.array([0.0, 0.0, 1.0])
    kind = "none"
    if n == 0:
        return {"kind": kind, "coeff_x": cx, "coeff_y": cy, "used": used, "n_used": 0,
                "resid_x": np.empty(0), "resid_y": np.empty(0)}
    A = np.column_stack([np.ones(n), x, y])
    for _ in range(n_iter):
        k = int(used.sum())
        if k >= min_affine:
            kind = "affine"
            cx = np.linalg.lstsq(A[used], xr[used], rcond=None)[0]
            cy = np.linalg.lstsq(A[used], yr[used], rcond=None)[0]
        elif k >= 1:
            kind = "shift"
            cx = np.array([np.median(xr[used] - x[used]), 1.0, 0.0])
            cy = np.array([np.median(yr[used] - y[used]), 0.0, 1.0])
        else:
            break
        rx = xr - A @ cx
        ry = yr - A @ cy
        r = np.hypot(rx, ry)
        s = max(_robust_std(np.concatenate([rx[used], ry[used]])), 1e-3)
        new_used = r < clip * s * 1.5  # radial: ~3 sigma per axis
        if new_used.sum() < 1 or np.array_equal(new_used, used):
            used = new_used if new_used.sum() >= 1 else used
            break
        used = new_used
    rx = xr - A @ cx
    ry = yr - A @ cy
    return {"kind": kind, "coeff_x": cx, "coeff_y": cy, "used": used, "n_used": int(used.sum()),
            "resid_x": rx, "resid_y": ry}


def apply_pixel_correction(fit, x, y):
    """Apply a :func:`fit_pixel_correction` result to pixel positions."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    A = np.column_stack([np.ones(len(x)), x, y])
    return A @ fit["coeff_x"], A @ fit["coeff_y"]


def find_offset(x, y, xr, yr, *, search_radius, bin_size, refine_radius, n_refine=3):
    """Most common offset ``(xr - x, yr - y)`` between two point sets (same units).

    Every pair closer than ``search_radius`` votes in a 2-D histogram of bins
    of ``bin_size``; the peak of its zero-padded 3 x 3 box sum (ties broken by
    the raw count, then by the first bin) gives a first guess, which is
    refined by the median offset of the pairs in that 3 x 3 block and then of
    the pairs within ``refine_radius`` of the current guess (``n_refine``
    times). The refinement matters: the true pairs usually fall in one raw
    bin, so the box sum has a flat 3 x 3 plateau and its first maximum can be
    a corner bin up to ~2.8 bins from the true offset.

    Parameters
    ----------
    x, y : ndarray
        Positions of set A.
    xr, yr : ndarray
        Positions of set B (the reference).
    search_radius : float
        Largest offset considered.
    bin_size : float
        Histogram bin (about the match radius).
    refine_radius : float
        Radius of the final median (the match radius).

    Returns
    -------
    dict
        ``dx, dy`` (the offset, 0 when there is no pair), ``n_pairs`` (pairs
        within ``search_radius``), ``n_peak`` (pairs within ``refine_radius``
        of the offset) and ``n_chance`` (pairs expected there by chance if the
        offsets were uniform over the search disc: ``n_pairs (refine /
        search)**2``).
    """
    x, y, xr, yr = (np.asarray(v, float) for v in (x, y, xr, yr))
    out = {"dx": 0.0, "dy": 0.0, "n_pairs": 0, "n_peak": 0, "n_chance": 0.0}
    if len(x) == 0 or len(xr) == 0:
        return out
    ta = cKDTree(np.column_stack([x, y]))
    tb = cKDTree(np.column_stack([xr, yr]))
    sdm = ta.sparse_distance_matrix(tb, search_radius, output_type="ndarray")
    if len(sdm) == 0:
        return out
    ia, ib = sdm["i"].astype(int), sdm["j"].astype(int)
    dx, dy = xr[ib] - x[ia], yr[ib] - y[ia]
    nb = max(int(np.ceil(2 * search_radius / bin_size)), 1)
    half = 0.5 * nb * bin_size
    H, xe, ye = np.histogram2d(dx, dy, bins=nb, range=[[-half, half], [-half, half]])
    P = np.pad(H, 1)
    S = sum(P[1 + a: 1 + a + nb, 1 + b: 1 + b + nb] for a in (-1, 0, 1) for b in (-1, 0, 1))
    key = S * (H.max() + 1) + H
    i, j = np.unravel_index(int(np.argmax(key)), key.shape)
    cx, cy = 0.5 * (xe[i] + xe[i + 1]), 0.5 * (ye[j] + ye[j + 1])
    box = (np.abs(dx - cx) <= 1.5 * bin_size) & (np.abs(dy - cy) <= 1.5 * bin_size)
    ox, oy = float(np.median(dx[box])), float(np.median(dy[box]))
    for _ in range(n_refine):
        near = np.hypot(dx - ox, dy - oy) <= refine_radius
        if not near.any():
            break
        ox, oy = float(np.median(dx[near])), float(np.median(dy[near]))
    n_peak = int((np.hypot(dx - ox, dy - oy) <= refine_radius).sum())
    out.update(dx=ox, dy=oy, n_pairs=int(len(dx)), n_peak=n_peak,
               n_chance=float(len(dx) * (refine_radius / search_radius) ** 2))
    return out


def anchor_to_gaia(
    x, y, good, wcs, gaia_ra, gaia_dec, *, pixscale_arcsec, shape, match_radius_arcsec=1.0,
    search_radius_arcsec=10.0, min_affine=6, min_matches=3, max_rms_arcsec=None, label="",
):
    """Anchor measured pixel positions to Gaia through a fitted pixel correction.

    The solution is validated before it is used; a solution that fails any
    check is *rejected* (``meta["accepted"]`` False, ``meta["reject_reason"]``
    says why, a warning names ``label``) and the uncorrected WCS positions are
    returned. Checks: at least ``min_matches`` pairs kept by the fit; the
    number of pairs well above what chance coincidences at a wrong offset
    would give (``n_matched >= n_chance + 4 sqrt(n_chance)``, ``n_chance``
    from :func:`find_offset`); residual rms at most ``max_rms_arcsec``; the
    correction anywhere on the CCD (corners and centre) at most
    ``search_radius_arcsec + match_radius_arcsec`` (the WCS accuracy the
    search assumed).

    Parameters
    ----------
    x, y : ndarray
        Measured positions (0-based pixels) of all sources.
    good : ndarray of bool
        Sources usable for the fit (unsaturated, unblended, decent S/N).
    wcs : astropy.wcs.WCS
        Image WCS (celestial).
    gaia_ra, gaia_dec : ndarray
        Gaia positions at the image epoch (deg).
    pixscale_arcsec : float
    shape : (ny, nx)
    match_radius_arcsec : float
        Pairing radius after the initial offset is removed.
    search_radius_arcsec : float
        Largest WCS error searched for the initial offset.
    min_affine : int
        Fewer kept pairs than this: shift-only correction.
    min_matches : int
        Fewest kept pairs for an accepted solution.
    max_rms_arcsec : float, optional
        Largest accepted residual rms; default ``0.5 * match_radius_arcsec``
        (pairs at a wrong offset scatter over the whole match radius).
    label : str
        Names the data in log messages and reasons (e.g. ``"CCD S4 r"``).

    Returns
    -------
    ra, dec : ndarray
        Corrected sky positions of all sources (deg); the WCS positions when
        the solution is rejected or there is none.
    meta : dict
        ``n_gaia``, ``n_matched``, ``n_used``, ``kind``, offsets before
        (``offset_x_px``, ``offset_y_px``, ``offset_arcsec``), scatter before
        and after (``rms_before_arcsec``, ``rms_after_arcsec``), the
        standard error of the correction ``fit_err_arcsec``, ``n_peak`` and
        ``n_chance`` of the offset search, ``max_correction_arcsec``,
        ``accepted`` and ``reject_reason``.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    ny, nx = shape
    ra0, dec0 = wcs.pixel_to_world_values(x, y)
    meta = {"n_gaia": 0, "n_matched": 0, "n_used": 0, "kind": "none", "offset_x_px": np.nan, "offset_y_px": np.nan,
            "offset_arcsec": np.nan, "rms_before_arcsec": np.nan, "rms_after_arcsec": np.nan,
            "fit_err_arcsec": np.nan, "n_peak": 0, "n_chance": 0.0, "max_correction_arcsec": np.nan,
            "accepted": False, "reject_reason": "no reference star on the CCD"}
    if max_rms_arcsec is None:
        max_rms_arcsec = 0.5 * match_radius_arcsec
    if len(gaia_ra) == 0:
        return np.asarray(ra0, float), np.asarray(dec0, float), meta
    gx, gy = wcs.world_to_pixel_values(np.asarray(gaia_ra, float), np.asarray(gaia_dec, float))
    gx = np.asarray(gx, float)
    gy = np.asarray(gy, float)
    margin = search_radius_arcsec / pixscale_arcsec + 2
    inside = np.isfinite(gx) & np.isfinite(gy) & (gx > -margin) & (gx < nx - 1 + margin) & (gy > -margin) & (gy < ny - 1 + margin)
    gx, gy = gx[inside], gy[inside]
    gidx = np.flatnonzero(inside)
    meta["n_gaia"] = int(len(gx))
    sel = np.flatnonzero(good)
    if len(gx) == 0 or len(sel) == 0:
        return np.asarray(ra0, float), np.asarray(dec0, float), meta
    # initial offset: mode of all pair offsets within the search radius
    search_px = search_radius_arcsec / pixscale_arcsec
    rad_px = match_radius_arcsec / pixscale_arcsec
    binw = max(rad_px, 1.0)
    off = find_offset(x[sel], y[sel], gx, gy, search_radius=search_px, bin_size=binw, refine_radius=rad_px)
    meta["n_peak"] = off["n_peak"]
    meta["n_chance"] = off["n_chance"]
    if off["n_pairs"] == 0:
        return np.asarray(ra0, float), np.asarray(dec0, float), meta
    ox, oy = off["dx"], off["dy"]
    # pair after the offset
    ia, ib, _ = mutual_match(x[sel] + ox, y[sel] + oy, gx, gy, rad_px)
    meta["n_matched"] = int(len(ia))
    meta["reject_reason"] = "no usable source paired with a reference star"
    if len(ia) == 0:
        return np.asarray(ra0, float), np.asarray(dec0, float), meta
    xs, ys = x[sel][ia], y[sel][ia]
    xg, yg = gx[ib], gy[ib]
    fit = fit_pixel_correction(xs, ys, xg, yg, min_affine=min_affine)
    u = fit["used"]
    bx, by = xg - xs, yg - ys
    meta.update(
        kind=fit["kind"], n_used=fit["n_used"],
        offset_x_px=float(np.median(bx[u])), offset_y_px=float(np.median(by[u])),
        offset_arcsec=float(np.hypot(np.median(bx[u]), np.median(by[u])) * pixscale_arcsec),
        rms_before_arcsec=float(np.sqrt(np.mean(bx[u] ** 2 + by[u] ** 2)) * pixscale_arcsec),
        rms_after_arcsec=float(np.sqrt(np.mean(fit["resid_x"][u] ** 2 + fit["resid_y"][u] ** 2)) * pixscale_arcsec),
    )
    npar = 3 if fit["kind"] == "affine" else 1
    per_axis = meta["rms_after_arcsec"] / np.sqrt(2.0)
    meta["fit_err_arcsec"] = float(per_axis * np.sqrt(npar / max(fit["n_used"], 1)))
    meta["gaia_index"] = gidx[ib].tolist()
    meta["source_index"] = sel[ia].tolist()
    cxs = np.array([0.0, nx - 1.0, 0.0, nx - 1.0, 0.5 * (nx - 1)])
    cys = np.array([0.0, 0.0, ny - 1.0, ny - 1.0, 0.5 * (ny - 1)])
    ccx, ccy = apply_pixel_correction(fit, cxs, cys)
    meta["max_correction_arcsec"] = float(np.max(np.hypot(ccx - cxs, ccy - cys)) * pixscale_arcsec)
    need = max(int(min_matches), int(np.ceil(meta["n_chance"] + 4.0 * np.sqrt(meta["n_chance"]))))
    why = []
    if fit["n_used"] < min_matches:
        why.append(f"{fit['n_used']} pairs kept by the fit (need >= {min_matches})")
    if len(ia) < need:
        why.append(f"{len(ia)} pairs at the best offset, not above chance ({meta['n_chance']:.1f} expected at a "
                   f"wrong offset; need >= {need})")
    if not meta["rms_after_arcsec"] <= max_rms_arcsec:
        why.append(f"residual rms {meta['rms_after_arcsec']:.3f}\" > {max_rms_arcsec:.3f}\"")
    if not meta["max_correction_arcsec"] <= search_radius_arcsec + match_radius_arcsec:
        why.append(f"correction up to {meta['max_correction_arcsec']:.2f}\" on the CCD exceeds the searched WCS "
                   f"error {search_radius_arcsec:g}\" + match radius {match_radius_arcsec:g}\"")
    tag = f"{label}: " if label else ""
    if why:
        meta["accepted"] = False
        meta["reject_reason"] = "; ".join(why)
        log.warning("%sastrometric anchor rejected (%s, %d/%d pairs, offset %.2f\"): %s", tag, fit["kind"],
                    fit["n_used"], len(ia), meta["offset_arcsec"], meta["reject_reason"])
        return np.asarray(ra0, float), np.asarray(dec0, float), meta
    meta["accepted"] = True
    meta["reject_reason"] = None
    xc, yc = apply_pixel_correction(fit, x, y)
    ra, dec = wcs.pixel_to_world_values(xc, yc)
    log.info(
        "%sanchor (%s, %d/%d stars, %d chance expected): offset %.3f\", rms %.3f\" -> %.3f\"",
        tag, fit["kind"], fit["n_used"], len(ia), meta["n_chance"], meta["offset_arcsec"], meta["rms_before_arcsec"],
        meta["rms_after_arcsec"],
    )
    return np.asarray(ra, float), np.asarray(dec, float), meta
