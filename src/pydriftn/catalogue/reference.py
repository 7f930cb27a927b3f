"""Selection of reference stars (normalisation / WCS work) and their stamp grid.

The knobs keep the names of pydriftn 0.1.4, with these documented meanings
(all percentiles are fractions in (0, 1] of the distribution over the
*candidates* of one CCD, i.e. stars detected in the lead band, r, with no
quality flag, inside the edge margin):

``edge_crit``
    Stars closer than ``edge_crit`` × the CCD size (per axis) to an edge are
    not candidates.
``flux_perc``
    A star must be at least as bright as the ``flux_perc`` quantile of the
    candidates' r flux (0.8: the brightest 20 %).
``morph_perc``
    Its ellipticity must not exceed the ``morph_perc`` quantile (0.8: the
    roundest 80 %).
``iso_perc``
    Its nearest-neighbour distance must not be below the ``1 − iso_perc``
    quantile (0.99: all but the 1 % most crowded); on top of the hard
    ``BLENDED`` flag.
``num_target``
    Number wanted per CCD: the stars passing every cut, brightest first; if
    fewer than ``num_target`` pass, the rest is filled from the remaining
    candidates, brightest first (logged). Never saturated, never flagged.

Deterministic: ties broken by the input order (no random sampling).
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["select_reference_stars", "save_stamp_grid"]

log = logging.getLogger(__name__)


def select_reference_stars(
    table, *, shape, num_target=20, edge_crit=0.05, iso_perc=0.99, flux_perc=0.8, morph_perc=0.8, band="r",
    min_snr=20.0,
):
    """Choose the reference stars of one CCD.

    Parameters
    ----------
    table : pandas.DataFrame
        Combined catalogue rows of one CCD with ``x_{band}``, ``y_{band}``,
        ``flux_{band}``, ``snr_{band}``, ``flags``, ``ellipticity``,
        ``nn_dist_arcsec``.
    shape : (ny, nx)
        CCD size in pixels.
    num_target, edge_crit, iso_perc, flux_perc, morph_perc : see module docstring.
    band : str
        Lead band whose positions/fluxes are used ('r' as in 0.1.4: closest to VR).
    min_snr : float
        Minimum S/N in the lead band.

    Returns
    -------
    ndarray of bool
        ``is_reference`` per row.
    """
    ny, nx = shape
    n = len(table)
    chosen = np.zeros(n, bool)
    if n == 0:
        return chosen
    x = table[f"x_{band}"].to_numpy(float)
    y = table[f"y_{band}"].to_numpy(float)
    flux = table[f"flux_{band}"].to_numpy(float)
    snr = table[f"snr_{band}"].to_numpy(float)
    flags = table["flags"].to_numpy(np.int64)
    ell = table["ellipticity"].to_numpy(float)
    iso = table["nn_dist_arcsec"].to_numpy(float)
    mx, my = edge_crit * nx, edge_crit * ny
    fallback = table["centroid_fallback"].to_numpy(bool) if "centroid_fallback" in table else np.zeros(n, bool)
    cand = (
        np.isfinite(x) & np.isfinite(flux) & (flags == 0) & ~fallback & (snr >= min_snr)
        & (x >= mx) & (x <= nx - 1 - mx) & (y >= my) & (y <= ny - 1 - my)
    )
    idx = np.flatnonzero(cand)
    if len(idx) == 0:
        log.warning("no reference-star candidate (unflagged, S/N >= %g, inside the %.0f%% edge margin)", min_snr, 100 * edge_crit)
        return chosen
    f_cut = np.quantile(flux[idx], flux_perc) if flux_perc < 1 else -np.inf
    e_vals = np.nan_to_num(ell[idx], nan=1.0)
    e_cut = np.quantile(e_vals, morph_perc)
    i_vals = np.nan_to_num(iso[idx], posinf=1e9)
    i_cut = np.quantile(i_vals, 1.0 - iso_perc)
    passing = (flux[idx] >= f_cut) & (e_vals <= e_cut) & (i_vals >= i_cut)
    order_pass = idx[passing][np.argsort(-flux[idx[passing]], kind="stable")]
    picked = list(order_pass[:num_target])
    if len(picked) < num_target:
        rest = idx[~passing][np.argsort(-flux[idx[~passing]], kind="stable")]
        extra = list(rest[: num_target - len(picked)])
        if extra:
            log.info(
                "%d stars pass the percentile cuts (want %d): adding %d more unflagged candidates, brightest first",
                len(picked), num_target, len(extra),
            )
        picked += extra
    chosen[np.asarray(picked, int)] = True
    return chosen


def save_stamp_grid(image, xs, ys, labels, path, *, half_size=12, title=None):
    """Save a PNG grid of square stamps centred on ``(xs, ys)``.

    Parameters
    ----------
    image : ndarray
        Background-subtracted (or raw) image.
    xs, ys : array_like
        0-based pixel centres.
    labels : list of str
        One title per stamp (e.g. star ids).
    path : str or Path
        Output PNG (written to a temporary name, then renamed).
    half_size : int
        Stamp half-width in pixels.
    """
    from pathlib import Path

    # the Agg canvas directly: no pyplot, the user's backend is left alone
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    n = len(xs)
    if n == 0:
        return None
    ncol = int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    fig = Figure(figsize=(1.6 * ncol, 1.7 * nrow + 0.4))
    FigureCanvasAgg(fig)
    ny, nx = image.shape
    for k, (x, y, lab) in enumerate(zip(xs, ys, labels)):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        ix, iy = int(round(x)), int(round(y))
        st = np.full((2 * half_size + 1, 2 * half_size + 1), np.nan, dtype=float)
        x0, x1 = max(ix - half_size, 0), min(ix + half_size + 1, nx)
        y0, y1 = max(iy - half_size, 0), min(iy + half_size + 1, ny)
        st[y0 - (iy - half_size): y1 - (iy - half_size), x0 - (ix - half_size): x1 - (ix - half_size)] = image[y0:y1, x0:x1]
        finite = np.isfinite(st)
        lo, hi = (np.percentile(st[finite], [5, 99.5]) if finite.any() else (0, 1))
        ax.imshow(np.arcsinh((st - lo) / max(hi - lo, 1e-6) * 10), origin="lower", cmap="gray")
        ax.plot([half_size + (x - ix)], [half_size + (y - iy)], "r+", ms=6)
        ax.set_title(str(lab), fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    from ..io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    return path
