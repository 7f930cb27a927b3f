"""Positional matching: g↔r cross-match, Gaia match and the Gaia astrometric anchor.

Matching is done with a KD-tree on gnomonic (tangent-plane) coordinates in
arcsec about a field centre — exact enough on a CCD (< 0.2 deg) and O(N log N),
where ``SkyCoord.match_to_catalog_sky`` would build the same tree on unit
vectors. Matches are *mutual* nearest neighbours within a radius, so a star is
never paired twice.

The Gaia anchor fits, per CCD and band, a small affine (or, with few stars, a
shift-only) correction in pixel space that maps measured positions onto the
Gaia positions projected through the image WCS, with iterative 3-sigma
clipping; corrected sky positions are the WCS of the corrected pixels.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["tangent_plane", "from_tangent_plane", "mutual_match", "fit_pixel_correction", "anchor_to_gaia"]

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


def anchor_to_gaia(
    x, y, good, wcs, gaia_ra, gaia_dec, *, pixscale_arcsec, shape, match_radius_arcsec=1.0,
    search_radius_arcsec=10.0, min_affine=6,
):
    """Anchor measured pixel positions to Gaia through a fitted pixel correction.

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

    Returns
    -------
    ra, dec : ndarray
        Corrected sky positions of all sources (deg).
    meta : dict
        ``n_gaia``, ``n_matched``, ``n_used``, ``kind``, offsets before
        (``offset_x_px``, ``offset_y_px``, ``offset_arcsec``), scatter before
        and after (``rms_before_arcsec``, ``rms_after_arcsec``), and the
        standard error of the correction ``fit_err_arcsec``.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    ny, nx = shape
    ra0, dec0 = wcs.pixel_to_world_values(x, y)
    meta = {"n_gaia": 0, "n_matched": 0, "n_used": 0, "kind": "none", "offset_x_px": np.nan, "offset_y_px": np.nan,
            "offset_arcsec": np.nan, "rms_before_arcsec": np.nan, "rms_after_arcsec": np.nan,
            "fit_err_arcsec": np.nan}
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
    tg = cKDTree(np.column_stack([gx, gy]))
    pairs = tg.query_ball_point(np.column_stack([x[sel], y[sel]]), r=search_px)
    dx = np.concatenate([gx[p] - x[s] for s, p in zip(sel, pairs)]) if len(sel) else np.empty(0)
    dy = np.concatenate([gy[p] - y[s] for s, p in zip(sel, pairs)]) if len(sel) else np.empty(0)
    if len(dx) == 0:
        return np.asarray(ra0, float), np.asarray(dec0, float), meta
    binw = max(match_radius_arcsec / pixscale_arcsec, 1.0)
    nb = int(np.ceil(2 * search_px / binw)) + 1
    H, xe, ye = np.histogram2d(dx, dy, bins=nb, range=[[-search_px, search_px], [-search_px, search_px]])
    H = H + np.roll(H, 1, 0) + np.roll(H, -1, 0)
    H = H + np.roll(H, 1, 1) + np.roll(H, -1, 1)
    i, j = np.unravel_index(np.argmax(H), H.shape)
    ox0, oy0 = 0.5 * (xe[i] + xe[i + 1]), 0.5 * (ye[j] + ye[j + 1])
    near = np.hypot(dx - ox0, dy - oy0) < 1.5 * binw
    ox, oy = (np.median(dx[near]), np.median(dy[near])) if near.any() else (0.0, 0.0)
    # pair after the offset
    rad_px = match_radius_arcsec / pixscale_arcsec
    ia, ib, _ = mutual_match(x[sel] + ox, y[sel] + oy, gx, gy, rad_px)
    meta["n_matched"] = int(len(ia))
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
    xc, yc = apply_pixel_correction(fit, x, y)
    ra, dec = wcs.pixel_to_world_values(xc, yc)
    log.info(
        "Gaia anchor (%s, %d/%d stars): offset %.3f\", rms %.3f\" -> %.3f\"",
        fit["kind"], fit["n_used"], len(ia), meta["offset_arcsec"], meta["rms_before_arcsec"], meta["rms_after_arcsec"],
    )
    return np.asarray(ra, float), np.asarray(dec, float), meta
